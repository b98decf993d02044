#!/usr/bin/env bash
# The project's test command (README): every unit and integration test,
# including the multi-process migration tests driven by the real
# ch-remote, the real-kernel (qemu + mtty) run and a short fuzzing pass.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
# The real ch-remote and cloud-hypervisor (and CH's OpenAPI file) the
# integration tests talk to, built from the pinned sources, and the patched
# pair, whose vm-migration sources the mirror's drift test compares with
# vmm-glue/vm-migration; cached in ${XE_CACHE_DIR:-~/.cache/xe-vf-migration},
# so a second run costs nothing. --test runs the patched tree's tests: CH's
# own tests of the crates the series touches, the series' tests, and
# xe-vf-glue's tests compiled against CH's real vm-migration crate.
scripts/build-cloud-hypervisor.sh --flavor all --test
cargo nextest run --workspace --no-fail-fast "$@"
if [ -x scripts/fuzz.sh ] && [ "${XE_SKIP_FUZZ:-0}" != 1 ]; then
    scripts/fuzz.sh
fi
