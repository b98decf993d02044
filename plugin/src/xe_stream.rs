// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The Xe VF migration packet stream carried by the VFIO `data_fd`.
//!
//! `xe-vfio-pci` (the Linux "vfio/xe" variant driver) serialises a VF as a
//! sequence of packets: a 24-byte packed little-endian header followed by
//! `size` payload bytes. A DESCRIPTOR with the device identity comes first,
//! then per GT its GuC, GGTT, MMIO and VRAM chunks, and an empty TRAILER
//! last. This module encodes headers and descriptors, and checks a stream
//! the way the driver's restore path does, as a push parser that passes
//! payloads through as slices: a VRAM-sized stream never sits in memory.

use std::fmt;
use std::io::{self, Read, Write};

use serde::Serialize;
use thiserror::Error;

/// Size of a packed packet header on the wire.
pub const HEADER_LEN: usize = 24;
/// The only stream version the driver accepts.
pub const STREAM_VERSION: u8 = 1;
/// Descriptor KLV carrying the PCI device id.
pub const KLV_KEY_DEVICE_ID: u16 = 0xF001;
/// Descriptor KLV carrying the PCI revision id.
pub const KLV_KEY_REVISION_ID: u16 = 0xF002;
/// Upper bound of a descriptor payload; it is the only payload we buffer.
pub const DESCRIPTOR_MAX_LEN: u64 = 4096;
/// Most packet records `inspect` keeps, so a hostile stream of tiny
/// packets cannot grow the list without bound.
pub const INSPECT_MAX_RECORDS: usize = 1 << 20;

/// `enum xe_sriov_packet_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[repr(u8)]
pub enum PacketType {
    Descriptor = 1,
    Trailer = 2,
    Ggtt = 3,
    Mmio = 4,
    Guc = 5,
    Vram = 6,
}

impl PacketType {
    pub const ALL: [PacketType; 6] = [
        PacketType::Descriptor,
        PacketType::Trailer,
        PacketType::Ggtt,
        PacketType::Mmio,
        PacketType::Guc,
        PacketType::Vram,
    ];

    pub fn from_raw(raw: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.raw() == raw)
    }

    pub const fn raw(self) -> u8 {
        self as u8
    }

    pub const fn name(self) -> &'static str {
        match self {
            PacketType::Descriptor => "DESCRIPTOR",
            PacketType::Trailer => "TRAILER",
            PacketType::Ggtt => "GGTT",
            PacketType::Mmio => "MMIO",
            PacketType::Guc => "GUC",
            PacketType::Vram => "VRAM",
        }
    }

    const fn index(self) -> usize {
        self as usize - 1
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of decoding or checking a stream. `errno()` is what the driver
/// returns for the same fault.
#[derive(Debug, Error)]
pub enum XeStreamError {
    #[error("unsupported stream version {found} (supported: {STREAM_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("unknown packet type {raw}")]
    UnknownType { raw: u8 },
    #[error("{found} packet before the DESCRIPTOR; the DESCRIPTOR must come first")]
    DescriptorNotFirst { found: PacketType },
    #[error("second DESCRIPTOR packet; exactly one is allowed")]
    DuplicateDescriptor,
    #[error("descriptor payload of {size} bytes exceeds the {max} byte limit")]
    DescriptorTooLarge { size: u64, max: u64 },
    #[error("malformed descriptor at payload byte {byte_offset}: {reason}")]
    MalformedDescriptor { byte_offset: usize, reason: String },
    #[error("Aborting migration, devid mismatch {found:#06x}!={expected:#06x}")]
    DeviceIdMismatch { found: u16, expected: u16 },
    #[error("Aborting migration, revid mismatch {found:#04x}!={expected:#04x}")]
    RevisionMismatch { found: u8, expected: u8 },
    #[error("TRAILER carries {size} payload bytes, expected 0")]
    TrailerNotEmpty { size: u64 },
    #[error("data at stream byte {stream_offset} after the TRAILER")]
    DataAfterTrailer { stream_offset: u64 },
    #[error("offset {offset:#x} + size {size:#x} overflows 64 bits")]
    RangeOverflow { offset: u64, size: u64 },
    #[error(
        "VRAM chunk [{offset:#x}, {offset:#x}+{size:#x}) of tile {tile_id} exceeds the VF's LMEM of {lmem_size:#x} bytes"
    )]
    VramOutOfBounds {
        tile_id: u8,
        offset: u64,
        size: u64,
        lmem_size: u64,
    },
    #[error(
        "tile_id {tile_id} / gt_id {gt_id} does not exist (device has {tiles} tiles, {gts} GTs)"
    )]
    NoSuchGt {
        tile_id: u8,
        gt_id: u8,
        tiles: u8,
        gts: u8,
    },
    #[error("stream truncated at byte {stream_offset}: {what}")]
    Truncated { stream_offset: u64, what: String },
    #[error("{kind} packet rejected: {reason}")]
    Rejected {
        kind: PacketType,
        reason: String,
        errno: i32,
    },
    #[error("packet {index} at stream byte {stream_offset}: {inner}")]
    AtPacket {
        index: u64,
        stream_offset: u64,
        inner: Box<XeStreamError>,
    },
    #[error("the parser already failed; no more input is accepted")]
    Poisoned,
    #[error("stream I/O: {0}")]
    Io(#[from] io::Error),
}

impl XeStreamError {
    /// The errno `xe-vfio-pci` returns for this fault.
    pub fn errno(&self) -> i32 {
        match self {
            XeStreamError::DeviceIdMismatch { .. } | XeStreamError::RevisionMismatch { .. } => {
                libc::ENODEV
            }
            XeStreamError::Rejected { errno, .. } => *errno,
            XeStreamError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            XeStreamError::AtPacket { inner, .. } => inner.errno(),
            _ => libc::EINVAL,
        }
    }

    /// The fault itself, without the packet position wrapper.
    pub fn root(&self) -> &XeStreamError {
        match self {
            XeStreamError::AtPacket { inner, .. } => inner.root(),
            other => other,
        }
    }

    fn at(self, index: u64, stream_offset: u64) -> Self {
        match self {
            already @ XeStreamError::AtPacket { .. } => already,
            inner => XeStreamError::AtPacket {
                index,
                stream_offset,
                inner: Box::new(inner),
            },
        }
    }
}

