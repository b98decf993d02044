// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The nested Cloud Hypervisor tests (`scripts/nested/run.sh`, run by
//! `tests/cloud_hypervisor.rs` and `tests/xe_vfio_pci.rs`) and the tools
//! they run inside the nested VMs besides Cloud Hypervisor itself: a
//! migration relay that records the phases on the wire and can cut a
//! migration at an exact phase, and the L2 guest's VRAM workload.

pub mod relay;
pub mod verdict;
pub mod vram;
