// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A protocol-aware pass-through for Cloud Hypervisor's migration stream.
//!
//! The nested test puts it between `send-migration` and the destination so
//! that it can (a) record which phases crossed the wire (does the device
//! state travel inside `State` or as its own streamed phase?) and (b) cut
//! the migration at an exact phase, e.g. kill the destination once the
//! `State` header went through, which no timing-based kill can hit
//! reliably under nested emulation.
//!
//! Only the source-to-destination direction is parsed: request headers,
//! the memory-range table of `Memory` and the guest bytes that follow it.
//! A command whose extent the relay cannot know (an unknown command, or a
//! self-delimited `DeviceState` stream) switches the rest of the
//! connection to an opaque byte copy, which is recorded.

use std::io::{self, Read, Write};

use serde::Serialize;
use thiserror::Error;
use xe_vf_glue::protocol::{Command, ConnectionRole, DEVICE_STATE_SELF_DELIMITED};

/// Bytes of a request header on the wire: `command: u16`,
/// `command_headers: [u8; 6]`, `length: u64`, little-endian (CH's
/// `vm-migration` protocol).
pub const HEADER_LEN: usize = 16;

/// Bytes of one `{gpa: u64, length: u64}` entry of a memory-range table.
pub const MEMORY_RANGE_LEN: usize = 16;

/// Most entries one table may carry, as CH's receiver allows.
pub const MAX_TABLE_RANGES: u64 = 1 << 20;

/// Every command of the protocol, to name the codes seen on the wire.
const COMMANDS: [Command; 14] = [
    Command::Invalid,
    Command::Start,
    Command::Config,
    Command::State,
    Command::Memory,
    Command::Complete,
    Command::Abandon,
    Command::MemoryFd,
    Command::CompletePaused,
    Command::PageFault,
    Command::DeviceState,
    Command::Switchover,
    Command::VerifySetup,
    Command::Digests,
];

fn command_of(code: u16) -> Option<Command> {
    COMMANDS.into_iter().find(|c| *c as u16 == code)
}

/// Payload bytes forwarded past a cut header when the payload length is not
/// known (self-delimited streams).
const DEFAULT_CUT_BYTES_UNKNOWN_LENGTH: u64 = 16;

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("migration stream I/O failed")]
    Io(#[from] io::Error),
    #[error("source closed the stream inside a request header ({0} of {HEADER_LEN} bytes)")]
    TruncatedHeader(usize),
    #[error("source closed the stream {missing} bytes before the end of {what}")]
    Truncated { what: String, missing: u64 },
    #[error("memory range table of {0} bytes is not a whole number of ranges")]
    TableMisaligned(u64),
    #[error("memory range table of {0} bytes exceeds the protocol's limit")]
    TableTooLarge(u64),
    #[error("a request of {0} payload bytes is too large to hold back")]
    TooLargeToHold(u64),
    #[error("memory range table names more than 2^64 bytes")]
    MemoryOverflow,
    #[error("memory range {gpa:#x}+{length:#x} runs past the end of the address space")]
    RangeOverflow { gpa: u64, length: u64 },
}

/// Most payload bytes of a request the relay holds back to forward whole
/// after cutting the source off ([`CutMode::AnswerLost`]): the requests
/// that matter there (`Complete`, `Switchover`) have none.
pub const MAX_HELD_PAYLOAD: u64 = 1 << 20;

/// Which side of the named request a cut falls on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CutMode {
    /// Inside it: its header and part of its payload reach the
    /// destination (`payload_bytes`).
    #[default]
    Inside,
    /// Before it: the source sent all of it, the destination gets none.
    Before,
    /// As `Before`, but both connections stay open, silent, for a while
    /// (the caller's): a destination that stopped answering.
    Stall,
    /// After it: the destination gets all of it, the source never gets
    /// the answer. The relay holds the request ([`Cut::held`]) so that
    /// its caller can cut the source off before forwarding it; forwarding
    /// it first would race the answer back.
    AnswerLost,
}

