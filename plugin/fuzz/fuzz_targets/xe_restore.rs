// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary bytes written into the RESUMING data fd of an emulated Xe
//! VF. RESUMING -> STOP must return Ok or a clean error (never hang or
//! panic), must accept only streams the parser accepts with the device's
//! limits, and a device that loaded a stream must save a valid one.

#![no_main]

use std::io::{ErrorKind, Write};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use xe_vf_plugin::emulated::EmulatedXeVf;
use xe_vf_plugin::xe_stream::inspect_with_limits;
use xe_vf_plugin::{DeviceState, MigrationDevice};
use xe_vf_plugin_fuzz::{device_limits, restore_config};

/// One device per process: creating it spawns threads and a memfd.
fn device() -> &'static Arc<EmulatedXeVf> {
    static DEVICE: OnceLock<Arc<EmulatedXeVf>> = OnceLock::new();
    DEVICE.get_or_init(|| {
        // The data fd is a socket: a write after the device stopped
        // reading raises SIGPIPE. Rust programs ignore it from `main`;
        // libFuzzer's `main` does not, so do it here.
        // SAFETY: installs SIG_IGN for SIGPIPE; no handler code runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        EmulatedXeVf::new(restore_config()).unwrap()
    })
}

/// Brings the device to STOP from wherever the last input left it.
fn to_stop(vf: &EmulatedXeVf) {
    match vf.state().unwrap() {
        DeviceState::Stop => {}
        _ => {
            vf.reset().unwrap();
            vf.set_state(DeviceState::RunningP2p).unwrap();
            vf.set_state(DeviceState::Stop).unwrap();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let vf = device();
    to_stop(vf);
    let mut fd = vf
        .set_state(DeviceState::Resuming)
        .unwrap()
        .expect("STOP -> RESUMING returns a data fd");
    let written = fd.write_all(data);
    if let Err(e) = &written {
        // The device stops reading once the stream is bad.
        assert!(
            matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
            "unexpected write error {e}"
        );
    }
    drop(fd);
    let loaded = vf.set_state(DeviceState::Stop);
    let parsed = inspect_with_limits(data, device_limits(vf.config()), false);
    match loaded {
        Ok(fd) => {
            assert!(fd.is_none());
            assert!(written.is_ok(), "write failed but the load succeeded");
            assert!(parsed.is_ok(), "device loaded a stream the parser rejects");
            assert_eq!(vf.state().unwrap(), DeviceState::Stop);
            // What it loaded, it saves as a valid stream.
            let save = vf
                .set_state(DeviceState::StopCopy)
                .unwrap()
                .expect("STOP -> STOP_COPY returns a data fd");
            let saved = inspect_with_limits(save, device_limits(vf.config()), false).unwrap();
            assert_eq!(saved.summary.total_bytes, vf.config().stream_len());
            assert!(vf.stop_copy_size().unwrap() < saved.summary.total_bytes);
            vf.set_state(DeviceState::Stop).unwrap();
        }
        Err(e) => {
            // A clean errno, and the device stays in RESUMING until reset.
            assert!(e.errno().is_some(), "error without errno: {e}");
            assert!(vf.last_restore_error().is_some());
            assert_eq!(vf.state().unwrap(), DeviceState::Resuming);
        }
    }
});
