#!/usr/bin/env bash
# Live migration of a VM with an emulated Xe VF between two test hosts
# (the project's stand-in for Cloud Hypervisor), driven with curl over
# the hosts' API sockets exactly as ch-remote would:
#   source: --memory + --device emulated=on,...   destination: empty
#   PUT vm.receive-migration on the destination, PUT vm.send-migration on
#   the source; prints downtime and bytes, checks that the destination
#   received exactly the state the source stopped with, cleans up.
#
# Environment: XE_DEMO_MEMORY (default 256M), XE_DEMO_VRAM (256M),
# XE_DEMO_RELEASE=1 to build and run the release binary, XE_DEMO_URL
# (default unix:<tmpdir>/mig.sock; e.g. tcp:127.0.0.1:7700).
set -euo pipefail
cd "$(dirname "$0")/.."

memory=${XE_DEMO_MEMORY:-256M}
vram=${XE_DEMO_VRAM:-256M}
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

# api SOCKET METHOD ENDPOINT [JSON] -> body on stdout; fails on HTTP >= 400
api() {
    local args=(-sS --unix-socket "$1" -X "$2" "http://localhost/api/v1/$3" -w '\n%{http_code}')
    if [ $# -ge 4 ]; then
        args+=(-H 'Content-Type: application/json' -d "$4")
    fi
    local out code
    out=$(curl "${args[@]}")
    code=${out##*$'\n'}
    out=${out%$'\n'*}
    printf '%s\n' "$out"
    [ "$code" -lt 400 ]
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
wait_for 20 "source API" api "$src" GET vmm.ping
wait_for 20 "destination API" api "$dst" GET vmm.ping
api "$src" GET vm.info >/dev/null
sleep 0.5 # let the VF workload and the vCPU dirty some state

echo "== destination: vm.receive-migration $url"
api "$dst" PUT vm.receive-migration "{\"receiver_url\":\"$url\",\"verify\":true}" \
    >"$work/received.json" 2>&1 &
receiver=$!
listening() { api "$dst" GET vm.info | grep -q '"receive: listening"'; }
wait_for 20 "destination listening" listening

echo "== source: vm.send-migration $url"
if ! sent=$(api "$src" PUT vm.send-migration "{\"destination_url\":\"$url\",\"downtime_ms\":300}"); then
    echo "migration failed: $sent" >&2
    wait "$receiver" || true
    cat "$work/received.json" >&2
    exit 1
fi
wait "$receiver" || { echo "receive failed: $(cat "$work/received.json")" >&2; exit 1; }
received=$(cat "$work/received.json")

at_stop=$(sed -n 's/.*"at_stop":\(.*\),"device_bytes".*/\1/p' <<<"$sent")
at_switchover=$(sed -n 's/.*"at_switchover":\(.*\),"device_bytes".*/\1/p' <<<"$received")
verified=false
if [ -n "$at_stop" ] && [ "$at_stop" = "$at_switchover" ]; then
    verified=true
fi

src_state=$(sed -n 's/.*"state":"\([A-Za-z]*\)".*/\1/p' <<<"$(api "$src" GET vm.info)")
dst_state=$(sed -n 's/.*"state":"\([A-Za-z]*\)".*/\1/p' <<<"$(api "$dst" GET vm.info)")

echo
echo "downtime:        $(field "$sent" downtime_ms) ms (pause -> destination's Ok to Complete; includes destination verify)"
echo "total:           $(field "$sent" total_ms) ms"
echo "memory:          $(field "$sent" memory_bytes) bytes in $(field "$sent" memory_passes) passes (final pass $(field "$sent" final_pass_bytes) bytes)"
echo "device state:    $(field "$sent" device_bytes) bytes (streamed DeviceState, not in JSON)"
echo "source VM:       $src_state    destination VM: $dst_state"
echo "verified:        $verified (guest memory CRC and VF digests at the stop == destination before resume)"
printf '{"verified":%s,"downtime_ms":%s,"memory_bytes":%s,"device_bytes":%s}\n' \
    "$verified" "$(field "$sent" downtime_ms)" "$(field "$sent" memory_bytes)" "$(field "$sent" device_bytes)"

api "$src" PUT vmm.shutdown >/dev/null || true
api "$dst" PUT vmm.shutdown >/dev/null || true
[ "$verified" = true ]
