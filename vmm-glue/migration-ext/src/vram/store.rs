// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The destination's copy of a VF's pre-copied VRAM.
//!
//! Pages go to an unnamed file (`O_TMPFILE`, gone when the migration
//! ends), zero pages as holes, so VRAM-sized data costs disk, not the
//! VMM's memory; what stays in memory is a keyed digest per page (16
//! bytes + 1 bit per 4 KiB, [`DigestTable`]). In stop-copy a page counts
//! as held only if its digest matches the source's *and* the bytes read
//! back from the file hash to it again: a file that lost or changed
//! pages costs a resend, never a wrong byte.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::verify::digest::{Digest, PageDigester, PAGE_SIZE};
use crate::verify::table::DigestTable;
use crate::verify::wire::PageRun;

const PAGE: u64 = PAGE_SIZE as u64;

/// Pre-copied VRAM of one VF.
pub struct VramStore {
    file: File,
    bar_size: u64,
    digester: PageDigester,
    table: DigestTable,
    zero_digest: Digest,
    stored_bytes: u64,
}

/// The pages of a window the destination holds, with their bytes.
#[derive(Default)]
pub struct Held {
    /// Page runs in ascending order (the answer to the source).
    pub runs: Vec<PageRun>,
    /// Where each run's bytes start in `bytes`.
    starts: Vec<usize>,
    /// The bytes of those pages, run after run.
    pub bytes: Vec<u8>,
}

impl Held {
    fn push(&mut self, page_offset: u64, page: &[u8]) {
        let joins = self
            .runs
            .last()
            .is_some_and(|r| r.gpa + r.pages * PAGE == page_offset);
        if joins {
            if let Some(last) = self.runs.last_mut() {
                last.pages += 1;
            }
        } else {
            self.runs.push(PageRun {
                gpa: page_offset,
                pages: 1,
            });
            self.starts.push(self.bytes.len());
        }
        self.bytes.extend_from_slice(page);
    }

    /// The held bytes of BAR page `page_offset`, if held.
    pub fn page(&self, page_offset: u64) -> Option<&[u8]> {
        let i = self
            .runs
            .partition_point(|r| r.gpa + r.pages * PAGE <= page_offset);
        let run = self.runs.get(i).filter(|r| r.gpa <= page_offset)?;
        let start = self.starts[i] + (page_offset - run.gpa) as usize;
        self.bytes.get(start..start + PAGE_SIZE)
    }
}

impl VramStore {
    /// An empty store for `bar_size` bytes in an unnamed file in `dir`.
    pub fn create(dir: &Path, bar_size: u64, digester: PageDigester) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "creating an unnamed file in {} for VRAM: {e}",
                        dir.display()
                    ),
                )
            })?;
        file.set_len(bar_size)?;
        let zero_digest = digester.digest(&[0u8; PAGE_SIZE]);
        Ok(VramStore {
            file,
            bar_size,
            table: DigestTable::new(bar_size),
            digester,
            zero_digest,
            stored_bytes: 0,
        })
    }

    pub fn bar_size(&self) -> u64 {
        self.bar_size
    }

    /// Bytes of pre-copied data written to the file (zero pages not).
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// Heap bytes of the digest table.
    pub fn table_bytes(&self) -> u64 {
        self.table.heap_bytes()
    }

    /// The file, for tests that damage it.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if !offset.is_multiple_of(PAGE) || offset.checked_add(len).is_none_or(|e| e > self.bar_size)
        {
            return Err(super::wire::bad(format!(
                "VRAM range [{offset:#x}, +{len:#x}) is not page aligned or exceeds the BAR of \
                 {:#x} bytes",
                self.bar_size
            )));
        }
        Ok(())
    }

    /// Stores pre-copied bytes at `offset` (page aligned) and their
    /// digests.
    pub fn store(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        self.file.write_all_at(data, offset)?;
        for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
            let index = offset / PAGE + i as u64;
            if page.len() == PAGE_SIZE {
                self.table.set(index, &self.digester.digest(page));
            } else {
                // A BAR that does not end on a page: never held.
                self.table.invalidate(index);
            }
        }
        self.stored_bytes += data.len() as u64;
        Ok(())
    }

    /// Records `len` zero bytes at `offset` (page aligned) without
    /// writing them.
    pub fn store_zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        // SAFETY: fallocate on a file we own, with a range inside it; a
        // failure leaves old bytes there, which the read-back check of
        // `held` then refuses.
        let punched = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if punched != 0 {
            log::debug!(
                "VRAM store: punching a hole: {}",
                io::Error::last_os_error()
            );
        }
        let first = offset / PAGE;
        for index in first..first + len.div_ceil(PAGE) {
            if (index + 1) * PAGE <= offset + len {
                self.table.set(index, &self.zero_digest);
            } else {
                self.table.invalidate(index);
            }
        }
        Ok(())
    }

    /// Which pages of `runs` (with the source's `digests`, one per page)
    /// this store holds: the recorded digest matches and the bytes in the
    /// file hash to it again. Reads only the candidates.
    pub fn held(&self, runs: &[PageRun], digests: &[Digest]) -> io::Result<Held> {
        let mut held = Held::default();
        let mut digests = digests.iter();
        // Candidates, grouped into runs read with one pread each.
        let mut candidates: Vec<(u64, Vec<Digest>)> = Vec::new();
        for run in runs {
            for i in 0..run.pages {
                let Some(d) = digests.next() else {
                    return Err(super::wire::bad("fewer digests than pages".into()));
                };
                let offset = run.gpa + i * PAGE;
                if !self.table.matches(offset / PAGE, d) {
                    continue;
                }
                match candidates.last_mut() {
                    Some((start, ds)) if *start + ds.len() as u64 * PAGE == offset => ds.push(*d),
                    _ => candidates.push((offset, vec![*d])),
                }
            }
        }
        let mut buf = Vec::new();
        for (start, ds) in candidates {
            buf.resize(ds.len() * PAGE_SIZE, 0);
            read_at_most(&self.file, &mut buf, start)?;
            for (i, (page, d)) in buf.chunks(PAGE_SIZE).zip(&ds).enumerate() {
                if self.digester.digest(page) == *d {
                    held.push(start + i as u64 * PAGE, page);
                }
            }
        }
        Ok(held)
    }
}

