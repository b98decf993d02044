// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Runs the matrix: for every transport, size, zero share and repetition,
//! each method as a destination process and a source process; checks the
//! digests and collects the figures.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use xe_vf_plugin::device_config::parse_size;

use crate::netns::{self, ShapedLink};
use crate::report;
use crate::transport::{rate_label, TransportKind};
use crate::worker::{device_bytes, Case, Method, WorkerReport};

const GIB: u64 = 1 << 30;
/// Seed of the VRAM contents (the same for every method).
const SEED: u64 = 0x00be_11c4;

pub struct Plan {
    pub sizes: Vec<String>,
    pub zeros: Vec<u8>,
    pub methods: Vec<Method>,
    pub transports: Vec<TransportKind>,
    pub reps: usize,
    pub big_reps: usize,
    pub out_dir: PathBuf,
    /// Wall-clock bound of one transfer.
    pub case_timeout: Duration,
}

/// One transfer as measured, or why it did not run.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub method: Method,
    pub transport: TransportKind,
    pub vram: u64,
    pub zero_percent: u8,
    pub rep: usize,
    /// `None` when the transfer ran; the reason it was skipped otherwise.
    pub skipped: Option<String>,
    pub downtime_ms: f64,
    pub throughput_mib_s: f64,
    pub device_bytes: u64,
    pub wire_bytes: u64,
    pub src_peak_rss: u64,
    pub dst_peak_rss: u64,
    pub src_cpu_s: f64,
    pub dst_cpu_s: f64,
    pub src: Option<WorkerReport>,
    pub dst: Option<WorkerReport>,
}

/// Set by SIGINT/SIGTERM: the run stops at the next poll and unwinds, so
/// the veth namespaces are deleted on the way out.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; the handler only stores to an atomic, which is
        // async-signal-safe; the pointers passed outlive the call.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            log::warn!("sigaction({sig}): {}", std::io::Error::last_os_error());
        }
    }
}

/// Sizes as the command line gives them (`256M`, `1G`, ...), in bytes.
pub fn parse_sizes(list: &[String]) -> Result<Vec<u64>> {
    list.iter()
        .map(|s| parse_size(s).map_err(|e| anyhow::anyhow!("size '{s}': {e}")))
        .collect()
}

pub fn run(plan: &Plan) -> Result<()> {
    let started = Instant::now();
    if plan
        .transports
        .iter()
        .any(|t| matches!(t, TransportKind::Veth { .. }))
    {
        catch_interrupts();
    }
    let sizes = parse_sizes(&plan.sizes)?;
    if let Some(z) = plan.zeros.iter().find(|z| **z > 100) {
        bail!("zero share {z} is not a percentage");
    }
    std::fs::create_dir_all(&plan.out_dir)?;
    let mut all = Vec::new();
    let mut group = 0usize;
    for (index, &transport) in plan.transports.iter().enumerate() {
        let link = match transport {
            TransportKind::Veth { rate_bit_s } => {
                let made = match netns::unavailable() {
                    Some(why) => Err(why),
                    None => ShapedLink::create(rate_bit_s, (index % 256) as u8)
                        .map_err(|e| format!("veth setup failed: {e:#}")),
                };
                match made {
                    Ok(link) => {
                        eprintln!("{} shaping:\n{}", transport.name(), link.qdiscs.trim_end());
                        Some(link)
                    }
                    Err(why) => {
                        eprintln!("skipping {}: {why}", transport.name());
                        for &vram in &sizes {
                            for &zero_percent in &plan.zeros {
                                for &method in &plan.methods {
                                    let case = Case {
                                        method,
                                        vram,
                                        zero_percent,
                                        seed: SEED,
                                        transport,
                                    };
                                    all.push(skipped(&case, 0, format!("skipped: {why}")));
                                }
                            }
                        }
                        continue;
                    }
                }
            }
            TransportKind::Unix | TransportKind::Tcp => None,
        };
        for &vram in &sizes {
            let reps = if vram >= 4 * GIB {
                plan.big_reps
            } else {
                plan.reps
            };
            for &zero_percent in &plan.zeros {
                for rep in 0..reps.max(1) {
                    // Alternate the order from one group of runs to the
                    // next, so no method always runs first or last.
                    let mut order = plan.methods.clone();
                    if group % 2 == 1 {
                        order.reverse();
                    }
                    group += 1;
                    for method in order {
                        let case = Case {
                            method,
                            vram,
                            zero_percent,
                            seed: SEED,
                            transport,
                        };
                        let m = run_case(&case, rep, link.as_ref(), plan.case_timeout)?;
                        eprintln!(
                            "[{:>6.1}s] {:<11} {:>5} MiB {:>3}% zeros rep {} {:<12} {}",
                            started.elapsed().as_secs_f64(),
                            transport.name(),
                            vram >> 20,
                            zero_percent,
                            rep,
                            method.name(),
                            match &m.skipped {
                                Some(why) => why.clone(),
                                None => format!(
                                    "{:.1} ms {:.0} MiB/s rss {}/{} MiB",
                                    m.downtime_ms,
                                    m.throughput_mib_s,
                                    m.src_peak_rss >> 20,
                                    m.dst_peak_rss >> 20
                                ),
                            }
                        );
                        all.push(m);
                    }
                }
            }
        }
    }
    let elapsed = started.elapsed();
    report::write(&all, &plan.out_dir, elapsed)?;
    Ok(())
}

