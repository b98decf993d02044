// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A software model of a VF bound to `xe-vfio-pci`.
//!
//! It implements [`MigrationDevice`] with the driver's observable
//! behaviour: the uAPI v2 arcs its flags allow, a real data fd carrying
//! the Xe packet stream, the driver's restore checks and errnos, and a
//! background workload that changes device state and DMAs into guest
//! memory while RUNNING. LMEM lives in a sparse memfd, so GiB-sized VFs
//! cost no RAM. Everything above the trait runs unchanged against it.
//!
//! Failed arcs follow `xe-vfio-pci`: the driver leaves `mig_state` where
//! it was (it never moves to ERROR by itself; only an explicit
//! [`Fault::FailArc`] with `enter_error` models drivers that do). On
//! RESUMING -> STOP the driver releases the data file before loading, so
//! a failed load leaves the device in RESUMING with no stream; retrying
//! the arc fails the same way and only a reset recovers.
//!
//! One difference from the driver: its `write()` on the resume fd returns
//! the restore errno directly. Here the stream is checked by a consumer
//! thread; once it fails it stops reading (the writer then sees EPIPE or
//! ECONNRESET) and the real errno surfaces at RESUMING -> STOP.

mod arcs;
mod config;
mod context;
mod faults;
mod memfd;
mod restore;
mod save;
mod sock;
mod state;
mod workload;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

pub use arcs::arc_allowed;
pub use config::{EmulatedConfig, DEFAULT_BAR_READ_RATE};
pub use faults::Fault;
pub use memfd::create_memfd;
pub use state::StateDigest;
pub use workload::{DmaRecord, GuestDmaRegion, DMA_RECORD_LEN};

use crate::device::{DeviceError, DeviceIdentity, MigrationDevice, Result, PCI_VENDOR_INTEL};
use crate::uapi::{DeviceState, MigrationFlags};
use crate::vram_bar::{ReadPacer, VramBar};
use arcs::workload_runs;
use context::DeviceContext;
use faults::Faults;
use restore::ResumeStream;
use save::SaveStream;
use state::{lock, DeviceModel, SplitMix, SCAN_CHUNK};
use workload::{GuestSlot, Workload};

const PAGE: usize = 4096;

/// The open data stream of the current state.
enum Session {
    Save(SaveStream),
    Resume(ResumeStream),
}

struct Control {
    state: DeviceState,
    session: Option<Session>,
    /// errno of a failed load; RESUMING -> STOP keeps failing with it.
    failed_restore: Option<i32>,
    last_restore_error: Option<String>,
}

/// An emulated Xe SR-IOV VF with VFIO migration v2.
pub struct EmulatedXeVf {
    config: EmulatedConfig,
    model: Arc<DeviceModel>,
    guest: GuestSlot,
    faults: Faults,
    control: Mutex<Control>,
    workload: Workload,
    context: DeviceContext,
}

fn arc_error(from: DeviceState, to: DeviceState, errno: i32) -> DeviceError {
    DeviceError::Arc {
        from,
        to,
        source: io::Error::from_raw_os_error(errno),
    }
}

impl EmulatedXeVf {
    /// Creates a VF in RUNNING with all state zeroed.
    pub fn new(config: EmulatedConfig) -> Result<Arc<Self>> {
        config.validate()?;
        let model = Arc::new(
            DeviceModel::new(config.clone()).map_err(|e| DeviceError::Ioctl {
                op: "create emulated VF memory",
                source: e,
            })?,
        );
        let guest: GuestSlot = Arc::default();
        let workload =
            Workload::spawn(model.clone(), guest.clone(), config.workload).map_err(|e| {
                DeviceError::Ioctl {
                    op: "spawn emulated VF workload",
                    source: e,
                }
            })?;
        workload.set_running(true);
        let context = DeviceContext::new().map_err(|e| DeviceError::Ioctl {
            op: "spawn emulated VF context",
            source: e,
        })?;
        log::debug!(
            "emulated Xe VF {:04x}:{:04x} rev {:02x}: {} bytes LMEM, {} tiles x {} GTs, flags {}",
            PCI_VENDOR_INTEL,
            config.device_id,
            config.revision_id,
            config.vram_size,
            config.tiles,
            config.gts_per_tile,
            config.migration_flags
        );
        Ok(Arc::new(EmulatedXeVf {
            config,
            model,
            guest,
            faults: Faults::default(),
            control: Mutex::new(Control {
                state: DeviceState::Running,
                session: None,
                failed_restore: None,
                last_restore_error: None,
            }),
            workload,
            context,
        }))
    }