/// Reads `buf.len()` bytes at `offset`, zero-filling what lies past the
/// end of a (damaged, shortened) file.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::digest::{DigestFunction, DigestKey};

    fn store(size: u64) -> (VramStore, PageDigester) {
        let digester = PageDigester::new(DigestFunction::Nh128, &DigestKey([3; 32]));
        let dir = std::env::temp_dir();
        (
            VramStore::create(&dir, size, digester.clone()).unwrap(),
            digester,
        )
    }

    fn digests(digester: &PageDigester, data: &[u8]) -> Vec<Digest> {
        let mut out = Vec::new();
        digester.digest_pages(data, &mut out);
        out
    }

    #[test]
    fn vram_precopy_store_holds_what_it_stored_and_nothing_else() {
        let (mut s, d) = store(16 * PAGE);
        let data: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        s.store(4 * PAGE, &data).unwrap();
        s.store_zero(8 * PAGE, 2 * PAGE).unwrap();
        assert_eq!(s.stored_bytes(), 4 * PAGE);
        // Pages 4..8 as stored, page 6 changed since; 8..10 zero; 10 never sent.
        let mut now = data.clone();
        now[2 * PAGE_SIZE] ^= 1;
        now.extend_from_slice(&[0u8; 3 * PAGE_SIZE]);
        let runs = [PageRun {
            gpa: 4 * PAGE,
            pages: 7,
        }];
        let held = s.held(&runs, &digests(&d, &now)).unwrap();
        assert_eq!(
            held.runs,
            [
                PageRun {
                    gpa: 4 * PAGE,
                    pages: 2
                },
                PageRun {
                    gpa: 7 * PAGE,
                    pages: 3
                }
            ]
        );
        assert_eq!(
            held.page(5 * PAGE).unwrap(),
            &data[PAGE_SIZE..2 * PAGE_SIZE]
        );
        assert_eq!(held.page(9 * PAGE).unwrap(), &[0u8; PAGE_SIZE][..]);
        assert!(held.page(6 * PAGE).is_none());
        assert!(s.store(15 * PAGE, &data).is_err(), "past the BAR");
        assert!(s.store(1, &data[..1]).is_err(), "not page aligned");
    }

    #[test]
    fn vram_precopy_store_that_lost_its_file_holds_nothing_wrong() {
        let (mut s, d) = store(8 * PAGE);
        let data = vec![0x5a; 8 * PAGE_SIZE];
        s.store(0, &data).unwrap();
        // The file loses its contents; the digest table does not know.
        s.file().set_len(0).unwrap();
        let runs = [PageRun { gpa: 0, pages: 8 }];
        let held = s.held(&runs, &digests(&d, &data)).unwrap();
        assert!(held.runs.is_empty(), "{:?}", held.runs);
    }
}
