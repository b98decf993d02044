// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Host side of the real-kernel test: runs `scripts/real-kernel-test.sh`,
//! which boots a Debian kernel under qemu and runs this crate's binary in
//! the guest against two mtty mdevs.
//!
//! Run it alone with
//! `cargo test -p xe-vf-kernel-test --test qemu_guest real_kernel_mtty_migration -- --nocapture`.
//! It skips (with the reason printed) only when qemu is missing and the
//! script could not install it (not root), or when `XE_SKIP_REAL_KERNEL=1`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use xe_vf_guest_support::qemu_skip_reason;

const RESULT_PREFIX: &str = "XE-VF-KERNEL-TEST: RESULT ";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("..")
}

fn skip_reason() -> Option<String> {
    qemu_skip_reason("XE_SKIP_REAL_KERNEL")
}

#[test]
fn real_kernel_mtty_migration() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED real_kernel_mtty_migration: {reason}");
        return;
    }
    let root = repo_root();
    let script = root.join("scripts").join("real-kernel-test.sh");
    assert!(script.is_file(), "{} missing", script.display());

    let output = Command::new(&script)
        .current_dir(&root)
        .output()
        .expect("running real-kernel-test.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("--- real-kernel-test.sh stderr ---\n{stderr}");
    eprintln!("--- real-kernel-test.sh stdout ---\n{stdout}");

    assert!(
        output.status.success(),
        "real-kernel-test.sh failed ({}); serial log in target/real-kernel/serial.log",
        output.status
    );
    let results: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with(RESULT_PREFIX))
        .collect();
    assert_eq!(results.len(), 1, "expected one RESULT line: {results:?}");
    let (verdict, json) = results[0][RESULT_PREFIX.len()..]
        .split_once(' ')
        .expect("RESULT line has a verdict and a payload");
    assert_eq!(verdict, "pass");

    let report: serde_json::Value = serde_json::from_str(json).expect("RESULT payload is JSON");
    let checks = &report["checks"];
    print_summary(checks);

    let devices = checks["devices"]
        .as_array()
        .expect("checks.devices is an array");
    assert_eq!(devices.len(), 2, "both mdevs opened: {checks}");
    for device in devices {
        let flags = device["migration_flags"]
            .as_u64()
            .expect("migration_flags is a number");
        // mtty implements STOP_COPY (1) and P2P (2) since 6.7 (and PRE_COPY).
        assert_eq!(flags & 0b11, 0b11, "mtty migration flags {flags:#x}");
        assert_eq!(device["initial_state"], "RUNNING");
        assert!(device["stop_copy_size"].as_u64().unwrap_or(0) > 0);
    }

    let list = checks["checks"]
        .as_array()
        .expect("checks.checks is an array");
    let names: Vec<&str> = list.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(
        names, EXPECTED_CHECKS,
        "the guest ran a different set of checks"
    );
    let failed: Vec<String> = list
        .iter()
        .filter(|c| c["passed"] != true)
        .map(|c| format!("{}: {}", c["name"], c["error"]))
        .collect();
    assert!(failed.is_empty(), "checks failed: {failed:#?}");
    assert_eq!(checks["all_mandatory_passed"], true);
}

/// Every check the guest binary runs, in order.
const EXPECTED_CHECKS: [&str; 13] = [
    "host_list",
    "host_check",
    "open_and_flags",
    "mig_data_size_vs_stop_copy",
    "save_a_running_to_stop_copy",
    "restore_into_b",
    "invalid_arcs",
    "garbage_restore_recovers",
    "garbage_header_full_size",
    "state_format_save_restore",
    "pre_copy",
    "engine_save_restore",
    "host_check_in_use",
];

/// One line per check: verdict, time, and its details.
fn print_summary(checks: &serde_json::Value) {
    eprintln!("--- real-kernel checks ---");
    for check in checks["checks"].as_array().into_iter().flatten() {
        let verdict = if check["passed"] == true {
            "pass"
        } else {
            "FAIL"
        };
        eprintln!(
            "{verdict} {:<30} {:>8.1} ms  {}",
            check["name"].as_str().unwrap_or("?"),
            check["millis"].as_f64().unwrap_or(f64::NAN),
            check["details"]
        );
        if !check["error"].is_null() {
            eprintln!("     error: {}", check["error"]);
        }
    }
}
