// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `xe-vf-testhost`: a VMM-shaped process with CH's API on a unix socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::error;
use xe_vf_plugin::device_config::parse_size;
use xe_vf_testhost::server;
use xe_vf_testhost::vm::VmConfig;
use xe_vf_testhost::vmm::Vmm;

const DEFAULT_MEMORY: u64 = 64 << 20;

#[derive(Parser, Debug)]
#[command(version, about = "VMM-shaped test host for Xe VF migration")]
struct Args {
    /// Unix socket of the REST API (created with mode 0600).
    #[arg(long)]
    api_socket: PathBuf,
    /// Guest memory, CH syntax: `size=64M`.
    #[arg(long)]
    memory: Option<String>,
    /// A VF, CH `--device` syntax plus our keys (repeatable).
    #[arg(long)]
    device: Vec<String>,
    /// Run the vCPU workload (writes guest memory pages).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    vcpu_workload: String,
    /// Log to this file instead of stderr.
    #[arg(long)]
    log_file: Option<PathBuf>,
}

fn memory_size(arg: &str) -> Result<u64, String> {
    let mut size = None;
    for pair in arg.split(',') {
        match pair.split_once('=') {
            Some(("size", v)) => size = Some(parse_size(v).map_err(|e| format!("size={v}: {e}"))?),
            _ => {
                return Err(format!(
                    "--memory: unknown option '{pair}' (expected size=<N>)"
                ))
            }
        }
    }
    size.ok_or_else(|| "--memory needs size=<N>".to_string())
}

fn init_log(file: Option<&PathBuf>) -> Result<(), String> {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(path) = file {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("--log-file {}: {e}", path.display()))?;
        builder.target(env_logger::Target::Pipe(Box::new(f)));
    }
    builder.init();
    Ok(())
}

fn run(args: Args) -> Result<(), String> {
    let vmm = Arc::new(Vmm::default());
    if args.memory.is_some() || !args.device.is_empty() {
        let size = match &args.memory {
            Some(m) => memory_size(m)?,
            None => DEFAULT_MEMORY,
        };
        let config = VmConfig::from_specs(size, args.vcpu_workload == "on", &args.device)
            .map_err(|e| e.to_string())?;
        vmm.boot_config(config).map_err(|e| e.to_string())?;
    }
    let listener = server::bind(&args.api_socket)
        .map_err(|e| format!("--api-socket {}: {e}", args.api_socket.display()))?;
    server::serve(listener, args.api_socket, vmm).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = init_log(args.log_file.as_ref()) {
        eprintln!("xe-vf-testhost: {e}");
        return ExitCode::FAILURE;
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("xe-vf-testhost: {e}");
            ExitCode::FAILURE
        }
    }
}
