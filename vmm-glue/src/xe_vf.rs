// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `XeVfDevice`: one Xe VF as a Cloud Hypervisor migratable device.
//!
//! It plays the part of CH's `VfioPciDevice` migration hooks, with three
//! differences that make an Xe VF migratable at all: device data is
//! streamed (into a file beside `state.json`, or through an additive phase
//! of the migration protocol) instead of base64 in JSON; dirty tracking
//! does not require device DMA logging; and compatibility is checked before
//! the source stops.

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use anyhow::anyhow;
use log::{info, warn};
use serde::{Deserialize, Serialize};
use xe_vf_plugin::backend::Backend;
use xe_vf_plugin::device_config::{DeviceConfig, DirtyTracking};
use xe_vf_plugin::engine::{
    self, EngineError, RestoreReport, SaveReport, TransferOptions, DEVICE_KIND_GENERIC,
};
use xe_vf_plugin::fsm;
use xe_vf_plugin::state_format::{DEVICE_KIND_XE_VF, FORMAT_VERSION};
use xe_vf_plugin::vfio::{cdev, Placement, VfioMigrationDevice};
use xe_vf_plugin::{DeviceIdentity, DeviceState, MigrationDevice, MigrationFlags};

use crate::dirty::{self, DirtyMode, DirtyTracker};
use crate::error_chain::Chain;
use crate::iommufd_dirty::HwptDirtyTracker;
use crate::snapshot::{self, PendingDataFile, XeVfSnapshotState};
use vm_migration::protocol::{MemoryRange, MemoryRangeTable};
use vm_migration::{
    IncomingState, Migratable, MigratableError, Pausable, Snapshot, SnapshotData, Snapshottable,
    StreamedState, Transportable,
};

/// What a destination needs to know of a source VF before anything stops.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMigrationInfo {
    pub id: String,
    pub device_kind: String,
    pub identity: DeviceIdentity,
    pub migration_flags: u64,
    /// `MIG_DATA_SIZE` of the source, an estimate (0 if unknown).
    #[serde(alias = "expected_size")]
    pub estimated_size: u64,
    /// What sysfs says about the source device (PCI ids, mdev type), which
    /// the destination compares with its own ([`XeVfIncoming::check`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// One Xe VF passed through to a VM.
pub struct XeVfDevice {
    id: String,
    config: DeviceConfig,
    backend: Backend,
    device: Arc<dyn MigrationDevice>,
    opts: TransferOptions,
    dirty: DirtyTracker,
    dma_ranges: Vec<MemoryRange>,
    hwpt: Option<HwptDirtyTracker>,
    placement: Option<Placement>,
}

fn anyhow_engine(e: EngineError) -> anyhow::Error {
    anyhow!(e)
}

impl XeVfDevice {
    /// Opens the VF `config` names (`--device` syntax).
    pub fn new(id: &str, config: DeviceConfig) -> anyhow::Result<Self> {
        let backend = Backend::open(&config)?;
        Self::with_backend(id, config, backend)
    }

    /// Wraps an already opened backend.
    pub fn with_backend(id: &str, config: DeviceConfig, backend: Backend) -> anyhow::Result<Self> {
        let device = backend.device();
        if config.migration {
            let flags = device.migration_flags()?;
            if !flags.contains(MigrationFlags::STOP_COPY) {
                anyhow::bail!("device {id}: migration=on but the device reports flags {flags}");
            }
        }
        Ok(XeVfDevice {
            id: id.to_string(),
            config,
            backend,
            device,
            opts: TransferOptions::default(),
            dirty: DirtyTracker::default(),
            dma_ranges: Vec::new(),
            hwpt: None,
            placement: None,
        })
    }

