// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `XeVfDevice` through CH's traits, on emulated VFs.

use std::fs;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use xe_vf_glue::device_set::XeVfSet;
use xe_vf_glue::error_chain::chain;
use xe_vf_glue::migration::{
    IncomingState, Migratable, MigratableError, Pausable, Snapshottable, StreamedState,
    Transportable,
};
use xe_vf_glue::protocol::MemoryRange;
use xe_vf_glue::snapshot::XeVfSnapshotState;
use xe_vf_glue::XeVfDevice;
use xe_vf_plugin::device_config::DeviceConfig;
use xe_vf_plugin::emulated::Fault;
use xe_vf_plugin::DeviceState;

fn dev(id: &str, spec: &str) -> XeVfDevice {
    XeVfDevice::new(id, DeviceConfig::parse(spec).unwrap()).unwrap()
}

/// The error of a call that must fail, with its causes: CH's
/// `MigratableError` names only the phase, the cause is in its chain.
fn failure<T>(result: Result<T, MigratableError>) -> String {
    match result {
        Ok(_) => panic!("succeeded"),
        Err(e) => chain(&e),
    }
}

fn digest(d: &XeVfDevice) -> xe_vf_plugin::emulated::StateDigest {
    d.backend().emulated().unwrap().digest().unwrap()
}

#[test]
fn snapshot_is_a_small_json_section_and_a_streamed_file() {
    let mut src = dev("gpu0", "emulated=on,vram=8M,workload=on");
    src.backend().emulated().unwrap().fill_vram(1, 30).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    src.pause().unwrap();
    assert_eq!(src.state().unwrap(), DeviceState::Stop);
    let saved = digest(&src);
    let snapshot = src.snapshot().unwrap();
    let json = serde_json::to_string(&snapshot).unwrap();
    assert!(
        json.len() < 1024,
        "section must stay small: {} bytes",
        json.len()
    );
    let section: XeVfSnapshotState = snapshot.to_state().unwrap();
    assert_eq!(section.data_file, "xe-vf-gpu0.bin");

    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    src.send(&snapshot, &url).unwrap();
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["xe-vf-gpu0.bin".to_string()]);
    // Source still holds its state and resumes.
    src.resume().unwrap();
    assert_eq!(src.state().unwrap(), DeviceState::Running);

    let (mut dst, report) = XeVfDevice::new_from_snapshot(
        "gpu0",
        DeviceConfig::parse("emulated=on,vram=8M,workload=off").unwrap(),
        &snapshot,
        &url,
    )
    .unwrap();
    // The section records MIG_DATA_SIZE, an estimate; the file has what
    // the device wrote.
    let emulated = src.backend().emulated().unwrap();
    assert_eq!(section.estimated_size, emulated.config().stop_copy_size());
    assert_eq!(report.decoded.decoded_bytes, emulated.config().stream_len());
    assert_eq!(dst.state().unwrap(), DeviceState::Stop);
    assert_eq!(digest(&dst), saved);
    dst.resume().unwrap();
    assert_eq!(dst.state().unwrap(), DeviceState::Running);
}

#[test]
fn restore_refuses_incompatible_vf_and_bad_files_without_touching_it() {
    let mut src = dev("a", "emulated=on,vram=4M,workload=off");
    src.pause().unwrap();
    let snapshot = src.snapshot().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    src.send(&snapshot, &url).unwrap();

    for spec in [
        "emulated=on,vram=2M,workload=off",
        "emulated=on,vram=4M,revid=1,workload=off",
        "emulated=on,vram=4M,devid=0xe20c,workload=off",
    ] {
        let mut dst = dev("a", spec);
        let before = digest(&dst);
        let err = failure(dst.restore_from_snapshot(&snapshot, &url));
        assert!(err.contains("cannot load"), "{spec}: {err}");
        assert_eq!(dst.state().unwrap(), DeviceState::Running);
        assert_eq!(digest(&dst), before);
    }

    // A truncated data file is refused and the destination reset.
    let path = dir.path().join("xe-vf-a.bin");
    let len = fs::metadata(&path).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 10).unwrap();
    let mut dst = dev("a", "emulated=on,vram=4M,workload=off");
    let err = failure(dst.restore_from_snapshot(&snapshot, &url));
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(dst.state().unwrap(), DeviceState::Running);

    // A section naming a file outside the directory is refused.
    let mut evil: XeVfSnapshotState = snapshot.to_state().unwrap();
    evil.data_file = "../xe-vf-a.bin".to_string();
    let evil = xe_vf_glue::migration::Snapshot::new_from_state(&evil).unwrap();
    let err = failure(dst.restore_from_snapshot(&evil, &url));
    assert!(err.contains("not a plain file name"), "{err}");
}

#[test]
fn failed_snapshot_write_leaves_no_file_and_the_vf_intact() {
    let mut src = dev("a", "emulated=on,vram=4M,workload=off");
    src.backend()
        .emulated()
        .unwrap()
        .inject_fault(Fault::CorruptSave { offset: 1 });
    src.pause().unwrap();
    let snapshot = src.snapshot().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let err = failure(src.send(&snapshot, &url));
    assert!(err.contains("stop-copy read"), "{err}");
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no partial file may remain"
    );
    assert_eq!(src.state().unwrap(), DeviceState::Stop);
    src.resume().unwrap();
    assert_eq!(src.state().unwrap(), DeviceState::Running);
}

