// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The one place the host commands touch the filesystem: sysfs, `/dev`,
//! `/proc`, `/etc` and debugfs, all below a root directory.
//!
//! On a host the root is `/`; tests point it at a fake tree. Paths are
//! kept as the kernel names them (`/sys/bus/pci/devices/0000:03:00.1`)
//! and resolved below the root only when read or written, so every message
//! and every printed `--device` line carries the real path. sysfs links are
//! relative, so they resolve inside a fake tree too.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// sysfs and debugfs attributes we read are one short line.
const MAX_ATTR_LEN: u64 = 4096;

/// A filesystem root: `/` on a host, a directory in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoot {
    root: PathBuf,
}

/// One write to a sysfs attribute, as `prepare` plans and prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysfsWrite {
    /// The attribute as the kernel names it.
    pub path: PathBuf,
    pub value: String,
}

impl fmt::Display for SysfsWrite {
    /// Shell form, so a `--dry-run` can be pasted into a root shell.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "echo {} > {}", self.value, self.path.display())
    }
}

impl HostRoot {
    /// The running system.
    pub fn system() -> Self {
        HostRoot {
            root: PathBuf::from("/"),
        }
    }

    /// A tree below `root` that stands in for `/`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        HostRoot { root: root.into() }
    }

    /// Whether this is the running system, whose device nodes can be opened.
    pub fn is_system(&self) -> bool {
        self.root == Path::new("/")
    }

    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Where the kernel path `path` (absolute) lives below the root.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        let relative: PathBuf = path
            .components()
            .filter(|c| !matches!(c, Component::RootDir | Component::Prefix(_)))
            .collect();
        self.root.join(relative)
    }

    pub fn exists(&self, path: &Path) -> bool {
        self.resolve(path).exists()
    }

    pub fn is_dir(&self, path: &Path) -> bool {
        self.resolve(path).is_dir()
    }

    /// Reads a one-line attribute, trimmed; longer files are cut at 4 KiB.
    pub fn read_attr(&self, path: &Path) -> io::Result<String> {
        let mut text = String::new();
        File::open(self.resolve(path))?
            .take(MAX_ATTR_LEN)
            .read_to_string(&mut text)?;
        Ok(text.trim().to_string())
    }

    /// [`Self::read_attr`], `None` when the attribute is missing or unreadable.
    pub fn attr(&self, path: &Path) -> Option<String> {
        self.read_attr(path).ok()
    }

    /// A decimal (or `0x` hex) number attribute.
    pub fn number_attr(&self, path: &Path) -> Option<u64> {
        parse_number(&self.attr(path)?)
    }

    /// The last component of a symlink's target (a driver's or group's
    /// name), `None` if `path` is no link.
    pub fn link_name(&self, path: &Path) -> Option<String> {
        let target = fs::read_link(self.resolve(path)).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    /// A symlink's target as stored (for `/proc/<pid>/fd/<n>`).
    pub fn link_target(&self, path: &Path) -> io::Result<PathBuf> {
        fs::read_link(self.resolve(path))
    }

    /// The kernel path a symlink points to, for links inside the tree
    /// (`physfn`, `virtfnN`): the target resolved against the link's
    /// directory, normalized.
    pub fn follow(&self, path: &Path) -> Option<PathBuf> {
        let target = fs::read_link(self.resolve(path)).ok()?;
        let base = path.parent()?;
        Some(normalize(&base.join(target)))
    }

    /// Names in a directory, sorted; empty if it cannot be read.
    pub fn list(&self, dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.resolve(dir))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Like [`Self::list`] but says why a directory could not be read.
    pub fn try_list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.resolve(dir))? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    /// Writes one sysfs attribute as `echo value > path` would. The file
    /// must exist: sysfs attributes are never created by writing.
    pub fn write(&self, w: &SysfsWrite) -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(self.resolve(&w.path))?;
        file.write_all(w.value.as_bytes())
    }

    /// Owner, group and mode of a node.
    pub fn metadata(&self, path: &Path) -> io::Result<fs::Metadata> {
        fs::metadata(self.resolve(path))
    }
}

/// Parses `123`, `0x7b` or `0X7B`, surrounding whitespace allowed.
pub fn parse_number(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Removes `.` and resolves `..` lexically (sysfs links hold no loops).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn kernel_paths_resolve_below_the_root() {
        let root = HostRoot::at("/tmp/fake");
        assert_eq!(
            root.resolve(Path::new("/sys/bus/pci/devices/0000:03:00.1")),
            Path::new("/tmp/fake/sys/bus/pci/devices/0000:03:00.1")
        );
        assert!(!root.is_system());
        assert!(HostRoot::system().is_system());
        assert_eq!(
            HostRoot::system().resolve(Path::new("/dev/vfio/7")),
            Path::new("/dev/vfio/7")
        );
    }

    #[test]
    fn links_are_followed_inside_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        let devices = dir.path().join("sys/devices/pci0000:00/0000:00:02.0");
        fs::create_dir_all(devices.join("0000:03:00.1")).unwrap();
        let bus = dir.path().join("sys/bus/pci/devices");
        fs::create_dir_all(&bus).unwrap();
        symlink(
            "../../../devices/pci0000:00/0000:00:02.0/0000:03:00.1",
            bus.join("0000:03:00.1"),
        )
        .unwrap();
        symlink("../0000:03:00.0", devices.join("0000:03:00.1/physfn")).unwrap();
        let vf = Path::new("/sys/bus/pci/devices/0000:03:00.1");
        assert_eq!(
            root.follow(vf),
            Some(PathBuf::from(
                "/sys/devices/pci0000:00/0000:00:02.0/0000:03:00.1"
            ))
        );
        assert_eq!(root.link_name(&vf.join("physfn")).unwrap(), "0000:03:00.0");
        assert_eq!(root.link_name(&vf.join("driver")), None);
    }

    #[test]
    fn attributes_are_trimmed_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        fs::write(dir.path().join("numvfs"), "7\n").unwrap();
        fs::write(dir.path().join("hex"), "0x8086\n").unwrap();
        fs::write(dir.path().join("big"), vec![b'x'; 10_000]).unwrap();
        assert_eq!(root.number_attr(Path::new("/numvfs")), Some(7));
        assert_eq!(root.number_attr(Path::new("/hex")), Some(0x8086));
        assert_eq!(root.attr(Path::new("/big")).unwrap().len(), 4096);
        assert_eq!(root.attr(Path::new("/absent")), None);
        assert_eq!(parse_number("garbage"), None);
    }

    #[test]
    fn writes_replace_existing_attributes_and_never_create_one() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        fs::write(dir.path().join("driver_override"), "(null)\n").unwrap();
        let w = SysfsWrite {
            path: PathBuf::from("/driver_override"),
            value: "xe-vfio-pci".to_string(),
        };
        root.write(&w).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("driver_override")).unwrap(),
            "xe-vfio-pci"
        );
        assert_eq!(w.to_string(), "echo xe-vfio-pci > /driver_override");
        let missing = SysfsWrite {
            path: PathBuf::from("/sriov_numvfs"),
            value: "2".to_string(),
        };
        assert_eq!(
            root.write(&missing).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(!dir.path().join("sriov_numvfs").exists());
    }
}
