// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Cloud Hypervisor's live-migration wire protocol, with our series'
//! additions (streamed component state, feature negotiation).
//!
//! Every value matches CH's byte for byte, so a peer speaking CH's
//! protocol interoperates with ours:
//!
//! * a request is 16 little-endian bytes, `command: u16`,
//!   `command_headers: [u8; 6]`, `length: u64`; a response is
//!   `status: u16`, `padding: [u8; 6]`, `length: u64`. `length` counts the
//!   payload bytes after the header;
//! * `Start` carries the sender's protocol version in
//!   `command_headers[0..2]` and the [`ProtocolFeatures`] it speaks in
//!   `command_headers[2..6]`; the `Ok` to `Start` names the features the
//!   receiver accepts in `padding[0..4]`. Peers that predate features send
//!   and ignore zeros there;
//! * a `Memory` payload is a [`MemoryRangeTable`] (`{gpa, length}` pairs
//!   of 16 bytes) followed by the bytes of those ranges;
//! * [`Command::DeviceState`] (negotiated as
//!   [`ProtocolFeatures::DEVICE_STATE`]) carries one component's streamed
//!   state; the component's index is in `command_headers[0..2]` and the
//!   stream delimits itself ([`DEVICE_STATE_SELF_DELIMITED`]);
//! * [`Command::Switchover`] (negotiated as [`ProtocolFeatures::SWITCHOVER`])
//!   hands the VM over once the destination answered `Complete`;
//! * [`Command::VerifySetup`] and [`Command::Digests`] (negotiated as
//!   [`ProtocolFeatures::VERIFY`]) check pages by digest in the final
//!   memory pass; the `Ok` to `Digests` carries a payload, the pages that
//!   differ;
//! * an additional connection first announces its [`ConnectionRole`] as
//!   a u16.
//!
//! All that is read from a peer is treated as hostile: an unknown value is
//! an error naming it, a table's length is checked and bounded before
//! anything is allocated, and no input makes a function here panic.

use std::io::{Read, Write};
use std::ops::RangeInclusive;

use anyhow::anyhow;
use bitflags::bitflags;
use serde::{Deserialize, Serialize};

use crate::MigratableError;

/// Bytes of a [`Request`] or [`Response`] on the wire.
const HEADER_BYTES: usize = 16;

/// Bytes of one [`MemoryRange`] on the wire.
const RANGE_BYTES: usize = 16;

/// Most ranges a received [`MemoryRangeTable`] may hold (16 MiB of table).
/// Dirty bitmaps coalesce into far fewer ranges; the bound keeps a hostile
/// `length` from reserving memory.
const MAX_TABLE_RANGES: u64 = 1 << 20;

/// Commands a migration source sends.
#[repr(u16)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Command {
    /// The zero value: a zeroed header means nothing.
    #[default]
    Invalid = 0,
    Start = 1,
    Config = 2,
    State = 3,
    Memory = 4,
    /// Ends the migration and runs the VM on the destination (the source
    /// VM was running).
    Complete = 5,
    Abandon = 6,
    MemoryFd = 7,
    /// Ends the migration and leaves the destination VM paused (the
    /// source VM was paused).
    CompletePaused = 8,
    /// Asks for one page (post-copy); the payload is one [`MemoryRange`].
    PageFault = 9,
    /// The streamed state of one component, after `State`, when both
    /// peers announced [`ProtocolFeatures::DEVICE_STATE`].
    DeviceState = 0x100,
    /// The second step of a two-step switch-over (negotiated as
    /// [`ProtocolFeatures::SWITCHOVER`]): the destination answered
    /// `Complete` holding everything but with the VM paused; now it runs
    /// the VM (unless the source sent `CompletePaused`). From this request
    /// on, the source never resumes the VM by itself.
    Switchover = 0x101,
    /// The digest function and key of the verify pass (negotiated as
    /// [`ProtocolFeatures::VERIFY`]), after `Config`: from then on the
    /// destination keeps a digest of every page that arrives.
    VerifySetup = 0x102,
    /// Digests of pages the source may not have sent since they last
    /// changed, in the final memory pass; the `Ok` answering it carries the
    /// pages whose digest differs on the destination, which the source
    /// then sends.
    Digests = 0x103,
}

impl Command {
    fn from_wire(value: u16) -> Option<Command> {
        let command = match value {
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
            0x101 => Command::Switchover,
            0x102 => Command::VerifySetup,
            0x103 => Command::Digests,
            _ => return None,
        };
        Some(command)
    }
}

