// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Reading side: records in, verified device bytes out.

use std::io::{self, Read, Write};

use log::debug;

use super::{
    crc, decode_header, le_u32, le_u64, read_full, read_full_pair, Result, StateFormatError,
    StateHeader, MAX_ZERO_RUN, RECORD_DATA, RECORD_END, RECORD_HEADER_LEN, RECORD_ZERO, ZEROS,
};

/// What a decoder read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DecodeSummary {
    /// Device bytes the stream decodes to.
    pub decoded_bytes: u64,
    /// Encoded bytes consumed, header and END included.
    pub encoded_bytes: u64,
    /// Decoded bytes that came from ZERO records.
    pub zero_bytes: u64,
    pub data_records: u64,
    pub zero_records: u64,
    /// CRC32C of the decoded bytes (verified against END).
    pub crc: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Records,
    Done,
    Failed,
}

/// Verified bytes of the current record not yet handed out.
#[derive(Clone, Copy, Debug)]
enum Pending {
    Nothing,
    /// `buf[pos..end]`.
    Data {
        pos: usize,
        end: usize,
    },
    Zeros(u64),
}

/// What one record produced.
enum Step {
    /// `n` bytes went straight into the caller's buffer.
    Direct(usize),
    /// The record's bytes are in `pending`.
    Pending,
    End,
}

/// Decodes a device-state stream from `R`.
///
/// `Read` yields the device bytes; a record's bytes are returned only
/// after its checksum matched, and `Ok(0)` only after END matched the
/// decoded length and CRC. A stream that ends early is an error, never a
/// short read. The decoder reads nothing past END, so `R` may be a stream
/// that carries more after it (pass `&mut socket` to keep the socket).
pub struct StateDecoder<R: Read> {
    reader: R,
    header: StateHeader,
    buf: Vec<u8>,
    pending: Pending,
    phase: Phase,
    summary: DecodeSummary,
    /// The header after a DATA record, read together with its payload:
    /// every DATA record is followed by another record (END at least), so
    /// this never reads past END and halves the reads on a socket.
    next_head: Option<[u8; RECORD_HEADER_LEN]>,
}

impl<R: Read> StateDecoder<R> {
    /// Reads and validates the header.
    pub fn new(mut reader: R) -> Result<Self> {
        let mut offset = 0;
        let header = decode_header(&mut reader, &mut offset)?;
        debug!(
            "state stream: header {} {} flags {:#x} estimated {} chunk {}",
            header.device_kind,
            header.identity,
            header.migration_flags,
            header.estimated_size,
            header.chunk_size
        );
        Ok(StateDecoder {
            reader,
            header,
            buf: Vec::new(),
            pending: Pending::Nothing,
            phase: Phase::Records,
            summary: DecodeSummary {
                encoded_bytes: offset,
                ..Default::default()
            },
            next_head: None,
        })
    }

    pub fn header(&self) -> &StateHeader {
        &self.header
    }

    /// Decoded bytes verified so far (some may not be handed out yet).
    pub fn decoded_bytes(&self) -> u64 {
        self.summary.decoded_bytes
    }

    /// Encoded bytes consumed so far.
    pub fn encoded_offset(&self) -> u64 {
        self.summary.encoded_bytes
    }

    /// Capacity of the payload buffer; never above the header's chunk size.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Whether END has been read and verified.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Writes the rest of the decoded stream to `writer`, up to and
    /// including END's verification; returns the bytes written.
    pub fn copy_decoded<W: Write>(&mut self, writer: &mut W) -> Result<u64> {
        let mut written = 0u64;
        loop {
            match self.pending {
                Pending::Data { pos, end } => {
                    self.pending = Pending::Nothing;
                    if let Err(e) = writer.write_all(&self.buf[pos..end]) {
                        self.phase = Phase::Failed;
                        return Err(e.into());
                    }
                    written += (end - pos) as u64;
                }
                Pending::Zeros(mut left) => {
                    self.pending = Pending::Nothing;
                    while left > 0 {
                        let n = left.min(ZEROS.len() as u64) as usize;
                        if let Err(e) = writer.write_all(&ZEROS[..n]) {
                            self.phase = Phase::Failed;
                            return Err(e.into());
                        }
                        left -= n as u64;
                        written += n as u64;
                    }
                }
                Pending::Nothing => match self.phase {
                    Phase::Done => return Ok(written),
                    Phase::Failed => return Err(StateFormatError::Failed),
                    Phase::Records => {
                        self.advance(&mut [])?;
                    }
                },
            }
        }
    }

    /// Reads (and verifies) through END, discarding the data. The header's
    /// `estimated_size` is not checked: END's length and CRC are.
    pub fn finish(mut self) -> Result<DecodeSummary> {
        self.pending = Pending::Nothing;
        loop {
            match self.phase {
                Phase::Done => break,
                Phase::Failed => return Err(StateFormatError::Failed),
                Phase::Records => {
                    self.advance(&mut [])?;
                    self.pending = Pending::Nothing;
                }
            }
        }
        Ok(self.summary)
    }

    /// Reads one record; poisons the decoder on error.
    fn advance(&mut self, out: &mut [u8]) -> Result<Step> {
        match self.next_record(out) {
            Ok(Step::End) => {
                self.phase = Phase::Done;
                Ok(Step::End)
            }
            Ok(step) => Ok(step),
            Err(e) => {
                self.phase = Phase::Failed;
                self.pending = Pending::Nothing;
                Err(e)
            }
        }
    }

