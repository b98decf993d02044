// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Dirty ranges from several sources (the vCPUs' dirty log, each device's)
//! as one set.
//!
//! Concatenating the sources' tables sends a page once per source that
//! reports it: two devices that cannot log their DMA each report all of
//! guest memory once they stop, and the final pass then carried guest
//! memory twice. A pass sends the [`union`] instead; the verify pass
//! checks the device-reported pages that are not CPU-dirty anyway
//! ([`difference`]).

use vm_migration::protocol::{MemoryRange, MemoryRangeTable};

/// End of `range`, saturating at the top of the address space.
fn end(range: &MemoryRange) -> u64 {
    range.gpa.saturating_add(range.length)
}

/// The ranges of `ranges`, sorted and merged so that no two overlap or
/// touch; empty ones dropped.
fn normalized(mut ranges: Vec<MemoryRange>) -> Vec<MemoryRange> {
    ranges.retain(|r| r.length > 0);
    ranges.sort_unstable_by_key(|r| r.gpa);
    let mut merged: Vec<MemoryRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.gpa <= end(last) => {
                last.length = end(last).max(end(&r)) - last.gpa;
            }
            _ => merged.push(r),
        }
    }
    merged
}

fn table(ranges: Vec<MemoryRange>) -> MemoryRangeTable {
    let mut table = MemoryRangeTable::default();
    for r in ranges {
        table.push(r);
    }
    table
}

/// Every byte any of `tables` names, once, in address order.
pub fn union<I: IntoIterator<Item = MemoryRangeTable>>(tables: I) -> MemoryRangeTable {
    let ranges = tables
        .into_iter()
        .flat_map(|t| t.regions().to_vec())
        .collect();
    table(normalized(ranges))
}

/// The bytes `a` names that `b` does not, in address order.
pub fn difference(a: &MemoryRangeTable, b: &MemoryRangeTable) -> MemoryRangeTable {
    let a = normalized(a.regions().to_vec());
    let b = normalized(b.regions().to_vec());
    let mut out = Vec::new();
    let mut cut = b.iter().peekable();
    for r in a {
        let mut at = r.gpa;
        let stop = end(&r);
        while at < stop {
            // Skip what ends before `at`.
            while cut.peek().is_some_and(|c| end(c) <= at) {
                cut.next();
            }
            match cut.peek() {
                Some(c) if c.gpa < stop => {
                    if c.gpa > at {
                        out.push(MemoryRange {
                            gpa: at,
                            length: c.gpa - at,
                        });
                    }
                    at = end(c).min(stop);
                }
                _ => {
                    out.push(MemoryRange {
                        gpa: at,
                        length: stop - at,
                    });
                    at = stop;
                }
            }
        }
    }
    table(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ranges: &[(u64, u64)]) -> MemoryRangeTable {
        table(
            ranges
                .iter()
                .map(|&(gpa, length)| MemoryRange { gpa, length })
                .collect(),
        )
    }

    fn pairs(table: &MemoryRangeTable) -> Vec<(u64, u64)> {
        table.regions().iter().map(|r| (r.gpa, r.length)).collect()
    }

    #[test]
    fn two_devices_reporting_all_memory_count_it_once() {
        let memory = 128 << 20;
        let cpu = t(&[(0x1000, 0x2000), (0x10_0000, 0x1000)]);
        let vf0 = t(&[(0, memory)]);
        let vf1 = t(&[(0, memory)]);
        let pass = union([cpu, vf0, vf1]);
        assert_eq!(pairs(&pass), [(0, memory)]);
        assert_eq!(pass.effective_size(), memory);
    }

    #[test]
    fn union_sorts_merges_touching_and_drops_empty_ranges() {
        let u = union([
            t(&[(0x5000, 0x1000), (0, 0x1000)]),
            t(&[(0x1000, 0x1000), (0x9000, 0)]),
        ]);
        assert_eq!(pairs(&u), [(0, 0x2000), (0x5000, 0x1000)]);
        let top = union([t(&[
            (u64::MAX - 0xfff, 0x1000),
            (u64::MAX - 0x800, 0x10_0000),
        ])]);
        assert_eq!(pairs(&top), [(u64::MAX - 0xfff, 0xfff)]);
        assert!(union(Vec::new()).is_empty());
    }

    #[test]
    fn difference_keeps_what_the_second_table_does_not_name() {
        let a = t(&[(0, 0x10000), (0x20000, 0x1000)]);
        let b = t(&[(0x2000, 0x1000), (0x8000, 0x9000), (0x20000, 0x1000)]);
        assert_eq!(pairs(&difference(&a, &b)), [(0, 0x2000), (0x3000, 0x5000)]);
        assert_eq!(pairs(&difference(&a, &t(&[]))), pairs(&a));
        assert!(difference(&t(&[]), &a).is_empty());
        assert!(difference(&a, &t(&[(0, 0x100000)])).is_empty());
    }
}
