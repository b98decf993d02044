// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Naming a device the way `lspci -s` and `mdevctl` do, and what sysfs
//! says about it: driver, IOMMU group, VFIO nodes, SR-IOV role.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::holders::{self, Holder};
use super::lmem::{self, LmemQuota};
use super::probe::Probe;
use super::root::HostRoot;
use super::HostError;

/// Where the kernel lists PCI functions.
pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// Where the kernel lists mediated devices.
pub const MDEV_DEVICES: &str = "/sys/bus/mdev/devices";
/// VFIO's legacy container and group nodes.
pub const DEV_VFIO: &str = "/dev/vfio";
/// VFIO device cdevs (`CONFIG_VFIO_DEVICE_CDEV`).
pub const DEV_VFIO_DEVICES: &str = "/dev/vfio/devices";
/// The iommufd node (`CONFIG_IOMMUFD`).
pub const DEV_IOMMU: &str = "/dev/iommu";

/// The bus a device sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    Pci,
    Mdev,
}

/// A device named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRef {
    pub bus: Bus,
    /// `0000:03:00.1` or the mdev uuid.
    pub name: String,
    /// The device's directory as the kernel names it.
    pub sysfs: PathBuf,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `DDDD:BB:DD.F` with a domain; `BB:DD.F` gets domain 0000, as in lspci.
fn pci_address(arg: &str) -> Option<String> {
    let full = if arg.matches(':').count() == 1 {
        format!("0000:{arg}")
    } else {
        arg.to_string()
    };
    let mut parts = full.split(':');
    let (domain, bus, slot_fn) = (parts.next()?, parts.next()?, parts.next()?);
    let (slot, function) = slot_fn.split_once('.')?;
    let valid = parts.next().is_none()
        && is_hex(domain, 4)
        && is_hex(bus, 2)
        && is_hex(slot, 2)
        && function.len() == 1
        && matches!(function.as_bytes()[0], b'0'..=b'7')
        && u8::from_str_radix(slot, 16).is_ok_and(|s| s < 32);
    valid.then(|| full.to_ascii_lowercase())
}

fn mdev_uuid(arg: &str) -> Option<String> {
    let groups: Vec<&str> = arg.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    (groups.len() == 5 && groups.iter().zip(lens).all(|(g, l)| is_hex(g, l)))
        .then(|| arg.to_ascii_lowercase())
}

impl DeviceRef {
    /// Accepts a PCI address (`0000:03:00.1`, `03:00.1`), an mdev uuid, or
    /// the device's directory under `/sys/bus/pci/devices` or
    /// `/sys/bus/mdev/devices`; the device must exist.
    pub fn parse(root: &HostRoot, arg: &str) -> Result<Self, HostError> {
        let bad = || HostError::BadDevice {
            arg: arg.to_string(),
        };
        let trimmed = arg.trim_end_matches('/');
        let (bus, name) = if let Some(rest) = trimmed.strip_prefix("/sys/bus/pci/devices/") {
            (Bus::Pci, pci_address(rest).ok_or_else(bad)?)
        } else if let Some(rest) = trimmed.strip_prefix("/sys/bus/mdev/devices/") {
            (Bus::Mdev, mdev_uuid(rest).ok_or_else(bad)?)
        } else if let Some(addr) = pci_address(trimmed) {
            (Bus::Pci, addr)
        } else if let Some(uuid) = mdev_uuid(trimmed) {
            (Bus::Mdev, uuid)
        } else {
            return Err(bad());
        };
        let dir = match bus {
            Bus::Pci => PCI_DEVICES,
            Bus::Mdev => MDEV_DEVICES,
        };
        let sysfs = Path::new(dir).join(&name);
        if !root.is_dir(&sysfs) {
            return Err(HostError::NoDevice {
                name,
                path: sysfs.display().to_string(),
            });
        }
        Ok(DeviceRef { bus, name, sysfs })
    }

