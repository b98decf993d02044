// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The link between the source and the destination process: a Unix
//! stream socket or TCP over loopback, with the same socket buffer sizes
//! for every method so the link is not what tells them apart.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Socket buffer size asked for on both ends of every connection.
pub const SOCKET_BUFFER: libc::c_int = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Unix,
    Tcp,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Unix => "unix",
            TransportKind::Tcp => "tcp",
        }
    }
}

/// A bound listener on the destination side.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a fresh endpoint; `dir` holds the Unix socket path.
    pub fn bind(kind: TransportKind, dir: &std::path::Path) -> Result<Self> {
        Ok(match kind {
            TransportKind::Unix => {
                let path = dir.join(format!("xe-vf-bench-{}.sock", std::process::id()));
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path)
                    .with_context(|| format!("bind {}", path.display()))?;
                Listener::Unix(l, path)
            }
            TransportKind::Tcp => Listener::Tcp(TcpListener::bind("127.0.0.1:0")?),
        })
    }

    /// The address a source passes to [`connect`].
    pub fn address(&self) -> Result<String> {
        Ok(match self {
            Listener::Unix(_, path) => path.display().to_string(),
            Listener::Tcp(l) => l.local_addr()?.to_string(),
        })
    }

    /// Waits for the source and returns the connection as a plain fd.
    pub fn accept(&self) -> Result<File> {
        let fd: OwnedFd = match self {
            Listener::Unix(l, _) => l.accept()?.0.into(),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                s.into()
            }
        };
        let file = File::from(fd);
        set_buffers(&file);
        Ok(file)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Connects to a destination's listener.
pub fn connect(kind: TransportKind, address: &str) -> Result<File> {
    let fd: OwnedFd = match kind {
        TransportKind::Unix => UnixStream::connect(address)
            .with_context(|| format!("connect {address}"))?
            .into(),
        TransportKind::Tcp => {
            let s = TcpStream::connect(address).with_context(|| format!("connect {address}"))?;
            s.set_nodelay(true)?;
            s.into()
        }
    };
    let file = File::from(fd);
    set_buffers(&file);
    Ok(file)
}

fn set_buffers(socket: &File) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        let value = SOCKET_BUFFER;
        // SAFETY: `socket` is an open socket; `value` is a c_int that
        // outlives the call and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            log::debug!("setsockopt({opt}): {}", io::Error::last_os_error());
        }
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Writes a little-endian u64 length prefix.
pub fn put_len(w: &mut impl Write, len: u64) -> io::Result<()> {
    w.write_all(&len.to_le_bytes())
}

/// Reads a little-endian u64 length prefix and refuses one above `max`.
pub fn get_len(r: &mut impl Read, max: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    let len = u64::from_le_bytes(b);
    if len > max {
        bail!("length prefix {len} exceeds the bound {max}");
    }
    Ok(len)
}
