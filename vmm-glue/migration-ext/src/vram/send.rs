// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The source's side: VRAM read through the BAR while the VM runs
//! ([`precopy`]), and the device's real stop-copy stream sent as windows
//! of which only what the destination lacks travels ([`WindowWriter`]).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use log::debug;
use vm_migration::protocol::{Response, Status};

use super::window::{self, in_runs, Segment};
use super::wire::{Begin, Frame, FrameKind, Piece, MAX_DATA, MAX_WINDOW};
use crate::connection::read_message;
use crate::verify::digest::{PageDigester, PAGE_SIZE};
use crate::verify::wire::read_mismatches;

const PAGE: u64 = PAGE_SIZE as u64;
/// Bytes of FILL written at a time.
const FILL_BUFFER: usize = 1 << 20;

/// A VF's VRAM as the VMM maps it: its memory BAR. Reading device
/// memory has no side effect, so it can be read while the VF runs.
pub trait BarSource: Send + Sync {
    /// Bytes of the BAR.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// Where a component's state stream carries BAR bytes. Only a hint:
/// a wrong one costs bytes sent, never a wrong byte (every page is
/// compared by digest of the stream's own bytes).
pub trait StreamLayout: Send {
    /// The pieces of the stream's next bytes, `data`, in order; their
    /// lengths add up to `data.len()`.
    fn map(&mut self, data: &[u8], out: &mut Vec<Piece>);
}

/// What one pre-copy pass read and sent.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrecopyReport {
    /// BAR bytes read.
    pub read_bytes: u64,
    /// Of those, sent as data (the rest were zero pages).
    pub data_bytes: u64,
    pub elapsed: Duration,
    /// Stopped before the end of the BAR.
    pub stopped: bool,
}

/// Sends BEGIN, then the BAR read in [`MAX_DATA`] steps (zero pages as
/// ZERO), then PRECOPY_DONE; stops early, still with PRECOPY_DONE, once
/// `stop` is set.
pub fn precopy<W: Write + ?Sized>(
    conn: &mut W,
    bar: &dyn BarSource,
    begin: &Begin,
    stop: &AtomicBool,
) -> io::Result<PrecopyReport> {
    let started = Instant::now();
    let mut report = PrecopyReport::default();
    // Frames are small where zero and data pages alternate: written in
    // large pieces.
    let mut conn = io::BufWriter::with_capacity(FILL_BUFFER, conn);
    let conn = &mut conn;
    let raw = begin.encode();
    Frame::new(FrameKind::Begin, raw.len() as u64).write_to(conn)?;
    conn.write_all(&raw)?;
    let mut buf = vec![0u8; MAX_DATA as usize];
    let mut offset = 0u64;
    while offset < bar.size() {
        if stop.load(Ordering::Relaxed) {
            report.stopped = true;
            break;
        }
        let n = (bar.size() - offset).min(MAX_DATA) as usize;
        bar.read_at(&mut buf[..n], offset)?;
        report.read_bytes += n as u64;
        report.data_bytes += send_pages(conn, &buf[..n], offset)?;
        offset += n as u64;
    }
    Frame::new(FrameKind::PrecopyDone, 0).write_to(conn)?;
    conn.flush()?;
    report.elapsed = started.elapsed();
    debug!("VRAM pre-copy: {report:?}");
    Ok(report)
}

/// Sends `data` read at `offset` as DATA and ZERO frames; returns the
/// data bytes.
fn send_pages<W: Write + ?Sized>(conn: &mut W, data: &[u8], offset: u64) -> io::Result<u64> {
    let mut sent = 0;
    let mut run_start = 0usize;
    let mut run_zero = None;
    let mut flush = |conn: &mut W, from: usize, to: usize, zero: bool| -> io::Result<()> {
        let at = offset + from as u64;
        if zero {
            Frame::new(FrameKind::Zero, 16).write_to(conn)?;
            conn.write_all(&at.to_le_bytes())?;
            conn.write_all(&((to - from) as u64).to_le_bytes())
        } else {
            Frame::new(FrameKind::Data, 8 + (to - from) as u64).write_to(conn)?;
            conn.write_all(&at.to_le_bytes())?;
            conn.write_all(&data[from..to])?;
            sent += (to - from) as u64;
            Ok(())
        }
    };
    for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
        let zero = page.iter().all(|b| *b == 0);
        match run_zero {
            Some(z) if z == zero => {}
            Some(z) => {
                flush(conn, run_start, i * PAGE_SIZE, z)?;
                run_start = i * PAGE_SIZE;
                run_zero = Some(zero);
            }
            None => run_zero = Some(zero),
        }
    }
    if let Some(z) = run_zero {
        flush(conn, run_start, data.len(), z)?;
    }
    Ok(sent)
}

