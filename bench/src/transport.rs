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

/// Which link a transfer crosses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// A Unix stream socket: no network stack, bounded by CPU only.
    Unix,
    /// TCP over loopback.
    Tcp,
    /// TCP between two network namespaces joined by a veth pair whose
    /// both ends are shaped to `rate_bit_s`: a link-bound migration
    /// network (see [`crate::netns`]).
    Veth { rate_bit_s: u64 },
}

/// Rate of `veth` when none is given.
pub const DEFAULT_VETH_RATE: u64 = 10_000_000_000;

impl TransportKind {
    /// The name used on the command line and in the table, e.g.
    /// `veth:1gbit`.
    pub fn name(self) -> String {
        match self {
            TransportKind::Unix => "unix".into(),
            TransportKind::Tcp => "tcp".into(),
            TransportKind::Veth { rate_bit_s } => format!("veth:{}", rate_label(rate_bit_s)),
        }
    }
}

/// `10gbit`, `1gbit`, `500mbit`: the largest unit that divides the rate.
pub fn rate_label(bit_s: u64) -> String {
    for (unit, name) in [
        (1_000_000_000, "gbit"),
        (1_000_000, "mbit"),
        (1_000, "kbit"),
    ] {
        if bit_s >= unit && bit_s.is_multiple_of(unit) {
            return format!("{}{name}", bit_s / unit);
        }
    }
    format!("{bit_s}bit")
}

/// Parses `N[k|m|g]bit` (decimal units, as `tc` reads them).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let body = lower
        .strip_suffix("bit")
        .ok_or_else(|| format!("rate {s:?} must end in bit, e.g. 10gbit"))?;
    let (digits, unit) = match body.char_indices().last() {
        Some((i, 'k')) => (&body[..i], 1_000),
        Some((i, 'm')) => (&body[..i], 1_000_000),
        Some((i, 'g')) => (&body[..i], 1_000_000_000),
        _ => (body, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("rate {s:?} is not a number of bits per second"))?;
    match n.checked_mul(unit) {
        Some(r) if (1_000_000..=400_000_000_000).contains(&r) => Ok(r),
        _ => Err(format!("rate {s:?} is outside 1mbit..400gbit")),
    }
}

impl std::str::FromStr for TransportKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unix" => Ok(TransportKind::Unix),
            "tcp" => Ok(TransportKind::Tcp),
            "veth" => Ok(TransportKind::Veth {
                rate_bit_s: DEFAULT_VETH_RATE,
            }),
            _ => match s.strip_prefix("veth:") {
                Some(rate) => Ok(TransportKind::Veth {
                    rate_bit_s: parse_rate(rate)?,
                }),
                None => Err(format!(
                    "unknown transport {s:?}: unix, tcp, veth or veth:RATE (e.g. veth:1gbit)"
                )),
            },
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl<'de> serde::Deserialize<'de> for TransportKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for TransportKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// A bound listener on the destination side.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a fresh endpoint; `dir` holds the Unix socket path, `ip` is
    /// the address a veth destination listens on.
    pub fn bind(kind: TransportKind, dir: &std::path::Path, ip: Option<&str>) -> Result<Self> {
        Ok(match kind {
            TransportKind::Unix => {
                let path = dir.join(format!("xe-vf-bench-{}.sock", std::process::id()));
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path)
                    .with_context(|| format!("bind {}", path.display()))?;
                Listener::Unix(l, path)
            }
            TransportKind::Tcp => Listener::Tcp(TcpListener::bind("127.0.0.1:0")?),
            TransportKind::Veth { .. } => {
                let ip = ip.context("a veth destination needs --listen")?;
                Listener::Tcp(TcpListener::bind((ip, 0)).with_context(|| format!("bind {ip}"))?)
            }
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
        TransportKind::Tcp | TransportKind::Veth { .. } => {
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

/// One side of a link-rate probe: the source sends `bytes` from one hot
/// 1 MiB buffer, the destination reads them into another and prints the
/// seconds from the first byte to the last (after `READY <address>`).
pub fn probe(
    role: crate::worker::Role,
    kind: TransportKind,
    address: Option<&str>,
    listen: Option<&str>,
    bytes: u64,
) -> Result<()> {
    let mut buf = vec![0x5au8; 1 << 20];
    match role {
        crate::worker::Role::Destination => {
            let listener = Listener::bind(kind, &std::env::temp_dir(), listen)?;
            println!("READY {}", listener.address()?);
            std::io::stdout().flush()?;
            let mut conn = listener.accept()?;
            let total = get_len(&mut conn, u64::MAX)?;
            let mut got = 0u64;
            let mut first = None;
            while got < total {
                let want = (total - got).min(buf.len() as u64) as usize;
                let n = conn.read(&mut buf[..want])?;
                if n == 0 {
                    anyhow::bail!("probe: link closed after {got} of {total} bytes");
                }
                first.get_or_insert_with(std::time::Instant::now);
                got += n as u64;
            }
            let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
            println!("{secs}");
        }
        crate::worker::Role::Source => {
            let address = address.ok_or_else(|| anyhow::anyhow!("the source needs --address"))?;
            let mut conn = connect(kind, address)?;
            put_len(&mut conn, bytes)?;
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(buf.len() as u64) as usize;
                conn.write_all(&buf[..n])?;
                sent += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_names_round_trip() {
        for s in ["unix", "tcp", "veth:10gbit", "veth:1gbit", "veth:500mbit"] {
            let t: TransportKind = s.parse().unwrap();
            assert_eq!(t.name(), s);
        }
        assert_eq!(
            "veth".parse::<TransportKind>().unwrap(),
            TransportKind::Veth {
                rate_bit_s: 10_000_000_000
            }
        );
    }

    #[test]
    fn bad_rates_are_refused() {
        for s in [
            "veth:",
            "veth:10",
            "veth:fastbit",
            "veth:0gbit",
            "veth:999tbit",
            "udp",
        ] {
            assert!(s.parse::<TransportKind>().is_err(), "{s}");
        }
        assert_eq!(parse_rate("2500Mbit"), Ok(2_500_000_000));
    }
}
