// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary bytes from a migration peer: request and response headers,
//! connection roles and memory range tables are decoded without panic and
//! without allocating beyond the table bound, and what decodes re-encodes
//! to the same bytes.

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use xe_vf_glue::protocol::{Command, ConnectionRole, MemoryRangeTable, Request, Response};
use xe_vf_glue::wire::HEADER_LEN;

fuzz_target!(|data: &[u8]| {
    let mut cursor = Cursor::new(data);
    if let Ok(req) = Request::read_from(&mut cursor) {
        let mut out = Vec::new();
        req.write_to(&mut out).expect("re-encode");
        assert_eq!(&out[..], &data[..HEADER_LEN]);
        let _ = req.sender_protocol_version();
        // What a receiver reads from a request, once it knows the command.
        match req.command() {
            Command::Start => drop(req.sender_features()),
            Command::DeviceState => drop(req.device_index()),
            _ => {}
        }
        // The request's own length field drives the table read, as on the
        // wire: a hostile 2^63 must be refused, not allocated.
        let _ = MemoryRangeTable::read_from(&mut cursor, req.length());
    }
    let mut cursor = Cursor::new(data);
    if let Ok(resp) = Response::read_from(&mut cursor) {
        let mut out = Vec::new();
        resp.write_to(&mut out).expect("re-encode");
        assert_eq!(&out[..], &data[..HEADER_LEN]);
        let _ = resp.features();
    }
    let _ = ConnectionRole::read_from(&mut Cursor::new(data));
    if data.len() >= 8 {
        let declared = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]));
        if let Ok(table) = MemoryRangeTable::read_from(&mut Cursor::new(&data[8..]), declared) {
            let mut out = Vec::new();
            table.write_to(&mut out).expect("re-encode");
            assert_eq!(out.len() as u64, declared);
            assert_eq!(&out[..], &data[8..8 + out.len()]);
        }
    }
});
