// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The VMM-side container for a device's raw VFIO migration data.
//!
//! A snapshot file or a migration connection carries the bytes read from a
//! VF's `data_fd` in STOP_COPY inside this container. It exists because
//! those bytes can be many GiB (the VF's VRAM): they must stream through
//! bounded buffers, corruption and truncation must be caught before a
//! destination loads them, and a reader must know what device they belong
//! to without outside context. Runs of zero bytes, common in VRAM, are
//! elided.
//!
//! # Layout (all integers little-endian)
//!
//! ```text
//! stream  := prelude header-json record* end-record
//!
//! prelude (20 bytes)
//!   0  [u8; 8]  magic  b"XEVFSTAT"
//!   8  u16      format version (1)
//!   10 u16      header flags, must be 0
//!   12 u32      length of header-json in bytes (at most 64 KiB)
//!   16 u32      CRC32C over prelude bytes 0..16 followed by header-json
//!
//! header-json: a UTF-8 JSON object (see `StateHeader`)
//!   { "device_kind": "xe-vf",
//!     "identity": { "vendor_id", "device_id", "revision_id", "vram_size" },
//!     "migration_flags": u64, "estimated_size": u64 (0 = unknown),
//!     "chunk_size": u32 }
//!   Unknown members are ignored; incompatible changes bump the version.
//!   `estimated_size` is read under its old name `expected_size` too; it
//!   is informational, the END record carries the real length.
//!
//! record header (20 bytes)
//!   0  u8       type: 1 DATA, 2 ZERO, 3 END
//!   1  [u8; 3]  reserved, must be 0
//!   4  u64      length, by type:
//!                 DATA  payload bytes that follow (1..=chunk_size)
//!                 ZERO  decoded zero bytes this record stands for
//!                       (1..=2^40), no payload
//!                 END   total decoded length of the stream, no payload
//!   12 u32      END: CRC32C of the whole decoded stream; otherwise 0
//!   16 u32      CRC32C over the payload (empty unless DATA) followed by
//!               record header bytes 0..16
//! ```
//!
//! The stream is self-delimiting: the decoder never reads past END, so the
//! container can be embedded in a larger stream (a migration socket). A
//! stream without END is truncated, whatever else it contains. Lengths are
//! bounded before anything is allocated: a DATA record may not exceed the
//! header's `chunk_size`, which itself may not exceed
//! [`MAX_RECORD_PAYLOAD`].

mod crc;
mod decoder;
mod encoder;
#[cfg(test)]
mod tests;

use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::device::DeviceIdentity;

pub use decoder::{verify, DecodeSummary, StateDecoder};
pub use encoder::{EncodeSummary, EncoderOptions, StateEncoder};

/// First eight bytes of every stream.
pub const MAGIC: [u8; 8] = *b"XEVFSTAT";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the fixed part in front of the JSON header.
pub const PRELUDE_LEN: usize = 20;
/// Upper bound of the JSON header, so a hostile length cannot make us
/// allocate.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// Size of every record header.
pub const RECORD_HEADER_LEN: usize = 20;
/// Hard limit of a DATA record's payload (and of `chunk_size`).
pub const MAX_RECORD_PAYLOAD: u32 = 16 * 1024 * 1024;
/// Encoder default chunk size: the most device data buffered at once.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Encoder default granularity of zero detection.
pub const DEFAULT_ZERO_BLOCK: u32 = 4096;
/// Longest run of zeros one ZERO record may stand for; longer runs are
/// split. Bounds the work a single (checksummed) record can demand.
pub const MAX_ZERO_RUN: u64 = 1 << 40;
/// `device_kind` of an Intel Xe SR-IOV VF.
pub const DEVICE_KIND_XE_VF: &str = "xe-vf";

/// Record type bytes.
pub(crate) const RECORD_DATA: u8 = 1;
pub(crate) const RECORD_ZERO: u8 = 2;
pub(crate) const RECORD_END: u8 = 3;

