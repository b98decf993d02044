// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

use std::io::{self, Cursor, Read, Write};

use super::*;

/// Deterministic xorshift64* so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

fn header(estimated_size: u64) -> StateHeader {
    StateHeader::new(
        DEVICE_KIND_XE_VF,
        DeviceIdentity {
            vendor_id: 0x8086,
            device_id: 0xe20b,
            revision_id: 4,
            vram_size: Some(1 << 30),
        },
        3,
        estimated_size,
    )
}

fn opts(chunk_size: u32, zero_elision: bool) -> EncoderOptions {
    EncoderOptions {
        chunk_size,
        zero_elision,
        zero_block: DEFAULT_ZERO_BLOCK.min(chunk_size),
    }
}

/// Random bytes where each 4 KiB block is zero with `zero_percent` odds.
fn sample(len: usize, zero_percent: u64, rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![0u8; len];
    for block in data.chunks_mut(4096) {
        if rng.below(100) >= zero_percent {
            rng.fill(block);
        }
    }
    data
}

fn encode(data: &[u8], options: EncoderOptions) -> (Vec<u8>, EncodeSummary) {
    let mut out = Vec::new();
    let mut enc = StateEncoder::new(&mut out, header(data.len() as u64), options).unwrap();
    enc.write_all(data).unwrap();
    let summary = enc.finish().unwrap();
    (out, summary)
}

/// Reads the decoder with random read sizes.
fn decode_split(encoded: &[u8], max_read: u64, rng: &mut Rng) -> io::Result<Vec<u8>> {
    let mut dec = StateDecoder::new(encoded)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; max_read as usize];
    loop {
        let n = 1 + rng.below(max_read) as usize;
        match dec.read(&mut buf[..n])? {
            0 => break,
            got => out.extend_from_slice(&buf[..got]),
        }
        assert!(dec.buffer_capacity() <= dec.header().chunk_size as usize);
    }
    Ok(out)
}

fn decode_err(encoded: &[u8]) -> StateFormatError {
    match StateDecoder::new(encoded) {
        Err(e) => e,
        Ok(mut dec) => {
            let e = dec.copy_decoded(&mut io::sink()).unwrap_err();
            // Once failed, the decoder stays failed.
            assert!(matches!(
                dec.read(&mut [0u8; 16]),
                Err(ref e) if matches!(state_error(e), Some(StateFormatError::Failed))
            ));
            e
        }
    }
}

/// Offsets of every record header in an encoded stream (last one is END).
fn record_offsets(encoded: &[u8]) -> Vec<usize> {
    let json_len = le_u32(&encoded[12..16]) as usize;
    let mut pos = PRELUDE_LEN + json_len;
    let mut offsets = Vec::new();
    while pos < encoded.len() {
        offsets.push(pos);
        let len = le_u64(&encoded[pos + 4..pos + 12]) as usize;
        pos += RECORD_HEADER_LEN + if encoded[pos] == RECORD_DATA { len } else { 0 };
    }
    assert_eq!(pos, encoded.len());
    offsets
}

