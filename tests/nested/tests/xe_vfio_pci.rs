// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The real `xe-vfio-pci` under the real Cloud Hypervisor, with VRAM-sized
//! state: runs `scripts/nested/run.sh --suite xe` (qemu TCG with AMD SVM ->
//! KVM inside L1 -> cloud-hypervisor boots an L2 guest with an SR-IOV VF
//! bound to the kernel's xe-vfio-pci, whose PF side is our stand-in
//! `xe_pf_standin`, and a VRAM BAR the guest writes and checks) and asserts
//! on the verdict lines it prints, one per step of each scenario.
//!
//! Run it alone with
//! `cargo test -p xe-vf-nested-test --test xe_vfio_pci -- --nocapture`.
//! It shares the L1 kernel with the mtty test (cached under
//! `${XE_CACHE_DIR:-~/.cache/xe-vf-migration}/nested`). It skips (with the
//! reason printed) only when `XE_SKIP_NESTED=1`, or when qemu is missing
//! and cannot be installed (not root).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use xe_vf_guest_support::qemu_skip_reason;
use xe_vf_nested_test::verdict::Verdict;

/// VRAM of each VF, MiB (run.sh's default; `XE_NESTED_VRAM_MIB` changes it).
const VRAM_MIB: f64 = 256.0;

const L1_CHECKS: &[&str] = &[
    "l1/kvm",
    "l1/xe-modules",
    "l1/xe-vfs",
    "l1/xe-host-list",
    "l1/xe-host-check",
];

const BOOT: &[&str] = &[
    "boot/vram-filled",
    "boot/devices-in-guest",
    "boot/vram-checked",
];

const UPSTREAM_CHECKS: &[&str] = &[
    "snapshot-restore/pause",
    "snapshot-restore/snapshot",
    "snapshot-restore/device-data-in-state-json",
    "snapshot-restore/lmem-scribbled",
    "snapshot-restore/restore",
    "snapshot-restore/vram-checked",
    "live-migration/refused-without-dma-logging",
    "live-migration/source-running",
    "live-migration/vram-checked",
    "incompatible-restore/refused",
    "incompatible-restore/devid-mismatch",
];

const PATCHED_CHECKS: &[&str] = &[
    "snapshot-restore/pause",
    "snapshot-restore/snapshot",
    "snapshot-restore/state-json-without-device-data",
    "snapshot-restore/device-state-file",
    "snapshot-restore/xe-engine",
    "snapshot-restore/inspect",
    "snapshot-restore/lmem-scribbled",
    "snapshot-restore/restore",
    "snapshot-restore/vram-checked",
    "live-migration/completed",
    "live-migration/receive-returned",
    "live-migration/destination-running",
    "live-migration/vram-checked",
    "live-migration/source-ended",
    "live-migration/vram-precopy-without-lmem-bar",
    "live-migration-tcp/completed",
    "live-migration-tcp/receive-returned",
    "live-migration-tcp/destination-running",
    "live-migration-tcp/vram-checked",
    "live-migration-tcp/source-ended",
    "destination-killed/source-reports-failure",
    "destination-killed/cut",
    "destination-killed/destination-dead",
    "destination-killed/source-running",
    "destination-killed/vram-checked",
    "incompatible-destination/refused",
    "incompatible-destination/refused-before-pause",
    "incompatible-destination/source-running",
    "incompatible-destination/vram-checked",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("..")
}

fn expected_checks(flavors: &[String]) -> Vec<String> {
    let mut expected: Vec<String> = L1_CHECKS.iter().map(|c| c.to_string()).collect();
    for flavor in flavors {
        let steps = match flavor.as_str() {
            "upstream" => UPSTREAM_CHECKS,
            "patched" => PATCHED_CHECKS,
            other => panic!("unknown flavour {other} in the run's output"),
        };
        expected.extend(BOOT.iter().chain(steps).map(|s| format!("{flavor}/{s}")));
    }
    expected
}

fn figure(verdict: &Verdict, name: &str) -> f64 {
    verdict
        .number(name)
        .unwrap_or_else(|| panic!("no numeric VALUE {name}: {:?}", verdict.values.get(name)))
}

