// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `host list|prepare|check|device-line` against a fake host tree, with a
//! fake prober standing in for opening devices.

mod common;

use std::path::PathBuf;

use common::fake_host::{facts, FakeHost, FakeProber, Pci};
use xe_vf_plugin::host::check::{self, Credentials, Status};
use xe_vf_plugin::host::device::Role;
use xe_vf_plugin::host::device_line::{device_line, DeviceLineOptions};
use xe_vf_plugin::host::list;
use xe_vf_plugin::host::prepare::{self, PrepareRequest, VfSelector};
use xe_vf_plugin::host::probe::{Availability, Probe};
use xe_vf_plugin::host::HostError;
use xe_vf_plugin::MigrationFlags;

fn root_user() -> Credentials {
    Credentials {
        name: "root".to_string(),
        uid: 0,
        gids: vec![0],
    }
}

// ---------------------------------------------------------------- list

#[test]
fn list_finds_the_pf_and_its_vfs() {
    let fake = FakeHost::xe();
    let host = fake.host_with(FakeProber::xe_vf());
    let inv = list::inventory(&host);
    assert_eq!(inv.pfs.len(), 1);
    let pf = &inv.pfs[0];
    assert_eq!(pf.pf.name, "0000:03:00.0");
    assert_eq!(pf.pf.role, Role::Pf);
    let sriov = pf.pf.sriov.as_ref().unwrap();
    assert_eq!((sriov.num_vfs, sriov.total_vfs), (2, 7));
    assert_eq!(pf.vfs.len(), 2);

    let vf1 = &pf.vfs[0];
    assert_eq!(vf1.name, "0000:03:00.1");
    assert_eq!((vf1.role, vf1.vf_index), (Role::Vf, Some(1)));
    assert_eq!(vf1.parent.as_deref(), Some("0000:03:00.0"));
    assert_eq!(vf1.driver.as_deref(), Some("xe-vfio-pci"));
    assert_eq!(vf1.driver_override.as_deref(), Some("xe-vfio-pci"));
    assert_eq!(vf1.iommu_group, Some(12));
    assert_eq!(vf1.group_node, Some(PathBuf::from("/dev/vfio/12")));
    assert_eq!(
        vf1.vfio_cdev,
        Some(PathBuf::from("/dev/vfio/devices/vfio0"))
    );
    assert_eq!(vf1.lmem_quota.as_ref().unwrap().bytes, 4 << 30);
    match &vf1.migration {
        Probe::Probed(p) => assert_eq!(p.flags(), Some(MigrationFlags::XE_VF)),
        other => panic!("VF1 not probed: {other:?}"),
    }

    // The vfio-dev class device without its /dev node (a kernel without
    // CONFIG_VFIO_DEVICE_CDEV) is no cdev.
    std::fs::remove_file(fake.path("dev/vfio/devices/vfio0")).unwrap();
    assert_eq!(facts(&host, "0000:03:00.1").vfio_cdev, None);

    let vf2 = &pf.vfs[1];
    assert_eq!(vf2.driver.as_deref(), Some("xe"));
    assert_eq!(vf2.driver_override, None);
    assert_eq!(vf2.group_node, None, "no VFIO driver, no group node");
    assert_eq!(vf2.lmem_quota, None);
    assert!(
        matches!(&vf2.migration, Probe::NotProbed { reason } if reason == "not a VFIO device (driver: xe)"),
        "{:?}",
        vf2.migration
    );

    assert_eq!(
        list::inventory_table(&inv),
        "\
DEVICE        ROLE  ID         DRIVER       VFS  GROUP  CDEV   MIGRATION      LMEM
0000:03:00.0  PF    8086:e20b  xe           2/7  5      -      -              -
0000:03:00.1  VF1   8086:e20b  xe-vfio-pci  -    12     vfio0  STOP_COPY|P2P  4 GiB
0000:03:00.2  VF2   8086:e20b  xe           -    13     -      -              ?
"
    );
}

#[test]
fn a_held_vf_is_not_opened_and_its_holder_is_named() {
    let fake = FakeHost::xe();
    fake.holder(4242, "cloud-hypervisor", "/dev/vfio/12");
    let host = fake.host_with(FakeProber::xe_vf());
    let vf1 = facts(&host, "03:00.1");
    assert_eq!(vf1.holders.len(), 1);
    assert_eq!(vf1.holders[0].pid, 4242);
    let Probe::NotProbed { reason } = &vf1.migration else {
        panic!("a held VF was probed: {:?}", vf1.migration);
    };
    assert!(
        reason.contains("pid 4242 (cloud-hypervisor) holds /dev/vfio/12"),
        "{reason}"
    );
    let table = list::table(&[&vf1]);
    assert!(table.contains("in use"), "{table}");
    assert!(
        table.ends_with(&format!("0000:03:00.1: {reason}\n")),
        "{table}"
    );
}

