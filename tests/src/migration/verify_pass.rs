// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The verify pass: for VFs with `dirty_tracking=all`, the final memory
//! pass sends digests of the DMA-reachable pages instead of the pages,
//! and only the pages whose digests differ on the destination follow.
//!
//! Negotiated in Start like the series' `ProtocolFeatures` (patch 0004):
//! the source announces its features in `command_headers[2..6]` of
//! Start, the destination answers with the subset it speaks in the
//! padding of its Ok (zero from a destination that predates them). With
//! [`FEATURE_DIGEST_VERIFY`] agreed, the source sends
//! [`COMMAND_VERIFY_SETUP`] after Config and, in the final pass,
//! [`COMMAND_DIGESTS`] batches, each answered by an Ok whose payload
//! lists the pages to send again. See [`xe_vf_glue::verify`] for the
//! digests and the payloads.
//!
//! These words are not in the series' `vm-migration` crate (which the
//! stand-in restates item for item), so the host writes and reads them
//! as raw headers: bits and values chosen clear of the series' own
//! (features 1 and 2, commands 0x100 and 0x101), to be carried into the
//! series as `ProtocolFeatures`, `Command` and `ConnectionRole` items.

use std::io::{Read, Write};
use std::time::Instant;

use log::info;
use serde::Serialize;
use xe_vf_glue::error_chain::Chain;
use xe_vf_glue::migration::MigratableError;
use xe_vf_glue::protocol::{MemoryRange, MemoryRangeTable, Request, Response, Status};
use xe_vf_glue::verify::wire::{self, DigestBatch, PageRun, VerifySetup, SETUP_LEN};
use xe_vf_glue::verify::{
    hash_ranges, measure_functions, rates, Decision, DigestKey, FunctionRate, PageDigester,
};
use xe_vf_glue::wire::HEADER_LEN;

use super::MAX_ERROR_MESSAGE;
use crate::error::{HostError, HostResult};
use crate::memory::{GuestMemory, PAGE_SIZE};

/// The verify pass ([`COMMAND_VERIFY_SETUP`], [`COMMAND_DIGESTS`]).
pub const FEATURE_DIGEST_VERIFY: u32 = 1 << 16;
/// One connection per VF for its state, concurrent with the final memory
/// pass (see [`super::device_lanes`]).
pub const FEATURE_DEVICE_STATE_CONNECTIONS: u32 = 1 << 17;
/// Ours, announced beside the series' (`super::SUPPORTED_FEATURES`).
pub const EXTENSION_FEATURES: u32 = FEATURE_DIGEST_VERIFY | FEATURE_DEVICE_STATE_CONNECTIONS;

/// Command word: digest function and key (payload `VerifySetup`).
pub const COMMAND_VERIFY_SETUP: u16 = 0x180;
/// Command word: a batch of digests (payload `DigestBatch`); the Ok
/// answering it carries the pages that differ.
pub const COMMAND_DIGESTS: u16 = 0x181;
/// Connection role: one VF's state (see [`super::device_lanes`]).
pub const ROLE_DEVICE_STATE: u16 = 0x100;

/// A request header of ours.
pub fn raw_request(command: u16, headers: [u8; 6], length: u64) -> [u8; HEADER_LEN] {
    let mut raw = [0u8; HEADER_LEN];
    raw[..2].copy_from_slice(&command.to_le_bytes());
    raw[2..8].copy_from_slice(&headers);
    raw[8..].copy_from_slice(&length.to_le_bytes());
    raw
}

/// A request as read: one of our extension commands, or CH's.
pub enum Incoming {
    VerifySetup { length: u64 },
    Digests { length: u64 },
    Ch(Request),
}

