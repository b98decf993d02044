// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Source side of a live migration.
//!
//! The two-step switch-over (when both sides announce it) is in
//! [`super::switchover`]; here the rule it gives the source: once
//! `Switchover` may have reached the destination, the VM never resumes
//! by itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use serde::Serialize;
use serde_json::json;
use xe_vf_glue::device_set::XeVfSet;
use xe_vf_glue::error_chain::{chain, Chain};
use xe_vf_glue::migration::{Migratable, Snapshot, Snapshottable};
use xe_vf_glue::protocol::{MemoryRangeTable, ProtocolFeatures, Request};
use xe_vf_plugin::engine::TransferOptions;

use super::conn::{connect, Conn, MigrationUrl};
use super::lanes::SendLanes;
use super::switchover::{self, Failure, Unconfirmed};
use super::{expect_ok, peer_refusal, read_ok, streamed_order, CountingWriter, MigrationConfig};
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
    buf: Vec<u8>,
    undo: Undo,
    fault: Option<MigrationFault>,
    /// Optional protocol features announced in Start.
    features: ProtocolFeatures,
    /// Whether the switch-over has two steps (both announced it).
    two_step: bool,
    memory_bytes: AtomicU64,
    device_bytes: u64,
    passes: u32,
}

/// `vm.send-migration`: checks the request, then migrates in a worker
/// thread and returns at once, as CH does. The outcome shows in
/// `vm.info`'s `migration` (and `vmm.migration`): `{"sent": report}`,
/// `{"failed": …}` or `{"unknown": …}`; on success the VM is Shutdown
/// here, on failure it runs on (or stays paused if it was paused), with
/// an unknown outcome it stays Paused for an operator to decide.
pub fn start(vmm: &Arc<Vmm>, req: SendMigrationData) -> HostResult<()> {
    let url = req.check()?;
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
                Err(f) => f.outcome(),
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
        buf: vec![0u8; COPY_CHUNK],
        undo: Undo::default(),
        fault: options.fault.clone(),
        features: options.protocol_features(),
        two_step: false,
        memory_bytes: AtomicU64::new(0),
        device_bytes: 0,
        passes: 0,
    };
    let result = sender.run(started, initial);
    sender.lanes.close();
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
            Err(Failure::unknown(e.context(switchover::SOURCE_UNKNOWN)))
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

/// The VM's device ids, in config order.
fn device_ids(set: &XeVfSet) -> Vec<String> {
    set.devices().iter().map(Snapshottable::id).collect()
}

