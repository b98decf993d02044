#!/bin/busybox sh
# shellcheck shell=dash
# shellcheck disable=SC2317 # predicates run through wait_until/wait_alive look unreachable
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The scenarios of the nested Cloud Hypervisor test, run inside L1 (see
# scripts/nested/run.sh) once per flavour: `scenarios.sh upstream|patched`.
# Everything is driven through the real ch-remote of that flavour; the L2
# guest prints "L2-TICK <n>" about every second, so a guest that kept
# running is one whose count goes on where it stopped.
#
# Output: one line per step, `XE-NESTED: CHECK <flavour>/<scenario>/<step>
# pass|fail <detail>`, and `XE-NESTED: VALUE <flavour>/<name> <value>` for
# figures. A failed step ends its scenario (later steps depend on it) and
# dumps the relevant logs; the next scenario still runs when it can. Every
# wait is bounded. Exit status: number of failed steps (0 = all passed).
#
# The mtty driver (and its mtty_nolog variant) is loaded with dynamic debug
# on, so dmesg records each migration-state arc of each mdev
# ("mtty <uuid>: mtty_step_state: <from> -> <to>", 2 = RUNNING): that is how
# the test sees the device's own state, which no API shows.

FLAVOR=$1
TAG="XE-NESTED:"
BIN=/nested/$FLAVOR
CH=$BIN/cloud-hypervisor
CHR=$BIN/ch-remote
RELAY=/nested/bin/xe-nested-relay
XE_VF_MIG=/nested/bin/xe-vf-mig
RUN=/run/$FLAVOR
FAILS=0
SCEN=setup
# Upper bounds of the waits, in seconds (nested TCG on a loaded host is slow).
BOOT_WAIT=${XE_NESTED_BOOT_WAIT:-240}
MIGRATION_WAIT=${XE_NESTED_MIGRATION_WAIT:-300}
API_WAIT=60
# Devices as this flavour passes them: the patched build routes the VF
# through our engine only when asked.
XE=""
[ "$FLAVOR" = patched ] && XE=",xe_migration=on"

case "$FLAVOR" in
upstream) P=01 ;;
patched) P=02 ;;
*)
    echo "$TAG CHECK $FLAVOR/setup/flavour fail unknown flavour '$FLAVOR'"
    exit 1
    ;;
esac
# mdevs: A and B (mtty-2) carry the VM; C is an mtty-1, N1 and N2 are the
# no-DMA-logging variant. UUIDs differ per flavour so dmesg lines and
# sysfs entries never mix.
UA=0b7a6f1e-3c52-4f0e-9a11-5e1d0000${P}0a
UB=0b7a6f1e-3c52-4f0e-9a11-5e1d0000${P}0b
UC=0b7a6f1e-3c52-4f0e-9a11-5e1d0000${P}0c
UN1=0b7a6f1e-3c52-4f0e-9a11-5e1d0000${P}1a
UN2=0b7a6f1e-3c52-4f0e-9a11-5e1d0000${P}1b
UN3=0b7a6f1e-3c52-4f0e-9a11-5e1d0000${P}1c
UN4=0b7a6f1e-3c52-4f0e-9a11-5e1d0000${P}1d
UN5=0b7a6f1e-3c52-4f0e-9a11-5e1d0000${P}1e
UN6=0b7a6f1e-3c52-4f0e-9a11-5e1d0000${P}1f
# TLS certificates the host made for this run (run.sh): the sender's and
# the receiver's, from one CA, the receiver's for 127.0.0.1.
TLS_CLIENT=/nested/tls/client
TLS_SERVER=/nested/tls/server
MTTY_PCI_ID="0x4348:0x3253"
RUNNING_STATE=2 # VFIO_DEVICE_STATE_RUNNING

# ------------------------------------------------------------------ output

pass() { echo "$TAG CHECK $FLAVOR/$SCEN/$1 pass ${2:-}"; }
fail() {
    echo "$TAG CHECK $FLAVOR/$SCEN/$1 fail ${2:-}"
    FAILS=$((FAILS + 1))
}
value() { echo "$TAG VALUE $FLAVOR/$1 $2"; }
note() { echo "$TAG NOTE $FLAVOR/$SCEN $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
# Seconds since $1 (an uptime), one decimal.
since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }'; }

# The tail of an instance's logs, for a failed step.
diag() {
    for name in "$@"; do
        d=$RUN/$name
        [ -d "$d" ] || continue
        for f in ch.log receive.log receive.rc relay.log serial.log; do
            [ -s "$d/$f" ] || continue
            echo "----- $FLAVOR/$name/$f (last 25 lines)"
            tail -n 25 "$d/$f" | tr -d '\r' | cut -c1-300
        done
    done
    echo "----- dmesg (mtty, vfio, kvm; last 15)"
    dmesg | grep -a -i -E 'mtty|vfio|kvm|iommu' | tail -n 15
}

# ------------------------------------------------------------------- waits

# wait_until SECONDS COMMAND...: polls every 0.5 s.
wait_until() {
    limit=$(($1 * 2))
    shift
    n=0
    until "$@"; do
        n=$((n + 1))
        [ "$n" -ge "$limit" ] && return 1
        sleep 0.5
    done
    return 0
}

# wait_alive NAME SECONDS COMMAND...: wait_until, but gives up at once
# (status 2) when NAME's VMM exits first, so a VMM that died is reported
# as such instead of after the whole wait.
wait_alive() {
    w_name=$1
    w_limit=$(($2 * 2))
    shift 2
    w_n=0
    until "$@"; do
        if ! alive "$w_name"; then
            "$@" && return 0 # it may have finished just before exiting
            return 2
        fi
        w_n=$((w_n + 1))
        [ "$w_n" -ge "$w_limit" ] && return 1
        sleep 0.5
    done
    return 0
}

# Why a VMM is gone: its last error line.
exit_reason() {
    if alive "$1"; then
        echo "still running"
    else
        r=$(grep -a ' ERROR:' "$RUN/$1/ch.log" 2>/dev/null | tail -n 1 | sed 's/.* ERROR:[^ ]* -- //' | tr -d '\r' | cut -c1-250)
        [ -n "$r" ] || r=$(tail -n 1 "$RUN/$1/ch.log" 2>/dev/null | tr -d '\r' | cut -c1-250)
        echo "cloud-hypervisor exited: ${r:-no error logged}"
    fi
}

# ------------------------------------------------------------------- mdevs

mdev_path() { echo "/sys/bus/mdev/devices/$1"; }

# create_mdev PARENT TYPE UUID
create_mdev() {
    [ -e "$(mdev_path "$3")" ] && return 0
    echo "$3" >"/sys/class/mdev_bus/$1/mdev_supported_types/$2/create" || return 1
    wait_until 10 test -d "$(mdev_path "$3")/vfio-dev"
}

# The VFIO cdev of an mdev, e.g. /dev/vfio/devices/vfio3.
cdev_of() {
    for v in "$(mdev_path "$1")"/vfio-dev/vfio*; do
        [ -e "$v" ] && echo "/dev/vfio/devices/$(basename "$v")" && return 0
    done
    return 1
}

# Last migration-state arc mtty logged for an mdev: "<from> -> <to>".
last_arc() {
    dmesg | grep -a "mtty[_a-z]* $1: mtty_step_state:" | tail -n 1 | sed 's/.*mtty_step_state: //' | tr -d '\r'
}

device_running() {
    arc=$(last_arc "$1")
    # An mdev no migration ever touched is RUNNING from creation.
    [ -z "$arc" ] || [ "${arc##*-> }" = "$RUNNING_STATE" ]
}

# --------------------------------------------------------------- instances