/// Reads the next request, ours or CH's.
pub fn read_request<R: Read>(conn: &mut R) -> Result<Incoming, MigratableError> {
    let mut raw = [0u8; HEADER_LEN];
    conn.read_exact(&mut raw)
        .map_err(MigratableError::MigrateSocket)?;
    let word = u16::from_le_bytes([raw[0], raw[1]]);
    let mut length = [0u8; 8];
    length.copy_from_slice(&raw[8..]);
    let length = u64::from_le_bytes(length);
    Ok(match word {
        COMMAND_VERIFY_SETUP => Incoming::VerifySetup { length },
        COMMAND_DIGESTS => Incoming::Digests { length },
        _ => Incoming::Ch(Request::read_from(&mut &raw[..])?),
    })
}

/// Pages per `Digests` batch: 64 MiB of memory, 256 KiB of digests.
const BATCH_PAGES: u64 = 16 * 1024;

/// `Start` announcing `features` (the series' and ours).
pub fn start_request(features: u32) -> [u8; HEADER_LEN] {
    let mut headers = [0u8; 6];
    headers[..2].copy_from_slice(&xe_vf_glue::protocol::CURRENT_PROTOCOL_VERSION.to_le_bytes());
    headers[2..].copy_from_slice(&features.to_le_bytes());
    raw_request(1, headers, 0)
}

/// The features a `Start` announces.
pub fn sender_features(request: &Request) -> u32 {
    let h = request.command_headers();
    u32::from_le_bytes([h[2], h[3], h[4], h[5]])
}

/// The Ok to Start naming the features this destination agrees to.
pub fn start_answer(features: u32) -> [u8; HEADER_LEN] {
    let mut raw = [0u8; HEADER_LEN];
    raw[..2].copy_from_slice(&(Status::Ok as u16).to_le_bytes());
    raw[2..6].copy_from_slice(&features.to_le_bytes());
    raw
}

/// Reads the answer to Start; the features the destination agreed to.
pub fn read_start_answer<R: Read>(conn: &mut R) -> HostResult<u32> {
    let mut raw = [0u8; HEADER_LEN];
    conn.read_exact(&mut raw).map_err(|e| {
        HostError::failed(
            "start",
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the destination closed the connection without answering".to_string()
            } else {
                format!("no answer from the destination: {e}")
            },
        )
    })?;
    let response =
        Response::read_from(&mut &raw[..]).map_err(|e| HostError::failed("start", Chain(&e)))?;
    if response.status() != Status::Ok {
        let len = response.length().min(MAX_ERROR_MESSAGE) as usize;
        let mut msg = vec![0u8; len];
        let _ = conn.read_exact(&mut msg);
        return Err(HostError::failed(
            "start",
            format!("destination refused: {}", String::from_utf8_lossy(&msg)),
        ));
    }
    Ok(u32::from_le_bytes([raw[2], raw[3], raw[4], raw[5]]))
}

/// The source's choice of digest function and key, with the rates it was
/// chosen by.
pub struct VerifyPlan {
    pub setup: VerifySetup,
    pub digester: PageDigester,
    pub threads: usize,
    pub report: PlanReport,
}

/// What the migration report shows of the plan.
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
    pub fn prepare(threads: usize) -> HostResult<Self> {
        let key = DigestKey::random().map_err(|e| HostError::failed("verify setup", e))?;
        let ranked: Vec<FunctionRate> = measure_functions(&key);
        let function = ranked[0].function;
        let digester = PageDigester::new(function, &key);
        let hash_rate = rates::measure_parallel(&digester, threads)
            .map_err(|e| HostError::failed("verify setup", e))?;
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

    pub fn hash_rate(&self) -> f64 {
        self.report.hash_rate_mib_s * f64::from(1 << 20)
    }
}

/// Sends `VerifySetup` and waits for its Ok.
pub fn send_setup<C: Read + Write>(conn: &mut C, plan: &VerifyPlan) -> HostResult<()> {
    let phase = "verify setup";
    conn.write_all(&raw_request(COMMAND_VERIFY_SETUP, [0; 6], SETUP_LEN as u64))
        .map_err(|e| HostError::failed(phase, e))?;
    conn.write_all(&plan.setup.encode())
        .map_err(|e| HostError::failed(phase, e))?;
    super::expect_ok(conn, phase)
}

