//! Cloud Hypervisor glue for the Xe VF migration engine.

pub mod migration;
pub mod protocol;
