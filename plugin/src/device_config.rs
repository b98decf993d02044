// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `--device` option: Cloud Hypervisor's `DeviceConfig` syntax plus
//! this project's keys.
//!
//! CH's keys: `path=`, `fd=` (a VFIO cdev fd), `iommu=on|off`, `id=`,
//! `pci_segment=`, `pci_device_id=`, `x_nv_gpudirect_clique=`. Ours:
//! `migration=on|off`, `dirty_tracking=auto|all|device|iommufd|off`, and
//! with `emulated=on` the shape of an emulated VF (`vram=`, `devid=`,
//! `revid=`, `tiles=`, `gts=`, `workload=`, `seed=`, `flags=`, `chunk=`).
//! The string may come from an untrusted peer: every error names the key
//! and value, and nothing is allocated beyond the input's own size.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

use crate::emulated::EmulatedConfig;
use crate::uapi::MigrationFlags;

/// Longest accepted `--device` string; real ones are far shorter.
pub const MAX_SPEC_LEN: usize = 4096;

/// How DMA writes of the VF into guest memory are tracked during a live
/// migration (see `xe-vf-glue`'s `dirty` module).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyTracking {
    #[default]
    Auto,
    Iommufd,
    All,
    Device,
    Off,
}

impl DirtyTracking {
    pub fn name(self) -> &'static str {
        match self {
            DirtyTracking::Auto => "auto",
            DirtyTracking::Iommufd => "iommufd",
            DirtyTracking::All => "all",
            DirtyTracking::Device => "device",
            DirtyTracking::Off => "off",
        }
    }
}

impl FromStr for DirtyTracking {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => DirtyTracking::Auto,
            "iommufd" => DirtyTracking::Iommufd,
            "all" => DirtyTracking::All,
            "device" => DirtyTracking::Device,
            "off" => DirtyTracking::Off,
            _ => return Err("expected auto, iommufd, all, device or off".to_string()),
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceConfigError {
    #[error("device spec is {len} bytes long; the limit is {MAX_SPEC_LEN}")]
    TooLong { len: usize },
    #[error("unknown device option '{key}'")]
    UnknownKey { key: String },
    #[error("device option '{key}' is given twice")]
    DuplicateKey { key: String },
    #[error("device option '{key}' has no value (expected {key}=...)")]
    MissingValue { key: String },
    #[error("invalid value '{value}' for device option '{key}': {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("device spec names no device: give path=, fd= or emulated=on")]
    MissingDevice,
    #[error("conflicting device options: {0}")]
    Conflict(String),
}

/// A parsed `--device` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    pub path: Option<PathBuf>,
    pub fd: Option<i32>,
    pub iommu: bool,
    pub id: Option<String>,
    pub pci_segment: u16,
    pub pci_device_id: Option<u8>,
    pub x_nv_gpudirect_clique: Option<u8>,
    pub migration: bool,
    pub dirty_tracking: DirtyTracking,
    /// Set by `emulated=on`: the VF is the software model, not hardware.
    pub emulated: Option<EmulatedConfig>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            path: None,
            fd: None,
            iommu: false,
            id: None,
            pci_segment: 0,
            pci_device_id: None,
            x_nv_gpudirect_clique: None,
            migration: true,
            dirty_tracking: DirtyTracking::Auto,
            emulated: None,
        }
    }
}

const EMULATED_KEYS: [&str; 9] = [
    "vram", "devid", "revid", "tiles", "gts", "workload", "seed", "flags", "chunk",
];
const KEYS: [&str; 11] = [
    "path",
    "fd",
    "iommu",
    "id",
    "pci_segment",
    "pci_device_id",
    "x_nv_gpudirect_clique",
    "migration",
    "dirty_tracking",
    "emulated",
    "",
];

fn invalid(key: &str, value: &str, reason: impl Into<String>) -> DeviceConfigError {
    DeviceConfigError::InvalidValue {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, DeviceConfigError> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(invalid(key, value, "expected on or off")),
    }
}

/// Decimal or `0x` hexadecimal.
fn parse_int<T: TryFrom<u64>>(key: &str, value: &str) -> Result<T, DeviceConfigError> {
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse::<u64>(),
    }
    .map_err(|e| invalid(key, value, e.to_string()))?;
    T::try_from(parsed).map_err(|_| invalid(key, value, "out of range"))
}

