// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One side (source or destination) of one transfer, run in a process of
//! its own. Each side prints one JSON [`WorkerReport`] line on stdout; the
//! destination first prints `READY <address>` once it listens.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use xe_vf_plugin::emulated::{create_memfd, EmulatedConfig, EmulatedXeVf};
use xe_vf_plugin::engine::{self, TransferOptions};
use xe_vf_plugin::{fsm, proc_stats, DeviceState, MigrationDevice};

use crate::transport::{self, get_len, put_len, read_full, Listener, TransportKind};

/// The transfer methods compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// A lower bound no method can beat: the slowest of three stages,
    /// each measured alone: the source device's data fd drained into a
    /// reused buffer, the destination device loaded from a pre-faulted
    /// copy of the stream, and the bytes a zero-eliding method must carry
    /// (every byte outside zero runs of 4 KiB or more) sent from a hot
    /// buffer into a hot buffer over the link.
    Limit,
    /// Whole blob in a Vec, base64 in a JSON string (Cloud Hypervisor today).
    UpstreamCh,
    /// Sequential 1 MiB buffers, single thread per side (QEMU's vfio save/load).
    Qemu,
    /// `engine::save` / `engine::restore` (this project).
    Ours,
}

impl Method {
    pub const ALL: [Method; 4] = [
        Method::Limit,
        Method::UpstreamCh,
        Method::Qemu,
        Method::Ours,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Limit => "limit",
            Method::UpstreamCh => "upstream-ch",
            Method::Qemu => "qemu",
            Method::Ours => "ours",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Source,
    Destination,
}

/// What both sides of a transfer agree on.
#[derive(Clone, Debug)]
pub struct Case {
    pub method: Method,
    pub vram: u64,
    pub zero_percent: u8,
    pub seed: u64,
    pub transport: TransportKind,
}

/// What one side measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// CLOCK_MONOTONIC ns when the window opened (source: the device
    /// leaves RUNNING; limit: before the first read).
    pub start_ns: Option<u64>,
    /// CLOCK_MONOTONIC ns when the window closed (destination: the device
    /// is RUNNING; limit: after the last write).
    pub end_ns: Option<u64>,
    /// Device bytes moved (the STOP_COPY stream length).
    pub device_bytes: u64,
    /// Bytes that crossed the link.
    pub wire_bytes: u64,
    /// Digest of the state this side holds at the end.
    pub digest: String,
    /// VmHWM of the process.
    pub peak_rss: u64,
    /// CPU seconds (all threads) spent inside the transfer.
    pub cpu_s: f64,
    /// Named sub-phases in milliseconds, for the breakdown.
    pub phases: BTreeMap<String, f64>,
}

/// CLOCK_MONOTONIC in ns; the same clock in every process of the host.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into memory we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms_since(t: u64) -> f64 {
    now_ns().saturating_sub(t) as f64 / 1e6
}

fn cpu() -> f64 {
    proc_stats::cpu_seconds().unwrap_or(0.0)
}

fn emulated_config(case: &Case) -> EmulatedConfig {
    EmulatedConfig {
        vram_size: case.vram,
        workload: false,
        ..EmulatedConfig::default()
    }
}

/// Device bytes every method moves for this case.
pub fn device_bytes(case: &Case) -> u64 {
    emulated_config(case).stream_len()
}

