// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Checks of the good paths: MIG_DATA_SIZE, save (STOP_COPY), restore
//! (RESUMING), both through the device-state format, and PRE_COPY.

use std::fs::{self, File};
use std::io::Write;

use anyhow::Context;
use xe_vf_plugin::engine::{self, TransferOptions, DEVICE_KIND_GENERIC};
use xe_vf_plugin::fsm;
use xe_vf_plugin::state_format::{EncoderOptions, StateDecoder, StateEncoder, StateHeader};
use xe_vf_plugin::{DeviceState, MigrationDevice, MigrationFlags};

use super::recording::{ArcRecord, Recording};
use super::stream::{self, COPY_BUFFER_BYTES};
use super::{Bench, Details};

use DeviceState::*;

/// `device_kind` written into the state-format header for mtty.
const DEVICE_KIND_MTTY: &str = "mtty";

/// Checks that `got` is exactly the arcs `want` (target, and whether it
/// returned a data fd), each accepted and leaving the kernel in its target.
pub fn expect_arcs(
    what: &str,
    got: &[ArcRecord],
    want: &[(DeviceState, bool)],
) -> anyhow::Result<()> {
    let got_targets: Vec<&str> = got.iter().map(|a| a.to.as_str()).collect();
    let want_targets: Vec<&str> = want.iter().map(|(s, _)| s.name()).collect();
    anyhow::ensure!(
        got_targets == want_targets,
        "{what}: arcs {got_targets:?}, expected {want_targets:?}"
    );
    for (arc, (state, fd)) in got.iter().zip(want) {
        anyhow::ensure!(
            arc.errno.is_none() && arc.state_after == state.name() && arc.data_fd == *fd,
            "{what}: arc {} -> {} gave {arc:?}, expected state {state}, data fd {fd}",
            arc.from,
            arc.to
        );
    }
    Ok(())
}

/// Saves `device` with `fsm::walk`: RUNNING -> STOP_COPY, read to EOF,
/// back to RUNNING.
pub fn save_with_walk(device: &dyn MigrationDevice) -> anyhow::Result<Vec<u8>> {
    let mut fd = fsm::walk(device, StopCopy, Running)
        .context("walk to STOP_COPY")?
        .context("walk to STOP_COPY returned no data fd")?;
    let bytes = stream::read_to_eof(&mut fd)?;
    drop(fd);
    fsm::walk(device, Running, Running).context("walk back to RUNNING")?;
    Ok(bytes)
}

/// STOP_COPY -> STOP -> RUNNING_P2P -> RUNNING, checking every arc.
fn walk_back_from_stop_copy(rec: &Recording, d: &mut Details) -> anyhow::Result<()> {
    fsm::walk(rec, Stop, Running).context("walk STOP_COPY -> STOP")?;
    fsm::walk(rec, Running, Running).context("walk STOP -> RUNNING")?;
    let back = rec.take();
    d.set("walk_back", &back);
    expect_arcs(
        "walk back",
        &back,
        &[(Stop, false), (RunningP2p, false), (Running, false)],
    )
}

/// Check 2: MIG_DATA_SIZE against the bytes STOP_COPY really produces.
/// The uAPI calls it an estimate; mtty computes it from the same struct
/// it copies out, so for mtty the two must be equal.
pub fn mig_data_size(bench: &mut Bench, d: &mut Details) -> anyhow::Result<()> {
    let a = &bench.a;
    let size_running = a.stop_copy_size().context("stop_copy_size() in RUNNING")?;
    d.set("size_in_running", size_running);
    fsm::walk(a, Stop, Running).context("walk to STOP")?;
    let size_stop = a.stop_copy_size().context("stop_copy_size() in STOP")?;
    d.set("size_in_stop", size_stop);
    let mut fd = fsm::walk(a, StopCopy, Running)
        .context("walk to STOP_COPY")?
        .context("no data fd")?;
    let size_stop_copy = a
        .stop_copy_size()
        .context("stop_copy_size() in STOP_COPY")?;
    d.set("size_in_stop_copy", size_stop_copy);
    let bytes = stream::read_to_eof(&mut fd)?;
    drop(fd);
    d.set("bytes_read", bytes.len());
    fsm::walk(a, Running, Running).context("walk back to RUNNING")?;

    anyhow::ensure!(size_running > 0, "MIG_DATA_SIZE is 0");
    anyhow::ensure!(
        size_running == size_stop && size_stop == size_stop_copy,
        "MIG_DATA_SIZE changed between states: {size_running}/{size_stop}/{size_stop_copy}"
    );
    anyhow::ensure!(
        bytes.len() as u64 == size_running,
        "STOP_COPY produced {} bytes, MIG_DATA_SIZE said {size_running}",
        bytes.len()
    );
    d.set("exact", true);
    Ok(())
}

