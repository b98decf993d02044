// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The VMM: at most one VM, its run state, counters, the rule that one
//! state-changing operation runs at a time, and what the last migration
//! did.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::info;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{HostError, HostResult};
use crate::fault::MigrationTestOptions;
use crate::vm::{Vm, VmConfig};

/// CH's VM states (the subset the host uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// Created but not booted (`vm.create`), or migrated in paused.
    Created,
    Running,
    Paused,
    /// Shut down, or migrated away: the state lives on at the destination.
    Shutdown,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Monotonic counters for `vm.counters`.
#[derive(Default)]
pub struct Counters {
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
    pub snapshots: AtomicU64,
    pub restores: AtomicU64,
    pub migrations_sent: AtomicU64,
    pub migrations_received: AtomicU64,
    pub migrations_failed: AtomicU64,
    pub memory_bytes_sent: AtomicU64,
    pub memory_bytes_received: AtomicU64,
    pub device_bytes_sent: AtomicU64,
    pub device_bytes_received: AtomicU64,
    pub memory_passes: AtomicU64,
    pub last_downtime_us: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// CH's `VmCounters` shape: one object of integer counters per
    /// source (CH has one per device).
    pub fn to_json(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "vm": {
                "pauses": g(&self.pauses),
                "resumes": g(&self.resumes),
                "snapshots": g(&self.snapshots),
                "restores": g(&self.restores),
            },
            "migration": {
                "sent": g(&self.migrations_sent),
                "received": g(&self.migrations_received),
                "failed": g(&self.migrations_failed),
                "memory_bytes_sent": g(&self.memory_bytes_sent),
                "memory_bytes_received": g(&self.memory_bytes_received),
                "device_bytes_sent": g(&self.device_bytes_sent),
                "device_bytes_received": g(&self.device_bytes_received),
                "memory_passes": g(&self.memory_passes),
                "last_downtime_us": g(&self.last_downtime_us),
            },
        })
    }
}

pub struct Vmm {
    vm: Mutex<Option<Arc<Vm>>>,
    /// A VM created by `vm.create` and not booted yet.
    created: Mutex<Option<VmConfig>>,
    state: Mutex<VmState>,
    /// The state-changing operation in progress, if any.
    busy: Mutex<Option<String>>,
    pub counters: Counters,
    /// What a migration in progress is doing (`listening`, `memory pass 1`...).
    migration_phase: Mutex<String>,
    /// The outcome of the last migration, sent or received.
    last_migration: Mutex<Option<Value>>,
    /// Migrations started (sent or received), numbering the outcomes.
    migration_attempts: AtomicU64,
    /// Test hooks armed for the next migration (`vm.arm-migration`).
    test_options: Mutex<MigrationTestOptions>,
    /// Why the last migration's outcome is unknown, until the operator
    /// decided (resumed the VM here, or shut it down or deleted it).
    outcome_unknown: Mutex<Option<String>>,
}

impl Default for Vmm {
    fn default() -> Self {
        Vmm {
            vm: Mutex::new(None),
            created: Mutex::new(None),
            state: Mutex::new(VmState::Created),
            busy: Mutex::new(None),
            counters: Counters::default(),
            migration_phase: Mutex::new("idle".to_string()),
            last_migration: Mutex::new(None),
            migration_attempts: AtomicU64::new(0),
            test_options: Mutex::new(MigrationTestOptions::default()),
            outcome_unknown: Mutex::new(None),
        }
    }
}

/// The one state-changing operation running; ends when dropped.
pub struct Op<'a> {
    vmm: &'a Vmm,
}

impl Op<'_> {
    /// Hands the operation to a thread that ends it with
    /// [`Vmm::end_detached_op`].
    pub fn detach(self) {
        std::mem::forget(self);
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        *lock(&self.vmm.busy) = None;
    }
}

impl Vmm {
    /// Creates and starts a VM (the `--memory`/`--device` command line).
    pub fn boot_config(&self, config: VmConfig) -> HostResult<()> {
        let vm = Arc::new(Vm::create(config, false, None)?);
        vm.resume()?;
        self.install(vm, VmState::Running);
        Ok(())
    }