pid_of() { cat "$RUN/$1/pid" 2>/dev/null; }
alive() { p=$(pid_of "$1") && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
api() {
    name=$1
    shift
    timeout "$API_WAIT" "$CHR" --api-socket "$RUN/$name/api.sock" "$@"
}
vm_state() { api "$1" info 2>/dev/null | grep -o '"state": *"[A-Za-z]*"' | head -n 1 | sed 's/.*"\([A-Za-z]*\)"$/\1/'; }
state_is() { [ "$(vm_state "$1")" = "$2" ]; }

# start_vmm NAME [cloud-hypervisor arguments...]: each VMM runs in its own
# directory, so a relative serial path in a migrated config stays its own.
start_vmm() {
    name=$1
    shift
    d=$RUN/$name
    rm -rf "$d"
    mkdir -p "$d"
    # MIGRATION_MEMORY_CHECKSUM=1 (set by a scenario) makes both sides of
    # a migration log a checksum of guest memory (migration-ext).
    (cd "$d" && MIGRATION_MEMORY_CHECKSUM=${CHECKSUM:-0} exec "$CH" -vv --api-socket "$d/api.sock" \
        --event-monitor "path=$d/events.json" "$@" >"$d/ch.log" 2>&1) &
    echo $! >"$d/pid"
    wait_alive "$name" "$API_WAIT" test -S "$d/api.sock"
}

# stop_vmm NAME...: asks, then kills.
stop_vmm() {
    for name in "$@"; do
        alive "$name" || continue
        api "$name" shutdown-vmm >/dev/null 2>&1
        wait_until 20 eval "! alive $name" || kill -9 "$(pid_of "$name")" 2>/dev/null
    done
}

# The L2 guest of this test, with one mtty device: boot_vmm NAME UUID [OPTS]
# noxsave: under KVM in qemu's TCG, CPUID leaf 0xd does not follow XCR0
# (the size for the enabled features stays 576 bytes); the 7.x kernel
# warns "XSAVE consistency problem", falls back without XSAVE, and then
# crashes early in copy_creds. Without XSAVE from the start it boots.
L2_CMDLINE="console=ttyS0 panic=-1 quiet noxsave"
boot_vmm() {
    start_vmm "$1" --kernel /nested/l2/vmlinux --initramfs /nested/l2/initrd.cpio.gz \
        --cmdline "$L2_CMDLINE" --serial file=serial.log --console off \
        --cpus boot=1 --memory size=128M --platform iommufd=on \
        --device "path=$(mdev_path "$2"),id=vfio0$XE${3:-}"
}

# The same guest with two devices: boot_vmm2 NAME UUID0 UUID1 [OPTS]
boot_vmm2() {
    start_vmm "$1" --kernel /nested/l2/vmlinux --initramfs /nested/l2/initrd.cpio.gz \
        --cmdline "$L2_CMDLINE" --serial file=serial.log --console off \
        --cpus boot=1 --memory size=128M --platform iommufd=on \
        --device "path=$(mdev_path "$2"),id=vfio0$XE${4:-}" \
        --device "path=$(mdev_path "$3"),id=vfio1$XE${4:-}"
}

# ------------------------------------------------------------------- ticks

CR=$(printf '\r')
# Complete tick lines only (the guest's tty ends each with CR LF; a line
# cut by a pause or still being written has no CR yet).
tick_lines() { grep -a -E "^L2-TICK [0-9]+ up=[0-9.]+ scr=[0-9a-z]+$CR\$" "$RUN/$1/serial.log" 2>/dev/null | tr -d '\r'; }
ticks() { tick_lines "$1" | cut -d' ' -f2; }
last_tick() { ticks "$1" | tail -n 1; }
first_tick() { ticks "$1" | head -n 1; }
tick_count() { ticks "$1" | wc -l; }
has_ticks() { [ "$(tick_count "$1")" -ge "$2" ]; }
tick_above() {
    t=$(last_tick "$1")
    [ -n "$t" ] && [ "$t" -gt "$2" ]
}

# The first tick line whose scr= is not the previous tick's number, i.e.
# where the guest found its device in a state it did not leave it in
# (see l2-init.sh); empty if there is none.
device_mismatch() {
    tick_lines "$1" | awk '{ split($4, s, "="); if (s[2] != ($2 - 1) % 256) { print; exit } }'
}

# continues NAME PREVIOUS_LAST: the guest in NAME went on counting right
# after PREVIOUS_LAST (a line cut by the pause may hide one tick), has
# ticked at least 3 times since, and found its device as it left it.
continues() {
    wait_alive "$1" 120 has_ticks "$1" 3 || return 1
    first=$(first_tick "$1")
    [ "$first" -gt "$2" ] && [ "$first" -le $(($2 + 2)) ] && [ -z "$(device_mismatch "$1")" ]
}

# What `continues` saw, for its check's detail.
continuity() {
    echo "previous last tick $2, then: $(tick_lines "$1" | head -n 3 | cut -d' ' -f2,4 | tr '\n' ' ')$(
        m=$(device_mismatch "$1")
        [ -n "$m" ] && echo "DEVICE STATE LOST at: $m"
    )"
}

# ---------------------------------------------------------------- migration

# start_receiver NAME UUID SOCKET: an empty VMM waiting for a migration,
# handed the mdev's cdev and an iommufd as CH requires for a VFIO device.
start_receiver() {
    receive_at "$1" "unix:$3" "" "$2"
}

# Whether something listens on TCP port $1 (busybox has no ss).
tcp_listening() { grep -q -i ":$(printf '%04X' "$1") 00000000:0000 0A" /proc/net/tcp; }

# receive_at NAME URL EXTRA UUID [UUID1]: start_receiver with any URL
# (unix:PATH or tcp:HOST:PORT), EXTRA receive options (",tls_dir=..."),
# and one or two devices (vfio0, vfio1).
receive_at() {
    start_vmm "$1" || return 1
    d=$RUN/$1
    cdev0=$(cdev_of "$4") || return 1
    cdev1=/dev/null
    fds="vfio0@3"
    if [ -n "${5:-}" ]; then
        cdev1=$(cdev_of "$5") || return 1
        fds="vfio0@3,vfio1@5"
    fi
    case "$2" in unix:*) rm -f "${2#unix:}" ;; esac
    # The fds open first, so that a device still held elsewhere says so in
    # receive.log too.
    (
        exec 3<>"$cdev0" 4<>/dev/iommu 5<>"$cdev1" || {
            echo "opening $cdev0, /dev/iommu, $cdev1 failed" >>"$d/receive.log"
            echo 1 >"$d/receive.rc"
            exit 1
        }
        timeout "$MIGRATION_WAIT" "$CHR" --api-socket "$d/api.sock" receive-migration \
            "receiver_url=$2$3,vfio_fds=[$fds],iommufd_fd=4" >>"$d/receive.log" 2>&1
        echo $? >"$d/receive.rc"
    ) 2>>"$d/receive.log" &
    case "$2" in
    unix:*) wait_until "$API_WAIT" test -S "${2#unix:}" ;;
    tcp:*) wait_until "$API_WAIT" tcp_listening "${2##*:}" ;;
    esac
}

# The source's log since its latest send-migration (see `send`).
since_send() { tail -n +"$(($(cat "$RUN/$1/mark" 2>/dev/null || echo 0) + 1))" "$RUN/$1/ch.log" | tr -d '\r'; }

# The source's verdict on its latest migration: completed, failed or "".
outcome() {
    log=$(since_send "$1")
    case "$log" in
    *"Migration completed"*) echo completed ;;
    *"Migration failed"*) echo failed ;;
    # The patched source after a Switchover that was not confirmed.
    *"Migration outcome unknown"*) echo unknown ;;
    esac
}
has_outcome() { [ -n "$(outcome "$1")" ]; }
failure_message() { since_send "$1" | grep -a -E 'Migration (failed|outcome unknown)' | tail -n 1 | sed -E 's/.*Migration (failed|outcome unknown): //' | cut -c1-300; }
completion_line() { since_send "$1" | grep -a 'Migration completed' | tail -n 1 | sed 's/.*Migration completed/Migration completed/'; }
downtime_ms() { completion_line "$1" | sed -n 's/.* with a downtime of \([0-9]*\)ms.*/\1/p'; }

