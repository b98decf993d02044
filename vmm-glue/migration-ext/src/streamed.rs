// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Streamed component state in a live migration
//! (`ProtocolFeatures::DEVICE_STATE`).
//!
//! The source describes each [`StreamedState`] component in `Config`
//! ([`describe`]); the destination, which opened a handle on each of its
//! own ([`IncomingState`]), checks every description against it before
//! the source pauses ([`IncomingDevices::check`]). After `State` each
//! component's state follows as a `DeviceState` request ([`send_one`]),
//! or over a connection of its own ([`crate::lanes`]); the destination
//! loads it into the handle ([`IncomingDevices::receive`]) and refuses to
//! complete while a component has no state
//! ([`IncomingDevices::check_all_received`]).
//!
//! Components are numbered on the wire by their position in id order
//! ([`wire_order`]), on both sides.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use anyhow::anyhow;
use log::info;
use serde::{Deserialize, Serialize};
use vm_migration::protocol::{ProtocolFeatures, Request};
use vm_migration::{IncomingState, MigratableError, SnapshotData, StreamedState};

use crate::connection::{expect_ok, with_refusal, Connection};

/// A streamed component as its source describes it in `Config`.
#[derive(Clone, Serialize, Deserialize)]
pub struct StreamedDescription {
    pub id: String,
    pub description: SnapshotData,
}

/// One of the source's streamed components.
pub struct Component<'a> {
    pub id: String,
    pub state: &'a mut (dyn StreamedState + 'a),
}

/// Sorts by id: a component's index on the wire is its position then.
pub fn wire_order<T, F: Fn(&T) -> &str>(items: &mut [T], id: F) {
    items.sort_by(|a, b| id(a).cmp(id(b)));
}

/// Index of the `position`th component on the wire.
pub(crate) fn wire_index(position: usize) -> Result<u16, MigratableError> {
    u16::try_from(position)
        .map_err(|_| MigratableError::MigrateSend(anyhow!("too many streamed components")))
}

/// Source: what the destination checks in `Config`, in wire order.
pub fn describe(components: &[Component]) -> Result<Vec<StreamedDescription>, MigratableError> {
    components
        .iter()
        .map(|c| {
            Ok(StreamedDescription {
                id: c.id.clone(),
                description: c.state.describe()?,
            })
        })
        .collect()
}

/// Source: refuses a destination that did not agree to streamed state
/// while there are components that need it (an older destination would
/// run them without their state); nothing has stopped yet.
pub fn require_device_state(agreed: ProtocolFeatures, ids: &[&str]) -> Result<(), MigratableError> {
    match ids.first() {
        Some(id) if !agreed.contains(ProtocolFeatures::DEVICE_STATE) => {
            Err(MigratableError::MigrateSend(anyhow!(
                "the destination does not take streamed device state (DEVICE_STATE): it cannot \
                 receive {id}{}",
                if ids.len() > 1 { " and others" } else { "" }
            )))
        }
        _ => Ok(()),
    }
}

/// Source: streams the paused `component`, number `position` on the wire,
/// as one `DeviceState` request on `conn`, into `out` if given (a wrapper
/// of a second handle on `conn`), and reads the destination's answer.
/// Returns the bytes of state sent. A failed stream names the
/// destination's reason if it gave one.
pub fn send_one<C: Connection>(
    conn: &mut C,
    position: usize,
    component: &mut Component,
    out: Option<&mut (dyn Write + Send)>,
) -> Result<u64, MigratableError> {
    let started = Instant::now();
    Request::device_state(wire_index(position)?).write_to(conn)?;
    let sent = match out {
        Some(out) => component.state.send_state(out),
        None => component.state.send_state(&mut ConnWriter(&mut *conn)),
    };
    let bytes = sent.map_err(|e| with_refusal(conn, e))?;
    expect_ok(conn)?;
    info!(
        "Migration: {}: {bytes} bytes of streamed state in {} ms",
        component.id,
        started.elapsed().as_millis()
    );
    Ok(bytes)
}

/// A connection as the `Write + Send` a component streams into.
struct ConnWriter<'a, C>(&'a mut C);