/// `struct xe_sriov_packet_hdr`, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PacketHeader {
    pub version: u8,
    pub kind: PacketType,
    pub tile_id: u8,
    pub gt_id: u8,
    pub flags: u32,
    /// Offset of the payload within the resource (VRAM chunks).
    pub offset: u64,
    /// Payload bytes that follow the header.
    pub size: u64,
}

impl PacketHeader {
    /// A current-version header with no flags.
    pub const fn new(kind: PacketType, tile_id: u8, gt_id: u8, offset: u64, size: u64) -> Self {
        PacketHeader {
            version: STREAM_VERSION,
            kind,
            tile_id,
            gt_id,
            flags: 0,
            offset,
            size,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut raw = [0u8; HEADER_LEN];
        raw[0] = self.version;
        raw[1] = self.kind.raw();
        raw[2] = self.tile_id;
        raw[3] = self.gt_id;
        raw[4..8].copy_from_slice(&self.flags.to_le_bytes());
        raw[8..16].copy_from_slice(&self.offset.to_le_bytes());
        raw[16..24].copy_from_slice(&self.size.to_le_bytes());
        raw
    }

    /// Decodes a header; like the driver, the version is checked first.
    pub fn decode(raw: &[u8; HEADER_LEN]) -> Result<Self, XeStreamError> {
        let version = raw[0];
        if version != STREAM_VERSION {
            return Err(XeStreamError::UnsupportedVersion { found: version });
        }
        let kind =
            PacketType::from_raw(raw[1]).ok_or(XeStreamError::UnknownType { raw: raw[1] })?;
        let mut dword = [0u8; 4];
        dword.copy_from_slice(&raw[4..8]);
        let mut qword = [0u8; 8];
        qword.copy_from_slice(&raw[8..16]);
        let offset = u64::from_le_bytes(qword);
        qword.copy_from_slice(&raw[16..24]);
        let size = u64::from_le_bytes(qword);
        Ok(PacketHeader {
            version,
            kind,
            tile_id: raw[2],
            gt_id: raw[3],
            flags: u32::from_le_bytes(dword),
            offset,
            size,
        })
    }

    /// Header plus payload length on the wire, if it fits in 64 bits.
    pub fn wire_len(&self) -> Option<u64> {
        self.size.checked_add(HEADER_LEN as u64)
    }
}

/// One GuC-style KLV: `key << 16 | len_dwords`, then `len` dwords.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Klv {
    pub key: u16,
    pub value: Vec<u32>,
}

/// The DESCRIPTOR payload: what a destination must match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Descriptor {
    pub device_id: u16,
    pub revision_id: u8,
    /// KLVs this version does not know; the driver skips them too.
    pub other: Vec<Klv>,
}

impl Descriptor {
    pub fn new(device_id: u16, revision_id: u8) -> Self {
        Descriptor {
            device_id,
            revision_id,
            other: Vec::new(),
        }
    }

    /// Encoded payload length in bytes.
    pub fn encoded_len(&self) -> u64 {
        let other: usize = self.other.iter().map(|k| 1 + k.value.len()).sum();
        ((4 + other) * 4) as u64
    }

    /// Encodes the KLVs: device id, revision id, then the unknown ones.
    pub fn encode(&self) -> Result<Vec<u8>, XeStreamError> {
        let size = self.encoded_len();
        if size > DESCRIPTOR_MAX_LEN {
            return Err(XeStreamError::DescriptorTooLarge {
                size,
                max: DESCRIPTOR_MAX_LEN,
            });
        }
        let mut out = Vec::with_capacity(size as usize);
        let mut push_klv = |key: u16, value: &[u32]| {
            // Bounded by DESCRIPTOR_MAX_LEN above, so the length fits 16 bits.
            let head = (u32::from(key) << 16) | (value.len() as u32 & 0xffff);
            out.extend_from_slice(&head.to_le_bytes());
            for v in value {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
        push_klv(KLV_KEY_DEVICE_ID, &[u32::from(self.device_id)]);
        push_klv(KLV_KEY_REVISION_ID, &[u32::from(self.revision_id)]);
        for klv in &self.other {
            push_klv(klv.key, &klv.value);
        }
        Ok(out)
    }

    /// Decodes and validates a descriptor payload.
    pub fn decode(payload: &[u8]) -> Result<Self, XeStreamError> {
        let malformed = |byte_offset: usize, reason: String| XeStreamError::MalformedDescriptor {
            byte_offset,
            reason,
        };
        if payload.len() as u64 > DESCRIPTOR_MAX_LEN {
            return Err(XeStreamError::DescriptorTooLarge {
                size: payload.len() as u64,
                max: DESCRIPTOR_MAX_LEN,
            });
        }
        if !payload.len().is_multiple_of(4) {
            return Err(malformed(
                payload.len(),
                format!("size {} is not a multiple of 4 (not KLVs)", payload.len()),
            ));
        }
        let dwords: Vec<u32> = payload
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut device_id = None;
        let mut revision_id = None;
        let mut other = Vec::new();
        let mut i = 0;
        while i < dwords.len() {
            let key = (dwords[i] >> 16) as u16;
            let len = (dwords[i] & 0xffff) as usize;
            let at = i * 4;
            i += 1;
            let remaining = dwords.len() - i;
            if len > remaining {
                return Err(malformed(
                    at,
                    format!("KLV {key:#06x} claims {len} dwords, only {remaining} left"),
                ));
            }
            let value = &dwords[i..i + len];
            i += len;
            match key {
                KLV_KEY_DEVICE_ID | KLV_KEY_REVISION_ID => {
                    let [v] = value else {
                        return Err(malformed(
                            at,
                            format!("KLV {key:#06x} has {len} dwords, expected 1"),
                        ));
                    };
                    let slot_taken = if key == KLV_KEY_DEVICE_ID {
                        let v = u16::try_from(*v).map_err(|_| {
                            malformed(at, format!("device id {v:#x} exceeds 16 bits"))
                        })?;
                        device_id.replace(v).is_some()
                    } else {
                        let v = u8::try_from(*v).map_err(|_| {
                            malformed(at, format!("revision id {v:#x} exceeds 8 bits"))
                        })?;
                        revision_id.replace(v).is_some()
                    };
                    if slot_taken {
                        return Err(malformed(at, format!("KLV {key:#06x} appears twice")));
                    }
                }
                _ => other.push(Klv {
                    key,
                    value: value.to_vec(),
                }),
            }
        }
        let device_id = device_id
            .ok_or_else(|| malformed(payload.len(), "no device id KLV (0xf001)".into()))?;
        let revision_id = revision_id
            .ok_or_else(|| malformed(payload.len(), "no revision id KLV (0xf002)".into()))?;
        Ok(Descriptor {
            device_id,
            revision_id,
            other,
        })
    }

    /// The driver's compatibility check (ENODEV on mismatch).
    pub fn check_identity(&self, expected: ExpectedIdentity) -> Result<(), XeStreamError> {
        if self.device_id != expected.device_id {
            return Err(XeStreamError::DeviceIdMismatch {
                found: self.device_id,
                expected: expected.device_id,
            });
        }
        if self.revision_id != expected.revision_id {
            return Err(XeStreamError::RevisionMismatch {
                found: self.revision_id,
                expected: expected.revision_id,
            });
        }
        Ok(())
    }
}

/// Identity a restoring device requires of the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpectedIdentity {
    pub device_id: u16,
    pub revision_id: u8,
}

/// Optional device-specific checks the parser applies while streaming.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParserLimits {
    /// Reject a descriptor of another device (ENODEV).
    pub identity: Option<ExpectedIdentity>,
    /// LMEM bytes per tile; a VRAM chunk ending beyond it is EINVAL.
    pub lmem_size: Option<u64>,
    /// Number of tiles; a packet naming another tile is EINVAL.
    pub tiles: Option<u8>,
    /// Number of GTs (device-wide ids); a packet naming another is EINVAL.
    pub gts: Option<u8>,
}

