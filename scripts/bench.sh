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
# Extra arguments go to `xe-vf-bench run`, e.g.
#   scripts/bench.sh --sizes 256M,1G --zeros 0,90 --reps 1
#   scripts/bench.sh --transports unix,tcp
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p xe-vf-bench
exec ./target/release/xe-vf-bench run --out-dir target/bench "$@"
