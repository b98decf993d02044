// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Payloads of the verify pass (all integers little-endian).
//!
//! ```text
//! VerifySetup (source -> destination, before the first memory pass)
//!   0  u16       digest function (1 NH-128, 2 SipHash-2-4-128)
//!   2  u16       reserved, 0
//!   4  u32       bytes per digest unit (4096)
//!   8  [u8; 32]  per-migration key
//!
//! DigestBatch (source -> destination, final pass)
//!   0  u32       run count R (1..=MAX_RUNS)
//!   4  u32       reserved, 0
//!   8  R x { u64 gpa (page aligned), u64 pages (>= 1) }
//!      then one 16-byte digest per page of the runs, in order
//!      (at most MAX_BATCH_PAGES pages in all)
//!
//! Mismatches (destination -> source, the answer to a DigestBatch)
//!   the same run list without digests: the pages to send again
//! ```

use std::io::{self, Read, Write};

use super::digest::{Digest, DigestFunction, DigestKey, DIGEST_LEN, KEY_LEN, PAGE_SIZE};

/// Most runs in one message.
pub const MAX_RUNS: u32 = 1 << 16;
/// Most pages one batch covers (16 MiB of digests).
pub const MAX_BATCH_PAGES: u64 = 1 << 20;
/// Length of a VerifySetup payload.
pub const SETUP_LEN: usize = 8 + KEY_LEN;

/// Consecutive guest pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    pub gpa: u64,
    pub pages: u64,
}

/// What the destination needs to hash arrivals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifySetup {
    pub function: DigestFunction,
    pub key: DigestKey,
}

impl VerifySetup {
    pub fn encode(&self) -> [u8; SETUP_LEN] {
        let mut out = [0u8; SETUP_LEN];
        out[..2].copy_from_slice(&(self.function as u16).to_le_bytes());
        out[4..8].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        out[8..].copy_from_slice(&self.key.0);
        out
    }

    pub fn decode(raw: &[u8]) -> io::Result<Self> {
        if raw.len() != SETUP_LEN {
            return Err(bad(format!(
                "verify setup of {} bytes, expected {SETUP_LEN}",
                raw.len()
            )));
        }
        let f = u16::from_le_bytes([raw[0], raw[1]]);
        let function = DigestFunction::from_wire(f)
            .ok_or_else(|| bad(format!("unknown digest function {f}")))?;
        let unit = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        if unit as usize != PAGE_SIZE || raw[2..4] != [0, 0] {
            return Err(bad(format!(
                "digest unit {unit} bytes not supported (only {PAGE_SIZE})"
            )));
        }
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(&raw[8..]);
        Ok(VerifySetup {
            function,
            key: DigestKey(key),
        })
    }
}

/// Digests of the pages of some runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestBatch {
    pub runs: Vec<PageRun>,
    pub digests: Vec<Digest>,
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn runs_len(runs: usize) -> u64 {
    8 + runs as u64 * 16
}

fn write_runs<W: Write + ?Sized>(out: &mut W, runs: &[PageRun]) -> io::Result<()> {
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&(runs.len() as u32).to_le_bytes());
    out.write_all(&head)?;
    for r in runs {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&r.gpa.to_le_bytes());
        raw[8..].copy_from_slice(&r.pages.to_le_bytes());
        out.write_all(&raw)?;
    }
    Ok(())
}

/// Reads a run list of at most `len` bytes; returns it and the bytes read.
fn read_runs<R: Read + ?Sized>(input: &mut R, len: u64) -> io::Result<(Vec<PageRun>, u64)> {
    let mut head = [0u8; 8];
    if len < 8 {
        return Err(bad(format!("run list in {len} bytes")));
    }
    input.read_exact(&mut head)?;
    let count = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if count > MAX_RUNS || head[4..] != [0; 4] || runs_len(count as usize) > len {
        return Err(bad(format!("run list of {count} runs in {len} bytes")));
    }
    let mut runs = Vec::with_capacity(count as usize);
    let mut pages = 0u64;
    for _ in 0..count {
        let mut raw = [0u8; 16];
        input.read_exact(&mut raw)?;
        let gpa = u64::from_le_bytes(raw[..8].try_into().map_err(io::Error::other)?);
        let n = u64::from_le_bytes(raw[8..].try_into().map_err(io::Error::other)?);
        pages = pages.saturating_add(n);
        if n == 0 || gpa % PAGE_SIZE as u64 != 0 || pages > MAX_BATCH_PAGES {
            return Err(bad(format!(
                "bad run {gpa:#x}+{n} pages (runs must be page aligned, non-empty, \
                 at most {MAX_BATCH_PAGES} pages in all)"
            )));
        }
        runs.push(PageRun { gpa, pages: n });
    }
    let used = runs_len(runs.len());
    Ok((runs, used))
}

impl DigestBatch {
    pub fn page_count(&self) -> u64 {
        self.runs.iter().map(|r| r.pages).sum()
    }

