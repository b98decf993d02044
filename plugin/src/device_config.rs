// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `--device` option: Cloud Hypervisor's syntax plus our keys.
//!
//! One parser for every door (CLI, VMM glue, test host), so a device
//! string means the same thing everywhere. The CH part follows CH's
//! `DeviceConfig` (`path=<device_path>,fd=<vfio_cdev_fd>,iommu=on|off,
//! id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>,
//! x_nv_gpudirect_clique=<clique_id>,x_exclude_mmap_bars=[<bar>,...]`);
//! ours adds:
//!
//! * `migration=on|off` (default on) and
//!   `dirty_tracking=auto|iommufd|all|device|off` (default auto);
//! * `emulated=on` with the emulated VF's shape: `vram=`, `devid=`,
//!   `revid=`, `tiles=`, `gts=`, `ggtt=`, `mmio=`, `guc=`, `chunk=`,
//!   `workload=on|off`, `seed=`, `flags=stop_copy|p2p[|pre_copy]`.
//!
//! Syntax: comma-separated `key=value`; a value may be wrapped in double
//! quotes, and commas inside quotes or `[...]` do not split. Every error
//! names the key (and value) at fault. Checks CH leaves to VM-level
//! validation that concern one device only (exactly one of path/fd,
//! reserved id prefix, PCI slot range) are done here, at parse time.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

use crate::emulated::{EmulatedConfig, DEFAULT_BAR_READ_RATE};
use crate::uapi::MigrationFlags;

/// Bounds of [`EmulatedConfig::validate`] (its module keeps them private);
/// restated to name the key at fault. `validate()` still runs after, so a
/// drift can only make an error name `emulated` instead of the key.
const MAX_SMALL_COMPONENT: u64 = 64 << 20;
const MIN_GUC_SIZE: u64 = 8;

/// Longest accepted option string; real ones are a few hundred bytes.
pub const MAX_INPUT_LEN: usize = 64 * 1024;
/// Longest accepted `id=`.
pub const MAX_ID_LEN: usize = 256;
/// Most entries in `x_exclude_mmap_bars=[...]`.
pub const MAX_EXCLUDED_BARS: usize = 16;
/// Highest BAR index (6 is the expansion ROM).
pub const MAX_BAR_INDEX: u64 = 6;
/// Device slots per PCI bus; slot 0 is the root bridge.
pub const PCI_SLOTS: u8 = 32;
/// Prefix CH reserves for ids of its own internal devices.
pub const RESERVED_ID_PREFIX: &str = "__";

/// CH's keys, then ours; anything else is [`DeviceConfigError::UnknownKey`].
const CH_KEYS: &[&str] = &[
    "path",
    "fd",
    "iommu",
    "id",
    "pci_segment",
    "pci_device_id",
    "x_nv_gpudirect_clique",
    "x_exclude_mmap_bars",
];
const OUR_KEYS: &[&str] = &["migration", "xe_migration", "dirty_tracking", "emulated"];
/// Keys that only mean something with `emulated=on`.
const EMULATED_KEYS: &[&str] = &[
    "vram",
    "devid",
    "revid",
    "tiles",
    "gts",
    "ggtt",
    "mmio",
    "guc",
    "chunk",
    "workload",
    "seed",
    "flags",
    "dma_pages",
    "dma_set",
    "bar_rate",
];
/// Most pages one workload iteration may DMA into.
const MAX_DMA_PAGES: u32 = 4096;

/// Errors of [`DeviceConfig::parse`]; each names the key at fault.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DeviceConfigError {
    #[error("--device string is {len} bytes, more than {max}")]
    TooLong { len: usize, max: usize },
    #[error("--device syntax: {reason}")]
    Syntax { reason: String },
    #[error("--device: unknown key '{key}'")]
    UnknownKey { key: String },
    #[error("--device: key '{key}' given more than once")]
    DuplicateKey { key: String },
    #[error("--device: key '{key}' needs a value")]
    MissingValue { key: String },
    #[error("--device: invalid {key}={value}: {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("--device: one of path=, fd= or emulated=on is required")]
    MissingDevice,
    #[error("--device: {key} conflicts with {other}: {reason}")]
    Conflict {
        key: String,
        other: String,
        reason: String,
    },
}

/// How dirty guest memory is found while the device runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DirtyTracking {
    /// Device logging if the device has it, else IOMMU dirty tracking if
    /// available, else treat all guest memory as dirty.
    #[default]
    Auto,
    /// IOMMUFD dirty-bit tracking only (fail if unavailable).
    Iommufd,
    /// No tracking: every pass resends all guest memory the device can
    /// reach (what QEMU does for devices without DMA logging).
    All,
    /// The device's own DMA logging only (fail if unavailable).
    Device,
    /// No tracking at all; only valid for a device that does not DMA
    /// while migrating, or with a stopped VM.
    Off,
}

impl DirtyTracking {
    pub const ALL: [DirtyTracking; 5] = [
        DirtyTracking::Auto,
        DirtyTracking::Iommufd,
        DirtyTracking::All,
        DirtyTracking::Device,
        DirtyTracking::Off,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DirtyTracking::Auto => "auto",
            DirtyTracking::Iommufd => "iommufd",
            DirtyTracking::All => "all",
            DirtyTracking::Device => "device",
            DirtyTracking::Off => "off",
        }
    }
}

impl fmt::Display for DirtyTracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DirtyTracking {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| "expected auto, iommufd, all, device or off".to_string())
    }
}

