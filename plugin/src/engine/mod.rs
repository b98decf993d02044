// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Streaming save and restore of one device's migration state.
//!
//! [`save`] walks a device to STOP_COPY, streams its data fd through the
//! device-state encoder into any `Write` (a snapshot file, a migration
//! socket) and leaves it in STOP. [`restore`] checks a stream against the
//! destination before touching it, streams the data into RESUMING and
//! loads it. Memory is bounded by the buffer pool, never by VRAM size.
//! Every failure leaves the source device back where it started, and a
//! destination device reset rather than partly loaded.

mod pump;
mod restore;
mod save;

use std::io;
use std::time::Duration;

use log::warn;
use serde::Serialize;
use thiserror::Error;

pub use pump::{Chunk, DeadlineFd, ReadAhead};
pub use restore::{restore, RestoreReport};
pub use save::{save, SaveReport};

use crate::device::{DeviceError, DeviceIdentity, MigrationDevice};
use crate::fsm::WalkError;
use crate::state_format::{EncoderOptions, StateFormatError, StateHeader, DEVICE_KIND_XE_VF};
use crate::uapi::{DeviceState, MigrationFlags};
use crate::xe_stream::XeStreamError;

/// Device-kind string for devices whose stream is not the Xe format.
pub const DEVICE_KIND_GENERIC: &str = "vfio";

/// Knobs shared by save and restore.
#[derive(Clone, Debug)]
pub struct TransferOptions {
    /// Size of one pipelined buffer.
    pub buffer_size: usize,
    /// Buffers in flight between the reading and the writing thread.
    pub queue_depth: usize,
    /// Encoder settings (chunk size, zero elision).
    pub encoder: EncoderOptions,
    /// `xe-vf` streams are parsed and checked in flight; other kinds
    /// (e.g. `vfio` for mtty) are carried opaquely.
    pub device_kind: String,
    /// A device data fd with no progress for this long is an error.
    pub device_timeout: Duration,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            buffer_size: 1 << 20,
            queue_depth: 4,
            encoder: EncoderOptions::default(),
            device_kind: DEVICE_KIND_XE_VF.to_string(),
            device_timeout: Duration::from_secs(30),
        }
    }
}

impl TransferOptions {
    fn is_xe(&self) -> bool {
        self.device_kind == DEVICE_KIND_XE_VF
    }
}

/// The phase a transfer failed in; logged and returned so an operator
/// knows where to look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Query,
    Compatibility,
    EnterStopCopy,
    StopCopyRead,
    Output,
    LeaveStopCopy,
    Input,
    EnterResuming,
    ResumeWrite,
    Load,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Query => "device query",
            Phase::Compatibility => "compatibility check",
            Phase::EnterStopCopy => "enter STOP_COPY",
            Phase::StopCopyRead => "stop-copy read",
            Phase::Output => "output write",
            Phase::LeaveStopCopy => "leave STOP_COPY",
            Phase::Input => "input read",
            Phase::EnterResuming => "enter RESUMING",
            Phase::ResumeWrite => "resume write",
            Phase::Load => "RESUMING -> STOP load",
        }
    }
}

/// What went wrong; every variant names its phase and cause.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("{}: {source}", .phase.name())]
    Device {
        phase: Phase,
        #[source]
        source: DeviceError,
    },
    #[error("{}: {source}", .phase.name())]
    Walk {
        phase: Phase,
        #[source]
        source: WalkError,
    },
    #[error("compatibility check: {0}")]
    Incompatible(String),
    #[error("{}: device-state stream: {source}", .phase.name())]
    Format {
        phase: Phase,
        #[source]
        source: StateFormatError,
    },
    #[error("{}: Xe packet stream: {source}", .phase.name())]
    XeStream {
        phase: Phase,
        #[source]
        source: XeStreamError,
    },
    #[error("{}: {source}", .phase.name())]
    Io {
        phase: Phase,
        #[source]
        source: io::Error,
    },
}

impl EngineError {
    pub fn phase(&self) -> Phase {
        match self {
            EngineError::Device { phase, .. }
            | EngineError::Walk { phase, .. }
            | EngineError::Format { phase, .. }
            | EngineError::XeStream { phase, .. }
            | EngineError::Io { phase, .. } => *phase,
            EngineError::Incompatible(_) => Phase::Compatibility,
        }
    }

