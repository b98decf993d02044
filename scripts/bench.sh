#!/usr/bin/env bash
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Downtime and throughput of moving an Xe VF's state (VRAM included):
# the copy limit, the upstream Cloud Hypervisor style, the QEMU style and
# this project's engine, each as a source and a destination process over
# the same link. Prints a markdown table; writes target/bench/results.json
# and target/bench/downtime.png.
#
# The default run (Unix socket, 256M/1G/4G, 0/50/90 % zero pages) takes
# about 8 minutes on 2 cores; there every method is bound by the CPU.
#
# The link-bound regime (a migration network) is a second command, about
# 6 minutes, run as root: two network namespaces joined by a veth pair
# shaped with tbf to the given rate (skipped with a reason if not root or
# ip/tc are missing):
#   scripts/bench.sh --transports veth:10gbit,veth:1gbit --sizes 1G --out-dir target/bench-veth
#
# Other extra arguments go to `xe-vf-bench run` as well, e.g.
#   scripts/bench.sh --sizes 256M,1G --zeros 0,90 --reps 1
#   scripts/bench.sh --transports unix,tcp
# and earlier results merge into one table and plot with
#   target/release/xe-vf-bench report target/bench/results.json target/bench-veth/results.json
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p xe-vf-bench -p xe-vf-testhost
if [[ "${1:-}" == "vm" ]]; then
    # Whole-VM downtime (two test hosts): scripts/bench.sh vm [options]
    shift
    exec ./target/release/xe-vf-bench vm "$@"
fi
# A later --out-dir in "$@" overrides this one.
exec ./target/release/xe-vf-bench run --out-dir target/bench "$@"
