// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The test host speaks Cloud Hypervisor's API exactly:
//!
//! * the real `ch-remote` drives two hosts through snapshot, restore and
//!   live migrations over unix and tcp, every call exiting 0;
//! * options the host does not support are refused with a message
//!   `ch-remote` prints, and nothing changes;
//! * the same raw requests get the same answers from the host and from
//!   the real `cloud-hypervisor` VMM (status line, headers, body);
//! * what `ch-remote` sends and what the host answers fit CH's OpenAPI
//!   description.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::openapi::OpenApi;
use common::*;
use serde_json::{json, Value};

/// The fingerprint (`memory_crc32c`, devices with digests) of a `vm.info`.
fn fingerprint(info: &Value) -> Value {
    json!({ "memory_crc32c": info["memory"]["crc32c"], "devices": info["devices"] })
}

/// Migrates `src` to `dst` with ch-remote; every call must exit 0.
fn ch_remote_migrate(src: &Host, dst: &Host, url: &str) -> (Value, Value) {
    dst.arm(&json!({ "verify": true }));
    let receiver = dst.receive_in_background(&format!("receiver_url={url}"));
    let attempt = src.start_send(&format!("destination_url={url}"));
    let sent = src.wait_outcome(attempt);
    let received = receiver.join().unwrap();
    assert!(
        received.success(),
        "receive-migration exited {:?}: {}",
        received.code,
        received.stderr
    );
    assert!(sent.ok, "{}\n{}", sent.error, src.log_text());
    (sent.value, dst.received_report())
}

