// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! IOMMU dirty tracking of the VF's hardware page table (iommufd).
//!
//! When the VMM attaches the VF to an iommufd HWPT allocated with
//! `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`, the IOMMU itself records which IOVA
//! pages the device wrote: the dirty log an Xe VF cannot keep. The VMM
//! owns the iommufd and the HWPT; it hands us the fd and the HWPT id
//! (`IOMMU_HWPT_SET_DIRTY_TRACKING` / `IOMMU_HWPT_GET_DIRTY_BITMAP`,
//! `include/uapi/linux/iommufd.h`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use iommufd_bindings::iommufd::IOMMUFD_TYPE;

/// `_IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING)`.
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: u64 = io_nr(IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING);
/// `_IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP)`.
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: u64 = io_nr(IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP);
/// A bitmap covers at most this many bytes (512 GiB of IOVA at 4 KiB).
pub const MAX_BITMAP_BYTES: u64 = 16 << 20;

const fn io_nr(cmd: u32) -> u64 {
    ((IOMMUFD_TYPE as u64) << 8) | cmd as u64
}

// HWPT dirty tracking came with Linux 6.7, after the uAPI that
// iommufd-bindings 0.1 (the version Cloud Hypervisor pins, so one copy
// serves both) was generated from; these restate
// `include/uapi/linux/iommufd.h`.
const IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING: u32 = 0x8b;
const IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP: u32 = 0x8c;
const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 = 1;

/// `struct iommu_hwpt_set_dirty_tracking`.
#[repr(C)]
#[derive(Debug, Default)]
struct HwptSetDirtyTracking {
    size: u32,
    flags: u32,
    hwpt_id: u32,
    reserved: u32,
}

/// `struct iommu_hwpt_get_dirty_bitmap`.
#[repr(C)]
#[derive(Debug, Default)]
struct HwptGetDirtyBitmap {
    size: u32,
    hwpt_id: u32,
    flags: u32,
    reserved: u32,
    iova: u64,
    length: u64,
    page_size: u64,
    data: u64,
}

/// The syscall seam, so the encodings are tested without a kernel.
pub trait IommufdIoctl: Send + Sync {
    /// Issues `request` with `arg`.
    ///
    /// # Safety
    /// `arg` must point at a live, initialised argument struct of
    /// `request`, and any buffer it names must stay valid for the call.
    unsafe fn ioctl(&self, request: u64, arg: *mut libc::c_void) -> io::Result<()>;
}

/// The real iommufd.
pub struct IommufdFd(pub OwnedFd);