# send SOURCE URL [EXTRA]: ch-remote returns at once; wait for the source's
# verdict in the lines its VMM logs from now on. EXTRA: more send options
# (",final_pass=verify").
send() {
    wc -l <"$RUN/$1/ch.log" >"$RUN/$1/mark"
    api "$1" send-migration "destination_url=$2${3:-}" >"$RUN/$1/send.log" 2>&1 || return 1
    wait_alive "$1" "$MIGRATION_WAIT" has_outcome "$1"
}

# What the source's final memory pass sent (the patched source logs it):
# bytes dirtied by vCPUs plus bytes only devices reported.
final_pass_bytes() {
    since_send "$1" | grep -a 'Final memory pass:' | tail -n 1 |
        sed -n 's/.*Final memory pass: \([0-9]*\) bytes dirty by vCPUs, \([0-9]*\) bytes reported.*/\1 \2/p' |
        awk '{ print $1 + $2 }'
}

# The verify pass as the source logged it: "N pages hashed ... M pages differ".
verify_line() {
    since_send "$1" | grep -a 'verify pass: [0-9]* pages hashed' | tail -n 1 | sed 's/.*verify pass: //'
}

# Guest memory checksums both VMMs logged (CHECKSUM=1 or blocks): the source's at
# its stop, the destination's before it restores the VM (all memory in);
# and their time in ms.
checksum_at_stop() { since_send "$1" | grep -a 'guest memory checksum at the stop:' | tail -n 1 | sed 's/.*at the stop: \([0-9a-f]*\).*/\1/'; }
checksum_before_restore() { tr -d '\r' <"$RUN/$1/ch.log" | grep -a 'guest memory checksum before restoring the VM:' | tail -n 1 | sed 's/.*before restoring the VM: \([0-9a-f]*\).*/\1/'; }
checksum_ms() { grep -a "guest memory checksum $2" "$3" | tail -n 1 | sed -n 's/.*bytes, \([0-9]*\) ms).*/\1/p'; }

# The guest addresses of the MiB blocks whose fingerprints differ
# (CHECKSUM=blocks), the first 16 of them, and how many.
differing_blocks() {
    since_send "$1" | grep -a 'guest memory blocks at the stop:' | tail -n 1 |
        sed 's/.*at the stop: //' | tr ' ' '\n' >"$RUN/$1/blocks.txt"
    tr -d '\r' <"$RUN/$2/ch.log" | grep -a 'guest memory blocks before restoring the VM:' | tail -n 1 |
        sed 's/.*before restoring the VM: //' | tr ' ' '\n' >"$RUN/$2/blocks.txt"
    local differ
    differ=$(awk -F: 'NR == FNR { fp[$1] = $2; next } fp[$1] != $2 { print $1 }' \
        "$RUN/$1/blocks.txt" "$RUN/$2/blocks.txt")
    echo "$(echo "$differ" | grep -c .) of $(grep -c . "$RUN/$2/blocks.txt"):" $(echo "$differ" | head -n 16)
}

# same_memory SOURCE DEST: the destination holds the source's guest memory
# as it stopped; records the downtime without the two checksums' time.
same_memory() {
    a=$(checksum_at_stop "$1")
    b=$(checksum_before_restore "$2")
    if [ -n "$a" ] && [ "$a" = "$b" ]; then
        pass same-memory "checksum $a on both"
    else
        fail same-memory "source '$a', destination '$b'; MiB blocks that differ: $(differing_blocks "$1" "$2")"
        return 1
    fi
    since_send "$1" >"$RUN/$1/since.log"
    t1=$(checksum_ms "$1" "at the stop" "$RUN/$1/since.log")
    t2=$(tr -d '\r' <"$RUN/$2/ch.log" >"$RUN/$2/ch.clean.log" && checksum_ms "$2" "before restoring the VM" "$RUN/$2/ch.clean.log")
    dt=$(downtime_ms "$1")
    value "$SCEN/downtime_without_checksums_ms" "$((dt - ${t1:-0} - ${t2:-0}))"
}

# Checks of a migration that must succeed: migrated SOURCE DEST LAST_TICK
migrated() {
    if [ "$(outcome "$1")" = completed ]; then
        pass completed "$(completion_line "$1")"
    else
        fail completed "source says: $(failure_message "$1")"
        diag "$1" "$2"
        return 1
    fi
    value "$SCEN/downtime_ms" "$(downtime_ms "$1")"
    # How the time went, as the source logged it (memory passes, devices).
    note "source log: $(since_send "$1" | grep -a -E 'Precopy complete|streamed state' |
        sed 's/.* -- //' | tr '\n' ';' | cut -c1-500)"
    if wait_until "$API_WAIT" test -f "$RUN/$2/receive.rc" && [ "$(cat "$RUN/$2/receive.rc")" = 0 ]; then
        pass receive-returned "receive-migration returned 0"
    else
        fail receive-returned "receive-migration: rc $(cat "$RUN/$2/receive.rc" 2>/dev/null) $(tr -d '\r' <"$RUN/$2/receive.log" | tail -n 2)"
        diag "$2"
        return 1
    fi
    if wait_alive "$2" 30 state_is "$2" Running; then pass destination-running; else
        fail destination-running "destination state '$(vm_state "$2")'; $(exit_reason "$2")"
        diag "$2"
        return 1
    fi
    if continues "$2" "$3"; then
        pass ticks-continue "$(continuity "$2" "$3")"
    else
        fail ticks-continue "$(continuity "$2" "$3")"
        diag "$2"
        return 1
    fi
    if wait_until 30 eval "! alive $1"; then pass source-ended; else
        fail source-ended "the source VMM still runs after a completed migration"
        return 1
    fi
}

# Checks of a migration that must fail with the source intact:
# survived SOURCE UUID
survived() {
    if wait_alive "$1" 30 state_is "$1" Running; then pass source-running; else
        fail source-running "source state '$(vm_state "$1")' after the failed migration; $(exit_reason "$1")"
        diag "$1"
        return 1
    fi
    now=$(last_tick "$1")
    if wait_alive "$1" 60 tick_above "$1" $((now + 1)) && [ -z "$(device_mismatch "$1")" ]; then
        pass source-ticks-on "tick $now -> $(last_tick "$1"), device state as the guest left it"
    else
        fail source-ticks-on "after tick $now: $(tick_lines "$1" | tail -n 2 | tr '\n' ' ') $(device_mismatch "$1")"
        diag "$1"
        return 1
    fi
    if device_running "$2"; then
        arc=$(last_arc "$2")
        if [ -n "$arc" ]; then
            pass device-running "mtty $2 last arc $arc"
        else
            pass device-running "mtty $2 never left RUNNING"
        fi
    else
        fail device-running "mtty $2 last arc: $(last_arc "$2") (want -> $RUNNING_STATE)"
        return 1
    fi
}

# The device state as the snapshot holds it, for comparing two snapshots:
# upstream keeps it base64 in state.json, the patched build in a file.
device_state_digest() {
    if [ "$FLAVOR" = patched ]; then
        "$XE_VF_MIG" inspect --json "$1/xe-vf-vfio0.bin" 2>&1 | grep -E '"(crc|decoded_bytes)"' | tr -d ' \n'
    else
        # {"vfio_migration": ... "state": "{\"blob\":\"<base64>\"}"}
        blob=$(grep -o '\\"blob\\":\\"[A-Za-z0-9+/=]*' "$1/state.json" | sed 's/.*"//')
        [ -n "$blob" ] && echo "blob $(echo "$blob" | md5sum | cut -d' ' -f1) (${#blob} base64 chars)"
    fi
}

