// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `xe-vf-mig host ...` end to end on a fake host tree (`--root`), and the
//! printed `--device` keys against the real `cloud-hypervisor --help`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fake_host::FakeHost;

fn run(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xe-vf-mig"))
        .arg("host")
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run xe-vf-mig")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn list_prints_the_table_and_json() {
    let fake = FakeHost::xe();
    let out = run(fake.root(), &["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reason = format!(
        "not probed: {} is not the running system",
        fake.root().display()
    );
    assert_eq!(
        stdout(&out),
        format!(
            "\
DEVICE        ROLE  ID         DRIVER       VFS  GROUP  CDEV   MIGRATION   LMEM
0000:03:00.0  PF    8086:e20b  xe           2/7  5      -      -           -
0000:03:00.1  VF1   8086:e20b  xe-vfio-pci  -    12     vfio0  not probed  4 GiB
0000:03:00.2  VF2   8086:e20b  xe           -    13     -      -           ?
0000:03:00.1: {reason}
"
        )
    );
    let json: serde_json::Value =
        serde_json::from_slice(&run(fake.root(), &["list", "--json"]).stdout).unwrap();
    let vf1 = &json["pfs"][0]["vfs"][0];
    assert_eq!(vf1["name"], "0000:03:00.1");
    assert_eq!(vf1["role"], "vf");
    assert_eq!(vf1["vf_index"], 1);
    assert_eq!(vf1["iommu_group"], 12);
    assert_eq!(vf1["vfio_cdev"], "/dev/vfio/devices/vfio0");
    assert_eq!(vf1["lmem_quota"]["bytes"], 4u64 << 30);
    assert_eq!(vf1["migration"]["status"], "not_probed");
    assert_eq!(json["pfs"][0]["pf"]["sriov"]["total_vfs"], 7);

    let named = run(
        fake.root(),
        &["list", "/sys/bus/pci/devices/0000:03:00.2", "--json"],
    );
    let named: serde_json::Value = serde_json::from_slice(&named.stdout).unwrap();
    assert_eq!(named[0]["driver"], "xe");
    let bad = run(fake.root(), &["list", "0000:03:00"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("'0000:03:00' is not a PCI address"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn prepare_dry_run_prints_every_write_and_changes_nothing() {
    let fake = FakeHost::empty();
    fake.driver("xe");
    fake.driver("xe-vfio-pci");
    fake.pf("0000:03:00.0", 7, 0);
    let out = run(
        fake.root(),
        &[
            "prepare",
            "03:00.0",
            "--num-vfs",
            "2",
            "--bind",
            "1,2",
            "--dry-run",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "\
echo 0 > /sys/bus/pci/devices/0000:03:00.0/sriov_drivers_autoprobe
echo 2 > /sys/bus/pci/devices/0000:03:00.0/sriov_numvfs
echo xe-vfio-pci > /sys/bus/pci/devices/0000:03:00.1/driver_override
echo 0000:03:00.1 > /sys/bus/pci/drivers_probe
echo xe-vfio-pci > /sys/bus/pci/devices/0000:03:00.2/driver_override
echo 0000:03:00.2 > /sys/bus/pci/drivers_probe
"
    );
    assert_eq!(
        fake.read("sys/bus/pci/devices/0000:03:00.0/sriov_numvfs"),
        "0\n"
    );
    assert_eq!(
        fake.read("sys/bus/pci/devices/0000:03:00.0/sriov_drivers_autoprobe"),
        "1\n"
    );
}

#[test]
fn prepare_is_idempotent_and_refusals_exit_1() {
    let fake = FakeHost::xe();
    let out = run(fake.root(), &["prepare", "0000:03:00.0", "--bind", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "# 0000:03:00.0 already has 2 VFs\n# VF1 0000:03:00.1 is already bound to xe-vfio-pci\n# nothing to do\n"
    );
    let refused = run(fake.root(), &["prepare", "0000:03:00.0", "--num-vfs", "9"]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        stderr(&refused),
        "xe-vf-mig: error: refused: 0000:03:00.0 offers at most 7 VFs (sriov_totalvfs), 9 asked\n"
    );
    // A real run on the fake: the writes happen and are echoed, then the
    // check that the VF bound fails (nothing binds in a fake tree).
    let run_it = run(fake.root(), &["prepare", "0000:03:00.0", "--bind", "2"]);
    assert_eq!(run_it.status.code(), Some(1));
    assert_eq!(
        stdout(&run_it),
        "\
# 0000:03:00.0 already has 2 VFs
echo xe-vfio-pci > /sys/bus/pci/devices/0000:03:00.2/driver_override
echo 0000:03:00.2 > /sys/bus/pci/devices/0000:03:00.2/driver/unbind
echo 0000:03:00.2 > /sys/bus/pci/drivers_probe
"
    );
    assert!(
        stderr(&run_it).contains("VF2 0000:03:00.2 is bound to xe instead of xe-vfio-pci"),
        "{}",
        stderr(&run_it)
    );
    assert_eq!(fake.read("sys/bus/pci/drivers_probe"), "0000:03:00.2");
}

#[test]
fn check_exit_status_tells_ready_failed_and_unverified_apart() {
    let fake = FakeHost::xe();
    // Under --root nothing is opened: nothing failed, not all verified.
    let vf1 = run(fake.root(), &["check", "0000:03:00.1"]);
    assert_eq!(vf1.status.code(), Some(3), "{}", stdout(&vf1));
    let text = stdout(&vf1);
    assert!(
        text.contains("\nskip migration       not probed: "),
        "{text}"
    );
    assert!(text.ends_with("0000:03:00.1: nothing failed, but not everything could be verified\n"));
    let vf2 = run(fake.root(), &["check", "0000:03:00.2", "--json"]);
    assert_eq!(vf2.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&vf2.stdout).unwrap();
    assert_eq!(json["exit_code"], 2);
    let driver = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "driver")
        .unwrap();
    assert_eq!(driver["status"], "fail");
    assert_eq!(
        driver["fix"],
        "xe-vf-mig host prepare 0000:03:00.0 --bind 0000:03:00.2"
    );
    let vmm = run(fake.root(), &["check", "0000:03:00.1", "--user", "vmm"]);
    assert_eq!(vmm.status.code(), Some(2));
    assert!(stdout(&vmm).contains("FAIL vfio-nodes      vmm cannot read and write /dev/vfio/12"));
    let nobody = run(fake.root(), &["check", "0000:03:00.1", "--user", "nobody"]);
    assert_eq!(nobody.status.code(), Some(1));
}

#[test]
fn device_line_prints_the_argument_and_notes_apart() {
    let fake = FakeHost::xe();
    let out = run(fake.root(), &["device-line", "03:00.1", "--id", "gpu0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "path=/sys/bus/pci/devices/0000:03:00.1,id=gpu0,xe_migration=on,dirty_tracking=all\n"
    );
    assert!(stderr(&out).starts_with("# dirty_tracking=all: the device was not asked"));
    let fd = run(fake.root(), &["device-line", "03:00.1", "--fd", "7"]);
    assert_eq!(stdout(&fd), "fd=7,xe_migration=on,dirty_tracking=all\n");
    assert!(
        stderr(&fd).contains("exec 7<>/dev/vfio/devices/vfio0"),
        "{}",
        stderr(&fd)
    );
    let refused = run(fake.root(), &["device-line", "03:00.2"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stdout(&refused).is_empty());
}

/// The real `cloud-hypervisor` binary, if it was built
/// (`scripts/build-cloud-hypervisor.sh --flavor upstream`).
fn cloud_hypervisor(flavor: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("XE_CH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cloud-hypervisor")
        });
    let bin = dir.join(flavor).join("cloud-hypervisor");
    bin.is_file().then_some(bin)
}

/// The keys of CH's `--device` syntax line in `--help`.
fn ch_device_keys(bin: &Path) -> Vec<String> {
    let help = Command::new(bin)
        .arg("--help")
        .output()
        .expect("cloud-hypervisor --help");
    let text = String::from_utf8_lossy(&help.stdout);
    let after = text
        .split("--device <device>")
        .nth(1)
        .expect("--device in cloud-hypervisor --help");
    let syntax = after.split('"').nth(1).expect("the quoted --device syntax");
    syntax
        .split(',')
        .filter_map(|kv| kv.split('=').next())
        .map(|k| k.trim().to_string())
        .collect()
}

#[test]
fn printed_keys_are_spelled_as_cloud_hypervisor_spells_them() {
    let Some(upstream) = cloud_hypervisor("upstream") else {
        assert!(
            std::env::var_os("XE_REQUIRE_CH").is_none(),
            "XE_REQUIRE_CH is set but target/cloud-hypervisor/upstream/cloud-hypervisor is missing"
        );
        eprintln!("SKIPPED: no upstream cloud-hypervisor (scripts/build-cloud-hypervisor.sh --flavor upstream)");
        return;
    };
    let keys = ch_device_keys(&upstream);
    for ours in ["path", "fd", "id"] {
        assert!(
            keys.iter().any(|k| k == ours),
            "upstream --device lacks {ours}: {keys:?}"
        );
    }
    // The keys the patched CH adds are not upstream's (yet).
    for patch in ["xe_migration", "dirty_tracking"] {
        assert!(
            !keys.iter().any(|k| k == patch),
            "{patch} upstream? {keys:?}"
        );
    }
    // Every key a printed line uses is either upstream's or the patch's.
    let fake = FakeHost::xe();
    for args in [
        vec!["device-line", "03:00.1", "--id", "gpu0"],
        vec!["device-line", "03:00.1", "--id", "gpu0", "--fd", "5"],
    ] {
        let line = stdout(&run(fake.root(), &args));
        for kv in line.trim().split(',') {
            let key = kv.split('=').next().unwrap();
            assert!(
                keys.iter().any(|k| k == key) || ["xe_migration", "dirty_tracking"].contains(&key),
                "{key} is neither upstream's nor the patch's"
            );
        }
    }
    if let Some(patched) = cloud_hypervisor("patched") {
        let keys = ch_device_keys(&patched);
        for patch in ["xe_migration", "dirty_tracking"] {
            assert!(
                keys.iter().any(|k| k == patch),
                "patched --device lacks {patch}: {keys:?}"
            );
        }
    }
}
