// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Each streamed component's state on a connection of its own, all at
//! once and concurrently with the final memory pass
//! (`ProtocolFeatures::DEVICE_STATE_CONNECTIONS`).
//!
//! The source opens one extra connection per component before pre-copy,
//! with its own transport (so TLS when the main connection is TLS),
//! announcing [`ConnectionRole::DeviceState`]. Once the VM is paused each
//! carries exactly one self-delimited `DeviceState` request, answered `Ok`
//! once the destination loaded it (or `Error` with the reason), while the
//! main connection carries the final memory pass; `State` and `Complete`
//! follow once every stream is acknowledged. The destination, which
//! opened its handles at `Config`, loads each stream as it comes
//! ([`IncomingDevices::serve_lane`]).
//!
//! A destination without the feature gets every state on the main
//! connection, in turn, after `State` ([`crate::streamed::send_one`]).

use std::time::{Duration, Instant};

use anyhow::anyhow;
use vm_migration::protocol::{
    Command, ConnectionRole, Request, Response, DEVICE_STATE_SELF_DELIMITED,
};
use vm_migration::MigratableError;

use crate::connection::{chain, is_eof, write_error, Connection};
use crate::streamed::{send_one, Component, IncomingDevices};

/// The source's device-state connections, one per streamed component.
pub struct DeviceLanes<C: Connection> {
    conns: Vec<C>,
}

/// What one connection of its own carried.
pub struct LaneOutcome {
    pub id: String,
    /// Bytes of state sent and acknowledged.
    pub result: Result<u64, MigratableError>,
    /// From the start of [`DeviceLanes::send`] to the destination's answer.
    pub elapsed: Duration,
}

impl<C: Connection> DeviceLanes<C> {
    /// No connections: states go in turn on the main connection.
    pub fn none() -> Self {
        DeviceLanes { conns: Vec::new() }
    }

    /// Opens `count` connections with `connect`, each announcing
    /// [`ConnectionRole::DeviceState`].
    pub fn open(
        count: usize,
        mut connect: impl FnMut() -> Result<C, MigratableError>,
    ) -> Result<Self, MigratableError> {
        let mut lanes = DeviceLanes::none();
        for _ in 0..count {
            let mut conn = connect()?;
            if let Err(e) = ConnectionRole::DeviceState.write_to(&mut conn) {
                lanes.close();
                return Err(e);
            }
            lanes.conns.push(conn);
        }
        Ok(lanes)
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Closes the connections unused (a migration that failed before the
    /// components' turn): the destination's handlers see them end.
    ///
    /// Closing is dropping: nothing else holds these sockets, and CH's
    /// migration worker has no seccomp rule for `shutdown(2)`.
    pub fn close(&mut self) {
        self.conns.clear();
    }

    /// Streams every paused component (in wire order, one per connection)
    /// while `during` runs on the calling thread; returns what `during`
    /// returned and each connection's outcome, in wire order.
    pub fn send<R>(
        mut self,
        components: &mut [Component],
        during: impl FnOnce() -> R,
    ) -> (R, Vec<LaneOutcome>) {
        let started = Instant::now();
        let conns = std::mem::take(&mut self.conns);
        std::thread::scope(|s| {
            let mut threads = Vec::new();
            let mut unsent = Vec::new();
            let mut conns = conns.into_iter();
            for (position, component) in components.iter_mut().enumerate() {
                let id = component.id.clone();
                let Some(mut conn) = conns.next() else {
                    unsent.push(LaneOutcome {
                        id,
                        result: Err(MigratableError::MigrateSend(anyhow!(
                            "no device-state connection left for it"
                        ))),
                        elapsed: Duration::ZERO,
                    });
                    continue;
                };
                let spawned = std::thread::Builder::new()
                    .name(format!("migrate-state-{position}"))
                    .spawn_scoped(s, move || {
                        let result = send_one(&mut conn, position, component, None);
                        drop(conn);
                        LaneOutcome {
                            id,
                            result,
                            elapsed: started.elapsed(),
                        }
                    });
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => unsent.push(LaneOutcome {
                        id: format!("component #{position}"),
                        result: Err(MigratableError::MigrateSend(
                            anyhow!(e).context("spawning a device-state thread"),
                        )),
                        elapsed: Duration::ZERO,
                    }),
                }
            }
            // Unused (more connections than components): closed now.
            drop(conns);
            let during = during();
            let mut outcomes: Vec<LaneOutcome> = threads
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| LaneOutcome {
                        id: "?".into(),
                        result: Err(MigratableError::MigrateSend(anyhow!(
                            "device-state thread panicked"
                        ))),
                        elapsed: started.elapsed(),
                    })
                })
                .collect();
            outcomes.extend(unsent);
            (during, outcomes)
        })
    }
}

impl<C: Connection> Drop for DeviceLanes<C> {
    fn drop(&mut self) {
        self.close();
    }
}

impl IncomingDevices {
    /// Destination: serves one device-state connection, whose role the
    /// VMM has read, once it is readable (the VMM waits for that with its
    /// own way to give up). Reads its `DeviceState` request, loads the
    /// component and answers; a connection the source closes unused ends
    /// quietly. A failure is recorded ([`IncomingDevices::take_lane_error`])
    /// before the source is told.
    pub fn serve_lane<C: Connection>(&self, conn: &mut C) {
        let mut id = None;
        if let Err(e) = self.serve_lane_inner(conn, &mut id) {
            let message = match &id {
                Some(id) => format!("device-state {id}: {}", chain(&e)),
                None => chain(&e),
            };
            self.lane_failed(id, e);
            let _ = write_error(conn, &message);
        }
    }

