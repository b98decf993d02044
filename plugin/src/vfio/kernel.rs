// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The two device ioctls migration needs, behind a trait so unit tests can
//! stand in for the kernel.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ptr};

use super::feature::{FeatureRequest, VFIO_DEVICE_FEATURE, VFIO_DEVICE_RESET};

/// The syscalls of a VFIO device fd used for migration.
pub(crate) trait FeatureIoctl: Send + Sync {
    /// `VFIO_DEVICE_FEATURE` with `req`; the kernel may write its reply into it.
    fn device_feature(&self, req: &mut FeatureRequest) -> io::Result<()>;
    /// `VFIO_DEVICE_RESET`.
    fn reset(&self) -> io::Result<()>;
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
}
