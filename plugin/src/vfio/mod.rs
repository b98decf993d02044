// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The real backend: a VFIO device driven through the migration uAPI v2.
//!
//! vfio-ioctls opens the device (legacy group and container) and keeps it
//! alive, but we issue `VFIO_DEVICE_FEATURE` ourselves: vfio-ioctls keeps the
//! migration data fd inside its `VfioDevice` and buffers the stream, while
//! the engine must own the fd as a [`File`] and stream it.
//!
//! Layout: `feature` builds and parses the ioctl buffers, `kernel` holds
//! the two syscalls behind a trait (faked in unit tests), `sysfs` checks the
//! device and reads its identity, `cdev` binds a VFIO cdev to an iommufd to
//! ask the IOMMU about dirty tracking.

pub mod cdev;
mod feature;
mod kernel;
pub mod lmem_bar;
mod placement;
pub(crate) mod sysfs;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use log::{debug, info, warn};
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use crate::device::{DeviceError, DeviceIdentity, MigrationDevice, Result};
use crate::uapi::{DeviceState, MigrationFlags, FEATURE_DMA_LOGGING_START, FEATURE_SET};

use feature::FeatureRequest;
pub use feature::{
    DmaLoggingError, MAX_DIRTY_BITMAP_BYTES, MAX_DMA_LOGGING_RANGES, MIN_DMA_LOGGING_PAGE_SIZE,
};
use kernel::{DeviceFd, FeatureIoctl};
pub use placement::Placement;

/// A VFIO device that supports migration v2, seen through
/// [`MigrationDevice`].
///
/// Each call is one ioctl (two for `set_state`, which reads the current
/// state first to report the failed arc), so the type is `Sync` and
/// needs no lock: the kernel serializes state changes per device.
pub struct VfioMigrationDevice {
    kernel: Box<dyn FeatureIoctl>,
    identity: DeviceIdentity,
    name: String,
}

impl std::fmt::Debug for VfioMigrationDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioMigrationDevice")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish()
    }
}

fn vfio_error(path: &Path, what: &str, err: vfio_ioctls::VfioError) -> DeviceError {
    let mut msg = format!("{}: {what}: {err}", path.display());
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    DeviceError::Other(msg)
}

impl VfioMigrationDevice {
    /// Opens the device at `sysfs_path` through its VFIO group: a PCI
    /// function (`/sys/bus/pci/devices/0000:03:00.1`) bound to a VFIO
    /// driver, or an mdev (`/sys/bus/mdev/devices/<uuid>`).
    ///
    /// The group is derived from the `iommu_group` link and the device is
    /// asked for by its directory name (PCI address or mdev uuid). A missing
    /// device, group or `/dev/vfio` node is a [`DeviceError::NotFound`]
    /// naming what is missing.
    ///
    /// Identity: `vendor`/`device`/`revision` from sysfs; an mdev has none,
    /// so they are read from the device's PCI config space through VFIO
    /// (the parent's sysfs ids would name the parent, not the mdev), and
    /// are 0 if the device has no PCI config region. `vram_size` is `None`:
    /// VFIO does not report a VF's LMEM quota.
    ///
    /// The device must stay in its IOMMU group while open: vfio-ioctls
    /// re-reads the `iommu_group` link when it closes the device.
    pub fn open(sysfs_path: &Path) -> Result<Self> {
        Self::open_with_dev_vfio(sysfs_path, Path::new(sysfs::DEV_VFIO))
    }

    fn open_with_dev_vfio(sysfs_path: &Path, dev_vfio: &Path) -> Result<Self> {
        let found = sysfs::check_group_device(sysfs_path, dev_vfio)?;
        let container = Arc::new(
            VfioContainer::new(None)
                .map_err(|e| vfio_error(sysfs_path, "opening the VFIO container", e))?,
        );
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(sysfs_path, ops).map_err(|e| {
            vfio_error(
                sysfs_path,
                &format!("opening {} in VFIO group {}", found.name, found.group),
                e,
            )
        })?;
        let ids = sysfs::read_pci_ids(sysfs_path).or_else(|| read_config_ids(&device));
        let identity = match ids {
            Some(ids) => DeviceIdentity {
                vendor_id: ids.vendor_id,
                device_id: ids.device_id,
                revision_id: ids.revision_id,
                vram_size: None,
            },
            None => {
                warn!(
                    "{}: no PCI ids in sysfs or config space, using 0",
                    found.name
                );
                DeviceIdentity {
                    vendor_id: 0,
                    device_id: 0,
                    revision_id: 0,
                    vram_size: None,
                }
            }
        };
        info!(
            "opened VFIO device {} ({}, group {}) as {identity}",
            found.name,
            sysfs::display_path(sysfs_path).display(),
            found.group
        );
        Ok(VfioMigrationDevice {
            kernel: Box::new(DeviceFd::Group {
                device,
                _container: container,
            }),
            identity,
            name: found.name,
        })
    }

