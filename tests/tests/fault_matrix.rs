// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! "Never lose the VM": a fault in every phase of a migration or a
//! snapshot, with real processes, and the same invariants after each.
//!
//! Every cell runs a source with guest memory of 16 MiB, the vCPU idle,
//! `gpu0` (8 MiB VRAM, `workload=off`, filled by the `vm.fill-device`
//! hook so its state differs from a reset one: its digest must come back
//! bit for bit) and `gpu1` (4 MiB VRAM, workload on: its generation must never go
//! backwards), and a destination that starts empty. Migration timeouts
//! are 2 s, so a stalled peer costs little. Both VFs' VRAM is pre-copied
//! through their BARs on their device-state connections (the default,
//! `vram_precopy=auto`) unless a cell says otherwise. Every operation goes through
//! the real `ch-remote` (`send-migration` returns at once; its outcome is
//! read from `ch-remote info` on the source, as a CH user polls it).
//! Faults come from the test host's hooks (`tests/src/fault.rs`, curl:
//! ch-remote has no verb for them): `vm.inject-fault` for the emulated
//! VFs, `vm.arm-migration` with a `fault` for the next migration (drop
//! the connection, stall, at a named phase) or `device_faults` for the
//! destination's VFs; a "killed" side is stalled at the phase, then
//! SIGKILLed by the test.
//!
//! Every migration cell watches both hosts' VM states from before
//! `send-migration` to its end ([`RunWatch`], every 15 ms) and fails if
//! one sample finds both VMs Running.
//!
//! After each cell ([`Cell::check_source`], [`Cell::check_destination`]):
//! the surviving source is Running with both VFs RUNNING, `gpu0`'s digest
//! unchanged and `gpu1` moving on from where it stopped; a surviving
//! destination has no VM (`ch-remote info`: "VM is not created"; if the
//! source died, nothing ran there); fds, threads and children of every surviving process are back
//! exactly to their count before the attempt (polled up to 10 s while
//! threads end); the operation's error (what `ch-remote` printed, or the
//! outcome's error chain) names the phase, and the log has one line
//! naming phase and cause.
//!
//! | phase \ fault | connection dropped | destination killed | source killed | destination VF rejects | VF arc fails (ERROR) | disk full | stalled peer |
//! | --- | --- | --- | --- | --- | --- | --- | --- |
//! | memory pass 0 (VM still running) | `drop_by_destination_at_memory` | n/a: as in the final pass, but nothing stopped yet | n/a: nothing stopped yet, the destination sees EOF as in `source_killed_after_pause` | n/a: memory has no device check | n/a: no arc | n/a | `stalled_destination_at_memory` |
//! | VRAM pre-copy (VM still running, each VF's own connection) | `vram_precopy_connection_dropped_by_destination` | `vram_precopy_destination_killed` | n/a: as in memory pass 0 | n/a: VRAM is compared, never loaded, before stop-copy | n/a: no arc | n/a | n/a: as destination killed (it stalls, then dies) |
//! | pause (RUNNING -> RUNNING_P2P -> STOP) | `drop_by_source_after_pause` | n/a: no bytes in flight, first touched in the final pass | `source_killed_after_pause` | n/a: nothing reaches a VF | `pause_arc_fails`, `pause_of_second_vf_fails`, `quiesce_of_second_vf_fails`, `pause_arc_fails_into_error` (state lost, reported) | n/a | n/a: local step |
//! | final memory pass | `drop_by_source_in_final_memory_pass` | `destination_killed_in_final_memory_pass` | `source_killed_in_final_memory_pass` | n/a | n/a | n/a | `stalled_source_in_final_memory_pass`, `stalled_destination_in_final_memory_pass` |
//! | stop-copy read (source VF data fd) | see transfer | see transfer | see transfer | `corrupt_save_detected_by_source` (the source's parser stops it first) | `stop_copy_enter_fails`, `stop_copy_leave_fails_into_error` (the VF is reset after its whole stream was sent: the migration completes, the destination holds the only copy) | n/a | `stop_copy_read_stalls` (the VF's fd stalls), `vram_precopy_stop_copy_read_stalls` |
//! | transfer (device-state stream) | `drop_by_source_mid_device_stream`, `drop_by_destination_mid_device_stream` | `destination_killed_mid_device_stream` | `source_killed_mid_device_stream`, `source_killed_mid_device_stream_over_tcp` | `hostile_device_state_header` | n/a | n/a | `stalled_destination_mid_device_stream`, `stalled_destination_mid_device_stream_over_tcp`, `stalled_source_mid_device_stream` |
//! | destination resume-write (STOP -> RESUMING, data in) | same bytes as transfer | same as transfer | same as transfer | `destination_refuses_resuming` (ENODEV) | see load | n/a | same as transfer |
//! | RESUMING -> STOP (load) | n/a: local step | `destination_killed_after_load` | `source_killed_before_complete` (all loaded, no Complete) | `load_rejected_einval` (EINVAL) | `load_rejected_into_error` (ENODEV, reset) | n/a | n/a: local step |
//! | Complete, before ready | `drop_by_source_before_complete`, `drop_by_destination_at_complete` | `destination_killed_before_complete` | `source_killed_before_complete` | n/a | (roll-back) `source_resume_fails_during_roll_back` | n/a | `stalled_source_before_complete`, `stalled_destination_at_complete` |
//! | ready, Switchover not sent yet | `drop_by_source_after_ready`, `drop_by_destination_after_ready` | `destination_killed_after_ready` | `source_killed_after_ready` | n/a | n/a | n/a | `stalled_source_after_ready`, `stalled_source_after_ready_over_tcp`, `stalled_destination_after_ready` |
//! | Switchover sent, before its answer | `drop_by_source_after_switchover_sent`, `drop_by_destination_after_resume` (the answer lost) | `destination_killed_after_switchover` | `source_killed_after_switchover_sent` | `destination_vf_fails_to_resume` (answered Error: the source resumes) | n/a | n/a | `stalled_destination_after_switchover` |
//! | snapshot | n/a | n/a | n/a | n/a | `snapshot_arc_fails`, `failed_snapshot_over_an_old_one_leaves_no_mix` | `snapshot_disk_full_in_memory`, `snapshot_disk_full_in_device_data` (tmpfs), `snapshot_file_size_limit` (RLIMIT_FSIZE) | n/a: snapshots have no timeout knob (30 s device timeout) |
//!
//! "State lost, reported": a VF in ERROR only leaves it by a reset, which
//! loses its state; the source runs on with that VF reset and its error
//! says `reset (state lost)` ([`Cell::check_source_vf_lost`]).
//!
//! Hostile input: `hostile_memory_length`, `hostile_memory_range_outside`
//! (a Memory request of 2^63 bytes, a range beyond guest memory),
//! `hostile_complete_before_state`, `hostile_device_state_before_state`
//! must be refused with no panic and no large allocation (VmHWM stays
//! small) and leave the destination usable.
//!
//! The switch-over (two steps, see `tests/src/migration/switchover.rs`):
//! the cells around it ([`around_switchover`]) arm `verify` on the
//! destination and check more than the others: the copies that stopped
//! (the source's while Paused, the destination's as it got ready) hold
//! the same memory checksum and VF digests; where an outcome is unknown
//! the side that says so stays Paused and its error tells the operator
//! what to do; then the cell makes the operator's decision with
//! `ch-remote` ([`operator_decides`]: query the destination once its
//! `receive-migration` ended, resume or delete) and checks that exactly
//! one side runs the VM, with the source's state, and the other holds
//! none ([`check_one_runs`]). Three cells depend on a race and accept
//! either way: `drop_by_destination_after_ready` (did the source's
//! Switchover beat the drop?), `drop_by_source_after_switchover_sent`
//! (did the destination's Ok?) and `stalled_source_after_ready_over_tcp`
//! (did the closed connection refuse the late Switchover?).
//!
//! Older peers, without the two-step switch-over:
//! `old_destination_switches_over_in_one_step` (the source logs the
//! risk), `old_source_switches_over_in_one_step`,
//! `old_destination_drop_after_resume` (today's single step: the
//! destination discards, the source resumes; both may run for an
//! instant, so that cell does not assert the watch), and
//! `destination_without_device_state_is_refused` (no streamed device
//! state: refused before anything stops).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const EIO: i32 = 5;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;
/// Seconds a migration side waits for its peer.
const TIMEOUT_S: u64 = 2;
/// How long a stalled side stalls before it goes on (longer than the
/// peer's timeout; killed sides are killed during it).
const STALL_MS: u64 = 4_000;

/// fds, threads and children of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    fds: usize,
    threads: usize,
    children: usize,
}

