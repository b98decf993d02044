// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Opens the device a `--device` string names: a real VF through VFIO,
//! or an emulated Xe VF. Every door (CLI, VMM glue, test host) opens
//! devices here, so they all accept the same specs.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::device::{DeviceError, DeviceIdentity, MigrationDevice};
use crate::device_config::DeviceConfig;
use crate::emulated::EmulatedXeVf;
use crate::vfio::VfioMigrationDevice;

/// An opened device, keeping the concrete type for what only one backend
/// offers (digests and fault injection of the emulated VF, DMA logging of
/// the real one).
#[derive(Clone)]
pub enum Backend {
    Vfio(Arc<VfioMigrationDevice>),
    Emulated(Arc<EmulatedXeVf>),
}

impl Backend {
    /// Opens the device `config` describes.
    pub fn open(config: &DeviceConfig) -> Result<Self, DeviceError> {
        if let Some(emulated) = &config.emulated {
            return Ok(Backend::Emulated(EmulatedXeVf::new(emulated.clone())?));
        }
        if let Some(fd) = config.fd {
            let identity = config
                .path
                .as_deref()
                .and_then(VfioMigrationDevice::sysfs_identity)
                .unwrap_or(DeviceIdentity {
                    vendor_id: 0,
                    device_id: 0,
                    revision_id: 0,
                    vram_size: None,
                });
            // Fail early on a closed fd rather than on the first ioctl.
            // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(DeviceError::NotFound {
                    path: format!("fd={fd}"),
                    reason: std::io::Error::last_os_error().to_string(),
                });
            }
            // SAFETY: the VMM hands this fd to the device exclusively
            // (Cloud Hypervisor's `fd=` contract); it is open (checked
            // above) and from now on owned and closed by the device.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            return Ok(Backend::Vfio(Arc::new(
                VfioMigrationDevice::from_device_fd(owned, identity),
            )));
        }
        match &config.path {
            Some(path) => Ok(Backend::Vfio(Arc::new(VfioMigrationDevice::open(path)?))),
            None => Err(DeviceError::Other(
                "device spec names neither path=, fd= nor emulated=on".to_string(),
            )),
        }
    }

    /// The device behind the uAPI trait.
    pub fn device(&self) -> Arc<dyn MigrationDevice> {
        match self {
            Backend::Vfio(d) => d.clone(),
            Backend::Emulated(d) => d.clone(),
        }
    }

    pub fn emulated(&self) -> Option<&Arc<EmulatedXeVf>> {
        match self {
            Backend::Emulated(d) => Some(d),
            Backend::Vfio(_) => None,
        }
    }
}