# ---------------------------------------------------------------- scenarios

# 1. snapshot, restore into a new VMM, ticks go on, device state re-saves equal.
scenario_snapshot_restore() {
    SCEN=snapshot-restore
    create_mdev mtty mtty-2 "$UA" || {
        fail mdev "cannot create mtty-2 mdev $UA"
        return 1
    }
    started=$(uptime_s)
    boot_vmm src1 "$UA" || {
        fail vmm-start "no API socket; $(exit_reason src1)"
        diag src1
        return 1
    }
    if wait_alive src1 "$BOOT_WAIT" has_ticks src1 2; then
        pass boot "L2 ticking $(since "$started") s after start"
    else
        fail boot "no L2 tick after $(since "$started") s; $(exit_reason src1)"
        diag src1
        return 1
    fi
    # The guest sees the device and drives it: its scratch register
    # follows the ticks (l2-init.sh).
    if grep -a -q "^L2-PCI .* $MTTY_PCI_ID" "$RUN/src1/serial.log" && [ -z "$(device_mismatch src1)" ]; then
        pass device-in-guest "$(grep -a "^L2-PCI .* $MTTY_PCI_ID" "$RUN/src1/serial.log" | tr -d '\r'); $(tick_lines src1 | tail -n 1)"
    else
        fail device-in-guest "$(grep -a -E '^L2-(PCI|MTTY)' "$RUN/src1/serial.log" | tr -d '\r' | tr '\n' ' ') $(device_mismatch src1)"
        diag src1
        return 1
    fi
    if api src1 pause && state_is src1 Paused; then pass pause; else
        fail pause "state '$(vm_state src1)'"
        diag src1
        return 1
    fi
    last=$(last_tick src1)
    snap=$RUN/snap1
    rm -rf "$snap" && mkdir -p "$snap"
    started=$(uptime_s)
    if api src1 snapshot "file://$snap" && [ -s "$snap/state.json" ]; then
        pass snapshot "$(since "$started") s; $(cd "$snap" && echo *)"
    else
        fail snapshot "no state.json in $snap"
        diag src1
        return 1
    fi
    value "$SCEN/state_json_bytes" "$(wc -c <"$snap/state.json")"
    if [ "$FLAVOR" = patched ]; then
        if grep -q '"vfio_migration"' "$snap/state.json"; then
            fail state-json-without-device-data "state.json still holds a vfio_migration blob"
            return 1
        fi
        pass state-json-without-device-data "$(wc -c <"$snap/state.json") bytes"
        if [ -s "$snap/xe-vf-vfio0.bin" ]; then
            pass device-state-file "xe-vf-vfio0.bin $(wc -c <"$snap/xe-vf-vfio0.bin") bytes"
        else
            fail device-state-file "no xe-vf-vfio0.bin beside state.json"
            return 1
        fi
        if out=$("$XE_VF_MIG" inspect "$snap/xe-vf-vfio0.bin" 2>&1); then
            pass inspect "$(echo "$out" | head -n 2 | tr '\n' ' ')"
        else
            fail inspect "$out"
            return 1
        fi
    else
        if grep -q '"vfio_migration"' "$snap/state.json"; then
            pass device-data-in-state-json "upstream keeps the device blob base64 in state.json"
        else
            fail device-data-in-state-json "no vfio_migration section in state.json"
            return 1
        fi
    fi
    stop_vmm src1
    started=$(uptime_s)
    start_vmm rst1 --restore "source_url=file://$snap" || {
        fail restore "the restoring VMM did not start"
        diag rst1
        return 1
    }
    if wait_alive rst1 "$API_WAIT" state_is rst1 Paused; then
        pass restore "restored in $(since "$started") s, state Paused"
    else
        fail restore "state '$(vm_state rst1)'; $(exit_reason rst1)"
        diag rst1
        return 1
    fi
    # The restored device must hold what was saved: save it again before
    # the guest runs (it changes the device every tick), compare.
    resnap=$RUN/snap1-again
    rm -rf "$resnap" && mkdir -p "$resnap"
    if api rst1 snapshot "file://$resnap"; then
        saved=$(device_state_digest "$snap")
        again=$(device_state_digest "$resnap")
        if [ -n "$saved" ] && [ "$saved" = "$again" ]; then
            pass resaved-device-state-equal "$saved"
        else
            fail resaved-device-state-equal "saved '$saved', re-saved '$again'"
            return 1
        fi
    else
        fail resaved-device-state-equal "snapshot of the restored, still paused VM failed"
        diag rst1
        return 1
    fi
    if api rst1 resume && continues rst1 "$last"; then
        pass ticks-continue "$(continuity rst1 "$last")"
    else
        fail ticks-continue "$(continuity rst1 "$last")"
        diag rst1
        return 1
    fi
    rm -rf "$snap" "$resnap"
    SOURCE=rst1
    SOURCE_MDEV=$UA
}

# 2. live migration to a second VMM on a second mdev.
scenario_live_migration() {
    SCEN=live-migration
    create_mdev mtty mtty-2 "$UB" || {
        fail mdev "cannot create mtty-2 mdev $UB"
        return 1
    }
    start_receiver dst2 "$UB" "$RUN/mig2.sock" || {
        fail receiver "destination not listening"
        diag dst2
        return 1
    }
    send "$SOURCE" "unix:$RUN/mig2.sock" || {
        fail completed "no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" dst2
        return 1
    }
    last=$(last_tick "$SOURCE")
    migrated "$SOURCE" dst2 "$last" || return 1
    SOURCE=dst2
    SOURCE_MDEV=$UB
}

# 4. the destination dies in the middle of the migration; then a clean one.
scenario_destination_killed() {
    SCEN=destination-killed
    free=$UA
    [ "$SOURCE_MDEV" = "$UA" ] && free=$UB
    start_receiver dst4 "$free" "$RUN/mig4.sock" || {
        fail receiver "destination not listening"
        diag dst4
        return 1
    }
    # Upstream: after State's header (the source is paused and has read the
    # device). Patched: inside the device's state, on its own connection.
    cut=state
    [ "$FLAVOR" = patched ] && cut=device-state
    mkdir -p "$RUN/relay4"
    "$RELAY" --listen "$RUN/relay4.sock" --to "$RUN/mig4.sock" --cut-at "$cut" \
        --kill-pid "$(pid_of dst4)" --report "$RUN/relay4/report.json" \
        --timeout-s "$MIGRATION_WAIT" >"$RUN/relay4/relay.log" 2>&1 &
    wait_until 30 test -S "$RUN/relay4.sock" || {
        fail relay "relay not listening"
        return 1
    }
    send "$SOURCE" "unix:$RUN/relay4.sock" || {
        fail source-reports-failure "no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" dst4
        return 1
    }
    if [ "$(outcome "$SOURCE")" = failed ]; then
        pass source-reports-failure "$(failure_message "$SOURCE")"
    else
        fail source-reports-failure "the migration completed although its destination was killed"
        return 1
    fi
    wait_until 10 test -s "$RUN/relay4/report.json"
    if grep -q "\"command\": \"$(echo "$cut" | sed 's/device-state/DeviceState/;s/state/State/')\"" "$RUN/relay4/report.json" &&
        grep -q '"killed_pid": [0-9]' "$RUN/relay4/report.json"; then
        pass cut "destination killed inside $cut"
    else
        fail cut "the relay did not reach $cut: $(tr -d '\n ' <"$RUN/relay4/report.json" | cut -c1-300)"
        return 1
    fi
    if wait_until 10 eval "! alive dst4"; then pass destination-dead; else
        fail destination-dead "destination VMM still alive"
        return 1
    fi
    survived "$SOURCE" "$SOURCE_MDEV" || return 1

    # A second migration from the same source, through the relay without a
    # cut, so the report shows how the device state travelled.
    start_receiver dst4b "$free" "$RUN/mig4b.sock" || {
        fail receiver "second destination not listening"
        diag dst4b
        return 1
    }
    "$RELAY" --listen "$RUN/relay4b.sock" --to "$RUN/mig4b.sock" \
        --report "$RUN/relay4/report-b.json" --timeout-s "$MIGRATION_WAIT" \
        >"$RUN/relay4/relay-b.log" 2>&1 &
    wait_until 30 test -S "$RUN/relay4b.sock" || {
        fail relay "second relay not listening"
        return 1
    }
    send "$SOURCE" "unix:$RUN/relay4b.sock" || {
        fail completed "second migration: no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" dst4b
        return 1
    }
    last=$(last_tick "$SOURCE")
    migrated "$SOURCE" dst4b "$last" || return 1
    wait_until 10 test -s "$RUN/relay4/report-b.json"
    phases=$(sed -n 's/.*"main_commands": "\([A-Za-z0-9 ]*\)".*/\1/p' "$RUN/relay4/report-b.json")
    value "$SCEN/wire_phases" "$phases"
    if [ "$FLAVOR" = patched ]; then
        # Each device's state on a connection of its own, not on the main one.
        lanes=$(grep -c '"role": "DeviceState"' "$RUN/relay4/report-b.json")
        case "$phases" in
        *DeviceState*)
            fail device-state-connection "DeviceState on the main connection: $phases"
            return 1
            ;;
        esac
        if [ "$lanes" -ge 1 ] && grep -q '"command": "DeviceState"' "$RUN/relay4/report-b.json"; then
            pass device-state-connection "$lanes device-state connection(s); main: $phases"
        else
            fail device-state-connection "no device-state connection: $(tr -d '\n ' <"$RUN/relay4/report-b.json" | cut -c1-300)"
            return 1
        fi
    else
        case "$phases" in
        *DeviceState*)
            fail device-data-in-state "upstream sent a DeviceState phase: $phases"
            return 1
            ;;
        *State*) pass device-data-in-state "$phases" ;;
        esac
    fi
    SOURCE=dst4b
    SOURCE_MDEV=$free
}