#[test]
fn round_trip_edge_sizes_and_odd_splits() {
    let mut rng = Rng(0x5eed);
    let chunk = 64 * 1024u32;
    let c = chunk as usize;
    for len in [
        0,
        1,
        4095,
        4096,
        4097,
        c - 1,
        c,
        c + 1,
        3 * c + 17,
        (3 << 20) + 5,
    ] {
        for elide in [true, false] {
            let data = sample(len, 40, &mut rng);
            let options = opts(chunk, elide);
            let mut encoded = Vec::new();
            let mut enc = StateEncoder::new(&mut encoded, header(len as u64), options).unwrap();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = (1 + rng.below(3 * chunk as u64) as usize).min(rest.len());
                enc.write_all(&rest[..n]).unwrap();
                assert!(enc.buffer_capacity() <= c);
                rest = &rest[n..];
            }
            assert_eq!(enc.header().chunk_size, chunk);
            let summary = enc.finish().unwrap();
            assert_eq!(summary.raw_bytes, len as u64);
            assert_eq!(summary.encoded_bytes, encoded.len() as u64);
            assert_eq!(summary.crc, crc32c::crc32c(&data));

            let decoded = decode_split(&encoded, 2 * chunk as u64, &mut rng).unwrap();
            assert!(decoded == data, "len {len} elide {elide}");

            let mut copied = Vec::new();
            let mut dec = StateDecoder::new(&encoded[..]).unwrap();
            assert_eq!(dec.header().identity, header(0).identity);
            assert_eq!(dec.copy_decoded(&mut copied).unwrap(), len as u64);
            assert!(copied == data);
            assert!(dec.is_done());
            let ds = dec.finish().unwrap();
            assert_eq!(ds.decoded_bytes, len as u64);
            assert_eq!(ds.encoded_bytes, encoded.len() as u64);
            assert_eq!(ds.crc, summary.crc);
            assert_eq!(ds.zero_bytes, summary.zero_bytes);
            assert_eq!(ds.data_records, summary.data_records);
            assert_eq!(ds.zero_records, summary.zero_records);
            assert_eq!(verify(&encoded[..]).unwrap(), ds);
        }
    }
}

#[test]
fn default_options_round_trip() {
    let mut rng = Rng(3);
    let data = sample((2 << 20) + 333, 50, &mut rng);
    let (encoded, summary) = encode(&data, EncoderOptions::default());
    assert_eq!(summary.raw_bytes, data.len() as u64);
    let mut dec = StateDecoder::new(&encoded[..]).unwrap();
    assert_eq!(dec.header().chunk_size, DEFAULT_CHUNK_SIZE);
    let mut out = Vec::new();
    dec.read_to_end(&mut out).unwrap();
    assert!(out == data);
    assert!(dec.buffer_capacity() <= DEFAULT_CHUNK_SIZE as usize);
}

#[test]
fn zero_heavy_data_is_exact_and_small() {
    let mut rng = Rng(42);
    let len = 2 << 20;
    for zero_percent in [100, 90, 50] {
        let data = sample(len, zero_percent, &mut rng);
        let (plain, plain_summary) = encode(&data, opts(64 * 1024, false));
        let (elided, summary) = encode(&data, opts(64 * 1024, true));
        assert!(plain.len() > len);
        assert_eq!(plain_summary.zero_records, 0);
        assert_eq!(plain_summary.crc, summary.crc);
        let data_len = data.len() as u64 - summary.zero_bytes;
        assert!(
            (elided.len() as u64) < data_len + 4096 + summary.data_records * 40,
            "{zero_percent}%: {} encoded bytes",
            elided.len()
        );
        if zero_percent == 100 {
            assert!(elided.len() < 512, "all zeros took {} bytes", elided.len());
            // One merged run across all chunks.
            assert_eq!(summary.zero_records, 1);
            assert_eq!(summary.data_records, 0);
        }
        if zero_percent == 90 {
            assert!(elided.len() * 5 < plain.len());
        }
        for encoded in [&plain, &elided] {
            let mut out = Vec::new();
            StateDecoder::new(&encoded[..])
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert!(out == data, "{zero_percent}% zeros");
        }
    }
}

