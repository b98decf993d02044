//! Cloud Hypervisor glue for the Xe VF migration engine.
