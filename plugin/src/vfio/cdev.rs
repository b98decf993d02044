// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VFIO device cdev (`/dev/vfio/devices/vfioN`) bound to a fresh iommufd,
//! to ask the IOMMU behind the device what it can do.
//!
//! This is how a VMM uses a device in the cdev model (Cloud Hypervisor's
//! `fd=`): open the cdev, `VFIO_DEVICE_BIND_IOMMUFD` it to an iommufd, and
//! only then may it issue device ioctls. `IOMMU_GET_HW_INFO` on the bound
//! device reports `IOMMU_HW_CAP_DIRTY_TRACKING`: whether the IOMMU can
//! record the pages the device writes, the dirty log an Xe VF cannot keep
//! itself (`include/uapi/linux/iommufd.h`, `include/uapi/linux/vfio.h`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use iommufd_bindings::iommufd as iommu;
use libc::c_ulong;
use thiserror::Error;
use vfio_bindings::bindings::vfio as b;

/// `_IO(VFIO_TYPE, VFIO_BASE + 18)`.
pub(crate) const VFIO_DEVICE_BIND_IOMMUFD: c_ulong =
    ((b::VFIO_TYPE as c_ulong) << 8) | (b::VFIO_BASE as c_ulong + 18);
/// `_IO(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO)`.
pub(crate) const IOMMU_GET_HW_INFO: c_ulong =
    ((iommu::IOMMUFD_TYPE as c_ulong) << 8) | iommu::IOMMUFD_CMD_GET_HW_INFO as c_ulong;
/// `IOMMU_HW_CAP_DIRTY_TRACKING` in `iommu_hw_info::out_capabilities`.
pub const IOMMU_HW_CAP_DIRTY_TRACKING: u64 = 1 << 0;

/// `struct iommu_hw_info` as Linux 6.7 extended it with `out_capabilities`.
/// iommufd-bindings 0.1 (the version Cloud Hypervisor pins, so that one
/// copy serves both) stops before that field; the ioctl is extensible by
/// `size`, so a kernel fills the field for a caller that passes this size.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct IommuHwInfo {
    pub(crate) base: iommu::iommu_hw_info,
    pub(crate) out_capabilities: u64,
}

/// A device cdev bound to its own iommufd. Dropping it closes both, which
/// unbinds the device.
#[derive(Debug)]
pub struct BoundCdev {
    device: OwnedFd,
    iommufd: OwnedFd,
    dev_id: u32,
}

/// What failed while binding or querying a cdev.
#[derive(Debug, Error)]
pub enum CdevError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl CdevError {
    /// The errno behind the failure.
    pub fn errno(&self) -> Option<i32> {
        match self {
            CdevError::Open { source, .. } | CdevError::Ioctl { source, .. } => {
                source.raw_os_error()
            }
        }
    }
}

fn open_rw(path: &Path) -> Result<File, CdevError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| CdevError::Open {
            path: path.display().to_string(),
            source,
        })
}

fn ioctl_error(op: &'static str) -> CdevError {
    CdevError::Ioctl {
        op,
        source: io::Error::last_os_error(),
    }
}

/// Binds the VFIO device cdev `device` to `iommufd`; returns the device's
/// iommufd object id. The binding belongs to the open file, so every
/// duplicate of `device` finds the device bound (and a VMM that receives
/// an fd, as Cloud Hypervisor does for a migrated device, must not bind it
/// again).
pub fn bind_to_iommufd(device: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> Result<u32, CdevError> {
    let mut bind = b::vfio_device_bind_iommufd {
        argsz: std::mem::size_of::<b::vfio_device_bind_iommufd>() as u32,
        iommufd: iommufd.as_raw_fd(),
        ..Default::default()
    };
    // SAFETY: `device` is an open fd, borrowed for the call; `bind` is a
    // complete, initialized vfio_device_bind_iommufd on our stack whose
    // `argsz` is its size; the kernel reads it and writes `out_devid`
    // inside it, nothing else. `token_uuid_ptr` is 0 and no flag asks the
    // kernel to follow it.
    let ret = unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_BIND_IOMMUFD, &raw mut bind) };
    if ret < 0 {
        return Err(ioctl_error("VFIO_DEVICE_BIND_IOMMUFD"));
    }
    Ok(bind.out_devid)
}