#[test]
fn zero_detection_is_exact_at_block_edges() {
    // A single non-zero byte anywhere in a block must keep the block.
    let mut rng = Rng(9);
    for _ in 0..50 {
        let mut data = vec![0u8; 5 * 4096 + 100];
        let pos = rng.below(data.len() as u64) as usize;
        data[pos] = 1 + rng.below(255) as u8;
        let (encoded, summary) = encode(&data, opts(8192, true));
        assert_eq!(summary.data_records, 1);
        let mut out = Vec::new();
        StateDecoder::new(&encoded[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == data, "non-zero byte at {pos}");
    }
}

#[test]
fn long_zero_runs_split_at_the_record_limit() {
    let mut out = Vec::new();
    let mut enc = StateEncoder::new(&mut out, header(0), opts(4096, true)).unwrap();
    // Feed zeros without materializing 2 TiB: drive the sink directly.
    enc.push_zero_run(2 * MAX_ZERO_RUN + 5).unwrap();
    let summary = enc.finish().unwrap();
    assert_eq!(summary.zero_records, 3);
    assert_eq!(summary.raw_bytes, 2 * MAX_ZERO_RUN + 5);
    // Decoding 2 TiB of zeros is too slow for a test: check the records.
    let offsets = record_offsets(&out);
    assert_eq!(offsets.len(), 4);
    let lens: Vec<u64> = offsets
        .iter()
        .map(|&o| le_u64(&out[o + 4..o + 12]))
        .collect();
    assert_eq!(
        lens,
        vec![MAX_ZERO_RUN, MAX_ZERO_RUN, 5, 2 * MAX_ZERO_RUN + 5]
    );
}

#[test]
fn flush_emits_buffered_data_as_records() {
    let mut out = Vec::new();
    let mut enc = StateEncoder::new(&mut out, header(0), opts(4096, true)).unwrap();
    enc.write_all(&[7u8; 100]).unwrap();
    enc.write_all(&[0u8; 100]).unwrap();
    enc.flush().unwrap();
    let written = enc.get_ref().len();
    assert!(written > 200);
    enc.write_all(&[9u8; 10]).unwrap();
    enc.finish().unwrap();
    let mut decoded = Vec::new();
    StateDecoder::new(&out[..])
        .unwrap()
        .read_to_end(&mut decoded)
        .unwrap();
    let mut expected = vec![7u8; 100];
    expected.extend_from_slice(&[0u8; 100]);
    expected.extend_from_slice(&[9u8; 10]);
    assert_eq!(decoded, expected);
}

#[test]
fn stream_is_self_delimiting() {
    let data = sample(10_000, 30, &mut Rng(5));
    let (mut encoded, _) = encode(&data, opts(4096, true));
    encoded.extend_from_slice(b"TRAILER");
    let mut cursor = Cursor::new(encoded);
    let mut dec = StateDecoder::new(&mut cursor).unwrap();
    let mut out = Vec::new();
    dec.read_to_end(&mut out).unwrap();
    dec.finish().unwrap();
    assert!(out == data);
    let mut rest = Vec::new();
    cursor.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"TRAILER");
}

#[test]
fn header_round_trips() {
    let (encoded, _) = encode(b"abc", opts(8192, true));
    let dec = StateDecoder::new(&encoded[..]).unwrap();
    let mut want = header(3);
    want.chunk_size = 8192;
    assert_eq!(dec.header(), &want);
    assert_eq!(&encoded[..8], b"XEVFSTAT");
    assert_eq!(&encoded[8..10], &1u16.to_le_bytes());
}

#[test]
fn estimated_size_is_informational() {
    // MIG_DATA_SIZE is an estimate (xe's leaves out its descriptor and
    // trailer): a stream shorter, longer or of unknown size against it
    // decodes, and the estimate reads back as written.
    for estimate in [0, 1, 98, 99, 100, 1 << 40] {
        let mut out = Vec::new();
        let mut enc = StateEncoder::new(&mut out, header(estimate), opts(4096, true)).unwrap();
        enc.write_all(&[1u8; 99]).unwrap();
        enc.finish().unwrap();
        let mut dec = StateDecoder::new(&out[..]).unwrap();
        assert_eq!(dec.header().estimated_size, estimate);
        assert_eq!(dec.copy_decoded(&mut io::sink()).unwrap(), 99);
        assert_eq!(
            dec.finish().unwrap().decoded_bytes,
            99,
            "estimate {estimate}"
        );
        assert_eq!(verify(&out[..]).unwrap().decoded_bytes, 99);
    }
}

