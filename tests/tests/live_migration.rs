// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Live migration between two test-host processes.
//!
//! Driven with the real `ch-remote`, as a Cloud Hypervisor user would:
//! `receive-migration` on the destination (returns once it is over),
//! `send-migration` on the source (returns at once), then `info` on the
//! source until its `migration.last` shows the outcome.
//!
//! How equality is checked with workloads running: the source records
//! guest memory's CRC and every VF digest once it has stopped (VM paused,
//! VFs in STOP; it never runs again after Switchover) in its report
//! (`at_stop`). The destination, with `verify` armed (a test hook),
//! records the same right before it resumes (`at_switchover`), when
//! memory and VF state are exactly what it received. Those two must be
//! equal; after that the destination's workloads move on, which the
//! tests check too.

mod common;

use std::net::TcpListener;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

fn source(dir: &std::path::Path, devices: &[&str], extra: &[&str]) -> Host {
    let mut args = vec!["--memory", "size=32M"];
    for d in devices {
        args.push("--device");
        args.push(d);
    }
    args.extend_from_slice(extra);
    Host::start(dir, "src", &args)
}

/// Migrates `src` to `dst` over `url` (ch-remote `send_config`), both
/// ch-remote calls exiting 0; returns (sent, received) reports.
fn migrate(src: &Host, dst: &Host, url: &str, send_config: &str) -> (Value, Value) {
    dst.arm(&json!({ "verify": true }));
    let receiver = dst.receive_in_background(&receive_config(url));
    let sent = src.send_migration(send_config);
    let received = receiver.join().unwrap();
    assert!(
        received.success(),
        "receive failed: {}\n{}",
        received.stderr,
        dst.log_text()
    );
    assert!(sent.ok, "send failed: {}\n{}", sent.error, src.log_text());
    (sent.value, dst.received_report())
}

/// Runs one migration to `url` and checks what both sides report.
fn migrate_and_verify(src: &Host, dst: &Host, url: &str) -> Value {
    migrate_and_verify_with(src, dst, url, "")
}

/// [`migrate_and_verify`], `extra` appended to the send-migration config.
fn migrate_and_verify_with(src: &Host, dst: &Host, url: &str, extra: &str) -> Value {
    let before = src.info();
    for i in 0..before["devices"].as_array().unwrap().len() {
        wait_generation_beyond(src, i, 20);
    }
    let (sent, received) = migrate(src, dst, url, &format!("{}{extra}", send_config(url)));
    assert_same_fingerprint(&sent["at_stop"], &received["at_switchover"]);
    assert!(sent["memory_bytes"].as_u64().unwrap() >= 32 << 20);
    assert!(sent["device_bytes"].as_u64().unwrap() > 0);
    assert_eq!(sent["device_bytes"], received["device_bytes"]);
    assert_eq!(sent["memory_bytes"], received["memory_bytes"]);
    assert!(sent["downtime_ms"].as_f64().unwrap() > 0.0);

    // Source: shut down, VFs stopped.
    let src_info = src.info();
    assert_eq!(src_info["state"], "Shutdown");
    for d in src_info["devices"].as_array().unwrap() {
        assert_eq!(d["vf_state"], "STOP");
    }
    let counters = src.counters();
    assert_eq!(counters["migration"]["sent"], 1);
    assert_eq!(
        counters["migration"]["memory_bytes_sent"],
        sent["memory_bytes"]
    );

    // Destination: running, VFs running, workloads continue.
    let dst_info = dst.info();
    assert_eq!(dst_info["state"], "Running");
    let at_stop = sent["at_stop"]["devices"].as_array().unwrap();
    for (i, d) in at_stop.iter().enumerate() {
        assert_eq!(device(&dst_info, i)["vf_state"], "RUNNING");
        assert_eq!(device(&dst_info, i)["id"], d["id"]);
        wait_generation_beyond(dst, i, d["digest"]["generation"].as_u64().unwrap());
    }
    sent
}

#[test]
fn live_migration_over_unix_socket_with_workloads_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut src = source(dir.path(), &["emulated=on,vram=32M,id=gpu0"], &[]);
    let dst = Host::start(dir.path(), "dst", &[]);
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    // QEMU style, forced (our series' field, so the patched ch-remote):
    // the verify pass has a test of its own.
    src.speak_patched();
    let sent = migrate_and_verify_with(&src, &dst, &url, ",final_pass=resend");
    // dirty_tracking=all: once the VF stopped, everything it may have
    // DMA'd into (all of guest memory) went again in the final pass.
    assert_eq!(sent["final_pass_bytes"].as_u64().unwrap(), 32 << 20);
    assert_eq!(sent["downtime"]["dma_pages"], "resend");
    assert!(sent["memory_passes"].as_u64().unwrap() >= 2);
    assert!(
        !dir.path().join("mig.sock").exists(),
        "listener socket removed"
    );
}

