// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Each streamed component's state on a connection of its own, all at
//! once and concurrently with the final memory pass
//! (`ProtocolFeatures::DEVICE_STATE_CONNECTIONS`).
//!
//! The source opens one extra connection per component before pre-copy,
//! with its own transport (so TLS when the main connection is TLS),
//! announcing [`ConnectionRole::DeviceState`]. Once the VM is paused each
//! carries exactly one self-delimited `DeviceState` request, answered `Ok`
//! once the destination loaded it (or `Error` with the reason), while the
//! main connection carries the final memory pass; `State` and `Complete`
//! follow once every stream is acknowledged. The destination, which
//! opened its handles at `Config`, loads each stream as it comes
//! ([`IncomingDevices::serve_lane`]).
//!
//! A destination without the feature gets every state on the main
//! connection, in turn, after `State` ([`crate::streamed::send_one`]).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use log::info;
use vm_migration::protocol::{
    Command, ConnectionRole, Request, Response, DEVICE_STATE_SELF_DELIMITED,
};
use vm_migration::MigratableError;

use crate::connection::{chain, is_eof, with_refusal, write_error, Connection};
use crate::streamed::{send_one, wire_index, Component, IncomingDevices};
use crate::verify::digest::PageDigester;
use crate::verify::VerifyPlan;
use crate::vram::{
    self, rates, PrecopyReport, StreamLayout, VramPrecopyMode, VramSource, WindowStats,
    WindowWriter, VRAM_PRECOPY_LANE,
};

/// One device-state connection of the source.
struct Lane<C> {
    /// `None` while its pre-copy thread holds it.
    conn: Option<C>,
    vram: Option<VramLane<C>>,
}

/// A connection that pre-copies its component's VRAM.
struct VramLane<C> {
    layout: Box<dyn StreamLayout>,
    bar_size: u64,
    running: Option<JoinHandle<(C, io::Result<PrecopyReport>)>>,
    report: Option<PrecopyReport>,
}

/// The migration's choice of digest and key for VRAM, and the rate this
/// machine hashes at (one thread per connection).
pub struct VramPlan {
    pub mode: VramPrecopyMode,
    pub begin: vram::wire::Begin,
    pub digester: PageDigester,
    pub hash_rate: f64,
}

impl VramPlan {
    /// Chooses the digest function and a fresh key, and measures one
    /// thread's hash rate: each connection hashes on its own thread.
    pub fn prepare(mode: VramPrecopyMode) -> Result<Self, MigratableError> {
        let plan = VerifyPlan::prepare(1)?;
        Ok(VramPlan {
            mode,
            begin: vram::wire::Begin {
                function: plan.setup.function,
                key: plan.setup.key.clone(),
                bar_size: 0,
            },
            hash_rate: plan.hash_rate(),
            digester: plan.digester,
        })
    }
}

/// How long memory pre-copy waits before another pass when it is only
/// waiting for VRAM pre-copy: an idle VM's passes would spin otherwise.
pub const VRAM_WAIT_SLICE: Duration = Duration::from_millis(50);

/// How long [`DeviceLanes::send`] waits, by default, for a VRAM pre-copy
/// it told to stop: one step is a BAR read and a write of at most
/// [`vram::wire::MAX_DATA`] bytes, well under a second on any link a
/// migration runs on. Past it the pre-copy is blocked writing to a
/// destination that stopped reading.
pub const VRAM_STOP_WAIT: Duration = Duration::from_secs(10);

/// The source's device-state connections, one per streamed component.
pub struct DeviceLanes<C: Connection> {
    lanes: Vec<Lane<C>>,
    stop_precopy: Arc<AtomicBool>,
    plan: Option<Arc<VramPlan>>,
    link_rate: f64,
    vram_stop_wait: Duration,
}

/// What one connection of its own carried.
pub struct LaneOutcome {
    pub id: String,
    /// Bytes of state sent and acknowledged.
    pub result: Result<u64, MigratableError>,
    /// From the start of [`DeviceLanes::send`] to the destination's answer.
    pub elapsed: Duration,
    /// With VRAM pre-copy: what pre-copy sent and what the stop-copy
    /// stream cost.
    pub vram: Option<VramOutcome>,
}

/// A component's VRAM in this migration.
#[derive(Clone, Debug, Default)]
pub struct VramOutcome {
    pub precopy: PrecopyReport,
    /// Whether stop-copy compared pages, and why.
    pub compared: bool,
    pub reason: String,
    pub stream: WindowStats,
}

impl<C: Connection> DeviceLanes<C> {
    /// No connections: states go in turn on the main connection.
    pub fn none() -> Self {
        DeviceLanes {
            lanes: Vec::new(),
            stop_precopy: Arc::new(AtomicBool::new(false)),
            plan: None,
            link_rate: 0.0,
            vram_stop_wait: VRAM_STOP_WAIT,
        }
    }

