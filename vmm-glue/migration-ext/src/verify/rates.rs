// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Which digest function, and whether to verify at all, from rates
//! measured on this machine.
//!
//! Hashing the DMA-reachable pages happens while the VM is stopped, so it
//! only pays when it is faster than sending those pages: on a fast local
//! link plain resending wins. [`decide`] compares the two estimates per
//! migration and says why.

use std::io;
use std::time::Instant;

use log::info;
use serde::Serialize;

use super::digest::{DigestFunction, DigestKey, PageDigester, DIGEST_LEN, PAGE_SIZE};
use super::parallel::hash_ranges;
use super::wire::PageRun;

/// One function's measured rate.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FunctionRate {
    pub function: DigestFunction,
    /// Bytes of guest memory hashed per second, one thread.
    pub bytes_per_s: f64,
}

/// Bytes of the calibration buffer: larger than a core's L2, so the rate
/// includes reading memory as the final pass does.
pub const CALIBRATION_BYTES: usize = 16 << 20;

fn filled(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = vec![0u8; len];
    for w in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    v
}

/// Times every function on one thread over a [`CALIBRATION_BYTES`]
/// buffer (after a warm-up pass) and returns them fastest first.
pub fn measure_functions(key: &DigestKey) -> Vec<FunctionRate> {
    let buf = filled(CALIBRATION_BYTES);
    let mut out: Vec<FunctionRate> = DigestFunction::ALL
        .iter()
        .map(|&function| {
            let d = PageDigester::new(function, key);
            let mut sink = Vec::with_capacity(CALIBRATION_BYTES / PAGE_SIZE);
            d.digest_pages(&buf[..PAGE_SIZE * 64], &mut sink);
            sink.clear();
            let t = Instant::now();
            d.digest_pages(&buf, &mut sink);
            let s = t.elapsed().as_secs_f64().max(1e-9);
            std::hint::black_box(&sink);
            FunctionRate {
                function,
                bytes_per_s: CALIBRATION_BYTES as f64 / s,
            }
        })
        .collect();
    out.sort_by(|a, b| b.bytes_per_s.total_cmp(&a.bytes_per_s));
    out
}

/// The rate of `digester` on `threads` threads over a calibration buffer,
/// through the same code the final pass runs.
pub fn measure_parallel(digester: &PageDigester, threads: usize) -> io::Result<f64> {
    let buf = filled(CALIBRATION_BYTES);
    let runs = [PageRun {
        gpa: 0,
        pages: (CALIBRATION_BYTES / PAGE_SIZE) as u64,
    }];
    let t = Instant::now();
    hash_ranges::<io::Error>(&buf, digester, &runs, threads, 512, &mut |b| {
        std::hint::black_box(b);
        Ok(())
    })?;
    Ok(CALIBRATION_BYTES as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

/// How the final pass covers the DMA-reachable pages.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Decision {
    /// Send digests, then only the pages that differ.
    Verify { estimate_ms: f64, resend_ms: f64 },
    /// Send every page again.
    Resend { estimate_ms: f64, verify_ms: f64 },
}

impl Decision {
    pub fn is_verify(&self) -> bool {
        matches!(self, Decision::Verify { .. })
    }
}

/// Chooses for `bytes` of DMA-reachable memory, from the parallel hash
/// rate, the link rate measured in pre-copy (bytes per second) and the
/// share of those bytes expected to differ. Verifying costs the hashing
/// (overlapped with sending digests, so the larger of the two) plus the
/// pages that differ; resending costs all bytes on the link. Verifying
/// must win by 10 % to be chosen: its estimate has more terms to be
/// wrong in. Logged either way.
pub fn decide(bytes: u64, hash_rate: f64, link_rate: f64, changed_share: f64) -> Decision {
    let ms = |b: f64, rate: f64| b / rate.max(1.0) * 1e3;
    let digest_bytes = bytes as f64 / PAGE_SIZE as f64 * DIGEST_LEN as f64;
    let changed = bytes as f64 * changed_share.clamp(0.0, 1.0);
    let verify_ms =
        ms(bytes as f64, hash_rate).max(ms(digest_bytes, link_rate)) + ms(changed, link_rate);
    let resend_ms = ms(bytes as f64, link_rate);
    let decision = if verify_ms * 1.1 < resend_ms {
        Decision::Verify {
            estimate_ms: verify_ms,
            resend_ms,
        }
    } else {
        Decision::Resend {
            estimate_ms: resend_ms,
            verify_ms,
        }
    };
    info!(
        "final pass over {} MiB of DMA-reachable memory: {} (hash {:.0} MiB/s, link {:.0} MiB/s: \
         verify ~{verify_ms:.0} ms, resend ~{resend_ms:.0} ms)",
        bytes >> 20,
        if decision.is_verify() {
            "verify digests"
        } else {
            "resend every page"
        },
        hash_rate / f64::from(1 << 20),
        link_rate / f64::from(1 << 20),
    );
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_links_verify_fast_links_resend() {
        let gib = 1u64 << 30;
        let (hash, slow, fast) = (4e9, 0.117e9, 8e9);
        let d = decide(4 * gib, hash, slow, 0.02);
        assert!(d.is_verify(), "{d:?}");
        if let Decision::Verify {
            estimate_ms,
            resend_ms,
        } = d
        {
            // 4 GiB at 117 MB/s: ~36.7 s resend; hashing 1.07 s and 2 %
            // resent: ~0.73 s + max(1.07 s, 0.59 s of digests).
            assert!((resend_ms - 36_700.0).abs() < 200.0, "{resend_ms}");
            assert!(estimate_ms < 2_000.0, "{estimate_ms}");
        }
        assert!(!decide(4 * gib, hash, fast, 0.02).is_verify());
        // Everything changed: verifying only adds the hashing.
        assert!(!decide(gib, hash, slow, 1.0).is_verify());
    }

    #[test]
    fn calibration_ranks_every_function_with_a_positive_rate() {
        let key = DigestKey::random().unwrap();
        let rates = measure_functions(&key);
        assert_eq!(rates.len(), DigestFunction::ALL.len());
        assert!(rates.iter().all(|r| r.bytes_per_s > 0.0));
        assert!(rates
            .windows(2)
            .all(|w| w[0].bytes_per_s >= w[1].bytes_per_s));
        let d = PageDigester::new(rates[0].function, &key);
        assert!(measure_parallel(&d, 2).unwrap() > 0.0);
    }
}