    /// One arc of the uAPI state machine.
    fn single_arc(&self, control: &mut Control, new_state: DeviceState) -> Result<Option<File>> {
        let from = control.state;
        if let Some((errno, enter_error)) = self.faults.take_arc(from, new_state) {
            log::warn!("emulated Xe VF: injected failure of {from} -> {new_state} (errno {errno})");
            if enter_error {
                self.enter_error(control);
            }
            return Err(arc_error(from, new_state, errno));
        }
        if !arc_allowed(self.config.migration_flags, from, new_state) {
            return Err(arc_error(from, new_state, libc::EINVAL));
        }
        if !workload_runs(new_state) {
            // Returns once no workload iteration is in flight.
            self.workload.set_running(false);
        }
        match self.do_arc(control, from, new_state) {
            Ok(fd) => {
                control.state = new_state;
                self.workload.set_running(workload_runs(new_state));
                log::debug!("emulated Xe VF: {from} -> {new_state}");
                Ok(fd)
            }
            Err(e) => {
                self.workload.set_running(workload_runs(from));
                Err(e)
            }
        }
    }

    pub fn config(&self) -> &EmulatedConfig {
        &self.config
    }

    /// Gives the workload guest memory to DMA records into.
    pub fn attach_guest_memory(&self, region: GuestDmaRegion) {
        *lock(&self.guest) = Some(region);
    }

    /// Takes the guest memory away again.
    pub fn detach_guest_memory(&self) -> Option<GuestDmaRegion> {
        lock(&self.guest).take()
    }

    /// Arms a one-shot fault.
    pub fn inject_fault(&self, fault: Fault) {
        self.faults.inject(fault);
    }

    /// Workload iterations the device state has seen (migrates with it).
    pub fn generation(&self) -> u64 {
        self.model.generation()
    }

    /// Why the last load failed, in the driver's words.
    pub fn last_restore_error(&self) -> Option<String> {
        lock(&self.control).last_restore_error.clone()
    }

    /// Fills LMEM deterministically from `seed`, about `zero_percent` of
    /// its 4 KiB pages left all-zero (and sparse), and seeds the GGTT,
    /// MMIO and GuC blobs (keeping the generation).
    pub fn fill_vram(&self, seed: u64, zero_percent: u8) -> Result<()> {
        let _control = lock(&self.control);
        let _quiet = self.workload.quiesce();
        let io_err = |source| DeviceError::Ioctl {
            op: "fill emulated VRAM",
            source,
        };
        let mut rng = SplitMix(seed);
        for (index, gt) in self.model.gts.iter().enumerate() {
            let mut gt = lock(gt);
            let generation = state::read_u64(&gt.guc, 0);
            rng.fill(&mut gt.ggtt);
            rng.fill(&mut gt.mmio);
            rng.fill(&mut gt.guc);
            if index == 0 {
                // GT 0 keeps its generation counter.
                state::write_bytes(&mut gt.guc, 0, &generation.to_le_bytes());
            }
        }
        self.model.vram.zero().map_err(io_err)?;
        let size = self.model.vram.size();
        let mut buf = vec![0u8; SCAN_CHUNK];
        let mut chunk_start = 0u64;
        while chunk_start < size {
            let n = (size - chunk_start).min(SCAN_CHUNK as u64) as usize;
            let mut run: Option<usize> = None;
            for page_at in (0..n).step_by(PAGE) {
                let page_end = (page_at + PAGE).min(n);
                let index = (chunk_start + page_at as u64) / PAGE as u64;
                let mut page_rng = SplitMix(seed ^ index.wrapping_mul(0xa076_1d64_78bd_642f));
                let zero = page_rng.next_u64() % 100 < u64::from(zero_percent.min(100));
                if zero {
                    if let Some(start) = run.take() {
                        self.model
                            .vram
                            .write_at(&buf[start..page_at], chunk_start + start as u64)
                            .map_err(io_err)?;
                    }
                } else {
                    page_rng.fill(&mut buf[page_at..page_end]);
                    run.get_or_insert(page_at);
                }
            }
            if let Some(start) = run {
                self.model
                    .vram
                    .write_at(&buf[start..n], chunk_start + start as u64)
                    .map_err(io_err)?;
            }
            chunk_start += n as u64;
        }
        Ok(())
    }

