// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `xe-nested-relay`: sits between `ch-remote send-migration` and the
//! destination's `receive-migration` socket, forwards everything, writes a
//! JSON report of the phases it saw, and optionally cuts the migration at
//! one phase by killing the destination and closing both sides.
//!
//! ```text
//! xe-nested-relay --listen unix:/run/relay.sock|tcp:HOST:PORT \
//!     --to unix:/run/mig.sock|tcp:HOST:PORT \
//!     [--cut-at state|device-state|CODE [--cut-mode inside|before|answer-lost|stall] \
//!      [--cut-payload-bytes N] [--kill-pid PID] [--stall-s N]] \
//!     [--opaque] --report /run/relay.json [--timeout-s 300]
//! ```
//!
//! Every connection the source opens is relayed: the main one, parsed
//! request by request, and the extra ones (CH's memory connections, our
//! device-state connections), whose role and, for device state, request
//! are recorded; a cut at `device-state` happens on whichever connection
//! carries it first. A cut falls inside the named request (default),
//! before it (the source sent it, the destination gets none of it), after
//! it (`answer-lost`: the destination gets it, the source is cut off first
//! and never gets the answer), or `stall`s: nothing of it goes on and both
//! connections stay open and silent for `--stall-s` before they close. The
//! process `--kill-pid` names is killed at the cut (after the request went
//! out, for `answer-lost`). With `--opaque` (a TLS migration, which the
//! relay cannot read) nothing is parsed; the report lists each connection
//! with its first bytes, so a test can tell that every one is TLS.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use log::{info, warn};
use serde_json::{json, Value};
use xe_vf_nested_test::relay::{
    forward_extra, forward_requests, parse_command, parse_cut_mode, CutMode, CutPoint,
};