fn usage(pid: u32) -> Usage {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut children = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        children += std::fs::read_to_string(path)
            .unwrap_or_default()
            .split_whitespace()
            .count();
    }
    Usage {
        fds,
        threads,
        children,
    }
}

/// Usage once two samples 50 ms apart agree (an API thread that just
/// answered may still be ending).
fn settled_usage(pid: u32) -> Usage {
    let mut last = usage(pid);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = usage(pid);
        if now == last {
            return now;
        }
        last = now;
    }
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

fn pid(host: &Host) -> u32 {
    host.child.as_ref().expect("host alive").id()
}

/// Waits (up to 10 s: threads end and fds close asynchronously) until
/// `host` uses exactly what it used before the attempt.
fn assert_no_leak(host: &Host, before: Usage) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = usage(pid(host));
        if now == before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: leaked resources: before {before:?}, after {now:?}",
            host.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts one log line names `phase` and `cause`.
fn assert_log_line(host: &Host, phase: &str, cause: &str) {
    let log = host.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains(phase) && l.contains(cause));
    match line {
        Some(l) => eprintln!("{}: {l}", host.name),
        None => panic!(
            "{}: no error line naming '{phase}' and '{cause}' in:\n{log}",
            host.name
        ),
    }
}

/// Asserts the answer is an error that names `phase`.
fn assert_api_error(r: &Answer, phase: &str) {
    assert!(!r.ok, "expected an error, got {:?}", r.value);
    assert!(
        r.error.contains(phase),
        "error does not name '{phase}': {}",
        r.error
    );
}

fn fault(phase: &str, kind: &str, after_bytes: u64) -> Value {
    json!({ "phase": phase, "kind": kind, "after_bytes": after_bytes, "stall_ms": STALL_MS })
}

fn arc(from: &str, to: &str, errno: i32, enter_error: bool) -> Value {
    json!({ "fail_arc": { "from": from, "to": to, "errno": errno, "enter_error": enter_error } })
}

#[derive(Clone, Copy)]
enum Transport {
    Unix,
    Tcp,
}

/// Starts a host with SIGXFSZ ignored, so that under an RLIMIT_FSIZE
/// (see [`set_file_size_limit`]) its writes fail with EFBIG instead of
/// killing it: a full disk for hosts that cannot mount a tmpfs.
fn start_ignoring_sigxfsz(dir: &Path, name: &str, args: &[&str]) -> Host {
    use std::os::unix::process::CommandExt;
    let socket = dir.join(format!("{name}.api"));
    let log = dir.join(format!("{name}.log"));
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("--api-socket")
        .arg(&socket)
        .arg("--log-file")
        .arg(&log)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: runs in the forked child before exec; signal() is
    // async-signal-safe, and an ignored disposition survives exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    Host::adopt(
        name,
        cmd.spawn().expect("spawn xe-vf-testhost"),
        &socket,
        log,
    )
}