impl<C: Connection> Write for ConnWriter<'_, C> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Where a destination component's state is.
const NOT_RECEIVED: u8 = 0;
const LOADING: u8 = 1;
const RECEIVED: u8 = 2;

struct Slot {
    id: String,
    handle: Mutex<Box<dyn IncomingState>>,
    state: AtomicU8,
}

/// The destination's streamed components, in wire order, and what has
/// arrived for them (on the main connection or on connections of their
/// own, concurrently).
pub struct IncomingDevices {
    slots: Vec<Slot>,
    /// States being loaded now.
    active: AtomicUsize,
    /// Bytes of state loaded over connections of their own.
    lane_bytes: AtomicU64,
    /// The first failure on a connection of its own, with the id of its
    /// component when the request named one.
    lane_error: Mutex<Option<LaneError>>,
    /// Where pre-copied VRAM is kept (`VRAM_PRECOPY` accepted); `None`
    /// refuses a connection that pre-copies.
    vram_dir: Option<PathBuf>,
    /// Stream bytes rebuilt from pre-copied VRAM, and sent in stop-copy.
    vram_held_bytes: AtomicU64,
    vram_sent_bytes: AtomicU64,
}

/// A failure on a device-state connection of its own.
pub struct LaneError {
    /// The component the request named, if it named a valid one.
    pub id: Option<String>,
    pub error: MigratableError,
}

fn refuse(message: String) -> MigratableError {
    MigratableError::MigrateReceive(anyhow!(message))
}

impl IncomingDevices {
    /// No streamed components (before `Config`, or none in the VM).
    pub fn none() -> Self {
        IncomingDevices {
            slots: Vec::new(),
            active: AtomicUsize::new(0),
            lane_bytes: AtomicU64::new(0),
            lane_error: Mutex::new(None),
            vram_dir: None,
            vram_held_bytes: AtomicU64::new(0),
            vram_sent_bytes: AtomicU64::new(0),
        }
    }

    /// Accepts VRAM pre-copy, keeping pre-copied VRAM in unnamed files in
    /// `dir` (on disk, not in this process's memory).
    pub fn with_vram_dir(mut self, dir: PathBuf) -> Self {
        self.vram_dir = Some(dir);
        self
    }

    pub(crate) fn vram_dir(&self) -> Option<&Path> {
        self.vram_dir.as_deref()
    }

    /// Records what a stop-copy stream took from pre-copied VRAM.
    pub(crate) fn vram_loaded(&self, stats: &crate::vram::WindowStats) {
        self.vram_held_bytes
            .fetch_add(stats.held_bytes, Ordering::Relaxed);
        self.vram_sent_bytes
            .fetch_add(stats.sent_bytes, Ordering::Relaxed);
    }

    /// Stream bytes taken from pre-copied VRAM and sent in stop-copy, over
    /// all components.
    pub fn vram_bytes(&self) -> (u64, u64) {
        (
            self.vram_held_bytes.load(Ordering::Relaxed),
            self.vram_sent_bytes.load(Ordering::Relaxed),
        )
    }

    /// At `Config`: the components `described` by the source and this
    /// side's `handles` must name the same ids, and each description must
    /// fit its handle. Refused here, the migration ends before the source
    /// pauses anything.
    pub fn check(
        handles: Vec<(String, Box<dyn IncomingState>)>,
        described: &[StreamedDescription],
    ) -> Result<Self, MigratableError> {
        let mut handles = handles;
        wire_order(&mut handles, |(id, _)| id);
        if let Some(w) = handles.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(refuse(format!("component {} is streamed twice", w[0].0)));
        }
        for d in described {
            if !handles.iter().any(|(id, _)| *id == d.id) {
                return Err(refuse(format!(
                    "the source streams the state of {}, which takes no streamed state here",
                    d.id
                )));
            }
        }
        for (id, handle) in &handles {
            let mut found = described.iter().filter(|d| d.id == *id);
            match (found.next(), found.next()) {
                (Some(d), None) => handle.check_description(&d.description)?,
                (Some(_), Some(_)) => {
                    return Err(refuse(format!("the source describes {id} twice")))
                }
                (None, _) => {
                    return Err(refuse(format!(
                        "{id} takes streamed state here, but the source did not describe its state"
                    )))
                }
            }
        }
        let mut devices = IncomingDevices::none();
        devices.slots = handles
            .into_iter()
            .map(|(id, handle)| Slot {
                id,
                handle: Mutex::new(handle),
                state: AtomicU8::new(NOT_RECEIVED),
            })
            .collect();
        Ok(devices)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// The id of the component numbered `index` on the wire.
    pub fn id(&self, index: u16) -> Option<&str> {
        self.slots.get(usize::from(index)).map(|s| s.id.as_str())
    }

