// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Live migration over Cloud Hypervisor's protocol as our series extends
//! it. Everything we add to the protocol (feature negotiation, streamed
//! VF state and its connections, the verify pass, the two-step
//! switch-over) is the `migration-ext` crate, which the patched Cloud
//! Hypervisor runs too; this module is what stands in for CH itself: its
//! transport ([`conn`]), its memory pre-copy loop and extra memory
//! connections ([`lanes`]), and the source's and destination's state
//! machines ([`send`], [`receive`]) that call the crate.
//!
//! Source: Start (offering its features), Config (VM config and each
//! VF's description; the destination checks them before anything stops),
//! VerifySetup with the verify pass, Memory pass 0 and dirty passes while
//! the VM runs, pause, the final memory pass (with each VF's state
//! concurrently on a connection of its own when both sides agree), State,
//! the VFs' state in turn otherwise, Complete, then Switchover. Any
//! failure before Switchover went out resumes the source.

pub mod conn;
pub mod lanes;
pub mod outcome;
pub mod receive;
pub mod send;
pub mod vram;

use std::io::Read;

use migration_ext::streamed::StreamedDescription;
use serde::{Deserialize, Serialize};
use xe_vf_glue::error_chain::Chain;
use xe_vf_glue::migration::MigratableError;

use crate::error::HostError;
use crate::vm::VmConfig;

/// Largest Config or State payload accepted.
pub const MAX_JSON_PAYLOAD: u64 = 1 << 20;

/// Payload of the `Config` command.
#[derive(Clone, Serialize, Deserialize)]
pub struct MigrationConfig {
    pub vm: VmConfig,
    /// Each VF as the source describes it, in wire order.
    pub streamed: Vec<StreamedDescription>,
}

/// A failure of the migration protocol in `phase`, with its whole chain.
pub fn failed(phase: impl Into<String>, e: &MigratableError) -> HostError {
    HostError::failed(phase, Chain(e))
}

/// Reads a JSON payload of `length` bytes, bounded.
pub fn read_json_payload<T: for<'de> Deserialize<'de>, R: Read>(
    conn: &mut R,
    length: u64,
    what: &str,
) -> Result<T, HostError> {
    if length > MAX_JSON_PAYLOAD {
        return Err(HostError::bad_request(
            what,
            format!("payload of {length} bytes exceeds {MAX_JSON_PAYLOAD}"),
        ));
    }
    let mut buf = vec![0u8; length as usize];
    conn.read_exact(&mut buf)
        .map_err(|e| HostError::failed(what, format!("reading payload: {e}")))?;
    serde_json::from_slice(&buf).map_err(|e| HostError::bad_request(what, format!("bad JSON: {e}")))
}
