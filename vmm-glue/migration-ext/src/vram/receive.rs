// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The destination's side: pre-copied VRAM into a [`VramStore`]
//! ([`receive_precopy`]), then the device's stream rebuilt byte for byte
//! from the windows ([`Rebuild`]), read by the component's handle as if
//! it came straight from the source.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::Path;

use log::{debug, info};
use vm_migration::protocol::{Response, Status};

use super::send::WindowStats;
use super::store::{Held, VramStore};
use super::window::{self, in_runs, Segment};
use super::wire::{bad, le64, Begin, Frame, FrameKind, Window, BEGIN_LEN, MAX_DATA};
use crate::verify::digest::{PageDigester, PAGE_SIZE};
use crate::verify::wire::{mismatches_len, write_mismatches};

/// What pre-copy left on the destination.
pub struct Precopied {
    pub store: VramStore,
}

/// Destination: reads BEGIN, stores pre-copied VRAM in an unnamed file in
/// `dir` until PRECOPY_DONE. STREAM follows once the source paused
/// ([`read_stream_start`]).
pub fn receive_precopy<C: Read + ?Sized>(conn: &mut C, dir: &Path) -> io::Result<Precopied> {
    let frame = Frame::read_from(conn)?;
    frame.expect(FrameKind::Begin)?;
    if frame.len != BEGIN_LEN as u64 {
        return Err(bad(format!("BEGIN of {} bytes", frame.len)));
    }
    let mut raw = [0u8; BEGIN_LEN];
    conn.read_exact(&mut raw)?;
    let begin = Begin::decode(&raw)?;
    let digester = PageDigester::new(begin.function, &begin.key);
    let mut store = VramStore::create(dir, begin.bar_size, digester)?;
    let mut buf = Vec::new();
    loop {
        let frame = Frame::read_from(conn)?;
        match frame.kind {
            FrameKind::Data => {
                if !(9..=8 + MAX_DATA).contains(&frame.len) {
                    return Err(bad(format!("DATA of {} bytes", frame.len)));
                }
                let mut offset = [0u8; 8];
                conn.read_exact(&mut offset)?;
                buf.resize((frame.len - 8) as usize, 0);
                conn.read_exact(&mut buf)?;
                store.store(u64::from_le_bytes(offset), &buf)?;
            }
            FrameKind::Zero => {
                let mut raw = [0u8; 16];
                if frame.len != 16 {
                    return Err(bad(format!("ZERO of {} bytes", frame.len)));
                }
                conn.read_exact(&mut raw)?;
                store.store_zero(le64(&raw), le64(&raw[8..]))?;
            }
            FrameKind::PrecopyDone => {
                info!(
                    "VRAM pre-copy received: {} data bytes in the file, {} KiB of digests",
                    store.stored_bytes(),
                    store.table_bytes() >> 10
                );
                return Ok(Precopied { store });
            }
            other => return Err(bad(format!("{other:?} frame during VRAM pre-copy"))),
        }
    }
}

/// Destination: reads STREAM, sent once the source paused; returns the
/// component index it names.
pub fn read_stream_start<C: Read + ?Sized>(conn: &mut C) -> io::Result<u16> {
    let frame = Frame::read_from(conn)?;
    frame.expect(FrameKind::Stream)?;
    if frame.len != 2 {
        return Err(bad(format!("STREAM of {} bytes", frame.len)));
    }
    let mut index = [0u8; 2];
    conn.read_exact(&mut index)?;
    Ok(u16::from_le_bytes(index))
}

/// Destination: the component's stream, rebuilt from WINDOW and FILL
/// frames and the pages the store holds; ends at END.
pub struct Rebuild<'a, C: Read + Write> {
    conn: &'a mut C,
    store: &'a VramStore,
    out: Vec<u8>,
    at: usize,
    ended: bool,
    /// The source closed the connection between frames, before END.
    closed: bool,
    /// Windows described and answered, waiting for their FILL.
    described: VecDeque<(Window, Held)>,
    stats: WindowStats,
}

/// Most windows the source may describe before it fills them: the one it
/// fills next and the one described meanwhile.
const MAX_DESCRIBED: usize = 2;
/// Bytes of FILL read at a time (a FILL is many short runs when held
/// and changed pages alternate).
const FILL_BUFFER: usize = 1 << 20;

impl<'a, C: Read + Write> Rebuild<'a, C> {
    pub fn new(conn: &'a mut C, store: &'a VramStore) -> Self {
        Rebuild {
            conn,
            store,
            out: Vec::new(),
            at: 0,
            ended: false,
            closed: false,
            described: VecDeque::new(),
            stats: WindowStats::default(),
        }
    }

    /// Reads frames until a window is rebuilt into `out` (its FILL came),
    /// or END. A WINDOW is answered as soon as it is read: the source
    /// describes the next window before it fills the last.
    fn next_window(&mut self) -> io::Result<()> {
        loop {
            // A stream cut short between frames reads as a stream that
            // ends there: the component's own reader then says what it
            // misses.
            let Some(frame) = read_frame_or_eof(self.conn)? else {
                self.closed = true;
                return Ok(());
            };
            match frame.kind {
                FrameKind::Window => self.describe(frame.len)?,
                FrameKind::Fill => return self.fill(frame.len),
                FrameKind::End => return self.end(frame.len),
                other => return Err(bad(format!("{other:?} frame in a VRAM stream"))),
            }
        }
    }

