// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Whole-VM downtime: two test hosts (`xe-vf-testhost`) migrate a VM
//! with guest RAM, one or more VFs, the vCPU workload and the VFs' DMA
//! workload running, over a unix socket or a shaped veth link.
//!
//! Downtime is the source host's own measure, from pausing the VM to the
//! destination's Ok to Complete (the destination VM runs then), broken
//! down by phase: final memory pass, device state, switch-over. Methods:
//!
//! - **qemu**: the final pass resends every page the VFs may have DMA'd
//!   into, then each VF's state in turn on the main connection
//!   (`final_pass: Resend`, `device_state_connections: false`);
//! - **ours**: the verify pass where it pays (`final_pass: Auto`), every
//!   VF's state on its own connection while the final pass runs, VRAM
//!   all in stop-copy (`vram_precopy: Off`);
//! - **ours-vram**: ours with VRAM pre-copy through the VFs' BARs
//!   (`vram_precopy: Auto`): in stop-copy only the VRAM pages that
//!   changed since pre-copy read them travel;
//! - **limit**: what really changed since the last pre-copy pass (the
//!   CPU-dirty bytes, the pages the verify pass found changed, the VF
//!   state without its zero runs, or with VRAM pre-copy in the case only
//!   the stream bytes that were not pre-copied), divided by the link's
//!   rate measured from a hot buffer into a hot buffer (`xe-vf-bench
//!   probe`);
//! - **upstream CH**: refuses (`start_dirty_log` fails for a VF without
//!   DMA logging, `vfio_common` asks for `DMA_LOGGING_START`).
//!
//! Once memory pre-copy converged (and VRAM pre-copy ended), every VF
//! rewrites `vram_change_percent` of its VRAM, spread out, in every
//! method: the VRAM the GPU changed after pre-copy read it.
//!
//! Every run is verified: memory checksum and VF digests of the source at
//! its stop equal the destination's at the switch-over.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use xe_vf_testhost::client::ApiClient;

use crate::netns::{self, ShapedLink};
use crate::transport::TransportKind;

const MIB: f64 = (1 << 20) as f64;

/// The methods a run compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum VmMethod {
    Qemu,
    Ours,
    OursVram,
}

impl VmMethod {
    pub const ALL: [VmMethod; 3] = [VmMethod::Qemu, VmMethod::Ours, VmMethod::OursVram];

    pub fn name(self) -> &'static str {
        match self {
            VmMethod::Qemu => "qemu",
            VmMethod::Ours => "ours",
            VmMethod::OursVram => "ours-vram",
        }
    }

    fn final_pass(self) -> &'static str {
        match self {
            VmMethod::Qemu => "Resend",
            VmMethod::Ours | VmMethod::OursVram => "Auto",
        }
    }

    fn vram_precopy(self) -> &'static str {
        match self {
            VmMethod::OursVram => "Auto",
            VmMethod::Qemu | VmMethod::Ours => "Off",
        }
    }
}

pub struct VmPlan {
    pub rams: Vec<u64>,
    /// VRAM of each VF, one case per size.
    pub vrams: Vec<u64>,
    pub vfs: Vec<usize>,
    pub transports: Vec<TransportKind>,
    pub methods: Vec<VmMethod>,
    pub reps: usize,
    /// Pages the VFs' workloads DMA per iteration (each VF a share), per
    /// GiB of guest RAM.
    pub dma_pages_per_gib: u32,
    /// Share of guest RAM (percent, all VFs together) the DMA writes
    /// keep landing in: a GPU's buffers, rewritten over and over.
    pub dma_set_percent: f64,
    pub vram_zero_percent: u8,
    /// Share of each VF's VRAM rewritten after pre-copy (every method).
    pub vram_change_percent: u8,
    /// BAR read rate of the emulated VFs (bytes per second).
    pub bar_rate: u64,
    pub out_dir: PathBuf,
    pub case_timeout: Duration,
}

