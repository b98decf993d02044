// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Cloud Hypervisor's live-migration wire protocol, plus one additive
//! command for streamed device state.
//!
//! The framing, command and status values, connection roles and the
//! memory-range table follow CH's `vm-migration/src/protocol.rs`, so a
//! peer speaking that protocol interoperates with us byte for byte:
//!
//! * every request and response is a 16-byte little-endian header:
//!   `Request { command: u16, command_headers: [u8; 6], length: u64 }`,
//!   `Response { status: u16, padding: [u8; 6], length: u64 }`; `length`
//!   counts the payload bytes that follow the header;
//! * `Start` carries the sender's protocol version in
//!   `command_headers[0..2]`; the receiver accepts the current and the
//!   previous version;
//! * a `Memory` payload is a [`MemoryRangeTable`] (`{gpa, length}` pairs,
//!   16 bytes each) followed by the bytes of those ranges;
//! * an extra connection first announces its [`ConnectionRole`] as a u16.
//!
//! Our extension is [`Command::DeviceState`] (and
//! [`ConnectionRole::DeviceState`]): a device's state travels as a stream
//! of bounded records instead of one JSON blob inside `State`. Adding a
//! command and a role is an additive change, which by CH's rules does not
//! bump [`CURRENT_PROTOCOL_VERSION`]; a CH peer that does not know the
//! command answers with an error response and the migration aborts
//! cleanly.
//!
//! Everything read from the wire is treated as hostile: unknown values
//! are errors naming the value, lengths are bounded before anything is
//! allocated, and no input makes the parser panic.

use std::fmt;
use std::io::{self, Read, Write};
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::MigratableError;

/// Newest protocol version this implementation sends.
pub const CURRENT_PROTOCOL_VERSION: u16 = 0;

/// Bytes of a [`Request`] or [`Response`] header on the wire.
pub const HEADER_LEN: usize = 16;

/// Bytes of one [`MemoryRange`] on the wire.
pub const MEMORY_RANGE_LEN: usize = 16;

/// Most ranges one [`MemoryRangeTable`] may carry on the wire (16 MiB of
/// table). Dirty bitmaps coalesce into far fewer ranges; the bound only
/// keeps a hostile `length` from reserving memory.
pub const MAX_TABLE_RANGES: u64 = 1 << 20;

/// `length` of a [`Command::DeviceState`] request whose stream ends with
/// its own END record instead of after a known byte count.
pub const DEVICE_STATE_SELF_DELIMITED: u64 = u64::MAX;

/// Versions a receiver accepts: the current one and its predecessor.
pub fn supported_protocol_versions() -> RangeInclusive<u16> {
    CURRENT_PROTOCOL_VERSION.saturating_sub(1)..=CURRENT_PROTOCOL_VERSION
}

/// Why a message could not be read, written or accepted.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("migration socket error: {0}")]
    Io(#[from] io::Error),
    #[error("unknown migration command {0:#x}")]
    UnknownCommand(u16),
    #[error("unknown migration response status {0:#x}")]
    UnknownStatus(u16),
    #[error("unknown migration connection role {0:#x}")]
    UnknownConnectionRole(u16),
    #[error("{0:?} request carries no protocol version")]
    NotStart(Command),
    #[error(
        "migration protocol version {version} of the sender is not supported \
         (supported: {}..={})",
        supported.start(),
        supported.end()
    )]
    UnsupportedVersion {
        version: u16,
        supported: RangeInclusive<u16>,
    },
    #[error("memory range table length {0} is not a multiple of {MEMORY_RANGE_LEN}")]
    TableLengthMisaligned(u64),
    #[error("memory range table of {length} bytes exceeds the limit of {max} bytes")]
    TableTooLarge { length: u64, max: u64 },
    #[error("memory range {gpa:#x}+{length:#x} wraps past the end of the address space")]
    RangeOverflow { gpa: u64, length: u64 },
}

impl From<ProtocolError> for MigratableError {
    /// Socket failures stay socket errors; everything else is a malformed
    /// or refused message from the peer.
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Io(io) => MigratableError::MigrateSocket(io),
            other => MigratableError::MigrateReceive(other.into()),
        }
    }
}