    /// Opens `count` connections with `connect`, each announcing
    /// [`ConnectionRole::DeviceState`].
    pub fn open(
        count: usize,
        mut connect: impl FnMut() -> Result<C, MigratableError>,
    ) -> Result<Self, MigratableError> {
        let mut lanes = DeviceLanes::none();
        for _ in 0..count {
            let mut conn = connect()?;
            if let Err(e) = ConnectionRole::DeviceState.write_to(&mut conn) {
                lanes.close();
                return Err(e);
            }
            lanes.lanes.push(Lane {
                conn: Some(conn),
                vram: None,
            });
        }
        Ok(lanes)
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Closes the connections unused (a migration that failed before the
    /// components' turn): the destination's handlers see them end. A
    /// running VRAM pre-copy is told to stop and not waited for (it may
    /// be blocked writing to a destination that stopped reading): its
    /// thread ends at its next step, or when its write fails, and closes
    /// its connection then.
    ///
    /// Closing is dropping: nothing else holds these sockets, and CH's
    /// migration worker has no seccomp rule for `shutdown(2)`.
    pub fn close(&mut self) {
        self.stop_precopy.store(true, Ordering::Relaxed);
        self.lanes.clear();
    }

    /// The link rate (bytes/s) measured by the memory pre-copy, which
    /// decides whether comparing VRAM pays in stop-copy.
    pub fn set_link_rate(&mut self, bytes_per_s: f64) {
        self.link_rate = bytes_per_s;
    }

    /// Whether a VRAM pre-copy is still reading.
    pub fn vram_precopy_running(&self) -> bool {
        self.lanes.iter().any(|l| {
            l.vram
                .as_ref()
                .and_then(|v| v.running.as_ref())
                .is_some_and(|t| !t.is_finished())
        })
    }

    /// Memory pre-copy's convergence with VRAM pre-copy beside it: a pass
    /// that `converged` is held back (`false`, after [`VRAM_WAIT_SLICE`])
    /// while VRAM pre-copy still reads and the pre-copy phase is within
    /// `timeout`, since pausing would send the unread VRAM in stop-copy.
    /// Past `timeout` pre-copy converges as it would have: [`Self::send`]
    /// stops the VRAM pre-copy and stop-copy sends the rest. Once VRAM
    /// pre-copy ended, its failure fails the migration here, while the
    /// VM still runs.
    pub fn hold_convergence(
        &mut self,
        converged: bool,
        precopy_elapsed: Duration,
        timeout: Duration,
    ) -> Result<bool, MigratableError> {
        if !converged || precopy_elapsed >= timeout || !self.vram_precopy_started() {
            return Ok(converged);
        }
        if self.vram_precopy_running() {
            std::thread::sleep(VRAM_WAIT_SLICE);
            return Ok(false);
        }
        self.finish_vram_precopy()?;
        Ok(true)
    }

    /// Whether a VRAM pre-copy was started and not yet waited for.
    fn vram_precopy_started(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| l.vram.as_ref().is_some_and(|v| v.running.is_some()))
    }

    /// How long [`Self::send`] waits for a VRAM pre-copy to stop
    /// ([`VRAM_STOP_WAIT`] unless set).
    pub fn set_vram_stop_wait(&mut self, wait: Duration) {
        self.vram_stop_wait = wait;
    }

    /// Gives up on every VRAM pre-copy that has not ended `within` of
    /// now (blocked writing to a destination that stopped reading): its
    /// component then fails, so the VM resumes here instead of waiting
    /// for ever, and its thread ends when its write fails.
    fn abandon_stuck_precopy(&mut self, within: Duration) -> Option<MigratableError> {
        let deadline = Instant::now() + within;
        while self.vram_precopy_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut first_error = None;
        for (position, lane) in self.lanes.iter_mut().enumerate() {
            let Some(v) = lane.vram.as_mut() else {
                continue;
            };
            if v.running.as_ref().is_some_and(|t| !t.is_finished()) {
                // Detached: it holds the connection until its write fails.
                v.running = None;
                first_error.get_or_insert(MigratableError::MigrateSend(anyhow!(
                    "VRAM pre-copy of component #{position} did not stop within {} ms: \
                     the destination stopped reading its connection",
                    within.as_millis()
                )));
            }
        }
        first_error
    }

    /// Stops the VRAM pre-copy at its next step (it then ends cleanly).
    pub fn stop_vram_precopy(&self) {
        self.stop_precopy.store(true, Ordering::Relaxed);
    }

    /// Waits for every VRAM pre-copy to end; the first that failed fails
    /// the migration (its connection is unusable then).
    pub fn finish_vram_precopy(&mut self) -> Result<Vec<PrecopyReport>, MigratableError> {
        let mut reports = Vec::new();
        let mut first_error = None;
        for (position, lane) in self.lanes.iter_mut().enumerate() {
            let Some(v) = lane.vram.as_mut() else {
                continue;
            };
            let Some(t) = v.running.take() else {
                reports.extend(v.report);
                continue;
            };
            match t.join() {
                Ok((conn, Ok(report))) => {
                    lane.conn = Some(conn);
                    v.report = Some(report);
                    reports.push(report);
                }
                Ok((mut conn, Err(e))) => {
                    let e = MigratableError::MigrateSend(
                        anyhow!(e).context(format!("VRAM pre-copy of component #{position}")),
                    );
                    first_error.get_or_insert(with_refusal(&mut conn, e));
                }
                Err(_) => {
                    first_error.get_or_insert(MigratableError::MigrateSend(anyhow!(
                        "VRAM pre-copy thread of component #{position} panicked"
                    )));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(reports),
        }
    }

    /// Streams every paused component (in wire order, one per connection)
    /// while `during` runs on the calling thread; returns what `during`
    /// returned and each connection's outcome, in wire order. A VRAM
    /// pre-copy still running is stopped and waited for first, at most
    /// [`VRAM_STOP_WAIT`] (then its component fails).
    pub fn send<R>(
        mut self,
        components: &mut [Component],
        during: impl FnOnce() -> R,
    ) -> (R, Vec<LaneOutcome>) {
        let started = Instant::now();
        self.stop_vram_precopy();
        let stuck = self.abandon_stuck_precopy(self.vram_stop_wait);
        let precopy_failed = stuck.or(self.finish_vram_precopy().err());
        let lanes = std::mem::take(&mut self.lanes);
        let (plan, link_rate) = (self.plan.clone(), self.link_rate);
        std::thread::scope(|s| {
            let mut threads = Vec::new();
            let mut unsent = Vec::new();
            let mut lanes = lanes.into_iter();
            for (position, component) in components.iter_mut().enumerate() {
                let id = component.id.clone();
                let lane = lanes.next();
                let (Some(mut conn), vram) = lane.map_or((None, None), |l| (l.conn, l.vram)) else {
                    unsent.push(LaneOutcome {
                        id,
                        result: Err(match &precopy_failed {
                            Some(e) => MigratableError::MigrateSend(anyhow!(chain(e))),
                            None => MigratableError::MigrateSend(anyhow!(
                                "no device-state connection left for it"
                            )),
                        }),
                        elapsed: Duration::ZERO,
                        vram: None,
                    });
                    continue;
                };
                let plan = plan.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("migrate-state-{position}"))
                    .spawn_scoped(s, move || {
                        let (result, vram) = match (vram, plan) {
                            (Some(mut v), Some(plan)) => {
                                let (result, outcome) = send_windows(
                                    &mut conn, position, component, &mut v, &plan, link_rate,
                                );
                                (result, Some(outcome))
                            }
                            _ => (send_one(&mut conn, position, component, None), None),
                        };
                        drop(conn);
                        LaneOutcome {
                            id,
                            result,
                            elapsed: started.elapsed(),
                            vram,
                        }
                    });
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => unsent.push(LaneOutcome {
                        id: format!("component #{position}"),
                        result: Err(MigratableError::MigrateSend(
                            anyhow!(e).context("spawning a device-state thread"),
                        )),
                        elapsed: Duration::ZERO,
                        vram: None,
                    }),
                }
            }
            // Unused (more connections than components): closed now.
            drop(lanes);
            let during = during();
            let mut outcomes: Vec<LaneOutcome> = threads
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| LaneOutcome {
                        id: "?".into(),
                        result: Err(MigratableError::MigrateSend(anyhow!(
                            "device-state thread panicked"
                        ))),
                        elapsed: started.elapsed(),
                        vram: None,
                    })
                })
                .collect();
            outcomes.extend(unsent);
            (during, outcomes)
        })
    }
}

