// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Writing side: device bytes in, records out, at most one chunk buffered.

use std::io::{self, Write};

use log::debug;

use super::{
    crc, encode_header, record_header, Result, StateFormatError, StateHeader, DEFAULT_CHUNK_SIZE,
    DEFAULT_ZERO_BLOCK, MAX_RECORD_PAYLOAD, MAX_ZERO_RUN, RECORD_DATA, RECORD_END, RECORD_ZERO,
};

/// How the encoder cuts the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncoderOptions {
    /// Largest DATA payload and the most data buffered; 1..=16 MiB.
    pub chunk_size: u32,
    /// Replace all-zero blocks by ZERO records.
    pub zero_elision: bool,
    /// Granularity of zero detection; 1..=chunk_size.
    pub zero_block: u32,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        EncoderOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            zero_elision: true,
            zero_block: DEFAULT_ZERO_BLOCK,
        }
    }
}

impl EncoderOptions {
    fn validate(&self) -> Result<()> {
        if self.chunk_size == 0 || self.chunk_size > MAX_RECORD_PAYLOAD {
            return Err(StateFormatError::InvalidOptions(format!(
                "chunk size {} outside 1..={MAX_RECORD_PAYLOAD}",
                self.chunk_size
            )));
        }
        if self.zero_block == 0 || self.zero_block > self.chunk_size {
            return Err(StateFormatError::InvalidOptions(format!(
                "zero block {} outside 1..={}",
                self.zero_block, self.chunk_size
            )));
        }
        Ok(())
    }
}

/// What an encoder wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EncodeSummary {
    /// Device bytes taken in (the decoded size).
    pub raw_bytes: u64,
    /// Bytes written to the sink, header and END included.
    pub encoded_bytes: u64,
    /// Raw bytes elided into ZERO records.
    pub zero_bytes: u64,
    pub data_records: u64,
    pub zero_records: u64,
    /// CRC32C of the raw bytes.
    pub crc: u32,
}

/// Emits records and keeps the running totals. A zero run stays pending
/// (a counter) until data or the end follows, so adjacent runs merge even
/// across chunks.
struct RecordSink<W: Write> {
    writer: W,
    summary: EncodeSummary,
    pending_zeros: u64,
}

impl<W: Write> RecordSink<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes)?;
        self.summary.encoded_bytes += bytes.len() as u64;
        Ok(())
    }

    fn data(&mut self, payload: &[u8]) -> Result<()> {
        self.flush_zeros()?;
        let payload_crc = crc32c::crc32c(payload);
        let header = record_header(RECORD_DATA, payload.len() as u64, 0, payload_crc);
        self.put(&header)?;
        self.put(payload)?;
        let s = &mut self.summary;
        s.crc = crc::extend(s.crc, payload, payload_crc);
        s.raw_bytes += payload.len() as u64;
        s.data_records += 1;
        Ok(())
    }

    fn zeros(&mut self, n: u64) {
        self.pending_zeros += n;
    }

    fn flush_zeros(&mut self) -> Result<()> {
        while self.pending_zeros > 0 {
            let run = self.pending_zeros.min(MAX_ZERO_RUN);
            self.put(&record_header(RECORD_ZERO, run, 0, 0))?;
            self.pending_zeros -= run;
            let s = &mut self.summary;
            s.crc = crc::append_zeros(s.crc, run);
            s.raw_bytes += run;
            s.zero_bytes += run;
            s.zero_records += 1;
        }
        Ok(())
    }

    /// Encodes one chunk (at most `chunk_size` bytes), splitting it into
    /// zero runs of at least `zero_block` bytes, at any byte offset, and
    /// data runs.
    ///
    /// Device streams interleave packet headers with page data (an Xe
    /// VRAM packet has a 24-byte header every 2 MiB), so page-sized zero
    /// runs rarely sit on `zero_block` boundaries of the stream. Any run
    /// of at least `zero_block` zero bytes contains a whole probe block
    /// of `(zero_block + 1) / 2` bytes at a multiple of that size, so
    /// only probe blocks are tested (one 64-byte lane each on data); a
    /// zero probe is then grown byte-exactly both ways.
    fn chunk(&mut self, data: &[u8], options: &EncoderOptions) -> Result<()> {
        if !options.zero_elision {
            return self.data(data);
        }
        let block = options.zero_block as usize;
        // 2 * probe_len - 1 <= block, so every long enough run covers one.
        let probe_len = block.div_ceil(2).max(1);
        let mut data_start = 0;
        let mut probe = 0;
        while probe + probe_len <= data.len() {
            if !is_zero(&data[probe..probe + probe_len]) {
                probe += probe_len;
                continue;
            }
            let start = zero_run_start(data, data_start, probe);
            let end = zero_run_end(data, probe + probe_len);
            if end - start >= block {
                if start > data_start {
                    self.data(&data[data_start..start])?;
                }
                self.zeros((end - start) as u64);
                data_start = end;
            }
            probe = end.div_ceil(probe_len) * probe_len;
        }
        if data_start < data.len() {
            self.data(&data[data_start..])?;
        }
        Ok(())
    }
}