/// Sets `pid`'s RLIMIT_FSIZE (None: unlimited). Set only while the VM is
/// paused: guest memory and VRAM are files too, written by offset.
fn set_file_size_limit(pid: u32, limit: Option<u64>) {
    let value = limit.unwrap_or(libc::RLIM_INFINITY);
    let rlim = libc::rlimit {
        rlim_cur: value,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid rlimit on our stack; no old-value pointer.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &rlim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// A source and a destination with their state before the attempt.
struct Cell {
    dir: tempfile::TempDir,
    src: Host,
    dst: Host,
    url: String,
    /// Appended to the send-migration config (our fields need the
    /// patched ch-remote: [`Host::speak_patched`]).
    send_extra: String,
    /// Test options armed on the source with each attempt (a fault is
    /// added to them).
    send_options: Value,
    before: Value,
    gen1: u64,
    src_usage: Usage,
    dst_usage: Usage,
}

impl Cell {
    fn new() -> Cell {
        Self::build(Transport::Unix, false)
    }

    /// A cell over `transport`; with `ignore_sigxfsz`, a source that
    /// survives a file size limit.
    fn build(transport: Transport, ignore_sigxfsz: bool) -> Cell {
        let dir = tempfile::tempdir().unwrap();
        let args = [
            "--memory",
            "size=16M",
            "--vcpu-workload",
            "off",
            "--device",
            "emulated=on,vram=8M,id=gpu0,workload=off",
            "--device",
            "emulated=on,vram=4M,id=gpu1",
        ];
        let src = if ignore_sigxfsz {
            start_ignoring_sigxfsz(dir.path(), "src", &args)
        } else {
            Host::start(dir.path(), "src", &args)
        };
        let dst = Host::start(dir.path(), "dst", &[]);
        let url = match transport {
            Transport::Unix => format!("unix:{}", dir.path().join("mig.sock").display()),
            Transport::Tcp => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                format!("tcp:127.0.0.1:{port}")
            }
        };
        // gpu0 idles with state of its own (not what a reset leaves).
        src.hook(
            "vm.fill-device",
            Some(&json!({ "device": "gpu0", "seed": 0x5eed, "zero_percent": 75 })),
        );
        let gen1 = wait_generation_beyond(&src, 1, 3);
        let before = src.info();
        // Warm-up is done; API threads come and go per request.
        let src_usage = settled_usage(pid(&src));
        let dst_usage = settled_usage(pid(&dst));
        Cell {
            dir,
            src,
            dst,
            url,
            send_extra: String::new(),
            send_options: json!({}),
            before,
            gen1,
            src_usage,
            dst_usage,
        }
    }

    fn inject(&self, device: &str, fault: Value) {
        self.src.hook(
            "vm.inject-fault",
            Some(&json!({ "device": device, "fault": fault })),
        );
    }

    /// The ch-remote send-migration config. With 2 s for the precopy
    /// phase, `ignore` keeps a loaded machine from cancelling a slow first
    /// pass: the cells are about faults, not convergence.
    fn send_config(&self) -> String {
        format!(
            "destination_url={},downtime_ms=300,timeout_s={TIMEOUT_S},timeout_strategy=ignore{}",
            self.url, self.send_extra
        )
    }

    /// `ch-remote receive-migration` in the background, with `extra` test
    /// hooks armed (and the 2 s timeout).
    fn receive(&self, extra: Value) -> JoinHandle<ChOutput> {
        let mut options = json!({ "timeout_s": TIMEOUT_S });
        if let Value::Object(m) = extra {
            for (k, v) in m {
                options[k] = v;
            }
        }
        self.dst.arm(&options);
        self.dst.receive_in_background(&receive_config(&self.url))
    }

    /// `ch-remote send-migration` (returns at once) with `fault` armed;
    /// the attempt to wait for.
    fn start_send(&self, fault: Option<Value>) -> u64 {
        let mut options = self.send_options.clone();
        if let Some(f) = fault {
            options["fault"] = f;
        }
        if options != json!({}) {
            self.src.arm(&options);
        }
        self.src.start_send(&self.send_config())
    }

    /// Watches both hosts' VM states from now on (see [`RunWatch`]).
    fn watch(&self) -> RunWatch {
        RunWatch::start(&self.src, &self.dst)
    }

    /// One migration expected to fail, watched throughout; returns
    /// (send, receive) answers.
    fn failed_migration(&self, send_fault: Option<Value>, recv_extra: Value) -> (Answer, Answer) {
        let watch = self.watch();
        let receiver = self.receive(recv_extra);
        let attempt = self.start_send(send_fault);
        let sent = self.src.wait_outcome(attempt);
        let received = receiver.join().unwrap().answer();
        watch.assert_never_both_running(["Running", "none"]);
        (sent, received)
    }

    /// The source runs on with its VFs as they were.
    fn check_source(&self, send: &Answer, phase: &str, cause: &str) {
        assert!(
            !send.ok,
            "the migration went through:\n{}\n{}",
            self.src.log_text(),
            self.dst.log_text()
        );
        assert_api_error(send, phase);
        let info = self.src.info();
        assert_eq!(info["state"], "Running", "{info}");
        for i in 0..2 {
            assert_eq!(device(&info, i)["vf_state"], "RUNNING", "{info}");
        }
        assert_eq!(
            device(&info, 0)["digest"],
            device(&self.before, 0)["digest"],
            "gpu0 state changed"
        );
        let g1 = generation(&info, 1);
        assert!(g1 >= self.gen1, "gpu1 went back: {g1} < {}", self.gen1);
        wait_generation_beyond(&self.src, 1, g1);
        assert_log_line(&self.src, &format!("failed in {phase}"), cause);
        assert_no_leak(&self.src, self.src_usage);
    }

    /// A VF that went to ERROR lost its state (only a reset leaves
    /// ERROR): the source runs on with that VF reset, and says so.
    fn check_source_vf_lost(&self, send: &Answer, phase: &str) {
        assert_api_error(send, phase);
        assert!(
            send.error.contains("reset (state lost)"),
            "loss not reported: {}",
            send.error
        );
        let info = self.src.info();
        assert_eq!(info["state"], "Running", "{info}");
        for i in 0..2 {
            assert_eq!(device(&info, i)["vf_state"], "RUNNING", "{info}");
        }
        assert_ne!(
            device(&info, 0)["digest"],
            device(&self.before, 0)["digest"]
        );
        assert!(generation(&info, 1) >= self.gen1, "gpu1 went back");
        assert_log_line(
            &self.src,
            &format!("failed in {phase}"),
            "reset (state lost)",
        );
        assert_no_leak(&self.src, self.src_usage);
    }

    /// The destination runs nothing and holds nothing.
    fn check_destination(&self, recv: &Answer, phase: &str, cause: &str) {
        assert_api_error(recv, phase);
        self.dst.assert_no_vm();
        assert_log_line(&self.dst, &format!("failed in {phase}"), cause);
        assert_no_leak(&self.dst, self.dst_usage);
        let status = self.dst.migration_status();
        assert!(status["last"]["failed"].is_object(), "{status}");
    }

    /// After a failed attempt, a clean migration still works and carries
    /// gpu0's original state.
    fn check_migrates_afterwards(&self, dst_name: &str) {
        let dst = Host::start(self.dir.path(), dst_name, &[]);
        let url = format!("unix:{}", self.dir.path().join("again.sock").display());
        dst.arm(&json!({ "verify": true }));
        let receiver = dst.receive_in_background(&receive_config(&url));
        let sent = self.src.send_migration(&send_config(&url));
        let received = receiver.join().unwrap();
        assert!(received.success(), "{}", received.stderr);
        assert!(sent.ok, "{}", sent.error);
        let sent = sent.value;
        assert_same_fingerprint(&sent["at_stop"], &dst.received_report()["at_switchover"]);
        assert_eq!(
            sent["at_stop"]["devices"][0]["digest"],
            device(&self.before, 0)["digest"]
        );
    }
}

/// Waits until `host` logged that it stalls at `phase` (its fault hook).
fn wait_stalled(host: &Host, phase: &str) {
    let needle = format!("fault injection: Stall at {phase} ");
    poll(&format!("{} stalled at {phase}", host.name), || {
        host.log_text().contains(&needle).then_some(())
    });
}

// ---- source VF faults -------------------------------------------------

#[test]
fn pause_arc_fails() {
    let c = Cell::new();
    c.inject("gpu0", arc("RUNNING_P2P", "STOP", EIO, false));
    let (s, r) = c.failed_migration(None, json!({}));
    c.check_source(&s, "pause devices", "Input/output error");
    c.check_destination(&r, "abandon", "abandoned");
}

#[test]
fn pause_arc_fails_into_error() {
    let c = Cell::new();
    c.inject("gpu0", arc("RUNNING_P2P", "STOP", EIO, true));
    let (s, r) = c.failed_migration(None, json!({}));
    c.check_source_vf_lost(&s, "pause devices");
    c.check_destination(&r, "abandon", "abandoned");
}

#[test]
fn pause_of_second_vf_fails() {
    // gpu0 is already in STOP when gpu1's arc fails: both must run again.
    let c = Cell::new();
    c.inject("gpu1", arc("RUNNING_P2P", "STOP", EIO, false));
    let (s, r) = c.failed_migration(None, json!({}));
    c.check_source(&s, "pause devices", "device gpu1");
    c.check_destination(&r, "abandon", "abandoned");
}

#[test]
fn quiesce_of_second_vf_fails() {
    let c = Cell::new();
    c.inject("gpu1", arc("RUNNING", "RUNNING_P2P", EIO, false));
    let (s, r) = c.failed_migration(None, json!({}));
    c.check_source(&s, "pause devices", "device gpu1");
    c.check_destination(&r, "abandon", "abandoned");
}

#[test]
fn source_resume_fails_during_roll_back() {
    // The migration fails, and so does gpu0's first step back to running:
    // the VM must not be lost; it stays Paused with its state, says so,
    // and resumes on request.
    let c = Cell::new();
    c.inject("gpu0", arc("STOP", "STOP_COPY", EIO, false));
    c.inject("gpu0", arc("STOP", "RUNNING_P2P", EIO, false));
    let (s, r) = c.failed_migration(None, json!({}));
    assert_api_error(&s, "device-state gpu0");
    c.check_destination(&r, "device-state gpu0", "");
    assert_log_line(&c.src, "could not resume", "gpu0");
    assert!(s.error.contains("is Paused"), "{}", s.error);
    assert_eq!(c.src.info()["state"], "Paused");
    c.src.ch_ok(&["resume"]);
    c.check_source(&s, "device-state gpu0", "enter STOP_COPY");
}

#[test]
fn stop_copy_enter_fails() {
    let c = Cell::new();
    c.inject("gpu0", arc("STOP", "STOP_COPY", EIO, false));
    let (s, r) = c.failed_migration(None, json!({}));
    c.check_source(&s, "device-state gpu0", "enter STOP_COPY");
    c.check_destination(&r, "device-state gpu0", "ended before its END record");
    c.check_migrates_afterwards("dst2");
}

/// The VF fails to leave STOP_COPY after its whole stream was read: it is
/// reset, and the stream the destination holds is the only copy of its
/// state, so the migration completes rather than resume a blank VF.
#[test]
fn stop_copy_leave_fails_into_error() {
    let c = Cell::new();
    c.inject("gpu0", arc("STOP_COPY", "STOP", EIO, true));
    let watch = c.watch();
    let receiver = c.receive(json!({ "verify": true }));
    let sent = c.src.wait_outcome(c.start_send(None));
    let received = receiver.join().unwrap();
    watch.assert_never_both_running(["Running", "none"]);
    assert!(received.success(), "{}", received.stderr);
    assert!(sent.ok, "{}", sent.error);
    let sent = sent.value;
    assert_eq!(
        c.dst.received_report()["at_switchover"]["devices"][0]["digest"]["vram"],
        device(&c.before, 0)["digest"]["vram"],
        "the destination holds the state the source VF had"
    );
    assert_eq!(c.src.info()["state"], "Shutdown", "{sent}");
    assert_eq!(c.dst.info()["state"], "Running");
    let log = c.src.log_text();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("leave STOP_COPY")
            && l.contains("only copy of the device state")),
        "{log}"
    );
}

#[test]
fn stop_copy_read_stalls() {
    let mut c = Cell::new();
    // Without VRAM pre-copy the bytes read before the stall reach the
    // destination at once, and it times out on the silence after them.
    c.send_options = json!({ "vram_precopy": "Off" });
    let r = stalled_save(&c);
    c.check_destination(&r, "device-state gpu0", "timed out");
}

/// gpu0's data fd stalls after 100 KB of its stop-copy stream: the
/// source gives up on it and runs on; returns the destination's answer.
fn stalled_save(c: &Cell) -> Answer {
    c.inject("gpu0", json!({ "stall_save": { "after_bytes": 100_000 } }));
    let (s, r) = c.failed_migration(None, json!({}));
    c.check_source(
        &s,
        "device-state gpu0",
        "stop-copy read: device data stream stalled",
    );
    r
}

#[test]
fn vram_precopy_stop_copy_read_stalls() {
    // With VRAM pre-copy the stream goes in windows of up to 16 MiB: the
    // destination sees nothing of a stream that stalls inside its first
    // window until the source gives up (its device timer) and sends what
    // it has, or it times out first on the silence (its own timer, as
    // long). Either way it fails in the VF's stream and runs nothing, and
    // the source runs on with its VF intact.
    let c = Cell::new();
    let r = stalled_save(&c);
    let cause = if c.dst.log_text().contains("ended before its END record") {
        "ended before its END record"
    } else {
        "timed out"
    };
    c.check_destination(&r, "device-state gpu0", cause);
}

#[test]
fn corrupt_save_detected_by_source() {
    let c = Cell::new();
    // Byte 0 is the descriptor packet's version: the source's in-flight
    // parser stops the stream, the destination sees it end unfinished.
    c.inject("gpu0", json!({ "corrupt_save": { "offset": 0 } }));
    let (s, r) = c.failed_migration(None, json!({}));
    c.check_destination(&r, "device-state gpu0", "ended before its END record");
    c.check_source(&s, "device-state gpu0", "unsupported stream version");
}

// ---- destination VF rejects --------------------------------------------

#[test]
fn destination_refuses_resuming() {
    let c = Cell::new();
    let faults = json!({ "device_faults": { "gpu0": [arc("STOP", "RESUMING", ENODEV, false)] } });
    let (s, r) = c.failed_migration(None, faults);
    c.check_destination(&r, "device-state gpu0", "enter RESUMING");
    c.check_source(
        &s,
        "device-state gpu0",
        "the destination said: device-state gpu0",
    );
}