/// One `--device`: a VFIO device (by path or fd) or an emulated Xe VF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// sysfs device dir or VFIO cdev path.
    pub path: Option<PathBuf>,
    /// An already open VFIO cdev fd handed over by management software.
    pub fd: Option<i32>,
    /// Put the device behind the virtual IOMMU.
    pub iommu: bool,
    pub id: Option<String>,
    pub pci_segment: u16,
    /// Guest PCI slot (1..32); `None` lets the VMM pick.
    pub pci_device_id: Option<u8>,
    /// CH's NVIDIA GPUDirect clique; accepted for compatibility.
    pub x_nv_gpudirect_clique: Option<u8>,
    /// BARs CH must not mmap; accepted for compatibility.
    pub x_exclude_mmap_bars: Vec<u64>,
    /// Whether the device takes part in snapshot and migration.
    pub migration: bool,
    pub dirty_tracking: DirtyTracking,
    /// `Some` for `emulated=on`: the emulated VF's shape.
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
            x_exclude_mmap_bars: Vec::new(),
            migration: true,
            dirty_tracking: DirtyTracking::Auto,
            emulated: None,
        }
    }
}

impl DeviceConfig {
    /// What `--help` prints.
    pub const SYNTAX: &'static str = "Direct device assignment parameters \
        \"path=<device_path>,fd=<vfio_cdev_fd>,iommu=on|off,id=<device_id>,\
        pci_segment=<segment_id>,pci_device_id=<pci_slot>,\
        x_nv_gpudirect_clique=<clique_id>,x_exclude_mmap_bars=[<bar>,...],\
        migration=on|off,xe_migration=on|off,dirty_tracking=auto|iommufd|all|device|off,\
        emulated=on|off,vram=<size>,devid=<id>,revid=<id>,tiles=<n>,gts=<n>,\
        ggtt=<size>,mmio=<size>,guc=<size>,chunk=<size>,workload=on|off,\
        seed=<n>,flags=stop_copy|p2p|pre_copy,dma_pages=<n>,dma_set=<size>,\
        bar_rate=<size per second>\"";

    pub fn parse(input: &str) -> Result<Self, DeviceConfigError> {
        let pairs = split_pairs(input)?;
        let get = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_str())
        };

        let emulated_on = match get("emulated") {
            Some(v) => parse_toggle("emulated", v)?,
            None => false,
        };
        if !emulated_on {
            if let Some(key) = EMULATED_KEYS.iter().find(|k| get(k).is_some()) {
                return Err(conflict(key, "emulated", "only valid with emulated=on"));
            }
        }

        let mut cfg = DeviceConfig::default();
        if let Some(v) = get("path") {
            cfg.path = Some(PathBuf::from(v));
        }
        if let Some(v) = get("fd") {
            // Only 0..=i32::MAX parses: a negative fd is never valid.
            cfg.fd = Some(parse_number::<i32>("fd", v)?);
        }
        match (&cfg.path, cfg.fd, emulated_on) {
            (None, None, false) => return Err(DeviceConfigError::MissingDevice),
            (Some(_), Some(_), _) => return Err(conflict("fd", "path", "give only one of them")),
            (Some(_), _, true) => return Err(conflict("emulated", "path", "give only one")),
            (_, Some(_), true) => return Err(conflict("emulated", "fd", "give only one")),
            _ => {}
        }
        if let Some(v) = get("iommu") {
            cfg.iommu = parse_toggle("iommu", v)?;
        }
        if let Some(v) = get("id") {
            check_id(v)?;
            cfg.id = Some(v.to_string());
        }
        if let Some(v) = get("pci_segment") {
            cfg.pci_segment = parse_number("pci_segment", v)?;
        }
        if let Some(v) = get("pci_device_id") {
            let slot: u8 = parse_number("pci_device_id", v)?;
            if slot == 0 || slot >= PCI_SLOTS {
                return Err(invalid(
                    "pci_device_id",
                    v,
                    &format!("slot must be 1..{PCI_SLOTS} (0 is the root bridge)"),
                ));
            }
            cfg.pci_device_id = Some(slot);
        }
        if let Some(v) = get("x_nv_gpudirect_clique") {
            cfg.x_nv_gpudirect_clique = Some(parse_number("x_nv_gpudirect_clique", v)?);
        }
        if let Some(v) = get("x_exclude_mmap_bars") {
            cfg.x_exclude_mmap_bars = parse_bar_list(v)?;
        }
        // `xe_migration=` is the patched Cloud Hypervisor's spelling (what
        // `xe-vf-mig host device-line` prints); both may be given if they agree.
        let migration = get("migration")
            .map(|v| parse_toggle("migration", v))
            .transpose()?;
        let xe_migration = get("xe_migration")
            .map(|v| parse_toggle("xe_migration", v))
            .transpose()?;
        match (migration, xe_migration) {
            (Some(a), Some(b)) if a != b => {
                return Err(conflict("xe_migration", "migration", "they disagree"))
            }
            (Some(on), _) | (None, Some(on)) => cfg.migration = on,
            (None, None) => {}
        }
        if let Some(v) = get("dirty_tracking") {
            cfg.dirty_tracking = v
                .parse()
                .map_err(|reason: String| invalid("dirty_tracking", v, &reason))?;
        }
        if emulated_on {
            cfg.emulated = Some(parse_emulated(&get)?);
        }
        Ok(cfg)
    }

    /// The id given with `id=`, if any.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
}

impl FromStr for DeviceConfig {
    type Err = DeviceConfigError;

    fn from_str(s: &str) -> Result<Self, DeviceConfigError> {
        DeviceConfig::parse(s)
    }
}

