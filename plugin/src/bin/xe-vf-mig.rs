// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `xe-vf-mig`: save, restore, inspect and demo Xe VF migration state, and
//! find, prepare and check VFs on a real host.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use log::info;
use serde_json::json;

use xe_vf_plugin::backend::Backend;
use xe_vf_plugin::device_config::DeviceConfig;
use xe_vf_plugin::emulated::{EmulatedConfig, EmulatedXeVf};
use xe_vf_plugin::engine::{self, TransferOptions};
use xe_vf_plugin::host::{check, device_line, list, prepare, Host};
use xe_vf_plugin::state_format::{StateDecoder, MAGIC};
use xe_vf_plugin::{fsm, proc_stats, xe_stream, DeviceState, MigrationDevice};

#[derive(Parser)]
#[command(
    name = "xe-vf-mig",
    version,
    about = "Xe SR-IOV VF migration: save, restore, inspect, demo; find, prepare and check VFs"
)]
struct Cli {
    /// Hide progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Save an emulated VF with a running workload, restore it into a
    /// second one, and verify every byte of device state.
    Demo {
        /// VRAM (LMEM quota) of the emulated VFs, e.g. 256M, 1G.
        #[arg(long, default_value = "256M")]
        vram: String,
        /// Share of VRAM pages that are all zero.
        #[arg(long, default_value_t = 50)]
        zero_percent: u8,
        /// Stream through this file instead of a socket (a snapshot).
        #[arg(long)]
        via_file: Option<PathBuf>,
        /// Carry zero pages as data.
        #[arg(long)]
        no_zero_elision: bool,
    },
    /// Save a device's migration state into a file.
    Save {
        /// Cloud Hypervisor `--device` syntax, e.g. path=/sys/bus/pci/devices/0000:03:00.1
        /// or emulated=on,vram=256M.
        #[arg(long)]
        device: String,
        #[arg(short, long)]
        output: PathBuf,
        /// Put the device back into RUNNING after the save.
        #[arg(long)]
        resume: bool,
        #[arg(long)]
        no_zero_elision: bool,
    },
    /// Load a device's migration state from a file.
    Restore {
        #[arg(long)]
        device: String,
        #[arg(short, long)]
        input: PathBuf,
        /// Leave the device in STOP instead of RUNNING.
        #[arg(long)]
        stopped: bool,
    },
    /// Show the packets, sizes and descriptor of a saved state.
    Inspect {
        file: PathBuf,
        /// List every packet.
        #[arg(long)]
        packets: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Parse a saved file's data as an Xe packet stream even when its
        /// header names another device kind (a VMM that did not take the
        /// device for an Xe VF carried the stream without parsing it).
        #[arg(long)]
        xe: bool,
    },
    /// Find, prepare and check Xe VFs on this host.
    Host {
        /// Read this directory as if it were / (tests, captured trees);
        /// devices are then never opened.
        #[arg(long, value_name = "DIR", global = true)]
        root: Option<PathBuf>,
        #[command(subcommand)]
        command: HostCommand,
    },
}

