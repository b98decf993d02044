// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The VFIO migration v2 state machine, arc by arc.
//!
//! The kernel only performs single arcs; a VMM wants "go from here to
//! there". [`path`] computes the same arc sequence the kernel's own
//! `vfio_mig_get_next_state()` would, for the arcs the device's flags allow,
//! and [`walk`] drives a device along it, recovering from a failed arc the
//! way a VMM must: first back to a named recovery state, then, as a last
//! resort, by reset.

use std::fmt;
use std::fs::File;

use log::{error, info, warn};
use thiserror::Error;

use crate::device::{DeviceError, MigrationDevice};
use crate::uapi::{DeviceState, MigrationFlags};

use DeviceState::*;

/// What an arc does to the migration data stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEffect {
    None,
    /// The arc returns a new data fd to read device state from.
    OpensSave,
    /// The arc returns a new data fd to write device state into.
    OpensResume,
    /// The save stream of PRE_COPY goes on in STOP_COPY.
    ContinuesSave,
    /// The arc ends the current stream (RESUMING -> STOP also loads it).
    Closes,
}

/// Capabilities a state needs, as in the kernel's `state_flags_table`.
fn required_flags(state: DeviceState) -> Option<MigrationFlags> {
    let sc = MigrationFlags::STOP_COPY;
    Some(match state {
        Running | Stop | StopCopy | Resuming => sc,
        RunningP2p => sc.union(MigrationFlags::P2P),
        PreCopy => sc.union(MigrationFlags::PRE_COPY),
        PreCopyP2p => sc
            .union(MigrationFlags::P2P)
            .union(MigrationFlags::PRE_COPY),
        Error => return None,
    })
}

/// Whether a device with `flags` can be put into `state`.
pub fn is_supported(flags: MigrationFlags, state: DeviceState) -> bool {
    required_flags(state).is_some_and(|req| flags.contains(req))
}

/// The kernel's next step from `cur` toward `target` in the full FSM
/// (all capabilities), before skipping states the device lacks.
fn full_fsm_next(cur: DeviceState, target: DeviceState) -> DeviceState {
    if cur == target {
        return cur;
    }
    match (cur, target) {
        (Error, _) | (_, Error) => Error,
        (Stop, Running | PreCopy | PreCopyP2p | RunningP2p) => RunningP2p,
        (Stop, StopCopy) => StopCopy,
        (Stop, Resuming) => Resuming,
        (Running, PreCopy) => PreCopy,
        (Running, _) => RunningP2p,
        (PreCopy, PreCopyP2p | StopCopy) => PreCopyP2p,
        (PreCopy, _) => Running,
        (PreCopyP2p, PreCopy) => PreCopy,
        (PreCopyP2p, StopCopy) => StopCopy,
        (PreCopyP2p, _) => RunningP2p,
        (StopCopy | Resuming, PreCopy | PreCopyP2p) => Error,
        (StopCopy | Resuming, _) => Stop,
        (RunningP2p, Stop | StopCopy | Resuming) => Stop,
        (RunningP2p, Running | PreCopy) => Running,
        (RunningP2p, PreCopyP2p) => PreCopyP2p,
        (_, _) => Error,
    }
}

/// The next arc from `cur` toward `target` for a device with `flags`, as
/// the kernel computes it: follow the full FSM, skipping over states the
/// device does not support.
fn next_state(flags: MigrationFlags, cur: DeviceState, target: DeviceState) -> DeviceState {
    let mut next = full_fsm_next(cur, target);
    while next != Error && !is_supported(flags, next) {
        next = full_fsm_next(next, target);
    }
    next
}

/// Why no path exists.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("device has no STOP_COPY capability (flags {0}): it cannot migrate")]
    NotMigratable(MigrationFlags),
    #[error("state {state} is not supported by a device with flags {flags}")]
    Unsupported {
        state: DeviceState,
        flags: MigrationFlags,
    },
    #[error("device is in ERROR: only a reset leaves it")]
    InError,
    #[error("ERROR is not a state one can ask for")]
    ErrorTarget,
    #[error("no arc sequence leads from {from} to {to}")]
    NoPath { from: DeviceState, to: DeviceState },
}