/// What an additional migration connection carries; its first message.
#[repr(u16)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnectionRole {
    /// The zero value, meaning nothing.
    #[default]
    Invalid = 0,
    /// Pre-copy memory chunks.
    PrecopyMemory = 1,
    /// Page faults (post-copy).
    Fault = 2,
    /// One streamed component's state, concurrently with the final memory
    /// pass (negotiated as [`ProtocolFeatures::DEVICE_STATE_CONNECTIONS`]):
    /// exactly one `DeviceState` request, answered once loaded.
    DeviceState = 3,
}

impl ConnectionRole {
    pub fn write_to(self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        let value = self as u16;
        write_bytes(fd, &value.to_le_bytes())
    }

    pub fn read_from(fd: &mut dyn Read) -> Result<ConnectionRole, MigratableError> {
        let mut raw = [0u8; 2];
        read_bytes(fd, &mut raw)?;
        ConnectionRole::try_from(u16::from_le_bytes(raw))
    }
}

impl TryFrom<u16> for ConnectionRole {
    type Error = MigratableError;

    fn try_from(value: u16) -> Result<Self, Self::Error> {
        [
            ConnectionRole::Invalid,
            ConnectionRole::PrecopyMemory,
            ConnectionRole::Fault,
            ConnectionRole::DeviceState,
        ]
        .into_iter()
        .find(|role| *role as u16 == value)
        .ok_or_else(|| {
            MigratableError::MigrateReceive(anyhow!("unknown connection role {value:#x}"))
        })
    }
}

/// Newest protocol version this side sends.
pub const CURRENT_PROTOCOL_VERSION: u16 = 0;

bitflags! {
    /// Optional parts of the protocol, negotiated in `Start`: the sender
    /// names those it speaks, the receiver answers with those it accepts,
    /// and neither uses one the other did not name.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ProtocolFeatures: u32 {
        /// [`Command::DeviceState`] requests between `State` and `Complete`.
        const DEVICE_STATE = 1;
        /// The two-step switch-over: `Complete` leaves the destination
        /// ready and paused, [`Command::Switchover`] hands the VM over, so
        /// a lost answer cannot leave the VM running on both hosts.
        const SWITCHOVER = 1 << 1;
        /// Each streamed component's state on a connection of its own
        /// ([`ConnectionRole::DeviceState`]), all of them concurrently
        /// with the final memory pass, instead of in turn after `State`.
        const DEVICE_STATE_CONNECTIONS = 1 << 2;
        /// The verify pass: [`Command::VerifySetup`] and
        /// [`Command::Digests`], so pages a device may have written
        /// without logging it are checked by digest instead of resent.
        const VERIFY = 1 << 3;
        /// VRAM read through a device's memory BAR while the VM runs and
        /// sent ahead on its device-state connection; in stop-copy only
        /// what the destination does not already hold is sent.
        const VRAM_PRECOPY = 1 << 4;
    }
}

/// `length` of a [`Command::DeviceState`] request: the state stream ends
/// with its own end marker, not after a count known in advance.
pub const DEVICE_STATE_SELF_DELIMITED: u64 = u64::MAX;

/// Versions a receiver accepts: the current one and the one before it.
pub fn supported_protocol_versions() -> RangeInclusive<u16> {
    let oldest = CURRENT_PROTOCOL_VERSION.saturating_sub(1);
    oldest..=CURRENT_PROTOCOL_VERSION
}

fn write_bytes(fd: &mut dyn Write, bytes: &[u8]) -> Result<(), MigratableError> {
    fd.write_all(bytes).map_err(MigratableError::MigrateSocket)
}

fn read_bytes(fd: &mut dyn Read, bytes: &mut [u8]) -> Result<(), MigratableError> {
    fd.read_exact(bytes).map_err(MigratableError::MigrateSocket)
}

/// A header's three fields: the leading u16, the six middle bytes and the
/// trailing u64, all little-endian.
fn encode_header(word: u16, middle: [u8; 6], length: u64) -> [u8; HEADER_BYTES] {
    let mut raw = [0u8; HEADER_BYTES];
    raw[..2].copy_from_slice(&word.to_le_bytes());
    raw[2..8].copy_from_slice(&middle);
    raw[8..].copy_from_slice(&length.to_le_bytes());
    raw
}

fn read_header(fd: &mut dyn Read) -> Result<(u16, [u8; 6], u64), MigratableError> {
    let mut raw = [0u8; HEADER_BYTES];
    read_bytes(fd, &mut raw)?;
    let mut middle = [0u8; 6];
    middle.copy_from_slice(&raw[2..8]);
    let mut length = [0u8; 8];
    length.copy_from_slice(&raw[8..]);
    Ok((
        u16::from_le_bytes([raw[0], raw[1]]),
        middle,
        u64::from_le_bytes(length),
    ))
}