    /// A VF a VMM has opened for its own use (Cloud Hypervisor's
    /// `VfioPciDevice`): `fd` is a duplicate of the VMM's device fd and
    /// `sysfs_dir` the device's sysfs directory, if the VMM knows it. An
    /// Xe VF bound to `xe-vfio-pci` gets its stream parsed and checked;
    /// any other VFIO device's stream is carried as it is.
    pub fn from_vmm_device_fd(
        id: &str,
        fd: OwnedFd,
        sysfs_dir: Option<&Path>,
        dirty_tracking: DirtyTracking,
    ) -> anyhow::Result<Self> {
        let placement = sysfs_dir.map(Placement::of_sysfs_dir).or_else(|| {
            Placement::sysfs_dir_of_cdev_fd(fd.as_raw_fd()).map(|d| Placement::of_sysfs_dir(&d))
        });
        let device = VfioMigrationDevice::from_vmm_device_fd(fd, sysfs_dir)?;
        let config = DeviceConfig {
            path: sysfs_dir.map(Path::to_path_buf),
            id: Some(id.to_string()),
            migration: true,
            dirty_tracking,
            ..DeviceConfig::default()
        };
        let mut dev = Self::with_backend(id, config, Backend::Vfio(Arc::new(device)))?;
        if !placement.as_ref().is_some_and(Placement::is_xe_vf) {
            dev.opts.device_kind = DEVICE_KIND_GENERIC.to_string();
        }
        info!(
            "device {id}: migrated as '{}' ({})",
            dev.opts.device_kind,
            placement
                .as_ref()
                .map_or("no sysfs entry".to_string(), Placement::to_string)
        );
        dev.placement = placement;
        Ok(dev)
    }