/// Runs one side; the report goes to stdout as one JSON line.
pub fn run(role: Role, case: &Case, address: Option<&str>, listen: Option<&str>) -> Result<()> {
    let report = match role {
        Role::Destination => {
            let dir = std::env::temp_dir();
            let listener = Listener::bind(case.transport, &dir, listen)?;
            let dest = Destination::prepare(case)?;
            println!("READY {}", listener.address()?);
            std::io::stdout().flush()?;
            let conn = listener.accept()?;
            dest.receive(case, conn)?
        }
        Role::Source => {
            let address = address.context("the source needs --address")?;
            let source = Source::prepare(case)?;
            let conn = transport::connect(case.transport, address)?;
            source.send(case, conn)?
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The state a source starts from: an emulated VF (every method).
enum Source {
    Device(Arc<EmulatedXeVf>),
}

/// A fresh VF, and for the limit the pre-faulted stream to load into it.
enum Destination {
    Device(Arc<EmulatedXeVf>),
    Limit(Arc<EmulatedXeVf>, File),
}

impl Source {
    fn prepare(case: &Case) -> Result<Self> {
        Ok(Source::Device(filled_vf(case)?))
    }

    fn send(self, case: &Case, conn: File) -> Result<WorkerReport> {
        let cpu0 = cpu();
        let Source::Device(vf) = &self;
        let mut report = match case.method {
            Method::Limit => limit_send(&**vf, conn)?,
            Method::UpstreamCh => upstream_send(&**vf, conn)?,
            Method::Qemu => qemu_send(&**vf, conn)?,
            Method::Ours => ours_send(&**vf, conn)?,
        };
        report.cpu_s = cpu() - cpu0;
        report.digest = serde_json::to_string(&vf.digest()?)?;
        report.peak_rss = proc_stats::peak_rss_bytes().unwrap_or(0);
        Ok(report)
    }
}

impl Destination {
    fn prepare(case: &Case) -> Result<Self> {
        let vf = EmulatedXeVf::new(emulated_config(case))?;
        // VRAM is device memory: allocated before any method runs, so
        // no method (and not the limit) pays shmem page allocation.
        vf.prefault_vram()?;
        Ok(match case.method {
            Method::Limit => Destination::Limit(vf, stream_copy(case)?),
            _ => Destination::Device(vf),
        })
    }

    fn receive(self, case: &Case, conn: File) -> Result<WorkerReport> {
        let cpu0 = cpu();
        let mut report = match (&self, case.method) {
            (Destination::Limit(vf, stream), _) => limit_receive(&**vf, stream, conn)?,
            (Destination::Device(vf), Method::UpstreamCh) => {
                upstream_receive(&**vf, conn, device_bytes(case))?
            }
            (Destination::Device(vf), Method::Qemu) => qemu_receive(&**vf, conn)?,
            (Destination::Device(vf), Method::Ours) => ours_receive(&**vf, conn)?,
            (Destination::Device(_), Method::Limit) => bail!("the limit needs its stream copy"),
        };
        report.cpu_s = cpu() - cpu0;
        let (Destination::Device(vf) | Destination::Limit(vf, _)) = &self;
        report.digest = serde_json::to_string(&vf.digest()?)?;
        report.peak_rss = proc_stats::peak_rss_bytes().unwrap_or(0);
        Ok(report)
    }
}

const BUF: usize = 1 << 20;

/// The case's VF, its VRAM filled from the seed.
fn filled_vf(case: &Case) -> Result<Arc<EmulatedXeVf>> {
    let vf = EmulatedXeVf::new(emulated_config(case))?;
    vf.fill_vram(case.seed, case.zero_percent)?;
    Ok(vf)
}

/// The source's stream, saved from a VF filled like the source's into a
/// memfd whose pages are all present before anything is timed.
fn stream_copy(case: &Case) -> Result<File> {
    let vf = filled_vf(case)?;
    let memfd = create_memfd("bench-stream", 0)?;
    let mut data_fd = open_stream(&*vf, DeviceState::StopCopy)?;
    let mut buf = vec![0u8; BUF];
    let mut at = 0u64;
    loop {
        let n = read_full(&mut data_fd, &mut buf)?;
        if n == 0 {
            break;
        }
        memfd.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    drop(data_fd);
    fsm::walk(&*vf, DeviceState::Stop, DeviceState::Stop)?;
    Ok(memfd)
}

/// Counts the bytes of a stream that lie in zero runs of at least
/// `ZERO_RUN` bytes, at any offset (what the encoder elides).
#[derive(Default)]
struct ZeroRuns {
    run: u64,
    elided: u64,
}

const ZERO_RUN: u64 = 4096;

impl ZeroRuns {
    fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if b == 0 {
                self.run += 1;
            } else {
                self.end_run();
            }
        }
    }

    fn end_run(&mut self) {
        if self.run >= ZERO_RUN {
            self.elided += self.run;
        }
        self.run = 0;
    }
}

// ---- limit ----------------------------------------------------------

/// Source stages of the limit: drains the device alone (timed), then
/// sends the bytes outside zero runs from one hot buffer.
fn limit_send(vf: &dyn MigrationDevice, mut conn: File) -> Result<WorkerReport> {
    let mut buf = vec![0u8; BUF];
    let mut phases = BTreeMap::new();
    let t = now_ns();
    let mut data_fd = open_stream(vf, DeviceState::StopCopy)?;
    let mut device_bytes = 0u64;
    loop {
        let n = read_full(&mut data_fd, &mut buf)?;
        if n == 0 {
            break;
        }
        device_bytes += n as u64;
    }
    drop(data_fd);
    fsm::walk(vf, DeviceState::Stop, DeviceState::Stop)?;
    phases.insert("device_drain".into(), ms_since(t));
    // Counted apart, so the drain above is timed without it.
    let mut data_fd = open_stream(vf, DeviceState::StopCopy)?;
    let mut zeros = ZeroRuns::default();
    loop {
        let n = read_full(&mut data_fd, &mut buf)?;
        if n == 0 {
            break;
        }
        zeros.feed(&buf[..n]);
    }
    zeros.end_run();
    drop(data_fd);
    fsm::walk(vf, DeviceState::Stop, DeviceState::Stop)?;
    let wire = device_bytes - zeros.elided;
    put_len(&mut conn, wire)?;
    buf.fill(0x5a);
    let start = now_ns();
    let mut sent = 0u64;
    while sent < wire {
        let n = (wire - sent).min(BUF as u64) as usize;
        conn.write_all(&buf[..n])?;
        sent += n as u64;
    }
    Ok(WorkerReport {
        start_ns: Some(start),
        device_bytes,
        wire_bytes: wire + 8,
        phases,
        ..Default::default()
    })
}

/// Destination stages of the limit: receives the wire bytes into one
/// hot buffer (the link stage ends at the last byte), then loads the
/// pre-faulted stream copy into the device alone (timed).
fn limit_receive(vf: &dyn MigrationDevice, stream: &File, mut conn: File) -> Result<WorkerReport> {
    let mut buf = vec![0u8; BUF];
    let wire = get_len(&mut conn, u64::MAX)?;
    let mut got = 0u64;
    while got < wire {
        let want = (wire - got).min(BUF as u64) as usize;
        let n = read_full(&mut conn, &mut buf[..want])?;
        if n == 0 {
            bail!("limit: link closed after {got} of {wire} bytes");
        }
        got += n as u64;
    }
    let end = now_ns();
    let mut phases = BTreeMap::new();
    let size = stream.metadata()?.len();
    let t = now_ns();
    let mut data_fd = open_stream(vf, DeviceState::Resuming)?;
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(BUF as u64) as usize;
        stream.read_exact_at(&mut buf[..n], at)?;
        data_fd.write_all(&buf[..n])?;
        at += n as u64;
    }
    drop(data_fd);
    fsm::walk(vf, DeviceState::Stop, DeviceState::Stop)?;
    fsm::walk(vf, DeviceState::Running, DeviceState::Stop)?;
    phases.insert("device_load".into(), ms_since(t));
    Ok(WorkerReport {
        end_ns: Some(end),
        device_bytes: size,
        wire_bytes: wire + 8,
        phases,
        ..Default::default()
    })
}

// ---- upstream Cloud Hypervisor style --------------------------------

/// The device's section of CH's JSON snapshot state: the whole blob,
/// base64-encoded.
#[derive(Serialize, Deserialize)]
struct VfioMigrationState {
    data: String,
}

fn open_stream(vf: &dyn MigrationDevice, target: DeviceState) -> Result<File> {
    fsm::walk(vf, target, DeviceState::Running)?
        .with_context(|| format!("{target} opened no data fd"))
}

fn upstream_send(vf: &dyn MigrationDevice, mut conn: File) -> Result<WorkerReport> {
    let mut phases = BTreeMap::new();
    let start = now_ns();
    let mut data_fd = open_stream(vf, DeviceState::StopCopy)?;
    let mut blob = Vec::new();
    data_fd.read_to_end(&mut blob)?;
    drop(data_fd);
    fsm::walk(vf, DeviceState::Stop, DeviceState::Stop)?;
    phases.insert("read_blob".into(), ms_since(start));
    let t = now_ns();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&blob);
    let device_bytes = blob.len() as u64;
    drop(blob);
    let mut json = Vec::with_capacity(encoded.len() + 64);
    serde_json::to_writer(&mut json, &VfioMigrationState { data: encoded })?;
    phases.insert("base64_json".into(), ms_since(t));
    let t = now_ns();
    put_len(&mut conn, json.len() as u64)?;
    conn.write_all(&json)?;
    phases.insert("send".into(), ms_since(t));
    Ok(WorkerReport {
        start_ns: Some(start),
        device_bytes,
        wire_bytes: json.len() as u64 + 8,
        phases,
        ..Default::default()
    })
}

