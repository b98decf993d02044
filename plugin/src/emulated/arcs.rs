// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The single arcs of the VFIO migration uAPI v2 a device with the given
//! flags supports (`include/uapi/linux/vfio.h`).

use crate::uapi::{DeviceState, MigrationFlags};

/// Whether `from -> to` is one arc of the kernel's state machine for a
/// device reporting `flags`.
pub fn arc_allowed(flags: MigrationFlags, from: DeviceState, to: DeviceState) -> bool {
    use DeviceState::*;
    let p2p = flags.contains(MigrationFlags::P2P);
    let pre = flags.contains(MigrationFlags::PRE_COPY);
    match (from, to) {
        (Stop, StopCopy) | (StopCopy, Stop) | (Stop, Resuming) | (Resuming, Stop) => true,
        (Running, Stop) | (Stop, Running) => !p2p,
        (Running, RunningP2p) | (RunningP2p, Running) | (RunningP2p, Stop) | (Stop, RunningP2p) => {
            p2p
        }
        (Running, PreCopy) | (PreCopy, Running) => pre,
        (PreCopy, StopCopy) => pre && !p2p,
        (RunningP2p, PreCopyP2p)
        | (PreCopyP2p, RunningP2p)
        | (PreCopy, PreCopyP2p)
        | (PreCopyP2p, PreCopy)
        | (PreCopyP2p, StopCopy) => pre && p2p,
        _ => false,
    }
}

/// Whether the workload runs (and DMAs) in `state`: only while the VF is
/// running and not quiesced for P2P.
pub(crate) fn workload_runs(state: DeviceState) -> bool {
    matches!(state, DeviceState::Running | DeviceState::PreCopy)
}