#[test]
fn load_rejected_einval() {
    let c = Cell::new();
    let faults = json!({ "device_faults": { "gpu1": [arc("RESUMING", "STOP", EINVAL, false)] } });
    let (s, r) = c.failed_migration(None, faults);
    c.check_destination(&r, "device-state gpu1", "RESUMING -> STOP load");
    c.check_source(&s, "device-state gpu1", "Invalid argument");
}

#[test]
fn load_rejected_into_error() {
    let c = Cell::new();
    let faults = json!({ "device_faults": { "gpu0": [arc("RESUMING", "STOP", ENODEV, true)] } });
    let (s, r) = c.failed_migration(None, faults);
    c.check_destination(&r, "device-state gpu0", "RESUMING -> STOP load");
    c.check_source(&s, "device-state gpu0", "No such device");
    c.check_migrates_afterwards("dst2");
}

#[test]
fn destination_vf_fails_to_resume() {
    // At Switchover the destination cannot run the VM and says so: it
    // discards its copy, and the source, told, resumes its own.
    let c = Cell::new();
    let faults = json!({ "device_faults": { "gpu1": [arc("STOP", "RUNNING_P2P", EIO, false)] } });
    let (s, r) = c.failed_migration(None, faults);
    c.check_destination(&r, "resume devices", "Input/output error");
    c.check_source(&s, "switchover", "destination refused: resume devices");
}

// ---- connection dropped -------------------------------------------------

#[test]
fn drop_by_destination_at_memory() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(None, json!({ "fault": fault("memory", "drop", 0) }));
    c.check_source(&s, "memory pass 0", "the peer closed the connection");
    c.check_destination(&r, "memory", "closed the connection mid-transfer");
}

#[test]
fn drop_by_source_after_pause() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(Some(fault("pause", "drop", 0)), json!({}));
    c.check_source(&s, "final memory pass", "the peer closed the connection");
    c.check_destination(&r, "read command", "before Complete");
}

#[test]
fn drop_by_source_in_final_memory_pass() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(Some(fault("final-memory", "drop", 0)), json!({}));
    c.check_source(&s, "final memory pass", "the peer closed the connection");
    c.check_destination(&r, "memory", "closed the connection mid-transfer");
}

#[test]
fn drop_by_source_mid_device_stream() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(Some(fault("device-state", "drop", 20_000)), json!({}));
    c.check_source(
        &s,
        "device-state gpu0",
        "output write: the peer closed the connection",
    );
    c.check_destination(&r, "device-state gpu0", "truncated at offset 20000");
    c.check_migrates_afterwards("dst2");
}

#[test]
fn drop_by_destination_mid_device_stream() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(
        None,
        json!({ "fault": fault("device-state", "drop", 20_000) }),
    );
    c.check_source(
        &s,
        "device-state gpu0",
        "output write: the peer closed the connection",
    );
    c.check_destination(&r, "device-state gpu0", "ended before its END record");
}

#[test]
fn drop_by_source_before_complete() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(Some(fault("complete", "drop", 0)), json!({}));
    c.check_source(&s, "complete", "the peer closed the connection");
    c.check_destination(&r, "read command", "before Complete");
}

#[test]
fn drop_by_destination_at_complete() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(None, json!({ "fault": fault("complete", "drop", 0) }));
    c.check_source(&s, "complete", "closed the connection without answering");
    c.check_destination(&r, "complete", "the peer closed the connection");
}

// ---- switch-over ---------------------------------------------------------

/// A host's VM as an operator sees it with `ch-remote info`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// The host does not answer.
    Gone,
    NoVm,
    Vm(String),
}

fn look(host: &Host) -> Seen {
    let out = host.ch(&["info"]);
    if out.success() {
        return Seen::Vm(out.json()["state"].as_str().unwrap_or("?").to_string());
    }
    if out.stderr.contains("VM is not created") {
        return Seen::NoVm;
    }
    assert!(
        host.child.is_none(),
        "{}: info failed on a live host: {}",
        host.name,
        out.stderr
    );
    Seen::Gone
}

/// The side that runs the VM once the operator has decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// The operator's decision (README, "Migration flow"), with `ch-remote`,
/// once the destination's `receive-migration` has ended: the VM runs at
/// the destination, delete the source's; the destination has none (or
/// is gone), resume the source's if it is paused; the destination holds
/// it Paused, delete it if the source's runs, else resume it and delete
/// the source's.
fn operator_decides(c: &Cell) -> Side {
    let src = look(&c.src);
    let dst = look(&c.dst);
    eprintln!("operator sees source {src:?}, destination {dst:?}");
    let running = Seen::Vm("Running".into());
    let has_vm = |s: &Seen| matches!(s, Seen::Vm(_));
    if dst == running {
        if has_vm(&src) {
            c.src.ch_ok(&["delete"]);
        }
        return Side::Destination;
    }
    if !has_vm(&dst) {
        if src == Seen::Vm("Paused".into()) {
            c.src.ch_ok(&["resume"]);
        }
        return Side::Source;
    }
    if src == running {
        c.dst.ch_ok(&["delete"]);
        return Side::Source;
    }
    c.dst.ch_ok(&["resume"]);
    if has_vm(&src) {
        c.src.ch_ok(&["delete"]);
    }
    Side::Destination
}

/// A stopped VM's fingerprint as `info` shows it (`Paused`, VFs in STOP).
fn stopped_fingerprint(host: &Host) -> Value {
    let info = host.info();
    assert_eq!(info["state"], "Paused", "{}: {info}", host.name);
    let devices: Vec<Value> = info["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            assert_eq!(d["vf_state"], "STOP", "{}: {info}", host.name);
            json!({ "id": d["id"], "digest": d["digest"] })
        })
        .collect();
    json!({ "memory_crc32c": info["memory"]["crc32c"], "devices": devices })
}

/// Exactly one side runs the VM, with the state the source had (gpu0's
/// digest bit for bit, gpu1 going on from where it stopped); the other
/// holds none (deleted or gone).
fn check_one_runs(c: &Cell, side: Side) {
    let (runner, other) = match side {
        Side::Source => (&c.src, &c.dst),
        Side::Destination => (&c.dst, &c.src),
    };
    let info = runner.info();
    assert_eq!(info["state"], "Running", "{}: {info}", runner.name);
    for i in 0..2 {
        assert_eq!(device(&info, i)["vf_state"], "RUNNING", "{info}");
    }
    assert_eq!(
        device(&info, 0)["digest"],
        device(&c.before, 0)["digest"],
        "{}: gpu0 state differs from the source's",
        runner.name
    );
    let g1 = generation(&info, 1);
    assert!(g1 >= c.gen1, "gpu1 went back: {g1} < {}", c.gen1);
    wait_generation_beyond(runner, 1, g1);
    let seen = look(other);
    assert!(
        matches!(seen, Seen::Gone | Seen::NoVm),
        "{} still holds a VM: {seen:?}",
        other.name
    );
}

