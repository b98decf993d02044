// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shape of an emulated VF, the stream length that shape implies and the
//! `MIG_DATA_SIZE` estimate xe would give for it.

use crate::device::{DeviceError, Result};
use crate::uapi::MigrationFlags;
use crate::xe_stream::{Descriptor, HEADER_LEN};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Largest GGTT/MMIO/GuC blob per GT; they live in RAM.
pub const MAX_SMALL_COMPONENT: u64 = 64 * MIB;
/// The GuC blob of GT 0 starts with the workload generation counter.
pub const MIN_GUC_SIZE: u64 = 8;

/// Shape and behaviour of an [`super::EmulatedXeVf`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmulatedConfig {
    /// PCI device id; 0xe20b is a Battlemage (Arc B580) id that
    /// `xe-vfio-pci` binds.
    pub device_id: u16,
    pub revision_id: u8,
    /// LMEM quota of the VF in bytes, split evenly over the tiles.
    pub vram_size: u64,
    pub tiles: u8,
    /// GTs per tile (primary + media).
    pub gts_per_tile: u8,
    /// Bytes of GGTT entries per GT.
    pub ggtt_size: u64,
    /// Bytes of saved registers per GT.
    pub mmio_size: u64,
    /// Bytes of GuC VF state per GT.
    pub guc_size: u64,
    /// Payload bytes of one VRAM packet.
    pub vram_chunk_size: u64,
    /// What `VFIO_DEVICE_FEATURE_MIGRATION` reports.
    pub migration_flags: MigrationFlags,
    /// Run a background workload while RUNNING.
    pub workload: bool,
    /// Seeds the workload's access pattern.
    pub seed: u64,
    /// Extra guest pages the workload DMAs a record into per iteration
    /// (about 2000 iterations a second), spread over the VF's DMA window:
    /// the writes a dirty log of the CPU never sees. 0: one record per
    /// iteration into consecutive slots.
    pub dma_pages: u32,
    /// Bytes of the DMA window those pages are drawn from (its working
    /// set, spread evenly over the window); 0: the whole window.
    pub dma_set: u64,
    /// Bytes per second a read of LMEM through the VF's BAR gets
    /// ([`crate::vram_bar::VramBar`]); 0: no limit.
    pub bar_read_rate: u64,
}

/// Default BAR read rate: 128 MiB/s. VFIO maps BARs uncached, so every
/// CPU load of device memory is a PCIe round trip of its own (~0.5 us)
/// and loads do not overlap: 64-byte loads give ~128 MiB/s, narrower
/// ones less. Streaming loads from a write-combining mapping can do
/// several times more; this default does not assume one.
pub const DEFAULT_BAR_READ_RATE: u64 = 128 * MIB;

impl Default for EmulatedConfig {
    fn default() -> Self {
        EmulatedConfig {
            device_id: 0xe20b,
            revision_id: 0,
            vram_size: 256 * MIB,
            tiles: 1,
            gts_per_tile: 2,
            ggtt_size: 64 * KIB,
            mmio_size: 16 * KIB,
            guc_size: 32 * KIB,
            vram_chunk_size: 2 * MIB,
            migration_flags: MigrationFlags::XE_VF,
            workload: true,
            seed: 0x5eed,
            dma_pages: 0,
            dma_set: 0,
            bar_read_rate: DEFAULT_BAR_READ_RATE,
        }
    }
}

impl EmulatedConfig {
    /// Rejects shapes the model cannot represent.
    pub fn validate(&self) -> Result<()> {
        let invalid = |what: String| {
            Err(DeviceError::Other(format!(
                "invalid emulated VF config: {what}"
            )))
        };
        if self.tiles == 0 || self.gts_per_tile == 0 {
            return invalid("tiles and gts_per_tile must be at least 1".into());
        }
        if u16::from(self.tiles) * u16::from(self.gts_per_tile) > u16::from(u8::MAX) {
            return invalid(format!(
                "{} tiles x {} GTs exceed 255 GT ids",
                self.tiles, self.gts_per_tile
            ));
        }
        if self.vram_size == 0 || !self.vram_size.is_multiple_of(u64::from(self.tiles)) {
            return invalid(format!(
                "vram_size {} must be non-zero and divisible by {} tiles",
                self.vram_size, self.tiles
            ));
        }
        if self.vram_chunk_size == 0 {
            return invalid("vram_chunk_size must be non-zero".into());
        }
        for (name, size, min) in [
            ("ggtt_size", self.ggtt_size, 1),
            ("mmio_size", self.mmio_size, 1),
            ("guc_size", self.guc_size, MIN_GUC_SIZE),
        ] {
            if !(min..=MAX_SMALL_COMPONENT).contains(&size) {
                return invalid(format!(
                    "{name} {size} outside {min}..={MAX_SMALL_COMPONENT}"
                ));
            }
        }
        if !self.migration_flags.contains(MigrationFlags::STOP_COPY) {
            return invalid(format!(
                "migration_flags {} lack STOP_COPY",
                self.migration_flags
            ));
        }
        Ok(())
    }