/// First byte of the zero run that ends at `end`, not before `floor`.
fn zero_run_start(data: &[u8], floor: usize, end: usize) -> usize {
    let mut start = end;
    while start > floor && data[start - 1] == 0 {
        start -= 1;
    }
    start
}

/// End of the zero run that starts at `start`: whole 64-byte lanes first,
/// then bytes.
fn zero_run_end(data: &[u8], start: usize) -> usize {
    let mut end = start;
    while end + 64 <= data.len() && is_zero(&data[end..end + 64]) {
        end += 64;
    }
    while end < data.len() && data[end] == 0 {
        end += 1;
    }
    end
}

/// Whether every byte is zero. Works a 64-byte lane at a time (the OR
/// reduction vectorizes) so data blocks bail out early and zero blocks go
/// at memory speed.
fn is_zero(bytes: &[u8]) -> bool {
    let mut lanes = bytes.chunks_exact(64);
    for lane in &mut lanes {
        let mut acc = 0u64;
        for word in lane.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            acc |= u64::from_ne_bytes(w);
        }
        if acc != 0 {
            return false;
        }
    }
    lanes.remainder().iter().all(|&b| b == 0)
}

/// Encodes a device-state stream into `W`.
///
/// Takes the raw device bytes through `Write` and buffers at most one
/// chunk. [`StateEncoder::finish`] writes the END record; an encoder
/// dropped without it leaves a stream every reader rejects as truncated,
/// which is what a failed save must look like.
pub struct StateEncoder<W: Write> {
    sink: RecordSink<W>,
    header: StateHeader,
    options: EncoderOptions,
    buf: Vec<u8>,
    failed: bool,
}

impl<W: Write> StateEncoder<W> {
    /// Validates `options`, records the chunk size in `header` and writes
    /// the header.
    pub fn new(mut writer: W, mut header: StateHeader, options: EncoderOptions) -> Result<Self> {
        options.validate()?;
        header.chunk_size = options.chunk_size;
        let bytes = encode_header(&header)?;
        writer.write_all(&bytes)?;
        debug!(
            "state stream: header for {} {} written, chunk {} zero elision {}",
            header.device_kind, header.identity, options.chunk_size, options.zero_elision
        );
        Ok(StateEncoder {
            sink: RecordSink {
                writer,
                summary: EncodeSummary {
                    encoded_bytes: bytes.len() as u64,
                    ..Default::default()
                },
                pending_zeros: 0,
            },
            header,
            options,
            buf: Vec::with_capacity(options.chunk_size as usize),
            failed: false,
        })
    }

    /// The header as written (with the chunk size filled in).
    pub fn header(&self) -> &StateHeader {
        &self.header
    }

    /// Capacity of the internal buffer; never above `chunk_size`.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Raw bytes accepted so far, buffered ones included.
    pub fn raw_bytes(&self) -> u64 {
        self.sink.summary.raw_bytes + self.sink.pending_zeros + self.buf.len() as u64
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.sink.writer
    }

    /// Encodes what is buffered, writes END and flushes the writer.
    pub fn finish(mut self) -> Result<EncodeSummary> {
        self.check()?;
        self.drain_buffer()?;
        self.sink.flush_zeros()?;
        let s = self.sink.summary;
        let end = record_header(RECORD_END, s.raw_bytes, s.crc, 0);
        self.sink.put(&end)?;
        self.sink.writer.flush()?;
        let summary = self.sink.summary;
        debug!(
            "state stream: END after {} raw bytes ({} encoded, {} elided as zero), crc {:#010x}",
            summary.raw_bytes, summary.encoded_bytes, summary.zero_bytes, summary.crc
        );
        Ok(summary)
    }

