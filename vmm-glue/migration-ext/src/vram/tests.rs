// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Pre-copy and stop-copy of VRAM end to end over a socket pair.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use super::*;
use crate::verify::digest::{DigestFunction, DigestKey, PageDigester, PAGE_SIZE};

const HEADER: usize = 24;

/// VRAM as a byte vector.
struct MemBar(Mutex<Vec<u8>>);

impl BarSource for MemBar {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bar = self.0.lock().unwrap();
        buf.copy_from_slice(&bar[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

/// A device stream like Xe's: per packet a 24-byte header (BAR offset
/// at 8, size at 16), then that many VRAM bytes.
fn stream_of(vram: &[u8], packet: usize) -> Vec<u8> {
    let mut out = b"descriptor and GuC state".to_vec();
    for (i, chunk) in vram.chunks(packet).enumerate() {
        let mut header = [0xeeu8; HEADER];
        header[8..16].copy_from_slice(&((i * packet) as u64).to_le_bytes());
        header[16..24].copy_from_slice(&(chunk.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(chunk);
    }
    out
}

/// The layout of [`stream_of`], reading headers as they pass; `skew`
/// shifts every BAR offset it reports (a wrong layout).
struct TestLayout {
    prefix: usize,
    header: Vec<u8>,
    payload_left: u64,
    bar_at: u64,
    skew: u64,
}

impl TestLayout {
    fn new(skew: u64) -> Self {
        TestLayout {
            prefix: b"descriptor and GuC state".len(),
            header: Vec::new(),
            payload_left: 0,
            bar_at: 0,
            skew,
        }
    }
}

impl StreamLayout for TestLayout {
    fn map(&mut self, mut data: &[u8], out: &mut Vec<wire::Piece>) {
        while !data.is_empty() {
            if self.prefix > 0 {
                let n = self.prefix.min(data.len());
                out.push(wire::Piece::raw(n as u64));
                self.prefix -= n;
                data = &data[n..];
            } else if self.payload_left > 0 {
                let n = (self.payload_left as usize).min(data.len());
                out.push(wire::Piece::bar(self.bar_at + self.skew, n as u64));
                self.bar_at += n as u64;
                self.payload_left -= n as u64;
                data = &data[n..];
            } else {
                let n = (HEADER - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data[..n]);
                out.push(wire::Piece::raw(n as u64));
                data = &data[n..];
                if self.header.len() == HEADER {
                    self.bar_at = wire::le64(&self.header[8..]);
                    self.payload_left = wire::le64(&self.header[16..]);
                    self.header.clear();
                }
            }
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 7) as u8).wrapping_mul(31) ^ seed)
        .collect()
}

struct Run {
    rebuilt: Vec<u8>,
    sent: WindowStats,
    received: WindowStats,
    precopy: PrecopyReport,
}

/// Pre-copies `bar`, lets `change` alter it (the device running on),
/// then sends the stream of what it holds at stop-copy through
/// `layout`, `damage` having hit the destination's store first.
fn migrate(
    bar: Vec<u8>,
    change: impl FnOnce(&mut Vec<u8>),
    mut layout: TestLayout,
    damage: impl FnOnce(&VramStore) + Send,
) -> Run {
    let digester = PageDigester::new(DigestFunction::Nh128, &DigestKey([9; 32]));
    let begin = wire::Begin {
        function: DigestFunction::Nh128,
        key: DigestKey([9; 32]),
        bar_size: bar.len() as u64,
    };
    let bar = MemBar(Mutex::new(bar));
    let (mut source, mut destination) = UnixStream::pair().unwrap();
    std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            let precopied = receive_precopy(&mut destination, &std::env::temp_dir()).unwrap();
            assert_eq!(read_stream_start(&mut destination).unwrap(), 3);
            damage(&precopied.store);
            let mut rebuild = Rebuild::new(&mut destination, &precopied.store);
            let mut rebuilt = Vec::new();
            rebuild.read_to_end(&mut rebuilt).unwrap();
            (rebuilt, rebuild.finish().unwrap())
        });
        let precopy = precopy(&mut source, &bar, &begin, &AtomicBool::new(false)).unwrap();
        let stream = {
            let mut vram = bar.0.lock().unwrap();
            change(&mut vram);
            stream_of(&vram, 1 << 20)
        };
        let mut writer = WindowWriter::start(&mut source, 3, &mut layout, Some(&digester)).unwrap();
        // Written in odd pieces, as a device's reads return them.
        for piece in stream.chunks(100_003) {
            writer.write_all(piece).unwrap();
        }
        let sent = writer.finish().unwrap();
        let (rebuilt, received) = receiver.join().unwrap();
        assert_eq!(rebuilt.len(), stream.len());
        assert!(
            rebuilt == stream,
            "the rebuilt stream differs from the device's"
        );
        assert_eq!(sent, received);
        Run {
            rebuilt,
            sent,
            received,
            precopy,
        }
    })
}

const MIB: usize = 1 << 20;

#[test]
fn vram_precopy_a_page_the_device_wrote_after_precopy_is_caught_and_sent() {
    let bar = pattern(56 * MIB, 1);
    let changed_pages = (0..56 * MIB / PAGE_SIZE).step_by(10).count();
    let run = migrate(
        bar,
        |vram| {
            for page in (0..vram.len() / PAGE_SIZE).step_by(10) {
                vram[page * PAGE_SIZE + 17] ^= 0x80;
            }
        },
        TestLayout::new(0),
        |_| {},
    );
    assert_eq!(run.precopy.read_bytes, 56 << 20);
    // Every changed page was compared and found changed.
    assert_eq!(run.sent.changed_pages, changed_pages as u64);
    // Sent: the changed pages, the headers and prefix; pages cut by a
    // window's edge at most two per window.
    let headers = (56 * HEADER + 24) as u64;
    let changed = (changed_pages * PAGE_SIZE) as u64;
    let edges = 2 * run.sent.windows * PAGE_SIZE as u64;
    assert!(
        run.sent.sent_bytes >= changed + headers
            && run.sent.sent_bytes <= changed + headers + edges,
        "sent {} bytes for {changed} changed, {headers} of headers",
        run.sent.sent_bytes
    );
    assert_eq!(
        run.received.held_bytes,
        run.rebuilt.len() as u64 - run.sent.sent_bytes
    );
}

#[test]
fn vram_precopy_destination_that_lost_its_file_gets_every_byte_sent() {
    let run = migrate(
        pattern(8 * MIB, 2),
        |_| {},
        TestLayout::new(0),
        |store| store.file().set_len(0).unwrap(),
    );
    assert_eq!(run.received.held_bytes, 0);
    assert_eq!(run.sent.sent_bytes, run.rebuilt.len() as u64);
}

#[test]
fn vram_precopy_zero_pages_cost_no_data_and_still_match() {
    let mut bar = vec![0u8; 8 * MIB];
    bar[..MIB].copy_from_slice(&pattern(MIB, 3));
    let run = migrate(bar, |_| {}, TestLayout::new(0), |_| {});
    assert_eq!(run.precopy.data_bytes, MIB as u64);
    assert!(run.received.held_bytes >= (8 * MIB - 2 * PAGE_SIZE * 2) as u64);
}

#[test]
fn vram_precopy_a_wrong_layout_costs_bytes_never_correctness() {
    // Every BAR offset one page off: no page matches, all is sent, and
    // the stream still arrives exact (checked in `migrate`).
    let run = migrate(
        pattern(4 * MIB, 4),
        |_| {},
        TestLayout::new(PAGE_SIZE as u64),
        |_| {},
    );
    assert_eq!(run.received.held_bytes, 0);
}