    /// A PCI function by its canonical address, which must exist.
    pub fn pci(root: &HostRoot, address: &str) -> Result<Self, HostError> {
        Self::parse(root, address)
    }
}

/// What a device is in the SR-IOV picture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A PCI function that can create VFs (`sriov_totalvfs` present).
    Pf,
    Vf,
    Mdev,
    /// Any other PCI function.
    Pci,
}

/// SR-IOV state of a PF.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Sriov {
    pub total_vfs: u32,
    pub num_vfs: u32,
    /// `sriov_drivers_autoprobe`: whether new VFs get a driver at once.
    pub drivers_autoprobe: Option<bool>,
    /// Routing-ID offset and stride of VF 1 and the next ones, from which
    /// VF addresses follow before the VFs exist.
    pub offset: Option<u32>,
    pub stride: Option<u32>,
}

/// Everything sysfs says about one device, plus what opening it said.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceFacts {
    pub name: String,
    pub bus: Bus,
    pub sysfs_path: PathBuf,
    pub role: Role,
    pub vendor_id: Option<u16>,
    pub device_id: Option<u16>,
    /// `mdev_type` directory name, for mdevs.
    pub mdev_type: Option<String>,
    pub driver: Option<String>,
    /// `driver_override`, `None` when unset (`(null)`).
    pub driver_override: Option<String>,
    /// The PF of a VF, the parent device of an mdev.
    pub parent: Option<String>,
    /// 1-based VF number, as the xe driver counts VFs.
    pub vf_index: Option<u32>,
    pub sriov: Option<Sriov>,
    pub iommu_group: Option<u32>,
    /// `/dev/vfio/<group>`, when it exists.
    pub group_node: Option<PathBuf>,
    /// `/dev/vfio/devices/vfioN` named by the device's `vfio-dev` directory.
    pub vfio_cdev: Option<PathBuf>,
    pub lmem_quota: Option<LmemQuota>,
    /// Processes holding the device's VFIO or DRM nodes open.
    pub holders: Vec<Holder>,
    /// `false` when some processes' fds could not be read (not root).
    pub holders_complete: bool,
    pub migration: Probe,
}

impl DeviceFacts {
    /// `8086:e20b`, `-` when sysfs has no ids (mdevs).
    pub fn id_string(&self) -> String {
        match (self.vendor_id, self.device_id) {
            (Some(v), Some(d)) => format!("{v:04x}:{d:04x}"),
            _ => "-".to_string(),
        }
    }

    /// The nodes through which a process uses the device.
    pub fn nodes(&self) -> Vec<PathBuf> {
        self.group_node
            .iter()
            .chain(self.vfio_cdev.iter())
            .cloned()
            .collect()
    }

    /// Whether the device is usable through VFIO at all.
    pub fn is_vfio(&self) -> bool {
        self.group_node.is_some() || self.vfio_cdev.is_some()
    }
}

fn hex_id(root: &HostRoot, path: &Path) -> Option<u16> {
    crate::vfio::sysfs::read_hex_attr(&root.resolve(path)).and_then(|v| u16::try_from(v).ok())
}

/// Reads the SR-IOV attributes of a PCI function; `None` if it has none.
pub fn read_sriov(root: &HostRoot, sysfs: &Path) -> Option<Sriov> {
    let num = |name: &str| {
        root.number_attr(&sysfs.join(name))
            .and_then(|v| u32::try_from(v).ok())
    };
    Some(Sriov {
        total_vfs: num("sriov_totalvfs")?,
        num_vfs: num("sriov_numvfs").unwrap_or(0),
        drivers_autoprobe: num("sriov_drivers_autoprobe").map(|v| v != 0),
        offset: num("sriov_offset"),
        stride: num("sriov_stride"),
    })
}