/// Bytes of RAM the case needs beyond a few buffers: both VRAM memfds
/// (their non-zero pages) and, for the upstream style, the blob, its
/// base64 and its JSON copy on both sides.
fn memory_estimate(case: &Case) -> u64 {
    let v = device_bytes(case);
    let resident = v / 100 * u64::from(100 - case.zero_percent);
    let copies = match case.method {
        // Source: blob then base64 and JSON (1.34 V each) at once;
        // destination: JSON and the parsed string, then the decoded blob.
        Method::UpstreamCh => v / 100 * 280,
        // The destination's pre-faulted stream copy and the VF that made
        // it.
        Method::Limit => v + resident,
        _ => 0,
    };
    2 * resident + copies + GIB / 2
}

fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|k| k * 1024)
}

fn skipped(case: &Case, rep: usize, why: String) -> Measurement {
    Measurement {
        method: case.method,
        transport: case.transport,
        vram: case.vram,
        zero_percent: case.zero_percent,
        rep,
        skipped: Some(why),
        downtime_ms: 0.0,
        throughput_mib_s: 0.0,
        device_bytes: device_bytes(case),
        wire_bytes: 0,
        src_peak_rss: 0,
        dst_peak_rss: 0,
        src_cpu_s: 0.0,
        dst_cpu_s: 0.0,
        src: None,
        dst: None,
    }
}

/// A worker process for one side; inside its namespace on a veth link.
fn worker_command(case: &Case, role: &str, link: Option<&ShapedLink>) -> Result<Command> {
    let exe = std::env::current_exe()?;
    let destination = role == "destination";
    let mut cmd = match link {
        Some(link) => link.command(destination, &exe),
        None => Command::new(&exe),
    };
    cmd.args(["worker", "--role", role, "--method", case.method.name()])
        .args(["--vram", &case.vram.to_string()])
        .args(["--zero-percent", &case.zero_percent.to_string()])
        .args(["--seed", &case.seed.to_string()])
        .args(["--transport", &case.transport.name()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let (Some(link), true) = (link, destination) {
        cmd.args(["--listen", &link.dst_ip]);
    }
    Ok(cmd)
}

/// Waits for `child` until `deadline`; `None` if it is still running.
fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if INTERRUPTED.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes a method puts on the wire for a case, roughly.
fn wire_estimate(case: &Case) -> u64 {
    let v = device_bytes(case);
    match case.method {
        Method::Limit | Method::Qemu => v,
        Method::UpstreamCh => v / 3 * 4,
        Method::Ours => v / 100 * u64::from(100 - case.zero_percent),
    }
}

/// Why a case cannot finish within `budget` on a shaped link, if so.
fn over_budget(case: &Case, budget: Duration) -> Option<String> {
    let TransportKind::Veth { rate_bit_s } = case.transport else {
        return None;
    };
    let wire_s = wire_estimate(case) as f64 * 8.0 / rate_bit_s as f64;
    (wire_s > 0.8 * budget.as_secs_f64()).then(|| {
        format!(
            "skipped: ~{wire_s:.0} s of wire time at {} exceeds the {} s case budget",
            rate_label(rate_bit_s),
            budget.as_secs()
        )
    })
}

/// Kills a worker this run started, by its own handle.
fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn last_report(out: &str, role: &str) -> Result<WorkerReport> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("{role} printed no report"))?;
    Ok(serde_json::from_str(line)?)
}

