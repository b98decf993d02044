// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The final memory pass, with devices that cannot log their DMA.
//!
//! Such a device reports every page it can reach once it has stopped:
//! QEMU resends all of them. With the verify pass agreed, the pages the
//! CPU dirty log does not cover are instead checked by digest
//! ([`crate::verify::exchange_digests`]) and only those that differ are
//! sent, when the measured hash and link rates say that is faster (or when
//! the user forces it, [`FinalPassMode`]). Either way each page goes at
//! most once per pass ([`crate::ranges`]).
//!
//! The VMM runs the pass with its own memory sender:
//!
//! ```text
//! let pass = final_pass::plan(cpu, devices, verify_plan, mode, link_rate);
//! send_memory(pass.send)?;
//! if !pass.verify.is_empty() {
//!     let (differ, outcome) = verify::exchange_digests(conn, memory, &pass.verify, plan)?;
//!     send_memory(differ)?;
//! }
//! ```

use std::fmt;
use std::str::FromStr;

use log::info;
use serde::{Deserialize, Serialize};
use vm_migration::protocol::MemoryRangeTable;

use crate::ranges::{difference, union};
use crate::verify::wire::PageRun;
use crate::verify::{decide, page_runs, Decision, PlanReport, VerifyOutcome, VerifyPlan};

/// Share of the device-reported bytes the estimate expects to differ
/// (what a device wrote during the last round).
pub const EXPECTED_DMA_SHARE: f64 = 0.02;

/// The user's choice for pages devices may have written unlogged
/// (`final_pass=auto|verify|resend`; in JSON `Auto`, `Verify`, `Resend`,
/// as Cloud Hypervisor spells its other enums).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinalPassMode {
    /// Verify or resend, whichever the measured rates say is faster.
    #[default]
    Auto,
    /// Always verify (when the destination agreed to the verify pass).
    Verify,
    /// Always resend, as QEMU does.
    Resend,
}

impl FromStr for FinalPassMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_lowercase().as_str() {
            "auto" => Ok(FinalPassMode::Auto),
            "verify" => Ok(FinalPassMode::Verify),
            "resend" => Ok(FinalPassMode::Resend),
            other => Err(format!(
                "final pass mode '{other}': expected auto, verify or resend"
            )),
        }
    }
}

impl fmt::Display for FinalPassMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FinalPassMode::Auto => "auto",
            FinalPassMode::Verify => "verify",
            FinalPassMode::Resend => "resend",
        })
    }
}

/// How the choice was made, when the verify pass was agreed.
#[derive(Clone, Debug, Serialize)]
pub struct FinalPassChoice {
    pub decision: Decision,
    pub plan: PlanReport,
}

/// What a final pass did, for the migration's report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FinalPassReport {
    /// CPU-dirty bytes (with what pre-copy left over).
    pub cpu_dirty_bytes: u64,
    /// Device-reported bytes the CPU log does not cover.
    pub dma_bytes: u64,
    /// `resend` (QEMU style), `verify`, or `none` (no such pages).
    pub dma_pages: &'static str,
    pub decision: Option<FinalPassChoice>,
    /// With `verify`: the digest exchange.
    pub verify: Option<VerifyOutcome>,
}

/// A final pass, planned.
pub struct FinalPass {
    /// Sent first: the CPU-dirty pages, and the device-reported ones when
    /// resending; each page once.
    pub send: MemoryRangeTable,
    /// With the verify pass: the device-reported pages to check by digest
    /// (then send those that differ).
    pub verify: Vec<PageRun>,
    pub report: FinalPassReport,
}