/// A side SIGKILLed once it stalls at its fault's phase.
#[derive(Clone, Copy)]
enum Kill {
    Source(&'static str),
    Destination(&'static str),
}

/// What the two sides said; `None` for a side that was killed.
struct Around {
    sent: Option<Answer>,
    /// The outcome in the destination's `migration.last`.
    received: Option<Answer>,
    /// What `ch-remote receive-migration` printed.
    receive_output: ChOutput,
    side: Side,
}

/// One migration with faults around the switch-over, watched from start
/// to end: the copies that stopped (the source's while paused, the
/// destination's at ready) are the same state; then the operator decides
/// and exactly one side runs; at no sample did both run.
fn around_switchover(
    c: &mut Cell,
    send_fault: Option<Value>,
    recv_options: Value,
    kill: Option<Kill>,
) -> Around {
    let watch = c.watch();
    let mut options = json!({ "verify": true });
    if let Value::Object(m) = recv_options {
        for (k, v) in m {
            options[k] = v;
        }
    }
    let receiver = c.receive(options);
    let attempt = c.start_send(send_fault);
    let mut held = Vec::new();
    match kill {
        Some(Kill::Source(phase)) => {
            wait_stalled(&c.src, phase);
            held.push(("source as it stalled", stopped_fingerprint(&c.src)));
            c.src.kill();
        }
        Some(Kill::Destination(phase)) => {
            wait_stalled(&c.dst, phase);
            c.dst.kill();
        }
        None => {}
    }
    let sent = c.src.child.is_some().then(|| c.src.wait_outcome(attempt));
    // The operator waits for the destination's receive-migration to end.
    let receive_output = receiver.join().unwrap();
    let received = c
        .dst
        .child
        .is_some()
        .then(|| Answer::from_outcome(&c.dst.migration_status()["last"]));
    if let Some(s) = &sent {
        if s.ok {
            held.push(("source at its stop", s.value["at_stop"].clone()));
        } else if s.unknown {
            held.push(("source, paused", stopped_fingerprint(&c.src)));
        }
    }
    if let Some(r) = &received {
        assert_eq!(r.ok, receive_output.success(), "{receive_output:?}");
        if r.ok {
            held.push((
                "destination at ready",
                c.dst.received_report()["at_switchover"].clone(),
            ));
        } else if r.unknown {
            held.push(("destination, paused", stopped_fingerprint(&c.dst)));
        }
    }
    eprintln!(
        "copies held: {:?}",
        held.iter().map(|(n, _)| *n).collect::<Vec<_>>()
    );
    for pair in held.windows(2) {
        assert_same_fingerprint(&pair[0].1, &pair[1].1);
    }
    // Until the operator decides, a side that cannot tell refuses to
    // migrate its copy elsewhere.
    if sent.as_ref().is_some_and(|s| s.unknown) {
        assert_new_migration_refused(c, &c.src);
    }
    if received.as_ref().is_some_and(|r| r.unknown) {
        assert_new_migration_refused(c, &c.dst);
    }
    let side = operator_decides(c);
    check_one_runs(c, side);
    watch.assert_never_both_running(["Running", "none"]);
    Around {
        sent,
        received,
        receive_output,
        side,
    }
}

/// `send-migration` (to where nobody listens) is refused at once, saying
/// why and what to do, and nothing changes: the VM stays Paused.
fn assert_new_migration_refused(c: &Cell, host: &Host) {
    let before = host.migration_status()["attempts"].clone();
    let out = host.ch(&["send-migration", &nowhere(c)]);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        !out.success(),
        "{}: send-migration accepted: {said}",
        host.name
    );
    assert!(
        said.contains("Refusing to migrate: the last migration's outcome is unknown")
            && said.contains("outcome_checked=on")
            && said.contains("ch-remote resume"),
        "{}: {said}",
        host.name
    );
    let status = host.migration_status();
    assert_eq!(status["attempts"], before, "{}: {status}", host.name);
    assert_eq!(status["state"], "Paused", "{}: {status}", host.name);
}

/// A send-migration config whose connection fails at once.
fn nowhere(c: &Cell) -> String {
    format!(
        "destination_url=unix:{},timeout_s=1",
        c.dir.path().join("nobody-listens.sock").display()
    )
}

/// The source's outcome is unknown: it stayed Paused, and its error and
/// log say so and what to do.
fn assert_source_unknown(c: &Cell, s: &Answer, cause: &str) {
    assert!(s.unknown, "not unknown: {s:?}");
    assert_api_error(s, "switchover");
    assert!(
        s.error.contains("Migration outcome unknown") && s.error.contains("ch-remote resume"),
        "{}",
        s.error
    );
    assert!(s.error.contains(cause), "'{cause}' not in {}", s.error);
    let log = c.src.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("outcome unknown in switchover")),
        "{log}"
    );
}

/// The destination lost the source while ready: it kept the VM Paused,
/// and `receive-migration`'s error says so.
fn assert_destination_kept(a: &Around, cause: &str) {
    let r = a.received.as_ref().expect("destination alive");
    assert!(r.unknown, "not unknown: {r:?}");
    assert!(r.error.contains(cause), "'{cause}' not in {}", r.error);
    assert!(
        a.receive_output
            .stderr
            .contains("Lost the source after this VM was ready"),
        "{}",
        a.receive_output.stderr
    );
}

/// The source could not send Switchover: it resumed, as before ready.
fn assert_source_resumed_unsent(s: &Answer) {
    assert!(!s.ok && !s.unknown, "{s:?}");
    assert_api_error(s, "switchover");
    assert!(s.error.contains("Switchover was not sent"), "{}", s.error);
}

#[test]
fn drop_by_source_after_ready() {
    // The link breaks before Switchover leaves the source: it resumes;
    // the destination cannot tell and keeps its copy paused until the
    // operator deletes it.
    let mut c = Cell::new();
    let a = around_switchover(&mut c, Some(fault("ready", "drop", 0)), json!({}), None);
    assert_source_resumed_unsent(a.sent.as_ref().unwrap());
    assert_destination_kept(&a, "closed the connection before Switchover");
    assert_eq!(a.side, Side::Source);
}

#[test]
fn drop_by_destination_after_ready() {
    // Whether the source's Switchover beat the drop is a race: the
    // source resumed (not sent), or it waits (unknown) and the
    // destination kept its copy paused, or ran it. Every way, one runs.
    let mut c = Cell::new();
    let a = around_switchover(
        &mut c,
        None,
        json!({ "fault": fault("ready", "drop", 0) }),
        None,
    );
    let (s, r) = (a.sent.as_ref().unwrap(), a.received.as_ref().unwrap());
    eprintln!("source: {s:?}\ndestination: {r:?}");
    if !s.unknown {
        assert_source_resumed_unsent(s);
    }
    assert!(r.ok || r.unknown, "{r:?}");
}

#[test]
fn stalled_source_after_ready() {
    let mut c = Cell::new();
    let a = around_switchover(&mut c, Some(fault("ready", "stall", 0)), json!({}), None);
    assert_destination_kept(&a, "timed out");
    // Awake again, the source finds the destination gone before a byte
    // of Switchover left: it resumes.
    assert_source_resumed_unsent(a.sent.as_ref().unwrap());
    assert_eq!(a.side, Side::Source);
}

#[test]
fn stalled_source_after_ready_over_tcp() {
    // Over TCP the source's late Switchover usually goes out into a
    // connection the destination already closed (only the answer shows
    // it gone): then both hold the VM paused and the operator resumes
    // one. Either way, never both.
    let mut c = Cell::build(Transport::Tcp, false);
    let a = around_switchover(&mut c, Some(fault("ready", "stall", 0)), json!({}), None);
    assert_destination_kept(&a, "timed out");
    let s = a.sent.as_ref().unwrap();
    eprintln!("source: {s:?}");
    if s.unknown {
        assert_source_unknown(&c, s, "switchover");
        assert_eq!(a.side, Side::Destination);
    } else {
        assert_source_resumed_unsent(s);
        assert_eq!(a.side, Side::Source);
    }
}

#[test]
fn stalled_destination_after_ready() {
    // The source's Switchover waits unread; the source times out and
    // cannot know: it stays paused. The destination then runs the VM.
    let mut c = Cell::new();
    let a = around_switchover(
        &mut c,
        None,
        json!({ "fault": fault("ready", "stall", 0) }),
        None,
    );
    assert_source_unknown(&c, a.sent.as_ref().unwrap(), "timed out");
    assert!(a.received.as_ref().unwrap().ok);
    assert_eq!(a.side, Side::Destination);
}

#[test]
fn drop_by_source_after_switchover_sent() {
    // The destination runs the VM; its Ok may beat the drop (then the
    // migration simply went through), else the source cannot know.
    let mut c = Cell::new();
    let a = around_switchover(
        &mut c,
        Some(fault("switchover-sent", "drop", 0)),
        json!({}),
        None,
    );
    let s = a.sent.as_ref().unwrap();
    eprintln!("source: {s:?}");
    if !s.ok {
        assert_source_unknown(&c, s, "switchover");
    }
    assert!(a.received.as_ref().unwrap().ok);
    assert_eq!(a.side, Side::Destination);
}

#[test]
fn drop_by_destination_after_resume() {
    // The destination runs the VM but its Ok to Switchover is lost. With
    // one step the source resumed its own copy here (two running VMs);
    // with two it stays paused, and the operator finds the VM running at
    // the destination.
    let mut c = Cell::new();
    let a = around_switchover(
        &mut c,
        None,
        json!({ "fault": fault("resumed", "drop", 0) }),
        None,
    );
    assert_source_unknown(
        &c,
        a.sent.as_ref().unwrap(),
        "closed the connection without answering",
    );
    assert!(a.received.as_ref().unwrap().ok);
    assert!(
        c.dst.log_text().contains("the source was not told"),
        "{}",
        c.dst.log_text()
    );
    assert_eq!(a.side, Side::Destination);
}

#[test]
fn stalled_destination_after_switchover() {
    let mut c = Cell::new();
    let a = around_switchover(
        &mut c,
        None,
        json!({ "fault": fault("switchover", "stall", 0) }),
        None,
    );
    assert_source_unknown(&c, a.sent.as_ref().unwrap(), "timed out");
    assert!(a.received.as_ref().unwrap().ok);
    assert_eq!(a.side, Side::Destination);
}

