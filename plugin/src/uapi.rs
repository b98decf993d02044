// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Typed view of the VFIO migration uAPI v2 (`include/uapi/linux/vfio.h`).
//!
//! The numeric values are the kernel's; the unit tests pin them against
//! `vfio-bindings` so a drift in either shows up at build time.

use std::fmt;

/// `VFIO_DEVICE_FEATURE` flag: read the feature.
pub const FEATURE_GET: u32 = 0x1_0000;
/// `VFIO_DEVICE_FEATURE` flag: write the feature.
pub const FEATURE_SET: u32 = 0x2_0000;
/// `VFIO_DEVICE_FEATURE` flag: only ask whether the feature exists.
pub const FEATURE_PROBE: u32 = 0x4_0000;
/// Low 16 bits of `flags` carry the feature id.
pub const FEATURE_MASK: u32 = 0xffff;

/// Feature ids used by migration.
pub const FEATURE_MIGRATION: u32 = 1;
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
pub const FEATURE_DMA_LOGGING_START: u32 = 6;
pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;
pub const FEATURE_MIG_DATA_SIZE: u32 = 9;

/// Migration capabilities a device reports through `VFIO_DEVICE_FEATURE_MIGRATION`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MigrationFlags(u64);

impl MigrationFlags {
    pub const STOP_COPY: MigrationFlags = MigrationFlags(1);
    pub const P2P: MigrationFlags = MigrationFlags(2);
    pub const PRE_COPY: MigrationFlags = MigrationFlags(4);
    /// What `xe-vfio-pci` reports.
    pub const XE_VF: MigrationFlags = MigrationFlags(1 | 2);
    const KNOWN: u64 = 1 | 2 | 4;

    pub const fn from_bits(bits: u64) -> Self {
        MigrationFlags(bits)
    }

    pub const fn bits(self) -> u64 {
        self.0
    }

    pub const fn contains(self, other: MigrationFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: MigrationFlags) -> Self {
        MigrationFlags(self.0 | other.0)
    }

    /// Bits the kernel may add later and we do not understand.
    pub const fn unknown_bits(self) -> u64 {
        self.0 & !Self::KNOWN
    }

    /// Parses `stop_copy|p2p|pre_copy` (any order, `+` or `|` separated).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut flags = MigrationFlags::default();
        for word in s.split(['|', '+']).map(str::trim).filter(|w| !w.is_empty()) {
            flags = flags.union(match word.to_ascii_lowercase().as_str() {
                "stop_copy" => Self::STOP_COPY,
                "p2p" => Self::P2P,
                "pre_copy" => Self::PRE_COPY,
                other => return Err(format!("unknown migration flag '{other}'")),
            });
        }
        Ok(flags)
    }
}

impl fmt::Debug for MigrationFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for MigrationFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        if self.contains(Self::STOP_COPY) {
            names.push("STOP_COPY".to_string());
        }
        if self.contains(Self::P2P) {
            names.push("P2P".to_string());
        }
        if self.contains(Self::PRE_COPY) {
            names.push("PRE_COPY".to_string());
        }
        if self.unknown_bits() != 0 {
            names.push(format!("{:#x}", self.unknown_bits()));
        }
        if names.is_empty() {
            f.write_str("(none)")
        } else {
            f.write_str(&names.join("|"))
        }
    }
}

/// `enum vfio_device_mig_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum DeviceState {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    RunningP2p = 5,
    PreCopy = 6,
    PreCopyP2p = 7,
}

