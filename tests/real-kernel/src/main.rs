// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest side of the "hardware truth" test.
//!
//! `scripts/real-kernel-test.sh` boots a stock Debian kernel under qemu with
//! this binary in the initramfs, creates two `mtty` mdev instances (the
//! kernel's sample driver, which implements VFIO migration v2) and runs
//!
//! ```text
//! xe-vf-kernel-test /sys/bus/mdev/devices/<uuid-a> /sys/bus/mdev/devices/<uuid-b>
//! ```
//!
//! Everything goes to stdout (the serial console). The host script only
//! trusts one line: `XE-VF-KERNEL-TEST: RESULT pass|fail <json>`, printed
//! last, exactly once; `pass` only if every mandatory check passed. The
//! JSON lists each check with its verdict, details and time.

mod checks;
mod environment;
mod mdev;

use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;

/// Prefix of every line the host script looks at.
pub const TAG: &str = "XE-VF-KERNEL-TEST:";

/// Everything the run learned, printed as the JSON of the RESULT line.
#[derive(Debug, Serialize)]
struct Report {
    environment: environment::Environment,
    devices: Vec<mdev::MdevInfo>,
    checks: checks::ChecksSummary,
}

fn usage() -> String {
    "usage: xe-vf-kernel-test <mdev-sysfs-path-a> <mdev-sysfs-path-b>".to_string()
}

fn parse_args() -> anyhow::Result<[PathBuf; 2]> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    match <[PathBuf; 2]>::try_from(args) {
        Ok(paths) => Ok(paths),
        Err(args) => anyhow::bail!("expected 2 arguments, got {}; {}", args.len(), usage()),
    }
}

/// Sets up and runs every check; `Err` only if the run could not start.
fn run() -> anyhow::Result<Report> {
    let paths = parse_args()?;

    let environment = environment::probe()?;
    println!("{TAG} kernel {}", environment.kernel_release);
    println!("{TAG} kernel version {}", environment.kernel_version);
    println!("{TAG} /dev/vfio: {}", environment.dev_vfio.join(" "));
    println!(
        "{TAG} VFIO_GET_API_VERSION = {}",
        environment.vfio_api_version
    );

    let mut devices = Vec::with_capacity(paths.len());
    for path in &paths {
        let info = mdev::MdevInfo::read(path)?;
        println!(
            "{TAG} device {} type {} ({}) iommu_group {} node {}",
            info.uuid, info.mdev_type, info.mdev_type_name, info.iommu_group, info.group_node
        );
        devices.push(info);
    }

    let checks = checks::run_checks(&paths);
    Ok(Report {
        environment,
        devices,
        checks,
    })
}

/// Prints the single RESULT line; `{}` if the payload cannot be encoded.
fn print_result(pass: bool, payload: &serde_json::Value) {
    let verdict = if pass { "pass" } else { "fail" };
    let json = serde_json::to_string(payload).unwrap_or_else(|_| "{}".to_string());
    println!("{TAG} RESULT {verdict} {json}");
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let outcome = run().and_then(|report| {
        let pass = report.checks.all_mandatory_passed;
        Ok((pass, serde_json::to_value(report)?))
    });
    match outcome {
        Ok((pass, report)) => {
            print_result(pass, &report);
            if pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            let error = format!("{e:#}");
            println!("{TAG} error: {error}");
            print_result(false, &serde_json::json!({ "error": error }));
            ExitCode::FAILURE
        }
    }
}
