//! VMM-shaped test host.
