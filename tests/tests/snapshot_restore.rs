// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Snapshot in one process, restore in another, with the real
//! `ch-remote`; the API's error answers as CH gives them.

mod common;

use common::*;
use serde_json::json;

#[test]
fn snapshot_restore_round_trip_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let url = format!("file://{}", snap.display());
    let src = Host::start(
        dir.path(),
        "src",
        &[
            "--memory",
            "size=32M",
            "--device",
            "emulated=on,vram=16M,id=gpu0",
        ],
    );
    // Let the VF and the vCPU change state before the pause.
    wait_generation_beyond(&src, 0, 50);

    // A running VM cannot be snapshotted (CH's rule).
    let r = src.ch(&["snapshot", &url]);
    assert!(!r.success());
    assert!(
        r.stderr.contains("The VM could not be snapshotted") && r.stderr.contains("Running"),
        "{}",
        r.stderr
    );

    src.ch_ok(&["pause"]);
    let paused = src.info();
    assert_eq!(paused["state"], "Paused");
    assert_eq!(device(&paused, 0)["vf_state"], "STOP");
    src.ch_ok(&["snapshot", &url]);

    let mut names: Vec<String> = std::fs::read_dir(&snap)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "memory-ranges",
            "state.json",
            "xe-vf-gpu0.bin"
        ]
    );
    let state_len = std::fs::metadata(snap.join("state.json")).unwrap().len();
    assert!(
        state_len < 4096,
        "state.json must not carry device data: {state_len} bytes"
    );
    drop(src);

    let dst = Host::start(dir.path(), "dst", &[]);
    dst.assert_no_vm();
    dst.ch_ok(&["restore", &format!("source_url={url}")]);
    let restored = dst.info();
    assert_eq!(restored["state"], "Paused", "restore leaves the VM paused");
    assert_eq!(device(&restored, 0)["vf_state"], "STOP");
    assert_eq!(restored["memory"]["crc32c"], paused["memory"]["crc32c"]);
    assert_eq!(device(&restored, 0)["digest"], device(&paused, 0)["digest"]);

    dst.ch_ok(&["resume"]);
    let running = dst.info();
    assert_eq!(running["state"], "Running");
    assert_eq!(device(&running, 0)["vf_state"], "RUNNING");
    // The workload continues from the restored generation.
    wait_generation_beyond(&dst, 0, generation(&paused, 0));
}

#[test]
fn restore_refuses_a_damaged_snapshot_and_stays_empty() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let url = format!("file://{}", snap.display());
    let src = Host::start(
        dir.path(),
        "src",
        &[
            "--memory",
            "size=16M",
            "--device",
            "emulated=on,vram=8M,id=gpu0",
        ],
    );
    src.ch_ok(&["pause"]);
    src.ch_ok(&["snapshot", &url]);
    drop(src);
    let data = snap.join("xe-vf-gpu0.bin");
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len - 7)
        .unwrap();

    let dst = Host::start(dir.path(), "dst", &[]);
    let r = dst.ch(&["restore", &format!("source_url={url}")]);
    assert!(!r.success());
    assert!(r.stderr.contains("InternalServerError"), "{}", r.stderr);
    assert!(r.stderr.contains("restore device gpu0"), "{}", r.stderr);
    assert!(r.stderr.contains("truncated"), "{}", r.stderr);
    dst.assert_no_vm();
}

#[test]
fn api_answers_errors_as_ch_does_naming_the_phase() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(dir.path(), "h", &[]);
    let mode = std::fs::metadata(host.socket()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);

    // ch-remote prints the server's chain, one numbered line each.
    let r = host.ch(&["pause"]);
    assert!(!r.success());
    assert!(
        r.stderr
            .contains("Server responded with InternalServerError")
            && r.stderr.contains("Error from API")
            && r.stderr.contains("The VM could not be paused")
            && r.stderr.contains("VM is not running"),
        "{}",
        r.stderr
    );
    let r = host.ch(&["restore", "source_url=file:///nonexistent/x"]);
    assert!(!r.success());
    assert!(r.stderr.contains("config.json"), "{}", r.stderr);
    host.assert_no_vm();

    // Our hooks answer in the same shape (curl).
    let r = host
        .api
        .put(
            "vm.fill-device",
            Some(&json!({ "device": "gpu0", "seed": 1 })),
        )
        .unwrap();
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert_eq!(r.body[2], "VM is not created");
    let r = host
        .api
        .put("vm.arm-migration", Some(&json!({ "stall": true })))
        .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body[0], "Failed to deserialize JSON");
    assert!(r.error().contains("unknown field `stall`"), "{}", r.error());

    // curl, as an operator would use it.
    let out = std::process::Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(host.socket())
        .args([
            "-X",
            "PUT",
            "http://localhost/api/v1/vm.pause",
            "-w",
            "\n%{http_code}",
        ])
        .output();
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.ends_with("500"), "{text}");
            assert!(text.contains("VM is not running"), "{text}");
        }
        Err(e) => eprintln!("curl not available, skipping the curl check: {e}"),
    }
}
