// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `host check`: every precondition of snapshot and live migration of one
//! VF, one line each, with a fix, and an exit status for scripts.
//!
//! Exit status: 0 when nothing failed (warnings allowed), 2 when a check
//! failed, 3 when nothing failed but something could not be verified
//! (the device was not opened, e.g. because a running VM holds it).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::device::{Bus, DeviceFacts, DeviceRef, Role, DEV_IOMMU, DEV_VFIO, PCI_DEVICES};
use super::probe::{Availability, Probe};
use super::root::HostRoot;
use super::{driver_is_vfio_safe, holders, lmem, Host, PF_DRIVER, VF_DRIVER, VF_MODULE};
use crate::uapi::MigrationFlags;

/// Verdict of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// A fact worth knowing; never a problem.
    Info,
    /// Works, at a cost.
    Warn,
    Fail,
    /// Could not be verified.
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Info => "info",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckLine {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

/// All checks of one device.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub device: String,
    pub checks: Vec<CheckLine>,
    /// The `dirty_tracking=` value that works for this VF, when known.
    pub dirty_tracking: Option<&'static str>,
    pub exit_code: i32,
}

/// Whose access to the VFIO nodes is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub name: String,
    pub uid: u32,
    pub gids: Vec<u32>,
}

impl Credentials {
    /// This process's effective user and groups (`/proc/self/status`),
    /// named from `/etc/passwd` when it is listed there.
    pub fn current() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |key: &str| -> Vec<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| {
                    v.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        // Uid: real effective saved fs; Gid likewise.
        let uid = field("Uid:").get(1).copied().unwrap_or(u32::MAX);
        let mut gids = field("Gid:")
            .get(1)
            .copied()
            .into_iter()
            .collect::<Vec<_>>();
        gids.extend(field("Groups:"));
        let name = Self::lookup(&HostRoot::system(), &uid.to_string())
            .map(|c| c.name)
            .unwrap_or_else(|_| format!("uid {uid}"));
        Credentials { name, uid, gids }
    }

    /// A user from the tree's `/etc/passwd` and `/etc/group`, by name or
    /// number (local files only, no NSS).
    pub fn lookup(root: &HostRoot, user: &str) -> Result<Self, String> {
        let passwd = std::fs::read_to_string(root.resolve(Path::new("/etc/passwd")))
            .map_err(|e| format!("reading /etc/passwd: {e}"))?;
        let entry = passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 4 && (f[0] == user || f[2] == user)).then(|| {
                (
                    f[0].to_string(),
                    f[2].parse::<u32>().ok(),
                    f[3].parse::<u32>().ok(),
                )
            })
        });
        let Some((name, Some(uid), Some(gid))) = entry else {
            return Err(format!("no user '{user}' in /etc/passwd"));
        };
        let mut gids = vec![gid];
        if let Ok(group) = std::fs::read_to_string(root.resolve(Path::new("/etc/group"))) {
            for line in group.lines() {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
                    if let Ok(g) = f[2].parse() {
                        gids.push(g);
                    }
                }
            }
        }
        Ok(Credentials { name, uid, gids })
    }
}

/// Whether `cred` may open a node of this owner and mode read-write
/// (classic permission bits; ACLs are not looked at).
pub fn can_read_write(mode: u32, owner: u32, group: u32, cred: &Credentials) -> bool {
    if cred.uid == 0 {
        return true;
    }
    let bits = if owner == cred.uid {
        mode >> 6
    } else if cred.gids.contains(&group) {
        mode >> 3
    } else {
        mode
    };
    bits & 0o6 == 0o6
}

struct Lines(Vec<CheckLine>);

impl Lines {
    fn add(&mut self, name: &'static str, status: Status, detail: impl Into<String>) {
        self.0.push(CheckLine {
            name,
            status,
            detail: detail.into(),
            fix: None,
        });
    }

    fn fail(&mut self, name: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.with_fix(name, Status::Fail, detail, fix);
    }

    fn with_fix(
        &mut self,
        name: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(CheckLine {
            name,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        });
    }
}

/// How to get this VF bound, for fixes.
fn bind_fix(f: &DeviceFacts) -> String {
    match (&f.role, &f.parent) {
        (Role::Vf, Some(pf)) => format!("xe-vf-mig host prepare {pf} --bind {}", f.name),
        _ => format!("bind {} to {VF_DRIVER}", f.name),
    }
}

/// Runs every check against `arg`.
pub fn check(host: &Host, arg: &str, cred: &Credentials) -> Result<CheckReport, super::HostError> {
    let dev = match host.device(arg) {
        Ok(dev) => dev,
        Err(e @ super::HostError::NoDevice { .. }) => {
            let mut lines = Lines(Vec::new());
            lines.fail("device", e.to_string(), "list the VFs: xe-vf-mig host list");
            return Ok(finish(arg.to_string(), lines, None));
        }
        Err(e) => return Err(e),
    };
    Ok(check_device(host, &dev, cred))
}