    /// Page numbers and digests, in order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, Digest)> + '_ {
        self.runs
            .iter()
            .flat_map(|r| (0..r.pages).map(move |i| r.gpa / PAGE_SIZE as u64 + i))
            .zip(self.digests.iter().copied())
    }

    /// Bytes of the encoded batch.
    pub fn encoded_len(&self) -> u64 {
        runs_len(self.runs.len()) + self.digests.len() as u64 * DIGEST_LEN as u64
    }

    pub fn write_to<W: Write + ?Sized>(&self, out: &mut W) -> io::Result<()> {
        write_runs(out, &self.runs)?;
        // One write for the digests: they are contiguous bytes.
        let flat: Vec<u8> = self.digests.iter().flatten().copied().collect();
        out.write_all(&flat)
    }

    /// Reads a batch of exactly `len` bytes.
    pub fn read_from<R: Read + ?Sized>(input: &mut R, len: u64) -> io::Result<Self> {
        let (runs, used) = read_runs(input, len)?;
        let pages: u64 = runs.iter().map(|r| r.pages).sum();
        if used + pages * DIGEST_LEN as u64 != len {
            return Err(bad(format!(
                "digest batch of {len} bytes for {pages} pages in {} runs",
                runs.len()
            )));
        }
        let mut flat = vec![0u8; (pages as usize) * DIGEST_LEN];
        input.read_exact(&mut flat)?;
        let digests = flat
            .chunks_exact(DIGEST_LEN)
            .map(|c| {
                let mut d = [0u8; DIGEST_LEN];
                d.copy_from_slice(c);
                d
            })
            .collect();
        Ok(DigestBatch { runs, digests })
    }
}

/// Encoded length of a mismatch list.
pub fn mismatches_len(runs: &[PageRun]) -> u64 {
    runs_len(runs.len())
}

pub fn write_mismatches<W: Write + ?Sized>(out: &mut W, runs: &[PageRun]) -> io::Result<()> {
    write_runs(out, runs)
}

/// Reads a mismatch list of exactly `len` bytes.
pub fn read_mismatches<R: Read + ?Sized>(input: &mut R, len: u64) -> io::Result<Vec<PageRun>> {
    let (runs, used) = read_runs(input, len)?;
    if used != len {
        return Err(bad(format!(
            "mismatch list of {len} bytes, runs take {used}"
        )));
    }
    Ok(runs)
}

/// Appends `page` to a run list, extending the last run when adjacent.
pub fn push_page(runs: &mut Vec<PageRun>, page: u64) {
    let gpa = page * PAGE_SIZE as u64;
    if let Some(last) = runs.last_mut() {
        if last.gpa + last.pages * PAGE_SIZE as u64 == gpa {
            last.pages += 1;
            return;
        }
    }
    runs.push(PageRun { gpa, pages: 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_round_trips_and_refuses_unknown_functions_and_units() {
        let s = VerifySetup {
            function: DigestFunction::Nh128,
            key: DigestKey([9u8; KEY_LEN]),
        };
        let raw = s.encode();
        assert_eq!(VerifySetup::decode(&raw).unwrap(), s);
        let mut unknown = raw;
        unknown[0] = 77;
        assert!(VerifySetup::decode(&unknown)
            .unwrap_err()
            .to_string()
            .contains("unknown digest function 77"));
        let mut unit = raw;
        unit[5] = 0x20;
        assert!(VerifySetup::decode(&unit).is_err());
        assert!(VerifySetup::decode(&raw[..10]).is_err());
    }

    #[test]
    fn batches_round_trip_and_bad_lengths_are_refused() {
        let b = DigestBatch {
            runs: vec![
                PageRun { gpa: 0, pages: 2 },
                PageRun {
                    gpa: 8 * PAGE_SIZE as u64,
                    pages: 1,
                },
            ],
            digests: vec![[1u8; 16], [2u8; 16], [3u8; 16]],
        };
        let mut raw = Vec::new();
        b.write_to(&mut raw).unwrap();
        assert_eq!(raw.len() as u64, b.encoded_len());
        assert_eq!(
            DigestBatch::read_from(&mut &raw[..], b.encoded_len()).unwrap(),
            b
        );
        let pages: Vec<u64> = b.pages().map(|(p, _)| p).collect();
        assert_eq!(pages, [0, 1, 8]);
        // A length that disagrees with the runs, an unaligned run, an
        // empty run, too many pages: each refused before allocating.
        assert!(DigestBatch::read_from(&mut &raw[..], b.encoded_len() + 16).is_err());
        let mut unaligned = raw.clone();
        unaligned[8] = 1;
        assert!(DigestBatch::read_from(&mut &unaligned[..], b.encoded_len()).is_err());
        let mut empty = raw.clone();
        empty[16..24].fill(0);
        assert!(DigestBatch::read_from(&mut &empty[..], b.encoded_len()).is_err());
        let mut huge = raw.clone();
        huge[16..24].copy_from_slice(&(MAX_BATCH_PAGES + 1).to_le_bytes());
        assert!(DigestBatch::read_from(&mut &huge[..], u64::MAX).is_err());
        let mut many = raw;
        many[..4].copy_from_slice(&(MAX_RUNS + 1).to_le_bytes());
        assert!(DigestBatch::read_from(&mut &many[..], u64::MAX).is_err());
    }

    #[test]
    fn mismatch_lists_merge_adjacent_pages_and_round_trip() {
        let mut runs = Vec::new();
        for p in [3, 4, 5, 9, 10, 20] {
            push_page(&mut runs, p);
        }
        assert_eq!(
            runs,
            [
                PageRun {
                    gpa: 3 * 4096,
                    pages: 3
                },
                PageRun {
                    gpa: 9 * 4096,
                    pages: 2
                },
                PageRun {
                    gpa: 20 * 4096,
                    pages: 1
                }
            ]
        );
        let mut raw = Vec::new();
        write_mismatches(&mut raw, &runs).unwrap();
        assert_eq!(raw.len() as u64, mismatches_len(&runs));
        assert_eq!(
            read_mismatches(&mut &raw[..], mismatches_len(&runs)).unwrap(),
            runs
        );
        assert!(read_mismatches(&mut &raw[..], 8).is_err());
    }
}