    fn serve_lane_inner<C: Connection>(
        &self,
        conn: &mut C,
        id: &mut Option<String>,
    ) -> Result<(), MigratableError> {
        let request = match Request::read_from(conn) {
            Ok(r) => r,
            // Closed unused: the migration ended before the components' turn.
            Err(e) if is_eof(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        if request.command() != Command::DeviceState
            || request.length() != DEVICE_STATE_SELF_DELIMITED
        {
            return Err(MigratableError::MigrateReceive(anyhow!(
                "{:?} on a device-state connection (only a self-delimited DeviceState)",
                request.command()
            )));
        }
        *id = self.id(request.device_index()).map(str::to_string);
        let bytes = self.receive(request.device_index(), conn)?;
        self.lane_loaded(bytes);
        Response::ok().write_to(conn)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use vm_migration::IncomingState;

    use super::*;
    use crate::streamed::tests::{handle, Fake};
    use crate::streamed::StreamedDescription;

    fn described(ids: &[&str]) -> Vec<StreamedDescription> {
        ids.iter()
            .map(|id| StreamedDescription {
                id: id.to_string(),
                description: vm_migration::SnapshotData::new_from_state(&"xe".to_string()).unwrap(),
            })
            .collect()
    }

    #[test]
    fn every_state_streams_on_its_own_connection_while_memory_goes() {
        let (h0, loaded0) = handle("xe");
        let (h1, loaded1) = handle("xe");
        let handles: Vec<(String, Box<dyn IncomingState>)> =
            vec![("gpu0".into(), h0), ("gpu1".into(), h1)];
        let incoming = std::sync::Arc::new(
            IncomingDevices::check(handles, &described(&["gpu0", "gpu1"])).unwrap(),
        );
        let mut servers = Vec::new();
        let lanes = DeviceLanes::open(2, || {
            let (a, mut b) = UnixStream::pair().unwrap();
            let incoming = incoming.clone();
            servers.push(std::thread::spawn(move || {
                assert_eq!(
                    ConnectionRole::read_from(&mut b).unwrap(),
                    ConnectionRole::DeviceState
                );
                incoming.serve_lane(&mut b);
            }));
            Ok(a)
        })
        .unwrap();
        let (mut a, mut b) = (
            Fake {
                kind: "xe".into(),
                byte: 0xa,
                len: 1 << 20,
            },
            Fake {
                kind: "xe".into(),
                byte: 0xb,
                len: 10,
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
        let (memory, outcomes) = lanes.send(&mut components, || "final pass done");
        assert_eq!(memory, "final pass done");
        for s in servers {
            s.join().unwrap();
        }
        let bytes: Vec<u64> = outcomes
            .iter()
            .map(|o| *o.result.as_ref().unwrap())
            .collect();
        assert_eq!(bytes, [8 + (1 << 20), 18]);
        assert_eq!(incoming.lane_bytes(), 8 + (1 << 20) + 18);
        incoming.check_all_received().unwrap();
        assert_eq!(loaded0.lock().unwrap().as_ref().unwrap().len(), 1 << 20);
        assert_eq!(loaded1.lock().unwrap().as_deref(), Some(&[0xb; 10][..]));
    }

    #[test]
    fn a_refused_state_fails_its_lane_and_is_recorded_first() {
        let (h0, _) = handle("xe");
        let incoming = std::sync::Arc::new(
            IncomingDevices::check(vec![("gpu0".into(), h0)], &described(&["gpu0"])).unwrap(),
        );
        let mut servers = Vec::new();
        let lanes = DeviceLanes::open(1, || {
            let (a, mut b) = UnixStream::pair().unwrap();
            let incoming = incoming.clone();
            servers.push(std::thread::spawn(move || {
                ConnectionRole::read_from(&mut b).unwrap();
                incoming.serve_lane(&mut b);
            }));
            Ok(a)
        })
        .unwrap();
        // Larger than the handle takes: it refuses after the length prefix.
        let mut big = Fake {
            kind: "xe".into(),
            byte: 1,
            len: 4 << 20,
        };
        let mut components = [Component {
            id: "gpu0".into(),
            state: &mut big,
        }];
        let ((), outcomes) = lanes.send(&mut components, || ());
        for s in servers {
            s.join().unwrap();
        }
        let e = outcomes[0].result.as_ref().unwrap_err();
        assert!(
            chain(e).contains("the destination said: device-state gpu0: "),
            "{}",
            chain(e)
        );
        let recorded = incoming.take_lane_error().unwrap();
        assert_eq!(recorded.id.as_deref(), Some("gpu0"));
        assert!(
            chain(&recorded.error).contains("state of 4194304 bytes"),
            "{}",
            chain(&recorded.error)
        );
        assert!(incoming.check_all_received().is_err());
    }

    #[test]
    fn a_lane_closed_unused_ends_quietly_and_a_stray_command_is_refused() {
        let (h0, _) = handle("xe");
        let incoming =
            IncomingDevices::check(vec![("gpu0".into(), h0)], &described(&["gpu0"])).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut lanes = DeviceLanes { conns: vec![a] };
        lanes.close();
        incoming.serve_lane(&mut b);
        assert!(incoming.take_lane_error().is_none());

        let (mut a, mut b) = UnixStream::pair().unwrap();
        Request::complete().write_to(&mut a).unwrap();
        incoming.serve_lane(&mut b);
        let e = incoming.take_lane_error().unwrap();
        assert_eq!(e.id, None);
        assert!(
            chain(&e.error).contains("Complete on a device-state connection"),
            "{}",
            chain(&e.error)
        );
    }
}