/// Plans the final pass over `cpu` (the vCPUs' dirty pages and what
/// pre-copy left) and `devices` (what the devices report), verifying when
/// `verify` is set (the destination agreed and the plan is ready) and
/// `mode` and the rates (`link_rate`: bytes per second of the last
/// pre-copy pass) say so.
pub fn plan(
    cpu: MemoryRangeTable,
    devices: MemoryRangeTable,
    verify: Option<&VerifyPlan>,
    mode: FinalPassMode,
    link_rate: Option<f64>,
) -> FinalPass {
    let cpu = union([cpu]);
    let dma_only = difference(&devices, &cpu);
    let mut report = FinalPassReport {
        cpu_dirty_bytes: cpu.effective_size(),
        dma_bytes: dma_only.effective_size(),
        ..FinalPassReport::default()
    };
    let verifying = match (verify, report.dma_bytes) {
        (_, 0) | (None, _) => false,
        (Some(plan), bytes) => {
            let decision = decide(
                bytes,
                plan.hash_rate(),
                link_rate.unwrap_or(f64::MAX),
                EXPECTED_DMA_SHARE,
            );
            let chosen = match mode {
                FinalPassMode::Verify => true,
                FinalPassMode::Resend => false,
                FinalPassMode::Auto => decision.is_verify(),
            };
            if mode != FinalPassMode::Auto {
                info!("final pass: {mode} as asked (final_pass={mode})");
            }
            report.decision = Some(FinalPassChoice {
                decision,
                plan: plan.report.clone(),
            });
            chosen
        }
    };
    report.dma_pages = match (report.dma_bytes, verifying) {
        (0, _) => "none",
        (_, true) => "verify",
        (_, false) => "resend",
    };
    if verifying {
        FinalPass {
            send: cpu,
            verify: page_runs(&dma_only),
            report,
        }
    } else {
        FinalPass {
            send: union([cpu, dma_only]),
            verify: Vec::new(),
            report,
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_migration::protocol::MemoryRange;

    use super::*;

    fn t(ranges: &[(u64, u64)]) -> MemoryRangeTable {
        let mut table = MemoryRangeTable::default();
        for &(gpa, length) in ranges {
            table.push(MemoryRange { gpa, length });
        }
        table
    }

    #[test]
    fn without_the_verify_pass_every_page_goes_once() {
        let memory = 128 << 20;
        let cpu = t(&[(0x1000, 0x1000), (0x1000, 0x1000)]);
        // Two devices that cannot log: each reports all of memory.
        let devices = union([t(&[(0, memory)]), t(&[(0, memory)])]);
        let pass = plan(cpu, devices, None, FinalPassMode::Auto, None);
        assert_eq!(pass.send.effective_size(), memory);
        assert!(pass.verify.is_empty());
        assert_eq!(pass.report.dma_pages, "resend");
        assert_eq!(pass.report.cpu_dirty_bytes, 0x1000);
        assert_eq!(pass.report.dma_bytes, memory - 0x1000);
    }

    #[test]
    fn verifying_checks_only_pages_the_cpu_log_does_not_cover() {
        let verify = VerifyPlan::prepare(1).unwrap();
        let cpu = t(&[(0x3000, 0x2000)]);
        let devices = t(&[(0, 0x10000)]);
        let pass = plan(
            cpu,
            devices,
            Some(&verify),
            FinalPassMode::Verify,
            Some(1e6),
        );
        assert_eq!(pass.send.regions(), t(&[(0x3000, 0x2000)]).regions());
        assert_eq!(
            pass.verify,
            [
                PageRun { gpa: 0, pages: 3 },
                PageRun {
                    gpa: 0x5000,
                    pages: 11
                }
            ]
        );
        assert_eq!(pass.report.dma_pages, "verify");
        assert!(pass.report.decision.is_some());

        let forced = plan(
            t(&[]),
            t(&[(0, 0x10000)]),
            Some(&verify),
            FinalPassMode::Resend,
            Some(1e6),
        );
        assert!(forced.verify.is_empty());
        assert_eq!(forced.send.effective_size(), 0x10000);
        assert_eq!(forced.report.dma_pages, "resend");

        let nothing = plan(
            t(&[(0, 4096)]),
            t(&[]),
            Some(&verify),
            FinalPassMode::Verify,
            None,
        );
        assert_eq!(nothing.report.dma_pages, "none");
        assert!(nothing.report.decision.is_none());
    }

    #[test]
    fn modes_parse_as_users_write_them() {
        for m in [
            FinalPassMode::Auto,
            FinalPassMode::Verify,
            FinalPassMode::Resend,
        ] {
            assert_eq!(m.to_string().parse::<FinalPassMode>().unwrap(), m);
        }
        assert!("fast"
            .parse::<FinalPassMode>()
            .unwrap_err()
            .contains("auto, verify or resend"));
    }
}