# 5. a destination whose device cannot take this state (mtty-1 vs mtty-2).
scenario_incompatible_destination() {
    SCEN=incompatible-destination
    create_mdev mtty mtty-1 "$UC" || {
        fail mdev "cannot create mtty-1 mdev $UC"
        return 1
    }
    start_receiver dst5 "$UC" "$RUN/mig5.sock" || {
        fail receiver "destination not listening"
        diag dst5
        return 1
    }
    events_before=$(grep -c '"event": "pausing"' "$RUN/$SOURCE/events.json")
    send "$SOURCE" "unix:$RUN/mig5.sock" || {
        fail refused "no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" dst5
        return 1
    }
    paused=$(($(grep -c '"event": "pausing"' "$RUN/$SOURCE/events.json") - events_before))
    value "$SCEN/source_paused_before_refusal" "$paused"
    if [ "$(outcome "$SOURCE")" = failed ]; then
        pass refused "$(failure_message "$SOURCE")"
    else
        fail refused "migration to an mtty-1 destination completed"
        diag "$SOURCE" dst5
        return 1
    fi
    if [ "$FLAVOR" = patched ]; then
        if [ "$paused" = 0 ]; then pass refused-before-pause; else
            fail refused-before-pause "the source paused $paused time(s) before the refusal"
            return 1
        fi
    else
        note "upstream paused the source $paused time(s) before the destination refused"
    fi
    survived "$SOURCE" "$SOURCE_MDEV" || return 1
    stop_vmm dst5
}

# 3. a device that cannot log its DMA (mtty_nolog, standing in for Xe).
scenario_no_dma_logging() {
    SCEN=no-dma-logging
    if ! create_mdev mtty_nolog mtty_nolog-2 "$UN1" || ! create_mdev mtty_nolog mtty_nolog-2 "$UN2"; then
        fail mdev "cannot create mtty_nolog-2 mdevs"
        return 1
    fi
    opts=""
    [ "$FLAVOR" = patched ] && opts=",dirty_tracking=all"
    # Patched: every migration of this VM logs guest memory checksums.
    [ "$FLAVOR" = patched ] && CHECKSUM=blocks
    started=$(uptime_s)
    boot_vmm src3 "$UN1" "$opts" || {
        fail vmm-start "no API socket; $(exit_reason src3)"
        diag src3
        return 1
    }
    if wait_alive src3 "$BOOT_WAIT" has_ticks src3 2; then
        pass boot "L2 ticking $(since "$started") s after start"
    else
        fail boot "no L2 tick after $(since "$started") s; $(exit_reason src3)"
        diag src3
        return 1
    fi
    start_receiver dst3 "$UN2" "$RUN/mig3.sock" || {
        fail receiver "destination not listening"
        diag dst3
        return 1
    }
    # Patched: QEMU's way first (every page the device may have written
    # sent again); the verify pass follows in scenario_verify_pass.
    resend=""
    [ "$FLAVOR" = patched ] && resend=",final_pass=resend"
    send src3 "unix:$RUN/mig3.sock" "$resend" || {
        fail outcome "no verdict from the source; $(exit_reason src3)"
        diag src3 dst3
        return 1
    }
    if [ "$FLAVOR" = patched ]; then
        last=$(last_tick src3)
        migrated src3 dst3 "$last" || return 1
        same_memory src3 dst3 || return 1
        value "$SCEN/final_pass_bytes" "$(final_pass_bytes src3)"
        SOURCE=dst3
        SOURCE_MDEV=$UN2
    else
        msg=$(failure_message src3)
        if [ "$(outcome src3)" = failed ] && echo "$msg" | grep -q 'start_dma_logging'; then
            pass refused-without-dma-logging "$msg"
        else
            fail refused-without-dma-logging "outcome '$(outcome src3)': $msg"
            diag src3
            return 1
        fi
        survived src3 "$UN1" || return 1
        stop_vmm src3 dst3
    fi
}

# one verified hop: hop NAME_DEST UUID URL SEND_EXTRA RECEIVE_EXTRA
hop() {
    receive_at "$1" "$3" "$5" "$2" || {
        fail receiver "$1 not listening at $3"
        diag "$1"
        return 1
    }
    send "$SOURCE" "$3" "$4" || {
        fail completed "no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" "$1"
        return 1
    }
    last=$(last_tick "$SOURCE")
    migrated "$SOURCE" "$1" "$last" || return 1
    v=$(verify_line "$SOURCE")
    if [ -n "$v" ]; then pass verified "$v"; else
        fail verified "the source logged no verify pass"
        return 1
    fi
    value "$SCEN/verify" "$v"
    same_memory "$SOURCE" "$1" || return 1
    SOURCE=$1
    SOURCE_MDEV=$2
}