/// Commands of the protocol (CH's values; `DeviceState` is ours).
#[repr(u16)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Command {
    /// The zero value; a zeroed header means nothing.
    #[default]
    Invalid = 0,
    Start = 1,
    Config = 2,
    State = 3,
    Memory = 4,
    /// Finish and resume the VM on the destination.
    Complete = 5,
    Abandon = 6,
    MemoryFd = 7,
    /// Finish but leave the destination VM paused (source was paused).
    CompletePaused = 8,
    /// Ask for one page (post-copy); payload is one [`MemoryRange`].
    PageFault = 9,
    /// Our extension: the streamed state of one device. The device index
    /// is in `command_headers[0..2]`; `length` is the stream's byte length
    /// or [`DEVICE_STATE_SELF_DELIMITED`].
    DeviceState = 0x100,
    /// Our extension (feature `DIGEST_VERIFY`): the digest function and
    /// per-migration key the destination hashes arriving pages with; sent
    /// after Config, before the first Memory. Payload:
    /// `xe_vf_glue::verify::wire::VerifySetup`.
    VerifySetup = 0x101,
    /// Our extension (feature `DIGEST_VERIFY`): digests of pages the
    /// source did not resend in the final pass. Payload:
    /// `xe_vf_glue::verify::wire::DigestBatch`; the Ok answering it
    /// carries the pages whose digests differ (its `length` bytes).
    Digests = 0x102,
}

impl TryFrom<u16> for Command {
    type Error = ProtocolError;

    fn try_from(value: u16) -> Result<Self, ProtocolError> {
        Ok(match value {
            0 => Command::Invalid,
            1 => Command::Start,
            2 => Command::Config,
            3 => Command::State,
            4 => Command::Memory,
            5 => Command::Complete,
            6 => Command::Abandon,
            7 => Command::MemoryFd,
            8 => Command::CompletePaused,
            9 => Command::PageFault,
            0x100 => Command::DeviceState,
            0x101 => Command::VerifySetup,
            0x102 => Command::Digests,
            other => return Err(ProtocolError::UnknownCommand(other)),
        })
    }
}

/// Role an additional connection announces (a LE u16) before anything else.
#[repr(u16)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ConnectionRole {
    #[default]
    Invalid = 0,
    /// Carries pre-copy memory chunks.
    PrecopyMemory = 1,
    /// Carries page-fault requests.
    Fault = 2,
    /// Our extension: carries [`Command::DeviceState`] streams so device
    /// data does not queue behind memory on the main connection.
    DeviceState = 0x100,
}

impl TryFrom<u16> for ConnectionRole {
    type Error = ProtocolError;

    fn try_from(value: u16) -> Result<Self, ProtocolError> {
        Ok(match value {
            0 => ConnectionRole::Invalid,
            1 => ConnectionRole::PrecopyMemory,
            2 => ConnectionRole::Fault,
            0x100 => ConnectionRole::DeviceState,
            other => return Err(ProtocolError::UnknownConnectionRole(other)),
        })
    }
}

impl ConnectionRole {
    pub fn write_to<W: Write + ?Sized>(self, fd: &mut W) -> Result<(), ProtocolError> {
        fd.write_all(&(self as u16).to_le_bytes())?;
        Ok(())
    }

    pub fn read_from<R: Read + ?Sized>(fd: &mut R) -> Result<ConnectionRole, ProtocolError> {
        let mut buf = [0u8; 2];
        fd.read_exact(&mut buf)?;
        ConnectionRole::try_from(u16::from_le_bytes(buf))
    }
}

fn read_header<R: Read + ?Sized>(fd: &mut R) -> Result<(u16, [u8; 6], u64), ProtocolError> {
    let mut buf = [0u8; HEADER_LEN];
    fd.read_exact(&mut buf)?;
    Ok(split_header(&buf))
}

fn split_header(buf: &[u8; HEADER_LEN]) -> (u16, [u8; 6], u64) {
    let [c0, c1, h0, h1, h2, h3, h4, h5, l0, l1, l2, l3, l4, l5, l6, l7] = *buf;
    (
        u16::from_le_bytes([c0, c1]),
        [h0, h1, h2, h3, h4, h5],
        u64::from_le_bytes([l0, l1, l2, l3, l4, l5, l6, l7]),
    )
}

fn join_header(word: u16, middle: [u8; 6], length: u64) -> [u8; HEADER_LEN] {
    let mut buf = [0u8; HEADER_LEN];
    buf[0..2].copy_from_slice(&word.to_le_bytes());
    buf[2..8].copy_from_slice(&middle);
    buf[8..16].copy_from_slice(&length.to_le_bytes());
    buf
}

/// A request header, sent by the migration source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    command: Command,
    command_headers: [u8; 6],
    /// Payload bytes following this header.
    length: u64,
}

impl Request {
    pub fn new(command: Command, length: u64) -> Self {
        Request {
            command,
            command_headers: [0; 6],
            length,
        }
    }

    /// `Start`, announcing [`CURRENT_PROTOCOL_VERSION`].
    pub fn start() -> Self {
        let mut command_headers = [0u8; 6];
        command_headers[0..2].copy_from_slice(&CURRENT_PROTOCOL_VERSION.to_le_bytes());
        Request {
            command: Command::Start,
            command_headers,
            length: 0,
        }
    }

    pub fn state(length: u64) -> Self {
        Self::new(Command::State, length)
    }