/// Check 3: A from RUNNING to STOP_COPY with `fsm::walk`, which must take
/// RUNNING_P2P -> STOP -> STOP_COPY (P2P is supported), read to EOF, back
/// to RUNNING; then the same path again as single `set_state` arcs, with
/// the kernel's state checked after each.
pub fn save_a(bench: &mut Bench, d: &mut Details) -> anyhow::Result<()> {
    let a = &bench.a;
    let planned = fsm::path(bench.flags, Running, StopCopy)?;
    d.set(
        "fsm_path",
        planned.iter().map(|s| s.name()).collect::<Vec<_>>(),
    );
    anyhow::ensure!(
        planned == [RunningP2p, Stop, StopCopy],
        "fsm::path RUNNING -> STOP_COPY is {planned:?}"
    );

    // Pass 1: fsm::walk, arcs recorded.
    let rec = Recording::new(a);
    let fd = fsm::walk(&rec, StopCopy, Running).context("walk to STOP_COPY")?;
    let to_stop_copy = rec.take();
    d.set("walk_to_stop_copy", &to_stop_copy);
    expect_arcs(
        "walk to STOP_COPY",
        &to_stop_copy,
        &[(RunningP2p, false), (Stop, false), (StopCopy, true)],
    )?;
    let mut fd = fd.context("walk to STOP_COPY returned no data fd")?;
    let bytes = stream::read_to_eof(&mut fd)?;
    drop(fd);
    d.set("walk_bytes", bytes.len());
    walk_back_from_stop_copy(&rec, d)?;

    // Pass 2: the same arcs one `set_state` at a time.
    let mut single = Vec::new();
    let mut step = |to: DeviceState, wants_fd: bool| -> anyhow::Result<Option<File>> {
        let fd = a
            .set_state(to)
            .with_context(|| format!("set_state({to})"))?;
        let now = a.state()?;
        single.push(format!("set_state({}) -> {now}", to.name()));
        anyhow::ensure!(now == to, "after set_state({to}) the device is in {now}");
        anyhow::ensure!(
            fd.is_some() == wants_fd,
            "set_state({to}) data fd: {}, expected {wants_fd}",
            fd.is_some()
        );
        Ok(fd)
    };
    step(RunningP2p, false)?;
    step(Stop, false)?;
    let mut fd = step(StopCopy, true)?.context("no data fd")?;
    let bytes2 = stream::read_to_eof(&mut fd)?;
    drop(fd);
    step(Stop, false)?;
    step(RunningP2p, false)?;
    step(Running, false)?;
    d.set("single_arcs", &single);
    d.set("single_arc_bytes", bytes2.len());

    anyhow::ensure!(!bytes.is_empty(), "STOP_COPY produced no data");
    anyhow::ensure!(
        bytes == bytes2,
        "the two saves of an idle device differ ({} vs {} bytes)",
        bytes.len(),
        bytes2.len()
    );
    d.set("head_hex", hex(&bytes[..bytes.len().min(24)]));
    bench.saved_a = Some(bytes);
    Ok(())
}

/// Check 4: B from RUNNING to RESUMING (walk), A's bytes written, then
/// RESUMING -> STOP -> RUNNING_P2P -> RUNNING. mtty's regions are not
/// reachable through the backend, so the restored state is compared by
/// saving B again: its stream must equal A's.
pub fn restore_into_b(bench: &mut Bench, d: &mut Details) -> anyhow::Result<()> {
    let saved = bench
        .saved_a
        .clone()
        .context("needs A's bytes from save_a_running_to_stop_copy")?;
    let b = &bench.b;
    let rec = Recording::new(b);
    let fd = fsm::walk(&rec, Resuming, Running).context("walk to RESUMING")?;
    let to_resuming = rec.take();
    d.set("walk_to_resuming", &to_resuming);
    expect_arcs(
        "walk to RESUMING",
        &to_resuming,
        &[(RunningP2p, false), (Stop, false), (Resuming, true)],
    )?;
    let mut fd = fd.context("walk to RESUMING returned no data fd")?;
    stream::write_all(&mut fd, &saved).context("writing A's bytes into B")?;
    drop(fd);
    d.set("bytes_written", saved.len());

    fsm::walk(&rec, Running, Running).context("walk RESUMING -> RUNNING")?;
    let to_running = rec.take();
    d.set("walk_to_running", &to_running);
    expect_arcs(
        "walk to RUNNING",
        &to_running,
        &[(Stop, false), (RunningP2p, false), (Running, false)],
    )?;
    let now = b.state()?;
    d.set("b_state", now.name());
    anyhow::ensure!(now == Running, "B is in {now} after the restore");

    let resaved = save_with_walk(b).context("saving B again")?;
    d.set("b_resave_matches_a", resaved == saved);
    anyhow::ensure!(
        resaved == saved,
        "B saved after the restore differs from A's stream"
    );
    Ok(())
}

