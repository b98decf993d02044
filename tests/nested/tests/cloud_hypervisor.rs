// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The real Cloud Hypervisor, end to end, with a real guest and a real
//! kernel VFIO device: runs `scripts/nested/run.sh` (qemu TCG with AMD SVM
//! -> KVM inside -> cloud-hypervisor boots a guest with an mtty mdev) and
//! asserts on the verdict lines it prints, one per step of each scenario.
//!
//! Run it alone with
//! `cargo test -p xe-vf-nested-test --test cloud_hypervisor -- --nocapture`.
//! The first run builds the L1 kernel (about 10 CPU-minutes) and caches it
//! under `${XE_CACHE_DIR:-~/.cache/xe-vf-migration}/nested`. It skips (with
//! the reason printed) only when `XE_SKIP_NESTED=1`, or when qemu is missing
//! and cannot be installed (not root).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use xe_vf_guest_support::qemu_skip_reason;
use xe_vf_nested_test::verdict::Verdict;

/// Whether the patched flavour (our series in
/// `vmm-glue/cloud-hypervisor/patches`) runs: `require` fails without it,
/// `auto` runs it only when the series exists, `off` never. The series
/// exists, so CI must not pass without its scenarios. `XE_NESTED_PATCHED`
/// overrides it for a run by hand.
const PATCHED: &str = "require";

/// The L1 steps, then every step of every scenario, in the order printed.
const L1_CHECKS: &[&str] = &["l1/kvm", "l1/modules"];

const UPSTREAM_CHECKS: &[&str] = &[
    "snapshot-restore/boot",
    "snapshot-restore/device-in-guest",
    "snapshot-restore/pause",
    "snapshot-restore/snapshot",
    "snapshot-restore/device-data-in-state-json",
    "snapshot-restore/restore",
    "snapshot-restore/resaved-device-state-equal",
    "snapshot-restore/ticks-continue",
    "live-migration/completed",
    "live-migration/receive-returned",
    "live-migration/destination-running",
    "live-migration/ticks-continue",
    "live-migration/source-ended",
    "destination-killed/source-reports-failure",
    "destination-killed/cut",
    "destination-killed/destination-dead",
    "destination-killed/source-running",
    "destination-killed/source-ticks-on",
    "destination-killed/device-running",
    "destination-killed/completed",
    "destination-killed/receive-returned",
    "destination-killed/destination-running",
    "destination-killed/ticks-continue",
    "destination-killed/source-ended",
    "destination-killed/device-data-in-state",
    "incompatible-destination/refused",
    "incompatible-destination/source-running",
    "incompatible-destination/source-ticks-on",
    "incompatible-destination/device-running",
    // Complete's answer lost: both copies run until the operator stops one.
    "complete-answer-lost/source-reports-failure",
    "complete-answer-lost/both-run",
    "complete-answer-lost/one-runs",
    // A destination silent at Complete: the source waits it out, paused.
    "stall-at-complete/source-reports-failure",
    "stall-at-complete/waited-out-the-stall",
    "stall-at-complete/source-running",
    "stall-at-complete/source-ticks-on",
    "stall-at-complete/device-running",
    "no-dma-logging/boot",
    "no-dma-logging/refused-without-dma-logging",
    "no-dma-logging/source-running",
    "no-dma-logging/source-ticks-on",
    "no-dma-logging/device-running",
];