/// Receives the parsed stream. Every callback may reject the packet; the
/// error is reported with the packet's index and stream offset.
pub trait XeStreamVisitor {
    /// A complete, checked header; `stream_offset` is where it starts.
    fn on_header(
        &mut self,
        _index: u64,
        _stream_offset: u64,
        _header: &PacketHeader,
    ) -> Result<(), XeStreamError> {
        Ok(())
    }
    /// The descriptor, decoded and identity-checked.
    fn on_descriptor(&mut self, _descriptor: &Descriptor) -> Result<(), XeStreamError> {
        Ok(())
    }
    /// Payload bytes `[offset_in_packet, +data.len())` of the current
    /// packet, in order. The descriptor payload is passed here too.
    fn on_payload(
        &mut self,
        _header: &PacketHeader,
        _offset_in_packet: u64,
        _data: &[u8],
    ) -> Result<(), XeStreamError> {
        Ok(())
    }
    /// The whole payload of the packet has been passed.
    fn on_packet_end(&mut self, _header: &PacketHeader) -> Result<(), XeStreamError> {
        Ok(())
    }
    /// The TRAILER arrived; the stream is complete.
    fn on_trailer(&mut self) -> Result<(), XeStreamError> {
        Ok(())
    }
}

/// A visitor that only lets the parser check the stream.
impl XeStreamVisitor for () {}

/// Packet count and payload bytes of one packet type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TypeStats {
    pub kind: PacketType,
    pub packets: u64,
    pub payload_bytes: u64,
}

/// What a complete, valid stream contained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct XeStreamSummary {
    pub descriptor: Descriptor,
    pub packets: u64,
    /// Stream length in bytes, headers included.
    pub total_bytes: u64,
    pub vram_bytes: u64,
    /// Indexed by `PacketType` order (`PacketType::ALL`).
    pub per_type: [TypeStats; 6],
}

impl XeStreamSummary {
    pub fn stats(&self, kind: PacketType) -> &TypeStats {
        &self.per_type[kind.index()]
    }
}

enum Phase {
    Header { raw: [u8; HEADER_LEN], have: usize },
    Descriptor { header: PacketHeader, buf: Vec<u8> },
    Payload { header: PacketHeader, done: u64 },
    Finished,
    Failed,
}

/// Push parser: feed it any split of the stream; it checks what the
/// driver checks and hands payloads to a visitor without copying them.
pub struct XeStreamParser {
    limits: ParserLimits,
    phase: Phase,
    consumed: u64,
    index: u64,
    packet_start: u64,
    descriptor: Option<Descriptor>,
    per_type: [TypeStats; 6],
}

impl XeStreamParser {
    pub fn new(limits: ParserLimits) -> Self {
        XeStreamParser {
            limits,
            phase: Phase::Header {
                raw: [0; HEADER_LEN],
                have: 0,
            },
            consumed: 0,
            index: 0,
            packet_start: 0,
            descriptor: None,
            per_type: PacketType::ALL.map(|kind| TypeStats {
                kind,
                packets: 0,
                payload_bytes: 0,
            }),
        }
    }

    /// Stream bytes accepted so far.
    pub fn bytes_consumed(&self) -> u64 {
        self.consumed
    }

    /// Whether the TRAILER has been seen.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// Feeds the next bytes of the stream. After an error the parser is
    /// poisoned and rejects further input.
    pub fn feed<V: XeStreamVisitor + ?Sized>(
        &mut self,
        data: &[u8],
        visitor: &mut V,
    ) -> Result<(), XeStreamError> {
        if matches!(self.phase, Phase::Failed) {
            return Err(XeStreamError::Poisoned);
        }
        let result = self.feed_inner(data, visitor);
        if result.is_err() {
            self.phase = Phase::Failed;
        }
        result
    }

    /// Ends the stream: anything but a complete TRAILER-terminated stream
    /// is an error.
    pub fn finish(self) -> Result<XeStreamSummary, XeStreamError> {
        let what = match &self.phase {
            Phase::Finished => {
                let descriptor = self.descriptor.ok_or_else(|| XeStreamError::Truncated {
                    stream_offset: self.consumed,
                    what: "no DESCRIPTOR".into(),
                })?;
                let vram_bytes = self.per_type[PacketType::Vram.index()].payload_bytes;
                return Ok(XeStreamSummary {
                    descriptor,
                    packets: self.index,
                    total_bytes: self.consumed,
                    vram_bytes,
                    per_type: self.per_type,
                });
            }
            Phase::Failed => return Err(XeStreamError::Poisoned),
            Phase::Header { have: 0, .. } => {
                format!("ended after {} packets without a TRAILER", self.index)
            }
            Phase::Header { have, .. } => {
                format!(
                    "inside the header of packet {} ({have} of {HEADER_LEN} bytes)",
                    self.index
                )
            }
            Phase::Descriptor { header, buf } => format!(
                "inside the DESCRIPTOR payload of packet {} ({} of {} bytes)",
                self.index,
                buf.len(),
                header.size
            ),
            Phase::Payload { header, done } => format!(
                "inside the {} payload of packet {} ({done} of {} bytes)",
                header.kind, self.index, header.size
            ),
        };
        Err(XeStreamError::Truncated {
            stream_offset: self.consumed,
            what,
        })
    }

