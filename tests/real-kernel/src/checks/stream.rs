// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Reading and writing a migration data fd, bounded, plus the few errno
//! and garbage helpers the checks share.

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;

use anyhow::Context;

/// Most device bytes a check keeps in memory. mtty's whole state is about
/// a hundred bytes; anything near this bound means the stream is not what
/// the test expects, and reading stops instead of growing without limit.
pub const MAX_CAPTURED_BYTES: u64 = 1 << 20;

/// Buffer of every streaming copy (the task's bounded buffer).
pub const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// Reads a STOP_COPY stream until `read()` returns 0, at most
/// [`MAX_CAPTURED_BYTES`].
pub fn read_to_eof(fd: &mut File) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut limited = fd.take(MAX_CAPTURED_BYTES + 1);
    limited
        .read_to_end(&mut out)
        .context("reading the migration data fd")?;
    anyhow::ensure!(
        out.len() as u64 <= MAX_CAPTURED_BYTES,
        "migration stream exceeds {MAX_CAPTURED_BYTES} bytes"
    );
    Ok(out)
}

/// Reads what a PRE_COPY stream has available now: until `read()` returns
/// 0 (mtty's "nothing more for now") or `EAGAIN`. The fd is non-blocking
/// meanwhile, so a driver whose PRE_COPY read waits for new data cannot
/// hang the guest; its flags are restored afterwards.
pub fn read_available(fd: &mut File) -> anyhow::Result<Vec<u8>> {
    let flags = fd_flags(fd)?;
    set_fd_flags(fd, flags | libc::O_NONBLOCK)?;
    let read = read_until_dry(fd);
    set_fd_flags(fd, flags)?;
    read
}

fn read_until_dry(fd: &mut File) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        match fd.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                anyhow::ensure!(
                    out.len() as u64 <= MAX_CAPTURED_BYTES,
                    "PRE_COPY stream exceeds {MAX_CAPTURED_BYTES} bytes"
                );
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the PRE_COPY data fd"),
        }
    }
    Ok(out)
}

fn fd_flags(fd: &File) -> anyhow::Result<libc::c_int> {
    // SAFETY: F_GETFL on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error()).context("F_GETFL on the data fd");
    }
    Ok(flags)
}

fn set_fd_flags(fd: &File, flags: libc::c_int) -> anyhow::Result<()> {
    // SAFETY: F_SETFL with an int flag set on an fd we own; no memory is passed.
    let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) };
    if ret < 0 {
        return Err(io::Error::last_os_error()).context("F_SETFL on the data fd");
    }
    Ok(())
}

/// Copies `reader` to `writer` through one [`COPY_BUFFER_BYTES`] buffer;
/// returns the bytes copied.
pub fn copy_bounded(reader: &mut impl Read, writer: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Writes `data` into a RESUMING fd.
pub fn write_all(fd: &mut File, data: &[u8]) -> io::Result<()> {
    fd.write_all(data)
}

/// Symbolic name of the errnos the migration uAPI returns.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EINVAL => "EINVAL",
        libc::EFAULT => "EFAULT",
        libc::ENOMEM => "ENOMEM",
        libc::ENODEV => "ENODEV",
        libc::ENOTTY => "ENOTTY",
        libc::EBUSY => "EBUSY",
        libc::EIO => "EIO",
        libc::ESPIPE => "ESPIPE",
        libc::EAGAIN => "EAGAIN",
        libc::EPERM => "EPERM",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// Pseudo-random bytes (xorshift64*), reproducible from the seed printed
/// in the report.
pub fn garbage(seed: u64, len: usize) -> Vec<u8> {
    // xorshift needs a non-zero state.
    let mut x = (seed ^ 0x9e37_79b9_7f4a_7c15).max(1);
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A seed that differs between runs.
pub fn seed_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5eed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_reproducible_and_not_constant() {
        let a = garbage(42, 64);
        assert_eq!(a, garbage(42, 64));
        assert_ne!(a, garbage(43, 64));
        assert!(a.iter().any(|&b| b != a[0]));
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::EINVAL), "EINVAL");
        assert_eq!(errno_name(9999), "errno 9999");
    }

    #[test]
    fn read_helpers_stop_at_eof() {
        let dir = std::env::temp_dir().join(format!("xe-kt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(
            read_to_eof(&mut File::open(&path).unwrap()).unwrap(),
            b"0123456789"
        );
        assert_eq!(
            read_available(&mut File::open(&path).unwrap()).unwrap(),
            b"0123456789"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
