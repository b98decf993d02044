// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VMM-shaped test host, the project's stand-in for Cloud Hypervisor.
//!
//! It owns guest memory ([`memory`], a memfd with a software dirty log),
//! a vCPU that writes into it ([`vcpu`]), and Xe VFs through the CH glue
//! ([`vm`]); it serves CH's REST API subset ([`server`], [`http`],
//! [`api`]), snapshots in CH's layout ([`snapshot`]) and migrates over
//! CH's protocol ([`migration`]). [`client`] is the matching API client
//! for tests and benchmarks.

pub mod api;
pub mod api_bodies;
pub mod client;
pub mod error;
pub mod fault;
pub mod http;
pub mod memory;
pub mod migration;
pub mod server;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod vmm;