#[test]
fn header_written_with_the_old_expected_size_name_reads() {
    // Streams written before the field was renamed carry `expected_size`.
    let mut json = serde_json::to_value(header(1234)).unwrap();
    let object = json.as_object_mut().unwrap();
    let value = object.remove("estimated_size").unwrap();
    object.insert("expected_size".into(), value);
    let json = serde_json::to_vec(&json).unwrap();
    let mut stream = MAGIC.to_vec();
    stream.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    stream.extend_from_slice(&0u16.to_le_bytes());
    stream.extend_from_slice(&(json.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&stream), &json);
    stream.extend_from_slice(&crc.to_le_bytes());
    stream.extend_from_slice(&json);
    stream.extend_from_slice(&record_header(RECORD_END, 0, 0, 0));
    let dec = StateDecoder::new(&stream[..]).unwrap();
    assert_eq!(dec.header(), &header(1234));
    assert_eq!(dec.finish().unwrap().decoded_bytes, 0);
}

#[test]
fn dropped_encoder_reads_as_truncated() {
    let mut out = Vec::new();
    {
        let mut enc = StateEncoder::new(&mut out, header(0), opts(4096, true)).unwrap();
        enc.write_all(&[5u8; 10_000]).unwrap();
        enc.flush().unwrap();
    }
    assert!(matches!(
        verify(&out[..]),
        Err(StateFormatError::Truncated { .. })
    ));
    let mut dec = StateDecoder::new(&out[..]).unwrap();
    let err = dec.read_to_end(&mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    assert!(matches!(
        state_error(&err),
        Some(StateFormatError::Truncated { offset }) if *offset == out.len() as u64
    ));
}

#[test]
fn invalid_options_are_rejected() {
    for options in [
        opts(0, true),
        opts(MAX_RECORD_PAYLOAD + 1, true),
        EncoderOptions {
            chunk_size: 4096,
            zero_elision: true,
            zero_block: 8192,
        },
        EncoderOptions {
            chunk_size: 4096,
            zero_elision: true,
            zero_block: 0,
        },
    ] {
        assert!(matches!(
            StateEncoder::new(Vec::new(), header(0), options),
            Err(StateFormatError::InvalidOptions(_))
        ));
    }
    let mut big = header(0);
    big.device_kind = "x".repeat(MAX_HEADER_LEN);
    assert!(matches!(
        StateEncoder::new(Vec::new(), big, EncoderOptions::default()),
        Err(StateFormatError::HeaderTooLarge { .. })
    ));
}

/// A small stream with DATA, ZERO and END records.
fn small_stream() -> (Vec<u8>, Vec<u8>) {
    let mut data = vec![0u8; 3 * 4096];
    Rng(77).fill(&mut data[..4096]);
    Rng(78).fill(&mut data[2 * 4096 + 10..2 * 4096 + 20]);
    let (encoded, summary) = encode(&data, opts(4096, true));
    assert_eq!(summary.data_records, 2);
    assert_eq!(summary.zero_records, 1);
    (encoded, data)
}

#[test]
fn corrupting_any_byte_is_detected() {
    let (encoded, _) = small_stream();
    for pos in 0..encoded.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = encoded.clone();
            bad[pos] ^= flip;
            let mut out = Vec::new();
            let result = StateDecoder::new(&bad[..])
                .map_err(io::Error::from)
                .and_then(|mut d| d.read_to_end(&mut out));
            assert!(result.is_err(), "flip {flip:#x} at {pos} not detected");
            assert!(verify(&bad[..]).is_err());
        }
    }
}