/// Parses a cut mode: `inside`, `before`, `answer-lost` or `stall`.
pub fn parse_cut_mode(text: &str) -> Result<CutMode, String> {
    match text {
        "inside" => Ok(CutMode::Inside),
        "before" => Ok(CutMode::Before),
        "answer-lost" => Ok(CutMode::AnswerLost),
        "stall" => Ok(CutMode::Stall),
        _ => Err(format!(
            "'{text}' is not a cut mode (inside, before, answer-lost, stall)"
        )),
    }
}

/// Where to cut a migration: at the first request with this command code,
/// on the side `mode` says; inside it, after forwarding its header and
/// `payload_bytes` of its payload (default: half of a known payload, else
/// 16 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CutPoint {
    pub command: u16,
    pub payload_bytes: Option<u64>,
    pub mode: CutMode,
}

impl CutPoint {
    fn forwarded_bytes(&self, length: u64) -> u64 {
        match self.payload_bytes {
            Some(n) => n.min(length),
            None if length == DEVICE_STATE_SELF_DELIMITED => DEFAULT_CUT_BYTES_UNKNOWN_LENGTH,
            None => length / 2,
        }
    }
}

/// Parses a command given by name (`state`, `device-state`, ...) or code.
pub fn parse_command(text: &str) -> Result<u16, String> {
    let named = match text.to_ascii_lowercase().replace('_', "-").as_str() {
        "start" => Some(Command::Start),
        "config" => Some(Command::Config),
        "state" => Some(Command::State),
        "memory" => Some(Command::Memory),
        "complete" => Some(Command::Complete),
        "abandon" => Some(Command::Abandon),
        "memory-fd" => Some(Command::MemoryFd),
        "complete-paused" => Some(Command::CompletePaused),
        "page-fault" => Some(Command::PageFault),
        "device-state" => Some(Command::DeviceState),
        "switchover" => Some(Command::Switchover),
        "verify-setup" => Some(Command::VerifySetup),
        "digests" => Some(Command::Digests),
        _ => None,
    };
    if let Some(command) = named {
        return Ok(command as u16);
    }
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("'{text}' is neither a migration command name nor a u16 code"))
}

/// Name of a command code for the report (`0x1234` when unknown).
pub fn command_name(code: u16) -> String {
    match command_of(code) {
        Some(command) => format!("{command:?}"),
        None => format!("{code:#x}"),
    }
}

/// Consecutive requests of one command, as seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Phase {
    pub command: String,
    pub code: u16,
    /// Requests in this run.
    pub count: u64,
    /// Bytes after the headers (for `Memory`: table plus guest bytes).
    pub bytes: u64,
}

/// The cut, if one happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cut {
    pub command: String,
    /// The request's `length` field.
    pub length: u64,
    /// Payload bytes forwarded before the cut (for
    /// [`CutMode::AnswerLost`]: all of them, by the caller, after it).
    pub forwarded: u64,
    /// [`CutMode::AnswerLost`]: the whole request, not forwarded yet.
    #[serde(skip)]
    pub held: Vec<u8>,
}

/// What crossed the wire from the source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WireReport {
    pub phases: Vec<Phase>,
    /// Guest bytes carried by `Memory` requests.
    pub memory_bytes: u64,
    pub cut: Option<Cut>,
    /// Command after which the rest was copied without parsing.
    pub opaque_from: Option<String>,
    /// Bytes copied without parsing.
    pub opaque_bytes: u64,
}

impl WireReport {
    fn record(&mut self, code: u16, bytes: u64) {
        if let Some(last) = self.phases.last_mut() {
            if last.code == code {
                last.count += 1;
                last.bytes = last.bytes.saturating_add(bytes);
                return;
            }
        }
        self.phases.push(Phase {
            command: command_name(code),
            code,
            count: 1,
            bytes,
        });
    }

    /// Whether a request with this command code was seen.
    pub fn saw(&self, code: u16) -> bool {
        self.phases.iter().any(|p| p.code == code)
    }
}

