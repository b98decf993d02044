// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `host list`: the PFs driven by `xe` and their VFs, or the devices
//! named on the command line, as a table or JSON.

use std::path::Path;

use serde::Serialize;

use super::device::{Bus, DeviceFacts, DeviceRef, Role, PCI_DEVICES};
use super::probe::Probe;
use super::{lmem, Host, PF_DRIVER};

/// A PF and its VFs.
#[derive(Debug, Serialize)]
pub struct PfEntry {
    pub pf: DeviceFacts,
    pub vfs: Vec<DeviceFacts>,
}

/// An Intel display device that `xe` does not drive: a hint when no PF
/// is found.
#[derive(Debug, Serialize)]
pub struct OtherGpu {
    pub name: String,
    pub id: String,
    pub driver: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Inventory {
    pub pfs: Vec<PfEntry>,
    pub other_intel_gpus: Vec<OtherGpu>,
}

fn pci_ref(name: &str) -> DeviceRef {
    DeviceRef {
        bus: Bus::Pci,
        name: name.to_string(),
        sysfs: Path::new(PCI_DEVICES).join(name),
    }
}

/// Walks `/sys/bus/pci/devices` for functions bound to `xe` that are not
/// VFs themselves, and reads each one's VFs.
pub fn inventory(host: &Host) -> Inventory {
    let root = &host.root;
    let mut pfs = Vec::new();
    let mut other_intel_gpus = Vec::new();
    for name in root.list(Path::new(PCI_DEVICES)) {
        let dev = pci_ref(&name);
        let driver = root.link_name(&dev.sysfs.join("driver"));
        let is_vf = root.exists(&dev.sysfs.join("physfn"));
        if driver.as_deref() == Some(PF_DRIVER) && !is_vf {
            let pf = host.facts(&dev);
            let vfs = super::device::current_vfs(root, &dev.sysfs)
                .into_iter()
                .map(|(_, vf)| host.facts(&pci_ref(&vf)))
                .collect();
            pfs.push(PfEntry { pf, vfs });
            continue;
        }
        let class = root.number_attr(&dev.sysfs.join("class")).unwrap_or(0);
        let vendor = root.number_attr(&dev.sysfs.join("vendor"));
        if vendor == Some(0x8086) && class >> 16 == 0x03 && !is_vf {
            let device = root.number_attr(&dev.sysfs.join("device")).unwrap_or(0);
            other_intel_gpus.push(OtherGpu {
                name,
                id: format!("8086:{device:04x}"),
                driver,
            });
        }
    }
    Inventory {
        pfs,
        other_intel_gpus,
    }
}

/// The short form of a probe for the table.
fn migration_cell(facts: &DeviceFacts) -> String {
    match &facts.migration {
        Probe::Probed(p) => p
            .migration_flags_names
            .clone()
            .unwrap_or_else(|| "none".to_string()),
        Probe::NotProbed { .. } if !facts.holders.is_empty() => "in use".to_string(),
        Probe::NotProbed { .. } if !facts.is_vfio() => "-".to_string(),
        Probe::NotProbed { .. } => "not probed".to_string(),
        Probe::Failed { .. } => "error".to_string(),
    }
}

/// What the table cannot hold: why a device was not or could not be asked.
fn note(facts: &DeviceFacts) -> Option<String> {
    match &facts.migration {
        Probe::Failed { reason } => Some(reason.clone()),
        Probe::NotProbed { reason } if facts.is_vfio() => Some(reason.clone()),
        _ => None,
    }
}

fn row(facts: &DeviceFacts) -> Vec<String> {
    let dash = || "-".to_string();
    let role = match facts.role {
        Role::Pf => "PF".to_string(),
        Role::Vf => format!("VF{}", facts.vf_index.unwrap_or(0)),
        Role::Mdev => "mdev".to_string(),
        Role::Pci => "pci".to_string(),
    };
    let id = match (&facts.mdev_type, facts.bus) {
        (Some(t), Bus::Mdev) => t.clone(),
        _ => facts.id_string(),
    };
    let vfs = facts
        .sriov
        .as_ref()
        .map(|s| format!("{}/{}", s.num_vfs, s.total_vfs))
        .unwrap_or_else(dash);
    let cdev = facts
        .vfio_cdev
        .as_ref()
        .and_then(|c| c.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(dash);
    let lmem = match (&facts.lmem_quota, facts.role) {
        (Some(q), _) => lmem::human(q.bytes),
        (None, Role::Vf) => "?".to_string(),
        (None, _) => dash(),
    };
    vec![
        facts.name.clone(),
        role,
        id,
        facts.driver.clone().unwrap_or_else(dash),
        vfs,
        facts
            .iommu_group
            .map(|g| g.to_string())
            .unwrap_or_else(dash),
        cdev,
        migration_cell(facts),
        lmem,
    ]
}

const HEADER: [&str; 9] = [
    "DEVICE",
    "ROLE",
    "ID",
    "DRIVER",
    "VFS",
    "GROUP",
    "CDEV",
    "MIGRATION",
    "LMEM",
];

/// Renders devices as an aligned table followed by notes.
pub fn table(devices: &[&DeviceFacts]) -> String {
    let mut rows = vec![HEADER.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    rows.extend(devices.iter().map(|f| row(f)));
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for f in devices {
        if let Some(n) = note(f) {
            out.push_str(&format!("{}: {n}\n", f.name));
        }
    }
    out
}

/// The table for an inventory, or why it is empty.
pub fn inventory_table(inv: &Inventory) -> String {
    if inv.pfs.is_empty() {
        let mut out = format!("no PF driven by {PF_DRIVER} found\n");
        for gpu in &inv.other_intel_gpus {
            out.push_str(&format!(
                "{} {} is driven by {}: Xe SR-IOV needs the {PF_DRIVER} driver on the PF\n",
                gpu.name,
                gpu.id,
                gpu.driver.as_deref().unwrap_or("no driver")
            ));
        }
        return out;
    }
    let devices: Vec<&DeviceFacts> = inv
        .pfs
        .iter()
        .flat_map(|e| std::iter::once(&e.pf).chain(e.vfs.iter()))
        .collect();
    table(&devices)
}
