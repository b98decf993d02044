// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device-driving checks, run by [`run_checks`].
//!
//! Every check drives the two mtty mdevs through the project's real code:
//! `xe_vf_plugin::vfio::VfioMigrationDevice` (the VFIO backend), the
//! `fsm` (paths, `walk`, recovery) and `state_format` (encoder and
//! decoder). No migration ioctl is issued here directly: what passes here
//! is our code against a real kernel, not a second copy of it.
//!
//! The `host_*` checks run the shipped `xe-vf-mig host list|check`
//! binary instead (before the devices are opened, and once more while
//! they are held).
//!
//! A check records its details as it goes, so a failure still reports how
//! far it got; one failing check does not stop the others. Each check
//! starts by bringing both devices back to RUNNING (by walking, or by reset
//! if a previous check left one in ERROR).

mod failures;
mod host_tool;
mod recording;
mod save_restore;
mod stream;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use serde_json::{Map, Value};
use xe_vf_plugin::fsm::{self, PathError, WalkError};
use xe_vf_plugin::vfio::VfioMigrationDevice;
use xe_vf_plugin::{DeviceState, MigrationDevice, MigrationFlags};

use crate::TAG;

/// What a check learned, as JSON members, kept even when it fails.
#[derive(Debug, Default)]
pub struct Details(Map<String, Value>);

impl Details {
    /// Records `value` under `key`; a value serde cannot encode is noted
    /// as such instead of failing the check.
    pub fn set(&mut self, key: &str, value: impl Serialize) {
        let value = serde_json::to_value(value)
            .unwrap_or_else(|e| Value::String(format!("<unencodable: {e}>")));
        self.0.insert(key.to_string(), value);
    }
}

/// One check's verdict.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub name: &'static str,
    /// Only mandatory checks decide the RESULT verdict.
    pub mandatory: bool,
    pub passed: bool,
    pub millis: f64,
    pub details: Map<String, Value>,
    pub error: Option<String>,
}

/// Migration facts of one device as the backend reports them.
#[derive(Debug, Serialize)]
pub struct DeviceFacts {
    pub sysfs_path: String,
    pub name: String,
    pub identity: String,
    pub migration_flags: u64,
    pub migration_flags_names: String,
    pub initial_state: String,
    pub stop_copy_size: u64,
}

#[derive(Debug, Serialize)]
pub struct ChecksSummary {
    pub devices: Vec<DeviceFacts>,
    pub checks: Vec<CheckReport>,
    pub all_mandatory_passed: bool,
}

/// The two opened devices and what checks hand on to later ones.
pub struct Bench {
    /// Source of every save.
    pub a: VfioMigrationDevice,
    /// Destination of every restore.
    pub b: VfioMigrationDevice,
    pub flags: MigrationFlags,
    /// A's STOP_COPY stream as read by the save check; later checks compare
    /// against it (A's state does not change: nothing writes its BARs).
    pub saved_a: Option<Vec<u8>>,
}

/// Runs `body`, timing it and turning its outcome into a report.
fn run_check(
    name: &'static str,
    mandatory: bool,
    body: impl FnOnce(&mut Details) -> anyhow::Result<()>,
) -> CheckReport {
    println!("{TAG} check {name}: start");
    let mut details = Details::default();
    let start = Instant::now();
    let outcome = body(&mut details);
    let millis = start.elapsed().as_secs_f64() * 1000.0;
    let error = outcome.err().map(|e| format!("{e:#}"));
    let verdict = if error.is_none() { "pass" } else { "FAIL" };
    println!(
        "{TAG} check {name}: {verdict} in {millis:.1} ms {}",
        Value::Object(details.0.clone())
    );
    if let Some(e) = &error {
        println!("{TAG} check {name}: error: {e}");
    }
    CheckReport {
        name,
        mandatory,
        passed: error.is_none(),
        millis,
        details: details.0,
        error,
    }
}

/// Brings `device` to RUNNING: by walking, or, from ERROR, by reset. A
/// check uses it first so an earlier failure does not cascade.
pub fn ensure_running(device: &dyn MigrationDevice) -> anyhow::Result<Option<String>> {
    let state = device.state().context("reading the device state")?;
    if state == DeviceState::Running {
        return Ok(None);
    }
    match fsm::walk(device, DeviceState::Running, DeviceState::Running) {
        Ok(_) => {}
        Err(WalkError::Path(PathError::InError)) => {
            device.reset().context("resetting a device left in ERROR")?;
        }
        Err(e) => return Err(e).context("walking back to RUNNING"),
    }
    let now = device.state().context("reading the device state")?;
    anyhow::ensure!(
        now == DeviceState::Running,
        "device in {now} after recovery"
    );
    Ok(Some(format!("was {state}, brought back to RUNNING")))
}