fn run_case(
    case: &Case,
    rep: usize,
    link: Option<&ShapedLink>,
    timeout: Duration,
) -> Result<Measurement> {
    if let Some(why) = over_budget(case, timeout) {
        return Ok(skipped(case, rep, why));
    }
    let need = memory_estimate(case);
    let available = mem_available().unwrap_or(0);
    if need + GIB > available {
        return Ok(skipped(
            case,
            rep,
            format!(
                "OOM/skipped (needs ~{:.1} GiB, {:.1} GiB available)",
                need as f64 / GIB as f64,
                available as f64 / GIB as f64
            ),
        ));
    }

    let deadline = Instant::now() + timeout;
    let mut dst = worker_command(case, "destination", link)?.spawn()?;
    let mut dst_out = BufReader::new(dst.stdout.take().context("destination stdout")?);
    let mut line = String::new();
    dst_out.read_line(&mut line)?;
    let Some(address) = line.trim().strip_prefix("READY ").map(str::to_string) else {
        reap(&mut dst);
        bail!(
            "{}: destination did not get ready: {line:?}",
            case.method.name()
        );
    };
    let mut src = worker_command(case, "source", link)?
        .args(["--address", &address])
        .spawn()?;
    let waited = wait_until(&mut src, deadline).and_then(|src_status| {
        let dst_status = match src_status {
            Some(s) if s.success() => wait_until(&mut dst, deadline)?,
            _ => None,
        };
        Ok((src_status, dst_status))
    });
    let (src_status, dst_status) = match waited {
        Ok(w) => w,
        Err(e) => {
            reap(&mut src);
            reap(&mut dst);
            return Err(e);
        }
    };
    let (Some(src_status), Some(status)) = (src_status, dst_status) else {
        reap(&mut src);
        reap(&mut dst);
        if src_status.is_some_and(|s| !s.success()) {
            bail!("{}: source failed ({src_status:?})", case.method.name());
        }
        return Ok(skipped(
            case,
            rep,
            format!("timed out after {} s (killed)", timeout.as_secs()),
        ));
    };
    if !src_status.success() {
        bail!("{}: source failed ({src_status})", case.method.name());
    }
    if !status.success() {
        bail!("{}: destination failed ({status})", case.method.name());
    }
    let mut src_stdout = String::new();
    src.stdout
        .take()
        .context("source stdout")?
        .read_to_string(&mut src_stdout)?;
    let mut rest = String::new();
    dst_out.read_to_string(&mut rest)?;
    let src = last_report(&src_stdout, "source")?;
    let dst = last_report(&rest, "destination")?;

    if src.digest != dst.digest {
        bail!(
            "{} {} MiB {}% zeros: VERIFICATION FAILED: source {} destination {}",
            case.method.name(),
            case.vram >> 20,
            case.zero_percent,
            src.digest,
            dst.digest
        );
    }
    if src.device_bytes != dst.device_bytes || src.device_bytes != device_bytes(case) {
        bail!(
            "{}: moved {} bytes, received {}, expected {}",
            case.method.name(),
            src.device_bytes,
            dst.device_bytes,
            device_bytes(case)
        );
    }
    let (start, end) = match (src.start_ns, dst.end_ns) {
        (Some(s), Some(e)) if e > s => (s, e),
        _ => bail!("{}: missing or inverted timestamps", case.method.name()),
    };
    let mut downtime_s = (end - start) as f64 / 1e9;
    if case.method == Method::Limit {
        // The slowest stage bounds any pipeline of the three.
        let stage = |r: &WorkerReport, name: &str| r.phases.get(name).copied().unwrap_or(0.0) / 1e3;
        downtime_s = downtime_s
            .max(stage(&src, "device_drain"))
            .max(stage(&dst, "device_load"));
    }
    Ok(Measurement {
        method: case.method,
        transport: case.transport,
        vram: case.vram,
        zero_percent: case.zero_percent,
        rep,
        skipped: None,
        downtime_ms: downtime_s * 1e3,
        throughput_mib_s: src.device_bytes as f64 / (1 << 20) as f64 / downtime_s,
        device_bytes: src.device_bytes,
        wire_bytes: src.wire_bytes,
        src_peak_rss: src.peak_rss,
        dst_peak_rss: dst.peak_rss,
        src_cpu_s: src.cpu_s,
        dst_cpu_s: dst.cpu_s,
        src: Some(src),
        dst: Some(dst),
    })
}
