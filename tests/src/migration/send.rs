// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Source side of a live migration: the protocol extensions come from
//! `migration_ext` (the code the patched Cloud Hypervisor runs); what is
//! here stands in for CH: its pre-copy loop, its memory transport and its
//! state machine around them.
//!
//! The two-step switch-over's rule for the source: once `Switchover` may
//! have reached the destination, the VM never resumes by itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use migration_ext::final_pass::{self, FinalPassMode, FinalPassReport};
use migration_ext::lanes::{DeviceLanes, VramPlan};
use migration_ext::streamed::{self, Component};
use migration_ext::verify::{self, VerifyPlan};
use migration_ext::vram::VramPrecopyMode;
use migration_ext::{checksum, connection, features, switchover};
use serde::Serialize;
use serde_json::json;
use xe_vf_glue::device_set::XeVfSet;
use xe_vf_glue::error_chain::{chain, Chain};
use xe_vf_glue::migration::{Migratable, MigratableError, Snapshot, Snapshottable};
use xe_vf_glue::protocol::{MemoryRangeTable, ProtocolFeatures, Request};
use xe_vf_plugin::backend::Backend;
use xe_vf_plugin::engine::TransferOptions;

use super::conn::{connect, Conn, MigrationUrl};
use super::lanes::SendLanes;
use super::outcome::Failure;
use super::vram::VramReport;
use super::{failed, MigrationConfig};
use crate::api_bodies::{SendMigrationData, TimeoutStrategy};
use crate::error::{HostError, HostResult};
use crate::fault::{self, FaultyStream, MigrationFault, MigrationTestOptions};
use crate::memory::{COPY_CHUNK, PAGE_SIZE};
use crate::vm::{Vm, VmFingerprint};
use crate::vmm::{Counters, VmState, Vmm};

/// Memory bytes per `Memory` command on the main connection.
const MEMORY_CHUNK: u64 = 64 << 20;
/// Longest wait for the destination to listen (CH does not wait; the
/// host does, as tests start both sides at once).
const CONNECT_RETRY: Duration = Duration::from_secs(10);

/// What a completed migration reports.
#[derive(Clone, Debug, Serialize)]
pub struct SendReport {
    /// From pausing the VM to the destination's Ok to Switchover (to
    /// Complete with a destination that has no two-step switch-over).
    pub downtime_ms: f64,
    pub total_ms: f64,
    pub memory_bytes: u64,
    pub device_bytes: u64,
    /// Memory passes, the first full one and the final one included.
    pub memory_passes: u32,
    pub final_pass_bytes: u64,
    /// Connections memory went over (`connections`).
    pub connections: u32,
    /// Memory checksum and VF digests of the source as it stopped.
    pub at_stop: VmFingerprint,
    /// Whether the switch-over had two steps (the destination announced
    /// it); with one, a lost answer to Complete could run the VM twice.
    pub two_step_switchover: bool,
    /// Where the downtime went.
    pub downtime: DowntimeBreakdown,
}

/// The downtime by phase, in milliseconds from the pause.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DowntimeBreakdown {
    /// Final memory pass: CPU-dirty pages, then the DMA-reachable pages
    /// resent or verified (digests and the pages that differ).
    pub final_memory_ms: f64,
    /// Every VF's state streamed and loaded.
    pub device_state_ms: f64,
    /// State and Complete, until the destination's Ok.
    pub switchover_ms: f64,
    /// VF states that went over connections of their own, concurrently
    /// with the final memory pass (0: in turn on the main connection).
    pub device_state_connections: usize,
    /// What the final pass sent, and why (`migration_ext::final_pass`).
    #[serde(flatten)]
    pub final_pass: FinalPassReport,
    /// Each VF's VRAM pre-copy and what its stop-copy stream cost
    /// (`migration_ext::vram`; empty without it).
    pub vram: Vec<VramReport>,
}

/// Everything that must be undone if the migration fails.
#[derive(Default)]
struct Undo {
    dirty_log_started: bool,
    paused: bool,
    /// Inside a DeviceState stream: the connection cannot carry Abandon.
    mid_stream: bool,
    /// Switchover may have reached the destination and was not refused:
    /// the VM may run there, so it must not resume here by itself.
    destination_may_run: bool,
}