    /// Feeds a zero run without materializing it (tests of huge runs).
    #[cfg(test)]
    pub(super) fn push_zero_run(&mut self, n: u64) -> Result<()> {
        self.drain_buffer()?;
        self.sink.zeros(n);
        Ok(())
    }

    fn check(&self) -> Result<()> {
        if self.failed {
            Err(StateFormatError::Failed)
        } else {
            Ok(())
        }
    }

    fn drain_buffer(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            let result = self.sink.chunk(&self.buf, &self.options);
            self.buf.clear();
            result?;
        }
        Ok(())
    }

    fn write_inner(&mut self, data: &[u8]) -> Result<()> {
        let chunk = self.options.chunk_size as usize;
        let mut rest = data;
        if !self.buf.is_empty() {
            let take = (chunk - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == chunk {
                self.drain_buffer()?;
            }
        }
        // The buffer is empty now unless `rest` is: whole chunks go
        // straight from the caller's slice, without a copy.
        while rest.len() >= chunk {
            self.sink.chunk(&rest[..chunk], &self.options)?;
            rest = &rest[chunk..];
        }
        self.buf.extend_from_slice(rest);
        Ok(())
    }

    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.check()?;
        let result = op(self);
        if result.is_err() {
            // A record may be half written; nothing after it can be valid.
            self.failed = true;
        }
        result
    }
}

impl<W: Write> Write for StateEncoder<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.guarded(|s| s.write_inner(data))?;
        Ok(data.len())
    }

    /// Encodes the buffered partial chunk and pending zeros and flushes the
    /// writer, so everything written so far is in the sink (as records).
    fn flush(&mut self) -> io::Result<()> {
        self.guarded(|s| {
            s.drain_buffer()?;
            s.sink.flush_zeros()?;
            s.sink.writer.flush()?;
            Ok(())
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::super::{StateDecoder, StateHeader};
    use super::{EncoderOptions, StateEncoder};
    use crate::device::DeviceIdentity;

    fn header() -> StateHeader {
        let identity = DeviceIdentity {
            vendor_id: 0x8086,
            device_id: 0xe20b,
            revision_id: 0,
            vram_size: None,
        };
        StateHeader::new("xe-vf", identity, 3, 0)
    }

    /// Pages behind a 24-byte packet header, every other one all zero.
    fn misaligned_pages(pages: usize) -> Vec<u8> {
        let mut data = vec![0u8; 24 + pages * 4096];
        let mut x = 0x1234_5678_9abc_def1u64;
        for (i, b) in data.iter_mut().enumerate() {
            let page = i.checked_sub(24).map(|o| o / 4096);
            if page.is_none_or(|p| p % 2 == 1) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = (x as u8) | 1;
            }
        }
        data
    }

    #[test]
    fn zero_pages_off_block_boundaries_are_elided() {
        let data = misaligned_pages(64);
        let mut encoded = Vec::new();
        let mut enc = StateEncoder::new(&mut encoded, header(), EncoderOptions::default()).unwrap();
        enc.write_all(&data).unwrap();
        let summary = enc.finish().unwrap();
        assert_eq!(summary.zero_bytes, 32 * 4096);
        assert_eq!(summary.zero_records, 32);
        let mut out = Vec::new();
        StateDecoder::new(&encoded[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == data);
    }

    #[test]
    fn zero_runs_shorter_than_the_block_stay_data() {
        let mut data = misaligned_pages(8);
        // Shrink every zero page's run to one byte less than a block.
        for page in (0..8).step_by(2) {
            data[24 + page * 4096] = 7;
        }
        let mut encoded = Vec::new();
        let mut enc = StateEncoder::new(&mut encoded, header(), EncoderOptions::default()).unwrap();
        enc.write_all(&data).unwrap();
        let summary = enc.finish().unwrap();
        assert_eq!(summary.zero_records, 0);
        assert_eq!(summary.data_records, 1);
    }
}
