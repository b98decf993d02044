// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The component contracts of Cloud Hypervisor's `vm-migration` crate.
//!
//! CH keeps that crate in its own tree (`vm-migration/src/lib.rs`, with the
//! range types in `vm-migration/src/protocol.rs`); it is not published. We
//! restate its interfaces here with the same names, signatures, defaults
//! and error variants, so that our device implements exactly what CH's
//! device manager calls, and moving it into CH is a change of `use` paths:
//!
//! * [`Pausable`] -> [`Snapshottable`] -> [`Transportable`] ->
//!   [`Migratable`], every method with a do-nothing default;
//! * [`Snapshot`]: a tree of per-component snapshots keyed by id, each
//!   node optionally carrying [`SnapshotData`] (the component's state as
//!   a JSON string);
//! * [`MigratableError`], one variant per phase, wrapping `anyhow::Error`
//!   (and `io::Error` for socket failures).
//!
//! The state a device puts into [`SnapshotData`] must stay small: bulk
//! device data (an Xe VF's VRAM) travels as a separate stream, never
//! inside the JSON.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use anyhow::anyhow;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::protocol::{MemoryRange, MemoryRangeTable};

pub mod protocol;

/// Failure of one migration phase of one component.
#[derive(Debug, Error)]
pub enum MigratableError {
    #[error("failed to pause migratable component: {0}")]
    Pause(#[source] anyhow::Error),
    #[error("failed to resume migratable component: {0}")]
    Resume(#[source] anyhow::Error),
    #[error("failed to snapshot migratable component: {0}")]
    Snapshot(#[source] anyhow::Error),
    #[error("failed to restore migratable component: {0}")]
    Restore(#[source] anyhow::Error),
    #[error("failed to send migratable component snapshot: {0}")]
    MigrateSend(#[source] anyhow::Error),
    #[error("failed to receive migratable component snapshot: {0}")]
    MigrateReceive(#[source] anyhow::Error),
    #[error("migration socket error: {0}")]
    MigrateSocket(#[source] std::io::Error),
    #[error("failed to start dirty logging for migratable component: {0}")]
    StartDirtyLog(#[source] anyhow::Error),
    #[error("failed to stop dirty logging for migratable component: {0}")]
    StopDirtyLog(#[source] anyhow::Error),
    #[error("failed to retrieve dirty ranges for migratable component: {0}")]
    DirtyLog(#[source] anyhow::Error),
    #[error("failed to start migration for migratable component: {0}")]
    StartMigration(#[source] anyhow::Error),
    #[error("failed to complete migration for migratable component: {0}")]
    CompleteMigration(#[source] anyhow::Error),
}

/// A component that can be stopped and restarted around a snapshot.
pub trait Pausable {
    fn pause(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    /// First half of pausing several components: stop initiating
    /// peer-to-peer DMA while still serving it (VFIO's RUNNING_P2P). The
    /// VMM quiesces every component before it pauses any, so no device
    /// DMAs into a peer that has already stopped.
    fn quiesce(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    /// First half of resuming several components, the reverse of
    /// `quiesce()`: called on every component before any `resume()`.
    fn unquiesce(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

/// A component's own state, kept as JSON text.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotData {
    state: String,
}

impl SnapshotData {
    /// Serializes `state` to JSON.
    pub fn new_from_state<T: Serialize>(state: &T) -> Result<Self, MigratableError> {
        let state = serde_json::to_string(state)
            .map_err(|e| MigratableError::Snapshot(anyhow!("cannot serialize state: {e}")))?;
        Ok(SnapshotData { state })
    }

    /// Deserializes the JSON back into `T`.
    pub fn to_state<'a, T: Deserialize<'a>>(&'a self) -> Result<T, MigratableError> {
        serde_json::from_str(&self.state)
            .map_err(|e| MigratableError::Restore(anyhow!("cannot deserialize state: {e}")))
    }
}

/// One node of the snapshot tree: children by id, and this component's
/// data if it has any (inner nodes usually have none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub snapshots: BTreeMap<String, Snapshot>,
    pub snapshot_data: Option<SnapshotData>,
}

impl Snapshot {
    /// A leaf holding `data`.
    pub fn from_data(data: SnapshotData) -> Self {
        Snapshot {
            snapshots: BTreeMap::new(),
            snapshot_data: Some(data),
        }
    }

    /// A leaf holding `state` as JSON.
    pub fn new_from_state<T: Serialize>(state: &T) -> Result<Self, MigratableError> {
        Ok(Snapshot::from_data(SnapshotData::new_from_state(state)?))
    }

    /// Adds (or replaces) the child `id`.
    pub fn add_snapshot(&mut self, id: String, snapshot: Snapshot) {
        self.snapshots.insert(id, snapshot);
    }

    /// This node's state; an error if the node carries none.
    pub fn to_state<'a, T: Deserialize<'a>>(&'a self) -> Result<T, MigratableError> {
        self.snapshot_data
            .as_ref()
            .ok_or_else(|| MigratableError::Restore(anyhow!("snapshot carries no data")))?
            .to_state()
    }
}

/// The child `id` of `snapshot`, if both exist (restore paths pass the
/// parent as an `Option`, hence the shape).
pub fn snapshot_from_id(snapshot: Option<&Snapshot>, id: &str) -> Option<Snapshot> {
    snapshot.and_then(|s| s.snapshots.get(id)).cloned()
}

/// The state of the child `id` of `snapshot`; `Ok(None)` if there is no
/// parent or no such child, an error if the child's state does not parse.
pub fn state_from_id<'a, T: Deserialize<'a>>(
    snapshot: Option<&'a Snapshot>,
    id: &str,
) -> Result<Option<T>, MigratableError> {
    snapshot
        .and_then(|s| s.snapshots.get(id))
        .map(Snapshot::to_state)
        .transpose()
}

/// A component whose state can be captured.
pub trait Snapshottable: Pausable {
    /// The component's id, its key in the parent's snapshot tree.
    fn id(&self) -> String {
        String::new()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
}

/// A component with its own transport for its snapshot.
pub trait Transportable: Pausable + Snapshottable {
    /// Sends `snapshot` to `destination_url` (a file, socket, or endpoint).
    fn send(&self, _snapshot: &Snapshot, _destination_url: &str) -> Result<(), MigratableError> {
        Ok(())
    }

    /// Fetches a snapshot from `source_url`.
    fn recv(&self, _source_url: &str) -> Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
}

/// A component that takes part in live migration: it is paused and
/// snapshotted, and may track the guest memory it dirties meanwhile.
pub trait Migratable: Send + Pausable + Snapshottable + Transportable {
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    /// Guest memory dirtied since the last call (or since start).
    fn dirty_log(&mut self) -> Result<MemoryRangeTable, MigratableError> {
        Ok(MemoryRangeTable::default())
    }

    fn start_migration(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    fn complete_migration(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

/// A component whose state is too large for the JSON snapshot, such as a
/// VFIO device whose migration data includes its device memory.
///
/// Its `snapshot()` only describes the state; the VMM streams the state
/// itself: into a file of its own beside `state.json` through
/// `Transportable::send()`, and as a `DeviceState` phase after `State` in
/// a live migration. Memory use is then bounded by buffers, not by the
/// size of the state.
pub trait StreamedState: Migratable {
    /// Writes the paused component's state to `out`; returns the bytes
    /// written.
    fn send_state(&mut self, out: &mut (dyn Write + Send)) -> Result<u64, MigratableError>;

    /// Loads a state written by `send_state()` from `input`, which must
    /// not be read past the end of that state; returns the bytes read. The
    /// component stays paused. A failed load leaves no partial state.
    fn receive_state(&mut self, input: &mut (dyn Read + Send)) -> Result<u64, MigratableError>;

    /// Loads the state that the snapshot at `source_url` holds for this
    /// component, which `snapshot` describes.
    fn restore_state(
        &mut self,
        snapshot: &Snapshot,
        source_url: &str,
    ) -> Result<(), MigratableError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct DevState {
        bar: u64,
        name: String,
    }

    fn dev_state() -> DevState {
        DevState {
            bar: 0xfe00_0000,
            name: "xe-vf0".into(),
        }
    }

    #[test]
    fn snapshot_state_round_trips_through_json() {
        let snap = Snapshot::new_from_state(&dev_state()).unwrap();
        let json = serde_json::to_string(&snap).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        assert_eq!(back.to_state::<DevState>().unwrap(), dev_state());
    }

    #[test]
    fn snapshot_json_has_upstream_field_names() {
        let mut root = Snapshot::default();
        root.add_snapshot("dev".into(), Snapshot::new_from_state(&7u32).unwrap());
        let v: serde_json::Value = serde_json::to_value(&root).unwrap();
        assert!(v["snapshot_data"].is_null());
        assert_eq!(v["snapshots"]["dev"]["snapshot_data"]["state"], "7");
    }

    #[test]
    fn to_state_without_data_is_a_restore_error() {
        let err = Snapshot::default().to_state::<u32>().unwrap_err();
        assert!(matches!(err, MigratableError::Restore(_)), "{err}");
    }

    #[test]
    fn to_state_of_wrong_type_is_a_restore_error() {
        let snap = Snapshot::new_from_state(&"text").unwrap();
        assert!(matches!(
            snap.to_state::<u64>(),
            Err(MigratableError::Restore(_))
        ));
    }

    #[test]
    fn children_are_found_by_id() {
        let mut root = Snapshot::default();
        root.add_snapshot("a".into(), Snapshot::new_from_state(&1u8).unwrap());
        root.add_snapshot("b".into(), Snapshot::new_from_state(&2u8).unwrap());
        assert_eq!(
            snapshot_from_id(Some(&root), "b")
                .unwrap()
                .to_state::<u8>()
                .unwrap(),
            2
        );
        assert!(snapshot_from_id(Some(&root), "c").is_none());
        assert!(snapshot_from_id(None, "a").is_none());
        assert_eq!(state_from_id::<u8>(Some(&root), "a").unwrap(), Some(1));
        assert_eq!(state_from_id::<u8>(Some(&root), "zz").unwrap(), None);
        assert_eq!(state_from_id::<u8>(None, "a").unwrap(), None);
        root.add_snapshot("bad".into(), Snapshot::new_from_state(&"x").unwrap());
        assert!(state_from_id::<u8>(Some(&root), "bad").is_err());
    }

    #[test]
    fn add_snapshot_replaces_same_id() {
        let mut root = Snapshot::default();
        root.add_snapshot("a".into(), Snapshot::new_from_state(&1u8).unwrap());
        root.add_snapshot("a".into(), Snapshot::new_from_state(&9u8).unwrap());
        assert_eq!(root.snapshots.len(), 1);
        assert_eq!(state_from_id::<u8>(Some(&root), "a").unwrap(), Some(9));
    }

    /// A component relying on every default.
    struct Defaults;
    impl Pausable for Defaults {}
    impl Snapshottable for Defaults {}
    impl Transportable for Defaults {}
    impl Migratable for Defaults {}

    #[test]
    fn trait_defaults_succeed_and_are_empty() {
        let mut d = Defaults;
        d.pause().unwrap();
        d.resume().unwrap();
        assert_eq!(d.id(), "");
        assert_eq!(d.snapshot().unwrap(), Snapshot::default());
        d.send(&Snapshot::default(), "file:///nowhere").unwrap();
        assert_eq!(d.recv("file:///nowhere").unwrap(), Snapshot::default());
        d.start_dirty_log().unwrap();
        assert!(d.dirty_log().unwrap().is_empty());
        d.stop_dirty_log().unwrap();
        d.start_migration().unwrap();
        d.complete_migration().unwrap();
    }

    /// Usable as a trait object, as CH's device manager holds them.
    #[test]
    fn migratable_is_object_safe() {
        let mut boxed: Box<dyn Migratable> = Box::new(Defaults);
        boxed.pause().unwrap();
        assert!(boxed.dirty_log().unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_phase_and_keep_the_source() {
        let e = MigratableError::StartDirtyLog(anyhow!("no DMA logging"));
        let text = e.to_string();
        assert!(text.contains("dirty logging") && text.contains("no DMA logging"));
        assert!(std::error::Error::source(&e).is_some());
    }
}
