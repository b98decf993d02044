// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `host prepare`: enable VFs on an Xe PF and bind chosen VFs to
//! `xe-vfio-pci`, the way `driverctl` binds (`driver_override`, then
//! `drivers_probe`).
//!
//! The whole plan is computed from sysfs before anything is written, so a
//! dry run prints exactly the writes a real run makes, and a refusal
//! leaves the host untouched. Running it again when the host is already
//! in the wanted state writes nothing.
//!
//! New VFs are created with `sriov_drivers_autoprobe` off, so that no
//! host driver (xe itself drives VFs too) claims them before they are
//! bound to `xe-vfio-pci`; it stays off afterwards, which affects only
//! VFs created later.

use std::path::{Path, PathBuf};

use super::device::{self, read_facts, DeviceRef, Role, Sriov, PCI_DEVICES};
use super::holders;
use super::root::SysfsWrite;
use super::{Host, HostError, PF_DRIVER, VF_DRIVER, VF_MODULE};

/// `/sys/bus/pci/drivers_probe`: probe a device with its override.
const DRIVERS_PROBE: &str = "/sys/bus/pci/drivers_probe";
/// Where a registered PCI driver appears.
const PCI_DRIVERS: &str = "/sys/bus/pci/drivers";

/// Which VFs to bind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VfSelector {
    All,
    /// 1-based VF number.
    Index(u32),
    /// PCI address.
    Address(String),
}

impl VfSelector {
    /// `all`, a VF number (`1`, `vf1`) or a PCI address.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "all" {
            return Ok(VfSelector::All);
        }
        let number = text.strip_prefix("vf").unwrap_or(text);
        if let Ok(n) = number.parse::<u32>() {
            return if n == 0 {
                Err("VFs are numbered from 1".to_string())
            } else {
                Ok(VfSelector::Index(n))
            };
        }
        let full = if text.matches(':').count() == 1 {
            format!("0000:{text}")
        } else {
            text.to_string()
        };
        Ok(VfSelector::Address(full.to_ascii_lowercase()))
    }
}

/// What the user asked for.
#[derive(Clone, Debug, Default)]
pub struct PrepareRequest {
    pub pf: String,
    /// Number of VFs wanted; `None` keeps the current number.
    pub num_vfs: Option<u32>,
    pub bind: Vec<VfSelector>,
}

/// One write and why it is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub write: SysfsWrite,
    /// Paths that must exist once the write returned (the new VFs).
    pub expect: Vec<PathBuf>,
}

/// The writes, in order, and what needs none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub pf: String,
    pub steps: Vec<Step>,
    /// VFs that will be bound to `xe-vfio-pci`: `(number, address)`.
    pub bound: Vec<(u32, String)>,
    /// Things already as wanted, for the user.
    pub notes: Vec<String>,
}

fn refuse(reason: impl Into<String>) -> HostError {
    HostError::Refused(reason.into())
}

fn write(path: PathBuf, value: impl Into<String>) -> Step {
    Step {
        write: SysfsWrite {
            path,
            value: value.into(),
        },
        expect: Vec::new(),
    }
}

