// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The destination's digest of every page as it arrives.
//!
//! Created with the migration and shared by every connection that writes
//! guest memory; switched on by `VerifySetup`. Each connection records
//! the bytes it just wrote ([`Arrivals::record`], or
//! [`Arrivals::record_range`] re-reading them from guest memory), so the
//! table always holds the digest of what arrived last. A page written in
//! part loses its digest: it then counts as changed, which costs a resend,
//! never a wrong page.

use std::cell::RefCell;
use std::io;
use std::sync::OnceLock;

use vm_migration::protocol::MemoryRange;

use super::digest::{PageDigester, PAGE_SIZE};
use super::parallel::PageSource;
use super::table::DigestTable;
use super::wire::{push_page, DigestBatch, PageRun, VerifySetup};

const PAGE: u64 = PAGE_SIZE as u64;

/// One guest memory region and the digests of its pages.
struct Region {
    start: u64,
    len: u64,
    table: DigestTable,
}

struct Enabled {
    digester: PageDigester,
    regions: Vec<Region>,
}

impl Enabled {
    /// The region holding page `page` (a global page number) and the
    /// page's index in it.
    fn locate(&self, page: u64) -> Option<(&Region, u64)> {
        let gpa = page.checked_mul(PAGE)?;
        self.regions
            .iter()
            .find(|r| gpa >= r.start && gpa - r.start < r.len)
            .map(|r| (r, (gpa - r.start) / PAGE))
    }
}

/// Digests of arrived pages; see the module documentation.
#[derive(Default)]
pub struct Arrivals {
    enabled: OnceLock<Enabled>,
}

impl Arrivals {
    pub fn new() -> Self {
        Arrivals::default()
    }

    /// From now on, pages that arrive in `regions` (guest memory; page
    /// aligned) are hashed with `setup`'s function and key. Only the first
    /// call counts; it returns whether it was the first.
    pub fn enable(&self, setup: &VerifySetup, regions: &[MemoryRange]) -> bool {
        self.enabled
            .set(Enabled {
                digester: PageDigester::new(setup.function, &setup.key),
                regions: regions
                    .iter()
                    .map(|r| Region {
                        start: r.gpa,
                        len: r.length,
                        table: DigestTable::new(r.length),
                    })
                    .collect(),
            })
            .is_ok()
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.get().is_some()
    }

    /// Heap bytes of the digest tables (0 until enabled).
    pub fn table_bytes(&self) -> u64 {
        self.enabled
            .get()
            .map_or(0, |e| e.regions.iter().map(|r| r.table.heap_bytes()).sum())
    }

    /// `data` was just written at `gpa`: records the digest of every page
    /// it covers whole, forgets those it covers in part.
    pub fn record(&self, gpa: u64, data: &[u8]) {
        let Some(e) = self.enabled.get() else {
            return;
        };
        let Some(end) = gpa.checked_add(data.len() as u64) else {
            return;
        };
        let first = gpa / PAGE;
        let last = end.div_ceil(PAGE);
        for page in first..last {
            let Some((region, index)) = e.locate(page) else {
                continue;
            };
            let page_start = page * PAGE;
            if page_start >= gpa && page_start + PAGE <= end {
                let at = (page_start - gpa) as usize;
                let digest = e.digester.digest(&data[at..at + PAGE_SIZE]);
                region.table.set(index, &digest);
            } else {
                region.table.invalidate(index);
            }
        }
    }

