// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The nested Cloud Hypervisor test (`scripts/nested/run.sh`, run by
//! `tests/cloud_hypervisor.rs`) and the one tool it runs inside the nested
//! VM besides Cloud Hypervisor itself: a migration relay that records the
//! phases on the wire and can cut a migration at an exact phase.

pub mod relay;
