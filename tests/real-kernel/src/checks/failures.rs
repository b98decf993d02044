// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Checks of the failure paths: requests the kernel refuses, and garbage
//! written in RESUMING, with the FSM's recovery afterwards.

use std::fs::File;

use anyhow::Context;
use serde_json::json;
use xe_vf_plugin::fsm::{self, Recovery, WalkError};
use xe_vf_plugin::{DeviceError, DeviceState, MigrationDevice};

use super::recording::Recording;
use super::save_restore::save_with_walk;
use super::stream::{self, errno_name};
use super::{ensure_running, Bench, Details};

use DeviceState::*;

/// Largest MIG_DATA_SIZE for which the full-size garbage stream is built
/// in memory (mtty's is about a hundred bytes).
const MAX_GARBAGE_STREAM: u64 = 64 * 1024;

/// Describes a `set_state` outcome for the report.
fn describe(
    result: &Result<Option<File>, DeviceError>,
    state_after: DeviceState,
) -> serde_json::Value {
    match result {
        Ok(fd) => json!({
            "accepted": true,
            "data_fd": fd.is_some(),
            "state_after": state_after.name(),
        }),
        Err(e) => json!({
            "accepted": false,
            "error": e.to_string(),
            "arc_error": matches!(e, DeviceError::Arc { .. }),
            "errno": e.errno().map(errno_name),
            "state_after": state_after.name(),
        }),
    }
}

/// Asks `device` for `to` in one `SET` and expects the kernel to refuse it
/// with `EINVAL`, reported as [`DeviceError::Arc`], leaving the state as
/// it was.
fn expect_refused(
    key: &str,
    device: &dyn MigrationDevice,
    to: DeviceState,
    d: &mut Details,
) -> anyhow::Result<()> {
    let before = device.state()?;
    let result = device.set_state(to);
    let after = device.state()?;
    d.set(key, describe(&result, after));
    match result {
        Err(DeviceError::Arc { source, .. }) => anyhow::ensure!(
            source.raw_os_error() == Some(libc::EINVAL),
            "{before} -> {to}: refused with {source}, expected EINVAL"
        ),
        Err(other) => anyhow::bail!("{before} -> {to}: expected DeviceError::Arc, got {other}"),
        Ok(_) => anyhow::bail!("{before} -> {to}: the kernel accepted it"),
    }
    anyhow::ensure!(
        after == before,
        "{before} -> {to} was refused but left the device in {after}"
    );
    Ok(())
}

/// Check 5: requests outside the single arcs.
///
/// The uAPI defines any pair of supported states as a *combination
/// transition* that the kernel walks itself (mtty loops over
/// `vfio_mig_get_next_state()`), so RUNNING -> STOP_COPY or RUNNING ->
/// RESUMING in one `SET` is accepted, not refused. That is checked and
/// reported. What the kernel does refuse, with `EINVAL` and the state left
/// alone, is a pair with no path (STOP_COPY -> PRE_COPY) and ERROR as a
/// target; those are the refusals checked here.
pub fn invalid_arcs(bench: &mut Bench, d: &mut Details) -> anyhow::Result<()> {
    let a = &bench.a;
    // RUNNING -> STOP_COPY in one SET: a combination transition.
    let combo = a.set_state(StopCopy);
    let after = a.state()?;
    d.set("running_to_stop_copy", describe(&combo, after));
    let mut fd = combo
        .context("RUNNING -> STOP_COPY as one SET (a uAPI combination transition) was refused")?
        .context("RUNNING -> STOP_COPY as one SET returned no data fd")?;
    anyhow::ensure!(
        after == StopCopy,
        "after RUNNING -> STOP_COPY the device is in {after}"
    );
    let bytes = stream::read_to_eof(&mut fd)?;
    drop(fd);
    d.set("running_to_stop_copy_bytes", bytes.len());
    if let Some(saved) = &bench.saved_a {
        anyhow::ensure!(
            &bytes == saved,
            "combination STOP_COPY stream differs from the walked one"
        );
    }

    // No path from STOP_COPY to PRE_COPY: refused, stays in STOP_COPY.
    expect_refused("stop_copy_to_pre_copy", a, PreCopy, d)?;
    fsm::walk(a, Running, Running).context("walk back to RUNNING")?;
    // ERROR is never a state one can ask for.
    expect_refused("running_to_error", a, Error, d)?;

    // RUNNING -> RESUMING in one SET on B: accepted too. Leaving a
    // RESUMING that received no data shows how the driver treats an empty
    // restore (mtty: RESUMING -> STOP fails, only reset leaves).
    let b = &bench.b;
    let combo = b.set_state(Resuming);
    let after = b.state()?;
    d.set("running_to_resuming", describe(&combo, after));
    let fd = combo
        .context("RUNNING -> RESUMING as one SET (a uAPI combination transition) was refused")?;
    anyhow::ensure!(fd.is_some(), "RUNNING -> RESUMING returned no data fd");
    anyhow::ensure!(
        after == Resuming,
        "after RUNNING -> RESUMING the device is in {after}"
    );
    drop(fd);
    let rec = Recording::new(b);
    let left = fsm::walk(&rec, Running, Running);
    d.set("empty_resuming_to_running_arcs", rec.take());
    d.set(
        "empty_resuming_to_running",
        match &left {
            Ok(_) => json!({ "ok": true }),
            Err(e) => json!({
                "ok": false,
                "errno": e.errno().map(errno_name),
                "recovery": e.recovery().map(|r| r.to_string()),
            }),
        },
    );
    ensure_running(b).context("B back to RUNNING after the empty RESUMING")?;
    Ok(())
}