/// Every VF without DMA logging reports all of guest memory once it has
/// stopped; the final pass must send each page once, not once per VF
/// (Cloud Hypervisor's dirty log used to concatenate the devices' tables:
/// two such devices sent guest memory twice).
#[test]
fn two_all_dirty_vfs_cost_the_final_pass_what_one_does() {
    let mut final_pass = Vec::new();
    for specs in [
        &["emulated=on,vram=8M,id=gpu0"][..],
        &["emulated=on,vram=8M,id=gpu0", "emulated=on,vram=8M,id=gpu1"][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut src = source(dir.path(), specs, &[]);
        let dst = Host::start(dir.path(), "dst", &[]);
        let url = format!("unix:{}", dir.path().join("mig.sock").display());
        src.speak_patched();
        let sent = migrate_and_verify_with(&src, &dst, &url, ",final_pass=resend");
        let downtime = &sent["downtime"];
        assert_eq!(downtime["dma_pages"], "resend", "{downtime}");
        // Everything the CPU did not dirty came from the VFs' report.
        assert_eq!(
            downtime["cpu_dirty_bytes"].as_u64().unwrap() + downtime["dma_bytes"].as_u64().unwrap(),
            32 << 20,
            "{downtime}"
        );
        final_pass.push(sent["final_pass_bytes"].as_u64().unwrap());
    }
    assert_eq!(final_pass, [32 << 20, 32 << 20]);
}

/// DMA writes the CPU dirty log never sees land on pages pre-copy had
/// already sent; the verify pass must find every one of them by digest
/// and send it again, or the memory checksums at the switch-over differ.
#[test]
fn verify_pass_catches_dma_writes_after_the_last_cpu_dirty_pass() {
    let dir = tempfile::tempdir().unwrap();
    let mut src = source(
        dir.path(),
        &["emulated=on,vram=32M,id=gpu0,dma_pages=64"],
        &[],
    );
    let dst = Host::start(dir.path(), "dst", &[]);
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    src.speak_patched();
    let sent = migrate_and_verify_with(&src, &dst, &url, ",final_pass=verify");
    let received = dst.received_report();
    let downtime = &sent["downtime"];
    assert_eq!(downtime["dma_pages"], "verify", "{downtime}");
    let verify = &downtime["verify"];
    let differ = verify["mismatched_bytes"].as_u64().unwrap();
    // The VF wrote into pages sent before it stopped: some differ, and
    // both sides agree on how many.
    assert!(differ > 0, "{verify}");
    assert_eq!(received["differing_bytes"].as_u64().unwrap(), differ);
    assert_eq!(
        received["verified_bytes"].as_u64().unwrap(),
        verify["checked_bytes"].as_u64().unwrap()
    );
    // Everything the CPU did not dirty was checked, not resent.
    let dma = downtime["dma_bytes"].as_u64().unwrap();
    assert_eq!(verify["checked_bytes"].as_u64().unwrap(), dma);
    assert_eq!(
        sent["final_pass_bytes"].as_u64().unwrap(),
        downtime["cpu_dirty_bytes"].as_u64().unwrap() + differ
    );
    assert!(sent["final_pass_bytes"].as_u64().unwrap() < 32 << 20);
}

#[test]
fn live_migration_over_tcp_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let src = source(dir.path(), &["emulated=on,vram=16M,id=gpu0"], &[]);
    let dst = Host::start(dir.path(), "dst", &[]);
    let dst_url = format!("tcp:127.0.0.1:{port}");
    let (sent, received) = migrate(&src, &dst, &dst_url, &send_config(&dst_url));
    assert_same_fingerprint(&sent["at_stop"], &received["at_switchover"]);
    assert_eq!(sent["connections"], 1);
    assert_eq!(received["memory_connection_bytes"], 0);
    assert_eq!(dst.info()["state"], "Running");
}