/// Checks the PF and works out every write; refuses without writing.
pub fn plan(host: &Host, req: &PrepareRequest) -> Result<Plan, HostError> {
    let root = &host.root;
    let pf_ref = host.device(&req.pf)?;
    let pf = read_facts(root, &pf_ref);
    let name = &pf.name;
    match pf.role {
        Role::Vf => {
            return Err(refuse(format!(
                "{name} is VF{} of {}: give the PF",
                pf.vf_index.unwrap_or(0),
                pf.parent.as_deref().unwrap_or("?")
            )))
        }
        Role::Mdev => return Err(refuse(format!("{name} is an mdev, not an SR-IOV PF"))),
        Role::Pf | Role::Pci => {}
    }
    if pf.driver.as_deref() != Some(PF_DRIVER) {
        return Err(refuse(format!(
            "{name} is driven by {}, not {PF_DRIVER}: Xe VFs are created and provisioned by the {PF_DRIVER} driver (bind the PF to {PF_DRIVER}; i915 cannot be the PF driver here)",
            pf.driver.as_deref().unwrap_or("no driver")
        )));
    }
    let Some(sriov) = pf.sriov.clone() else {
        return Err(refuse(format!(
            "SR-IOV is unavailable on {name}: it has no SR-IOV capability (no sriov_totalvfs)"
        )));
    };
    if sriov.total_vfs == 0 {
        return Err(refuse(format!(
            "SR-IOV is unavailable on {name}: sriov_totalvfs is 0; the {PF_DRIVER} driver offers VFs only when asked (module parameter max_vfs, e.g. `modprobe {PF_DRIVER} max_vfs=7` or xe.max_vfs=7 on the kernel command line) and on platforms where it supports PF mode"
        )));
    }
    if pf.iommu_group.is_none() {
        return Err(refuse(format!(
            "the IOMMU is off: {name} is in no IOMMU group, so its VFs could not be given to VFIO (enable VT-d in firmware and boot with intel_iommu=on)"
        )));
    }
    let target = req.num_vfs.unwrap_or(sriov.num_vfs);
    if target > sriov.total_vfs {
        return Err(refuse(format!(
            "{name} offers at most {} VFs (sriov_totalvfs), {target} asked",
            sriov.total_vfs
        )));
    }
    if !req.bind.is_empty() && target == 0 {
        return Err(refuse(format!(
            "{name} has no VFs enabled: give the number to enable (--num-vfs N)"
        )));
    }
    let mut plan = Plan {
        pf: name.clone(),
        ..Plan::default()
    };
    let recreate = target != sriov.num_vfs;
    let existing = device::current_vfs(root, &pf.sysfs_path);
    if recreate {
        plan_num_vfs(host, &pf_ref, &sriov, target, &existing, &mut plan)?;
    } else {
        plan.notes.push(format!("{name} already has {target} VFs"));
    }
    if req.bind.is_empty() {
        return Ok(plan);
    }
    if !root.is_dir(&Path::new(PCI_DRIVERS).join(VF_DRIVER)) {
        return Err(refuse(format!(
            "driver {VF_DRIVER} is not registered: load it first (modprobe {VF_MODULE})"
        )));
    }
    let addresses = vf_addresses(name, &sriov, target, recreate, &existing)?;
    let mut chosen: Vec<(u32, String)> = Vec::new();
    for sel in &req.bind {
        let picked: Vec<(u32, String)> =
            match sel {
                VfSelector::All => addresses.clone(),
                VfSelector::Index(n) => vec![addresses
                    .iter()
                    .find(|(i, _)| i == n)
                    .cloned()
                    .ok_or_else(|| refuse(format!("{name} will have {target} VFs, no VF{n}")))?],
                VfSelector::Address(a) => vec![addresses
                    .iter()
                    .find(|(_, addr)| addr == a)
                    .cloned()
                    .ok_or_else(|| refuse(format!("{a} is not one of {name}'s {target} VFs")))?],
            };
        for p in picked {
            if !chosen.contains(&p) {
                chosen.push(p);
            }
        }
    }
    chosen.sort();
    for (index, address) in chosen {
        plan_bind(host, index, &address, recreate, &mut plan)?;
        plan.bound.push((index, address));
    }
    Ok(plan)
}

/// Writes that change the number of VFs; refuses if a VF that would go
/// away is in use.
fn plan_num_vfs(
    host: &Host,
    pf_ref: &DeviceRef,
    sriov: &Sriov,
    target: u32,
    existing: &[(u32, String)],
    plan: &mut Plan,
) -> Result<(), HostError> {
    let root = &host.root;
    for (index, vf) in existing {
        let facts = read_facts(root, &DeviceRef::pci(root, vf)?);
        if !facts.holders.is_empty() {
            return Err(refuse(format!(
                "VF{index} {vf} is in use ({}): changing the number of VFs would remove it",
                holders::describe(&facts.holders)
            )));
        }
    }
    let pf_dir = &pf_ref.sysfs;
    if target > 0 && sriov.drivers_autoprobe == Some(true) {
        plan.steps
            .push(write(pf_dir.join("sriov_drivers_autoprobe"), "0"));
    }
    if sriov.num_vfs != 0 {
        plan.steps.push(write(pf_dir.join("sriov_numvfs"), "0"));
    }
    if target > 0 {
        let mut step = write(pf_dir.join("sriov_numvfs"), target.to_string());
        step.expect = (1..=target)
            .filter_map(|n| device::vf_address(&pf_ref.name, sriov, n))
            .map(|a| Path::new(PCI_DEVICES).join(a))
            .collect();
        plan.steps.push(step);
    }
    Ok(())
}

