// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What a device says about migration when it is opened: the flags of
//! `VFIO_DEVICE_FEATURE_MIGRATION`, whether it logs its DMA, its STOP_COPY
//! size, and whether the IOMMU behind it tracks dirty pages.
//!
//! Nothing here is guessed from sysfs: a device that cannot be opened is
//! reported as such, with the reason.

use std::error::Error;
use std::path::Path;

use serde::Serialize;

use super::device::{DeviceFacts, DEV_IOMMU};
use crate::device::DeviceIdentity;
use crate::uapi::MigrationFlags;
use crate::vfio::cdev::{BoundCdev, IOMMU_HW_CAP_DIRTY_TRACKING};
use crate::vfio::VfioMigrationDevice;
use crate::MigrationDevice;

/// Whether a capability is there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Availability {
    Yes,
    No {
        reason: String,
    },
    /// Could not be asked; counts as not available.
    Unknown {
        reason: String,
    },
}

impl Availability {
    pub fn is_yes(&self) -> bool {
        matches!(self, Availability::Yes)
    }
}

/// How the device was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpenedVia {
    /// `/dev/vfio/<group>` and the legacy container.
    Group,
    /// `/dev/vfio/devices/vfioN` bound to an iommufd.
    Cdev,
}

/// The answers of an opened device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MigrationProbe {
    pub via: OpenedVia,
    /// Raw `VFIO_DEVICE_FEATURE_MIGRATION` flags; `None`: the device has
    /// no migration support at all.
    pub migration_flags: Option<u64>,
    /// The same, by name (`STOP_COPY|P2P`).
    pub migration_flags_names: Option<String>,
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` probe.
    pub dma_logging: bool,
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: the estimated size of a
    /// STOP_COPY now.
    pub stop_copy_size: Option<u64>,
    /// `IOMMU_HW_CAP_DIRTY_TRACKING` of the IOMMU behind the device.
    pub iommu_dirty_tracking: Availability,
}

impl MigrationProbe {
    pub fn new(
        via: OpenedVia,
        flags: Option<MigrationFlags>,
        dma_logging: bool,
        stop_copy_size: Option<u64>,
        iommu_dirty_tracking: Availability,
    ) -> Self {
        MigrationProbe {
            via,
            migration_flags: flags.map(MigrationFlags::bits),
            migration_flags_names: flags.map(|f| f.to_string()),
            dma_logging,
            stop_copy_size,
            iommu_dirty_tracking,
        }
    }

    pub fn flags(&self) -> Option<MigrationFlags> {
        self.migration_flags.map(MigrationFlags::from_bits)
    }
}

/// Outcome of asking one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Probe {
    Probed(MigrationProbe),
    /// Not opened on purpose.
    NotProbed {
        reason: String,
    },
    /// Opening or asking failed.
    Failed {
        reason: String,
    },
}

/// Opens devices and asks them; a fake in tests. Only called for a VFIO
/// device that no process holds (see [`super::Host::facts`]).
pub trait Prober {
    fn probe(&self, facts: &DeviceFacts) -> Probe;
}

/// Never opens anything (`--no-probe`, or a tree that is not the host).
#[derive(Debug)]
pub struct NoProber {
    pub reason: String,
}

impl Prober for NoProber {
    fn probe(&self, _: &DeviceFacts) -> Probe {
        Probe::NotProbed {
            reason: self.reason.clone(),
        }
    }
}

/// Opens the real device through VFIO: its group if it has a node, then
/// its cdev bound to a fresh iommufd for the IOMMU's capabilities (and for
/// the flags if the group could not be used). Only for the running system:
/// vfio-ioctls opens `/dev/vfio/vfio` by absolute path.
#[derive(Debug, Default)]
pub struct VfioProber;

/// `error: cause: cause`, the whole chain in one line.
fn chain(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

type Answers = (Option<MigrationFlags>, bool, Option<u64>);

fn ask(device: &VfioMigrationDevice) -> crate::device::Result<Answers> {
    let flags = device.query_migration()?;
    let dma_logging = device.supports_dma_logging()?;
    let size = match flags {
        Some(_) => Some(device.stop_copy_size()?),
        None => None,
    };
    Ok((flags, dma_logging, size))
}

impl Prober for VfioProber {
    fn probe(&self, facts: &DeviceFacts) -> Probe {
        let mut errors = Vec::new();
        let mut answers = None;
        if facts.group_node.is_some() {
            match VfioMigrationDevice::open(&facts.sysfs_path).and_then(|d| ask(&d)) {
                Ok(a) => answers = Some((OpenedVia::Group, a)),
                Err(e) => errors.push(format!("group: {}", chain(&e))),
            }
        }
        let iommu = match &facts.vfio_cdev {
            None => Availability::Unknown {
                reason: "the device has no VFIO cdev (kernel without CONFIG_VFIO_DEVICE_CDEV)"
                    .to_string(),
            },
            Some(_) if !Path::new(DEV_IOMMU).exists() => Availability::Unknown {
                reason: format!("{DEV_IOMMU} is missing (iommufd not loaded)"),
            },
            Some(cdev) => match BoundCdev::open(cdev, Path::new(DEV_IOMMU)) {
                Err(e) => {
                    errors.push(format!("cdev: {}", chain(&e)));
                    Availability::Unknown { reason: chain(&e) }
                }
                Ok(bound) => {
                    let iommu = match bound.iommu_capabilities() {
                        Ok(caps) if caps & IOMMU_HW_CAP_DIRTY_TRACKING != 0 => Availability::Yes,
                        Ok(caps) => Availability::No {
                            reason: format!(
                                "the IOMMU reports no dirty tracking (capabilities {caps:#x})"
                            ),
                        },
                        Err(e) => Availability::Unknown { reason: chain(&e) },
                    };
                    if answers.is_none() {
                        let identity = VfioMigrationDevice::sysfs_identity(&facts.sysfs_path)
                            .unwrap_or(DeviceIdentity {
                                vendor_id: 0,
                                device_id: 0,
                                revision_id: 0,
                                vram_size: None,
                            });
                        let (device_fd, iommufd) = bound.into_fds();
                        let device = VfioMigrationDevice::from_device_fd(device_fd, identity);
                        match ask(&device) {
                            Ok(a) => answers = Some((OpenedVia::Cdev, a)),
                            Err(e) => errors.push(format!("cdev: {}", chain(&e))),
                        }
                        // The device goes before the iommufd it is bound to.
                        drop(device);
                        drop(iommufd);
                    }
                    iommu
                }
            },
        };
        match answers {
            Some((via, (flags, dma_logging, size))) => {
                Probe::Probed(MigrationProbe::new(via, flags, dma_logging, size, iommu))
            }
            None => Probe::Failed {
                reason: format!("cannot open the device: {}", errors.join("; ")),
            },
        }
    }
}