impl DeviceState {
    pub const ALL: [DeviceState; 8] = [
        DeviceState::Error,
        DeviceState::Stop,
        DeviceState::Running,
        DeviceState::StopCopy,
        DeviceState::Resuming,
        DeviceState::RunningP2p,
        DeviceState::PreCopy,
        DeviceState::PreCopyP2p,
    ];

    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.get(raw as usize).copied()
    }

    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// The kernel's spelling, used in logs and errors.
    pub const fn name(self) -> &'static str {
        match self {
            DeviceState::Error => "ERROR",
            DeviceState::Stop => "STOP",
            DeviceState::Running => "RUNNING",
            DeviceState::StopCopy => "STOP_COPY",
            DeviceState::Resuming => "RESUMING",
            DeviceState::RunningP2p => "RUNNING_P2P",
            DeviceState::PreCopy => "PRE_COPY",
            DeviceState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// Parses the kernel's spelling, case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|st| st.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether the device may run its workload (and DMA) in this state.
    pub const fn is_running(self) -> bool {
        matches!(
            self,
            DeviceState::Running
                | DeviceState::RunningP2p
                | DeviceState::PreCopy
                | DeviceState::PreCopyP2p
        )
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_bindings::bindings::vfio as b;

    #[test]
    fn constants_match_kernel_bindings() {
        assert_eq!(FEATURE_GET, b::VFIO_DEVICE_FEATURE_GET);
        assert_eq!(FEATURE_SET, b::VFIO_DEVICE_FEATURE_SET);
        assert_eq!(FEATURE_PROBE, b::VFIO_DEVICE_FEATURE_PROBE);
        assert_eq!(FEATURE_MASK, b::VFIO_DEVICE_FEATURE_MASK);
        assert_eq!(FEATURE_MIGRATION, b::VFIO_DEVICE_FEATURE_MIGRATION);
        assert_eq!(
            FEATURE_MIG_DEVICE_STATE,
            b::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
        );
        assert_eq!(FEATURE_MIG_DATA_SIZE, b::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE);
        assert_eq!(
            FEATURE_DMA_LOGGING_START,
            b::VFIO_DEVICE_FEATURE_DMA_LOGGING_START
        );
        assert_eq!(
            FEATURE_DMA_LOGGING_STOP,
            b::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
        );
        assert_eq!(
            FEATURE_DMA_LOGGING_REPORT,
            b::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
        );
        assert_eq!(
            MigrationFlags::STOP_COPY.bits(),
            b::VFIO_MIGRATION_STOP_COPY as u64
        );
        assert_eq!(MigrationFlags::P2P.bits(), b::VFIO_MIGRATION_P2P as u64);
        assert_eq!(
            MigrationFlags::PRE_COPY.bits(),
            b::VFIO_MIGRATION_PRE_COPY as u64
        );
    }

    #[test]
    fn states_match_kernel_bindings() {
        let pairs = [
            (
                DeviceState::Error,
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR,
            ),
            (
                DeviceState::Stop,
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP,
            ),
            (
                DeviceState::Running,
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
            ),
            (
                DeviceState::StopCopy,
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
            ),
            (
                DeviceState::Resuming,
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
            ),
            (
                DeviceState::RunningP2p,
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P,
            ),
            (
                DeviceState::PreCopy,
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
            ),
            (
                DeviceState::PreCopyP2p,
                b::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
            ),
        ];
        for (ours, kernel) in pairs {
            assert_eq!(ours.raw(), kernel, "{ours}");
            assert_eq!(DeviceState::from_raw(kernel), Some(ours));
            assert_eq!(DeviceState::parse(&ours.name().to_lowercase()), Some(ours));
        }
        assert_eq!(DeviceState::from_raw(8), None);
    }

    #[test]
    fn flags_parse_and_print() {
        let f = MigrationFlags::parse("stop_copy|p2p").unwrap();
        assert_eq!(f, MigrationFlags::XE_VF);
        assert_eq!(f.to_string(), "STOP_COPY|P2P");
        assert!(MigrationFlags::parse("stop_copy|dirty").is_err());
        assert_eq!(MigrationFlags::from_bits(0x11).unknown_bits(), 0x10);
        assert_eq!(
            MigrationFlags::from_bits(0x11).to_string(),
            "STOP_COPY|0x10"
        );
    }
}
