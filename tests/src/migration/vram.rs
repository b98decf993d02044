// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VF's VRAM for `migration_ext::vram`: the engine's BAR reader and
//! stream map, as the protocol extensions take them. The emulated VF has
//! a BAR; a real VF's BAR reader is not written yet, so a real VF sends
//! all of its VRAM in stop-copy as before.

use std::io;
use std::sync::Arc;

use migration_ext::lanes::LaneOutcome;
use migration_ext::vram::wire::Piece;
use migration_ext::vram::{BarSource, StreamLayout, VramSource};
use serde::Serialize;
use xe_vf_glue::xe_vf::XeVfDevice;
use xe_vf_plugin::backend::Backend;
use xe_vf_plugin::vram_bar::{StateStreamVram, VramBar};

struct Bar(Arc<dyn VramBar>);

impl BarSource for Bar {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
}

struct Layout {
    map: StateStreamVram,
    pieces: Vec<(Option<u64>, u64)>,
}

impl StreamLayout for Layout {
    fn map(&mut self, data: &[u8], out: &mut Vec<Piece>) {
        self.pieces.clear();
        self.map.map(data, &mut self.pieces);
        out.extend(self.pieces.iter().map(|(bar, len)| match bar {
            Some(offset) => Piece::bar(*offset, *len),
            None => Piece::raw(*len),
        }));
    }
}

/// The VF's VRAM as pre-copy reads it, if the VF has a BAR reader.
pub fn source(device: &XeVfDevice) -> Option<VramSource> {
    match device.backend() {
        Backend::Emulated(vf) => Some(VramSource {
            bar: Arc::new(Bar(vf.vram_bar())),
            layout: Box::new(Layout {
                map: StateStreamVram::new(vf.config().lmem_per_tile()),
                pieces: Vec::new(),
            }),
        }),
        Backend::Vfio(_) => None,
    }
}

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