    /// Creates the device and loads it from CH's snapshot, as CH builds
    /// devices on restore; it is left in STOP until `resume()`.
    pub fn new_from_snapshot(
        id: &str,
        config: DeviceConfig,
        snapshot: &Snapshot,
        source_url: &str,
    ) -> anyhow::Result<(Self, RestoreReport)> {
        let mut dev = Self::new(id, config)?;
        let report = dev.restore_from_snapshot(snapshot, source_url)?;
        Ok((dev, report))
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn device(&self) -> &Arc<dyn MigrationDevice> {
        &self.device
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// Transfer tuning (buffer sizes, zero elision, device timeout).
    pub fn set_transfer_options(&mut self, opts: TransferOptions) {
        self.opts = opts;
    }

    /// The iommufd HWPT the VMM attached the VF to, for
    /// `dirty_tracking=iommufd` (and `auto` when the device cannot log).
    pub fn set_iommufd_hwpt(&mut self, hwpt: HwptDirtyTracker) {
        self.hwpt = Some(hwpt);
    }

    fn resolve_dirty_mode(&self) -> Result<DirtyMode, String> {
        dirty::resolve(
            self.config.dirty_tracking,
            &self.backend,
            self.hwpt.is_some(),
        )
    }

    /// Guest ranges the VF can DMA into (what the VMM DMA-mapped for it).
    pub fn set_dma_ranges(&mut self, ranges: Vec<MemoryRange>) {
        self.dma_ranges = ranges;
    }

    pub fn state(&self) -> Result<DeviceState, MigratableError> {
        self.device
            .state()
            .map_err(|e| MigratableError::Pause(anyhow!("device {}: {e}", self.id)))
    }

    fn require_migration(
        &self,
        phase: fn(anyhow::Error) -> MigratableError,
    ) -> Result<(), MigratableError> {
        if self.config.migration {
            Ok(())
        } else {
            Err(phase(anyhow!(
                "device {}: migration=off in its --device options",
                self.id
            )))
        }
    }

    /// Walks to `target`, returning to `recovery` if an arc fails.
    fn walk(
        &self,
        target: DeviceState,
        recovery: DeviceState,
        phase: fn(anyhow::Error) -> MigratableError,
    ) -> Result<(), MigratableError> {
        fsm::walk(&*self.device, target, recovery)
            .map(|_| ())
            .map_err(|e| phase(anyhow!("device {}: {e}", self.id)))
    }

    /// What the destination checks before the source stops.
    pub fn migration_info(&self) -> Result<DeviceMigrationInfo, MigratableError> {
        self.describe()
            .map_err(|e| MigratableError::StartMigration(anyhow_engine(e)))
    }

    fn describe(&self) -> Result<DeviceMigrationInfo, EngineError> {
        let header = engine::header_for(&*self.device, &self.opts)?;
        Ok(DeviceMigrationInfo {
            id: self.id.clone(),
            device_kind: header.device_kind,
            identity: header.identity,
            migration_flags: header.migration_flags,
            estimated_size: header.estimated_size,
            placement: self.placement.clone(),
        })
    }

    /// The destination's handle on this VF for a live migration: what
    /// checks the source's description and loads its state.
    pub fn incoming(&self) -> XeVfIncoming {
        XeVfIncoming {
            id: self.id.clone(),
            device: self.device.clone(),
            opts: self.opts.clone(),
            migration: self.config.migration,
            placement: self.placement.clone(),
        }
    }

    /// Source side: streams the stopped VF's state into `out`, reporting
    /// progress. (`StreamedState::send_state` is the same for CH's VMM,
    /// which wants only the byte count.)
    pub fn save_state_to<W: Write>(
        &self,
        out: W,
        progress: &mut dyn FnMut(u64),
    ) -> Result<SaveReport, MigratableError> {
        self.require_migration(MigratableError::MigrateSend)?;
        engine::save(&*self.device, out, &self.opts, progress)
            .map_err(|e| MigratableError::MigrateSend(anyhow!("device {}: {e}", self.id)))
    }

    /// Destination side: loads a streamed state from `input`, reporting
    /// progress; the VF is left in STOP.
    pub fn load_state_from<R: Read + Send>(
        &self,
        input: R,
        progress: &mut dyn FnMut(u64),
    ) -> Result<RestoreReport, MigratableError> {
        self.incoming().load(input, progress)
    }

    /// Loads the state a snapshot in `source_url` (`file:///dir`) holds.
    pub fn restore_from_snapshot(
        &mut self,
        snapshot: &Snapshot,
        source_url: &str,
    ) -> Result<RestoreReport, MigratableError> {
        let state: XeVfSnapshotState = snapshot.to_state()?;
        let restore_err = |e: String| MigratableError::Restore(anyhow!("device {}: {e}", self.id));
        if !state.format_supported() {
            return Err(restore_err(format!(
                "snapshot data format version {} is not supported (this build reads {FORMAT_VERSION})",
                state.format_version
            )));
        }
        engine::check_compatible(&state.identity, &self.device.identity())
            .map_err(|e| restore_err(e.to_string()))?;
        let dir = snapshot::snapshot_dir(source_url).map_err(|e| restore_err(e.to_string()))?;
        let file = snapshot::open_data_file(&dir, &state.data_file)
            .map_err(|e| restore_err(e.to_string()))?;
        let report = engine::restore(
            &*self.device,
            BufReader::with_capacity(1 << 20, file),
            &self.opts,
            &mut |_| {},
        )
        .map_err(|e| restore_err(e.to_string()))?;
        if report.header.identity != state.identity {
            warn!(
                "device {}: data file identity {} differs from state.json's {}",
                self.id, report.header.identity, state.identity
            );
        }
        info!(
            "device {}: restored {} bytes from {}",
            self.id, report.decoded.decoded_bytes, state.data_file
        );
        Ok(report)
    }
}

impl Pausable for XeVfDevice {
    /// RUNNING -> (RUNNING_P2P ->) STOP; the device keeps its state.
    fn pause(&mut self) -> Result<(), MigratableError> {
        if self.state()? == DeviceState::Stop {
            return Ok(());
        }
        self.walk(
            DeviceState::Stop,
            DeviceState::Running,
            MigratableError::Pause,
        )
    }

    /// Back to RUNNING from STOP (or RUNNING_P2P).
    fn resume(&mut self) -> Result<(), MigratableError> {
        self.walk(
            DeviceState::Running,
            DeviceState::Stop,
            MigratableError::Resume,
        )
    }

    /// RUNNING -> RUNNING_P2P: the first half of a multi-device pause, so
    /// no VF DMAs into a peer that has already stopped.
    fn quiesce(&mut self) -> Result<(), MigratableError> {
        let flags = self
            .device
            .migration_flags()
            .map_err(|e| MigratableError::Pause(anyhow!("device {}: {e}", self.id)))?;
        if flags.contains(MigrationFlags::P2P) && self.state()? == DeviceState::Running {
            self.walk(
                DeviceState::RunningP2p,
                DeviceState::Running,
                MigratableError::Pause,
            )?;
        }
        Ok(())
    }

    /// STOP -> RUNNING_P2P: the first half of a multi-device resume.
    fn unquiesce(&mut self) -> Result<(), MigratableError> {
        let flags = self
            .device
            .migration_flags()
            .map_err(|e| MigratableError::Resume(anyhow!("device {}: {e}", self.id)))?;
        if flags.contains(MigrationFlags::P2P) && self.state()? == DeviceState::Stop {
            self.walk(
                DeviceState::RunningP2p,
                DeviceState::Stop,
                MigratableError::Resume,
            )?;
        }
        Ok(())
    }
}

impl Snapshottable for XeVfDevice {
    fn id(&self) -> String {
        self.id.clone()
    }

    /// The small JSON section; the data itself is streamed by `send()`.
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        self.require_migration(MigratableError::Snapshot)?;
        let info = self
            .describe()
            .map_err(|e| MigratableError::Snapshot(anyhow_engine(e)))?;
        Snapshot::new_from_state(&XeVfSnapshotState {
            format_version: FORMAT_VERSION,
            device_kind: info.device_kind,
            identity: info.identity,
            migration_flags: info.migration_flags,
            estimated_size: info.estimated_size,
            data_file: snapshot::data_file_name(&self.id),
        })
    }
}

impl Transportable for XeVfDevice {
    /// Streams the device data into the snapshot directory, beside CH's
    /// `state.json`: temporary name, fsync, rename.
    fn send(&self, snapshot: &Snapshot, destination_url: &str) -> Result<(), MigratableError> {
        let send_err = |e: String| MigratableError::MigrateSend(anyhow!("device {}: {e}", self.id));
        let state: XeVfSnapshotState = snapshot
            .to_state()
            .map_err(|e| send_err(format!("snapshot section: {}", Chain(&e))))?;
        let dir = snapshot::snapshot_dir(destination_url).map_err(|e| send_err(e.to_string()))?;
        let mut pending =
            PendingDataFile::create(&dir, &state.data_file).map_err(|e| send_err(e.to_string()))?;
        let saved = {
            let mut out = BufWriter::with_capacity(1 << 20, pending.file());
            let report = self.save_state_to(&mut out, &mut |_| {});
            report.and_then(|r| {
                out.flush()
                    .map(|()| r)
                    .map_err(|e| send_err(format!("writing {}: {e}", state.data_file)))
            })
        };
        match saved {
            Ok(report) => {
                let path = pending.commit().map_err(|e| send_err(e.to_string()))?;
                info!(
                    "device {}: {} device bytes saved to {} ({} bytes on disk)",
                    self.id,
                    report.raw_bytes,
                    path.display(),
                    report.encoded_bytes
                );
                Ok(())
            }
            Err(e) => {
                pending.discard();
                Err(e)
            }
        }
    }
}

impl Migratable for XeVfDevice {
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        self.require_migration(MigratableError::StartDirtyLog)?;
        let start_err =
            |e: String| MigratableError::StartDirtyLog(anyhow!("device {}: {e}", self.id));
        let mode = self.resolve_dirty_mode().map_err(start_err)?;
        match (mode, &self.backend, &self.hwpt) {
            (DirtyMode::Device { page_size }, Backend::Vfio(vfio), _) => {
                let ranges: Vec<(u64, u64)> =
                    self.dma_ranges.iter().map(|r| (r.gpa, r.length)).collect();
                vfio.dma_logging_start(page_size, &ranges)
                    .map_err(|e| start_err(e.to_string()))?;
            }
            (DirtyMode::Iommufd { page_size }, _, Some(hwpt)) => {
                hwpt.set_tracking(true)
                    .map_err(|e| start_err(format!("IOMMU_HWPT_SET_DIRTY_TRACKING: {e}")))?;
                // Reading clears what was recorded before the start.
                for r in &self.dma_ranges {
                    hwpt.read_bitmap(r.gpa, r.length, page_size)
                        .map_err(|e| start_err(format!("IOMMU_HWPT_GET_DIRTY_BITMAP: {e}")))?;
                }
            }
            _ => {}
        }
        info!("device {}: dirty tracking {mode:?}", self.id);
        self.dirty.start(mode);
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        let stop_err =
            |e: String| MigratableError::StopDirtyLog(anyhow!("device {}: {e}", self.id));
        match (self.dirty.mode(), &self.backend, &self.hwpt) {
            (Some(DirtyMode::Device { .. }), Backend::Vfio(vfio), _) => {
                vfio.dma_logging_stop()
                    .map_err(|e| stop_err(e.to_string()))?;
            }
            (Some(DirtyMode::Iommufd { .. }), _, Some(hwpt)) => {
                hwpt.set_tracking(false)
                    .map_err(|e| stop_err(e.to_string()))?;
            }
            _ => {}
        }
        self.dirty.stop();
        Ok(())
    }

