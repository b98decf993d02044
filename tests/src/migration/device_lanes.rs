// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device state on connections of its own, concurrently with the final
//! memory pass and with each other.
//!
//! Negotiated in Start (feature `DEVICE_STATE_CONNECTIONS`, see
//! [`super::verify_pass`]). The source opens one extra connection per VF
//! before pre-copy, announcing our role [`ROLE_DEVICE_STATE`]; once the
//! VM is paused, each carries exactly one `DeviceState` request and its
//! self-delimited stream, answered Ok (or Error with the reason), while
//! the main connection carries the final memory pass. State and Complete
//! follow on the main connection once every stream is acknowledged. A
//! destination without the feature gets every VF's state on the main
//! connection, in turn, as before.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{info, warn};
use xe_vf_glue::error_chain::Chain;
use xe_vf_glue::protocol::{Command, Request, Response, DEVICE_STATE_SELF_DELIMITED};
use xe_vf_glue::XeVfDevice;
use xe_vf_plugin::engine::{self, TransferOptions};
use xe_vf_plugin::MigrationDevice;

use super::conn::{connect, Conn, MigrationUrl};
use super::verify_pass::ROLE_DEVICE_STATE;
use super::{expect_ok, peer_refusal, write_error, CountingWriter};
use crate::error::{HostError, HostResult};

/// The source's device-state connections, one per VF, in device order.
#[derive(Default)]
pub struct DeviceLanes {
    conns: Vec<Conn>,
}

impl DeviceLanes {
    /// Opens `count` connections announcing `DeviceState`.
    pub fn open(url: &MigrationUrl, count: usize, timeout: Duration) -> HostResult<Self> {
        let mut conns = Vec::with_capacity(count);
        for n in 0..count {
            let phase = format!("device-state connection {}", n + 1);
            let mut conn =
                connect(url, Instant::now() + timeout).map_err(|e| HostError::failed(&phase, e))?;
            conn.set_timeouts(timeout)
                .map_err(|e| HostError::failed(&phase, e))?;
            conn.write_all(&ROLE_DEVICE_STATE.to_le_bytes())
                .map_err(|e| HostError::failed(&phase, e))?;
            conns.push(conn);
        }
        Ok(DeviceLanes { conns })
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn take(&mut self) -> Vec<Conn> {
        std::mem::take(&mut self.conns)
    }

    /// Closes connections not used (a failed migration).
    pub fn close(&mut self) {
        for c in self.conns.drain(..) {
            c.shutdown();
        }
    }
}

/// Source: streams the stopped VF `device` (at `index`) over `conn` and
/// waits for the destination's Ok; returns the bytes sent.
pub fn send_one(mut conn: Conn, index: usize, device: &XeVfDevice) -> HostResult<u64> {
    let phase = format!("device-state {}", device_id(device));
    Request::device_state(index as u16)
        .write_to(&mut conn)
        .map_err(|e| HostError::failed(&phase, Chain(&e)))?;
    let mut out = CountingWriter {
        inner: &mut conn,
        count: 0,
    };
    let sent = device.save_state_to(&mut out, &mut |_| {});
    let count = out.count;
    if let Err(e) = sent {
        let cause = match peer_refusal(&mut conn) {
            Some(reason) => format!("{}; the destination said: {reason}", Chain(&e)),
            None => Chain(&e).to_string(),
        };
        conn.shutdown();
        return Err(HostError::failed(&phase, cause));
    }
    let acked = expect_ok(&mut conn, &phase);
    conn.shutdown();
    acked.map(|()| count)
}

fn device_id(d: &XeVfDevice) -> String {
    xe_vf_glue::migration::Snapshottable::id(d)
}

/// One destination VF a device-state connection may load.
pub struct Target {
    pub id: String,
    pub device: Arc<dyn MigrationDevice>,
    pub opts: TransferOptions,
}

/// The destination's VFs and what their connections delivered.
pub struct Targets {
    devices: Vec<Target>,
    received: Mutex<Vec<bool>>,
    bytes: AtomicU64,
    error: Mutex<Option<HostError>>,
    /// Streams being loaded now.
    active: AtomicUsize,
}

/// Counts a stream as active while it lives.
struct Active<'a>(&'a AtomicUsize);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Targets {
    pub fn new(devices: Vec<Target>) -> Self {
        let n = devices.len();
        Targets {
            devices,
            received: Mutex::new(vec![false; n]),
            bytes: AtomicU64::new(0),
            error: Mutex::new(None),
            active: AtomicUsize::new(0),
        }
    }