/// The arc-by-arc states from `from` to `to` (excluding `from`), the same
/// sequence the kernel would step through.
pub fn path(
    flags: MigrationFlags,
    from: DeviceState,
    to: DeviceState,
) -> Result<Vec<DeviceState>, PathError> {
    if !flags.contains(MigrationFlags::STOP_COPY) {
        return Err(PathError::NotMigratable(flags));
    }
    if from == Error {
        return Err(PathError::InError);
    }
    if to == Error {
        return Err(PathError::ErrorTarget);
    }
    for state in [from, to] {
        if !is_supported(flags, state) {
            return Err(PathError::Unsupported { state, flags });
        }
    }
    let mut steps = Vec::new();
    let mut cur = from;
    while cur != to {
        let next = next_state(flags, cur, to);
        // The FSM has 8 states; a longer walk means a table bug, not input.
        if next == Error || steps.len() >= DeviceState::ALL.len() {
            return Err(PathError::NoPath { from, to });
        }
        steps.push(next);
        cur = next;
    }
    Ok(steps)
}

/// What the single arc `from -> to` does to the data stream.
pub fn stream_effect(from: DeviceState, to: DeviceState) -> StreamEffect {
    match (from, to) {
        (Stop, StopCopy) | (Running, PreCopy) | (RunningP2p, PreCopyP2p) => StreamEffect::OpensSave,
        (Stop, Resuming) => StreamEffect::OpensResume,
        (PreCopy | PreCopyP2p, StopCopy) => StreamEffect::ContinuesSave,
        (StopCopy | Resuming, Stop) | (PreCopy, Running) | (PreCopyP2p, RunningP2p) => {
            StreamEffect::Closes
        }
        _ => StreamEffect::None,
    }
}

/// Whether `from -> to` is a single arc the uAPI defines for `flags`.
pub fn is_arc(flags: MigrationFlags, from: DeviceState, to: DeviceState) -> bool {
    from != to && matches!(path(flags, from, to), Ok(p) if p.len() == 1)
}

/// How the device ended up after a failed arc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Walked back to the recovery state; device state is intact.
    Recovered(DeviceState),
    /// Needed a reset (device state lost), then reached this state.
    ResetThenRecovered(DeviceState),
    /// Even reset did not bring the device back.
    Failed,
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recovery::Recovered(s) => write!(f, "recovered to {s}, state intact"),
            Recovery::ResetThenRecovered(s) => write!(f, "reset (state lost), now {s}"),
            Recovery::Failed => f.write_str("recovery failed, device unusable"),
        }
    }
}

/// A walk that did not reach its target.
#[derive(Debug, Error)]
pub enum WalkError {
    #[error("cannot query the device: {0}")]
    Query(#[source] DeviceError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("arc {from} -> {to} failed ({source}); {recovery}")]
    Arc {
        from: DeviceState,
        to: DeviceState,
        #[source]
        source: DeviceError,
        recovery: Recovery,
    },
}

impl WalkError {
    /// The errno of the failing arc, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            WalkError::Arc { source, .. } | WalkError::Query(source) => source.errno(),
            WalkError::Path(_) => None,
        }
    }

    /// How the device was left, if an arc failed.
    pub fn recovery(&self) -> Option<Recovery> {
        match self {
            WalkError::Arc { recovery, .. } => Some(*recovery),
            _ => None,
        }
    }
}

/// Drives `device` from its current state to `target`.
///
/// Returns the data fd opened by the last arc that opened one (the caller
/// reads or writes it before walking on). If an arc fails, the device is
/// taken to `recovery` (or reset and then taken there) and the error says
/// which arc failed and how the device was left.
pub fn walk(
    device: &dyn MigrationDevice,
    target: DeviceState,
    recovery: DeviceState,
) -> Result<Option<File>, WalkError> {
    let flags = device.migration_flags().map_err(WalkError::Query)?;
    let from = device.state().map_err(WalkError::Query)?;
    let steps = path(flags, from, target)?;
    let mut data_fd = None;
    let mut cur = from;
    for next in steps {
        match device.set_state(next) {
            Ok(fd) => {
                if fd.is_some() {
                    data_fd = fd;
                }
                cur = next;
            }
            Err(source) => {
                // A stream fd of a failed walk is useless; close it before
                // recovering so the device is not held open.
                drop(data_fd.take());
                warn!("arc {cur} -> {next} failed: {source}; recovering to {recovery}");
                let recovery = recover_after(device, flags, recovery, Some((cur, next)));
                return Err(WalkError::Arc {
                    from: cur,
                    to: next,
                    source,
                    recovery,
                });
            }
        }
    }
    Ok(data_fd)
}