    fn dirty_log(&mut self) -> Result<MemoryRangeTable, MigratableError> {
        let log_err = |e: String| MigratableError::DirtyLog(anyhow!("device {}: {e}", self.id));
        let mode = match self.dirty.mode() {
            None => return Ok(MemoryRangeTable::default()),
            Some(mode) => mode,
        };
        if mode == DirtyMode::All {
            let stopped = !self
                .device
                .state()
                .map_err(|e| log_err(e.to_string()))?
                .is_running();
            return Ok(self.dirty.all_mode_log(stopped, &self.dma_ranges));
        }
        let mut tables = Vec::new();
        for r in &self.dma_ranges {
            let (bitmap, page_size) = match (mode, &self.backend, &self.hwpt) {
                (DirtyMode::Device { page_size }, Backend::Vfio(vfio), _) => (
                    vfio.dma_logging_report(r.gpa, r.length, page_size)
                        .map_err(|e| log_err(e.to_string()))?,
                    page_size,
                ),
                (DirtyMode::Iommufd { page_size }, _, Some(hwpt)) => (
                    hwpt.read_bitmap(r.gpa, r.length, page_size)
                        .map_err(|e| log_err(e.to_string()))?,
                    page_size,
                ),
                _ => return Err(log_err(format!("dirty mode {mode:?} has no source"))),
            };
            tables.push(MemoryRangeTable::from_dirty_bitmap(
                bitmap, r.gpa, page_size,
            ));
        }
        Ok(MemoryRangeTable::new_from_tables(tables))
    }

