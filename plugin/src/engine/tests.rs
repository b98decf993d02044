// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

use std::io::{self, Cursor, Write};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::emulated::{EmulatedConfig, EmulatedXeVf, Fault};
use crate::uapi::DeviceState;

const MIB: u64 = 1 << 20;

fn vf(vram: u64, workload: bool) -> Arc<EmulatedXeVf> {
    EmulatedXeVf::new(EmulatedConfig {
        vram_size: vram,
        workload,
        ..EmulatedConfig::default()
    })
    .unwrap()
}

fn opts() -> TransferOptions {
    TransferOptions {
        buffer_size: 256 * 1024,
        ..TransferOptions::default()
    }
}

fn save_to_vec(dev: &EmulatedXeVf, opts: &TransferOptions) -> (SaveReport, Vec<u8>) {
    let mut out = Vec::new();
    let report = save(dev, &mut out, opts, &mut |_| {}).unwrap();
    (report, out)
}

#[test]
fn save_then_restore_reproduces_the_device_state() {
    let src = vf(8 * MIB, true);
    src.fill_vram(7, 60).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let (report, stream) = save_to_vec(&src, &opts());
    assert_eq!(src.state().unwrap(), DeviceState::Stop);
    assert_eq!(report.raw_bytes, src.config().stream_len());
    // MIG_DATA_SIZE is an estimate, xe's short of the stream; recorded.
    assert_eq!(report.header.estimated_size, src.stop_copy_size().unwrap());
    assert!(report.header.estimated_size < report.raw_bytes);
    assert!(report.zero_bytes > 0, "zero pages should be elided");
    assert!(report.encoded_bytes < report.raw_bytes);
    let xe = report.xe.as_ref().unwrap();
    assert_eq!(xe.vram_bytes, 8 * MIB);
    let saved = src.digest().unwrap();

    let dst = vf(8 * MIB, false);
    let mut last = 0;
    let restored = restore(&dst, Cursor::new(stream), &opts(), &mut |n| last = n).unwrap();
    assert_eq!(last, report.raw_bytes);
    assert_eq!(restored.decoded.decoded_bytes, report.raw_bytes);
    assert_eq!(dst.state().unwrap(), DeviceState::Stop);
    assert_eq!(dst.digest().unwrap(), saved);
}

#[test]
fn save_of_a_running_device_pauses_it_and_leaves_it_stopped() {
    let src = vf(2 * MIB, true);
    assert_eq!(src.state().unwrap(), DeviceState::Running);
    let (_, _) = save_to_vec(&src, &opts());
    let frozen = src.generation();
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(src.generation(), frozen, "workload must be frozen in STOP");
}

fn expect_untouched_destination(dst: &EmulatedXeVf, before: &crate::emulated::StateDigest) {
    assert_eq!(dst.state().unwrap(), DeviceState::Running);
    assert_eq!(&dst.digest().unwrap(), before);
}

#[test]
fn other_device_id_is_refused_before_the_destination_is_touched() {
    let src = vf(2 * MIB, false);
    src.fill_vram(1, 0).unwrap();
    let (_, stream) = save_to_vec(&src, &opts());
    let dst = EmulatedXeVf::new(EmulatedConfig {
        vram_size: 2 * MIB,
        device_id: 0xe20c,
        workload: false,
        ..EmulatedConfig::default()
    })
    .unwrap();
    dst.fill_vram(9, 0).unwrap();
    let before = dst.digest().unwrap();
    let err = restore(&dst, Cursor::new(stream), &opts(), &mut |_| {}).unwrap_err();
    assert_eq!(err.phase(), Phase::Compatibility, "{err}");
    assert!(err.to_string().contains("device id"), "{err}");
    expect_untouched_destination(&dst, &before);
}

#[test]
fn smaller_destination_vram_is_refused_before_the_destination_is_touched() {
    let src = vf(4 * MIB, false);
    let (_, stream) = save_to_vec(&src, &opts());
    let dst = vf(2 * MIB, false);
    dst.fill_vram(3, 0).unwrap();
    let before = dst.digest().unwrap();
    let err = restore(&dst, Cursor::new(stream), &opts(), &mut |_| {}).unwrap_err();
    assert_eq!(err.phase(), Phase::Compatibility);
    assert!(err.to_string().contains("smaller"), "{err}");
    expect_untouched_destination(&dst, &before);
}