    /// Whether a VF's state is streaming in now: the main connection is
    /// then legitimately silent for as long as that takes.
    pub fn streaming(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// Which VFs got their state, the bytes that carried it, and the
    /// first failure of a connection.
    pub fn outcome(&self) -> (Vec<bool>, u64, Option<HostError>) {
        (
            self.received
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            self.bytes.load(Ordering::Relaxed),
            self.error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        )
    }

    fn fail(&self, e: HostError) {
        warn!("migration: {e}");
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(e);
    }

    /// Destination: serves one device-state connection.
    /// Until the source sends the request (once the VM is paused, which
    /// may be long after the connection opened) it waits without a
    /// timeout, ending when the source closes the connection or `stop`
    /// is set.
    pub fn serve(&self, mut conn: Conn, stop: &AtomicBool) {
        match super::lanes::wait_readable(conn.as_raw_fd(), stop) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                self.fail(HostError::failed("device-state connection", e));
                return;
            }
        }
        if let Err(e) = self.serve_inner(&mut conn) {
            // Recorded before the source can hear of it, so an Abandon
            // that follows finds the reason here.
            let message = e.to_string();
            self.fail(e);
            let _ = write_error(&mut conn, &message);
        }
    }

    fn serve_inner(&self, conn: &mut Conn) -> HostResult<()> {
        let phase = "device-state connection";
        let request = match Request::read_from(conn) {
            Ok(r) => r,
            // Closed unused: the migration ended before the VFs' turn.
            Err(e) if super::is_eof(&e) => return Ok(()),
            Err(e) => return Err(HostError::failed(phase, Chain(&e))),
        };
        self.active.fetch_add(1, Ordering::AcqRel);
        let _active = Active(&self.active);
        let index = match request.command() {
            Command::DeviceState if request.length() == DEVICE_STATE_SELF_DELIMITED => {
                usize::from(request.device_index())
            }
            _ => {
                return Err(HostError::bad_request(
                    phase,
                    format!(
                        "{:?} on a device-state connection (only a self-delimited DeviceState)",
                        request.command()
                    ),
                ))
            }
        };
        let target = self.devices.get(index).ok_or_else(|| {
            HostError::bad_request(phase, format!("no device with index {index}"))
        })?;
        let phase = format!("device-state {}", target.id);
        {
            let mut got = self.received.lock().unwrap_or_else(PoisonError::into_inner);
            if got[index] {
                return Err(HostError::bad_request(&phase, "state sent twice"));
            }
            // Taken now: a second connection for the same VF is refused
            // while this one loads.
            got[index] = true;
        }
        let started = Instant::now();
        let loaded = engine::restore(&*target.device, &mut *conn, &target.opts, &mut |_| {});
        let report = match loaded {
            Ok(r) => r,
            Err(e) => {
                self.received.lock().unwrap_or_else(PoisonError::into_inner)[index] = false;
                return Err(HostError::failed(&phase, e));
            }
        };
        self.bytes
            .fetch_add(report.decoded.encoded_bytes, Ordering::Relaxed);
        info!(
            "{phase}: {} bytes loaded in {:.1} ms on its own connection",
            report.decoded.encoded_bytes,
            started.elapsed().as_secs_f64() * 1e3
        );
        Response::ok()
            .write_to(conn)
            .map_err(|e| HostError::failed(&phase, Chain(&e)))
    }
}