/// A request header as read: its bytes (forwarded verbatim, command
/// headers included), command code and payload length.
struct RawHeader {
    bytes: [u8; HEADER_LEN],
    code: u16,
    length: u64,
}

/// Reads a header; `None` on a clean end of stream before its first byte.
fn read_header<R: Read + ?Sized>(src: &mut R) -> Result<Option<RawHeader>, RelayError> {
    let mut bytes = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match src.read(&mut bytes[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(RelayError::TruncatedHeader(filled)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut length = [0u8; 8];
    length.copy_from_slice(&bytes[8..16]);
    Ok(Some(RawHeader {
        bytes,
        code: u16::from_le_bytes([bytes[0], bytes[1]]),
        length: u64::from_le_bytes(length),
    }))
}

/// Copies exactly `n` bytes.
fn copy_exact<R: Read + ?Sized, W: Write + ?Sized>(
    src: &mut R,
    dst: &mut W,
    n: u64,
    what: &str,
) -> Result<(), RelayError> {
    let copied = io::copy(&mut src.take(n), dst)?;
    if copied < n {
        return Err(RelayError::Truncated {
            what: what.to_string(),
            missing: n - copied,
        });
    }
    Ok(())
}

/// `(gpa, length)` of one table entry.
fn split_range(entry: &[u8; MEMORY_RANGE_LEN]) -> (u64, u64) {
    let mut gpa = [0u8; 8];
    let mut length = [0u8; 8];
    gpa.copy_from_slice(&entry[..8]);
    length.copy_from_slice(&entry[8..]);
    (u64::from_le_bytes(gpa), u64::from_le_bytes(length))
}

/// Forwards a `Memory` payload (`table_len` bytes of table, then the guest
/// bytes it names); returns the guest bytes.
fn forward_memory<R: Read + ?Sized, W: Write + ?Sized>(
    src: &mut R,
    dst: &mut W,
    table_len: u64,
) -> Result<u64, RelayError> {
    if !table_len.is_multiple_of(MEMORY_RANGE_LEN as u64) {
        return Err(RelayError::TableMisaligned(table_len));
    }
    if table_len / MEMORY_RANGE_LEN as u64 > MAX_TABLE_RANGES {
        return Err(RelayError::TableTooLarge(table_len));
    }
    let mut data: u64 = 0;
    let mut entry = [0u8; MEMORY_RANGE_LEN];
    for _ in 0..table_len / MEMORY_RANGE_LEN as u64 {
        src.read_exact(&mut entry).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => RelayError::Truncated {
                what: "a memory range table".to_string(),
                missing: MEMORY_RANGE_LEN as u64,
            },
            _ => RelayError::Io(e),
        })?;
        let (gpa, length) = split_range(&entry);
        if gpa.checked_add(length).is_none() {
            return Err(RelayError::RangeOverflow { gpa, length });
        }
        data = data.checked_add(length).ok_or(RelayError::MemoryOverflow)?;
        dst.write_all(&entry)?;
    }
    copy_exact(src, dst, data, "guest memory of a Memory request")?;
    Ok(data)
}

/// Forwards the source's requests from `src` to `dst` until the source
/// ends the stream, or up to and into the request named by `cut`.
/// Returns what went through; `report.cut` is set if the cut was reached.
pub fn forward_requests<R: Read + ?Sized, W: Write + ?Sized>(
    src: &mut R,
    dst: &mut W,
    cut: Option<CutPoint>,
) -> Result<WireReport, RelayError> {
    let mut report = WireReport::default();
    while let Some(RawHeader {
        bytes,
        code,
        length,
    }) = read_header(src)?
    {
        if let Some(cut) = cut.filter(|c| c.command == code) {
            report.cut = Some(cut_request(src, dst, cut, bytes, length)?);
            report.record(code, report.cut.as_ref().map_or(0, |c| c.forwarded));
            return Ok(report);
        }
        dst.write_all(&bytes)?;
        let known = command_of(code).is_some();
        if code == Command::Memory as u16 {
            let data = forward_memory(src, dst, length)?;
            report.memory_bytes = report.memory_bytes.saturating_add(data);
            report.record(code, length.saturating_add(data));
        } else if !known || length == DEVICE_STATE_SELF_DELIMITED {
            report.record(code, 0);
            report.opaque_from = Some(command_name(code));
            report.opaque_bytes = io::copy(src, dst)?;
            break;
        } else {
            copy_exact(
                src,
                dst,
                length,
                &format!("a {} payload", command_name(code)),
            )?;
            report.record(code, length);
        }
        dst.flush()?;
    }
    Ok(report)
}

/// Cuts at the request whose header `bytes` was just read, as `cut.mode`
/// says.
fn cut_request<R: Read + ?Sized, W: Write + ?Sized>(
    src: &mut R,
    dst: &mut W,
    cut: CutPoint,
    bytes: [u8; HEADER_LEN],
    length: u64,
) -> Result<Cut, RelayError> {
    let mut made = Cut {
        command: command_name(cut.command),
        length,
        forwarded: 0,
        held: Vec::new(),
    };
    match cut.mode {
        CutMode::Before | CutMode::Stall => {}
        CutMode::Inside => {
            dst.write_all(&bytes)?;
            made.forwarded = cut.forwarded_bytes(length);
            copy_exact(src, dst, made.forwarded, "the payload before the cut")?;
            dst.flush()?;
        }
        CutMode::AnswerLost => {
            if length > MAX_HELD_PAYLOAD {
                return Err(RelayError::TooLargeToHold(length));
            }
            made.held.extend_from_slice(&bytes);
            copy_exact(src, &mut made.held, length, "the request to hold")?;
            made.forwarded = length;
        }
    }
    Ok(made)
}

/// What an extra connection carried.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExtraReport {
    /// Its announced role (`PrecopyMemory`, `DeviceState`, ...).
    pub role: String,
    /// On a device-state connection: its request's command and the index
    /// of the component it is for.
    pub command: Option<String>,
    pub device_index: Option<u16>,
    /// Bytes after the role (and the request header, if read).
    pub bytes: u64,
    pub cut: Option<Cut>,
}

