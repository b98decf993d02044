// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device -> device-state stream.

use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use log::{debug, error, info};
use serde::Serialize;

use super::pump::{DeadlineFd, ReadAhead};
use super::{
    header_for, relay, require_migratable, save_recovery_state, EngineError, Phase, RelayPhases,
    TransferOptions,
};
use crate::device::MigrationDevice;
use crate::fsm;
use crate::state_format::{StateEncoder, StateHeader};
use crate::uapi::DeviceState;
use crate::xe_stream::{ParserLimits, XeStreamParser, XeStreamSummary};

/// Output coalescing buffer; smaller than a chunk, so whole DATA
/// payloads bypass it.
const OUTPUT_BUFFER: usize = 128 * 1024;

/// What a save moved.
#[derive(Clone, Debug, Serialize)]
pub struct SaveReport {
    pub header: StateHeader,
    /// Bytes read from the device data fd.
    pub raw_bytes: u64,
    /// Bytes written to the output.
    pub encoded_bytes: u64,
    /// Raw bytes carried as elided zero runs.
    pub zero_bytes: u64,
    /// CRC32C of the raw stream.
    pub stream_crc: u32,
    /// Packet summary, for Xe streams.
    pub xe: Option<XeStreamSummary>,
    /// Time the device spent in STOP_COPY.
    #[serde(serialize_with = "super::restore::serialize_ms")]
    pub stop_copy: Duration,
    /// The device failed to leave STOP_COPY and was reset (now in STOP,
    /// blank): the saved stream is the only copy of its state.
    pub device_state_lost: bool,
}

/// Streams the device's state into `out` and leaves the device in STOP.
///
/// The device may start in RUNNING (the walk pauses it) or STOP (the VMM
/// paused it). On failure it is walked back to where it started, its state
/// intact, and `out` holds no END record, so no reader can take it for a
/// complete stream.
pub fn save<W: Write>(
    device: &dyn MigrationDevice,
    out: W,
    opts: &TransferOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<SaveReport, EngineError> {
    let query = |source| EngineError::Device {
        phase: Phase::Query,
        source,
    };
    require_migratable(device.migration_flags().map_err(query)?)?;
    let initial = device.state().map_err(query)?;
    let recovery = save_recovery_state(initial);
    let header = header_for(device, opts)?;

    // The header goes out before the device stops: a dead output fails
    // here, with the VM untouched.
    //
    // Zero-heavy VRAM encodes into many small records (20-byte headers,
    // page-sized payloads); coalescing them saves a syscall and a reader
    // wake-up each, while chunk-sized payloads still go out directly.
    let out = BufWriter::with_capacity(OUTPUT_BUFFER, out);
    let mut encoder = StateEncoder::new(out, header.clone(), opts.encoder)
        .and_then(|mut e| {
            e.flush()?;
            Ok(e)
        })
        .map_err(|source| EngineError::Format {
            phase: Phase::Output,
            source,
        })?;

    let data_fd = fsm::walk(device, DeviceState::StopCopy, recovery)
        .map_err(|source| EngineError::Walk {
            phase: Phase::EnterStopCopy,
            source,
        })?
        .ok_or_else(|| EngineError::Device {
            phase: Phase::EnterStopCopy,
            source: crate::device::DeviceError::Other(
                "STOP_COPY opened no data stream".to_string(),
            ),
        });
    let data_fd = match data_fd {
        Ok(fd) => fd,
        Err(e) => {
            back_out(device, recovery);
            return Err(e);
        }
    };
    let started = Instant::now();
    debug!("device in STOP_COPY, streaming its state");

    let reader = DeadlineFd::new(data_fd, opts.device_timeout);
    let mut read_ahead = match ReadAhead::spawn(reader, opts.buffer_size, opts.queue_depth) {
        Ok(r) => r,
        Err(source) => {
            back_out(device, recovery);
            return Err(EngineError::Io {
                phase: Phase::StopCopyRead,
                source,
            });
        }
    };
    let mut parser = opts
        .is_xe()
        .then(|| XeStreamParser::new(ParserLimits::default()));
    let phases = RelayPhases {
        read: Phase::StopCopyRead,
        parse: Phase::StopCopyRead,
        write: Phase::Output,
    };
    let pumped = relay(
        &mut read_ahead,
        parser.as_mut(),
        &mut encoder,
        phases,
        0,
        progress,
    );

    // The stream's length is what the device produced: MIG_DATA_SIZE in
    // the header is only an estimate, so nothing is compared with it.
    let checked = pumped.and_then(|_| {
        parser
            .map(XeStreamParser::finish)
            .transpose()
            .map_err(|source| EngineError::XeStream {
                phase: Phase::StopCopyRead,
                source,
            })
    });
    let xe = match checked {
        Ok(xe) => xe,
        Err(e) => {
            error!("save failed in {}: {e}", e.phase().name());
            // Leaving STOP_COPY closes the stream, which also unblocks the
            // read-ahead thread before it is joined.
            back_out(device, recovery);
            read_ahead.join();
            return Err(e);
        }
    };
    read_ahead.join();

    // END only once the whole stream was read and checked.
    let summary = encoder.finish().map_err(|source| {
        back_out(device, recovery);
        EngineError::Format {
            phase: Phase::Output,
            source,
        }
    })?;
    // The stream is complete and verified at this point: it is the one
    // good copy of the state if the device fails to leave STOP_COPY and has
    // to be reset, so the save succeeds and says the device lost its state.
    let device_state_lost = match fsm::walk(device, DeviceState::Stop, DeviceState::Stop) {
        Ok(_) => false,
        Err(e) if e.recovery() == Some(fsm::Recovery::ResetThenRecovered(DeviceState::Stop)) => {
            error!(
                "{}: {e}; the saved stream is complete and is now the only copy of the device state",
                Phase::LeaveStopCopy.name()
            );
            true
        }
        Err(source) => {
            return Err(EngineError::Walk {
                phase: Phase::LeaveStopCopy,
                source,
            })
        }
    };
    let stop_copy = started.elapsed();
    info!(
        "saved {} device bytes as {} stream bytes ({} zero) in {:.1} ms",
        summary.raw_bytes,
        summary.encoded_bytes,
        summary.zero_bytes,
        stop_copy.as_secs_f64() * 1e3
    );
    Ok(SaveReport {
        header,
        raw_bytes: summary.raw_bytes,
        encoded_bytes: summary.encoded_bytes,
        zero_bytes: summary.zero_bytes,
        stream_crc: summary.crc,
        xe,
        stop_copy,
        device_state_lost,
    })
}

/// Walks a device whose save failed back to `recovery`, logging what the
/// walk could not do (the save's own error is what the caller reports).
fn back_out(device: &dyn MigrationDevice, recovery: DeviceState) {
    match fsm::walk(device, recovery, recovery) {
        Ok(_) => info!("save aborted; device back in {recovery} with its state intact"),
        Err(e) => error!("save aborted and the device could not return to {recovery}: {e}"),
    }
}
