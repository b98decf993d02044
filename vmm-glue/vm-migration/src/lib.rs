// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The component contracts of Cloud Hypervisor's `vm-migration` crate, as
//! our patch series leaves them.
//!
//! CH keeps that crate in its own tree and does not publish it. This crate
//! restates its public interface in our own code, for two users only: the
//! standalone build of `xe-vf-glue` and the test host. In the patched
//! Cloud Hypervisor build, CH's workspace replaces this crate by the real
//! one, so every item here has the real item's name, signature, fields,
//! variants, derives and trait defaults, and code that compiles against
//! this crate compiles there too. `tests/drift/` compares the two crates'
//! sources item by item and fails when they differ.
//!
//! What differs, on purpose:
//!
//! * items that need heavy dependencies (TLS, userfaultfd and vm-memory,
//!   the VMM's migration statistics) are left out; the drift test lists
//!   them with the reason;
//! * where CH asserts on what a peer sent (a memory range table of a bad
//!   length, a request that is not what the caller expected), this crate
//!   returns an error or bounds the work instead, with the same signature:
//!   the test host reads hostile input and must never panic or allocate
//!   what a peer asks for;
//! * wire values are encoded by hand rather than through `zerocopy`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use anyhow::anyhow;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::protocol::MemoryRangeTable;

pub mod protocol;