impl<C: Connection + 'static> DeviceLanes<C> {
    /// Starts reading each component's VRAM through its BAR (`sources`,
    /// in wire order, `None` for a component without one) and sending it
    /// on the component's connection, while the VM runs. The destination
    /// agreed to `VRAM_PRECOPY`.
    pub fn start_vram_precopy(
        &mut self,
        sources: Vec<Option<VramSource>>,
        plan: Arc<VramPlan>,
    ) -> Result<(), MigratableError> {
        for (position, (lane, source)) in self.lanes.iter_mut().zip(sources).enumerate() {
            let Some(source) = source else {
                continue;
            };
            let Some(mut conn) = lane.conn.take() else {
                continue;
            };
            let (stop, plan_for_thread) = (self.stop_precopy.clone(), plan.clone());
            let bar = source.bar.clone();
            let bar_size = bar.size();
            let running = std::thread::Builder::new()
                .name(format!("migrate-vram-{position}"))
                .spawn(move || {
                    let sent = Request::new(Command::DeviceState, VRAM_PRECOPY_LANE)
                        .write_to(&mut conn)
                        .map_err(io::Error::other)
                        .and_then(|()| {
                            let begin = vram::wire::Begin {
                                bar_size,
                                ..plan_for_thread.begin.clone()
                            };
                            vram::precopy(&mut conn, &*bar, &begin, &stop)
                        });
                    (conn, sent)
                })
                .map_err(|e| {
                    MigratableError::MigrateSend(anyhow!(e).context("spawning a VRAM thread"))
                })?;
            lane.vram = Some(VramLane {
                layout: source.layout,
                bar_size,
                running: Some(running),
                report: None,
            });
        }
        self.plan = Some(plan);
        Ok(())
    }
}