    pub fn config(length: u64) -> Self {
        Self::new(Command::Config, length)
    }

    pub fn memory(length: u64) -> Self {
        Self::new(Command::Memory, length)
    }

    pub fn memory_fd(length: u64) -> Self {
        Self::new(Command::MemoryFd, length)
    }

    pub fn complete() -> Self {
        Self::new(Command::Complete, 0)
    }

    pub fn complete_paused() -> Self {
        Self::new(Command::CompletePaused, 0)
    }

    pub fn abandon() -> Self {
        Self::new(Command::Abandon, 0)
    }

    /// Always followed by exactly one [`MemoryRange`].
    pub fn page_fault() -> Self {
        Self::new(Command::PageFault, MEMORY_RANGE_LEN as u64)
    }

    /// The state stream of device `index`; `length` is its byte count or
    /// [`DEVICE_STATE_SELF_DELIMITED`].
    pub fn device_state(index: u16, length: u64) -> Self {
        let mut command_headers = [0u8; 6];
        command_headers[0..2].copy_from_slice(&index.to_le_bytes());
        Request {
            command: Command::DeviceState,
            command_headers,
            length,
        }
    }

    pub fn command(&self) -> Command {
        self.command
    }

    pub fn length(&self) -> u64 {
        self.length
    }

    pub fn command_headers(&self) -> &[u8; 6] {
        &self.command_headers
    }

    /// The sender's version from a `Start` request, if this side supports
    /// it. Bytes after the version are ignored, as upstream does.
    pub fn sender_protocol_version(&self) -> Result<u16, ProtocolError> {
        if self.command != Command::Start {
            return Err(ProtocolError::NotStart(self.command));
        }
        let version = u16::from_le_bytes([self.command_headers[0], self.command_headers[1]]);
        if !supported_protocol_versions().contains(&version) {
            return Err(ProtocolError::UnsupportedVersion {
                version,
                supported: supported_protocol_versions(),
            });
        }
        Ok(version)
    }

    /// Device index of a [`Command::DeviceState`] request.
    pub fn device_index(&self) -> Option<u16> {
        (self.command == Command::DeviceState)
            .then(|| u16::from_le_bytes([self.command_headers[0], self.command_headers[1]]))
    }

    /// Whether a [`Command::DeviceState`] stream is ended by its own END
    /// record rather than by `length`.
    pub fn is_self_delimited(&self) -> bool {
        self.command == Command::DeviceState && self.length == DEVICE_STATE_SELF_DELIMITED
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        join_header(self.command as u16, self.command_headers, self.length)
    }

    pub fn from_bytes(buf: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let (command, command_headers, length) = split_header(buf);
        Ok(Request {
            command: Command::try_from(command)?,
            command_headers,
            length,
        })
    }

    pub fn read_from<R: Read + ?Sized>(fd: &mut R) -> Result<Request, ProtocolError> {
        let (command, command_headers, length) = read_header(fd)?;
        Ok(Request {
            command: Command::try_from(command)?,
            command_headers,
            length,
        })
    }

    pub fn write_to<W: Write + ?Sized>(&self, fd: &mut W) -> Result<(), ProtocolError> {
        fd.write_all(&self.to_bytes())?;
        Ok(())
    }
}

/// Status of a [`Response`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Status {
    #[default]
    Invalid = 0,
    Ok = 1,
    Error = 2,
}

impl TryFrom<u16> for Status {
    type Error = ProtocolError;

    fn try_from(value: u16) -> Result<Self, ProtocolError> {
        Ok(match value {
            0 => Status::Invalid,
            1 => Status::Ok,
            2 => Status::Error,
            other => return Err(ProtocolError::UnknownStatus(other)),
        })
    }
}

/// A response header, sent by the migration destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Response {
    status: Status,
    padding: [u8; 6],
    /// Payload bytes following this header.
    length: u64,
}

impl Response {
    pub fn new(status: Status, length: u64) -> Self {
        Response {
            status,
            padding: [0; 6],
            length,
        }
    }

    pub fn ok() -> Self {
        Self::new(Status::Ok, 0)
    }

    pub fn error() -> Self {
        Self::new(Status::Error, 0)
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn length(&self) -> u64 {
        self.length
    }

    /// `self` if the peer said Ok; otherwise `sender_error`, which names
    /// what the sender was doing (the peer's reason never reaches us).
    pub fn ok_or_fatal_error(
        self,
        sender_error: MigratableError,
    ) -> Result<Response, MigratableError> {
        if self.status != Status::Ok {
            log::error!("migration receiver answered {:?}: aborting", self.status);
            return Err(sender_error);
        }
        Ok(self)
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        join_header(self.status as u16, self.padding, self.length)
    }

    pub fn from_bytes(buf: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let (status, padding, length) = split_header(buf);
        Ok(Response {
            status: Status::try_from(status)?,
            padding,
            length,
        })
    }

    pub fn read_from<R: Read + ?Sized>(fd: &mut R) -> Result<Response, ProtocolError> {
        let (status, padding, length) = read_header(fd)?;
        Ok(Response {
            status: Status::try_from(status)?,
            padding,
            length,
        })
    }

    pub fn write_to<W: Write + ?Sized>(&self, fd: &mut W) -> Result<(), ProtocolError> {
        fd.write_all(&self.to_bytes())?;
        Ok(())
    }
}

/// A guest-physical range: `length` bytes starting at `gpa`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemoryRange {
    pub gpa: u64,
    pub length: u64,
}