/// `connections=4`: memory goes over four extra connections announcing
/// the PrecopyMemory role, as CH sends it; the main one carries the rest.
#[test]
fn live_migration_over_four_tcp_connections() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let src = source(dir.path(), &["emulated=on,vram=16M,id=gpu0"], &[]);
    let dst = Host::start(dir.path(), "dst", &[]);
    let url = format!("tcp:127.0.0.1:{port}");
    let (sent, received) = migrate(
        &src,
        &dst,
        &url,
        &format!("{},connections=4", send_config(&url)),
    );
    assert_same_fingerprint(&sent["at_stop"], &received["at_switchover"]);
    assert_eq!(sent["connections"], 4);
    // Every memory byte came over the extra connections.
    assert_eq!(received["memory_connection_bytes"], sent["memory_bytes"]);
    assert_eq!(received["memory_bytes"], sent["memory_bytes"]);
    assert!(sent["memory_bytes"].as_u64().unwrap() >= 32 << 20);
    assert_eq!(dst.info()["state"], "Running");
    assert!(
        !dst.log_text().contains("dropping a connection"),
        "{}",
        dst.log_text()
    );
}

/// Two network namespaces joined by a veth pair; deleted on drop.
struct NetnsPair {
    names: [String; 2],
}

impl NetnsPair {
    fn create() -> Result<(Self, String, String), String> {
        let tag = std::process::id() % 100_000;
        let names = [format!("xevf-s{tag}"), format!("xevf-d{tag}")];
        let pair = NetnsPair {
            names: names.clone(),
        };
        let net = 1 + (tag % 250);
        let (src_ip, dst_ip) = (format!("10.99.{net}.1"), format!("10.99.{net}.2"));
        let veth = [format!("xvs{tag}"), format!("xvd{tag}")];
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), names[0].clone()],
            vec!["netns".into(), "add".into(), names[1].clone()],
            vec![
                "link".into(),
                "add".into(),
                veth[0].clone(),
                "netns".into(),
                names[0].clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                veth[1].clone(),
                "netns".into(),
                names[1].clone(),
            ],
        ];
        for args in steps {
            run_ip(&args)?;
        }
        for (i, ip) in [&src_ip, &dst_ip].iter().enumerate() {
            let ns = &names[i];
            run_ip(&[
                "-n".into(),
                ns.clone(),
                "addr".into(),
                "add".into(),
                format!("{ip}/30"),
                "dev".into(),
                veth[i].clone(),
            ])?;
            run_ip(&[
                "-n".into(),
                ns.clone(),
                "link".into(),
                "set".into(),
                veth[i].clone(),
                "up".into(),
            ])?;
            run_ip(&[
                "-n".into(),
                ns.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ])?;
        }
        Ok((pair, src_ip, dst_ip))
    }
}

fn run_ip(args: &[String]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

#[test]
fn live_migration_over_tcp_between_network_namespaces() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP live_migration_over_tcp_between_network_namespaces: not root");
        return;
    }
    let (ns, _src_ip, dst_ip) = match NetnsPair::create() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("SKIP live_migration_over_tcp_between_network_namespaces: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let src_wrap = ["ip", "netns", "exec", ns.names[0].as_str()];
    let dst_wrap = ["ip", "netns", "exec", ns.names[1].as_str()];
    // Hosts drop (are killed) before the namespaces.
    let src = Host::start_with(
        dir.path(),
        "src",
        &src_wrap,
        &[
            "--memory",
            "size=32M",
            "--device",
            "emulated=on,vram=16M,id=gpu0",
        ],
    );
    let dst = Host::start_with(dir.path(), "dst", &dst_wrap, &[]);
    dst.arm(&json!({ "verify": true }));
    let receiver = dst.receive_in_background(&receive_config("tcp:0.0.0.0:7711"));
    let url = format!("tcp:{dst_ip}:7711");
    let sent = src.send_migration(&send_config(&url));
    let received = receiver.join().unwrap();
    assert!(received.success(), "{}", received.stderr);
    assert!(sent.ok, "{}", sent.error);
    assert_same_fingerprint(
        &sent.value["at_stop"],
        &dst.received_report()["at_switchover"],
    );
    assert_eq!(dst.info()["state"], "Running");
    assert_eq!(src.info()["state"], "Shutdown");
    drop((src, dst));
    drop(ns);
}