fn check_device(host: &Host, dev: &DeviceRef, cred: &Credentials) -> CheckReport {
    let root = &host.root;
    let f = host.facts(dev);
    let mut lines = Lines(Vec::new());

    let what = match (f.role, &f.parent) {
        (Role::Vf, Some(pf)) => format!("VF{} of {pf}", f.vf_index.unwrap_or(0)),
        (Role::Mdev, parent) => format!(
            "mdev of {} (type {})",
            parent.as_deref().unwrap_or("?"),
            f.mdev_type.as_deref().unwrap_or("?")
        ),
        (Role::Pf, _) => "an SR-IOV PF".to_string(),
        _ => "a PCI function".to_string(),
    };
    let id = match f.bus {
        Bus::Pci => format!(" ({})", f.id_string()),
        Bus::Mdev => String::new(),
    };
    lines.add("device", Status::Ok, format!("{} is {what}{id}", f.name));

    match (f.role, &f.parent) {
        (Role::Vf, Some(pf)) => {
            let driver = root.link_name(&Path::new(PCI_DEVICES).join(pf).join("driver"));
            if driver.as_deref() == Some(PF_DRIVER) {
                lines.add(
                    "pf",
                    Status::Ok,
                    format!("PF {pf} is driven by {PF_DRIVER}"),
                );
            } else {
                lines.fail(
                    "pf",
                    format!(
                        "PF {pf} is driven by {}, not {PF_DRIVER}: {VF_DRIVER} migrates only VFs of an {PF_DRIVER} PF",
                        driver.as_deref().unwrap_or("no driver")
                    ),
                    format!("bind {pf} to {PF_DRIVER}"),
                );
            }
        }
        (Role::Pf, _) => lines.fail(
            "pf",
            format!("{} is a PF, not a VF", f.name),
            format!(
                "create and bind VFs: xe-vf-mig host prepare {} --num-vfs N --bind all",
                f.name
            ),
        ),
        _ => lines.fail(
            "pf",
            format!("{} is not an SR-IOV VF", f.name),
            "Xe VFs are PCI functions of an xe PF: find them with xe-vf-mig host list",
        ),
    }

    if root.is_dir(&Path::new("/sys/module").join(VF_MODULE)) {
        lines.add("module", Status::Ok, format!("{VF_MODULE} is loaded"));
    } else {
        lines.fail(
            "module",
            format!("{VF_MODULE} is not loaded"),
            format!("modprobe {VF_MODULE}"),
        );
    }

    match f.driver.as_deref() {
        Some(VF_DRIVER) => lines.add("driver", Status::Ok, format!("bound to {VF_DRIVER}")),
        Some("vfio-pci") => lines.fail(
            "driver",
            format!("bound to vfio-pci, not {VF_DRIVER}: vfio-pci cannot migrate an Xe VF"),
            bind_fix(&f),
        ),
        Some(other) => lines.fail(
            "driver",
            format!("bound to {other}, not {VF_DRIVER}"),
            bind_fix(&f),
        ),
        None => lines.fail(
            "driver",
            format!("not bound to any driver (needs {VF_DRIVER})"),
            bind_fix(&f),
        ),
    }

    check_iommu(root, &f, &mut lines);
    check_nodes(root, &f, cred, &mut lines);

    if !f.holders.is_empty() {
        lines.add(
            "in-use",
            Status::Info,
            format!(
                "{}: a running VM owns it; the device is not opened",
                holders::describe(&f.holders)
            ),
        );
    } else if !f.holders_complete {
        lines.add(
            "in-use",
            Status::Warn,
            "no holder seen, but some processes' fds could not be read (run as root)",
        );
    } else {
        lines.add("in-use", Status::Ok, "no process holds the device");
    }

    let dirty = check_migration(&f, &mut lines);
    check_lmem(&f, &mut lines);
    finish(f.name.clone(), lines, dirty)
}

fn check_iommu(root: &HostRoot, f: &DeviceFacts, lines: &mut Lines) {
    let Some(group) = f.iommu_group else {
        lines.fail(
            "iommu",
            "no IOMMU group: the IOMMU is off",
            "enable VT-d in firmware and boot with intel_iommu=on",
        );
        lines.add("group", Status::Skip, "no IOMMU group");
        return;
    };
    lines.add("iommu", Status::Ok, format!("IOMMU group {group}"));
    let dir = PathBuf::from(format!("/sys/kernel/iommu_groups/{group}/devices"));
    let members = root.list(&dir);
    let blockers: Vec<String> = members
        .iter()
        .filter(|m| **m != f.name)
        .filter_map(|m| {
            let driver = root.link_name(&dir.join(m).join("driver"));
            (!driver_is_vfio_safe(driver.as_deref()))
                .then(|| format!("{m} ({})", driver.unwrap_or_default()))
        })
        .collect();
    if blockers.is_empty() {
        lines.add(
            "group",
            Status::Ok,
            format!("group {group} holds {}", members.join(", ")),
        );
    } else {
        lines.fail(
            "group",
            format!(
                "group {group} also holds {}: VFIO opens a group only when every device in it is on a VFIO driver or none",
                blockers.join(", ")
            ),
            "bind those devices to vfio-pci or unbind them",
        );
    }
}