impl MemoryRange {
    /// One past the last byte, or `None` if the range wraps.
    pub fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.length)
    }

    fn checked(self) -> Result<Self, ProtocolError> {
        match self.end() {
            Some(_) => Ok(self),
            None => Err(ProtocolError::RangeOverflow {
                gpa: self.gpa,
                length: self.length,
            }),
        }
    }

    pub fn to_bytes(&self) -> [u8; MEMORY_RANGE_LEN] {
        let mut buf = [0u8; MEMORY_RANGE_LEN];
        buf[0..8].copy_from_slice(&self.gpa.to_le_bytes());
        buf[8..16].copy_from_slice(&self.length.to_le_bytes());
        buf
    }

    /// Decodes and rejects a range whose end wraps.
    pub fn from_bytes(buf: &[u8; MEMORY_RANGE_LEN]) -> Result<Self, ProtocolError> {
        let [g0, g1, g2, g3, g4, g5, g6, g7, l0, l1, l2, l3, l4, l5, l6, l7] = *buf;
        MemoryRange {
            gpa: u64::from_le_bytes([g0, g1, g2, g3, g4, g5, g6, g7]),
            length: u64::from_le_bytes([l0, l1, l2, l3, l4, l5, l6, l7]),
        }
        .checked()
    }

    pub fn read_from<R: Read + ?Sized>(fd: &mut R) -> Result<MemoryRange, ProtocolError> {
        let mut buf = [0u8; MEMORY_RANGE_LEN];
        fd.read_exact(&mut buf)?;
        MemoryRange::from_bytes(&buf)
    }

    pub fn write_to<W: Write + ?Sized>(&self, fd: &mut W) -> Result<(), ProtocolError> {
        fd.write_all(&self.to_bytes())?;
        Ok(())
    }
}

/// Guest-memory ranges sent as one `Memory` payload (or reported dirty).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRangeTable {
    data: Vec<MemoryRange>,
}

impl MemoryRangeTable {
    pub fn ranges(&self) -> &[MemoryRange] {
        &self.data
    }

    /// Same as [`Self::ranges`]; both names exist upstream.
    pub fn regions(&self) -> &[MemoryRange] {
        &self.data
    }