/// A request header, sent by the migration source.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Request {
    command: Command,
    command_headers: [u8; 6],
    /// Payload bytes after this header.
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

    /// `Start`, naming [`CURRENT_PROTOCOL_VERSION`] and no features.
    pub fn start() -> Self {
        let mut request = Request::new(Command::Start, 0);
        request.command_headers[..2].copy_from_slice(&CURRENT_PROTOCOL_VERSION.to_le_bytes());
        request
    }

    /// `Start`, naming the optional `features` this sender speaks.
    pub fn start_with_features(features: ProtocolFeatures) -> Self {
        let mut request = Request::start();
        request.command_headers[2..].copy_from_slice(&features.bits().to_le_bytes());
        request
    }

    /// `DeviceState` for the component at `index` among the receiver's
    /// streamed components in the order of their ids; the stream that
    /// follows delimits itself.
    pub fn device_state(index: u16) -> Self {
        let mut request = Request::new(Command::DeviceState, DEVICE_STATE_SELF_DELIMITED);
        request.command_headers[..2].copy_from_slice(&index.to_le_bytes());
        request
    }

    pub fn state(length: u64) -> Self {
        Request::new(Command::State, length)
    }

    pub fn config(length: u64) -> Self {
        Request::new(Command::Config, length)
    }

    pub fn memory(length: u64) -> Self {
        Request::new(Command::Memory, length)
    }

    pub fn memory_fd(length: u64) -> Self {
        Request::new(Command::MemoryFd, length)
    }

    pub fn complete() -> Self {
        Request::new(Command::Complete, 0)
    }

    pub fn complete_paused() -> Self {
        Request::new(Command::CompletePaused, 0)
    }

    pub fn abandon() -> Self {
        Request::new(Command::Abandon, 0)
    }

    /// Hands the VM over to a destination that answered `Complete`.
    pub fn switchover() -> Self {
        Request::new(Command::Switchover, 0)
    }

    /// Followed by `length` bytes of verify setup.
    pub fn verify_setup(length: u64) -> Self {
        Request::new(Command::VerifySetup, length)
    }

    /// Followed by `length` bytes of digests.
    pub fn digests(length: u64) -> Self {
        Request::new(Command::Digests, length)
    }

    /// Always followed by exactly one [`MemoryRange`].
    pub fn page_fault() -> Self {
        Request::new(Command::PageFault, RANGE_BYTES as u64)
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

    /// The version a `Start` request names, if this side supports it; the
    /// header bytes after the version play no part. (CH asserts that the
    /// request is a `Start`; here any other request is an error.)
    pub fn sender_protocol_version(&self) -> Result<u16, MigratableError> {
        if self.command != Command::Start {
            return Err(MigratableError::MigrateReceive(anyhow!(
                "a {:?} request names no protocol version",
                self.command
            )));
        }
        let version = u16::from_le_bytes([self.command_headers[0], self.command_headers[1]]);
        let supported = supported_protocol_versions();
        if !supported.contains(&version) {
            return Err(MigratableError::MigrateReceive(anyhow!(
                "the sender speaks migration protocol version {version}; this side supports {} to {}",
                supported.start(),
                supported.end()
            )));
        }
        Ok(version)
    }

    /// The optional features a `Start` request names, without bits this
    /// side does not know. Call it on `Start` requests only (CH asserts
    /// that; check `command()` first).
    pub fn sender_features(&self) -> ProtocolFeatures {
        debug_assert_eq!(self.command, Command::Start);
        let mut bits = [0u8; 4];
        bits.copy_from_slice(&self.command_headers[2..]);
        ProtocolFeatures::from_bits_truncate(u32::from_le_bytes(bits))
    }

    /// The component index of a `DeviceState` request. Call it on
    /// `DeviceState` requests only (CH asserts that; check `command()`
    /// first).
    pub fn device_index(&self) -> u16 {
        debug_assert_eq!(self.command, Command::DeviceState);
        u16::from_le_bytes([self.command_headers[0], self.command_headers[1]])
    }

    /// Reads one request; an unknown command is an error naming it.
    pub fn read_from(fd: &mut dyn Read) -> Result<Request, MigratableError> {
        let (command, command_headers, length) = read_header(fd)?;
        let command = Command::from_wire(command).ok_or_else(|| {
            MigratableError::MigrateReceive(anyhow!("unknown migration command {command:#x}"))
        })?;
        Ok(Request {
            command,
            command_headers,
            length,
        })
    }

    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        let raw = encode_header(self.command as u16, self.command_headers, self.length);
        write_bytes(fd, &raw)
    }
}

/// Status of a [`Response`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Status {
    #[default]
    Invalid,
    Ok,
    Error,
}

