// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Xe SR-IOV VF migration engine.
//!
//! One engine for every door (Cloud Hypervisor glue, the `xe-vf-mig` CLI,
//! the test host): device access behind [`device::MigrationDevice`], the
//! uAPI state machine in [`fsm`], the Xe packet stream in [`xe_stream`],
//! the VMM-side device-state format in [`state_format`], and the streaming
//! save/restore paths in [`engine`]; [`vram_bar`] reads a VF's VRAM
//! through its BAR for pre-copy; [`host`] finds, prepares and checks VFs
//! on a real host.

pub mod backend;
pub mod device;
pub mod device_config;
pub mod emulated;
pub mod engine;
pub mod fsm;
pub mod host;
pub mod proc_stats;
pub mod state_format;
pub mod uapi;
pub mod vfio;
pub mod vram_bar;
pub mod xe_stream;

pub use device::{DeviceError, DeviceIdentity, MigrationDevice};
pub use uapi::{DeviceState, MigrationFlags};