    /// Wraps a VFIO device fd the VMM already opened and bound (Cloud
    /// Hypervisor's `fd=`: a vfio cdev bound to an iommufd). The fd is owned
    /// and closed on drop; `identity` comes from the caller because an fd
    /// has no sysfs directory.
    pub fn from_device_fd(fd: OwnedFd, identity: DeviceIdentity) -> Self {
        let name = format!("fd{}", fd.as_raw_fd());
        VfioMigrationDevice {
            kernel: Box::new(DeviceFd::Cdev(fd)),
            identity,
            name,
        }
    }

    /// Wraps a duplicate of the device fd a VMM opened for its own use of
    /// the device (Cloud Hypervisor's `VfioPciDevice`), group- or
    /// cdev-backed alike. The identity comes from `sysfs_dir` where it
    /// has PCI ids (a VF), else from the device's config space (an mdev).
    pub fn from_vmm_device_fd(fd: OwnedFd, sysfs_dir: Option<&Path>) -> Result<Self> {
        let ids = match sysfs_dir.and_then(sysfs::read_pci_ids) {
            Some(ids) => ids,
            None => {
                let mut head = [0u8; 12];
                kernel::read_config_head(fd.as_fd(), &mut head)
                    .map_err(Self::ioctl_error("reading PCI config space"))?;
                sysfs::pci_ids_from_config(&head).ok_or_else(|| {
                    DeviceError::Other("PCI config space holds no device ids".to_string())
                })?
            }
        };
        let identity = DeviceIdentity {
            vendor_id: ids.vendor_id,
            device_id: ids.device_id,
            revision_id: ids.revision_id,
            vram_size: None,
        };
        let mut device = Self::from_device_fd(fd, identity);
        if let Some(name) = sysfs_dir.and_then(|d| d.file_name()) {
            device.name = name.to_string_lossy().into_owned();
        }
        info!("using VFIO device {} as {identity}", device.name);
        Ok(device)
    }

    /// The VF's LMEM BAR for VRAM pre-copy, if VFIO lets the host read
    /// one ([`lmem_bar`]).
    pub fn lmem_bar(&self) -> Result<Option<lmem_bar::LmemBar>> {
        let Some(fd) = self.kernel.device_fd() else {
            return Ok(None);
        };
        lmem_bar::LmemBar::open(fd).map_err(Self::ioctl_error("reading the LMEM BAR's region info"))
    }

    /// Identity from a PCI sysfs directory, for an fd handed over by the
    /// VMM together with its `path=`; `None` if the ids cannot be read.
    pub fn sysfs_identity(sysfs_path: &Path) -> Option<DeviceIdentity> {
        sysfs::read_pci_ids(sysfs_path).map(|ids| DeviceIdentity {
            vendor_id: ids.vendor_id,
            device_id: ids.device_id,
            revision_id: ids.revision_id,
            vram_size: None,
        })
    }

    #[cfg(test)]
    fn with_kernel(kernel: Box<dyn FeatureIoctl>, identity: DeviceIdentity) -> Self {
        VfioMigrationDevice {
            kernel,
            identity,
            name: "fake".to_string(),
        }
    }

    /// Name used in logs: the PCI address, mdev uuid or `fd<N>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn feature(&self, req: &mut FeatureRequest) -> io::Result<()> {
        self.kernel.device_feature(req)
    }

    fn ioctl_error(op: &'static str) -> impl FnOnce(io::Error) -> DeviceError {
        move |source| DeviceError::Ioctl { op, source }
    }

    /// The flags `VFIO_DEVICE_FEATURE_MIGRATION` reports, as they are;
    /// `None` when the device has no migration support at all (`ENOTTY`
    /// from a driver without migration ops, `EINVAL` from a kernel that
    /// does not know the feature). [`MigrationDevice::migration_flags`]
    /// is this plus the STOP_COPY requirement.
    pub fn query_migration(&self) -> Result<Option<MigrationFlags>> {
        let mut req = FeatureRequest::get_migration();
        match self.feature(&mut req) {
            Ok(()) => Ok(Some(req.migration_flags())),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {
                debug!("{}: GET MIGRATION: {e}", self.name);
                Ok(None)
            }
            Err(e) => Err(Self::ioctl_error("VFIO_DEVICE_FEATURE_MIGRATION GET")(e)),
        }
    }

    /// Whether the device logs its own DMA (`DMA_LOGGING_START` probe).
    /// Xe VFs do not; the glue then treats all guest memory as dirty.
    pub fn supports_dma_logging(&self) -> Result<bool> {
        let mut req = FeatureRequest::probe(FEATURE_DMA_LOGGING_START, FEATURE_SET);
        match self.feature(&mut req) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {
                Ok(false)
            }
            Err(e) => Err(Self::ioctl_error(
                "VFIO_DEVICE_FEATURE_DMA_LOGGING_START PROBE",
            )(e)),
        }
    }

    /// Starts device dirty tracking over `ranges` (`(iova, length)`, page
    /// aligned, at most [`MAX_DMA_LOGGING_RANGES`]). Returns the page size
    /// the driver chose, which may differ from the one asked for.
    pub fn dma_logging_start(&self, page_size: u64, ranges: &[(u64, u64)]) -> Result<u64> {
        let mut req = FeatureRequest::dma_logging_start(page_size, ranges)
            .map_err(|e| DeviceError::Other(format!("DMA logging start: {e}")))?;
        self.feature(&mut req)
            .map_err(Self::ioctl_error("VFIO_DEVICE_FEATURE_DMA_LOGGING_START"))?;
        let chosen = req.dma_logging_page_size();
        debug!(
            "{}: DMA logging started over {} ranges, page size {chosen:#x}",
            self.name,
            ranges.len()
        );
        Ok(chosen)
    }

    /// Stops device dirty tracking.
    pub fn dma_logging_stop(&self) -> Result<()> {
        let mut req = FeatureRequest::dma_logging_stop();
        self.feature(&mut req)
            .map_err(Self::ioctl_error("VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP"))
    }

    /// Reads and clears the dirty bitmap of `[iova, iova + length)`: bit `n`
    /// (word `n / 64`, bit `n % 64`) set = page `n` was written. The bitmap
    /// is bounded by [`MAX_DIRTY_BITMAP_BYTES`]; query larger ranges in
    /// pieces.
    pub fn dma_logging_report(&self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>> {
        let mut req = FeatureRequest::dma_logging_report(iova, length, page_size)
            .map_err(|e| DeviceError::Other(format!("DMA logging report: {e}")))?;
        self.feature(&mut req)
            .map_err(Self::ioctl_error("VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT"))?;
        Ok(req.into_bitmap())
    }
}

