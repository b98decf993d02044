// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A fake host tree laid out as the kernel lays out sysfs, `/dev`, `/proc`
//! and `/etc`: real directories under `/sys/devices`, relative links from
//! `/sys/bus/pci/devices`, `driver`, `iommu_group`, `physfn`, `virtfnN`,
//! IOMMU groups, VFIO nodes and process fd links.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use xe_vf_plugin::host::device::{DeviceFacts, DeviceRef};
use xe_vf_plugin::host::probe::{Availability, MigrationProbe, OpenedVia, Probe, Prober};
use xe_vf_plugin::host::Host;
use xe_vf_plugin::MigrationFlags;

/// Where PCI functions of the fake live (one bridge, like a dGPU).
const DEVICES: &str = "sys/devices/pci0000:00/0000:00:01.0";

pub struct FakeHost {
    dir: tempfile::TempDir,
}

/// One PCI function to create.
pub struct Pci<'a> {
    pub address: &'a str,
    pub id: (u16, u16),
    pub class: u32,
    pub driver: Option<&'a str>,
    pub group: Option<u32>,
}

impl FakeHost {
    /// The bare skeleton: buses, `drivers_probe`, `/dev`, `/proc`, `/etc`.
    pub fn empty() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let h = FakeHost { dir };
        for d in [
            DEVICES,
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers",
            "sys/bus/mdev/devices",
            "sys/kernel/iommu_groups",
            "sys/module",
            "dev/vfio/devices",
            "proc",
            "etc",
        ] {
            fs::create_dir_all(h.path(d)).unwrap();
        }
        h.file("sys/bus/pci/drivers_probe", "");
        h.file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\nvmm:x:1000:1000::/home/vmm:/bin/sh\n",
        );
        h.file("etc/group", "root:x:0:\nkvm:x:36:vmm\nvmm:x:1000:\n");
        h
    }

    /// A host with an Xe PF `0000:03:00.0` (8086:e20b, driver xe, group 5,
    /// 7 VFs possible, 2 enabled, autoprobe on, offset 1, stride 1) and
    ///
    /// - VF1 `0000:03:00.1`: bound to xe-vfio-pci with the override set,
    ///   group 12, `/dev/vfio/12`, cdev `vfio0`, LMEM quota 4 GiB in
    ///   `sriov_admin`;
    /// - VF2 `0000:03:00.2`: bound to xe (the host's VF driver), group 13,
    ///   no VFIO node, no quota file;
    ///
    /// with xe_vfio_pci loaded, `/dev/vfio/vfio` and `/dev/iommu`.
    pub fn xe() -> Self {
        let h = FakeHost::empty();
        for d in ["xe", "xe-vfio-pci", "vfio-pci"] {
            h.driver(d);
        }
        h.module("xe_vfio_pci");
        h.file("dev/vfio/vfio", "");
        fs::set_permissions(h.path("dev/vfio/vfio"), fs::Permissions::from_mode(0o666)).unwrap();
        h.file("dev/iommu", "");
        h.pf("0000:03:00.0", 7, 2);
        h.vf("0000:03:00.0", 1, "0000:03:00.1", Some("xe-vfio-pci"), 12);
        h.override_driver("0000:03:00.1", "xe-vfio-pci");
        h.group_node(12);
        h.cdev("0000:03:00.1", 0);
        h.file(
            "sys/bus/pci/devices/0000:03:00.0/sriov_admin/vf1/profile/vram_quota",
            "4294967296\n",
        );
        h.vf("0000:03:00.0", 2, "0000:03:00.2", Some("xe"), 13);
        h
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel.trim_start_matches('/'))
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn host(&self) -> Host {
        Host::tree(self.root())
    }

    /// A host over this tree that "opens" devices with `prober`.
    pub fn host_with(&self, prober: impl Prober + 'static) -> Host {
        Host::new(
            xe_vf_plugin::host::root::HostRoot::at(self.root()),
            Box::new(prober),
        )
    }

    pub fn file(&self, rel: &str, content: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    fn link(&self, rel: &str, target: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let _ = fs::remove_file(&p);
        symlink(target, p).unwrap();
    }

    /// Registers a PCI driver (its directory, `bind`, `unbind`).
    pub fn driver(&self, name: &str) {
        self.file(&format!("sys/bus/pci/drivers/{name}/bind"), "");
        self.file(&format!("sys/bus/pci/drivers/{name}/unbind"), "");
    }

    pub fn module(&self, name: &str) {
        fs::create_dir_all(self.path(&format!("sys/module/{name}"))).unwrap();
    }

    /// A PCI function under the bridge, listed on the PCI bus.
    pub fn pci(&self, p: Pci) -> String {
        let dev = format!("{DEVICES}/{}", p.address);
        fs::create_dir_all(self.path(&dev)).unwrap();
        self.file(&format!("{dev}/vendor"), &format!("{:#06x}\n", p.id.0));
        self.file(&format!("{dev}/device"), &format!("{:#06x}\n", p.id.1));
        self.file(&format!("{dev}/class"), &format!("{:#08x}\n", p.class));
        self.file(&format!("{dev}/revision"), "0x00\n");
        self.file(&format!("{dev}/driver_override"), "(null)\n");
        self.link(
            &format!("sys/bus/pci/devices/{}", p.address),
            &format!("../../../devices/pci0000:00/0000:00:01.0/{}", p.address),
        );
        if let Some(d) = p.driver {
            self.bind(p.address, d);
        }
        if let Some(g) = p.group {
            self.group(p.address, g);
        }
        dev
    }

    /// Binds (or rebinds) a function to a driver, as its `driver` link.
    pub fn bind(&self, address: &str, driver: &str) {
        self.link(
            &format!("{DEVICES}/{address}/driver"),
            &format!("../../../../bus/pci/drivers/{driver}"),
        );
    }

    pub fn group(&self, address: &str, group: u32) {
        self.link(
            &format!("{DEVICES}/{address}/iommu_group"),
            &format!("../../../../kernel/iommu_groups/{group}"),
        );
        self.link(
            &format!("sys/kernel/iommu_groups/{group}/devices/{address}"),
            &format!("../../../../devices/pci0000:00/0000:00:01.0/{address}"),
        );
    }

    /// An Xe PF with SR-IOV attributes.
    pub fn pf(&self, address: &str, total: u32, num: u32) {
        let dev = self.pci(Pci {
            address,
            id: (0x8086, 0xe20b),
            class: 0x030000,
            driver: Some("xe"),
            group: Some(5),
        });
        self.file(&format!("{dev}/sriov_totalvfs"), &format!("{total}\n"));
        self.file(&format!("{dev}/sriov_numvfs"), &format!("{num}\n"));
        self.file(&format!("{dev}/sriov_drivers_autoprobe"), "1\n");
        self.file(&format!("{dev}/sriov_offset"), "1\n");
        self.file(&format!("{dev}/sriov_stride"), "1\n");
    }

    /// VF `index` (1-based) of `pf` at `address`.
    pub fn vf(&self, pf: &str, index: u32, address: &str, driver: Option<&str>, group: u32) {
        self.pci(Pci {
            address,
            id: (0x8086, 0xe20b),
            class: 0x030000,
            driver,
            group: Some(group),
        });
        self.link(&format!("{DEVICES}/{address}/physfn"), &format!("../{pf}"));
        self.link(
            &format!("{DEVICES}/{pf}/virtfn{}", index - 1),
            &format!("../{address}"),
        );
    }

    pub fn override_driver(&self, address: &str, driver: &str) {
        self.file(
            &format!("{DEVICES}/{address}/driver_override"),
            &format!("{driver}\n"),
        );
    }

    /// `/dev/vfio/<group>`, mode 0600 like the kernel's default.
    pub fn group_node(&self, group: u32) {
        let node = format!("dev/vfio/{group}");
        self.file(&node, "");
        fs::set_permissions(self.path(&node), fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// A VFIO cdev `vfio<n>` for the function, in sysfs and `/dev`.
    pub fn cdev(&self, address: &str, n: u32) {
        fs::create_dir_all(self.path(&format!("{DEVICES}/{address}/vfio-dev/vfio{n}"))).unwrap();
        let node = format!("dev/vfio/devices/vfio{n}");
        self.file(&node, "");
        fs::set_permissions(self.path(&node), fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// A process `pid` (`comm`) holding `node` open as fd 7.
    pub fn holder(&self, pid: u32, comm: &str, node: &str) {
        self.file(&format!("proc/{pid}/comm"), &format!("{comm}\n"));
        self.link(&format!("proc/{pid}/fd/7"), node);
    }

    /// An mdev `uuid` of a virtual parent `parent`, in group `group`.
    pub fn mdev(&self, uuid: &str, parent: &str, mdev_type: &str, group: u32) {
        let dev = format!("sys/devices/virtual/{parent}/{parent}/{uuid}");
        fs::create_dir_all(self.path(&dev)).unwrap();
        fs::create_dir_all(self.path(&format!(
            "sys/devices/virtual/{parent}/{parent}/mdev_supported_types/{mdev_type}"
        )))
        .unwrap();
        self.link(
            &format!("{dev}/mdev_type"),
            &format!("../mdev_supported_types/{mdev_type}"),
        );
        self.link(
            &format!("{dev}/iommu_group"),
            &format!("../../../../../kernel/iommu_groups/{group}"),
        );
        self.link(
            &format!("{dev}/driver"),
            &format!("../../../../../bus/mdev/drivers/{parent}"),
        );
        self.link(
            &format!("sys/bus/mdev/devices/{uuid}"),
            &format!("../../../devices/virtual/{parent}/{parent}/{uuid}"),
        );
        self.link(
            &format!("sys/kernel/iommu_groups/{group}/devices/{uuid}"),
            &format!("../../../../{}", dev.trim_start_matches("sys/")),
        );
        self.group_node(group);
    }
}

/// A prober that answers as a device would, without opening anything.
pub struct FakeProber {
    pub answer: Probe,
}

impl FakeProber {
    /// What xe-vfio-pci answers: STOP_COPY|P2P, no DMA logging, and here
    /// an IOMMU without dirty tracking.
    pub fn xe_vf() -> Self {
        Self::with(
            MigrationFlags::XE_VF,
            false,
            Availability::No {
                reason: "the IOMMU reports no dirty tracking (capabilities 0x0)".to_string(),
            },
        )
    }

    pub fn with(flags: MigrationFlags, dma_logging: bool, iommu: Availability) -> Self {
        FakeProber {
            answer: Probe::Probed(MigrationProbe::new(
                OpenedVia::Group,
                Some(flags),
                dma_logging,
                Some(4 << 30),
                iommu,
            )),
        }
    }
}

impl Prober for FakeProber {
    fn probe(&self, _: &DeviceFacts) -> Probe {
        self.answer.clone()
    }
}

/// The facts of `arg` on `host`.
pub fn facts(host: &Host, arg: &str) -> DeviceFacts {
    host.facts(&DeviceRef::parse(&host.root, arg).unwrap())
}
