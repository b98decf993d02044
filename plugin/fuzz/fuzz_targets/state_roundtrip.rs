// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary device bytes through `StateEncoder` and back through
//! `StateDecoder` must come out unchanged, with matching summaries, for
//! any chunking, zero elision on or off, and any split of the writes.

#![no_main]

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use xe_vf_plugin::state_format::{
    verify, EncoderOptions, StateDecoder, StateEncoder, StateHeader, DEVICE_KIND_XE_VF,
};
use xe_vf_plugin::{DeviceIdentity, MigrationFlags};
use xe_vf_plugin_fuzz::Splits;

const CHUNK_SIZES: [u32; 8] = [1, 3, 16, 100, 512, 4096, 65536, 1 << 20];
const ZERO_BLOCKS: [u32; 4] = [1, 7, 512, 4096];

fuzz_target!(|input: &[u8]| {
    // Byte 0: options; byte 1: write-split seed; the rest: device bytes.
    let [opts, split, raw @ ..] = input else {
        return;
    };
    let chunk_size = CHUNK_SIZES[usize::from(opts >> 1) % CHUNK_SIZES.len()];
    let options = EncoderOptions {
        chunk_size,
        zero_elision: opts & 1 != 0,
        zero_block: ZERO_BLOCKS[usize::from(opts >> 4) % ZERO_BLOCKS.len()].min(chunk_size),
    };
    let identity = DeviceIdentity {
        vendor_id: 0x8086,
        device_id: 0xe20b,
        revision_id: 0,
        vram_size: Some(raw.len() as u64),
    };
    let header = StateHeader::new(
        DEVICE_KIND_XE_VF,
        identity,
        MigrationFlags::XE_VF.bits(),
        raw.len() as u64,
    );

    let mut encoded = Vec::new();
    let mut encoder = StateEncoder::new(&mut encoded, header.clone(), options).unwrap();
    assert_eq!(encoder.header().chunk_size, chunk_size);
    // Writes of 1..=2^k bytes, k from the split byte.
    let mut rest = raw;
    let mut splits = Splits::new(u32::from(*split));
    while !rest.is_empty() {
        let n = splits.next(1 << (split % 14)).min(rest.len());
        encoder.write_all(&rest[..n]).unwrap();
        assert!(encoder.buffer_capacity() <= chunk_size as usize);
        rest = &rest[n..];
        // Flush now and then: partial chunks and pending zero runs.
        if splits.next(8) == 1 {
            encoder.flush().unwrap();
        }
    }
    assert_eq!(encoder.raw_bytes(), raw.len() as u64);
    let encoded_summary = encoder.finish().unwrap();
    assert_eq!(encoded_summary.raw_bytes, raw.len() as u64);
    if !options.zero_elision {
        assert_eq!(encoded_summary.zero_records, 0);
        assert_eq!(encoded_summary.zero_bytes, 0);
    }
    assert_eq!(encoded_summary.crc, crc32c::crc32c(raw));
    assert_eq!(encoded.len() as u64, encoded_summary.encoded_bytes);

    let mut decoder = StateDecoder::new(encoded.as_slice()).unwrap();
    assert_eq!(decoder.header().chunk_size, chunk_size);
    assert_eq!(decoder.header().identity, identity);
    let mut decoded = Vec::new();
    decoder.read_to_end(&mut decoded).unwrap();
    assert!(decoded == raw, "round trip changed the data");
    assert!(decoder.buffer_capacity() <= chunk_size as usize);
    let decoded_summary = decoder.finish().unwrap();
    assert_eq!(decoded_summary.decoded_bytes, encoded_summary.raw_bytes);
    assert_eq!(decoded_summary.encoded_bytes, encoded_summary.encoded_bytes);
    assert_eq!(decoded_summary.zero_bytes, encoded_summary.zero_bytes);
    assert_eq!(decoded_summary.data_records, encoded_summary.data_records);
    assert_eq!(decoded_summary.zero_records, encoded_summary.zero_records);
    assert_eq!(decoded_summary.crc, encoded_summary.crc);
    assert_eq!(verify(encoded.as_slice()).unwrap(), decoded_summary);

    // Any truncation is rejected.
    if !encoded.is_empty() {
        let cut = (usize::from(*split) * 131) % encoded.len();
        assert!(
            verify(&encoded[..cut]).is_err(),
            "truncated at {cut} accepted"
        );
    }
});
