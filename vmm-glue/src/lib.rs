// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Cloud Hypervisor integration of the Xe VF migration engine.
//!
//! [`migration`] and [`protocol`] are Cloud Hypervisor's `vm-migration`
//! contracts (CH's own crate in the patched CH build; our stand-in,
//! `vmm-glue/vm-migration`, elsewhere); [`xe_vf::XeVfDevice`] implements
//! them for one VF and [`device_set::XeVfSet`] orders several;
//! [`snapshot`] owns the on-disk layout and [`dirty`] the dirty-tracking
//! policy. [`wire`] and [`error_chain`] hold what CH's crate does not: the
//! wire format's sizes, and printing an error with its causes. [`vram`]
//! hands a VF's VRAM to the engine's VRAM pre-copy.

pub mod device_set;
pub mod dirty;
pub mod error_chain;
pub mod iommufd_dirty;
pub mod snapshot;
pub mod vram;
pub mod wire;
pub mod xe_vf;

pub use vm_migration as migration;
pub use vm_migration::protocol;
pub use xe_vf::{DeviceMigrationInfo, XeVfDevice, XeVfIncoming};
