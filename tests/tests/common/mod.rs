// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared harness: test-host processes killed on drop, polling helpers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use xe_vf_testhost::client::{ApiClient, ApiResponse};

pub const BIN: &str = env!("CARGO_BIN_EXE_xe-vf-testhost");
pub const WAIT: Duration = Duration::from_secs(30);

/// One `xe-vf-testhost` process; killed (SIGKILL) and reaped on drop.
pub struct Host {
    pub name: String,
    pub child: Option<Child>,
    pub api: ApiClient,
    pub log: PathBuf,
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
        let host = Host {
            name: name.to_string(),
            child: Some(child),
            api: ApiClient::new(&socket),
            log,
        };
        host.wait_ready();
        host
    }

    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Host {
        Self::start_with(dir, name, &[], args)
    }

    fn wait_ready(&self) {
        poll(&format!("{} API up", self.name), || {
            self.api.get("vmm.ping").ok().filter(|r| r.status == 200)
        });
    }

    pub fn info(&self) -> Value {
        let r = self.api.get("vm.info").expect("vm.info");
        assert_eq!(r.status, 200, "{}: vm.info: {:?}", self.name, r.body);
        r.body
    }

    pub fn counters(&self) -> Value {
        self.api.get("vm.counters").expect("vm.counters").body
    }

    /// PUT that must succeed.
    pub fn put_ok(&self, endpoint: &str, body: Option<&Value>) -> ApiResponse {
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

    /// `vm.receive-migration` in a thread (CH answers it only once the
    /// migration is over); returns once the host listens.
    pub fn receive_in_background(&self, body: Value) -> JoinHandle<ApiResponse> {
        let api = self.api.clone();
        let handle = std::thread::spawn(move || {
            // A killed destination answers nothing: status 0.
            api.put("vm.receive-migration", Some(&body))
                .unwrap_or_else(|e| ApiResponse {
                    status: 0,
                    body: json!({ "error": e.to_string() }),
                })
        });
        poll(&format!("{} listening", self.name), || {
            let info = self.info();
            (info["migration"]["phase"] == "receive: listening").then_some(())
        });
        handle
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
        std::thread::sleep(Duration::from_millis(10));
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

/// A send-migration body.
pub fn send_body(url: &str) -> Value {
    json!({ "destination_url": url, "downtime_ms": 300, "timeout_s": 20 })
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