    /// Like [`Arrivals::record`] for `range` of `memory`, which was just
    /// written there; read back in pieces of at most 1 MiB.
    pub fn record_range(&self, memory: &dyn PageSource, range: &MemoryRange) -> io::Result<()> {
        if !self.is_enabled() || range.length == 0 {
            return Ok(());
        }
        thread_local! {
            static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.is_empty() {
                buf.resize(1 << 20, 0);
            }
            // Pieces start page aligned (after the first), so only the
            // range's own ragged ends lose digests.
            let end = range
                .gpa
                .checked_add(range.length)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range wraps"))?;
            let mut at = range.gpa;
            while at < end {
                let piece_end = ((at / PAGE + 1) * PAGE + buf.len() as u64 - PAGE).min(end);
                let n = (piece_end - at) as usize;
                memory.read_at(at, &mut buf[..n])?;
                self.record(at, &buf[..n]);
                at = piece_end;
            }
            Ok(())
        })
    }

    /// Whether every page of `runs` lies in guest memory.
    pub fn covers(&self, runs: &[PageRun]) -> bool {
        let Some(e) = self.enabled.get() else {
            return false;
        };
        runs.iter().all(|r| {
            let Some(end) = r.pages.checked_mul(PAGE).and_then(|l| r.gpa.checked_add(l)) else {
                return false;
            };
            e.regions
                .iter()
                .any(|g| r.gpa >= g.start && end <= g.start + g.len)
        })
    }

    /// The pages of `batch` whose content here differs from what the
    /// source hashed (all of them while disabled, or without a digest).
    pub fn mismatches(&self, batch: &DigestBatch) -> Vec<PageRun> {
        let mut out = Vec::new();
        for (page, digest) in batch.pages() {
            let same = self
                .enabled
                .get()
                .and_then(|e| e.locate(page))
                .is_some_and(|(region, index)| region.table.matches(index, &digest));
            if !same {
                push_page(&mut out, page);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::digest::{DigestFunction, DigestKey};
    use crate::verify::hash_ranges;

    fn memory(bytes: usize, seed: u8) -> Vec<u8> {
        (0..bytes)
            .map(|i| (i / 4096) as u8 ^ (i % 253) as u8 ^ seed)
            .collect()
    }

    fn setup() -> VerifySetup {
        VerifySetup {
            function: DigestFunction::Nh128,
            key: DigestKey::random().unwrap(),
        }
    }

    fn regions(list: &[(u64, u64)]) -> Vec<MemoryRange> {
        list.iter()
            .map(|&(gpa, length)| MemoryRange { gpa, length })
            .collect()
    }

    #[test]
    fn exactly_the_pages_changed_since_they_arrived_differ() {
        let s = setup();
        let src = memory(1 << 20, 1);
        let dst = Arrivals::new();
        assert!(dst.enable(&s, &regions(&[(0, 1 << 20)])));
        assert!(!dst.enable(&s, &regions(&[(0, 1 << 20)])), "only once");
        // Arrives in pieces that do not start on page boundaries.
        dst.record(0, &src[..5000]);
        dst.record(5000, &src[5000..]);
        let mut changed = src.clone();
        changed[5 * 4096 + 100] ^= 0xff;
        changed[200 * 4096] ^= 0xff;
        let digester = PageDigester::new(s.function, &s.key);
        let mut differ = Vec::new();
        hash_ranges::<io::Error>(
            &changed,
            &digester,
            &[PageRun { gpa: 0, pages: 256 }],
            2,
            16,
            &mut |b| {
                differ.extend(dst.mismatches(&b));
                Ok(())
            },
        )
        .unwrap();
        differ.sort_by_key(|r| r.gpa);
        // Page 1 straddled the two pieces: it lost its digest.
        assert_eq!(
            differ,
            [
                PageRun {
                    gpa: 4096,
                    pages: 1
                },
                PageRun {
                    gpa: 5 * 4096,
                    pages: 1
                },
                PageRun {
                    gpa: 200 * 4096,
                    pages: 1
                }
            ]
        );
    }

    #[test]
    fn regions_are_kept_apart_and_pages_outside_them_never_match() {
        let s = setup();
        let a = Arrivals::new();
        let high = 4u64 << 30;
        a.enable(&s, &regions(&[(0, 64 * 4096), (high, 16 * 4096)]));
        assert_eq!(a.table_bytes(), 2 * 8 + 80 * 16);
        let data = memory(16 * 4096, 3);
        a.record(high, &data);
        let digester = PageDigester::new(s.function, &s.key);
        let mut digests = Vec::new();
        digester.digest_pages(&data, &mut digests);
        let batch = DigestBatch {
            runs: vec![PageRun {
                gpa: high,
                pages: 16,
            }],
            digests: digests.clone(),
        };
        assert!(a.mismatches(&batch).is_empty());
        assert!(a.covers(&batch.runs));
        // The same digests at an address in the hole.
        let hole = DigestBatch {
            runs: vec![PageRun {
                gpa: 1 << 30,
                pages: 16,
            }],
            digests,
        };
        assert_eq!(a.mismatches(&hole), hole.runs);
        assert!(!a.covers(&hole.runs));
        assert!(!a.covers(&[PageRun {
            gpa: u64::MAX - 4095,
            pages: 2
        }]));
    }

    #[test]
    fn a_range_read_back_from_memory_is_recorded_like_the_bytes() {
        let s = setup();
        let mem = memory(3 << 20, 9);
        let by_bytes = Arrivals::new();
        let by_range = Arrivals::new();
        for a in [&by_bytes, &by_range] {
            a.enable(&s, &regions(&[(0, 3 << 20)]));
        }
        let range = MemoryRange {
            gpa: 4096 + 10,
            length: (2 << 20) + 9000,
        };
        let (lo, hi) = (range.gpa as usize, (range.gpa + range.length) as usize);
        by_bytes.record(range.gpa, &mem[lo..hi]);
        by_range.record_range(&mem, &range).unwrap();
        let digester = PageDigester::new(s.function, &s.key);
        let mut digests = Vec::new();
        digester.digest_pages(&mem, &mut digests);
        let batch = DigestBatch {
            runs: vec![PageRun { gpa: 0, pages: 768 }],
            digests,
        };
        let expect = by_bytes.mismatches(&batch);
        assert_eq!(by_range.mismatches(&batch), expect);
        // The ragged first and last pages, and what lies outside.
        assert_eq!(expect.first(), Some(&PageRun { gpa: 0, pages: 2 }));
    }
}
