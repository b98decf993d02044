// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What sysfs and `/dev/vfio` must provide before a device can be opened,
//! and the identity sysfs reports.
//!
//! The checks run before vfio-ioctls is called so a missing piece is named
//! in our error (vfio-ioctls only says "invalid path").

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::device::{DeviceError, Result};

/// Where the kernel puts the VFIO container and group nodes.
pub(crate) const DEV_VFIO: &str = "/dev/vfio";

/// sysfs attribute files are short; anything longer is not what we expect.
const MAX_ATTR_LEN: u64 = 64;

/// A sysfs device ready to be opened through its VFIO group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupDevice {
    /// IOMMU group number, from the `iommu_group` link.
    pub(crate) group: u32,
    /// Name the group knows the device by: the PCI address or the mdev uuid.
    pub(crate) name: String,
}

fn not_found(path: &Path, reason: impl Into<String>) -> DeviceError {
    DeviceError::NotFound {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Name of the driver bound to the device (the `driver` link's target),
/// `None` when no driver is bound.
pub(crate) fn driver_name(sysfs_path: &Path) -> Option<String> {
    let link = sysfs_path.join("driver").read_link().ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// The device's IOMMU group number, from its `iommu_group` link; the
/// error says why there is none.
pub(crate) fn iommu_group(sysfs_path: &Path) -> std::result::Result<u32, String> {
    let target = sysfs_path.join("iommu_group").read_link().map_err(|e| {
        format!("no iommu_group link ({e}): the IOMMU is off or the device is not bound to a VFIO driver")
    })?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| {
            format!(
                "iommu_group link points to {}, not a group number",
                target.display()
            )
        })
}

/// Checks, in order, that the sysfs device exists, sits in an IOMMU group,
/// and that `dev_vfio` has the container and that group's node.
///
/// Works for a PCI device (`/sys/bus/pci/devices/0000:03:00.1`) and an mdev
/// (`/sys/bus/mdev/devices/<uuid>`): both have an `iommu_group` link, and
/// the group knows the device by the directory's name, as vfio-ioctls
/// assumes.
pub(crate) fn check_group_device(sysfs_path: &Path, dev_vfio: &Path) -> Result<GroupDevice> {
    if !sysfs_path.is_dir() {
        return Err(not_found(
            sysfs_path,
            "no such sysfs device directory (expected /sys/bus/pci/devices/<bdf> or /sys/bus/mdev/devices/<uuid>)",
        ));
    }
    let name = sysfs_path
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| not_found(sysfs_path, "the path does not end in a device name"))?;
    let group = iommu_group(sysfs_path).map_err(|reason| not_found(sysfs_path, reason))?;
    let container = dev_vfio.join("vfio");
    if !container.exists() {
        return Err(not_found(
            sysfs_path,
            format!(
                "{} is missing: the vfio module is not loaded (modprobe vfio-pci)",
                container.display()
            ),
        ));
    }
    let group_node = dev_vfio.join(group.to_string());
    if !group_node.exists() {
        let driver = driver_name(sysfs_path).unwrap_or_else(|| "none".to_string());
        return Err(not_found(
            sysfs_path,
            format!(
                "{} is missing: IOMMU group {group} has no VFIO node (bound driver: {driver}; bind a VFIO driver such as xe-vfio-pci or vfio-pci, or an mdev parent with VFIO support)",
                group_node.display()
            ),
        ));
    }
    Ok(GroupDevice { group, name })
}

/// Reads a short hex attribute such as `vendor` (`0x8086\n`).
pub(crate) fn read_hex_attr(path: &Path) -> Option<u64> {
    let mut text = String::new();
    File::open(path)
        .ok()?
        .take(MAX_ATTR_LEN)
        .read_to_string(&mut text)
        .ok()?;
    let text = text.trim();
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    u64::from_str_radix(digits, 16).ok()
}

/// PCI ids from sysfs; `None` when the directory has none (mdev devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PciIds {
    pub(crate) vendor_id: u16,
    pub(crate) device_id: u16,
    pub(crate) revision_id: u8,
}

/// Reads `vendor`, `device` and `revision` of a PCI sysfs device. All three
/// must be present and in range; a missing `revision` (very old kernels)
/// counts as 0.
pub(crate) fn read_pci_ids(sysfs_path: &Path) -> Option<PciIds> {
    let attr = |name: &str| read_hex_attr(&sysfs_path.join(name));
    let vendor_id = u16::try_from(attr("vendor")?).ok()?;
    let device_id = u16::try_from(attr("device")?).ok()?;
    let revision_id = match attr("revision") {
        Some(r) => u8::try_from(r).ok()?,
        None => 0,
    };
    Some(PciIds {
        vendor_id,
        device_id,
        revision_id,
    })
}

/// Decodes the ids from the first 12 bytes of PCI config space; `None` if
/// the read gave nothing usable (all ones or zeros).
pub(crate) fn pci_ids_from_config(config: &[u8; 12]) -> Option<PciIds> {
    let vendor_id = u16::from_le_bytes([config[0], config[1]]);
    let device_id = u16::from_le_bytes([config[2], config[3]]);
    if vendor_id == 0xffff || vendor_id == 0 {
        return None;
    }
    Some(PciIds {
        vendor_id,
        device_id,
        revision_id: config[8],
    })
}

/// The canonical path, for messages; the given one if it cannot be resolved.
pub(crate) fn display_path(sysfs_path: &Path) -> PathBuf {
    sysfs_path
        .canonicalize()
        .unwrap_or_else(|_| sysfs_path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// A fake sysfs device `name` in group `group`, and an empty /dev/vfio.
    fn fake(name: &str, group: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("sys").join(name);
        fs::create_dir_all(&dev).unwrap();
        symlink(
            format!("../../kernel/iommu_groups/{group}"),
            dev.join("iommu_group"),
        )
        .unwrap();
        let dev_vfio = root.path().join("dev-vfio");
        fs::create_dir(&dev_vfio).unwrap();
        (root, dev, dev_vfio)
    }

    fn reason(err: DeviceError) -> (String, String) {
        match err {
            DeviceError::NotFound { path, reason } => (path, reason),
            other => panic!("expected NotFound, got {other:?}"),
        }
    }

    #[test]
    fn nonexistent_device_is_not_found_with_its_path() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("0000:99:00.7");
        let err = check_group_device(&missing, Path::new(DEV_VFIO)).unwrap_err();
        let msg = err.to_string();
        let (path, _) = reason(err);
        assert_eq!(path, missing.display().to_string());
        assert!(msg.contains("0000:99:00.7"), "{msg}");
    }

    #[test]
    fn device_without_iommu_group_is_not_found() {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("0000:03:00.1");
        fs::create_dir(&dev).unwrap();
        let (_, why) = reason(check_group_device(&dev, root.path()).unwrap_err());
        assert!(why.contains("iommu_group"), "{why}");
    }

    #[test]
    fn missing_dev_vfio_is_named() {
        let (_root, dev, dev_vfio) = fake("0000:03:00.1", "7");
        let (_, why) = reason(check_group_device(&dev, &dev_vfio).unwrap_err());
        assert!(
            why.contains(&dev_vfio.join("vfio").display().to_string()),
            "{why}"
        );
        let (_, why) = reason(check_group_device(&dev, &dev_vfio.join("absent")).unwrap_err());
        assert!(why.contains("vfio module"), "{why}");
    }

    #[test]
    fn missing_group_node_is_named() {
        let (_root, dev, dev_vfio) = fake("0000:03:00.1", "7");
        fs::write(dev_vfio.join("vfio"), b"").unwrap();
        let (_, why) = reason(check_group_device(&dev, &dev_vfio).unwrap_err());
        assert!(
            why.contains(&dev_vfio.join("7").display().to_string()),
            "{why}"
        );
        assert!(why.contains("group 7"), "{why}");
    }

    #[test]
    fn mdev_uuid_and_group_are_found() {
        let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
        let (_root, dev, dev_vfio) = fake(uuid, "12");
        fs::write(dev_vfio.join("vfio"), b"").unwrap();
        fs::write(dev_vfio.join("12"), b"").unwrap();
        let found = check_group_device(&dev, &dev_vfio).unwrap();
        assert_eq!(
            found,
            GroupDevice {
                group: 12,
                name: uuid.to_string()
            }
        );
    }

    #[test]
    fn bad_group_link_is_rejected() {
        let (_root, dev, dev_vfio) = fake("0000:03:00.1", "not-a-number");
        let (_, why) = reason(check_group_device(&dev, &dev_vfio).unwrap_err());
        assert!(why.contains("not a group number"), "{why}");
    }

    #[test]
    fn pci_ids_are_read_from_sysfs() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("vendor"), "0x8086\n").unwrap();
        fs::write(root.path().join("device"), "0xe212\n").unwrap();
        fs::write(root.path().join("revision"), "0x04\n").unwrap();
        assert_eq!(
            read_pci_ids(root.path()),
            Some(PciIds {
                vendor_id: 0x8086,
                device_id: 0xe212,
                revision_id: 4
            })
        );
        fs::write(root.path().join("revision"), "0x104\n").unwrap();
        assert_eq!(read_pci_ids(root.path()), None);
        fs::write(root.path().join("vendor"), "garbage").unwrap();
        assert_eq!(read_pci_ids(root.path()), None);
    }

    #[test]
    fn mdev_has_no_sysfs_ids() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(read_pci_ids(root.path()), None);
    }

    #[test]
    fn pci_ids_from_config_space() {
        // mtty's config space starts with 0x4348:0x3253.
        let cfg = [0x48, 0x43, 0x53, 0x32, 0, 0, 0, 0, 0x10, 0, 0, 0];
        assert_eq!(
            pci_ids_from_config(&cfg),
            Some(PciIds {
                vendor_id: 0x4348,
                device_id: 0x3253,
                revision_id: 0x10
            })
        );
        assert_eq!(pci_ids_from_config(&[0xff; 12]), None);
        assert_eq!(pci_ids_from_config(&[0; 12]), None);
    }
}
