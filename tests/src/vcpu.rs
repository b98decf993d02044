// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A "vCPU": a thread that keeps writing pseudo-random pages into the low
//! half of guest memory (marking them dirty), so memory migration has to
//! iterate. Pausing returns only once no write is in flight.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::memory::{GuestMemory, PAGE_SIZE};

/// Pages written per iteration, and the pause between iterations.
const PAGES_PER_STEP: u64 = 4;
const PACE: Duration = Duration::from_millis(1);

#[derive(Default)]
struct Control {
    running: bool,
    shutdown: bool,
}

#[derive(Default)]
struct Gate {
    control: Mutex<Control>,
    cv: Condvar,
}

fn lock(gate: &Gate) -> MutexGuard<'_, Control> {
    gate.control.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The vCPU thread of a VM (or none, with the workload off).
pub struct Vcpu {
    gate: Arc<Gate>,
    writes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Vcpu {
    /// Creates a stopped vCPU; with `workload` off it never writes.
    pub fn new(memory: Arc<GuestMemory>, workload: bool, seed: u64) -> io::Result<Self> {
        let gate = Arc::new(Gate::default());
        let writes = Arc::new(AtomicU64::new(0));
        let thread = if workload {
            let gate = gate.clone();
            let writes = writes.clone();
            Some(
                std::thread::Builder::new()
                    .name("vcpu0".into())
                    .spawn(move || run(&gate, &memory, &writes, seed))?,
            )
        } else {
            None
        };
        Ok(Vcpu {
            gate,
            writes,
            thread,
        })
    }

    /// Lets the vCPU run, or stops it; stopping returns once no write is
    /// in flight.
    pub fn set_running(&self, running: bool) {
        let mut c = lock(&self.gate);
        c.running = running;
        self.gate.cv.notify_all();
    }

    pub fn is_running(&self) -> bool {
        lock(&self.gate).running
    }

    /// Pages written so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        {
            let mut c = lock(&self.gate);
            c.shutdown = true;
            self.gate.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("vCPU thread panicked");
            }
        }
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn run(gate: &Gate, memory: &GuestMemory, writes: &AtomicU64, seed: u64) {
    let mut rng = seed;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    // The low half is the vCPU's; devices DMA into the high half.
    let pages = (memory.pages() / 2).max(1);
    let mut c = lock(gate);
    loop {
        if c.shutdown {
            return;
        }
        if !c.running {
            c = gate.cv.wait(c).unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        for _ in 0..PAGES_PER_STEP {
            let target = splitmix(&mut rng) % pages;
            for word in page.chunks_exact_mut(8) {
                word.copy_from_slice(&splitmix(&mut rng).to_le_bytes());
            }
            if let Err(e) = memory.write_dirty(&page, target * PAGE_SIZE) {
                log::warn!("vCPU write of page {target} failed: {e}");
            }
            writes.fetch_add(1, Ordering::Relaxed);
        }
        c = gate
            .cv
            .wait_timeout(c, PACE)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_vcpu_leaves_memory_alone() {
        let m = Arc::new(GuestMemory::new(1 << 20).unwrap());
        let v = Vcpu::new(m.clone(), true, 1).unwrap();
        v.set_running(true);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while v.writes() < 16 {
            assert!(std::time::Instant::now() < deadline, "vCPU never wrote");
            std::thread::sleep(Duration::from_millis(1));
        }
        v.set_running(false);
        let crc = m.crc32c().unwrap();
        let writes = v.writes();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(v.writes(), writes);
        assert_eq!(m.crc32c().unwrap(), crc);
        assert!(m.take_dirty_bitmap().iter().any(|w| *w != 0));
    }
}