/// Forwards an extra connection from `src` to `dst`: its role, then, on a
/// device-state connection, its request header (cut there into the
/// payload if `cut` names `DeviceState`), then the rest as it is.
pub fn forward_extra<R: Read + ?Sized, W: Write + ?Sized>(
    src: &mut R,
    dst: &mut W,
    cut: Option<CutPoint>,
) -> Result<ExtraReport, RelayError> {
    let mut role = [0u8; 2];
    src.read_exact(&mut role)?;
    dst.write_all(&role)?;
    let role = u16::from_le_bytes(role);
    let mut report = ExtraReport {
        role: match ConnectionRole::try_from(role) {
            Ok(r) => format!("{r:?}"),
            Err(_) => format!("{role:#x}"),
        },
        ..ExtraReport::default()
    };
    if role == ConnectionRole::DeviceState as u16 {
        if let Some(RawHeader {
            bytes,
            code,
            length,
        }) = read_header(src)?
        {
            report.command = Some(command_name(code));
            report.device_index = Some(u16::from_le_bytes([bytes[2], bytes[3]]));
            if let Some(cut) = cut.filter(|c| c.command == code) {
                let made = cut_request(src, dst, cut, bytes, length)?;
                report.bytes = made.forwarded;
                report.cut = Some(made);
                return Ok(report);
            }
            dst.write_all(&bytes)?;
        }
    }
    report.bytes = io::copy(src, dst)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(code: u16, length: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&code.to_le_bytes());
        h[2] = 0x5a; // command headers travel untouched
        h[8..16].copy_from_slice(&length.to_le_bytes());
        h
    }

    fn request(code: u16, payload: &[u8]) -> Vec<u8> {
        let mut r = header(code, payload.len() as u64);
        r.extend_from_slice(payload);
        r
    }

    fn range(gpa: u64, length: u64) -> Vec<u8> {
        [gpa.to_le_bytes(), length.to_le_bytes()].concat()
    }

    fn memory(ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut table = Vec::new();
        for &(gpa, length) in ranges {
            table.extend_from_slice(&range(gpa, length));
        }
        let mut r = request(Command::Memory as u16, &table);
        for &(gpa, length) in ranges {
            r.extend((0..length).map(|i| (gpa + i) as u8));
        }
        r
    }

    /// Start, Config, two Memory passes, State, Complete.
    fn migration() -> (Vec<u8>, usize) {
        let mut s = request(Command::Start as u16, &[]);
        s.extend(request(Command::Config as u16, b"{\"config\":1}"));
        s.extend(memory(&[(0x1000, 300), (0x9000, 5)]));
        s.extend(memory(&[(0x2000, 7)]));
        let state_at = s.len();
        s.extend(request(Command::State as u16, &[7u8; 40]));
        s.extend(request(Command::Complete as u16, &[]));
        (s, state_at)
    }

    #[test]
    fn forwards_a_whole_migration_verbatim_and_records_its_phases() {
        let (stream, _) = migration();
        let mut out = Vec::new();
        let report = forward_requests(&mut stream.as_slice(), &mut out, None).unwrap();
        assert_eq!(out, stream);
        let seen: Vec<(&str, u64, u64)> = report
            .phases
            .iter()
            .map(|p| (p.command.as_str(), p.count, p.bytes))
            .collect();
        assert_eq!(
            seen,
            [
                ("Start", 1, 0),
                ("Config", 1, 12),
                ("Memory", 2, 32 + 305 + 16 + 7),
                ("State", 1, 40),
                ("Complete", 1, 0),
            ]
        );
        assert_eq!(report.memory_bytes, 312);
        assert_eq!(report.cut, None);
        assert!(report.saw(Command::State as u16));
        assert!(!report.saw(Command::DeviceState as u16));
    }

    #[test]
    fn cut_stops_inside_the_named_request() {
        let (stream, state_at) = migration();
        let mut out = Vec::new();
        let cut = CutPoint {
            command: Command::State as u16,
            payload_bytes: None,
            mode: CutMode::Inside,
        };
        let report = forward_requests(&mut stream.as_slice(), &mut out, Some(cut)).unwrap();
        // Everything before State, its header and half its payload.
        assert_eq!(out, stream[..state_at + HEADER_LEN + 20]);
        assert_eq!(
            report.cut,
            Some(Cut {
                command: "State".to_string(),
                length: 40,
                forwarded: 20,
                held: Vec::new(),
            })
        );
        assert!(!report.saw(Command::Complete as u16));
    }

    #[test]
    fn cut_with_explicit_byte_count_is_capped_by_the_payload() {
        let (stream, state_at) = migration();
        let mut out = Vec::new();
        let cut = CutPoint {
            command: Command::State as u16,
            payload_bytes: Some(1000),
            mode: CutMode::Inside,
        };
        let report = forward_requests(&mut stream.as_slice(), &mut out, Some(cut)).unwrap();
        assert_eq!(out, stream[..state_at + HEADER_LEN + 40]);
        assert_eq!(report.cut.unwrap().forwarded, 40);
    }

    #[test]
    fn self_delimited_device_state_is_copied_opaquely() {
        let mut stream = request(Command::Start as u16, &[]);
        stream.extend(header(
            Command::DeviceState as u16,
            DEVICE_STATE_SELF_DELIMITED,
        ));
        stream.extend(b"records of a device-state stream, then State and Complete");
        let mut out = Vec::new();
        let report = forward_requests(&mut stream.as_slice(), &mut out, None).unwrap();
        assert_eq!(out, stream);
        assert_eq!(report.opaque_from.as_deref(), Some("DeviceState"));
        assert_eq!(report.opaque_bytes, 57);
        assert!(report.saw(Command::DeviceState as u16));
    }

    #[test]
    fn cut_in_a_self_delimited_device_state_forwards_a_few_bytes() {
        let mut stream = request(Command::Start as u16, &[]);
        stream.extend(header(
            Command::DeviceState as u16,
            DEVICE_STATE_SELF_DELIMITED,
        ));
        stream.extend([9u8; 64]);
        let mut out = Vec::new();
        let cut = CutPoint {
            command: Command::DeviceState as u16,
            payload_bytes: None,
            mode: CutMode::Inside,
        };
        let report = forward_requests(&mut stream.as_slice(), &mut out, Some(cut)).unwrap();
        assert_eq!(out.len(), 2 * HEADER_LEN + 16);
        assert_eq!(report.cut.unwrap().command, "DeviceState");
    }

    #[test]
    fn truncated_streams_are_errors_that_say_where() {
        let (stream, state_at) = migration();
        let mut out = Vec::new();
        let err = forward_requests(&mut &stream[..state_at + 5], &mut out, None).unwrap_err();
        assert!(matches!(err, RelayError::TruncatedHeader(5)), "{err:?}");

        let mut out = Vec::new();
        let err = forward_requests(&mut &stream[..state_at + HEADER_LEN + 3], &mut out, None)
            .unwrap_err();
        assert!(
            matches!(err, RelayError::Truncated { missing: 37, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn hostile_memory_tables_are_refused() {
        let misaligned = request(Command::Memory as u16, &[0u8; 17]);
        let err = forward_requests(&mut misaligned.as_slice(), &mut Vec::new(), None).unwrap_err();
        assert!(matches!(err, RelayError::TableMisaligned(17)), "{err:?}");

        let huge = header(Command::Memory as u16, (MAX_TABLE_RANGES + 1) * 16);
        let err = forward_requests(&mut huge.as_slice(), &mut Vec::new(), None).unwrap_err();
        assert!(matches!(err, RelayError::TableTooLarge(_)), "{err:?}");

        let wrapping = request(Command::Memory as u16, &range(u64::MAX, 2));
        let err = forward_requests(&mut wrapping.as_slice(), &mut Vec::new(), None).unwrap_err();
        assert!(
            matches!(err, RelayError::RangeOverflow { length: 2, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn verify_pass_requests_are_parsed_not_copied_opaquely() {
        let mut stream = request(Command::Start as u16, &[]);
        stream.extend(request(Command::VerifySetup as u16, &[7u8; 40]));
        stream.extend(memory(&[(0, 4096)]));
        stream.extend(request(Command::Digests as u16, &[1u8; 24]));
        stream.extend(request(Command::State as u16, b"{}"));
        let mut out = Vec::new();
        let report = forward_requests(&mut &stream[..], &mut out, None).unwrap();
        assert_eq!(out, stream);
        assert_eq!(report.opaque_from, None);
        let names: Vec<&str> = report.phases.iter().map(|p| p.command.as_str()).collect();
        assert_eq!(
            names,
            ["Start", "VerifySetup", "Memory", "Digests", "State"]
        );
    }

    #[test]
    fn device_state_connections_are_named_and_cut_there() {
        let mut lane = (ConnectionRole::DeviceState as u16).to_le_bytes().to_vec();
        let mut request = header(Command::DeviceState as u16, DEVICE_STATE_SELF_DELIMITED);
        request[2..4].copy_from_slice(&1u16.to_le_bytes());
        lane.extend(&request);
        lane.extend([9u8; 100]);
        let mut out = Vec::new();
        let report = forward_extra(&mut &lane[..], &mut out, None).unwrap();
        assert_eq!(out, lane);
        assert_eq!(report.role, "DeviceState");
        assert_eq!(report.command.as_deref(), Some("DeviceState"));
        assert_eq!(report.device_index, Some(1));
        assert_eq!(report.bytes, 100);

        let mut out = Vec::new();
        let cut = CutPoint {
            command: Command::DeviceState as u16,
            payload_bytes: None,
            mode: CutMode::Inside,
        };
        let report = forward_extra(&mut &lane[..], &mut out, Some(cut)).unwrap();
        assert_eq!(out.len(), 2 + HEADER_LEN + 16);
        assert_eq!(report.cut.unwrap().forwarded, 16);

        // A memory connection passes through as it is.
        let mut memory = (ConnectionRole::PrecopyMemory as u16)
            .to_le_bytes()
            .to_vec();
        memory.extend([1u8; 64]);
        let mut out = Vec::new();
        let report = forward_extra(&mut &memory[..], &mut out, Some(cut)).unwrap();
        assert_eq!(out, memory);
        assert_eq!(
            (report.role.as_str(), report.command),
            ("PrecopyMemory", None)
        );
    }

    #[test]
    fn cut_before_forwards_nothing_of_the_named_request() {
        let (stream, _) = migration();
        let complete_at = stream.len() - HEADER_LEN;
        let mut out = Vec::new();
        let cut = CutPoint {
            command: Command::Complete as u16,
            payload_bytes: None,
            mode: CutMode::Before,
        };
        let report = forward_requests(&mut stream.as_slice(), &mut out, Some(cut)).unwrap();
        assert_eq!(out, stream[..complete_at]);
        let made = report.cut.unwrap();
        assert_eq!((made.command.as_str(), made.forwarded), ("Complete", 0));
        assert!(made.held.is_empty());
    }

    #[test]
    fn answer_lost_holds_the_whole_request_for_the_caller() {
        let (stream, state_at) = migration();
        let mut out = Vec::new();
        let cut = CutPoint {
            command: Command::State as u16,
            payload_bytes: Some(3),
            mode: CutMode::AnswerLost,
        };
        let report = forward_requests(&mut stream.as_slice(), &mut out, Some(cut)).unwrap();
        // Nothing of State went out; all of it is held, payload_bytes aside.
        assert_eq!(out, stream[..state_at]);
        let made = report.cut.unwrap();
        assert_eq!(made.held, stream[state_at..state_at + HEADER_LEN + 40]);
        assert_eq!(made.forwarded, 40);
    }

    #[test]
    fn answer_lost_refuses_to_hold_a_large_request() {
        let mut stream = header(Command::State as u16, MAX_HELD_PAYLOAD + 1);
        stream.extend([0u8; 64]);
        let cut = CutPoint {
            command: Command::State as u16,
            payload_bytes: None,
            mode: CutMode::AnswerLost,
        };
        let e = forward_requests(&mut stream.as_slice(), &mut Vec::new(), Some(cut)).unwrap_err();
        assert!(
            matches!(e, RelayError::TooLargeToHold(n) if n == MAX_HELD_PAYLOAD + 1),
            "{e}"
        );
    }

    #[test]
    fn cut_modes_parse_by_name() {
        assert_eq!(parse_cut_mode("before"), Ok(CutMode::Before));
        assert_eq!(parse_cut_mode("answer-lost"), Ok(CutMode::AnswerLost));
        assert_eq!(parse_cut_mode("inside"), Ok(CutMode::Inside));
        assert_eq!(parse_cut_mode("stall"), Ok(CutMode::Stall));
        assert!(parse_cut_mode("after").unwrap_err().contains("'after'"));
    }

    #[test]
    fn commands_parse_by_name_and_code() {
        assert_eq!(parse_command("state"), Ok(3));
        assert_eq!(parse_command("device-state"), Ok(0x100));
        assert_eq!(parse_command("DEVICE_STATE"), Ok(0x100));
        assert_eq!(parse_command("0x100"), Ok(0x100));
        assert_eq!(parse_command("switchover"), Ok(0x101));
        assert_eq!(parse_command("verify-setup"), Ok(0x102));
        assert_eq!(parse_command("digests"), Ok(0x103));
        assert_eq!(parse_command("5"), Ok(5));
        assert!(parse_command("stat").is_err());
        assert_eq!(command_name(0x1234), "0x1234");
        assert_eq!(command_name(0x101), "Switchover");
    }
}
