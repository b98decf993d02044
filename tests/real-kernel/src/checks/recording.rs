// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A [`MigrationDevice`] wrapper that records every arc `fsm::walk` asks
//! for and the state the kernel reports right after it, so a check can see
//! the path the project's FSM took, and how it recovered, on a real kernel.

use std::fs::File;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use xe_vf_plugin::device::Result;
use xe_vf_plugin::{DeviceIdentity, DeviceState, MigrationDevice, MigrationFlags};

/// `to` of a recorded `reset()`.
pub const RESET: &str = "RESET";

/// One `set_state` (or `reset`) call as the kernel answered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ArcRecord {
    pub from: String,
    pub to: String,
    /// `MIG_DEVICE_STATE` GET right after the call.
    pub state_after: String,
    pub data_fd: bool,
    pub errno: Option<i32>,
}

pub struct Recording<'a> {
    inner: &'a dyn MigrationDevice,
    arcs: Mutex<Vec<ArcRecord>>,
}

impl<'a> Recording<'a> {
    pub fn new(inner: &'a dyn MigrationDevice) -> Self {
        Recording {
            inner,
            arcs: Mutex::new(Vec::new()),
        }
    }

    fn arcs_lock(&self) -> MutexGuard<'_, Vec<ArcRecord>> {
        self.arcs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The arcs recorded so far; clears the log.
    pub fn take(&self) -> Vec<ArcRecord> {
        std::mem::take(&mut *self.arcs_lock())
    }
}

fn state_name(state: Result<DeviceState>) -> String {
    match state {
        Ok(s) => s.name().to_string(),
        Err(e) => format!("unreadable: {e}"),
    }
}

impl MigrationDevice for Recording<'_> {
    fn identity(&self) -> DeviceIdentity {
        self.inner.identity()
    }
    fn migration_flags(&self) -> Result<MigrationFlags> {
        self.inner.migration_flags()
    }
    fn state(&self) -> Result<DeviceState> {
        self.inner.state()
    }
    fn set_state(&self, new_state: DeviceState) -> Result<Option<File>> {
        let from = state_name(self.inner.state());
        let result = self.inner.set_state(new_state);
        let record = ArcRecord {
            from,
            to: new_state.name().to_string(),
            state_after: state_name(self.inner.state()),
            data_fd: matches!(result, Ok(Some(_))),
            errno: result.as_ref().err().and_then(|e| e.errno()),
        };
        self.arcs_lock().push(record);
        result
    }
    fn stop_copy_size(&self) -> Result<u64> {
        self.inner.stop_copy_size()
    }
    fn reset(&self) -> Result<()> {
        let from = state_name(self.inner.state());
        let result = self.inner.reset();
        let record = ArcRecord {
            from,
            to: RESET.to_string(),
            state_after: state_name(self.inner.state()),
            data_fd: false,
            errno: result.as_ref().err().and_then(|e| e.errno()),
        };
        self.arcs_lock().push(record);
        result
    }
}
