// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A real VF's VRAM as VRAM pre-copy reads it: the VF's LMEM BAR through
//! VFIO ([`crate::vram_bar`]).
//!
//! Xe maps a VF's LMEM at the VF's BAR 2 (`VF_LMEM_BAR` in the driver's
//! SR-IOV code). VFIO reads a BAR as `pread` on the device fd at the
//! region's offset, done by vfio-pci as uncached MMIO loads: the same
//! PCIe round trips a mapping would cost, without mapping gigabytes into
//! the VMM or a seccomp rule beyond `pread64`. A BAR the device does not
//! let the host read (memory decoding off, a reset in progress) fails the
//! read, and VRAM pre-copy with it; the stop-copy stream then carries
//! every byte as before.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use vfio_bindings::bindings::vfio::{VFIO_PCI_BAR2_REGION_INDEX, VFIO_REGION_INFO_FLAG_READ};

use super::kernel::region_info;
use crate::vram_bar::VramBar;

/// The VFIO region of an Xe VF's LMEM BAR.
pub const LMEM_BAR_REGION: u32 = VFIO_PCI_BAR2_REGION_INDEX;

/// The VF's LMEM BAR, read through a duplicate of its VFIO device fd.
#[derive(Debug)]
pub struct LmemBar {
    fd: OwnedFd,
    /// Where the region starts in the fd's offsets, and its bytes.
    offset: u64,
    size: u64,
}

impl LmemBar {
    /// The LMEM BAR of the device behind `device`, if it has a readable
    /// one (`None`: no BAR 2, or one VFIO does not let the host read).
    pub fn open(device: BorrowedFd<'_>) -> io::Result<Option<Self>> {
        let info = region_info(device, LMEM_BAR_REGION)?;
        if info.size == 0 || info.flags & VFIO_REGION_INFO_FLAG_READ == 0 {
            return Ok(None);
        }
        let fd = device.try_clone_to_owned()?;
        Self::from_region(fd, info.offset, info.size).map(Some)
    }

    /// The region of `size` bytes at `offset` of `fd`.
    pub fn from_region(fd: OwnedFd, offset: u64, size: u64) -> io::Result<Self> {
        if offset
            .checked_add(size)
            .and_then(|end| i64::try_from(end).ok())
            .is_none()
        {
            return Err(io::Error::other(format!(
                "LMEM BAR region of {size} bytes at {offset:#x} is out of the fd's range"
            )));
        }
        Ok(LmemBar { fd, offset, size })
    }
}

impl VramBar for LmemBar {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "read of {} bytes at {offset:#x} past the LMEM BAR's {} bytes",
                    buf.len(),
                    self.size
                ),
            ));
        }
        let mut done = 0;
        while done < buf.len() {
            // In range: from_region checked offset + size fits an off_t.
            let at = (self.offset + offset + done as u64) as libc::off_t;
            let rest = &mut buf[done..];
            // SAFETY: `rest` is valid for writes of `rest.len()` bytes and
            // pread does not keep the pointer; the fd is ours and open.
            let n = unsafe {
                libc::pread(
                    self.fd.as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    at,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("LMEM BAR read ended at {:#x}", offset + done as u64),
                    ))
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A file standing in for the device fd: VFIO's BAR reads are preads
    /// at the region's offset, which a file answers alike.
    fn region_file(before: usize, bar: &[u8]) -> OwnedFd {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0xee; before]).unwrap();
        f.write_all(bar).unwrap();
        f.into()
    }

    #[test]
    fn vram_precopy_lmem_bar_reads_its_region_only() {
        let bar: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let lmem = LmemBar::from_region(region_file(4096, &bar), 4096, 8192).unwrap();
        assert_eq!(lmem.size(), 8192);
        let mut buf = vec![0; 100];
        lmem.read_at(&mut buf, 5000).unwrap();
        assert_eq!(buf, bar[5000..5100]);
        let e = lmem.read_at(&mut buf, 8100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("past the LMEM BAR"), "{e}");
    }

    #[test]
    fn vram_precopy_lmem_bar_that_ends_early_says_where() {
        // The region claims more than the fd holds.
        let lmem = LmemBar::from_region(region_file(0, &[1; 4096]), 0, 8192).unwrap();
        let mut buf = vec![0; 8192];
        let e = lmem.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("ended at 0x1000"), "{e}");
    }

    #[test]
    fn vram_precopy_lmem_bar_refuses_a_region_past_the_fd_range() {
        let e = LmemBar::from_region(region_file(0, &[]), u64::MAX - 10, 100).unwrap_err();
        assert!(e.to_string().contains("out of the fd's range"), "{e}");
    }

    #[test]
    fn vram_precopy_lmem_bar_of_a_non_vfio_fd_is_an_error_not_a_bar() {
        let f = region_file(0, &[0; 16]);
        assert!(LmemBar::open(std::os::fd::AsFd::as_fd(&f)).is_err());
    }
}