#[test]
fn corruption_errors_name_the_region() {
    let (encoded, _) = small_stream();
    let offsets = record_offsets(&encoded);
    let (data_rec, zero_rec, end_rec) = (offsets[0], offsets[1], offsets[3]);
    assert_eq!(encoded[zero_rec], RECORD_ZERO);
    assert_eq!(encoded[end_rec], RECORD_END);
    let with = |pos: usize, f: &dyn Fn(&mut u8)| {
        let mut bad = encoded.clone();
        f(&mut bad[pos]);
        decode_err(&bad)
    };

    assert!(matches!(
        with(0, &|b| *b = b'Y'),
        StateFormatError::BadMagic { .. }
    ));
    let e = with(8, &|b| *b = 7);
    assert!(matches!(
        e,
        StateFormatError::UnsupportedVersion {
            found: 7,
            supported: 1
        }
    ));
    assert!(e.to_string().contains("version 7"), "{e}");
    assert!(matches!(
        with(PRELUDE_LEN + 3, &|b| *b ^= 1),
        StateFormatError::HeaderChecksum { .. }
    ));
    assert!(matches!(
        with(10, &|b| *b ^= 1),
        StateFormatError::HeaderChecksum { .. }
    ));
    assert!(matches!(
        with(data_rec, &|b| *b = 9),
        StateFormatError::UnknownRecordType { ty: 9, offset } if offset == data_rec as u64
    ));
    assert!(matches!(
        with(data_rec + 1, &|b| *b ^= 1),
        StateFormatError::RecordChecksum { offset } if offset == data_rec as u64
    ));
    assert!(matches!(
        // Length 4096 -> 2048: the payload no longer matches its CRC.
        with(data_rec + 5, &|b| *b ^= 0x18),
        StateFormatError::RecordChecksum { offset } if offset == data_rec as u64
    ));
    assert!(matches!(
        with(data_rec + 10, &|b| *b = 1),
        StateFormatError::RecordTooLarge { max: 4096, .. }
    ));
    assert!(matches!(
        with(data_rec + RECORD_HEADER_LEN + 100, &|b| *b ^= 1),
        StateFormatError::RecordChecksum { offset } if offset == data_rec as u64
    ));
    assert!(matches!(
        with(zero_rec + 5, &|b| *b ^= 1),
        StateFormatError::RecordChecksum { offset } if offset == zero_rec as u64
    ));
    for field in [4, 12, 16] {
        assert!(matches!(
            with(end_rec + field, &|b| *b ^= 1),
            StateFormatError::RecordChecksum { offset } if offset == end_rec as u64
        ));
    }
}

/// Replaces the END record with one whose own CRC is valid but whose
/// totals are forged.
fn forge_end(encoded: &[u8], length_delta: i64, crc_xor: u32) -> Vec<u8> {
    let end = *record_offsets(encoded).last().unwrap();
    let length = le_u64(&encoded[end + 4..end + 12]).wrapping_add_signed(length_delta);
    let crc = le_u32(&encoded[end + 12..end + 16]) ^ crc_xor;
    let mut out = encoded[..end].to_vec();
    out.extend_from_slice(&record_header(RECORD_END, length, crc, 0));
    out
}

#[test]
fn forged_end_totals_are_detected() {
    let (encoded, data) = small_stream();
    assert!(verify(&forge_end(&encoded, 0, 0)[..]).is_ok());
    assert!(matches!(
        decode_err(&forge_end(&encoded, 1, 0)),
        StateFormatError::LengthMismatch { expected, found, .. }
            if expected == data.len() as u64 + 1 && found == data.len() as u64
    ));
    // Whatever the header's estimate: END's length is checked both ways.
    assert!(matches!(
        decode_err(&forge_end(&encoded, -1, 0)),
        StateFormatError::LengthMismatch { expected, found, .. }
            if expected == data.len() as u64 - 1 && found == data.len() as u64
    ));
    assert!(matches!(
        decode_err(&forge_end(&encoded, 0, 0x10)),
        StateFormatError::StreamChecksum { .. }
    ));
}

#[test]
fn truncation_anywhere_is_an_error() {
    let (encoded, data) = small_stream();
    for cut in 0..encoded.len() {
        let short = &encoded[..cut];
        let mut out = Vec::new();
        let result = StateDecoder::new(short)
            .map_err(io::Error::from)
            .and_then(|mut d| d.read_to_end(&mut out));
        let err = result.expect_err("truncated stream decoded without error");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        assert!(out.len() <= data.len());
        assert!(matches!(
            verify(short),
            Err(StateFormatError::Truncated { offset }) if offset == cut as u64
        ));
    }
}

