// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VF's VRAM as the VMM reaches it while the VF runs: through the VF's
//! memory BAR, and where that VRAM sits in the device-state stream.
//!
//! Xe has no PRE_COPY, so its VRAM only leaves the device in STOP_COPY.
//! But the guest reaches VRAM through the VF's LMEM BAR, which the VMM
//! maps, and reading device memory has no side effect: read ahead while
//! the VM runs, most of it is already at the destination when the device
//! stops. [`VramBar`] is that read; [`StateStreamVram`] finds, in the
//! encoded device-state stream (`state_format` around the Xe packet
//! stream), which bytes are VRAM and at which BAR offset, so those can be
//! compared with what was read ahead instead of sent.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state_format::{PRELUDE_LEN, RECORD_HEADER_LEN};
use crate::xe_stream::{PacketType, HEADER_LEN};

/// Reads of a VF's VRAM through its memory BAR.
pub trait VramBar: Send + Sync {
    /// Bytes of VRAM the BAR shows (every tile's LMEM, tile after tile).
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// Holds reads to a rate: a BAR read is a PCIe round trip per load, far
/// slower than memory, and a model that reads at memory speed would
/// promise what no device gives.
pub struct ReadPacer {
    bytes_per_s: u64,
    state: Mutex<(Option<Instant>, u64)>,
}

impl ReadPacer {
    /// `0`: no limit.
    pub fn new(bytes_per_s: u64) -> Self {
        ReadPacer {
            bytes_per_s,
            state: Mutex::new((None, 0)),
        }
    }

