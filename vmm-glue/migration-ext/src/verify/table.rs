// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The destination's digest of every guest page it holds.
//!
//! One [`DIGEST_LEN`]-byte slot and one valid bit per 4 KiB page: 4 MiB +
//! 32 KiB per GiB of guest memory, allocated once when the migration
//! starts and never grown. Memory connections fill it concurrently as
//! pages arrive (each page is written by one connection at a time), the
//! final pass reads it; a page without a valid digest always counts as
//! changed, so a table that missed an arrival costs a resend, never a
//! wrong page.

use std::sync::atomic::{AtomicU64, Ordering};

use super::digest::{Digest, DIGEST_LEN, PAGE_SIZE};

/// Digests of guest pages, indexed by page number.
pub struct DigestTable {
    /// Two words per page.
    slots: Box<[AtomicU64]>,
    valid: Box<[AtomicU64]>,
    pages: u64,
}

impl std::fmt::Debug for DigestTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DigestTable({} pages)", self.pages)
    }
}

/// Bytes a table takes per GiB of guest memory.
pub const BYTES_PER_GIB: u64 =
    (1 << 30) / PAGE_SIZE as u64 * (DIGEST_LEN as u64) + (1 << 30) / PAGE_SIZE as u64 / 8;

impl DigestTable {
    /// A table for `memory_size` bytes of guest memory, every page
    /// invalid.
    pub fn new(memory_size: u64) -> Self {
        let pages = memory_size.div_ceil(PAGE_SIZE as u64);
        let slots = (0..pages * 2).map(|_| AtomicU64::new(0)).collect();
        let valid = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        DigestTable {
            slots,
            valid,
            pages,
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Heap bytes the table holds.
    pub fn heap_bytes(&self) -> u64 {
        (self.slots.len() + self.valid.len()) as u64 * 8
    }

    /// Records the digest of `page`; pages past the end are ignored.
    pub fn set(&self, page: u64, digest: &Digest) {
        let Some(slot) = self.slots.get(page as usize * 2..page as usize * 2 + 2) else {
            return;
        };
        let (a, b) = split(digest);
        slot[0].store(a, Ordering::Relaxed);
        slot[1].store(b, Ordering::Relaxed);
        self.valid[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// Forgets the digest of `page` (its content is about to change by
    /// other means than an arrival that will be hashed).
    pub fn invalidate(&self, page: u64) {
        if let Some(w) = self.valid.get((page / 64) as usize) {
            w.fetch_and(!(1 << (page % 64)), Ordering::Release);
        }
    }

    /// Whether the page's recorded digest equals `digest`; false for a
    /// page without one.
    pub fn matches(&self, page: u64, digest: &Digest) -> bool {
        let Some(w) = self.valid.get((page / 64) as usize) else {
            return false;
        };
        if w.load(Ordering::Acquire) & (1 << (page % 64)) == 0 {
            return false;
        }
        let slot = &self.slots[page as usize * 2..page as usize * 2 + 2];
        (
            slot[0].load(Ordering::Relaxed),
            slot[1].load(Ordering::Relaxed),
        ) == split(digest)
    }

    /// Pages with a valid digest.
    pub fn valid_pages(&self) -> u64 {
        self.valid
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }
}

fn split(d: &Digest) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    b.copy_from_slice(&d[8..]);
    (u64::from_ne_bytes(a), u64::from_ne_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_pages_never_match_and_set_pages_match_exactly() {
        let t = DigestTable::new(10 * PAGE_SIZE as u64 + 1);
        assert_eq!(t.pages(), 11);
        let d = [7u8; DIGEST_LEN];
        assert!(!t.matches(3, &d));
        assert!(!t.matches(3, &[0u8; DIGEST_LEN]));
        t.set(3, &d);
        assert!(t.matches(3, &d));
        let mut other = d;
        other[15] ^= 1;
        assert!(!t.matches(3, &other));
        t.invalidate(3);
        assert!(!t.matches(3, &d));
        // Out of range: ignored, never a match, never a panic.
        t.set(11, &d);
        assert!(!t.matches(11, &d));
        assert!(!t.matches(u64::MAX / 2, &d));
        assert_eq!(t.valid_pages(), 0);
    }

    #[test]
    fn size_is_four_mib_and_a_bit_per_gib() {
        assert_eq!(BYTES_PER_GIB, 4 * 1024 * 1024 + 32 * 1024);
        let t = DigestTable::new(64 << 20);
        assert_eq!(t.heap_bytes(), BYTES_PER_GIB / 16);
    }
}
