// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device-state stream -> device.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::thread::Scope;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use serde::{Serialize, Serializer};

use super::pump::{DeadlineFd, ReadAhead};
use super::{
    check_compatible, relay, require_migratable, save_recovery_state, EngineError, Phase,
    RelayPhases, TransferOptions,
};
use crate::device::{DeviceError, MigrationDevice};
use crate::fsm;
use crate::state_format::{DecodeSummary, StateDecoder, StateHeader};
use crate::uapi::DeviceState;
use crate::xe_stream::{
    ExpectedIdentity, PacketHeader, PacketType, ParserLimits, XeStreamParser, XeStreamSummary,
    DESCRIPTOR_MAX_LEN, HEADER_LEN,
};

pub(crate) fn serialize_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// What a restore loaded.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub header: StateHeader,
    pub decoded: DecodeSummary,
    pub xe: Option<XeStreamSummary>,
    /// Time from entering RESUMING to the device holding the state (STOP).
    #[serde(serialize_with = "serialize_ms")]
    pub resuming: Duration,
}

/// Loads a device-state stream from `input` into `device`, leaving it in
/// STOP (the VMM resumes it).
///
/// Identity, VRAM size and the Xe descriptor are checked before the
/// device is touched. Once data has gone into RESUMING, any failure
/// (corrupt or truncated stream, device rejection) resets the device, so a
/// partly restored VF is never left behind.
pub fn restore<R: Read + Send>(
    device: &dyn MigrationDevice,
    input: R,
    opts: &TransferOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<RestoreReport, EngineError> {
    let query = |source| EngineError::Device {
        phase: Phase::Query,
        source,
    };
    require_migratable(device.migration_flags().map_err(query)?)?;
    let initial = device.state().map_err(query)?;
    let identity = device.identity();

    let mut decoder = StateDecoder::new(input).map_err(|source| EngineError::Format {
        phase: Phase::Input,
        source,
    })?;
    let header = decoder.header().clone();
    if header.device_kind != opts.device_kind {
        return Err(EngineError::Incompatible(format!(
            "stream holds a '{}' device state, this device takes '{}'",
            header.device_kind, opts.device_kind
        )));
    }
    check_compatible(&header.identity, &identity)?;

    let mut parser = opts.is_xe().then(|| {
        XeStreamParser::new(ParserLimits {
            identity: Some(ExpectedIdentity {
                device_id: identity.device_id,
                revision_id: identity.revision_id,
            }),
            lmem_size: identity.vram_size,
            ..ParserLimits::default()
        })
    });
    // The descriptor leads an Xe stream; checking it first refuses another
    // device's state before RESUMING is entered.
    let prefix = match parser.as_mut() {
        Some(p) => read_descriptor(&mut decoder, p)?,
        None => Vec::new(),
    };

    let recovery = save_recovery_state(initial);
    let data_fd = fsm::walk(device, DeviceState::Resuming, recovery)
        .map_err(|source| EngineError::Walk {
            phase: Phase::EnterResuming,
            source,
        })?
        .ok_or_else(|| EngineError::Device {
            phase: Phase::EnterResuming,
            source: DeviceError::Other("RESUMING opened no data stream".to_string()),
        });
    let data_fd = match data_fd {
        Ok(fd) => fd,
        Err(e) => {
            discard_partial_state(device);
            return Err(e);
        }
    };
    let started = Instant::now();
    debug!("device in RESUMING, streaming state into it");

    let summary_slot = Arc::new(Mutex::new(None));
    let source = FinishingDecoder {
        decoder: Some(decoder),
        summary: summary_slot.clone(),
    };
    let mut sink = DeadlineFd::new(data_fd, opts.device_timeout);
    // A scope, so `input` may be borrowed (a VMM's migration socket).
    let streamed = std::thread::scope(|scope| {
        stream_into(
            scope,
            &mut sink,
            &prefix,
            source,
            parser.as_mut(),
            opts,
            progress,
        )
    });
    let streamed = streamed.and_then(|()| {
        parser
            .map(|p| p.finish())
            .transpose()
            .map_err(|source| EngineError::XeStream {
                phase: Phase::ResumeWrite,
                source,
            })
    });
    // The load happens at RESUMING -> STOP; the fd must be closed first.
    drop(sink);
    let xe = match streamed {
        Ok(xe) => xe,
        Err(e) => {
            error!("restore failed in {}: {e}", e.phase().name());
            discard_partial_state(device);
            return Err(e);
        }
    };
    let decoded = summary_slot
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .ok_or_else(|| EngineError::Io {
            phase: Phase::Input,
            source: io::Error::other("stream ended without a decode summary"),
        });
    let decoded = match decoded {
        Ok(d) => d,
        Err(e) => {
            discard_partial_state(device);
            return Err(e);
        }
    };
    if let Err(source) = fsm::walk(device, DeviceState::Stop, DeviceState::Stop) {
        let e = EngineError::Walk {
            phase: Phase::Load,
            source,
        };
        error!("restore failed: {e}");
        discard_partial_state(device);
        return Err(e);
    }
    let resuming = started.elapsed();
    info!(
        "restored {} device bytes ({} zero) in {:.1} ms",
        decoded.decoded_bytes,
        decoded.zero_bytes,
        resuming.as_secs_f64() * 1e3
    );
    Ok(RestoreReport {
        header,
        decoded,
        xe,
        resuming,
    })
}

/// Reads and checks the leading descriptor packet; returns its bytes,
/// which still have to go into the device.
fn read_descriptor<R: Read>(
    decoder: &mut StateDecoder<R>,
    parser: &mut XeStreamParser,
) -> Result<Vec<u8>, EngineError> {
    let input = EngineError::io(Phase::Input);
    let mut raw = [0u8; HEADER_LEN];
    decoder.read_exact(&mut raw).map_err(input)?;
    let xe_err = |source| EngineError::XeStream {
        phase: Phase::Compatibility,
        source,
    };
    let header = PacketHeader::decode(&raw).map_err(xe_err)?;
    let mut prefix = raw.to_vec();
    if header.kind == PacketType::Descriptor && header.size <= DESCRIPTOR_MAX_LEN {
        // Bounded by DESCRIPTOR_MAX_LEN just above.
        let mut payload = vec![0u8; header.size as usize];
        decoder
            .read_exact(&mut payload)
            .map_err(EngineError::io(Phase::Input))?;
        prefix.extend_from_slice(&payload);
    }
    // Anything else is refused by the parser with the driver's reason.
    parser.feed(&prefix, &mut ()).map_err(xe_err)?;
    Ok(prefix)
}

/// Pipelines decoded bytes into the device's data fd.
fn stream_into<'scope, 'env, R: Read + Send + 'scope>(
    scope: &'scope Scope<'scope, 'env>,
    sink: &mut DeadlineFd,
    prefix: &[u8],
    source: FinishingDecoder<R>,
    parser: Option<&mut XeStreamParser>,
    opts: &TransferOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<(), EngineError> {
    sink.write_all(prefix)
        .map_err(EngineError::io(Phase::ResumeWrite))?;
    let written = prefix.len() as u64;
    // Headroom of one record: every DATA record lands straight in a
    // pipeline buffer, and the device gets buffer-sized writes even when
    // the stream is mostly small records and zero runs.
    let headroom = source
        .decoder
        .as_ref()
        .map_or(0, |d| d.header().chunk_size as usize);
    let mut read_ahead =
        ReadAhead::spawn_scoped(scope, source, opts.buffer_size, headroom, opts.queue_depth)
            .map_err(EngineError::io(Phase::Input))?;
    let phases = RelayPhases {
        read: Phase::Input,
        parse: Phase::ResumeWrite,
        write: Phase::ResumeWrite,
    };
    relay(&mut read_ahead, parser, sink, phases, written, progress).map(|_| ())
}

/// Resets a destination device whose restore failed: its state is partial
/// and must never run.
fn discard_partial_state(device: &dyn MigrationDevice) {
    warn!("discarding partly restored device state by reset");
    if let Err(e) = device.reset() {
        error!("reset of the destination device failed: {e}");
    }
}

/// A decoder that, at its end, also checks the END record's totals and
/// hands the summary out, so EOF means "complete and verified".
struct FinishingDecoder<R: Read> {
    decoder: Option<StateDecoder<R>>,
    summary: Arc<Mutex<Option<DecodeSummary>>>,
}

impl<R: Read> Read for FinishingDecoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(decoder) = self.decoder.as_mut() else {
            return Ok(0);
        };
        let n = decoder.read(buf)?;
        if n == 0 {
            if let Some(decoder) = self.decoder.take() {
                let summary = decoder.finish().map_err(io::Error::from)?;
                if let Ok(mut slot) = self.summary.lock() {
                    *slot = Some(summary);
                }
            }
        }
        Ok(n)
    }
}