/// Walks B to RESUMING, writes `data`, and walks to STOP with recovery
/// target RUNNING. Returns the write's outcome and the walk's.
fn restore_bytes(
    b: &dyn MigrationDevice,
    data: &[u8],
    d: &mut Details,
) -> anyhow::Result<(std::io::Result<()>, Result<(), WalkError>)> {
    let mut fd = fsm::walk(b, Resuming, Running)
        .context("walk to RESUMING")?
        .context("walk to RESUMING returned no data fd")?;
    let write = stream::write_all(&mut fd, data);
    d.set(
        "write",
        match &write {
            Ok(()) => json!({ "ok": true, "bytes": data.len() }),
            Err(e) => json!({
                "ok": false,
                "bytes": data.len(),
                "errno": e.raw_os_error().map(errno_name),
            }),
        },
    );
    drop(fd);
    let rec = Recording::new(b);
    let walk = fsm::walk(&rec, Stop, Running).map(|_| ());
    d.set("arcs", rec.take());
    Ok((write, walk))
}

/// Records a walk error's failing arc, errno and recovery.
fn record_walk_error(err: &WalkError, d: &mut Details) {
    d.set("walk_error", err.to_string());
    d.set("errno", err.errno().map(errno_name));
    d.set("recovery", err.recovery().map(|r| r.to_string()));
    if let WalkError::Arc { from, to, .. } = err {
        d.set("failed_arc", format!("{from} -> {to}"));
    }
}

/// Check 6: random bytes in RESUMING must fail at RESUMING -> STOP (where
/// the uAPI surfaces load errors), the walk must recover B to RUNNING
/// (directly or by reset), and a full save of B must work afterwards.
///
/// The garbage is shorter than mtty's 24-byte stream header, so the write
/// itself is accepted and the failure is the load's, not the write's.
pub fn garbage_restore(bench: &mut Bench, d: &mut Details) -> anyhow::Result<()> {
    let b = &bench.b;
    let seed = stream::seed_from_clock();
    d.set("seed", seed);
    let garbage = stream::garbage(seed, 16);
    let (write, walk) = restore_bytes(b, &garbage, d)?;
    write.context("writing 16 garbage bytes into RESUMING")?;
    let Err(err) = walk else {
        anyhow::bail!("RESUMING -> STOP loaded 16 garbage bytes without error");
    };
    record_walk_error(&err, d);
    match &err {
        WalkError::Arc { from, to, .. } => anyhow::ensure!(
            (*from, *to) == (Resuming, Stop),
            "the failing arc is {from} -> {to}, expected RESUMING -> STOP"
        ),
        other => anyhow::bail!("expected a failed arc, got {other}"),
    }
    anyhow::ensure!(
        matches!(
            err.recovery(),
            Some(Recovery::Recovered(Running) | Recovery::ResetThenRecovered(Running))
        ),
        "recovery: {:?}",
        err.recovery()
    );
    let now = b.state()?;
    d.set("state_after_recovery", now.name());
    anyhow::ensure!(now == Running, "B in {now} after recovery");

    let size = b.stop_copy_size()?;
    let bytes = save_with_walk(b).context("a full save after recovery")?;
    d.set("save_after_recovery_bytes", bytes.len());
    anyhow::ensure!(
        bytes.len() as u64 == size,
        "save after recovery gave {} bytes, MIG_DATA_SIZE {size}",
        bytes.len()
    );
    Ok(())
}

/// Check 6b: a stream of the full MIG_DATA_SIZE whose header is random.
/// What the kernel does is recorded (mtty 6.12 rejects the write with
/// `EFAULT` but still counts the bytes, so RESUMING -> STOP then loads
/// them); what is asserted is that B ends in RUNNING and saves again.
///
/// Only the first 24 bytes are random and the rest is zero: if the driver
/// loads the body, it lands verbatim in mtty's UART structs, where zeros
/// are harmless and random FIFO indices would not be.
pub fn garbage_header_full_size(bench: &mut Bench, d: &mut Details) -> anyhow::Result<()> {
    let b = &bench.b;
    let size = b.stop_copy_size()?;
    anyhow::ensure!(
        size <= MAX_GARBAGE_STREAM,
        "MIG_DATA_SIZE {size} above the {MAX_GARBAGE_STREAM} bytes this check builds"
    );
    let seed = stream::seed_from_clock();
    d.set("seed", seed);
    // Bounded by MAX_GARBAGE_STREAM above.
    let size = size as usize;
    let mut data = stream::garbage(seed, size.min(24));
    data.resize(size, 0);
    let (write, walk) = restore_bytes(b, &data, d)?;
    let load_accepted = walk.is_ok();
    if let Err(err) = &walk {
        record_walk_error(err, d);
    }
    d.set("write_refused", write.is_err());
    d.set("load_accepted", load_accepted);
    d.set(
        "kernel_loaded_a_refused_stream",
        write.is_err() && load_accepted,
    );
    ensure_running(b).context("B back to RUNNING")?;
    let bytes = save_with_walk(b).context("a full save afterwards")?;
    d.set("save_afterwards_bytes", bytes.len());
    anyhow::ensure!(
        bytes.len() == size,
        "save afterwards gave {} bytes, MIG_DATA_SIZE {size}",
        bytes.len()
    );
    Ok(())
}
