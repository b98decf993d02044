// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the tests that boot qemu guests (the real-kernel run and the
//! nested Cloud Hypervisor run) share: whether they can run here, and the
//! reason printed when they cannot.

use std::env;
use std::fs;

/// Whether `tool` is an executable name found on `PATH`.
pub fn on_path(tool: &str) -> bool {
    env::var_os("PATH")
        .map(|path| env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

/// Effective uid 0, read from procfs to avoid `unsafe` for `geteuid`.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Why a qemu guest test skips, if it does: `skip_var=1` in the
/// environment, or qemu missing where it cannot be installed (not root).
/// Anything else must run, so a broken setup fails instead of skipping.
pub fn qemu_skip_reason(skip_var: &str) -> Option<String> {
    skip_reason_from(
        skip_var,
        env::var(skip_var).ok().as_deref(),
        on_path("qemu-system-x86_64"),
        is_root(),
    )
}

fn skip_reason_from(
    skip_var: &str,
    skip_value: Option<&str>,
    qemu_found: bool,
    root: bool,
) -> Option<String> {
    if skip_value == Some("1") {
        return Some(format!("{skip_var}=1"));
    }
    if !qemu_found && !root {
        return Some("qemu-system-x86_64 is missing and installing it needs root".to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_tool_every_machine_has_and_not_a_made_up_one() {
        assert!(on_path("sh"));
        assert!(!on_path("xe-vf-no-such-tool-5c1d"));
    }

    #[test]
    fn skips_only_when_asked_or_when_qemu_cannot_be_had() {
        let var = "XE_SKIP_X";
        assert_eq!(
            skip_reason_from(var, Some("1"), true, true),
            Some("XE_SKIP_X=1".to_string())
        );
        assert_eq!(skip_reason_from(var, Some("0"), true, false), None);
        // Missing qemu is installed by the test when it runs as root.
        assert_eq!(skip_reason_from(var, None, false, true), None);
        assert!(skip_reason_from(var, None, false, false)
            .is_some_and(|r| r.contains("qemu-system-x86_64 is missing")));
    }
}
