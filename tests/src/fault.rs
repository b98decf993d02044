// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Test-only fault injection hooks, off by default.
//!
//! Nothing here fires unless a request asks for it: `vm.inject-fault`
//! hands a [`DeviceFault`] to an emulated VF, and `vm.arm-migration`
//! arms [`MigrationTestOptions`] for the next migration: a `fault` makes
//! that side drop the connection, stall, or exit abruptly at a named
//! phase. They exist so the fault
//! matrix (`tests/tests/fault_matrix.rs`) can break every phase with real
//! processes; a VMM in production has no such knobs.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use log::warn;
use serde::Deserialize;
use xe_vf_glue::protocol::ProtocolFeatures;
use xe_vf_plugin::emulated::Fault;
use xe_vf_plugin::uapi::DeviceState;

use crate::error::{HostError, HostResult};
use crate::migration::conn::Conn;
use migration_ext::vram::VramPrecopyMode;
use migration_ext::SUPPORTED_FEATURES;

/// Longest stall a request may ask for.
const MAX_STALL_MS: u64 = 600_000;

fn default_stall_ms() -> u64 {
    60_000
}

/// What a migration-side fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// Shut the connection down (both directions), as a dropped link.
    Drop,
    /// Neither read nor write for `stall_ms`, as a hung peer.
    Stall,
    /// `abort()` the process (not SIGKILL: tests kill during a stall).
    Exit,
}

/// A migration-side fault: `kind` fires once at `phase` (for stream
/// phases, after `after_bytes` bytes of the stream went through).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationFault {
    pub phase: String,
    pub kind: FaultKind,
    #[serde(default)]
    pub after_bytes: u64,
    #[serde(default = "default_stall_ms")]
    pub stall_ms: u64,
}

impl MigrationFault {
    /// Fires the fault on `conn` (logging it, so a test can tell an
    /// injected fault from a real one).
    pub fn fire(&self, conn: &Conn) {
        warn!(
            "fault injection: {:?} at {} (after {} bytes)",
            self.kind, self.phase, self.after_bytes
        );
        match self.kind {
            FaultKind::Drop => conn.shutdown(),
            FaultKind::Stall => {
                std::thread::sleep(Duration::from_millis(self.stall_ms.min(MAX_STALL_MS)))
            }
            FaultKind::Exit => std::process::abort(),
        }
    }
}

/// Takes the fault out of `slot` if it is for `phase`.
pub fn take_for(slot: &mut Option<MigrationFault>, phase: &str) -> Option<MigrationFault> {
    if slot.as_ref().is_some_and(|f| f.phase == phase) {
        slot.take()
    } else {
        None
    }
}

/// Wraps a stream end; fires `fault` once `after_bytes` have passed.
pub struct FaultyStream<S> {
    pub inner: S,
    conn: Conn,
    fault: Option<MigrationFault>,
    passed: u64,
}

impl<S> FaultyStream<S> {
    pub fn new(inner: S, conn: Conn, fault: Option<MigrationFault>) -> Self {
        FaultyStream {
            inner,
            conn,
            fault,
            passed: 0,
        }
    }

    /// How many bytes may pass before the fault fires.
    fn allowance(&mut self, want: usize) -> usize {
        match &self.fault {
            Some(f) if self.passed >= f.after_bytes => {
                if let Some(f) = self.fault.take() {
                    f.fire(&self.conn);
                }
                want
            }
            Some(f) => want.min((f.after_bytes - self.passed) as usize),
            None => want,
        }
    }
}

impl<S: Read> Read for FaultyStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.allowance(buf.len());
        let got = self.inner.read(&mut buf[..n])?;
        self.passed += got as u64;
        Ok(got)
    }
}

impl<S: Write> Write for FaultyStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.allowance(buf.len());
        let put = self.inner.write(&buf[..n])?;
        self.passed += put as u64;
        Ok(put)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A state arc named as the kernel spells it (`STOP`, `RESUMING`...).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArcFault {
    pub from: String,
    pub to: String,
    pub errno: i32,
    #[serde(default)]
    pub enter_error: bool,
}

/// `vm.inject-fault`'s `fault`: one of the emulated VF's faults.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DeviceFault {
    FailArc(ArcFault),
    StallSave { after_bytes: u64 },
    CorruptSave { offset: u64 },
}

fn state(name: &str) -> HostResult<DeviceState> {
    DeviceState::parse(name)
        .ok_or_else(|| HostError::bad_request("inject-fault", format!("no device state '{name}'")))
}

impl DeviceFault {
    pub fn to_fault(&self) -> HostResult<Fault> {
        Ok(match self {
            DeviceFault::FailArc(a) => Fault::FailArc {
                from: state(&a.from)?,
                to: state(&a.to)?,
                errno: a.errno,
                enter_error: a.enter_error,
            },
            DeviceFault::StallSave { after_bytes } => Fault::StallSave {
                after_bytes: *after_bytes,
            },
            DeviceFault::CorruptSave { offset } => Fault::CorruptSave { offset: *offset },
        })
    }
}

fn default_receive_timeout_s() -> u64 {
    60
}