/// Devices are given as a PCI address (0000:03:00.1 or 03:00.1), an mdev
/// uuid, or their /sys/bus/pci/devices/ or /sys/bus/mdev/devices/ path.
#[derive(Subcommand)]
enum HostCommand {
    /// List PFs driven by xe and their VFs, or the devices named.
    List {
        devices: Vec<String>,
        #[arg(long)]
        json: bool,
        /// Do not open devices (no migration flags).
        #[arg(long)]
        no_probe: bool,
    },
    /// Enable VFs on an xe PF and bind VFs to xe-vfio-pci (idempotent).
    Prepare {
        /// The PF.
        pf: String,
        /// Number of VFs the PF should have.
        #[arg(long, value_name = "N")]
        num_vfs: Option<u32>,
        /// VFs to bind to xe-vfio-pci: all, VF numbers (1, vf2) or addresses,
        /// comma separated.
        #[arg(long, value_delimiter = ',', value_name = "VF")]
        bind: Vec<String>,
        /// Print every sysfs write instead of making it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check every precondition of snapshot and live migration of a VF.
    /// Exit status: 0 ready, 2 a check failed, 3 something could not be
    /// verified.
    Check {
        device: String,
        #[arg(long)]
        json: bool,
        /// Check access to the VFIO nodes for this user (name or uid, from
        /// /etc/passwd) instead of the caller.
        #[arg(long)]
        user: Option<String>,
        /// Do not open the device.
        #[arg(long)]
        no_probe: bool,
    },
    /// Print the --device argument for Cloud Hypervisor.
    DeviceLine {
        device: String,
        /// Cloud Hypervisor's id= for the device.
        #[arg(long)]
        id: Option<String>,
        /// Print the fd= form for a VFIO cdev the caller opens as this fd.
        #[arg(long, value_name = "N")]
        fd: Option<i32>,
        /// Do not open the device (adds dirty_tracking=all).
        #[arg(long)]
        no_probe: bool,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo {
            ref vram,
            zero_percent,
            ref via_file,
            no_zero_elision,
        } => demo(
            vram,
            zero_percent,
            via_file.as_deref(),
            no_zero_elision,
            cli.quiet,
        ),
        Command::Save {
            ref device,
            ref output,
            resume,
            no_zero_elision,
        } => save(device, output, resume, no_zero_elision, cli.quiet),
        Command::Restore {
            ref device,
            ref input,
            stopped,
        } => restore(device, input, stopped, cli.quiet),
        Command::Inspect {
            ref file,
            packets,
            json,
            xe,
        } => inspect(file, packets, json, xe),
        Command::Host { root, command } => match host_command(root, command) {
            Ok(0) => Ok(()),
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        eprintln!("xe-vf-mig: error: {e:#}");
        std::process::exit(1);
    }
}

/// The host: the running system, or a tree given with --root.
fn host_for(root: &Option<PathBuf>, probe: bool) -> Host {
    match root {
        Some(dir) => Host::tree(dir),
        None => Host::system(probe),
    }
}

/// Runs a host subcommand; returns the exit status.
fn host_command(root: Option<PathBuf>, command: HostCommand) -> Result<i32> {
    match command {
        HostCommand::List {
            devices,
            json,
            no_probe,
        } => {
            let host = host_for(&root, !no_probe);
            if devices.is_empty() {
                let inventory = list::inventory(&host);
                if json {
                    println!("{}", serde_json::to_string_pretty(&inventory)?);
                } else {
                    print!("{}", list::inventory_table(&inventory));
                }
                return Ok(0);
            }
            let mut facts = Vec::new();
            for arg in &devices {
                facts.push(host.facts(&host.device(arg)?));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&facts)?);
            } else {
                print!("{}", list::table(&facts.iter().collect::<Vec<_>>()));
            }
            Ok(0)
        }
        HostCommand::Prepare {
            pf,
            num_vfs,
            bind,
            dry_run,
        } => {
            let host = host_for(&root, false);
            let bind = bind
                .iter()
                .map(|b| {
                    prepare::VfSelector::parse(b).map_err(|e| anyhow::anyhow!("--bind {b}: {e}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let request = prepare::PrepareRequest { pf, num_vfs, bind };
            let plan = prepare::plan(&host, &request)?;
            for note in &plan.notes {
                println!("# {note}");
            }
            if plan.steps.is_empty() {
                println!("# nothing to do");
                return Ok(0);
            }
            if dry_run {
                for step in &plan.steps {
                    println!("{}", step.write);
                }
                return Ok(0);
            }
            prepare::apply(&host, &plan, &mut |w| println!("{w}"))?;
            let problems = prepare::verify(&host, &plan);
            if !problems.is_empty() {
                bail!("{}", problems.join("; "));
            }
            Ok(0)
        }
        HostCommand::Check {
            device,
            json,
            user,
            no_probe,
        } => {
            let host = host_for(&root, !no_probe);
            let cred = match user {
                Some(u) => {
                    check::Credentials::lookup(&host.root, &u).map_err(anyhow::Error::msg)?
                }
                None => check::Credentials::current(),
            };
            let report = check::check(&host, &device, &cred)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", check::render(&report));
            }
            Ok(report.exit_code)
        }
        HostCommand::DeviceLine {
            device,
            id,
            fd,
            no_probe,
        } => {
            let host = host_for(&root, !no_probe);
            let line = device_line::device_line(
                &host,
                &device,
                &device_line::DeviceLineOptions { id, fd },
            )?;
            for note in &line.notes {
                eprintln!("# {note}");
            }
            println!("{}", line.argument);
            Ok(0)
        }
    }
}

/// A bar towards `total` bytes, or without a length when `total` is 0
/// (unknown). `total` may be an estimate: advance it with [`advance`].
fn progress_bar(total: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let (bar, template) = if total == 0 {
        (ProgressBar::no_length(), "{msg} {bytes} {bytes_per_sec}")
    } else {
        (
            ProgressBar::new(total),
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Moves `bar` to `done` bytes. `MIG_DATA_SIZE` is an estimate that a
/// stream can outrun (xe's leaves out the descriptor and trailer): the
/// length then grows with the position, so the bar stays at most full and
/// its byte count never passes its total.
fn advance(bar: &ProgressBar, done: u64) {
    if bar.length().is_some_and(|len| done > len) {
        bar.set_length(done);
    }
    bar.set_position(done);
}

fn transfer_options(no_zero_elision: bool) -> TransferOptions {
    let mut opts = TransferOptions::default();
    opts.encoder.zero_elision = !no_zero_elision;
    opts
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn demo(
    vram: &str,
    zero_percent: u8,
    via_file: Option<&Path>,
    no_zero_elision: bool,
    quiet: bool,
) -> Result<()> {
    let spec = format!("emulated=on,vram={vram}");
    let config = DeviceConfig::parse(&spec).with_context(|| format!("--vram {vram}"))?;
    let emulated = config.emulated.context("demo needs an emulated device")?;
    if zero_percent > 100 {
        bail!("--zero-percent must be 0..=100, got {zero_percent}");
    }
    let source = EmulatedXeVf::new(EmulatedConfig {
        workload: true,
        ..emulated.clone()
    })?;
    let destination = EmulatedXeVf::new(EmulatedConfig {
        workload: false,
        ..emulated
    })?;
    // Guest memory the source VF DMA-writes into while it runs.
    let guest = xe_vf_plugin::emulated::create_memfd("demo-guest-memory", 4 << 20)?;
    source.attach_guest_memory(xe_vf_plugin::emulated::GuestDmaRegion {
        file: guest.try_clone()?,
        offset: 0,
        len: 4 << 20,
    });
    info!("filling {vram} of VRAM ({zero_percent}% zero pages)");
    source.fill_vram(0xdec0de, zero_percent)?;
    // Let the workload change state for a while, as a running guest would.
    std::thread::sleep(Duration::from_millis(200));
    let opts = transfer_options(no_zero_elision);
    let total = source.stop_copy_size()?;
    let bar = progress_bar(total, quiet, "migrating");

    let started = Instant::now();
    let (save, restore) = match via_file {
        Some(path) => {
            let out =
                BufWriter::new(File::create(path).with_context(|| format!("{}", path.display()))?);
            let save = engine::save(&*source, out, &opts, &mut |n| advance(&bar, n))?;
            let input = BufReader::new(File::open(path)?);
            let restore = engine::restore(&*destination, input, &opts, &mut |_| {})?;
            (save, restore)
        }
        None => {
            // Source and destination run concurrently over a socket, as in
            // a live migration.
            let (tx, rx) = UnixStream::pair()?;
            let dst = destination.clone();
            let dst_opts = opts.clone();
            let receiver =
                std::thread::spawn(move || engine::restore(&*dst, rx, &dst_opts, &mut |_| {}));
            let sent = engine::save(&*source, &tx, &opts, &mut |n| advance(&bar, n));
            drop(tx);
            let received = receiver
                .join()
                .map_err(|_| anyhow::anyhow!("restore thread panicked"))?;
            (sent?, received?)
        }
    };
    fsm::walk(&*destination, DeviceState::Running, DeviceState::Stop)?;
    let downtime = started.elapsed();
    bar.finish_and_clear();

    let saved = source.digest()?;
    let restored = destination.digest()?;
    // The workload is off on the destination, so its generation is the
    // restored one.
    let verified = saved == restored;
    let throughput = mib(save.raw_bytes) / downtime.as_secs_f64().max(1e-9);
    let summary = json!({
        "verified": verified,
        "bytes": save.raw_bytes,
        "encoded_bytes": save.encoded_bytes,
        "zero_bytes": save.zero_bytes,
        "downtime_ms": round2(downtime.as_secs_f64() * 1e3),
        "throughput_mib_s": round2(throughput),
        "peak_rss_mib": round2(mib(proc_stats::peak_rss_bytes().unwrap_or(0))),
        "vram_bytes": source.config().vram_size,
        "generation": saved.generation,
        "restored_bytes": restore.decoded.decoded_bytes,
    });
    println!("{summary}");
    if !verified {
        bail!("restored state differs: saved {saved:?}, restored {restored:?}");
    }
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn open(spec: &str) -> Result<Arc<dyn MigrationDevice>> {
    let config = DeviceConfig::parse(spec).with_context(|| format!("--device {spec}"))?;
    if !config.migration {
        bail!("--device {spec}: migration=off");
    }
    Ok(Backend::open(&config)?.device())
}

fn save(spec: &str, output: &Path, resume: bool, no_zero_elision: bool, quiet: bool) -> Result<()> {
    let device = open(spec)?;
    let opts = transfer_options(no_zero_elision);
    let total = device.stop_copy_size().unwrap_or(0);
    let bar = progress_bar(total, quiet, "saving");
    // Written under a temporary name and renamed when complete, so a
    // failed save never leaves a file that looks whole.
    let tmp = output.with_extension("partial");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = BufWriter::new(file);
    let started = Instant::now();
    let report = engine::save(&*device, &mut out, &opts, &mut |n| advance(&bar, n));
    let report = match report.and_then(|r| {
        out.flush()
            .and_then(|()| out.get_ref().sync_all())
            .map(|()| r)
            .map_err(|source| engine::EngineError::Io {
                phase: engine::Phase::Output,
                source,
            })
    }) {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    fs::rename(&tmp, output)?;
    bar.finish_and_clear();
    if resume {
        fsm::walk(&*device, DeviceState::Running, DeviceState::Stop)?;
    }
    println!(
        "{}",
        json!({
            "saved": output,
            "bytes": report.raw_bytes,
            "encoded_bytes": report.encoded_bytes,
            "zero_bytes": report.zero_bytes,
            "stop_copy_ms": round2(report.stop_copy.as_secs_f64() * 1e3),
            "elapsed_ms": round2(started.elapsed().as_secs_f64() * 1e3),
            "device_state": device.state()?.name(),
        })
    );
    Ok(())
}

fn restore(spec: &str, input: &Path, stopped: bool, quiet: bool) -> Result<()> {
    let device = open(spec)?;
    let file = File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress_bar(total, quiet, "restoring");
    let report = engine::restore(
        &*device,
        BufReader::new(file),
        &TransferOptions::default(),
        &mut |n| advance(&bar, n),
    )?;
    bar.finish_and_clear();
    if !stopped {
        fsm::walk(&*device, DeviceState::Running, DeviceState::Stop)?;
    }
    println!(
        "{}",
        json!({
            "restored": input,
            "bytes": report.decoded.decoded_bytes,
            "resuming_ms": round2(report.resuming.as_secs_f64() * 1e3),
            "device_state": device.state()?.name(),
        })
    );
    Ok(())
}

fn inspect(path: &Path, packets: bool, as_json: bool, force_xe: bool) -> Result<()> {
    let mut file =
        BufReader::new(File::open(path).with_context(|| format!("opening {}", path.display()))?);
    let mut magic = [0u8; 8];
    let is_container = file.read_exact(&mut magic).is_ok() && magic == MAGIC;
    let file = BufReader::new(File::open(path)?);
    let (header, inspection, decoded) = if is_container {
        let mut decoder = StateDecoder::new(file)?;
        let header = decoder.header().clone();
        if header.device_kind != xe_vf_plugin::state_format::DEVICE_KIND_XE_VF && !force_xe {
            let summary = xe_vf_plugin::state_format::verify(BufReader::new(File::open(path)?))?;
            return print_inspection(as_json, Some(&header), None, Some(&summary));
        }
        let inspection = xe_stream::inspect(&mut decoder, packets)?;
        let summary = decoder.finish()?;
        (Some(header), inspection, Some(summary))
    } else {
        (None, xe_stream::inspect(file, packets)?, None)
    };
    print_inspection(
        as_json,
        header.as_ref(),
        Some(&inspection),
        decoded.as_ref(),
    )
}

fn print_inspection(
    as_json: bool,
    header: Option<&xe_vf_plugin::state_format::StateHeader>,
    inspection: Option<&xe_stream::Inspection>,
    decoded: Option<&xe_vf_plugin::state_format::DecodeSummary>,
) -> Result<()> {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "container": header,
                "decoded": decoded,
                "xe": inspection,
            }))?
        );
        return Ok(());
    }
    if let Some(h) = header {
        println!(
            "device-state stream: kind {}, device {}, flags {}, estimated {} bytes, chunk {} bytes",
            h.device_kind,
            h.identity,
            xe_vf_plugin::MigrationFlags::from_bits(h.migration_flags),
            h.estimated_size,
            h.chunk_size
        );
    }
    if let Some(d) = decoded {
        println!(
            "  verified: {} device bytes from {} stream bytes ({} zero bytes in {} runs, {} data records), crc32c {:#010x}",
            d.decoded_bytes, d.encoded_bytes, d.zero_bytes, d.zero_records, d.data_records, d.crc
        );
    }
    if let Some(i) = inspection {
        let s = &i.summary;
        println!(
            "Xe packet stream: {} packets, {} bytes, descriptor devid {:#06x} revid {:#04x}",
            s.packets, s.total_bytes, s.descriptor.device_id, s.descriptor.revision_id
        );
        for kind in xe_stream::PacketType::ALL {
            let st = s.stats(kind);
            if st.packets > 0 {
                println!(
                    "  {:<10} {:>8} packets {:>14} bytes",
                    kind.name(),
                    st.packets,
                    st.payload_bytes
                );
            }
        }
        for p in &i.packets {
            let h = &p.header;
            println!(
                "  @{:<12} {:<10} tile {} gt {} offset {:#x} size {}",
                p.stream_offset,
                h.kind.name(),
                h.tile_id,
                h.gt_id,
                h.offset,
                h.size
            );
        }
        if i.packets_truncated {
            println!("  (packet list truncated)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use indicatif::ProgressDrawTarget;

    use super::*;

    #[test]
    fn a_stream_longer_than_its_estimate_keeps_the_bar_at_most_full() {
        let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::hidden());
        advance(&bar, 60);
        assert_eq!((bar.position(), bar.length()), (60, Some(100)));
        advance(&bar, 136);
        assert_eq!((bar.position(), bar.length()), (136, Some(136)));
        // Unknown size: no length, none made up.
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        advance(&bar, 136);
        assert_eq!((bar.position(), bar.length()), (136, None));
    }
}