#[test]
fn destination_killed_after_switchover() {
    // The destination dies before it runs the VM: the source cannot know
    // and waits; the operator finds no destination and resumes it.
    let mut c = Cell::new();
    let a = around_switchover(
        &mut c,
        None,
        json!({ "fault": fault("switchover", "stall", 0) }),
        Some(Kill::Destination("switchover")),
    );
    assert_source_unknown(&c, a.sent.as_ref().unwrap(), "switchover");
    assert_eq!(a.side, Side::Source);
}

#[test]
fn an_unknown_outcome_holds_off_migrations_until_the_operator_decides() {
    // The destination dies after Switchover left: the source cannot know.
    let mut c = Cell::new();
    c.src.speak_patched();
    let receiver = c.receive(json!({ "fault": fault("switchover", "stall", 0) }));
    let attempt = c.start_send(None);
    wait_stalled(&c.dst, "switchover");
    c.dst.kill();
    let _ = receiver.join();
    let s = c.src.wait_outcome(attempt);
    assert_source_unknown(&c, &s, "switchover");
    assert_new_migration_refused(&c, &c.src);

    // The user checked the other host: migrating the paused VM as it is
    // passes (and fails at connect: nobody listens there), the VM stays
    // Paused, and the outcome is still undecided.
    let attempt = c
        .src
        .start_send(&format!("{},outcome_checked=on", nowhere(&c)));
    let s = c.src.wait_outcome(attempt);
    assert!(!s.ok && !s.unknown, "{s:?}");
    assert!(s.error.contains("connect"), "{}", s.error);
    assert_eq!(c.src.info()["state"], "Paused");
    assert_new_migration_refused(&c, &c.src);

    // Resumed here, the VM is here: migrations go again.
    c.src.ch_ok(&["resume"]);
    let attempt = c.src.start_send(&nowhere(&c));
    let s = c.src.wait_outcome(attempt);
    assert!(s.error.contains("connect"), "{}", s.error);
    assert_eq!(c.src.info()["state"], "Running");
}

#[test]
fn destination_killed_after_ready() {
    let mut c = Cell::new();
    let a = around_switchover(
        &mut c,
        None,
        json!({ "fault": fault("ready", "stall", 0) }),
        Some(Kill::Destination("ready")),
    );
    assert_source_unknown(&c, a.sent.as_ref().unwrap(), "switchover");
    assert_eq!(a.side, Side::Source);
}

#[test]
fn source_killed_after_switchover_sent() {
    let mut c = Cell::new();
    let a = around_switchover(
        &mut c,
        Some(fault("switchover-sent", "stall", 0)),
        json!({}),
        Some(Kill::Source("switchover-sent")),
    );
    assert!(a.received.as_ref().unwrap().ok);
    assert_eq!(a.side, Side::Destination);
}

#[test]
fn source_killed_after_ready() {
    // Ready, then no source: the destination keeps the VM paused; the
    // operator finds the source gone and resumes it there.
    let mut c = Cell::new();
    let a = around_switchover(
        &mut c,
        Some(fault("ready", "stall", 0)),
        json!({}),
        Some(Kill::Source("ready")),
    );
    assert_destination_kept(&a, "closed the connection before Switchover");
    assert_eq!(a.side, Side::Destination);
}

// ---- older peers ---------------------------------------------------------

const RISK: &str = "does not support the two-step switch-over";

#[test]
fn old_destination_switches_over_in_one_step() {
    let mut c = Cell::new();
    let a = around_switchover(&mut c, None, json!({ "features": ["device-state"] }), None);
    let s = a.sent.as_ref().unwrap();
    assert!(s.ok, "{s:?}");
    assert_eq!(s.value["two_step_switchover"], false);
    assert_eq!(c.dst.received_report()["two_step_switchover"], false);
    let log = c.src.log_text();
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains(RISK)),
        "{log}"
    );
    assert_eq!(a.side, Side::Destination);
}

#[test]
fn old_source_switches_over_in_one_step() {
    let mut c = Cell::new();
    c.src.arm(&json!({ "features": ["device-state"] }));
    let a = around_switchover(&mut c, None, json!({}), None);
    assert!(a.sent.as_ref().unwrap().ok);
    assert_eq!(c.dst.received_report()["two_step_switchover"], false);
    assert_eq!(a.side, Side::Destination);
}

#[test]
fn old_destination_drop_after_resume() {
    // Today's single step, kept for older peers: the destination ran the
    // VM and could not say so; it discards its copy and the source
    // resumes its own. Both may run for the instant in between: the risk
    // the source logged, which the two steps remove. Not asserted here.
    let c = Cell::new();
    let watch = c.watch();
    let receiver = c.receive(json!({
        "features": ["device-state"],
        "fault": fault("resumed", "drop", 0),
    }));
    let s = c.src.wait_outcome(c.start_send(None));
    let r = receiver.join().unwrap().answer();
    let both = watch
        .samples()
        .iter()
        .filter(|s| s.states.iter().all(|st| st == "Running"))
        .count();
    eprintln!("samples with both Running: {both}");
    c.check_source(&s, "complete", "closed the connection without answering");
    c.check_destination(&r, "complete", "the peer closed the connection");
    assert!(c.src.log_text().contains(RISK));
}

#[test]
fn destination_without_device_state_is_refused() {
    // A destination that cannot take streamed device state is refused
    // before the source stops anything.
    let c = Cell::new();
    let (s, r) = c.failed_migration(None, json!({ "features": [] }));
    c.check_source(&s, "start", "does not take streamed device state");
    c.check_destination(&r, "abandon", "abandoned");
    assert_eq!(c.src.counters()["migration"]["memory_bytes_sent"], 0);
}

// ---- destination killed -----------------------------------------------

/// Stalls one side at `phase` (`wait` = which side, its phase), then
/// SIGKILLs the destination; returns the source's answer.
fn killed(
    c: &mut Cell,
    send_fault: Option<Value>,
    recv_extra: Value,
    wait: (&str, &str),
) -> Answer {
    let watch = c.watch();
    let receiver = c.receive(recv_extra);
    let attempt = c.start_send(send_fault);
    let (side, phase) = wait;
    let host = if side == "src" { &c.src } else { &c.dst };
    wait_stalled(host, phase);
    c.dst.kill();
    let _ = receiver.join();
    let outcome = c.src.wait_outcome(attempt);
    watch.assert_never_both_running(["Running", "none"]);
    outcome
}

#[test]
fn destination_killed_in_final_memory_pass() {
    let mut c = Cell::new();
    let s = killed(
        &mut c,
        Some(fault("final-memory", "stall", 0)),
        json!({}),
        ("src", "final-memory"),
    );
    c.check_source(&s, "final memory pass", "the peer closed the connection");
    c.check_migrates_afterwards("dst2");
}

/// The phase the source's log says its migration failed in.
fn failed_phase(host: &Host) -> String {
    let log = host.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("send-migration failed in "))
        .unwrap_or_else(|| panic!("{}: no failure line in:\n{log}", host.name));
    let rest = &line[line.find("failed in ").unwrap() + "failed in ".len()..];
    rest[..rest.find(':').unwrap_or(rest.len())].to_string()
}

#[test]
fn vram_precopy_connection_dropped_by_destination() {
    // VRAM goes ahead on each VF's connection while the VM runs; the
    // destination drops gpu0's after 64 KiB of it.
    let c = Cell::new();
    let (s, r) = c.failed_migration(
        None,
        json!({ "fault": fault("vram-precopy", "drop", 64 << 10) }),
    );
    c.check_source(&s, "vram pre-copy", "VRAM pre-copy of component #0");
    c.check_destination(&r, "abandon", "abandoned");
    c.check_migrates_afterwards("dst2");
}

#[test]
fn vram_precopy_destination_killed() {
    // The destination stops reading gpu0's VRAM pre-copy and is killed
    // there: the source, its VM still running, fails in whichever
    // connection notices first and runs on.
    let mut c = Cell::new();
    let s = killed(
        &mut c,
        None,
        json!({ "fault": fault("vram-precopy", "stall", 64 << 10) }),
        ("dst", "vram-precopy"),
    );
    let phase = failed_phase(&c.src);
    assert!(
        phase == "vram pre-copy" || phase.starts_with("memory pass"),
        "failed in {phase}"
    );
    c.check_source(&s, &phase, "");
    c.check_migrates_afterwards("dst2");
}

#[test]
fn destination_killed_mid_device_stream() {
    let mut c = Cell::new();
    let s = killed(
        &mut c,
        None,
        json!({ "fault": fault("device-state", "stall", 20_000) }),
        ("dst", "device-state"),
    );
    c.check_source(&s, "device-state gpu0", "the peer closed the connection");
}