#[derive(Debug, Parser)]
#[command(about = "Relay a Cloud Hypervisor migration, record its phases, optionally cut it")]
struct Args {
    /// Where to listen (the source's destination_url): `unix:PATH` (or a
    /// bare path) or `tcp:HOST:PORT`.
    #[arg(long, value_parser = Endpoint::parse)]
    listen: Endpoint,
    /// The destination's receiver, in the same form.
    #[arg(long, value_parser = Endpoint::parse)]
    to: Endpoint,
    /// Cut at the first request of this command (name or code).
    #[arg(long, value_parser = parse_command, conflicts_with = "opaque")]
    cut_at: Option<u16>,
    /// Which side of the request the cut falls on.
    #[arg(long, value_parser = parse_cut_mode, default_value = "inside", requires = "cut_at")]
    cut_mode: CutMode,
    /// Payload bytes of the cut request to forward first (default: half of
    /// a known length, else 16).
    #[arg(long, requires = "cut_at")]
    cut_payload_bytes: Option<u64>,
    /// How long a `stall` keeps both connections open and silent.
    #[arg(long, default_value_t = 30, requires = "cut_at")]
    stall_s: u64,
    /// Process killed (SIGKILL) at the cut: the destination VMM, or the
    /// source.
    #[arg(long, requires = "cut_at")]
    kill_pid: Option<i32>,
    /// Parse nothing (TLS): record each connection's first bytes.
    #[arg(long)]
    opaque: bool,
    /// Where the JSON report goes.
    #[arg(long)]
    report: PathBuf,
    /// Give up (exit status 2) after this long.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

/// A migration endpoint.
#[derive(Clone, Debug)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    fn parse(text: &str) -> Result<Self, String> {
        match text.strip_prefix("tcp:") {
            Some(addr) if addr.contains(':') => Ok(Endpoint::Tcp(addr.to_string())),
            Some(_) => Err(format!("'{text}' needs tcp:HOST:PORT")),
            None => Ok(Endpoint::Unix(PathBuf::from(
                text.strip_prefix("unix:").unwrap_or(text),
            ))),
        }
    }

    fn bind(&self) -> Result<Listener> {
        Ok(match self {
            Endpoint::Unix(path) => {
                let _ = fs::remove_file(path);
                Listener::Unix(
                    UnixListener::bind(path)
                        .with_context(|| format!("listening on {}", path.display()))?,
                )
            }
            Endpoint::Tcp(addr) => Listener::Tcp(
                TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?,
            ),
        })
    }

    fn connect_once(&self) -> io::Result<Stream> {
        Ok(match self {
            Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            Endpoint::Tcp(addr) => Stream::Tcp(TcpStream::connect(addr)?),
        })
    }

    /// Connects, waiting for a destination that may still be starting.
    fn connect(&self, patience: Duration) -> Result<Stream> {
        let started = Instant::now();
        loop {
            match self.connect_once() {
                Ok(stream) => return Ok(stream),
                Err(e) if started.elapsed() < patience => {
                    info!("waiting for {self:?}: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e).with_context(|| format!("connecting to {self:?}")),
            }
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
        })
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// Copies one direction without looking at it; half-closes `to` at the end.
fn pump(mut from: Stream, to: Stream) -> thread::JoinHandle<io::Result<u64>> {
    thread::spawn(move || {
        let mut writer = to.try_clone()?;
        let copied = io::copy(&mut from, &mut writer);
        to.shutdown(Shutdown::Write);
        copied
    })
}

/// Reads up to 8 bytes of a connection's start (for the report) and
/// forwards them.
fn first_bytes(src: &mut Stream, dst: &mut Stream) -> io::Result<String> {
    let mut head = [0u8; 8];
    let n = src.read(&mut head)?;
    dst.write_all(&head[..n])?;
    Ok(head[..n].iter().map(|b| format!("{b:02x}")).collect())
}

/// What the relay saw, shared by the connections' threads.
struct Shared {
    connections: Mutex<Vec<Value>>,
    /// The cut, once one connection made it (it kills the destination).
    cut: Mutex<Option<Value>>,
    killed: Mutex<Option<i32>>,
}

impl Shared {
    fn push(&self, connection: Value) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(connection);
    }
}

/// How long the destination has to answer a request forwarded after the
/// source was cut off, before its end closes too.
const ANSWER_GRACE: Duration = Duration::from_secs(2);

/// How long the connections stay open after a cut: a `stall`'s silence,
/// or [`ANSWER_GRACE`] after a held request.
fn linger(mode: CutMode, stall: Duration) -> Duration {
    match mode {
        CutMode::Stall => stall,
        CutMode::AnswerLost => ANSWER_GRACE,
        CutMode::Inside | CutMode::Before => Duration::ZERO,
    }
}

/// Cuts the migration: kills `kill_pid` (once), waits `linger`, and ends
/// both sides, `[source, destination]`. With a `held` request
/// (`answer-lost`), the source is cut off first, then the request goes to
/// the destination, then the kill: the answer has nowhere to go.
fn cut_here(
    shared: &Shared,
    kill_pid: Option<i32>,
    cut: Value,
    held: &[u8],
    linger: Duration,
    [source, destination]: [&Stream; 2],
) -> Result<()> {
    let first = {
        let mut slot = shared.cut.lock().unwrap_or_else(PoisonError::into_inner);
        let first = slot.is_none();
        if first {
            *slot = Some(cut);
        }
        first
    };
    if !held.is_empty() {
        source.shutdown(Shutdown::Both);
        let mut to = destination.try_clone()?;
        to.write_all(held)
            .and_then(|()| to.flush())
            .context("forwarding the held request")?;
    }
    if let (true, Some(pid)) = (first, kill_pid) {
        kill(pid)?;
        *shared.killed.lock().unwrap_or_else(PoisonError::into_inner) = Some(pid);
    }
    thread::sleep(linger);
    source.shutdown(Shutdown::Both);
    destination.shutdown(Shutdown::Both);
    Ok(())
}

/// Every extra connection: recorded, and cut there if it carries the
/// request to cut at first.
fn serve_extra_connections(
    listener: Listener,
    to: Endpoint,
    args: Arc<(Option<CutPoint>, Option<i32>, bool, Duration)>,
    shared: Arc<Shared>,
    main: [Arc<Stream>; 2],
) {
    thread::spawn(move || loop {
        let mut src = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                warn!("accepting an extra connection: {e}");
                continue;
            }
        };
        let (to, args, shared, main) = (to.clone(), args.clone(), shared.clone(), main.clone());
        thread::spawn(move || {
            let result = (|| -> Result<()> {
                let mut dst = to.connect(Duration::from_secs(10))?;
                let responses = pump(dst.try_clone()?, src.try_clone()?);
                let (cut, kill_pid, opaque, stall) = *args;
                if opaque {
                    let head = first_bytes(&mut src, &mut dst)?;
                    shared.push(json!({ "kind": "extra", "first_bytes": head }));
                    let mut writer = dst.try_clone()?;
                    io::copy(&mut src, &mut writer)?;
                } else {
                    let report = forward_extra(&mut src, &mut dst, cut)?;
                    shared.push(json!({ "kind": "extra", "report": report }));
                    if let Some(c) = &report.cut {
                        let linger = linger(cut.map_or(CutMode::Inside, |c| c.mode), stall);
                        let made = json!({ "connection": "extra", "command": c.command, "forwarded": c.forwarded });
                        cut_here(&shared, kill_pid, made, &c.held, linger, [&src, &dst])?;
                        main[0].shutdown(Shutdown::Both);
                        main[1].shutdown(Shutdown::Both);
                        return Ok(());
                    }
                }
                dst.shutdown(Shutdown::Write);
                let _ = responses.join();
                Ok(())
            })();
            if let Err(e) = result {
                warn!("extra connection: {e:#}");
            }
        });
    });
}