/// Reads the PCI ids from the device's config region (mdev devices have
/// no sysfs ids). vfio-ioctls logs and leaves the buffer untouched on a
/// failed read, so all-ones means "unknown".
fn read_config_ids(device: &VfioDevice) -> Option<sysfs::PciIds> {
    if device.get_region_size(VFIO_PCI_CONFIG_REGION_INDEX) < 64 {
        return None;
    }
    let mut config = [0xffu8; 12];
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut config, 0);
    sysfs::pci_ids_from_config(&config)
}

impl MigrationDevice for VfioMigrationDevice {
    fn identity(&self) -> DeviceIdentity {
        self.identity
    }

    /// `ENOTTY` (no migration ops) or `EINVAL` (feature unknown to an old
    /// kernel), and a device without `STOP_COPY` (which v2 makes
    /// mandatory), are [`DeviceError::NotMigratable`].
    fn migration_flags(&self) -> Result<MigrationFlags> {
        let flags = self.query_migration()?.ok_or(DeviceError::NotMigratable)?;
        if !flags.contains(MigrationFlags::STOP_COPY) {
            warn!("{}: migration flags {flags} lack STOP_COPY", self.name);
            return Err(DeviceError::NotMigratable);
        }
        Ok(flags)
    }

    fn state(&self) -> Result<DeviceState> {
        let mut req = FeatureRequest::get_mig_state();
        self.feature(&mut req).map_err(Self::ioctl_error(
            "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE GET",
        ))?;
        let raw = req.device_state();
        DeviceState::from_raw(raw).ok_or(DeviceError::UnknownState(raw))
    }

    fn set_state(&self, new_state: DeviceState) -> Result<Option<File>> {
        let from = self.state()?;
        let mut req = FeatureRequest::set_mig_state(new_state);
        if let Err(source) = self.feature(&mut req) {
            match self.state() {
                Ok(now) => warn!(
                    "{}: arc {from} -> {new_state} failed ({source}); device now {now}",
                    self.name
                ),
                Err(e) => warn!(
                    "{}: arc {from} -> {new_state} failed ({source}); state unreadable: {e}",
                    self.name
                ),
            }
            return Err(DeviceError::Arc {
                from,
                to: new_state,
                source,
            });
        }
        let fd = req.data_fd();
        debug!("{}: arc {from} -> {new_state}, data fd {fd}", self.name);
        if fd < 0 {
            return Ok(None);
        }
        // SAFETY: on success the kernel installed `fd` in our table for this
        // call and handed it over (vfio's `data_fd` contract); nothing else
        // refers to it, so the OwnedFd is its only owner and closes it once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Some(File::from(owned)))
    }

    fn stop_copy_size(&self) -> Result<u64> {
        let mut req = FeatureRequest::get_mig_data_size();
        self.feature(&mut req)
            .map_err(Self::ioctl_error("VFIO_DEVICE_FEATURE_MIG_DATA_SIZE GET"))?;
        Ok(req.stop_copy_length())
    }

    fn reset(&self) -> Result<()> {
        info!("{}: VFIO_DEVICE_RESET", self.name);
        self.kernel
            .reset()
            .map_err(Self::ioctl_error("VFIO_DEVICE_RESET"))
    }
}