/// `(number, address)` of every VF the PF will have.
fn vf_addresses(
    pf: &str,
    sriov: &Sriov,
    target: u32,
    recreate: bool,
    existing: &[(u32, String)],
) -> Result<Vec<(u32, String)>, HostError> {
    if !recreate && existing.len() == target as usize {
        return Ok(existing.to_vec());
    }
    (1..=target)
        .map(|n| {
            device::vf_address(pf, sriov, n).map(|a| (n, a)).ok_or_else(|| {
                refuse(format!(
                    "cannot tell VF addresses of {pf} before the VFs exist (no sriov_offset/sriov_stride): enable them first (--num-vfs {target}), then bind"
                ))
            })
        })
        .collect()
}

/// Writes that bind one VF, none if it is bound already.
fn plan_bind(
    host: &Host,
    index: u32,
    address: &str,
    recreated: bool,
    plan: &mut Plan,
) -> Result<(), HostError> {
    let vf_dir = Path::new(PCI_DEVICES).join(address);
    let probe = write(PathBuf::from(DRIVERS_PROBE), address);
    if recreated {
        // A new VF has no driver and no override (autoprobe is off).
        plan.steps
            .push(write(vf_dir.join("driver_override"), VF_DRIVER));
        plan.steps.push(probe);
        return Ok(());
    }
    let facts = read_facts(&host.root, &DeviceRef::pci(&host.root, address)?);
    let has_override = facts.driver_override.as_deref() == Some(VF_DRIVER);
    let bound = facts.driver.as_deref() == Some(VF_DRIVER);
    if has_override && bound {
        plan.notes.push(format!(
            "VF{index} {address} is already bound to {VF_DRIVER}"
        ));
        return Ok(());
    }
    if !facts.holders.is_empty() {
        return Err(refuse(format!(
            "VF{index} {address} is in use ({}): it cannot be rebound",
            holders::describe(&facts.holders)
        )));
    }
    if !has_override {
        plan.steps
            .push(write(vf_dir.join("driver_override"), VF_DRIVER));
    }
    if bound {
        return Ok(());
    }
    if facts.driver.is_some() {
        plan.steps
            .push(write(vf_dir.join("driver").join("unbind"), address));
    }
    plan.steps.push(probe);
    Ok(())
}

/// Makes the writes in order, telling `log` each one as it is made.
pub fn apply(host: &Host, plan: &Plan, log: &mut dyn FnMut(&SysfsWrite)) -> Result<(), HostError> {
    for step in &plan.steps {
        log(&step.write);
        host.root
            .write(&step.write)
            .map_err(|source| HostError::Write {
                path: step.write.path.clone(),
                source,
            })?;
        if let Some(missing) = step.expect.iter().find(|p| !host.root.is_dir(p)) {
            return Err(HostError::Missing {
                path: missing.clone(),
            });
        }
    }
    Ok(())
}

/// What is not as planned after [`apply`]: VFs not bound to `xe-vfio-pci`.
pub fn verify(host: &Host, plan: &Plan) -> Vec<String> {
    plan.bound
        .iter()
        .filter_map(|(index, address)| {
            let driver = host
                .root
                .link_name(&Path::new(PCI_DEVICES).join(address).join("driver"));
            (driver.as_deref() != Some(VF_DRIVER)).then(|| {
                format!(
                    "VF{index} {address} is bound to {} instead of {VF_DRIVER} (see dmesg)",
                    driver.as_deref().unwrap_or("no driver")
                )
            })
        })
        .collect()
}
