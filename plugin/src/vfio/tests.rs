// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `VfioMigrationDevice` against a fake kernel that checks the bytes it
//! receives and answers as VFIO would.

use std::io::{self, Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use super::feature::{FeatureRequest, MIG_STATE_DATA_FD};
use super::kernel::FeatureIoctl;
use super::*;
use crate::uapi::{
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_STOP, FEATURE_GET, FEATURE_MIGRATION,
    FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE, FEATURE_PROBE,
};

type Handler = Box<dyn FnMut(&mut FeatureRequest) -> io::Result<()> + Send>;

/// Answers each `VFIO_DEVICE_FEATURE` with `handler`, records every request.
struct FakeKernel {
    handler: Mutex<Handler>,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    reset_errno: Option<i32>,
    resets: Arc<Mutex<usize>>,
}

impl FeatureIoctl for FakeKernel {
    fn device_feature(&self, req: &mut FeatureRequest) -> io::Result<()> {
        assert_eq!(req.argsz() as usize, req.bytes().len(), "argsz = buffer");
        self.seen.lock().unwrap().push(req.bytes());
        (self.handler.lock().unwrap())(req)
    }

    fn reset(&self) -> io::Result<()> {
        *self.resets.lock().unwrap() += 1;
        match self.reset_errno {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }
}

struct Harness {
    dev: VfioMigrationDevice,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    resets: Arc<Mutex<usize>>,
}

fn identity() -> DeviceIdentity {
    DeviceIdentity {
        vendor_id: 0x8086,
        device_id: 0xe212,
        revision_id: 4,
        vram_size: None,
    }
}

fn harness(
    reset_errno: Option<i32>,
    handler: impl FnMut(&mut FeatureRequest) -> io::Result<()> + Send + 'static,
) -> Harness {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let resets = Arc::new(Mutex::new(0));
    let fake = FakeKernel {
        handler: Mutex::new(Box::new(handler)),
        seen: seen.clone(),
        reset_errno,
        resets: resets.clone(),
    };
    Harness {
        dev: VfioMigrationDevice::with_kernel(Box::new(fake), identity()),
        seen,
        resets,
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// A kernel that only answers GET MIG_DEVICE_STATE with `state`.
fn answer_state(req: &mut FeatureRequest, state: u32) -> io::Result<()> {
    assert_eq!(req.flags(), FEATURE_GET | FEATURE_MIG_DEVICE_STATE);
    req.reply_u32(0, state);
    Ok(())
}

#[test]
fn migration_flags_are_decoded() {
    let h = harness(None, |req| {
        assert_eq!(req.flags(), FEATURE_GET | FEATURE_MIGRATION);
        assert_eq!(req.argsz(), 16);
        req.reply_u64(0, 1 | 2 | 4);
        Ok(())
    });
    let flags = h.dev.migration_flags().unwrap();
    assert_eq!(flags, MigrationFlags::XE_VF.union(MigrationFlags::PRE_COPY));
}

#[test]
fn enotty_or_einval_on_migration_is_not_migratable() {
    for e in [libc::ENOTTY, libc::EINVAL] {
        let h = harness(None, move |_| Err(errno(e)));
        assert!(matches!(
            h.dev.migration_flags(),
            Err(DeviceError::NotMigratable)
        ));
    }
}

#[test]
fn other_errno_on_migration_is_kept() {
    let h = harness(None, |_| Err(errno(libc::EIO)));
    let err = h.dev.migration_flags().unwrap_err();
    assert!(matches!(err, DeviceError::Ioctl { .. }), "{err:?}");
    assert_eq!(err.errno(), Some(libc::EIO));
}

#[test]
fn flags_without_stop_copy_are_not_migratable() {
    let h = harness(None, |req| {
        req.reply_u64(0, 2);
        Ok(())
    });
    assert!(matches!(
        h.dev.migration_flags(),
        Err(DeviceError::NotMigratable)
    ));
}

#[test]
fn state_is_read() {
    for st in DeviceState::ALL {
        let h = harness(None, move |req| answer_state(req, st.raw()));
        assert_eq!(h.dev.state().unwrap(), st);
    }
}

#[test]
fn unknown_state_value_is_reported() {
    let h = harness(None, |req| answer_state(req, 9));
    assert!(matches!(h.dev.state(), Err(DeviceError::UnknownState(9))));
}

#[test]
fn arc_without_stream_sends_exact_bytes_and_returns_none() {
    let h = harness(None, |req| {
        if req.flags() & FEATURE_GET != 0 {
            return answer_state(req, DeviceState::Running.raw());
        }
        // The kernel writes -1 back when the arc opens no stream.
        req.reply_u32(MIG_STATE_DATA_FD, -1i32 as u32);
        Ok(())
    });
    assert!(h.dev.set_state(DeviceState::RunningP2p).unwrap().is_none());
    let seen = h.seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "GET before SET");
    let mut want = Vec::new();
    want.extend_from_slice(&16u32.to_ne_bytes());
    want.extend_from_slice(&(0x2_0000u32 | 2).to_ne_bytes());
    want.extend_from_slice(&5u32.to_ne_bytes());
    want.extend_from_slice(&(-1i32).to_ne_bytes());
    assert_eq!(seen[1], want);
}

#[test]
fn stream_arc_returns_an_owned_data_fd() {
    // The fake "kernel" hands out the read end of a socket pair and keeps the
    // write end, like a driver streaming device state.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut kernel_end = Some(ours);
    let writer = Arc::new(Mutex::new(None::<UnixStream>));
    let writer_in = writer.clone();
    let h = harness(None, move |req| {
        if req.flags() & FEATURE_GET != 0 {
            return answer_state(req, DeviceState::Stop.raw());
        }
        assert_eq!(req.device_state(), DeviceState::StopCopy.raw());
        let read_end = kernel_end.take().expect("one stream");
        let mut w = theirs.try_clone()?;
        w.write_all(b"device state bytes")?;
        *writer_in.lock().unwrap() = Some(w);
        req.reply_u32(MIG_STATE_DATA_FD, read_end.into_raw_fd() as u32);
        Ok(())
    });
    let mut file = h.dev.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let mut got = [0u8; 18];
    file.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"device state bytes");

    // Dropping the File closes the only copy of the read end: the writer
    // now sees a closed peer (EPIPE), which a leaked fd would prevent.
    drop(file);
    let mut w = writer.lock().unwrap().take().unwrap();
    let err = w.write_all(b"more").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
}

#[test]
fn failed_arc_keeps_from_to_and_errno() {
    let h = harness(None, |req| {
        if req.flags() & FEATURE_GET != 0 {
            return answer_state(req, DeviceState::Running.raw());
        }
        Err(errno(libc::EINVAL))
    });
    let err = h.dev.set_state(DeviceState::StopCopy).unwrap_err();
    match &err {
        DeviceError::Arc { from, to, source } => {
            assert_eq!(*from, DeviceState::Running);
            assert_eq!(*to, DeviceState::StopCopy);
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
        }
        other => panic!("expected Arc error, got {other:?}"),
    }
    assert_eq!(err.errno(), Some(libc::EINVAL));
}

#[test]
fn set_state_fails_cleanly_when_state_is_unreadable() {
    let h = harness(None, |_| Err(errno(libc::EIO)));
    let err = h.dev.set_state(DeviceState::Stop).unwrap_err();
    assert!(matches!(err, DeviceError::Ioctl { .. }), "{err:?}");
    assert_eq!(h.seen.lock().unwrap().len(), 1, "no SET after a failed GET");
}

#[test]
fn stop_copy_size_is_read() {
    let h = harness(None, |req| {
        assert_eq!(req.flags(), FEATURE_GET | FEATURE_MIG_DATA_SIZE);
        req.reply_u64(0, 6 << 30);
        Ok(())
    });
    assert_eq!(h.dev.stop_copy_size().unwrap(), 6 << 30);
}

#[test]
fn reset_calls_the_kernel_and_maps_errno() {
    let h = harness(None, |_| unreachable!("reset is not a feature"));
    h.dev.reset().unwrap();
    assert_eq!(*h.resets.lock().unwrap(), 1);

    let h = harness(Some(libc::EBUSY), |_| unreachable!());
    let err = h.dev.reset().unwrap_err();
    assert_eq!(err.errno(), Some(libc::EBUSY));
    assert_eq!(*h.resets.lock().unwrap(), 1);
}

#[test]
fn dma_logging_round_trip() {
    let h = harness(None, |req| {
        let feature = req.flags() & 0xffff;
        if req.flags() & FEATURE_PROBE != 0 {
            return Err(errno(libc::ENOTTY));
        }
        match feature {
            FEATURE_DMA_LOGGING_START => {
                // The payload's pointer is the side buffer's address.
                assert_eq!(req.get_u64(8 + 16), req.side().as_ptr() as u64);
                assert_eq!(req.side(), &[0x1000_0000, 0x20_0000]);
                req.reply_u64(0, 8192); // driver rounds the page size up
                Ok(())
            }
            FEATURE_DMA_LOGGING_STOP => Ok(()),
            FEATURE_DMA_LOGGING_REPORT => {
                assert_eq!(req.get_u64(8 + 24), req.side().as_ptr() as u64);
                req.side_mut()[0] = 0b1011;
                Ok(())
            }
            other => panic!("unexpected feature {other}"),
        }
    });
    assert!(!h.dev.supports_dma_logging().unwrap());
    assert_eq!(
        h.dev
            .dma_logging_start(4096, &[(0x1000_0000, 0x20_0000)])
            .unwrap(),
        8192
    );
    let bitmap = h
        .dev
        .dma_logging_report(0x1000_0000, 64 * 4096, 4096)
        .unwrap();
    assert_eq!(bitmap, vec![0b1011]);
    h.dev.dma_logging_stop().unwrap();
}

#[test]
fn invalid_dma_logging_never_reaches_the_kernel() {
    let h = harness(None, |_| panic!("must not be called"));
    assert!(matches!(
        h.dev.dma_logging_start(4096, &[]),
        Err(DeviceError::Other(_))
    ));
    assert!(matches!(
        h.dev.dma_logging_report(0, 1 << 60, 4096),
        Err(DeviceError::Other(_))
    ));
}

#[test]
fn open_nonexistent_sysfs_path_is_not_found() {
    let path = Path::new("/sys/bus/pci/devices/0000:ff:1f.7-does-not-exist");
    let err = VfioMigrationDevice::open(path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DeviceError::NotFound { .. }), "{err:?}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn open_without_dev_vfio_is_not_found() {
    let root = tempfile::tempdir().unwrap();
    let dev = root.path().join("0000:03:00.1");
    std::fs::create_dir(&dev).unwrap();
    std::os::unix::fs::symlink("../../kernel/iommu_groups/5", dev.join("iommu_group")).unwrap();
    let dev_vfio = root.path().join("no-dev-vfio");
    let err = VfioMigrationDevice::open_with_dev_vfio(&dev, &dev_vfio).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DeviceError::NotFound { .. }), "{err:?}");
    assert!(msg.contains("no-dev-vfio/vfio is missing"), "{msg}");
}

#[test]
fn from_device_fd_owns_and_closes_the_fd() {
    let (a, b) = UnixStream::pair().unwrap();
    let dev = VfioMigrationDevice::from_device_fd(OwnedFd::from(a), identity());
    assert_eq!(dev.identity(), identity());
    assert!(dev.name().starts_with("fd"));
    // A socket is not a VFIO device: the real ioctl fails with an errno.
    let err = dev.state().unwrap_err();
    assert!(err.errno().is_some(), "{err:?}");
    drop(dev);
    let mut b = b;
    let err = b.write_all(b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
}
