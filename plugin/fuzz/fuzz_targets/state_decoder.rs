// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary bytes as a device-state stream: the decoder must reject or
//! accept them without panicking, hanging or allocating beyond the
//! header's chunk size, and its three read paths (`Read`, `copy_decoded`,
//! `verify`) must agree.

#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use xe_vf_plugin::state_format::{verify, StateDecoder, MAX_RECORD_PAYLOAD};

/// Decoded bytes pulled through `Read` per input. A valid ZERO record may
/// stand for up to 1 TiB; materializing that is legitimate but too slow
/// here.
const DECODED_CAP: usize = 4 << 20;

/// A sink that holds at most `DECODED_CAP` bytes and then fails, like a
/// full disk.
struct CappedSink(Vec<u8>);

impl Write for CappedSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.0.len() + data.len() > DECODED_CAP {
            return Err(io::Error::other("capped sink full"));
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Read size chosen by the input: 1..=8192 bytes, so direct and buffered
/// DATA paths and partial reads are all exercised.
fn read_size(data: &[u8]) -> usize {
    let last = data.last().copied().unwrap_or(0) as usize;
    let prev = data.len().checked_sub(2).map_or(0, |i| data[i] as usize);
    1 + ((last << 8 | prev) % 8192)
}

fn check_capacity<R: Read>(decoder: &StateDecoder<R>) {
    let chunk = decoder.header().chunk_size;
    assert!((1..=MAX_RECORD_PAYLOAD).contains(&chunk));
    assert!(
        decoder.buffer_capacity() <= chunk as usize,
        "decoder buffer {} above chunk size {chunk}",
        decoder.buffer_capacity()
    );
}

fuzz_target!(|data: &[u8]| {
    // verify: reads nothing past END.
    let mut rest = data;
    let verified = verify(&mut rest);
    if let Ok(summary) = &verified {
        assert_eq!(summary.encoded_bytes, (data.len() - rest.len()) as u64);
        assert!(summary.zero_bytes <= summary.decoded_bytes);
    }

    // Read path, in input-chosen read sizes, up to the cap.
    let mut read_out = Vec::new();
    let mut read_done = false;
    if let Ok(mut decoder) = StateDecoder::new(data) {
        let mut buf = vec![0u8; read_size(data)];
        loop {
            match decoder.read(&mut buf) {
                Ok(0) => {
                    read_done = true;
                    break;
                }
                Ok(n) => {
                    assert!(n <= buf.len());
                    read_out.extend_from_slice(&buf[..n]);
                    check_capacity(&decoder);
                    assert!(decoder.decoded_bytes() >= read_out.len() as u64);
                    if read_out.len() >= DECODED_CAP {
                        break;
                    }
                }
                Err(_) => {
                    // Poisoned: every later read fails too.
                    assert!(decoder.read(&mut buf).is_err());
                    break;
                }
            }
        }
        check_capacity(&decoder);
        let finished = decoder.finish();
        if read_done {
            // Ok(0) means END verified; only the announced size is left.
            if let Ok(summary) = &finished {
                assert_eq!(summary.decoded_bytes, read_out.len() as u64);
            }
        }
        assert_eq!(finished.is_ok(), verified.is_ok());
        if let (Ok(a), Ok(b)) = (&finished, &verified) {
            assert_eq!(a, b);
        }
    }

    // copy_decoded must hand out the same bytes as Read.
    if let Ok(mut decoder) = StateDecoder::new(data) {
        let mut sink = CappedSink(Vec::new());
        let copied = decoder.copy_decoded(&mut sink);
        check_capacity(&decoder);
        let common = sink.0.len().min(read_out.len());
        assert_eq!(sink.0[..common], read_out[..common]);
        match copied {
            Ok(n) => {
                assert_eq!(n, sink.0.len() as u64);
                assert!(decoder.is_done());
                if read_done {
                    assert_eq!(sink.0, read_out);
                }
            }
            Err(_) => assert!(!decoder.is_done()),
        }
    }
});
