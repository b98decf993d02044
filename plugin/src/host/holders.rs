// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Which processes hold a device's nodes open, found the way `lsof` and
//! `fuser` find them: through the `/proc/<pid>/fd` links.
//!
//! A VF whose VFIO group or cdev is open belongs to a running VMM: it must
//! not be unbound (the unbind would block until the VMM lets go) nor
//! opened by us (the open would fail with EBUSY, or reset a device a
//! guest uses).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::root::HostRoot;

/// A process holding one of the nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub pid: u32,
    /// `/proc/<pid>/comm`.
    pub comm: String,
    pub node: PathBuf,
}

/// Outcome of a scan.
#[derive(Debug, Default)]
pub struct Scan {
    pub holders: Vec<Holder>,
    /// `false` when some `/proc/<pid>/fd` could not be read (not root).
    pub complete: bool,
}

/// Finds the processes that hold any of `nodes` (kernel paths) open.
pub fn scan(root: &HostRoot, nodes: &[PathBuf]) -> Scan {
    let mut scan = Scan {
        holders: Vec::new(),
        complete: true,
    };
    if nodes.is_empty() {
        return scan;
    }
    let proc_dir = Path::new("/proc");
    for entry in root.list(proc_dir) {
        let Ok(pid) = entry.parse::<u32>() else {
            continue;
        };
        let fd_dir = proc_dir.join(&entry).join("fd");
        let fds = match root.try_list(&fd_dir) {
            Ok(fds) => fds,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                scan.complete = false;
                continue;
            }
            // The process exited while we looked.
            Err(_) => continue,
        };
        for fd in fds {
            let Ok(target) = root.link_target(&fd_dir.join(&fd)) else {
                continue;
            };
            if let Some(node) = nodes.iter().find(|n| **n == target) {
                let comm = root
                    .attr(&proc_dir.join(&entry).join("comm"))
                    .unwrap_or_default();
                let holder = Holder {
                    pid,
                    comm,
                    node: node.clone(),
                };
                if !scan.holders.contains(&holder) {
                    scan.holders.push(holder);
                }
            }
        }
    }
    scan
}

/// `pid 1234 (cloud-hypervisor) holds /dev/vfio/12`, joined with `; `.
pub fn describe(holders: &[Holder]) -> String {
    holders
        .iter()
        .map(|h| format!("pid {} ({}) holds {}", h.pid, h.comm, h.node.display()))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn holders_are_found_by_their_fd_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        for (pid, comm, targets) in [
            ("41", "cloud-hypervis", vec!["/dev/vfio/12", "/dev/null"]),
            ("42", "bash", vec!["/dev/pts/0"]),
            (
                "43",
                "qemu",
                vec!["/dev/vfio/devices/vfio3", "/dev/vfio/12"],
            ),
        ] {
            let fd_dir = dir.path().join("proc").join(pid).join("fd");
            fs::create_dir_all(&fd_dir).unwrap();
            fs::write(
                dir.path().join("proc").join(pid).join("comm"),
                format!("{comm}\n"),
            )
            .unwrap();
            for (n, t) in targets.iter().enumerate() {
                symlink(t, fd_dir.join(n.to_string())).unwrap();
            }
        }
        fs::create_dir_all(dir.path().join("proc/self")).unwrap();
        let nodes = [
            PathBuf::from("/dev/vfio/12"),
            PathBuf::from("/dev/vfio/devices/vfio3"),
        ];
        let scan = scan(&root, &nodes);
        assert!(scan.complete);
        assert_eq!(
            scan.holders
                .iter()
                .map(|h| (h.pid, h.comm.as_str(), h.node.to_str().unwrap()))
                .collect::<Vec<_>>(),
            vec![
                (41, "cloud-hypervis", "/dev/vfio/12"),
                (43, "qemu", "/dev/vfio/devices/vfio3"),
                (43, "qemu", "/dev/vfio/12"),
            ]
        );
        assert_eq!(
            describe(&scan.holders[..1]),
            "pid 41 (cloud-hypervis) holds /dev/vfio/12"
        );
        assert!(super::scan(&root, &[]).holders.is_empty());
    }
}