/// One migration as measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRun {
    pub transport: String,
    pub ram: u64,
    pub vfs: usize,
    pub vram: u64,
    pub method: VmMethod,
    pub rep: usize,
    pub downtime_ms: f64,
    pub final_memory_ms: f64,
    pub device_state_ms: f64,
    pub switchover_ms: f64,
    pub total_ms: f64,
    pub final_pass_bytes: u64,
    pub cpu_dirty_bytes: u64,
    pub dma_bytes: u64,
    pub differing_bytes: u64,
    pub digest_bytes: u64,
    pub device_bytes: u64,
    pub dma_pages: String,
    pub decision: Value,
    pub verified: bool,
    pub src_peak_rss: u64,
    pub dst_peak_rss: u64,
    /// With VRAM pre-copy (all VFs): the longest pre-copy, the stream
    /// bytes taken from pre-copied VRAM and sent in stop-copy, the
    /// compared pages found changed, and whether every VF compared.
    #[serde(default)]
    pub vram_precopy_ms: f64,
    #[serde(default)]
    pub vram_held_bytes: u64,
    #[serde(default)]
    pub vram_sent_bytes: u64,
    #[serde(default)]
    pub vram_changed_pages: u64,
    #[serde(default)]
    pub vram_compared: bool,
}

fn testhost() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("bench binary has no directory")?
        .join("xe-vf-testhost");
    if !path.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p xe-vf-testhost)",
            path.display()
        );
    }
    Ok(path)
}

/// A test host process and its API.
struct HostProc {
    child: Child,
    api: ApiClient,
}