    fn feed_inner<V: XeStreamVisitor + ?Sized>(
        &mut self,
        mut data: &[u8],
        visitor: &mut V,
    ) -> Result<(), XeStreamError> {
        while !data.is_empty() {
            let (index, start) = (self.index, self.packet_start);
            let taken = match &mut self.phase {
                Phase::Finished => {
                    return Err(XeStreamError::DataAfterTrailer {
                        stream_offset: self.consumed,
                    })
                }
                Phase::Failed => return Err(XeStreamError::Poisoned),
                Phase::Header { raw, have } => {
                    let n = (HEADER_LEN - *have).min(data.len());
                    raw[*have..*have + n].copy_from_slice(&data[..n]);
                    *have += n;
                    self.consumed += n as u64;
                    if *have == HEADER_LEN {
                        let raw = *raw;
                        self.on_header(&raw, visitor)
                            .map_err(|e| e.at(index, start))?;
                    }
                    n
                }
                Phase::Descriptor { header, buf } => {
                    let want = header.size as usize - buf.len();
                    let n = want.min(data.len());
                    buf.extend_from_slice(&data[..n]);
                    self.consumed += n as u64;
                    if n == want {
                        let header = *header;
                        let buf = std::mem::take(buf);
                        self.on_descriptor(&header, &buf, visitor)
                            .map_err(|e| e.at(index, start))?;
                    }
                    n
                }
                Phase::Payload { header, done } => {
                    let n = (header.size - *done).min(data.len() as u64) as usize;
                    let header = *header;
                    let offset = *done;
                    *done += n as u64;
                    self.consumed += n as u64;
                    let complete = *done == header.size;
                    visitor
                        .on_payload(&header, offset, &data[..n])
                        .map_err(|e| e.at(index, start))?;
                    if complete {
                        self.end_packet(&header, visitor)
                            .map_err(|e| e.at(index, start))?;
                    }
                    n
                }
            };
            data = &data[taken..];
        }
        Ok(())
    }

    fn on_header<V: XeStreamVisitor + ?Sized>(
        &mut self,
        raw: &[u8; HEADER_LEN],
        visitor: &mut V,
    ) -> Result<(), XeStreamError> {
        let header = PacketHeader::decode(raw)?;
        match (header.kind, self.descriptor.is_some()) {
            (PacketType::Descriptor, true) => return Err(XeStreamError::DuplicateDescriptor),
            (PacketType::Descriptor, false) => {}
            (found, false) => return Err(XeStreamError::DescriptorNotFirst { found }),
            _ => {}
        }
        let end = header
            .offset
            .checked_add(header.size)
            .ok_or(XeStreamError::RangeOverflow {
                offset: header.offset,
                size: header.size,
            })?;
        match header.kind {
            PacketType::Descriptor if header.size > DESCRIPTOR_MAX_LEN => {
                return Err(XeStreamError::DescriptorTooLarge {
                    size: header.size,
                    max: DESCRIPTOR_MAX_LEN,
                })
            }
            PacketType::Trailer if header.size != 0 => {
                return Err(XeStreamError::TrailerNotEmpty { size: header.size })
            }
            // xe_sriov_pf_migration.c: pf_handle_descriptor() and
            // pf_handle_trailer() refuse (EINVAL) any other tile or GT, and
            // a TRAILER with an offset.
            PacketType::Descriptor | PacketType::Trailer
                if header.tile_id != 0 || header.gt_id != 0 =>
            {
                return Err(XeStreamError::Rejected {
                    kind: header.kind,
                    reason: format!(
                        "tile_id {} / gt_id {}: the driver takes it only on tile 0, GT 0",
                        header.tile_id, header.gt_id
                    ),
                    errno: libc::EINVAL,
                });
            }
            PacketType::Trailer if header.offset != 0 => {
                return Err(XeStreamError::Rejected {
                    kind: header.kind,
                    reason: format!("offset {:#x}, the driver requires 0", header.offset),
                    errno: libc::EINVAL,
                });
            }
            PacketType::Descriptor | PacketType::Trailer => {}
            _ => self.check_placement(&header, end)?,
        }
        let stats = &mut self.per_type[header.kind.index()];
        stats.packets += 1;
        // Sizes are untrusted: declared totals past 2^64 can never arrive.
        stats.payload_bytes =
            stats
                .payload_bytes
                .checked_add(header.size)
                .ok_or(XeStreamError::RangeOverflow {
                    offset: stats.payload_bytes,
                    size: header.size,
                })?;
        visitor.on_header(self.index, self.packet_start, &header)?;
        self.phase = match header.kind {
            PacketType::Descriptor => Phase::Descriptor {
                header,
                buf: Vec::with_capacity(header.size as usize),
            },
            _ => Phase::Payload { header, done: 0 },
        };
        if header.size == 0 {
            match header.kind {
                PacketType::Descriptor => self.on_descriptor(&header, &[], visitor)?,
                _ => self.end_packet(&header, visitor)?,
            }
        }
        Ok(())
    }

    /// Tile/GT existence and the LMEM bound, when the limits give them.
    fn check_placement(&self, header: &PacketHeader, end: u64) -> Result<(), XeStreamError> {
        let tiles = self.limits.tiles.unwrap_or(u8::MAX);
        let gts = self.limits.gts.unwrap_or(u8::MAX);
        if (self.limits.tiles.is_some() && header.tile_id >= tiles)
            || (self.limits.gts.is_some() && header.gt_id >= gts)
        {
            return Err(XeStreamError::NoSuchGt {
                tile_id: header.tile_id,
                gt_id: header.gt_id,
                tiles,
                gts,
            });
        }
        if let (PacketType::Vram, Some(lmem_size)) = (header.kind, self.limits.lmem_size) {
            if end > lmem_size {
                return Err(XeStreamError::VramOutOfBounds {
                    tile_id: header.tile_id,
                    offset: header.offset,
                    size: header.size,
                    lmem_size,
                });
            }
        }
        Ok(())
    }