#[test]
fn cloud_hypervisor_nested_xe_vfio_pci() {
    if let Some(reason) = qemu_skip_reason("XE_SKIP_NESTED") {
        eprintln!("SKIPPED cloud_hypervisor_nested_xe_vfio_pci: {reason}");
        return;
    }
    let root = repo_root();
    let script = root.join("scripts").join("nested").join("run.sh");
    assert!(script.is_file(), "{} missing", script.display());

    let output = Command::new(&script)
        .args(["--suite", "xe", "--patched", "require"])
        .current_dir(&root)
        .output()
        .expect("running scripts/nested/run.sh --suite xe");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("--- scripts/nested/run.sh --suite xe stderr ---\n{stderr}");
    eprintln!("--- scripts/nested/run.sh --suite xe stdout ---\n{stdout}");

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
        "run.sh --suite xe failed ({}); serial log in target/nested-xe/serial.log",
        output.status
    );
    assert_eq!(verdict.results, ["pass"], "expected one RESULT pass line");
    assert_eq!(
        verdict.flavors,
        ["upstream", "patched"],
        "both flavours must run, upstream first"
    );
    assert_eq!(
        verdict.order,
        expected_checks(&verdict.flavors),
        "the run reported a different set of steps"
    );

    // Upstream cannot live-migrate a VF without DMA logging.
    let refused = &verdict.checks["upstream/live-migration/refused-without-dma-logging"].detail;
    assert!(
        refused.contains("start_dma_logging"),
        "upstream refused for another reason: {refused}"
    );

    // Upstream keeps the whole VRAM, base64, in state.json; ours keeps a
    // few hundred bytes there and the stream beside it.
    let vram = VRAM_MIB * 1024.0 * 1024.0;
    let upstream_json = figure(&verdict, "upstream/snapshot-restore/state_json_bytes");
    let patched_json = figure(&verdict, "patched/snapshot-restore/state_json_bytes");
    let patched_file = figure(&verdict, "patched/snapshot-restore/device_state_file_bytes");
    assert!(
        upstream_json > vram * 4.0 / 3.0,
        "upstream state.json is {upstream_json} bytes, less than the base64 of {VRAM_MIB} MiB"
    );
    assert!(
        patched_json < 1024.0 * 1024.0,
        "patched state.json is {patched_json} bytes"
    );
    assert!(
        patched_file > vram,
        "xe-vf-vfio0.bin is {patched_file} bytes, less than the VRAM"
    );

    eprintln!("--- {VRAM_MIB} MiB of VRAM per VF: snapshot and restore, upstream vs patched ---");
    eprintln!(
        "{:>9} {:>16} {:>16} {:>18} {:>19} {:>10} {:>10}",
        "flavour",
        "state.json B",
        "device file B",
        "snapshot peak KiB",
        "restore peak KiB",
        "snap s",
        "restore s"
    );
    for flavor in &verdict.flavors {
        let get = |name: &str| {
            verdict
                .values
                .get(&format!("{flavor}/snapshot-restore/{name}"))
                .cloned()
                .unwrap_or_else(|| "-".to_string())
        };
        eprintln!(
            "{flavor:>9} {:>16} {:>16} {:>18} {:>19} {:>10} {:>10}",
            get("state_json_bytes"),
            get("device_state_file_bytes"),
            get("source_peak_rss_kib"),
            get("restore_peak_rss_kib"),
            get("snapshot_seconds"),
            get("restore_seconds")
        );
    }
    eprintln!("--- downtime Cloud Hypervisor reported (patched; upstream refuses) ---");
    for scenario in ["live-migration", "live-migration-tcp"] {
        let ms = figure(&verdict, &format!("patched/{scenario}/downtime_ms"));
        eprintln!("{scenario:>20}: {ms} ms");
    }
    for flavor in &verdict.flavors {
        if let Some(arcs) = verdict.values.get(&format!("{flavor}/arcs")) {
            eprintln!("{flavor} stand-in calls: {arcs}");
        }
        if let Some(arcs) = verdict
            .values
            .get(&format!("{flavor}/driver_arcs_since_boot"))
        {
            eprintln!("xe-vfio-pci arcs since L1 booted, after {flavor}: {arcs}");
        }
    }
}
