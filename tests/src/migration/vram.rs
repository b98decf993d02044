// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What a VF's VRAM pre-copy cost, for the migration report. The VF's
//! BAR reader and stream map are `xe_vf_glue::vram`'s, as in the patched
//! Cloud Hypervisor.

use migration_ext::lanes::LaneOutcome;
use serde::Serialize;

/// What one VF's VRAM cost, for the migration report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VramReport {
    pub id: String,
    /// BAR bytes read while the VM ran, and of those sent (not zero).
    pub precopy_read_bytes: u64,
    pub precopy_data_bytes: u64,
    pub precopy_ms: f64,
    /// Whether stop-copy compared pages with what was pre-copied, and why.
    pub compared: bool,
    pub reason: String,
    /// The device's stop-copy stream, what of it was sent and what the
    /// destination took from pre-copied VRAM.
    pub stream_bytes: u64,
    pub sent_bytes: u64,
    pub held_bytes: u64,
    /// VRAM pages compared that the destination did not hold (written
    /// after pre-copy read them).
    pub changed_pages: u64,
}

impl VramReport {
    pub fn of(outcome: &LaneOutcome) -> Option<Self> {
        let v = outcome.vram.as_ref()?;
        Some(VramReport {
            id: outcome.id.clone(),
            precopy_read_bytes: v.precopy.read_bytes,
            precopy_data_bytes: v.precopy.data_bytes,
            precopy_ms: v.precopy.elapsed.as_secs_f64() * 1e3,
            compared: v.compared,
            reason: v.reason.clone(),
            stream_bytes: v.stream.stream_bytes,
            sent_bytes: v.stream.sent_bytes,
            held_bytes: v.stream.held_bytes,
            changed_pages: v.stream.changed_pages,
        })
    }
}
