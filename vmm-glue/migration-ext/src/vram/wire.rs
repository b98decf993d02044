// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Frames of a device-state connection that pre-copies VRAM (all
//! integers little-endian).
//!
//! ```text
//! frame header (16 bytes)
//!   0  u8       kind (below)
//!   1  [u8; 7]  reserved, 0
//!   8  u64      payload bytes that follow
//!
//! source -> destination, while the VM runs
//!   BEGIN   u16 digest function, u16 reserved, u32 page size (4096),
//!           u64 BAR bytes, [u8; 32] key
//!   DATA    u64 BAR offset (page aligned), then the bytes
//!   ZERO    u64 BAR offset (page aligned), u64 bytes
//!   PRECOPY_DONE  no payload
//! source -> destination, once the VM is paused
//!   STREAM  u16 component index on the wire
//!   WINDOW  u32 piece count P, u32 page run count R, P x { u64 BAR
//!           offset or RAW_PIECE, u64 bytes }, R x { u64 BAR offset,
//!           u64 pages }, one 16-byte digest per page of the runs
//!           (answered at once, if R > 0, with an Ok whose payload lists
//!           the runs the destination holds and matched)
//!   FILL    the bytes of the oldest window not filled yet that are not
//!           in its held pages, in order; the source describes window
//!           n + 1 before it fills window n, never further ahead
//!   END     u64 stream bytes
//! ```
//!
//! Everything read is bounded before it is allocated.

use std::io::{self, Read, Write};

use crate::verify::digest::{Digest, DigestFunction, DigestKey, DIGEST_LEN, KEY_LEN, PAGE_SIZE};
use crate::verify::wire::PageRun;

/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Most payload bytes of a DATA frame.
pub const MAX_DATA: u64 = 4 << 20;
/// Most stream bytes one WINDOW covers (what each side holds at once).
pub const MAX_WINDOW: u64 = 16 << 20;
/// Most pieces in a WINDOW (a piece is at least a byte; in practice a
/// container record's payload or header).
pub const MAX_PIECES: u32 = 1 << 16;
/// `offset` of a piece that is not BAR bytes.
pub const RAW_PIECE: u64 = u64::MAX;
/// Bytes of a BEGIN payload.
pub const BEGIN_LEN: usize = 16 + KEY_LEN;
/// Largest BAR a destination keeps digests for (its table is 4 MiB per
/// GiB, allocated at BEGIN): above any Xe VF's LMEM.
pub const MAX_BAR_SIZE: u64 = 64 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Begin = 1,
    Data = 2,
    Zero = 3,
    PrecopyDone = 4,
    Stream = 5,
    Window = 6,
    Fill = 7,
    End = 8,
}

impl FrameKind {
    fn from_wire(v: u8) -> Option<Self> {
        use FrameKind::*;
        [Begin, Data, Zero, PrecopyDone, Stream, Window, Fill, End]
            .into_iter()
            .find(|k| *k as u8 == v)
    }
}

/// A frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub len: u64,
}

impl Frame {
    pub fn new(kind: FrameKind, len: u64) -> Self {
        Frame { kind, len }
    }

    pub fn write_to<W: Write + ?Sized>(&self, out: &mut W) -> io::Result<()> {
        let mut raw = [0u8; FRAME_HEADER_LEN];
        raw[0] = self.kind as u8;
        raw[8..].copy_from_slice(&self.len.to_le_bytes());
        out.write_all(&raw)
    }

    pub fn read_from<R: Read + ?Sized>(input: &mut R) -> io::Result<Self> {
        let mut raw = [0u8; FRAME_HEADER_LEN];
        input.read_exact(&mut raw)?;
        let kind = FrameKind::from_wire(raw[0])
            .ok_or_else(|| bad(format!("unknown VRAM frame kind {:#x}", raw[0])))?;
        if raw[1..8].iter().any(|b| *b != 0) {
            return Err(bad("VRAM frame with non-zero reserved bytes".into()));
        }
        Ok(Frame {
            kind,
            len: le64(&raw[8..]),
        })
    }

    /// Fails unless this is a `kind` frame.
    pub fn expect(&self, kind: FrameKind) -> io::Result<()> {
        if self.kind != kind {
            return Err(bad(format!("{:?} frame where {kind:?} belongs", self.kind)));
        }
        Ok(())
    }
}