    /// Reads and verifies one record. A DATA payload lands in `out` when
    /// it fits (no copy), otherwise in the internal buffer.
    fn next_record(&mut self, out: &mut [u8]) -> Result<Step> {
        let (offset, head) = match self.next_head.take() {
            Some(head) => (self.summary.encoded_bytes - RECORD_HEADER_LEN as u64, head),
            None => {
                let offset = self.summary.encoded_bytes;
                let mut head = [0u8; RECORD_HEADER_LEN];
                read_full(&mut self.reader, &mut head, &mut self.summary.encoded_bytes)?;
                (offset, head)
            }
        };
        let ty = head[0];
        let reserved_zero = head[1..4] == [0, 0, 0];
        let length = le_u64(&head[4..12]);
        let value = le_u32(&head[12..16]);
        let stored_crc = le_u32(&head[16..20]);
        let malformed = |reason| StateFormatError::MalformedRecord { offset, reason };

        match ty {
            RECORD_DATA => {
                let max = u64::from(self.header.chunk_size);
                if length > max {
                    return Err(StateFormatError::RecordTooLarge {
                        offset,
                        len: length,
                        max,
                    });
                }
                // Bounded by chunk_size (<= 16 MiB) above.
                let len = length as usize;
                let direct = out.len() >= len;
                let payload: &mut [u8] = if direct {
                    &mut out[..len]
                } else {
                    if self.buf.len() < len {
                        // Exact, so the buffer never exceeds the chunk size.
                        self.buf.reserve_exact(len - self.buf.len());
                        self.buf.resize(len, 0);
                    }
                    &mut self.buf[..len]
                };
                // An empty DATA record is malformed; it is refused below
                // without reading further.
                if len > 0 {
                    let mut next = [0u8; RECORD_HEADER_LEN];
                    read_full_pair(
                        &mut self.reader,
                        payload,
                        &mut next,
                        &mut self.summary.encoded_bytes,
                    )?;
                    self.next_head = Some(next);
                }
                let payload_crc = crc32c::crc32c(payload);
                if crc32c::crc32c_append(payload_crc, &head[..16]) != stored_crc {
                    return Err(StateFormatError::RecordChecksum { offset });
                }
                if !reserved_zero || value != 0 {
                    return Err(malformed("reserved fields of a DATA record are not zero"));
                }
                if len == 0 {
                    return Err(malformed("empty DATA record"));
                }
                let s = &mut self.summary;
                s.crc = crc::extend(s.crc, payload, payload_crc);
                s.decoded_bytes = add_decoded(s.decoded_bytes, length, offset)?;
                s.data_records += 1;
                if direct {
                    Ok(Step::Direct(len))
                } else {
                    self.pending = Pending::Data { pos: 0, end: len };
                    Ok(Step::Pending)
                }
            }
            RECORD_ZERO | RECORD_END => {
                if crc32c::crc32c(&head[..16]) != stored_crc {
                    return Err(StateFormatError::RecordChecksum { offset });
                }
                if !reserved_zero {
                    return Err(malformed("reserved bytes of a record are not zero"));
                }
                let s = &mut self.summary;
                if ty == RECORD_ZERO {
                    if value != 0 {
                        return Err(malformed("value field of a ZERO record is not zero"));
                    }
                    if length == 0 {
                        return Err(malformed("empty ZERO record"));
                    }
                    if length > MAX_ZERO_RUN {
                        return Err(StateFormatError::RecordTooLarge {
                            offset,
                            len: length,
                            max: MAX_ZERO_RUN,
                        });
                    }
                    s.decoded_bytes = add_decoded(s.decoded_bytes, length, offset)?;
                    s.crc = crc::append_zeros(s.crc, length);
                    s.zero_bytes += length;
                    s.zero_records += 1;
                    self.pending = Pending::Zeros(length);
                    return Ok(Step::Pending);
                }
                if length != s.decoded_bytes {
                    return Err(StateFormatError::LengthMismatch {
                        what: "stream length recorded in END",
                        expected: length,
                        found: s.decoded_bytes,
                    });
                }
                if value != s.crc {
                    return Err(StateFormatError::StreamChecksum {
                        expected: value,
                        computed: s.crc,
                    });
                }
                debug!(
                    "state stream: END verified, {} bytes crc {:#010x}",
                    s.decoded_bytes, s.crc
                );
                Ok(Step::End)
            }
            other => Err(StateFormatError::UnknownRecordType { ty: other, offset }),
        }
    }
}

fn add_decoded(total: u64, more: u64, offset: u64) -> Result<u64> {
    total
        .checked_add(more)
        .ok_or(StateFormatError::MalformedRecord {
            offset,
            reason: "decoded length overflows 64 bits",
        })
}

impl<R: Read> Read for StateDecoder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match self.pending {
                Pending::Data { pos, end } => {
                    let n = (end - pos).min(out.len());
                    out[..n].copy_from_slice(&self.buf[pos..pos + n]);
                    self.pending = if pos + n == end {
                        Pending::Nothing
                    } else {
                        Pending::Data { pos: pos + n, end }
                    };
                    return Ok(n);
                }
                Pending::Zeros(left) => {
                    let n = left.min(out.len() as u64) as usize;
                    out[..n].fill(0);
                    self.pending = if left == n as u64 {
                        Pending::Nothing
                    } else {
                        Pending::Zeros(left - n as u64)
                    };
                    return Ok(n);
                }
                Pending::Nothing => match self.phase {
                    Phase::Done => return Ok(0),
                    Phase::Failed => return Err(StateFormatError::Failed.into()),
                    Phase::Records => {
                        if let Step::Direct(n) = self.advance(out)? {
                            return Ok(n);
                        }
                    }
                },
            }
        }
    }
}

/// Decodes `reader` to the end, discarding the data: checks every record
/// and END's length and CRC. For `inspect` and snapshot checks.
pub fn verify<R: Read>(reader: R) -> Result<DecodeSummary> {
    StateDecoder::new(reader)?.finish()
}