#[test]
fn migration_stream_between_two_devices() {
    let mut src = dev("gpu0", "emulated=on,vram=4M,workload=on");
    let dst = dev("gpu0", "emulated=on,vram=4M,workload=off");
    dst.incoming()
        .check_description(&src.describe().unwrap())
        .unwrap();
    src.pause().unwrap();
    let (tx, rx) = UnixStream::pair().unwrap();
    let receiver = std::thread::spawn(move || {
        let r = dst.load_state_from(rx, &mut |_| {});
        (dst, r)
    });
    let sent = src.save_state_to(&tx, &mut |_| {}).unwrap();
    drop(tx);
    let (mut dst, received) = receiver.join().unwrap();
    assert_eq!(received.unwrap().decoded.decoded_bytes, sent.raw_bytes);
    assert_eq!(digest(&dst), digest(&src));
    src.complete_migration().unwrap();
    dst.resume().unwrap();
}

/// The same stream through CH's `StreamedState` and `IncomingState`, as
/// the patched VMM moves it: byte counts on both sides, the state itself
/// arrives whole.
#[test]
fn streamed_state_through_the_trait() {
    let mut src = dev("gpu0", "emulated=on,vram=4M,workload=on");
    // Half of VRAM non-zero, so the stream is not all elided zeros.
    src.backend().emulated().unwrap().fill_vram(7, 50).unwrap();
    let mut dst = dev("gpu0", "emulated=on,vram=4M,workload=off");
    src.pause().unwrap();
    dst.pause().unwrap();
    let (mut tx, mut rx) = UnixStream::pair().unwrap();
    let mut incoming = dst.incoming();
    let receiver = std::thread::spawn(move || {
        let r = IncomingState::receive_state(&mut incoming, &mut rx);
        (dst, r)
    });
    let sent = StreamedState::send_state(&mut src, &mut tx).unwrap();
    drop(tx);
    let (dst, received) = receiver.join().unwrap();
    assert_eq!(received.unwrap(), sent);
    assert!(sent > 2 << 20, "{sent} bytes for 2 MiB of non-zero VRAM");
    assert_eq!(digest(&dst), digest(&src));
    assert_eq!(dst.state().unwrap(), DeviceState::Stop);
}

#[test]
fn incompatible_destination_is_refused_early() {
    let src = dev("gpu0", "emulated=on,vram=8M,workload=off");
    let dst = dev("gpu0", "emulated=on,vram=4M,workload=off");
    let err = failure(dst.incoming().check_description(&src.describe().unwrap()));
    assert!(err.contains("smaller"), "{err}");
    // A description of another device, or of no device at all.
    let other = dev("gpu1", "emulated=on,vram=8M,workload=off");
    let err = failure(dst.incoming().check_description(&other.describe().unwrap()));
    assert!(err.contains("describes device gpu1"), "{err}");
    let garbage = xe_vf_glue::migration::SnapshotData::new_from_state(&7u32).unwrap();
    let err = failure(dst.incoming().check_description(&garbage));
    assert!(err.contains("source description"), "{err}");
}

#[test]
fn dirty_tracking_policy() {
    let mut d = dev("a", "emulated=on,vram=1M,workload=off");
    d.set_dma_ranges(vec![MemoryRange {
        gpa: 0,
        length: 1 << 20,
    }]);
    d.start_migration().unwrap();
    d.start_dirty_log().unwrap();
    assert!(
        d.dirty_log().unwrap().is_empty(),
        "nothing while the VF runs"
    );
    d.pause().unwrap();
    assert_eq!(
        d.dirty_log().unwrap().regions().len(),
        1,
        "everything once stopped"
    );
    assert!(d.dirty_log().unwrap().is_empty());
    d.stop_dirty_log().unwrap();

    let mut off = dev("a", "emulated=on,vram=1M,workload=off,dirty_tracking=off");
    assert!(failure(off.start_migration()).contains("refused"));
    let mut dev_mode = dev(
        "a",
        "emulated=on,vram=1M,workload=off,dirty_tracking=device",
    );
    assert!(failure(dev_mode.start_dirty_log()).contains("DMA logging"));
    let mut no_mig = dev("a", "emulated=on,vram=1M,workload=off,migration=off");
    assert!(failure(no_mig.snapshot()).contains("migration=off"));
}

#[test]
fn device_set_pauses_all_to_p2p_before_any_stops_and_rolls_back() {
    let a = dev("a", "emulated=on,vram=1M,workload=on");
    let b = dev("b", "emulated=on,vram=1M,workload=on");
    b.backend()
        .emulated()
        .unwrap()
        .inject_fault(Fault::FailArc {
            from: DeviceState::RunningP2p,
            to: DeviceState::Stop,
            errno: libc::EIO,
            enter_error: false,
        });
    let mut set = XeVfSet::new(vec![a, b]);
    let err = failure(set.pause());
    assert!(err.contains("RUNNING_P2P -> STOP"), "{err}");
    for d in set.devices() {
        assert_eq!(d.state().unwrap(), DeviceState::Running, "rolled back");
    }
    set.pause().unwrap();
    for d in set.devices() {
        assert_eq!(d.state().unwrap(), DeviceState::Stop);
    }
    set.resume().unwrap();
    for d in set.devices() {
        assert_eq!(d.state().unwrap(), DeviceState::Running);
    }
}