    /// The errno of the device call that failed, if one did.
    pub fn errno(&self) -> Option<i32> {
        match self {
            EngineError::Device { source, .. } => source.errno(),
            EngineError::Walk { source, .. } => source.errno(),
            EngineError::XeStream { source, .. } => Some(source.errno()),
            EngineError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub(crate) fn io(phase: Phase) -> impl FnOnce(io::Error) -> EngineError {
        move |source| match crate::state_format::state_error(&source) {
            Some(_) => EngineError::Format {
                phase,
                source: unwrap_format(source),
            },
            None => EngineError::Io { phase, source },
        }
    }
}

/// Recovers the `StateFormatError` an `io::Error` carries.
fn unwrap_format(e: io::Error) -> StateFormatError {
    match e.into_inner() {
        Some(inner) => match inner.downcast::<StateFormatError>() {
            Ok(fmt) => *fmt,
            Err(other) => StateFormatError::Io(io::Error::other(other)),
        },
        None => StateFormatError::Failed,
    }
}

/// Whether saved state from `source` can load into `destination`.
///
/// The Xe driver refuses another device id or revision (ENODEV) and VRAM
/// chunks beyond the destination's LMEM (EINVAL); checking here, before
/// anything is stopped or written, turns those late failures into an
/// early, clear refusal.
pub fn check_compatible(
    source: &DeviceIdentity,
    destination: &DeviceIdentity,
) -> Result<(), EngineError> {
    let mut problems = Vec::new();
    if source.vendor_id != destination.vendor_id {
        problems.push(format!(
            "vendor {:#06x} != {:#06x}",
            source.vendor_id, destination.vendor_id
        ));
    }
    if source.device_id != destination.device_id {
        problems.push(format!(
            "device id {:#06x} != {:#06x}",
            source.device_id, destination.device_id
        ));
    }
    if source.revision_id != destination.revision_id {
        problems.push(format!(
            "revision {:#04x} != {:#04x}",
            source.revision_id, destination.revision_id
        ));
    }
    if let (Some(src), Some(dst)) = (source.vram_size, destination.vram_size) {
        if dst < src {
            problems.push(format!(
                "destination VRAM {dst} bytes is smaller than the source's {src} bytes"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(EngineError::Incompatible(format!(
            "source {source} cannot load into destination {destination}: {}",
            problems.join("; ")
        )))
    }
}

/// The stream header a device's saved state starts with.
pub fn header_for(
    device: &dyn MigrationDevice,
    opts: &TransferOptions,
) -> Result<StateHeader, EngineError> {
    let query = |source| EngineError::Device {
        phase: Phase::Query,
        source,
    };
    let flags = device.migration_flags().map_err(query)?;
    // MIG_DATA_SIZE is an estimate for every device, Xe included (xe's
    // formula leaves out the descriptor and trailer and counts one header
    // for all VRAM chunks): recorded for progress and sizing, never
    // enforced; END carries the real length. Without it the save goes on.
    let estimated = device.stop_copy_size().unwrap_or_else(|e| {
        warn!("MIG_DATA_SIZE unavailable ({e}); the stream header records 0");
        0
    });
    Ok(StateHeader::new(
        opts.device_kind.clone(),
        device.identity(),
        flags.bits(),
        estimated,
    ))
}

/// Which phase to blame for a failure while relaying device data.
struct RelayPhases {
    read: Phase,
    parse: Phase,
    write: Phase,
}

/// Drains `read_ahead` into `sink` until EOF, checking an Xe stream in
/// flight; `done` counts bytes already relayed. Returns the new count.
fn relay(
    read_ahead: &mut ReadAhead,
    mut parser: Option<&mut crate::xe_stream::XeStreamParser>,
    sink: &mut dyn io::Write,
    phases: RelayPhases,
    mut done: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, EngineError> {
    loop {
        let chunk = read_ahead
            .next_chunk()
            .map_err(EngineError::io(phases.read))?;
        if chunk.is_empty() {
            return Ok(done);
        }
        if let Some(p) = parser.as_deref_mut() {
            p.feed(&chunk, &mut ())
                .map_err(|source| EngineError::XeStream {
                    phase: phases.parse,
                    source,
                })?;
        }
        sink.write_all(&chunk)
            .map_err(EngineError::io(phases.write))?;
        done += chunk.len() as u64;
        progress(done);
        read_ahead.recycle(chunk);
    }
}

/// Checks a device can do what a save or restore needs.
fn require_migratable(flags: MigrationFlags) -> Result<(), EngineError> {
    if flags.contains(MigrationFlags::STOP_COPY) {
        Ok(())
    } else {
        Err(EngineError::Device {
            phase: Phase::Query,
            source: DeviceError::NotMigratable,
        })
    }
}

/// Where a failed save puts the device back: where it started, unless it
/// started inside a stream state, which cannot be re-entered.
fn save_recovery_state(initial: DeviceState) -> DeviceState {
    match initial {
        DeviceState::StopCopy | DeviceState::Resuming | DeviceState::Error => DeviceState::Stop,
        DeviceState::PreCopy => DeviceState::Running,
        DeviceState::PreCopyP2p => DeviceState::RunningP2p,
        other => other,
    }
}

#[cfg(test)]
mod tests;
