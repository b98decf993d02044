// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The VMM: at most one VM, its run state, counters, and the rule that
//! one state-changing operation runs at a time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{HostError, HostResult};
use crate::vm::{Vm, VmConfig};

/// CH's VM states (the subset the host uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// No VM yet (a destination waiting for a migration or a restore).
    Created,
    Running,
    Paused,
    /// Migrated away: the state lives on at the destination.
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

    pub fn to_json(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "pauses": g(&self.pauses),
            "resumes": g(&self.resumes),
            "snapshots": g(&self.snapshots),
            "restores": g(&self.restores),
            "migrations_sent": g(&self.migrations_sent),
            "migrations_received": g(&self.migrations_received),
            "migrations_failed": g(&self.migrations_failed),
            "memory_bytes_sent": g(&self.memory_bytes_sent),
            "memory_bytes_received": g(&self.memory_bytes_received),
            "device_bytes_sent": g(&self.device_bytes_sent),
            "device_bytes_received": g(&self.device_bytes_received),
            "memory_passes": g(&self.memory_passes),
            "last_downtime_ms": g(&self.last_downtime_us) as f64 / 1e3,
        })
    }
}

pub struct Vmm {
    vm: Mutex<Option<Arc<Vm>>>,
    state: Mutex<VmState>,
    /// Held by the one state-changing operation in progress.
    op: Mutex<()>,
    pub counters: Counters,
    /// What a migration in progress is doing (`listening`, `memory pass 1`...).
    migration_phase: Mutex<String>,
    /// The report of the last migration, sent or received.
    last_migration: Mutex<Option<Value>>,
}

impl Default for Vmm {
    fn default() -> Self {
        Vmm {
            vm: Mutex::new(None),
            state: Mutex::new(VmState::Created),
            op: Mutex::new(()),
            counters: Counters::default(),
            migration_phase: Mutex::new("idle".to_string()),
            last_migration: Mutex::new(None),
        }
    }
}

impl Vmm {
    /// Creates and starts a VM (the `--memory`/`--device` command line).
    pub fn boot(&self, config: VmConfig) -> HostResult<()> {
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
        *lock(&self.vm) = Some(vm);
        self.set_state(state);
    }

    pub fn set_phase(&self, phase: impl Into<String>) {
        *lock(&self.migration_phase) = phase.into();
    }

    pub fn set_last_migration(&self, report: Value) {
        *lock(&self.last_migration) = Some(report);
    }

    /// Starts a state-changing operation, or says which one is running.
    pub fn begin(&self, what: &str) -> HostResult<MutexGuard<'_, ()>> {
        match self.op.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(HostError::conflict(
                what,
                format!(
                    "another operation is in progress ({})",
                    lock(&self.migration_phase)
                ),
            )),
        }
    }

    /// The VM, if it is in `expected` state.
    pub fn vm_in(&self, what: &str, expected: VmState) -> HostResult<Arc<Vm>> {
        let state = self.state();
        match self.vm() {
            Some(vm) if state == expected => Ok(vm),
            _ => Err(HostError::conflict(
                what,
                format!("VM is {state:?}; this needs it {expected:?}"),
            )),
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
        vm.resume()?;
        self.set_state(VmState::Running);
        Counters::add(&self.counters.resumes, 1);
        Ok(())
    }

    /// `vm.info`: state, memory checksum, devices with VF state and digest.
    pub fn info(&self) -> Value {
        let state = self.state();
        let phase = lock(&self.migration_phase).clone();
        let last = lock(&self.last_migration).clone();
        let migration = json!({ "phase": phase, "last": last });
        match self.vm() {
            None => json!({
                "state": state,
                "config": null,
                "memory": null,
                "devices": [],
                "migration": migration,
            }),
            Some(vm) => {
                let crc = vm.memory().crc32c().ok();
                json!({
                    "state": state,
                    "config": vm.config(),
                    "memory": { "size": vm.memory().size(), "crc32c": crc },
                    "vcpu": { "running": vm.vcpu().is_running(), "writes": vm.vcpu().writes() },
                    "devices": vm.device_infos(),
                    "migration": migration,
                })
            }
        }
    }
}