    /// Device-wide number of GTs (GT ids are `0..gt_count`).
    pub fn gt_count(&self) -> u8 {
        self.tiles.saturating_mul(self.gts_per_tile)
    }

    /// Tile a device-wide GT id belongs to.
    pub fn tile_of(&self, gt: u8) -> u8 {
        gt / self.gts_per_tile.max(1)
    }

    /// Whether `gt` is its tile's primary GT (the others are media GTs).
    pub fn is_primary_gt(&self, gt: u8) -> bool {
        gt.is_multiple_of(self.gts_per_tile.max(1))
    }

    /// GGTT bytes a GT saves: xe saves the VF's GGTT only for a tile's
    /// primary GT (`pf_migration_ggtt_size()` is 0 for a media GT, and a
    /// component of size 0 has no packet).
    pub fn ggtt_size_of(&self, gt: u8) -> u64 {
        if self.is_primary_gt(gt) {
            self.ggtt_size
        } else {
            0
        }
    }

    /// VRAM bytes a GT saves: its tile's LMEM on the tile's primary GT
    /// (`pf_migration_vram_size()` is 0 for a media GT), in packets of at
    /// most `vram_chunk_size`.
    pub fn vram_size_of(&self, gt: u8) -> u64 {
        if self.is_primary_gt(gt) {
            self.lmem_per_tile()
        } else {
            0
        }
    }

    /// LMEM bytes of each tile.
    pub fn lmem_per_tile(&self) -> u64 {
        self.vram_size / u64::from(self.tiles.max(1))
    }

    /// The descriptor this device writes and requires.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(self.device_id, self.revision_id)
    }

    /// `MIG_DATA_SIZE` as xe computes it, an estimate of the STOP_COPY
    /// stream: `xe_sriov_pf_migration_size()` sums over the GTs
    /// `xe_gt_sriov_pf_migration_size()`, each of the GT's GuC, GGTT, MMIO
    /// and VRAM sizes plus one packet header for each that is not empty.
    /// It counts one header for all of a tile's VRAM however many chunks
    /// it takes, and neither the descriptor nor the trailer, so it is
    /// below [`Self::stream_len`].
    pub fn stop_copy_size(&self) -> u64 {
        let with_header = |size: u64| if size > 0 { size + HEADER } else { 0 };
        (0..self.gt_count())
            .map(|gt| {
                with_header(self.guc_size)
                    + with_header(self.ggtt_size_of(gt))
                    + with_header(self.mmio_size)
                    + with_header(self.vram_size_of(gt))
            })
            .sum()
    }

    /// Exact byte length of the STOP_COPY stream the device writes: every
    /// packet's header and payload, the descriptor, one header per VRAM
    /// chunk and the trailer included.
    pub fn stream_len(&self) -> u64 {
        let chunk = self.vram_chunk_size.max(1);
        let descriptor = HEADER + self.descriptor().encoded_len();
        let trailer = HEADER;
        // stop_copy_size() has one header per tile's VRAM; each further
        // chunk has its own.
        let extra_chunk_headers: u64 = (0..self.gt_count())
            .map(|gt| self.vram_size_of(gt).div_ceil(chunk).saturating_sub(1) * HEADER)
            .sum();
        descriptor + self.stop_copy_size() + extra_chunk_headers + trailer
    }
}

/// Bytes of one Xe packet header.
const HEADER: u64 = HEADER_LEN as u64;