const PATCHED_CHECKS: &[&str] = &[
    "snapshot-restore/boot",
    "snapshot-restore/device-in-guest",
    "snapshot-restore/pause",
    "snapshot-restore/snapshot",
    "snapshot-restore/state-json-without-device-data",
    "snapshot-restore/device-state-file",
    "snapshot-restore/inspect",
    "snapshot-restore/restore",
    "snapshot-restore/resaved-device-state-equal",
    "snapshot-restore/ticks-continue",
    "live-migration/completed",
    "live-migration/receive-returned",
    "live-migration/destination-running",
    "live-migration/ticks-continue",
    "live-migration/source-ended",
    "destination-killed/source-reports-failure",
    "destination-killed/cut",
    "destination-killed/destination-dead",
    "destination-killed/source-running",
    "destination-killed/source-ticks-on",
    "destination-killed/device-running",
    "destination-killed/completed",
    "destination-killed/receive-returned",
    "destination-killed/destination-running",
    "destination-killed/ticks-continue",
    "destination-killed/source-ended",
    "destination-killed/device-state-connection",
    "incompatible-destination/refused",
    "incompatible-destination/refused-before-pause",
    "incompatible-destination/source-running",
    "incompatible-destination/source-ticks-on",
    "incompatible-destination/device-running",
    "complete-answer-lost/source-reports-failure",
    "complete-answer-lost/source-running",
    "complete-answer-lost/source-ticks-on",
    "complete-answer-lost/device-running",
    "complete-answer-lost/destination-kept-paused",
    "complete-answer-lost/never-both",
    "complete-answer-lost/one-runs",
    "stall-at-complete/source-reports-failure",
    "stall-at-complete/gave-up-after-timeout",
    "stall-at-complete/source-running",
    "stall-at-complete/source-ticks-on",
    "stall-at-complete/device-running",
    "destination-killed-when-ready/outcome-unknown",
    "destination-killed-when-ready/source-paused-with-event",
    "destination-killed-when-ready/new-migration-refused",
    "destination-killed-when-ready/destination-dead",
    "destination-killed-when-ready/decided",
    "destination-killed-when-ready/never-both",
    "destination-killed-when-ready/one-runs",
    "switchover-answer-lost/outcome-unknown",
    "switchover-answer-lost/source-paused-with-event",
    "switchover-answer-lost/new-migration-refused",
    "switchover-answer-lost/destination-runs",
    "switchover-answer-lost/decided",
    "switchover-answer-lost/never-both",
    "switchover-answer-lost/one-runs",
    "source-killed-after-switchover/source-killed",
    "source-killed-after-switchover/destination-runs",
    "source-killed-after-switchover/never-both",
    "source-killed-after-switchover/one-runs",
    "no-dma-logging/boot",
    "no-dma-logging/completed",
    "no-dma-logging/receive-returned",
    "no-dma-logging/destination-running",
    "no-dma-logging/ticks-continue",
    "no-dma-logging/source-ended",
    "no-dma-logging/same-memory",
    "verify-pass/completed",
    "verify-pass/receive-returned",
    "verify-pass/destination-running",
    "verify-pass/ticks-continue",
    "verify-pass/source-ended",
    "verify-pass/verified",
    "verify-pass/same-memory",
    "verify-pass-tcp/completed",
    "verify-pass-tcp/receive-returned",
    "verify-pass-tcp/destination-running",
    "verify-pass-tcp/ticks-continue",
    "verify-pass-tcp/source-ended",
    "verify-pass-tcp/verified",
    "verify-pass-tcp/same-memory",
    "verify-pass-tls/completed",
    "verify-pass-tls/receive-returned",
    "verify-pass-tls/destination-running",
    "verify-pass-tls/ticks-continue",
    "verify-pass-tls/source-ended",
    "verify-pass-tls/verified",
    "verify-pass-tls/same-memory",
    "verify-pass-tls/every-connection-tls",
    "verify-pass-plain-refused/refused",
    "verify-pass-plain-refused/source-running",
    "verify-pass-plain-refused/source-ticks-on",
    "verify-pass-plain-refused/device-running",
    "two-vfs/boot",
    "two-vfs/completed",
    "two-vfs/receive-returned",
    "two-vfs/destination-running",
    "two-vfs/ticks-continue",
    "two-vfs/source-ended",
    "two-vfs/final-pass-as-with-one",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("..")
}

fn skip_reason() -> Option<String> {
    qemu_skip_reason("XE_SKIP_NESTED")
}

fn expected_checks(flavors: &[String]) -> Vec<String> {
    let mut expected: Vec<String> = L1_CHECKS.iter().map(|c| c.to_string()).collect();
    for flavor in flavors {
        let steps = match flavor.as_str() {
            "upstream" => UPSTREAM_CHECKS,
            "patched" => PATCHED_CHECKS,
            other => panic!("unknown flavour {other} in the run's output"),
        };
        expected.extend(steps.iter().map(|s| format!("{flavor}/{s}")));
    }
    expected
}

