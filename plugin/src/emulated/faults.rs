// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One-shot fault injection, for tests of the layers above the device.

use std::sync::Mutex;

use super::state::lock;
use crate::uapi::DeviceState;

/// A fault to inject; each fires once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The arc `from -> to` fails with `errno`. With `enter_error` the
    /// device lands in ERROR (as some variant drivers do); otherwise its
    /// state is unchanged (as `xe-vfio-pci` does).
    FailArc {
        from: DeviceState,
        to: DeviceState,
        errno: i32,
        enter_error: bool,
    },
    /// The next save stream stops producing after `after_bytes` bytes but
    /// keeps the fd open until STOP_COPY -> STOP.
    StallSave { after_bytes: u64 },
    /// The next save stream has the byte at `offset` inverted.
    CorruptSave { offset: u64 },
}

/// Save-stream faults taken by one STOP_COPY session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SaveFaults {
    pub(crate) stall_after: Option<u64>,
    pub(crate) corrupt_at: Option<u64>,
}

#[derive(Default)]
pub(crate) struct Faults(Mutex<Vec<Fault>>);

impl Faults {
    pub(crate) fn inject(&self, fault: Fault) {
        lock(&self.0).push(fault);
    }

    /// Takes a pending arc fault for `from -> to`: `(errno, enter_error)`.
    pub(crate) fn take_arc(&self, from: DeviceState, to: DeviceState) -> Option<(i32, bool)> {
        let mut faults = lock(&self.0);
        let pos = faults.iter().position(
            |f| matches!(f, Fault::FailArc { from: f_from, to: f_to, .. } if *f_from == from && *f_to == to),
        )?;
        match faults.remove(pos) {
            Fault::FailArc {
                errno, enter_error, ..
            } => Some((errno, enter_error)),
            _ => None,
        }
    }

    /// Takes the pending save-stream faults.
    pub(crate) fn take_save(&self) -> SaveFaults {
        let mut out = SaveFaults::default();
        lock(&self.0).retain(|f| match *f {
            Fault::StallSave { after_bytes } if out.stall_after.is_none() => {
                out.stall_after = Some(after_bytes);
                false
            }
            Fault::CorruptSave { offset } if out.corrupt_at.is_none() => {
                out.corrupt_at = Some(offset);
                false
            }
            _ => true,
        });
        out
    }
}