    fn on_descriptor<V: XeStreamVisitor + ?Sized>(
        &mut self,
        header: &PacketHeader,
        payload: &[u8],
        visitor: &mut V,
    ) -> Result<(), XeStreamError> {
        let descriptor = Descriptor::decode(payload)?;
        if let Some(expected) = self.limits.identity {
            descriptor.check_identity(expected)?;
        }
        visitor.on_descriptor(&descriptor)?;
        if !payload.is_empty() {
            visitor.on_payload(header, 0, payload)?;
        }
        self.descriptor = Some(descriptor);
        self.end_packet(header, visitor)
    }

    fn end_packet<V: XeStreamVisitor + ?Sized>(
        &mut self,
        header: &PacketHeader,
        visitor: &mut V,
    ) -> Result<(), XeStreamError> {
        visitor.on_packet_end(header)?;
        self.index += 1;
        self.packet_start = self.consumed;
        if header.kind == PacketType::Trailer {
            visitor.on_trailer()?;
            self.phase = Phase::Finished;
        } else {
            self.phase = Phase::Header {
                raw: [0; HEADER_LEN],
                have: 0,
            };
        }
        Ok(())
    }
}

/// One packet header and where it starts in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PacketRecord {
    pub stream_offset: u64,
    pub header: PacketHeader,
}

/// Result of [`inspect`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Inspection {
    pub summary: XeStreamSummary,
    /// Packet headers in stream order (when asked for).
    pub packets: Vec<PacketRecord>,
    /// More than [`INSPECT_MAX_RECORDS`] packets; the list stops there.
    pub packets_truncated: bool,
}

struct Recorder {
    keep: bool,
    packets: Vec<PacketRecord>,
    truncated: bool,
}

impl XeStreamVisitor for Recorder {
    fn on_header(
        &mut self,
        _index: u64,
        stream_offset: u64,
        header: &PacketHeader,
    ) -> Result<(), XeStreamError> {
        if self.keep {
            if self.packets.len() < INSPECT_MAX_RECORDS {
                self.packets.push(PacketRecord {
                    stream_offset,
                    header: *header,
                });
            } else {
                self.truncated = true;
            }
        }
        Ok(())
    }
}

/// Checks a whole stream from `reader` with bounded memory.
pub fn inspect<R: Read>(reader: R, keep_packets: bool) -> Result<Inspection, XeStreamError> {
    inspect_with_limits(reader, ParserLimits::default(), keep_packets)
}

/// [`inspect`] with device-specific checks.
pub fn inspect_with_limits<R: Read>(
    mut reader: R,
    limits: ParserLimits,
    keep_packets: bool,
) -> Result<Inspection, XeStreamError> {
    let mut parser = XeStreamParser::new(limits);
    let mut recorder = Recorder {
        keep: keep_packets,
        packets: Vec::new(),
        truncated: false,
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(XeStreamError::Io(e)),
        };
        parser.feed(&buf[..n], &mut recorder)?;
    }
    let summary = parser.finish()?;
    Ok(Inspection {
        summary,
        packets: recorder.packets,
        packets_truncated: recorder.truncated,
    })
}

/// Writes one packet header.
pub fn write_packet_header<W: Write + ?Sized>(w: &mut W, header: &PacketHeader) -> io::Result<()> {
    w.write_all(&header.encode())
}

/// Writes a header and its whole payload; the payload must match `size`.
pub fn write_packet<W: Write + ?Sized>(
    w: &mut W,
    header: &PacketHeader,
    payload: &[u8],
) -> io::Result<()> {
    if payload.len() as u64 != header.size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} payload is {} bytes, header says {}",
                header.kind,
                payload.len(),
                header.size
            ),
        ));
    }
    write_packet_header(w, header)?;
    w.write_all(payload)
}

/// The DESCRIPTOR packet for `descriptor`: header and payload.
pub fn descriptor_packet(
    descriptor: &Descriptor,
) -> Result<(PacketHeader, Vec<u8>), XeStreamError> {
    let payload = descriptor.encode()?;
    let header = PacketHeader::new(PacketType::Descriptor, 0, 0, 0, payload.len() as u64);
    Ok((header, payload))
}

