// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! How guest memory written by the VF's DMA gets resent.
//!
//! The VMM's own dirty log sees CPU writes only. An Xe VF has no VFIO DMA
//! logging, so something else must account for its DMA:
//! - `device`: VFIO DMA logging, for devices that have it;
//! - `iommufd`: IOMMU dirty tracking of the VF's HWPT, where host and VMM
//!   provide it;
//! - `all`: QEMU's fallback: once the VF is stopped, every DMA-mapped guest
//!   range is reported dirty in the final pass, so the last memory pass
//!   carries whatever the VF wrote.
//!
//! `auto` picks the first that works in the order device, iommufd, all.

use std::path::Path;

use xe_vf_plugin::backend::Backend;
use xe_vf_plugin::device_config::DirtyTracking;

use vm_migration::protocol::{MemoryRange, MemoryRangeTable};

/// The mode in force once dirty logging has started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyMode {
    Device { page_size: u64 },
    Iommufd { page_size: u64 },
    All,
}

/// Picks the mode for `requested`, or says why none can work.
/// `has_hwpt` says whether the VMM handed over the VF's iommufd HWPT.
pub fn resolve(
    requested: DirtyTracking,
    backend: &Backend,
    has_hwpt: bool,
) -> Result<DirtyMode, String> {
    let device_logging = || match backend {
        Backend::Vfio(d) => d.supports_dma_logging().unwrap_or(false),
        Backend::Emulated(_) => false,
    };
    match requested {
        DirtyTracking::Off => Err(
            "dirty_tracking=off: the VF's DMA into guest memory would not be resent; \
             live migration refused (use snapshot/restore, or dirty_tracking=all)"
                .to_string(),
        ),
        DirtyTracking::Device => {
            if device_logging() {
                Ok(DirtyMode::Device { page_size: 4096 })
            } else {
                Err("dirty_tracking=device: the VF has no VFIO DMA logging \
                     (Xe VFs cannot track dirty pages); use dirty_tracking=all"
                    .to_string())
            }
        }
        DirtyTracking::Iommufd if has_hwpt => Ok(DirtyMode::Iommufd { page_size: 4096 }),
        DirtyTracking::Iommufd => Err(if Path::new("/dev/iommu").exists() {
            "dirty_tracking=iommufd: the VMM gave this VF no iommufd HWPT with \
             dirty tracking; use dirty_tracking=all"
                .to_string()
        } else {
            "dirty_tracking=iommufd: host has no /dev/iommu (no iommufd); \
             use dirty_tracking=all"
                .to_string()
        }),
        DirtyTracking::All => Ok(DirtyMode::All),
        DirtyTracking::Auto => Ok(if device_logging() {
            DirtyMode::Device { page_size: 4096 }
        } else if has_hwpt {
            DirtyMode::Iommufd { page_size: 4096 }
        } else {
            DirtyMode::All
        }),
    }
}

/// Dirty accounting for one VF across one migration.
#[derive(Debug, Default)]
pub struct DirtyTracker {
    mode: Option<DirtyMode>,
    /// `all` reports the DMA ranges once, in the first pass after stop.
    reported_after_stop: bool,
}

impl DirtyTracker {
    pub fn start(&mut self, mode: DirtyMode) {
        self.mode = Some(mode);
        self.reported_after_stop = false;
    }

    pub fn stop(&mut self) {
        self.mode = None;
    }

    pub fn mode(&self) -> Option<DirtyMode> {
        self.mode
    }

    /// Ranges to resend for the `all` mode: nothing while the VF runs (its
    /// writes would only be redone), everything it can reach once stopped.
    pub fn all_mode_log(
        &mut self,
        vf_stopped: bool,
        dma_ranges: &[MemoryRange],
    ) -> MemoryRangeTable {
        let mut table = MemoryRangeTable::default();
        if vf_stopped && !self.reported_after_stop {
            self.reported_after_stop = true;
            for r in dma_ranges {
                table.push(*r);
            }
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xe_vf_plugin::emulated::{EmulatedConfig, EmulatedXeVf};

    fn emulated() -> Backend {
        Backend::Emulated(
            EmulatedXeVf::new(EmulatedConfig {
                vram_size: 1 << 20,
                workload: false,
                ..EmulatedConfig::default()
            })
            .unwrap(),
        )
    }

    #[test]
    fn xe_vf_without_dma_logging_gets_all_or_a_clear_refusal() {
        let b = emulated();
        assert_eq!(resolve(DirtyTracking::Auto, &b, false), Ok(DirtyMode::All));
        assert_eq!(resolve(DirtyTracking::All, &b, false), Ok(DirtyMode::All));
        let dev = resolve(DirtyTracking::Device, &b, true).unwrap_err();
        assert!(dev.contains("no VFIO DMA logging"), "{dev}");
        let off = resolve(DirtyTracking::Off, &b, true).unwrap_err();
        assert!(off.contains("refused"), "{off}");
        let iommufd = resolve(DirtyTracking::Iommufd, &b, false).unwrap_err();
        assert!(iommufd.contains("iommufd"), "{iommufd}");
        let hwpt = Ok(DirtyMode::Iommufd { page_size: 4096 });
        assert_eq!(resolve(DirtyTracking::Iommufd, &b, true), hwpt);
        assert_eq!(resolve(DirtyTracking::Auto, &b, true), hwpt);
    }

    #[test]
    fn all_mode_reports_every_dma_range_once_after_stop() {
        let ranges = [
            MemoryRange {
                gpa: 0,
                length: 4096,
            },
            MemoryRange {
                gpa: 1 << 30,
                length: 1 << 20,
            },
        ];
        let mut t = DirtyTracker::default();
        t.start(DirtyMode::All);
        assert!(t.all_mode_log(false, &ranges).is_empty());
        let after = t.all_mode_log(true, &ranges);
        assert_eq!(after.regions(), &ranges);
        assert!(t.all_mode_log(true, &ranges).is_empty());
        t.start(DirtyMode::All);
        assert_eq!(t.all_mode_log(true, &ranges).regions().len(), 2);
    }
}
