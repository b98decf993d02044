// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VF's VRAM as VRAM pre-copy (`migration_ext::vram`) takes it: the
//! plugin's BAR reader and stream map behind the engine's traits, for
//! every VMM that runs the engine (the patched Cloud Hypervisor and the
//! test host).

use std::io;
use std::sync::Arc;

use log::{info, warn};
use migration_ext::vram::wire::Piece;
use migration_ext::vram::{BarSource, StreamLayout, VramSource};
use xe_vf_plugin::backend::Backend;
use xe_vf_plugin::vram_bar::{StateStreamVram, VramBar};

use crate::migration::Snapshottable;
use crate::xe_vf::XeVfDevice;

struct Bar(Arc<dyn VramBar>);

impl BarSource for Bar {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
}

struct Layout {
    map: StateStreamVram,
    pieces: Vec<(Option<u64>, u64)>,
}

impl StreamLayout for Layout {
    fn map(&mut self, data: &[u8], out: &mut Vec<Piece>) {
        self.pieces.clear();
        self.map.map(data, &mut self.pieces);
        out.extend(self.pieces.iter().map(|(bar, len)| match bar {
            Some(offset) => Piece::bar(*offset, *len),
            None => Piece::raw(*len),
        }));
    }
}

fn source(bar: Arc<dyn VramBar>, lmem_per_tile: u64) -> VramSource {
    VramSource {
        bar: Arc::new(Bar(bar)),
        layout: Box::new(Layout {
            map: StateStreamVram::new(lmem_per_tile),
            pieces: Vec::new(),
        }),
    }
}

impl XeVfDevice {
    /// The VF's VRAM as pre-copy reads it, if the VF has a BAR the host
    /// can read. A real VF's LMEM BAR maps its LMEM from offset 0, taken
    /// as one tile: a VF whose stream places VRAM otherwise costs bytes
    /// in stop-copy, never correctness (each page is compared by digest).
    pub fn vram_source(&self) -> Option<VramSource> {
        match self.backend() {
            Backend::Emulated(vf) => Some(source(vf.vram_bar(), vf.config().lmem_per_tile())),
            Backend::Vfio(device) => match device.lmem_bar() {
                Ok(Some(bar)) => {
                    info!(
                        "{}: LMEM BAR of {} bytes readable for VRAM pre-copy",
                        self.id(),
                        bar.size()
                    );
                    let size = bar.size();
                    Some(source(Arc::new(bar), size))
                }
                Ok(None) => {
                    info!(
                        "{}: no readable LMEM BAR: VRAM goes in stop-copy",
                        self.id()
                    );
                    None
                }
                Err(e) => {
                    warn!("{}: LMEM BAR: {e}: VRAM goes in stop-copy", self.id());
                    None
                }
            },
        }
    }
}