impl BoundCdev {
    /// Opens `cdev` and `dev_iommu` (normally `/dev/iommu`) read-write and
    /// binds the device to that iommufd.
    pub fn open(cdev: &Path, dev_iommu: &Path) -> Result<Self, CdevError> {
        let iommufd = OwnedFd::from(open_rw(dev_iommu)?);
        let device = OwnedFd::from(open_rw(cdev)?);
        let dev_id = bind_to_iommufd(device.as_fd(), iommufd.as_fd())?;
        Ok(BoundCdev {
            device,
            iommufd,
            dev_id,
        })
    }

    /// The iommufd object id of the bound device.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// `out_capabilities` of `IOMMU_GET_HW_INFO` for the bound device.
    pub fn iommu_capabilities(&self) -> Result<u64, CdevError> {
        let mut info = IommuHwInfo {
            base: iommu::iommu_hw_info {
                size: std::mem::size_of::<IommuHwInfo>() as u32,
                dev_id: self.dev_id,
                ..Default::default()
            },
            out_capabilities: 0,
        };
        // SAFETY: `iommufd` is open and ours; `info` is a complete,
        // zero-initialized iommu_hw_info (with out_capabilities) on our
        // stack with `size` set to its size. `data_len` is 0 so the
        // kernel writes no user buffer (`data_uptr` is null); it only
        // fills fields of `info`.
        let ret =
            unsafe { libc::ioctl(self.iommufd.as_raw_fd(), IOMMU_GET_HW_INFO, &raw mut info) };
        if ret < 0 {
            return Err(ioctl_error("IOMMU_GET_HW_INFO"));
        }
        Ok(info.out_capabilities)
    }

    /// Splits into the device fd (for [`super::VfioMigrationDevice::from_device_fd`])
    /// and the iommufd, which must stay open while the device is used.
    pub fn into_fds(self) -> (OwnedFd, OwnedFd) {
        (self.device, self.iommufd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn request_numbers_are_the_kernels() {
        // _IO(';', 100 + 18) and _IO(';', 0x8a): no direction, no size.
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 0x3b76);
        assert_eq!(IOMMU_GET_HW_INFO, 0x3b8a);
        assert_eq!(IOMMU_HW_CAP_DIRTY_TRACKING, 1);
    }

    #[test]
    fn argument_layouts_are_the_kernels() {
        // struct vfio_device_bind_iommufd: argsz, flags, iommufd, out_devid
        // (and token_uuid_ptr on kernels that know it; older ones read 16).
        assert_eq!(offset_of!(b::vfio_device_bind_iommufd, iommufd), 8);
        assert_eq!(offset_of!(b::vfio_device_bind_iommufd, out_devid), 12);
        assert!(size_of::<b::vfio_device_bind_iommufd>() >= 16);
        // struct iommu_hw_info: the capabilities word is at 32 on every
        // kernel that has the ioctl.
        assert_eq!(offset_of!(iommu::iommu_hw_info, dev_id), 8);
        assert_eq!(offset_of!(IommuHwInfo, out_capabilities), 32);
        assert_eq!(size_of::<IommuHwInfo>(), 40);
    }

    #[test]
    fn a_file_that_is_not_a_cdev_is_refused_with_the_ioctl_named() {
        let dir = tempfile::tempdir().unwrap();
        let fake_cdev = dir.path().join("vfio0");
        let fake_iommu = dir.path().join("iommu");
        std::fs::write(&fake_cdev, b"").unwrap();
        std::fs::write(&fake_iommu, b"").unwrap();
        let err = BoundCdev::open(&fake_cdev, &fake_iommu).unwrap_err();
        assert!(
            matches!(
                err,
                CdevError::Ioctl {
                    op: "VFIO_DEVICE_BIND_IOMMUFD",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.errno(), Some(libc::ENOTTY));
        let missing = BoundCdev::open(&dir.path().join("absent"), &fake_iommu).unwrap_err();
        assert_eq!(missing.errno(), Some(libc::ENOENT));
        assert!(missing.to_string().contains("absent"), "{missing}");
    }
}
