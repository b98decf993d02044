// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `xe-nested-relay`: sits between `ch-remote send-migration` and the
//! destination's `receive-migration` socket, forwards everything, writes a
//! JSON report of the phases it saw, and optionally cuts the migration at
//! one phase by killing the destination and closing both sides.
//!
//! ```text
//! xe-nested-relay --listen /run/relay.sock --to /run/mig.sock \
//!     [--cut-at state|device-state|CODE [--cut-payload-bytes N] --kill-pid PID] \
//!     --report /run/relay.json [--timeout-s 300]
//! ```

use std::fs;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use log::{info, warn};
use serde_json::json;
use xe_vf_nested_test::relay::{forward_requests, parse_command, CutPoint};

#[derive(Debug, Parser)]
#[command(about = "Relay a Cloud Hypervisor migration, record its phases, optionally cut it")]
struct Args {
    /// Unix socket to listen on (the source's destination_url).
    #[arg(long)]
    listen: PathBuf,
    /// The destination's receiver socket.
    #[arg(long)]
    to: PathBuf,
    /// Cut at the first request of this command (name or code).
    #[arg(long, value_parser = parse_command)]
    cut_at: Option<u16>,
    /// Payload bytes of the cut request to forward first (default: half of
    /// a known length, else 16).
    #[arg(long, requires = "cut_at")]
    cut_payload_bytes: Option<u64>,
    /// Process killed (SIGKILL) at the cut: the destination VMM.
    #[arg(long, requires = "cut_at")]
    kill_pid: Option<i32>,
    /// Where the JSON report goes.
    #[arg(long)]
    report: PathBuf,
    /// Give up (exit status 2) after this long.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

/// Connects to the destination, which may still be starting to listen.
fn connect(path: &Path, patience: Duration) -> Result<UnixStream> {
    let started = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e) if started.elapsed() < patience => {
                info!("waiting for {}: {e}", path.display());
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
        }
    }
}

/// Copies one direction without looking at it; half-closes `to` at the end.
fn pump(mut from: UnixStream, mut to: UnixStream) -> thread::JoinHandle<io::Result<u64>> {
    thread::spawn(move || {
        let copied = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
        copied
    })
}

/// Extra connections (CH's parallel memory connections) pass through raw.
fn serve_extra_connections(listener: UnixListener, to: PathBuf) {
    thread::spawn(move || {
        for stream in listener.incoming() {
            let result = stream.context("accepting").and_then(|src| {
                let dst = connect(&to, Duration::from_secs(10))?;
                pump(src.try_clone()?, dst.try_clone()?);
                pump(dst, src);
                Ok(())
            });
            if let Err(e) = result {
                warn!("extra connection: {e:#}");
            }
        }
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

fn write_report(path: &Path, report: &serde_json::Value) -> Result<()> {
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

    let _ = fs::remove_file(&args.listen);
    let listener = UnixListener::bind(&args.listen)
        .with_context(|| format!("listening on {}", args.listen.display()))?;
    println!("xe-nested-relay: listening on {}", args.listen.display());
    let (source, _) = listener.accept().context("accepting the source")?;
    serve_extra_connections(listener, args.to.clone());
    let destination = connect(&args.to, Duration::from_secs(30))?;

    let responses = pump(destination.try_clone()?, source.try_clone()?);
    let cut = args.cut_at.map(|command| CutPoint {
        command,
        payload_bytes: args.cut_payload_bytes,
    });
    let mut src = source.try_clone()?;
    let mut dst = destination.try_clone()?;
    let forwarded = forward_requests(&mut src, &mut dst, cut);

    let mut killed = None;
    match &forwarded {
        Ok(report) if report.cut.is_some() => {
            if let Some(pid) = args.kill_pid {
                kill(pid)?;
                killed = Some(pid);
            }
            // The source must see the connection die, not wait for a reply.
            let _ = source.shutdown(Shutdown::Both);
            let _ = destination.shutdown(Shutdown::Both);
        }
        Ok(_) => {
            let _ = destination.shutdown(Shutdown::Write);
            let _ = responses.join();
        }
        Err(_) => {
            let _ = source.shutdown(Shutdown::Both);
            let _ = destination.shutdown(Shutdown::Both);
        }
    }

    let report = match &forwarded {
        Ok(report) => json!({ "wire": report, "killed_pid": killed, "error": null }),
        Err(e) => json!({ "wire": null, "killed_pid": killed, "error": format!("{e:#}") }),
    };
    write_report(&args.report, &report)?;
    let mut out = io::stdout().lock();
    writeln!(out, "xe-nested-relay: {}", serde_json::to_string(&report)?)?;
    forwarded
        .map(|_| ())
        .context("relaying the migration stream")
}

fn main() {
    env_logger::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("xe-nested-relay: {e:#}");
        std::process::exit(1);
    }
}