#[test]
fn live_migration_of_two_vfs_in_one_vm() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(
        dir.path(),
        &[
            "emulated=on,vram=16M,id=gpu0",
            // Another shape and seed; id left out, so the host names it.
            "emulated=on,vram=16M,tiles=2,gts=1,seed=7",
        ],
        &[],
    );
    let info = src.info();
    assert_eq!(device(&info, 1)["id"], "_xe1");
    let dst = Host::start(dir.path(), "dst", &[]);
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    let sent = migrate_and_verify(&src, &dst, &url);
    // Both VF states went at once, each over a connection of its own,
    // while the final memory pass used the main one.
    assert_eq!(sent["downtime"]["device_state_connections"], 2);
    assert_eq!(sent["at_stop"]["devices"].as_array().unwrap().len(), 2);
    assert_ne!(
        sent["at_stop"]["devices"][0]["digest"],
        sent["at_stop"]["devices"][1]["digest"]
    );
}

#[test]
fn incompatible_destination_is_refused_before_the_source_stops() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), &["emulated=on,vram=16M,id=gpu0"], &[]);
    let cases = [
        ("emulated=on,vram=16M,devid=0xe20c", "device id"),
        ("emulated=on,vram=16M,revid=1", "revision"),
        ("emulated=on,vram=8M", "smaller"),
    ];
    for (n, (spec, needle)) in cases.iter().enumerate() {
        let gen_before = wait_generation_beyond(&src, 0, 0);
        let dst = Host::start(dir.path(), &format!("dst{n}"), &[]);
        let url = format!("unix:{}", dir.path().join(format!("mig{n}.sock")).display());
        dst.arm(&json!({ "device_overrides": { "gpu0": spec } }));
        let receiver = dst.receive_in_background(&receive_config(&url));
        let r = src.send_migration(&send_config(&url));
        assert!(!r.ok, "{spec}: went through");
        assert!(r.error.starts_with("config: "), "{spec}: {}", r.error);
        assert!(
            r.error.contains(needle) && r.error.contains("gpu0"),
            "{spec}: {}",
            r.error
        );
        let received = receiver.join().unwrap();
        assert!(!received.success());
        assert!(
            received.stderr.contains("InternalServerError") && received.stderr.contains(needle),
            "{}",
            received.stderr
        );

        // The source never stopped: no memory moved, VM and VF running,
        // the workload still counting.
        let counters = src.counters();
        assert_eq!(counters["migration"]["memory_bytes_sent"], 0);
        assert_eq!(counters["migration"]["failed"], n as u64 + 1);
        let info = src.info();
        assert_eq!(info["state"], "Running");
        assert_eq!(device(&info, 0)["vf_state"], "RUNNING");
        let now = generation(&info, 0);
        assert!(now >= gen_before);
        wait_generation_beyond(&src, 0, now);
        // The destination discarded what it had built.
        dst.assert_no_vm();
    }
}

#[test]
fn killed_destination_leaves_the_source_running_with_its_vf_state() {
    let dir = tempfile::tempdir().unwrap();
    // gpu0 idles (its state must come back bit for bit); gpu1 works (it
    // must go on from where it stopped, not from a reset).
    let src = source(
        dir.path(),
        &[
            "emulated=on,vram=16M,id=gpu0,workload=off",
            "emulated=on,vram=16M,id=gpu1",
        ],
        &["--vcpu-workload", "off"],
    );
    let mut dst = Host::start(dir.path(), "dst", &[]);
    let before = src.info();
    let gen1_before = wait_generation_beyond(&src, 1, 20);
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.arm(&json!({ "stall_at": "device-state", "timeout_s": 30 }));
    let _receiver = dst.receive_in_background(&receive_config(&url));
    let attempt = src.start_send(&send_config(&url));
    // Memory has moved and the source is in its downtime, streaming VF
    // state, when the destination dies.
    poll("destination stalled in device-state", || {
        (dst.migration_status()["phase"] == "receive: stalled").then_some(())
    });
    assert!(
        src.counters()["migration"]["memory_bytes_sent"]
            .as_u64()
            .unwrap()
            >= 32 << 20
    );
    dst.kill();

    let r = src.wait_outcome(attempt);
    assert!(!r.ok);
    assert!(r.error.starts_with("device-state gpu0"), "{}", r.error);

    let info = src.info();
    assert_eq!(info["state"], "Running");
    assert_eq!(device(&info, 0)["vf_state"], "RUNNING");
    assert_eq!(device(&info, 1)["vf_state"], "RUNNING");
    assert_eq!(device(&info, 0)["digest"], device(&before, 0)["digest"]);
    assert!(generation(&info, 1) >= gen1_before, "gpu1 was reset");
    wait_generation_beyond(&src, 1, generation(&info, 1));
    assert_eq!(src.counters()["migration"]["failed"], 1);
    assert!(src.log_text().contains("source VM resumed"));

    // The source can still migrate afterwards.
    let dst2 = Host::start(dir.path(), "dst2", &[]);
    let url2 = format!("unix:{}", dir.path().join("mig2.sock").display());
    let (sent, received) = migrate(&src, &dst2, &url2, &send_config(&url2));
    assert_same_fingerprint(&sent["at_stop"], &received["at_switchover"]);
    assert_eq!(
        sent["at_stop"]["devices"][0]["digest"],
        device(&before, 0)["digest"]
    );
}

