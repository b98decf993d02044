// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The verify pass on the wire (`ProtocolFeatures::VERIFY`).
//!
//! After `Config` the source sends `VerifySetup` (the digest function and
//! a fresh key, [`send_setup`]); the destination then hashes every page
//! that arrives ([`receive_setup`], [`super::Arrivals`]). In the final
//! memory pass the source sends `Digests` batches of the pages to check
//! ([`exchange_digests`]), each answered by an `Ok` whose payload lists
//! the pages that differ ([`answer_digests`]); the source sends those.

use std::io::{Read, Write};
use std::time::Instant;

use anyhow::anyhow;
use log::info;
use serde::Serialize;
use vm_migration::protocol::{MemoryRange, MemoryRangeTable, Request, Response, Status};
use vm_migration::MigratableError;

use super::arrivals::Arrivals;
use super::digest::{DigestKey, PageDigester, PAGE_SIZE};
use super::parallel::{hash_ranges, PageSource};
use super::rates::{self, measure_functions, FunctionRate};
use super::wire::{self, DigestBatch, PageRun, VerifySetup, SETUP_LEN};
use crate::connection::{expect_ok, read_answer};

/// Pages per `Digests` batch: 64 MiB of memory, 256 KiB of digests.
const BATCH_PAGES: u64 = 16 * 1024;

/// The source's choice of digest function and key, with the rates it was
/// chosen by.
pub struct VerifyPlan {
    pub setup: VerifySetup,
    pub digester: PageDigester,
    pub threads: usize,
    pub report: PlanReport,
}

/// What a migration report shows of the plan.
#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    pub function: &'static str,
    pub single_thread_rates_mib_s: Vec<(String, f64)>,
    pub threads: usize,
    pub hash_rate_mib_s: f64,
}

impl VerifyPlan {
    /// A fresh key; the faster function on this machine; the rate of that
    /// function on `threads` threads.
    pub fn prepare(threads: usize) -> Result<Self, MigratableError> {
        let failed =
            |e: std::io::Error| MigratableError::MigrateSend(anyhow!(e).context("verify setup"));
        let key = DigestKey::random().map_err(failed)?;
        let ranked: Vec<FunctionRate> = measure_functions(&key);
        let function = ranked
            .first()
            .map(|r| r.function)
            .ok_or_else(|| MigratableError::MigrateSend(anyhow!("no digest function")))?;
        let digester = PageDigester::new(function, &key);
        let hash_rate = rates::measure_parallel(&digester, threads).map_err(failed)?;
        let mib = |r: f64| (r / f64::from(1 << 20)).round();
        let report = PlanReport {
            function: function.name(),
            single_thread_rates_mib_s: ranked
                .iter()
                .map(|r| (r.function.name().to_string(), mib(r.bytes_per_s)))
                .collect(),
            threads,
            hash_rate_mib_s: mib(hash_rate),
        };
        info!(
            "verify pass: {} (fastest here: {:?}), {:.0} MiB/s on {threads} thread(s)",
            function.name(),
            report.single_thread_rates_mib_s,
            report.hash_rate_mib_s
        );
        Ok(VerifyPlan {
            setup: VerifySetup { function, key },
            digester,
            threads,
            report,
        })
    }

    /// Bytes per second the plan's threads hash.
    pub fn hash_rate(&self) -> f64 {
        self.report.hash_rate_mib_s * f64::from(1 << 20)
    }
}

/// Source: sends `VerifySetup` and waits for its `Ok`.
pub fn send_setup<C: Read + Write>(conn: &mut C, plan: &VerifyPlan) -> Result<(), MigratableError> {
    Request::verify_setup(SETUP_LEN as u64).write_to(conn)?;
    conn.write_all(&plan.setup.encode())
        .map_err(MigratableError::MigrateSocket)?;
    expect_ok(conn)
}

/// Destination: `VerifySetup` of `length` bytes; from now on `arrivals`
/// hashes every page of guest memory (`regions`) that arrives.
pub fn receive_setup<C: Read>(
    conn: &mut C,
    length: u64,
    arrivals: &Arrivals,
    regions: &[MemoryRange],
) -> Result<(), MigratableError> {
    let refuse = |m: String| MigratableError::MigrateReceive(anyhow!(m));
    if length != SETUP_LEN as u64 {
        return Err(refuse(format!(
            "VerifySetup of {length} bytes, expected {SETUP_LEN}"
        )));
    }
    let mut raw = [0u8; SETUP_LEN];
    conn.read_exact(&mut raw)
        .map_err(MigratableError::MigrateSocket)?;
    let setup = VerifySetup::decode(&raw).map_err(|e| refuse(e.to_string()))?;
    if !arrivals.enable(&setup, regions) {
        return Err(refuse("VerifySetup sent twice".into()));
    }
    info!(
        "verify pass: hashing arriving pages with {} ({} KiB of digests)",
        setup.function.name(),
        arrivals.table_bytes() >> 10
    );
    Ok(())
}