#[test]
fn ch_remote_drives_snapshot_restore_and_live_migration_over_unix_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let a = Host::start(
        dir.path(),
        "a",
        &[
            "--memory",
            "size=32M",
            "--device",
            "emulated=on,vram=16M,id=gpu0",
        ],
    );
    let b = Host::start(dir.path(), "b", &[]);
    let ping = a.ch_ok(&["ping"]).json();
    assert!(ping["version"].is_string(), "{ping}");
    wait_generation_beyond(&a, 0, 20);

    // Snapshot on a, restore on b.
    a.ch_ok(&["pause"]);
    let paused = a.info();
    assert_eq!(paused["state"], "Paused");
    let url = format!("file://{}", dir.path().join("snap").display());
    a.ch_ok(&["snapshot", &url]);
    b.ch_ok(&["restore", &format!("source_url={url}")]);
    let restored = b.info();
    assert_eq!(restored["state"], "Paused");
    assert_same_fingerprint(&fingerprint(&paused), &fingerprint(&restored));
    b.ch_ok(&["resume"]);
    assert_eq!(b.info()["state"], "Running");
    assert!(b.ch_ok(&["counters"]).json()["vm"]["restores"] == 1);

    // a lets its VM go; b migrates to it over a unix socket.
    a.ch_ok(&["delete"]);
    let unix = format!("unix:{}", dir.path().join("mig.sock").display());
    let (sent, received) = ch_remote_migrate(&b, &a, &unix);
    assert_same_fingerprint(&sent["at_stop"], &received["at_switchover"]);
    assert_eq!(b.info()["state"], "Shutdown");
    assert_eq!(a.info()["state"], "Running");
    wait_generation_beyond(
        &a,
        0,
        sent["at_stop"]["devices"][0]["digest"]["generation"]
            .as_u64()
            .unwrap(),
    );

    // And back over TCP.
    b.ch_ok(&["delete"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    let (sent, received) = ch_remote_migrate(&a, &b, &tcp);
    assert_same_fingerprint(&sent["at_stop"], &received["at_switchover"]);
    assert!(sent["memory_bytes"].as_u64().unwrap() >= 32 << 20);
    assert_eq!(sent["device_bytes"], received["device_bytes"]);
    assert_eq!(a.info()["state"], "Shutdown");
    assert_eq!(b.info()["state"], "Running");

    // The VMMs go away on request.
    for h in [&a, &b] {
        h.ch_ok(&["shutdown-vmm"]);
        poll("API socket removed", || {
            (!h.socket().exists()).then_some(())
        });
    }
}

/// ch-remote sends options the host does not support: each is refused
/// with a message naming the field, ch-remote prints it and exits
/// non-zero, and nothing changed on the host.
#[test]
fn ch_remote_unsupported_options_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(
        dir.path(),
        "src",
        &[
            "--memory",
            "size=16M",
            "--vcpu-workload",
            "off",
            "--device",
            "emulated=on,vram=4M,id=gpu0,workload=off",
        ],
    );
    let empty = Host::start(dir.path(), "dst", &[]);
    // ch-remote checks that a TLS directory holds the certificates.
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    for f in [
        "ca-cert.pem",
        "client-cert.pem",
        "client-key.pem",
        "server-cert.pem",
        "server-key.pem",
    ] {
        std::fs::write(tls.join(f), b"").unwrap();
    }
    // Armed hooks must survive a refused request.
    host.arm(&json!({ "verify": true }));
    let before_info = host.info();
    let before_counters = host.counters();
    let before_status = host.migration_status();
    let unix = format!("unix:{}", dir.path().join("m.sock").display());
    let send_cases = [
        (format!("destination_url={unix},local=on"), "local"),
        (
            format!("destination_url=tcp:127.0.0.1:1,tls_dir={}", tls.display()),
            "tls_dir",
        ),
        (
            "destination_url=tcp:127.0.0.1:1,memory_mode=postcopy".to_string(),
            "memory_mode=postcopy",
        ),
    ];
    for (config, field) in &send_cases {
        let out = host.ch(&["send-migration", config]);
        assert!(!out.success(), "{config}: accepted");
        assert!(
            out.stderr
                .contains(&format!("{field}: not supported by the xe-vf test host"))
                && out.stderr.contains("Invalid send migration configuration"),
            "{config}: {}",
            out.stderr
        );
        eprintln!("ch-remote send-migration {config}:\n{}", out.stderr);
    }
    let recv_cases = [
        (
            format!("receiver_url=tcp:127.0.0.1:1,tls_dir={}", tls.display()),
            "tls_dir",
        ),
        (
            format!("receiver_url={unix},zone_updates=[z0@0]"),
            "zone_updates",
        ),
        (
            format!("receiver_url={unix},memory_mode=postcopy"),
            "memory_mode=postcopy",
        ),
    ];
    for (config, field) in &recv_cases {
        let out = empty.ch(&["receive-migration", config]);
        assert!(!out.success(), "{config}: accepted");
        assert!(
            out.stderr
                .contains(&format!("{field}: not supported by the xe-vf test host")),
            "{config}: {}",
            out.stderr
        );
    }
    // A field CH does not have (only curl can send it).
    let r = host
        .api
        .put(
            "vm.send-migration",
            Some(&json!({ "destination_url": unix, "bogus": 1 })),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.error().contains("unknown field `bogus`"), "{}", r.error());

    // Nothing changed: no migration started, no socket bound, same VM.
    assert!(!dir.path().join("m.sock").exists());
    assert_eq!(host.migration_status(), before_status);
    assert_eq!(host.counters(), before_counters);
    let info = host.info();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["devices"], before_info["devices"]);
    assert_eq!(empty.migration_status()["attempts"], 0);
    empty.assert_no_vm();
    // The armed hook is still there: a real migration honours it.
    empty.arm(&json!({ "verify": true }));
    let receiver = empty.receive_in_background(&format!("receiver_url={unix}"));
    let sent = host.send_migration(&format!("destination_url={unix}"));
    assert!(sent.ok, "{}", sent.error);
    assert!(receiver.join().unwrap().success());
    assert!(empty.received_report()["at_switchover"].is_object());
}

/// The real VMM, killed on drop.
struct RealVmm(Child);

impl Drop for RealVmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `raw` on a fresh connection and reads one response (by its
/// Content-Length; no EOF: both servers keep the connection).
fn exchange(socket: &Path, raw: &[u8], responses: usize) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let mut done = 0;
    let mut at = 0;
    let mut chunk = [0u8; 4096];
    while done < responses {
        if let Some(end) = complete_response(&out[at..]) {
            at += end;
            done += 1;
            continue;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&chunk[..n]);
    }
    out
}

fn complete_response(raw: &[u8]) -> Option<usize> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    (raw.len() >= head_end + len).then_some(head_end + len)
}