/// Pages set in `dma` but not in `cpu` (bitmaps of one bit per page),
/// as runs.
pub fn dma_only_runs(dma: &[u64], cpu: &[u64]) -> Vec<PageRun> {
    let mut runs = Vec::new();
    for (i, (&d, &c)) in dma
        .iter()
        .zip(cpu.iter().chain(std::iter::repeat(&0)))
        .enumerate()
    {
        let mut bits = d & !c;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            wire::push_page(&mut runs, i as u64 * 64 + b);
            bits &= bits - 1;
        }
    }
    runs
}

/// What the digest exchange did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyOutcome {
    pub checked_bytes: u64,
    pub digest_bytes: u64,
    pub mismatched_bytes: u64,
    pub exchange_ms: f64,
}

/// A failure inside the digest exchange: hashing errors (reads of
/// guest memory) become host errors of the pass.
struct PassError(HostError);

impl From<std::io::Error> for PassError {
    fn from(e: std::io::Error) -> Self {
        PassError(HostError::failed("final memory pass (digests)", e))
    }
}

impl From<HostError> for PassError {
    fn from(e: HostError) -> Self {
        PassError(e)
    }
}

/// Hashes `runs` of `memory` on the plan's threads and sends the digests;
/// returns the pages the destination wants again.
pub fn exchange_digests<C: Read + Write>(
    conn: &mut C,
    memory: &GuestMemory,
    runs: &[PageRun],
    plan: &VerifyPlan,
) -> HostResult<(MemoryRangeTable, VerifyOutcome)> {
    let phase = "final memory pass (digests)";
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
            outcome.checked_bytes += batch.page_count() * PAGE_SIZE;
            outcome.digest_bytes += batch.encoded_len();
            conn.write_all(&raw_request(COMMAND_DIGESTS, [0; 6], batch.encoded_len()))
                .map_err(|e| HostError::failed(phase, e))?;
            batch
                .write_to(conn)
                .map_err(|e| HostError::failed(phase, e))?;
            let response =
                Response::read_from(conn).map_err(|e| HostError::failed(phase, Chain(&e)))?;
            if response.status() != Status::Ok {
                return Err(HostError::failed(
                    phase,
                    format!("destination answered {:?}", response.status()),
                )
                .into());
            }
            for r in wire::read_mismatches(conn, response.length())
                .map_err(|e| HostError::failed(phase, e))?
            {
                outcome.mismatched_bytes += r.pages * PAGE_SIZE;
                resend.push(MemoryRange {
                    gpa: r.gpa,
                    length: r.pages * PAGE_SIZE,
                });
            }
            Ok(())
        },
    )
    .map_err(|PassError(e)| e)?;
    outcome.exchange_ms = started.elapsed().as_secs_f64() * 1e3;
    info!(
        "verify pass: {} MiB checked with {} KiB of digests, {} KiB differ, {:.1} ms",
        outcome.checked_bytes >> 20,
        outcome.digest_bytes >> 10,
        outcome.mismatched_bytes >> 10,
        outcome.exchange_ms
    );
    Ok((resend, outcome))
}

/// How the final pass covered the DMA-reachable pages.
#[derive(Clone, Debug, Serialize)]
pub struct FinalPassChoice {
    pub decision: Decision,
    pub plan: PlanReport,
}

