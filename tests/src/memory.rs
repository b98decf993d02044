// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest memory: one memfd plus a software dirty bitmap, the stand-in for
//! KVM's dirty log. Writers set a page's bit after writing it; the
//! migration takes (reads and clears) the bitmap before copying, so a page
//! written after it was copied is always sent again.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use migration_ext::verify::{Arrivals, PageSource};
use xe_vf_glue::protocol::{MemoryRange, MemoryRangeTable};
use xe_vf_glue::wire::range_end;
use xe_vf_plugin::emulated::create_memfd;

pub const PAGE_SIZE: u64 = 4096;
/// Largest guest memory the host accepts (also from a migration peer).
pub const MAX_MEMORY_SIZE: u64 = 64 << 30;
/// Copy buffer for memory transfers and checksums.
pub const COPY_CHUNK: usize = 1 << 20;

pub struct GuestMemory {
    file: File,
    size: u64,
    dirty: Vec<AtomicU64>,
    /// Destination of a migration with the verify pass: the digest of
    /// every page as it arrived (off until `VerifySetup`).
    arrivals: Arrivals,
}

impl PageSource for GuestMemory {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(&MemoryRange {
            gpa,
            length: buf.len() as u64,
        })?;
        self.file.read_exact_at(buf, gpa)
    }
}

