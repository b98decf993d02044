// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A background "GPU workload" that keeps changing device state and DMAs
//! into guest memory while the VF runs, so migrations have moving data.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::state::{lock, read_u64, write_bytes, DeviceModel, SplitMix};

/// Pause between iterations, so the workload does not hog a core.
const PACE: Duration = Duration::from_micros(500);
/// Bytes of one DMA record in guest memory.
pub const DMA_RECORD_LEN: u64 = 32;
const DMA_MAGIC: u32 = 0x4d44_4558; // "XEDM"
const PAGE: u64 = 4096;

/// Guest memory the VF may DMA into: a window of a (memfd) file.
#[derive(Debug)]
pub struct GuestDmaRegion {
    pub file: File,
    pub offset: u64,
    pub len: u64,
}

/// One record the workload writes into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaRecord {
    pub slot: u32,
    pub generation: u64,
}

impl DmaRecord {
    pub fn encode(&self) -> [u8; DMA_RECORD_LEN as usize] {
        let mut raw = [0u8; DMA_RECORD_LEN as usize];
        raw[0..4].copy_from_slice(&DMA_MAGIC.to_le_bytes());
        raw[4..8].copy_from_slice(&self.slot.to_le_bytes());
        raw[8..16].copy_from_slice(&self.generation.to_le_bytes());
        let crc = crc32c::crc32c(&raw[..16]);
        raw[16..20].copy_from_slice(&crc.to_le_bytes());
        raw
    }

    /// Decodes a record; `None` for never-written or torn slots.
    pub fn decode(raw: &[u8]) -> Option<Self> {
        let raw = raw.get(..DMA_RECORD_LEN as usize)?;
        let u32_at =
            |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
        if u32_at(0) != DMA_MAGIC || u32_at(16) != crc32c::crc32c(&raw[..16]) {
            return None;
        }
        Some(DmaRecord {
            slot: u32_at(4),
            generation: read_u64(raw, 8),
        })
    }
}

#[derive(Default)]
struct GateState {
    running: bool,
    shutdown: bool,
}

/// The workload runs one iteration at a time while holding the gate, so
/// whoever holds the gate sees a quiescent device.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

pub(crate) type GuestSlot = Arc<Mutex<Option<GuestDmaRegion>>>;

pub(crate) struct Workload {
    gate: Arc<Gate>,
    thread: Option<JoinHandle<()>>,
}

/// Held while the workload must not touch the device.
pub(crate) struct Quiesced<'a> {
    _gate: MutexGuard<'a, GateState>,
}

impl Workload {
    /// Starts the (paused) workload thread, unless `enabled` is false.
    pub(crate) fn spawn(
        model: Arc<DeviceModel>,
        guest: GuestSlot,
        enabled: bool,
    ) -> io::Result<Self> {
        let gate = Arc::new(Gate::default());
        let thread = if enabled {
            let gate = gate.clone();
            Some(
                std::thread::Builder::new()
                    .name("xe-vf-workload".into())
                    .spawn(move || run(&gate, &model, &guest))?,
            )
        } else {
            None
        };
        Ok(Workload { gate, thread })
    }

    /// Lets the workload run or stops it; stopping returns only once no
    /// iteration is in flight.
    pub(crate) fn set_running(&self, running: bool) {
        let mut st = lock(&self.gate.state);
        st.running = running;
        self.gate.cv.notify_all();
    }

    /// Blocks the workload for as long as the guard lives.
    pub(crate) fn quiesce(&self) -> Quiesced<'_> {
        Quiesced {
            _gate: lock(&self.gate.state),
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.gate.state);
            st.shutdown = true;
            self.gate.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("emulated Xe VF workload thread panicked");
            }
        }
    }
}

fn run(gate: &Gate, model: &DeviceModel, guest: &Mutex<Option<GuestDmaRegion>>) {
    let mut st = lock(&gate.state);
    loop {
        if st.shutdown {
            return;
        }
        if st.running {
            if let Err(e) = step(model, guest) {
                log::warn!("emulated Xe VF workload iteration failed: {e}");
            }
            // Releases the gate while pacing.
            st = gate
                .cv
                .wait_timeout(st, PACE)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        } else {
            st = gate.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One iteration: bump the generation and leave it in VRAM, GGTT, MMIO,
/// GuC and guest memory.
fn step(model: &DeviceModel, guest: &Mutex<Option<GuestDmaRegion>>) -> io::Result<()> {
    let generation = model.generation().wrapping_add(1);
    let mut rng = SplitMix(model.config.seed ^ generation.wrapping_mul(0x9e37_79b9));
    let pages = (model.vram.size() / PAGE).max(1);
    let page = rng.next_u64() % pages;
    let in_page = (rng.next_u64() % (PAGE / 64)) * 64;
    let mut stamp = [0u8; 64];
    stamp[..8].copy_from_slice(&generation.to_le_bytes());
    rng.fill(&mut stamp[8..]);
    let at = page * PAGE + in_page;
    if at + 64 <= model.vram.size() {
        model.vram.write_at(&stamp, at)?;
    }
    let gts = model.gts.len() as u64;
    for (i, gt) in model.gts.iter().enumerate() {
        if (generation % gts.max(1)) as usize != i && i != 0 {
            continue;
        }
        let mut gt = lock(gt);
        let entries = (gt.ggtt.len() / 8).max(1);
        let pte = (generation << 12) | 1;
        write_bytes(
            &mut gt.ggtt,
            (generation as usize % entries) * 8,
            &pte.to_le_bytes(),
        );
        let regs = (gt.mmio.len() / 4).max(1);
        write_bytes(
            &mut gt.mmio,
            (generation as usize % regs) * 4,
            &(generation as u32).to_le_bytes(),
        );
        if i == 0 {
            write_bytes(&mut gt.guc, 0, &generation.to_le_bytes());
        } else {
            let words = (gt.guc.len() / 8).max(1);
            write_bytes(
                &mut gt.guc,
                (generation as usize % words) * 8,
                &generation.to_le_bytes(),
            );
        }
    }
    if let Some(region) = lock(guest).as_ref() {
        let slots = region.len / DMA_RECORD_LEN;
        if slots > 0 {
            let slot = generation % slots;
            let record = DmaRecord {
                slot: slot as u32,
                generation,
            };
            region
                .file
                .write_all_at(&record.encode(), region.offset + slot * DMA_RECORD_LEN)?;
        }
        // Records at the start of pseudo-random pages of the window, as a
        // GPU scattering writes over guest memory.
        let pages = region.len / PAGE;
        let per_page = PAGE / DMA_RECORD_LEN;
        let scattered = if pages == 0 {
            0
        } else {
            model.config.dma_pages
        };
        let set = match model.config.dma_set / PAGE {
            0 => pages,
            n => n.min(pages),
        };
        for _ in 0..scattered {
            // One of `set` pages spread evenly over the window.
            let page = (rng.next_u64() % set) * pages / set.max(1);
            let record = DmaRecord {
                slot: (page * per_page) as u32,
                generation,
            };
            region
                .file
                .write_all_at(&record.encode(), region.offset + page * PAGE)?;
        }
    }
    Ok(())
}