/// What the stop-copy stream cost on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// The device's stream bytes.
    pub stream_bytes: u64,
    /// Of those, sent (FILL).
    pub sent_bytes: u64,
    /// Taken from the destination's pre-copied VRAM.
    pub held_bytes: u64,
    /// VRAM pages compared that the destination did not hold: changed
    /// since pre-copy read them (or never pre-copied).
    pub changed_pages: u64,
    pub windows: u64,
}

/// Source: the component's stream, written into this, goes out as
/// windows: each described (pieces and page digests), answered with the
/// pages the destination holds, then filled with the rest.
pub struct WindowWriter<'a, C: Read + Write> {
    conn: &'a mut C,
    layout: &'a mut dyn StreamLayout,
    /// `None`: nothing is compared, every byte is sent (the rates said
    /// comparing does not pay).
    digester: Option<&'a PageDigester>,
    data: Vec<u8>,
    pieces: Vec<Piece>,
    mapped: Vec<Piece>,
    /// The window described last, not filled yet, with its bytes.
    described: Option<(super::wire::Window, Vec<u8>)>,
    stats: WindowStats,
}

impl<'a, C: Read + Write> WindowWriter<'a, C> {
    /// Sends STREAM for component `index`; pages are compared by
    /// `digester`'s digests, or not at all without one.
    pub fn start(
        conn: &'a mut C,
        index: u16,
        layout: &'a mut dyn StreamLayout,
        digester: Option<&'a PageDigester>,
    ) -> io::Result<Self> {
        Frame::new(FrameKind::Stream, 2).write_to(conn)?;
        conn.write_all(&index.to_le_bytes())?;
        Ok(WindowWriter {
            conn,
            layout,
            digester,
            data: Vec::new(),
            pieces: Vec::new(),
            mapped: Vec::new(),
            described: None,
            stats: WindowStats::default(),
        })
    }

    fn push(&mut self, piece: Piece) {
        if let Some(last) = self.pieces.last_mut() {
            let joins = if last.is_raw() {
                piece.is_raw()
            } else {
                !piece.is_raw() && last.offset + last.len == piece.offset
            };
            if joins {
                last.len += piece.len;
                return;
            }
        }
        self.pieces.push(piece);
    }

    /// Describes the window collected so far (sends WINDOW), then fills
    /// the one described before it: the destination looks up this
    /// window's pages while the source waits for nothing (at most two
    /// windows are described and not filled, [`super::wire`]).
    fn send_window(&mut self) -> io::Result<()> {
        if self.data.is_empty() {
            return Ok(());
        }
        let pieces = std::mem::take(&mut self.pieces);
        let window = match self.digester {
            Some(digester) => window::describe(pieces, &self.data, digester),
            None => super::wire::Window {
                pieces,
                ..Default::default()
            },
        };
        Frame::new(FrameKind::Window, window.encoded_len()).write_to(self.conn)?;
        window.write_to(self.conn)?;
        self.conn.flush()?;
        let data = std::mem::take(&mut self.data);
        if let Some(earlier) = self.described.replace((window, data)) {
            self.fill(earlier)?;
        }
        Ok(())
    }