    pub fn vm(&self) -> Option<Arc<Vm>> {
        lock(&self.vm).clone()
    }

    pub fn state(&self) -> VmState {
        *lock(&self.state)
    }

    pub fn set_state(&self, state: VmState) {
        *lock(&self.state) = state;
    }

    pub fn install(&self, vm: Arc<Vm>, state: VmState) {
        *lock(&self.created) = None;
        *lock(&self.vm) = Some(vm);
        self.set_state(state);
    }

    /// Takes the VM away (a migration that brought it failed).
    pub fn uninstall(&self) -> Option<Arc<Vm>> {
        let vm = lock(&self.vm).take();
        self.set_state(VmState::Created);
        vm
    }

    /// Resumes `vm`, the VM of this VMM. The state says Running from
    /// before the first device resumes, so that whoever watches the
    /// state never misses an instant the VM may run; on failure it says
    /// Paused again.
    pub fn resume_vm(&self, vm: &Vm) -> HostResult<()> {
        self.set_state(VmState::Running);
        vm.resume().inspect_err(|_| self.set_state(VmState::Paused))
    }

    /// Whether a VM exists, booted or only created.
    pub fn has_vm(&self) -> bool {
        self.vm().is_some() || lock(&self.created).is_some()
    }

    pub fn set_phase(&self, phase: impl Into<String>) {
        *lock(&self.migration_phase) = phase.into();
    }