#[test]
fn destination_killed_after_load() {
    // Every VF's state is loaded and Complete has arrived: the
    // destination dies before it answers (before ready).
    let mut c = Cell::new();
    let s = killed(
        &mut c,
        None,
        json!({ "fault": fault("complete", "stall", 0) }),
        ("dst", "complete"),
    );
    c.check_source(&s, "complete", "closed the connection without answering");
}

#[test]
fn destination_killed_before_complete() {
    let mut c = Cell::new();
    let s = killed(
        &mut c,
        Some(fault("complete", "stall", 0)),
        json!({}),
        ("src", "complete"),
    );
    c.check_source(&s, "complete", "the peer closed the connection");
}

// ---- source killed -----------------------------------------------------

/// Stalls the source at `phase`, SIGKILLs it, returns the receive answer.
fn source_killed(c: &mut Cell, send_fault: Value, phase: &str) -> Answer {
    let watch = c.watch();
    let receiver = c.receive(json!({}));
    c.start_send(Some(send_fault));
    wait_stalled(&c.src, phase);
    c.src.kill();
    let answer = receiver.join().unwrap().answer();
    watch.assert_never_both_running(["Running", "none"]);
    answer
}

#[test]
fn source_killed_after_pause() {
    let mut c = Cell::new();
    let r = source_killed(&mut c, fault("pause", "stall", 0), "pause");
    c.check_destination(&r, "read command", "before Complete");
}

#[test]
fn source_killed_in_final_memory_pass() {
    let mut c = Cell::new();
    let r = source_killed(&mut c, fault("final-memory", "stall", 0), "final-memory");
    c.check_destination(&r, "memory", "closed the connection mid-transfer");
}

#[test]
fn source_killed_mid_device_stream() {
    let mut c = Cell::new();
    let r = source_killed(
        &mut c,
        fault("device-state", "stall", 20_000),
        "device-state",
    );
    c.check_destination(&r, "device-state gpu0", "truncated at offset 20000");
}

#[test]
fn source_killed_before_complete() {
    let mut c = Cell::new();
    let r = source_killed(&mut c, fault("complete", "stall", 0), "complete");
    // All data arrived and loaded; without Complete nothing may run.
    c.check_destination(&r, "read command", "before Complete");
}

// ---- stalled peers -----------------------------------------------------

#[test]
fn stalled_destination_at_memory() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(None, json!({ "fault": fault("memory", "stall", 0) }));
    c.check_source(&s, "memory pass 0", "timed out");
    c.check_destination(&r, "memory", "closed the connection mid-transfer");
}

#[test]
fn stalled_destination_in_final_memory_pass() {
    // The source is paused when the destination stops taking memory: it
    // gives up after the timeout and runs again. QEMU style, so that the
    // final pass is all of memory and the source is mid-write when the
    // destination stops reading (with the verify pass the second Memory
    // is only the CPU-dirty pages).
    let mut c = Cell::new();
    c.src.speak_patched();
    c.send_extra = ",final_pass=resend".into();
    let (s, r) = c.failed_migration(None, json!({ "fault": fault("memory#2", "stall", 0) }));
    c.check_source(&s, "final memory pass", "timed out");
    c.check_destination(&r, "memory", "closed the connection mid-transfer");
}

#[test]
fn stalled_source_in_final_memory_pass() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(Some(fault("final-memory", "stall", 0)), json!({}));
    c.check_destination(&r, "memory", "timed out");
    c.check_source(
        &s,
        "final memory pass",
        "the destination said: memory: timed out",
    );
}

#[test]
fn stalled_destination_mid_device_stream() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(
        None,
        json!({ "fault": fault("device-state", "stall", 20_000) }),
    );
    c.check_source(&s, "device-state gpu0", "output write: timed out");
    c.check_destination(&r, "device-state gpu0", "ended before its END record");
}

#[test]
fn stalled_destination_mid_device_stream_over_tcp() {
    // Loopback TCP buffers hold MiBs: the source may finish writing and
    // then wait for the answer; either way it gives up after 2 s.
    let c = Cell::build(Transport::Tcp, false);
    let (s, r) = c.failed_migration(
        None,
        json!({ "fault": fault("device-state", "stall", 20_000) }),
    );
    c.check_source(&s, "device-state gpu", "timed out");
    // The destination, awake again, finds the stream cut short or
    // (everything was buffered) followed by Abandon: it discards either way.
    c.check_destination(&r, "", "");
}

#[test]
fn source_killed_mid_device_stream_over_tcp() {
    let mut c = Cell::build(Transport::Tcp, false);
    let r = source_killed(
        &mut c,
        fault("device-state", "stall", 20_000),
        "device-state",
    );
    c.check_destination(&r, "device-state gpu0", "truncated at offset 20000");
}

#[test]
fn stalled_source_mid_device_stream() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(Some(fault("device-state", "stall", 20_000)), json!({}));
    c.check_destination(&r, "device-state gpu0", "timed out");
    c.check_source(&s, "device-state gpu0", "the destination said");
}

#[test]
fn stalled_source_before_complete() {
    // The destination gives up waiting for Complete (it was not ready)
    // and discards; the source, awake again, cannot send Complete and
    // resumes.
    let c = Cell::new();
    let (s, r) = c.failed_migration(Some(fault("complete", "stall", 0)), json!({}));
    c.check_destination(&r, "read command", "timed out");
    c.check_source(&s, "complete", "the peer closed the connection");
}

#[test]
fn stalled_destination_at_complete() {
    let c = Cell::new();
    let (s, r) = c.failed_migration(None, json!({ "fault": fault("complete", "stall", 0) }));
    c.check_source(&s, "complete", "timed out");
    c.check_destination(&r, "complete", "the peer closed the connection");
}

// ---- snapshot ----------------------------------------------------------

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(Tmpfs(at.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .output();
    }
}

/// Asserts `dir` holds no snapshot that looks complete and no stray
/// partial file.
fn assert_no_snapshot(dir: &Path) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !names.iter().any(|n| n == "state.json"),
        "a failed snapshot left state.json: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n.ends_with(".partial")),
        "a failed snapshot left partial files: {names:?}"
    );
}

fn snapshot_cell(c: &Cell, target: &Path, phase: &str, cause: &str) {
    c.src.ch_ok(&["pause"]);
    let url = format!("file://{}", target.display());
    let r = c.src.ch(&["snapshot", &url]).answer();
    assert_api_error(&r, phase);
    assert_log_line(&c.src, phase, cause);
    assert_no_snapshot(target);
    // Restoring it is refused, with the reason.
    let dst = &c.dst;
    let rr = dst.ch(&["restore", &format!("source_url={url}")]);
    assert!(!rr.success(), "{}", rr.stdout);
    dst.assert_no_vm();
    c.src.ch_ok(&["resume"]);
    let info = c.src.info();
    assert_eq!(info["state"], "Running");
    for i in 0..2 {
        assert_eq!(device(&info, i)["vf_state"], "RUNNING", "{info}");
    }
    assert_eq!(device(&info, 0)["digest"], device(&c.before, 0)["digest"]);
    wait_generation_beyond(&c.src, 1, generation(&info, 1));
    assert_no_leak(&c.src, c.src_usage);
    // A good snapshot still works after the failure.
    c.src.ch_ok(&["pause"]);
    let good = c.dir.path().join("good");
    let good_url = format!("file://{}", good.display());
    c.src.ch_ok(&["snapshot", &good_url]);
    c.src.ch_ok(&["resume"]);
    dst.ch_ok(&["restore", &format!("source_url={good_url}")]);
    assert_eq!(
        device(&dst.info(), 0)["digest"],
        device(&c.before, 0)["digest"]
    );
}

/// A small filesystem: tmpfs when root, else skipped with the reason.
fn small_fs(c: &Cell, size: &str) -> Option<(Tmpfs, PathBuf)> {
    let at = c.dir.path().join("small");
    match Tmpfs::mount(&at, size) {
        Ok(t) => Some((t, at.join("snap"))),
        Err(e) => {
            eprintln!("SKIP: cannot mount a {size} tmpfs ({e}); RLIMIT_FSIZE would hit the host process's API too");
            None
        }
    }
}

#[test]
fn snapshot_disk_full_in_memory() {
    let c = Cell::new();
    let Some((_fs, target)) = small_fs(&c, "4m") else {
        return;
    };
    snapshot_cell(&c, &target, "write memory-ranges", "No space left");
}

#[test]
fn snapshot_disk_full_in_device_data() {
    let c = Cell::new();
    // Guest memory (16 MiB) fits, gpu0's 2 MiB of filled VRAM does not.
    let Some((_fs, target)) = small_fs(&c, "16448k") else {
        return;
    };
    snapshot_cell(&c, &target, "save device gpu0", "No space left");
}