fn upstream_receive(vf: &dyn MigrationDevice, mut conn: File, expect: u64) -> Result<WorkerReport> {
    let mut phases = BTreeMap::new();
    // Base64 is 4/3 of the blob; bound the allocation by what this
    // device's state can be.
    let len = get_len(&mut conn, expect / 3 * 4 + (1 << 20))?;
    let t = now_ns();
    let mut json = vec![0u8; len as usize];
    conn.read_exact(&mut json)?;
    phases.insert("receive".into(), ms_since(t));
    let t = now_ns();
    let state: VfioMigrationState = serde_json::from_slice(&json)?;
    drop(json);
    let blob = base64::engine::general_purpose::STANDARD.decode(state.data.as_bytes())?;
    drop(state);
    phases.insert("json_base64".into(), ms_since(t));
    let t = now_ns();
    let mut data_fd = open_stream(vf, DeviceState::Resuming)?;
    data_fd.write_all(&blob)?;
    drop(data_fd);
    fsm::walk(vf, DeviceState::Stop, DeviceState::Stop)?;
    fsm::walk(vf, DeviceState::Running, DeviceState::Stop)?;
    let end = now_ns();
    phases.insert("write_blob".into(), ms_since(t));
    Ok(WorkerReport {
        end_ns: Some(end),
        device_bytes: blob.len() as u64,
        wire_bytes: len + 8,
        phases,
        ..Default::default()
    })
}