#[test]
fn cloud_hypervisor_nested_snapshot_restore_and_live_migration() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED cloud_hypervisor_nested_snapshot_restore_and_live_migration: {reason}");
        return;
    }
    let patched = env::var("XE_NESTED_PATCHED").unwrap_or_else(|_| PATCHED.to_string());
    let root = repo_root();
    let script = root.join("scripts").join("nested").join("run.sh");
    assert!(script.is_file(), "{} missing", script.display());

    let output = Command::new(&script)
        .args(["--patched", &patched])
        .current_dir(&root)
        .output()
        .expect("running scripts/nested/run.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("--- scripts/nested/run.sh stderr ---\n{stderr}");
    eprintln!("--- scripts/nested/run.sh stdout ---\n{stdout}");

    let verdict = Verdict::parse(&stdout);
    assert!(
        verdict.repeated.is_empty(),
        "steps reported twice: {:?}",
        verdict.repeated
    );
    let failed = verdict.failed();
    assert!(failed.is_empty(), "failed steps: {failed:#?}");
    assert!(
        output.status.success(),
        "scripts/nested/run.sh failed ({}); serial log in target/nested/serial.log",
        output.status
    );
    assert_eq!(verdict.results, ["pass"], "expected one RESULT pass line");

    assert_eq!(
        verdict.flavors.first().map(String::as_str),
        Some("upstream"),
        "the upstream flavour must run first"
    );
    if patched == "require" {
        assert!(
            verdict.flavors.iter().any(|f| f == "patched"),
            "--patched require, but the patched flavour did not run"
        );
    }
    if patched == "off" {
        assert_eq!(verdict.flavors, ["upstream"]);
    }
    let expected = expected_checks(&verdict.flavors);
    assert_eq!(
        verdict.order, expected,
        "the run reported a different set of steps"
    );

    // Upstream's live migration of a device without DMA logging fails in
    // start_dirty_log: what an Xe VF meets today.
    let refused = &verdict.checks["upstream/no-dma-logging/refused-without-dma-logging"].detail;
    assert!(
        refused.contains("start_dma_logging"),
        "upstream refused for another reason: {refused}"
    );

    if verdict.flavors.iter().any(|f| f == "patched") {
        // The source says how many pages it hashed and how many differed.
        for scenario in ["verify-pass", "verify-pass-tcp", "verify-pass-tls"] {
            let verified = &verdict.checks[&format!("patched/{scenario}/verified")].detail;
            assert!(
                verified.contains("pages hashed") && verified.contains("pages differ"),
                "{scenario}: {verified}"
            );
        }
        eprintln!("--- downtime, device without DMA logging (ms, checksum time taken out) ---");
        for (what, key) in [
            (
                "resend, unix",
                "patched/no-dma-logging/downtime_without_checksums_ms",
            ),
            (
                "verify, unix",
                "patched/verify-pass/downtime_without_checksums_ms",
            ),
            (
                "verify, tcp",
                "patched/verify-pass-tcp/downtime_without_checksums_ms",
            ),
            (
                "verify, tls",
                "patched/verify-pass-tls/downtime_without_checksums_ms",
            ),
        ] {
            let ms = verdict.values.get(key).map_or("?", String::as_str);
            eprintln!("{what:>13}: {ms}");
        }
    }

    eprintln!("--- switch-over faults: the watcher's sampling, who ran ---");
    for (name, value) in verdict.values.iter().filter(|(k, _)| {
        [
            "complete-answer-lost",
            "stall-at-complete",
            "destination-killed-when-ready",
            "switchover-answer-lost",
            "source-killed-after-switchover",
        ]
        .iter()
        .any(|s| k.contains(&format!("/{s}/")))
    }) {
        eprintln!("{name}: {value}");
    }

    eprintln!("--- downtime Cloud Hypervisor reported (live migration, same mtty-2 device) ---");
    for flavor in &verdict.flavors {
        let key = format!("{flavor}/live-migration/downtime_ms");
        let downtime = verdict
            .values
            .get(&key)
            .unwrap_or_else(|| panic!("no {key} value"));
        let ms: u64 = downtime
            .parse()
            .unwrap_or_else(|_| panic!("{key} is '{downtime}', not a number of ms"));
        eprintln!("{flavor:>9}: {ms} ms");
    }
}
