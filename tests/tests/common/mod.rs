// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared harness: test-host processes killed on drop, driven with the
//! real `ch-remote` as a Cloud Hypervisor user drives CH; our test-only
//! hooks (no `ch-remote` verb) go through the small HTTP client, as curl
//! would send them.

#![allow(dead_code)]

pub mod openapi;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use xe_vf_testhost::client::{ApiClient, ApiResponse};

pub const BIN: &str = env!("CARGO_BIN_EXE_xe-vf-testhost");
pub const WAIT: Duration = Duration::from_secs(30);
/// Longest a migration may take in these tests.
pub const MIGRATION_WAIT: Duration = Duration::from_secs(120);

const BUILD_HINT: &str = "build it with `scripts/build-cloud-hypervisor.sh --flavor upstream` \
     (scripts/test.sh does), or point XE_CH_REMOTE at a ch-remote binary";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where the pinned upstream build puts its results.
pub fn upstream_dir() -> PathBuf {
    repo().join("target/cloud-hypervisor/upstream")
}

/// The real `ch-remote`: `$XE_CH_REMOTE`, else the pinned upstream
/// build. Missing is a failure naming the script, never a skip.
pub fn ch_remote() -> PathBuf {
    let path = match std::env::var_os("XE_CH_REMOTE") {
        Some(p) => PathBuf::from(p),
        None => upstream_dir().join("ch-remote"),
    };
    assert!(
        path.is_file(),
        "the real ch-remote is needed at {}: {BUILD_HINT}",
        path.display()
    );
    path
}

/// The patched build's `ch-remote` (our series), which knows our fields
/// (`send-migration final_pass=`); missing is a failure naming the script.
pub fn patched_ch_remote() -> PathBuf {
    let path = repo().join("target/cloud-hypervisor/patched/ch-remote");
    assert!(
        path.is_file(),
        "{} is needed: build it with `scripts/build-cloud-hypervisor.sh --flavor patched`",
        path.display()
    );
    path
}

/// A file of the pinned upstream build (`cloud-hypervisor`,
/// `cloud-hypervisor.yaml`); missing is a failure naming the script.
pub fn upstream_file(name: &str) -> PathBuf {
    let path = upstream_dir().join(name);
    assert!(
        path.is_file(),
        "{} is needed: build it with `scripts/build-cloud-hypervisor.sh --flavor upstream`",
        path.display()
    );
    path
}

/// What one `ch-remote` run did.
#[derive(Clone, Debug)]
pub struct ChOutput {
    pub args: Vec<String>,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl ChOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout as JSON (what `info`, `counters`, `ping` print).
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "ch-remote {:?}: stdout is not JSON ({e}): {self:?}",
                self.args
            )
        })
    }

    pub fn answer(&self) -> Answer {
        Answer {
            ok: self.success(),
            unknown: false,
            error: self.stderr.clone(),
            value: Value::Null,
        }
    }
}

/// Runs `ch-remote --api-socket SOCKET ARGS`.
pub fn run_ch_remote(socket: &Path, args: &[&str]) -> ChOutput {
    run_ch_remote_binary(&ch_remote(), socket, args)
}

