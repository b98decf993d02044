// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The one trait every migratable device backend implements.
//!
//! It mirrors the VFIO migration uAPI v2 and nothing more, so the real
//! VFIO backend and the emulated Xe VF are interchangeable and everything
//! above this trait (FSM, save/restore engine, VMM glue) is shared code.

use std::fmt;
use std::fs::File;
use std::io;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::uapi::{DeviceState, MigrationFlags};

/// PCI vendor id of Intel.
pub const PCI_VENDOR_INTEL: u16 = 0x8086;

/// What a destination must match for the saved state to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    /// The VF's LMEM quota in bytes, when the backend knows it.
    pub vram_size: Option<u64>,
}

impl fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:04x} rev {:02x}",
            self.vendor_id, self.device_id, self.revision_id
        )?;
        if let Some(v) = self.vram_size {
            write!(f, " vram {v} bytes")?;
        }
        Ok(())
    }
}

/// Errors of a device backend. `errno()` gives the kernel's code where
/// there is one, because callers (and tests) act on it.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("device {path} not found: {reason}")]
    NotFound { path: String, reason: String },
    #[error("device does not support VFIO migration v2")]
    NotMigratable,
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("arc {from} -> {to} failed: {source}")]
    Arc {
        from: DeviceState,
        to: DeviceState,
        #[source]
        source: io::Error,
    },
    #[error("device reported an unknown migration state {0}")]
    UnknownState(u32),
    #[error("{0}")]
    Other(String),
}

impl DeviceError {
    /// The errno of the failing call, if it came from one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DeviceError::Ioctl { source, .. } | DeviceError::Arc { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, DeviceError>;

/// A device that speaks the VFIO migration uAPI v2.
///
/// Callers ask `set_state` for one arc at a time, walking longer paths with
/// [`crate::fsm`] so that every step can be checked and recovered. (Linux's
/// VFIO core would also accept a non-adjacent pair of supported states and
/// walk it internally; nothing here relies on either behaviour.) An arc that opens a
/// data stream (`STOP -> STOP_COPY`, `STOP -> RESUMING`, `RUNNING ->
/// PRE_COPY`, ...) returns its data fd, a real file descriptor.
pub trait MigrationDevice: Send + Sync {
    /// Identity used for compatibility checks.
    fn identity(&self) -> DeviceIdentity;
    /// `VFIO_DEVICE_FEATURE_MIGRATION`: which arcs exist.
    fn migration_flags(&self) -> Result<MigrationFlags>;
    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` GET.
    fn state(&self) -> Result<DeviceState>;
    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` SET of one arc.
    fn set_state(&self, new_state: DeviceState) -> Result<Option<File>>;
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: an estimate of the bytes
    /// STOP_COPY will produce (xe's is short of its stream by the
    /// descriptor, the trailer and all but one VRAM chunk header per tile).
    fn stop_copy_size(&self) -> Result<u64>;
    /// `VFIO_DEVICE_RESET`: the only way out of ERROR; state is lost.
    fn reset(&self) -> Result<()>;
}

impl<T: MigrationDevice + ?Sized> MigrationDevice for std::sync::Arc<T> {
    fn identity(&self) -> DeviceIdentity {
        (**self).identity()
    }
    fn migration_flags(&self) -> Result<MigrationFlags> {
        (**self).migration_flags()
    }
    fn state(&self) -> Result<DeviceState> {
        (**self).state()
    }
    fn set_state(&self, new_state: DeviceState) -> Result<Option<File>> {
        (**self).set_state(new_state)
    }
    fn stop_copy_size(&self) -> Result<u64> {
        (**self).stop_copy_size()
    }
    fn reset(&self) -> Result<()> {
        (**self).reset()
    }
}
