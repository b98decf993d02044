// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `xe-vf-mig host`: what a user does on a real Xe host before a VF can
//! be migrated, in the spirit of `lspci`, `driverctl` and `mdevctl`.
//!
//! - [`list`]: PFs driven by `xe` and their VFs, with driver, IOMMU group,
//!   VFIO nodes, migration flags and LMEM quota;
//! - [`prepare`]: enable VFs and bind chosen ones to `xe-vfio-pci`,
//!   idempotent, with a dry run that prints every sysfs write;
//! - [`check`]: every precondition of snapshot and live migration, one
//!   line each with a fix;
//! - [`device_line`]: the `--device` argument for Cloud Hypervisor.
//!
//! All filesystem access goes through [`root::HostRoot`] (a fake tree in
//! tests); opening devices goes through a [`probe::Prober`].

pub mod check;
pub mod device;
pub mod device_line;
pub mod holders;
pub mod list;
pub mod lmem;
pub mod prepare;
pub mod probe;
pub mod root;

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use device::{DeviceFacts, DeviceRef};
use probe::{NoProber, Probe, Prober, VfioProber};
use root::HostRoot;

/// The kernel driver of an Xe PF that manages SR-IOV.
pub const PF_DRIVER: &str = "xe";
/// The VFIO variant driver with Xe VF migration (the PCI driver's name).
pub const VF_DRIVER: &str = "xe-vfio-pci";
/// Its module, as `/sys/module` and `modprobe` name it.
pub const VF_MODULE: &str = "xe_vfio_pci";

/// Errors of the host commands; refusals carry the whole reason.
#[derive(Debug, Error)]
pub enum HostError {
    #[error(
        "'{arg}' is not a PCI address (0000:03:00.1 or 03:00.1), an mdev uuid, or a /sys/bus/pci/devices/ or /sys/bus/mdev/devices/ path"
    )]
    BadDevice { arg: String },
    #[error("no device {name}: {path} does not exist")]
    NoDevice { name: String, path: String },
    #[error("refused: {0}")]
    Refused(String),
    #[error("writing {path} failed")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} did not appear after enabling the VFs")]
    Missing { path: PathBuf },
}

/// Whether a driver leaves the IOMMU group usable by VFIO: VFIO drivers,
/// `pci-stub` and PCIe port drivers claim no DMA of their own. This is a
/// name heuristic (the kernel's test is `driver_managed_dma`, which sysfs
/// does not show).
pub fn driver_is_vfio_safe(driver: Option<&str>) -> bool {
    match driver {
        None => true,
        Some(d) => d.contains("vfio") || d == "pci-stub" || d == "pcieport",
    }
}

/// The host as the commands see it: a filesystem and a way to open devices.
pub struct Host {
    pub root: HostRoot,
    prober: Box<dyn Prober>,
}

impl Host {
    pub fn new(root: HostRoot, prober: Box<dyn Prober>) -> Self {
        Host { root, prober }
    }

    /// The running system; devices are opened only if `probe`.
    pub fn system(probe: bool) -> Self {
        let prober: Box<dyn Prober> = if probe {
            Box::new(VfioProber)
        } else {
            Box::new(NoProber {
                reason: "not probed (--no-probe)".to_string(),
            })
        };
        Host::new(HostRoot::system(), prober)
    }

    /// A tree standing in for `/`; its device nodes are never opened.
    pub fn tree(dir: impl Into<PathBuf>) -> Self {
        let root = HostRoot::at(dir);
        let reason = format!(
            "not probed: {} is not the running system",
            root.dir().display()
        );
        Host::new(root, Box::new(NoProber { reason }))
    }

    /// sysfs facts of `dev`, and what opening it said. A device that is
    /// not bound to VFIO is not opened, nor one a process holds: opening
    /// would fail with EBUSY or reset a device a guest is using.
    pub fn facts(&self, dev: &DeviceRef) -> DeviceFacts {
        let mut facts = device::read_facts(&self.root, dev);
        facts.migration = if !facts.is_vfio() {
            Probe::NotProbed {
                reason: format!(
                    "not a VFIO device (driver: {})",
                    facts.driver.as_deref().unwrap_or("none")
                ),
            }
        } else if !facts.holders.is_empty() {
            Probe::NotProbed {
                reason: format!(
                    "in use, not opened so its user is not disturbed: {}",
                    holders::describe(&facts.holders)
                ),
            }
        } else {
            self.prober.probe(&facts)
        };
        facts
    }

    /// Parses a device argument against this host.
    pub fn device(&self, arg: &str) -> Result<DeviceRef, HostError> {
        DeviceRef::parse(&self.root, arg)
    }
}
