// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! On-disk layout of an Xe VF in a Cloud Hypervisor snapshot.
//!
//! CH's `state.json` keeps a small section per VF (this module's
//! [`XeVfSnapshotState`]); the device data is a device-state stream in a
//! file of its own beside it, written under a temporary name and renamed
//! once complete and synced. The stream carries its own checksums and END
//! record, so a file that is truncated or damaged is refused on restore.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use xe_vf_plugin::state_format::FORMAT_VERSION;
use xe_vf_plugin::DeviceIdentity;

/// The VF's section of `state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XeVfSnapshotState {
    /// Device-state stream format version of `data_file`.
    pub format_version: u16,
    /// `xe-vf` (Xe packet stream) or `vfio` (opaque).
    pub device_kind: String,
    /// The VF the state was taken from; a restore target must match.
    pub identity: DeviceIdentity,
    pub migration_flags: u64,
    /// `MIG_DATA_SIZE` at snapshot time, an estimate of the device data's
    /// length (0 if unknown); the data file's END record has the real one.
    #[serde(alias = "expected_size")]
    pub estimated_size: u64,
    /// File name of the device data, relative to the snapshot directory.
    pub data_file: String,
}

impl XeVfSnapshotState {
    pub fn format_supported(&self) -> bool {
        self.format_version == FORMAT_VERSION
    }
}

#[derive(Debug, Error)]
pub enum SnapshotPathError {
    #[error("snapshot URL '{0}' is not a file:// URL")]
    NotFileUrl(String),
    #[error("snapshot URL '{0}' names no directory")]
    EmptyPath(String),
    #[error("data file name '{0}' is not a plain file name inside the snapshot directory")]
    BadFileName(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The directory of a `file:///dir` URL, as CH's `vm.snapshot` takes it.
pub fn snapshot_dir(url: &str) -> Result<PathBuf, SnapshotPathError> {
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| SnapshotPathError::NotFileUrl(url.to_string()))?;
    if path.is_empty() {
        return Err(SnapshotPathError::EmptyPath(url.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// File name for a device id: ids are user-chosen, so anything outside a
/// safe set is hex-escaped and the name can never leave the directory.
pub fn data_file_name(device_id: &str) -> String {
    let mut name = String::from("xe-vf-");
    for b in device_id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02x}"));
        }
    }
    name.push_str(".bin");
    name
}

/// Checks a data file name read from a (possibly hostile) `state.json`.
pub fn check_data_file_name(name: &str) -> Result<(), SnapshotPathError> {
    let plain = Path::new(name).file_name().and_then(|f| f.to_str()) == Some(name);
    let ok = plain
        && name.starts_with("xe-vf-")
        && name.ends_with(".bin")
        && name.len() <= 255
        && !name.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(SnapshotPathError::BadFileName(name.to_string()))
    }
}

/// Opens the data file of a snapshot for reading, refusing names that
/// escape the directory and symlinks.
pub fn open_data_file(dir: &Path, name: &str) -> Result<File, SnapshotPathError> {
    check_data_file_name(name)?;
    let path = dir.join(name);
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|source| SnapshotPathError::Io { path, source })
}

/// A data file being written: `<name>.partial` until [`commit`](Self::commit).
pub struct PendingDataFile {
    file: File,
    partial: PathBuf,
    target: PathBuf,
    dir: PathBuf,
}

impl PendingDataFile {
    pub fn create(dir: &Path, name: &str) -> Result<Self, SnapshotPathError> {
        check_data_file_name(name)?;
        let target = dir.join(name);
        let partial = dir.join(format!("{name}.partial"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&partial)
            .map_err(|source| SnapshotPathError::Io {
                path: partial.clone(),
                source,
            })?;
        Ok(PendingDataFile {
            file,
            partial,
            target,
            dir: dir.to_path_buf(),
        })
    }

    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Syncs the data, renames it into place and syncs the directory, so
    /// after a crash the file is either absent or complete.
    pub fn commit(self) -> Result<PathBuf, SnapshotPathError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotPathError::Io { path, source }
        };
        self.file.sync_all().map_err(io_err(&self.partial))?;
        fs::rename(&self.partial, &self.target).map_err(io_err(&self.target))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        Ok(self.target)
    }

    /// Removes the partial file (after a failed save).
    pub fn discard(self) {
        let _ = fs::remove_file(&self.partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            snapshot_dir("file:///tmp/snap").unwrap(),
            PathBuf::from("/tmp/snap")
        );
        assert!(matches!(
            snapshot_dir("tcp:1.2.3.4:5"),
            Err(SnapshotPathError::NotFileUrl(_))
        ));
        assert!(matches!(
            snapshot_dir("file://"),
            Err(SnapshotPathError::EmptyPath(_))
        ));
    }

    #[test]
    fn names_never_escape_the_directory() {
        assert_eq!(data_file_name("gpu0"), "xe-vf-gpu0.bin");
        assert_eq!(data_file_name("../x"), "xe-vf-%2e%2e%2fx.bin");
        for id in ["a/b", "..", "/etc/passwd", "x\0y", "é"] {
            check_data_file_name(&data_file_name(id)).unwrap();
        }
        for bad in [
            "../xe-vf-a.bin",
            "xe-vf-a.bin/..",
            "/tmp/xe-vf-a.bin",
            "state.json",
            "xe-vf-a.bin\0",
            "",
            "sub/xe-vf-a.bin",
        ] {
            assert!(check_data_file_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pending_file_is_invisible_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let mut pending = PendingDataFile::create(dir.path(), "xe-vf-a.bin").unwrap();
        use std::io::Write;
        pending.file().write_all(b"data").unwrap();
        assert!(!dir.path().join("xe-vf-a.bin").exists());
        assert!(open_data_file(dir.path(), "xe-vf-a.bin").is_err());
        let path = pending.commit().unwrap();
        assert_eq!(fs::read(path).unwrap(), b"data");
        assert!(!dir.path().join("xe-vf-a.bin.partial").exists());

        let pending = PendingDataFile::create(dir.path(), "xe-vf-b.bin").unwrap();
        pending.discard();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn section_written_with_the_old_expected_size_name_reads() {
        let section: XeVfSnapshotState = serde_json::from_str(
            r#"{"format_version": 1, "device_kind": "xe-vf",
                "identity": {"vendor_id": 32902, "device_id": 57867,
                             "revision_id": 0, "vram_size": 8388608},
                "migration_flags": 5, "expected_size": 4242,
                "data_file": "xe-vf-gpu0.bin"}"#,
        )
        .unwrap();
        assert_eq!(section.estimated_size, 4242);
        let json = serde_json::to_value(&section).unwrap();
        assert_eq!(json["estimated_size"], 4242);
        assert!(json.get("expected_size").is_none());
    }

    #[test]
    fn symlinked_data_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("xe-vf-a.bin")).unwrap();
        assert!(open_data_file(dir.path(), "xe-vf-a.bin").is_err());
    }
}