struct Sender<'a> {
    vmm: &'a Vmm,
    vm: &'a Arc<Vm>,
    req: &'a SendMigrationData,
    url: &'a MigrationUrl,
    conn: Conn,
    lanes: SendLanes,
    /// One connection per VF when the destination takes device state
    /// concurrently with the final memory pass.
    device_lanes: DeviceLanes<Conn>,
    /// Features both sides agreed to in Start.
    agreed: ProtocolFeatures,
    buf: Vec<u8>,
    undo: Undo,
    fault: Option<MigrationFault>,
    /// Optional protocol features offered in Start.
    features: ProtocolFeatures,
    /// Whether the switch-over has two steps (both announced it).
    two_step: bool,
    memory_bytes: AtomicU64,
    device_bytes: u64,
    passes: u32,
    final_pass: FinalPassMode,
    /// Whether VF state may take connections of its own.
    device_state_connections: bool,
    /// Set when the destination speaks the verify pass and it was set up.
    verify: Option<VerifyPlan>,
    /// Memory bytes per second of the last pre-copy pass.
    link_rate: Option<f64>,
    breakdown: DowntimeBreakdown,
    /// VRAM pre-copy as send-migration's `vram_precopy` asks (`Auto` by
    /// default), unless a test's armed option says otherwise.
    vram_mode: VramPrecopyMode,
    /// Share of each VF's VRAM its work rewrites once pre-copy converged
    /// (a benchmark's test option); `None` once done.
    vram_change_percent: Option<u8>,
}

/// `vm.send-migration`: checks the request, then migrates in a worker
/// thread and returns at once, as CH does. The outcome shows in
/// `vm.info`'s `migration` (and `vmm.migration`): `{"sent": report}`,
/// `{"failed": …}` or `{"unknown": …}`; on success the VM is Shutdown
/// here, on failure it runs on (or stays paused if it was paused), with
/// an unknown outcome it stays Paused for an operator to decide.
pub fn start(vmm: &Arc<Vmm>, req: SendMigrationData) -> HostResult<()> {
    let url = req.check()?;
    switchover::check_outcome_known(vmm.outcome_unknown().as_deref(), req.outcome_checked)
        .map_err(|e| HostError::failed("", chain(&e)))?;
    let op = vmm.begin("send-migration")?;
    let vm = vmm.vm().ok_or_else(HostError::vm_not_running)?;
    let initial = vmm.state();
    if !matches!(initial, VmState::Running | VmState::Paused) {
        return Err(HostError::failed(
            "",
            format!("VM is not running or paused: {initial:?}"),
        ));
    }
    let options = vmm.take_test_options();
    let attempt = vmm.next_migration_attempt();
    info!(
        "Sending migration: destination_url={},downtime={}ms,timeout={}s,timeout_strategy={:?},connections={}",
        req.destination_url,
        req.downtime_ms,
        req.timeout_s,
        req.timeout_strategy,
        req.connections
    );
    vmm.set_phase("send: connect");
    let worker_vmm = vmm.clone();
    op.detach();
    let spawned = std::thread::Builder::new()
        .name("migration-worker".into())
        .spawn(move || {
            let vmm = worker_vmm;
            let result = send(&vmm, &vm, &req, &url, initial, options);
            vmm.end_detached_op();
            vmm.set_phase("idle");
            let outcome = match result {
                Ok(report) => serde_json::to_value(&report)
                    .map(|r| json!({ "sent": r }))
                    .unwrap_or_else(|e| json!({ "failed": { "error": [e.to_string()] } })),
                Err(f) => {
                    if f.unknown {
                        vmm.set_outcome_unknown(f.error.to_string());
                    }
                    f.outcome()
                }
            };
            vmm.set_last_migration(attempt, outcome);
        });
    if let Err(e) = spawned {
        vmm.end_detached_op();
        vmm.set_phase("idle");
        return Err(HostError::failed("migration worker", e));
    }
    Ok(())
}