/// Destination: `VerifySetup` - hash every page that arrives from now on.
pub fn receive_setup<C: Read>(conn: &mut C, length: u64, memory: &GuestMemory) -> HostResult<()> {
    let phase = "verify setup";
    if length != SETUP_LEN as u64 {
        return Err(HostError::bad_request(
            phase,
            format!("payload of {length} bytes, expected {SETUP_LEN}"),
        ));
    }
    let mut raw = [0u8; SETUP_LEN];
    conn.read_exact(&mut raw)
        .map_err(|e| HostError::failed(phase, e))?;
    let setup = VerifySetup::decode(&raw).map_err(|e| HostError::bad_request(phase, e))?;
    if !memory.hash_arrivals(PageDigester::new(setup.function, &setup.key)) {
        return Err(HostError::bad_request(phase, "VerifySetup sent twice"));
    }
    info!(
        "verify pass: hashing arriving pages with {} ({} KiB of digests)",
        setup.function.name(),
        memory.arrival_table_bytes() >> 10
    );
    Ok(())
}

/// Destination: `Digests` - compares and answers with the pages that
/// differ. Returns the bytes checked and the bytes that differ.
pub fn answer_digests<C: Read + Write>(
    conn: &mut C,
    length: u64,
    memory: &GuestMemory,
) -> HostResult<(u64, u64)> {
    let phase = "digests";
    let batch =
        DigestBatch::read_from(conn, length).map_err(|e| HostError::bad_request(phase, e))?;
    for r in &batch.runs {
        memory
            .check(&MemoryRange {
                gpa: r.gpa,
                length: r.pages * PAGE_SIZE,
            })
            .map_err(|e| HostError::bad_request(phase, e))?;
    }
    let differ = memory.mismatches(&batch);
    Response::new(Status::Ok, wire::mismatches_len(&differ))
        .write_to(conn)
        .map_err(|e| HostError::failed(phase, Chain(&e)))?;
    wire::write_mismatches(conn, &differ).map_err(|e| HostError::failed(phase, e))?;
    let differ_bytes = differ.iter().map(|r| r.pages * PAGE_SIZE).sum();
    Ok((batch.page_count() * PAGE_SIZE, differ_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_only_runs_skip_cpu_dirty_pages() {
        let dma = [u64::MAX, 0b1011];
        let cpu = [!0b1100u64, 0];
        let runs = dma_only_runs(&dma, &cpu);
        assert_eq!(
            runs,
            [
                PageRun {
                    gpa: 2 * 4096,
                    pages: 2
                },
                PageRun {
                    gpa: 64 * 4096,
                    pages: 2
                },
                PageRun {
                    gpa: 67 * 4096,
                    pages: 1
                }
            ]
        );
        assert!(dma_only_runs(&[0, 0], &[]).is_empty());
    }

    #[test]
    fn features_ride_in_start_and_its_ok() {
        let announced = super::super::SUPPORTED_FEATURES.bits() | EXTENSION_FEATURES;
        let raw = start_request(announced);
        let Incoming::Ch(req) = read_request(&mut &raw[..]).unwrap() else {
            panic!("Start is CH's");
        };
        assert_eq!(req.command(), xe_vf_glue::protocol::Command::Start);
        assert_eq!(req.sender_protocol_version().unwrap(), 0);
        assert_eq!(sender_features(&req), announced);
        // The series' crate sees its own bits and drops ours.
        assert_eq!(req.sender_features(), super::super::SUPPORTED_FEATURES);
        assert_eq!(sender_features(&Request::start()), 0);
        let raw = start_answer(FEATURE_DIGEST_VERIFY);
        assert_eq!(
            read_start_answer(&mut &raw[..]).unwrap(),
            FEATURE_DIGEST_VERIFY
        );
        // A destination that predates features answers a plain Ok.
        let mut plain = Vec::new();
        Response::ok().write_to(&mut plain).unwrap();
        assert_eq!(read_start_answer(&mut &plain[..]).unwrap(), 0);
        // Our commands are told apart from CH's.
        let setup = raw_request(COMMAND_VERIFY_SETUP, [0; 6], 40);
        assert!(matches!(
            read_request(&mut &setup[..]).unwrap(),
            Incoming::VerifySetup { length: 40 }
        ));
    }
}
