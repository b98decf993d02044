// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What we add to Cloud Hypervisor's live-migration protocol, written once
//! for every VMM that speaks it (the patched `cloud-hypervisor` and the
//! test host both call this crate; neither carries a copy).
//!
//! Every part is negotiated in `Start` ([`features`]), so a peer that
//! lacks one gets the protocol as it was:
//!
//! - [`streamed`]: components whose state is too large for `State`
//!   ([`vm_migration::StreamedState`]) are described in `Config`, checked
//!   by the destination before the source pauses, and stream their state
//!   as `DeviceState` requests after `State`; the destination loads it into
//!   handles it opened at `Config` ([`vm_migration::IncomingState`]) and
//!   never runs a component without its state;
//! - [`lanes`]: or each component's state on a connection of its own,
//!   all at once and concurrently with the final memory pass;
//! - [`verify`] and [`final_pass`]: pages a device may have written without
//!   logging it are checked by keyed digest in the final memory pass
//!   instead of resent, when the measured rates say that is faster;
//! - [`switchover`]: the two-step switch-over, so no failure leaves the VM
//!   running on both hosts;
//! - [`vram`]: a VF's VRAM read through its BAR and sent ahead while the
//!   VM runs, on its connection of its own; in stop-copy only what the
//!   destination does not already hold is sent;
//! - [`ranges`]: dirty ranges from several sources merged, so a page is
//!   sent once per pass;
//! - [`checksum`]: a guest memory checksum both sides can log, for tests.
//!
//! The VMM supplies what is its own: sockets ([`connection::Connection`]),
//! guest memory ([`verify::PageSource`]), its memory pre-copy loop and its
//! components.

pub mod checksum;
pub mod connection;
pub mod features;
pub mod final_pass;
pub mod lanes;
pub mod ranges;
pub mod streamed;
pub mod switchover;
pub mod verify;
pub mod vram;

pub use connection::Connection;
pub use features::SUPPORTED_FEATURES;