/// Check 1: both devices open through the backend, report STOP_COPY and
/// P2P, and start in RUNNING.
fn open_devices(
    paths: &[PathBuf; 2],
    d: &mut Details,
) -> anyhow::Result<(Bench, Vec<DeviceFacts>)> {
    let mut opened = Vec::with_capacity(2);
    let mut facts = Vec::with_capacity(2);
    for path in paths {
        let device = VfioMigrationDevice::open(path)
            .with_context(|| format!("VfioMigrationDevice::open({})", path.display()))?;
        let flags = device.migration_flags().context("migration_flags()")?;
        let state = device.state().context("state()")?;
        let size = device.stop_copy_size().context("stop_copy_size()")?;
        facts.push(DeviceFacts {
            sysfs_path: path.display().to_string(),
            name: device.name().to_string(),
            identity: device.identity().to_string(),
            migration_flags: flags.bits(),
            migration_flags_names: flags.to_string(),
            initial_state: state.name().to_string(),
            stop_copy_size: size,
        });
        opened.push((device, flags, state));
    }
    d.set("devices", &facts);
    let mut flag_set = Vec::new();
    for (device, flags, state) in &opened {
        let name = device.name();
        anyhow::ensure!(
            flags.contains(MigrationFlags::STOP_COPY) && flags.contains(MigrationFlags::P2P),
            "{name}: migration flags {flags} lack STOP_COPY or P2P"
        );
        anyhow::ensure!(
            *state == DeviceState::Running,
            "{name}: freshly opened device is in {state}, expected RUNNING"
        );
        flag_set.push(*flags);
    }
    anyhow::ensure!(
        flag_set[0] == flag_set[1],
        "the two mdevs report different flags: {} vs {}",
        flag_set[0],
        flag_set[1]
    );
    let flags = flag_set[0];
    d.set("pre_copy", flags.contains(MigrationFlags::PRE_COPY));
    let mut devices = opened.into_iter().map(|(device, _, _)| device);
    let (Some(a), Some(b)) = (devices.next(), devices.next()) else {
        anyhow::bail!("expected two devices");
    };
    Ok((
        Bench {
            a,
            b,
            flags,
            saved_a: None,
        },
        facts,
    ))
}

/// A check that needs both devices; reports "not run" without them.
type BenchCheck = fn(&mut Bench, &mut Details) -> anyhow::Result<()>;

/// The checks after opening, in order, with their mandatory bit.
const BENCH_CHECKS: [(&str, bool, BenchCheck); 9] = [
    (
        "mig_data_size_vs_stop_copy",
        true,
        save_restore::mig_data_size,
    ),
    ("save_a_running_to_stop_copy", true, save_restore::save_a),
    ("restore_into_b", true, save_restore::restore_into_b),
    ("invalid_arcs", true, failures::invalid_arcs),
    ("garbage_restore_recovers", true, failures::garbage_restore),
    (
        "garbage_header_full_size",
        true,
        failures::garbage_header_full_size,
    ),
    (
        "state_format_save_restore",
        true,
        save_restore::state_format,
    ),
    ("pre_copy", true, save_restore::pre_copy),
    (
        "engine_save_restore",
        true,
        save_restore::engine_save_restore,
    ),
];

/// Runs every check against the two mdev sysfs paths.
pub fn run_checks(paths: &[PathBuf; 2]) -> ChecksSummary {
    let mut checks = Vec::new();
    let mut bench = None;
    let mut devices = Vec::new();
    // Before anything holds the devices, so `host` may open them.
    checks.push(run_check("host_list", true, |d| host_tool::list(paths, d)));
    checks.push(run_check("host_check", true, |d| {
        host_tool::check(paths, d)
    }));
    checks.push(run_check("open_and_flags", true, |d| {
        let (opened, facts) = open_devices(paths, d)?;
        bench = Some(opened);
        devices = facts;
        Ok(())
    }));
    for (name, mandatory, check) in BENCH_CHECKS {
        checks.push(run_check(name, mandatory, |d| {
            let bench = bench
                .as_mut()
                .context("not run: the devices could not be opened")?;
            for (which, device) in [("a", &bench.a), ("b", &bench.b)] {
                if let Some(note) = ensure_running(device)
                    .with_context(|| format!("precondition: device {which} back to RUNNING"))?
                {
                    d.set(&format!("precondition_{which}"), note);
                }
            }
            check(bench, d)
        }));
    }
    checks.push(run_check("host_check_in_use", true, |d| {
        let bench = bench
            .as_mut()
            .context("not run: the devices could not be opened")?;
        host_tool::in_use(bench, paths, d)
    }));
    let all_mandatory_passed = checks.iter().all(|c| c.passed || !c.mandatory);
    ChecksSummary {
        devices,
        checks,
        all_mandatory_passed,
    }
}
