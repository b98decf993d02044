// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The REST API: Cloud Hypervisor's routes, methods, bodies and answers
//! (`vmm/src/api/http/`), so `ch-remote` drives the host unchanged.
//!
//! As in CH: a route that does not exist is 404 `["Not Found"]`; a wrong
//! method, a body where none belongs or none where one does is 400
//! `["Bad Request"]` (PATCH and DELETE on an action route: 400, no body);
//! a body that does not parse is 400 `["Failed to deserialize JSON",
//! <serde's message>]`; a failed operation is 500 (404 when there is no
//! VM) with the error chain `["Error from API", <what failed>, …causes]`.
//! Unlike CH, a field CH does not have is refused, not ignored.
//!
//! Test-only hooks beside CH's routes (no `ch-remote` verb; curl):
//! `vm.inject-fault {"device", "fault"}` hands a fault to an emulated VF,
//! `vm.fill-device {"device", "seed", "zero_percent"}` gives an idle one
//! state of its own, `vm.arm-migration` arms
//! [`MigrationTestOptions`](crate::fault::MigrationTestOptions) for the
//! next migration, `GET vmm.migration` tells what a migration does now,
//! how the last one ended (also in `vm.info`, which CH answers 404 while
//! there is no VM) and the VM's state (`vm.info`'s, without its
//! checksums).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::api_bodies::{ReceiveMigrationData, RestoreConfig, SendMigrationData, SnapshotConfig};
use crate::error::{HostError, HostResult};
use crate::fault::{DeviceFault, MigrationTestOptions};
use crate::migration::{receive, send};
use crate::snapshot;
use crate::vm::VmConfig;
use crate::vmm::{Counters, VmState, Vmm};

/// What the server writes back.
pub struct Reply {
    pub status: u16,
    pub body: Option<Vec<u8>>,
    /// `vmm.shutdown`: exit once the reply is out.
    pub shutdown: bool,
}

impl Reply {
    fn json(status: u16, value: &Value) -> Self {
        Reply {
            status,
            body: Some(value.to_string().into_bytes()),
            shutdown: false,
        }
    }

    fn empty(status: u16) -> Self {
        Reply {
            status,
            body: None,
            shutdown: false,
        }
    }

    /// A failure as CH's `error_response` writes it.
    fn messages(status: u16, messages: &[String]) -> Self {
        Self::json(status, &json!(messages))
    }

    fn bad_request() -> Self {
        Self::messages(400, &["Bad Request".to_string()])
    }

    fn not_found() -> Self {
        Self::messages(404, &["Not Found".to_string()])
    }

    /// `["Error from API", what, …chain]`; 404 for a missing VM, else 500
    /// (CH's mapping: what fails behind a parsed body is the VMM's error).
    fn api_error(what: &str, e: &HostError) -> Self {
        let status = if e.status == 404 { 404 } else { 500 };
        let mut messages = vec!["Error from API".to_string(), what.to_string()];
        messages.extend(e.messages());
        Self::messages(status, &messages)
    }
}

/// How a route treats methods and bodies (CH's handler kinds).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `GET` only (vm.info, vmm.ping): other methods 400 `["Bad Request"]`.
    Get,
    /// An action answered to `GET` (vm.counters, vmm.migration).
    GetAction,
    /// A `PUT` action without a body.
    PutAction,
    /// A `PUT` action that needs a body.
    PutBody,
    /// vmm.shutdown: `PUT`, 200 with no body.
    VmmShutdown,
}