    /// Rewrites `percent` of LMEM with new bytes from `seed`, in 64 KiB
    /// blocks spread evenly over it, as a GPU's own work would between
    /// two looks at its memory (for benchmarks of VRAM pre-copy).
    /// Returns the bytes rewritten.
    pub fn change_vram(&self, percent: u8, seed: u64) -> Result<u64> {
        const BLOCK: u64 = 64 << 10;
        let percent = u64::from(percent.min(100));
        let blocks = self.model.vram.size() / BLOCK;
        let mut buf = vec![0u8; BLOCK as usize];
        let mut changed = 0;
        for block in 0..blocks {
            // Block `block` is one of the chosen when the running share
            // steps up here: evenly spread, exactly `percent` in all.
            if block * percent / 100 == (block + 1) * percent / 100 {
                continue;
            }
            SplitMix(seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15)).fill(&mut buf);
            self.model
                .vram
                .write_at(&buf, block * BLOCK)
                .map_err(|source| DeviceError::Ioctl {
                    op: "change emulated VRAM",
                    source,
                })?;
            changed += BLOCK;
        }
        Ok(changed)
    }

    /// LMEM as the VMM reads it through the VF's BAR while the VF runs:
    /// the device's own memory, paced to the configured BAR read rate.
    pub fn vram_bar(&self) -> Arc<dyn VramBar> {
        Arc::new(EmulatedBar {
            model: self.model.clone(),
            pacer: ReadPacer::new(self.config.bar_read_rate),
        })
    }

    /// Allocates all of the VF's LMEM up front, as device memory is: a
    /// destination VF then pays no page allocation while loading (for
    /// benchmarks; LMEM stays zero).
    pub fn prefault_vram(&self) -> Result<()> {
        self.model
            .vram
            .prefault()
            .map_err(|source| DeviceError::Ioctl {
                op: "pre-fault emulated VRAM",
                source,
            })
    }

    /// Checksums of the whole device state, taken while the workload is
    /// held still.
    pub fn digest(&self) -> Result<StateDigest> {
        let _quiet = self.workload.quiesce();
        self.model.digest().map_err(|source| DeviceError::Ioctl {
            op: "digest emulated VF state",
            source,
        })
    }

    /// Ends any open stream and stops the workload: the device is in
    /// ERROR until reset.
    fn enter_error(&self, control: &mut Control) {
        control.session.take();
        self.workload.set_running(false);
        control.state = DeviceState::Error;
    }

    /// The side effects of one allowed arc; returns its data fd.
    fn do_arc(
        &self,
        control: &mut Control,
        from: DeviceState,
        to: DeviceState,
    ) -> Result<Option<File>> {
        use DeviceState::*;
        let io_err = |source| DeviceError::Arc { from, to, source };
        match (from, to) {
            (_, StopCopy) => {
                control.session.take();
                let (stream, fd) =
                    SaveStream::start(&self.context, self.model.clone(), self.faults.take_save())
                        .map_err(io_err)?;
                control.session = Some(Session::Save(stream));
                Ok(Some(fd))
            }
            (StopCopy, Stop) => {
                if let Some(Session::Save(stream)) = control.session.take() {
                    stream.stop();
                }
                Ok(None)
            }
            (Stop, Resuming) => {
                let (stream, fd) =
                    ResumeStream::start(&self.context, self.model.clone()).map_err(io_err)?;
                control.session = Some(Session::Resume(stream));
                control.failed_restore = None;
                control.last_restore_error = None;
                Ok(Some(fd))
            }
            (Resuming, Stop) => self.load(control, from, to),
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
                // No initial data: the stream is at EOF at once. The full
                // stream comes with PRE_COPY -> STOP_COPY on a new fd
                // (the kernel reuses this one; Xe has no PRE_COPY).
                let (device_end, fd) = sock::data_pair().map_err(io_err)?;
                drop(device_end);
                Ok(Some(fd))
            }
            _ => Ok(None),
        }
    }

    /// RESUMING -> STOP: end the stream and report the load result.
    fn load(
        &self,
        control: &mut Control,
        from: DeviceState,
        to: DeviceState,
    ) -> Result<Option<File>> {
        if let Some(errno) = control.failed_restore {
            return Err(arc_error(from, to, errno));
        }
        let Some(Session::Resume(stream)) = control.session.take() else {
            return Ok(None);
        };
        match stream.finish() {
            Ok(summary) => {
                log::debug!(
                    "emulated Xe VF loaded {} packets ({} VRAM bytes)",
                    summary.packets,
                    summary.vram_bytes
                );
                Ok(None)
            }
            Err(e) => {
                let errno = e.errno();
                log::warn!("emulated Xe VF: RESUMING -> STOP fails with errno {errno}: {e}");
                control.failed_restore = Some(errno);
                control.last_restore_error = Some(e.to_string());
                Err(arc_error(from, to, errno))
            }
        }
    }
}

