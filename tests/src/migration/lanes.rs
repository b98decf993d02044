// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Extra migration connections, as Cloud Hypervisor opens them for
//! `connections=N` (`vmm/src/migration/transport.rs`): each announces its
//! [`ConnectionRole`] first; a `PrecopyMemory` connection then carries
//! `Memory` requests only, each answered Ok, while the main connection
//! carries everything else. The source opens N of them (none for N = 1,
//! where memory goes over the main connection) and closes them once the
//! last memory pass is acknowledged; the destination accepts them from
//! Config until State.
//!
//! A `DeviceState` connection (`migration_ext::lanes`) carries one VF's
//! state, loaded by the engine's `IncomingDevices::serve_lane`. Other
//! roles are dropped with a warning (CH hands `Fault` to postcopy, which
//! the host does not do).

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};
use migration_ext::connection::{expect_ok, is_eof};
use migration_ext::streamed::IncomingDevices;
use xe_vf_glue::error_chain::Chain;
use xe_vf_glue::protocol::{Command, ConnectionRole, MemoryRangeTable, Request, Response};

use super::conn::{connect, Conn, Listener, MigrationUrl};
use super::failed;
use crate::error::{HostError, HostResult};
use crate::fault::MigrationFault;
use crate::memory::{GuestMemory, COPY_CHUNK};

/// Memory bytes per `Memory` request on an extra connection: small, so
/// that even test-sized guest memory spreads over all connections (CH
/// uses 64 MiB, sized for 100G links).
pub const LANE_CHUNK: u64 = 4 << 20;
/// How long an accepted connection has to announce its role (CH: 10 s).
const ROLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often waiting threads look at the stop flag.
const POLL_SLICE: Duration = Duration::from_millis(50);

/// The source's extra memory connections.
#[derive(Default)]
pub struct SendLanes {
    conns: Vec<Conn>,
}