    /// Everything that can be checked before memory moves: migration is
    /// enabled and a dirty-tracking mode works.
    fn start_migration(&mut self) -> Result<(), MigratableError> {
        self.require_migration(MigratableError::StartMigration)?;
        self.resolve_dirty_mode()
            .map(|_| ())
            .map_err(|e| MigratableError::StartMigration(anyhow!("device {}: {e}", self.id)))
    }

    /// The destination holds the state: the source VF stays stopped.
    fn complete_migration(&mut self) -> Result<(), MigratableError> {
        let state = self.state()?;
        if state.is_running() {
            return Err(MigratableError::CompleteMigration(anyhow!(
                "device {}: still {state} at completion; it must be stopped",
                self.id
            )));
        }
        info!("device {}: migration complete, VF left in {state}", self.id);
        Ok(())
    }
}

impl StreamedState for XeVfDevice {
    fn describe(&self) -> Result<SnapshotData, MigratableError> {
        SnapshotData::new_from_state(&self.migration_info()?)
    }

    fn send_state(&mut self, out: &mut (dyn Write + Send)) -> Result<u64, MigratableError> {
        self.save_state_to(out, &mut |_| {})
            .map(|r| r.encoded_bytes)
    }

    fn restore_state(
        &mut self,
        snapshot: &Snapshot,
        source_url: &str,
    ) -> Result<(), MigratableError> {
        self.restore_from_snapshot(snapshot, source_url).map(|_| ())
    }
}