fn check_nodes(root: &HostRoot, f: &DeviceFacts, cred: &Credentials, lines: &mut Lines) {
    let container = Path::new(DEV_VFIO).join("vfio");
    if !root.exists(&container) {
        lines.fail(
            "vfio-nodes",
            format!("{} is missing: VFIO is not loaded", container.display()),
            "modprobe vfio-pci",
        );
        return;
    }
    if !f.is_vfio() {
        let missing = match f.iommu_group {
            Some(g) => format!("{DEV_VFIO}/{g} is missing"),
            None => "no VFIO node".to_string(),
        };
        lines.fail(
            "vfio-nodes",
            format!(
                "{missing}: no VFIO driver holds {} (driver {})",
                f.name,
                f.driver.as_deref().unwrap_or("none")
            ),
            bind_fix(f),
        );
        return;
    }
    let mut nodes = vec![container];
    nodes.extend(f.nodes());
    if f.vfio_cdev.is_some() && root.exists(Path::new(DEV_IOMMU)) {
        nodes.push(PathBuf::from(DEV_IOMMU));
    }
    let mut described = Vec::new();
    let mut denied = Vec::new();
    for node in &nodes {
        match root.metadata(node) {
            Ok(meta) => {
                let mode = meta.mode() & 0o7777;
                described.push(format!(
                    "{} ({}:{} {mode:04o})",
                    node.display(),
                    meta.uid(),
                    meta.gid()
                ));
                if !can_read_write(mode, meta.uid(), meta.gid(), cred) {
                    denied.push(node.display().to_string());
                }
            }
            Err(e) => denied.push(format!("{} ({e})", node.display())),
        }
    }
    if denied.is_empty() {
        lines.add(
            "vfio-nodes",
            Status::Ok,
            format!("{} can use {}", cred.name, described.join(", ")),
        );
    } else {
        lines.fail(
            "vfio-nodes",
            format!("{} cannot read and write {}", cred.name, denied.join(", ")),
            format!(
                "chown {} {} (or a udev rule), or run the VMM as root",
                cred.name,
                denied.join(" ")
            ),
        );
    }
}

/// Migration flags, P2P and dirty tracking; returns the `dirty_tracking=`
/// value that works, when the device answered.
fn check_migration(f: &DeviceFacts, lines: &mut Lines) -> Option<&'static str> {
    let p = match &f.migration {
        Probe::Probed(p) => p,
        Probe::NotProbed { reason } => {
            for name in ["migration", "p2p", "dirty-tracking"] {
                lines.add(name, Status::Skip, reason.clone());
            }
            return None;
        }
        Probe::Failed { reason } => {
            lines.fail(
                "migration",
                reason.clone(),
                "see the error; a device that cannot be opened cannot be migrated",
            );
            lines.add("p2p", Status::Skip, "the device could not be opened");
            lines.add(
                "dirty-tracking",
                Status::Skip,
                "the device could not be opened",
            );
            return None;
        }
    };
    let Some(flags) = p.flags() else {
        let fix = if f.driver.as_deref() == Some(VF_DRIVER) {
            format!("{VF_DRIVER} offers migration only when the PF's {PF_DRIVER} driver supports VF migration on this platform and firmware: check dmesg and the kernel version")
        } else {
            bind_fix(f)
        };
        lines.fail(
            "migration",
            "no VFIO migration support (VFIO_DEVICE_FEATURE_MIGRATION is not offered)",
            fix,
        );
        lines.add("p2p", Status::Skip, "no migration support");
        lines.add("dirty-tracking", Status::Skip, "no migration support");
        return None;
    };
    let size = p
        .stop_copy_size
        .map(|s| format!("; a STOP_COPY now would carry about {}", lmem::human(s)))
        .unwrap_or_default();
    if !flags.contains(MigrationFlags::STOP_COPY) {
        lines.fail(
            "migration",
            format!("migration flags {flags} lack STOP_COPY, which migration v2 requires"),
            bind_fix(f),
        );
    } else if flags.contains(MigrationFlags::PRE_COPY) {
        lines.add("migration", Status::Ok, format!("{flags}{size}"));
    } else {
        lines.add(
            "migration",
            Status::Ok,
            format!("{flags}; no PRE_COPY, so the whole device state moves while the VM is paused{size}"),
        );
    }
    if flags.contains(MigrationFlags::P2P) {
        lines.add(
            "p2p",
            Status::Ok,
            "P2P: all VFs of a VM reach RUNNING_P2P before any stops",
        );
    } else {
        lines.with_fix(
            "p2p",
            Status::Warn,
            "no P2P: with several VFs in one VM, one may DMA into a peer that already stopped",
            "give each VM a single VF",
        );
    }
    let iommu = match &p.iommu_dirty_tracking {
        Availability::Yes => "IOMMU dirty tracking: yes".to_string(),
        Availability::No { reason } => format!("IOMMU dirty tracking: no ({reason})"),
        Availability::Unknown { reason } => {
            format!("IOMMU dirty tracking: unknown, counted as no ({reason})")
        }
    };
    if p.dma_logging {
        lines.add(
            "dirty-tracking",
            Status::Ok,
            format!("device DMA logging: yes; {iommu}; dirty_tracking=auto uses the device's log"),
        );
        Some("device")
    } else if p.iommu_dirty_tracking.is_yes() {
        lines.add(
            "dirty-tracking",
            Status::Ok,
            "device DMA logging: no; IOMMU dirty tracking: yes (dirty_tracking=iommufd; needs the fd= form with an iommufd)",
        );
        Some("iommufd")
    } else {
        lines.with_fix(
            "dirty-tracking",
            Status::Warn,
            format!("device DMA logging: no; {iommu}; live migration needs dirty_tracking=all: once the VF stops, all guest memory it can reach is sent again while the VM is paused, adding about guest RAM / link bandwidth to the downtime (16 GiB at 10 Gbit/s: about 14 s)"),
            format!("use dirty_tracking=all (xe-vf-mig host device-line {} prints it)", f.name),
        );
        Some("all")
    }
}