/// The PF of a VF and the VF's 1-based number, from `physfn` and the PF's
/// `virtfnN` links.
fn vf_of(root: &HostRoot, sysfs: &Path) -> Option<(String, u32)> {
    let pf = root.link_name(&sysfs.join("physfn"))?;
    let pf_dir = Path::new(PCI_DEVICES).join(&pf);
    let me = sysfs.file_name()?.to_string_lossy().into_owned();
    let index = root.list(&pf_dir).into_iter().find_map(|entry| {
        let n: u32 = entry.strip_prefix("virtfn")?.parse().ok()?;
        (root.link_name(&pf_dir.join(&entry)).as_deref() == Some(me.as_str())).then_some(n + 1)
    })?;
    Some((pf, index))
}

/// `/dev/vfio/devices/vfioN` from the device's `vfio-dev/vfioN` entry,
/// if that node exists: the `vfio-dev` class device is there on every
/// kernel, the cdev only with `CONFIG_VFIO_DEVICE_CDEV` (Debian's 6.12
/// has the former without the latter).
fn vfio_cdev(root: &HostRoot, sysfs: &Path) -> Option<PathBuf> {
    let name = root
        .list(&sysfs.join("vfio-dev"))
        .into_iter()
        .find(|n| n.starts_with("vfio"))?;
    Some(Path::new(DEV_VFIO_DEVICES).join(name)).filter(|node| root.exists(node))
}

/// Reads everything sysfs holds about `dev`. `migration` is left
/// [`Probe::NotProbed`]; the caller decides whether to open the device.
pub fn read_facts(root: &HostRoot, dev: &DeviceRef) -> DeviceFacts {
    let sysfs = &dev.sysfs;
    let resolved = root.resolve(sysfs);
    let driver = crate::vfio::sysfs::driver_name(&resolved);
    let iommu_group = crate::vfio::sysfs::iommu_group(&resolved).ok();
    let group_node = iommu_group
        .map(|g| Path::new(DEV_VFIO).join(g.to_string()))
        .filter(|node| root.exists(node));
    let vfio_cdev = vfio_cdev(root, sysfs);
    let (role, parent, vf_index, sriov) = match dev.bus {
        Bus::Mdev => (Role::Mdev, mdev_parent(root, sysfs), None, None),
        Bus::Pci => match (vf_of(root, sysfs), read_sriov(root, sysfs)) {
            (Some((pf, n)), _) => (Role::Vf, Some(pf), Some(n), None),
            (None, Some(s)) => (Role::Pf, None, None, Some(s)),
            (None, None) => (Role::Pci, None, None, None),
        },
    };
    let driver_override = root
        .attr(&sysfs.join("driver_override"))
        .filter(|v| !v.is_empty() && v != "(null)");
    let lmem_quota = match (role, &parent, vf_index) {
        (Role::Vf, Some(pf), Some(n)) => lmem::vf_quota(root, pf, n),
        _ => None,
    };
    let mut facts = DeviceFacts {
        name: dev.name.clone(),
        bus: dev.bus,
        sysfs_path: sysfs.clone(),
        role,
        vendor_id: hex_id(root, &sysfs.join("vendor")),
        device_id: hex_id(root, &sysfs.join("device")),
        mdev_type: root.link_name(&sysfs.join("mdev_type")),
        driver,
        driver_override,
        parent,
        vf_index,
        sriov,
        iommu_group,
        group_node,
        vfio_cdev,
        lmem_quota,
        holders: Vec::new(),
        holders_complete: true,
        migration: Probe::NotProbed {
            reason: "not probed".to_string(),
        },
    };
    let mut nodes = facts.nodes();
    nodes.extend(
        root.list(&sysfs.join("drm"))
            .into_iter()
            .filter(|n| n.starts_with("card") || n.starts_with("renderD"))
            .map(|n| Path::new("/dev/dri").join(n)),
    );
    let scan = holders::scan(root, &nodes);
    facts.holders = scan.holders;
    facts.holders_complete = scan.complete;
    facts
}