/// A response header, sent by the migration destination.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Response {
    status: Status,
    padding: [u8; 6],
    /// Payload bytes after this header.
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
        Response::new(Status::Ok, 0)
    }

    /// `Ok` to `Start`, naming the optional features this receiver
    /// accepts.
    pub fn ok_with_features(features: ProtocolFeatures) -> Self {
        let mut response = Response::ok();
        response.padding[..4].copy_from_slice(&features.bits().to_le_bytes());
        response
    }

    /// The optional features an `Ok` to `Start` names (none from a
    /// receiver that predates them), without bits this side does not know.
    pub fn features(&self) -> ProtocolFeatures {
        let mut bits = [0u8; 4];
        bits.copy_from_slice(&self.padding[..4]);
        ProtocolFeatures::from_bits_truncate(u32::from_le_bytes(bits))
    }

    pub fn error() -> Self {
        Response::new(Status::Error, 0)
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn length(&self) -> u64 {
        self.length
    }

    /// Reads one response; an unknown status is an error naming it.
    pub fn read_from(fd: &mut dyn Read) -> Result<Response, MigratableError> {
        let (status, padding, length) = read_header(fd)?;
        let status = match status {
            0 => Status::Invalid,
            1 => Status::Ok,
            2 => Status::Error,
            other => {
                return Err(MigratableError::MigrateReceive(anyhow!(
                    "unknown migration response status {other:#x}"
                )))
            }
        };
        Ok(Response {
            status,
            padding,
            length,
        })
    }

    /// `self` if the receiver said Ok; otherwise `sender_error`, which
    /// names what the sender was doing: the receiver's own reason does not
    /// travel back.
    pub fn ok_or_fatal_error(
        self,
        sender_error: MigratableError,
    ) -> Result<Response, MigratableError> {
        if self.status == Status::Ok {
            return Ok(self);
        }
        log::error!(
            "the migration receiver answered {:?}: aborting",
            self.status
        );
        Err(sender_error)
    }

    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        let raw = encode_header(self.status as u16, self.padding, self.length);
        write_bytes(fd, &raw)
    }
}

/// `length` bytes of guest memory from `gpa` on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    pub gpa: u64,
    pub length: u64,
}

impl MemoryRange {
    fn to_wire(self) -> [u8; RANGE_BYTES] {
        let mut raw = [0u8; RANGE_BYTES];
        raw[..8].copy_from_slice(&self.gpa.to_le_bytes());
        raw[8..].copy_from_slice(&self.length.to_le_bytes());
        raw
    }

    /// Decodes a range, refusing one that runs past the end of the
    /// address space.
    fn from_wire(raw: &[u8; RANGE_BYTES]) -> Result<MemoryRange, MigratableError> {
        let mut gpa = [0u8; 8];
        gpa.copy_from_slice(&raw[..8]);
        let mut length = [0u8; 8];
        length.copy_from_slice(&raw[8..]);
        let range = MemoryRange {
            gpa: u64::from_le_bytes(gpa),
            length: u64::from_le_bytes(length),
        };
        match range.gpa.checked_add(range.length) {
            Some(_) => Ok(range),
            None => Err(MigratableError::MigrateReceive(anyhow!(
                "memory range {:#x}+{:#x} runs past the end of the address space",
                range.gpa,
                range.length
            ))),
        }
    }

    /// Reads one range; one that wraps the address space is an error.
    pub fn read_from(fd: &mut dyn Read) -> Result<MemoryRange, MigratableError> {
        let mut raw = [0u8; RANGE_BYTES];
        read_bytes(fd, &mut raw)?;
        MemoryRange::from_wire(&raw)
    }

    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        write_bytes(fd, &self.to_wire())
    }
}

/// Guest-memory ranges moved as one `Memory` payload (or reported dirty).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemoryRangeTable {
    data: Vec<MemoryRange>,
}

impl MemoryRangeTable {
    pub fn ranges(&self) -> &[MemoryRange] {
        &self.data
    }

    /// Splits the table into tables that cover at most `chunk_size` bytes
    /// of memory each, cutting ranges where needed. Callers must not rely
    /// on the order of chunks or ranges (CH's come in reverse order; these
    /// come in table order). A `chunk_size` of 0 counts as 1.
    pub fn partition(self, chunk_size: u64) -> impl Iterator<Item = MemoryRangeTable> {
        Partition {
            room: chunk_size.max(1),
            ranges: self.data.into_iter(),
            rest: None,
        }
    }

