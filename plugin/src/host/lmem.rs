// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VF's LMEM (VRAM) quota, where the xe driver exposes it.
//!
//! The quota bounds the VF's migration data: its VRAM moves in the
//! STOP_COPY stream, while the VM is paused. VFIO does not report it, so
//! it is read from the PF driver's files. Where they live depends on the
//! kernel; the paths below were read from the xe driver's sources, not
//! seen on hardware, and are tried in this order:
//!
//! 1. sysfs, `/sys/bus/pci/devices/<PF>/sriov_admin/vf<N>/profile/vram_quota`
//!    (bytes; `xe_sriov_pf_sysfs.c` in kernels whose `sriov_admin` tree has
//!    `vram_quota`; earlier `sriov_admin` trees have no quota file);
//! 2. debugfs (root, debugfs mounted), one file per tile:
//!    `/sys/kernel/debug/dri/<PF>/sriov/vf<N>/tile<T>/vram_quota`
//!    (`xe_tile_sriov_pf_debugfs.c`, the tree with `sriov/`);
//! 3. debugfs of older kernels, one file per GT that owns LMEM (media GTs
//!    have none): `/sys/kernel/debug/dri/<D>/gt<G>/vf<N>/lmem_quota`, or
//!    `.../tile<T>/gt<G>/vf<N>/lmem_quota`, `<D>` being the PF address or
//!    its DRM card minor (`xe_gt_sriov_pf_debugfs.c`).
//!
//! Per-tile or per-GT values are summed. Anything else: the quota is
//! unknown and `list`/`check` say so.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::device::PCI_DEVICES;
use super::root::HostRoot;

const DEBUGFS_DRI: &str = "/sys/kernel/debug/dri";

/// A VF's quota and the files it was read from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LmemQuota {
    pub bytes: u64,
    pub sources: Vec<PathBuf>,
}

/// Reads the quota of VF `vf` (1-based) of PF `pf` (PCI address).
pub fn vf_quota(root: &HostRoot, pf: &str, vf: u32) -> Option<LmemQuota> {
    let pf_dir = Path::new(PCI_DEVICES).join(pf);
    let sysfs = pf_dir
        .join("sriov_admin")
        .join(format!("vf{vf}"))
        .join("profile")
        .join("vram_quota");
    if let Some(bytes) = root.number_attr(&sysfs) {
        return Some(LmemQuota {
            bytes,
            sources: vec![sysfs],
        });
    }
    // debugfs names the device by PCI address, older kernels by minor.
    let mut dri_dirs = vec![Path::new(DEBUGFS_DRI).join(pf)];
    dri_dirs.extend(
        root.list(&pf_dir.join("drm"))
            .into_iter()
            .filter_map(|n| n.strip_prefix("card").map(str::to_owned))
            .map(|minor| Path::new(DEBUGFS_DRI).join(minor)),
    );
    let vf_dir = format!("vf{vf}");
    for dri in &dri_dirs {
        let candidates: [Vec<PathBuf>; 3] = [
            prefixed(root, &dri.join("sriov").join(&vf_dir), "tile")
                .into_iter()
                .map(|tile| tile.join("vram_quota"))
                .collect(),
            prefixed(root, dri, "gt")
                .into_iter()
                .map(|gt| gt.join(&vf_dir).join("lmem_quota"))
                .collect(),
            prefixed(root, dri, "tile")
                .into_iter()
                .flat_map(|tile| prefixed(root, &tile, "gt"))
                .map(|gt| gt.join(&vf_dir).join("lmem_quota"))
                .collect(),
        ];
        for files in candidates {
            if let Some(quota) = sum(root, files) {
                return Some(quota);
            }
        }
    }
    None
}

