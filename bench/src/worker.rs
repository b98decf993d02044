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
    /// memfd -> socket -> memfd, no device, no framing.
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
    emulated_config(case).stop_copy_size()
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

/// The state a source starts from: an emulated VF, or for the limit a
/// memfd with the same number of bytes and zero pages.
enum Source {
    Device(Arc<EmulatedXeVf>),
    Memfd(File),
}

enum Destination {
    Device(Arc<EmulatedXeVf>),
    Memfd(File),
}

impl Source {
    fn prepare(case: &Case) -> Result<Self> {
        Ok(match case.method {
            Method::Limit => Source::Memfd(filled_memfd(case)?),
            _ => {
                let vf = EmulatedXeVf::new(emulated_config(case))?;
                vf.fill_vram(case.seed, case.zero_percent)?;
                Source::Device(vf)
            }
        })
    }

    fn send(self, case: &Case, conn: File) -> Result<WorkerReport> {
        let cpu0 = cpu();
        let mut report = match (&self, case.method) {
            (Source::Memfd(m), _) => limit_send(m, conn)?,
            (Source::Device(vf), Method::UpstreamCh) => upstream_send(&**vf, conn)?,
            (Source::Device(vf), Method::Qemu) => qemu_send(&**vf, conn)?,
            (Source::Device(vf), Method::Ours) => ours_send(&**vf, conn)?,
            (Source::Device(_), Method::Limit) => bail!("limit runs without a device"),
        };
        report.cpu_s = cpu() - cpu0;
        report.digest = match &self {
            Source::Memfd(m) => memfd_digest(m)?,
            Source::Device(vf) => serde_json::to_string(&vf.digest()?)?,
        };
        report.peak_rss = proc_stats::peak_rss_bytes().unwrap_or(0);
        Ok(report)
    }
}

impl Destination {
    fn prepare(case: &Case) -> Result<Self> {
        Ok(match case.method {
            Method::Limit => Destination::Memfd(create_memfd("bench-dst", device_bytes(case))?),
            _ => Destination::Device(EmulatedXeVf::new(emulated_config(case))?),
        })
    }

    fn receive(self, case: &Case, conn: File) -> Result<WorkerReport> {
        let cpu0 = cpu();
        let mut report = match (&self, case.method) {
            (Destination::Memfd(m), _) => limit_receive(m, conn)?,
            (Destination::Device(vf), Method::UpstreamCh) => {
                upstream_receive(&**vf, conn, device_bytes(case))?
            }
            (Destination::Device(vf), Method::Qemu) => qemu_receive(&**vf, conn)?,
            (Destination::Device(vf), Method::Ours) => ours_receive(&**vf, conn)?,
            (Destination::Device(_), Method::Limit) => bail!("limit runs without a device"),
        };
        report.cpu_s = cpu() - cpu0;
        report.digest = match &self {
            Destination::Memfd(m) => memfd_digest(m)?,
            Destination::Device(vf) => serde_json::to_string(&vf.digest()?)?,
        };
        report.peak_rss = proc_stats::peak_rss_bytes().unwrap_or(0);
        Ok(report)
    }
}

const PAGE: usize = 4096;
const BUF: usize = 1 << 20;

/// A memfd of the case's stream length, about `zero_percent` of its 4 KiB
/// pages left as holes (as the emulated VF's VRAM), the rest random.
fn filled_memfd(case: &Case) -> Result<File> {
    let size = device_bytes(case);
    let memfd = create_memfd("bench-src", size)?;
    let mut buf = vec![0u8; BUF];
    let mut at = 0u64;
    let mut state = case.seed | 1;
    while at < size {
        let n = (size - at).min(BUF as u64) as usize;
        let mut run: Option<usize> = None;
        for page in (0..n).step_by(PAGE) {
            let end = (page + PAGE).min(n);
            let index = (at + page as u64) / PAGE as u64;
            let zero = mix(case.seed ^ index) % 100 < u64::from(case.zero_percent);
            if zero {
                if let Some(start) = run.take() {
                    memfd.write_all_at(&buf[start..page], at + start as u64)?;
                }
            } else {
                for word in buf[page..end].chunks_mut(8) {
                    state = mix(state);
                    let bytes = state.to_le_bytes();
                    word.copy_from_slice(&bytes[..word.len()]);
                }
                run.get_or_insert(page);
            }
        }
        if let Some(start) = run {
            memfd.write_all_at(&buf[start..n], at + start as u64)?;
        }
        at += n as u64;
    }
    Ok(memfd)
}

/// SplitMix64 finaliser.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn memfd_digest(memfd: &File) -> Result<String> {
    let size = memfd.metadata()?.len();
    let mut buf = vec![0u8; BUF];
    let (mut at, mut crc) = (0u64, 0u32);
    while at < size {
        let n = (size - at).min(BUF as u64) as usize;
        memfd.read_exact_at(&mut buf[..n], at)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n as u64;
    }
    Ok(format!("{{\"bytes\":{size},\"crc32c\":{crc}}}"))
}

// ---- limit ----------------------------------------------------------

fn limit_send(memfd: &File, mut conn: File) -> Result<WorkerReport> {
    let size = memfd.metadata()?.len();
    let mut buf = vec![0u8; BUF];
    let start = now_ns();
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(BUF as u64) as usize;
        memfd.read_exact_at(&mut buf[..n], at)?;
        conn.write_all(&buf[..n])?;
        at += n as u64;
    }
    Ok(WorkerReport {
        start_ns: Some(start),
        device_bytes: size,
        wire_bytes: size,
        ..Default::default()
    })
}

fn limit_receive(memfd: &File, mut conn: File) -> Result<WorkerReport> {
    let size = memfd.metadata()?.len();
    let mut buf = vec![0u8; BUF];
    let mut at = 0u64;
    while at < size {
        let want = (size - at).min(BUF as u64) as usize;
        let n = read_full(&mut conn, &mut buf[..want])?;
        if n == 0 {
            bail!("limit: link closed after {at} of {size} bytes");
        }
        memfd.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    let end = now_ns();
    Ok(WorkerReport {
        end_ns: Some(end),
        device_bytes: size,
        wire_bytes: size,
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