impl SendLanes {
    /// Opens `count` connections announcing `PrecopyMemory` (none for a
    /// count of 1: the main connection carries memory then).
    pub fn open(url: &MigrationUrl, count: u32, timeout: Duration) -> HostResult<Self> {
        let mut conns = Vec::new();
        if count > 1 {
            for n in 0..count {
                let phase = format!("connection {}", n + 1);
                let mut conn = connect(url, Instant::now() + timeout)
                    .map_err(|e| HostError::failed(&phase, e))?;
                conn.set_timeouts(timeout)
                    .map_err(|e| HostError::failed(&phase, e))?;
                ConnectionRole::PrecopyMemory
                    .write_to(&mut conn)
                    .map_err(|e| HostError::failed(&phase, Chain(&e)))?;
                conns.push(conn);
            }
        }
        Ok(SendLanes { conns })
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Sends `table` over all connections, [`LANE_CHUNK`] per request,
    /// each taking the next chunk when its last one is acknowledged;
    /// returns once every chunk is acknowledged, or with the first error.
    /// `sent` counts the memory bytes as they go.
    pub fn send(
        &mut self,
        memory: &GuestMemory,
        table: MemoryRangeTable,
        phase: &str,
        sent: &AtomicU64,
    ) -> HostResult<()> {
        let queue = Mutex::new(table.partition(LANE_CHUNK));
        let failed = AtomicBool::new(false);
        let results: Vec<HostResult<()>> = std::thread::scope(|s| {
            let workers: Vec<_> = self
                .conns
                .iter_mut()
                .enumerate()
                .map(|(n, conn)| {
                    let (queue, failed) = (&queue, &failed);
                    s.spawn(move || {
                        let phase = format!("{phase} (connection {})", n + 1);
                        let mut buf = vec![0u8; COPY_CHUNK];
                        while !failed.load(Ordering::Relaxed) {
                            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                            let Some(chunk) = next else { break };
                            let r = send_chunk(conn, memory, &chunk, &mut buf, &phase, sent);
                            if r.is_err() {
                                failed.store(true, Ordering::Relaxed);
                                return r;
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(HostError::failed(
                            phase,
                            "a memory connection thread panicked",
                        ))
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// Closes the connections: the destination's workers see EOF.
    pub fn close(&mut self) {
        for c in self.conns.drain(..) {
            c.shutdown();
        }
    }
}

fn send_chunk(
    conn: &mut Conn,
    memory: &GuestMemory,
    chunk: &MemoryRangeTable,
    buf: &mut [u8],
    phase: &str,
    sent: &AtomicU64,
) -> HostResult<()> {
    Request::memory(chunk.length())
        .write_to(conn)
        .and_then(|()| chunk.write_to(conn))
        .map_err(|e| HostError::failed(phase, Chain(&e)))?;
    for r in chunk.regions() {
        memory
            .send_range(r, conn, buf)
            .map_err(|e| HostError::failed(phase, e))?;
        sent.fetch_add(r.length, Ordering::Relaxed);
    }
    expect_ok(conn).map_err(|e| failed(phase, &e))
}

/// What the destination's lanes took in.
#[derive(Default)]
struct LaneStats {
    bytes: AtomicU64,
    error: Mutex<Option<HostError>>,
}

/// The destination's side: an accept thread and one worker per memory
/// connection, stopped and joined by [`ReceiveLanes::finish`] (or drop).
pub struct ReceiveLanes {
    stop: Arc<AtomicBool>,
    stats: Arc<LaneStats>,
    accept: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

/// Waits until `fd` is readable or `stop` is set; `Ok(false)` on stop.
pub(super) fn wait_readable(fd: i32, stop: &AtomicBool) -> io::Result<bool> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on our stack, count 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, POLL_SLICE.as_millis() as i32) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else if rc > 0 {
            return Ok(true);
        }
    }
}

impl ReceiveLanes {
    /// Accepts extra connections on `listener` into `memory`; reads on
    /// them wait at most `timeout`.
    pub fn start(
        listener: Arc<Listener>,
        memory: Arc<GuestMemory>,
        devices: Arc<IncomingDevices>,
        timeout: Duration,
        fault: Option<MigrationFault>,
    ) -> HostResult<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LaneStats::default());
        let (s, st) = (stop.clone(), stats.clone());
        let accept = std::thread::Builder::new()
            .name("migrate-accept".into())
            .spawn(move || Self::accept_loop(&listener, &memory, &devices, &s, &st, timeout, fault))
            .map_err(|e| HostError::failed("extra connections", e))?;
        Ok(ReceiveLanes {
            stop,
            stats,
            accept: Some(accept),
        })
    }

    fn accept_loop(
        listener: &Listener,
        memory: &Arc<GuestMemory>,
        devices: &Arc<IncomingDevices>,
        stop: &Arc<AtomicBool>,
        stats: &Arc<LaneStats>,
        timeout: Duration,
        mut fault: Option<MigrationFault>,
    ) -> Vec<JoinHandle<()>> {
        let mut workers = Vec::new();
        loop {
            match wait_readable(listener.as_raw_fd(), stop) {
                Ok(true) => {}
                Ok(false) => return workers,
                Err(e) => {
                    Self::fail(stats, HostError::failed("extra connections", e));
                    return workers;
                }
            }
            let conn = match listener.accept(Duration::ZERO) {
                Ok(c) => c,
                Err(e) => {
                    warn!("migration: accepting an extra connection failed: {e}");
                    continue;
                }
            };
            if workers.len() >= crate::api_bodies::MAX_MIGRATION_CONNECTIONS as usize {
                Self::fail(
                    stats,
                    HostError::failed("extra connections", "more than 128 extra connections"),
                );
                return workers;
            }
            let Some((role, conn)) = Self::classify(conn, timeout) else {
                continue;
            };
            let n = workers.len() + 1;
            if role == ConnectionRole::DeviceState {
                let (d, halt, st) = (devices.clone(), stop.clone(), stats.clone());
                let fault = fault.take();
                match std::thread::Builder::new()
                    .name(format!("migrate-dev-{n}"))
                    .spawn(move || Self::serve_device_state(conn, &d, &halt, &st, fault))
                {
                    Ok(w) => workers.push(w),
                    Err(e) => {
                        Self::fail(stats, HostError::failed("extra connections", e));
                        return workers;
                    }
                }
                continue;
            }
            let (m, halt, st) = (memory.clone(), stop.clone(), stats.clone());
            match std::thread::Builder::new()
                .name(format!("migrate-recv-{n}"))
                .spawn(move || {
                    if let Err(e) = Self::receive_memory(conn, &m, &halt, &st, n) {
                        Self::fail(&st, e);
                    }
                }) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    Self::fail(stats, HostError::failed("extra connections", e));
                    return workers;
                }
            }
        }
    }

    /// Reads the role of an accepted connection; memory and device-state
    /// ones are kept.
    fn classify(mut conn: Conn, timeout: Duration) -> Option<(ConnectionRole, Conn)> {
        conn.set_timeouts(ROLE_TIMEOUT).ok()?;
        let role = match ConnectionRole::read_from(&mut conn) {
            Ok(r) => r,
            Err(e) => {
                warn!("migration: dropping a connection: {}", Chain(&e));
                return None;
            }
        };
        match role {
            ConnectionRole::PrecopyMemory | ConnectionRole::DeviceState => {
                conn.set_timeouts(timeout).ok()?;
                Some((role, conn))
            }
            other => {
                warn!("migration: dropping a connection with role {other:?} (not supported)");
                None
            }
        }
    }

    /// Serves one VF's state once its request comes, which is only once
    /// the source paused (long after the connection opened): until then
    /// it waits without a timeout, ending when `stop` is set. A
    /// connection that pre-copies VRAM waits the same way between the
    /// end of pre-copy and the pause. A `vram-precopy` test fault fires
    /// once `after_bytes` of the connection were read (and dropped).
    fn serve_device_state(
        mut conn: Conn,
        devices: &IncomingDevices,
        stop: &AtomicBool,
        stats: &LaneStats,
        fault: Option<MigrationFault>,
    ) {
        match wait_readable(conn.as_raw_fd(), stop) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return Self::fail(stats, HostError::failed("device-state connection", e)),
        }
        if let Some(fault) = fault {
            let skipped =
                io::copy(&mut (&mut conn).take(fault.after_bytes), &mut io::sink()).unwrap_or(0);
            debug!("migration: {skipped} bytes of a device-state connection dropped");
            fault.fire(&conn);
            return;
        }
        devices.serve_lane_waiting(&mut conn, &mut |c: &Conn| {
            wait_readable(c.as_raw_fd(), stop)
        });
    }

    /// Serves `Memory` requests until the source closes the connection.
    fn receive_memory(
        mut conn: Conn,
        memory: &GuestMemory,
        stop: &AtomicBool,
        stats: &LaneStats,
        n: usize,
    ) -> HostResult<()> {
        let phase = format!("memory (connection {n})");
        let mut buf = vec![0u8; COPY_CHUNK];
        loop {
            match wait_readable(conn.as_raw_fd(), stop) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => return Err(HostError::failed(&phase, e)),
            }
            let request = match Request::read_from(&mut conn) {
                Ok(r) => r,
                Err(e) if is_eof(&e) => {
                    debug!("migration: connection {n} closed by the source");
                    return Ok(());
                }
                Err(e) => return Err(HostError::failed(&phase, Chain(&e))),
            };
            if request.command() != Command::Memory {
                return Err(HostError::bad_request(
                    &phase,
                    format!("{:?} on a memory connection", request.command()),
                ));
            }
            let table = MemoryRangeTable::read_from(&mut conn, request.length())
                .map_err(|e| HostError::bad_request(&phase, Chain(&e)))?;
            for r in table.regions() {
                memory
                    .receive_range(r, &mut conn, &mut buf)
                    .map_err(|e| HostError::failed(&phase, e))?;
                stats.bytes.fetch_add(r.length, Ordering::Relaxed);
            }
            Response::ok()
                .write_to(&mut conn)
                .map_err(|e| HostError::failed(&phase, Chain(&e)))?;
        }
    }

    fn fail(stats: &LaneStats, e: HostError) {
        warn!("migration: {e}");
        let mut slot = stats.error.lock().unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(e);
    }

    /// Stops accepting, joins the workers; the bytes they took in, or the
    /// first error one of them met.
    pub fn finish(&mut self) -> HostResult<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            for w in accept.join().unwrap_or_default() {
                let _ = w.join();
            }
        }
        let error = self
            .stats
            .error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match error {
            Some(e) => Err(e),
            None => Ok(self.stats.bytes.load(Ordering::Relaxed)),
        }
    }
}

impl Drop for ReceiveLanes {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