#[test]
fn no_xe_pf_names_the_intel_gpus_seen() {
    let fake = FakeHost::empty();
    fake.driver("i915");
    fake.pci(Pci {
        address: "0000:00:02.0",
        id: (0x8086, 0xa7a0),
        class: 0x030000,
        driver: Some("i915"),
        group: Some(0),
    });
    fake.pci(Pci {
        address: "0000:00:1f.3",
        id: (0x8086, 0x51c8),
        class: 0x040300,
        driver: None,
        group: Some(9),
    });
    let inv = list::inventory(&fake.host());
    assert!(inv.pfs.is_empty());
    assert_eq!(
        list::inventory_table(&inv),
        "no PF driven by xe found\n0000:00:02.0 8086:a7a0 is driven by i915: Xe SR-IOV needs the xe driver on the PF\n"
    );
}

#[test]
fn an_mdev_is_listed_by_uuid() {
    let fake = FakeHost::xe();
    let uuid = "0b7a6f1e-3c52-4f0e-9a11-5e1d00000a01";
    fake.mdev(uuid, "mtty", "mtty-2", 3);
    let host = fake.host_with(FakeProber::xe_vf());
    let f = facts(&host, &format!("/sys/bus/mdev/devices/{uuid}/"));
    assert_eq!(f.role, Role::Mdev);
    assert_eq!(f.parent.as_deref(), Some("mtty"));
    assert_eq!(f.mdev_type.as_deref(), Some("mtty-2"));
    assert_eq!(f.driver.as_deref(), Some("mtty"));
    assert_eq!(f.iommu_group, Some(3));
    assert!(matches!(f.migration, Probe::Probed(_)));
}

// ---------------------------------------------------------------- check

fn statuses(report: &check::CheckReport) -> Vec<(&'static str, Status)> {
    report.checks.iter().map(|c| (c.name, c.status)).collect()
}

fn line<'a>(report: &'a check::CheckReport, name: &str) -> &'a check::CheckLine {
    report
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name} line"))
}

#[test]
fn a_bound_xe_vf_is_ready_with_dirty_tracking_all() {
    let fake = FakeHost::xe();
    let host = fake.host_with(FakeProber::xe_vf());
    let report = check::check(&host, "0000:03:00.1", &root_user()).unwrap();
    assert_eq!(
        statuses(&report),
        vec![
            ("device", Status::Ok),
            ("pf", Status::Ok),
            ("module", Status::Ok),
            ("driver", Status::Ok),
            ("iommu", Status::Ok),
            ("group", Status::Ok),
            ("vfio-nodes", Status::Ok),
            ("in-use", Status::Ok),
            ("migration", Status::Ok),
            ("p2p", Status::Ok),
            ("dirty-tracking", Status::Warn),
            ("lmem", Status::Info),
        ]
    );
    assert_eq!(report.exit_code, 0);
    assert_eq!(report.dirty_tracking, Some("all"));
    assert!(line(&report, "migration")
        .detail
        .starts_with("STOP_COPY|P2P; no PRE_COPY"));
    assert!(line(&report, "dirty-tracking")
        .detail
        .contains("live migration needs dirty_tracking=all"));
    assert!(line(&report, "lmem").detail.starts_with(
        "LMEM quota 4 GiB (from /sys/bus/pci/devices/0000:03:00.0/sriov_admin/vf1/profile/vram_quota)"
    ));
    let text = check::render(&report);
    assert!(
        text.starts_with("ok   device          0000:03:00.1 is VF1 of 0000:03:00.0 (8086:e20b)\n"),
        "{text}"
    );
    assert!(
        text.ends_with(
            "0000:03:00.1: ready for snapshot and live migration (dirty_tracking=all)\n"
        ),
        "{text}"
    );
}

