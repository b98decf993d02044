#!/usr/bin/env bash
# Coverage-guided fuzzing of the plugin's parsers (plugin/fuzz, cargo-fuzz
# and libFuzzer) with a fixed time budget per target, for CI and by hand.
#
# Usage: scripts/fuzz.sh [--gen-corpus] [--merge] [TARGET...]
#   TARGET        fuzz only these targets (default: all of `cargo fuzz list`)
#   --gen-corpus  rewrite the seed corpus (plugin/fuzz/corpus) first
#   --merge       afterwards, merge inputs that add coverage from the run's
#                 working corpus into plugin/fuzz/corpus (then commit them)
#
# Environment:
#   FUZZ_SECONDS    run time per target (default 20)
#   FUZZ_MAX_LEN    largest input in bytes (default 65536)
#   FUZZ_SANITIZER  none (default) or address; address needs nightly flags,
#                   which this script unlocks on stable with RUSTC_BOOTSTRAP
#
# Works on stable Rust: cargo-fuzz's coverage instrumentation
# (-Cpasses=sancov-module) needs no nightly feature; only sanitizers do.
# Exits non-zero when any target crashes, panics, times out (-timeout, a
# hang), runs out of memory (-rss_limit_mb, -malloc_limit_mb) or, with
# the address sanitizer, leaks; the reproducer's path is printed. A
# reproducer runs again with:
#   target/fuzz/x86_64-unknown-linux-gnu/release/TARGET ARTIFACT
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-20}
FUZZ_MAX_LEN=${FUZZ_MAX_LEN:-65536}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-none}
CARGO_FUZZ_VERSION=0.13.2

fuzz_dir=plugin/fuzz
tools=target/tools
target_dir=target/fuzz
work=target/fuzz-work
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=$target_dir/$triple/release

gen_corpus=0
merge=0
targets=()
for arg in "$@"; do
    case $arg in
    --gen-corpus) gen_corpus=1 ;;
    --merge) merge=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    -*)
        echo "fuzz.sh: unknown option $arg" >&2
        exit 2
        ;;
    *) targets+=("$arg") ;;
    esac
done

# cargo-fuzz, installed once into target/tools (kept between runs).
if [[ "$("$tools/bin/cargo-fuzz" --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION into $tools"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$tools" --quiet
fi
export PATH="$PWD/$tools/bin:$PATH"
if [[ $FUZZ_SANITIZER != none ]]; then
    # -Zsanitizer on a stable toolchain.
    export RUSTC_BOOTSTRAP=1
fi

if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
fi

if ((gen_corpus)); then
    echo "== generating the seed corpus"
    cargo run --quiet --release --manifest-path "$fuzz_dir/Cargo.toml" \
        --target-dir "$target_dir/gen" --example gen_corpus -- "$fuzz_dir/corpus"
fi

echo "== building ${#targets[@]} fuzz targets (sanitizer $FUZZ_SANITIZER)"
build_start=$SECONDS
for t in "${targets[@]}"; do
    cargo fuzz build --fuzz-dir "$fuzz_dir" --target-dir "$target_dir" \
        --sanitizer "$FUZZ_SANITIZER" "$t"
done
echo "   built in $((SECONDS - build_start)) s"

failed=()
summary=()
for t in "${targets[@]}"; do
    corpus=$fuzz_dir/corpus/$t
    regressions=$fuzz_dir/regressions/$t
    artifacts=$fuzz_dir/artifacts/$t
    scratch=$work/corpus/$t
    log=$work/logs/$t.log
    mkdir -p "$corpus" "$artifacts" "$scratch" "$(dirname "$log")"
    dirs=("$scratch" "$corpus")
    # Known reproducers run first, as part of the starting corpus.
    if [[ -d $regressions ]]; then dirs+=("$regressions"); fi

    echo "== $t: ${FUZZ_SECONDS}s"
    rc=0
    # The outer timeout only catches a libFuzzer that itself stops
    # responding; hangs inside an input are -timeout's job.
    timeout --kill-after=10 $((FUZZ_SECONDS + 120)) \
        "$bin_dir/$t" \
        -max_total_time="$FUZZ_SECONDS" \
        -max_len="$FUZZ_MAX_LEN" \
        -timeout=5 \
        -rss_limit_mb=1024 \
        -print_final_stats=1 \
        -artifact_prefix="$artifacts/" \
        "${dirs[@]}" >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | awk '{s += $1} END {print s + 0}')
    corpus_size=$(sed -n 's/.*corp: \([0-9]*\).*/\1/p' "$log" | tail -n 1)
    if ((rc != 0)); then
        failed+=("$t")
        summary+=("$(printf '%-18s FAILED (exit %d) after %s executions' "$t" "$rc" "$execs")")
        echo "!! $t failed (exit $rc); log: $log"
        grep -E "ERROR: libFuzzer|ERROR: AddressSanitizer|ERROR: LeakSanitizer" "$log" | head -n 3 || true
        grep -m1 -A1 "panicked at" "$log" || true
        grep -o "Test unit written to .*" "$log" | sed 's/^/   /' || true
    else
        summary+=("$(printf '%-18s ok: %12s executions, corpus %s' "$t" "$execs" "${corpus_size:-?}")")
    fi

    if ((merge)) && ((rc == 0)); then
        "$bin_dir/$t" -merge=1 -max_len="$FUZZ_MAX_LEN" -timeout=5 -rss_limit_mb=1024 \
            "$corpus" "$scratch" >>"$log" 2>&1
        echo "   merged into $corpus: $(find "$corpus" -type f | wc -l) files, $(du -sh "$corpus" | cut -f1)"
    fi
done

echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]} > 0)); then
    echo "fuzz: ${#failed[@]} of ${#targets[@]} targets failed: ${failed[*]}"
    exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${FUZZ_SECONDS}s without a failure"
