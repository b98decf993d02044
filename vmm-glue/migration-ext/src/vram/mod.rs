// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! VRAM out of the downtime (`ProtocolFeatures::VRAM_PRECOPY`).
//!
//! An Xe VF has no PRE_COPY, so all its VRAM crosses the link while the
//! VM is stopped. But the VMM maps the VF's memory BAR, and reading
//! device memory has no side effect: while the VM runs, the source reads
//! VRAM through the BAR and sends it ahead on the VF's device-state
//! connection ([`send::precopy`]); the destination keeps it in an
//! unnamed file with a keyed digest per page ([`store::VramStore`]).
//!
//! In stop-copy the device's real stream is read as always. It goes out
//! in windows of at most [`wire::MAX_WINDOW`] bytes
//! ([`send::WindowWriter`]): the source names the window's pieces (which
//! bytes are VRAM at which BAR offset, as the component's
//! [`send::StreamLayout`] says) and the digest of every whole VRAM page
//! in it; the destination answers with the pages it holds, after
//! reading each back from its file and hashing it again; only the rest is
//! sent. The destination rebuilds the exact stream ([`receive::Rebuild`])
//! and its device loads it: the device sees byte for byte what the
//! source's device produced. Correctness never depends on the BAR image
//! matching the stream (a page that differs is sent), only the speed.
//!
//! The lane protocol is in [`wire`]; [`window`] is the cut of a window
//! both sides share; [`rates`] decides per migration whether comparing
//! pays on this link.

pub mod rates;
pub mod receive;
pub mod send;
pub mod store;
pub mod window;
pub mod wire;

pub use rates::{VramDecision, VramPrecopyMode};
pub use receive::{read_stream_start, receive_precopy, Precopied, Rebuild};
pub use send::{precopy, BarSource, PrecopyReport, StreamLayout, WindowStats, WindowWriter};
pub use store::VramStore;

use std::sync::Arc;

/// `length` of the `DeviceState` request that opens a device-state
/// connection carrying pre-copied VRAM (instead of
/// `DEVICE_STATE_SELF_DELIMITED`): the component's index follows in the
/// STREAM frame.
pub const VRAM_PRECOPY_LANE: u64 = u64::MAX - 1;

/// A component's VRAM as the source reaches it.
pub struct VramSource {
    pub bar: Arc<dyn BarSource>,
    pub layout: Box<dyn StreamLayout>,
}

#[cfg(test)]
mod tests;
