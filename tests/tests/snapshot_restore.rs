// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Snapshot in one process, restore in another; the API's error answers.

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
    let r = src
        .api
        .put("vm.snapshot", Some(&json!({ "destination_url": url })))
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(
        r.error().contains("snapshot") && r.error().contains("Running"),
        "{}",
        r.error()
    );

    src.put_ok("vm.pause", None);
    let paused = src.info();
    assert_eq!(paused["state"], "Paused");
    assert_eq!(device(&paused, 0)["vf_state"], "STOP");
    src.put_ok("vm.snapshot", Some(&json!({ "destination_url": url })));

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
    assert_eq!(dst.info()["state"], "Created");
    dst.put_ok("vm.restore", Some(&json!({ "source_url": url })));
    let restored = dst.info();
    assert_eq!(restored["state"], "Paused", "restore leaves the VM paused");
    assert_eq!(device(&restored, 0)["vf_state"], "STOP");
    assert_eq!(restored["memory"]["crc32c"], paused["memory"]["crc32c"]);
    assert_eq!(device(&restored, 0)["digest"], device(&paused, 0)["digest"]);

    dst.put_ok("vm.resume", None);
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
    src.put_ok("vm.pause", None);
    src.put_ok("vm.snapshot", Some(&json!({ "destination_url": url })));
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
    let r = dst
        .api
        .put("vm.restore", Some(&json!({ "source_url": url })))
        .unwrap();
    assert_eq!(r.status, 500, "{:?}", r.body);
    assert!(r.error().contains("restore device gpu0"), "{}", r.error());
    assert!(r.error().contains("truncated"), "{}", r.error());
    let info = dst.info();
    assert_eq!(info["state"], "Created");
    assert!(info["devices"].as_array().unwrap().is_empty());
}

#[test]
fn api_answers_errors_as_json_naming_the_phase() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(dir.path(), "h", &[]);
    let mode = std::fs::metadata(host.api.socket()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);

    let r = host.api.put("vm.nonsense", None).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.error().contains("vm.nonsense"));
    let r = host.api.request("PUT", "/api/v1/vm.info", None).unwrap();
    assert_eq!(r.status, 405);
    let r = host.api.put("vm.pause", None).unwrap();
    assert_eq!(r.status, 409);
    assert!(r.error().starts_with("pause: "), "{}", r.error());
    let r = host
        .api
        .put("vm.send-migration", Some(&json!({ "destination_url": 5 })))
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.error().starts_with("request body"), "{}", r.error());
    let r = host
        .api
        .put(
            "vm.restore",
            Some(&json!({ "source_url": "file:///nonexistent/x" })),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.error().contains("config.json"), "{}", r.error());

    // curl, as an operator would use it.
    let out = std::process::Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(host.api.socket())
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
            assert!(text.ends_with("409"), "{text}");
            assert!(text.contains("\"error\""), "{text}");
        }
        Err(e) => eprintln!("curl not available, skipping the curl check: {e}"),
    }
}
