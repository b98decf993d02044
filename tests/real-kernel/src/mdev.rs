// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What sysfs says about one mdev instance: its uuid, type and IOMMU group.

use std::fs;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct MdevInfo {
    pub sysfs_path: String,
    pub uuid: String,
    /// Directory name of the type, e.g. `mtty-2`.
    pub mdev_type: String,
    /// The type's `name` attribute, e.g. `Dual port mtty`.
    pub mdev_type_name: String,
    pub iommu_group: u32,
    /// The group's character device, which must exist for VFIO to open it.
    pub group_node: String,
}

/// Last path component of a symlink's target.
fn link_basename(link: &Path) -> anyhow::Result<String> {
    let target = fs::read_link(link).with_context(|| format!("reading link {}", link.display()))?;
    target
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .with_context(|| format!("{} points at {}", link.display(), target.display()))
}

impl MdevInfo {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(
            path.is_dir(),
            "{} is not a device directory",
            path.display()
        );
        let uuid = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no device name", path.display()))?;
        let mdev_type = link_basename(&path.join("mdev_type"))?;
        let type_name_path = path.join("mdev_type").join("name");
        let mdev_type_name = fs::read_to_string(&type_name_path)
            .with_context(|| format!("reading {}", type_name_path.display()))?
            .trim()
            .to_string();
        let group = link_basename(&path.join("iommu_group"))?;
        let iommu_group: u32 = group
            .parse()
            .with_context(|| format!("iommu_group {group:?} is not a number"))?;
        let group_node = format!("/dev/vfio/{iommu_group}");
        anyhow::ensure!(
            Path::new(&group_node).exists(),
            "{group_node} missing for {uuid}"
        );
        Ok(MdevInfo {
            sysfs_path: path.display().to_string(),
            uuid,
            mdev_type,
            mdev_type_name,
            iommu_group,
            group_node,
        })
    }
}