/// Failure of one migration phase of one component.
///
/// The text of each variant is one short sentence without its cause;
/// print the chain (`source()`) to see why.
#[derive(Debug, Error)]
pub enum MigratableError {
    #[error("Failed to pause migratable component")]
    Pause(#[source] anyhow::Error),

    #[error("Failed to resume migratable component")]
    Resume(#[source] anyhow::Error),

    #[error("Failed to snapshot migratable component")]
    Snapshot(#[source] anyhow::Error),

    #[error("Failed to restore migratable component")]
    Restore(#[source] anyhow::Error),

    #[error("Failed to send migratable component snapshot")]
    MigrateSend(#[source] anyhow::Error),

    #[error("Failed to receive migratable component snapshot")]
    MigrateReceive(#[source] anyhow::Error),

    #[error("Socket error")]
    MigrateSocket(#[source] io::Error),

    #[error("Failed to start migration for migratable component")]
    StartDirtyLog(#[source] anyhow::Error),

    #[error("Failed to stop migration for migratable component")]
    StopDirtyLog(#[source] anyhow::Error),

    #[error("Failed to retrieve dirty ranges for migratable component")]
    DirtyLog(#[source] anyhow::Error),

    #[error("Failed to start migration for migratable component")]
    StartMigration(#[source] anyhow::Error),

    #[error("Failed to complete migration for migratable component")]
    CompleteMigration(#[source] anyhow::Error),

    #[error("Failed to release a disk lock")]
    UnlockError(#[source] anyhow::Error),

    #[error("Lifecycle operation skipped for disconnected component {0}")]
    DeviceDisconnected(String),

    /// The source sent `Switchover` and got no answer: the destination may
    /// be running the VM, so the source must not resume it. Only an
    /// operator can tell which host runs it.
    #[error("The destination did not confirm that it runs the VM")]
    SwitchoverUnconfirmed(#[source] anyhow::Error),
}

/// A component that can be stopped and started again around a snapshot.
pub trait Pausable {
    fn pause(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    /// The first half of pausing several components: stop starting
    /// peer-to-peer DMA while still answering it (VFIO's RUNNING_P2P).
    /// The VMM quiesces all components before it pauses the first one, so
    /// no device writes into a peer that has stopped.
    fn quiesce(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    /// The first half of resuming several components, undoing
    /// `quiesce()`: the VMM calls it on all of them before any `resume()`.
    fn unquiesce(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
}

/// A component's own state, held as JSON text.
#[derive(Clone, Default, Deserialize, Serialize)]
pub struct SnapshotData {
    state: String,
}

impl SnapshotData {
    /// Parses the JSON back into `T`.
    pub fn to_state<'a, T: Deserialize<'a>>(&'a self) -> Result<T, MigratableError> {
        serde_json::from_str(&self.state)
            .map_err(|e| MigratableError::Restore(anyhow!("state does not parse: {e}")))
    }

    /// Serializes `state` as JSON.
    pub fn new_from_state<T: Serialize>(state: &T) -> Result<Self, MigratableError> {
        match serde_json::to_string(state) {
            Ok(state) => Ok(SnapshotData { state }),
            Err(e) => Err(MigratableError::Snapshot(anyhow!(
                "state does not serialize: {e}"
            ))),
        }
    }
}

/// One node of a snapshot tree: its children by id, and this component's
/// data if it has any (inner nodes usually have none, leaves no children).
#[derive(Clone, Default, Deserialize, Serialize)]
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
        SnapshotData::new_from_state(state).map(Snapshot::from_data)
    }

    /// Adds the child `id`, replacing one of the same id.
    pub fn add_snapshot(&mut self, id: String, snapshot: Snapshot) {
        self.snapshots.insert(id, snapshot);
    }

    /// This node's state; an error if the node carries no data.
    pub fn to_state<'a, T: Deserialize<'a>>(&'a self) -> Result<T, MigratableError> {
        match &self.snapshot_data {
            Some(data) => data.to_state(),
            None => Err(MigratableError::Restore(anyhow!(
                "the snapshot node carries no data"
            ))),
        }
    }
}

/// The child `id` of `snapshot`, if there is a parent with such a child.
pub fn snapshot_from_id<'a>(snapshot: Option<&'a Snapshot>, id: &str) -> Option<&'a Snapshot> {
    snapshot?.snapshots.get(id)
}

/// The state of the child `id` of `s`: `Ok(None)` without a parent or
/// without such a child, an error if the child's state does not parse.
pub fn state_from_id<'a, T: Deserialize<'a>>(
    s: Option<&'a Snapshot>,
    id: &str,
) -> Result<Option<T>, MigratableError> {
    match snapshot_from_id(s, id) {
        Some(child) => child.to_state().map(Some),
        None => Ok(None),
    }
}

/// A component whose state can be captured.
pub trait Snapshottable: Pausable {
    /// The component's id: its key in its parent's snapshot tree.
    fn id(&self) -> String {
        String::new()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
}

/// A component that moves its snapshot itself (to a file, a socket, an
/// HTTP endpoint) instead of leaving that to the VMM.
pub trait Transportable: Pausable + Snapshottable {
    fn send(&self, _snapshot: &Snapshot, _destination_url: &str) -> Result<(), MigratableError> {
        Ok(())
    }

    fn recv(&self, _source_url: &str) -> Result<Snapshot, MigratableError> {
        Ok(Snapshot::default())
    }
}

/// A component that takes part in live migration: it is paused and
/// snapshotted, and may report the guest memory it wrote meanwhile.
pub trait Migratable: Send + Pausable + Snapshottable + Transportable {
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }

    /// Guest memory written since the previous call (or since the start).
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

/// A component whose state is too large to sit inside the JSON snapshot,
/// such as a VFIO device whose migration data holds its device memory.
///
/// Its `snapshot()` only describes the state; the VMM moves the state
/// itself as a stream: into a file of its own beside `state.json`
/// (`Transportable::send()`), and as a `DeviceState` phase of a live
/// migration, into the destination's [`IncomingState`]. Memory use is
/// bounded by buffers, not by the state's size.
pub trait StreamedState: Migratable {
    /// What a destination checks before the source pauses
    /// ([`IncomingState::check_description`]).
    fn describe(&self) -> Result<SnapshotData, MigratableError>;

    /// Writes the paused component's state to `out`; returns the number
    /// of bytes written.
    fn send_state(&mut self, out: &mut (dyn Write + Send)) -> Result<u64, MigratableError>;

    /// Loads this component's state from the snapshot at `source_url`;
    /// `snapshot` is the component's node of that snapshot.
    fn restore_state(
        &mut self,
        snapshot: &Snapshot,
        source_url: &str,
    ) -> Result<(), MigratableError>;
}

/// The destination's handle on a component whose state streams in.
///
/// The VMM creates a migrated VM's components only when `State` arrives,
/// but streamed state must be checked before the source pauses, and may
/// arrive before `State`. So the destination opens such a component's
/// backing (a VFIO device, say) when `Config` arrives, as this handle;
/// the component created later finds its state loaded.
pub trait IncomingState: Send {
    /// Whether the state a source component describes
    /// ([`StreamedState::describe`]) can load here.
    fn check_description(&self, description: &SnapshotData) -> Result<(), MigratableError>;

    /// Loads a state that `send_state()` wrote from `input`, reading no
    /// byte past its end; returns the number of bytes read. The component
    /// stays stopped, and a load that fails leaves no partial state.
    fn receive_state(&mut self, input: &mut (dyn Read + Send)) -> Result<u64, MigratableError>;
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

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

    fn json(s: &Snapshot) -> serde_json::Value {
        serde_json::to_value(s).unwrap()
    }

    #[test]
    fn snapshot_state_round_trips_through_json() {
        let snap = Snapshot::new_from_state(&dev_state()).unwrap();
        let text = serde_json::to_string(&snap).unwrap();
        let back: Snapshot = serde_json::from_str(&text).unwrap();
        assert_eq!(json(&back), json(&snap));
        assert_eq!(back.to_state::<DevState>().unwrap(), dev_state());
    }

    #[test]
    fn snapshot_json_has_upstream_field_names() {
        let mut root = Snapshot::default();
        root.add_snapshot("dev".into(), Snapshot::new_from_state(&7u32).unwrap());
        let v = json(&root);
        assert!(v["snapshot_data"].is_null());
        assert_eq!(v["snapshots"]["dev"]["snapshot_data"]["state"], "7");
    }

    #[test]
    fn to_state_without_data_is_a_restore_error() {
        let err = Snapshot::default().to_state::<u32>().unwrap_err();
        assert!(matches!(err, MigratableError::Restore(_)), "{err:?}");
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
        let b = snapshot_from_id(Some(&root), "b").unwrap();
        assert_eq!(b.to_state::<u8>().unwrap(), 2);
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
        d.quiesce().unwrap();
        d.unquiesce().unwrap();
        d.resume().unwrap();
        assert_eq!(d.id(), "");
        assert_eq!(json(&d.snapshot().unwrap()), json(&Snapshot::default()));
        d.send(&Snapshot::default(), "file:///nowhere").unwrap();
        let received = d.recv("file:///nowhere").unwrap();
        assert_eq!(json(&received), json(&Snapshot::default()));
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
    fn errors_name_the_phase_and_keep_the_cause_in_the_chain() {
        let e = MigratableError::StartDirtyLog(anyhow!("no DMA logging"));
        // The text is the phase only, as upstream's; the cause is the source.
        assert_eq!(
            e.to_string(),
            "Failed to start migration for migratable component"
        );
        assert_eq!(e.source().unwrap().to_string(), "no DMA logging");
        let io = MigratableError::MigrateSocket(io::ErrorKind::UnexpectedEof.into());
        assert_eq!(
            io.source()
                .unwrap()
                .downcast_ref::<io::Error>()
                .unwrap()
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
        let gone = MigratableError::DeviceDisconnected("net0".into());
        assert!(gone.to_string().ends_with("net0"));
        assert!(gone.source().is_none());
    }
}
