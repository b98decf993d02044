// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A checksum of all guest memory that both sides of a migration log when
//! asked ([`ENV`]=1), so that a test can check that the destination holds
//! exactly what the source held when it stopped: the source logs it once
//! its last memory pass is out, the destination once all memory is in,
//! before it restores the VM (restoring vCPUs lets KVM write to guest
//! memory, e.g. steal time's preempted flag). Off by default: reading all of guest memory while the VM is
//! stopped adds to the downtime. [`ENV`]=blocks also logs a fingerprint
//! of each MiB, so that a mismatch says where the two sides differ.

use std::io;
use std::time::Instant;

use log::{info, warn};
use vm_migration::protocol::MemoryRange;

use crate::verify::digest::{DigestFunction, DigestKey, PageDigester, PAGE_SIZE};
use crate::verify::PageSource;

/// The environment variable that turns the checksum on (value `1`, or
/// `blocks` for the per-MiB fingerprints too).
pub const ENV: &str = "MIGRATION_MEMORY_CHECKSUM";

/// Bytes of guest memory one block fingerprint covers.
pub const BLOCK_SIZE: usize = 1 << 20;

/// Whether [`ENV`] asks for the checksum.
pub fn enabled() -> bool {
    std::env::var_os(ENV).is_some_and(|v| v == "1" || v == "blocks")
}

fn blocks_enabled() -> bool {
    std::env::var_os(ENV).is_some_and(|v| v == "blocks")
}

/// A fixed-key digest of every page of `regions`, folded in address
/// order, as 32 hex digits.
pub fn checksum(memory: &dyn PageSource, regions: &[MemoryRange]) -> io::Result<String> {
    checksum_with_blocks(memory, regions).map(|(sum, _)| sum)
}

/// [`checksum`], and a 32-bit fingerprint of each block of up to
/// [`BLOCK_SIZE`] bytes (a region's tail may be shorter), with its
/// guest address.
pub fn checksum_with_blocks(
    memory: &dyn PageSource,
    regions: &[MemoryRange],
) -> io::Result<(String, Vec<(u64, u32)>)> {
    let digester = PageDigester::new(DigestFunction::Nh128, &DigestKey([0x5a; 32]));
    let mut regions = regions.to_vec();
    regions.sort_by_key(|r| r.gpa);
    let mut buf = vec![0u8; BLOCK_SIZE];
    let mut digests = Vec::new();
    let mut blocks = Vec::new();
    let mut folded = Vec::with_capacity(PAGE_SIZE);
    let mut acc = [0u8; 16];
    for r in &regions {
        let mut at = r.gpa;
        let end = r.gpa.saturating_add(r.length);
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            memory.read_at(at, &mut buf[..n])?;
            // Whole pages are digested; a ragged tail is padded with zeros.
            let whole = n / PAGE_SIZE * PAGE_SIZE;
            digests.clear();
            digester.digest_pages(&buf[..whole], &mut digests);
            if whole < n {
                let mut last = vec![0u8; PAGE_SIZE];
                last[..n - whole].copy_from_slice(&buf[whole..n]);
                digests.push(digester.digest(&last));
            }
            // A block's pages' digests fit one page: 256 x 16 bytes.
            for d in &digests {
                folded.extend_from_slice(d);
            }
            folded.resize(PAGE_SIZE, 0);
            let block = digester.digest(&folded);
            blocks.push((
                at,
                u32::from_le_bytes([block[0], block[1], block[2], block[3]]),
            ));
            folded.clear();
            for d in &digests {
                folded.extend_from_slice(&acc);
                folded.extend_from_slice(d);
                folded.resize(PAGE_SIZE, 0);
                acc = digester.digest(&folded);
                folded.clear();
            }
            at += n as u64;
        }
    }
    Ok((acc.iter().map(|b| format!("{b:02x}")).collect(), blocks))
}

/// Logs the checksum of guest memory `when` (e.g. "at the stop") if
/// [`ENV`] asks for it.
pub fn log_if_enabled(when: &str, memory: &dyn PageSource, regions: &[MemoryRange]) {
    if !enabled() {
        return;
    }
    let started = Instant::now();
    let bytes: u64 = regions.iter().map(|r| r.length).sum();
    match checksum_with_blocks(memory, regions) {
        Ok((sum, blocks)) => {
            info!(
                "Migration: guest memory checksum {when}: {sum} ({bytes} bytes, {} ms)",
                started.elapsed().as_millis()
            );
            if blocks_enabled() {
                let list: Vec<String> = blocks
                    .iter()
                    .map(|(gpa, fp)| format!("{gpa:#x}:{fp:08x}"))
                    .collect();
                info!("Migration: guest memory blocks {when}: {}", list.join(" "));
            }
        }
        Err(e) => warn!("Migration: guest memory checksum {when}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_changed_byte_changes_the_checksum_and_order_of_regions_does_not() {
        let mut mem: Vec<u8> = (0..(3 << 20) + 100).map(|i| (i % 241) as u8).collect();
        let regions = [
            MemoryRange {
                gpa: 2 << 20,
                length: (1 << 20) + 100,
            },
            MemoryRange {
                gpa: 0,
                length: 1 << 20,
            },
        ];
        let a = checksum(&mem, &regions).unwrap();
        assert_eq!(a.len(), 32);
        let mut reversed = regions;
        reversed.reverse();
        assert_eq!(checksum(&mem, &reversed).unwrap(), a);
        mem[(3 << 20) + 99] ^= 1;
        assert_ne!(checksum(&mem, &regions).unwrap(), a);
        mem[(3 << 20) + 99] ^= 1;
        // Outside the regions: not covered.
        mem[(1 << 20) + 5] ^= 1;
        assert_eq!(checksum(&mem, &regions).unwrap(), a);
    }

    #[test]
    fn block_fingerprints_name_the_mib_that_changed() {
        let mut mem: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        let regions = [MemoryRange {
            gpa: 0,
            length: 3 << 20,
        }];
        let (_, before) = checksum_with_blocks(&mem, &regions).unwrap();
        let addresses: Vec<u64> = before.iter().map(|(gpa, _)| *gpa).collect();
        assert_eq!(addresses, [0, 1 << 20, 2 << 20]);
        mem[(1 << 20) + 4097] ^= 0x80;
        let (_, after) = checksum_with_blocks(&mem, &regions).unwrap();
        let changed: Vec<u64> = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a.0)
            .collect();
        assert_eq!(changed, [1 << 20]);
    }
}