impl Sender<'_> {
    fn run(&mut self, started: Instant, initial: VmState) -> HostResult<SendReport> {
        self.phase("start");
        Request::start_with_features(self.features)
            .write_to(&mut self.conn)
            .map_err(|e| HostError::failed("start", Chain(&e)))?;
        let answered = read_ok(&mut self.conn, "start")?.features();
        let agreed = answered & self.features;
        debug!("protocol features: {agreed:?}");
        self.refuse_without_device_state(agreed)?;
        self.two_step = switchover::negotiated(self.features, answered);

        // The destination checks compatibility here; nothing has been
        // touched on this side yet.
        self.phase("config");
        self.send_config()?;

        self.phase("start dirty log");
        {
            let mut set = self.vm.devices();
            for d in set.devices_mut() {
                d.start_migration()
                    .map_err(|e| HostError::failed("start migration", Chain(&e)))?;
            }
            self.undo.dirty_log_started = true;
            for d in set.devices_mut() {
                d.start_dirty_log()
                    .map_err(|e| HostError::failed("start dirty log", Chain(&e)))?;
            }
        }
        self.vm.memory().clear_dirty();
        self.phase("connections");
        self.lanes = SendLanes::open(self.url, self.req.connections.get(), self.req.timeout())?;

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

        let mut bitmap = self.vm.memory().take_dirty_bitmap();
        for (w, l) in bitmap.iter_mut().zip(&leftover) {
            *w |= l;
        }
        self.merge_device_dirty(&mut bitmap)?;
        let final_table = MemoryRangeTable::from_dirty_bitmap(bitmap, 0, PAGE_SIZE);
        let final_pass_bytes = final_table.effective_size();
        self.send_memory(final_table, true)?;
        // Memory is all there: the extra connections end (CH's cleanup).
        self.lanes.close();

        self.inject("state");
        self.send_state()?;
        self.send_device_states()?;

        self.phase("complete");
        self.inject("complete");
        let complete = if initial == VmState::Running {
            Request::complete()
        } else {
            Request::complete_paused()
        };
        complete
            .write_to(&mut self.conn)
            .map_err(|e| HostError::failed("complete", Chain(&e)))?;
        // Two steps: the destination is ready, the VM paused there too.
        expect_ok(&mut self.conn, "complete")?;
        if self.two_step {
            self.inject("ready");
            self.hand_over()?;
        }
        let downtime = downtime_started.elapsed();

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
        })
    }

    /// A destination that does not take streamed device state cannot
    /// receive a VF: refused before anything stops.
    fn refuse_without_device_state(&self, agreed: ProtocolFeatures) -> HostResult<()> {
        if agreed.contains(ProtocolFeatures::DEVICE_STATE) {
            return Ok(());
        }
        let ids = device_ids(&self.vm.devices());
        if ids.is_empty() {
            return Ok(());
        }
        let cause = if self.features.contains(ProtocolFeatures::DEVICE_STATE) {
            "the destination does not take streamed device state (DEVICE_STATE): it cannot \
             receive"
        } else {
            "streamed device state (DEVICE_STATE) is not announced: this host cannot send"
        };
        Err(HostError::failed(
            "start",
            format!("{cause} {}", ids.join(", ")),
        ))
    }

    /// The second step: sends Switchover and reads the answer. From the
    /// moment a byte of it may have left, the VM does not resume here by
    /// itself, unless the destination says it does not run it.
    fn hand_over(&mut self) -> HostResult<()> {
        self.phase("switchover");
        switchover::send(&mut self.conn)?;
        self.undo.destination_may_run = true;
        self.inject("switchover-sent");
        switchover::confirmation(&mut self.conn).map_err(|e| match e {
            Unconfirmed::Refused(e) => {
                self.undo.destination_may_run = false;
                e
            }
            Unconfirmed::NoAnswer(e) => e,
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
                self.merge_device_dirty(&mut bitmap)?;
                let table =
                    MemoryRangeTable::from_dirty_bitmap(bitmap.iter().copied(), 0, PAGE_SIZE);
                (table, bitmap)
            };
            let bytes = table.effective_size();
            if bytes == 0 {
                debug!("precopy: no more memory to transfer");
                return Ok(bitmap);
            }
            if let Some(rate) = rate {
                let estimate_ms = bytes as f64 / rate;
                if estimate_ms <= downtime_ms {
                    debug!("precopy: converged, {estimate_ms:.1} ms <= {downtime_ms} ms");
                    return Ok(bitmap);
                }
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
            iteration += 1;
        }
    }

    fn phase(&self, phase: &str) {
        self.vmm.set_phase(format!("send: {phase}"));
    }

    /// A write to the destination failed: names the destination's
    /// refusal as the cause if it sent one, else the write error.
    fn write_failed(&mut self, phase: &str, e: impl std::fmt::Display) -> HostError {
        match peer_refusal(&mut self.conn) {
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

    fn send_config(&mut self) -> HostResult<()> {
        let devices = {
            let set = self.vm.devices();
            set.devices()
                .iter()
                .map(|d| d.migration_info())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| HostError::failed("config", Chain(&e)))?
        };
        let config = MigrationConfig {
            vm: self.vm.config().clone(),
            devices,
        };
        let payload = serde_json::to_vec(&config).map_err(|e| HostError::failed("config", e))?;
        Request::config(payload.len() as u64)
            .write_to(&mut self.conn)
            .map_err(|e| HostError::failed("config", Chain(&e)))?;
        std::io::Write::write_all(&mut self.conn, &payload)
            .map_err(|e| HostError::failed("config", e))?;
        expect_ok(&mut self.conn, "config")
    }

    /// Adds what the VFs report dirty (for `dirty_tracking=all`: nothing
    /// while they run, every DMA range once they are stopped).
    fn merge_device_dirty(&mut self, bitmap: &mut [u64]) -> HostResult<()> {
        let mut set = self.vm.devices();
        for d in set.devices_mut() {
            let table = d
                .dirty_log()
                .map_err(|e| HostError::failed("dirty log", Chain(&e)))?;
            self.vm.memory().merge_into_bitmap(bitmap, &table);
        }
        Ok(())
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
            expect_ok(&mut self.conn, phase)?;
        }
        Ok(())
    }

    /// Each stopped VF's state, streamed straight into the socket, in the
    /// order of their ids (which numbers them on the wire).
    fn send_device_states(&mut self) -> HostResult<()> {
        let set = self.vm.devices();
        let ids = device_ids(&set);
        for (index, &at) in streamed_order(&ids).iter().enumerate() {
            let d = &set.devices()[at];
            let phase = format!("device-state {}", Snapshottable::id(d));
            self.vmm.set_phase(format!("send: {phase}"));
            Request::device_state(index as u16)
                .write_to(&mut self.conn)
                .map_err(|e| HostError::failed(&phase, Chain(&e)))?;
            self.undo.mid_stream = true;
            let stream_fault = fault::take_for(&mut self.fault, "device-state");
            let fault_conn = self
                .conn
                .try_clone()
                .map_err(|e| HostError::failed(&phase, e))?;
            let mut out = FaultyStream::new(
                CountingWriter {
                    inner: &mut self.conn,
                    count: 0,
                },
                fault_conn,
                stream_fault,
            );
            let sent = d.save_state_to(&mut out, &mut |_| {});
            let count = out.inner.count;
            self.device_bytes += count;
            Counters::add(&self.vmm.counters.device_bytes_sent, count);
            if let Err(e) = sent {
                return Err(self.write_failed(&phase, Chain(&e)));
            }
            self.undo.mid_stream = false;
            expect_ok(&mut self.conn, &phase)?;
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
                let section = d
                    .snapshot()
                    .map_err(|e| HostError::failed("state", Chain(&e)))?;
                root.add_snapshot(Snapshottable::id(d), section);
            }
        }
        let payload = serde_json::to_vec(&root).map_err(|e| HostError::failed("state", e))?;
        Request::state(payload.len() as u64)
            .write_to(&mut self.conn)
            .map_err(|e| HostError::failed("state", Chain(&e)))?;
        std::io::Write::write_all(&mut self.conn, &payload)
            .map_err(|e| HostError::failed("state", e))?;
        expect_ok(&mut self.conn, "state")
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