/// Canonical form: device first, then CH's keys and ours that differ from
/// the default, then every emulated field. Parses back to an equal config.
impl fmt::Display for DeviceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = PairWriter { f, first: true };
        if let Some(path) = &self.path {
            out.pair("path", &path.to_string_lossy())?;
        }
        if let Some(fd) = self.fd {
            out.pair("fd", &fd.to_string())?;
        }
        if self.emulated.is_some() {
            out.pair("emulated", "on")?;
        }
        if self.iommu {
            out.pair("iommu", "on")?;
        }
        if let Some(id) = &self.id {
            out.pair("id", id)?;
        }
        if self.pci_segment != 0 {
            out.pair("pci_segment", &self.pci_segment.to_string())?;
        }
        if let Some(slot) = self.pci_device_id {
            out.pair("pci_device_id", &slot.to_string())?;
        }
        if let Some(clique) = self.x_nv_gpudirect_clique {
            out.pair("x_nv_gpudirect_clique", &clique.to_string())?;
        }
        if !self.x_exclude_mmap_bars.is_empty() {
            let bars: Vec<String> = self
                .x_exclude_mmap_bars
                .iter()
                .map(u64::to_string)
                .collect();
            out.list("x_exclude_mmap_bars", &bars)?;
        }
        if !self.migration {
            out.pair("migration", "off")?;
        }
        if self.dirty_tracking != DirtyTracking::Auto {
            out.pair("dirty_tracking", self.dirty_tracking.as_str())?;
        }
        if let Some(e) = &self.emulated {
            out.pair("vram", &format_size(e.vram_size))?;
            out.pair("devid", &format!("{:#06x}", e.device_id))?;
            out.pair("revid", &format!("{:#04x}", e.revision_id))?;
            out.pair("tiles", &e.tiles.to_string())?;
            out.pair("gts", &e.gts_per_tile.to_string())?;
            out.pair("ggtt", &format_size(e.ggtt_size))?;
            out.pair("mmio", &format_size(e.mmio_size))?;
            out.pair("guc", &format_size(e.guc_size))?;
            out.pair("chunk", &format_size(e.vram_chunk_size))?;
            out.pair("workload", if e.workload { "on" } else { "off" })?;
            out.pair("seed", &format!("{:#x}", e.seed))?;
            out.pair("flags", &format_flags(e.migration_flags))?;
            if e.dma_pages != 0 {
                out.pair("dma_pages", &e.dma_pages.to_string())?;
            }
            if e.dma_set != 0 {
                out.pair("dma_set", &format_size(e.dma_set))?;
            }
            if e.bar_read_rate != DEFAULT_BAR_READ_RATE {
                out.pair("bar_rate", &format_size(e.bar_read_rate))?;
            }
        }
        Ok(())
    }
}

struct PairWriter<'a, 'b> {
    f: &'a mut fmt::Formatter<'b>,
    first: bool,
}

impl PairWriter<'_, '_> {
    fn separator(&mut self) -> fmt::Result {
        if !std::mem::replace(&mut self.first, false) {
            self.f.write_str(",")?;
        }
        Ok(())
    }

    /// Writes `key=value`, quoting values that would otherwise split.
    fn pair(&mut self, key: &str, value: &str) -> fmt::Result {
        self.separator()?;
        if value.contains([',', '[', ']']) {
            write!(self.f, "{key}=\"{value}\"")
        } else {
            write!(self.f, "{key}={value}")
        }
    }

    /// Writes `key=[a,b,...]`.
    fn list(&mut self, key: &str, items: &[String]) -> fmt::Result {
        self.separator()?;
        write!(self.f, "{key}=[{}]", items.join(","))
    }
}

/// Hostile input can be long; error messages keep its head only.
fn shorten(text: &str) -> String {
    const SHOWN: usize = 64;
    match text.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

fn invalid(key: &str, value: &str, reason: &str) -> DeviceConfigError {
    DeviceConfigError::InvalidValue {
        key: key.to_string(),
        value: shorten(value),
        reason: reason.to_string(),
    }
}

fn conflict(key: &str, other: &str, reason: &str) -> DeviceConfigError {
    DeviceConfigError::Conflict {
        key: key.to_string(),
        other: other.to_string(),
        reason: reason.to_string(),
    }
}

/// Splits `input` into known, unique, non-empty `key=value` pairs.
fn split_pairs(input: &str) -> Result<Vec<(&'static str, String)>, DeviceConfigError> {
    if input.len() > MAX_INPUT_LEN {
        return Err(DeviceConfigError::TooLong {
            len: input.len(),
            max: MAX_INPUT_LEN,
        });
    }
    let mut pairs: Vec<(&'static str, String)> = Vec::new();
    for option in split_commas(input)? {
        if option.is_empty() {
            return Err(DeviceConfigError::Syntax {
                reason: "empty option (stray comma?)".into(),
            });
        }
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        let known = CH_KEYS
            .iter()
            .chain(OUR_KEYS)
            .chain(EMULATED_KEYS)
            .find(|k| **k == key)
            .ok_or_else(|| DeviceConfigError::UnknownKey { key: shorten(key) })?;
        let value = unquote(key, value)?;
        if value.is_empty() {
            return Err(DeviceConfigError::MissingValue {
                key: known.to_string(),
            });
        }
        if pairs.iter().any(|(k, _)| k == known) {
            return Err(DeviceConfigError::DuplicateKey {
                key: known.to_string(),
            });
        }
        pairs.push((known, value));
    }
    Ok(pairs)
}

/// Splits at commas outside `"..."` and `[...]`.
fn split_commas(input: &str) -> Result<Vec<&str>, DeviceConfigError> {
    let mut out = Vec::new();
    let (mut in_quotes, mut depth, mut start) = (false, 0usize, 0usize);
    for (i, c) in input.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            '[' if !in_quotes => depth += 1,
            ']' if !in_quotes => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| DeviceConfigError::Syntax {
                        reason: format!("unmatched ']' at byte {i}"),
                    })?;
            }
            ',' if !in_quotes && depth == 0 => {
                out.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if in_quotes {
        return Err(DeviceConfigError::Syntax {
            reason: "unterminated '\"'".into(),
        });
    }
    if depth != 0 {
        return Err(DeviceConfigError::Syntax {
            reason: "unterminated '['".into(),
        });
    }
    if !input.is_empty() {
        out.push(&input[start..]);
    }
    Ok(out)
}

/// Strips one pair of wrapping quotes; a quote anywhere else is an error
/// (it could not be printed back).
fn unquote(key: &str, value: &str) -> Result<String, DeviceConfigError> {
    let inner = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if inner.contains('"') {
        return Err(invalid(key, value, "a '\"' may only wrap the whole value"));
    }
    Ok(inner.to_string())
}

fn parse_toggle(key: &str, value: &str) -> Result<bool, DeviceConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(invalid(key, value, "expected on or off")),
    }
}