#[test]
fn descriptor_mismatch_is_caught_even_if_the_header_lies() {
    // A stream whose container header claims the destination's identity
    // but whose Xe descriptor is another device's.
    let src = EmulatedXeVf::new(EmulatedConfig {
        vram_size: 2 * MIB,
        device_id: 0xe20c,
        workload: false,
        ..EmulatedConfig::default()
    })
    .unwrap();
    let (report, stream) = save_to_vec(&src, &opts());
    let mut raw = Vec::new();
    let mut dec = crate::state_format::StateDecoder::new(Cursor::new(stream)).unwrap();
    dec.copy_decoded(&mut raw).unwrap();
    let dst = vf(2 * MIB, false);
    let mut lying = report.header.clone();
    lying.identity = dst.identity();
    let mut forged = Vec::new();
    let mut enc =
        crate::state_format::StateEncoder::new(&mut forged, lying, Default::default()).unwrap();
    enc.write_all(&raw).unwrap();
    enc.finish().unwrap();

    dst.fill_vram(4, 0).unwrap();
    let before = dst.digest().unwrap();
    let err = restore(&dst, Cursor::new(forged), &opts(), &mut |_| {}).unwrap_err();
    assert_eq!(err.phase(), Phase::Compatibility, "{err}");
    assert_eq!(err.errno(), Some(libc::ENODEV), "{err}");
    assert!(err.to_string().contains("devid mismatch"), "{err}");
    expect_untouched_destination(&dst, &before);
}

#[test]
fn corrupt_stream_resets_the_destination_and_never_loads() {
    let src = vf(4 * MIB, false);
    src.fill_vram(5, 0).unwrap();
    let mut o = opts();
    o.encoder.zero_elision = false;
    let (_, mut stream) = save_to_vec(&src, &o);
    let mid = stream.len() / 2;
    stream[mid] ^= 0x40;
    let dst = vf(4 * MIB, false);
    dst.fill_vram(11, 0).unwrap();
    let err = restore(&dst, Cursor::new(stream), &opts(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // Reset: state lost, not partly restored, not the source's.
    assert_eq!(dst.state().unwrap(), DeviceState::Running);
    let d = dst.digest().unwrap();
    assert_ne!(d.vram, src.digest().unwrap().vram);
    assert_eq!(
        d,
        vf(4 * MIB, false).digest().unwrap(),
        "reset VF must be blank"
    );
}

#[test]
fn truncated_stream_resets_the_destination() {
    let src = vf(2 * MIB, false);
    src.fill_vram(5, 0).unwrap();
    let (_, stream) = save_to_vec(&src, &opts());
    for cut in [stream.len() - 1, stream.len() - 30, stream.len() / 2] {
        let dst = vf(2 * MIB, false);
        let err = restore(
            &dst,
            Cursor::new(stream[..cut].to_vec()),
            &opts(),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(err.phase(), Phase::Input | Phase::ResumeWrite),
            "cut {cut}: {err}"
        );
        assert_eq!(dst.state().unwrap(), DeviceState::Running, "cut {cut}");
    }
}

/// Fails after accepting `budget` bytes, like a full disk or a dropped peer.
struct FailingWriter {
    budget: usize,
    kind: io::ErrorKind,
}

impl Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::Error::new(self.kind, "injected output failure"));
        }
        let n = buf.len().min(self.budget);
        self.budget -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn output_failure_mid_save_returns_the_source_to_running_intact() {
    for budget in [0usize, 100, 3 << 20] {
        let src = vf(4 * MIB, true);
        src.fill_vram(2, 0).unwrap();
        let out = FailingWriter {
            budget,
            kind: io::ErrorKind::StorageFull,
        };
        let err = save(&*src, out, &opts(), &mut |_| {}).unwrap_err();
        assert_eq!(err.phase(), Phase::Output, "budget {budget}: {err}");
        assert_eq!(src.state().unwrap(), DeviceState::Running);
        // Its state is intact: a later save restores identically.
        let (_, stream) = save_to_vec(&src, &opts());
        let snap = src.digest().unwrap();
        let dst = vf(4 * MIB, false);
        restore(&dst, Cursor::new(stream), &opts(), &mut |_| {}).unwrap();
        assert_eq!(dst.digest().unwrap(), snap);
    }
}

#[test]
fn stalled_device_stream_times_out_and_recovers_the_source() {
    let src = vf(4 * MIB, false);
    src.inject_fault(Fault::StallSave {
        after_bytes: 1 << 20,
    });
    let o = TransferOptions {
        device_timeout: Duration::from_millis(200),
        ..opts()
    };
    let mut out = Vec::new();
    let err = save(&*src, &mut out, &o, &mut |_| {}).unwrap_err();
    assert_eq!(err.phase(), Phase::StopCopyRead, "{err}");
    assert!(err.to_string().contains("stalled"), "{err}");
    assert_eq!(src.state().unwrap(), DeviceState::Running);
}