#[test]
fn device_or_iommu_dirty_tracking_is_preferred() {
    let fake = FakeHost::xe();
    let dma = fake.host_with(FakeProber::with(
        MigrationFlags::XE_VF,
        true,
        Availability::Unknown {
            reason: "no /dev/iommu".to_string(),
        },
    ));
    let report = check::check(&dma, "0000:03:00.1", &root_user()).unwrap();
    assert_eq!(line(&report, "dirty-tracking").status, Status::Ok);
    assert_eq!(report.dirty_tracking, Some("device"));
    let iommu = fake.host_with(FakeProber::with(
        MigrationFlags::XE_VF,
        false,
        Availability::Yes,
    ));
    let report = check::check(&iommu, "0000:03:00.1", &root_user()).unwrap();
    assert_eq!(line(&report, "dirty-tracking").status, Status::Ok);
    assert_eq!(report.dirty_tracking, Some("iommufd"));
}

#[test]
fn a_vf_on_the_host_driver_fails_with_the_prepare_fix() {
    let fake = FakeHost::xe();
    let host = fake.host_with(FakeProber::xe_vf());
    let report = check::check(&host, "0000:03:00.2", &root_user()).unwrap();
    let driver = line(&report, "driver");
    assert_eq!(driver.status, Status::Fail);
    assert_eq!(driver.detail, "bound to xe, not xe-vfio-pci");
    assert_eq!(
        driver.fix.as_deref(),
        Some("xe-vf-mig host prepare 0000:03:00.0 --bind 0000:03:00.2")
    );
    assert_eq!(line(&report, "vfio-nodes").status, Status::Fail);
    assert_eq!(line(&report, "migration").status, Status::Skip);
    assert_eq!(report.exit_code, 2);
    assert!(check::render(&report).ends_with("0000:03:00.2: not ready, 2 check(s) failed\n"));
}

#[test]
fn each_missing_precondition_fails_its_own_line() {
    let fake = FakeHost::xe();
    // Module unloaded, a sound device sharing the VF's group, a PF that
    // lost its driver, and a user who may not open the nodes.
    std::fs::remove_dir(fake.path("sys/module/xe_vfio_pci")).unwrap();
    fake.driver("snd_hda_intel");
    fake.pci(Pci {
        address: "0000:03:00.7",
        id: (0x8086, 0x4f90),
        class: 0x040300,
        driver: Some("snd_hda_intel"),
        group: Some(12),
    });
    std::fs::remove_file(fake.path("sys/devices/pci0000:00/0000:00:01.0/0000:03:00.0/driver"))
        .unwrap();
    let host = fake.host_with(FakeProber::xe_vf());
    let vmm = Credentials::lookup(&host.root, "vmm").unwrap();
    assert_eq!((vmm.uid, vmm.gids.clone()), (1000, vec![1000, 36]));
    let report = check::check(&host, "0000:03:00.1", &vmm).unwrap();
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| c.name)
        .collect();
    assert_eq!(failed, vec!["pf", "module", "group", "vfio-nodes"]);
    assert_eq!(
        line(&report, "module").fix.as_deref(),
        Some("modprobe xe_vfio_pci")
    );
    assert!(line(&report, "pf")
        .detail
        .contains("driven by no driver, not xe"));
    assert!(line(&report, "group")
        .detail
        .starts_with("group 12 also holds 0000:03:00.7 (snd_hda_intel)"));
    let nodes = line(&report, "vfio-nodes");
    assert_eq!(
        nodes.detail,
        "vmm cannot read and write /dev/vfio/12, /dev/vfio/devices/vfio0, /dev/iommu"
    );
    assert!(nodes
        .fix
        .as_deref()
        .unwrap()
        .starts_with("chown vmm /dev/vfio/12 "));
    assert_eq!(report.exit_code, 2);
    assert!(Credentials::lookup(&host.root, "nobody").is_err());
}

#[test]
fn what_opening_says_decides_the_migration_lines() {
    let fake = FakeHost::xe();
    let no_migration = fake.host_with(FakeProber {
        answer: Probe::Probed(xe_vf_plugin::host::probe::MigrationProbe::new(
            xe_vf_plugin::host::probe::OpenedVia::Group,
            None,
            false,
            None,
            Availability::Unknown {
                reason: "x".to_string(),
            },
        )),
    });
    let report = check::check(&no_migration, "0000:03:00.1", &root_user()).unwrap();
    let m = line(&report, "migration");
    assert_eq!(m.status, Status::Fail);
    assert!(
        m.fix.as_deref().unwrap().contains("supports VF migration"),
        "{m:?}"
    );

    let no_p2p = fake.host_with(FakeProber::with(
        MigrationFlags::STOP_COPY,
        false,
        Availability::Yes,
    ));
    let report = check::check(&no_p2p, "0000:03:00.1", &root_user()).unwrap();
    assert_eq!(line(&report, "p2p").status, Status::Warn);
    assert_eq!(report.exit_code, 0);

    let failed = fake.host_with(FakeProber {
        answer: Probe::Failed {
            reason: "cannot open the device: group: EBUSY".to_string(),
        },
    });
    let report = check::check(&failed, "0000:03:00.1", &root_user()).unwrap();
    assert_eq!(line(&report, "migration").status, Status::Fail);
    assert_eq!(report.exit_code, 2);

    fake.holder(77, "cloud-hypervisor", "/dev/vfio/devices/vfio0");
    let report = check::check(
        &fake.host_with(FakeProber::xe_vf()),
        "0000:03:00.1",
        &root_user(),
    )
    .unwrap();
    assert_eq!(line(&report, "in-use").status, Status::Info);
    assert_eq!(line(&report, "migration").status, Status::Skip);
    assert_eq!(
        report.exit_code, 3,
        "held: cannot verify, but nothing failed"
    );
}