/// Test hooks for the next migration, armed with `vm.arm-migration`
/// (curl: CH's migration bodies, which `ch-remote` sends, have no room
/// for them). Taken by the next send or receive, then back to defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationTestOptions {
    /// A fault this side injects at a phase. Source: `pause`,
    /// `final-memory`, `state`, `device-state`, `complete`, `ready` (the
    /// destination answered Complete, Switchover not sent yet),
    /// `switchover-sent` (Switchover went out, no answer read yet).
    /// Destination: `memory`, `memory#N`, `vram-precopy` (on a VF's
    /// connection of its own, after `after_bytes` of it), `state`,
    /// `device-state`, `complete` (before the checks), `ready` (answered
    /// Complete, before reading Switchover), `switchover` (got
    /// Switchover, before resuming), `resumed` (the VM resumed, before
    /// the Ok).
    #[serde(default)]
    pub fault: Option<MigrationFault>,
    /// Announce only these optional protocol features in Start (source)
    /// or in its answer (destination), as an older peer does: `[]` for
    /// none, `["device-state"]` for a peer without the two-step
    /// switch-over (also `device-state-connections`, `verify`,
    /// `vram-precopy`). Absent: all this host speaks.
    #[serde(default)]
    pub features: Option<Vec<Feature>>,
    /// Destination: device id -> spec used instead of the source's (to
    /// test refusals or map to another VF on this host).
    #[serde(default)]
    pub device_overrides: BTreeMap<String, String>,
    /// Destination: record memory checksum and VF digests right before
    /// resuming (adds their time to the downtime).
    #[serde(default)]
    pub verify: bool,
    /// Destination: stop reading at this phase (`device-state`) until the
    /// timeout, as a hung destination would.
    #[serde(default)]
    pub stall_at: Option<String>,
    /// Destination: how long to wait for the source and for each read
    /// (CH's receiver waits as long as TCP keepalive lets it).
    #[serde(default = "default_receive_timeout_s")]
    pub timeout_s: u64,
    /// Destination: faults handed to this side's emulated VFs (by device
    /// id) as soon as they exist, e.g. a failing RESUMING -> STOP.
    #[serde(default)]
    pub device_faults: BTreeMap<String, Vec<DeviceFault>>,
    /// Source: send VF state over connections of its own when the
    /// destination takes them (default), or in turn on the main
    /// connection after the final memory pass (QEMU style).
    #[serde(default = "yes")]
    pub device_state_connections: bool,
    /// Source: VRAM pre-copy through the VF's BAR, over send-migration's
    /// `vram_precopy` (`Auto`: pre-copy, compare in stop-copy when the
    /// rates say it pays).
    #[serde(default)]
    pub vram_precopy: Option<VramPrecopyMode>,
    /// Source, for benchmarks: once memory pre-copy has converged (and
    /// VRAM pre-copy ended), each emulated VF's own work rewrites this
    /// share of its VRAM, spread out, before the VM pauses: "VRAM changed
    /// after pre-copy". The same point with or without VRAM pre-copy.
    #[serde(default)]
    pub vram_change_percent: u8,
    /// Destination: where pre-copied VRAM is kept (default: the system's
    /// temporary directory).
    #[serde(default)]
    pub vram_dir: Option<PathBuf>,
    /// Destination, for benchmarks: allocate every emulated VF's LMEM
    /// when it is created at Config, as device memory always is, so that
    /// loading its state pays no page allocation (as `xe-vf-bench run`
    /// does for its destination VFs).
    #[serde(default)]
    pub prefault_vram: bool,
}

fn yes() -> bool {
    true
}

/// An optional protocol feature, by the name the test hooks use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Feature {
    DeviceState,
    Switchover,
    DeviceStateConnections,
    Verify,
    VramPrecopy,
}

impl Feature {
    fn flag(self) -> ProtocolFeatures {
        match self {
            Feature::DeviceState => ProtocolFeatures::DEVICE_STATE,
            Feature::Switchover => ProtocolFeatures::SWITCHOVER,
            Feature::DeviceStateConnections => ProtocolFeatures::DEVICE_STATE_CONNECTIONS,
            Feature::Verify => ProtocolFeatures::VERIFY,
            Feature::VramPrecopy => ProtocolFeatures::VRAM_PRECOPY,
        }
    }
}

impl MigrationTestOptions {
    /// The optional features this side announces.
    pub fn protocol_features(&self) -> ProtocolFeatures {
        match &self.features {
            None => SUPPORTED_FEATURES,
            Some(list) => list
                .iter()
                .fold(ProtocolFeatures::empty(), |all, f| all | f.flag()),
        }
    }
}

impl Default for MigrationTestOptions {
    fn default() -> Self {
        MigrationTestOptions {
            fault: None,
            features: None,
            device_overrides: BTreeMap::new(),
            verify: false,
            stall_at: None,
            timeout_s: default_receive_timeout_s(),
            device_faults: BTreeMap::new(),
            device_state_connections: true,
            vram_precopy: None,
            vram_change_percent: 0,
            vram_dir: None,
            prefault_vram: false,
        }
    }
}