#[test]
fn snapshot_file_size_limit() {
    // What a full disk looks like where no tmpfs can be mounted: the
    // host may write files of 8 MiB at most, guest memory is 16 MiB.
    let c = Cell::build(Transport::Unix, true);
    let target = c.dir.path().join("snap");
    c.src.ch_ok(&["pause"]);
    set_file_size_limit(pid(&c.src), Some(8 << 20));
    let url = format!("file://{}", target.display());
    let r = c.src.ch(&["snapshot", &url]).answer();
    assert_api_error(&r, "write memory-ranges");
    assert_log_line(&c.src, "write memory-ranges", "File too large");
    assert_no_snapshot(&target);
    set_file_size_limit(pid(&c.src), None);
    c.src.ch_ok(&["resume"]);
    let info = c.src.info();
    assert_eq!(info["state"], "Running");
    assert_eq!(device(&info, 0)["digest"], device(&c.before, 0)["digest"]);
    assert_no_leak(&c.src, c.src_usage);
}

#[test]
fn snapshot_arc_fails() {
    let c = Cell::new();
    c.inject("gpu1", arc("STOP", "STOP_COPY", EIO, false));
    let target = c.dir.path().join("snap");
    snapshot_cell(&c, &target, "save device gpu1", "enter STOP_COPY");
}

#[test]
fn failed_snapshot_over_an_old_one_leaves_no_mix() {
    let c = Cell::new();
    let target = c.dir.path().join("snap");
    let url = format!("file://{}", target.display());
    c.src.ch_ok(&["pause"]);
    c.src.ch_ok(&["snapshot", &url]);
    c.src.ch_ok(&["resume"]);
    // gpu0 moves on; then a second snapshot into the same directory
    // fails after gpu0's new data file was written.
    c.src.hook(
        "vm.fill-device",
        Some(&json!({ "device": "gpu0", "seed": 2, "zero_percent": 75 })),
    );
    c.inject("gpu1", arc("STOP", "STOP_COPY", EIO, false));
    c.src.ch_ok(&["pause"]);
    let r = c.src.ch(&["snapshot", &url]).answer();
    assert_api_error(&r, "save device gpu1");
    c.src.ch_ok(&["resume"]);
    // The directory holds the old snapshot whole, or no snapshot: never
    // the new gpu0 beside the old state.json and gpu1.
    let restored = c.dst.ch(&["restore", &format!("source_url={url}")]);
    if restored.success() {
        assert_eq!(
            device(&c.dst.info(), 0)["digest"],
            device(&c.before, 0)["digest"],
            "restored a mix of two snapshots"
        );
    } else {
        assert_no_snapshot(&target);
        c.dst.assert_no_vm();
    }
}

// ---- hostile peers -----------------------------------------------------

/// Speaks the migration protocol by hand to a listening destination.
struct RawPeer(UnixStream);

impl RawPeer {
    fn connect(c: &Cell) -> RawPeer {
        let path = c.url.strip_prefix("unix:").unwrap();
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RawPeer(s)
    }

    fn request(&mut self, command: u16, headers: [u8; 6], length: u64, payload: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&command.to_le_bytes());
        b.extend_from_slice(&headers);
        b.extend_from_slice(&length.to_le_bytes());
        b.extend_from_slice(payload);
        // The destination may already have closed: errors show in the answer.
        let _ = self.0.write_all(&b);
    }

    /// Reads a response: its status (1 Ok, 2 Error) and message.
    fn response(&mut self) -> (u16, String) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        let status = u16::from_le_bytes([h[0], h[1]]);
        let len = u64::from_le_bytes(h[8..16].try_into().unwrap());
        assert!(len < 1 << 20);
        let mut m = vec![0u8; len as usize];
        self.0.read_exact(&mut m).unwrap();
        (status, String::from_utf8_lossy(&m).into_owned())
    }

    /// Start (announcing streamed device state and the two-step
    /// switch-over) and a Config for an empty VM of 16 MiB (or with
    /// `devices`).
    fn handshake(&mut self, config: &Value) {
        let mut headers = [0u8; 6];
        headers[2..].copy_from_slice(&3u32.to_le_bytes());
        self.request(1, headers, 0, &[]);
        assert_eq!(self.response().0, 1);
        let payload = config.to_string().into_bytes();
        self.request(2, [0; 6], payload.len() as u64, &payload);
        let (status, msg) = self.response();
        assert_eq!(status, 1, "{msg}");
    }
}

fn empty_vm_config() -> Value {
    json!({
        "vm": { "memory_size": 16u64 << 20, "vcpu_workload": false, "devices": [] },
        "streamed": [],
    })
}

/// A Config with gpu0 as the real source would send it.
fn one_vf_config() -> Value {
    use xe_vf_glue::migration::StreamedState;
    let dev = xe_vf_glue::XeVfDevice::new(
        "gpu0",
        xe_vf_plugin::device_config::DeviceConfig::parse("emulated=on,vram=4M,id=gpu0").unwrap(),
    )
    .unwrap();
    let description = serde_json::to_value(dev.describe().unwrap()).unwrap();
    json!({
        "vm": { "memory_size": 16u64 << 20, "vcpu_workload": false,
                "devices": [{ "id": "gpu0", "spec": "emulated=on,vram=4M,id=gpu0" }] },
        "streamed": [{ "id": "gpu0", "description": description }],
    })
}

fn hostile_cell(config: Value, attack: impl FnOnce(&mut RawPeer), phase: &str, cause: &str) {
    let c = Cell::new();
    let receiver = c.receive(json!({}));
    let mut peer = RawPeer::connect(&c);
    peer.handshake(&config);
    attack(&mut peer);
    let (status, msg) = peer.response();
    assert_eq!(status, 2, "hostile input accepted: {msg}");
    drop(peer);
    let r = receiver.join().unwrap().answer();
    c.check_destination(&r, phase, cause);
    // Guest memory (16 MiB), a 4 MiB VF, buffers: far below 64 MiB;
    // a length taken at its word would be GiBs or an abort.
    let hwm = vm_hwm_kib(pid(&c.dst));
    eprintln!("destination VmHWM {hwm} KiB");
    assert!(hwm < 64 << 10, "destination peaked at {hwm} KiB");
    // Still usable: a real migration goes through.
    let receiver = c.dst.receive_in_background(&receive_config(&c.url));
    let sent = c.src.send_migration(&send_config(&c.url));
    assert!(sent.ok, "{}", sent.error);
    assert!(receiver.join().unwrap().success());
    assert_eq!(c.dst.info()["state"], "Running");
}

#[test]
fn hostile_memory_length() {
    hostile_cell(
        empty_vm_config(),
        |p| p.request(4, [0; 6], 1 << 63, &[]),
        "memory",
        "exceeds the limit",
    );
}

#[test]
fn hostile_memory_range_outside() {
    hostile_cell(
        empty_vm_config(),
        |p| {
            let mut table = Vec::new();
            table.extend_from_slice(&(15u64 << 20).to_le_bytes());
            table.extend_from_slice(&(1u64 << 40).to_le_bytes());
            p.request(4, [0; 6], 16, &table);
        },
        "memory",
        "outside guest memory",
    );
}

#[test]
fn hostile_device_state_header() {
    hostile_cell(
        one_vf_config(),
        |p| {
            let tree = json!({ "snapshots": { "gpu0": { "snapshots": {}, "snapshot_data": null } },
                               "snapshot_data": null })
            .to_string();
            p.request(3, [0; 6], tree.len() as u64, tree.as_bytes());
            assert_eq!(p.response().0, 1, "State refused");
            let mut cmd = Vec::new();
            xe_vf_glue::protocol::Request::device_state(0)
                .write_to(&mut cmd)
                .unwrap();
            let _ = p.0.write_all(&cmd);
            let _ =
                p.0.write_all(b"NOTXEVF!garbage-header-bytes-that-are-not-a-device-state");
            let _ = p.0.shutdown(std::net::Shutdown::Write);
        },
        "device-state gpu0",
        "bad magic",
    );
}

#[test]
fn hostile_complete_before_state() {
    // A VM whose state never came must not run.
    hostile_cell(
        empty_vm_config(),
        |p| p.request(5, [0; 6], 0, &[]),
        "complete",
        "Complete before State",
    );
}

#[test]
fn hostile_device_state_before_state() {
    hostile_cell(
        one_vf_config(),
        |p| {
            let mut cmd = Vec::new();
            xe_vf_glue::protocol::Request::device_state(0)
                .write_to(&mut cmd)
                .unwrap();
            let _ = p.0.write_all(&cmd);
        },
        "device-state",
        "DeviceState before State",
    );
}