#[test]
fn huge_lengths_are_rejected_without_allocating() {
    let (encoded, _) = small_stream();
    let first = record_offsets(&encoded)[0];
    for ty in [RECORD_DATA, RECORD_ZERO] {
        let mut bad = encoded[..first].to_vec();
        bad.extend_from_slice(&record_header(ty, 1 << 63, 0, 0));
        let mut dec = StateDecoder::new(&bad[..]).unwrap();
        let err = dec.read(&mut [0u8; 64]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(matches!(
            state_error(&err),
            Some(StateFormatError::RecordTooLarge { len, .. }) if *len == 1 << 63
        ));
        assert_eq!(dec.buffer_capacity(), 0);
    }
    // Header length beyond the limit.
    let mut bad = encoded.clone();
    bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_err(&bad),
        StateFormatError::HeaderTooLarge { len, .. } if len == u64::from(u32::MAX)
    ));
}

#[test]
fn malformed_but_checksummed_records_are_rejected() {
    let (encoded, _) = small_stream();
    let first = record_offsets(&encoded)[0];
    let head = &encoded[..first];
    let mut empty_data = head.to_vec();
    empty_data.extend_from_slice(&record_header(RECORD_DATA, 0, 0, 0));
    let mut empty_zero = head.to_vec();
    empty_zero.extend_from_slice(&record_header(RECORD_ZERO, 0, 0, 0));
    let mut valued_zero = head.to_vec();
    valued_zero.extend_from_slice(&record_header(RECORD_ZERO, 4, 1, 0));
    for bad in [empty_data, empty_zero, valued_zero] {
        assert!(matches!(
            decode_err(&bad),
            StateFormatError::MalformedRecord { .. }
        ));
    }
}

#[test]
fn garbage_never_panics() {
    let (encoded, data) = small_stream();
    let mut rng = Rng(0xdead_beef);
    for round in 0..3000 {
        let input: Vec<u8> = match round % 3 {
            // Pure noise.
            0 => {
                let mut v = vec![0u8; rng.below(300) as usize];
                rng.fill(&mut v);
                v
            }
            // A valid header followed by noise.
            1 => {
                let first = record_offsets(&encoded)[0];
                let mut v = encoded[..first].to_vec();
                let mut tail = vec![0u8; rng.below(200) as usize];
                rng.fill(&mut tail);
                if !tail.is_empty() && rng.below(2) == 0 {
                    tail[0] = 1 + rng.below(3) as u8;
                }
                v.extend_from_slice(&tail);
                v
            }
            // A valid stream with a few random byte changes.
            _ => {
                let mut v = encoded.clone();
                for _ in 0..1 + rng.below(4) {
                    let pos = rng.below(v.len() as u64) as usize;
                    v[pos] = rng.next() as u8;
                }
                v
            }
        };
        let mut out = Vec::new();
        let result = StateDecoder::new(&input[..])
            .map_err(io::Error::from)
            .and_then(|mut d| d.read_to_end(&mut out));
        if result.is_ok() {
            // Only an unchanged stream may decode.
            assert!(
                input == encoded && out == data,
                "round {round} decoded garbage"
            );
        }
        let _ = verify(&input[..]);
    }
}

#[test]
fn io_error_conversion_keeps_kind_and_cause() {
    let e: io::Error = StateFormatError::RecordChecksum { offset: 5 }.into();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(matches!(
        state_error(&e),
        Some(StateFormatError::RecordChecksum { offset: 5 })
    ));
    let e: io::Error = StateFormatError::Io(io::Error::from(io::ErrorKind::BrokenPipe)).into();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
}