/// What the destination needs to store and check pre-copied VRAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    pub function: DigestFunction,
    pub key: DigestKey,
    pub bar_size: u64,
}

impl Begin {
    pub fn encode(&self) -> [u8; BEGIN_LEN] {
        let mut out = [0u8; BEGIN_LEN];
        out[..2].copy_from_slice(&(self.function as u16).to_le_bytes());
        out[4..8].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        out[8..16].copy_from_slice(&self.bar_size.to_le_bytes());
        out[16..].copy_from_slice(&self.key.0);
        out
    }

    pub fn decode(raw: &[u8]) -> io::Result<Self> {
        if raw.len() != BEGIN_LEN {
            return Err(bad(format!(
                "BEGIN of {} bytes, expected {BEGIN_LEN}",
                raw.len()
            )));
        }
        let function_raw = u16::from_le_bytes([raw[0], raw[1]]);
        let function = DigestFunction::from_wire(function_raw)
            .ok_or_else(|| bad(format!("unknown digest function {function_raw}")))?;
        let page = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        if page as usize != PAGE_SIZE {
            return Err(bad(format!("page size {page}, only {PAGE_SIZE} is known")));
        }
        let bar_size = le64(&raw[8..16]);
        if bar_size == 0 || bar_size > MAX_BAR_SIZE {
            return Err(bad(format!(
                "BAR of {bar_size} bytes (1..={MAX_BAR_SIZE} are taken)"
            )));
        }
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(&raw[16..]);
        Ok(Begin {
            function,
            key: DigestKey(key),
            bar_size,
        })
    }
}

/// A run of a window's stream bytes: BAR bytes at `offset`, or
/// [`RAW_PIECE`] bytes of anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
}

impl Piece {
    pub fn raw(len: u64) -> Self {
        Piece {
            offset: RAW_PIECE,
            len,
        }
    }

    pub fn bar(offset: u64, len: u64) -> Self {
        Piece { offset, len }
    }

    pub fn is_raw(&self) -> bool {
        self.offset == RAW_PIECE
    }
}

/// A window's description: its pieces in stream order, and the digests
/// of the BAR pages the pieces cover whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub pieces: Vec<Piece>,
    pub runs: Vec<PageRun>,
    pub digests: Vec<Digest>,
}

impl Window {
    /// Stream bytes the window covers.
    pub fn stream_len(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }

    pub fn encoded_len(&self) -> u64 {
        8 + 16 * (self.pieces.len() + self.runs.len()) as u64
            + (DIGEST_LEN * self.digests.len()) as u64
    }

    pub fn write_to<W: Write + ?Sized>(&self, out: &mut W) -> io::Result<()> {
        let mut raw = Vec::with_capacity(self.encoded_len() as usize);
        raw.extend_from_slice(&(self.pieces.len() as u32).to_le_bytes());
        raw.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for p in &self.pieces {
            raw.extend_from_slice(&p.offset.to_le_bytes());
            raw.extend_from_slice(&p.len.to_le_bytes());
        }
        for r in &self.runs {
            raw.extend_from_slice(&r.gpa.to_le_bytes());
            raw.extend_from_slice(&r.pages.to_le_bytes());
        }
        for d in &self.digests {
            raw.extend_from_slice(d);
        }
        out.write_all(&raw)
    }

