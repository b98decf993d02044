// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Whether comparing VRAM pays in this migration, from measured rates.
//!
//! Pre-copy happens while the VM runs, so it costs no downtime, only BAR
//! reads and a share of the link. In stop-copy, comparing costs hashing
//! the stream on the source and reading back and hashing the held pages
//! on the destination; it pays when the link is slower than that.
//! [`decide`] compares the two estimates and says why.
//!
//! Stop-copy runs beside the final memory pass, which hashes too (the
//! verify pass) and moves memory: measured on a 2-core host, comparing
//! 1 GiB of VRAM beside a 4 GiB final pass took twice as long as the
//! hash rate measured alone promised. The estimate therefore counts
//! hashing at half the measured rate ([`CPU_SHARE`]).

use std::fmt;
use std::str::FromStr;

/// What the user asked for (`vram_precopy=auto|on|off` on the migration;
/// in JSON `Auto`, `On`, `Off`, as Cloud Hypervisor spells its other
/// enums).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
/// Share of the measured hash rate stop-copy gets (it shares the CPU
/// with the final memory pass and the devices' own copies).
pub const CPU_SHARE: f64 = 0.5;

/// Decides for `bytes` of VRAM stream (what pre-copy found not zero):
/// plain is `bytes / link_rate`; comparing is hashing on both sides at
/// [`CPU_SHARE`] of `hash_rate` plus sending the changed share. Rates in
/// bytes per second; a rate that is not known (0) makes `auto` send
/// plainly.
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
            let compare = 2.0 * b / (hash_rate * CPU_SHARE) + ASSUMED_CHANGED_SHARE * b / link_rate;
            VramDecision {
                compare: compare < plain,
                reason: format!(
                    "{:.0} MiB: sending all takes ~{:.0} ms at {:.0} MiB/s, comparing ~{:.0} ms \
                     (hash {:.0} MiB/s measured, half of it counted; {:.0}% assumed changed)",
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
        // 1 Gbit/s against 1.5 GiB/s of hashing: comparing pays.
        assert!(decide(VramPrecopyMode::Auto, gib, 1536.0 * MIB, 114.0 * MIB).compare);
        // 10 Gbit/s against 8 GiB/s of hashing: it pays too.
        assert!(decide(VramPrecopyMode::Auto, gib, 8192.0 * MIB, 1150.0 * MIB).compare);
        // 10 Gbit/s (a CPU-bound 341 MiB/s measured) against 1.5 GiB/s
        // of hashing: it does not (measured: 1.65 s plain, 3.8 s compared).
        assert!(!decide(VramPrecopyMode::Auto, gib, 1559.0 * MIB, 341.0 * MIB).compare);
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