/// Best effort: bring the device to `target` after a failed arc.
pub fn recover(
    device: &dyn MigrationDevice,
    flags: MigrationFlags,
    target: DeviceState,
) -> Recovery {
    recover_after(device, flags, target, None)
}

/// [`recover`], knowing which arc failed: a route back that starts with
/// that same arc is not tried again (a failed RESUMING -> STOP would
/// otherwise load known-bad data twice); the device is reset instead.
fn recover_after(
    device: &dyn MigrationDevice,
    flags: MigrationFlags,
    target: DeviceState,
    failed_arc: Option<(DeviceState, DeviceState)>,
) -> Recovery {
    match device.state() {
        Ok(Error) | Err(_) => {}
        Ok(cur) => {
            let repeats_failure = path(flags, cur, target)
                .ok()
                .and_then(|p| p.first().copied())
                .is_some_and(|first| Some((cur, first)) == failed_arc);
            if !repeats_failure && walk_plain(device, flags, cur, target).is_ok() {
                info!("device recovered to {target}");
                return Recovery::Recovered(target);
            }
        }
    }
    warn!("resetting device to leave a failed migration arc (device state is lost)");
    if let Err(e) = device.reset() {
        error!("device reset failed: {e}");
        return Recovery::Failed;
    }
    match walk_plain(device, flags, Running, target) {
        Ok(()) => Recovery::ResetThenRecovered(target),
        Err(e) => {
            error!("device reset, but could not reach {target}: {e}");
            Recovery::Failed
        }
    }
}