/// Sizes like `4096`, `256M`, `1G`, `2MiB`, `1GB` (binary units).
pub fn parse_size(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let digits_end = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(digits_end);
    if num.is_empty() {
        return Err("expected a number with an optional K/M/G/T suffix".to_string());
    }
    let n: u64 = num.parse().map_err(|e| format!("{e}"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        other => return Err(format!("unknown size suffix '{other}'")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| "size overflows 64 bits".to_string())
}

fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// CH's device ids may not start with `_` (reserved for its own ids).
fn check_id(value: &str) -> Result<String, DeviceConfigError> {
    if value.starts_with('_') {
        return Err(invalid("id", value, "ids starting with '_' are reserved"));
    }
    Ok(value.to_string())
}

impl DeviceConfig {
    pub fn parse(spec: &str) -> Result<Self, DeviceConfigError> {
        if spec.len() > MAX_SPEC_LEN {
            return Err(DeviceConfigError::TooLong { len: spec.len() });
        }
        let mut seen: Vec<&str> = Vec::new();
        let mut cfg = DeviceConfig::default();
        let mut emulated_on = false;
        let mut emu = EmulatedConfig::default();
        let mut emu_keys: Vec<&str> = Vec::new();
        for pair in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = match pair.split_once('=') {
                Some((k, v)) => (k.trim(), v),
                None => {
                    let key = pair.trim();
                    return Err(if KEYS.contains(&key) || EMULATED_KEYS.contains(&key) {
                        DeviceConfigError::MissingValue {
                            key: key.to_string(),
                        }
                    } else {
                        DeviceConfigError::UnknownKey {
                            key: key.to_string(),
                        }
                    });
                }
            };
            if seen.contains(&key) {
                return Err(DeviceConfigError::DuplicateKey {
                    key: key.to_string(),
                });
            }
            seen.push(key);
            if value.is_empty() {
                return Err(DeviceConfigError::MissingValue {
                    key: key.to_string(),
                });
            }
            match key {
                "path" => cfg.path = Some(PathBuf::from(value)),
                "fd" => {
                    let fd: i32 = parse_int(key, value)?;
                    if fd < 0 {
                        return Err(invalid(key, value, "must be a file descriptor number"));
                    }
                    cfg.fd = Some(fd);
                }
                "iommu" => cfg.iommu = parse_bool(key, value)?,
                "id" => cfg.id = Some(check_id(value)?),
                "pci_segment" => cfg.pci_segment = parse_int(key, value)?,
                "pci_device_id" => {
                    let slot: u8 = parse_int(key, value)?;
                    if slot > 31 {
                        return Err(invalid(key, value, "PCI slot must be 0..=31"));
                    }
                    cfg.pci_device_id = Some(slot);
                }
                "x_nv_gpudirect_clique" => {
                    let clique: u8 = parse_int(key, value)?;
                    if clique > 15 {
                        return Err(invalid(key, value, "clique must be 0..=15"));
                    }
                    cfg.x_nv_gpudirect_clique = Some(clique);
                }
                "migration" => cfg.migration = parse_bool(key, value)?,
                "dirty_tracking" => {
                    cfg.dirty_tracking =
                        value.parse().map_err(|r: String| invalid(key, value, r))?
                }
                "emulated" => emulated_on = parse_bool(key, value)?,
                k if EMULATED_KEYS.contains(&k) => {
                    emu_keys.push(k);
                    apply_emulated_key(&mut emu, k, value)?;
                }
                other => {
                    return Err(DeviceConfigError::UnknownKey {
                        key: other.to_string(),
                    })
                }
            }
        }
        if !emulated_on {
            if let Some(k) = emu_keys.first() {
                return Err(DeviceConfigError::Conflict(format!(
                    "'{k}=' only applies with emulated=on"
                )));
            }
        }
        if emulated_on {
            if cfg.path.is_some() || cfg.fd.is_some() {
                return Err(DeviceConfigError::Conflict(
                    "emulated=on takes no path= or fd=".to_string(),
                ));
            }
            emu.validate()
                .map_err(|e| invalid("emulated", "on", e.to_string()))?;
            cfg.emulated = Some(emu);
        } else if cfg.path.is_none() && cfg.fd.is_none() {
            return Err(DeviceConfigError::MissingDevice);
        }
        Ok(cfg)
    }
}

fn apply_emulated_key(
    emu: &mut EmulatedConfig,
    key: &str,
    value: &str,
) -> Result<(), DeviceConfigError> {
    match key {
        "vram" => emu.vram_size = parse_size(value).map_err(|r| invalid(key, value, r))?,
        "chunk" => emu.vram_chunk_size = parse_size(value).map_err(|r| invalid(key, value, r))?,
        "devid" => emu.device_id = parse_int(key, value)?,
        "revid" => emu.revision_id = parse_int(key, value)?,
        "tiles" => emu.tiles = parse_int(key, value)?,
        "gts" => emu.gts_per_tile = parse_int(key, value)?,
        "seed" => emu.seed = parse_int(key, value)?,
        "workload" => emu.workload = parse_bool(key, value)?,
        "flags" => {
            emu.migration_flags =
                MigrationFlags::parse(value).map_err(|r| invalid(key, value, r))?
        }
        _ => {
            return Err(DeviceConfigError::UnknownKey {
                key: key.to_string(),
            })
        }
    }
    Ok(())
}

impl FromStr for DeviceConfig {
    type Err = DeviceConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceConfig::parse(s)
    }
}