// ---------------------------------------------------------- device-line

#[test]
fn device_line_path_and_fd_forms() {
    let fake = FakeHost::xe();
    let host = fake.host_with(FakeProber::xe_vf());
    let line = device_line(
        &host,
        "03:00.1",
        &DeviceLineOptions {
            id: Some("gpu0".to_string()),
            fd: None,
        },
    )
    .unwrap();
    assert_eq!(
        line.argument,
        "path=/sys/bus/pci/devices/0000:03:00.1,id=gpu0,xe_migration=on,dirty_tracking=all"
    );
    let fd = device_line(
        &host,
        "03:00.1",
        &DeviceLineOptions {
            id: Some("gpu0".to_string()),
            fd: Some(5),
        },
    )
    .unwrap();
    assert_eq!(
        fd.argument,
        "fd=5,id=gpu0,xe_migration=on,dirty_tracking=all"
    );
    assert!(
        fd.notes[0].contains("exec 5<>/dev/vfio/devices/vfio0"),
        "{:?}",
        fd.notes
    );
    assert!(
        fd.notes[1].contains("--platform iommufd=on,iommufd_fd=M"),
        "{:?}",
        fd.notes
    );

    let logs = fake.host_with(FakeProber::with(
        MigrationFlags::XE_VF,
        true,
        Availability::Yes,
    ));
    let auto = device_line(&logs, "03:00.1", &DeviceLineOptions::default()).unwrap();
    assert_eq!(
        auto.argument,
        "path=/sys/bus/pci/devices/0000:03:00.1,xe_migration=on"
    );
    // Not asked: the safe choice, and why.
    let unprobed = device_line(&fake.host(), "03:00.1", &DeviceLineOptions::default()).unwrap();
    assert!(unprobed.argument.ends_with(",dirty_tracking=all"));
    assert!(
        unprobed.notes[0].contains("not the running system"),
        "{:?}",
        unprobed.notes
    );
}

#[test]
fn device_line_refusals_say_why() {
    let fake = FakeHost::xe();
    let host = fake.host_with(FakeProber::xe_vf());
    let refused = |arg: &str, opts: DeviceLineOptions| match device_line(&host, arg, &opts) {
        Err(HostError::Refused(why)) => why,
        other => panic!("{arg}: expected a refusal, got {other:?}"),
    };
    assert_eq!(
        refused("03:00.2", DeviceLineOptions::default()),
        "0000:03:00.2 is bound to xe, not xe-vfio-pci: xe-vf-mig host prepare 0000:03:00.0 --bind 0000:03:00.2"
    );
    assert!(refused(
        "03:00.1",
        DeviceLineOptions {
            id: None,
            fd: Some(1)
        }
    )
    .contains("stdin, stdout"));
    assert!(refused(
        "03:00.1",
        DeviceLineOptions {
            id: Some("__x".to_string()),
            fd: None
        }
    )
    .starts_with("id=__x:"));
    std::fs::remove_dir_all(fake.path("sys/devices/pci0000:00/0000:00:01.0/0000:03:00.1/vfio-dev"))
        .unwrap();
    assert!(refused(
        "03:00.1",
        DeviceLineOptions {
            id: None,
            fd: Some(5)
        }
    )
    .contains("no VFIO cdev"));
    let stopless = fake.host_with(FakeProber::with(
        MigrationFlags::P2P,
        false,
        Availability::Yes,
    ));
    assert!(matches!(
        device_line(&stopless, "03:00.1", &DeviceLineOptions::default()),
        Err(HostError::Refused(why)) if why.contains("STOP_COPY")
    ));
    assert!(matches!(
        device_line(&host, "0000:09:00.0", &DeviceLineOptions::default()),
        Err(HostError::NoDevice { .. })
    ));
}