impl HostProc {
    fn start(mut cmd: Command, socket: &Path, log: &Path) -> Result<Self> {
        let log_file = std::fs::File::create(log)?;
        let child = cmd
            .arg("--api-socket")
            .arg(socket)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting xe-vf-testhost")?;
        let api = ApiClient::new(socket).with_timeout(Duration::from_secs(3600));
        let deadline = Instant::now() + Duration::from_secs(30);
        while api.get("vmm.ping").is_err() {
            if Instant::now() > deadline {
                bail!("test host did not answer on {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(HostProc { child, api })
    }

    fn put(&self, endpoint: &str, body: Value) -> Result<Value> {
        let r = self.api.put(endpoint, Some(&body))?;
        if !r.is_success() {
            bail!("{endpoint}: {} {}", r.status, r.error());
        }
        Ok(r.body)
    }

    fn info(&self) -> Result<Value> {
        let r = self.api.get("vm.info")?;
        if !r.is_success() {
            bail!("vm.info: {} {}", r.status, r.error());
        }
        Ok(r.body)
    }

    fn peak_rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |k| k * 1024)
    }
}

impl Drop for HostProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(link: Option<&ShapedLink>, destination: bool, program: &Path) -> Command {
    match link {
        Some(l) => l.command(destination, program),
        None => Command::new(program),
    }
}

/// Runs one migration of the case.
#[allow(clippy::too_many_arguments)]
fn run_one(
    plan: &VmPlan,
    transport: TransportKind,
    link: Option<&ShapedLink>,
    ram: u64,
    vram: u64,
    vfs: usize,
    method: VmMethod,
    rep: usize,
    port: u16,
) -> Result<VmRun> {
    let dir = tempfile::tempdir()?;
    let host = testhost()?;
    let mut src_cmd = command(link, false, &host);
    src_cmd.args(["--memory", &format!("size={ram}")]);
    for i in 0..vfs {
        src_cmd.args([
            "--device",
            &format!(
                "emulated=on,vram={},id=gpu{i},dma_pages={},dma_set={},seed={},bar_rate={}",
                vram,
                // The VM's DMA rate is shared among its VFs.
                (u64::from(plan.dma_pages_per_gib) * ram)
                    .div_ceil((vfs as u64) << 30)
                    .max(1),
                ((ram as f64 * plan.dma_set_percent / 100.0) as u64 / vfs as u64).max(4096) / 4096
                    * 4096,
                0x5eed + i,
                plan.bar_rate
            ),
        ]);
    }
    let src = HostProc::start(
        src_cmd,
        &dir.path().join("src.sock"),
        &dir.path().join("src.log"),
    )?;
    let dst = HostProc::start(
        command(link, true, &host),
        &dir.path().join("dst.sock"),
        &dir.path().join("dst.log"),
    )?;
    for i in 0..vfs {
        src.put(
            "vm.fill-device",
            json!({ "device": format!("gpu{i}"), "seed": 77 + i, "zero_percent": plan.vram_zero_percent }),
        )?;
    }
    let url = match (transport, link) {
        (TransportKind::Unix, _) => format!("unix:{}", dir.path().join("mig.sock").display()),
        (_, Some(l)) => format!("tcp:{}:{port}", l.dst_ip),
        _ => format!("tcp:127.0.0.1:{port}"),
    };
    let timeout_s = plan.case_timeout.as_secs();
    dst.put(
        "vm.arm-migration",
        json!({ "verify": true, "timeout_s": timeout_s, "prefault_vram": true }),
    )?;
    src.put(
        "vm.arm-migration",
        json!({
            "device_state_connections": method != VmMethod::Qemu,
            "vram_precopy": method.vram_precopy(),
            "vram_change_percent": plan.vram_change_percent,
        }),
    )?;
    let receiver = {
        let api = dst.api.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            api.put(
                "vm.receive-migration",
                Some(&json!({ "receiver_url": url })),
            )
        })
    };
    // Let pre-copy start from a VM whose workloads have run a while.
    std::thread::sleep(Duration::from_millis(500));
    src.put(
        "vm.send-migration",
        json!({
            "destination_url": url,
            "downtime_ms": 300,
            "timeout_s": timeout_s,
            "final_pass": method.final_pass(),
        }),
    )?;
    let deadline = Instant::now() + plan.case_timeout;
    let sent = loop {
        let info = src.info()?;
        let last = &info["migration"]["last"];
        if let Some(s) = last.get("sent") {
            break s.clone();
        }
        if let Some(f) = last.get("failed") {
            bail!("migration failed: {f}");
        }
        if Instant::now() > deadline {
            bail!("migration did not finish in {timeout_s} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let answer = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    if !answer.is_success() {
        bail!("receive-migration: {} {}", answer.status, answer.error());
    }
    let received = dst.info()?["migration"]["last"]["received"].clone();
    // Both hosts' logs, next to the results.
    let logs = plan.out_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    for side in ["src", "dst"] {
        let name = format!(
            "{}-{}-{}x{}-{}-{rep}-{side}.log",
            transport.name().replace(':', "-"),
            size(ram).replace(' ', ""),
            vfs,
            size(vram).replace(' ', ""),
            method.name()
        );
        std::fs::copy(dir.path().join(format!("{side}.log")), logs.join(name))?;
    }
    let at_stop = &sent["at_stop"];
    let at_switchover = &received["at_switchover"];
    let same_devices = |a: &Value, b: &Value| {
        let digests = |v: &Value| -> Vec<Value> {
            v["devices"]
                .as_array()
                .map(|d| d.iter().map(|x| x["digest"].clone()).collect())
                .unwrap_or_default()
        };
        digests(a) == digests(b)
    };
    let verified = at_stop["memory_crc32c"] == at_switchover["memory_crc32c"]
        && !at_stop["memory_crc32c"].is_null()
        && same_devices(at_stop, at_switchover);
    if !verified {
        bail!("VERIFICATION FAILED: source at stop {at_stop}, destination {at_switchover}");
    }
    let d = &sent["downtime"];
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    // The destination's checksum of all memory and VF state, taken while
    // the VM waits to resume, is the benchmark's check, not downtime.
    let check_ms = f(&received["fingerprint_ms"]);
    let lanes: Vec<&Value> = d["vram"]
        .as_array()
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    let vram_sum = |key: &str| lanes.iter().map(|v| u(&v[key])).sum::<u64>();
    Ok(VmRun {
        transport: transport.name(),
        ram,
        vfs,
        vram,
        method,
        rep,
        downtime_ms: f(&sent["downtime_ms"]) - check_ms,
        final_memory_ms: f(&d["final_memory_ms"]),
        device_state_ms: f(&d["device_state_ms"]),
        switchover_ms: f(&d["switchover_ms"]) - check_ms,
        total_ms: f(&sent["total_ms"]),
        final_pass_bytes: u(&sent["final_pass_bytes"]),
        cpu_dirty_bytes: u(&d["cpu_dirty_bytes"]),
        dma_bytes: u(&d["dma_bytes"]),
        differing_bytes: u(&received["differing_bytes"]),
        digest_bytes: u(&d["verify"]["digest_bytes"]),
        device_bytes: u(&sent["device_bytes"]),
        dma_pages: d["dma_pages"].as_str().unwrap_or("").to_string(),
        decision: d["decision"].clone(),
        verified,
        src_peak_rss: src.peak_rss(),
        dst_peak_rss: dst.peak_rss(),
        vram_precopy_ms: lanes
            .iter()
            .map(|v| f(&v["precopy_ms"]))
            .fold(0.0, f64::max),
        vram_held_bytes: vram_sum("held_bytes"),
        vram_sent_bytes: vram_sum("sent_bytes"),
        vram_changed_pages: vram_sum("changed_pages"),
        vram_compared: !lanes.is_empty() && lanes.iter().all(|v| v["compared"] == true),
    })
}

/// Link rate from a hot buffer into a hot buffer (bytes per second).
fn probe_link(transport: TransportKind, link: Option<&ShapedLink>, bytes: u64) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let mut dst = command(link, true, &exe);
    dst.args([
        "probe",
        "--role",
        "destination",
        "--transport",
        &transport.name(),
    ]);
    if let Some(l) = link {
        dst.args(["--listen", &l.dst_ip]);
    }
    let mut dst = dst.stdout(Stdio::piped()).spawn()?;
    let mut out = std::io::BufReader::new(dst.stdout.take().context("probe stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    let address = line
        .trim()
        .strip_prefix("READY ")
        .context("probe not ready")?
        .to_string();
    let status = command(link, false, &exe)
        .args([
            "probe",
            "--role",
            "source",
            "--transport",
            &transport.name(),
        ])
        .args(["--address", &address, "--bytes", &bytes.to_string()])
        .status()?;
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest)?;
    let _ = dst.wait();
    if !status.success() {
        bail!("link probe failed");
    }
    let secs: f64 = rest.trim().parse().context("probe result")?;
    Ok(bytes as f64 / secs)
}

/// The rows of the table: per case and method, medians over reps.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRow {
    pub transport: String,
    pub ram: u64,
    pub vfs: usize,
    pub vram: u64,
    pub method: String,
    pub reps: usize,
    pub downtime_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub final_memory_ms: f64,
    pub device_state_ms: f64,
    pub switchover_ms: f64,
    pub final_pass_mib: f64,
    /// Whole migration, from send-migration to the destination running.
    #[serde(default)]
    pub total_ms: f64,
    #[serde(default)]
    pub src_peak_rss_mib: f64,
    #[serde(default)]
    pub dst_peak_rss_mib: f64,
    pub note: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn rows(runs: &[VmRun], link_rates: &BTreeMap<String, f64>) -> Vec<VmRow> {
    let mut out = Vec::new();
    let mut keys: Vec<(String, u64, usize, u64)> = runs
        .iter()
        .map(|r| (r.transport.clone(), r.ram, r.vfs, r.vram))
        .collect();
    keys.dedup();
    keys.sort();
    keys.dedup();
    for (t, ram, vfs, vram) in keys {
        let case: Vec<&VmRun> = runs
            .iter()
            .filter(|r| r.transport == t && r.ram == ram && r.vfs == vfs && r.vram == vram)
            .collect();
        for m in VmMethod::ALL {
            let of: Vec<&&VmRun> = case.iter().filter(|r| r.method == m).collect();
            if of.is_empty() {
                continue;
            }
            let med = |f: fn(&VmRun) -> f64| median(of.iter().map(|r| f(r)).collect());
            let downtimes: Vec<f64> = of.iter().map(|r| r.downtime_ms).collect();
            let modes: Vec<&str> = of.iter().map(|r| r.dma_pages.as_str()).collect();
            out.push(VmRow {
                transport: t.clone(),
                ram,
                vfs,
                vram,
                method: m.name().into(),
                reps: of.len(),
                downtime_ms: med(|r| r.downtime_ms),
                min_ms: downtimes.iter().copied().fold(f64::MAX, f64::min),
                max_ms: downtimes.iter().copied().fold(0.0, f64::max),
                final_memory_ms: med(|r| r.final_memory_ms),
                device_state_ms: med(|r| r.device_state_ms),
                switchover_ms: med(|r| r.switchover_ms),
                final_pass_mib: med(|r| r.final_pass_bytes as f64) / MIB,
                total_ms: med(|r| r.total_ms),
                src_peak_rss_mib: med(|r| r.src_peak_rss as f64) / MIB,
                dst_peak_rss_mib: med(|r| r.dst_peak_rss as f64) / MIB,
                note: match m {
                    VmMethod::Qemu => String::new(),
                    VmMethod::Ours => format!(
                        "DMA pages: {}; {:.1} MiB differed",
                        modes.join("/"),
                        median(of.iter().map(|r| r.differing_bytes as f64).collect()) / MIB
                    ),
                    VmMethod::OursVram => format!(
                        "DMA pages: {}; VRAM pre-copy {:.0} ms, compared: {}; stop-copy sent \
                         {:.1} MiB, {:.1} MiB from pre-copy",
                        modes.join("/"),
                        med(|r| r.vram_precopy_ms),
                        if of.iter().all(|r| r.vram_compared) {
                            "yes"
                        } else {
                            "not all"
                        },
                        med(|r| r.vram_sent_bytes as f64) / MIB,
                        med(|r| r.vram_held_bytes as f64) / MIB
                    ),
                },
            });
        }
        // The limit: what really changed, at the link's hot-buffer rate.
        // With VRAM pre-copy in the case, of the VFs' streams only what
        // pre-copy did not already hold.
        let with_vram: Vec<&&VmRun> = case
            .iter()
            .filter(|r| r.method == VmMethod::OursVram)
            .collect();
        let ours: Vec<&&VmRun> = if with_vram.is_empty() {
            case.iter().filter(|r| r.method == VmMethod::Ours).collect()
        } else {
            with_vram
        };
        if let (Some(rate), false) = (link_rates.get(&t), ours.is_empty()) {
            let changed = median(
                ours.iter()
                    .map(|r| {
                        let device = if r.method == VmMethod::OursVram {
                            r.vram_sent_bytes
                        } else {
                            r.device_bytes
                        };
                        (r.cpu_dirty_bytes + r.differing_bytes + device) as f64
                    })
                    .collect(),
            );
            let ms = changed / rate * 1e3;
            out.push(VmRow {
                transport: t.clone(),
                ram,
                vfs,
                vram,
                method: "limit".into(),
                reps: ours.len(),
                downtime_ms: ms,
                min_ms: ms,
                max_ms: ms,
                final_memory_ms: 0.0,
                device_state_ms: 0.0,
                switchover_ms: 0.0,
                final_pass_mib: changed / MIB,
                total_ms: 0.0,
                src_peak_rss_mib: 0.0,
                dst_peak_rss_mib: 0.0,
                note: format!(
                    "{:.1} MiB changed at {:.0} MiB/s",
                    changed / MIB,
                    rate / MIB
                ),
            });
        }
        out.push(VmRow {
            transport: t.clone(),
            ram,
            vfs,
            vram,
            method: "upstream-ch".into(),
            reps: 0,
            downtime_ms: 0.0,
            min_ms: 0.0,
            max_ms: 0.0,
            final_memory_ms: 0.0,
            device_state_ms: 0.0,
            switchover_ms: 0.0,
            final_pass_mib: 0.0,
            total_ms: 0.0,
            src_peak_rss_mib: 0.0,
            dst_peak_rss_mib: 0.0,
            note: "refuses: the VF has no DMA logging".into(),
        });
    }
    out
}

fn size(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{} GiB", b >> 30)
    } else {
        format!("{} MiB", b >> 20)
    }
}