impl MigrationDevice for EmulatedXeVf {
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            vendor_id: PCI_VENDOR_INTEL,
            device_id: self.config.device_id,
            revision_id: self.config.revision_id,
            vram_size: Some(self.config.vram_size),
        }
    }

    fn migration_flags(&self) -> Result<MigrationFlags> {
        Ok(self.config.migration_flags)
    }

    fn state(&self) -> Result<DeviceState> {
        Ok(lock(&self.control).state)
    }

    /// Like Linux's VFIO core, a request for a non-adjacent state is
    /// accepted when the state machine has a path to it and performed arc
    /// by arc (`vfio_mig_get_next_state()`); a failed arc stops the walk
    /// where it is.
    fn set_state(&self, new_state: DeviceState) -> Result<Option<File>> {
        let mut control = lock(&self.control);
        let from = control.state;
        if from == new_state {
            return Ok(None);
        }
        let steps = if arc_allowed(self.config.migration_flags, from, new_state) {
            vec![new_state]
        } else {
            crate::fsm::path(self.config.migration_flags, from, new_state)
                .map_err(|_| arc_error(from, new_state, libc::EINVAL))?
        };
        let mut data_fd = None;
        for step in steps {
            if let Some(fd) = self.single_arc(&mut control, step)? {
                data_fd = Some(fd);
            }
        }
        Ok(data_fd)
    }

    fn stop_copy_size(&self) -> Result<u64> {
        Ok(self.config.stop_copy_size())
    }

    fn reset(&self) -> Result<()> {
        let mut control = lock(&self.control);
        control.session.take();
        self.workload.set_running(false);
        self.model.zero().map_err(|source| DeviceError::Ioctl {
            op: "reset emulated VF",
            source,
        })?;
        control.failed_restore = None;
        control.last_restore_error = None;
        control.state = DeviceState::Running;
        self.workload.set_running(true);
        log::debug!("emulated Xe VF reset to RUNNING");
        Ok(())
    }
}

impl Drop for EmulatedXeVf {
    fn drop(&mut self) {
        // Joins any stream thread; the workload joins when dropped next.
        lock(&self.control).session.take();
    }
}

/// The emulated VF's BAR view of its LMEM.
struct EmulatedBar {
    model: Arc<DeviceModel>,
    pacer: ReadPacer,
}

impl VramBar for EmulatedBar {
    fn size(&self) -> u64 {
        self.model.vram.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.model.vram.read_at(buf, offset)?;
        self.pacer.pace(buf.len() as u64);
        Ok(())
    }
}
