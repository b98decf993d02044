// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Live migration over Cloud Hypervisor's protocol as our patch series
//! extends it: each VF's state as a streamed `DeviceState` command and a
//! two-step switch-over, both negotiated in Start (see
//! `xe_vf_glue::protocol::ProtocolFeatures`).
//!
//! Source: Start (announcing its features; the destination answers with
//! its own), Config (VM config and each VF's migration info; the
//! destination checks compatibility and may refuse before anything
//! stops), Memory pass 0 and dirty passes while the VM runs, pause, final
//! Memory pass (vCPU dirty pages plus every range the VFs may have
//! DMA'd into), State (small JSON tree), one DeviceState stream per VF
//! (in the order of their ids), Complete, then Switchover (see
//! [`switchover`] for what each side does when something fails around
//! it). Any failure before Switchover went out resumes the source.

pub mod conn;
pub mod device_lanes;
pub mod lanes;
pub mod receive;
pub mod send;
pub mod switchover;
pub mod verify_pass;

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use xe_vf_glue::error_chain::{chain, Chain};
use xe_vf_glue::migration::MigratableError;
use xe_vf_glue::protocol::{ProtocolFeatures, Response, Status};
use xe_vf_glue::DeviceMigrationInfo;

use crate::error::HostError;
use crate::vm::VmConfig;
use conn::Conn;

/// Largest Config or State payload accepted.
pub const MAX_JSON_PAYLOAD: u64 = 1 << 20;
/// Largest error message carried by an Error response.
pub const MAX_ERROR_MESSAGE: u64 = 64 * 1024;

/// The optional protocol features this host speaks (the series':
/// streamed device state and the two-step switch-over).
pub const SUPPORTED_FEATURES: ProtocolFeatures =
    ProtocolFeatures::DEVICE_STATE.union(ProtocolFeatures::SWITCHOVER);

/// The order that numbers streamed devices on the wire: indices into
/// `ids` (the VM's devices in config order), sorted by id, as CH numbers
/// its streamed components.
pub fn streamed_order<S: AsRef<str>>(ids: &[S]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by(|&a, &b| ids[a].as_ref().cmp(ids[b].as_ref()));
    order
}

/// Payload of the `Config` command.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationConfig {
    pub vm: VmConfig,
    /// One per device, in device order.
    pub devices: Vec<DeviceMigrationInfo>,
}

/// Reads a JSON payload of `length` bytes, bounded.
pub fn read_json_payload<T: for<'de> Deserialize<'de>, R: Read>(
    conn: &mut R,
    length: u64,
    what: &str,
) -> Result<T, HostError> {
    if length > MAX_JSON_PAYLOAD {
        return Err(HostError::bad_request(
            what,
            format!("payload of {length} bytes exceeds {MAX_JSON_PAYLOAD}"),
        ));
    }
    let mut buf = vec![0u8; length as usize];
    conn.read_exact(&mut buf)
        .map_err(|e| HostError::failed(what, format!("reading payload: {e}")))?;
    serde_json::from_slice(&buf).map_err(|e| HostError::bad_request(what, format!("bad JSON: {e}")))
}

/// Error response carrying `message` (an additive extension: CH sends
/// Error with no payload and ignores it).
pub fn write_error<W: Write>(conn: &mut W, message: &str) -> io::Result<()> {
    let bytes = message.as_bytes();
    let bytes = &bytes[..bytes.len().min(MAX_ERROR_MESSAGE as usize)];
    Response::new(Status::Error, bytes.len() as u64)
        .write_to(conn)
        .map_err(|e| match e {
            MigratableError::MigrateSocket(io) => io,
            other => io::Error::other(chain(&other)),
        })?;
    conn.write_all(bytes)
}

/// Reads a response; anything but Ok is an error carrying the peer's
/// message, if it sent one.
pub fn expect_ok<R: Read>(conn: &mut R, phase: &str) -> Result<(), HostError> {
    read_ok(conn, phase).map(|_| ())
}

/// [`expect_ok`], returning the Ok (whose padding may carry features).
pub fn read_ok<R: Read>(conn: &mut R, phase: &str) -> Result<Response, HostError> {
    let response = Response::read_from(conn).map_err(|e| {
        HostError::failed(
            phase,
            if is_eof(&e) {
                "the destination closed the connection without answering".to_string()
            } else {
                format!("no answer from the destination: {}", Chain(&e))
            },
        )
    })?;
    let mut message = String::new();
    if response.length() > 0 {
        if response.length() > MAX_ERROR_MESSAGE {
            return Err(HostError::failed(
                phase,
                format!(
                    "response payload of {} bytes is too large",
                    response.length()
                ),
            ));
        }
        let mut buf = vec![0u8; response.length() as usize];
        conn.read_exact(&mut buf)
            .map_err(|e| HostError::failed(phase, format!("reading response payload: {e}")))?;
        message = String::from_utf8_lossy(&buf).into_owned();
    }
    match response.status() {
        Status::Ok => Ok(response),
        other => Err(HostError::failed(
            phase,
            if message.is_empty() {
                format!("destination answered {other:?}")
            } else {
                format!("destination refused: {message}")
            },
        )),
    }
}

/// Whether a protocol read failed because the peer closed the connection.
pub fn is_eof(e: &MigratableError) -> bool {
    matches!(e, MigratableError::MigrateSocket(io) if io.kind() == io::ErrorKind::UnexpectedEof)
}

/// After a write to the destination failed: the Error the destination
/// sent before it closed the connection, if there is one. A destination
/// that refuses data mid-stream answers and hangs up; without this the
/// source would only report a broken pipe, not why.
pub fn peer_refusal(conn: &mut Conn) -> Option<String> {
    conn.set_timeouts(REFUSAL_WAIT).ok()?;
    let response = Response::read_from(conn).ok()?;
    if response.status() != Status::Error || response.length() > MAX_ERROR_MESSAGE {
        return None;
    }
    let mut buf = vec![0u8; response.length() as usize];
    conn.read_exact(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// How long a source waits for the reason of a refusal.
const REFUSAL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Counts bytes written through it.
pub struct CountingWriter<'a, W: Write> {
    pub inner: &'a mut W,
    pub count: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
