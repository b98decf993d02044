// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The two device ioctls migration needs, behind a trait so unit tests can
//! stand in for the kernel.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{vfio_region_info, VFIO_PCI_CONFIG_REGION_INDEX};
use vfio_ioctls::{VfioContainer, VfioDevice};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref};

use super::feature::{
    FeatureRequest, VFIO_DEVICE_FEATURE, VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_RESET,
};

/// The syscalls of a VFIO device fd used for migration.
pub(crate) trait FeatureIoctl: Send + Sync {
    /// `VFIO_DEVICE_FEATURE` with `req`; the kernel may write its reply into it.
    fn device_feature(&self, req: &mut FeatureRequest) -> io::Result<()>;
    /// `VFIO_DEVICE_RESET`.
    fn reset(&self) -> io::Result<()>;
    /// The device fd itself, for region reads; `None` where there is none
    /// (a unit test's stand-in).
    fn device_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// Where the device fd comes from; owns whatever keeps it usable.
pub(crate) enum DeviceFd {
    /// Opened through the legacy group/container. `device` holds its own
    /// reference to the container; the extra one keeps the ownership plain
    /// to see. `device` closes its fd before releasing the group.
    Group {
        device: VfioDevice,
        _container: Arc<VfioContainer>,
    },
    /// A vfio cdev fd bound to an iommufd by the VMM (Cloud Hypervisor's
    /// `fd=`); we only issue feature ioctls on it.
    Cdev(OwnedFd),
}

impl DeviceFd {
    fn raw(&self) -> i32 {
        match self {
            DeviceFd::Group { device, .. } => device.as_raw_fd(),
            DeviceFd::Cdev(fd) => fd.as_raw_fd(),
        }
    }
}

impl AsRawFd for DeviceFd {
    fn as_raw_fd(&self) -> i32 {
        self.raw()
    }
}

fn check(ret: i32) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl FeatureIoctl for DeviceFd {
    fn device_feature(&self, req: &mut FeatureRequest) -> io::Result<()> {
        let arg = req.as_mut_ptr();
        // SAFETY: the fd is open and owned by `self` for the whole call.
        // `arg` points to `argsz` initialized bytes that `req` owns and we
        // borrow exclusively; the kernel reads and writes at most `argsz`
        // bytes there. A pointer inside the payload (DMA logging) refers to
        // `req`'s side buffer, sized as the payload says (FeatureRequest's
        // invariant), which outlives the call.
        check(unsafe { ioctl_with_mut_ptr(self, VFIO_DEVICE_FEATURE, arg) })
    }

    fn reset(&self) -> io::Result<()> {
        // SAFETY: the fd is open and owned by `self`; VFIO_DEVICE_RESET takes
        // no argument and touches no memory of ours.
        check(unsafe { ioctl(self, VFIO_DEVICE_RESET) })
    }

    fn device_fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the fd is open for as long as `self` lives, which the
        // borrow's lifetime ties it to.
        Some(unsafe { BorrowedFd::borrow_raw(self.raw()) })
    }
}

/// `VFIO_DEVICE_GET_REGION_INFO` for region `index` of `device`: where
/// the region starts in the fd's offsets, its size and flags.
pub(crate) fn region_info(device: BorrowedFd<'_>, index: u32) -> io::Result<vfio_region_info> {
    let mut info = vfio_region_info {
        argsz: size_of::<vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: the fd is open for the whole call; the kernel writes at most
    // `argsz` bytes into `info`, which we own and borrow exclusively.
    check(unsafe { ioctl_with_mut_ref(&device, VFIO_DEVICE_GET_REGION_INFO, &mut info) })?;
    Ok(info)
}

/// Reads `buf.len()` bytes of the device's PCI config space from its start:
/// `VFIO_DEVICE_GET_REGION_INFO` for the config region, then `pread` at
/// the offset it names. For a device fd the VMM opened, whose sysfs entry
/// (an mdev's) may have no ids.
pub(crate) fn read_config_head(device: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    let info = region_info(device, VFIO_PCI_CONFIG_REGION_INDEX)?;
    if info.size < buf.len() as u64 {
        return Err(io::Error::other(format!(
            "config region of {} bytes, need {}",
            info.size,
            buf.len()
        )));
    }
    let offset = libc::off_t::try_from(info.offset)
        .map_err(|_| io::Error::other("config region offset out of range"))?;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes and pread does
    // not keep the pointer.
    let n = unsafe {
        libc::pread(
            device.as_fd().as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(io::Error::other(format!(
            "config space read returned {n} of {} bytes",
            buf.len()
        )));
    }
    Ok(())
}