    /// Reads a window of exactly `len` bytes, checking every bound.
    pub fn read_from<R: Read + ?Sized>(input: &mut R, len: u64) -> io::Result<Self> {
        let mut counts = [0u8; 8];
        if len < 8 {
            return Err(bad(format!("WINDOW of {len} bytes")));
        }
        input.read_exact(&mut counts)?;
        let pieces = u32::from_le_bytes([counts[0], counts[1], counts[2], counts[3]]);
        let runs = u32::from_le_bytes([counts[4], counts[5], counts[6], counts[7]]);
        if pieces == 0 || pieces > MAX_PIECES || runs > MAX_PIECES {
            return Err(bad(format!("WINDOW of {pieces} pieces and {runs} runs")));
        }
        let fixed = 8 + 16 * (u64::from(pieces) + u64::from(runs));
        if len < fixed || !(len - fixed).is_multiple_of(DIGEST_LEN as u64) {
            return Err(bad(format!(
                "WINDOW of {len} bytes for {pieces} pieces, {runs} runs"
            )));
        }
        let digest_count = (len - fixed) / DIGEST_LEN as u64;
        if digest_count > MAX_WINDOW / PAGE_SIZE as u64 {
            return Err(bad(format!("WINDOW with {digest_count} digests")));
        }
        let mut body = vec![0u8; (len - 8) as usize];
        input.read_exact(&mut body)?;
        let pair = |i: usize| (le64(&body[16 * i..]), le64(&body[16 * i + 8..]));
        let mut window = Window::default();
        let mut stream = 0u64;
        for i in 0..pieces as usize {
            let (offset, len) = pair(i);
            if len == 0 {
                return Err(bad("WINDOW with an empty piece".into()));
            }
            if offset != RAW_PIECE && offset.checked_add(len).is_none() {
                return Err(bad(format!("piece at {offset:#x} + {len:#x} overflows")));
            }
            stream = stream.saturating_add(len);
            window.pieces.push(Piece { offset, len });
        }
        if stream > MAX_WINDOW {
            return Err(bad(format!(
                "WINDOW of {stream} stream bytes, at most {MAX_WINDOW}"
            )));
        }
        let mut pages = 0u64;
        for i in 0..runs as usize {
            let (gpa, count) = pair(pieces as usize + i);
            if count == 0 || !gpa.is_multiple_of(PAGE_SIZE as u64) {
                return Err(bad(format!("page run {gpa:#x} x {count}")));
            }
            pages = pages.saturating_add(count);
            window.runs.push(PageRun { gpa, pages: count });
        }
        if pages != digest_count {
            return Err(bad(format!(
                "{pages} pages in runs but {digest_count} digests"
            )));
        }
        let digests = &body[16 * (pieces + runs) as usize..];
        window.digests = digests
            .chunks_exact(DIGEST_LEN)
            .map(|d| {
                let mut out = [0u8; DIGEST_LEN];
                out.copy_from_slice(d);
                out
            })
            .collect();
        Ok(window)
    }
}

pub(crate) fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

pub(crate) fn bad(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vram_precopy_frames_round_trip_and_bad_ones_are_named() {
        let begin = Begin {
            function: DigestFunction::Nh128,
            key: DigestKey([7; KEY_LEN]),
            bar_size: 1 << 30,
        };
        assert_eq!(Begin::decode(&begin.encode()).unwrap(), begin);
        let mut raw = begin.encode();
        raw[5] = 0;
        assert!(Begin::decode(&raw)
            .unwrap_err()
            .to_string()
            .contains("page size"));
        let huge = Begin {
            bar_size: MAX_BAR_SIZE + 1,
            ..begin.clone()
        };
        let e = Begin::decode(&huge.encode()).unwrap_err();
        assert!(e.to_string().contains("BAR of"), "{e}");

        let window = Window {
            pieces: vec![Piece::raw(24), Piece::bar(8192, 8192)],
            runs: vec![PageRun {
                gpa: 8192,
                pages: 2,
            }],
            digests: vec![[1; DIGEST_LEN], [2; DIGEST_LEN]],
        };
        let mut buf = Vec::new();
        window.write_to(&mut buf).unwrap();
        assert_eq!(buf.len() as u64, window.encoded_len());
        assert_eq!(
            Window::read_from(&mut &buf[..], buf.len() as u64).unwrap(),
            window
        );
        // One digest short of its runs.
        let e = Window::read_from(&mut &buf[..buf.len() - 16], buf.len() as u64 - 16).unwrap_err();
        assert!(
            e.to_string().contains("2 pages in runs but 1 digests"),
            "{e}"
        );

        let mut frame = Vec::new();
        Frame::new(FrameKind::Fill, 5).write_to(&mut frame).unwrap();
        assert_eq!(
            Frame::read_from(&mut &frame[..]).unwrap(),
            Frame::new(FrameKind::Fill, 5)
        );
        frame[0] = 0x42;
        let e = Frame::read_from(&mut &frame[..]).unwrap_err();
        assert!(
            e.to_string().contains("unknown VRAM frame kind 0x42"),
            "{e}"
        );
    }

    #[test]
    fn vram_precopy_window_refuses_more_than_it_may_hold() {
        let window = Window {
            pieces: vec![Piece::raw(MAX_WINDOW + 1)],
            ..Window::default()
        };
        let mut buf = Vec::new();
        window.write_to(&mut buf).unwrap();
        let e = Window::read_from(&mut &buf[..], buf.len() as u64).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
    }
}