    /// Reads the answer to a described window (if it asked one) and sends
    /// its FILL.
    fn fill(&mut self, (window, data): (super::wire::Window, Vec<u8>)) -> io::Result<()> {
        let held = if window.runs.is_empty() {
            Vec::new()
        } else {
            let answer = read_window_answer(self.conn)?;
            let held = read_mismatches(self.conn, answer.length())?;
            for run in &held {
                for p in 0..run.pages {
                    if !in_runs(&window.runs, run.gpa + p * PAGE) {
                        return Err(io::Error::other(format!(
                            "the destination holds page {:#x}, which the window did not offer",
                            run.gpa + p * PAGE
                        )));
                    }
                }
            }
            held
        };
        let segments = window::segments(&window.pieces, |o| in_runs(&held, o));
        let fill: u64 = segments
            .iter()
            .map(|s| match s {
                Segment::Sent { len } => *len,
                Segment::Held { .. } => 0,
            })
            .sum();
        // Written in large pieces: a FILL is many short runs when held and
        // changed pages alternate.
        let mut out = io::BufWriter::with_capacity(FILL_BUFFER, &mut *self.conn);
        Frame::new(FrameKind::Fill, fill).write_to(&mut out)?;
        let mut at = 0usize;
        for s in segments {
            match s {
                Segment::Sent { len } => {
                    out.write_all(&data[at..at + len as usize])?;
                    at += len as usize;
                }
                Segment::Held { .. } => at += PAGE_SIZE,
            }
        }
        out.flush()?;
        drop(out);
        self.stats.stream_bytes += data.len() as u64;
        self.stats.sent_bytes += fill;
        self.stats.held_bytes += data.len() as u64 - fill;
        self.stats.changed_pages +=
            window.digests.len() as u64 - held.iter().map(|r| r.pages).sum::<u64>();
        self.stats.windows += 1;
        // The next window reuses the buffers.
        let (mut data, mut pieces) = (data, window.pieces);
        data.clear();
        pieces.clear();
        self.data = data;
        self.pieces = pieces;
        Ok(())
    }

    /// Describes what is left and fills every described window.
    fn flush_windows(&mut self) -> io::Result<()> {
        self.send_window()?;
        if let Some(last) = self.described.take() {
            self.fill(last)?;
        }
        Ok(())
    }

    /// Sends what is left and END; returns what the stream cost.
    pub fn finish(mut self) -> io::Result<WindowStats> {
        self.flush_windows()?;
        Frame::new(FrameKind::End, 8).write_to(self.conn)?;
        self.conn
            .write_all(&self.stats.stream_bytes.to_le_bytes())?;
        self.conn.flush()?;
        Ok(self.stats)
    }

    /// The component's stream failed: sends what it wrote so far, without
    /// END, so the destination sees the same truncated stream it would
    /// have without windows.
    pub fn abandon(mut self) -> WindowStats {
        if let Err(e) = self.flush_windows().and_then(|()| self.conn.flush()) {
            debug!("VRAM stream: sending the last window of a failed stream: {e}");
        }
        self.stats
    }

    pub fn stats(&self) -> WindowStats {
        self.stats
    }
}

impl<C: Read + Write> Write for WindowWriter<'_, C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // At most the room left in the window, so a window never
        // exceeds MAX_WINDOW.
        let room = (MAX_WINDOW as usize).saturating_sub(self.data.len());
        let buf = &buf[..buf.len().min(room.max(1))];
        if buf.is_empty() {
            return Ok(0);
        }
        self.mapped.clear();
        self.layout.map(buf, &mut self.mapped);
        let mapped: u64 = self.mapped.iter().map(|p| p.len).sum();
        let pieces = std::mem::take(&mut self.mapped);
        if mapped == buf.len() as u64 {
            for p in pieces.iter().filter(|p| p.len > 0) {
                self.push(*p);
            }
        } else {
            // A layout that lost count: these bytes go as they are.
            self.push(Piece::raw(buf.len() as u64));
        }
        self.mapped = pieces;
        self.data.extend_from_slice(buf);
        if self.data.len() as u64 >= MAX_WINDOW {
            self.send_window()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// After END: the destination's plain `Ok` once its component loaded the
/// stream, or its reason for refusing it.
pub fn expect_stream_loaded<C: Read + ?Sized>(conn: &mut C) -> io::Result<()> {
    let answer = read_window_answer(conn)?;
    if answer.length() != 0 {
        return Err(io::Error::other(format!(
            "the destination's Ok carries {} unexpected bytes",
            answer.length()
        )));
    }
    Ok(())
}

/// The destination's answer to a WINDOW (`Ok` with the held pages) or to
/// the whole stream (`Ok`), or its reason for giving up, worded as a
/// refusal mid-stream is elsewhere ("the destination said: ...").
fn read_window_answer<C: Read + ?Sized>(conn: &mut C) -> io::Result<Response> {
    let mut conn = conn;
    let response = Response::read_from(&mut conn).map_err(io::Error::other)?;
    match response.status() {
        Status::Ok => Ok(response),
        _ => Err(io::Error::other(format!(
            "the destination said: {}",
            read_message(&mut conn, &response).unwrap_or_else(|| "Error".into())
        ))),
    }
}
