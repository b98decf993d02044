// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Whether comparing VRAM pays in this migration, from measured rates.
//!
//! Pre-copy happens while the VM runs, so it costs no downtime, only BAR
//! reads and a share of the link. In stop-copy, comparing costs hashing
//! the stream on the source and reading back and hashing the held pages
//! on the destination, window after window; it pays when the link is
//! slower than that. [`decide`] compares the two estimates and says why.

use std::fmt;
use std::str::FromStr;

/// What the user asked for (`vram_precopy=` on the migration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VramPrecopyMode {
    /// Pre-copy; compare in stop-copy when the rates say it pays.
    #[default]
    Auto,
    /// Pre-copy and compare whatever the rates say.
    On,
    /// Neither: all VRAM in stop-copy, as without the feature.
    Off,
}

impl FromStr for VramPrecopyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(VramPrecopyMode::Auto),
            "on" => Ok(VramPrecopyMode::On),
            "off" => Ok(VramPrecopyMode::Off),
            other => Err(format!("vram_precopy={other}: expected auto, on or off")),
        }
    }
}

impl fmt::Display for VramPrecopyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VramPrecopyMode::Auto => "auto",
            VramPrecopyMode::On => "on",
            VramPrecopyMode::Off => "off",
        })
    }
}

/// The stop-copy choice and its reason, for the log and the report.
#[derive(Clone, Debug, PartialEq)]
pub struct VramDecision {
    pub compare: bool,
    pub reason: String,
}

/// Share of VRAM assumed changed since pre-copy when deciding.
pub const ASSUMED_CHANGED_SHARE: f64 = 0.25;

/// Decides for `bytes` of VRAM: plain is `bytes / link_rate`; comparing
/// is hashing on both sides (one after the other, window by window) plus
/// sending the changed share. Rates in bytes per second; a rate that is
/// not known (0) makes `auto` send plainly.
pub fn decide(mode: VramPrecopyMode, bytes: u64, hash_rate: f64, link_rate: f64) -> VramDecision {
    let b = bytes as f64;
    match mode {
        VramPrecopyMode::Off => VramDecision {
            compare: false,
            reason: "vram_precopy=off".into(),
        },
        VramPrecopyMode::On => VramDecision {
            compare: true,
            reason: "vram_precopy=on".into(),
        },
        VramPrecopyMode::Auto if hash_rate <= 0.0 || link_rate <= 0.0 => VramDecision {
            compare: false,
            reason: format!(
                "rates unknown (hash {:.0} MiB/s, link {:.0} MiB/s)",
                hash_rate / 1048576.0,
                link_rate / 1048576.0
            ),
        },
        VramPrecopyMode::Auto => {
            let plain = b / link_rate;
            let compare = 2.0 * b / hash_rate + ASSUMED_CHANGED_SHARE * b / link_rate;
            VramDecision {
                compare: compare < plain,
                reason: format!(
                    "{:.0} MiB: sending all takes ~{:.0} ms at {:.0} MiB/s, comparing ~{:.0} ms \
                     (hash {:.0} MiB/s, {:.0}% assumed changed)",
                    b / 1048576.0,
                    plain * 1e3,
                    link_rate / 1048576.0,
                    compare * 1e3,
                    hash_rate / 1048576.0,
                    ASSUMED_CHANGED_SHARE * 100.0
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vram_precopy_compares_on_slow_links_only_unless_forced() {
        const MIB: f64 = 1048576.0;
        let gib = 1 << 30;
        // 10 Gbit/s against 4 GiB/s of hashing: comparing pays.
        assert!(decide(VramPrecopyMode::Auto, gib, 4096.0 * MIB, 1192.0 * MIB).compare);
        // A local socket faster than hashing: it does not.
        assert!(!decide(VramPrecopyMode::Auto, gib, 2048.0 * MIB, 5000.0 * MIB).compare);
        assert!(decide(VramPrecopyMode::On, gib, 1.0, 1e12).compare);
        assert!(!decide(VramPrecopyMode::Off, gib, 1e12, 1.0).compare);
        assert!(!decide(VramPrecopyMode::Auto, gib, 0.0, 1.0).compare);
        assert_eq!("on".parse(), Ok(VramPrecopyMode::On));
        assert!("yes"
            .parse::<VramPrecopyMode>()
            .unwrap_err()
            .contains("auto, on or off"));
    }
}
