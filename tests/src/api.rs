// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The REST API: Cloud Hypervisor's paths and bodies, JSON errors
//! `{"error": "<phase>: <cause>", "phase": …}`.
//!
//! Test-only hooks beside CH's endpoints (see [`crate::fault`]):
//! `vm.inject-fault {"device", "fault"}` hands a fault to an emulated VF,
//! `vm.fill-device {"device", "seed", "zero_percent"}` gives an idle one
//! state of its own; send/receive bodies take an optional `fault`.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{HostError, HostResult};
use crate::fault::DeviceFault;
use crate::migration::{receive, send};
use crate::snapshot;
use crate::vmm::{Counters, VmState, Vmm};

/// What the server writes back.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    /// `vmm.shutdown`: exit once the reply is out.
    pub shutdown: bool,
}

impl Reply {
    fn json(status: u16, value: &Value) -> Self {
        Reply {
            status,
            body: value.to_string().into_bytes(),
            shutdown: false,
        }
    }

    fn no_content() -> Self {
        Reply {
            status: 204,
            body: Vec::new(),
            shutdown: false,
        }
    }

    pub fn error(e: &HostError) -> Self {
        Self::json(
            e.status,
            &json!({ "error": e.to_string(), "phase": e.phase, "cause": e.cause }),
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    destination_url: String,
}

/// `vm.inject-fault` (test-only hook, see [`crate::fault`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectFaultBody {
    device: String,
    fault: DeviceFault,
}

/// `vm.fill-device` (test-only hook): give an idle VF distinct state.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FillDeviceBody {
    device: String,
    seed: u64,
    #[serde(default)]
    zero_percent: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    source_url: String,
    #[serde(default)]
    prefault: bool,
}

fn body<T: for<'de> Deserialize<'de>>(raw: &[u8]) -> HostResult<T> {
    serde_json::from_slice(raw).map_err(|e| HostError::bad_request("request body", e))
}

/// Routes one request.
pub fn handle(vmm: &Vmm, method: &str, path: &str, raw: &[u8]) -> Reply {
    let Some(endpoint) = path.strip_prefix("/api/v1/") else {
        return Reply::error(&HostError::new(
            404,
            "route",
            format!("no such path {path}"),
        ));
    };
    let expected = match endpoint {
        "vm.info" | "vm.counters" => "GET",
        "vmm.ping" => method,
        _ => "PUT",
    };
    if method != expected {
        return Reply::error(&HostError::new(
            405,
            "route",
            format!("{endpoint} takes {expected}, not {method}"),
        ));
    }
    let result = match endpoint {
        "vmm.ping" => Ok(Reply::json(
            200,
            &json!({ "version": env!("CARGO_PKG_VERSION") }),
        )),
        "vm.info" => Ok(Reply::json(200, &vmm.info())),
        "vm.counters" => Ok(Reply::json(200, &vmm.counters.to_json())),
        "vm.pause" => vmm.pause().map(|()| Reply::no_content()),
        "vm.resume" => vmm.resume().map(|()| Reply::no_content()),
        "vm.snapshot" => vm_snapshot(vmm, raw),
        "vm.inject-fault" => inject_fault(vmm, raw),
        "vm.fill-device" => fill_device(vmm, raw),
        "vm.restore" => vm_restore(vmm, raw),
        "vm.send-migration" => send_migration(vmm, raw),
        "vm.receive-migration" => receive_migration(vmm, raw),
        "vmm.shutdown" => Ok(Reply {
            status: 204,
            body: Vec::new(),
            shutdown: true,
        }),
        other => Err(HostError::new(
            404,
            "route",
            format!("unknown endpoint {other}"),
        )),
    };
    result.unwrap_or_else(|e| {
        log::error!("{method} {endpoint} failed: {e}");
        Reply::error(&e)
    })
}

fn vm_snapshot(vmm: &Vmm, raw: &[u8]) -> HostResult<Reply> {
    let b: SnapshotBody = body(raw)?;
    let _op = vmm.begin("snapshot")?;
    let vm = vmm.vm_in("snapshot", VmState::Paused)?;
    snapshot::save(&vm, &b.destination_url)?;
    Counters::add(&vmm.counters.snapshots, 1);
    Ok(Reply::no_content())
}

fn inject_fault(vmm: &Vmm, raw: &[u8]) -> HostResult<Reply> {
    let b: InjectFaultBody = body(raw)?;
    let fault = b.fault.to_fault()?;
    let vm = vmm
        .vm()
        .ok_or_else(|| HostError::conflict("inject-fault", "no VM"))?;
    vm.inject_fault(&b.device, fault)?;
    Ok(Reply::no_content())
}

fn fill_device(vmm: &Vmm, raw: &[u8]) -> HostResult<Reply> {
    let b: FillDeviceBody = body(raw)?;
    let vm = vmm
        .vm()
        .ok_or_else(|| HostError::conflict("fill-device", "no VM"))?;
    vm.fill_device(&b.device, b.seed, b.zero_percent)?;
    Ok(Reply::no_content())
}

fn vm_restore(vmm: &Vmm, raw: &[u8]) -> HostResult<Reply> {
    let b: RestoreBody = body(raw)?;
    let _ = b.prefault;
    let _op = vmm.begin("restore")?;
    if vmm.vm().is_some() {
        return Err(HostError::conflict("restore", "this host already has a VM"));
    }
    let vm = snapshot::load(&b.source_url)?;
    vmm.install(vm, VmState::Paused);
    Counters::add(&vmm.counters.restores, 1);
    Ok(Reply::no_content())
}

fn send_migration(vmm: &Vmm, raw: &[u8]) -> HostResult<Reply> {
    let req: send::SendRequest = body(raw)?;
    let _op = vmm.begin("send-migration")?;
    let report = send::send(vmm, &req)?;
    let value = serde_json::to_value(&report).map_err(|e| HostError::failed("report", e))?;
    vmm.set_last_migration(json!({ "sent": value }));
    Ok(Reply::json(200, &value))
}

fn receive_migration(vmm: &Vmm, raw: &[u8]) -> HostResult<Reply> {
    let req: receive::ReceiveRequest = body(raw)?;
    let _op = vmm.begin("receive-migration")?;
    let report = receive::receive(vmm, &req)?;
    let value = serde_json::to_value(&report).map_err(|e| HostError::failed("report", e))?;
    vmm.set_last_migration(json!({ "received": value }));
    Ok(Reply::json(200, &value))
}