// ---- QEMU style -----------------------------------------------------

/// QEMU's `VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE`.
const QEMU_BUFFER: usize = 1 << 20;

fn qemu_send(vf: &dyn MigrationDevice, mut conn: File) -> Result<WorkerReport> {
    let mut buf = vec![0u8; QEMU_BUFFER];
    let start = now_ns();
    let mut data_fd = open_stream(vf, DeviceState::StopCopy)?;
    let (mut device_bytes, mut wire_bytes) = (0u64, 0u64);
    loop {
        // One read per buffer, as vfio_save_block does.
        let n = loop {
            match data_fd.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        put_len(&mut conn, n as u64)?;
        wire_bytes += 8;
        if n == 0 {
            break;
        }
        conn.write_all(&buf[..n])?;
        device_bytes += n as u64;
        wire_bytes += n as u64;
    }
    drop(data_fd);
    fsm::walk(vf, DeviceState::Stop, DeviceState::Stop)?;
    Ok(WorkerReport {
        start_ns: Some(start),
        device_bytes,
        wire_bytes,
        ..Default::default()
    })
}

fn qemu_receive(vf: &dyn MigrationDevice, mut conn: File) -> Result<WorkerReport> {
    let mut buf = vec![0u8; QEMU_BUFFER];
    let mut len = get_len(&mut conn, QEMU_BUFFER as u64)?;
    let mut data_fd = open_stream(vf, DeviceState::Resuming)?;
    let (mut device_bytes, mut wire_bytes) = (0u64, 8u64);
    while len != 0 {
        let chunk = &mut buf[..len as usize];
        conn.read_exact(chunk)?;
        data_fd.write_all(chunk)?;
        device_bytes += len;
        wire_bytes += len + 8;
        len = get_len(&mut conn, QEMU_BUFFER as u64)?;
    }
    drop(data_fd);
    fsm::walk(vf, DeviceState::Stop, DeviceState::Stop)?;
    fsm::walk(vf, DeviceState::Running, DeviceState::Stop)?;
    let end = now_ns();
    Ok(WorkerReport {
        end_ns: Some(end),
        device_bytes,
        wire_bytes,
        ..Default::default()
    })
}

// ---- ours -----------------------------------------------------------

fn ours_send(vf: &dyn MigrationDevice, conn: File) -> Result<WorkerReport> {
    let opts = TransferOptions::default();
    let start = now_ns();
    let report = engine::save(vf, &conn, &opts, &mut |_| {})?;
    let mut phases = BTreeMap::new();
    phases.insert("stop_copy".into(), report.stop_copy.as_secs_f64() * 1e3);
    Ok(WorkerReport {
        start_ns: Some(start),
        device_bytes: report.raw_bytes,
        wire_bytes: report.encoded_bytes,
        phases,
        ..Default::default()
    })
}

fn ours_receive(vf: &dyn MigrationDevice, conn: File) -> Result<WorkerReport> {
    let opts = TransferOptions::default();
    let t = now_ns();
    let report = engine::restore(vf, conn, &opts, &mut |_| {})?;
    fsm::walk(vf, DeviceState::Running, DeviceState::Stop)?;
    let end = now_ns();
    let mut phases = BTreeMap::new();
    phases.insert("restore".into(), ms_since(t));
    phases.insert("resuming".into(), report.resuming.as_secs_f64() * 1e3);
    Ok(WorkerReport {
        end_ns: Some(end),
        device_bytes: report.decoded.decoded_bytes,
        wire_bytes: report.decoded.encoded_bytes,
        phases,
        ..Default::default()
    })
}
