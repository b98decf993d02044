// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A link-bound migration network on one host: two network namespaces
//! joined by a veth pair, both ends shaped with a token bucket filter to
//! the link rate. Over a local socket every method is bound by the CPU;
//! over a real migration link the bytes on the wire decide downtime, and
//! this is where the bench shows that regime.
//!
//! Everything lives inside the two namespaces (addresses in
//! 10.98.x.0/30, nothing on the host's own interfaces), and [`ShapedLink`]
//! deletes both namespaces when dropped, on panic unwinding too. Runs that
//! died without unwinding (SIGKILL) are swept at the next start.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Prefix of every namespace this bench creates: `xevfb-<pid>-<n>-src`.
const PREFIX: &str = "xevfb-";

/// One shaped veth link between a source and a destination namespace.
pub struct ShapedLink {
    src_ns: String,
    dst_ns: String,
    /// Address of the destination end, where destinations listen.
    pub dst_ip: String,
    /// `tc qdisc show` output of both ends, for the record.
    pub qdiscs: String,
}

/// Why a veth link cannot be set up here, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("veth needs root (network namespaces and tc)".into());
    }
    for tool in ["ip", "tc"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("veth needs `{tool}` (iproute2) on PATH"));
        }
    }
    None
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes namespaces of earlier bench runs whose process is gone.
fn sweep_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            log::info!("deleting stale namespace {name}");
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

/// Token bucket burst for `rate_bit_s`: about 4 ms of traffic, at least
/// 256 KiB so 64 KiB GSO segments pass whole at low rates.
fn burst_bytes(rate_bit_s: u64) -> u64 {
    (rate_bit_s / 8 / 250).max(256 << 10)
}

impl ShapedLink {
    /// Creates the namespaces, the veth pair and the shaping; `index`
    /// (0-255) keeps links of one run apart.
    pub fn create(rate_bit_s: u64, index: u8) -> Result<Self> {
        sweep_stale();
        let pid = std::process::id();
        let mut link = ShapedLink {
            src_ns: format!("{PREFIX}{pid}-{index}-src"),
            dst_ns: format!("{PREFIX}{pid}-{index}-dst"),
            dst_ip: format!("10.98.{index}.2"),
            qdiscs: String::new(),
        };
        // From here on, Drop deletes whatever part was created.
        link.qdiscs = link.set_up(rate_bit_s, index)?;
        Ok(link)
    }

    fn set_up(&self, rate_bit_s: u64, index: u8) -> Result<String> {
        let pid = std::process::id();
        // Interface names stay within IFNAMSIZ (15 characters).
        let (src_if, dst_if) = (format!("xvb{pid}s"), format!("xvb{pid}d"));
        let src_ip = format!("10.98.{index}.1/30");
        let dst_ip = format!("{}/30", self.dst_ip);
        run("ip", &["netns", "add", &self.src_ns])?;
        run("ip", &["netns", "add", &self.dst_ns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &src_if,
                "netns",
                &self.src_ns,
                "type",
                "veth",
                "peer",
                "name",
                &dst_if,
                "netns",
                &self.dst_ns,
            ],
        )?;
        let rate = rate_bit_s.to_string();
        let burst = burst_bytes(rate_bit_s).to_string();
        let mut qdiscs = String::new();
        for (ns, dev, ip) in [
            (&self.src_ns, &src_if, &src_ip),
            (&self.dst_ns, &dst_if, &dst_ip),
        ] {
            run("ip", &["-n", ns, "addr", "add", ip, "dev", dev])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
            run(
                "ip",
                &[
                    "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                    &rate, "burst", &burst, "latency", "20ms",
                ],
            )?;
            qdiscs += &run(
                "ip",
                &["netns", "exec", ns, "tc", "qdisc", "show", "dev", dev],
            )?;
        }
        Ok(qdiscs)
    }

    /// A command that runs `program` inside the source or destination
    /// namespace (`ip netns exec` execs it, so the child's pid is the
    /// program's own).
    pub fn command(&self, destination: bool, program: &std::path::Path) -> Command {
        let ns = if destination {
            &self.dst_ns
        } else {
            &self.src_ns
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth end inside it, and with
        // it the peer and both qdiscs.
        for ns in [&self.src_ns, &self.dst_ns] {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                log::debug!("{e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_covers_a_gso_segment_and_scales_with_rate() {
        assert_eq!(burst_bytes(1_000_000), 256 << 10);
        assert_eq!(burst_bytes(10_000_000_000), 5_000_000);
    }
}