pub fn print(rows: &[VmRow]) {
    println!("| link | RAM | VFs x VRAM | method | downtime ms (median; min-max) | final memory ms | device state ms | switch-over ms | final pass MiB | total ms | peak RSS MiB src / dst | note |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        if r.reps == 0 {
            println!(
                "| {} | {} | {} x {} | {} | refuses | | | | | | | {} |",
                r.transport,
                size(r.ram),
                r.vfs,
                size(r.vram),
                r.method,
                r.note
            );
            continue;
        }
        println!(
            "| {} | {} | {} x {} | {} | {:.0} ({:.0}-{:.0}) | {:.0} | {:.0} | {:.0} | {:.1} | {} | {} | {} |",
            r.transport,
            size(r.ram),
            r.vfs,
            size(r.vram),
            r.method,
            r.downtime_ms,
            r.min_ms,
            r.max_ms,
            r.final_memory_ms,
            r.device_state_ms,
            r.switchover_ms,
            r.final_pass_mib,
            if r.total_ms > 0.0 {
                format!("{:.0}", r.total_ms)
            } else {
                String::new()
            },
            if r.src_peak_rss_mib > 0.0 {
                format!("{:.0} / {:.0}", r.src_peak_rss_mib, r.dst_peak_rss_mib)
            } else {
                String::new()
            },
            r.note
        );
    }
}