/// What the stream is the state of. Written once, in front of the data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateHeader {
    /// Free-form backend kind, e.g. [`DEVICE_KIND_XE_VF`].
    pub device_kind: String,
    /// The device the state was saved from; a destination must match it.
    pub identity: DeviceIdentity,
    /// `VFIO_DEVICE_FEATURE_MIGRATION` flags of the source device.
    pub migration_flags: u64,
    /// `MIG_DATA_SIZE` at save time, an estimate (the kernel's Xe formula
    /// leaves out the descriptor and trailer); 0 when unknown. For progress
    /// and sizing only: the END record carries the real length and CRC.
    #[serde(alias = "expected_size")]
    pub estimated_size: u64,
    /// Largest DATA payload; the encoder fills it in from its options.
    pub chunk_size: u32,
}

impl StateHeader {
    /// A header with the default chunk size (the encoder overrides it).
    pub fn new(
        device_kind: impl Into<String>,
        identity: DeviceIdentity,
        migration_flags: u64,
        estimated_size: u64,
    ) -> Self {
        StateHeader {
            device_kind: device_kind.into(),
            identity,
            migration_flags,
            estimated_size,
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

/// Everything that can be wrong with a stream, named so an operator can
/// tell corruption from truncation from a version skew. Offsets are byte
/// positions in the encoded stream.
#[derive(Debug, Error)]
pub enum StateFormatError {
    #[error("not a device-state stream: bad magic {found:02x?}")]
    BadMagic { found: [u8; 8] },
    #[error(
        "unsupported device-state format version {found} (this build reads version {supported})"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("header of {len} bytes exceeds the limit of {max} bytes")]
    HeaderTooLarge { len: u64, max: u64 },
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    #[error("record at offset {offset}: length {len} exceeds the limit of {max}")]
    RecordTooLarge { offset: u64, len: u64, max: u64 },
    #[error("unknown record type {ty} at offset {offset}")]
    UnknownRecordType { ty: u8, offset: u64 },
    #[error("record at offset {offset}: checksum mismatch")]
    RecordChecksum { offset: u64 },
    #[error("record at offset {offset} is malformed: {reason}")]
    MalformedRecord { offset: u64, reason: &'static str },
    #[error("stream truncated at offset {offset}: ended before its END record")]
    Truncated { offset: u64 },
    #[error("{what}: expected {expected} bytes, found {found}")]
    LengthMismatch {
        what: &'static str,
        expected: u64,
        found: u64,
    },
    #[error(
        "decoded stream checksum mismatch (END says {expected:#010x}, computed {computed:#010x})"
    )]
    StreamChecksum { expected: u32, computed: u32 },
    #[error("invalid encoder options: {0}")]
    InvalidOptions(String),
    #[error("the stream failed earlier; no further data")]
    Failed,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, StateFormatError>;

impl From<StateFormatError> for io::Error {
    /// I/O errors pass through; truncation becomes `UnexpectedEof`, any
    /// other format error `InvalidData`, with the original inside.
    fn from(e: StateFormatError) -> io::Error {
        match e {
            StateFormatError::Io(inner) => inner,
            StateFormatError::Truncated { .. } => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// The format error inside an `io::Error` returned by the decoder's or
/// encoder's `Read`/`Write` impls, if there is one.
pub fn state_error(e: &io::Error) -> Option<&StateFormatError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<StateFormatError>())
}

/// Serializes the prelude and JSON header.
pub(crate) fn encode_header(header: &StateHeader) -> Result<Vec<u8>> {
    let json =
        serde_json::to_vec(header).map_err(|e| StateFormatError::InvalidHeader(e.to_string()))?;
    if json.len() > MAX_HEADER_LEN {
        return Err(StateFormatError::HeaderTooLarge {
            len: json.len() as u64,
            max: MAX_HEADER_LEN as u64,
        });
    }
    let mut out = Vec::with_capacity(PRELUDE_LEN + json.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    // Bounded by MAX_HEADER_LEN above.
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out), &json);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Reads and validates the prelude and JSON header. Checks run in the
/// order that gives the most useful error: magic, version, size, checksum,
/// content.
pub(crate) fn decode_header<R: Read>(reader: &mut R, offset: &mut u64) -> Result<StateHeader> {
    let mut prelude = [0u8; PRELUDE_LEN];
    read_full(reader, &mut prelude[..8], offset)?;
    let mut found = [0u8; 8];
    found.copy_from_slice(&prelude[..8]);
    if found != MAGIC {
        return Err(StateFormatError::BadMagic { found });
    }
    read_full(reader, &mut prelude[8..], offset)?;
    let version = u16::from_le_bytes([prelude[8], prelude[9]]);
    if version != FORMAT_VERSION {
        return Err(StateFormatError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let flags = u16::from_le_bytes([prelude[10], prelude[11]]);
    let len = le_u32(&prelude[12..16]) as usize;
    let stored = le_u32(&prelude[16..20]);
    if len > MAX_HEADER_LEN {
        return Err(StateFormatError::HeaderTooLarge {
            len: len as u64,
            max: MAX_HEADER_LEN as u64,
        });
    }
    let mut json = vec![0u8; len];
    read_full(reader, &mut json, offset)?;
    let computed = crc32c::crc32c_append(crc32c::crc32c(&prelude[..16]), &json);
    if computed != stored {
        return Err(StateFormatError::HeaderChecksum { stored, computed });
    }
    if flags != 0 {
        return Err(StateFormatError::InvalidHeader(format!(
            "unknown header flags {flags:#06x}"
        )));
    }
    let header: StateHeader = serde_json::from_slice(&json)
        .map_err(|e| StateFormatError::InvalidHeader(e.to_string()))?;
    if header.chunk_size == 0 || header.chunk_size > MAX_RECORD_PAYLOAD {
        return Err(StateFormatError::InvalidHeader(format!(
            "chunk size {} outside 1..={MAX_RECORD_PAYLOAD}",
            header.chunk_size
        )));
    }
    Ok(header)
}

/// `read_exact` that reports where the stream ended and keeps `offset`
/// (bytes consumed so far) exact.
pub(crate) fn read_full<R: Read>(reader: &mut R, buf: &mut [u8], offset: &mut u64) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Err(StateFormatError::Truncated { offset: *offset }),
            Ok(n) => {
                filled += n;
                *offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StateFormatError::Io(e)),
        }
    }
    Ok(())
}

/// Fills `first` then `second` from `reader`, with one `readv` where the
/// reader supports it; truncation is reported at the offset it happened.
pub(crate) fn read_full_pair<R: Read>(
    reader: &mut R,
    first: &mut [u8],
    second: &mut [u8],
    offset: &mut u64,
) -> Result<()> {
    let (mut a, mut b) = (0, 0);
    while a < first.len() || b < second.len() {
        let result = if a < first.len() {
            let mut bufs = [
                io::IoSliceMut::new(&mut first[a..]),
                io::IoSliceMut::new(&mut second[b..]),
            ];
            reader.read_vectored(&mut bufs)
        } else {
            reader.read(&mut second[b..])
        };
        match result {
            Ok(0) => return Err(StateFormatError::Truncated { offset: *offset }),
            Ok(n) => {
                *offset += n as u64;
                let into_first = n.min(first.len() - a);
                a += into_first;
                b += n - into_first;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StateFormatError::Io(e)),
        }
    }
    Ok(())
}

/// Builds a record header; `payload_crc` is the CRC32C of the payload
/// (0, the CRC of nothing, for records without one).
pub(crate) fn record_header(ty: u8, length: u64, value: u32, payload_crc: u32) -> [u8; 20] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0] = ty;
    h[4..12].copy_from_slice(&length.to_le_bytes());
    h[12..16].copy_from_slice(&value.to_le_bytes());
    let crc = crc32c::crc32c_append(payload_crc, &h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Shared source of zero bytes for decoding ZERO records into a writer.
pub(crate) static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