# 6. (patched) the verify pass for the device without DMA logging, over a
# unix socket, TCP and TLS (every connection TLS, a plain one refused).
scenario_verify_pass() {
    SCEN=verify-pass
    other() { if [ "$SOURCE_MDEV" = "$UN1" ]; then echo "$UN2"; else echo "$UN1"; fi; }
    hop dst6u "$(other)" "unix:$RUN/mig6.sock" ",final_pass=verify" "" || return 1
    SCEN=verify-pass-tcp
    hop dst6t "$(other)" "tcp:127.0.0.1:7016" ",final_pass=verify" "" || return 1
    SCEN=verify-pass-tls
    # Through a relay that records the first bytes of every connection.
    mkdir -p "$RUN/relay6"
    next=$(other)
    receive_at dst6s "tcp:127.0.0.1:7018" ",tls_dir=$TLS_SERVER" "$next" || {
        fail receiver "TLS destination not listening"
        diag dst6s
        return 1
    }
    "$RELAY" --listen tcp:127.0.0.1:7017 --to tcp:127.0.0.1:7018 --opaque \
        --report "$RUN/relay6/report.json" --timeout-s "$MIGRATION_WAIT" >"$RUN/relay6/relay.log" 2>&1 &
    wait_until 30 tcp_listening 7017 || {
        fail relay "relay not listening"
        return 1
    }
    send "$SOURCE" "tcp:127.0.0.1:7017" ",tls_dir=$TLS_CLIENT,final_pass=verify" || {
        fail completed "no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" dst6s
        return 1
    }
    last=$(last_tick "$SOURCE")
    migrated "$SOURCE" dst6s "$last" || return 1
    v=$(verify_line "$SOURCE")
    if [ -n "$v" ]; then pass verified "$v"; else
        fail verified "the source logged no verify pass"
        return 1
    fi
    same_memory "$SOURCE" dst6s || return 1
    wait_until 10 test -s "$RUN/relay6/report.json"
    # A TLS record starts 16 03: the main connection and each extra one.
    conns=$(grep -c '"first_bytes"' "$RUN/relay6/report.json")
    tls=$(grep -c '"first_bytes": "1603' "$RUN/relay6/report.json")
    if [ "$conns" -ge 2 ] && [ "$tls" = "$conns" ]; then
        pass every-connection-tls "$tls of $conns connections open with a TLS handshake"
    else
        fail every-connection-tls "$tls of $conns TLS: $(tr -d '\n ' <"$RUN/relay6/report.json" | cut -c1-300)"
        return 1
    fi
    SOURCE=dst6s
    SOURCE_MDEV=$next
    # A source without TLS to a TLS destination: refused, the VM runs on.
    SCEN=verify-pass-plain-refused
    receive_at dst6p "tcp:127.0.0.1:7019" ",tls_dir=$TLS_SERVER" "$(other)" || {
        fail receiver "TLS destination not listening"
        diag dst6p
        return 1
    }
    send "$SOURCE" "tcp:127.0.0.1:7019" ",final_pass=verify" || {
        fail refused "no verdict from the source; $(exit_reason "$SOURCE")"
        return 1
    }
    if [ "$(outcome "$SOURCE")" = failed ]; then
        pass refused "$(failure_message "$SOURCE")"
    else
        fail refused "a plain migration to a TLS destination completed"
        return 1
    fi
    survived "$SOURCE" "$SOURCE_MDEV" || return 1
    stop_vmm dst6p
}

# 7. (patched) two devices without DMA logging: the final pass sends guest
# memory once, as with one.
scenario_two_vfs() {
    SCEN=two-vfs
    for u in "$UN3" "$UN4" "$UN5" "$UN6"; do
        create_mdev mtty_nolog mtty_nolog-2 "$u" || {
            fail mdev "cannot create mtty_nolog-2 mdev $u"
            return 1
        }
    done
    CHECKSUM=0
    started=$(uptime_s)
    boot_vmm2 src7 "$UN3" "$UN4" ",dirty_tracking=all" || {
        fail vmm-start "no API socket; $(exit_reason src7)"
        diag src7
        return 1
    }
    if wait_alive src7 "$BOOT_WAIT" has_ticks src7 2; then
        pass boot "L2 ticking $(since "$started") s after start"
    else
        fail boot "no L2 tick after $(since "$started") s; $(exit_reason src7)"
        diag src7
        return 1
    fi
    receive_at dst7 "unix:$RUN/mig7.sock" "" "$UN5" "$UN6" || {
        fail receiver "destination not listening"
        diag dst7
        return 1
    }
    send src7 "unix:$RUN/mig7.sock" ",final_pass=resend" || {
        fail completed "no verdict from the source; $(exit_reason src7)"
        diag src7 dst7
        return 1
    }
    last=$(last_tick src7)
    migrated src7 dst7 "$last" || return 1
    two=$(final_pass_bytes src7)
    value "$SCEN/final_pass_bytes" "$two"
    if [ -n "$two" ] && [ "$two" = "$ONE_VF_FINAL_PASS" ]; then
        pass final-pass-as-with-one "$two bytes with two devices, $ONE_VF_FINAL_PASS with one"
    else
        fail final-pass-as-with-one "$two bytes with two devices, '$ONE_VF_FINAL_PASS' with one"
        return 1
    fi
    stop_vmm dst7
}

# ------------------------------------------------------- switch-over faults
#
# A fault around the switch-over, then the operator's decision, with a
# watcher sampling both VMMs for the whole scenario. Two running copies of
# one VM show in their guests' ticks: each copy counts on from the same
# tick, so a tick number printed on both hosts means both ran.

# Seconds between the watcher's samples (each also runs ch-remote twice).
WATCH_INTERVAL=0.25

# A VMM's state within a second, "busy" if its API does not answer by
# then: a destination's API waits while receive-migration runs.
vm_state_now() {
    if s=$(timeout 1 "$CHR" --api-socket "$RUN/$1/api.sock" info 2>/dev/null); then
        echo "$s" | grep -o '"state": *"[A-Za-z]*"' | head -n 1 | sed 's/.*"\([A-Za-z]*\)"$/\1/'
    elif alive "$1"; then
        echo busy
    fi
}

# watch A B: samples, until unwatch, "uptime last-tick-A last-tick-B
# state-A state-B" ("-" for none, "busy" for an API that did not answer
# within a second) into $RUN/watch-$SCEN.txt.
watch() {
    w=$RUN/watch-$SCEN.txt
    : >"$w"
    (
        while :; do
            a=$(last_tick "$1")
            b=$(last_tick "$2")
            sa=$(vm_state_now "$1")
            sb=$(vm_state_now "$2")
            echo "$(uptime_s) ${a:--} ${b:--} ${sa:--} ${sb:--}" >>"$w"
            sleep "$WATCH_INTERVAL"
        done
    ) &
    WATCHER=$!
}

# unwatch: stops the watcher and reports its sampling.
unwatch() {
    kill "$WATCHER" 2>/dev/null
    wait "$WATCHER" 2>/dev/null
    w=$RUN/watch-$SCEN.txt
    value "$SCEN/watch_samples" "$(wc -l <"$w")"
    value "$SCEN/watch_interval_ms" "$(awk 'NR == 1 { a = $1 } { b = $1 } END { if (NR > 1) printf "%d", (b - a) * 1000 / (NR - 1) }' "$w")"
}

# Samples that prove both VMMs ran at once. One sample asks A, then B, so
# "Running" twice in it can straddle a switch-over that took less than a
# query (A asked just before its pause, B just after its resume); two
# samples in a row with both Running cannot: A ran when asked before and
# after B was, and B, which does not pause by itself, ran from its first
# answer to its second, so both ran when A answered the second time.
both_running_samples() {
    awk '{ both = $4 == "Running" && $5 == "Running" } both && prev { n++ } { prev = both } END { print n + 0 }' "$RUN/watch-$SCEN.txt"
}

# shared_ticks A B: how many tick numbers both guests printed.
shared_ticks() {
    ticks "$1" | sort -u >"$RUN/ticks-a"
    ticks "$2" | sort -u >"$RUN/ticks-b"
    if [ -s "$RUN/ticks-a" ] && [ -s "$RUN/ticks-b" ]; then
        grep -c -F -x -f "$RUN/ticks-a" "$RUN/ticks-b"
    else
        echo 0
    fi
}
shared_ticks_at_least() { [ "$(shared_ticks "$1" "$2")" -ge "$3" ]; }

# never_both A B: no tick printed by both, no sample with both Running.
never_both() {
    shared=$(shared_ticks "$1" "$2")
    both=$(both_running_samples)
    if [ "$shared" = 0 ] && [ "$both" = 0 ]; then
        pass never-both "no tick on both hosts, no two samples in a row with both Running ($(wc -l <"$RUN/watch-$SCEN.txt") samples)"
    else
        fail never-both "$shared tick(s) printed on both hosts, $both sample(s) proving both Running: $(tr '\n' ';' <"$RUN/watch-$SCEN.txt" | cut -c1-400)"
    fi
}