    /// Loads the state of the component numbered `index` from `input`,
    /// reading no byte past its end; returns the bytes read. A component
    /// takes one state: a second one (also while the first loads on
    /// another connection) is refused.
    pub fn receive(
        &self,
        index: u16,
        input: &mut (dyn Read + Send),
    ) -> Result<u64, MigratableError> {
        let slot = self.slots.get(usize::from(index)).ok_or_else(|| {
            refuse(format!(
                "state for streamed component #{index}, but this VM has {}",
                self.slots.len()
            ))
        })?;
        slot.state
            .compare_exchange(NOT_RECEIVED, LOADING, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| refuse(format!("state for {} sent twice", slot.id)))?;
        self.active.fetch_add(1, Ordering::AcqRel);
        let started = Instant::now();
        let loaded = slot
            .handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .receive_state(input);
        self.active.fetch_sub(1, Ordering::AcqRel);
        match loaded {
            Ok(bytes) => {
                slot.state.store(RECEIVED, Ordering::Release);
                info!(
                    "Migration (incoming): {}: {bytes} bytes of streamed state in {} ms",
                    slot.id,
                    started.elapsed().as_millis()
                );
                Ok(bytes)
            }
            Err(e) => {
                slot.state.store(NOT_RECEIVED, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Whether a state is loading now: the main connection may then be
    /// silent for as long as that takes.
    pub fn streaming(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// Before the VM may run: every component has its state, so none runs
    /// blank.
    pub fn check_all_received(&self) -> Result<(), MigratableError> {
        match self
            .slots
            .iter()
            .find(|s| s.state.load(Ordering::Acquire) != RECEIVED)
        {
            Some(s) => Err(refuse(format!("{} received no state", s.id))),
            None => Ok(()),
        }
    }

    /// Records what a connection of its own delivered.
    pub(crate) fn lane_loaded(&self, bytes: u64) {
        self.lane_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records the first failure of a connection of its own, before the
    /// source can hear of it (an `Abandon` that follows finds it here).
    pub(crate) fn lane_failed(&self, id: Option<String>, error: MigratableError) {
        log::warn!(
            "Migration (incoming): {}{}",
            id.as_deref().map(|i| format!("{i}: ")).unwrap_or_default(),
            crate::connection::chain(&error)
        );
        self.lane_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(LaneError { id, error });
    }

    /// Bytes of state that arrived over connections of their own.
    pub fn lane_bytes(&self) -> u64 {
        self.lane_bytes.load(Ordering::Relaxed)
    }

    /// The first failure of a connection of its own, taken.
    pub fn take_lane_error(&self) -> Option<LaneError> {
        self.lane_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{self, Cursor};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use vm_migration::protocol::{Command, Response};
    use vm_migration::{Migratable, Pausable, Snapshot, Snapshottable, Transportable};

    use super::*;
    use crate::connection::write_error;

    /// A component whose state is `len` bytes of `byte`, self-delimited by
    /// a length prefix.
    pub(crate) struct Fake {
        pub(crate) kind: String,
        pub(crate) byte: u8,
        pub(crate) len: usize,
    }

    impl Pausable for Fake {}
    impl Snapshottable for Fake {}
    impl Transportable for Fake {}
    impl Migratable for Fake {}

    impl StreamedState for Fake {
        fn describe(&self) -> Result<SnapshotData, MigratableError> {
            SnapshotData::new_from_state(&self.kind)
        }

        fn send_state(&mut self, out: &mut (dyn Write + Send)) -> Result<u64, MigratableError> {
            out.write_all(&(self.len as u64).to_le_bytes())
                .and_then(|()| out.write_all(&vec![self.byte; self.len]))
                .map_err(MigratableError::MigrateSocket)?;
            Ok(8 + self.len as u64)
        }

        fn restore_state(&mut self, _: &Snapshot, _: &str) -> Result<(), MigratableError> {
            Ok(())
        }
    }

    /// The state a [`FakeIncoming`] loaded last.
    pub(crate) type Loaded = Arc<Mutex<Option<Vec<u8>>>>;

    /// A destination handle that takes states of its `kind` and keeps
    /// the last one.
    pub(crate) struct FakeIncoming {
        pub(crate) kind: String,
        pub(crate) loaded: Loaded,
    }

    impl IncomingState for FakeIncoming {
        fn check_description(&self, d: &SnapshotData) -> Result<(), MigratableError> {
            let kind: String = d.to_state()?;
            if kind == self.kind {
                Ok(())
            } else {
                Err(refuse(format!("kind {kind} != {}", self.kind)))
            }
        }

        fn receive_state(&mut self, input: &mut (dyn Read + Send)) -> Result<u64, MigratableError> {
            let mut len = [0u8; 8];
            input
                .read_exact(&mut len)
                .map_err(MigratableError::MigrateSocket)?;
            let len = u64::from_le_bytes(len);
            if len > 1 << 20 {
                return Err(refuse(format!("state of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            input
                .read_exact(&mut data)
                .map_err(MigratableError::MigrateSocket)?;
            *self.loaded.lock().unwrap() = Some(data);
            Ok(8 + len)
        }
    }

    pub(crate) fn handle(kind: &str) -> (Box<dyn IncomingState>, Loaded) {
        let loaded = Arc::new(Mutex::new(None));
        (
            Box::new(FakeIncoming {
                kind: kind.into(),
                loaded: loaded.clone(),
            }),
            loaded,
        )
    }

    fn description(id: &str, kind: &str) -> StreamedDescription {
        StreamedDescription {
            id: id.into(),
            description: SnapshotData::new_from_state(&kind.to_string()).unwrap(),
        }
    }

    fn message(e: &MigratableError) -> String {
        crate::connection::chain(e)
    }

    #[test]
    fn descriptions_are_checked_both_ways_before_anything_stops() {
        let ok = IncomingDevices::check(
            vec![
                ("gpu1".into(), handle("xe").0),
                ("gpu0".into(), handle("xe").0),
            ],
            &[description("gpu0", "xe"), description("gpu1", "xe")],
        )
        .unwrap();
        // Wire order is id order, whatever order the handles came in.
        assert_eq!(ok.id(0), Some("gpu0"));
        assert_eq!(ok.id(1), Some("gpu1"));

        let e = IncomingDevices::check(
            vec![("gpu0".into(), handle("xe").0)],
            &[description("gpu0", "mtty")],
        )
        .err()
        .unwrap();
        assert!(message(&e).contains("kind mtty != xe"), "{}", message(&e));
        let e = IncomingDevices::check(vec![("gpu0".into(), handle("xe").0)], &[])
            .err()
            .unwrap();
        assert!(message(&e).contains("did not describe"), "{}", message(&e));
        let e = IncomingDevices::check(Vec::new(), &[description("gpu9", "xe")])
            .err()
            .unwrap();
        assert!(message(&e).contains("gpu9, which takes no streamed state here"));
        let e = IncomingDevices::check(
            vec![("gpu0".into(), handle("xe").0)],
            &[description("gpu0", "xe"), description("gpu0", "xe")],
        )
        .err()
        .unwrap();
        assert!(message(&e).contains("twice"), "{}", message(&e));
    }

    #[test]
    fn a_source_refuses_a_destination_without_streamed_state() {
        require_device_state(ProtocolFeatures::empty(), &[]).unwrap();
        require_device_state(ProtocolFeatures::DEVICE_STATE, &["gpu0"]).unwrap();
        let e = require_device_state(ProtocolFeatures::SWITCHOVER, &["gpu0", "gpu1"]).unwrap_err();
        assert!(
            message(&e).contains("cannot receive gpu0 and others"),
            "{}",
            message(&e)
        );
    }

    #[test]
    fn states_go_in_turn_and_each_arrives_once() {
        let (mut source, mut destination) = UnixStream::pair().unwrap();
        let (h0, loaded0) = handle("xe");
        let (h1, loaded1) = handle("xe");
        let incoming = IncomingDevices::check(
            vec![("gpu0".into(), h0), ("gpu1".into(), h1)],
            &[description("gpu0", "xe"), description("gpu1", "xe")],
        )
        .unwrap();
        let serve = std::thread::spawn(move || {
            for _ in 0..2 {
                let r = Request::read_from(&mut destination).unwrap();
                assert_eq!(r.command(), Command::DeviceState);
                incoming
                    .receive(r.device_index(), &mut destination)
                    .unwrap();
                Response::ok().write_to(&mut destination).unwrap();
            }
            incoming.check_all_received().unwrap();
            incoming
        });
        let (mut a, mut b) = (
            Fake {
                kind: "xe".into(),
                byte: 0xa,
                len: 3000,
            },
            Fake {
                kind: "xe".into(),
                byte: 0xb,
                len: 5,
            },
        );
        let mut components = [
            Component {
                id: "gpu0".into(),
                state: &mut a,
            },
            Component {
                id: "gpu1".into(),
                state: &mut b,
            },
        ];
        for (position, c) in components.iter_mut().enumerate() {
            send_one(&mut source, position, c, None).unwrap();
        }
        let incoming = serve.join().unwrap();
        assert_eq!(loaded0.lock().unwrap().as_deref(), Some(&[0xa; 3000][..]));
        assert_eq!(loaded1.lock().unwrap().as_deref(), Some(&[0xb; 5][..]));
        let e = incoming
            .receive(0, &mut Cursor::new(vec![0u8; 8]))
            .unwrap_err();
        assert!(message(&e).contains("gpu0 sent twice"), "{}", message(&e));
        let e = incoming.receive(7, &mut io::empty()).unwrap_err();
        assert!(
            message(&e).contains("#7, but this VM has 2"),
            "{}",
            message(&e)
        );
    }

    #[test]
    fn a_component_without_state_keeps_the_vm_from_running() {
        let (h, _) = handle("xe");
        let incoming =
            IncomingDevices::check(vec![("gpu0".into(), h)], &[description("gpu0", "xe")]).unwrap();
        let e = incoming.check_all_received().unwrap_err();
        assert!(message(&e).contains("gpu0 received no state"));
        // A failed load leaves it without state, and it may come again.
        let e = incoming
            .receive(0, &mut Cursor::new(vec![9u8; 8]))
            .unwrap_err();
        assert!(message(&e).contains("state of"), "{}", message(&e));
        assert!(incoming.check_all_received().is_err());
        let mut good = 2u64.to_le_bytes().to_vec();
        good.extend([1, 2]);
        incoming.receive(0, &mut Cursor::new(good)).unwrap();
        incoming.check_all_received().unwrap();
    }

    #[test]
    fn a_refused_stream_says_why() {
        let (mut source, mut destination) = UnixStream::pair().unwrap();
        let serve = std::thread::spawn(move || {
            Request::read_from(&mut destination).unwrap();
            let mut head = [0u8; 8];
            destination.read_exact(&mut head).unwrap();
            write_error(&mut destination, "device gpu0: devid mismatch").unwrap();
            // Hang up without reading the rest, as a refusing destination does.
        });
        let mut big = Fake {
            kind: "xe".into(),
            byte: 1,
            len: 64 << 20,
        };
        let mut c = Component {
            id: "gpu0".into(),
            state: &mut big,
        };
        let e = send_one(&mut source, 0, &mut c, None).unwrap_err();
        serve.join().unwrap();
        assert!(
            message(&e).contains("the destination said: device gpu0: devid mismatch"),
            "{}",
            message(&e)
        );
    }
}