    pub fn push(&mut self, range: MemoryRange) {
        self.data.push(range);
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn extend(&mut self, table: Self) {
        self.data.extend(table.data);
    }

    pub fn new_from_tables(tables: Vec<Self>) -> Self {
        let mut table = MemoryRangeTable::default();
        for t in tables {
            table.extend(t);
        }
        table
    }

    /// Bytes of the table itself on the wire (not of the memory it names).
    pub fn length(&self) -> u64 {
        (self.data.len() as u64).saturating_mul(MEMORY_RANGE_LEN as u64)
    }

    /// Bytes of guest memory the ranges cover.
    pub fn effective_size(&self) -> u64 {
        self.data
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.length))
    }

    /// Ranges of the pages whose bit is set in `bitmap` (bit `i` of word
    /// `w` is page `64 * w + i` after `start_addr`); neighbours merge.
    pub fn from_dirty_bitmap(
        bitmap: impl IntoIterator<Item = u64>,
        start_addr: u64,
        page_size: u64,
    ) -> Self {
        let mut table = MemoryRangeTable::default();
        // First page and page count of the run being built.
        let mut run: Option<(u64, u64)> = None;
        for (word_index, word) in bitmap.into_iter().enumerate() {
            if word == 0 && run.is_none() {
                continue;
            }
            for bit in 0..64u64 {
                let page = (word_index as u64).saturating_mul(64).saturating_add(bit);
                if word & (1 << bit) != 0 {
                    run = match run {
                        Some((first, pages)) => Some((first, pages + 1)),
                        None => Some((page, 1)),
                    };
                } else if let Some((first, pages)) = run.take() {
                    table.push_pages(first, pages, start_addr, page_size);
                }
            }
        }
        if let Some((first, pages)) = run {
            table.push_pages(first, pages, start_addr, page_size);
        }
        table
    }

    /// Older upstream name of [`Self::from_dirty_bitmap`].
    pub fn from_bitmap(bitmap: Vec<u64>, start_addr: u64, page_size: u64) -> Self {
        Self::from_dirty_bitmap(bitmap, start_addr, page_size)
    }

    fn push_pages(&mut self, first: u64, pages: u64, start_addr: u64, page_size: u64) {
        self.push(MemoryRange {
            gpa: start_addr.saturating_add(first.saturating_mul(page_size)),
            length: pages.saturating_mul(page_size),
        });
    }

    /// Splits the table into tables of at most `chunk_size` bytes of
    /// memory each, cutting ranges where needed. Order is preserved here,
    /// but callers must not rely on it (upstream makes no promise). A
    /// `chunk_size` of 0 is treated as 1.
    pub fn partition(self, chunk_size: u64) -> impl Iterator<Item = MemoryRangeTable> {
        Partition {
            chunk_size: chunk_size.max(1),
            ranges: self.data.into_iter(),
            pending: None,
        }
    }

    /// Reads a table of `length` bytes. `length` must be a multiple of 16
    /// and at most [`MAX_TABLE_RANGES`] ranges; memory grows with the bytes
    /// actually received, so a truncated stream reserves little.
    pub fn read_from<R: Read + ?Sized>(
        fd: &mut R,
        length: u64,
    ) -> Result<MemoryRangeTable, ProtocolError> {
        let range_len = MEMORY_RANGE_LEN as u64;
        if !length.is_multiple_of(range_len) {
            return Err(ProtocolError::TableLengthMisaligned(length));
        }
        let max = MAX_TABLE_RANGES * range_len;
        if length > max {
            return Err(ProtocolError::TableTooLarge { length, max });
        }
        let count = length / range_len;
        // Reserve at most a page worth up front; the rest as data arrives.
        let mut data = Vec::with_capacity(count.min(256) as usize);
        let mut buf = [0u8; MEMORY_RANGE_LEN];
        for _ in 0..count {
            fd.read_exact(&mut buf)?;
            data.push(MemoryRange::from_bytes(&buf)?);
        }
        Ok(MemoryRangeTable { data })
    }

    pub fn write_to<W: Write + ?Sized>(&self, fd: &mut W) -> Result<(), ProtocolError> {
        // Encode in batches: one write per range would be a syscall each.
        let mut batch = Vec::with_capacity(MEMORY_RANGE_LEN * 256);
        for chunk in self.data.chunks(256) {
            batch.clear();
            for range in chunk {
                batch.extend_from_slice(&range.to_bytes());
            }
            fd.write_all(&batch)?;
        }
        Ok(())
    }
}

impl fmt::Display for MemoryRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{:#x}", self.gpa, self.length)
    }
}

/// Iterator behind [`MemoryRangeTable::partition`].
struct Partition {
    chunk_size: u64,
    ranges: std::vec::IntoIter<MemoryRange>,
    /// The unsent tail of a range cut by the previous chunk.
    pending: Option<MemoryRange>,
}

impl Iterator for Partition {
    type Item = MemoryRangeTable;

