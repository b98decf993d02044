// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `xe-vf-mig host list` and `host check`, the shipped binary, run against
//! the guest's real sysfs, `/proc` and VFIO with the mtty mdevs.
//!
//! mtty is an mdev, not an SR-IOV VF of an xe PF, so the Xe lines of
//! `check` (pf, module, driver) must fail and every other line must pass:
//! what this covers is device naming, IOMMU groups, VFIO node checks, the
//! /proc holder scan, and opening the device through its VFIO group to
//! read the migration flags, DMA logging (mtty has dummy log ops) and
//! MIG_DATA_SIZE. This kernel has no iommufd, so the cdev path is not.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use serde_json::Value;

use super::{Bench, Details};

/// Where the initramfs puts the binary; `XE_VF_MIG` overrides it.
const DEFAULT_TOOL: &str = "/usr/local/bin/xe-vf-mig";

fn tool() -> PathBuf {
    std::env::var_os("XE_VF_MIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TOOL))
}

/// Runs `xe-vf-mig host <args>`; returns the exit code and stdout.
fn host(args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = Command::new(tool())
        .arg("host")
        .args(args)
        .output()
        .with_context(|| format!("running {} host {}", tool().display(), args.join(" ")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().with_context(|| {
        format!(
            "host {}: killed by a signal; stderr: {stderr}",
            args.join(" ")
        )
    })?;
    Ok((code, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn json(args: &[&str]) -> anyhow::Result<(i32, Value)> {
    let (code, out) = host(args)?;
    let value = serde_json::from_str(&out)
        .with_context(|| format!("host {}: stdout is not JSON: {out}", args.join(" ")))?;
    Ok((code, value))
}

fn uuid(path: &Path) -> anyhow::Result<&str> {
    path.file_name()
        .and_then(|n| n.to_str())
        .context("mdev path without a uuid")
}

/// The `list --json` entry of one mdev, checked against sysfs and the
/// uAPI facts mtty has.
fn check_listed(entry: &Value, path: &Path) -> anyhow::Result<()> {
    let name = uuid(path)?;
    anyhow::ensure!(entry["name"] == name, "listed as {}", entry["name"]);
    anyhow::ensure!(entry["role"] == "mdev", "role {}", entry["role"]);
    anyhow::ensure!(entry["parent"] == "mtty", "parent {}", entry["parent"]);
    anyhow::ensure!(
        entry["mdev_type"] == "mtty-2",
        "type {}",
        entry["mdev_type"]
    );
    let group = std::fs::read_link(path.join("iommu_group"))?
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<u64>().ok())
        .context("iommu_group link")?;
    anyhow::ensure!(
        entry["iommu_group"] == group,
        "group {} vs sysfs {group}",
        entry["iommu_group"]
    );
    anyhow::ensure!(
        entry["group_node"] == format!("/dev/vfio/{group}"),
        "group node {}",
        entry["group_node"]
    );
    let m = &entry["migration"];
    anyhow::ensure!(m["status"] == "probed", "not probed: {m}");
    anyhow::ensure!(m["via"] == "group", "opened via {}", m["via"]);
    let flags = m["migration_flags"].as_u64().context("migration_flags")?;
    // mtty: STOP_COPY | P2P | PRE_COPY since 6.7.
    anyhow::ensure!(flags & 0b11 == 0b11, "flags {flags:#x}");
    // mtty has (dummy) DMA logging ops since 6.7, for testing VMMs.
    anyhow::ensure!(m["dma_logging"] == true, "mtty does not log DMA? {m}");
    anyhow::ensure!(m["stop_copy_size"].as_u64().unwrap_or(0) > 0, "size {m}");
    // No CONFIG_IOMMUFD in this kernel: the IOMMU cannot be asked.
    if entry["vfio_cdev"].is_null() {
        anyhow::ensure!(
            m["iommu_dirty_tracking"]["state"] == "unknown",
            "iommu {}",
            m["iommu_dirty_tracking"]
        );
    }
    anyhow::ensure!(
        entry["holders"].as_array().is_some_and(|h| h.is_empty()),
        "holders {}",
        entry["holders"]
    );
    Ok(())
}

/// `host list` (no xe PF in the guest) and `host list <uuid>...`.
pub fn list(paths: &[PathBuf; 2], d: &mut Details) -> anyhow::Result<()> {
    let (code, inventory) = json(&["list", "--json"])?;
    d.set("inventory", &inventory);
    anyhow::ensure!(code == 0, "host list exit {code}");
    anyhow::ensure!(
        inventory["pfs"].as_array().is_some_and(|p| p.is_empty()),
        "a PF driven by xe in a qemu guest? {inventory}"
    );
    let names: Vec<&str> = paths
        .iter()
        .map(|p| uuid(p))
        .collect::<anyhow::Result<_>>()?;
    let (code, listed) = json(&["list", names[0], &paths[1].display().to_string(), "--json"])?;
    d.set("listed", &listed);
    anyhow::ensure!(code == 0, "host list <mdevs> exit {code}");
    let entries = listed
        .as_array()
        .context("list --json of devices is an array")?;
    anyhow::ensure!(entries.len() == 2, "{} entries", entries.len());
    for (entry, path) in entries.iter().zip(paths) {
        check_listed(entry, path).with_context(|| format!("list entry of {}", path.display()))?;
    }
    let (code, table) = host(&["list", names[0]])?;
    d.set("table", &table);
    anyhow::ensure!(code == 0, "host list table exit {code}");
    let row = table.lines().nth(1).context("no table row")?;
    anyhow::ensure!(
        row.starts_with(names[0]) && row.contains(" mdev ") && row.contains("STOP_COPY|P2P"),
        "table row: {row}"
    );
    Ok(())
}

/// `(name, status)` of each line of a `check --json` report.
fn statuses(report: &Value) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|l| {
                    (
                        l["name"].as_str().unwrap_or("?").to_string(),
                        l["status"].as_str().unwrap_or("?").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn expect_statuses(report: &Value, want: &[(&str, &str)]) -> anyhow::Result<()> {
    let got = statuses(report);
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    anyhow::ensure!(got == want, "check lines {got:?}, expected {want:?}");
    Ok(())
}

/// `host check <mdev>`: the Xe lines fail, the VFIO and migration lines pass.
pub fn check(paths: &[PathBuf; 2], d: &mut Details) -> anyhow::Result<()> {
    let name = uuid(&paths[0])?;
    let (code, report) = json(&["check", name, "--json"])?;
    d.set("report", &report);
    anyhow::ensure!(code == 2, "exit {code}, expected 2 (the Xe lines fail)");
    expect_statuses(
        &report,
        &[
            ("device", "ok"),
            ("pf", "fail"),
            ("module", "fail"),
            ("driver", "fail"),
            ("iommu", "ok"),
            ("group", "ok"),
            ("vfio-nodes", "ok"),
            ("in-use", "ok"),
            ("migration", "ok"),
            ("p2p", "ok"),
            ("dirty-tracking", "ok"),
            ("lmem", "info"),
        ],
    )?;
    anyhow::ensure!(
        report["dirty_tracking"] == "device",
        "dirty_tracking {}",
        report["dirty_tracking"]
    );
    let (text_code, text) = host(&["check", name])?;
    d.set("text", &text);
    anyhow::ensure!(text_code == 2, "text form exit {text_code}");
    anyhow::ensure!(
        text.contains("FAIL driver") && text.ends_with("not ready, 3 check(s) failed\n"),
        "text form: {text}"
    );
    Ok(())
}

/// While the bench holds both devices open: `check` and `list` find this
/// process as the holder and do not open the device.
pub fn in_use(bench: &mut Bench, paths: &[PathBuf; 2], d: &mut Details) -> anyhow::Result<()> {
    let _held = (&bench.a, &bench.b);
    let me = std::process::id();
    let name = uuid(&paths[0])?;
    let (code, report) = json(&["check", name, "--json"])?;
    d.set("report", &report);
    anyhow::ensure!(code == 2, "exit {code}");
    let lines = statuses(&report);
    let status = |n: &str| {
        lines
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    anyhow::ensure!(status("in-use") == "info", "in-use {}", status("in-use"));
    anyhow::ensure!(
        status("migration") == "skip",
        "migration {}",
        status("migration")
    );
    let detail = report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|l| l["name"] == "in-use"))
        .map(|l| l["detail"].to_string())
        .unwrap_or_default();
    anyhow::ensure!(
        detail.contains(&format!("pid {me} (xe-vf-kernel-t")),
        "holder not named as this process ({me}): {detail}"
    );
    let (_, listed) = json(&["list", name, "--json"])?;
    d.set("listed", &listed);
    let entry = &listed[0];
    anyhow::ensure!(entry["migration"]["status"] == "not_probed", "{entry}");
    anyhow::ensure!(
        entry["holders"][0]["pid"] == me,
        "holders {}",
        entry["holders"]
    );
    Ok(())
}