/// Runs `BINARY --api-socket SOCKET ARGS` (a ch-remote).
pub fn run_ch_remote_binary(binary: &Path, socket: &Path, args: &[&str]) -> ChOutput {
    let out = Command::new(binary)
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ch-remote");
    ChOutput {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// An operation's answer: a `ch-remote` run (error: what it printed) or a
/// migration's outcome in `info` (error: the chain, joined).
#[derive(Clone, Debug)]
pub struct Answer {
    pub ok: bool,
    /// A migration outcome `{"unknown": …}`: this side cannot tell
    /// whether the other runs the VM.
    pub unknown: bool,
    pub error: String,
    /// The report of a migration that went through.
    pub value: Value,
}

impl Answer {
    /// From `info`'s `migration.last` (`{"sent": …}`, `{"failed": …}` or
    /// `{"unknown": …}`).
    pub fn from_outcome(last: &Value) -> Answer {
        let unknown = last.get("unknown");
        match last.get("failed").or(unknown) {
            Some(f) => Answer {
                ok: false,
                unknown: unknown.is_some(),
                error: f["error"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(": ")
                    })
                    .unwrap_or_default(),
                value: f.clone(),
            },
            None => Answer {
                ok: true,
                unknown: false,
                error: String::new(),
                value: last["sent"].clone(),
            },
        }
    }
}

/// One `xe-vf-testhost` process; killed (SIGKILL) and reaped on drop.
pub struct Host {
    pub name: String,
    pub child: Option<Child>,
    /// For our hooks only.
    pub api: ApiClient,
    pub log: PathBuf,
    /// The ch-remote it is driven with (upstream's unless
    /// [`Host::speak_patched`]).
    pub ch_remote: PathBuf,
}

impl Host {
    /// Starts a host with `args` in `dir`, optionally under a wrapper
    /// command (e.g. `ip netns exec NS`).
    pub fn start_with(dir: &Path, name: &str, wrapper: &[&str], args: &[&str]) -> Host {
        let socket = dir.join(format!("{name}.api"));
        let log = dir.join(format!("{name}.log"));
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("--api-socket")
            .arg(&socket)
            .arg("--log-file")
            .arg(&log)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawn xe-vf-testhost");
        Self::adopt(name, child, &socket, log)
    }

    /// Wraps a started host process and waits for its API.
    pub fn adopt(name: &str, child: Child, socket: &Path, log: PathBuf) -> Host {
        let host = Host {
            name: name.to_string(),
            child: Some(child),
            api: ApiClient::new(socket),
            log,
            ch_remote: ch_remote(),
        };
        host.wait_ready();
        host
    }

    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Host {
        Self::start_with(dir, name, &[], args)
    }

    pub fn socket(&self) -> &Path {
        self.api.socket()
    }

    fn wait_ready(&self) {
        poll(&format!("{} API up", self.name), || {
            (self.socket().exists() && self.ch(&["ping"]).success()).then_some(())
        });
    }

    /// `ch-remote ARGS` against this host.
    pub fn ch(&self, args: &[&str]) -> ChOutput {
        run_ch_remote_binary(&self.ch_remote, self.socket(), args)
    }

    /// Drives this host with the patched ch-remote from now on, for our
    /// fields (`final_pass=`, `vram_precopy=`, `vram_dir=`).
    pub fn speak_patched(&mut self) {
        self.ch_remote = patched_ch_remote();
    }

    /// `ch-remote ARGS` that must exit 0.
    pub fn ch_ok(&self, args: &[&str]) -> ChOutput {
        let out = self.ch(args);
        assert!(
            out.success(),
            "{}: ch-remote {args:?} failed ({:?}):\n{}{}\n{}",
            self.name,
            out.code,
            out.stdout,
            out.stderr,
            self.log_text()
        );
        out
    }

    /// `ch-remote info`, which must succeed.
    pub fn info(&self) -> Value {
        self.ch_ok(&["info"]).json()
    }

    /// Asserts the host has no VM (`ch-remote info` fails as CH's does).
    pub fn assert_no_vm(&self) {
        let out = self.ch(&["info"]);
        assert!(!out.success(), "{}: has a VM: {}", self.name, out.stdout);
        assert!(
            out.stderr.contains("NotFound") && out.stderr.contains("VM is not created"),
            "{}: {}",
            self.name,
            out.stderr
        );
    }

    pub fn counters(&self) -> Value {
        self.ch_ok(&["counters"]).json()
    }

    /// A test hook (curl's job: ch-remote has no verb); must succeed.
    pub fn hook(&self, endpoint: &str, body: Option<&Value>) -> ApiResponse {
        let r = self.api.put(endpoint, body).expect(endpoint);
        assert!(
            r.is_success(),
            "{}: {endpoint} failed ({}): {:?}\n{}",
            self.name,
            r.status,
            r.body,
            self.log_text()
        );
        r
    }

    /// Arms test hooks for this host's next migration.
    pub fn arm(&self, options: &Value) {
        self.hook("vm.arm-migration", Some(options));
    }

    /// `GET vmm.migration` (our hook): works with or without a VM.
    pub fn migration_status(&self) -> Value {
        let r = self.api.get("vmm.migration").expect("vmm.migration");
        assert_eq!(r.status, 200, "{}: {:?}", self.name, r.body);
        r.body
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `ch-remote receive-migration CONFIG` in a thread (it returns once
    /// the migration is over); returns once the host listens.
    pub fn receive_in_background(&self, config: &str) -> JoinHandle<ChOutput> {
        let socket = self.socket().to_path_buf();
        let config = config.to_string();
        let binary = self.ch_remote.clone();
        let before = self.migration_status()["attempts"].as_u64().unwrap_or(0);
        let handle = std::thread::spawn(move || {
            run_ch_remote_binary(&binary, &socket, &["receive-migration", &config])
        });
        poll(&format!("{} listening", self.name), || {
            let s = self.migration_status();
            let started = s["attempts"].as_u64().unwrap_or(0) > before;
            let over = s["last"]["attempt"].as_u64() == Some(before + 1);
            ((started && s["phase"] != "idle") || over).then_some(())
        });
        handle
    }

    /// `ch-remote send-migration CONFIG`, which returns at once as CH's
    /// does; returns the number of the attempt it started.
    pub fn start_send(&self, config: &str) -> u64 {
        let before = self.migration_status()["attempts"].as_u64().unwrap_or(0);
        self.ch_ok(&["send-migration", config]);
        before + 1
    }

    /// Polls `ch-remote info` until migration `attempt` has an outcome.
    pub fn wait_outcome(&self, attempt: u64) -> Answer {
        let deadline = Instant::now() + MIGRATION_WAIT;
        loop {
            let info = self.info();
            let last = &info["migration"]["last"];
            if last["attempt"].as_u64() == Some(attempt) {
                return Answer::from_outcome(last);
            }
            assert!(
                Instant::now() < deadline,
                "{}: migration {attempt} has no outcome: {info}\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a migration and waits for its outcome.
    pub fn send_migration(&self, config: &str) -> Answer {
        let attempt = self.start_send(config);
        self.wait_outcome(attempt)
    }

    /// The report of the migration this (destination) host received.
    pub fn received_report(&self) -> Value {
        let info = self.info();
        let r = info["migration"]["last"]["received"].clone();
        assert!(r.is_object(), "{}: no received report: {info}", self.name);
        r
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it yields a value; panics after [`WAIT`].
pub fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Device `i`'s entry of a `vm.info`.
pub fn device(info: &Value, i: usize) -> &Value {
    &info["devices"][i]
}

pub fn generation(info: &Value, i: usize) -> u64 {
    device(info, i)["digest"]["generation"]
        .as_u64()
        .expect("generation")
}

/// Waits until device `i` of `host` has run past `after`.
pub fn wait_generation_beyond(host: &Host, i: usize, after: u64) -> u64 {
    poll(
        &format!("{} device {i} generation > {after}", host.name),
        || {
            let g = generation(&host.info(), i);
            (g > after).then_some(g)
        },
    )
}

/// A `send-migration` config as ch-remote takes it.
pub fn send_config(url: &str) -> String {
    format!("destination_url={url},downtime_ms=300,timeout_s=20")
}

/// A `receive-migration` config as ch-remote takes it.
pub fn receive_config(url: &str) -> String {
    format!("receiver_url={url}")
}

/// Asserts two fingerprints (`{memory_crc32c, devices: [{digest}]}`) agree.
pub fn assert_same_fingerprint(source: &Value, destination: &Value) {
    assert_eq!(
        source["memory_crc32c"], destination["memory_crc32c"],
        "guest memory differs"
    );
    let s = source["devices"].as_array().expect("devices");
    let d = destination["devices"].as_array().expect("devices");
    assert_eq!(s.len(), d.len());
    for (s, d) in s.iter().zip(d) {
        assert_eq!(s["id"], d["id"]);
        assert!(s["digest"].is_object(), "{s}");
        assert_eq!(s["digest"], d["digest"], "device {} state differs", s["id"]);
    }
}

/// One look at both hosts' VM states: `"Running"`, `"Paused"`...,
/// `"none"` without a VM, `"gone"` when the host does not answer.
#[derive(Clone, Debug)]
pub struct RunSample {
    pub at: Duration,
    pub states: [String; 2],
}

/// Watches two hosts' VM states in a background thread, every
/// [`RunWatch::PERIOD`], through `GET vmm.migration` (our hook): its
/// `state` is `vm.info`'s, without the memory checksum and VF digests
/// that make `vm.info` cost milliseconds and pause the VF workloads. A
/// host reports Running from before its VM starts to resume, so a sample
/// cannot miss a VM that may run.
pub struct RunWatch {
    names: [String; 2],
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<RunSample>>>,
}

impl RunWatch {
    pub const PERIOD: Duration = Duration::from_millis(15);

    pub fn start(a: &Host, b: &Host) -> RunWatch {
        let clients = [a, b].map(|h| ApiClient::new(h.socket()).with_timeout(WAIT));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            loop {
                let last_round = stopped.load(Ordering::Acquire);
                let states = [0, 1].map(|i| match clients[i].get("vmm.migration") {
                    Ok(r) if r.status == 200 => {
                        r.body["state"].as_str().unwrap_or("none").to_string()
                    }
                    Ok(r) => format!("answered {}", r.status),
                    Err(_) => "gone".to_string(),
                });
                samples.push(RunSample {
                    at: started.elapsed(),
                    states,
                });
                if last_round {
                    return samples;
                }
                std::thread::sleep(Self::PERIOD);
            }
        });
        RunWatch {
            names: [a.name.clone(), b.name.clone()],
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching (after one last look); the samples in order.
    pub fn samples(mut self) -> Vec<RunSample> {
        self.stop.store(true, Ordering::Release);
        let samples = self
            .thread
            .take()
            .expect("watching")
            .join()
            .expect("watch thread");
        let mut changes: Vec<String> = Vec::new();
        let mut last: Option<&[String; 2]> = None;
        for s in &samples {
            if last != Some(&s.states) {
                changes.push(format!("{:?} {:?}", s.at, s.states));
                last = Some(&s.states);
            }
        }
        eprintln!(
            "watched {:?} in {} samples: {}",
            self.names,
            samples.len(),
            changes.join(" -> ")
        );
        samples
    }

    /// Stops watching and asserts that no sample found both VMs Running,
    /// and that the first found `first` (so the watch saw real states).
    pub fn assert_never_both_running(self, first: [&str; 2]) {
        let names = self.names.clone();
        let samples = self.samples();
        assert!(
            samples.len() >= 2,
            "the watch took {} samples",
            samples.len()
        );
        assert_eq!(samples[0].states, first, "{names:?} when the watch began");
        if let Some(s) = samples
            .iter()
            .find(|s| s.states.iter().all(|st| st == "Running"))
        {
            panic!("{names:?} both Running at {:?}", s.at);
        }
    }
}

impl Drop for RunWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