/// The destination's handle on a VF in a live migration
/// ([`IncomingState`]): opened when the migration's `Config` arrives,
/// before the VMM creates the VF's device, so the source's description is
/// checked before the source pauses and its state loads as soon as it
/// comes (also on a connection of its own, concurrently with others).
pub struct XeVfIncoming {
    id: String,
    device: Arc<dyn MigrationDevice>,
    opts: TransferOptions,
    migration: bool,
    /// What sysfs says about this VF, when it has a sysfs entry.
    placement: Option<Placement>,
}

impl XeVfIncoming {
    /// The handle of a VMM receiving a migrated VF as a VFIO cdev fd and an
    /// iommufd fd (Cloud Hypervisor's `receive-migration vfio_fds=...,
    /// iommufd_fd=...`), before it creates the device: binds `device` (the
    /// VMM's fd or a duplicate of it) to `iommufd`, which the VMM's own
    /// later use of the fd then finds done.
    pub fn from_vmm_cdev(
        id: &str,
        device: OwnedFd,
        iommufd: BorrowedFd<'_>,
        dirty_tracking: DirtyTracking,
    ) -> anyhow::Result<Self> {
        cdev::bind_to_iommufd(device.as_fd(), iommufd)
            .map_err(|e| anyhow!("device {id}: binding its cdev to the iommufd: {e}"))?;
        Ok(XeVfDevice::from_vmm_device_fd(id, device, None, dirty_tracking)?.incoming())
    }

    fn refuse(&self, e: impl std::fmt::Display) -> MigratableError {
        MigratableError::MigrateReceive(anyhow!("device {}: {e}", self.id))
    }

    /// Whether the state of the source VF `source` describes can load
    /// into this one: migration on, same kind of state, compatible
    /// identity (the engine reads the full one from the device), and the
    /// same placement where sysfs tells (PCI ids, mdev type).
    pub fn check(&self, source: &DeviceMigrationInfo) -> Result<(), MigratableError> {
        if !self.migration {
            return Err(self.refuse("migration=off in its --device options"));
        }
        if source.device_kind != self.opts.device_kind {
            return Err(self.refuse(format!(
                "source sends '{}' state, this VF takes '{}'",
                source.device_kind, self.opts.device_kind
            )));
        }
        engine::check_compatible(&source.identity, &self.device.identity())
            .map_err(|e| self.refuse(e))?;
        if let (Some(src), Some(local)) = (&source.placement, &self.placement) {
            local.check_source(src).map_err(|e| self.refuse(e))?;
        }
        Ok(())
    }

    /// Loads a streamed state from `input`, reporting progress; the VF is
    /// left in STOP, and a failed load leaves no partial state.
    pub fn load<R: Read + Send>(
        &self,
        input: R,
        progress: &mut dyn FnMut(u64),
    ) -> Result<RestoreReport, MigratableError> {
        if !self.migration {
            return Err(self.refuse("migration=off in its --device options"));
        }
        engine::restore(&*self.device, input, &self.opts, progress).map_err(|e| self.refuse(e))
    }
}

impl IncomingState for XeVfIncoming {
    fn check_description(&self, description: &SnapshotData) -> Result<(), MigratableError> {
        let source: DeviceMigrationInfo = description
            .to_state()
            .map_err(|e| self.refuse(format!("source description: {}", Chain(&e))))?;
        if source.id != self.id {
            return Err(self.refuse(format!("the source describes device {}", source.id)));
        }
        self.check(&source)
    }

    fn receive_state(&mut self, input: &mut (dyn Read + Send)) -> Result<u64, MigratableError> {
        self.load(input, &mut |_| {})
            .map(|r| r.decoded.encoded_bytes)
    }
}

/// The device-kind string this glue migrates.
pub const DEVICE_KIND: &str = DEVICE_KIND_XE_VF;
