// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! How both sides walk a window: its pieces in stream order, BAR pieces
//! cut into the pages the destination holds (taken from its copy) and
//! the bytes between them (sent in FILL). Both sides must cut alike, so
//! the cut lives here once.

use super::wire::{Piece, Window};
use crate::verify::digest::{Digest, PageDigester, PAGE_SIZE};
use crate::verify::wire::{push_page, PageRun};

const PAGE: u64 = PAGE_SIZE as u64;

/// One run of a window's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// `len` bytes that travel in FILL.
    Sent { len: u64 },
    /// The held BAR page at this offset.
    Held { page_offset: u64 },
}

/// The BAR pages a window's pieces cover whole, each inside one piece.
pub fn whole_pages(pieces: &[Piece]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut position = 0u64;
    pieces.iter().flat_map(move |p| {
        let at = position;
        position += p.len;
        let (first, end) = if p.is_raw() {
            (0, 0)
        } else {
            (p.offset.div_ceil(PAGE), (p.offset + p.len) / PAGE)
        };
        // (window position of the page, BAR offset of the page)
        (first..end.max(first)).map(move |page| (at + page * PAGE - p.offset, page * PAGE))
    })
}

/// Source: the window's description, hashing each whole page of `data`
/// (the window's stream bytes).
pub fn describe(pieces: Vec<Piece>, data: &[u8], digester: &PageDigester) -> Window {
    let mut runs: Vec<PageRun> = Vec::new();
    let mut digests: Vec<Digest> = Vec::new();
    for (at, page_offset) in whole_pages(&pieces) {
        let at = at as usize;
        digests.push(digester.digest(&data[at..at + PAGE_SIZE]));
        push_page(&mut runs, page_offset / PAGE);
    }
    Window {
        pieces,
        runs,
        digests,
    }
}

/// Cuts the window into segments, `held` saying which BAR pages the
/// destination holds.
pub fn segments(pieces: &[Piece], held: impl Fn(u64) -> bool) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let sent = |out: &mut Vec<Segment>, len: u64| {
        if len == 0 {
            return;
        }
        match out.last_mut() {
            Some(Segment::Sent { len: last }) => *last += len,
            _ => out.push(Segment::Sent { len }),
        }
    };
    for p in pieces {
        if p.is_raw() {
            sent(&mut out, p.len);
            continue;
        }
        let end = p.offset + p.len;
        let mut at = p.offset;
        while at < end {
            let page = at.div_ceil(PAGE) * PAGE;
            if page == at && at + PAGE <= end && held(at) {
                out.push(Segment::Held { page_offset: at });
                at += PAGE;
                continue;
            }
            // Up to the next page that could be held.
            let next = if page == at { at + PAGE } else { page };
            let stop = next.min(end);
            sent(&mut out, stop - at);
            at = stop;
        }
    }
    out
}

/// Whether `page_offset` is in `runs` (sorted, as both sides build them).
pub fn in_runs(runs: &[PageRun], page_offset: u64) -> bool {
    let i = runs.partition_point(|r| r.gpa + r.pages * PAGE <= page_offset);
    runs.get(i).is_some_and(|r| r.gpa <= page_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vram_precopy_cuts_pieces_alike_on_both_sides() {
        // A 24-byte header, then BAR bytes from 100 to 3 pages + 50.
        let pieces = [Piece::raw(24), Piece::bar(100, 3 * PAGE - 50)];
        let whole: Vec<_> = whole_pages(&pieces).collect();
        assert_eq!(
            whole,
            [(24 + PAGE - 100, PAGE), (24 + 2 * PAGE - 100, 2 * PAGE)]
        );
        let held = [PageRun {
            gpa: 2 * PAGE,
            pages: 1,
        }];
        let segs = segments(&pieces, |o| in_runs(&held, o));
        assert_eq!(
            segs,
            [
                Segment::Sent {
                    len: 24 + 2 * PAGE - 100
                },
                Segment::Held {
                    page_offset: 2 * PAGE
                },
                Segment::Sent { len: 50 },
            ]
        );
        let total: u64 = segs
            .iter()
            .map(|s| match s {
                Segment::Sent { len } => *len,
                Segment::Held { .. } => PAGE,
            })
            .sum();
        assert_eq!(total, 24 + 3 * PAGE - 50);
    }
}
