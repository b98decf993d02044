// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Several VFs of one VM, paused and resumed together.
//!
//! The uAPI requires all devices to reach RUNNING_P2P before any reaches
//! STOP (and, on resume, all to leave STOP before any runs), so no VF DMAs
//! into a peer that is already stopped. A failure part way rolls every
//! device back to RUNNING.

use log::error;

use crate::error_chain::Chain;
use crate::xe_vf::XeVfDevice;
use vm_migration::{MigratableError, Pausable};

#[derive(Default)]
pub struct XeVfSet {
    devices: Vec<XeVfDevice>,
}

impl XeVfSet {
    pub fn new(devices: Vec<XeVfDevice>) -> Self {
        XeVfSet { devices }
    }

    pub fn devices(&self) -> &[XeVfDevice] {
        &self.devices
    }

    pub fn devices_mut(&mut self) -> &mut [XeVfDevice] {
        &mut self.devices
    }

    pub fn push(&mut self, device: XeVfDevice) {
        self.devices.push(device);
    }

    /// Best effort: every device back to RUNNING after a failed pause.
    fn roll_back(&mut self) {
        for d in &mut self.devices {
            if let Err(e) = d.resume() {
                error!("rolling back a failed pause: {}", Chain(&e));
            }
        }
    }
}

impl Pausable for XeVfSet {
    fn pause(&mut self) -> Result<(), MigratableError> {
        for i in 0..self.devices.len() {
            if let Err(e) = self.devices[i].quiesce() {
                self.roll_back();
                return Err(e);
            }
        }
        for i in 0..self.devices.len() {
            if let Err(e) = self.devices[i].pause() {
                self.roll_back();
                return Err(e);
            }
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        let mut first_error = None;
        for d in &mut self.devices {
            if let Err(e) = d.unquiesce() {
                first_error.get_or_insert(e);
            }
        }
        for d in &mut self.devices {
            if let Err(e) = d.resume() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