#[test]
fn corrupt_device_stream_is_caught_on_the_source() {
    let src = vf(2 * MIB, false);
    src.inject_fault(Fault::CorruptSave { offset: 1 });
    let mut out = Vec::new();
    let err = save(&*src, &mut out, &opts(), &mut |_| {}).unwrap_err();
    assert_eq!(err.phase(), Phase::StopCopyRead, "{err}");
    assert_eq!(src.state().unwrap(), DeviceState::Running);
    // No END record was written: the partial output does not verify.
    assert!(crate::state_format::verify(Cursor::new(out)).is_err());
}

#[test]
fn failed_stop_copy_arc_leaves_the_source_running() {
    let src = vf(2 * MIB, true);
    src.inject_fault(Fault::FailArc {
        from: DeviceState::Stop,
        to: DeviceState::StopCopy,
        errno: libc::EIO,
        enter_error: false,
    });
    let mut out = Vec::new();
    let err = save(&*src, &mut out, &opts(), &mut |_| {}).unwrap_err();
    assert_eq!(err.phase(), Phase::EnterStopCopy);
    assert_eq!(err.errno(), Some(libc::EIO));
    assert_eq!(src.state().unwrap(), DeviceState::Running);
}

#[test]
fn device_rejecting_the_load_is_reset() {
    let src = vf(2 * MIB, false);
    let (_, stream) = save_to_vec(&src, &opts());
    let dst = vf(2 * MIB, false);
    dst.inject_fault(Fault::FailArc {
        from: DeviceState::Resuming,
        to: DeviceState::Stop,
        errno: libc::EINVAL,
        enter_error: true,
    });
    let err = restore(&dst, Cursor::new(stream), &opts(), &mut |_| {}).unwrap_err();
    assert_eq!(err.phase(), Phase::Load, "{err}");
    assert_eq!(err.errno(), Some(libc::EINVAL));
    assert_eq!(dst.state().unwrap(), DeviceState::Running);
}

#[test]
fn compatibility_rules() {
    let a = crate::device::DeviceIdentity {
        vendor_id: 0x8086,
        device_id: 0xe20b,
        revision_id: 1,
        vram_size: Some(4 * MIB),
    };
    assert!(check_compatible(&a, &a).is_ok());
    let bigger = crate::device::DeviceIdentity {
        vram_size: Some(8 * MIB),
        ..a
    };
    assert!(check_compatible(&a, &bigger).is_ok());
    assert!(check_compatible(&bigger, &a).is_err());
    let unknown = crate::device::DeviceIdentity {
        vram_size: None,
        ..a
    };
    assert!(check_compatible(&a, &unknown).is_ok());
    let rev = crate::device::DeviceIdentity {
        revision_id: 2,
        ..a
    };
    let msg = check_compatible(&a, &rev).unwrap_err().to_string();
    assert!(msg.contains("revision 0x01 != 0x02"), "{msg}");
}

#[test]
fn generic_kind_streams_are_carried_without_xe_parsing() {
    let src = vf(2 * MIB, false);
    let o = TransferOptions {
        device_kind: DEVICE_KIND_GENERIC.to_string(),
        ..opts()
    };
    let (report, stream) = save_to_vec(&src, &o);
    assert!(report.xe.is_none());
    assert_eq!(report.header.estimated_size, src.stop_copy_size().unwrap());
    // A destination expecting Xe refuses a generic stream.
    let dst = vf(2 * MIB, false);
    let err = restore(&dst, Cursor::new(stream.clone()), &opts(), &mut |_| {}).unwrap_err();
    assert_eq!(err.phase(), Phase::Compatibility);
    restore(&dst, Cursor::new(stream), &o, &mut |_| {}).unwrap();
    assert_eq!(dst.digest().unwrap(), src.digest().unwrap());
}

#[test]
fn failure_to_leave_stop_copy_after_a_complete_stream_keeps_the_stream() {
    let src = vf(2 * MIB, false);
    src.fill_vram(8, 0).unwrap();
    let saved = src.digest().unwrap();
    src.inject_fault(Fault::FailArc {
        from: DeviceState::StopCopy,
        to: DeviceState::Stop,
        errno: libc::EIO,
        enter_error: true,
    });
    let mut out = Vec::new();
    let report = save(&*src, &mut out, &opts(), &mut |_| {}).unwrap();
    assert!(report.device_state_lost);
    assert_eq!(src.state().unwrap(), DeviceState::Stop);
    assert_ne!(src.digest().unwrap(), saved, "the source VF was reset");
    // The stream is the surviving copy and restores the state.
    let dst = vf(2 * MIB, false);
    restore(&dst, Cursor::new(out), &opts(), &mut |_| {}).unwrap();
    assert_eq!(dst.digest().unwrap(), saved);
}