// -------------------------------------------------------------- prepare

fn request(pf: &str, num_vfs: Option<u32>, bind: &[&str]) -> PrepareRequest {
    PrepareRequest {
        pf: pf.to_string(),
        num_vfs,
        bind: bind.iter().map(|b| VfSelector::parse(b).unwrap()).collect(),
    }
}

fn writes(plan: &prepare::Plan) -> Vec<String> {
    plan.steps.iter().map(|s| s.write.to_string()).collect()
}

#[test]
fn enabling_and_binding_fresh_vfs_is_planned_write_by_write() {
    let fake = FakeHost::empty();
    fake.driver("xe");
    fake.driver("xe-vfio-pci");
    fake.pf("0000:03:00.0", 7, 0);
    let host = fake.host();
    let plan = prepare::plan(&host, &request("03:00.0", Some(2), &["all"])).unwrap();
    assert_eq!(
        writes(&plan),
        vec![
            "echo 0 > /sys/bus/pci/devices/0000:03:00.0/sriov_drivers_autoprobe",
            "echo 2 > /sys/bus/pci/devices/0000:03:00.0/sriov_numvfs",
            "echo xe-vfio-pci > /sys/bus/pci/devices/0000:03:00.1/driver_override",
            "echo 0000:03:00.1 > /sys/bus/pci/drivers_probe",
            "echo xe-vfio-pci > /sys/bus/pci/devices/0000:03:00.2/driver_override",
            "echo 0000:03:00.2 > /sys/bus/pci/drivers_probe",
        ]
    );
    assert_eq!(
        plan.steps[1].expect,
        vec![
            PathBuf::from("/sys/bus/pci/devices/0000:03:00.1"),
            PathBuf::from("/sys/bus/pci/devices/0000:03:00.2")
        ]
    );
    // The fake kernel creates no VFs: the run stops right after the write
    // that should have, and names what is missing.
    let mut logged = Vec::new();
    let err = prepare::apply(&host, &plan, &mut |w| logged.push(w.to_string())).unwrap_err();
    assert!(
        matches!(&err, HostError::Missing { path } if path.ends_with("0000:03:00.1")),
        "{err:?}"
    );
    assert_eq!(logged, writes(&plan)[..2].to_vec());
    assert_eq!(
        fake.read("sys/bus/pci/devices/0000:03:00.0/sriov_drivers_autoprobe"),
        "0"
    );
    assert_eq!(
        fake.read("sys/bus/pci/devices/0000:03:00.0/sriov_numvfs"),
        "2"
    );
}

#[test]
fn a_host_already_prepared_gets_no_writes() {
    let fake = FakeHost::xe();
    let plan = prepare::plan(&fake.host(), &request("0000:03:00.0", Some(2), &["1"])).unwrap();
    assert!(plan.steps.is_empty(), "{:?}", writes(&plan));
    assert_eq!(
        plan.notes,
        vec![
            "0000:03:00.0 already has 2 VFs",
            "VF1 0000:03:00.1 is already bound to xe-vfio-pci"
        ]
    );
    assert_eq!(plan.bound, vec![(1, "0000:03:00.1".to_string())]);
}

#[test]
fn rebinding_an_existing_vf_unbinds_it_first() {
    let fake = FakeHost::xe();
    let host = fake.host();
    let plan = prepare::plan(
        &host,
        &request("0000:03:00.0", None, &["0000:03:00.2", "vf1"]),
    )
    .unwrap();
    assert_eq!(
        writes(&plan),
        vec![
            "echo xe-vfio-pci > /sys/bus/pci/devices/0000:03:00.2/driver_override",
            "echo 0000:03:00.2 > /sys/bus/pci/devices/0000:03:00.2/driver/unbind",
            "echo 0000:03:00.2 > /sys/bus/pci/drivers_probe",
        ]
    );
    let mut logged = Vec::new();
    prepare::apply(&host, &plan, &mut |w| logged.push(w.to_string())).unwrap();
    assert_eq!(logged, writes(&plan));
    assert_eq!(
        fake.read("sys/bus/pci/devices/0000:03:00.2/driver_override"),
        "xe-vfio-pci"
    );
    assert_eq!(fake.read("sys/bus/pci/drivers/xe/unbind"), "0000:03:00.2");
    assert_eq!(fake.read("sys/bus/pci/drivers_probe"), "0000:03:00.2");
    // Nothing binds in the fake: verify() says so.
    assert_eq!(
        prepare::verify(&host, &plan),
        vec!["VF2 0000:03:00.2 is bound to xe instead of xe-vfio-pci (see dmesg)"]
    );
    fake.bind("0000:03:00.2", "xe-vfio-pci");
    assert!(prepare::verify(&host, &plan).is_empty());
}