/// An mdev's parent: the directory above it in `/sys/devices`.
fn mdev_parent(root: &HostRoot, sysfs: &Path) -> Option<String> {
    let real = root.follow(sysfs)?;
    Some(real.parent()?.file_name()?.to_string_lossy().into_owned())
}

/// PCI addresses of the VFs a PF has now, in VF order.
pub fn current_vfs(root: &HostRoot, pf_sysfs: &Path) -> Vec<(u32, String)> {
    let mut vfs: Vec<(u32, String)> = root
        .list(pf_sysfs)
        .into_iter()
        .filter_map(|entry| {
            let n: u32 = entry.strip_prefix("virtfn")?.parse().ok()?;
            Some((n + 1, root.link_name(&pf_sysfs.join(&entry))?))
        })
        .collect();
    vfs.sort();
    vfs
}

/// The address VF `index` (1-based) of PF `pf` gets, from the PF's
/// `sriov_offset` and `sriov_stride` (PCIe SR-IOV: routing ID of VF n =
/// PF routing ID + offset + (n - 1) * stride; the bus may change).
pub fn vf_address(pf: &str, sriov: &Sriov, index: u32) -> Option<String> {
    let (offset, stride) = (sriov.offset?, sriov.stride?);
    let (domain, rest) = pf.split_at(4);
    let rest = rest.strip_prefix(':')?;
    let (bus, slot_fn) = rest.split_once(':')?;
    let (slot, function) = slot_fn.split_once('.')?;
    let bus = u32::from_str_radix(bus, 16).ok()?;
    let devfn = (u32::from_str_radix(slot, 16).ok()? << 3) | function.parse::<u32>().ok()?;
    let rid = (bus << 8) + devfn + offset + (index.checked_sub(1)?) * stride;
    if rid > 0xffff {
        return None;
    }
    Some(format!(
        "{domain}:{:02x}:{:02x}.{}",
        rid >> 8,
        (rid >> 3) & 0x1f,
        rid & 7
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_follow_lspci() {
        assert_eq!(pci_address("0000:03:00.1").as_deref(), Some("0000:03:00.1"));
        assert_eq!(pci_address("03:00.1").as_deref(), Some("0000:03:00.1"));
        assert_eq!(pci_address("0000:AB:1F.7").as_deref(), Some("0000:ab:1f.7"));
        for bad in [
            "03:00",
            "0000:03:00.8",
            "0000:03:20.0",
            "3:00.1",
            "x0000:03:00.1",
            "",
        ] {
            assert_eq!(pci_address(bad), None, "{bad}");
        }
        assert!(mdev_uuid("0b7a6f1e-3c52-4f0e-9a11-5e1d00000a01").is_some());
        assert!(mdev_uuid("0b7a6f1e-3c52-4f0e-9a11").is_none());
    }

    #[test]
    fn vf_addresses_follow_offset_and_stride() {
        let sriov = Sriov {
            total_vfs: 7,
            num_vfs: 0,
            drivers_autoprobe: Some(true),
            offset: Some(1),
            stride: Some(1),
        };
        assert_eq!(
            vf_address("0000:03:00.0", &sriov, 1).as_deref(),
            Some("0000:03:00.1")
        );
        assert_eq!(
            vf_address("0000:03:00.0", &sriov, 7).as_deref(),
            Some("0000:03:00.7")
        );
        // VF 8 wraps into the next device number.
        assert_eq!(
            vf_address("0000:03:00.0", &sriov, 8).as_deref(),
            Some("0000:03:01.0")
        );
        let far = Sriov {
            offset: Some(0x80),
            stride: Some(2),
            ..sriov.clone()
        };
        assert_eq!(
            vf_address("0000:4d:00.0", &far, 2).as_deref(),
            Some("0000:4d:10.2")
        );
        assert_eq!(vf_address("0000:ff:1f.7", &far, 200), None);
        let unknown = Sriov {
            offset: None,
            ..sriov
        };
        assert_eq!(vf_address("0000:03:00.0", &unknown, 1), None);
    }
}
