// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Verify instead of resending: the final memory pass for a VF that
//! cannot log its DMA.
//!
//! With `dirty_tracking=all` every page the VF can reach must be assumed
//! dirty once it stops, and resending all of them is most of the downtime
//! on a slow link. Instead the destination keeps a [`DigestTable`]: a
//! keyed digest of every page, computed as the page arrived during
//! pre-copy. In the final pass the source hashes the DMA-reachable pages
//! the CPU dirty log does not already cover and sends the digests
//! ([`wire::DigestBatch`]); the destination answers with the pages whose
//! digest differs, and only those are sent.
//!
//! - [`digest`]: the digest functions and the per-migration key. A guest
//!   knows neither key nor digests, so it cannot make two page contents
//!   agree (see [`digest::DigestFunction`] for the bounds).
//! - [`rates`]: the function is chosen by its measured rate on this
//!   machine, and each migration decides between verifying and plain
//!   resending from the measured hash and link rates ([`rates::decide`]).
//! - [`parallel`]: hashing of page ranges on several threads, streamed in
//!   bounded batches.
//! - [`table`]: the destination's table, 16 bytes + 1 bit per 4 KiB page
//!   (4.03 MiB per GiB of guest memory).
//! - [`wire`]: payloads of the two additive protocol messages.
//! - [`arrivals`]: the destination's digests of arriving pages, fed by
//!   every connection that writes guest memory.
//! - [`exchange`]: the messages on the wire, for both sides.

pub mod arrivals;
pub mod digest;
pub mod exchange;
pub mod parallel;
pub mod rates;
pub mod table;
pub mod wire;

pub use arrivals::Arrivals;
pub use digest::{Digest, DigestFunction, DigestKey, PageDigester, DIGEST_LEN, PAGE_SIZE};
pub use exchange::{
    answer_digests, exchange_digests, page_runs, receive_setup, send_setup, PlanReport,
    VerifyOutcome, VerifyPlan,
};
pub use parallel::{hash_ranges, PageSource};
pub use rates::{decide, measure_functions, Decision, FunctionRate};
pub use table::DigestTable;