#[test]
fn changing_the_vf_count_recreates_them_unless_one_is_in_use() {
    let fake = FakeHost::xe();
    let plan = prepare::plan(&fake.host(), &request("0000:03:00.0", Some(3), &[])).unwrap();
    assert_eq!(
        writes(&plan),
        vec![
            "echo 0 > /sys/bus/pci/devices/0000:03:00.0/sriov_drivers_autoprobe",
            "echo 0 > /sys/bus/pci/devices/0000:03:00.0/sriov_numvfs",
            "echo 3 > /sys/bus/pci/devices/0000:03:00.0/sriov_numvfs",
        ]
    );
    fake.holder(4242, "cloud-hypervisor", "/dev/vfio/12");
    match prepare::plan(&fake.host(), &request("0000:03:00.0", Some(0), &[])) {
        Err(HostError::Refused(why)) => assert_eq!(
            why,
            "VF1 0000:03:00.1 is in use (pid 4242 (cloud-hypervisor) holds /dev/vfio/12): changing the number of VFs would remove it"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn prepare_refuses_with_the_reason() {
    let refusal = |fake: &FakeHost, req: PrepareRequest| match prepare::plan(&fake.host(), &req) {
        Err(HostError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let fake = FakeHost::xe();
    assert_eq!(
        refusal(&fake, request("0000:03:00.1", Some(1), &[])),
        "0000:03:00.1 is VF1 of 0000:03:00.0: give the PF"
    );
    assert!(refusal(&fake, request("0000:03:00.0", Some(8), &[]))
        .contains("offers at most 7 VFs (sriov_totalvfs), 8 asked"));
    assert!(refusal(&fake, request("0000:03:00.0", None, &["5"])).contains("no VF5"));
    assert!(refusal(&fake, request("0000:03:00.0", Some(0), &["all"])).contains("--num-vfs N"));

    // Not xe.
    let i915 = FakeHost::xe();
    i915.driver("i915");
    i915.bind("0000:03:00.0", "i915");
    assert!(refusal(&i915, request("0000:03:00.0", Some(1), &[]))
        .starts_with("0000:03:00.0 is driven by i915, not xe"));
    // SR-IOV unavailable: no capability, or none offered by xe.
    let none = FakeHost::xe();
    std::fs::write(
        none.path("sys/bus/pci/devices/0000:03:00.0/sriov_totalvfs"),
        "0\n",
    )
    .unwrap();
    assert!(refusal(&none, request("0000:03:00.0", Some(1), &[])).contains("max_vfs"));
    std::fs::remove_file(none.path("sys/bus/pci/devices/0000:03:00.0/sriov_totalvfs")).unwrap();
    assert!(refusal(&none, request("0000:03:00.0", Some(1), &[])).contains("no SR-IOV capability"));
    // IOMMU off.
    let no_iommu = FakeHost::xe();
    std::fs::remove_file(no_iommu.path("sys/bus/pci/devices/0000:03:00.0/iommu_group")).unwrap();
    assert!(
        refusal(&no_iommu, request("0000:03:00.0", Some(2), &[])).starts_with("the IOMMU is off")
    );
    // Variant driver not loaded.
    let unloaded = FakeHost::xe();
    std::fs::remove_dir_all(unloaded.path("sys/bus/pci/drivers/xe-vfio-pci")).unwrap();
    assert!(
        refusal(&unloaded, request("0000:03:00.0", None, &["2"])).contains("modprobe xe_vfio_pci")
    );
    // Rebinding a VF a process holds.
    let held = FakeHost::xe();
    held.file(
        "sys/devices/pci0000:00/0000:00:01.0/0000:03:00.2/drm/renderD129/dev",
        "226:129\n",
    );
    held.holder(99, "glxgears", "/dev/dri/renderD129");
    assert_eq!(
        refusal(&held, request("0000:03:00.0", None, &["2"])),
        "VF2 0000:03:00.2 is in use (pid 99 (glxgears) holds /dev/dri/renderD129): it cannot be rebound"
    );
    assert!(VfSelector::parse("0").is_err());
}