impl fmt::Display for DeviceConfig {
    /// A canonical spec that parses back to an equal config.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        let mut parts = Vec::new();
        if let Some(p) = &self.path {
            parts.push(format!("path={}", p.display()));
        }
        if let Some(fd) = self.fd {
            parts.push(format!("fd={fd}"));
        }
        parts.push(format!("iommu={}", on(self.iommu)));
        if let Some(id) = &self.id {
            parts.push(format!("id={id}"));
        }
        parts.push(format!("pci_segment={}", self.pci_segment));
        if let Some(slot) = self.pci_device_id {
            parts.push(format!("pci_device_id={slot}"));
        }
        if let Some(c) = self.x_nv_gpudirect_clique {
            parts.push(format!("x_nv_gpudirect_clique={c}"));
        }
        parts.push(format!("migration={}", on(self.migration)));
        parts.push(format!("dirty_tracking={}", self.dirty_tracking.name()));
        if let Some(e) = &self.emulated {
            let flags = [
                (MigrationFlags::STOP_COPY, "stop_copy"),
                (MigrationFlags::P2P, "p2p"),
                (MigrationFlags::PRE_COPY, "pre_copy"),
            ]
            .iter()
            .filter(|(fl, _)| e.migration_flags.contains(*fl))
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join("|");
            parts.push("emulated=on".to_string());
            parts.push(format!("vram={}", format_size(e.vram_size)));
            parts.push(format!("devid={:#06x}", e.device_id));
            parts.push(format!("revid={:#04x}", e.revision_id));
            parts.push(format!("tiles={}", e.tiles));
            parts.push(format!("gts={}", e.gts_per_tile));
            parts.push(format!("workload={}", on(e.workload)));
            parts.push(format!("seed={}", e.seed));
            parts.push(format!("flags={flags}"));
            parts.push(format!("chunk={}", format_size(e.vram_chunk_size)));
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_hypervisor_examples_parse() {
        let c = DeviceConfig::parse(
            "path=/sys/bus/pci/devices/0000:03:00.1,iommu=on,id=gpu0,pci_segment=1,pci_device_id=5",
        )
        .unwrap();
        assert_eq!(
            c.path.as_deref(),
            Some(std::path::Path::new("/sys/bus/pci/devices/0000:03:00.1"))
        );
        assert!(c.iommu);
        assert_eq!(c.id.as_deref(), Some("gpu0"));
        assert_eq!(c.pci_segment, 1);
        assert_eq!(c.pci_device_id, Some(5));
        assert!(c.migration);
        assert_eq!(c.dirty_tracking, DirtyTracking::Auto);
        assert!(c.emulated.is_none());
        let c = DeviceConfig::parse("fd=7,migration=off,dirty_tracking=all").unwrap();
        assert_eq!(c.fd, Some(7));
        assert!(!c.migration);
        assert_eq!(c.dirty_tracking, DirtyTracking::All);
    }

    #[test]
    fn emulated_keys() {
        let c = DeviceConfig::parse("emulated=on,vram=1G,devid=0xe20c,revid=3,tiles=2,gts=1,workload=off,seed=9,flags=stop_copy|p2p,chunk=4M").unwrap();
        let e = c.emulated.unwrap();
        assert_eq!(e.vram_size, 1 << 30);
        assert_eq!(e.device_id, 0xe20c);
        assert_eq!(e.revision_id, 3);
        assert_eq!((e.tiles, e.gts_per_tile), (2, 1));
        assert!(!e.workload);
        assert_eq!(e.seed, 9);
        assert_eq!(e.migration_flags, MigrationFlags::XE_VF);
        assert_eq!(e.vram_chunk_size, 4 << 20);
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let cases: &[(&str, &str)] = &[
            ("path=/x,bogus=1", "'bogus'"),
            ("path=/x,path=/y", "'path' is given twice"),
            ("path=/x,iommu", "'iommu' has no value"),
            ("path=/x,iommu=", "'iommu' has no value"),
            ("path=/x,iommu=maybe", "'maybe' for device option 'iommu'"),
            (
                "path=/x,pci_device_id=32",
                "'32' for device option 'pci_device_id'",
            ),
            (
                "path=/x,pci_segment=70000",
                "'70000' for device option 'pci_segment'",
            ),
            (
                "path=/x,dirty_tracking=some",
                "'some' for device option 'dirty_tracking'",
            ),
            ("path=/x,id=_reserved", "'_reserved' for device option 'id'"),
            ("fd=-3", "'-3' for device option 'fd'"),
            ("path=/x,vram=1G", "'vram=' only applies with emulated=on"),
            ("emulated=on,vram=12Q", "'12Q' for device option 'vram'"),
            ("emulated=on,vram=99999999999T", "overflows"),
            (
                "emulated=on,devid=0x10000",
                "'0x10000' for device option 'devid'",
            ),
            (
                "emulated=on,flags=p2p|dirty",
                "'p2p|dirty' for device option 'flags'",
            ),
            ("emulated=on,tiles=0", "device option 'emulated'"),
            ("emulated=on,path=/x", "takes no path"),
            ("iommu=on", "names no device"),
            ("", "names no device"),
        ];
        for (spec, needle) in cases {
            let err = DeviceConfig::parse(spec).unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: '{err}' lacks '{needle}'");
        }
    }

    #[test]
    fn display_round_trips() {
        for spec in [
            "path=/sys/bus/pci/devices/0000:03:00.1,id=gpu0,pci_device_id=3",
            "fd=4,iommu=on,migration=off,dirty_tracking=device",
            "emulated=on,vram=3M,devid=0xe211,revid=2,tiles=2,gts=1,workload=off,chunk=1M",
            "emulated=on,vram=12345,flags=stop_copy",
        ] {
            let c = DeviceConfig::parse(spec).unwrap();
            let again = DeviceConfig::parse(&c.to_string()).unwrap();
            assert_eq!(c, again, "{spec} -> {c}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("16777216T").unwrap_err().contains("overflows"));
    }

    #[test]
    fn hostile_input_is_bounded_and_never_panics() {
        let long = "a".repeat(MAX_SPEC_LEN + 1);
        assert_eq!(
            DeviceConfig::parse(&long),
            Err(DeviceConfigError::TooLong {
                len: MAX_SPEC_LEN + 1
            })
        );
        for spec in [
            ",,,,",
            "=",
            "==",
            "path==",
            "=x",
            "path=/x,,,id=a=b",
            "emulated=on,vram=0x10",
            "emulated=on,devid=0x",
        ] {
            let _ = DeviceConfig::parse(spec);
        }
        // '=' inside a value is part of the value.
        let c = DeviceConfig::parse("path=/dev/a=b").unwrap();
        assert_eq!(c.path.unwrap(), PathBuf::from("/dev/a=b"));
    }
}
