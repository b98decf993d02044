// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What sysfs tells about a VFIO device without opening it: its PCI ids or
//! mdev type, and its driver.
//!
//! A migration destination checks the device it will load into against the
//! source's before the source stops anything; at that point the
//! destination's device is not open yet (Cloud Hypervisor creates devices
//! only when the VM state arrives), and a VFIO cdev cannot even read its
//! config space before it is bound to an iommufd. sysfs answers without
//! touching the device, for a `path=` as for an `fd=` (through the cdev's
//! `vfio-dev` class entry).

use std::fmt;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sysfs::{read_pci_ids, PciIds};

/// Where a VFIO cdev's sysfs entry lives (`/sys/class/vfio-dev/vfioN`).
const VFIO_DEV_CLASS: &str = "/sys/class/vfio-dev";

/// The sysfs facts that decide whether two devices can exchange state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// `vendor:device` and revision, for a PCI function.
    pub pci_ids: Option<(u16, u16, u8)>,
    /// The mdev type (`mtty-2`), for a mediated device.
    pub mdev_type: Option<String>,
    /// The bound driver (`xe-vfio-pci`, `vfio-pci`, `mtty`...).
    pub driver: Option<String>,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some((vendor, device, revision)) = self.pci_ids {
            parts.push(format!("pci {vendor:04x}:{device:04x} rev {revision:02x}"));
        }
        if let Some(t) = &self.mdev_type {
            parts.push(format!("mdev type {t}"));
        }
        if let Some(d) = &self.driver {
            parts.push(format!("driver {d}"));
        }
        if parts.is_empty() {
            write!(f, "unknown device")
        } else {
            write!(f, "{}", parts.join(", "))
        }
    }
}

