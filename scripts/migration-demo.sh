#!/usr/bin/env bash
# Live migration of a VM with an emulated Xe VF between two test hosts
# (the project's stand-in for Cloud Hypervisor), driven with the real
# ch-remote exactly as a Cloud Hypervisor user drives CH:
#   source: --memory + --device emulated=on,...   destination: empty
#   ch-remote receive-migration on the destination (returns when done),
#   ch-remote send-migration on the source (returns at once), then
#   ch-remote info on the source until the outcome shows; prints downtime
#   and bytes, checks that the destination received exactly the state the
#   source stopped with, cleans up. curl only arms our `verify` test hook.
#
# Environment: XE_DEMO_MEMORY (default 256M), XE_DEMO_VRAM (256M),
# XE_DEMO_RELEASE=1 to build and run the release binary, XE_DEMO_URL
# (default unix:<tmpdir>/mig.sock; e.g. tcp:127.0.0.1:7700),
# XE_DEMO_CONNECTIONS (memory connections, tcp only; default 1),
# XE_CH_REMOTE (default: the pinned upstream build, made if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

memory=${XE_DEMO_MEMORY:-256M}
vram=${XE_DEMO_VRAM:-256M}
connections=${XE_DEMO_CONNECTIONS:-1}
profile=debug
build_flags=()
if [ "${XE_DEMO_RELEASE:-0}" = 1 ]; then
    profile=release
    build_flags=(--release)
fi

for tool in cargo curl; do
    command -v "$tool" >/dev/null || { echo "migration-demo: needs $tool" >&2; exit 1; }
done

echo "== building xe-vf-testhost ($profile)"
cargo build "${build_flags[@]}" -q -p xe-vf-testhost
bin="target/$profile/xe-vf-testhost"
ch_remote=${XE_CH_REMOTE:-target/cloud-hypervisor/upstream/ch-remote}
if [ ! -x "$ch_remote" ]; then
    echo "== building the real ch-remote (scripts/build-cloud-hypervisor.sh --flavor upstream)"
    scripts/build-cloud-hypervisor.sh --flavor upstream
fi

work=$(mktemp -d -t xe-vf-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

src="$work/src.api"
dst="$work/dst.api"
url=${XE_DEMO_URL:-unix:$work/mig.sock}

ch() { # SOCKET ARGS... -> ch-remote's output; its exit status
    local socket=$1
    shift
    "$ch_remote" --api-socket "$socket" "$@"
}

hook() { # SOCKET METHOD ENDPOINT [JSON]: our test hooks (ch-remote has no verb)
    local args=(-sS -f --unix-socket "$1" -X "$2" "http://localhost/api/v1/$3")
    if [ $# -ge 4 ]; then
        args+=(-H 'Content-Type: application/json' -d "$4")
    fi
    curl "${args[@]}"
}

wait_for() { # SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "migration-demo: timed out waiting for $what" >&2
            exit 1
        fi
        sleep 0.05
    done
}

field() { # JSON KEY -> first numeric value of "KEY"
    sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" <<<"$1" | head -n1
}

echo "== starting source (memory $memory, Xe VF with $vram VRAM, workloads on) and empty destination"
"$bin" --api-socket "$src" --memory "size=$memory" \
    --device "emulated=on,vram=$vram,id=gpu0" --log-file "$work/src.log" &
pids+=($!)
"$bin" --api-socket "$dst" --log-file "$work/dst.log" &
pids+=($!)
wait_for 20 "source API" ch "$src" ping
wait_for 20 "destination API" ch "$dst" ping
ch "$src" info >/dev/null
sleep 0.5 # let the VF workload and the vCPU dirty some state

echo "== destination: ch-remote receive-migration receiver_url=$url"
hook "$dst" PUT vm.arm-migration '{"verify":true}'
ch "$dst" receive-migration "receiver_url=$url" >"$work/received.txt" 2>&1 &
receiver=$!
listening() { hook "$dst" GET vmm.migration | grep -q '"phase":"receive: '; }
wait_for 20 "destination listening" listening

send_config="destination_url=$url,downtime_ms=300"
[ "$connections" != 1 ] && send_config+=",connections=$connections"
echo "== source: ch-remote send-migration $send_config (returns at once)"
ch "$src" send-migration "$send_config"
echo "== source: ch-remote info until the migration's outcome shows"
outcome() { ch "$src" info | grep -q '"attempt":1'; }
wait_for 600 "the migration's outcome" outcome
src_info=$(ch "$src" info)
if ! wait "$receiver"; then
    echo "receive-migration failed: $(cat "$work/received.txt")" >&2
    exit 1
fi
if grep -q '"failed":\|"unknown":' <<<"$src_info"; then
    echo "migration failed or its outcome is unknown: $src_info" >&2
    exit 1
fi
dst_info=$(ch "$dst" info)

at_stop=$(sed -n 's/.*"at_stop":\(.*\),"connections".*/\1/p' <<<"$src_info")
at_switchover=$(sed -n 's/.*"at_switchover":\(.*\),"device_bytes".*/\1/p' <<<"$dst_info")
verified=false
if [ -n "$at_stop" ] && [ "$at_stop" = "$at_switchover" ]; then
    verified=true
fi

src_state=$(sed -n 's/.*"state":"\([A-Za-z]*\)".*/\1/p' <<<"$src_info")
dst_state=$(sed -n 's/.*"state":"\([A-Za-z]*\)".*/\1/p' <<<"$dst_info")

echo
echo "downtime:        $(field "$src_info" downtime_ms) ms (pause -> destination's Ok to Switchover; includes destination verify)"
echo "total:           $(field "$src_info" total_ms) ms"
echo "memory:          $(field "$src_info" memory_bytes) bytes in $(field "$src_info" memory_passes) passes over $connections connection(s) (final pass $(field "$src_info" final_pass_bytes) bytes)"
echo "device state:    $(field "$src_info" device_bytes) bytes (streamed DeviceState, not in JSON)"
echo "source VM:       $src_state    destination VM: $dst_state"
echo "verified:        $verified (guest memory CRC and VF digests at the stop == destination before resume)"
printf '{"verified":%s,"downtime_ms":%s,"memory_bytes":%s,"device_bytes":%s}\n' \
    "$verified" "$(field "$src_info" downtime_ms)" "$(field "$src_info" memory_bytes)" "$(field "$src_info" device_bytes)"

ch "$src" shutdown-vmm || true
ch "$dst" shutdown-vmm || true
[ "$verified" = true ]
