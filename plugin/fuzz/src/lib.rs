// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the fuzz targets and the corpus generator share: the emulated
//! device shape and the layout of each target's input.

use xe_vf_plugin::emulated::EmulatedConfig;
use xe_vf_plugin::xe_stream::{ExpectedIdentity, ParserLimits};

/// The emulated VF `xe_restore` loads into: small enough that a whole
/// valid stream (about 17 KiB) is a cheap fuzz input.
pub fn restore_config() -> EmulatedConfig {
    EmulatedConfig {
        vram_size: 16 * 1024,
        tiles: 1,
        gts_per_tile: 2,
        ggtt_size: 256,
        mmio_size: 128,
        guc_size: 64,
        vram_chunk_size: 4 * 1024,
        workload: false,
        ..EmulatedConfig::default()
    }
}

/// The checks a restoring `config` device applies to a stream.
pub fn device_limits(config: &EmulatedConfig) -> ParserLimits {
    ParserLimits {
        identity: Some(ExpectedIdentity {
            device_id: config.device_id,
            revision_id: config.revision_id,
        }),
        lmem_size: Some(config.lmem_per_tile()),
        tiles: Some(config.tiles),
        gts: Some(config.gt_count()),
    }
}

/// `xe_stream_parser` input: byte 0 picks the limits, bytes 1-2 seed the
/// feed split, the rest is the stream.
pub struct ParserInput<'a> {
    pub limits: ParserLimits,
    pub keep_packets: bool,
    pub split_seed: u16,
    pub stream: &'a [u8],
}

impl<'a> ParserInput<'a> {
    pub fn parse(input: &'a [u8]) -> Option<Self> {
        let [which, s0, s1, stream @ ..] = input else {
            return None;
        };
        let which = *which;
        let device = restore_config();
        let full = device_limits(&device);
        Some(ParserInput {
            limits: ParserLimits {
                identity: full.identity.filter(|_| which & 1 != 0),
                lmem_size: full.lmem_size.filter(|_| which & 2 != 0),
                tiles: (which & 4 != 0).then_some(1 + (which >> 4) % 2),
                gts: (which & 8 != 0).then_some(1 + (which >> 5) % 4),
            },
            keep_packets: which & 0x80 != 0,
            split_seed: u16::from_le_bytes([*s0, *s1]),
            stream,
        })
    }

    /// The prefix that selects every limit of the `restore_config` device
    /// (1 tile, 2 GTs) and a given split seed.
    pub fn prefix_all_limits(split_seed: u16) -> [u8; 3] {
        let [s0, s1] = split_seed.to_le_bytes();
        // identity | lmem | tiles=1 | gts=2 (bits 5-6 = 1)
        [0x01 | 0x02 | 0x04 | 0x08 | (1 << 5), s0, s1]
    }
}

/// xorshift32: the split sizes the targets derive from a seed.
pub struct Splits(u32);

impl Splits {
    pub fn new(seed: u32) -> Self {
        Splits(seed | 1)
    }

    /// Next piece size in `1..=max`.
    pub fn next(&mut self, max: usize) -> usize {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        self.0 = s;
        1 + s as usize % max.max(1)
    }
}