/// Migrates `vm` (in `initial` state) to `url`.
fn send(
    vmm: &Vmm,
    vm: &Arc<Vm>,
    req: &SendMigrationData,
    url: &MigrationUrl,
    initial: VmState,
    options: MigrationTestOptions,
) -> Result<SendReport, Failure> {
    let timeout = req.timeout();
    let started = Instant::now();
    let conn = connect(url, started + CONNECT_RETRY.min(timeout))
        .and_then(|c| c.set_timeouts(timeout).map(|()| c))
        .map_err(|e| HostError::failed("connect", format!("{}: {e}", req.destination_url)));
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            error!("send-migration failed in {}: {}", e.phase, e.cause);
            Counters::add(&vmm.counters.migrations_failed, 1);
            return Err(e.into());
        }
    };
    // A VF data fd silent for as long as the peer may be is an error too.
    for d in vm.devices().devices_mut() {
        d.set_transfer_options(TransferOptions {
            device_timeout: timeout,
            ..TransferOptions::default()
        });
    }
    let mut sender = Sender {
        vmm,
        vm,
        req,
        url,
        conn,
        lanes: SendLanes::default(),
        device_lanes: DeviceLanes::none(),
        agreed: ProtocolFeatures::empty(),
        buf: vec![0u8; COPY_CHUNK],
        undo: Undo::default(),
        fault: options.fault.clone(),
        features: options.protocol_features(),
        two_step: false,
        memory_bytes: AtomicU64::new(0),
        device_bytes: 0,
        passes: 0,
        final_pass: req.final_pass,
        device_state_connections: options.device_state_connections,
        verify: None,
        link_rate: None,
        breakdown: DowntimeBreakdown::default(),
        vram_mode: options.vram_precopy.unwrap_or(req.vram_precopy),
        vram_change_percent: Some(options.vram_change_percent).filter(|p| *p > 0),
    };
    let result = sender.run(started, initial);
    sender.lanes.close();
    sender.device_lanes.close();
    // Back to the defaults for what follows (snapshots, a next attempt).
    for d in vm.devices().devices_mut() {
        d.set_transfer_options(TransferOptions::default());
    }
    match result {
        Ok(report) => {
            info!(
                "migration complete: downtime {:.1} ms, {} memory bytes in {} passes over {} connection(s), {} device bytes",
                report.downtime_ms,
                report.memory_bytes,
                report.memory_passes,
                report.connections,
                report.device_bytes
            );
            Counters::add(&vmm.counters.migrations_sent, 1);
            vmm.counters.last_downtime_us.store(
                (report.downtime_ms * 1e3) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            Ok(report)
        }
        Err(e) if sender.undo.destination_may_run => {
            error!(
                "send-migration outcome unknown in {}: {}; the VM stays Paused here",
                e.phase, e.cause
            );
            sender.stay_paused();
            Err(Failure::unknown(e))
        }
        Err(mut e) => {
            error!("send-migration failed in {}: {}", e.phase, e.cause);
            if !sender.roll_back(initial) {
                // The caller must not take the VM for running.
                e.cause
                    .push_str("; the VM could not resume and is Paused (vm.resume retries)");
            }
            Counters::add(&vmm.counters.migrations_failed, 1);
            Err(e.into())
        }
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The VM's VFs as the protocol extensions see them, in wire order.
fn components(set: &mut XeVfSet) -> Vec<Component<'_>> {
    let mut components: Vec<Component> = set
        .devices_mut()
        .iter_mut()
        .map(|d| Component {
            id: Snapshottable::id(d),
            state: d,
        })
        .collect();
    streamed::wire_order(&mut components, |c| &c.id);
    components
}

impl Sender<'_> {
    fn run(&mut self, started: Instant, initial: VmState) -> HostResult<SendReport> {
        self.phase("start");
        let agreed =
            features::start(&mut self.conn, self.features).map_err(|e| failed("start", &e))?;
        self.agreed = agreed;
        {
            let mut set = self.vm.devices();
            let ids: Vec<String> = components(&mut set).into_iter().map(|c| c.id).collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            streamed::require_device_state(agreed, &ids).map_err(|e| failed("start", &e))?;
        }
        self.two_step = switchover::negotiated(self.features, agreed);

        // The destination checks compatibility here; nothing has been
        // touched on this side yet.
        self.phase("config");
        self.send_config()?;
        self.set_up_verify()?;

        self.phase("start dirty log");
        {
            let mut set = self.vm.devices();
            for d in set.devices_mut() {
                d.start_migration()
                    .map_err(|e| failed("start migration", &e))?;
            }
            self.undo.dirty_log_started = true;
            for d in set.devices_mut() {
                d.start_dirty_log()
                    .map_err(|e| failed("start dirty log", &e))?;
            }
        }
        self.vm.memory().clear_dirty();
        self.phase("connections");
        self.lanes = SendLanes::open(self.url, self.req.connections.get(), self.req.timeout())?;
        self.open_device_lanes()?;
        self.start_vram_precopy()?;

        let leftover = self.precopy()?;

        // Downtime starts: vCPU stops, every VF to RUNNING_P2P then STOP.
        self.phase("pause");
        let downtime_started = Instant::now();
        if initial == VmState::Running {
            self.vm.pause()?;
            self.undo.paused = true;
            self.vmm.set_state(VmState::Paused);
        }
        self.inject("pause");

        let devices = self.device_dirty()?;
        let final_pass_bytes = if self.device_lanes.is_empty() {
            let bytes = self.final_memory_pass(&leftover, devices)?;
            // Memory is all there: the extra connections end (CH's cleanup).
            self.lanes.close();
            self.breakdown.final_memory_ms = ms_since(downtime_started);
            self.log_checksum();
            self.inject("state");
            self.send_state()?;
            let devices_started = Instant::now();
            self.send_device_states()?;
            self.breakdown.device_state_ms = ms_since(devices_started);
            bytes
        } else {
            let bytes = self.final_pass_with_device_lanes(&leftover, devices, downtime_started)?;
            self.lanes.close();
            self.log_checksum();
            self.inject("state");
            self.send_state()?;
            bytes
        };
        let switchover_started = Instant::now();

        self.phase("complete");
        self.inject("complete");
        let complete = if initial == VmState::Running {
            Request::complete()
        } else {
            Request::complete_paused()
        };
        complete
            .write_to(&mut self.conn)
            .map_err(|e| failed("complete", &e))?;
        // Two steps: the destination is ready, the VM paused there too.
        connection::expect_ok(&mut self.conn).map_err(|e| failed("complete", &e))?;
        if self.two_step {
            self.inject("ready");
            self.hand_over()?;
        }
        let downtime = downtime_started.elapsed();
        self.breakdown.switchover_ms = ms_since(switchover_started);

        // The destination runs the VM now: this side stays stopped.
        {
            let mut set = self.vm.devices();
            for d in set.devices_mut() {
                if let Err(e) = d.complete_migration() {
                    warn!("after migration: {}", Chain(&e));
                }
                if let Err(e) = d.stop_dirty_log() {
                    warn!("after migration: {}", Chain(&e));
                }
            }
        }
        self.vm.shut_down();
        self.vmm.set_state(VmState::Shutdown);
        let at_stop = self.vm.fingerprint()?;
        Ok(SendReport {
            downtime_ms: downtime.as_secs_f64() * 1e3,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            memory_bytes: self.memory_bytes.load(Ordering::Relaxed),
            device_bytes: self.device_bytes,
            memory_passes: self.passes,
            final_pass_bytes,
            connections: self.req.connections.get(),
            at_stop,
            two_step_switchover: self.two_step,
            downtime: std::mem::take(&mut self.breakdown),
        })
    }

    /// One connection per VF for its state, when both sides agreed and
    /// the test options allow (a fault armed for the device stream is
    /// injected on the main connection's path, so it keeps that path).
    fn open_device_lanes(&mut self) -> HostResult<()> {
        let stream_fault = self
            .fault
            .as_ref()
            .is_some_and(|f| f.phase == "device-state");
        let vfs = self.vm.devices().devices().len();
        if !self.device_state_connections
            || !self
                .agreed
                .contains(ProtocolFeatures::DEVICE_STATE_CONNECTIONS)
            || vfs == 0
            || stream_fault
        {
            return Ok(());
        }
        let (url, timeout) = (self.url.clone(), self.req.timeout());
        self.device_lanes = DeviceLanes::open(vfs, || {
            let conn = connect(&url, Instant::now() + timeout)
                .and_then(|c| c.set_timeouts(timeout).map(|()| c))
                .map_err(MigratableError::MigrateSocket)?;
            Ok(conn)
        })
        .map_err(|e| failed("device-state connections", &e))?;
        Ok(())
    }

    /// With the destination agreeing to VRAM pre-copy and a connection
    /// per VF: starts reading each VF's VRAM through its BAR and sending
    /// it ahead, while memory pre-copy runs (`migration_ext::vram`).
    fn start_vram_precopy(&mut self) -> HostResult<()> {
        if self.vram_mode == VramPrecopyMode::Off
            || !self.agreed.contains(ProtocolFeatures::VRAM_PRECOPY)
            || self.device_lanes.is_empty()
        {
            return Ok(());
        }
        let sources: Vec<_> = {
            let mut set = self.vm.devices();
            let mut devices: Vec<_> = set
                .devices_mut()
                .iter()
                .map(|d| (Snapshottable::id(d), d))
                .collect();
            streamed::wire_order(&mut devices, |(id, _)| id);
            devices.into_iter().map(|(_, d)| d.vram_source()).collect()
        };
        if sources.iter().all(Option::is_none) {
            return Ok(());
        }
        self.phase("vram pre-copy");
        let plan = VramPlan::prepare(self.vram_mode).map_err(|e| failed("vram pre-copy", &e))?;
        self.device_lanes
            .start_vram_precopy(sources, Arc::new(plan))
            .map_err(|e| failed("vram pre-copy", &e))?;
        Ok(())
    }

    /// Benchmarks: each emulated VF rewrites `percent` of its VRAM.
    fn change_vram(&mut self, percent: u8) -> HostResult<()> {
        let mut set = self.vm.devices();
        for (i, d) in set.devices_mut().iter().enumerate() {
            if let Backend::Emulated(vf) = d.backend() {
                let bytes = vf
                    .change_vram(percent, 0xc4a9_e000 + i as u64)
                    .map_err(|e| HostError::failed("vram change", e))?;
                info!("test option: {} rewrote {bytes} bytes of its VRAM", d.id());
            }
        }
        Ok(())
    }

    /// With the destination agreeing to the verify pass (and the user not
    /// forcing a resend), chooses the digest function and key and sends
    /// them, so that the destination hashes every page of pre-copy as it
    /// arrives.
    fn set_up_verify(&mut self) -> HostResult<()> {
        let wanted = self.final_pass != FinalPassMode::Resend;
        let has_devices = !self.vm.devices().devices().is_empty();
        if !self.agreed.contains(ProtocolFeatures::VERIFY) || !wanted || !has_devices {
            return Ok(());
        }
        self.phase("verify setup");
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let plan = VerifyPlan::prepare(threads).map_err(|e| failed("verify setup", &e))?;
        verify::send_setup(&mut self.conn, &plan).map_err(|e| failed("verify setup", &e))?;
        self.verify = Some(plan);
        Ok(())
    }

    /// The final pass: CPU-dirty pages (and what pre-copy left over),
    /// then the pages the VFs may have DMA'd into, resent or, with the
    /// verify pass, checked by digest and only the differing ones sent
    /// (`migration_ext::final_pass`). Returns the memory bytes this pass
    /// put on the wire.
    fn final_memory_pass(
        &mut self,
        leftover: &[u64],
        devices: MemoryRangeTable,
    ) -> HostResult<u64> {
        let mut cpu = self.vm.memory().take_dirty_bitmap();
        for (w, l) in cpu.iter_mut().zip(leftover) {
            *w |= l;
        }
        let cpu = MemoryRangeTable::from_dirty_bitmap(cpu, 0, PAGE_SIZE);
        let pass = final_pass::plan(
            cpu,
            devices,
            self.verify.as_ref(),
            self.final_pass,
            self.link_rate,
        );
        let mut report = pass.report;
        let mut bytes = pass.send.effective_size();
        self.send_memory(pass.send, true)?;
        if let (false, Some(plan)) = (pass.verify.is_empty(), self.verify.take()) {
            let phase = "final memory pass (digests)";
            self.phase(phase);
            let memory = self.vm.memory().clone();
            let exchanged = verify::exchange_digests(&mut self.conn, &*memory, &pass.verify, &plan);
            self.verify = Some(plan);
            let (differ, outcome) = exchanged.map_err(|e| failed(phase, &e))?;
            report.verify = Some(outcome);
            bytes += differ.effective_size();
            if !differ.is_empty() {
                self.send_memory(differ, true)?;
            }
        }
        self.breakdown.final_pass = report;
        Ok(bytes)
    }

    /// The second step: sends Switchover and reads the answer. From the
    /// moment a byte of it may have left, the VM does not resume here by
    /// itself, unless the destination says it does not run it.
    fn hand_over(&mut self) -> HostResult<()> {
        self.phase("switchover");
        let unconfirmed =
            |e: &MigratableError| matches!(e, MigratableError::SwitchoverUnconfirmed(_));
        if let Err(e) = switchover::send_switchover(&mut self.conn) {
            self.undo.destination_may_run = unconfirmed(&e);
            return Err(failed("switchover", &e));
        }
        self.undo.destination_may_run = true;
        self.inject("switchover-sent");
        switchover::read_confirmation(&mut self.conn).map_err(|e| {
            self.undo.destination_may_run = unconfirmed(&e);
            failed("switchover", &e)
        })
    }

    /// The outcome is unknown: the VM stays Paused, its VFs in STOP with
    /// their state, for an operator to resume or delete.
    fn stay_paused(&mut self) {
        let mut set = self.vm.devices();
        for d in set.devices_mut() {
            if let Err(e) = d.stop_dirty_log() {
                warn!("outcome unknown: {}", Chain(&e));
            }
        }
        self.vmm.set_state(VmState::Paused);
        self.conn.shutdown();
    }

    /// CH's precopy loop: all memory, then what got dirty, until the
    /// estimated downtime of the next pass (its bytes at the last pass's
    /// rate) is within `downtime_ms` or nothing is dirty. Past `timeout_s`
    /// `Cancel` fails the migration, `Ignore` stops iterating. Returns the
    /// dirty pages not sent yet, for the final pass.
    fn precopy(&mut self) -> HostResult<Vec<u64>> {
        let precopy_started = Instant::now();
        let downtime_ms = self.req.downtime().as_secs_f64() * 1e3;
        // Bytes per millisecond of the last pass.
        let mut rate: Option<f64> = None;
        let mut iteration = 0u32;
        loop {
            let (table, bitmap) = if iteration == 0 {
                (self.vm.memory().whole(), Vec::new())
            } else {
                let mut bitmap = self.vm.memory().take_dirty_bitmap();
                let devices = self.device_dirty()?;
                self.vm.memory().merge_into_bitmap(&mut bitmap, &devices);
                let table =
                    MemoryRangeTable::from_dirty_bitmap(bitmap.iter().copied(), 0, PAGE_SIZE);
                (table, bitmap)
            };
            let bytes = table.effective_size();
            let memory_converged =
                bytes == 0 || rate.is_some_and(|rate| bytes as f64 / rate <= downtime_ms);
            // VRAM still pre-copying: memory passes go on meanwhile.
            let converged = self
                .device_lanes
                .hold_convergence(
                    memory_converged,
                    precopy_started.elapsed(),
                    self.req.timeout(),
                )
                .map_err(|e| failed("vram pre-copy", &e))?;
            if converged {
                let Some(percent) = self.vram_change_percent.take() else {
                    debug!("precopy: converged ({bytes} bytes left)");
                    return Ok(bitmap);
                };
                // The VFs' work moves on; so does memory pre-copy, with
                // this pass's pages.
                self.change_vram(percent)?;
                if bytes == 0 {
                    continue;
                }
            }
            // Held back for VRAM's sake, with nothing to send.
            if memory_converged && bytes == 0 {
                continue;
            }
            if precopy_started.elapsed() >= self.req.timeout() {
                match self.req.timeout_strategy {
                    TimeoutStrategy::Cancel => {
                        return Err(HostError::failed(
                            format!("memory pass {}", self.passes),
                            format!(
                                "Precopy: Timeout reached: {}s: migration didn't converge in time",
                                self.req.timeout_s
                            ),
                        ))
                    }
                    TimeoutStrategy::Ignore => {
                        info!(
                            "precopy: pausing despite the downtime goal ({downtime_ms} ms): \
                             timeout of {}s reached",
                            self.req.timeout_s
                        );
                        return Ok(bitmap);
                    }
                }
            }
            let pass_started = Instant::now();
            self.send_memory(table, false)?;
            let elapsed_ms = pass_started.elapsed().as_secs_f64() * 1e3;
            rate = Some(bytes as f64 / elapsed_ms.max(0.001));
            self.link_rate = rate.map(|r| r * 1e3);
            iteration += 1;
        }
    }

    fn phase(&self, phase: &str) {
        self.vmm.set_phase(format!("send: {phase}"));
    }

    /// A write to the destination failed: names the destination's
    /// refusal as the cause if it sent one, else the write error.
    fn write_failed(&mut self, phase: &str, e: impl std::fmt::Display) -> HostError {
        match connection::refusal(&mut self.conn) {
            Some(reason) => {
                HostError::failed(phase, format!("{e}; the destination said: {reason}"))
            }
            None => HostError::failed(phase, e),
        }
    }

    /// Test hook: fires the requested fault if it is for `phase`.
    fn inject(&mut self, phase: &str) {
        if let Some(f) = fault::take_for(&mut self.fault, phase) {
            self.vmm.set_phase(format!("send: fault at {phase}"));
            f.fire(&self.conn);
        }
    }

    /// Logs the guest memory checksum at the stop, when asked
    /// (`migration_ext::checksum`).
    fn log_checksum(&self) {
        let memory = self.vm.memory();
        checksum::log_if_enabled("at the stop", &**memory, &memory.regions());
    }

    fn send_config(&mut self) -> HostResult<()> {
        let streamed = {
            let mut set = self.vm.devices();
            streamed::describe(&components(&mut set)).map_err(|e| failed("config", &e))?
        };
        let config = MigrationConfig {
            vm: self.vm.config().clone(),
            streamed,
        };
        let payload = serde_json::to_vec(&config).map_err(|e| HostError::failed("config", e))?;
        Request::config(payload.len() as u64)
            .write_to(&mut self.conn)
            .map_err(|e| failed("config", &e))?;
        std::io::Write::write_all(&mut self.conn, &payload)
            .map_err(|e| HostError::failed("config", e))?;
        connection::expect_ok(&mut self.conn).map_err(|e| failed("config", &e))
    }

    /// What the VFs report dirty (for `dirty_tracking=all`: nothing while
    /// they run, every DMA range once they are stopped), each page once.
    fn device_dirty(&mut self) -> HostResult<MemoryRangeTable> {
        let mut set = self.vm.devices();
        let mut tables = Vec::new();
        for d in set.devices_mut() {
            tables.push(d.dirty_log().map_err(|e| failed("dirty log", &e))?);
        }
        Ok(migration_ext::ranges::union(tables))
    }

    fn send_memory(&mut self, table: MemoryRangeTable, final_pass: bool) -> HostResult<()> {
        self.passes += 1;
        let phase = if final_pass {
            format!("final memory pass {}", self.passes - 1)
        } else {
            format!("memory pass {}", self.passes - 1)
        };
        self.phase(&phase);
        Counters::add(&self.vmm.counters.memory_passes, 1);
        let before = self.memory_bytes.load(Ordering::Relaxed);
        let sent = if self.lanes.is_empty() {
            self.send_memory_on_main(table, final_pass, &phase)
        } else {
            self.lanes
                .send(self.vm.memory(), table, &phase, &self.memory_bytes)
        };
        let moved = self.memory_bytes.load(Ordering::Relaxed) - before;
        Counters::add(&self.vmm.counters.memory_bytes_sent, moved);
        sent
    }

    /// One connection: `Memory` requests of [`MEMORY_CHUNK`] on the main one.
    fn send_memory_on_main(
        &mut self,
        table: MemoryRangeTable,
        final_pass: bool,
        phase: &str,
    ) -> HostResult<()> {
        for chunk in table.partition(MEMORY_CHUNK) {
            if let Err(e) = Request::memory(chunk.length())
                .write_to(&mut self.conn)
                .and_then(|()| chunk.write_to(&mut self.conn))
            {
                return Err(self.write_failed(phase, Chain(&e)));
            }
            if final_pass {
                self.inject("final-memory");
            }
            for r in chunk.regions() {
                if let Err(e) = self
                    .vm
                    .memory()
                    .send_range(r, &mut self.conn, &mut self.buf)
                {
                    return Err(self.write_failed(phase, e));
                }
                self.memory_bytes.fetch_add(r.length, Ordering::Relaxed);
            }
            connection::expect_ok(&mut self.conn).map_err(|e| failed(phase, &e))?;
        }
        Ok(())
    }

    /// The final memory pass on the main connection while every VF's
    /// state streams over its own connection, all at once
    /// (`migration_ext::lanes`). Returns the memory bytes of the final
    /// pass.
    fn final_pass_with_device_lanes(
        &mut self,
        leftover: &[u64],
        devices: MemoryRangeTable,
        paused: Instant,
    ) -> HostResult<u64> {
        self.vmm
            .set_phase("send: final memory pass and device state");
        let mut lanes = std::mem::replace(&mut self.device_lanes, DeviceLanes::none());
        lanes.set_link_rate(self.link_rate.unwrap_or(0.0));
        self.breakdown.device_state_connections = lanes.len();
        let vm = self.vm.clone();
        let mut set = vm.devices();
        let mut components = components(&mut set);
        let lanes_started = ms_since(paused);
        let (memory, outcomes) = lanes.send(&mut components, || {
            let memory = self.final_memory_pass(leftover, devices);
            self.breakdown.final_memory_ms = ms_since(paused);
            memory
        });
        drop(components);
        drop(set);
        let mut first_error = None;
        for o in outcomes {
            self.breakdown.vram.extend(VramReport::of(&o));
            let done_ms = lanes_started + o.elapsed.as_secs_f64() * 1e3;
            self.breakdown.device_state_ms = self.breakdown.device_state_ms.max(done_ms);
            match o.result {
                Ok(bytes) => {
                    self.device_bytes += bytes;
                    Counters::add(&self.vmm.counters.device_bytes_sent, bytes);
                }
                Err(e) => {
                    first_error.get_or_insert(failed(format!("device-state {}", o.id), &e));
                }
            }
        }
        let bytes = memory?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(bytes),
        }
    }

    /// Each stopped VF's state, streamed straight into the socket, in
    /// wire order, after State.
    fn send_device_states(&mut self) -> HostResult<()> {
        let vm = self.vm.clone();
        let mut set = vm.devices();
        for (position, c) in components(&mut set).iter_mut().enumerate() {
            let phase = format!("device-state {}", c.id);
            self.vmm.set_phase(format!("send: {phase}"));
            let stream_fault = fault::take_for(&mut self.fault, "device-state");
            let clone = |c: &Conn| c.try_clone().map_err(|e| HostError::failed(&phase, e));
            let mut out = FaultyStream::new(clone(&self.conn)?, clone(&self.conn)?, stream_fault);
            self.undo.mid_stream = true;
            let bytes = streamed::send_one(&mut self.conn, position, c, Some(&mut out))
                .map_err(|e| failed(&phase, &e))?;
            self.undo.mid_stream = false;
            self.device_bytes += bytes;
            Counters::add(&self.vmm.counters.device_bytes_sent, bytes);
        }
        Ok(())
    }

    /// The small JSON tree: one section per VF (no device data in it).
    fn send_state(&mut self) -> HostResult<()> {
        self.phase("state");
        let mut root = Snapshot::default();
        {
            let mut set = self.vm.devices();
            for d in set.devices_mut() {
                let section = d.snapshot().map_err(|e| failed("state", &e))?;
                root.add_snapshot(Snapshottable::id(d), section);
            }
        }
        let payload = serde_json::to_vec(&root).map_err(|e| HostError::failed("state", e))?;
        Request::state(payload.len() as u64)
            .write_to(&mut self.conn)
            .map_err(|e| failed("state", &e))?;
        std::io::Write::write_all(&mut self.conn, &payload)
            .map_err(|e| HostError::failed("state", e))?;
        connection::expect_ok(&mut self.conn).map_err(|e| failed("state", &e))
    }

    /// Abandon if the connection can still carry it, then run on here.
    /// Returns whether the VM is back in its `initial` state.
    fn roll_back(&mut self, initial: VmState) -> bool {
        // The VM runs again first: telling the destination may block for
        // a timeout on a stalled peer, and the VM must not wait for that
        // (the destination cannot run anything without Complete).
        if self.undo.dirty_log_started {
            let mut set = self.vm.devices();
            for d in set.devices_mut() {
                if let Err(e) = d.stop_dirty_log() {
                    warn!("rolling back: {}", Chain(&e));
                }
            }
        }
        let mut state = initial;
        if self.undo.paused {
            match self.vmm.resume_vm(self.vm) {
                Ok(()) => info!("source VM resumed after the failed migration"),
                Err(e) => {
                    error!("source VM could not resume after the failed migration: {e}");
                    state = VmState::Paused;
                }
            }
        }
        self.vmm.set_state(state);
        if self.undo.mid_stream {
            // The destination is inside a device stream; only closing the
            // connection ends it.
            self.conn.shutdown();
        } else {
            let sent = self
                .conn
                .set_timeouts(Duration::from_secs(2))
                .and_then(|()| {
                    Request::abandon()
                        .write_to(&mut self.conn)
                        .map_err(|e| std::io::Error::other(chain(&e)))
                });
            if let Err(e) = sent {
                info!("could not send Abandon ({e}); closing the connection");
                self.conn.shutdown();
            }
        }
        state == initial
    }
}
