// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vm.snapshot` and `vm.restore` in Cloud Hypervisor's layout:
//! `config.json`, `state.json` (a snapshot tree: the VM node with one
//! child per VF), `memory-ranges` (guest memory), and one streamed data
//! file per VF beside them. `state.json` is written last, so a directory
//! without it is not a snapshot.

use std::fs::{self, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use log::info;
use serde::{Deserialize, Serialize};
use xe_vf_glue::error_chain::Chain;
use xe_vf_glue::migration::{Snapshot, Snapshottable, Transportable};
use xe_vf_glue::snapshot::snapshot_dir;
use xe_vf_glue::XeVfDevice;

use crate::error::{HostError, HostResult};
use crate::memory::COPY_CHUNK;
use crate::vm::{Vm, VmConfig};

pub const CONFIG_FILE: &str = "config.json";
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory-ranges";
/// Largest `config.json` / `state.json` read back.
pub const MAX_JSON_FILE: u64 = 1 << 20;

/// The VM node's own data in `state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotState {
    pub memory_size: u64,
    pub memory_file: String,
}

/// Writes `name` under a temporary name, syncs and renames it.
fn write_file(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> HostResult<()> {
    let phase = format!("write {name}");
    let tmp = dir.join(format!("{name}.partial"));
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        let mut out = BufWriter::with_capacity(COPY_CHUNK, file);
        fill(&mut out)?;
        out.flush()?;
        out.get_ref().sync_all()?;
        fs::rename(&tmp, dir.join(name))
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        HostError::failed(phase, e)
    })
}

/// Removes an older snapshot's `state.json` (durably) before any of its
/// files is replaced: otherwise a save failing halfway would leave the
/// old `state.json` beside new data files, a mix that restores without
/// complaint. A directory without `state.json` is not a snapshot.
fn unmark_snapshot(dir: &Path) -> HostResult<()> {
    let phase = "snapshot directory";
    match fs::remove_file(dir.join(STATE_FILE)) {
        Ok(()) => {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| HostError::failed(phase, e))?;
            info!("replacing the snapshot in {}", dir.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HostError::failed(
            phase,
            format!("removing old {STATE_FILE}: {e}"),
        )),
    }
}

/// Saves the paused VM into `destination_url` (`file:///dir`).
pub fn save(vm: &Vm, destination_url: &str) -> HostResult<()> {
    let dir =
        snapshot_dir(destination_url).map_err(|e| HostError::bad_request("destination_url", e))?;
    fs::create_dir_all(&dir).map_err(|e| HostError::failed("snapshot directory", e))?;
    unmark_snapshot(&dir)?;
    let config =
        serde_json::to_vec_pretty(vm.config()).map_err(|e| HostError::failed("config", e))?;
    write_file(&dir, CONFIG_FILE, |out| out.write_all(&config))?;
    write_file(&dir, MEMORY_FILE, |out| vm.memory().save_to(out))?;
    let mut root = Snapshot::new_from_state(&VmSnapshotState {
        memory_size: vm.memory().size(),
        memory_file: MEMORY_FILE.to_string(),
    })
    .map_err(|e| HostError::failed("snapshot", Chain(&e)))?;
    {
        let mut set = vm.devices();
        for d in set.devices_mut() {
            let id = Snapshottable::id(d);
            let section = d
                .snapshot()
                .map_err(|e| HostError::failed(format!("snapshot device {id}"), Chain(&e)))?;
            d.send(&section, destination_url)
                .map_err(|e| HostError::failed(format!("save device {id}"), Chain(&e)))?;
            root.add_snapshot(id, section);
        }
    }
    let state = serde_json::to_vec_pretty(&root).map_err(|e| HostError::failed("state", e))?;
    write_file(&dir, STATE_FILE, |out| out.write_all(&state))?;
    info!("snapshot written to {}", dir.display());
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> HostResult<T> {
    let phase = format!("read {name}");
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(name))
        .map_err(|e| HostError::bad_request(&phase, e))?;
    let mut raw = Vec::new();
    file.take(MAX_JSON_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(|e| HostError::failed(&phase, e))?;
    if raw.len() as u64 > MAX_JSON_FILE {
        return Err(HostError::bad_request(
            phase,
            format!("larger than {MAX_JSON_FILE} bytes"),
        ));
    }
    serde_json::from_slice(&raw).map_err(|e| HostError::bad_request(phase, e))
}

/// Builds a paused VM from the snapshot in `source_url`.
pub fn load(source_url: &str) -> HostResult<Arc<Vm>> {
    let dir = snapshot_dir(source_url).map_err(|e| HostError::bad_request("source_url", e))?;
    let config: VmConfig = read_json(&dir, CONFIG_FILE)?;
    let root: Snapshot = read_json(&dir, STATE_FILE)?;
    let vm_state: VmSnapshotState = root
        .to_state()
        .map_err(|e| HostError::bad_request("state.json", Chain(&e)))?;
    if vm_state.memory_size != config.memory_size || vm_state.memory_file != MEMORY_FILE {
        return Err(HostError::bad_request(
            "state.json",
            format!(
                "memory {} bytes in '{}' does not match config.json's {} bytes",
                vm_state.memory_size, vm_state.memory_file, config.memory_size
            ),
        ));
    }
    let memory_path = dir.join(MEMORY_FILE);
    let memory_file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&memory_path)
        .map_err(|e| HostError::bad_request("read memory-ranges", e))?;
    let len = memory_file
        .metadata()
        .map_err(|e| HostError::failed("read memory-ranges", e))?
        .len();
    if len != config.memory_size {
        return Err(HostError::bad_request(
            "read memory-ranges",
            format!("{len} bytes, config.json says {}", config.memory_size),
        ));
    }
    let mut build = |entry: &crate::vm::DeviceEntry, dc| -> HostResult<XeVfDevice> {
        let phase = format!("restore device {}", entry.id);
        let section = root
            .snapshots
            .get(&entry.id)
            .ok_or_else(|| HostError::bad_request(&phase, "no section in state.json"))?;
        XeVfDevice::new_from_snapshot(&entry.id, dc, section, source_url)
            .map(|(d, _)| d)
            .map_err(|e| HostError::failed(phase, e))
    };
    let vm = Vm::create(config, true, Some(&mut build))?;
    let mut input = std::io::BufReader::with_capacity(COPY_CHUNK, memory_file);
    vm.memory()
        .load_from(&mut input)
        .map_err(|e| HostError::failed("load memory-ranges", e))?;
    info!("restored VM from {}", dir.display());
    Ok(Arc::new(vm))
}