/// Source: the paused `component`'s stream as windows on its pre-copy
/// connection; pages are compared when the rates say it pays.
fn send_windows<C: Connection>(
    conn: &mut C,
    position: usize,
    component: &mut Component,
    v: &mut VramLane<C>,
    plan: &VramPlan,
    link_rate: f64,
) -> (Result<u64, MigratableError>, VramOutcome) {
    let started = Instant::now();
    // The stream carries about the VRAM pre-copy found not zero (the
    // zero runs are elided); the whole BAR if pre-copy read nothing.
    let stream_estimate = v
        .report
        .filter(|r| r.read_bytes > 0)
        .map_or(v.bar_size, |r| r.data_bytes);
    let decision = rates::decide(plan.mode, stream_estimate, plan.hash_rate, link_rate);
    info!(
        "Migration: {}: VRAM pre-copied ({} of {} bytes read); stop-copy {}: {}",
        component.id,
        v.report.map_or(0, |r| r.read_bytes),
        v.bar_size,
        if decision.compare {
            "compares pages"
        } else {
            "sends all"
        },
        decision.reason
    );
    let mut outcome = VramOutcome {
        precopy: v.report.unwrap_or_default(),
        compared: decision.compare,
        reason: decision.reason,
        stream: WindowStats::default(),
    };
    let result = (|| {
        let index = wire_index(position)?;
        let failed = |e: io::Error| MigratableError::MigrateSend(anyhow!(e).context("VRAM stream"));
        let digester = decision.compare.then_some(&plan.digester);
        let mut writer =
            WindowWriter::start(&mut *conn, index, &mut *v.layout, digester).map_err(failed)?;
        let sent = component.state.send_state(&mut writer);
        let finished = match sent {
            Ok(_) => writer.finish().map_err(failed),
            Err(e) => {
                outcome.stream = writer.abandon();
                Err(e)
            }
        };
        let stats = match finished {
            Ok(stats) => stats,
            Err(e) => return Err(with_refusal(conn, e)),
        };
        outcome.stream = stats;
        vram::send::expect_stream_loaded(conn).map_err(failed)?;
        info!(
            "Migration: {}: {} bytes of streamed state in {} ms, {} of them sent, {} from \
             pre-copied VRAM",
            component.id,
            stats.stream_bytes,
            started.elapsed().as_millis(),
            stats.sent_bytes,
            stats.held_bytes
        );
        Ok(stats.stream_bytes)
    })();
    (result, outcome)
}

impl<C: Connection> Drop for DeviceLanes<C> {
    fn drop(&mut self) {
        self.close();
    }
}

impl IncomingDevices {
    /// Destination: serves one device-state connection, whose role the
    /// VMM has read, once it is readable (the VMM waits for that with its
    /// own way to give up). Reads its `DeviceState` request, loads the
    /// component and answers; a connection the source closes unused ends
    /// quietly. A failure is recorded ([`IncomingDevices::take_lane_error`])
    /// before the source is told.
    pub fn serve_lane<C: Connection>(&self, conn: &mut C) {
        self.serve_lane_waiting(conn, &mut |_| Ok(true));
    }

    /// As [`IncomingDevices::serve_lane`]; on a connection that
    /// pre-copies VRAM the source is silent from the end of pre-copy
    /// until it pauses, and `wait` is called there: it returns once the
    /// connection is readable, or `false` to end quietly (the VMM's own
    /// way to give up, as before the first request).
    pub fn serve_lane_waiting<C: Connection>(
        &self,
        conn: &mut C,
        wait: &mut dyn FnMut(&C) -> io::Result<bool>,
    ) {
        let mut id = None;
        if let Err(e) = self.serve_lane_inner(conn, &mut id, wait) {
            let message = match &id {
                Some(id) => format!("device-state {id}: {}", chain(&e)),
                None => chain(&e),
            };
            self.lane_failed(id, e);
            let _ = write_error(conn, &message);
        }
    }