/// Check 7: A's stream through `StateEncoder` into a file, then through
/// `StateDecoder` into B's RESUMING fd, all with bounded buffers. Both
/// devices reach RUNNING_P2P before either stops, and again before either
/// runs, as a VMM with several devices must.
pub fn state_format(bench: &mut Bench, d: &mut Details) -> anyhow::Result<()> {
    let (a, b) = (&bench.a, &bench.b);
    let mut order = Vec::new();
    let mut go = |who: &str, dev: &dyn MigrationDevice, to: DeviceState| {
        let fd = fsm::walk(dev, to, Running).with_context(|| format!("walk {who} to {to}"));
        order.push(format!("{who}:{}", to.name()));
        fd
    };

    go("a", a, RunningP2p)?;
    go("b", b, RunningP2p)?;
    anyhow::ensure!(
        a.state()? == RunningP2p && b.state()? == RunningP2p,
        "both devices must be in RUNNING_P2P before either stops"
    );
    let estimated_size = a.stop_copy_size()?;
    let mut fd_a = go("a", a, StopCopy)?.context("no save fd for A")?;

    let dir = std::env::temp_dir().join("xe-vf-kernel-test");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("a.xevfstate");
    let header = StateHeader::new(
        DEVICE_KIND_MTTY,
        a.identity(),
        bench.flags.bits(),
        estimated_size,
    );
    let options = EncoderOptions {
        chunk_size: COPY_BUFFER_BYTES as u32,
        ..EncoderOptions::default()
    };
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = StateEncoder::new(file, header, options).context("StateEncoder::new")?;
    let read = stream::copy_bounded(&mut fd_a, &mut encoder).context("A -> encoder")?;
    let encoded = encoder.finish().context("StateEncoder::finish")?;
    drop(fd_a);
    go("a", a, Stop)?;
    let file_len = fs::metadata(&path)?.len();
    d.set("bytes_read_from_a", read);
    d.set("encoded_bytes", encoded.encoded_bytes);
    d.set("encoded_file_bytes", file_len);
    d.set("encoder_zero_bytes", encoded.zero_bytes);

    let mut fd_b = go("b", b, Resuming)?.context("no resume fd for B")?;
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut decoder = StateDecoder::new(file).context("StateDecoder::new")?;
    let written = decoder
        .copy_decoded(&mut fd_b)
        .context("decoder -> B's RESUMING fd")?;
    let capacity = decoder.buffer_capacity();
    d.set("decoder_buffer_capacity", capacity);
    let decoded = decoder.finish().context("StateDecoder::finish")?;
    fd_b.flush()?;
    drop(fd_b);
    go("b", b, Stop)?;
    go("a", a, RunningP2p)?;
    go("b", b, RunningP2p)?;
    go("a", a, Running)?;
    go("b", b, Running)?;
    d.set("order", &order);
    d.set("bytes_written_to_b", written);
    d.set("decoded_bytes", decoded.decoded_bytes);
    d.set("crc_match", decoded.crc == encoded.crc);
    fs::remove_file(&path).ok();

    anyhow::ensure!(read > 0, "A produced no data");
    anyhow::ensure!(
        encoded.raw_bytes == read && decoded.decoded_bytes == read && written == read,
        "lengths disagree: read {read}, encoded raw {}, decoded {}, written {written}",
        encoded.raw_bytes,
        decoded.decoded_bytes
    );
    anyhow::ensure!(
        file_len == encoded.encoded_bytes,
        "file length != encoded bytes"
    );
    anyhow::ensure!(
        decoded.encoded_bytes == encoded.encoded_bytes,
        "decoder stopped early"
    );
    anyhow::ensure!(decoded.crc == encoded.crc, "CRC mismatch");
    anyhow::ensure!(
        capacity <= COPY_BUFFER_BYTES,
        "decoder buffer of {capacity} bytes above {COPY_BUFFER_BYTES}"
    );

    let resaved = save_with_walk(b).context("saving B again")?;
    if let Some(saved) = &bench.saved_a {
        d.set("b_resave_matches_a", &resaved == saved);
        anyhow::ensure!(
            &resaved == saved,
            "B saved after the state-format restore differs from A's stream"
        );
    }
    Ok(())
}

