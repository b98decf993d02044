// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Sparse memfd backing: GiB of VF LMEM cost no RAM until written.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// Creates a close-on-exec memfd of `size` bytes (a hole until written).
/// Also used by tests and the test host for guest memory.
pub fn create_memfd(name: &str, size: u64) -> io::Result<File> {
    let name = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// The VF's LMEM.
pub(crate) struct Vram {
    file: File,
    size: u64,
}

impl Vram {
    pub(crate) fn new(size: u64) -> io::Result<Self> {
        Ok(Vram {
            file: create_memfd("xe-vf-vram", size)?,
            size,
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "VRAM access [{offset:#x}, +{len:#x}) beyond {:#x}",
                    self.size
                ),
            )),
        }
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.file.write_all_at(buf, offset)
    }

    /// Allocates every page of LMEM now (zero-filled): device memory is
    /// always there, and a benchmark should not count page allocation as
    /// device cost.
    pub(crate) fn prefault(&self) -> io::Result<()> {
        let len = libc::off_t::try_from(self.size).map_err(io::Error::other)?;
        // SAFETY: fallocate on a file descriptor we own; no memory is
        // passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Zeroes all of LMEM by dropping every page.
    pub(crate) fn zero(&self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.set_len(self.size)
    }
}