/// What the digest exchange did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyOutcome {
    pub checked_bytes: u64,
    pub digest_bytes: u64,
    pub mismatched_bytes: u64,
    pub exchange_ms: f64,
}

/// A failure inside the exchange: reads of guest memory while hashing, or
/// the connection.
struct PassError(MigratableError);

impl From<std::io::Error> for PassError {
    fn from(e: std::io::Error) -> Self {
        PassError(MigratableError::MigrateSend(
            anyhow!(e).context("hashing guest memory"),
        ))
    }
}

impl From<MigratableError> for PassError {
    fn from(e: MigratableError) -> Self {
        PassError(e)
    }
}

/// Source: hashes `runs` of `memory` on the plan's threads and sends the
/// digests; returns the pages the destination wants again.
pub fn exchange_digests<C: Read + Write>(
    conn: &mut C,
    memory: &dyn PageSource,
    runs: &[PageRun],
    plan: &VerifyPlan,
) -> Result<(MemoryRangeTable, VerifyOutcome), MigratableError> {
    let started = Instant::now();
    let mut outcome = VerifyOutcome::default();
    let mut resend = MemoryRangeTable::default();
    hash_ranges::<PassError>(
        memory,
        &plan.digester,
        runs,
        plan.threads,
        BATCH_PAGES,
        &mut |batch: DigestBatch| -> Result<(), PassError> {
            outcome.checked_bytes += batch.page_count() * PAGE_SIZE as u64;
            outcome.digest_bytes += batch.encoded_len();
            Request::digests(batch.encoded_len()).write_to(conn)?;
            batch
                .write_to(conn)
                .map_err(MigratableError::MigrateSocket)?;
            let response = read_answer(conn)?;
            let differ = wire::read_mismatches(conn, response.length())
                .map_err(MigratableError::MigrateSocket)?;
            for r in differ {
                outcome.mismatched_bytes += r.pages * PAGE_SIZE as u64;
                resend.push(MemoryRange {
                    gpa: r.gpa,
                    length: r.pages * PAGE_SIZE as u64,
                });
            }
            Ok(())
        },
    )
    .map_err(|PassError(e)| e)?;
    outcome.exchange_ms = started.elapsed().as_secs_f64() * 1e3;
    info!(
        "verify pass: {} pages hashed ({} MiB) with {} KiB of digests, {} pages differ; {:.1} ms",
        outcome.checked_bytes / PAGE_SIZE as u64,
        outcome.checked_bytes >> 20,
        outcome.digest_bytes >> 10,
        outcome.mismatched_bytes / PAGE_SIZE as u64,
        outcome.exchange_ms
    );
    Ok((resend, outcome))
}

/// Destination: `Digests` of `length` bytes; answers with the pages that
/// differ. Returns the bytes checked and the bytes that differ.
pub fn answer_digests<C: Read + Write>(
    conn: &mut C,
    length: u64,
    arrivals: &Arrivals,
) -> Result<(u64, u64), MigratableError> {
    let refuse = |m: String| MigratableError::MigrateReceive(anyhow!(m));
    let batch = DigestBatch::read_from(conn, length).map_err(|e| refuse(e.to_string()))?;
    if !arrivals.is_enabled() {
        return Err(refuse("Digests before VerifySetup".into()));
    }
    if !arrivals.covers(&batch.runs) {
        return Err(refuse("Digests for pages outside guest memory".into()));
    }
    let differ = arrivals.mismatches(&batch);
    Response::new(Status::Ok, wire::mismatches_len(&differ)).write_to(conn)?;
    wire::write_mismatches(conn, &differ).map_err(MigratableError::MigrateSocket)?;
    let differ_bytes = differ.iter().map(|r| r.pages * PAGE_SIZE as u64).sum();
    Ok((batch.page_count() * PAGE_SIZE as u64, differ_bytes))
}