    /// The ranges of the pages whose bit is set in `bitmap`: bit `b` of
    /// word `w` stands for the page `64 * w + b` pages after `start_addr`.
    /// Neighbouring pages make one range.
    pub fn from_dirty_bitmap(
        bitmap: impl IntoIterator<Item = u64>,
        start_addr: u64,
        page_size: u64,
    ) -> Self {
        let mut table = MemoryRangeTable::default();
        // First page and page count of the run of set bits being built.
        let mut run: Option<(u64, u64)> = None;
        let flush = |table: &mut MemoryRangeTable, (first, pages): (u64, u64)| {
            table.push(MemoryRange {
                gpa: start_addr.saturating_add(first.saturating_mul(page_size)),
                length: pages.saturating_mul(page_size),
            });
        };
        for (index, word) in bitmap.into_iter().enumerate() {
            let base = (index as u64).saturating_mul(64);
            if word == 0 {
                if let Some(done) = run.take() {
                    flush(&mut table, done);
                }
                continue;
            }
            for bit in 0..64u64 {
                let set = word & (1 << bit) != 0;
                run = match (run, set) {
                    (Some((first, pages)), true) => Some((first, pages + 1)),
                    (None, true) => Some((base + bit, 1)),
                    (Some(done), false) => {
                        flush(&mut table, done);
                        None
                    }
                    (None, false) => None,
                };
            }
        }
        if let Some(done) = run {
            flush(&mut table, done);
        }
        table
    }

    pub fn regions(&self) -> &[MemoryRange] {
        &self.data
    }

    pub fn push(&mut self, range: MemoryRange) {
        self.data.push(range);
    }

    /// Reads a table of `length` bytes. A `length` that is not a whole
    /// number of ranges, or more than 2^20 ranges, is an error before
    /// anything is read (CH asserts on the first and allocates the
    /// second); memory grows with the ranges actually received.
    pub fn read_from(fd: &mut dyn Read, length: u64) -> Result<MemoryRangeTable, MigratableError> {
        let range_bytes = RANGE_BYTES as u64;
        if !length.is_multiple_of(range_bytes) {
            return Err(MigratableError::MigrateReceive(anyhow!(
                "memory range table length {length} is not a multiple of {RANGE_BYTES}"
            )));
        }
        let max = MAX_TABLE_RANGES * range_bytes;
        if length > max {
            return Err(MigratableError::MigrateReceive(anyhow!(
                "memory range table of {length} bytes exceeds the limit of {max} bytes"
            )));
        }
        let count = length / range_bytes;
        let mut data = Vec::with_capacity(count.min(256) as usize);
        let mut raw = [0u8; RANGE_BYTES];
        for _ in 0..count {
            read_bytes(fd, &mut raw)?;
            data.push(MemoryRange::from_wire(&raw)?);
        }
        Ok(MemoryRangeTable { data })
    }

    /// Bytes of the table itself on the wire (not of the memory it names).
    pub fn length(&self) -> u64 {
        (self.data.len() as u64).saturating_mul(RANGE_BYTES as u64)
    }

    pub fn write_to(&self, fd: &mut dyn Write) -> Result<(), MigratableError> {
        // A few hundred ranges per write: one write per range would cost a
        // system call each.
        let mut batch = Vec::with_capacity(RANGE_BYTES * 256);
        for ranges in self.data.chunks(256) {
            batch.clear();
            for range in ranges {
                batch.extend_from_slice(&range.to_wire());
            }
            write_bytes(fd, &batch)?;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn extend(&mut self, table: Self) {
        self.data.extend(table.data);
    }

    pub fn new_from_tables(tables: Vec<Self>) -> Self {
        let data = tables.into_iter().flat_map(|t| t.data).collect();
        MemoryRangeTable { data }
    }

    /// Bytes of guest memory the ranges cover (saturating).
    pub fn effective_size(&self) -> u64 {
        self.data
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.length))
    }
}

/// The iterator behind [`MemoryRangeTable::partition`].
struct Partition {
    room: u64,
    ranges: std::vec::IntoIter<MemoryRange>,
    /// What is left of a range the previous chunk cut.
    rest: Option<MemoryRange>,
}

impl Iterator for Partition {
    type Item = MemoryRangeTable;

    fn next(&mut self) -> Option<MemoryRangeTable> {
        let mut chunk = MemoryRangeTable::default();
        let mut room = self.room;
        while room > 0 {
            let Some(range) = self.rest.take().or_else(|| self.ranges.next()) else {
                break;
            };
            if range.length <= room {
                room -= range.length;
                chunk.push(range);
                continue;
            }
            chunk.push(MemoryRange {
                gpa: range.gpa,
                length: room,
            });
            self.rest = Some(MemoryRange {
                gpa: range.gpa.saturating_add(room),
                length: range.length - room,
            });
            room = 0;
        }
        (!chunk.is_empty()).then_some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Cursor};

    use super::*;

    fn bytes(write: impl FnOnce(&mut Vec<u8>) -> Result<(), MigratableError>) -> Vec<u8> {
        let mut v = Vec::new();
        write(&mut v).unwrap();
        v
    }

    fn request_bytes(r: &Request) -> Vec<u8> {
        bytes(|v| r.write_to(v))
    }