fn check_lmem(f: &DeviceFacts, lines: &mut Lines) {
    match (&f.lmem_quota, f.role) {
        (Some(q), _) => lines.add(
            "lmem",
            Status::Info,
            format!(
                "LMEM quota {} (from {}): the VF's state is about this size and moves while the VM is paused",
                lmem::human(q.bytes),
                q.sources
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" + ")
            ),
        ),
        (None, Role::Vf) => lines.add(
            "lmem",
            Status::Info,
            "LMEM quota not exposed by this kernel (no sriov_admin vram_quota; debugfs not mounted or not readable)",
        ),
        _ => lines.add("lmem", Status::Info, "no LMEM quota: not an Xe VF"),
    }
}

fn finish(device: String, lines: Lines, dirty: Option<&'static str>) -> CheckReport {
    let checks = lines.0;
    let exit_code = if checks.iter().any(|c| c.status == Status::Fail) {
        2
    } else if checks.iter().any(|c| c.status == Status::Skip) {
        3
    } else {
        0
    };
    CheckReport {
        device,
        checks,
        dirty_tracking: dirty,
        exit_code,
    }
}

/// One line per check, then a verdict.
pub fn render(report: &CheckReport) -> String {
    let width = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for c in &report.checks {
        out.push_str(&format!(
            "{:<4} {:<width$}  {}",
            c.status.label(),
            c.name,
            c.detail
        ));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("; fix: {fix}"));
        }
        out.push('\n');
    }
    let verdict = match report.exit_code {
        0 => format!(
            "{}: ready for snapshot and live migration{}",
            report.device,
            report
                .dirty_tracking
                .map(|d| format!(" (dirty_tracking={d})"))
                .unwrap_or_default()
        ),
        2 => {
            let n = report
                .checks
                .iter()
                .filter(|c| c.status == Status::Fail)
                .count();
            format!("{}: not ready, {n} check(s) failed", report.device)
        }
        _ => format!(
            "{}: nothing failed, but not everything could be verified",
            report.device
        ),
    };
    out.push_str(&verdict);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32, gids: &[u32]) -> Credentials {
        Credentials {
            name: "u".to_string(),
            uid,
            gids: gids.to_vec(),
        }
    }

    #[test]
    fn permissions_follow_owner_group_other() {
        assert!(can_read_write(0o600, 1000, 1000, &user(1000, &[1000])));
        assert!(!can_read_write(0o600, 0, 0, &user(1000, &[1000])));
        assert!(can_read_write(0o660, 0, 36, &user(1000, &[1000, 36])));
        assert!(!can_read_write(0o640, 0, 36, &user(1000, &[36])));
        assert!(can_read_write(0o666, 0, 0, &user(1000, &[])));
        // The owner's bits decide for the owner, even if others may.
        assert!(!can_read_write(0o466, 1000, 0, &user(1000, &[])));
        assert!(can_read_write(0o000, 5, 5, &user(0, &[])));
    }
}