    fn serve_lane_inner<C: Connection>(
        &self,
        conn: &mut C,
        id: &mut Option<String>,
        wait: &mut dyn FnMut(&C) -> io::Result<bool>,
    ) -> Result<(), MigratableError> {
        let request = match Request::read_from(conn) {
            Ok(r) => r,
            // Closed unused: the migration ended before the components' turn.
            Err(e) if is_eof(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        if request.command() == Command::DeviceState && request.length() == VRAM_PRECOPY_LANE {
            return self.serve_vram_lane(conn, id, wait);
        }
        if request.command() != Command::DeviceState
            || request.length() != DEVICE_STATE_SELF_DELIMITED
        {
            return Err(MigratableError::MigrateReceive(anyhow!(
                "{:?} on a device-state connection (only a self-delimited DeviceState)",
                request.command()
            )));
        }
        *id = self.id(request.device_index()).map(str::to_string);
        let bytes = self.receive(request.device_index(), conn)?;
        self.lane_loaded(bytes);
        Response::ok().write_to(conn)
    }

    /// Pre-copied VRAM into a store, then, once the source paused, the
    /// component's stream rebuilt from windows and the store.
    fn serve_vram_lane<C: Connection>(
        &self,
        conn: &mut C,
        id: &mut Option<String>,
        wait: &mut dyn FnMut(&C) -> io::Result<bool>,
    ) -> Result<(), MigratableError> {
        let failed = |e: io::Error| MigratableError::MigrateReceive(anyhow!(e));
        let dir = self.vram_dir().ok_or_else(|| {
            MigratableError::MigrateReceive(anyhow!(
                "VRAM pre-copy on a connection, but this side did not accept VRAM_PRECOPY"
            ))
        })?;
        let precopied = vram::receive_precopy(conn, dir)
            .map_err(|e| MigratableError::MigrateReceive(anyhow!(e).context("VRAM pre-copy")))?;
        if !wait(conn).map_err(failed)? {
            return Ok(());
        }
        let index = match vram::read_stream_start(conn) {
            Ok(index) => index,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(failed(e)),
        };
        *id = self.id(index).map(str::to_string);
        let mut rebuild = vram::Rebuild::new(conn, &precopied.store);
        let bytes = self.receive(index, &mut rebuild)?;
        let stats = rebuild.finish().map_err(failed)?;
        self.vram_loaded(&stats);
        self.lane_loaded(bytes);
        info!(
            "Migration (incoming): {}: {} stream bytes, {} from pre-copied VRAM ({} bytes were \
             pre-copied)",
            id.as_deref().unwrap_or("?"),
            stats.stream_bytes,
            stats.held_bytes,
            precopied.store.stored_bytes()
        );
        let answered = Response::ok().write_to(conn);
        // Closing the file frees its pages, which takes long for GiBs of
        // VRAM; the VMM waits for this connection before the switch-over,
        // so that happens off its path.
        let dropped = std::thread::Builder::new()
            .name("vram-store-drop".into())
            .spawn(move || drop(precopied));
        if let Err(e) = dropped {
            log::debug!("VRAM store closed in place: {e}");
        }
        answered
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use vm_migration::IncomingState;

    use super::*;
    use crate::streamed::tests::{handle, Fake};
    use crate::streamed::StreamedDescription;
    use crate::vram::{StreamLayout, VramPrecopyMode, VramSource};

    fn described(ids: &[&str]) -> Vec<StreamedDescription> {
        ids.iter()
            .map(|id| StreamedDescription {
                id: id.to_string(),
                description: vm_migration::SnapshotData::new_from_state(&"xe".to_string()).unwrap(),
            })
            .collect()
    }

    /// `count` device-state connections over socket pairs, each served by
    /// `incoming` on a thread of its own (joined by the caller).
    fn served_lanes(
        count: usize,
        incoming: &std::sync::Arc<IncomingDevices>,
    ) -> (DeviceLanes<UnixStream>, Vec<std::thread::JoinHandle<()>>) {
        let mut servers = Vec::new();
        let lanes = DeviceLanes::open(count, || {
            let (a, mut b) = UnixStream::pair().unwrap();
            let incoming = incoming.clone();
            servers.push(std::thread::spawn(move || {
                assert_eq!(
                    ConnectionRole::read_from(&mut b).unwrap(),
                    ConnectionRole::DeviceState
                );
                incoming.serve_lane(&mut b);
            }));
            Ok(a)
        })
        .unwrap();
        (lanes, servers)
    }

    #[test]
    fn every_state_streams_on_its_own_connection_while_memory_goes() {
        let (h0, loaded0) = handle("xe");
        let (h1, loaded1) = handle("xe");
        let handles: Vec<(String, Box<dyn IncomingState>)> =
            vec![("gpu0".into(), h0), ("gpu1".into(), h1)];
        let incoming = std::sync::Arc::new(
            IncomingDevices::check(handles, &described(&["gpu0", "gpu1"])).unwrap(),
        );
        let (lanes, servers) = served_lanes(2, &incoming);
        let (mut a, mut b) = (
            Fake {
                kind: "xe".into(),
                byte: 0xa,
                len: 1 << 20,
            },
            Fake {
                kind: "xe".into(),
                byte: 0xb,
                len: 10,
            },
        );
        let mut components = [
            Component {
                id: "gpu0".into(),
                state: &mut a,
            },
            Component {
                id: "gpu1".into(),
                state: &mut b,
            },
        ];
        let (memory, outcomes) = lanes.send(&mut components, || "final pass done");
        assert_eq!(memory, "final pass done");
        for s in servers {
            s.join().unwrap();
        }
        let bytes: Vec<u64> = outcomes
            .iter()
            .map(|o| *o.result.as_ref().unwrap())
            .collect();
        assert_eq!(bytes, [8 + (1 << 20), 18]);
        assert_eq!(incoming.lane_bytes(), 8 + (1 << 20) + 18);
        incoming.check_all_received().unwrap();
        assert_eq!(loaded0.lock().unwrap().as_ref().unwrap().len(), 1 << 20);
        assert_eq!(loaded1.lock().unwrap().as_deref(), Some(&[0xb; 10][..]));
    }

    #[test]
    fn a_refused_state_fails_its_lane_and_is_recorded_first() {
        let (h0, _) = handle("xe");
        let incoming = std::sync::Arc::new(
            IncomingDevices::check(vec![("gpu0".into(), h0)], &described(&["gpu0"])).unwrap(),
        );
        let (lanes, servers) = served_lanes(1, &incoming);
        // Larger than the handle takes: it refuses after the length prefix.
        let mut big = Fake {
            kind: "xe".into(),
            byte: 1,
            len: 4 << 20,
        };
        let mut components = [Component {
            id: "gpu0".into(),
            state: &mut big,
        }];
        let ((), outcomes) = lanes.send(&mut components, || ());
        for s in servers {
            s.join().unwrap();
        }
        let e = outcomes[0].result.as_ref().unwrap_err();
        assert!(
            chain(e).contains("the destination said: device-state gpu0: "),
            "{}",
            chain(e)
        );
        let recorded = incoming.take_lane_error().unwrap();
        assert_eq!(recorded.id.as_deref(), Some("gpu0"));
        assert!(
            chain(&recorded.error).contains("state of 4194304 bytes"),
            "{}",
            chain(&recorded.error)
        );
        assert!(incoming.check_all_received().is_err());
    }

    #[test]
    fn a_lane_closed_unused_ends_quietly_and_a_stray_command_is_refused() {
        let (h0, _) = handle("xe");
        let incoming =
            IncomingDevices::check(vec![("gpu0".into(), h0)], &described(&["gpu0"])).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut a = Some(a);
        let mut lanes = DeviceLanes::open(1, || Ok(a.take().unwrap())).unwrap();
        ConnectionRole::read_from(&mut b).unwrap();
        lanes.close();
        incoming.serve_lane(&mut b);
        assert!(incoming.take_lane_error().is_none());

        let (mut a, mut b) = UnixStream::pair().unwrap();
        Request::complete().write_to(&mut a).unwrap();
        incoming.serve_lane(&mut b);
        let e = incoming.take_lane_error().unwrap();
        assert_eq!(e.id, None);
        assert!(
            chain(&e.error).contains("Complete on a device-state connection"),
            "{}",
            chain(&e.error)
        );
    }

    /// The BAR of a [`Fake`]: `len` bytes of its byte.
    struct FakeBar(Vec<u8>);

    impl vram::BarSource for FakeBar {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }

        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    /// A BAR whose reads wait until `open` is set.
    struct GatedBar {
        open: Arc<AtomicBool>,
    }

    impl vram::BarSource for GatedBar {
        fn size(&self) -> u64 {
            1 << 20
        }

        fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
            while !self.open.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            buf.fill(0x77);
            Ok(())
        }
    }

    #[test]
    fn vram_precopy_holds_memory_convergence_until_it_ends_or_the_timeout() {
        let (h0, _) = handle("xe");
        let incoming = Arc::new(
            IncomingDevices::check(vec![("gpu0".into(), h0)], &described(&["gpu0"]))
                .unwrap()
                .with_vram_dir(std::env::temp_dir()),
        );
        let (mut lanes, servers) = served_lanes(1, &incoming);
        let timeout = Duration::from_secs(60);
        // Nothing started: memory decides alone.
        assert!(lanes
            .hold_convergence(true, Duration::ZERO, timeout)
            .unwrap());
        let open = Arc::new(AtomicBool::new(false));
        start_fake_precopy(
            &mut lanes,
            GatedBar { open: open.clone() },
            VramPrecopyMode::On,
        );
        // Still reading: held back, but not a pass that did not converge
        // and not past the timeout.
        assert!(!lanes
            .hold_convergence(true, Duration::ZERO, timeout)
            .unwrap());
        assert!(!lanes
            .hold_convergence(false, Duration::ZERO, timeout)
            .unwrap());
        assert!(lanes.hold_convergence(true, timeout, timeout).unwrap());
        open.store(true, Ordering::Relaxed);
        while lanes.vram_precopy_running() {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(lanes
            .hold_convergence(true, Duration::ZERO, timeout)
            .unwrap());
        let reports = lanes.finish_vram_precopy().unwrap();
        assert_eq!(reports[0].read_bytes, 1 << 20);
        lanes.close();
        for s in servers {
            s.join().unwrap();
        }
    }

    #[test]
    fn vram_precopy_blocked_by_a_destination_that_stopped_reading_fails_its_component_in_bounded_time(
    ) {
        let (a, b) = UnixStream::pair().unwrap();
        let mut a = Some(a);
        let mut lanes = DeviceLanes::open(1, || Ok(a.take().unwrap())).unwrap();
        // 64 MiB of data against a socket buffer of a few hundred KiB
        // that nobody reads: the pre-copy thread blocks in a write.
        start_fake_precopy(
            &mut lanes,
            FakeBar(vec![0x77; 64 << 20]),
            VramPrecopyMode::On,
        );
        // Blocked, not merely started (a pre-copy told to stop before its
        // first write ends cleanly).
        std::thread::sleep(Duration::from_millis(500));
        assert!(lanes.vram_precopy_running());
        lanes.set_vram_stop_wait(Duration::from_millis(300));
        let mut fake = Fake {
            kind: "xe".into(),
            byte: 0x77,
            len: 1 << 20,
        };
        let mut components = [Component {
            id: "gpu0".into(),
            state: &mut fake,
        }];
        let started = Instant::now();
        let (during, outcomes) = lanes.send(&mut components, || "final pass done");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(during, "final pass done");
        let e = chain(outcomes[0].result.as_ref().unwrap_err());
        assert!(
            e.contains("VRAM pre-copy of component #0 did not stop within 300 ms"),
            "{e}"
        );
        // The destination goes: the detached thread's write fails.
        drop(b);
    }

    #[test]
    fn vram_precopy_failure_fails_the_held_convergence_while_the_vm_runs() {
        let (h0, _) = handle("xe");
        // The destination did not accept VRAM_PRECOPY (no dir): it
        // refuses the pre-copy request.
        let incoming = Arc::new(
            IncomingDevices::check(vec![("gpu0".into(), h0)], &described(&["gpu0"])).unwrap(),
        );
        let (mut lanes, servers) = served_lanes(1, &incoming);
        start_fake_precopy(
            &mut lanes,
            FakeBar(vec![0x77; 4 << 20]),
            VramPrecopyMode::On,
        );
        let timeout = Duration::from_secs(60);
        let e = loop {
            match lanes.hold_convergence(true, Duration::ZERO, timeout) {
                Ok(false) => continue,
                Ok(true) => panic!("converged past a failed VRAM pre-copy"),
                Err(e) => break e,
            }
        };
        assert!(
            chain(&e).contains("VRAM pre-copy of component #0"),
            "{}",
            chain(&e)
        );
        drop(lanes);
        for s in servers {
            s.join().unwrap();
        }
    }

    /// A [`Fake`]'s stream: an 8-byte length, then BAR bytes from 0.
    struct FakeLayout {
        at: u64,
    }

    impl StreamLayout for FakeLayout {
        fn map(&mut self, data: &[u8], out: &mut Vec<vram::wire::Piece>) {
            let mut data = data.len() as u64;
            if self.at < 8 {
                let n = (8 - self.at).min(data);
                out.push(vram::wire::Piece::raw(n));
                self.at += n;
                data -= n;
            }
            if data > 0 {
                out.push(vram::wire::Piece::bar(self.at - 8, data));
                self.at += data;
            }
        }
    }

    /// Starts VRAM pre-copy on the one lane of `lanes`, reading `bar`
    /// laid out as a [`Fake`]'s stream.
    fn start_fake_precopy(
        lanes: &mut DeviceLanes<UnixStream>,
        bar: impl vram::BarSource + 'static,
        mode: VramPrecopyMode,
    ) {
        let source = VramSource {
            bar: Arc::new(bar),
            layout: Box::new(FakeLayout { at: 0 }),
        };
        lanes
            .start_vram_precopy(vec![Some(source)], plan(mode))
            .unwrap();
    }

    fn plan(mode: VramPrecopyMode) -> Arc<VramPlan> {
        let key = crate::verify::DigestKey([5; 32]);
        let function = crate::verify::DigestFunction::Nh128;
        Arc::new(VramPlan {
            mode,
            begin: vram::wire::Begin {
                function,
                key: key.clone(),
                bar_size: 0,
            },
            digester: PageDigester::new(function, &key),
            hash_rate: 0.0,
        })
    }

    /// Migrates one [`Fake`] of `len` bytes whose BAR reads `bar`, over a
    /// lane that pre-copies VRAM; `dir` is where the destination keeps it.
    fn migrate_with_vram(
        len: usize,
        bar: Vec<u8>,
        mode: VramPrecopyMode,
        dir: Option<std::path::PathBuf>,
    ) -> (
        LaneOutcome,
        Arc<IncomingDevices>,
        crate::streamed::tests::Loaded,
    ) {
        let (h0, loaded) = handle("xe");
        let mut incoming =
            IncomingDevices::check(vec![("gpu0".into(), h0)], &described(&["gpu0"])).unwrap();
        if let Some(dir) = dir {
            incoming = incoming.with_vram_dir(dir);
        }
        let incoming = Arc::new(incoming);
        let (mut lanes, servers) = served_lanes(1, &incoming);
        start_fake_precopy(&mut lanes, FakeBar(bar), mode);
        if let Err(e) = lanes.finish_vram_precopy() {
            drop(lanes);
            for s in servers {
                s.join().unwrap();
            }
            let outcome = LaneOutcome {
                id: "gpu0".into(),
                result: Err(e),
                elapsed: Duration::ZERO,
                vram: None,
            };
            return (outcome, incoming, loaded);
        }
        let mut fake = Fake {
            kind: "xe".into(),
            byte: 0x77,
            len,
        };
        let mut components = [Component {
            id: "gpu0".into(),
            state: &mut fake,
        }];
        let ((), mut outcomes) = lanes.send(&mut components, || ());
        for s in servers {
            s.join().unwrap();
        }
        (outcomes.remove(0), incoming, loaded)
    }

    #[test]
    fn vram_precopy_lane_sends_only_what_changed_since_precopy() {
        const LEN: usize = 1 << 20;
        // The BAR read during pre-copy: the state's bytes except the
        // last 256 KiB, which the device changes after it was read.
        let mut bar = vec![0x77; LEN];
        bar[3 << 18..].fill(0x11);
        let (outcome, incoming, loaded) =
            migrate_with_vram(LEN, bar, VramPrecopyMode::On, Some(std::env::temp_dir()));
        assert_eq!(*outcome.result.as_ref().unwrap(), 8 + LEN as u64);
        let vram = outcome.vram.unwrap();
        assert!(vram.compared);
        assert_eq!(vram.precopy.read_bytes, LEN as u64);
        // The 8-byte prefix and the changed 256 KiB travel; the rest is held.
        assert_eq!(vram.stream.sent_bytes, 8 + (1 << 18));
        assert_eq!(incoming.vram_bytes(), (3 << 18, 8 + (1 << 18)));
        incoming.check_all_received().unwrap();
        assert_eq!(
            loaded.lock().unwrap().as_deref(),
            Some(&vec![0x77; LEN][..])
        );
    }

    #[test]
    fn vram_precopy_off_by_the_rates_sends_every_byte_on_the_same_lane() {
        const LEN: usize = 1 << 20;
        let (outcome, incoming, loaded) = migrate_with_vram(
            LEN,
            vec![0x77; LEN],
            VramPrecopyMode::Off,
            Some(std::env::temp_dir()),
        );
        outcome.result.unwrap();
        let vram = outcome.vram.unwrap();
        assert!(!vram.compared);
        assert_eq!(vram.stream.sent_bytes, 8 + LEN as u64);
        assert_eq!(incoming.vram_bytes().0, 0);
        assert_eq!(loaded.lock().unwrap().as_ref().unwrap().len(), LEN);
    }

    #[test]
    fn vram_precopy_to_a_destination_that_did_not_accept_it_fails_before_the_stream() {
        let (outcome, incoming, _) =
            migrate_with_vram(1 << 20, vec![0x77; 1 << 20], VramPrecopyMode::On, None);
        let e = outcome.result.unwrap_err();
        assert!(
            chain(&e).contains("did not accept VRAM_PRECOPY"),
            "{}",
            chain(&e)
        );
        assert!(incoming.check_all_received().is_err());
    }

    #[test]
    fn vram_precopy_refused_by_the_handle_names_the_destination_reason() {
        // Larger than the handle takes: it refuses after the prefix.
        let (outcome, incoming, _) = migrate_with_vram(
            2 << 20,
            vec![0x77; 2 << 20],
            VramPrecopyMode::On,
            Some(std::env::temp_dir()),
        );
        let e = chain(&outcome.result.unwrap_err());
        assert!(
            e.contains("the destination said: device-state gpu0: ") && e.contains("state of"),
            "{e}"
        );
        assert!(incoming.take_lane_error().is_some());
    }
}