# one_runs RUNNER OTHER: after the operator's decision only RUNNER's guest
# ticks on (3 more ticks while OTHER's stays put and OTHER is not
# Running), with its device as the guest left it.
one_runs() {
    other=$(last_tick "$2")
    now=$(last_tick "$1")
    if wait_alive "$1" 60 tick_above "$1" $((${now:-0} + 2)) &&
        [ "$(last_tick "$2")" = "$other" ] && ! state_is "$2" Running &&
        [ -z "$(device_mismatch "$1")" ]; then
        pass one-runs "$1 ticks ${now:-none} -> $(last_tick "$1"), device as left; $2 stays at tick ${other:-none}, state '$(vm_state "$2")'"
    else
        fail one-runs "$1: ${now:-none} -> $(last_tick "$1") $(device_mismatch "$1"); $2: ${other:-none} -> $(last_tick "$2"), state '$(vm_state "$2")'"
        diag "$1" "$2"
        return 1
    fi
}

# start_cut_relay TARGET_SOCKET COMMAND MODE [RELAY OPTIONS...]: a relay
# at $RUN/relay-$SCEN.sock that cuts at COMMAND (see xe-nested-relay).
start_cut_relay() {
    mkdir -p "$RUN/relay-$SCEN"
    target=$1 command=$2 mode=$3
    shift 3
    "$RELAY" --listen "$RUN/relay-$SCEN.sock" --to "$target" --cut-at "$command" \
        --cut-mode "$mode" "$@" --report "$RUN/relay-$SCEN/report.json" \
        --timeout-s "$MIGRATION_WAIT" >"$RUN/relay-$SCEN/relay.log" 2>&1 &
    RELAY_PID=$!
    wait_until 30 test -S "$RUN/relay-$SCEN.sock" || {
        fail relay "relay not listening"
        return 1
    }
}

# The mdev of the pair (UA, UB) the current source does not hold.
free_mdev() { if [ "$SOURCE_MDEV" = "$UA" ]; then echo "$UB"; else echo "$UA"; fi; }

# F1. Complete's answer lost. Upstream's destination resumed the VM before
# it answered, and the source resumes its own on the error: both run
# until the operator stops one. Ours answers Complete with the VM still
# paused; the source resumes, the destination keeps it paused.
scenario_complete_answer_lost() {
    SCEN=complete-answer-lost
    free=$(free_mdev)
    start_receiver dsta "$free" "$RUN/miga.sock" || {
        fail receiver "destination not listening"
        diag dsta
        return 1
    }
    start_cut_relay "$RUN/miga.sock" complete answer-lost || return 1
    watch "$SOURCE" dsta
    send "$SOURCE" "unix:$RUN/relay-$SCEN.sock" || {
        unwatch
        fail source-reports-failure "no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" dsta
        return 1
    }
    if [ "$(outcome "$SOURCE")" = failed ]; then
        pass source-reports-failure "$(failure_message "$SOURCE")"
    else
        unwatch
        fail source-reports-failure "source outcome '$(outcome "$SOURCE")' although Complete's answer was lost"
        return 1
    fi
    if [ "$FLAVOR" = upstream ]; then
        # Let the overlap show: three ticks printed by both copies.
        if wait_alive dsta 60 shared_ticks_at_least "$SOURCE" dsta 3; then
            pass both-run "$(shared_ticks "$SOURCE" dsta) tick(s) printed on both hosts, $(both_running_samples) sample(s) proving both Running"
        else
            unwatch
            fail both-run "$(shared_ticks "$SOURCE" dsta) shared tick(s); source '$(vm_state "$SOURCE")', destination '$(vm_state dsta)'"
            diag "$SOURCE" dsta
            return 1
        fi
    else
        survived "$SOURCE" "$SOURCE_MDEV" || {
            unwatch
            return 1
        }
        # What its operator sees: receive-migration's error, the event.
        wait_until "$API_WAIT" test -f "$RUN/dsta/receive.rc"
        kept=$(tr -d '\r\n' <"$RUN/dsta/receive.log" | grep -a -o 'Lost the source after this VM was ready[^:]*')
        if wait_until 30 state_is dsta Paused && [ -n "$kept" ] &&
            grep -q '"event": *"migration-receive-interrupted"' "$RUN/dsta/events.json"; then
            pass destination-kept-paused "Paused, migration-receive-interrupted; receive-migration: $(echo "$kept" | cut -c1-120)"
        else
            unwatch
            fail destination-kept-paused "destination state '$(vm_state dsta)', receive-migration: $(tr -d '\r' <"$RUN/dsta/receive.log" | tail -n 2 | cut -c1-300)"
            diag dsta
            return 1
        fi
    fi
    # The operator keeps the source and stops the destination.
    overlap_end=$(uptime_s)
    stop_vmm dsta
    unwatch
    if [ "$FLAVOR" = upstream ]; then
        value "$SCEN/shared_ticks" "$(shared_ticks "$SOURCE" dsta)"
        value "$SCEN/both_running_s" "$(awk -v end="$overlap_end" '$4 == "Running" && $5 == "Running" && !s { s = $1 } END { if (s) printf "%.1f", end - s; else print 0 }' "$RUN/watch-$SCEN.txt")"
    else
        never_both "$SOURCE" dsta
    fi
    one_runs "$SOURCE" dsta
}

# F5. The destination stops answering at Complete for longer than the
# migration's timeout_s. Upstream waits as long as the stall lasts (for
# ever, were the connection never closed), the VM paused all along; ours
# gives up after timeout_s and resumes the VM.
STALL_S=40
STALL_TIMEOUT_S=8
scenario_stall_at_complete() {
    SCEN=stall-at-complete
    free=$(free_mdev)
    start_receiver dste "$free" "$RUN/mige.sock" || {
        fail receiver "destination not listening"
        diag dste
        return 1
    }
    start_cut_relay "$RUN/mige.sock" complete stall --stall-s "$STALL_S" || return 1
    started=$(uptime_s)
    send "$SOURCE" "unix:$RUN/relay-$SCEN.sock" ",timeout_s=$STALL_TIMEOUT_S" || {
        fail source-reports-failure "no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" dste
        return 1
    }
    waited=$(since "$started")
    value "$SCEN/verdict_after_s" "$waited"
    if [ "$(outcome "$SOURCE")" = failed ]; then
        pass source-reports-failure "after $waited s: $(failure_message "$SOURCE")"
    else
        fail source-reports-failure "source outcome '$(outcome "$SOURCE")' although the destination stalled"
        return 1
    fi
    if [ "$FLAVOR" = upstream ]; then
        if awk -v w="$waited" -v s="$STALL_S" 'BEGIN { exit !(w >= s) }'; then
            pass waited-out-the-stall "verdict after $waited s with timeout_s=$STALL_TIMEOUT_S: only the relay's closing after $STALL_S s ended the wait"
        else
            fail waited-out-the-stall "verdict after $waited s, before the $STALL_S s stall ended"
            return 1
        fi
    else
        if awk -v w="$waited" -v s="$STALL_S" -v t="$STALL_TIMEOUT_S" 'BEGIN { exit !(w >= t && w < s) }' &&
            failure_message "$SOURCE" | grep -q "no answer from the destination within timeout_s ($STALL_TIMEOUT_S s)"; then
            pass gave-up-after-timeout "verdict after $waited s with timeout_s=$STALL_TIMEOUT_S, the stall lasting $STALL_S s"
        else
            fail gave-up-after-timeout "verdict after $waited s with timeout_s=$STALL_TIMEOUT_S, the stall lasting $STALL_S s: $(failure_message "$SOURCE")"
            return 1
        fi
    fi
    survived "$SOURCE" "$SOURCE_MDEV" || return 1
    # The relay still stalls the destination (ours gave up early): end it,
    # so that the destination, whose API waits while it receives, can stop.
    kill "$RELAY_PID" 2>/dev/null
    stop_vmm dste
}

