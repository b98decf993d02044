// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `host device-line`: the `--device` argument Cloud Hypervisor takes for
//! a VF that our module migrates.
//!
//! Keys, in CH's order (`path=<device_path>,fd=<vfio_cdev_fd>,iommu=on|off,
//! id=<device_id>,...`), then the patched CH's: `xe_migration=on` hands the
//! VF's migration to our module, and `dirty_tracking=all` is added when
//! the VF can log its DMA neither itself nor through the IOMMU (or when
//! that could not be asked), because `all` is the mode that always works.
//!
//! The fd form is for a caller that opens the VF's VFIO cdev itself and
//! passes it to CH, which then also needs an iommufd
//! (`--platform iommufd_fd=`); see [`DeviceLine::notes`].

use serde::Serialize;

use super::device::DEV_IOMMU;
use super::probe::Probe;
use super::{holders, Host, HostError, VF_DRIVER};
use crate::device_config::DeviceConfig;
use crate::uapi::MigrationFlags;

/// Options of the line.
#[derive(Clone, Debug, Default)]
pub struct DeviceLineOptions {
    /// CH's `id=`; needed to pair the device with `vfio_fds` on restore or
    /// receive.
    pub id: Option<String>,
    /// Print the fd form for this fd number instead of `path=`.
    pub fd: Option<i32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeviceLine {
    /// The value of `--device`.
    pub argument: String,
    /// What the caller must know or do besides (the fd form's setup, why
    /// `dirty_tracking=all` was chosen).
    pub notes: Vec<String>,
}

/// Builds the `--device` argument for the VF `arg`.
pub fn device_line(
    host: &Host,
    arg: &str,
    opts: &DeviceLineOptions,
) -> Result<DeviceLine, HostError> {
    let dev = host.device(arg)?;
    let f = host.facts(&dev);
    let refuse = |why: String| Err(HostError::Refused(why));
    if f.driver.as_deref() != Some(VF_DRIVER) {
        let fix = match &f.parent {
            Some(pf) if f.vf_index.is_some() => {
                format!("xe-vf-mig host prepare {pf} --bind {}", f.name)
            }
            _ => format!("bind it to {VF_DRIVER}"),
        };
        return refuse(format!(
            "{} is bound to {}, not {VF_DRIVER}: {fix}",
            f.name,
            f.driver.as_deref().unwrap_or("no driver")
        ));
    }
    if !f.is_vfio() {
        return refuse(format!(
            "{} has no VFIO node (no IOMMU group node, no cdev): is the IOMMU on?",
            f.name
        ));
    }
    if let Some(id) = &opts.id {
        DeviceConfig::parse(&format!("path=/,id={id}"))
            .map_err(|e| HostError::Refused(format!("id={id}: {e}")))?;
    }
    let mut notes = Vec::new();
    let mut keys = Vec::new();
    match opts.fd {
        Some(fd) if fd < 3 => return refuse(format!("fd={fd} is stdin, stdout or stderr")),
        Some(fd) => {
            let Some(cdev) = &f.vfio_cdev else {
                return refuse(format!(
                    "{} has no VFIO cdev (kernel without CONFIG_VFIO_DEVICE_CDEV): use the path form",
                    f.name
                ));
            };
            keys.push(format!("fd={fd}"));
            notes.push(format!(
                "open {} read-write as fd {fd} in the process that runs cloud-hypervisor (bash: exec {fd}<>{}); the name comes from {}/vfio-dev/",
                cdev.display(),
                cdev.display(),
                f.sysfs_path.display()
            ));
            notes.push(format!(
                "open {DEV_IOMMU} read-write as another fd M and add --platform iommufd=on,iommufd_fd=M: Cloud Hypervisor refuses fd= without iommufd_fd"
            ));
        }
        None => keys.push(format!("path={}", f.sysfs_path.display())),
    }
    if let Some(id) = &opts.id {
        keys.push(format!("id={id}"));
    }
    keys.push("xe_migration=on".to_string());
    match &f.migration {
        Probe::Probed(p) => {
            let flags = p.flags();
            if !flags.is_some_and(|fl| fl.contains(MigrationFlags::STOP_COPY)) {
                return refuse(format!(
                    "{} does not offer VFIO migration with STOP_COPY (flags: {}): check it with xe-vf-mig host check {}",
                    f.name,
                    p.migration_flags_names.as_deref().unwrap_or("none"),
                    f.name
                ));
            }
            if !p.dma_logging && !p.iommu_dirty_tracking.is_yes() {
                keys.push("dirty_tracking=all".to_string());
                notes.push(
                    "dirty_tracking=all: the VF logs its DMA neither itself nor through the IOMMU"
                        .to_string(),
                );
            }
        }
        Probe::NotProbed { reason } | Probe::Failed { reason } => {
            keys.push("dirty_tracking=all".to_string());
            let why = if f.holders.is_empty() {
                reason.clone()
            } else {
                format!("in use: {}", holders::describe(&f.holders))
            };
            notes.push(format!(
                "dirty_tracking=all: the device was not asked about dirty tracking ({why}); all is the mode that always works"
            ));
        }
    }
    Ok(DeviceLine {
        argument: keys.join(","),
        notes,
    })
}
