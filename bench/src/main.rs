// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `xe-vf-bench`: downtime and throughput of moving an Xe VF's state
//! (VRAM included) between two processes, for our engine against the copy
//! limit and the upstream Cloud Hypervisor and QEMU styles.
//!
//! `xe-vf-bench run` drives everything; it re-executes itself as
//! `xe-vf-bench worker --role source|destination` for each side of each
//! transfer, so every method pays for two processes and a real link.

mod netns;
mod orchestrate;
mod plot;
mod report;
mod transport;
mod vm;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use transport::TransportKind;
use worker::{Case, Method, Role};

#[derive(Parser)]
#[command(
    name = "xe-vf-bench",
    about = "Xe VF state transfer benchmark",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole matrix and write the table, JSON and plot.
    Run {
        /// VRAM sizes, e.g. 256M,1G,4G.
        #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
        sizes: Vec<String>,
        /// Shares of zero pages in percent.
        #[arg(long, value_delimiter = ',', default_value = "0,50,90")]
        zeros: Vec<u8>,
        /// Methods to run.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "limit,upstream-ch,qemu,ours"
        )]
        methods: Vec<Method>,
        /// Links to run over: unix, tcp (loopback), veth or veth:RATE
        /// (e.g. veth:1gbit; two network namespaces joined by a veth pair
        /// shaped to RATE, needs root, `ip` and `tc`).
        #[arg(long, value_delimiter = ',', default_value = "unix")]
        transports: Vec<TransportKind>,
        /// Wall-clock bound of one transfer in seconds; a transfer that
        /// runs longer is killed and reported as skipped.
        #[arg(long, default_value_t = 180)]
        case_timeout: u64,
        /// Repetitions per case at sizes below 4 GiB.
        #[arg(long, default_value_t = 2)]
        reps: usize,
        /// Repetitions per case at 4 GiB and above.
        #[arg(long, default_value_t = 1)]
        big_reps: usize,
        /// Where the JSON and PNG go.
        #[arg(long, default_value = "target/bench")]
        out_dir: PathBuf,
    },
    /// Prints the table and targets again from earlier `results.json`
    /// files (merged) and redraws the plot.
    Report {
        /// results.json files written by `run`.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Where the plot goes.
        #[arg(long, default_value = "target/bench/downtime.png")]
        png: PathBuf,
    },
    /// Whole-VM downtime: two test hosts migrate a VM (RAM, VFs, vCPU and
    /// VF DMA workloads running), QEMU style against ours, with the limit.
    Vm {
        /// Guest RAM sizes.
        #[arg(long, value_delimiter = ',', default_value = "1G,4G")]
        ram: Vec<String>,
        /// VRAM of each VF (one case per size).
        #[arg(long, value_delimiter = ',', default_value = "1G")]
        vram: Vec<String>,
        /// VF counts.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        vfs: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "unix")]
        transports: Vec<TransportKind>,
        #[arg(long, value_delimiter = ',', default_value = "qemu,ours,ours-vram")]
        methods: Vec<vm::VmMethod>,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Guest pages the VFs' workloads DMA per iteration (about 2000
        /// a second, shared among the VFs), per GiB of guest RAM.
        #[arg(long, default_value_t = 12)]
        dma_pages_per_gib: u32,
        /// Share of guest RAM (percent) the VFs' DMA keeps writing into.
        #[arg(long, default_value_t = 2.0)]
        dma_set_percent: f64,
        /// Share of zero pages in each VF's VRAM.
        #[arg(long, default_value_t = 50)]
        vram_zero_percent: u8,
        /// Share of each VF's VRAM its work rewrites after pre-copy (in
        /// every method, at the same point).
        #[arg(long, default_value_t = 10)]
        vram_change_percent: u8,
        /// BAR read rate of the emulated VFs (per second).
        #[arg(long, default_value = "128M")]
        bar_rate: String,
        #[arg(long, default_value_t = 600)]
        case_timeout: u64,
        #[arg(long, default_value = "target/bench-vm")]
        out_dir: PathBuf,
    },
    /// Prints the whole-VM table again from a `vm-results.json`.
    VmReport {
        input: PathBuf,
        #[arg(long, default_value = "target/bench-vm/vm-downtime.png")]
        png: PathBuf,
    },
    /// One side of a link-rate probe (run by `vm`).
    #[command(hide = true)]
    Probe {
        #[arg(long, value_enum)]
        role: Role,
        #[arg(long)]
        transport: TransportKind,
        #[arg(long)]
        address: Option<String>,
        #[arg(long)]
        listen: Option<String>,
        #[arg(long, default_value_t = 0)]
        bytes: u64,
    },
    /// Measures the page-digest functions of the verify pass on this
    /// machine (one thread each, then the fastest on 1..=N threads).
    HashRates {
        /// Most threads to try.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// One side of one transfer (run by `run`).
    #[command(hide = true)]
    Worker {
        #[arg(long, value_enum)]
        role: Role,
        #[arg(long, value_enum)]
        method: Method,
        #[arg(long)]
        vram: u64,
        #[arg(long)]
        zero_percent: u8,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        transport: TransportKind,
        #[arg(long)]
        address: Option<String>,
        /// IP a veth destination listens on.
        #[arg(long)]
        listen: Option<String>,
    },
}