    /// Accounts for `bytes` just read and sleeps until the rate allows
    /// them.
    pub fn pace(&self, bytes: u64) {
        if self.bytes_per_s == 0 {
            return;
        }
        let due = {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let started = *state.0.get_or_insert_with(Instant::now);
            state.1 += bytes;
            let due = Duration::from_secs_f64(state.1 as f64 / self.bytes_per_s as f64);
            due.checked_sub(started.elapsed())
        };
        if let Some(wait) = due {
            std::thread::sleep(wait);
        }
    }
}

/// Where a state stream's bytes are, at the container level.
enum Container {
    /// In the prelude (bytes seen so far) and JSON header.
    Prelude { seen: Vec<u8> },
    /// In the JSON header; bytes left.
    Header { left: u64 },
    /// In a record header (bytes seen so far).
    Record { seen: Vec<u8> },
    /// In a DATA record's payload; bytes left.
    Data { left: u64 },
    /// After END, or lost: everything is opaque from here.
    Done,
}

/// Where the decoded Xe stream is.
enum Packets {
    Header {
        seen: Vec<u8>,
    },
    /// In a payload: BAR offset of the next byte if it is VRAM, bytes
    /// left.
    Payload {
        bar: Option<u64>,
        left: u64,
    },
}

/// Maps an encoded device-state stream, as it is written, to VRAM BAR
/// offsets: `(Some(offset), len)` for VRAM bytes, `(None, len)` for the
/// rest. It reads headers as they pass and never fails: on anything it
/// does not understand it calls the rest opaque (comparing is then only
/// slower, never wrong).
pub struct StateStreamVram {
    lmem_per_tile: u64,
    container: Container,
    packets: Packets,
}

const RECORD_DATA: u8 = 1;
const RECORD_ZERO: u8 = 2;

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl StateStreamVram {
    /// For a VF whose tiles have `lmem_per_tile` bytes of LMEM each.
    pub fn new(lmem_per_tile: u64) -> Self {
        StateStreamVram {
            lmem_per_tile,
            container: Container::Prelude { seen: Vec::new() },
            packets: Packets::Header { seen: Vec::new() },
        }
    }

    /// The pieces of the stream's next bytes, `data`, in order.
    pub fn map(&mut self, mut data: &[u8], out: &mut Vec<(Option<u64>, u64)>) {
        while !data.is_empty() {
            let n = match &mut self.container {
                Container::Prelude { seen } => {
                    let n = (PRELUDE_LEN - seen.len()).min(data.len());
                    seen.extend_from_slice(&data[..n]);
                    if seen.len() == PRELUDE_LEN {
                        let json = u32::from_le_bytes([seen[12], seen[13], seen[14], seen[15]]);
                        self.container = Container::Header {
                            left: u64::from(json),
                        };
                    }
                    push(out, None, n);
                    n
                }
                Container::Header { left } => {
                    let n = (*left).min(data.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        self.container = Container::Record { seen: Vec::new() };
                    }
                    push(out, None, n);
                    n
                }
                Container::Record { seen } => {
                    let n = (RECORD_HEADER_LEN - seen.len()).min(data.len());
                    seen.extend_from_slice(&data[..n]);
                    if seen.len() == RECORD_HEADER_LEN {
                        let (kind, len) = (seen[0], le64(&seen[4..12]));
                        self.container = match kind {
                            RECORD_DATA => Container::Data { left: len },
                            RECORD_ZERO => {
                                self.skip_decoded(len);
                                Container::Record { seen: Vec::new() }
                            }
                            _ => Container::Done,
                        };
                    }
                    push(out, None, n);
                    n
                }
                Container::Data { left } => {
                    let n = (*left).min(data.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        self.container = Container::Record { seen: Vec::new() };
                    }
                    self.decoded(&data[..n], out);
                    n
                }
                Container::Done => {
                    push(out, None, data.len());
                    data.len()
                }
            };
            data = &data[n..];
        }
    }

    /// Decoded Xe stream bytes that are in the container as they are.
    fn decoded(&mut self, mut data: &[u8], out: &mut Vec<(Option<u64>, u64)>) {
        while !data.is_empty() {
            let n = match &mut self.packets {
                Packets::Header { seen } => {
                    let n = (HEADER_LEN - seen.len()).min(data.len());
                    seen.extend_from_slice(&data[..n]);
                    if seen.len() == HEADER_LEN {
                        let header = std::mem::take(seen);
                        self.packets = payload_of(self.lmem_per_tile, &header);
                    }
                    push(out, None, n);
                    n
                }
                Packets::Payload { bar, left } => {
                    let n = (*left).min(data.len() as u64) as usize;
                    push(out, *bar, n);
                    *left -= n as u64;
                    if let Some(b) = bar {
                        *b += n as u64;
                    }
                    if *left == 0 {
                        self.packets = Packets::Header { seen: Vec::new() };
                    }
                    n
                }
            };
            data = &data[n..];
        }
    }

    /// Decoded bytes a ZERO record stands for: they pass the Xe framing
    /// without appearing in the container.
    fn skip_decoded(&mut self, mut len: u64) {
        while len > 0 {
            match &mut self.packets {
                Packets::Header { seen } => {
                    let n = (HEADER_LEN - seen.len()).min(len as usize);
                    seen.resize(seen.len() + n, 0);
                    len -= n as u64;
                    if seen.len() == HEADER_LEN {
                        let header = std::mem::take(seen);
                        self.packets = payload_of(self.lmem_per_tile, &header);
                    }
                }
                Packets::Payload { bar, left } => {
                    let n = (*left).min(len);
                    *left -= n;
                    len -= n;
                    if let Some(b) = bar {
                        *b += n;
                    }
                    if *left == 0 {
                        self.packets = Packets::Header { seen: Vec::new() };
                    }
                }
            }
        }
    }
}

/// What follows an Xe packet header: VRAM at its BAR offset (tiles'
/// LMEM one after the other), or other bytes.
fn payload_of(lmem_per_tile: u64, header: &[u8]) -> Packets {
    let (kind, tile) = (header[1], header[2]);
    let (offset, size) = (le64(&header[8..16]), le64(&header[16..24]));
    let bar = (kind == PacketType::Vram.raw())
        .then(|| u64::from(tile).checked_mul(lmem_per_tile))
        .flatten()
        .and_then(|base| base.checked_add(offset));
    Packets::Payload { bar, left: size }
}

fn push(out: &mut Vec<(Option<u64>, u64)>, bar: Option<u64>, n: usize) {
    if n == 0 {
        return;
    }
    let n = n as u64;
    if let Some(last) = out.last_mut() {
        let joins = match (last.0, bar) {
            (None, None) => true,
            (Some(a), Some(b)) => a + last.1 == b,
            _ => false,
        };
        if joins {
            last.1 += n;
            return;
        }
    }
    out.push((bar, n));
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::emulated::{EmulatedConfig, EmulatedXeVf};
    use crate::engine::{save, TransferOptions};

    const MIB: u64 = 1 << 20;

    /// Every byte the map calls VRAM is the device's VRAM at that BAR
    /// offset, and every non-zero VRAM byte is found (zero runs are
    /// elided by the container and never appear).
    #[test]
    fn vram_precopy_layout_finds_each_vram_byte_of_a_real_stream_at_its_bar_offset() {
        let dev = EmulatedXeVf::new(EmulatedConfig {
            vram_size: 8 * MIB,
            tiles: 2,
            workload: false,
            bar_read_rate: 0,
            ..EmulatedConfig::default()
        })
        .unwrap();
        dev.fill_vram(5, 30).unwrap();
        let mut stream = Vec::new();
        save(&*dev, &mut stream, &TransferOptions::default(), &mut |_| {}).unwrap();
        let bar: Arc<dyn VramBar> = dev.vram_bar();
        let mut vram = vec![0u8; bar.size() as usize];
        bar.read_at(&mut vram, 0).unwrap();

        let mut map = StateStreamVram::new(dev.config().lmem_per_tile());
        let mut pieces = Vec::new();
        for part in stream.chunks(77_777) {
            map.map(part, &mut pieces);
        }
        assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), stream.len() as u64);
        let (mut at, mut found) = (0usize, 0u64);
        let mut tiles_seen = [false; 2];
        for (bar_offset, len) in pieces {
            let len = len as usize;
            if let Some(o) = bar_offset {
                let o = o as usize;
                assert_eq!(&stream[at..at + len], &vram[o..o + len], "at BAR {o:#x}");
                tiles_seen[o / (4 * MIB as usize)] = true;
                found += len as u64;
            }
            at += len;
        }
        assert_eq!(tiles_seen, [true, true]);
        let non_zero_pages = vram
            .chunks(4096)
            .filter(|p| p.iter().any(|b| *b != 0))
            .count();
        assert!(
            found >= non_zero_pages as u64 * 4096,
            "{found} VRAM bytes found, {non_zero_pages} non-zero pages"
        );
    }

    #[test]
    fn vram_precopy_bar_reads_are_held_to_the_rate() {
        let pacer = ReadPacer::new(64 * MIB);
        let started = Instant::now();
        for _ in 0..4 {
            pacer.pace(4 * MIB);
        }
        // 16 MiB at 64 MiB/s: at least 250 ms.
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[test]
    fn vram_precopy_change_vram_rewrites_the_share_asked_spread_out() {
        let dev = EmulatedXeVf::new(EmulatedConfig {
            vram_size: 8 * MIB,
            workload: false,
            bar_read_rate: 0,
            ..EmulatedConfig::default()
        })
        .unwrap();
        dev.fill_vram(1, 0).unwrap();
        let bar = dev.vram_bar();
        let read = || {
            let mut v = vec![0u8; 8 * MIB as usize];
            bar.read_at(&mut v, 0).unwrap();
            v
        };
        let before = read();
        assert_eq!(dev.change_vram(10, 3).unwrap(), 12 * 64 * 1024);
        let after = read();
        let changed: Vec<usize> = before
            .chunks(64 << 10)
            .zip(after.chunks(64 << 10))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(changed.len(), 12);
        // Spread: no two changed blocks next to each other.
        assert!(changed.windows(2).all(|w| w[1] - w[0] >= 9), "{changed:?}");
    }
}