/// Decimal or `0x` hex, fitting `T`.
fn parse_number<T: TryFrom<u64>>(key: &str, value: &str) -> Result<T, DeviceConfigError> {
    let n = parse_u64(value).map_err(|reason| invalid(key, value, &reason))?;
    T::try_from(n).map_err(|_| invalid(key, value, "out of range"))
}

fn parse_u64(value: &str) -> Result<u64, String> {
    let (digits, radix) = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => (hex, 16),
        None => (value, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err("expected a decimal or 0x-hex number".into());
    }
    u64::from_str_radix(digits, radix).map_err(|_| "number too large".to_string())
}

/// A byte count: a number with an optional `K`, `M`, `G` or `T` suffix
/// (powers of 1024, optionally followed by `iB` or `B`), or a plain `B`.
pub fn parse_size(value: &str) -> Result<u64, String> {
    let lower = value.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (number, shift) = match body.char_indices().last() {
        Some((i, 'k')) => (&body[..i], 10),
        Some((i, 'm')) => (&body[..i], 20),
        Some((i, 'g')) => (&body[..i], 30),
        Some((i, 't')) => (&body[..i], 40),
        _ if body.len() != lower.len() && lower.ends_with("ib") => {
            return Err("'iB' needs a K, M, G or T before it".into());
        }
        _ => (body, 0),
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a size like 4096, 64K, 256M, 2MiB or 1G".into());
    }
    let n: u64 = number.parse().map_err(|_| "size too large".to_string())?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| "size too large".to_string())
}

/// Shortest exact form: the biggest unit that divides the size.
pub fn format_size(size: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if size != 0 && size.trailing_zeros() >= shift {
            return format!("{}{unit}", size >> shift);
        }
    }
    size.to_string()
}

fn format_flags(flags: MigrationFlags) -> String {
    let mut names = Vec::new();
    for (flag, name) in [
        (MigrationFlags::STOP_COPY, "stop_copy"),
        (MigrationFlags::P2P, "p2p"),
        (MigrationFlags::PRE_COPY, "pre_copy"),
    ] {
        if flags.contains(flag) {
            names.push(name);
        }
    }
    names.join("|")
}

/// `[0,2,5]` or `[0-2,5]`, BAR indices only.
fn parse_bar_list(value: &str) -> Result<Vec<u64>, DeviceConfigError> {
    const KEY: &str = "x_exclude_mmap_bars";
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .ok_or_else(|| invalid(KEY, value, "expected a list like [0,2]"))?;
    let mut bars = Vec::new();
    for item in inner.split(',').filter(|s| !s.is_empty()) {
        let (lo, hi) = match item.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (item, item),
        };
        let lo: u64 = parse_number(KEY, lo)?;
        let hi: u64 = parse_number(KEY, hi)?;
        if lo > hi || hi > MAX_BAR_INDEX {
            return Err(invalid(
                KEY,
                value,
                &format!("BAR indices must be ascending and at most {MAX_BAR_INDEX}"),
            ));
        }
        for bar in lo..=hi {
            if bars.len() == MAX_EXCLUDED_BARS {
                return Err(invalid(KEY, value, "too many entries"));
            }
            bars.push(bar);
        }
    }
    if bars.is_empty() {
        return Err(invalid(KEY, value, "empty list"));
    }
    Ok(bars)
}

