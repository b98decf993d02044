// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One error type for the host: the phase that failed, its cause, and the
//! HTTP status the API answers with.

use std::fmt::Display;

/// A failed operation, named by phase so an operator knows where to look.
#[derive(Debug, thiserror::Error)]
#[error("{phase}: {cause}")]
pub struct HostError {
    /// HTTP status for the API response.
    pub status: u16,
    /// What the host was doing (`config`, `memory pass 2`, `device-state gpu0`...).
    pub phase: String,
    pub cause: String,
}

impl HostError {
    pub fn new(status: u16, phase: impl Into<String>, cause: impl Display) -> Self {
        HostError {
            status,
            phase: phase.into(),
            cause: cause.to_string(),
        }
    }

    /// The request itself is wrong (400).
    pub fn bad_request(phase: impl Into<String>, cause: impl Display) -> Self {
        Self::new(400, phase, cause)
    }

    /// The VM is not in a state that allows the request (409).
    pub fn conflict(phase: impl Into<String>, cause: impl Display) -> Self {
        Self::new(409, phase, cause)
    }

    /// The operation failed while running (500).
    pub fn failed(phase: impl Into<String>, cause: impl Display) -> Self {
        Self::new(500, phase, cause)
    }
}

pub type HostResult<T> = Result<T, HostError>;