fn route(path: &str) -> Option<Kind> {
    let endpoint = path.strip_prefix("/api/v1/")?;
    Some(match endpoint {
        "vm.info" | "vmm.ping" => Kind::Get,
        "vm.counters" | "vmm.migration" => Kind::GetAction,
        "vm.boot" | "vm.delete" | "vm.shutdown" | "vm.reboot" | "vm.pause" | "vm.resume"
        | "vm.power-button" | "vm.nmi" => Kind::PutAction,
        "vm.create"
        | "vm.snapshot"
        | "vm.restore"
        | "vm.send-migration"
        | "vm.receive-migration"
        | "vm.add-device"
        | "vm.add-user-device"
        | "vm.add-disk"
        | "vm.add-fs"
        | "vm.add-generic-vhost-user"
        | "vm.add-net"
        | "vm.add-pmem"
        | "vm.add-vdpa"
        | "vm.add-vsock"
        | "vm.remove-device"
        | "vm.resize"
        | "vm.resize-disk"
        | "vm.resize-zone"
        | "vm.coredump"
        | "vm.inject-fault"
        | "vm.fill-device"
        | "vm.arm-migration" => Kind::PutBody,
        "vmm.shutdown" => Kind::VmmShutdown,
        _ => return None,
    })
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

/// Parses a body as CH does, or answers as CH does.
fn parse<T: for<'de> Deserialize<'de>>(raw: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(raw).map_err(|e| {
        Reply::messages(
            400,
            &["Failed to deserialize JSON".to_string(), e.to_string()],
        )
    })
}

/// Routes one request.
pub fn handle(vmm: &Arc<Vmm>, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
    let Some(kind) = route(path) else {
        return Reply::not_found();
    };
    let endpoint = &path["/api/v1/".len()..];
    let method_ok = match kind {
        Kind::Get | Kind::GetAction => method == "GET",
        Kind::PutAction | Kind::PutBody | Kind::VmmShutdown => method == "PUT",
    };
    if !method_ok {
        // CH's action handler answers other methods with a bare 400.
        let bare = matches!(method, "PATCH" | "DELETE")
            && matches!(kind, Kind::GetAction | Kind::PutAction | Kind::PutBody);
        return if bare {
            Reply::empty(400)
        } else {
            Reply::bad_request()
        };
    }
    match (kind, body) {
        (Kind::PutAction, Some(_)) | (Kind::PutBody, None) => return Reply::bad_request(),
        _ => {}
    }
    let raw = body.unwrap_or_default();
    let reply = match endpoint {
        "vmm.ping" => Ok(Reply::json(
            200,
            &json!({
                "build_version": concat!("xe-vf-testhost-", env!("CARGO_PKG_VERSION")),
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "features": ["xe_vf_testhost"],
            }),
        )),
        "vmm.shutdown" => Ok(Reply {
            status: 200,
            body: None,
            shutdown: true,
        }),
        "vmm.migration" => Ok(Reply::json(200, &vmm.migration_status())),
        "vm.info" => vmm
            .info()
            .map(|info| Reply::json(200, &info))
            .map_err(|e| ("The VM info is not available", e)),
        "vm.counters" => {
            if vmm.vm().is_some() {
                Ok(Reply::json(200, &vmm.counters.to_json()))
            } else {
                Err(("The VM info is not available", HostError::vm_not_running()))
            }
        }
        "vm.pause" => vmm
            .pause()
            .map(|()| Reply::empty(204))
            .map_err(|e| ("The VM could not be paused", e)),
        "vm.resume" => vmm
            .resume()
            .map(|()| Reply::empty(204))
            .map_err(|e| ("The VM could not resume", e)),
        "vm.boot" => vmm
            .boot()
            .map(|()| Reply::empty(204))
            .map_err(|e| ("The VM could not boot", e)),
        "vm.shutdown" => vmm
            .shutdown_vm()
            .map(|()| Reply::empty(204))
            .map_err(|e| ("The VM could not shutdown", e)),
        "vm.delete" => vmm
            .delete()
            .map(|()| Reply::empty(204))
            .map_err(|e| ("The VM could not be deleted", e)),
        "vm.create" => {
            return match parse::<Value>(raw) {
                Err(r) => r,
                Ok(v) => VmConfig::from_ch_config(&v)
                    .and_then(|c| vmm.create(c))
                    .map(|()| Reply::empty(204))
                    .unwrap_or_else(|e| Reply::api_error("The VM could not be created", &e)),
            }
        }
        "vm.snapshot" => {
            return match parse::<SnapshotConfig>(raw) {
                Err(r) => r,
                Ok(b) => vm_snapshot(vmm, &b)
                    .unwrap_or_else(|e| Reply::api_error("The VM could not be snapshotted", &e)),
            }
        }
        "vm.restore" => {
            return match parse::<RestoreConfig>(raw) {
                Err(r) => r,
                Ok(b) => vm_restore(vmm, &b)
                    .unwrap_or_else(|e| Reply::api_error("The VM could not be restored", &e)),
            }
        }
        "vm.send-migration" => {
            return match parse::<SendMigrationData>(raw) {
                Err(r) => r,
                Ok(b) => send::start(vmm, b)
                    .map(|()| Reply::empty(204))
                    .unwrap_or_else(|e| {
                        Reply::api_error(
                            "Error dispatching the migration worker",
                            &e.context("Failed to send migratable component snapshot"),
                        )
                    }),
            }
        }
        "vm.receive-migration" => {
            return match parse::<ReceiveMigrationData>(raw) {
                Err(r) => r,
                Ok(b) => receive_migration(vmm, &b).unwrap_or_else(|e| {
                    Reply::api_error(
                        "Error receiving migration",
                        &e.context("Failed to receive migratable component snapshot"),
                    )
                }),
            }
        }
        "vm.inject-fault" => {
            return match parse::<InjectFaultBody>(raw) {
                Err(r) => r,
                Ok(b) => inject_fault(vmm, &b)
                    .unwrap_or_else(|e| Reply::api_error("The fault could not be injected", &e)),
            }
        }
        "vm.fill-device" => {
            return match parse::<FillDeviceBody>(raw) {
                Err(r) => r,
                Ok(b) => fill_device(vmm, &b)
                    .unwrap_or_else(|e| Reply::api_error("The device could not be filled", &e)),
            }
        }
        "vm.arm-migration" => {
            return match parse::<MigrationTestOptions>(raw) {
                Err(r) => r,
                Ok(b) => {
                    vmm.arm_test_options(b);
                    Reply::empty(204)
                }
            }
        }
        other => Err((
            "The request could not be handled",
            HostError::failed(other, "not supported by the xe-vf test host"),
        )),
    };
    reply.unwrap_or_else(|(what, e)| {
        log::error!("{method} {endpoint} failed: {}", e.messages().join(": "));
        Reply::api_error(what, &e)
    })
}

fn logged<T>(what: &str, r: HostResult<T>) -> HostResult<T> {
    r.inspect_err(|e| log::error!("{what} failed: {}", e.messages().join(": ")))
}

fn vm_snapshot(vmm: &Vmm, b: &SnapshotConfig) -> HostResult<Reply> {
    logged(
        "snapshot",
        (|| {
            let _op = vmm.begin("snapshot")?;
            let vm = vmm.vm_in("snapshot", VmState::Paused)?;
            snapshot::save(&vm, &b.destination_url)?;
            Counters::add(&vmm.counters.snapshots, 1);
            Ok(Reply::empty(204))
        })(),
    )
}

fn vm_restore(vmm: &Vmm, b: &RestoreConfig) -> HostResult<Reply> {
    logged(
        "restore",
        (|| {
            b.check()?;
            let _op = vmm.begin("restore")?;
            if vmm.has_vm() {
                return Err(HostError::conflict("restore", "VM is already created"));
            }
            let vm = snapshot::load(&b.source_url)?;
            let state = if b.resume {
                vm.resume()?;
                VmState::Running
            } else {
                VmState::Paused
            };
            vmm.install(vm, state);
            Counters::add(&vmm.counters.restores, 1);
            Ok(Reply::empty(204))
        })(),
    )
}

fn receive_migration(vmm: &Vmm, b: &ReceiveMigrationData) -> HostResult<Reply> {
    // Validation first: a refused body leaves the armed hooks armed.
    let url = b.check()?;
    let mut options = vmm.take_test_options();
    if let Some(dir) = &b.vram_dir {
        options.vram_dir = Some(dir.clone());
    }
    receive::receive(vmm, &url, &options)?;
    Ok(Reply::empty(204))
}

fn inject_fault(vmm: &Vmm, b: &InjectFaultBody) -> HostResult<Reply> {
    let fault = b.fault.to_fault()?;
    let vm = vmm.vm().ok_or_else(HostError::vm_not_created)?;
    vm.inject_fault(&b.device, fault)?;
    Ok(Reply::empty(204))
}

fn fill_device(vmm: &Vmm, b: &FillDeviceBody) -> HostResult<Reply> {
    let vm = vmm.vm().ok_or_else(HostError::vm_not_created)?;
    vm.fill_device(&b.device, b.seed, b.zero_percent)?;
    Ok(Reply::empty(204))
}