    /// Numbers a new migration attempt.
    pub fn next_migration_attempt(&self) -> u64 {
        self.migration_attempts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Records how migration `attempt` ended (`{"sent": …}`,
    /// `{"received": …}` or `{"failed": …}`).
    pub fn set_last_migration(&self, attempt: u64, mut outcome: Value) {
        outcome["attempt"] = json!(attempt);
        *lock(&self.last_migration) = Some(outcome);
    }

    /// The last migration's outcome is unknown (`reason`): the VM may run
    /// on the other host, so no new migration starts until the operator
    /// decided ([`migration_ext::switchover::check_outcome_known`]).
    pub fn set_outcome_unknown(&self, reason: String) {
        *lock(&self.outcome_unknown) = Some(reason);
    }

    /// Why the last migration's outcome is unknown, if it is.
    pub fn outcome_unknown(&self) -> Option<String> {
        lock(&self.outcome_unknown).clone()
    }

    /// The operator decided where the VM is.
    fn outcome_decided(&self) {
        if lock(&self.outcome_unknown).take().is_some() {
            info!("the operator decided the last migration's unknown outcome");
        }
    }

    /// `{"phase", "attempts", "last", "state"}`: what a migration does
    /// now, how the last one ended, and the VM's state as `vm.info` shows
    /// it (null without a VM), without `vm.info`'s checksums: cheap
    /// enough to poll every few milliseconds.
    pub fn migration_status(&self) -> Value {
        let state = (self.vm().is_some() || lock(&self.created).is_some()).then(|| self.state());
        json!({
            "state": state,
            "phase": lock(&self.migration_phase).clone(),
            "attempts": self.migration_attempts.load(Ordering::Relaxed),
            "last": lock(&self.last_migration).clone(),
        })
    }

    /// Arms test hooks for the next migration (replacing what was armed).
    pub fn arm_test_options(&self, options: MigrationTestOptions) {
        *lock(&self.test_options) = options;
    }

    /// The armed test hooks, disarmed.
    pub fn take_test_options(&self) -> MigrationTestOptions {
        std::mem::take(&mut *lock(&self.test_options))
    }

    /// Starts a state-changing operation, or says which one is running.
    pub fn begin(&self, what: &str) -> HostResult<Op<'_>> {
        let mut busy = lock(&self.busy);
        if let Some(running) = busy.as_deref() {
            return Err(HostError::conflict(
                what,
                format!(
                    "another operation is in progress ({running}: {})",
                    lock(&self.migration_phase)
                ),
            ));
        }
        *busy = Some(what.to_string());
        Ok(Op { vmm: self })
    }

    /// Ends an operation handed to a thread with [`Op::detach`].
    pub fn end_detached_op(&self) {
        *lock(&self.busy) = None;
    }

    /// The VM, if it is in `expected` state; CH's words otherwise.
    pub fn vm_in(&self, what: &str, expected: VmState) -> HostResult<Arc<Vm>> {
        let state = self.state();
        match self.vm() {
            Some(vm) if state == expected => Ok(vm),
            Some(_) => Err(HostError::conflict(
                what,
                format!("VM is {state:?}; this needs it {expected:?}"),
            )),
            None => Err(HostError::vm_not_running()),
        }
    }

    pub fn pause(&self) -> HostResult<()> {
        let _op = self.begin("pause")?;
        let vm = self.vm_in("pause", VmState::Running)?;
        vm.pause()?;
        self.set_state(VmState::Paused);
        Counters::add(&self.counters.pauses, 1);
        Ok(())
    }

    pub fn resume(&self) -> HostResult<()> {
        let _op = self.begin("resume")?;
        let vm = self.vm_in("resume", VmState::Paused)?;
        self.resume_vm(&vm)?;
        Counters::add(&self.counters.resumes, 1);
        // The VM runs here.
        self.outcome_decided();
        Ok(())
    }

    /// `vm.create`: keeps the config; `vm.boot` builds and starts it.
    pub fn create(&self, config: VmConfig) -> HostResult<()> {
        let _op = self.begin("create")?;
        if self.has_vm() {
            return Err(HostError::conflict("create", "VM is already created"));
        }
        config.validate()?;
        *lock(&self.created) = Some(config);
        self.set_state(VmState::Created);
        Ok(())
    }

    /// `vm.boot`: a created VM runs.
    pub fn boot(&self) -> HostResult<()> {
        let _op = self.begin("boot")?;
        if self.vm().is_some() {
            return Err(HostError::conflict("boot", "VM is already booted"));
        }
        let config = lock(&self.created)
            .clone()
            .ok_or_else(|| HostError::new(404, "", "VM config is missing"))?;
        self.boot_config(config)
    }

    /// `vm.shutdown`: the vCPU stops and the VFs are reset; the VM stays
    /// (as in CH, `vm.delete` removes it).
    pub fn shutdown_vm(&self) -> HostResult<()> {
        let _op = self.begin("shutdown")?;
        let vm = match self.state() {
            VmState::Running | VmState::Paused => {
                self.vm().ok_or_else(HostError::vm_not_running)?
            }
            _ => return Err(HostError::vm_not_running()),
        };
        vm.shut_down();
        self.set_state(VmState::Shutdown);
        // This copy is gone: the other one is the VM.
        self.outcome_decided();
        Ok(())
    }

    /// `vm.delete`: the VM is gone (shut down first if it runs).
    pub fn delete(&self) -> HostResult<()> {
        let _op = self.begin("delete")?;
        if let Some(vm) = lock(&self.vm).take() {
            vm.shut_down();
        }
        *lock(&self.created) = None;
        self.set_state(VmState::Created);
        self.outcome_decided();
        Ok(())
    }

    /// `vm.info`: CH's `VmInfo` (config, state, memory_actual_size) plus
    /// what the tests look at: memory checksum, vCPU, VFs with state and
    /// digest, and the migration status.
    pub fn info(&self) -> HostResult<Value> {
        let state = self.state();
        let migration = self.migration_status();
        if let Some(config) = lock(&self.created).clone() {
            return Ok(json!({
                "config": config.to_ch_config(),
                "state": state,
                "memory_actual_size": config.memory_size,
                "devices": [],
                "migration": migration,
            }));
        }
        let vm = self.vm().ok_or_else(HostError::vm_not_created)?;
        let crc = vm.memory().crc32c().ok();
        Ok(json!({
            "config": vm.config().to_ch_config(),
            "state": state,
            "memory_actual_size": vm.memory().size(),
            "memory": { "size": vm.memory().size(), "crc32c": crc },
            "vcpu": { "running": vm.vcpu().is_running(), "writes": vm.vcpu().writes() },
            "devices": vm.device_infos(),
            "migration": migration,
        }))
    }
}