/// Entries of `dir` named `<prefix><number>`.
fn prefixed(root: &HostRoot, dir: &Path, prefix: &str) -> Vec<PathBuf> {
    root.list(dir)
        .into_iter()
        .filter(|n| {
            n.strip_prefix(prefix)
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|n| dir.join(n))
        .collect()
}

/// The sum of the readable files among `files`; `None` if none is.
fn sum(root: &HostRoot, files: Vec<PathBuf>) -> Option<LmemQuota> {
    let mut total = 0u64;
    let mut sources = Vec::new();
    for file in files {
        if let Some(bytes) = root.number_attr(&file) {
            total = total.saturating_add(bytes);
            sources.push(file);
        }
    }
    (!sources.is_empty()).then_some(LmemQuota {
        bytes: total,
        sources,
    })
}

/// `4 GiB`, `512 MiB`, `123456 B`: exact binary units, as quotas are.
pub fn human(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift {
            let value = bytes as f64 / (1u64 << shift) as f64;
            return if bytes.is_multiple_of(1 << shift) {
                format!("{} {unit}", bytes >> shift)
            } else {
                format!("{value:.1} {unit}")
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn put(root: &Path, path: &str, value: &str) {
        let file = root.join(path.trim_start_matches('/'));
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(file, value).unwrap();
    }

    #[test]
    fn sysfs_quota_wins() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        put(
            dir.path(),
            "/sys/bus/pci/devices/0000:03:00.0/sriov_admin/vf2/profile/vram_quota",
            "4294967296\n",
        );
        put(
            dir.path(),
            "/sys/kernel/debug/dri/0000:03:00.0/sriov/vf2/tile0/vram_quota",
            "1\n",
        );
        let q = vf_quota(&root, "0000:03:00.0", 2).unwrap();
        assert_eq!(q.bytes, 4 << 30);
        assert_eq!(
            q.sources,
            vec![PathBuf::from(
                "/sys/bus/pci/devices/0000:03:00.0/sriov_admin/vf2/profile/vram_quota"
            )]
        );
        assert_eq!(vf_quota(&root, "0000:03:00.0", 1), None);
    }

    #[test]
    fn debugfs_tiles_are_summed() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        fs::create_dir_all(dir.path().join("sys/bus/pci/devices/0000:03:00.0")).unwrap();
        put(
            dir.path(),
            "/sys/kernel/debug/dri/0000:03:00.0/sriov/vf1/tile0/vram_quota",
            "1073741824\n",
        );
        put(
            dir.path(),
            "/sys/kernel/debug/dri/0000:03:00.0/sriov/vf1/tile1/vram_quota",
            "1073741824\n",
        );
        let q = vf_quota(&root, "0000:03:00.0", 1).unwrap();
        assert_eq!(q.bytes, 2 << 30);
        assert_eq!(q.sources.len(), 2);
    }

    #[test]
    fn legacy_debugfs_by_card_minor() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        fs::create_dir_all(
            dir.path()
                .join("sys/bus/pci/devices/0000:03:00.0/drm/card1"),
        )
        .unwrap();
        fs::create_dir_all(
            dir.path()
                .join("sys/bus/pci/devices/0000:03:00.0/drm/renderD129"),
        )
        .unwrap();
        put(
            dir.path(),
            "/sys/kernel/debug/dri/1/gt0/vf3/lmem_quota",
            "536870912\n",
        );
        // The media GT has no LMEM file.
        fs::create_dir_all(dir.path().join("sys/kernel/debug/dri/1/gt1/vf3")).unwrap();
        let q = vf_quota(&root, "0000:03:00.0", 3).unwrap();
        assert_eq!(q.bytes, 512 << 20);
        assert_eq!(
            q.sources,
            vec![PathBuf::from("/sys/kernel/debug/dri/1/gt0/vf3/lmem_quota")]
        );
    }

    #[test]
    fn sizes_read_as_binary_units() {
        assert_eq!(human(4 << 30), "4 GiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(human(512 << 20), "512 MiB");
        assert_eq!(human(100), "100 B");
        assert_eq!(human(0), "0 B");
    }
}
