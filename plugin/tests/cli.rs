// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `xe-vf-mig` binary end to end: save, inspect, restore, refusals.

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xe-vf-mig"))
        .arg("--quiet")
        .args(args)
        .output()
        .expect("run xe-vf-mig")
}

fn stdout_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const SPEC: &str = "emulated=on,vram=4M,workload=on";

#[test]
fn save_inspect_restore_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vf.bin");
    let f = file.to_str().unwrap();
    let saved = stdout_json(&run(&["save", "--device", SPEC, "-o", f]));
    assert_eq!(saved["device_state"], "STOP");
    assert!(!Path::new(&format!("{f}.partial")).exists());
    assert!(!dir.path().join("vf.partial").exists());

    let inspected = stdout_json(&run(&["inspect", f, "--packets", "--json"]));
    let xe = &inspected["xe"]["summary"];
    assert_eq!(xe["descriptor"]["device_id"], 0xe20b);
    assert_eq!(xe["vram_bytes"], 4 << 20);
    assert_eq!(inspected["decoded"]["decoded_bytes"], saved["bytes"]);
    let packets = inspected["xe"]["packets"].as_array().unwrap();
    assert_eq!(packets.first().unwrap()["header"]["kind"], "DESCRIPTOR");
    assert_eq!(packets.last().unwrap()["header"]["kind"], "TRAILER");

    let text = run(&["inspect", f]);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).contains("devid 0xe20b"));

    let restored = stdout_json(&run(&[
        "restore",
        "--device",
        "emulated=on,vram=4M,workload=off",
        "-i",
        f,
    ]));
    assert_eq!(restored["bytes"], saved["bytes"]);
    assert_eq!(restored["device_state"], "RUNNING");
}

#[test]
fn refusals_name_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vf.bin");
    let f = file.to_str().unwrap();
    stdout_json(&run(&["save", "--device", SPEC, "-o", f]));

    let other = run(&[
        "restore",
        "--device",
        "emulated=on,vram=4M,devid=0xe20c",
        "-i",
        f,
    ]);
    assert!(!other.status.success());
    assert!(
        stderr(&other).contains("device id 0xe20b != 0xe20c"),
        "{}",
        stderr(&other)
    );

    let bad_spec = run(&["save", "--device", "emulated=on,vram=4Q", "-o", f]);
    assert!(!bad_spec.status.success());
    assert!(stderr(&bad_spec).contains("vram"), "{}", stderr(&bad_spec));

    let missing = run(&[
        "save",
        "--device",
        "path=/sys/bus/pci/devices/0000:ff:1f.7",
        "-o",
        f,
    ]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("0000:ff:1f.7"),
        "{}",
        stderr(&missing)
    );

    // Corruption in the middle of the file is caught by inspect and restore.
    let mut bytes = std::fs::read(f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    let corrupt = dir.path().join("corrupt.bin");
    std::fs::write(&corrupt, bytes).unwrap();
    let c = corrupt.to_str().unwrap();
    let inspected = run(&["inspect", c]);
    assert!(!inspected.status.success());
    assert!(
        stderr(&inspected).contains("checksum"),
        "{}",
        stderr(&inspected)
    );
    let restored = run(&["restore", "--device", "emulated=on,vram=4M", "-i", c]);
    assert!(!restored.status.success());
    assert!(
        stderr(&restored).contains("checksum"),
        "{}",
        stderr(&restored)
    );
}

#[test]
fn demo_verifies_and_reports() {
    let out = stdout_json(&run(&["demo", "--vram", "8M"]));
    assert_eq!(out["verified"], true);
    assert!(out["bytes"].as_u64().unwrap() > 8 << 20);
    assert!(out["peak_rss_mib"].as_f64().unwrap() > 0.0);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("demo.bin");
    let via = stdout_json(&run(&[
        "demo",
        "--vram",
        "8M",
        "--via-file",
        snap.to_str().unwrap(),
    ]));
    assert_eq!(via["verified"], true);
}