#[test]
fn paused_vm_arrives_paused() {
    // CompletePaused: the destination answers Switchover without
    // resuming; the VM runs only when someone resumes it.
    let dir = tempfile::tempdir().unwrap();
    let src = source(
        dir.path(),
        &["emulated=on,vram=8M,id=gpu0"],
        &["--vcpu-workload", "off"],
    );
    let dst = Host::start(dir.path(), "dst", &[]);
    wait_generation_beyond(&src, 0, 5);
    src.ch_ok(&["pause"]);
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    let (sent, received) = migrate(&src, &dst, &url, &send_config(&url));
    assert_same_fingerprint(&sent["at_stop"], &received["at_switchover"]);
    assert_eq!(sent["two_step_switchover"], true);
    assert_eq!(received["two_step_switchover"], true);
    assert_eq!(src.info()["state"], "Shutdown");
    let info = dst.info();
    assert_eq!(info["state"], "Paused");
    assert_eq!(device(&info, 0)["vf_state"], "STOP");
    dst.ch_ok(&["resume"]);
    let g = generation(&dst.info(), 0);
    wait_generation_beyond(&dst, 0, g);
}

/// Gives `gpu0` VRAM content, `zero_percent` of its pages zero.
fn fill(host: &Host, zero_percent: u8) {
    host.hook(
        "vm.fill-device",
        Some(&json!({ "device": "gpu0", "seed": 7, "zero_percent": zero_percent })),
    );
}

/// The VF's first stop-copy stream report of a VRAM pre-copy migration.
fn vram_report(sent: &Value) -> &Value {
    let vram = &sent["downtime"]["vram"];
    assert_eq!(
        vram.as_array().map(Vec::len),
        Some(1),
        "{}",
        sent["downtime"]
    );
    eprintln!("VRAM: {}", vram[0]);
    &vram[0]
}

/// VRAM is read through the BAR while the VF's workload keeps writing
/// to it: pages written after pre-copy read them must be found by digest
/// and sent, or the VRAM checksums at the stop and at the switch-over
/// differ. The rest comes from what the destination pre-copied.
#[test]
fn vram_precopy_catches_vram_the_workload_wrote_after_it_was_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut src = source(dir.path(), &["emulated=on,vram=64M,id=gpu0"], &[]);
    fill(&src, 10);
    let dst = Host::start(dir.path(), "dst", &[]);
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    // Forced (our series' field, so the patched ch-remote).
    src.speak_patched();
    let sent = migrate_and_verify_with(&src, &dst, &url, ",vram_precopy=on");
    let vram = vram_report(&sent);
    assert_eq!(vram["precopy_read_bytes"], 64 << 20, "{vram}");
    assert_eq!(vram["compared"], true, "{vram}");
    // The workload writes ~2000 VRAM pages a second; some after their
    // page was read.
    assert!(vram["changed_pages"].as_u64().unwrap() > 0, "{vram}");
    let held = vram["held_bytes"].as_u64().unwrap();
    let stream = vram["stream_bytes"].as_u64().unwrap();
    // ~90 % of the 64 MiB is not zero; nearly all of it is held.
    assert!(held > 50 << 20, "{vram}");
    assert_eq!(vram["sent_bytes"].as_u64().unwrap() + held, stream);
    assert_eq!(sent["device_bytes"].as_u64().unwrap(), stream);
}