/// Status line and header lines of a response.
fn head_of(raw: &[u8]) -> String {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[test]
fn ch_remote_answers_match_the_real_vmm_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let ch_socket = dir.path().join("ch.sock");
    let vmm = RealVmm(
        Command::new(upstream_file("cloud-hypervisor"))
            .arg("--api-socket")
            .arg(&ch_socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start cloud-hypervisor"),
    );
    poll("cloud-hypervisor API up", || {
        (ch_socket.exists() && run_ch_remote(&ch_socket, &["ping"]).success()).then_some(())
    });
    let host = Host::start(dir.path(), "h", &[]);

    // Same content: byte for byte.
    let same: [&[u8]; 22] = [
        b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        b"PUT /api/v1/vm.resume HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        b"GET /api/v1/vm.counters HTTP/1.1\r\n\r\n",
        b"PUT /api/v1/vm.shutdown HTTP/1.1\r\n\r\n",
        b"PUT /api/v1/vm.boot HTTP/1.1\r\n\r\n",
        b"PUT /api/v1/vm.delete HTTP/1.1\r\n\r\n",
        b"GET /api/v1/vm.nonsense HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /nonsense HTTP/1.1\r\n\r\n",
        b"GET /api/v1/vmm.ping?x=1 HTTP/1.1\r\n\r\n",
        b"PUT /api/v1/vm.info HTTP/1.1\r\n\r\n",
        b"GET /api/v1/vm.pause HTTP/1.1\r\n\r\n",
        b"DELETE /api/v1/vm.pause HTTP/1.1\r\n\r\n",
        b"POST /api/v1/vm.pause HTTP/1.1\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        b"PUT /api/v1/vm.snapshot HTTP/1.1\r\n\r\n",
        b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}",
        b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: 31\r\n\r\n{\"destination_url\":\"file:///x\"}",
        b"PUT /api/v1/vm.receive-migration HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        b"PUT /api/v1/vm.send-migration HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        b"PUT /api/v1/vm.send-migration HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"local\":\"maybe\"}",
    ];
    for raw in same {
        let want = exchange(&ch_socket, raw, 1);
        let got = exchange(host.socket(), raw, 1);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "answers differ for {}",
            String::from_utf8_lossy(raw)
        );
    }

    // Keep-alive: two requests on one connection, two answers in order.
    let two = b"PUT /api/v1/vm.resume HTTP/1.1\r\n\r\nGET /api/v1/vm.info HTTP/1.1\r\n\r\n";
    assert_eq!(
        exchange(&ch_socket, two, 2),
        exchange(host.socket(), two, 2)
    );

    // Different content, same shape: ping (versions) and a failed restore
    // (CH's chain names its own internals).
    let ping = b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n";
    let (want, got) = (
        exchange(&ch_socket, ping, 1),
        exchange(host.socket(), ping, 1),
    );
    let strip = |h: String| {
        h.lines()
            .filter(|l| !l.starts_with("Content-Length"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(head_of(&got)), strip(head_of(&want)));
    let restore = b"PUT /api/v1/vm.restore HTTP/1.1\r\nContent-Length: 29\r\n\r\n{\"source_url\":\"file:///nope\"}";
    let (want, got) = (
        exchange(&ch_socket, restore, 1),
        exchange(host.socket(), restore, 1),
    );
    assert!(head_of(&want).starts_with("HTTP/1.1 500 \r\n"));
    assert!(head_of(&got).starts_with("HTTP/1.1 500 \r\n"));
    let body = |r: &[u8]| -> Value {
        let end = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        serde_json::from_slice(&r[end..]).unwrap()
    };
    let (got, want) = (body(&got), body(&want));
    assert_eq!((&got[0], &got[1]), (&want[0], &want[1]));
    drop(vmm);
}

/// Accepts one ch-remote request on `socket`, answers 204, returns it.
fn record_one(listener: &UnixListener) -> (String, String, Value) {
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = complete_response(&raw) {
            break end;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0);
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = head_of(&raw[..end]);
    let mut words = head.split(' ');
    let method = words.next().unwrap().to_string();
    let path = words.next().unwrap().to_string();
    let body_start = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body = if end > body_start {
        serde_json::from_slice(&raw[body_start..end]).unwrap()
    } else {
        Value::Null
    };
    s.write_all(b"HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    (method, path, body)
}

#[test]
fn ch_remote_bodies_and_host_answers_fit_the_openapi_description() {
    let api = OpenApi::load(&upstream_file("cloud-hypervisor.yaml"));
    let dir = tempfile::tempdir().unwrap();

    // What ch-remote sends, recorded, checked against the request schemas,
    // and accepted by the host's parser.
    let rec = dir.path().join("rec.sock");
    let listener = UnixListener::bind(&rec).unwrap();
    let commands: [&[&str]; 5] = [
        &["snapshot", "file:///tmp/x"],
        &["restore", "source_url=file:///tmp/x,prefault=on,resume=true"],
        &["send-migration", "destination_url=tcp:127.0.0.1:1,downtime_ms=100,timeout_s=5,timeout_strategy=ignore,connections=4"],
        &["send-migration", "destination_url=unix:/tmp/m.sock"],
        &["receive-migration", "receiver_url=tcp:0.0.0.0:6000"],
    ];
    for args in commands {
        let rec2 = rec.clone();
        let args_owned: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let runner = std::thread::spawn(move || {
            let a: Vec<&str> = args_owned.iter().map(String::as_str).collect();
            run_ch_remote(&rec2, &a)
        });
        let (method, path, body) = record_one(&listener);
        assert!(runner.join().unwrap().success(), "{args:?}");
        let route = path.strip_prefix("/api/v1").unwrap();
        let schema = api.request_schema(route, &method.to_lowercase());
        let errors = api.check(&schema, &body);
        assert!(
            errors.is_empty(),
            "{args:?}: {body} breaks the schema: {errors:?}"
        );
        eprintln!("ch-remote {}: {method} {path} {body}", args[0]);
        // The host takes every field ch-remote sends.
        let parsed = match route {
            "/vm.snapshot" => {
                serde_json::from_value::<xe_vf_testhost::api_bodies::SnapshotConfig>(body.clone())
                    .map(|_| ())
            }
            "/vm.restore" => {
                serde_json::from_value::<xe_vf_testhost::api_bodies::RestoreConfig>(body.clone())
                    .map(|_| ())
            }
            "/vm.send-migration" => serde_json::from_value::<
                xe_vf_testhost::api_bodies::SendMigrationData,
            >(body.clone())
            .map(|_| ()),
            "/vm.receive-migration" => serde_json::from_value::<
                xe_vf_testhost::api_bodies::ReceiveMigrationData,
            >(body.clone())
            .map(|_| ()),
            other => panic!("unexpected {other}"),
        };
        assert!(parsed.is_ok(), "{route}: {body}: {parsed:?}");
    }

    // What the host answers, against the response schemas.
    let host = Host::start(
        dir.path(),
        "h",
        &[
            "--memory",
            "size=16M",
            "--device",
            "emulated=on,vram=4M,id=gpu0",
        ],
    );
    for (route, args) in [
        ("/vm.info", "info"),
        ("/vmm.ping", "ping"),
        ("/vm.counters", "counters"),
    ] {
        let value = host.ch_ok(&[args]).json();
        let errors = api.check(&api.response_schema(route, "get", 200), &value);
        assert!(
            errors.is_empty(),
            "{route}: {value} breaks the schema: {errors:?}"
        );
    }
    // A created (not booted) VM, through CH's vm.create.
    let created = Host::start(dir.path(), "c", &[]);
    let config = json!({
        "memory": { "size": 16u64 << 20 },
        "payload": {},
        "devices": [{ "id": "gpu0", "x_xe_vf": "emulated=on,vram=4M,id=gpu0" }],
    });
    assert!(api
        .check(&api.request_schema("/vm.create", "put"), &config)
        .is_empty());
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, config.to_string()).unwrap();
    created.ch_ok(&["create", cfg.to_str().unwrap()]);
    let info = created.info();
    assert_eq!(info["state"], "Created");
    assert!(
        api.check(&api.response_schema("/vm.info", "get", 200), &info)
            .is_empty(),
        "{info}"
    );
    created.ch_ok(&["boot"]);
    let info = created.info();
    assert_eq!(info["state"], "Running");
    assert_eq!(device(&info, 0)["vf_state"], "RUNNING");
    assert!(
        api.check(&api.response_schema("/vm.info", "get", 200), &info)
            .is_empty(),
        "{info}"
    );
    // Without a VM, vm.info is the documented 404.
    assert!(api.documents("/vm.info", "get", 404));
    Host::start(dir.path(), "e", &[]).assert_no_vm();
}