/// The pages of `table` as runs, each range widened to whole pages.
pub fn page_runs(table: &MemoryRangeTable) -> Vec<PageRun> {
    let page = PAGE_SIZE as u64;
    let mut runs: Vec<PageRun> = Vec::new();
    for r in table.regions() {
        if r.length == 0 {
            continue;
        }
        let first = r.gpa / page;
        let last = r.gpa.saturating_add(r.length).div_ceil(page);
        match runs.last_mut() {
            Some(prev) if prev.gpa / page + prev.pages >= first => {
                let end = (prev.gpa / page + prev.pages).max(last);
                prev.pages = end - prev.gpa / page;
            }
            _ => runs.push(PageRun {
                gpa: first * page,
                pages: last - first,
            }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use vm_migration::protocol::Command;

    use super::*;

    fn memory(pages: usize, seed: u8) -> Vec<u8> {
        (0..pages * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 ^ (i % 251) as u8 ^ seed)
            .collect()
    }

    #[test]
    fn setup_then_digests_name_exactly_the_changed_pages() {
        let pages = 300;
        let mut source_memory = memory(pages, 5);
        let region = MemoryRange {
            gpa: 0,
            length: (pages * PAGE_SIZE) as u64,
        };
        let (mut source, mut destination) = UnixStream::pair().unwrap();
        let plan = VerifyPlan::prepare(2).unwrap();
        let arrived = source_memory.clone();
        let destination_side = std::thread::spawn(move || {
            let arrivals = Arrivals::new();
            let mut totals = (0, 0);
            loop {
                let r = match Request::read_from(&mut destination) {
                    Ok(r) => r,
                    Err(_) => return totals,
                };
                match r.command() {
                    Command::VerifySetup => {
                        receive_setup(&mut destination, r.length(), &arrivals, &[region]).unwrap();
                        // Pre-copy: everything arrives once.
                        arrivals.record(0, &arrived);
                        Response::ok().write_to(&mut destination).unwrap();
                    }
                    Command::Digests => {
                        let (c, d) =
                            answer_digests(&mut destination, r.length(), &arrivals).unwrap();
                        totals.0 += c;
                        totals.1 += d;
                    }
                    other => panic!("{other:?}"),
                }
            }
        });
        send_setup(&mut source, &plan).unwrap();
        // A device writes two pages after they were sent.
        source_memory[17 * PAGE_SIZE] ^= 1;
        source_memory[299 * PAGE_SIZE + 4095] ^= 1;
        let runs = page_runs(&{
            let mut t = MemoryRangeTable::default();
            t.push(region);
            t
        });
        let (resend, outcome) =
            exchange_digests(&mut source, &source_memory, &runs, &plan).unwrap();
        drop(source);
        let mut got: Vec<(u64, u64)> = resend.regions().iter().map(|r| (r.gpa, r.length)).collect();
        got.sort();
        assert_eq!(got, [(17 * 4096, 4096), (299 * 4096, 4096)]);
        assert_eq!(outcome.checked_bytes, (pages * PAGE_SIZE) as u64);
        assert_eq!(outcome.mismatched_bytes, 2 * 4096);
        assert_eq!(
            destination_side.join().unwrap(),
            ((pages * PAGE_SIZE) as u64, 8192)
        );
    }

    #[test]
    fn digests_for_memory_the_destination_does_not_have_are_refused() {
        let arrivals = Arrivals::new();
        let setup = VerifySetup {
            function: super::super::DigestFunction::SipHash24,
            key: DigestKey::random().unwrap(),
        };
        let batch = DigestBatch {
            runs: vec![PageRun {
                gpa: 1 << 30,
                pages: 1,
            }],
            digests: vec![[0; 16]],
        };
        let mut raw = Vec::new();
        batch.write_to(&mut raw).unwrap();
        let mut conn = std::io::Cursor::new(raw.clone());
        let e = answer_digests(&mut conn, raw.len() as u64, &arrivals).unwrap_err();
        assert!(crate::connection::chain(&e).contains("before VerifySetup"));
        arrivals.enable(
            &setup,
            &[MemoryRange {
                gpa: 0,
                length: 1 << 20,
            }],
        );
        let mut conn = std::io::Cursor::new(raw.clone());
        let e = answer_digests(&mut conn, raw.len() as u64, &arrivals).unwrap_err();
        assert!(crate::connection::chain(&e).contains("outside guest memory"));
        let e = receive_setup(&mut std::io::empty(), 3, &arrivals, &[]).unwrap_err();
        assert!(crate::connection::chain(&e).contains("expected 40"));
    }

    #[test]
    fn page_runs_cover_whole_pages_once() {
        let mut t = MemoryRangeTable::default();
        for (gpa, length) in [
            (10, 100),
            (4000, 200),
            (8192, 4096),
            (3 * 4096, 1),
            (20 * 4096, 0),
        ] {
            t.push(MemoryRange { gpa, length });
        }
        assert_eq!(page_runs(&t), [PageRun { gpa: 0, pages: 4 }]);
    }
}