fn link_name(link: &Path) -> Option<String> {
    let target = link.read_link().ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

impl Placement {
    /// Reads a device directory (`/sys/bus/pci/devices/<bdf>`,
    /// `/sys/bus/mdev/devices/<uuid>`); what cannot be read stays `None`.
    pub fn of_sysfs_dir(dir: &Path) -> Placement {
        Placement {
            pci_ids: read_pci_ids(dir).map(
                |PciIds {
                     vendor_id,
                     device_id,
                     revision_id,
                 }| (vendor_id, device_id, revision_id),
            ),
            mdev_type: link_name(&dir.join("mdev_type")),
            driver: link_name(&dir.join("driver")),
        }
    }

    /// Reads the device behind an open VFIO cdev fd, via
    /// `/proc/self/fd` and the `vfio-dev` class; `None` if `fd` is not a
    /// VFIO cdev (a group-opened device fd has no sysfs entry of its own).
    pub fn of_cdev_fd(fd: RawFd) -> Option<Placement> {
        Self::sysfs_dir_of_cdev_fd(fd).map(|dir| Self::of_sysfs_dir(&dir))
    }

    /// The sysfs device directory behind a VFIO cdev fd.
    pub fn sysfs_dir_of_cdev_fd(fd: RawFd) -> Option<PathBuf> {
        let node = Path::new("/proc/self/fd")
            .join(fd.to_string())
            .read_link()
            .ok()?;
        if node.parent() != Some(Path::new("/dev/vfio/devices")) {
            return None;
        }
        let name = node.file_name()?;
        Path::new(VFIO_DEV_CLASS)
            .join(name)
            .join("device")
            .canonicalize()
            .ok()
    }

    /// Whether this device is an Intel Xe VF bound to its migration
    /// driver, whose stream the engine can parse and check.
    pub fn is_xe_vf(&self) -> bool {
        self.driver.as_deref() == Some("xe-vfio-pci")
            && self.pci_ids.is_some_and(|(vendor, _, _)| vendor == 0x8086)
    }

    /// Whether state saved from `source` can load into this device, as far
    /// as sysfs tells; facts missing on either side are not held against
    /// it (the engine checks the identity again before loading).
    pub fn check_source(&self, source: &Placement) -> Result<(), String> {
        let mut problems = Vec::new();
        if let (Some(src), Some(dst)) = (source.pci_ids, self.pci_ids) {
            if src != dst {
                problems.push(format!(
                    "PCI ids {:04x}:{:04x} rev {:02x} != {:04x}:{:04x} rev {:02x}",
                    src.0, src.1, src.2, dst.0, dst.1, dst.2
                ));
            }
        }
        match (&source.mdev_type, &self.mdev_type) {
            (Some(src), Some(dst)) if src != dst => {
                problems.push(format!("mdev type {src} != {dst}"))
            }
            (Some(src), None) if self.pci_ids.is_some() => problems.push(format!(
                "source is an mdev of type {src}, this is a PCI function"
            )),
            (None, Some(dst)) if source.pci_ids.is_some() => problems.push(format!(
                "source is a PCI function, this is an mdev of type {dst}"
            )),
            _ => {}
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "source ({source}) cannot load into this device ({self}): {}",
                problems.join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    fn pci_dir(root: &Path, vendor: &str, device: &str, rev: &str, driver: &str) -> PathBuf {
        let dir = root.join("0000:03:00.1");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vendor"), format!("{vendor}\n")).unwrap();
        fs::write(dir.join("device"), format!("{device}\n")).unwrap();
        fs::write(dir.join("revision"), format!("{rev}\n")).unwrap();
        symlink(
            format!("../../bus/pci/drivers/{driver}"),
            dir.join("driver"),
        )
        .unwrap();
        dir
    }

    fn mdev_dir(root: &Path, kind: &str) -> PathBuf {
        let dir = root.join("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
        fs::create_dir_all(&dir).unwrap();
        symlink(
            format!("../../../devices/virtual/mtty/mtty/mdev_supported_types/{kind}"),
            dir.join("mdev_type"),
        )
        .unwrap();
        symlink("../../../bus/mdev/drivers/vfio_mdev", dir.join("driver")).unwrap();
        dir
    }

    #[test]
    fn reads_a_pci_function_and_an_mdev() {
        let tmp = tempfile::tempdir().unwrap();
        let xe = Placement::of_sysfs_dir(&pci_dir(
            tmp.path(),
            "0x8086",
            "0xe20b",
            "0x00",
            "xe-vfio-pci",
        ));
        assert_eq!(xe.pci_ids, Some((0x8086, 0xe20b, 0)));
        assert_eq!(xe.mdev_type, None);
        assert_eq!(xe.driver.as_deref(), Some("xe-vfio-pci"));
        assert!(xe.is_xe_vf());
        assert_eq!(xe.to_string(), "pci 8086:e20b rev 00, driver xe-vfio-pci");

        let tmp = tempfile::tempdir().unwrap();
        let mdev = Placement::of_sysfs_dir(&mdev_dir(tmp.path(), "mtty-2"));
        assert_eq!(mdev.pci_ids, None);
        assert_eq!(mdev.mdev_type.as_deref(), Some("mtty-2"));
        assert!(!mdev.is_xe_vf());

        let nothing = Placement::of_sysfs_dir(Path::new("/nonexistent/device"));
        assert_eq!(nothing, Placement::default());
        assert_eq!(nothing.to_string(), "unknown device");
    }

    #[test]
    fn only_an_xe_vf_on_its_driver_is_one() {
        let tmp = tempfile::tempdir().unwrap();
        let plain =
            Placement::of_sysfs_dir(&pci_dir(tmp.path(), "0x8086", "0xe20b", "0x00", "vfio-pci"));
        assert!(!plain.is_xe_vf());
        let tmp = tempfile::tempdir().unwrap();
        let other = Placement::of_sysfs_dir(&pci_dir(
            tmp.path(),
            "0x10de",
            "0x2941",
            "0xa1",
            "xe-vfio-pci",
        ));
        assert!(!other.is_xe_vf());
    }

    #[test]
    fn mismatches_are_named_and_unknowns_pass() {
        let xe = |device| Placement {
            pci_ids: Some((0x8086, device, 0)),
            mdev_type: None,
            driver: Some("xe-vfio-pci".into()),
        };
        let mtty = |kind: &str| Placement {
            pci_ids: None,
            mdev_type: Some(kind.into()),
            driver: None,
        };
        xe(0xe20b).check_source(&xe(0xe20b)).unwrap();
        mtty("mtty-2").check_source(&mtty("mtty-2")).unwrap();

        let e = xe(0xe20b).check_source(&xe(0xe20c)).unwrap_err();
        assert!(
            e.contains("PCI ids 8086:e20c rev 00 != 8086:e20b rev 00"),
            "{e}"
        );
        let e = mtty("mtty-1").check_source(&mtty("mtty-2")).unwrap_err();
        assert!(e.contains("mdev type mtty-2 != mtty-1"), "{e}");
        let e = xe(0xe20b).check_source(&mtty("mtty-2")).unwrap_err();
        assert!(e.contains("source is an mdev of type mtty-2"), "{e}");
        let e = mtty("mtty-2").check_source(&xe(0xe20b)).unwrap_err();
        assert!(e.contains("source is a PCI function"), "{e}");

        // Nothing known on one side: left to the engine's identity check.
        Placement::default().check_source(&xe(0xe20b)).unwrap();
        xe(0xe20b).check_source(&Placement::default()).unwrap();
    }

    #[test]
    fn a_non_cdev_fd_has_no_placement() {
        let file = tempfile::tempfile().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        assert_eq!(Placement::of_cdev_fd(fd), None);
        assert_eq!(Placement::of_cdev_fd(-1), None);
    }
}