impl GuestMemory {
    /// `size` must be a non-zero multiple of the page size, at most
    /// [`MAX_MEMORY_SIZE`].
    pub fn new(size: u64) -> io::Result<Self> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || size > MAX_MEMORY_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "memory size {size} must be a non-zero multiple of {PAGE_SIZE} \
                     and at most {MAX_MEMORY_SIZE}"
                ),
            ));
        }
        let pages = size / PAGE_SIZE;
        let words = pages.div_ceil(64) as usize;
        Ok(GuestMemory {
            file: create_memfd("guest-memory", size)?,
            size,
            dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
            arrivals: Arrivals::new(),
        })
    }

    /// The digests of arriving pages, which every range
    /// [`GuestMemory::receive_range`] writes feeds once enabled.
    pub fn arrivals(&self) -> &Arrivals {
        &self.arrivals
    }

    /// Guest memory as the regions a VMM has (one, here).
    pub fn regions(&self) -> Vec<MemoryRange> {
        vec![MemoryRange {
            gpa: 0,
            length: self.size,
        }]
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// A second handle on the memfd (what a device DMAs through).
    pub fn dup_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Writes `data` at `offset` and marks the pages dirty (a vCPU write).
    pub fn write_dirty(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check(&MemoryRange {
            gpa: offset,
            length: data.len() as u64,
        })?;
        self.file.write_all_at(data, offset)?;
        let first = offset / PAGE_SIZE;
        let last = (offset + data.len() as u64).div_ceil(PAGE_SIZE);
        for page in first..last {
            self.mark_dirty(page);
        }
        Ok(())
    }

    fn mark_dirty(&self, page: u64) {
        if let Some(word) = self.dirty.get((page / 64) as usize) {
            word.fetch_or(1 << (page % 64), Ordering::AcqRel);
        }
    }

    /// Forgets every dirty bit (start of dirty logging).
    pub fn clear_dirty(&self) {
        for w in &self.dirty {
            w.store(0, Ordering::Release);
        }
    }

    /// Reads and clears the dirty bitmap.
    pub fn take_dirty_bitmap(&self) -> Vec<u64> {
        self.dirty
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }

    /// Sets the bits of every page `table` touches in `bitmap`, clamped to
    /// guest memory.
    pub fn merge_into_bitmap(&self, bitmap: &mut [u64], table: &MemoryRangeTable) {
        for r in table.regions() {
            let end = range_end(r).unwrap_or(u64::MAX).min(self.size);
            if r.gpa >= end {
                continue;
            }
            for page in r.gpa / PAGE_SIZE..end.div_ceil(PAGE_SIZE) {
                if let Some(word) = bitmap.get_mut((page / 64) as usize) {
                    *word |= 1 << (page % 64);
                }
            }
        }
    }

    /// All of guest memory as one range.
    pub fn whole(&self) -> MemoryRangeTable {
        let mut t = MemoryRangeTable::default();
        t.push(MemoryRange {
            gpa: 0,
            length: self.size,
        });
        t
    }

    /// Refuses a range outside guest memory.
    pub fn check(&self, r: &MemoryRange) -> io::Result<()> {
        match range_end(r) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "range {:#x}+{:#x} lies outside guest memory of {} bytes",
                    r.gpa, r.length, self.size
                ),
            )),
        }
    }

    /// Copies `range` into `out` through `buf`.
    pub fn send_range<W: Write + ?Sized>(
        &self,
        range: &MemoryRange,
        out: &mut W,
        buf: &mut [u8],
    ) -> io::Result<()> {
        self.check(range)?;
        let mut at = range.gpa;
        let end = range.gpa + range.length;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            self.file.read_exact_at(&mut buf[..n], at)?;
            out.write_all(&buf[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// Fills `range` from `input` through `buf`.
    pub fn receive_range<R: Read + ?Sized>(
        &self,
        range: &MemoryRange,
        input: &mut R,
        buf: &mut [u8],
    ) -> io::Result<()> {
        self.check(range)?;
        let mut at = range.gpa;
        let end = range.gpa + range.length;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            input.read_exact(&mut buf[..n])?;
            self.file.write_all_at(&buf[..n], at)?;
            // Hashed while the bytes are still in cache.
            self.arrivals.record(at, &buf[..n]);
            at += n as u64;
        }
        Ok(())
    }

    /// Writes all of memory to `out` (a snapshot's `memory-ranges`).
    pub fn save_to<W: Write + ?Sized>(&self, out: &mut W) -> io::Result<()> {
        let mut buf = vec![0u8; COPY_CHUNK];
        for r in self.whole().regions() {
            self.send_range(r, out, &mut buf)?;
        }
        Ok(())
    }

    /// Loads all of memory from `input`.
    pub fn load_from<R: Read + ?Sized>(&self, input: &mut R) -> io::Result<()> {
        let mut buf = vec![0u8; COPY_CHUNK];
        for r in self.whole().regions() {
            self.receive_range(r, input, &mut buf)?;
        }
        Ok(())
    }

    /// CRC32C of all of guest memory.
    pub fn crc32c(&self) -> io::Result<u32> {
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut crc = 0u32;
        let mut at = 0u64;
        while at < self.size {
            let n = ((self.size - at) as usize).min(buf.len());
            self.file.read_exact_at(&mut buf[..n], at)?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            at += n as u64;
        }
        Ok(crc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_pages_are_reported_once_and_ranges_merge() {
        let m = GuestMemory::new(1 << 20).unwrap();
        m.write_dirty(&[1u8; 10], PAGE_SIZE * 3 + 5).unwrap();
        m.write_dirty(&[1u8; 4096], PAGE_SIZE * 4).unwrap();
        let bitmap = m.take_dirty_bitmap();
        let t = MemoryRangeTable::from_dirty_bitmap(bitmap, 0, PAGE_SIZE);
        assert_eq!(
            t.regions(),
            &[MemoryRange {
                gpa: 3 * PAGE_SIZE,
                length: 2 * PAGE_SIZE
            }]
        );
        assert!(m.take_dirty_bitmap().iter().all(|w| *w == 0));
        let mut bitmap = m.take_dirty_bitmap();
        let mut extra = MemoryRangeTable::default();
        extra.push(MemoryRange {
            gpa: 0,
            length: u64::MAX,
        });
        m.merge_into_bitmap(&mut bitmap, &extra);
        let t = MemoryRangeTable::from_dirty_bitmap(bitmap, 0, PAGE_SIZE);
        assert_eq!(t.effective_size(), 1 << 20);
    }

    #[test]
    fn ranges_outside_memory_are_refused() {
        let m = GuestMemory::new(1 << 20).unwrap();
        let mut sink = Vec::new();
        let mut buf = [0u8; 64];
        let bad = MemoryRange {
            gpa: (1 << 20) - 4096,
            length: 8192,
        };
        assert!(m.send_range(&bad, &mut sink, &mut buf).is_err());
        assert!(m
            .receive_range(&bad, &mut &[0u8; 8192][..], &mut buf)
            .is_err());
        assert!(GuestMemory::new(4095).is_err());
        assert!(GuestMemory::new(0).is_err());
    }

    #[test]
    fn every_received_range_is_hashed_once_verify_is_set_up() {
        use migration_ext::verify::wire::{DigestBatch, PageRun, VerifySetup};
        use migration_ext::verify::{DigestFunction, DigestKey, PageDigester};
        let setup = VerifySetup {
            function: DigestFunction::Nh128,
            key: DigestKey::random().unwrap(),
        };
        let src = GuestMemory::new(1 << 20).unwrap();
        src.write_dirty(&[7u8; 1 << 20], 0).unwrap();
        let mut image = Vec::new();
        src.save_to(&mut image).unwrap();
        let dst = GuestMemory::new(1 << 20).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        // Before the setup nothing is hashed.
        dst.receive_range(&src.whole().regions()[0], &mut &image[..], &mut buf)
            .unwrap();
        assert!(dst.arrivals().enable(&setup, &dst.regions()));
        let digester = PageDigester::new(setup.function, &setup.key);
        let mut digests = Vec::new();
        digester.digest_pages(&image[..8 * 4096], &mut digests);
        let batch = DigestBatch {
            runs: vec![PageRun { gpa: 0, pages: 8 }],
            digests,
        };
        assert_eq!(dst.arrivals().mismatches(&batch), batch.runs);
        // Arriving again (through 64 KiB pieces), every page is known.
        dst.receive_range(&src.whole().regions()[0], &mut &image[..], &mut buf)
            .unwrap();
        assert!(dst.arrivals().mismatches(&batch).is_empty());
    }

    #[test]
    fn save_and_load_round_trip() {
        let a = GuestMemory::new(1 << 20).unwrap();
        a.write_dirty(b"hello", 12345).unwrap();
        let mut image = Vec::new();
        a.save_to(&mut image).unwrap();
        let b = GuestMemory::new(1 << 20).unwrap();
        b.load_from(&mut &image[..]).unwrap();
        assert_eq!(a.crc32c().unwrap(), b.crc32c().unwrap());
        assert!(b.load_from(&mut &image[..100]).is_err());
    }
}