/// The whole-VM targets that this run can speak to.
pub fn targets(rows: &[VmRow]) {
    let find = |t: &str, ram: u64, vram: u64, vfs: usize, m: &str| {
        rows.iter()
            .find(|r| {
                r.transport == t
                    && r.ram == ram
                    && r.vram == vram
                    && r.vfs == vfs
                    && r.method == m
                    && r.reps > 0
            })
            .map(|r| r.downtime_ms)
    };
    println!("\n| target | value | holds |\n|---|---|---|");
    let mut cases: Vec<(String, u64, u64)> = rows
        .iter()
        .map(|r| (r.transport.clone(), r.ram, r.vram))
        .collect();
    cases.sort();
    cases.dedup();
    for (t, ram, vram) in cases {
        let bound = if t.contains("1gbit") {
            0.3
        } else if t.contains("10gbit") {
            0.6
        } else {
            1.0
        };
        if let (Some(o), Some(q)) = (
            find(&t, ram, vram, 1, "ours"),
            find(&t, ram, vram, 1, "qemu"),
        ) {
            println!(
                "| {t} {} RAM, VF {}: ours <= {bound} x QEMU style (1 VF) | {:.2} x | {} |",
                size(ram),
                size(vram),
                o / q,
                if o / q <= bound { "yes" } else { "NO" }
            );
        }
        if let (Some(v), Some(o), Some(q)) = (
            find(&t, ram, vram, 1, "ours-vram"),
            find(&t, ram, vram, 1, "ours"),
            find(&t, ram, vram, 1, "qemu"),
        ) {
            let want = |bound: f64| {
                if t.contains("10gbit") {
                    format!("<= {bound}")
                } else {
                    "(reference)".into()
                }
            };
            let holds = |x: f64, bound: f64| {
                if !t.contains("10gbit") {
                    "-"
                } else if x <= bound {
                    "yes"
                } else {
                    "NO"
                }
            };
            println!(
                "| {t} {} RAM, VF {}: ours-vram {} x ours (pre-copy off) | {:.2} x | {} |",
                size(ram),
                size(vram),
                want(0.35),
                v / o,
                holds(v / o, 0.35)
            );
            println!(
                "| {t} {} RAM, VF {}: ours-vram {} x QEMU style | {:.2} x | {} |",
                size(ram),
                size(vram),
                want(0.15),
                v / q,
                holds(v / q, 0.15)
            );
        }
        for m in ["ours-vram", "ours", "qemu"] {
            if let (Some(two), Some(one)) = (find(&t, ram, vram, 2, m), find(&t, ram, vram, 1, m)) {
                let ours = m.starts_with("ours");
                let want = if ours { "<= 1.3" } else { "(reference)" };
                let holds = if ours {
                    if two / one <= 1.3 {
                        "yes"
                    } else {
                        "NO"
                    }
                } else {
                    "-"
                };
                println!(
                    "| {t} {} RAM, VFs {}: {m} two VFs {want} x one VF | {:.2} x | {holds} |",
                    size(ram),
                    size(vram),
                    two / one
                );
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Output {
    elapsed_s: f64,
    link_rates: BTreeMap<String, f64>,
    rows: Vec<VmRow>,
    runs: Vec<VmRun>,
}

pub fn run(plan: &VmPlan) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&plan.out_dir)?;
    let mut runs = Vec::new();
    let mut link_rates = BTreeMap::new();
    let mut port = 7900u16;
    for (index, &transport) in plan.transports.iter().enumerate() {
        let link = match transport {
            TransportKind::Veth { rate_bit_s } => match netns::unavailable() {
                Some(why) => {
                    eprintln!("{}: skipped: {why}", transport.name());
                    continue;
                }
                None => Some(ShapedLink::create(rate_bit_s, (index % 256) as u8 + 64)?),
            },
            _ => None,
        };
        let rate = probe_link(transport, link.as_ref(), 512 << 20)?;
        eprintln!(
            "{}: hot-buffer link rate {:.0} MiB/s",
            transport.name(),
            rate / MIB
        );
        link_rates.insert(transport.name(), rate);
        for (&ram, &vram) in plan
            .rams
            .iter()
            .flat_map(|r| plan.vrams.iter().map(move |v| (r, v)))
        {
            for &vfs in &plan.vfs {
                for rep in 0..plan.reps {
                    for &method in &plan.methods {
                        port = port.wrapping_add(1).max(7900);
                        eprintln!(
                            "{} RAM {} {vfs} x VF {} {} rep {rep}...",
                            transport.name(),
                            size(ram),
                            size(vram),
                            method.name()
                        );
                        let r = run_one(
                            plan,
                            transport,
                            link.as_ref(),
                            ram,
                            vram,
                            vfs,
                            method,
                            rep,
                            port,
                        )
                        .with_context(|| {
                            format!("{} {} {}", transport.name(), size(ram), method.name())
                        })?;
                        eprintln!(
                            "  downtime {:.0} ms (memory {:.0}, devices {:.0}, switch-over {:.0}), DMA pages {}, verified",
                            r.downtime_ms, r.final_memory_ms, r.device_state_ms, r.switchover_ms, r.dma_pages
                        );
                        runs.push(r);
                    }
                }
            }
        }
    }
    let rows = rows(&runs, &link_rates);
    print(&rows);
    targets(&rows);
    let out = Output {
        elapsed_s: started.elapsed().as_secs_f64(),
        link_rates,
        rows: rows.clone(),
        runs,
    };
    let json = plan.out_dir.join("vm-results.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&out)?)?;
    let png = plan.out_dir.join("vm-downtime.png");
    if let Err(e) = crate::plot::vm_downtime(&rows, &png) {
        eprintln!("plot: {e:#}");
    }
    println!("\nwrote {} and {}", json.display(), png.display());
    Ok(())
}

/// Prints the table again from an earlier `vm-results.json`.
pub fn rerender(input: &Path, png: &Path) -> Result<()> {
    let out: Output = serde_json::from_slice(&std::fs::read(input)?)?;
    print(&out.rows);
    targets(&out.rows);
    crate::plot::vm_downtime(&out.rows, png)
}
