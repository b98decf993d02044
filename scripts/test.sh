#!/usr/bin/env bash
# The project's test command (README): every unit and integration test,
# including the multi-process migration tests, the real-kernel (qemu +
# mtty) run and a short fuzzing pass.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --no-fail-fast "$@"
if [ -x scripts/fuzz.sh ] && [ "${XE_SKIP_FUZZ:-0}" != 1 ]; then
    scripts/fuzz.sh
fi
