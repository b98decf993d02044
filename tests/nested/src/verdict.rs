// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The lines a nested run prints (`XE-NESTED: CHECK|VALUE|RESULT|FLAVOR`,
//! see `scripts/nested/run.sh`), parsed for the tests that assert on them.

use std::collections::BTreeMap;

pub const TAG: &str = "XE-NESTED: ";

/// One `CHECK <flavour>/<scenario>/<step> pass|fail <detail>` line.
#[derive(Debug)]
pub struct Check {
    pub passed: bool,
    pub detail: String,
}

/// Everything the run printed that a test reads.
#[derive(Debug, Default)]
pub struct Verdict {
    pub checks: BTreeMap<String, Check>,
    /// Step names in the order printed.
    pub order: Vec<String>,
    /// Steps printed twice (an error of the run).
    pub repeated: Vec<String>,
    pub values: BTreeMap<String, String>,
    pub results: Vec<String>,
    pub flavors: Vec<String>,
}

impl Verdict {
    pub fn parse(stdout: &str) -> Verdict {
        let mut verdict = Verdict::default();
        for line in stdout.lines().filter_map(|l| l.strip_prefix(TAG)) {
            let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
            match kind {
                "CHECK" => {
                    let mut parts = rest.splitn(3, ' ');
                    let name = parts.next().unwrap_or_default().to_string();
                    let passed = parts.next() == Some("pass");
                    let detail = parts.next().unwrap_or_default().trim().to_string();
                    if verdict.checks.contains_key(&name) {
                        verdict.repeated.push(name);
                        continue;
                    }
                    verdict.order.push(name.clone());
                    verdict.checks.insert(name, Check { passed, detail });
                }
                "VALUE" => {
                    let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                    verdict
                        .values
                        .insert(name.to_string(), value.trim().to_string());
                }
                "RESULT" => verdict.results.push(rest.trim().to_string()),
                "FLAVOR" => verdict
                    .flavors
                    .push(rest.split(' ').next().unwrap_or_default().to_string()),
                _ => {}
            }
        }
        verdict
    }

    /// `name: detail` of every failed step, in order.
    pub fn failed(&self) -> Vec<String> {
        self.order
            .iter()
            .filter_map(|name| {
                let check = self.checks.get(name)?;
                (!check.passed).then(|| format!("{name}: {}", check.detail))
            })
            .collect()
    }

    /// A figure the run printed, as a number.
    pub fn number(&self, name: &str) -> Option<f64> {
        self.values.get(name)?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks_values_and_results() {
        let out = "noise\nXE-NESTED: FLAVOR upstream cloud-hypervisor v54\n\
                   XE-NESTED: CHECK upstream/boot/vram-filled pass 3 s\n\
                   XE-NESTED: CHECK upstream/boot/vram-checked fail BAD=1/64\n\
                   XE-NESTED: CHECK upstream/boot/vram-checked pass again\n\
                   XE-NESTED: VALUE upstream/snapshot-restore/state_json_bytes 1234\n\
                   XE-NESTED: RESULT fail\n";
        let v = Verdict::parse(out);
        assert_eq!(v.flavors, ["upstream"]);
        assert_eq!(
            v.order,
            ["upstream/boot/vram-filled", "upstream/boot/vram-checked"]
        );
        assert_eq!(v.repeated, ["upstream/boot/vram-checked"]);
        assert_eq!(v.failed(), ["upstream/boot/vram-checked: BAD=1/64"]);
        assert_eq!(
            v.number("upstream/snapshot-restore/state_json_bytes"),
            Some(1234.0)
        );
        assert_eq!(v.results, ["fail"]);
    }
}