/// Check 9: the engine's own save and restore paths (the code the VMM glue
/// runs for an Xe VF), with the stream carried opaquely (`vfio` kind):
/// `engine::save` from a running A into a buffer leaves A in STOP,
/// `engine::restore` into a running B leaves B in STOP, both resume, and
/// B then saves exactly what A saved.
pub fn engine_save_restore(bench: &mut Bench, d: &mut Details) -> anyhow::Result<()> {
    let opts = TransferOptions {
        device_kind: DEVICE_KIND_GENERIC.to_string(),
        buffer_size: COPY_BUFFER_BYTES,
        ..TransferOptions::default()
    };
    let mut saved = Vec::new();
    let report = engine::save(&bench.a, &mut saved, &opts, &mut |_| {}).context("engine::save")?;
    d.set("a_state_after_save", bench.a.state()?.name());
    anyhow::ensure!(
        bench.a.state()? == Stop,
        "engine::save must leave A in STOP"
    );
    let restored = engine::restore(&bench.b, std::io::Cursor::new(saved), &opts, &mut |_| {})
        .context("engine::restore")?;
    d.set("b_state_after_restore", bench.b.state()?.name());
    anyhow::ensure!(
        bench.b.state()? == Stop,
        "engine::restore must leave B in STOP"
    );
    for dev in [&bench.a, &bench.b] {
        fsm::walk(dev, Running, Stop).context("resume")?;
    }
    d.set("raw_bytes", report.raw_bytes);
    d.set("encoded_bytes", report.encoded_bytes);
    d.set("decoded_bytes", restored.decoded.decoded_bytes);
    anyhow::ensure!(
        restored.decoded.decoded_bytes == report.raw_bytes && report.raw_bytes > 0,
        "saved {} bytes, restored {}",
        report.raw_bytes,
        restored.decoded.decoded_bytes
    );
    let resaved = save_with_walk(&bench.b).context("saving B again")?;
    if let Some(saved_a) = &bench.saved_a {
        d.set("b_resave_matches_a", &resaved == saved_a);
        anyhow::ensure!(
            &resaved == saved_a,
            "B after engine::restore differs from A"
        );
    }
    Ok(())
}

/// Check 8: RUNNING -> PRE_COPY gives a data fd with the initial bytes;
/// PRE_COPY -> PRE_COPY_P2P -> STOP_COPY continues the same stream (no
/// new fd) to EOF; then STOP and RUNNING. Initial plus final bytes must be
/// the whole STOP_COPY stream.
pub fn pre_copy(bench: &mut Bench, d: &mut Details) -> anyhow::Result<()> {
    anyhow::ensure!(
        bench.flags.contains(MigrationFlags::PRE_COPY),
        "device has no PRE_COPY (flags {})",
        bench.flags
    );
    let a = &bench.a;
    let rec = Recording::new(a);
    let fd = fsm::walk(&rec, PreCopy, Running).context("walk to PRE_COPY")?;
    let to_pre_copy = rec.take();
    d.set("walk_to_pre_copy", &to_pre_copy);
    expect_arcs("walk to PRE_COPY", &to_pre_copy, &[(PreCopy, true)])?;
    let mut fd = fd.context("walk to PRE_COPY returned no data fd")?;
    let initial = stream::read_available(&mut fd)?;
    d.set("initial_bytes", initial.len());
    // A second dry read: PRE_COPY must not hand out more of an idle device.
    let again = stream::read_available(&mut fd)?;
    d.set("second_read_bytes", again.len());

    let continued = fsm::walk(&rec, StopCopy, Running).context("walk to STOP_COPY")?;
    let to_stop_copy = rec.take();
    d.set("walk_to_stop_copy", &to_stop_copy);
    expect_arcs(
        "walk PRE_COPY -> STOP_COPY",
        &to_stop_copy,
        &[(PreCopyP2p, false), (StopCopy, false)],
    )?;
    anyhow::ensure!(
        continued.is_none(),
        "PRE_COPY_P2P -> STOP_COPY opened a new fd instead of continuing the stream"
    );
    let rest = stream::read_to_eof(&mut fd)?;
    drop(fd);
    d.set("stop_copy_bytes", rest.len());
    walk_back_from_stop_copy(&rec, d)?;

    let mut whole = initial.clone();
    whole.extend_from_slice(&again);
    whole.extend_from_slice(&rest);
    let size = a.stop_copy_size()?;
    d.set("total_bytes", whole.len());
    anyhow::ensure!(!initial.is_empty(), "PRE_COPY offered no initial bytes");
    anyhow::ensure!(again.is_empty(), "PRE_COPY kept producing data");
    anyhow::ensure!(
        whole.len() as u64 == size,
        "PRE_COPY + STOP_COPY gave {} bytes, MIG_DATA_SIZE {size}",
        whole.len()
    );
    if let Some(saved) = &bench.saved_a {
        d.set("matches_stop_copy_save", &whole == saved);
        anyhow::ensure!(
            &whole == saved,
            "PRE_COPY + STOP_COPY stream differs from a plain STOP_COPY save"
        );
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
