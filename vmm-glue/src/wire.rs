// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Facts about Cloud Hypervisor's migration wire format that its
//! `vm_migration::protocol` does not state, for code that checks bytes on
//! the wire (the fuzz target, raw peers in tests) or ranges from a peer.
//!
//! These live here, not in our stand-in for CH's crate, so that the
//! stand-in has exactly the real crate's interface.

use vm_migration::protocol::MemoryRange;

/// Bytes of a `Request` or `Response` header: a u16, six bytes and a u64,
/// little-endian.
pub const HEADER_LEN: usize = 16;

/// Bytes of one [`MemoryRange`] in a table: `gpa` and `length`, two
/// little-endian u64.
pub const MEMORY_RANGE_LEN: usize = 16;

/// One past the last byte of `range`, or `None` if the range runs past
/// the end of the address space (possible in a range a peer sent).
pub fn range_end(range: &MemoryRange) -> Option<u64> {
    range.gpa.checked_add(range.length)
}

#[cfg(test)]
mod tests {
    use vm_migration::protocol::{MemoryRangeTable, Request, Response};

    use super::*;

    #[test]
    fn lengths_match_what_the_protocol_writes() {
        let mut v = Vec::new();
        Request::start().write_to(&mut v).unwrap();
        assert_eq!(v.len(), HEADER_LEN);
        v.clear();
        Response::ok().write_to(&mut v).unwrap();
        assert_eq!(v.len(), HEADER_LEN);
        let mut t = MemoryRangeTable::default();
        t.push(MemoryRange { gpa: 1, length: 2 });
        assert_eq!(t.length(), MEMORY_RANGE_LEN as u64);
    }

    #[test]
    fn range_end_refuses_a_wrapping_range() {
        let r = |gpa, length| MemoryRange { gpa, length };
        assert_eq!(range_end(&r(0x1000, 0x1000)), Some(0x2000));
        assert_eq!(range_end(&r(u64::MAX, 0)), Some(u64::MAX));
        assert_eq!(range_end(&r(u64::MAX, 1)), None);
    }
}
