// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The VF's migratable state: LMEM plus per-GT GGTT, MMIO and GuC blobs.

use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;

use super::config::EmulatedConfig;
use super::memfd::Vram;
use crate::xe_stream::PacketType;

/// Bytes read at a time when scanning LMEM.
pub(crate) const SCAN_CHUNK: usize = 1 << 20;

/// Locks a mutex; a panicking holder cannot leave our plain data torn,
/// so poisoning is ignored.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The small state of one GT.
pub(crate) struct GtState {
    pub(crate) ggtt: Vec<u8>,
    pub(crate) mmio: Vec<u8>,
    pub(crate) guc: Vec<u8>,
}

impl GtState {
    pub(crate) fn component(&self, kind: PacketType) -> Option<&[u8]> {
        match kind {
            PacketType::Ggtt => Some(&self.ggtt),
            PacketType::Mmio => Some(&self.mmio),
            PacketType::Guc => Some(&self.guc),
            _ => None,
        }
    }

    pub(crate) fn component_mut(&mut self, kind: PacketType) -> Option<&mut Vec<u8>> {
        match kind {
            PacketType::Ggtt => Some(&mut self.ggtt),
            PacketType::Mmio => Some(&mut self.mmio),
            PacketType::Guc => Some(&mut self.guc),
            _ => None,
        }
    }
}

/// Checksums of every state component, to compare source and
/// destination after a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct StateDigest {
    /// crc32c of all of LMEM.
    pub vram: u32,
    /// crc32c of the GGTT blobs of all GTs, in GT order.
    pub ggtt: u32,
    pub mmio: u32,
    pub guc: u32,
    /// Workload iterations the state has seen.
    pub generation: u64,
}

/// Device memory shared by the device, its workload and stream threads.
pub(crate) struct DeviceModel {
    pub(crate) config: EmulatedConfig,
    pub(crate) vram: Vram,
    pub(crate) gts: Vec<Mutex<GtState>>,
}

impl DeviceModel {
    pub(crate) fn new(config: EmulatedConfig) -> io::Result<Self> {
        let gts = (0..config.gt_count())
            .map(|gt| {
                Mutex::new(GtState {
                    ggtt: vec![0; config.ggtt_size_of(gt) as usize],
                    mmio: vec![0; config.mmio_size as usize],
                    guc: vec![0; config.guc_size as usize],
                })
            })
            .collect();
        Ok(DeviceModel {
            vram: Vram::new(config.vram_size)?,
            gts,
            config,
        })
    }

    /// Byte offset of a tile's LMEM within the VRAM memfd.
    pub(crate) fn tile_base(&self, tile: u8) -> u64 {
        u64::from(tile) * self.config.lmem_per_tile()
    }

    pub(crate) fn gt(&self, gt: u8) -> Option<MutexGuard<'_, GtState>> {
        self.gts.get(usize::from(gt)).map(lock)
    }

    /// The workload generation, kept in the first 8 bytes of GT 0's GuC
    /// state so that it migrates with the device.
    pub(crate) fn generation(&self) -> u64 {
        self.gt(0).map_or(0, |gt| read_u64(&gt.guc, 0))
    }

    /// Zeroes every component.
    pub(crate) fn zero(&self) -> io::Result<()> {
        for gt in &self.gts {
            let mut gt = lock(gt);
            gt.ggtt.fill(0);
            gt.mmio.fill(0);
            gt.guc.fill(0);
        }
        self.vram.zero()
    }

    pub(crate) fn digest(&self) -> io::Result<StateDigest> {
        let mut vram = 0;
        let mut buf = vec![0u8; SCAN_CHUNK];
        let mut offset = 0;
        while offset < self.vram.size() {
            let n = (self.vram.size() - offset).min(SCAN_CHUNK as u64) as usize;
            self.vram.read_at(&mut buf[..n], offset)?;
            vram = crc32c::crc32c_append(vram, &buf[..n]);
            offset += n as u64;
        }
        let (mut ggtt, mut mmio, mut guc) = (0, 0, 0);
        for gt in &self.gts {
            let gt = lock(gt);
            ggtt = crc32c::crc32c_append(ggtt, &gt.ggtt);
            mmio = crc32c::crc32c_append(mmio, &gt.mmio);
            guc = crc32c::crc32c_append(guc, &gt.guc);
        }
        Ok(StateDigest {
            vram,
            ggtt,
            mmio,
            guc,
            generation: self.generation(),
        })
    }
}

pub(crate) fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    if let Some(src) = buf.get(at..at + 8) {
        raw.copy_from_slice(src);
    }
    u64::from_le_bytes(raw)
}

pub(crate) fn write_bytes(buf: &mut [u8], at: usize, value: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + value.len()) {
        dst.copy_from_slice(value);
    }
}

/// SplitMix64: deterministic content and access patterns.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
