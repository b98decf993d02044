// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One error type for the host: the phase that failed, its cause, what it
//! happened in (outermost first), and the HTTP status the API answers with.
//!
//! The API sends the error as Cloud Hypervisor does: a JSON array of
//! messages from the top of the chain to the root cause, which `ch-remote`
//! prints one numbered line each.

use std::fmt::{self, Display};

/// Root causes Cloud Hypervisor reports in the same words.
pub const VM_NOT_CREATED: &str = "VM is not created";
pub const VM_NOT_RUNNING: &str = "VM is not running";

/// A failed operation, named by phase so an operator knows where to look.
#[derive(Debug)]
pub struct HostError {
    /// HTTP status for the API response (CH's: 400 bad request, 404 no
    /// VM, 500 everything else).
    pub status: u16,
    /// What the host was doing (`config`, `memory pass 2`, `device-state
    /// gpu0`...); empty for a root cause CH words itself (`VM is not running`).
    pub phase: String,
    pub cause: String,
    /// Outer layers of the chain, outermost first.
    pub context: Vec<String>,
}

impl Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.phase.is_empty() {
            write!(f, "{}", self.cause)
        } else {
            write!(f, "{}: {}", self.phase, self.cause)
        }
    }
}

impl std::error::Error for HostError {}

impl HostError {
    /// `cause` prints with `{:#}`, so an `anyhow::Error` shows its whole
    /// chain. (A `MigratableError` names only its phase: pass it through
    /// `xe_vf_glue::error_chain::Chain`.)
    pub fn new(status: u16, phase: impl Into<String>, cause: impl Display) -> Self {
        HostError {
            status,
            phase: phase.into(),
            cause: format!("{cause:#}"),
            context: Vec::new(),
        }
    }

    /// The request itself is wrong (400).
    pub fn bad_request(phase: impl Into<String>, cause: impl Display) -> Self {
        Self::new(400, phase, cause)
    }

    /// The VM is not in a state that allows the request (500, as CH
    /// answers invalid state transitions).
    pub fn conflict(phase: impl Into<String>, cause: impl Display) -> Self {
        Self::new(500, phase, cause)
    }

    /// The operation failed while running (500).
    pub fn failed(phase: impl Into<String>, cause: impl Display) -> Self {
        Self::new(500, phase, cause)
    }

    /// CH's `VmNotCreated` (404).
    pub fn vm_not_created() -> Self {
        Self::new(404, "", VM_NOT_CREATED)
    }

    /// CH's `VmNotRunning` (500).
    pub fn vm_not_running() -> Self {
        Self::new(500, "", VM_NOT_RUNNING)
    }

    /// Wraps the error in an outer layer (`context` of anyhow).
    pub fn context(mut self, outer: impl Into<String>) -> Self {
        self.context.insert(0, outer.into());
        self
    }

    /// The chain as CH's `error_chain_messages` lists it, top first.
    pub fn messages(&self) -> Vec<String> {
        let mut m = self.context.clone();
        m.push(self.to_string());
        m
    }
}

pub type HostResult<T> = Result<T, HostError>;