fn check_id(id: &str) -> Result<(), DeviceConfigError> {
    if id.starts_with(RESERVED_ID_PREFIX) {
        return Err(invalid(
            "id",
            id,
            "ids starting with '__' are reserved for the VMM's own devices",
        ));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(
            "id",
            id,
            &format!("longer than {MAX_ID_LEN} bytes"),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(invalid("id", id, "contains control characters"));
    }
    Ok(())
}

fn parse_emulated<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
) -> Result<EmulatedConfig, DeviceConfigError> {
    let mut e = EmulatedConfig::default();
    let size = |key: &str, v: &str| parse_size(v).map_err(|reason| invalid(key, v, &reason));
    if let Some(v) = get("vram") {
        e.vram_size = size("vram", v)?;
    }
    if let Some(v) = get("devid") {
        e.device_id = parse_number("devid", v)?;
    }
    if let Some(v) = get("revid") {
        e.revision_id = parse_number("revid", v)?;
    }
    if let Some(v) = get("tiles") {
        e.tiles = parse_number("tiles", v)?;
    }
    if let Some(v) = get("gts") {
        e.gts_per_tile = parse_number("gts", v)?;
    }
    if let Some(v) = get("ggtt") {
        e.ggtt_size = size("ggtt", v)?;
    }
    if let Some(v) = get("mmio") {
        e.mmio_size = size("mmio", v)?;
    }
    if let Some(v) = get("guc") {
        e.guc_size = size("guc", v)?;
    }
    if let Some(v) = get("chunk") {
        e.vram_chunk_size = size("chunk", v)?;
    }
    if let Some(v) = get("workload") {
        e.workload = parse_toggle("workload", v)?;
    }
    if let Some(v) = get("seed") {
        e.seed = parse_number("seed", v)?;
    }
    if let Some(v) = get("flags") {
        e.migration_flags = MigrationFlags::parse(v).map_err(|r| invalid("flags", v, &r))?;
    }
    if let Some(v) = get("dma_pages") {
        e.dma_pages = parse_number("dma_pages", v)?;
        if e.dma_pages > MAX_DMA_PAGES {
            return Err(invalid(
                "dma_pages",
                v,
                &format!("at most {MAX_DMA_PAGES} pages per iteration"),
            ));
        }
    }
    if let Some(v) = get("dma_set") {
        e.dma_set = size("dma_set", v)?;
    }
    if let Some(v) = get("bar_rate") {
        e.bar_read_rate = size("bar_rate", v)?;
    }
    check_emulated(&e, get)?;
    Ok(e)
}