/// Walks without recovery, dropping any data fd an arc opens.
fn walk_plain(
    device: &dyn MigrationDevice,
    flags: MigrationFlags,
    from: DeviceState,
    to: DeviceState,
) -> Result<(), String> {
    let steps = path(flags, from, to).map_err(|e| e.to_string())?;
    for next in steps {
        device.set_state(next).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const SC: MigrationFlags = MigrationFlags::STOP_COPY;
    const SC_P2P: MigrationFlags = MigrationFlags::XE_VF;
    const ALL: MigrationFlags = MigrationFlags::from_bits(7);
    const SC_PRE: MigrationFlags = MigrationFlags::from_bits(5);

    fn p(flags: MigrationFlags, from: DeviceState, to: DeviceState) -> Vec<DeviceState> {
        path(flags, from, to).unwrap()
    }

    #[test]
    fn xe_save_and_resume_paths() {
        assert_eq!(
            p(SC_P2P, Running, StopCopy),
            vec![RunningP2p, Stop, StopCopy]
        );
        assert_eq!(
            p(SC_P2P, StopCopy, Running),
            vec![Stop, RunningP2p, Running]
        );
        assert_eq!(
            p(SC_P2P, Running, Resuming),
            vec![RunningP2p, Stop, Resuming]
        );
        assert_eq!(
            p(SC_P2P, Resuming, Running),
            vec![Stop, RunningP2p, Running]
        );
        assert_eq!(p(SC_P2P, StopCopy, Resuming), vec![Stop, Resuming]);
        assert_eq!(p(SC_P2P, Running, Running), Vec::<DeviceState>::new());
    }

    #[test]
    fn without_p2p_running_and_stop_are_adjacent() {
        assert_eq!(p(SC, Running, Stop), vec![Stop]);
        assert_eq!(p(SC, Running, StopCopy), vec![Stop, StopCopy]);
        assert_eq!(p(SC, Resuming, Running), vec![Stop, Running]);
    }

    #[test]
    fn pre_copy_paths() {
        assert_eq!(p(ALL, Running, PreCopy), vec![PreCopy]);
        assert_eq!(p(ALL, PreCopy, StopCopy), vec![PreCopyP2p, StopCopy]);
        assert_eq!(p(ALL, PreCopy, Stop), vec![Running, RunningP2p, Stop]);
        assert_eq!(p(ALL, Running, PreCopyP2p), vec![RunningP2p, PreCopyP2p]);
        assert_eq!(p(SC_PRE, PreCopy, StopCopy), vec![StopCopy]);
        assert_eq!(p(SC_PRE, PreCopy, Stop), vec![Running, Stop]);
    }

    #[test]
    fn refusals() {
        assert_eq!(
            path(SC_P2P, Running, PreCopy),
            Err(PathError::Unsupported {
                state: PreCopy,
                flags: SC_P2P
            })
        );
        assert_eq!(
            path(SC, Running, RunningP2p),
            Err(PathError::Unsupported {
                state: RunningP2p,
                flags: SC
            })
        );
        assert_eq!(path(SC_P2P, Error, Running), Err(PathError::InError));
        assert_eq!(path(SC_P2P, Running, Error), Err(PathError::ErrorTarget));
        assert_eq!(
            path(MigrationFlags::P2P, Running, Stop),
            Err(PathError::NotMigratable(MigrationFlags::P2P))
        );
        // Leaving STOP_COPY or RESUMING for a PRE_COPY state has no route.
        assert_eq!(
            path(ALL, StopCopy, PreCopy),
            Err(PathError::NoPath {
                from: StopCopy,
                to: PreCopy
            })
        );
        assert_eq!(
            path(ALL, Resuming, PreCopyP2p),
            Err(PathError::NoPath {
                from: Resuming,
                to: PreCopyP2p
            })
        );
    }

    /// Every path, for every flag set, is a chain of single arcs that never
    /// passes through a state with a stream side effect on the way.
    #[test]
    fn every_path_is_made_of_arcs_and_avoids_side_effect_states() {
        for flags in [SC, SC_P2P, SC_PRE, ALL] {
            for from in DeviceState::ALL {
                for to in DeviceState::ALL {
                    let Ok(steps) = path(flags, from, to) else {
                        continue;
                    };
                    let mut cur = from;
                    for (i, &next) in steps.iter().enumerate() {
                        assert!(
                            is_supported(flags, next),
                            "{flags}: {from}->{to} via {next}"
                        );
                        let last = i + 1 == steps.len();
                        if !last {
                            assert!(
                                !matches!(next, StopCopy | Resuming),
                                "{flags}: {from}->{to} passes {next}"
                            );
                        }
                        assert_eq!(
                            path(flags, cur, next).unwrap(),
                            vec![next],
                            "{cur}->{next} is not one arc"
                        );
                        cur = next;
                    }
                }
            }
        }
    }

    #[test]
    fn stream_effects() {
        assert_eq!(stream_effect(Stop, StopCopy), StreamEffect::OpensSave);
        assert_eq!(stream_effect(Stop, Resuming), StreamEffect::OpensResume);
        assert_eq!(stream_effect(Running, PreCopy), StreamEffect::OpensSave);
        assert_eq!(
            stream_effect(PreCopyP2p, StopCopy),
            StreamEffect::ContinuesSave
        );
        assert_eq!(stream_effect(Resuming, Stop), StreamEffect::Closes);
        assert_eq!(stream_effect(StopCopy, Stop), StreamEffect::Closes);
        assert_eq!(stream_effect(Running, RunningP2p), StreamEffect::None);
        assert!(is_arc(SC_P2P, Stop, StopCopy));
        assert!(!is_arc(SC_P2P, Running, Stop));
        assert!(is_arc(SC, Running, Stop));
    }

    /// A scripted device: follows arcs, can fail a chosen arc.
    struct Scripted {
        flags: MigrationFlags,
        state: Mutex<DeviceState>,
        fail: Mutex<Option<(DeviceState, DeviceState, bool)>>,
        reset_fails: bool,
        arcs: Mutex<Vec<(DeviceState, DeviceState)>>,
    }

    impl Scripted {
        fn new(flags: MigrationFlags, state: DeviceState) -> Self {
            Scripted {
                flags,
                state: Mutex::new(state),
                fail: Mutex::new(None),
                reset_fails: false,
                arcs: Mutex::new(Vec::new()),
            }
        }
    }

    impl MigrationDevice for Scripted {
        fn identity(&self) -> crate::device::DeviceIdentity {
            crate::device::DeviceIdentity {
                vendor_id: 0x8086,
                device_id: 1,
                revision_id: 0,
                vram_size: None,
            }
        }
        fn migration_flags(&self) -> crate::device::Result<MigrationFlags> {
            Ok(self.flags)
        }
        fn state(&self) -> crate::device::Result<DeviceState> {
            Ok(*self.state.lock().unwrap())
        }
        fn set_state(&self, to: DeviceState) -> crate::device::Result<Option<File>> {
            let mut st = self.state.lock().unwrap();
            let from = *st;
            assert!(
                is_arc(self.flags, from, to),
                "walk asked for a non-arc {from}->{to}"
            );
            self.arcs.lock().unwrap().push((from, to));
            let planned = *self.fail.lock().unwrap();
            if let Some((f, t, to_error)) = planned {
                if (f, t) == (from, to) {
                    *self.fail.lock().unwrap() = None;
                    if to_error {
                        *st = Error;
                    }
                    return Err(DeviceError::Arc {
                        from,
                        to,
                        source: std::io::Error::from_raw_os_error(libc::EIO),
                    });
                }
            }
            *st = to;
            let opens = matches!(
                stream_effect(from, to),
                StreamEffect::OpensSave | StreamEffect::OpensResume
            );
            Ok(opens.then(|| File::open("/dev/null").unwrap()))
        }
        fn stop_copy_size(&self) -> crate::device::Result<u64> {
            Ok(0)
        }
        fn reset(&self) -> crate::device::Result<()> {
            if self.reset_fails {
                return Err(DeviceError::Other("reset refused".into()));
            }
            *self.state.lock().unwrap() = Running;
            Ok(())
        }
    }

    #[test]
    fn walk_returns_the_stream_of_the_opening_arc() {
        let dev = Scripted::new(SC_P2P, Running);
        assert!(walk(&dev, StopCopy, Running).unwrap().is_some());
        assert_eq!(dev.state().unwrap(), StopCopy);
        assert!(walk(&dev, Running, Running).unwrap().is_none());
        assert_eq!(
            *dev.arcs.lock().unwrap(),
            vec![
                (Running, RunningP2p),
                (RunningP2p, Stop),
                (Stop, StopCopy),
                (StopCopy, Stop),
                (Stop, RunningP2p),
                (RunningP2p, Running)
            ]
        );
    }

    #[test]
    fn failed_arc_recovers_without_reset_when_device_is_not_in_error() {
        let dev = Scripted::new(SC_P2P, Running);
        *dev.fail.lock().unwrap() = Some((Stop, StopCopy, false));
        let err = walk(&dev, StopCopy, Running).unwrap_err();
        assert_eq!(err.recovery(), Some(Recovery::Recovered(Running)));
        assert_eq!(err.errno(), Some(libc::EIO));
        assert!(err.to_string().contains("STOP -> STOP_COPY"), "{err}");
        assert_eq!(dev.state().unwrap(), Running);
    }

    #[test]
    fn failed_arc_into_error_resets_then_recovers() {
        let dev = Scripted::new(SC_P2P, Stop);
        *dev.fail.lock().unwrap() = Some((Stop, Resuming, true));
        let err = walk(&dev, Resuming, Stop).unwrap_err();
        assert_eq!(err.recovery(), Some(Recovery::ResetThenRecovered(Stop)));
        assert_eq!(dev.state().unwrap(), Stop);
    }

    #[test]
    fn failed_load_is_not_retried_on_the_way_back() {
        let dev = Scripted::new(SC_P2P, Resuming);
        *dev.fail.lock().unwrap() = Some((Resuming, Stop, false));
        let err = walk(&dev, Running, Running).unwrap_err();
        assert_eq!(err.recovery(), Some(Recovery::ResetThenRecovered(Running)));
        let loads = dev
            .arcs
            .lock()
            .unwrap()
            .iter()
            .filter(|&&a| a == (Resuming, Stop))
            .count();
        assert_eq!(loads, 1, "RESUMING -> STOP must be attempted once");
    }

    #[test]
    fn failed_reset_is_reported() {
        let mut dev = Scripted::new(SC_P2P, Stop);
        dev.reset_fails = true;
        *dev.fail.lock().unwrap() = Some((Stop, StopCopy, true));
        let err = walk(&dev, StopCopy, Running).unwrap_err();
        assert_eq!(err.recovery(), Some(Recovery::Failed));
        assert!(err.to_string().contains("unusable"), "{err}");
    }

    #[test]
    fn walk_from_error_is_refused_without_touching_the_device() {
        let dev = Scripted::new(SC_P2P, Error);
        assert!(matches!(
            walk(&dev, Running, Running),
            Err(WalkError::Path(PathError::InError))
        ));
        assert!(dev.arcs.lock().unwrap().is_empty());
    }
}