# F2. (patched) The destination killed once ready, Switchover on its way:
# the source cannot know, stays Paused and refuses a new migration; the
# operator finds the destination gone and resumes the source.
scenario_destination_killed_when_ready() {
    SCEN=destination-killed-when-ready
    free=$(free_mdev)
    start_receiver dstc "$free" "$RUN/migc.sock" || {
        fail receiver "destination not listening"
        diag dstc
        return 1
    }
    start_cut_relay "$RUN/migc.sock" switchover before --kill-pid "$(pid_of dstc)" || return 1
    watch "$SOURCE" dstc
    send "$SOURCE" "unix:$RUN/relay-$SCEN.sock" || {
        unwatch
        fail outcome-unknown "no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" dstc
        return 1
    }
    outcome_unknown_held "$SOURCE" || {
        unwatch
        return 1
    }
    if wait_until 10 eval "! alive dstc"; then pass destination-dead; else
        unwatch
        fail destination-dead "destination VMM still alive"
        return 1
    fi
    # The operator: the destination is gone, so the source resumes.
    if api "$SOURCE" resume; then pass decided "ch-remote resume on the source"; else
        unwatch
        fail decided "resume failed: $(api "$SOURCE" resume 2>&1 | tail -n 1)"
        return 1
    fi
    sleep 3
    unwatch
    never_both "$SOURCE" dstc
    one_runs "$SOURCE" dstc
}

# outcome_unknown_held SOURCE: the patched source after a Switchover it
# cannot know the fate of: outcome unknown, Paused, the event, and a new
# send-migration refused with the reason and what to do.
outcome_unknown_held() {
    if [ "$(outcome "$1")" = unknown ]; then
        pass outcome-unknown "$(failure_message "$1" | cut -c1-160)"
    else
        fail outcome-unknown "source outcome '$(outcome "$1")': $(failure_message "$1")"
        diag "$1"
        return 1
    fi
    if state_is "$1" Paused && grep -q '"event": *"migration-outcome-unknown"' "$RUN/$1/events.json"; then
        pass source-paused-with-event "Paused, migration-outcome-unknown on the event monitor"
    else
        fail source-paused-with-event "state '$(vm_state "$1")'; events: $(grep -o '"event": *"[a-z-]*"' "$RUN/$1/events.json" | tail -n 3 | tr '\n' ' ')"
        return 1
    fi
    refusal=$(api "$1" send-migration "destination_url=unix:$RUN/nowhere.sock" 2>&1)
    case "$refusal" in
    *"outcome is unknown"*outcome_checked=on*)
        pass new-migration-refused "$(echo "$refusal" | tr -d '\r\n' | sed 's/.*Refusing/Refusing/' | cut -c1-200)"
        ;;
    *)
        fail new-migration-refused "send-migration said: $(echo "$refusal" | tr -d '\r\n' | cut -c1-300)"
        return 1
        ;;
    esac
}

# F3. (patched) Switchover went through, its answer was lost: the
# destination runs the VM, the source stays Paused; the operator finds
# the VM running there and deletes the source.
scenario_switchover_answer_lost() {
    SCEN=switchover-answer-lost
    free=$(free_mdev)
    start_receiver dstb "$free" "$RUN/migb.sock" || {
        fail receiver "destination not listening"
        diag dstb
        return 1
    }
    start_cut_relay "$RUN/migb.sock" switchover answer-lost || return 1
    watch "$SOURCE" dstb
    send "$SOURCE" "unix:$RUN/relay-$SCEN.sock" || {
        unwatch
        fail outcome-unknown "no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" dstb
        return 1
    }
    last=$(last_tick "$SOURCE")
    outcome_unknown_held "$SOURCE" || {
        unwatch
        return 1
    }
    if wait_alive dstb 30 state_is dstb Running && continues dstb "$last"; then
        pass destination-runs "$(continuity dstb "$last")"
    else
        unwatch
        fail destination-runs "destination '$(vm_state dstb)'; $(continuity dstb "$last")"
        diag dstb
        return 1
    fi
    # The operator: the VM runs on the destination, so the source goes.
    if api "$SOURCE" delete; then pass decided "ch-remote delete on the source"; else
        unwatch
        fail decided "delete failed"
        return 1
    fi
    stop_vmm "$SOURCE"
    unwatch
    never_both "$SOURCE" dstb
    one_runs dstb "$SOURCE" || return 1
    SOURCE=dstb
    SOURCE_MDEV=$free
}

# F4. (patched) The source killed once Switchover left: the destination
# runs the VM on its own.
scenario_source_killed_after_switchover() {
    SCEN=source-killed-after-switchover
    free=$(free_mdev)
    start_receiver dstd "$free" "$RUN/migd.sock" || {
        fail receiver "destination not listening"
        diag dstd
        return 1
    }
    start_cut_relay "$RUN/migd.sock" switchover answer-lost --kill-pid "$(pid_of "$SOURCE")" || return 1
    watch "$SOURCE" dstd
    wc -l <"$RUN/$SOURCE/ch.log" >"$RUN/$SOURCE/mark"
    api "$SOURCE" send-migration "destination_url=unix:$RUN/relay-$SCEN.sock" >"$RUN/$SOURCE/send.log" 2>&1
    if wait_until "$MIGRATION_WAIT" eval "! alive $SOURCE"; then
        pass source-killed "$(tr -d '\n ' <"$RUN/relay-$SCEN/report.json" 2>/dev/null | grep -o '"cut":{[^}]*}' | cut -c1-200)"
    else
        unwatch
        fail source-killed "source still alive; $(outcome "$SOURCE")"
        return 1
    fi
    last=$(last_tick "$SOURCE")
    if wait_alive dstd 30 state_is dstd Running && continues dstd "$last"; then
        pass destination-runs "$(continuity dstd "$last")"
    else
        unwatch
        fail destination-runs "destination '$(vm_state dstd)'; $(continuity dstd "$last")"
        diag dstd
        return 1
    fi
    sleep 3
    unwatch
    never_both "$SOURCE" dstd
    one_runs dstd "$SOURCE" || return 1
    SOURCE=dstd
    SOURCE_MDEV=$free
}

# ---------------------------------------------------------------------- main

mkdir -p "$RUN"
echo "$TAG FLAVOR $FLAVOR $("$CH" --version 2>&1 | head -n 1)"
for tool in "$CH" "$CHR"; do
    [ -x "$tool" ] || {
        echo "$TAG CHECK $FLAVOR/setup/binaries fail $tool missing"
        exit 1
    }
done
flavor_started=$(uptime_s)
SOURCE=""
SOURCE_MDEV=""
if scenario_snapshot_restore && scenario_live_migration; then
    scenario_destination_killed && scenario_incompatible_destination &&
        scenario_complete_answer_lost && scenario_stall_at_complete &&
        if [ "$FLAVOR" = patched ]; then
            scenario_destination_killed_when_ready &&
                scenario_switchover_answer_lost &&
                scenario_source_killed_after_switchover
        fi
fi
# Independent of the chain above: its own VM on its own devices.
if scenario_no_dma_logging && [ "$FLAVOR" = patched ]; then
    ONE_VF_FINAL_PASS=$(final_pass_bytes src3)
    scenario_verify_pass
    scenario_two_vfs
fi
for d in "$RUN"/*/; do
    [ -f "$d/pid" ] && stop_vmm "$(basename "$d")"
done
value "scenarios_seconds" "$(since "$flavor_started")"
exit "$FAILS"