/// Prints the measured digest rates as the migration sees them.
fn hash_rates(threads: usize) -> anyhow::Result<()> {
    use migration_ext::verify::{rates, DigestKey, PageDigester};
    let key = DigestKey::random()?;
    let ranked = rates::measure_functions(&key);
    for r in &ranked {
        println!(
            "{:16} 1 thread: {:7.0} MiB/s",
            r.function.name(),
            r.bytes_per_s / f64::from(1 << 20)
        );
    }
    let best = PageDigester::new(ranked[0].function, &key);
    for n in 1..=threads.max(1) {
        println!(
            "{:16} {n} thread(s) through the final-pass code: {:7.0} MiB/s",
            best.function().name(),
            rates::measure_parallel(&best, n)? / f64::from(1 << 20)
        );
    }
    Ok(())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let result = match Cli::parse().command {
        Command::Run {
            sizes,
            zeros,
            methods,
            transports,
            reps,
            big_reps,
            out_dir,
            case_timeout,
        } => orchestrate::run(&orchestrate::Plan {
            sizes,
            zeros,
            methods,
            transports,
            reps,
            big_reps,
            out_dir,
            case_timeout: std::time::Duration::from_secs(case_timeout),
        }),
        Command::Report { inputs, png } => report::rerender(&inputs, &png),
        Command::HashRates { threads } => hash_rates(threads),
        Command::Vm {
            ram,
            vram,
            vfs,
            transports,
            methods,
            reps,
            dma_pages_per_gib,
            dma_set_percent,
            vram_zero_percent,
            vram_change_percent,
            bar_rate,
            case_timeout,
            out_dir,
        } => (|| {
            vm::run(&vm::VmPlan {
                rams: orchestrate::parse_sizes(&ram)?,
                vrams: orchestrate::parse_sizes(&vram)?,
                vfs,
                transports,
                methods,
                reps,
                dma_pages_per_gib,
                dma_set_percent,
                vram_zero_percent,
                vram_change_percent,
                bar_rate: orchestrate::parse_sizes(std::slice::from_ref(&bar_rate))?
                    .first()
                    .copied()
                    .unwrap_or(128 << 20),
                out_dir,
                case_timeout: std::time::Duration::from_secs(case_timeout),
            })
        })(),
        Command::VmReport { input, png } => vm::rerender(&input, &png),
        Command::Probe {
            role,
            transport,
            address,
            listen,
            bytes,
        } => transport::probe(
            role,
            transport,
            address.as_deref(),
            listen.as_deref(),
            bytes,
        ),
        Command::Worker {
            role,
            method,
            vram,
            zero_percent,
            seed,
            transport,
            address,
            listen,
        } => worker::run(
            role,
            &Case {
                method,
                vram,
                zero_percent,
                seed,
                transport,
            },
            address.as_deref(),
            listen.as_deref(),
        ),
    };
    if let Err(e) = result {
        eprintln!("xe-vf-bench: {e:#}");
        std::process::exit(1);
    }
}