    fn response_bytes(r: &Response) -> Vec<u8> {
        bytes(|v| r.write_to(v))
    }

    fn table_bytes(t: &MemoryRangeTable) -> Vec<u8> {
        bytes(|v| t.write_to(v))
    }

    fn fields(r: &Request) -> (Command, [u8; 6], u64) {
        (r.command(), *r.command_headers(), r.length())
    }

    /// The error of a call that must fail (`Request` and `Response`, as
    /// upstream's, have no `Debug` for `unwrap_err`).
    fn refused<T>(result: Result<T, MigratableError>) -> MigratableError {
        match result {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    fn is_socket_error(e: &MigratableError) -> bool {
        matches!(e, MigratableError::MigrateSocket(_))
    }

    /// The message of the error's cause (its `Display` is the phase only).
    fn cause(e: &MigratableError) -> String {
        std::error::Error::source(e)
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    #[test]
    fn request_layout_is_16_le_bytes() {
        assert_eq!(
            request_bytes(&Request::config(0x0102_0304_0506_0708)),
            [2, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]
        );
        assert_eq!(
            request_bytes(&Request::device_state(0x0a0b)),
            [0, 1, 0x0b, 0x0a, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(
            request_bytes(&Request::switchover()),
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let s = Request::start();
        assert_eq!(request_bytes(&s)[..4], [1, 0, 0, 0]);
        assert_eq!(
            s.command_headers()[0..2],
            CURRENT_PROTOCOL_VERSION.to_le_bytes()
        );
    }

    #[test]
    fn response_layout_is_16_le_bytes() {
        assert_eq!(
            response_bytes(&Response::new(Status::Error, 0x10)),
            [2, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(response_bytes(&Response::ok())[0..2], [1, 0]);
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
            (Command::Switchover, 0x101),
            (Command::VerifySetup, 0x102),
            (Command::Digests, 0x103),
        ];
        for (command, value) in expected {
            assert_eq!(command as u16, value);
            assert_eq!(Command::from_wire(value), Some(command));
        }
        assert_eq!(
            [
                Status::Invalid as u16,
                Status::Ok as u16,
                Status::Error as u16
            ],
            [0, 1, 2]
        );
    }

    #[test]
    fn every_request_round_trips() {
        let all = [
            Request::start(),
            Request::start_with_features(ProtocolFeatures::all()),
            Request::config(17),
            Request::state(1 << 40),
            Request::memory(32),
            Request::memory_fd(8),
            Request::complete(),
            Request::complete_paused(),
            Request::abandon(),
            Request::page_fault(),
            Request::device_state(3),
            Request::switchover(),
            Request::new(Command::Invalid, 0),
        ];
        for r in all {
            let raw = request_bytes(&r);
            let back = Request::read_from(&mut Cursor::new(&raw)).unwrap();
            assert_eq!(fields(&back), fields(&r));
            assert_eq!(request_bytes(&back), raw);
        }
    }

    #[test]
    fn responses_round_trip_keeping_padding() {
        let mut raw = response_bytes(&Response::new(Status::Ok, 99));
        raw[2..8].copy_from_slice(&[1, 2, 3, 4, 5, 6]);
        let r = Response::read_from(&mut Cursor::new(&raw)).unwrap();
        assert_eq!((r.status(), r.length()), (Status::Ok, 99));
        assert_eq!(response_bytes(&r), raw);
    }

    #[test]
    fn unknown_command_is_rejected_naming_the_value() {
        let mut raw = request_bytes(&Request::complete());
        raw[0..2].copy_from_slice(&0x1234u16.to_le_bytes());
        let err = refused(Request::read_from(&mut Cursor::new(&raw)));
        assert!(matches!(err, MigratableError::MigrateReceive(_)));
        assert!(cause(&err).contains("0x1234"), "{}", cause(&err));
        raw[0..2].copy_from_slice(&10u16.to_le_bytes());
        assert!(Request::read_from(&mut Cursor::new(&raw)).is_err());
    }

    #[test]
    fn unknown_status_and_role_are_rejected() {
        let mut raw = response_bytes(&Response::ok());
        raw[0] = 3;
        let err = refused(Response::read_from(&mut Cursor::new(&raw)));
        assert!(cause(&err).contains("status 0x3"), "{}", cause(&err));
        let err = ConnectionRole::read_from(&mut Cursor::new(99u16.to_le_bytes())).unwrap_err();
        assert!(matches!(err, MigratableError::MigrateReceive(_)));
        assert!(cause(&err).contains("0x63"), "{}", cause(&err));
        assert!(ConnectionRole::try_from(0x100).is_err());
    }

    #[test]
    fn connection_roles_round_trip_as_u16() {
        for (role, value) in [
            (ConnectionRole::Invalid, 0u16),
            (ConnectionRole::PrecopyMemory, 1),
            (ConnectionRole::Fault, 2),
            (ConnectionRole::DeviceState, 3),
        ] {
            let raw = bytes(|v| role.write_to(v));
            assert_eq!(raw, value.to_le_bytes());
            assert_eq!(
                ConnectionRole::read_from(&mut Cursor::new(raw)).unwrap(),
                role
            );
            assert_eq!(ConnectionRole::try_from(value).unwrap(), role);
        }
    }

    #[test]
    fn truncated_headers_are_socket_errors() {
        let request = request_bytes(&Request::abandon());
        let response = response_bytes(&Response::ok());
        for len in 0..HEADER_BYTES {
            let err = refused(Request::read_from(&mut Cursor::new(&request[..len])));
            assert!(is_socket_error(&err), "{err:?}");
            let err = refused(Response::read_from(&mut Cursor::new(&response[..len])));
            assert!(is_socket_error(&err), "{err:?}");
        }
    }

    #[test]
    fn protocol_version_is_checked_without_panicking() {
        assert_eq!(
            Request::start().sender_protocol_version().unwrap(),
            CURRENT_PROTOCOL_VERSION
        );
        let mut raw = request_bytes(&Request::start());
        raw[2] = 0xff;
        // Bytes past the version play no part.
        raw[4..8].copy_from_slice(&[0xaa; 4]);
        let r = Request::read_from(&mut Cursor::new(&raw)).unwrap();
        let err = r.sender_protocol_version().unwrap_err();
        assert!(cause(&err).contains("version 255"), "{}", cause(&err));
        raw[2] = 0;
        let r = Request::read_from(&mut Cursor::new(&raw)).unwrap();
        assert!(r.sender_protocol_version().is_ok());
        // CH asserts here; a request that is no Start is an error.
        let err = Request::complete().sender_protocol_version().unwrap_err();
        assert!(cause(&err).contains("Complete"), "{}", cause(&err));
    }

    #[test]
    fn features_travel_in_bytes_old_peers_ignore() {
        assert_eq!(
            Request::start().sender_features(),
            ProtocolFeatures::empty()
        );
        let raw = request_bytes(&Request::start_with_features(
            ProtocolFeatures::DEVICE_STATE,
        ));
        // The version first, untouched; the features after it.
        assert_eq!(raw[2..4], CURRENT_PROTOCOL_VERSION.to_le_bytes());
        assert_eq!(raw[4..8], 1u32.to_le_bytes());
        let r = Request::read_from(&mut Cursor::new(&raw)).unwrap();
        assert_eq!(
            r.sender_protocol_version().unwrap(),
            CURRENT_PROTOCOL_VERSION
        );
        assert_eq!(r.sender_features(), ProtocolFeatures::DEVICE_STATE);

        // Bits this side does not know are dropped.
        let mut raw = raw;
        raw[4..8].copy_from_slice(&0x8000_0001u32.to_le_bytes());
        let r = Request::read_from(&mut Cursor::new(&raw)).unwrap();
        assert_eq!(r.sender_features(), ProtocolFeatures::DEVICE_STATE);

        let both = ProtocolFeatures::DEVICE_STATE | ProtocolFeatures::SWITCHOVER;
        let raw = request_bytes(&Request::start_with_features(both));
        assert_eq!(raw[4..8], 3u32.to_le_bytes());
        let r = Request::read_from(&mut Cursor::new(&raw)).unwrap();
        assert_eq!(r.sender_features(), both);
        let raw = response_bytes(&Response::ok_with_features(both));
        let r = Response::read_from(&mut Cursor::new(&raw)).unwrap();
        assert_eq!(r.features(), both);

        assert_eq!(Response::ok().features(), ProtocolFeatures::empty());
        let raw = response_bytes(&Response::ok_with_features(ProtocolFeatures::DEVICE_STATE));
        assert_eq!(raw[2..6], 1u32.to_le_bytes());
        let r = Response::read_from(&mut Cursor::new(&raw)).unwrap();
        assert_eq!((r.status(), r.length()), (Status::Ok, 0));
        assert_eq!(r.features(), ProtocolFeatures::DEVICE_STATE);
    }

    #[test]
    fn device_state_request_carries_index_and_delimits_itself() {
        let raw = request_bytes(&Request::device_state(7));
        let r = Request::read_from(&mut Cursor::new(&raw)).unwrap();
        assert_eq!(r.command(), Command::DeviceState);
        assert_eq!(r.device_index(), 7);
        assert_eq!(r.length(), DEVICE_STATE_SELF_DELIMITED);
    }

    #[test]
    fn ok_or_fatal_error_passes_only_ok() {
        assert!(Response::ok()
            .ok_or_fatal_error(MigratableError::MigrateSend(anyhow!("x")))
            .is_ok());
        for r in [Response::error(), Response::default()] {
            let e = refused(
                r.ok_or_fatal_error(MigratableError::MigrateSend(anyhow!("sending state"))),
            );
            assert_eq!(cause(&e), "sending state");
        }
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
        let raw = table_bytes(&t);
        assert_eq!(raw.len() as u64, t.length());
        assert_eq!(
            raw[0..16],
            [0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0]
        );
        let back = MemoryRangeTable::read_from(&mut Cursor::new(&raw), t.length()).unwrap();
        assert_eq!(back.ranges(), t.ranges());
        assert_eq!(back.effective_size(), 0x2001);
    }

    #[test]
    fn large_table_round_trips_across_write_batches() {
        let ranges: Vec<(u64, u64)> = (0..1000u64).map(|i| (i * 0x10000, 0x1000)).collect();
        let t = table(&ranges);
        let raw = table_bytes(&t);
        assert_eq!(raw.len(), 16_000);
        let back = MemoryRangeTable::read_from(&mut Cursor::new(raw), 16_000).unwrap();
        assert_eq!(back.ranges(), t.ranges());
    }

    #[test]
    fn table_length_must_be_aligned_and_bounded() {
        let mut empty = Cursor::new(Vec::<u8>::new());
        let err = MemoryRangeTable::read_from(&mut empty, 17).unwrap_err();
        assert!(
            cause(&err).contains("not a multiple of 16"),
            "{}",
            cause(&err)
        );
        // Refused before any read or allocation.
        for length in [1u64 << 63, u64::MAX - 15, (MAX_TABLE_RANGES + 1) * 16] {
            let err = MemoryRangeTable::read_from(&mut empty, length).unwrap_err();
            assert!(matches!(err, MigratableError::MigrateReceive(_)));
            assert!(cause(&err).contains("exceeds the limit"), "{}", cause(&err));
        }
        // The largest allowed table announced on a short stream fails on
        // the missing bytes, without reserving 16 MiB first.
        let err =
            MemoryRangeTable::read_from(&mut Cursor::new(vec![0u8; 32]), MAX_TABLE_RANGES * 16)
                .unwrap_err();
        assert!(is_socket_error(&err), "{err:?}");
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
        assert!(cause(&err).contains("past the end"), "{}", cause(&err));
        assert!(MemoryRange::read_from(&mut Cursor::new(&raw)).is_err());
        let edge = MemoryRange {
            gpa: u64::MAX,
            length: 0,
        };
        let raw = bytes(|v| edge.write_to(v));
        assert_eq!(MemoryRange::read_from(&mut Cursor::new(raw)).unwrap(), edge);
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
        // A run crossing a word boundary stays one range; a zero word ends it.
        let t =
            MemoryRangeTable::from_dirty_bitmap(vec![1 << 63, 1, 0, u64::MAX, 1 << 63], 0, page);
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
                MemoryRange {
                    gpa: 319 * page,
                    length: page
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
        // The pieces join into the original ranges.
        let mut flat: Vec<MemoryRange> = chunks.iter().flat_map(|c| c.ranges().to_vec()).collect();
        flat.sort_by_key(|r| r.gpa);
        let mut merged: Vec<MemoryRange> = Vec::new();
        for r in flat {
            match merged.last_mut() {
                Some(last) if last.gpa + last.length == r.gpa => last.length += r.length,
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
        let all = MemoryRangeTable::new_from_tables(vec![a, table(&[(9, 9)])]);
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
            // Bias some inputs towards known command and status values.
            if i % 3 == 0 && raw.len() >= 2 {
                raw[0] = (rng.next() % 11) as u8;
                raw[1] = 0;
            }
            if let Ok(r) = Request::read_from(&mut Cursor::new(&raw)) {
                assert_eq!(request_bytes(&r)[..], raw[..HEADER_BYTES]);
                let _ = r.sender_protocol_version();
                match r.command() {
                    Command::Start => drop(r.sender_features()),
                    Command::DeviceState => drop(r.device_index()),
                    _ => {}
                }
            }
            if let Ok(r) = Response::read_from(&mut Cursor::new(&raw)) {
                assert_eq!(response_bytes(&r)[..], raw[..HEADER_BYTES]);
                let _ = r.features();
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
                assert!(t
                    .ranges()
                    .iter()
                    .all(|r| r.gpa.checked_add(r.length).is_some()));
                assert_eq!(table_bytes(&t)[..], raw[..length as usize]);
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

    #[test]
    fn socket_errors_keep_the_io_error() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = Request::abandon().write_to(&mut Broken).unwrap_err();
        assert!(
            matches!(&err, MigratableError::MigrateSocket(e) if e.kind() == io::ErrorKind::BrokenPipe)
        );
    }
}