impl IommufdIoctl for IommufdFd {
    unsafe fn ioctl(&self, request: u64, arg: *mut libc::c_void) -> io::Result<()> {
        // SAFETY: the caller upholds this method's contract: `arg` is a
        // live argument struct of `request` with valid buffers.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request as libc::c_ulong, arg) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Dirty tracking of one HWPT.
pub struct HwptDirtyTracker {
    iommufd: Box<dyn IommufdIoctl>,
    hwpt_id: u32,
}

impl HwptDirtyTracker {
    pub fn new(iommufd: Box<dyn IommufdIoctl>, hwpt_id: u32) -> Self {
        HwptDirtyTracker { iommufd, hwpt_id }
    }

    pub fn hwpt_id(&self) -> u32 {
        self.hwpt_id
    }

    /// Turns IOMMU dirty tracking of the HWPT on or off.
    pub fn set_tracking(&self, enable: bool) -> io::Result<()> {
        let mut arg = HwptSetDirtyTracking {
            size: std::mem::size_of::<HwptSetDirtyTracking>() as u32,
            flags: if enable {
                IOMMU_HWPT_DIRTY_TRACKING_ENABLE
            } else {
                0
            },
            hwpt_id: self.hwpt_id,
            reserved: 0,
        };
        // SAFETY: `arg` is a complete iommu_hwpt_set_dirty_tracking on our
        // stack, alive for the call.
        unsafe {
            self.iommufd
                .ioctl(IOMMU_HWPT_SET_DIRTY_TRACKING, (&raw mut arg).cast())
        }
    }

    /// Reads (and clears) the dirty bits of `[iova, iova + length)`.
    pub fn read_bitmap(&self, iova: u64, length: u64, page_size: u64) -> io::Result<Vec<u64>> {
        let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(invalid("page size must be a power of two"));
        }
        if length == 0 || !iova.is_multiple_of(page_size) || !length.is_multiple_of(page_size) {
            return Err(invalid("range must be non-empty and page aligned"));
        }
        iova.checked_add(length)
            .ok_or_else(|| invalid("range wraps around the IOVA space"))?;
        let pages = length / page_size;
        let words = pages.div_ceil(64);
        if words * 8 > MAX_BITMAP_BYTES {
            return Err(invalid("range needs a bitmap beyond the 16 MiB bound"));
        }
        // Bounded by MAX_BITMAP_BYTES just above.
        let mut bitmap = vec![0u64; words as usize];
        let mut arg = HwptGetDirtyBitmap {
            size: std::mem::size_of::<HwptGetDirtyBitmap>() as u32,
            hwpt_id: self.hwpt_id,
            flags: 0,
            reserved: 0,
            iova,
            length,
            page_size,
            data: bitmap.as_mut_ptr() as u64,
        };
        // SAFETY: `arg` is a complete iommu_hwpt_get_dirty_bitmap on our
        // stack; `data` points at `bitmap`, which holds one bit per page of
        // `length` and outlives the call.
        unsafe {
            self.iommufd
                .ioctl(IOMMU_HWPT_GET_DIRTY_BITMAP, (&raw mut arg).cast())?;
        }
        Ok(bitmap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn request_numbers_are_the_kernels() {
        // _IO(';', 0x8b) and _IO(';', 0x8c).
        assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING, 0x3b8b);
        assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP, 0x3b8c);
    }

    /// Records what it was asked and sets bits like the kernel would.
    #[derive(Default)]
    struct FakeIommufd {
        seen: Mutex<Vec<(u64, Vec<u8>)>>,
        errno: Option<i32>,
    }

    impl IommufdIoctl for FakeIommufd {
        unsafe fn ioctl(&self, request: u64, arg: *mut libc::c_void) -> io::Result<()> {
            if let Some(e) = self.errno {
                return Err(io::Error::from_raw_os_error(e));
            }
            let len = if request == IOMMU_HWPT_GET_DIRTY_BITMAP {
                48
            } else {
                16
            };
            // SAFETY: the tracker passes a struct of exactly `len` bytes.
            let bytes = unsafe { std::slice::from_raw_parts(arg as *const u8, len) }.to_vec();
            if request == IOMMU_HWPT_GET_DIRTY_BITMAP {
                // SAFETY: as above; the struct is an iommu_hwpt_get_dirty_bitmap.
                let a = unsafe { &*(arg as *const HwptGetDirtyBitmap) };
                // SAFETY: `data` points at the caller's bitmap of at least
                // one word; mark pages 0 and 3 dirty.
                unsafe { *(a.data as *mut u64) = 0b1001 };
            }
            self.seen.lock().unwrap().push((request, bytes));
            Ok(())
        }
    }

    #[test]
    fn set_tracking_encodes_size_flags_and_hwpt() {
        let fake = std::sync::Arc::new(FakeIommufd::default());
        struct Shared(std::sync::Arc<FakeIommufd>);
        impl IommufdIoctl for Shared {
            unsafe fn ioctl(&self, r: u64, a: *mut libc::c_void) -> io::Result<()> {
                // SAFETY: forwards the caller's guarantee unchanged.
                unsafe { self.0.ioctl(r, a) }
            }
        }
        let t = HwptDirtyTracker::new(Box::new(Shared(fake.clone())), 7);
        t.set_tracking(true).unwrap();
        t.set_tracking(false).unwrap();
        let bm = t.read_bitmap(1 << 20, 64 * 4096, 4096).unwrap();
        assert_eq!(bm, vec![0b1001]);
        let seen = fake.seen.lock().unwrap();
        assert_eq!(seen[0].0, IOMMU_HWPT_SET_DIRTY_TRACKING);
        assert_eq!(seen[0].1, [16, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(seen[1].1[4..8], [0, 0, 0, 0]);
        let get = &seen[2].1;
        assert_eq!(seen[2].0, IOMMU_HWPT_GET_DIRTY_BITMAP);
        assert_eq!(get[0..4], 48u32.to_le_bytes());
        assert_eq!(get[4..8], 7u32.to_le_bytes());
        assert_eq!(get[16..24], (1u64 << 20).to_le_bytes());
        assert_eq!(get[24..32], (64u64 * 4096).to_le_bytes());
        assert_eq!(get[32..40], 4096u64.to_le_bytes());
    }

    #[test]
    fn bad_ranges_are_refused_before_the_kernel() {
        let t = HwptDirtyTracker::new(Box::new(FakeIommufd::default()), 1);
        assert!(t.read_bitmap(0, 4096, 3000).is_err());
        assert!(t.read_bitmap(1, 4096, 4096).is_err());
        assert!(t.read_bitmap(0, 0, 4096).is_err());
        assert!(t.read_bitmap(u64::MAX - 4095, 8192, 4096).is_err());
        assert!(t.read_bitmap(0, 1 << 50, 4096).is_err(), "bitmap bound");
    }

    #[test]
    fn kernel_errors_keep_their_errno() {
        let t = HwptDirtyTracker::new(
            Box::new(FakeIommufd {
                errno: Some(libc::EOPNOTSUPP),
                ..Default::default()
            }),
            1,
        );
        assert_eq!(
            t.set_tracking(true).unwrap_err().raw_os_error(),
            Some(libc::EOPNOTSUPP)
        );
    }

    #[test]
    fn real_ioctl_on_a_non_iommufd_fails_cleanly() {
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let t = HwptDirtyTracker::new(Box::new(IommufdFd(fd)), 1);
        let e = t.set_tracking(true).unwrap_err();
        assert!(e.raw_os_error().is_some(), "{e}");
    }
}