    /// A WINDOW: answered with the pages the store holds, kept until its
    /// FILL.
    fn describe(&mut self, len: u64) -> io::Result<()> {
        if self.described.len() >= MAX_DESCRIBED {
            return Err(bad(format!(
                "more than {MAX_DESCRIBED} windows described and not filled"
            )));
        }
        let window = Window::read_from(self.conn, len)?;
        let held = if window.runs.is_empty() {
            Held::default()
        } else {
            let held = self.store.held(&window.runs, &window.digests)?;
            // One write: the source reads answers only between FILLs, and
            // many small writes can fill a socket's buffer by their
            // overhead alone.
            let mut answer = Vec::with_capacity(16 + mismatches_len(&held.runs) as usize);
            Response::new(Status::Ok, mismatches_len(&held.runs))
                .write_to(&mut answer)
                .map_err(io::Error::other)?;
            write_mismatches(&mut answer, &held.runs)?;
            self.conn.write_all(&answer)?;
            self.conn.flush()?;
            held
        };
        self.described.push_back((window, held));
        Ok(())
    }

    /// END: every window filled, and as many bytes as the source counted.
    fn end(&mut self, len: u64) -> io::Result<()> {
        if len != 8 {
            return Err(bad(format!("END of {len} bytes")));
        }
        if !self.described.is_empty() {
            return Err(bad("END before every window was filled".into()));
        }
        let mut raw = [0u8; 8];
        self.conn.read_exact(&mut raw)?;
        let total = u64::from_le_bytes(raw);
        if total != self.stats.stream_bytes {
            return Err(bad(format!(
                "END says {total} stream bytes, {} arrived",
                self.stats.stream_bytes
            )));
        }
        self.ended = true;
        Ok(())
    }

    /// A FILL: the oldest described window rebuilt from it and the held
    /// pages.
    fn fill(&mut self, len: u64) -> io::Result<()> {
        let (window, held) = self
            .described
            .pop_front()
            .ok_or_else(|| bad("FILL without a WINDOW".into()))?;
        let segments = window::segments(&window.pieces, |o| in_runs(&held.runs, o));
        let fill_len: u64 = segments
            .iter()
            .map(|s| match s {
                Segment::Sent { len } => *len,
                Segment::Held { .. } => 0,
            })
            .sum();
        if len != fill_len {
            return Err(bad(format!(
                "FILL of {len} bytes, the window needs {fill_len}"
            )));
        }
        self.out.clear();
        self.out.resize(window.stream_len() as usize, 0);
        // Read in large pieces, never past the FILL.
        let mut fill = io::BufReader::with_capacity(FILL_BUFFER, (&mut *self.conn).take(len));
        let mut at = 0usize;
        for s in segments {
            match s {
                Segment::Sent { len } => {
                    fill.read_exact(&mut self.out[at..at + len as usize])?;
                    at += len as usize;
                }
                Segment::Held { page_offset } => {
                    let page = held
                        .page(page_offset)
                        .ok_or_else(|| bad(format!("held page {page_offset:#x} not read")))?;
                    self.out[at..at + PAGE_SIZE].copy_from_slice(page);
                    at += PAGE_SIZE;
                }
            }
        }
        self.at = 0;
        self.stats.stream_bytes += self.out.len() as u64;
        self.stats.sent_bytes += fill_len;
        self.stats.held_bytes += self.out.len() as u64 - fill_len;
        self.stats.changed_pages +=
            window.digests.len() as u64 - held.runs.iter().map(|r| r.pages).sum::<u64>();
        self.stats.windows += 1;
        debug!(
            "VRAM window {}: {} bytes, {} from pre-copy",
            self.stats.windows,
            self.out.len(),
            self.out.len() as u64 - fill_len
        );
        Ok(())
    }

    /// Once the handle has read its state: everything up to END must have
    /// been read (the stream ends where the state does).
    pub fn finish(mut self) -> io::Result<WindowStats> {
        if self.at < self.out.len() {
            return Err(bad(format!(
                "{} stream bytes after the end of the state",
                self.out.len() - self.at
            )));
        }
        if !self.ended && !self.closed {
            self.next_window()?;
        }
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the source's stream ended without its END frame",
            ));
        }
        if !self.ended {
            return Err(bad("stream bytes after the end of the state".into()));
        }
        Ok(self.stats)
    }
}

/// A frame header, or `None` if the connection ended before its first
/// byte.
fn read_frame_or_eof<C: Read + ?Sized>(conn: &mut C) -> io::Result<Option<Frame>> {
    let mut first = [0u8; 1];
    loop {
        match conn.read(&mut first) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Frame::read_from(&mut (&first[..]).chain(conn)).map(Some)
}

impl<C: Read + Write> Read for Rebuild<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.out.len() {
            if self.ended || self.closed {
                return Ok(0);
            }
            self.next_window()?;
        }
        let n = buf.len().min(self.out.len() - self.at);
        buf[..n].copy_from_slice(&self.out[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