/// The rules of [`EmulatedConfig::validate`], each pinned on the key that
/// breaks it; `validate()` itself runs last as a backstop.
fn check_emulated<'a>(
    e: &EmulatedConfig,
    get: &impl Fn(&str) -> Option<&'a str>,
) -> Result<(), DeviceConfigError> {
    let shown = |key: &str, fallback: String| get(key).map_or(fallback, str::to_string);
    let fail = |key: &str, fallback: String, reason: String| {
        Err(invalid(key, &shown(key, fallback), &reason))
    };
    if e.tiles == 0 {
        return fail("tiles", "0".into(), "must be at least 1".into());
    }
    if e.gts_per_tile == 0 {
        return fail("gts", "0".into(), "must be at least 1".into());
    }
    if u16::from(e.tiles) * u16::from(e.gts_per_tile) > u16::from(u8::MAX) {
        let key = if get("gts").is_some() { "gts" } else { "tiles" };
        return fail(
            key,
            String::new(),
            format!(
                "{} tiles x {} GTs exceed 255 GT ids",
                e.tiles, e.gts_per_tile
            ),
        );
    }
    if e.vram_size == 0 || !e.vram_size.is_multiple_of(u64::from(e.tiles)) {
        return fail(
            "vram",
            e.vram_size.to_string(),
            format!("must be non-zero and divisible by {} tiles", e.tiles),
        );
    }
    if e.vram_chunk_size == 0 {
        return fail("chunk", "0".into(), "must be non-zero".into());
    }
    for (key, size, min) in [
        ("ggtt", e.ggtt_size, 1),
        ("mmio", e.mmio_size, 1),
        ("guc", e.guc_size, MIN_GUC_SIZE),
    ] {
        if !(min..=MAX_SMALL_COMPONENT).contains(&size) {
            return fail(
                key,
                size.to_string(),
                format!("must be {min}..={MAX_SMALL_COMPONENT} bytes"),
            );
        }
    }
    if !e.migration_flags.contains(MigrationFlags::STOP_COPY) {
        return fail(
            "flags",
            format_flags(e.migration_flags),
            "must include stop_copy".into(),
        );
    }
    e.validate()
        .map_err(|err| invalid("emulated", "on", &err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> DeviceConfig {
        DeviceConfig::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> DeviceConfigError {
        DeviceConfig::parse(s).expect_err(s)
    }

    #[test]
    fn xe_migration_is_the_patched_chs_spelling_of_migration() {
        // What `xe-vf-mig host device-line` prints for Cloud Hypervisor.
        let line =
            "path=/sys/bus/pci/devices/0000:03:00.1,id=gpu0,xe_migration=on,dirty_tracking=all";
        let cfg = parse(line);
        assert!(cfg.migration);
        assert_eq!(cfg.dirty_tracking, DirtyTracking::All);
        assert!(!parse("path=/d,xe_migration=off").migration);
        assert!(!parse("path=/d,migration=off,xe_migration=off").migration);
        assert!(matches!(
            err("path=/d,migration=on,xe_migration=off"),
            DeviceConfigError::Conflict { ref key, ref other, .. }
                if key == "xe_migration" && other == "migration"
        ));
        assert!(matches!(
            err("path=/d,xe_migration=maybe"),
            DeviceConfigError::InvalidValue { ref key, .. } if key == "xe_migration"
        ));
    }

    fn assert_round_trip(cfg: &DeviceConfig) {
        let text = cfg.to_string();
        assert_eq!(&DeviceConfig::parse(&text).unwrap(), cfg, "{text}");
        // Canonical: printing again gives the same text.
        assert_eq!(DeviceConfig::parse(&text).unwrap().to_string(), text);
    }

    fn invalid_key(e: &DeviceConfigError) -> &str {
        match e {
            DeviceConfigError::InvalidValue { key, .. } => key,
            other => panic!("not InvalidValue: {other:?}"),
        }
    }

    #[test]
    fn ch_examples_parse() {
        let c = parse("path=/sys/bus/pci/devices/0000:03:00.1/");
        assert_eq!(
            c.path,
            Some(PathBuf::from("/sys/bus/pci/devices/0000:03:00.1/"))
        );
        assert_eq!(
            (c.fd, c.iommu, c.id(), c.pci_segment, c.pci_device_id),
            (None, false, None, 0, None)
        );
        assert!(c.migration);
        assert_eq!(c.dirty_tracking, DirtyTracking::Auto);
        assert!(c.emulated.is_none());

        let c =
            parse("path=/dev/vfio/devices/vfio0,iommu=on,id=gpu0,pci_segment=1,pci_device_id=5");
        assert!(c.iommu);
        assert_eq!(
            (c.id(), c.pci_segment, c.pci_device_id),
            (Some("gpu0"), 1, Some(5))
        );

        let c = parse("fd=7,id=vfio1");
        assert_eq!((c.fd, c.path.as_ref()), (Some(7), None));

        let c = parse("path=/d,x_nv_gpudirect_clique=3,x_exclude_mmap_bars=[0-2,5]");
        assert_eq!(c.x_nv_gpudirect_clique, Some(3));
        assert_eq!(c.x_exclude_mmap_bars, vec![0, 1, 2, 5]);
        assert_eq!(
            parse("path=/d,x_exclude_mmap_bars=[6]").x_exclude_mmap_bars,
            vec![6]
        );
        assert!(!parse("path=/d,iommu=off").iommu);
    }

    #[test]
    fn our_keys_parse() {
        let c = parse("path=/d,migration=off,dirty_tracking=iommufd");
        assert!(!c.migration);
        assert_eq!(c.dirty_tracking, DirtyTracking::Iommufd);
        for mode in DirtyTracking::ALL {
            let c = parse(&format!("fd=3,dirty_tracking={mode}"));
            assert_eq!(c.dirty_tracking, mode);
        }
    }

    #[test]
    fn emulated_defaults_and_keys() {
        let c = parse("emulated=on");
        assert_eq!(c.emulated, Some(EmulatedConfig::default()));
        let c = parse(
            "emulated=on,vram=1G,devid=0xe20b,revid=3,tiles=2,gts=1,workload=off,\
             seed=0x10,flags=stop_copy|p2p|pre_copy,chunk=2MiB,ggtt=128K,mmio=8KiB,guc=4096",
        );
        let e = c.emulated.unwrap();
        assert_eq!(e.vram_size, 1 << 30);
        assert_eq!((e.device_id, e.revision_id), (0xe20b, 3));
        assert_eq!((e.tiles, e.gts_per_tile), (2, 1));
        assert!(!e.workload);
        assert_eq!(e.seed, 16);
        assert_eq!(
            e.migration_flags,
            MigrationFlags::XE_VF.union(MigrationFlags::PRE_COPY)
        );
        assert_eq!(e.vram_chunk_size, 2 << 20);
        assert_eq!(
            (e.ggtt_size, e.mmio_size, e.guc_size),
            (128 << 10, 8 << 10, 4096)
        );
        assert!(parse("emulated=off,path=/d").emulated.is_none());
    }

    #[test]
    fn exactly_one_device_source() {
        assert_eq!(err(""), DeviceConfigError::MissingDevice);
        assert_eq!(err("iommu=on,id=x"), DeviceConfigError::MissingDevice);
        assert_eq!(err("emulated=off"), DeviceConfigError::MissingDevice);
        assert!(matches!(
            err("path=/d,fd=3"),
            DeviceConfigError::Conflict { key, other, .. } if key == "fd" && other == "path"
        ));
        assert!(matches!(
            err("emulated=on,path=/d"),
            DeviceConfigError::Conflict { key, .. } if key == "emulated"
        ));
        assert!(matches!(
            err("emulated=on,fd=4"),
            DeviceConfigError::Conflict { other, .. } if other == "fd"
        ));
    }

    #[test]
    fn emulated_keys_require_emulated_on() {
        for key in EMULATED_KEYS {
            let e = err(&format!("path=/d,{key}=1"));
            assert!(
                matches!(&e, DeviceConfigError::Conflict { key: k, other, .. }
                    if k == key && other == "emulated"),
                "{key}: {e:?}"
            );
        }
        assert!(matches!(
            err("emulated=off,fd=1,vram=1G"),
            DeviceConfigError::Conflict { .. }
        ));
    }

    #[test]
    fn syntax_errors_name_the_key() {
        assert_eq!(
            err("path=/d,bogus=1"),
            DeviceConfigError::UnknownKey {
                key: "bogus".into()
            }
        );
        assert_eq!(
            err("path=/d,id=a,id=b"),
            DeviceConfigError::DuplicateKey { key: "id".into() }
        );
        assert_eq!(
            err("path=/d,iommu"),
            DeviceConfigError::MissingValue {
                key: "iommu".into()
            }
        );
        assert_eq!(
            err("path="),
            DeviceConfigError::MissingValue { key: "path".into() }
        );
        assert!(matches!(
            err("path=/d,,id=x"),
            DeviceConfigError::Syntax { .. }
        ));
        assert!(matches!(err("path=/d,"), DeviceConfigError::Syntax { .. }));
        assert!(matches!(err(","), DeviceConfigError::Syntax { .. }));
        assert!(matches!(err("path=\"/d"), DeviceConfigError::Syntax { .. }));
        assert!(matches!(
            err("path=/d,x_exclude_mmap_bars=[1"),
            DeviceConfigError::Syntax { .. }
        ));
        assert!(matches!(err("path=/d]"), DeviceConfigError::Syntax { .. }));
        assert_eq!(invalid_key(&err("path=a\"b\"c")), "path");
        // Keys are case-sensitive, as CH's.
        assert!(matches!(
            err("PATH=/d"),
            DeviceConfigError::UnknownKey { .. }
        ));
    }

    #[test]
    fn invalid_values_name_key_and_value() {
        for (input, key) in [
            ("fd=notanint", "fd"),
            ("fd=-1", "fd"),
            ("fd=99999999999", "fd"),
            ("path=/d,iommu=maybe", "iommu"),
            ("path=/d,pci_segment=65536", "pci_segment"),
            ("path=/d,pci_device_id=0", "pci_device_id"),
            ("path=/d,pci_device_id=32", "pci_device_id"),
            ("path=/d,pci_device_id=256", "pci_device_id"),
            ("path=/d,x_nv_gpudirect_clique=300", "x_nv_gpudirect_clique"),
            ("path=/d,x_exclude_mmap_bars=[7]", "x_exclude_mmap_bars"),
            ("path=/d,x_exclude_mmap_bars=[3-1]", "x_exclude_mmap_bars"),
            ("path=/d,x_exclude_mmap_bars=[]", "x_exclude_mmap_bars"),
            ("path=/d,x_exclude_mmap_bars=2", "x_exclude_mmap_bars"),
            ("path=/d,migration=2", "migration"),
            ("path=/d,dirty_tracking=sometimes", "dirty_tracking"),
            ("path=/d,id=__internal", "id"),
            ("path=/d,id=a\u{7}b", "id"),
            ("emulated=on,vram=lots", "vram"),
            ("emulated=on,vram=0", "vram"),
            ("emulated=on,vram=17,tiles=2", "vram"),
            ("emulated=on,devid=0x10000", "devid"),
            ("emulated=on,revid=256", "revid"),
            ("emulated=on,tiles=0", "tiles"),
            ("emulated=on,gts=0", "gts"),
            ("emulated=on,gts=200,tiles=2,vram=2M", "gts"),
            ("emulated=on,chunk=0", "chunk"),
            ("emulated=on,guc=4", "guc"),
            ("emulated=on,ggtt=1G", "ggtt"),
            ("emulated=on,mmio=0", "mmio"),
            ("emulated=on,workload=yes", "workload"),
            ("emulated=on,dma_pages=4097", "dma_pages"),
            ("emulated=on,dma_pages=-1", "dma_pages"),
            ("emulated=on,seed=-5", "seed"),
            ("emulated=on,flags=p2p", "flags"),
            ("emulated=on,flags=stop_copy|warp", "flags"),
        ] {
            let e = err(input);
            assert_eq!(invalid_key(&e), key, "{input}: {e}");
            assert!(e.to_string().contains(key), "{input}: {e}");
        }
        let e = err("path=/d,pci_device_id=40");
        assert!(e.to_string().contains("=40"), "{e}");
    }

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("4096", 4096),
            ("0", 0),
            ("1K", 1 << 10),
            ("1k", 1 << 10),
            ("64KiB", 64 << 10),
            ("256M", 256 << 20),
            ("2MiB", 2 << 20),
            ("2MB", 2 << 20),
            ("1G", 1 << 30),
            ("1gib", 1 << 30),
            ("3T", 3 << 40),
            ("512B", 512),
            ("16777215T", 16_777_215 << 40),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "M",
            "1.5G",
            "-1",
            "1X",
            "1iB",
            "iB",
            "1 G",
            "0x10",
            "1GG",
            "16777216T",
            "18446744073709551616",
            "99999999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(256 << 20), "256M");
        assert_eq!(format_size(4096), "4K");
        assert_eq!(format_size(1 << 40), "1T");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
        for size in [
            0,
            1,
            1023,
            1024,
            3 << 30,
            u64::MAX,
            u64::MAX - 1023,
            5 << 41,
        ] {
            assert_eq!(parse_size(&format_size(size)), Ok(size), "{size}");
        }
    }

    /// The restated bounds agree with `EmulatedConfig::validate`.
    #[test]
    fn emulated_bounds_match_the_engine() {
        let c = parse("emulated=on,ggtt=64M,mmio=1,guc=8");
        let e = c.emulated.unwrap();
        assert_eq!(
            (e.ggtt_size, e.guc_size),
            (MAX_SMALL_COMPONENT, MIN_GUC_SIZE)
        );
        e.validate().unwrap();
        let mut over = e.clone();
        over.ggtt_size += 1;
        assert!(over.validate().is_err());
        let mut under = e;
        under.guc_size -= 1;
        assert!(under.validate().is_err());
    }

    #[test]
    fn numbers_accept_hex_and_decimal() {
        let e = parse("emulated=on,devid=57867,revid=0x1F,seed=0XFF")
            .emulated
            .unwrap();
        assert_eq!((e.device_id, e.revision_id, e.seed), (0xe20b, 0x1f, 0xff));
        assert_eq!(invalid_key(&err("emulated=on,devid=0x")), "devid");
        assert_eq!(invalid_key(&err("emulated=on,devid=+5")), "devid");
    }

    #[test]
    fn display_round_trips() {
        let mut configs = vec![
            parse("path=/dev/vfio/devices/vfio3"),
            parse("fd=0"),
            parse("emulated=on"),
            parse(
                "path=/d,iommu=on,id=gpu0,pci_segment=3,pci_device_id=31,\
                 x_nv_gpudirect_clique=0,x_exclude_mmap_bars=[0,2],migration=off,\
                 dirty_tracking=all",
            ),
            parse(
                "emulated=on,vram=3M,tiles=3,gts=2,devid=1,revid=0,seed=0,workload=off,\
                 flags=stop_copy,chunk=1000,ggtt=1,mmio=3,guc=8,id=e0",
            ),
        ];
        configs.push(parse("path=\"/odd,dir/[x]\",id=\"a,b\""));
        configs.push(parse("path=\"[a]b]\",id=\"[q]\""));
        assert_eq!(configs[5].path, Some(PathBuf::from("/odd,dir/[x]")));
        assert_eq!(configs[5].id(), Some("a,b"));
        for cfg in &configs {
            assert_round_trip(cfg);
        }
        assert_eq!(configs[0].to_string(), "path=/dev/vfio/devices/vfio3");
        assert_eq!(
            parse("path=/d,dirty_tracking=auto,migration=on,iommu=off").to_string(),
            "path=/d"
        );
        assert!(configs[2]
            .to_string()
            .starts_with("emulated=on,vram=256M,devid=0xe20b"));
        assert_eq!(
            configs[2].to_string().parse::<DeviceConfig>().unwrap(),
            configs[2]
        );
    }

    #[test]
    fn hostile_input_is_rejected_without_panicking() {
        let long = format!("path=/{}", "a".repeat(MAX_INPUT_LEN));
        assert!(matches!(err(&long), DeviceConfigError::TooLong { .. }));
        // Long but in bounds: the error message stays short.
        let key = "k".repeat(10_000);
        let e = err(&format!("{key}=1"));
        assert!(e.to_string().len() < 200, "{}", e.to_string().len());
        let e = err(&format!("fd={}", "9".repeat(10_000)));
        assert!(e.to_string().len() < 300);
        let id = "i".repeat(MAX_ID_LEN + 1);
        assert_eq!(invalid_key(&err(&format!("fd=1,id={id}"))), "id");
        assert_eq!(
            parse(&format!("fd=1,id={}", "i".repeat(MAX_ID_LEN)))
                .id()
                .map(str::len),
            Some(MAX_ID_LEN)
        );
        // '=' inside a value is part of the value.
        assert_eq!(parse("path=/a=b,id=x=y").path, Some(PathBuf::from("/a=b")));
        assert_eq!(parse("path=/a=b,id=x=y").id(), Some("x=y"));
        assert!(matches!(err("=1"), DeviceConfigError::UnknownKey { .. }));
        assert!(matches!(err("==="), DeviceConfigError::UnknownKey { .. }));
        assert!(matches!(
            err("path=/d,x_exclude_mmap_bars=[0-99999999999999]"),
            DeviceConfigError::InvalidValue { .. }
        ));
        assert!(matches!(
            err("path=/d,x_exclude_mmap_bars=[[[[0]]]]"),
            DeviceConfigError::InvalidValue { .. }
        ));
        // Multi-byte characters near the truncation point do not split.
        let e = err(&format!("path=/d,iommu={}", "é".repeat(100)));
        assert!(e.to_string().ends_with("...: expected on or off"), "{e}");
    }

    /// Deterministic garbage built from the grammar's own pieces.
    #[test]
    fn random_strings_never_panic_and_accepted_ones_round_trip() {
        const PIECES: &[&str] = &[
            "path",
            "fd",
            "id",
            "iommu",
            "emulated",
            "vram",
            "tiles",
            "gts",
            "flags",
            "chunk",
            "pci_device_id",
            "x_exclude_mmap_bars",
            "dirty_tracking",
            "migration",
            "=",
            ",",
            "\"",
            "[",
            "]",
            "-",
            "on",
            "off",
            "0x",
            "1",
            "2",
            "7",
            "0",
            "M",
            "iB",
            "G",
            "/d",
            "__",
            "|",
            "stop_copy",
            "p2p",
            "all",
            "é",
            " ",
        ];
        let mut state = 0x0123_4567_89ab_cdefu64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut accepted = 0;
        for _ in 0..30_000 {
            let n = (next() % 12) as usize;
            let s: String = (0..n)
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect();
            if let Ok(cfg) = DeviceConfig::parse(&s) {
                accepted += 1;
                assert_round_trip(&cfg);
            }
        }
        assert!(accepted > 0);
    }
}

#[cfg(test)]
mod dma_pages_tests {
    use super::*;

    #[test]
    fn dma_pages_parses_and_shows_only_when_set() {
        let c = DeviceConfig::parse("emulated=on,vram=1M,dma_pages=10").unwrap();
        assert_eq!(c.emulated.as_ref().unwrap().dma_pages, 10);
        assert!(c.to_string().contains("dma_pages=10"), "{c}");
        let plain = DeviceConfig::parse("emulated=on,vram=1M").unwrap();
        assert_eq!(plain.emulated.as_ref().unwrap().dma_pages, 0);
        assert!(!plain.to_string().contains("dma_pages"), "{plain}");
        let set = DeviceConfig::parse("emulated=on,vram=1M,dma_pages=4,dma_set=2M").unwrap();
        assert_eq!(set.emulated.as_ref().unwrap().dma_set, 2 << 20);
        assert_eq!(DeviceConfig::parse(&set.to_string()).unwrap(), set);
    }
}
