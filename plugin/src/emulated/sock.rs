// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The data fd: one end of a Unix stream socket pair.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Socket buffer size asked for on both ends, for throughput.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// A connected pair with large buffers: (device end, caller end as File).
pub(crate) fn data_pair() -> io::Result<(UnixStream, File)> {
    let (device, caller) = UnixStream::pair()?;
    for s in [&device, &caller] {
        set_buffers(s);
    }
    Ok((device, File::from(OwnedFd::from(caller))))
}

fn set_buffers(s: &UnixStream) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        let value = SOCKET_BUFFER;
        // SAFETY: `s` is an open socket; `value` is a c_int that lives
        // across the call and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            // Only throughput suffers; the kernel caps the size anyway.
            log::debug!("setsockopt({opt}) failed: {}", io::Error::last_os_error());
        }
    }
}

/// Writes all of `data`, without SIGPIPE when the peer is gone (EPIPE
/// is returned instead).
pub(crate) fn send_all(s: &UnixStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: `data` is a valid readable buffer of `data.len()` bytes
        // and `s` an open socket.
        let n = unsafe {
            libc::send(
                s.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n as usize..];
    }
    Ok(())
}
