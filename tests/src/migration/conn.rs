// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Migration transports: `unix:/path` and `tcp:host:port`, as CH's
//! `send-migration`/`receive-migration` URLs name them.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where a migration goes or comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationUrl {
    Unix(PathBuf),
    Tcp(String),
}

impl MigrationUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("'{url}' names no socket path"));
            }
            Ok(MigrationUrl::Unix(PathBuf::from(path)))
        } else if let Some(addr) = url.strip_prefix("tcp:") {
            if !addr.contains(':') {
                return Err(format!("'{url}' needs tcp:<host>:<port>"));
            }
            Ok(MigrationUrl::Tcp(addr.to_string()))
        } else {
            Err(format!(
                "'{url}' is neither unix:<path> nor tcp:<host>:<port>"
            ))
        }
    }
}

/// The socket under a [`Conn`].
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// A migration connection.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
    /// A write already waited out the write timeout (see `write`).
    stalled: bool,
}

impl From<UnixStream> for Conn {
    fn from(s: UnixStream) -> Self {
        Conn {
            stream: Stream::Unix(s),
            stalled: false,
        }
    }
}

impl From<TcpStream> for Conn {
    fn from(s: TcpStream) -> Self {
        Conn {
            stream: Stream::Tcp(s),
            stalled: false,
        }
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match &self.stream {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

impl Conn {
    /// A second handle on the same socket (for a reader that must own it).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match &self.stream {
            Stream::Unix(s) => Conn::from(s.try_clone()?),
            Stream::Tcp(s) => Conn::from(s.try_clone()?),
        })
    }

    /// Shuts both directions down (the peer sees the link drop).
    pub fn shutdown(&self) {
        let _ = match &self.stream {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Read and write timeouts: a stalled peer becomes an error.
    pub fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        match &self.stream {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                s.set_nodelay(true)
            }
        }
    }

    fn write_timeout(&self) -> Option<Duration> {
        match &self.stream {
            Stream::Unix(s) => s.write_timeout().ok().flatten(),
            Stream::Tcp(s) => s.write_timeout().ok().flatten(),
        }
    }
}

impl migration_ext::Connection for Conn {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tcp(s) => s.set_read_timeout(timeout),
        }
    }
}

/// Says in words what a socket error means for a migration: a blocking
/// socket's EAGAIN is its timeout, EPIPE and ECONNRESET a peer gone.
fn explain(e: io::Error, timeout: Option<Duration>) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            match timeout {
                Some(t) => format!("timed out: the peer was silent for {} s", t.as_secs_f64()),
                None => format!("timed out ({e})"),
            },
        ),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
            io::Error::new(e.kind(), format!("the peer closed the connection ({e})"))
        }
        _ => e,
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = match &mut self.stream {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        };
        result.map_err(|e| {
            let timeout = match &self.stream {
                Stream::Unix(s) => s.read_timeout().ok().flatten(),
                Stream::Tcp(s) => s.read_timeout().ok().flatten(),
            };
            explain(e, timeout)
        })
    }
}

impl Write for Conn {
    /// A blocking send that waits out its timeout does not always fail:
    /// it may return what it sent so far, or even all of a small buffer,
    /// so each next write could wait a whole timeout again and a stalled
    /// peer go unseen for several timeouts. A write that blocked for the
    /// timeout reports what it wrote (the `Write` contract: no error
    /// after bytes went out) and marks the connection stalled, so the
    /// next write fails at once. (The kernel's timer runs in jiffies: the
    /// wait may measure a little short.)
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let timeout = self.write_timeout();
        let stall = |t: Duration| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out: the peer took no data for {} s", t.as_secs_f64()),
            )
        };
        if self.stalled {
            return Err(stall(timeout.unwrap_or_default()));
        }
        let started = Instant::now();
        let result = match &mut self.stream {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        };
        let n = result.map_err(|e| explain(e, timeout))?;
        if let Some(t) = timeout {
            if started.elapsed() >= t.mul_f64(0.95) {
                if n == 0 {
                    return Err(stall(t));
                }
                self.stalled = true;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects, retrying while the destination is not listening yet (until
/// `deadline`), as a migration is often started right after the
/// destination was told to receive.
pub fn connect(url: &MigrationUrl, deadline: Instant) -> io::Result<Conn> {
    loop {
        let attempt = match url {
            MigrationUrl::Unix(path) => UnixStream::connect(path).map(Conn::from),
            MigrationUrl::Tcp(addr) => connect_tcp(addr, deadline).map(Conn::from),
        };
        match attempt {
            Ok(c) => return Ok(c),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

fn connect_tcp(addr: &str, deadline: Instant) -> io::Result<TcpStream> {
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{addr} resolves to nothing"),
    );
    for a in addr.to_socket_addrs()? {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A bound listener waiting for the one migration connection.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `url`. A stale unix socket file is replaced; any other file
    /// at that path is an error.
    pub fn bind(url: &MigrationUrl) -> io::Result<Self> {
        match url {
            MigrationUrl::Unix(path) => {
                remove_stale_socket(path)?;
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
            MigrationUrl::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr.as_str())?)),
        }
    }

    /// Accepts one connection within `timeout`.
    pub fn accept(&self, timeout: Duration) -> io::Result<Conn> {
        let mut pfd = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd on our stack, count 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if rc == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no migration connection within {} s", timeout.as_secs()),
            ));
        }
        Ok(match self {
            Listener::Unix(l, _) => Conn::from(l.accept()?.0),
            Listener::Tcp(l) => Conn::from(l.accept()?.0),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Removes `path` if it is a socket left behind; refuses other files.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            MigrationUrl::parse("unix:/tmp/m.sock").unwrap(),
            MigrationUrl::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            MigrationUrl::parse("tcp:10.99.0.2:6000").unwrap(),
            MigrationUrl::Tcp("10.99.0.2:6000".into())
        );
        for bad in ["unix:", "tcp:host", "file:///x", ""] {
            assert!(MigrationUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn accept_times_out_and_unix_socket_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let url = MigrationUrl::Unix(dir.path().join("m.sock"));
        let l = Listener::bind(&url).unwrap();
        let err = l.accept(Duration::from_millis(10)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(l);
        assert!(!dir.path().join("m.sock").exists());
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(Listener::bind(&MigrationUrl::Unix(dir.path().join("file"))).is_err());
    }
}