fn kill(pid: i32) -> Result<()> {
    if pid <= 0 {
        bail!("refusing to signal pid {pid}");
    }
    // SAFETY: kill(2) takes two integers and touches no memory of ours;
    // pid > 0 names exactly one process.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("kill -9 {pid}"));
    }
    Ok(())
}

fn write_report(path: &Path, report: &Value) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn run(args: Args) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout_s);
    thread::spawn(move || {
        thread::sleep(timeout);
        eprintln!("xe-nested-relay: no end of migration within {timeout:?}, giving up");
        std::process::exit(2);
    });

    let listener = args.listen.bind()?;
    println!("xe-nested-relay: listening on {:?}", args.listen);
    let mut source = listener.accept().context("accepting the source")?;
    let mut destination = args.to.connect(Duration::from_secs(30))?;
    let shared = Arc::new(Shared {
        connections: Mutex::new(Vec::new()),
        cut: Mutex::new(None),
        killed: Mutex::new(None),
    });
    let cut = args.cut_at.map(|command| CutPoint {
        command,
        payload_bytes: args.cut_payload_bytes,
        mode: args.cut_mode,
    });
    let main = [
        Arc::new(source.try_clone()?),
        Arc::new(destination.try_clone()?),
    ];
    serve_extra_connections(
        listener,
        args.to.clone(),
        Arc::new((
            cut,
            args.kill_pid,
            args.opaque,
            Duration::from_secs(args.stall_s),
        )),
        shared.clone(),
        main,
    );

    let responses = pump(destination.try_clone()?, source.try_clone()?);
    let forwarded = if args.opaque {
        first_bytes(&mut source, &mut destination)
            .and_then(|head| {
                shared.push(json!({ "kind": "main", "first_bytes": head }));
                io::copy(&mut source, &mut destination)
            })
            .map(|_| None)
            .map_err(anyhow::Error::from)
    } else {
        forward_requests(&mut source, &mut destination, cut)
            .map(Some)
            .map_err(anyhow::Error::from)
    };

    match &forwarded {
        Ok(Some(report)) if report.cut.is_some() => {
            let held = report.cut.as_ref().map_or(&[][..], |c| &c.held[..]);
            let c = report.cut.as_ref().map(|c| {
                json!({ "connection": "main", "command": c.command, "forwarded": c.forwarded,
                            "mode": format!("{:?}", args.cut_mode) })
            });
            cut_here(
                &shared,
                args.kill_pid,
                c.unwrap_or_default(),
                held,
                linger(args.cut_mode, Duration::from_secs(args.stall_s)),
                [&source, &destination],
            )?;
        }
        Ok(_)
            if shared
                .cut
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none() =>
        {
            destination.shutdown(Shutdown::Write);
            let _ = responses.join();
        }
        _ => {
            source.shutdown(Shutdown::Both);
            destination.shutdown(Shutdown::Both);
        }
    }
    // A cut on an extra connection ended the main one: not an error.
    let cut_made = shared
        .cut
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let killed = *shared.killed.lock().unwrap_or_else(PoisonError::into_inner);
    let connections = shared
        .connections
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let report = match &forwarded {
        Ok(wire) => {
            // The main connection's commands on one line, for a shell to grep.
            let main_commands = wire.as_ref().map(|w| {
                w.phases
                    .iter()
                    .map(|p| p.command.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            json!({ "wire": wire, "main_commands": main_commands, "cut": cut_made,
                    "killed_pid": killed, "connections": connections, "error": null })
        }
        Err(e) if cut_made.is_some() => {
            json!({ "wire": null, "cut": cut_made, "killed_pid": killed,
                            "connections": connections, "error": null, "main_ended": format!("{e:#}") })
        }
        Err(e) => json!({ "wire": null, "cut": cut_made, "killed_pid": killed,
                          "connections": connections, "error": format!("{e:#}") }),
    };
    write_report(&args.report, &report)?;
    let mut out = io::stdout().lock();
    writeln!(out, "xe-nested-relay: {}", serde_json::to_string(&report)?)?;
    match forwarded {
        Err(_) if cut_made.is_some() => Ok(()),
        other => other.map(|_| ()).context("relaying the migration stream"),
    }
}

fn main() {
    env_logger::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("xe-nested-relay: {e:#}");
        std::process::exit(1);
    }
}