    fn next(&mut self) -> Option<MemoryRangeTable> {
        let mut chunk = MemoryRangeTable::default();
        let mut room = self.chunk_size;
        while room > 0 {
            let Some(range) = self.pending.take().or_else(|| self.ranges.next()) else {
                break;
            };
            if range.length <= room {
                room -= range.length;
                chunk.push(range);
            } else {
                chunk.push(MemoryRange {
                    gpa: range.gpa,
                    length: room,
                });
                self.pending = Some(MemoryRange {
                    gpa: range.gpa.saturating_add(room),
                    length: range.length - room,
                });
                room = 0;
            }
        }
        (!chunk.is_empty()).then_some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn bytes_of_request(r: &Request) -> Vec<u8> {
        let mut v = Vec::new();
        r.write_to(&mut v).unwrap();
        v
    }

    #[test]
    fn request_layout_is_16_le_bytes() {
        let r = Request::config(0x0102_0304_0506_0708);
        assert_eq!(
            bytes_of_request(&r),
            [2, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]
        );
        let d = Request::device_state(0x0a0b, 42);
        assert_eq!(
            bytes_of_request(&d),
            [0, 1, 0x0b, 0x0a, 0, 0, 0, 0, 42, 0, 0, 0, 0, 0, 0, 0]
        );
        let s = Request::start();
        assert_eq!(bytes_of_request(&s)[..4], [1, 0, 0, 0]);
        assert_eq!(
            s.command_headers()[0..2],
            CURRENT_PROTOCOL_VERSION.to_le_bytes()
        );
    }

    #[test]
    fn response_layout_is_16_le_bytes() {
        let mut v = Vec::new();
        Response::new(Status::Error, 0x10).write_to(&mut v).unwrap();
        assert_eq!(v, [2, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Response::ok().to_bytes()[0..2], [1, 0]);
        assert_eq!(Response::default().status(), Status::Invalid);
    }

    #[test]
    fn command_values_are_upstreams() {
        let expected = [
            (Command::Invalid, 0u16),
            (Command::Start, 1),
            (Command::Config, 2),
            (Command::State, 3),
            (Command::Memory, 4),
            (Command::Complete, 5),
            (Command::Abandon, 6),
            (Command::MemoryFd, 7),
            (Command::CompletePaused, 8),
            (Command::PageFault, 9),
            (Command::DeviceState, 0x100),
        ];
        for (command, value) in expected {
            assert_eq!(command as u16, value);
            assert_eq!(Command::try_from(value).unwrap(), command);
        }
    }

    #[test]
    fn every_request_round_trips() {
        let all = [
            Request::start(),
            Request::config(17),
            Request::state(1 << 40),
            Request::memory(32),
            Request::memory_fd(8),
            Request::complete(),
            Request::complete_paused(),
            Request::abandon(),
            Request::page_fault(),
            Request::device_state(3, DEVICE_STATE_SELF_DELIMITED),
            Request::new(Command::Invalid, 0),
        ];
        for r in all {
            let back = Request::read_from(&mut Cursor::new(bytes_of_request(&r))).unwrap();
            assert_eq!(back, r);
            assert_eq!(Request::from_bytes(&r.to_bytes()).unwrap(), r);
        }
    }

    #[test]
    fn responses_round_trip_keeping_padding() {
        let mut raw = Response::new(Status::Ok, 99).to_bytes();
        raw[2..8].copy_from_slice(&[1, 2, 3, 4, 5, 6]);
        let r = Response::read_from(&mut Cursor::new(raw)).unwrap();
        assert_eq!((r.status(), r.length()), (Status::Ok, 99));
        assert_eq!(r.to_bytes(), raw);
    }

    #[test]
    fn unknown_command_is_rejected_naming_the_value() {
        let mut raw = Request::complete().to_bytes();
        raw[0..2].copy_from_slice(&0x1234u16.to_le_bytes());
        let err = Request::read_from(&mut Cursor::new(raw)).unwrap_err();
        assert!(matches!(err, ProtocolError::UnknownCommand(0x1234)));
        assert!(err.to_string().contains("0x1234"), "{err}");
        raw[0..2].copy_from_slice(&10u16.to_le_bytes());
        assert!(Request::from_bytes(&raw).is_err());
    }

    #[test]
    fn unknown_status_and_role_are_rejected() {
        let mut raw = Response::ok().to_bytes();
        raw[0] = 3;
        assert!(matches!(
            Response::read_from(&mut Cursor::new(raw)),
            Err(ProtocolError::UnknownStatus(3))
        ));
        assert!(matches!(
            ConnectionRole::read_from(&mut Cursor::new(99u16.to_le_bytes())),
            Err(ProtocolError::UnknownConnectionRole(99))
        ));
    }

    #[test]
    fn connection_roles_round_trip_as_u16() {
        for role in [
            ConnectionRole::Invalid,
            ConnectionRole::PrecopyMemory,
            ConnectionRole::Fault,
            ConnectionRole::DeviceState,
        ] {
            let mut v = Vec::new();
            role.write_to(&mut v).unwrap();
            assert_eq!(v, (role as u16).to_le_bytes());
            assert_eq!(
                ConnectionRole::read_from(&mut Cursor::new(v)).unwrap(),
                role
            );
        }
        assert_eq!(ConnectionRole::PrecopyMemory as u16, 1);
        assert_eq!(ConnectionRole::Fault as u16, 2);
    }

    #[test]
    fn truncated_headers_are_io_errors() {
        for len in 0..HEADER_LEN {
            let raw = &Request::abandon().to_bytes()[..len];
            assert!(matches!(
                Request::read_from(&mut Cursor::new(raw)),
                Err(ProtocolError::Io(_))
            ));
            assert!(matches!(
                Response::read_from(&mut Cursor::new(&Response::ok().to_bytes()[..len])),
                Err(ProtocolError::Io(_))
            ));
        }
    }

    #[test]
    fn protocol_version_is_checked() {
        assert_eq!(
            Request::start().sender_protocol_version().unwrap(),
            CURRENT_PROTOCOL_VERSION
        );
        let mut raw = Request::start().to_bytes();
        raw[2] = 0xff;
        // Bytes past the version are ignored.
        raw[4..8].copy_from_slice(&[0xaa; 4]);
        let r = Request::from_bytes(&raw).unwrap();
        assert!(matches!(
            r.sender_protocol_version(),
            Err(ProtocolError::UnsupportedVersion { version: 0xff, .. })
        ));
        raw[2] = 0;
        assert!(Request::from_bytes(&raw)
            .unwrap()
            .sender_protocol_version()
            .is_ok());
        assert!(matches!(
            Request::complete().sender_protocol_version(),
            Err(ProtocolError::NotStart(Command::Complete))
        ));
    }

    #[test]
    fn device_state_request_carries_index_and_length() {
        let r = Request::device_state(7, 4096);
        assert_eq!((r.device_index(), r.length()), (Some(7), 4096));
        assert!(!r.is_self_delimited());
        assert!(Request::device_state(0, DEVICE_STATE_SELF_DELIMITED).is_self_delimited());
        assert_eq!(Request::state(4).device_index(), None);
        assert!(!Request::state(DEVICE_STATE_SELF_DELIMITED).is_self_delimited());
    }

    #[test]
    fn ok_or_fatal_error_passes_only_ok() {
        assert!(Response::ok()
            .ok_or_fatal_error(MigratableError::MigrateSend(anyhow::anyhow!("x")))
            .is_ok());
        for r in [Response::error(), Response::default()] {
            let e = r
                .ok_or_fatal_error(MigratableError::MigrateSend(anyhow::anyhow!(
                    "sending state"
                )))
                .unwrap_err();
            assert!(e.to_string().contains("sending state"));
        }
    }

    #[test]
    fn protocol_errors_convert_to_migratable_errors() {
        let io: MigratableError =
            ProtocolError::Io(io::Error::from(io::ErrorKind::UnexpectedEof)).into();
        assert!(matches!(io, MigratableError::MigrateSocket(_)));
        let bad: MigratableError = ProtocolError::UnknownCommand(77).into();
        assert!(matches!(bad, MigratableError::MigrateReceive(_)));
        assert!(bad.to_string().contains("0x4d"), "{bad}");
    }

    fn table(ranges: &[(u64, u64)]) -> MemoryRangeTable {
        let mut t = MemoryRangeTable::default();
        for &(gpa, length) in ranges {
            t.push(MemoryRange { gpa, length });
        }
        t
    }

    #[test]
    fn memory_range_table_wire_layout_and_round_trip() {
        let t = table(&[(0x1000, 0x2000), (u64::MAX - 1, 1)]);
        let mut v = Vec::new();
        t.write_to(&mut v).unwrap();
        assert_eq!(v.len() as u64, t.length());
        assert_eq!(
            v[0..16],
            [0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0]
        );
        let back = MemoryRangeTable::read_from(&mut Cursor::new(&v), t.length()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.effective_size(), 0x2001);
    }

    #[test]
    fn large_table_round_trips_across_write_batches() {
        let ranges: Vec<(u64, u64)> = (0..1000u64).map(|i| (i * 0x10000, 0x1000)).collect();
        let t = table(&ranges);
        let mut v = Vec::new();
        t.write_to(&mut v).unwrap();
        assert_eq!(v.len(), 16_000);
        assert_eq!(
            MemoryRangeTable::read_from(&mut Cursor::new(v), 16_000).unwrap(),
            t
        );
    }

    #[test]
    fn table_length_must_be_aligned_and_bounded() {
        let mut empty = Cursor::new(Vec::<u8>::new());
        assert!(matches!(
            MemoryRangeTable::read_from(&mut empty, 17),
            Err(ProtocolError::TableLengthMisaligned(17))
        ));
        // Rejected before any read or allocation.
        for length in [1u64 << 63, u64::MAX - 15, (MAX_TABLE_RANGES + 1) * 16] {
            assert!(matches!(
                MemoryRangeTable::read_from(&mut empty, length),
                Err(ProtocolError::TableTooLarge { .. })
            ));
        }
        // The largest allowed table announced on a short stream fails on
        // the missing bytes, without reserving 16 MiB first.
        assert!(matches!(
            MemoryRangeTable::read_from(&mut Cursor::new(vec![0u8; 32]), MAX_TABLE_RANGES * 16),
            Err(ProtocolError::Io(_))
        ));
        assert!(MemoryRangeTable::read_from(&mut empty, 0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn wrapping_range_is_rejected() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(u64::MAX - 0xfff).to_le_bytes());
        raw.extend_from_slice(&0x1001u64.to_le_bytes());
        let err = MemoryRangeTable::read_from(&mut Cursor::new(&raw), 16).unwrap_err();
        assert!(matches!(err, ProtocolError::RangeOverflow { .. }), "{err}");
        assert!(MemoryRange::read_from(&mut Cursor::new(&raw)).is_err());
        assert_eq!(
            MemoryRange {
                gpa: u64::MAX,
                length: 0
            }
            .end(),
            Some(u64::MAX)
        );
    }

    #[test]
    fn page_fault_request_carries_one_range() {
        let range = MemoryRange {
            gpa: 0x4000,
            length: 0x1000,
        };
        let mut v = Vec::new();
        Request::page_fault().write_to(&mut v).unwrap();
        range.write_to(&mut v).unwrap();
        let mut c = Cursor::new(v);
        let r = Request::read_from(&mut c).unwrap();
        assert_eq!((r.command(), r.length()), (Command::PageFault, 16));
        assert_eq!(MemoryRange::read_from(&mut c).unwrap(), range);
    }

    #[test]
    fn dirty_bitmap_coalesces_runs() {
        let page = 0x1000;
        let t = MemoryRangeTable::from_dirty_bitmap([0b1111_1110_1110, 0b1_0000], 0x1000, page);
        assert_eq!(
            t.ranges(),
            &[
                MemoryRange {
                    gpa: 0x1000 + page,
                    length: 3 * page
                },
                MemoryRange {
                    gpa: 0x1000 + 5 * page,
                    length: 7 * page
                },
                MemoryRange {
                    gpa: 0x1000 + 68 * page,
                    length: page
                },
            ]
        );
        // A run crossing a word boundary stays one range.
        let t = MemoryRangeTable::from_bitmap(vec![1 << 63, 1, 0, u64::MAX], 0, page);
        assert_eq!(
            t.regions(),
            &[
                MemoryRange {
                    gpa: 63 * page,
                    length: 2 * page
                },
                MemoryRange {
                    gpa: 192 * page,
                    length: 64 * page
                },
            ]
        );
        assert!(MemoryRangeTable::from_dirty_bitmap([0u64; 4], 0, page).is_empty());
    }

    #[test]
    fn partition_respects_chunk_size_and_covers_everything() {
        let t = table(&[(0, 0x3000), (0x10000, 0x1000), (0x20000, 0x5000)]);
        let chunks: Vec<_> = t.clone().partition(0x2000).collect();
        for c in &chunks {
            assert!(c.effective_size() <= 0x2000);
            assert!(!c.is_empty());
        }
        let total: u64 = chunks.iter().map(MemoryRangeTable::effective_size).sum();
        assert_eq!(total, t.effective_size());
        // Pieces re-join into the original ranges.
        let mut flat: Vec<MemoryRange> = chunks.iter().flat_map(|c| c.ranges().to_vec()).collect();
        flat.sort_by_key(|r| r.gpa);
        let mut merged: Vec<MemoryRange> = Vec::new();
        for r in flat {
            match merged.last_mut() {
                Some(last) if last.end() == Some(r.gpa) => last.length += r.length,
                _ => merged.push(r),
            }
        }
        assert_eq!(merged, t.ranges());
        assert_eq!(t.clone().partition(u64::MAX).count(), 1);
        assert_eq!(t.partition(0).count(), 0x9000);
        assert_eq!(MemoryRangeTable::default().partition(10).count(), 0);
    }

    #[test]
    fn tables_extend_and_merge() {
        let mut a = table(&[(0, 1)]);
        a.extend(table(&[(2, 1)]));
        let all = MemoryRangeTable::new_from_tables(vec![a.clone(), table(&[(9, 9)])]);
        assert_eq!(all.ranges().len(), 3);
        assert_eq!(all.length(), 48);
    }

    /// Deterministic xorshift64* so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn garbage_never_panics_and_accepted_headers_re_encode_exactly() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for i in 0..20_000 {
            let len = (rng.next() % 40) as usize;
            let mut raw = rng.bytes(len);
            // Bias some inputs towards known command/status values.
            if i % 3 == 0 && raw.len() >= 2 {
                raw[0] = (rng.next() % 11) as u8;
                raw[1] = 0;
            }
            if let Ok(r) = Request::read_from(&mut Cursor::new(&raw)) {
                assert_eq!(r.to_bytes()[..], raw[..HEADER_LEN]);
                let _ = r.sender_protocol_version();
                let _ = r.device_index();
            }
            if let Ok(r) = Response::read_from(&mut Cursor::new(&raw)) {
                assert_eq!(r.to_bytes()[..], raw[..HEADER_LEN]);
            }
            let _ = ConnectionRole::read_from(&mut Cursor::new(&raw));
            let length = match rng.next() % 4 {
                0 => rng.next(),
                1 => (len as u64) & !15,
                2 => rng.next() % 64,
                _ => u64::MAX,
            };
            if let Ok(t) = MemoryRangeTable::read_from(&mut Cursor::new(&raw), length) {
                assert_eq!(t.length(), length);
                assert!(t.ranges().iter().all(|r| r.end().is_some()));
                let _ = t.effective_size();
                // Chunks no smaller than 1/64 of the total keep this bounded.
                let chunk = (t.effective_size() / 64).max(1);
                let total = t
                    .clone()
                    .partition(chunk)
                    .fold(0u64, |sum, c| sum.saturating_add(c.effective_size()));
                assert_eq!(total, t.effective_size());
            }
        }
    }
}
