// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Hashing page ranges on several threads.
//!
//! Workers take the next batch of at most `batch_pages` pages from a
//! shared cursor, read them through a [`PageSource`] in 1 MiB pieces and
//! hash them; the calling thread hands each finished batch to `sink`
//! (e.g. writes it to the destination) while the workers go on. At most
//! `threads` batches wait for the sink, so memory stays bounded by
//! `threads * (1 MiB + batch_pages * 16 bytes)` whatever the range size.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Mutex, PoisonError};

use super::digest::{Digest, PageDigester, PAGE_SIZE};
use super::wire::{DigestBatch, PageRun};

/// Read access to guest memory.
pub trait PageSource: Sync {
    /// Fills `buf` with guest memory starting at `gpa`.
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl PageSource for std::fs::File {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, gpa)
    }
}

impl PageSource for Vec<u8> {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(gpa).map_err(io::Error::other)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Bytes read per call to the source.
const READ_PIECE: usize = 1 << 20;

/// Cuts runs into batches of at most `batch_pages` pages.
struct Cursor<'a> {
    runs: &'a [PageRun],
    run: usize,
    /// Pages of `runs[run]` already handed out.
    done: u64,
}

impl Cursor<'_> {
    fn next_batch(&mut self, batch_pages: u64) -> Vec<PageRun> {
        let mut batch = Vec::new();
        let mut room = batch_pages;
        while room > 0 && self.run < self.runs.len() {
            let r = self.runs[self.run];
            let take = (r.pages - self.done).min(room);
            if take > 0 {
                batch.push(PageRun {
                    gpa: r.gpa + self.done * PAGE_SIZE as u64,
                    pages: take,
                });
            }
            self.done += take;
            room -= take;
            if self.done >= r.pages {
                self.run += 1;
                self.done = 0;
            }
        }
        batch
    }
}

fn hash_batch(
    source: &dyn PageSource,
    digester: &PageDigester,
    runs: Vec<PageRun>,
    buf: &mut [u8],
) -> io::Result<DigestBatch> {
    let total: u64 = runs.iter().map(|r| r.pages).sum();
    let mut digests: Vec<Digest> = Vec::with_capacity(total as usize);
    for r in &runs {
        let mut at = r.gpa;
        let end = r.gpa + r.pages * PAGE_SIZE as u64;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            source.read_at(at, &mut buf[..n])?;
            digester.digest_pages(&buf[..n], &mut digests);
            at += n as u64;
        }
    }
    Ok(DigestBatch { runs, digests })
}

/// Hashes every page of `runs` on `threads` threads (at least one) and
/// hands the batches to `sink` on the calling thread, in no particular
/// order. Stops at the first error of a worker or of `sink`.
pub fn hash_ranges<E: From<io::Error> + Send>(
    source: &dyn PageSource,
    digester: &PageDigester,
    runs: &[PageRun],
    threads: usize,
    batch_pages: u64,
    sink: &mut dyn FnMut(DigestBatch) -> Result<(), E>,
) -> Result<(), E> {
    let threads = threads.max(1);
    let batch_pages = batch_pages.max(1);
    let cursor = Mutex::new(Cursor {
        runs,
        run: 0,
        done: 0,
    });
    let stop = AtomicBool::new(false);
    let (tx, rx) = sync_channel::<io::Result<DigestBatch>>(threads);
    std::thread::scope(|s| {
        for n in 0..threads {
            let worker_tx = tx.clone();
            let (cursor, stop) = (&cursor, &stop);
            let spawned = std::thread::Builder::new()
                .name(format!("page-digest-{n}"))
                .spawn_scoped(s, move || {
                    let mut buf = vec![0u8; READ_PIECE];
                    while !stop.load(Ordering::Relaxed) {
                        let runs = cursor
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .next_batch(batch_pages);
                        if runs.is_empty() {
                            return;
                        }
                        let batch = hash_batch(source, digester, runs, &mut buf);
                        let failed = batch.is_err();
                        if worker_tx.send(batch).is_err() || failed {
                            return;
                        }
                    }
                });
            if let Err(e) = spawned {
                stop.store(true, Ordering::Relaxed);
                drop(tx);
                // Workers already running end at their next batch.
                for _ in rx.iter() {}
                return Err(E::from(e));
            }
        }
        drop(tx);
        let mut result = Ok(());
        for batch in rx.iter() {
            if result.is_err() {
                continue;
            }
            result = batch.map_err(E::from).and_then(&mut *sink);
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::digest::{DigestFunction, DigestKey};

    fn memory(pages: usize) -> Vec<u8> {
        (0..pages * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE * 31 + i % 251) as u8)
            .collect()
    }

    #[test]
    fn every_page_is_hashed_once_in_bounded_batches() {
        let mem = memory(100);
        let d = PageDigester::new(DigestFunction::Nh128, &DigestKey::random().unwrap());
        let runs = [
            PageRun { gpa: 0, pages: 7 },
            PageRun {
                gpa: 10 * PAGE_SIZE as u64,
                pages: 60,
            },
            PageRun {
                gpa: 99 * PAGE_SIZE as u64,
                pages: 1,
            },
        ];
        for threads in [1, 3] {
            let mut seen = std::collections::BTreeMap::new();
            hash_ranges::<io::Error>(&mem, &d, &runs, threads, 16, &mut |b| {
                assert!(b.page_count() <= 16);
                for (page, digest) in b.pages() {
                    assert!(seen.insert(page, digest).is_none(), "page {page} twice");
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(seen.len(), 68);
            for (page, digest) in seen {
                let at = page as usize * PAGE_SIZE;
                assert_eq!(digest, d.digest(&mem[at..at + PAGE_SIZE]), "page {page}");
            }
        }
    }

    #[test]
    fn read_and_sink_errors_stop_the_hashing() {
        let mem = memory(8);
        let d = PageDigester::new(DigestFunction::SipHash24, &DigestKey::random().unwrap());
        let beyond = [PageRun {
            gpa: 4 * PAGE_SIZE as u64,
            pages: 8,
        }];
        let e = hash_ranges::<io::Error>(&mem, &d, &beyond, 2, 2, &mut |_| Ok(()));
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let all = [PageRun { gpa: 0, pages: 8 }];
        let mut calls = 0;
        let e = hash_ranges::<io::Error>(&mem, &d, &all, 2, 1, &mut |_| {
            calls += 1;
            Err(io::Error::other("link down"))
        });
        assert_eq!(e.unwrap_err().to_string(), "link down");
        assert_eq!(calls, 1);
    }
}