#[test]
fn encoder_write_errors_poison_it() {
    struct FailAfter(usize);
    impl Write for FailAfter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0 < buf.len() {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            self.0 -= buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut enc = StateEncoder::new(FailAfter(200), header(0), opts(4096, true)).unwrap();
    let mut chunk = vec![0u8; 4096];
    Rng(1).fill(&mut chunk);
    let err = enc.write_all(&chunk).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    assert!(enc.write(&[1]).is_err());
    assert!(matches!(enc.finish(), Err(StateFormatError::Failed)));
}

/// Rough throughput numbers; run with
/// `cargo test --release -p xe-vf-plugin throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let len = 512 << 20;
    let mut rng = Rng(11);
    for zero_percent in [100, 90, 0] {
        let data = sample(len, zero_percent, &mut rng);
        let mut encoded = Vec::new();
        let mut enc =
            StateEncoder::new(&mut encoded, header(0), EncoderOptions::default()).unwrap();
        enc.write_all(&data).unwrap();
        enc.finish().unwrap();
        // Time against a sink, so page faults of a fresh output buffer
        // do not count.
        let start = std::time::Instant::now();
        let mut enc = StateEncoder::new(io::sink(), header(0), EncoderOptions::default()).unwrap();
        for piece in data.chunks(1 << 20) {
            enc.write_all(piece).unwrap();
        }
        enc.finish().unwrap();
        let enc_time = start.elapsed();
        let start = std::time::Instant::now();
        let mut dec = StateDecoder::new(&encoded[..]).unwrap();
        dec.copy_decoded(&mut io::sink()).unwrap();
        let dec_time = start.elapsed();
        let gib = len as f64 / (1u64 << 30) as f64;
        println!(
            "{zero_percent:3}% zeros: encode {:.2} GiB/s, decode {:.2} GiB/s",
            gib / enc_time.as_secs_f64(),
            gib / dec_time.as_secs_f64()
        );
    }
}

/// Found by fuzzing: the decoder's buffer grew by doubling past a tiny
/// chunk size.
#[test]
fn decoder_buffer_never_exceeds_a_tiny_chunk_size() {
    let data: Vec<u8> = (1..=200u8).collect();
    let options = EncoderOptions {
        chunk_size: 3,
        zero_elision: true,
        zero_block: 1,
    };
    let (encoded, _) = encode(&data, options);
    let mut dec = StateDecoder::new(&encoded[..]).unwrap();
    let mut buf = [0u8; 1];
    let mut out = Vec::new();
    while dec.read(&mut buf).unwrap() == 1 {
        out.push(buf[0]);
        assert!(
            dec.buffer_capacity() <= 3,
            "capacity {}",
            dec.buffer_capacity()
        );
    }
    assert_eq!(out, data);
}

/// A DATA payload and the header after it arrive in one read, and nothing
/// past END is read even then.
#[test]
fn decoder_reads_payload_and_next_header_together_but_never_past_end() {
    struct Counting<'a> {
        data: &'a [u8],
        pos: usize,
        reads: usize,
    }
    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.read_vectored(&mut [io::IoSliceMut::new(buf)])
        }
        fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
            self.reads += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.data.len() - self.pos);
                b[..take].copy_from_slice(&self.data[self.pos..self.pos + take]);
                self.pos += take;
                n += take;
            }
            Ok(n)
        }
    }
    // Alternating 4 KiB data and zero pages: DATA, ZERO, DATA, ...
    let mut data = vec![0u8; 64 * 4096];
    for page in data.chunks_mut(8192) {
        page[..4096].fill(0xa5);
    }
    let (encoded, summary) = encode(&data, EncoderOptions::default());
    let records = (summary.data_records + summary.zero_records + 1) as usize;
    let mut with_tail = encoded.clone();
    with_tail.extend_from_slice(b"next command");
    let mut src = Counting {
        data: &with_tail,
        pos: 0,
        reads: 0,
    };
    let mut dec = StateDecoder::new(&mut src).unwrap();
    let mut out = Vec::new();
    dec.copy_decoded(&mut out).unwrap();
    dec.finish().unwrap();
    assert_eq!(out, data);
    assert_eq!(src.pos, encoded.len(), "read past END");
    // One read per record (plus the stream header's reads).
    assert!(
        src.reads <= records + 4,
        "{} reads for {records} records",
        src.reads
    );
}