/// With the workload off nothing changes after pre-copy: no compared
/// page is sent again.
#[test]
fn vram_precopy_of_an_idle_vf_sends_no_vram_page_again() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(
        dir.path(),
        &["emulated=on,vram=32M,id=gpu0,workload=off,bar_rate=1G"],
        &[],
    );
    fill(&src, 0);
    let mut dst = Host::start(dir.path(), "dst", &[]);
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    src.arm(&json!({ "vram_precopy": "On" }));
    // Where the destination keeps pre-copied VRAM, as the patched
    // ch-remote gives it; one that is not a directory is refused.
    dst.speak_patched();
    let missing = dir.path().join("no-such-dir");
    let refused = dst.ch(&[
        "receive-migration",
        &format!("receiver_url={url},vram_dir={}", missing.display()),
    ]);
    assert!(!refused.success());
    assert!(
        refused.stderr.contains("is not a directory"),
        "{}",
        refused.stderr
    );
    let vram_dir = tempfile::tempdir().unwrap();
    dst.arm(&json!({ "verify": true }));
    let receiver = dst.receive_in_background(&format!(
        "receiver_url={url},vram_dir={}",
        vram_dir.path().display()
    ));
    let sent = src.send_migration(&send_config(&url));
    assert!(receiver.join().unwrap().success(), "{}", dst.log_text());
    assert!(sent.ok, "{}", sent.error);
    let sent = sent.value;
    assert_same_fingerprint(&sent["at_stop"], &dst.received_report()["at_switchover"]);
    let vram = vram_report(&sent);
    assert_eq!(vram["changed_pages"], 0, "{vram}");
    assert_eq!(vram["precopy_read_bytes"], 32 << 20, "{vram}");
    // Sent: the small state and the VRAM pages a window or container
    // record cut in two (those are not compared).
    assert!(vram["held_bytes"].as_u64().unwrap() > 31 << 20, "{vram}");
}

/// A destination that does not speak VRAM pre-copy gets the stream as
/// before, on the VF's own connection.
#[test]
fn vram_precopy_with_an_older_destination_sends_all_in_stop_copy() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), &["emulated=on,vram=16M,id=gpu0"], &[]);
    let dst = Host::start(dir.path(), "dst", &[]);
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    src.arm(&json!({ "vram_precopy": "On" }));
    dst.arm(&json!({
        "verify": true,
        "features": ["device-state", "switchover", "device-state-connections", "verify"],
    }));
    let receiver = dst.receive_in_background(&receive_config(&url));
    let sent = src.send_migration(&send_config(&url));
    assert!(receiver.join().unwrap().success());
    assert!(sent.ok, "{}", sent.error);
    let sent = sent.value;
    assert_same_fingerprint(&sent["at_stop"], &dst.received_report()["at_switchover"]);
    assert_eq!(sent["downtime"]["vram"], json!([]), "{}", sent["downtime"]);
    assert_eq!(sent["downtime"]["device_state_connections"], 1);
}

/// BAR reads slower than the pre-copy phase may last: once `timeout_s`
/// is reached (`timeout_strategy=ignore`) the VM pauses with VRAM
/// pre-copy unfinished; it stops at its next step and what it did not
/// read is sent in stop-copy, compared where it was read.
#[test]
fn vram_precopy_cut_short_by_the_timeout_sends_the_rest_in_stop_copy() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(
        dir.path(),
        &["emulated=on,vram=64M,id=gpu0,workload=off,bar_rate=8M"],
        &[],
    );
    fill(&src, 0);
    let dst = Host::start(dir.path(), "dst", &[]);
    let url = format!("unix:{}", dir.path().join("mig.sock").display());
    src.arm(&json!({ "vram_precopy": "On" }));
    let (sent, received) = migrate(
        &src,
        &dst,
        &url,
        &format!("destination_url={url},downtime_ms=300,timeout_s=2,timeout_strategy=ignore"),
    );
    assert_same_fingerprint(&sent["at_stop"], &received["at_switchover"]);
    let vram = vram_report(&sent);
    let read = vram["precopy_read_bytes"].as_u64().unwrap();
    // 64 MiB at 8 MiB/s takes 8 s; the pre-copy phase ended after 2.
    assert!(read > 0 && read < 64 << 20, "{vram}");
    let held = vram["held_bytes"].as_u64().unwrap();
    assert!(held > 0 && held <= read, "{vram}");
    // The pages pre-copy never read are compared and found missing
    // (those cut by a container record are not compared at all).
    let unread_pages = ((64 << 20) - read) / 4096;
    let changed = vram["changed_pages"].as_u64().unwrap();
    assert!(
        changed <= unread_pages && changed > unread_pages * 9 / 10,
        "{vram}"
    );
}