/// The empty TRAILER header that ends every stream.
pub const fn trailer_header() -> PacketHeader {
    PacketHeader::new(PacketType::Trailer, 0, 0, 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic pseudo-random numbers for the tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    const DEVID: u16 = 0xe20b;
    const REVID: u8 = 3;

    fn packet(out: &mut Vec<u8>, header: PacketHeader, fill: u8) {
        write_packet_header(out, &header).unwrap();
        out.extend((0..header.size).map(|i| fill.wrapping_add(i as u8)));
    }

    /// A valid stream: descriptor, 2 GTs (GuC, GGTT, MMIO), 3 VRAM chunks of tile 0, trailer.
    fn sample_stream() -> Vec<u8> {
        let mut out = Vec::new();
        let (hdr, payload) = descriptor_packet(&Descriptor::new(DEVID, REVID)).unwrap();
        write_packet(&mut out, &hdr, &payload).unwrap();
        for gt in 0..2u8 {
            packet(
                &mut out,
                PacketHeader::new(PacketType::Guc, 0, gt, 0, 40),
                1,
            );
            packet(
                &mut out,
                PacketHeader::new(PacketType::Ggtt, 0, gt, 0, 64),
                2,
            );
            packet(
                &mut out,
                PacketHeader::new(PacketType::Mmio, 0, gt, 0, 0),
                3,
            );
            if gt == 0 {
                for chunk in 0..3u64 {
                    packet(
                        &mut out,
                        PacketHeader::new(PacketType::Vram, 0, 0, chunk * 100, 100),
                        4,
                    );
                }
            }
        }
        write_packet_header(&mut out, &trailer_header()).unwrap();
        out
    }

    #[derive(Debug, PartialEq, Default)]
    struct Events {
        log: Vec<String>,
        payloads: Vec<Vec<u8>>,
    }

    impl XeStreamVisitor for Events {
        fn on_header(
            &mut self,
            index: u64,
            at: u64,
            h: &PacketHeader,
        ) -> Result<(), XeStreamError> {
            self.log.push(format!("hdr {index}@{at} {h:?}"));
            self.payloads.push(Vec::new());
            Ok(())
        }
        fn on_descriptor(&mut self, d: &Descriptor) -> Result<(), XeStreamError> {
            self.log.push(format!("desc {d:?}"));
            Ok(())
        }
        fn on_payload(
            &mut self,
            _h: &PacketHeader,
            off: u64,
            data: &[u8],
        ) -> Result<(), XeStreamError> {
            let cur = self.payloads.last_mut().unwrap();
            assert_eq!(cur.len() as u64, off, "payload slices arrive in order");
            cur.extend_from_slice(data);
            Ok(())
        }
        fn on_packet_end(&mut self, h: &PacketHeader) -> Result<(), XeStreamError> {
            self.log.push(format!("end {}", h.kind));
            Ok(())
        }
        fn on_trailer(&mut self) -> Result<(), XeStreamError> {
            self.log.push("trailer".into());
            Ok(())
        }
    }

    fn parse_split(
        stream: &[u8],
        limits: ParserLimits,
        splits: &mut dyn FnMut() -> usize,
    ) -> (Events, Result<XeStreamSummary, XeStreamError>) {
        let mut parser = XeStreamParser::new(limits);
        let mut events = Events::default();
        let mut rest = stream;
        while !rest.is_empty() {
            let n = splits().clamp(1, rest.len());
            if let Err(e) = parser.feed(&rest[..n], &mut events) {
                return (events, Err(e));
            }
            rest = &rest[n..];
        }
        (events, parser.finish())
    }

    fn parse(stream: &[u8], limits: ParserLimits) -> Result<XeStreamSummary, XeStreamError> {
        parse_split(stream, limits, &mut || usize::MAX).1
    }

    fn device_limits() -> ParserLimits {
        ParserLimits {
            identity: Some(ExpectedIdentity {
                device_id: DEVID,
                revision_id: REVID,
            }),
            lmem_size: Some(300),
            tiles: Some(1),
            gts: Some(2),
        }
    }

    #[test]
    fn header_layout_is_packed_little_endian() {
        let h = PacketHeader {
            version: 1,
            kind: PacketType::Vram,
            tile_id: 2,
            gt_id: 3,
            flags: 0x0403_0201,
            offset: 0x1122_3344_5566_7788,
            size: 0x99aa_bbcc_ddee_ff00,
        };
        let raw = h.encode();
        assert_eq!(
            raw,
            [
                1, 6, 2, 3, 0x01, 0x02, 0x03, 0x04, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,
                0x00, 0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa, 0x99
            ]
        );
        assert_eq!(PacketHeader::decode(&raw).unwrap(), h);
        for kind in PacketType::ALL {
            let h = PacketHeader::new(kind, 1, 1, 7, 9);
            assert_eq!(PacketHeader::decode(&h.encode()).unwrap(), h);
            assert_eq!(PacketType::from_raw(kind.raw()), Some(kind));
        }
        assert_eq!(PacketType::from_raw(0), None);
        assert_eq!(PacketType::from_raw(7), None);
    }

    #[test]
    fn header_decode_rejects_version_and_type() {
        let mut raw = PacketHeader::new(PacketType::Ggtt, 0, 0, 0, 0).encode();
        raw[0] = 2;
        let e = PacketHeader::decode(&raw).unwrap_err();
        assert!(
            matches!(e, XeStreamError::UnsupportedVersion { found: 2 }),
            "{e}"
        );
        assert_eq!(e.errno(), libc::EINVAL);
        raw[0] = 1;
        raw[1] = 0;
        let e = PacketHeader::decode(&raw).unwrap_err();
        assert!(matches!(e, XeStreamError::UnknownType { raw: 0 }), "{e}");
        assert_eq!(e.errno(), libc::EINVAL);
    }

    #[test]
    fn descriptor_klv_round_trip_and_layout() {
        let mut d = Descriptor::new(0xe20b, 0x2a);
        let raw = d.encode().unwrap();
        assert_eq!(
            raw,
            [0x01, 0, 0x01, 0xf0, 0x0b, 0xe2, 0, 0, 0x01, 0, 0x02, 0xf0, 0x2a, 0, 0, 0]
        );
        assert_eq!(Descriptor::decode(&raw).unwrap(), d);
        d.other.push(Klv {
            key: 0x1234,
            value: vec![7, 8, 9],
        });
        d.other.push(Klv {
            key: 0x9,
            value: vec![],
        });
        let raw = d.encode().unwrap();
        assert_eq!(raw.len() as u64, d.encoded_len());
        assert_eq!(Descriptor::decode(&raw).unwrap(), d);
    }

    #[test]
    fn descriptor_rejects_malformed_klvs() {
        let klv = |key: u32, len: u32, vals: &[u32]| {
            let mut v = ((key << 16) | len).to_le_bytes().to_vec();
            for x in vals {
                v.extend_from_slice(&x.to_le_bytes());
            }
            v
        };
        let good = [klv(0xf001, 1, &[0xe20b]), klv(0xf002, 1, &[1])].concat();
        assert!(Descriptor::decode(&good).is_ok());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("not dwords", [good.clone(), vec![0]].concat()),
            (
                "len beyond end",
                [good.clone(), klv(0x55, 3, &[1])].concat(),
            ),
            (
                "devid two dwords",
                [klv(0xf001, 2, &[1, 2]), klv(0xf002, 1, &[1])].concat(),
            ),
            (
                "devid too wide",
                [klv(0xf001, 1, &[0x1_0000]), klv(0xf002, 1, &[1])].concat(),
            ),
            (
                "revid too wide",
                [klv(0xf001, 1, &[1]), klv(0xf002, 1, &[0x100])].concat(),
            ),
            (
                "duplicate devid",
                [good.clone(), klv(0xf001, 1, &[1])].concat(),
            ),
            ("missing revid", klv(0xf001, 1, &[1])),
            ("missing devid", klv(0xf002, 1, &[1])),
            ("empty", Vec::new()),
            ("too large", vec![0; DESCRIPTOR_MAX_LEN as usize + 4]),
        ];
        for (what, raw) in cases {
            let e = Descriptor::decode(&raw).expect_err(what);
            assert_eq!(e.errno(), libc::EINVAL, "{what}: {e}");
        }
    }

    /// Found by fuzzing: declared sizes summing past 2^64 panicked in the
    /// per-type counters before any payload arrived.
    #[test]
    fn declared_sizes_past_u64_are_an_error_not_an_overflow() {
        let mut stream = Vec::new();
        let (hdr, payload) = descriptor_packet(&Descriptor::new(DEVID, REVID)).unwrap();
        write_packet(&mut stream, &hdr, &payload).unwrap();
        let ggtt = PacketHeader::new(PacketType::Ggtt, 0, 0, 0, 8);
        write_packet(&mut stream, &ggtt, &[0; 8]).unwrap();
        let huge = PacketHeader::new(PacketType::Ggtt, 0, 0, 0, u64::MAX);
        write_packet_header(&mut stream, &huge).unwrap();
        let err = parse(&stream, ParserLimits::default()).unwrap_err();
        assert!(
            matches!(err.root(), XeStreamError::RangeOverflow { .. }),
            "{err}"
        );
    }

    #[test]
    fn valid_stream_summary() {
        let stream = sample_stream();
        let s = parse(&stream, device_limits()).unwrap();
        assert_eq!(s.descriptor, Descriptor::new(DEVID, REVID));
        assert_eq!(s.total_bytes, stream.len() as u64);
        assert_eq!(s.packets, 1 + 6 + 3 + 1);
        assert_eq!(s.vram_bytes, 300);
        assert_eq!(s.stats(PacketType::Guc).packets, 2);
        assert_eq!(s.stats(PacketType::Ggtt).payload_bytes, 128);
        assert_eq!(s.stats(PacketType::Mmio).payload_bytes, 0);
        assert_eq!(s.stats(PacketType::Trailer).packets, 1);
        let sum: u64 = s.per_type.iter().map(|t| t.packets).sum();
        assert_eq!(sum, s.packets);
    }

    #[test]
    fn byte_by_byte_and_random_splits_agree() {
        let stream = sample_stream();
        let (whole_ev, whole) = parse_split(&stream, device_limits(), &mut || usize::MAX);
        let whole = whole.unwrap();
        let (ev, res) = parse_split(&stream, device_limits(), &mut || 1);
        assert_eq!(res.unwrap(), whole);
        assert_eq!(ev, whole_ev);
        let mut rng = Rng(0x1234_5678);
        for _ in 0..50 {
            let (ev, res) =
                parse_split(&stream, device_limits(), &mut || 1 + rng.below(60) as usize);
            assert_eq!(res.unwrap(), whole);
            assert_eq!(ev, whole_ev);
        }
        // Payloads pass through unchanged.
        assert_eq!(
            whole_ev.payloads[1],
            (0..40u8).map(|i| 1 + i).collect::<Vec<_>>()
        );
    }

    #[test]
    fn truncated_at_every_position_fails() {
        let stream = sample_stream();
        for cut in 0..stream.len() {
            let e = parse(&stream[..cut], device_limits()).unwrap_err();
            assert!(
                matches!(e.root(), XeStreamError::Truncated { .. }),
                "cut {cut}: {e}"
            );
            assert_eq!(e.errno(), libc::EINVAL);
        }
    }

    fn patched(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut s = sample_stream();
        f(&mut s);
        s
    }

    fn hdr(kind: PacketType, size: u64) -> Vec<u8> {
        PacketHeader::new(kind, 0, 0, 0, size).encode().to_vec()
    }

    /// (what, stream, expected root error, expected errno)
    type RejectionCase = (&'static str, Vec<u8>, fn(&XeStreamError) -> bool, i32);

    #[test]
    fn every_rejection_has_its_errno() {
        let desc_len = HEADER_LEN + Descriptor::new(DEVID, REVID).encoded_len() as usize;
        let other = |d: u16, r: u8| {
            let (h, p) = descriptor_packet(&Descriptor::new(d, r)).unwrap();
            let mut s = Vec::new();
            write_packet(&mut s, &h, &p).unwrap();
            s.extend_from_slice(&sample_stream()[desc_len..]);
            s
        };
        let cases: Vec<RejectionCase> = vec![
            (
                "version",
                patched(|s| s[desc_len] = 2),
                |e| matches!(e, XeStreamError::UnsupportedVersion { found: 2 }),
                libc::EINVAL,
            ),
            (
                "type",
                patched(|s| s[desc_len + 1] = 9),
                |e| matches!(e, XeStreamError::UnknownType { raw: 9 }),
                libc::EINVAL,
            ),
            (
                "devid",
                other(0x1234, REVID),
                |e| matches!(e, XeStreamError::DeviceIdMismatch { found: 0x1234, .. }),
                libc::ENODEV,
            ),
            (
                "revid",
                other(DEVID, REVID + 1),
                |e| matches!(e, XeStreamError::RevisionMismatch { .. }),
                libc::ENODEV,
            ),
            (
                "descriptor not first",
                patched(|s| {
                    s.drain(..desc_len);
                }),
                |e| {
                    matches!(
                        e,
                        XeStreamError::DescriptorNotFirst {
                            found: PacketType::Guc
                        }
                    )
                },
                libc::EINVAL,
            ),
            (
                "two descriptors",
                patched(|s| {
                    let d = s[..desc_len].to_vec();
                    s.splice(desc_len..desc_len, d);
                }),
                |e| matches!(e, XeStreamError::DuplicateDescriptor),
                libc::EINVAL,
            ),
            (
                "trailer with payload",
                patched(|s| {
                    let n = s.len();
                    s.truncate(n - HEADER_LEN);
                    s.extend(hdr(PacketType::Trailer, 1));
                    s.push(0);
                }),
                |e| matches!(e, XeStreamError::TrailerNotEmpty { size: 1 }),
                libc::EINVAL,
            ),
            (
                "trailer on another GT",
                patched(|s| {
                    let n = s.len();
                    s.truncate(n - HEADER_LEN);
                    s.extend(PacketHeader::new(PacketType::Trailer, 0, 1, 0, 0).encode());
                }),
                |e| {
                    matches!(
                        e,
                        XeStreamError::Rejected {
                            kind: PacketType::Trailer,
                            ..
                        }
                    )
                },
                libc::EINVAL,
            ),
            (
                "trailer with an offset",
                patched(|s| {
                    let n = s.len();
                    s.truncate(n - HEADER_LEN);
                    s.extend(PacketHeader::new(PacketType::Trailer, 0, 0, 8, 0).encode());
                }),
                |e| {
                    matches!(
                        e,
                        XeStreamError::Rejected {
                            kind: PacketType::Trailer,
                            ..
                        }
                    )
                },
                libc::EINVAL,
            ),
            (
                "descriptor on another tile",
                patched(|s| s[2] = 1),
                |e| {
                    matches!(
                        e,
                        XeStreamError::Rejected {
                            kind: PacketType::Descriptor,
                            ..
                        }
                    )
                },
                libc::EINVAL,
            ),
            (
                "data after trailer",
                patched(|s| s.push(0)),
                |e| matches!(e, XeStreamError::DataAfterTrailer { .. }),
                libc::EINVAL,
            ),
            (
                "offset overflow",
                patched(|s| {
                    s.truncate(desc_len);
                    let mut h = PacketHeader::new(PacketType::Vram, 0, 0, u64::MAX, 1);
                    h.flags = 0;
                    s.extend(h.encode());
                }),
                |e| matches!(e, XeStreamError::RangeOverflow { .. }),
                libc::EINVAL,
            ),
            (
                "vram beyond lmem",
                patched(|s| {
                    s.truncate(desc_len);
                    s.extend(PacketHeader::new(PacketType::Vram, 0, 0, 250, 100).encode());
                }),
                |e| matches!(e, XeStreamError::VramOutOfBounds { lmem_size: 300, .. }),
                libc::EINVAL,
            ),
            (
                "no such gt",
                patched(|s| {
                    s.truncate(desc_len);
                    s.extend(PacketHeader::new(PacketType::Guc, 0, 2, 0, 0).encode());
                }),
                |e| matches!(e, XeStreamError::NoSuchGt { gt_id: 2, .. }),
                libc::EINVAL,
            ),
            (
                "no such tile",
                patched(|s| {
                    s.truncate(desc_len);
                    s.extend(PacketHeader::new(PacketType::Guc, 1, 0, 0, 0).encode());
                }),
                |e| matches!(e, XeStreamError::NoSuchGt { tile_id: 1, .. }),
                libc::EINVAL,
            ),
            (
                "huge descriptor",
                [hdr(PacketType::Descriptor, 1 << 40), vec![0; 64]].concat(),
                |e| matches!(e, XeStreamError::DescriptorTooLarge { .. }),
                libc::EINVAL,
            ),
            (
                "bad klv",
                [
                    hdr(PacketType::Descriptor, 4),
                    0xf001_0005u32.to_le_bytes().to_vec(),
                ]
                .concat(),
                |e| matches!(e, XeStreamError::MalformedDescriptor { .. }),
                libc::EINVAL,
            ),
        ];
        for (what, stream, check, errno) in cases {
            let e = parse(&stream, device_limits()).expect_err(what);
            assert!(check(e.root()), "{what}: unexpected {e}");
            assert_eq!(e.errno(), errno, "{what}: {e}");
        }
    }

    #[test]
    fn errors_name_packet_and_offset() {
        let desc_len = HEADER_LEN + Descriptor::new(DEVID, REVID).encoded_len() as usize;
        let s = patched(|s| s[desc_len] = 7);
        let e = parse(&s, device_limits()).unwrap_err();
        let XeStreamError::AtPacket {
            index,
            stream_offset,
            ..
        } = &e
        else {
            panic!("not positioned: {e}");
        };
        assert_eq!((*index, *stream_offset), (1, desc_len as u64));
        let msg = e.to_string();
        assert!(
            msg.contains("packet 1") && msg.contains("version 7"),
            "{msg}"
        );
    }

    #[test]
    fn parser_is_poisoned_after_error() {
        let mut p = XeStreamParser::new(ParserLimits::default());
        assert!(p.feed(&[9; HEADER_LEN], &mut ()).is_err());
        assert!(matches!(
            p.feed(&[1], &mut ()),
            Err(XeStreamError::Poisoned)
        ));
        assert!(matches!(p.finish(), Err(XeStreamError::Poisoned)));
    }

    #[test]
    fn visitor_rejection_stops_the_stream() {
        struct RejectVram;
        impl XeStreamVisitor for RejectVram {
            fn on_header(&mut self, _: u64, _: u64, h: &PacketHeader) -> Result<(), XeStreamError> {
                if h.kind == PacketType::Vram {
                    return Err(XeStreamError::Rejected {
                        kind: h.kind,
                        reason: "no".into(),
                        errno: libc::EIO,
                    });
                }
                Ok(())
            }
        }
        let mut p = XeStreamParser::new(ParserLimits::default());
        let e = p.feed(&sample_stream(), &mut RejectVram).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert!(matches!(e, XeStreamError::AtPacket { index: 4, .. }), "{e}");
    }

    #[test]
    fn inspect_lists_packets_with_offsets() {
        let stream = sample_stream();
        let ins = inspect(&stream[..], true).unwrap();
        assert_eq!(ins.packets.len() as u64, ins.summary.packets);
        assert!(!ins.packets_truncated);
        assert_eq!(ins.packets[0].stream_offset, 0);
        assert_eq!(ins.packets[0].header.kind, PacketType::Descriptor);
        let mut at = 0;
        for rec in &ins.packets {
            assert_eq!(rec.stream_offset, at);
            at += rec.header.wire_len().unwrap();
        }
        assert_eq!(at, stream.len() as u64);
        assert_eq!(ins.packets.last().unwrap().header.kind, PacketType::Trailer);
        assert!(inspect(&stream[..], false).unwrap().packets.is_empty());
        let e = inspect(&stream[..stream.len() - 1], false).unwrap_err();
        assert!(matches!(e.root(), XeStreamError::Truncated { .. }));
    }

    #[test]
    fn write_packet_checks_payload_size() {
        let mut out = Vec::new();
        let h = PacketHeader::new(PacketType::Ggtt, 0, 0, 0, 3);
        assert!(write_packet(&mut out, &h, &[1, 2]).is_err());
        write_packet(&mut out, &h, &[1, 2, 3]).unwrap();
        assert_eq!(out.len(), HEADER_LEN + 3);
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = Rng(0xdead_beef);
        let base = sample_stream();
        for round in 0..2000 {
            let mut data = if round % 2 == 0 {
                (0..rng.below(300))
                    .map(|_| rng.next() as u8)
                    .collect::<Vec<_>>()
            } else {
                let mut s = base.clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(s.len() as u64) as usize;
                    s[i] = rng.next() as u8;
                }
                s
            };
            if round % 3 == 0 {
                // Garbage that starts with a plausible header.
                data.splice(0..0, hdr(PacketType::Descriptor, rng.below(5000)));
            }
            let (_, res) = parse_split(&data, device_limits(), &mut || 1 + rng.below(50) as usize);
            if let Err(e) = res {
                assert!(
                    e.errno() == libc::EINVAL || e.errno() == libc::ENODEV,
                    "{e}"
                );
            }
        }
    }
}
