#!/usr/bin/env bash
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Checks every patch of our Cloud Hypervisor series on its own, as a CH
# reviewer would: for each commit after `series-base` in a dev tree
# (scripts/build-cloud-hypervisor.sh --dev-tree DIR), in order,
#
#   - `cargo +nightly fmt --check` under CH's .rustfmt.toml;
#   - `cargo clippy --all-targets -- -D warnings` (CH's workspace lints) of
#     the crates the patch touches;
#   - the unit tests of those crates (vmm with --features kvm).
#
# The first failure stops it, naming the patch. It takes a while (each
# patch rebuilds the crates it touches; about 2-4 min a patch on 2 cores),
# so it is a tool for whoever edits the series, not part of CI: CI builds
# and tests the whole series (scripts/build-cloud-hypervisor.sh --test).
#
# Usage: scripts/check-series.sh DIR
# Environment: XE_CACHE_DIR (its cargo target directory is reused).

set -euo pipefail

DIR=${1:?usage: scripts/check-series.sh DEV_TREE_DIR}
TREE="$DIR/cloud-hypervisor"
CACHE="${XE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/xe-vf-migration}/cloud-hypervisor"
export CARGO_TARGET_DIR="$CACHE/target-series"

log() { echo "[check-series] $*" >&2; }
die() {
    echo "[check-series] ERROR: $*" >&2
    exit 1
}

git -C "$TREE" rev-parse -q --verify series-base >/dev/null ||
    die "$TREE has no series-base tag (make it with scripts/build-cloud-hypervisor.sh --dev-tree)"
[ -z "$(git -C "$TREE" status --porcelain --untracked-files=no)" ] ||
    die "$TREE has uncommitted changes"
cargo +nightly fmt --version >/dev/null 2>&1 || die "nightly rustfmt is needed (cargo +nightly fmt)"

head=$(git -C "$TREE" rev-parse --abbrev-ref HEAD)
[ "$head" != HEAD ] || head=$(git -C "$TREE" rev-parse HEAD)
trap 'git -C "$TREE" checkout -q "$head"' EXIT

mapfile -t commits < <(git -C "$TREE" rev-list --reverse series-base..HEAD)
n=0
for c in "${commits[@]}"; do
    n=$((n + 1))
    subject=$(git -C "$TREE" log -1 --format=%s "$c")
    log "[$n/${#commits[@]}] $subject"
    git -C "$TREE" checkout -q "$c"
    (cd "$TREE" && cargo +nightly fmt --all -- --check >/dev/null) ||
        die "patch $n ($subject): cargo +nightly fmt --check reports differences"
    # The crates the patch touches: top-level directories with a Cargo.toml.
    mapfile -t crates < <(git -C "$TREE" diff --name-only "$c~1" "$c" | cut -d/ -f1 | sort -u |
        while read -r d; do [ -f "$TREE/$d/Cargo.toml" ] && echo "$d"; done)
    for crate in "${crates[@]}"; do
        features=()
        [ "$crate" = vmm ] && features=(--features kvm)
        (cd "$TREE" && cargo clippy --locked -p "$crate" "${features[@]}" --all-targets \
            -- -D warnings) >/dev/null 2>&1 ||
            die "patch $n ($subject): clippy of $crate fails"
        target=()
        [ "$crate" = vmm ] && target=(--lib)
        (cd "$TREE" && cargo test --locked -p "$crate" "${features[@]}" "${target[@]}") \
            >/dev/null 2>&1 || die "patch $n ($subject): tests of $crate fail"
        log "  $crate: fmt, clippy and tests pass"
    done
done
log "all ${#commits[@]} patches pass on their own"
