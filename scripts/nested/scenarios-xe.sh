#!/bin/busybox sh
# shellcheck shell=dash
# shellcheck disable=SC2317 # predicates run through wait_until/wait_alive look unreachable
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The xe-vfio-pci scenarios of the nested test, run inside L1 (see
# scripts/nested/run.sh --suite xe): `scenarios-xe.sh setup` once, then
# `scenarios-xe.sh upstream|patched`.
#
# What runs: the real xe-vfio-pci (built unmodified from the L1 kernel's
# tree) bound to real SR-IOV VFs (qemu's nvme VFs: is_virtfn, a vfid from
# pci_iov_vf_id), the real Cloud Hypervisor and ch-remote, KVM, iommufd,
# and our PF stand-in xe_pf_standin in place of xe's PF side: it answers
# the driver's calls (xe_sriov_vfio.h) and produces and consumes the Xe
# packet stream, whose VRAM chunks it copies from and to an ivshmem BAR of
# L1 (the VF's "LMEM"). The L2 guest reaches that BAR through Cloud
# Hypervisor's ivshmem device mapped over it (a relative `vram` link in
# each VMM's directory, so a migrated config names the destination's own
# LMEM) and keeps writing and checking a pattern there (xe-nested-vram).
#
# Output as scenarios.sh: `XE-NESTED: CHECK <flavour>/<scenario>/<step>
# pass|fail <detail>`, `XE-NESTED: VALUE <flavour>/<name> <value>`. A failed
# step ends its scenario; every wait is bounded. Exit status: failed steps.

FLAVOR=$1
TAG="XE-NESTED:"
BIN=/nested/$FLAVOR
CH=$BIN/cloud-hypervisor
CHR=$BIN/ch-remote
RELAY=/nested/bin/xe-nested-relay
XE_VF_MIG=/nested/bin/xe-vf-mig
VRAM_TOOL=/nested/bin/xe-nested-vram
RUN=/run/xe-$FLAVOR
FAILS=0
SCEN=setup
BOOT_WAIT=${XE_NESTED_BOOT_WAIT:-300}
MIGRATION_WAIT=${XE_NESTED_MIGRATION_WAIT:-600}
ROUND_WAIT=${XE_NESTED_ROUND_WAIT:-300}
API_WAIT=120
VRAM_MIB=$(sed -n 's/.*xe_nested.vram_mib=\([0-9]*\).*/\1/p' /proc/cmdline)
VRAM_MIB=${VRAM_MIB:-256}
# Chunks of the guest's checksums (xe-nested-vram --chunk-mib 4).
CHUNKS=$((VRAM_MIB / 4))
# The stand-in's largest VRAM packet: smaller than xe's 512 MiB, so the
# stream carries several VRAM chunks.
VRAM_CHUNK_MB=64

# L1's PCI layout (run.sh): PF, its VF, the VF's LMEM device.
PF_A=0000:00:04.0
VF_A=0000:00:04.1
LMEM_A=0000:00:08.0
PF_B=0000:00:05.0
VF_B=0000:00:05.1
LMEM_B=0000:00:09.0
PF_C=0000:00:06.0
VF_C=0000:00:06.1
LMEM_C=0000:00:0a.0
PCI=/sys/bus/pci/devices

XE=""
[ "$FLAVOR" = patched ] && XE=",xe_migration=on,dirty_tracking=all"

pass() { echo "$TAG CHECK $FLAVOR/$SCEN/$1 pass ${2:-}"; }
fail() {
    echo "$TAG CHECK $FLAVOR/$SCEN/$1 fail ${2:-}"
    FAILS=$((FAILS + 1))
}
value() { echo "$TAG VALUE $FLAVOR/$1 $2"; }
note() { echo "$TAG NOTE $FLAVOR/$SCEN $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }'; }

# What the stand-in and the driver logged (each call of xe_sriov_vfio.h,
# each state arc of xe-vfio-pci).
standin_log() { dmesg | grep -a -E 'xe_pf_standin|xe-vfio-pci' | tr -d '\r'; }

diag() {
    for name in "$@"; do
        d=$RUN/$name
        [ -d "$d" ] || continue
        for f in ch.log receive.log relay.log serial.log; do
            [ -s "$d/$f" ] || continue
            echo "----- $FLAVOR/$name/$f (last 25 lines)"
            tail -n 25 "$d/$f" | tr -d '\r' | cut -c1-300
        done
    done
    for name in "$@"; do
        f=$RUN/$name/serial.log
        grep -a -q -E '^(WARNING|BUG|Kernel panic)' "$f" 2>/dev/null || continue
        echo "----- $FLAVOR/$name/serial.log: the boot up to its first WARNING/BUG"
        awk '/^(BUG|Kernel panic)/ { exit } { print }' "$f" | tr -d '\r' | cut -c1-200 | tail -n 80
    done
    echo "----- dmesg (stand-in, xe-vfio-pci, vfio, kvm; last 25)"
    dmesg | grep -a -i -E 'standin|xe-vfio|vfio|kvm|iommu|DMAR' | tail -n 25
}

# ------------------------------------------------------------------- waits

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

wait_alive() {
    w_name=$1
    w_limit=$(($2 * 2))
    shift 2
    w_n=0
    until "$@"; do
        if ! alive "$w_name"; then
            "$@" && return 0
            return 2
        fi
        w_n=$((w_n + 1))
        [ "$w_n" -ge "$w_limit" ] && return 1
        sleep 0.5
    done
    return 0
}

exit_reason() {
    if alive "$1"; then
        echo "still running"
    else
        r=$(grep -a ' ERROR:' "$RUN/$1/ch.log" 2>/dev/null | tail -n 1 | sed 's/.* ERROR:[^ ]* -- //' | tr -d '\r' | cut -c1-300)
        [ -n "$r" ] || r=$(tail -n 1 "$RUN/$1/ch.log" 2>/dev/null | tr -d '\r' | cut -c1-300)
        echo "cloud-hypervisor exited: ${r:-no error logged}"
    fi
}

# --------------------------------------------------------------- instances

cdev_of() {
    for v in "$PCI/$1"/vfio-dev/vfio*; do
        [ -e "$v" ] && echo "/dev/vfio/devices/$(basename "$v")" && return 0
    done
    return 1
}

pid_of() { cat "$RUN/$1/pid" 2>/dev/null; }
alive() { p=$(pid_of "$1") && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
api() {
    name=$1
    shift
    timeout "$API_WAIT" "$CHR" --api-socket "$RUN/$name/api.sock" "$@"
}
vm_state() { api "$1" info 2>/dev/null | grep -o '"state": *"[A-Za-z]*"' | head -n 1 | sed 's/.*"\([A-Za-z]*\)"$/\1/'; }
state_is() { [ "$(vm_state "$1")" = "$2" ]; }
# Peak resident memory of a VMM so far, KiB (VmHWM).
peak_rss_kib() { sed -n "s/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p" "/proc/$(pid_of "$1")/status" 2>/dev/null; }

# start_vmm NAME LMEM [cloud-hypervisor arguments...]: its own directory,
# with `vram` linked to the LMEM device's BAR 2 (a relative path travels
# in a migrated or restored config and names each VMM's own LMEM).
start_vmm() {
    name=$1
    lmem=$2
    shift 2
    d=$RUN/$name
    rm -rf "$d"
    mkdir -p "$d"
    ln -s "$PCI/$lmem/resource2" "$d/vram"
    (cd "$d" && exec "$CH" -vv --api-socket "$d/api.sock" --event-monitor "path=$d/events.json" \
        "$@" >"$d/ch.log" 2>&1) &
    echo $! >"$d/pid"
    wait_alive "$name" "$API_WAIT" test -S "$d/api.sock"
}

stop_vmm() {
    for name in "$@"; do
        alive "$name" || continue
        api "$name" shutdown-vmm >/dev/null 2>&1
        wait_until 20 eval "! alive $name" || kill -9 "$(pid_of "$name")" 2>/dev/null
    done
}

# boot_vmm NAME VF LMEM: the L2 guest with the VF and its VRAM BAR.
# noxsave: see scenarios.sh (the 7.x L2 kernel under CH in nested TCG).
# vfio_p2p_dma=off: CH would map the VF's BARs into the IOMMU for
# peer-to-peer DMA, which iommufd cannot do for a VFIO BAR's mapping
# (IOMMU_IOAS_MAP fails with EFAULT); the VF does no DMA here.
boot_vmm() {
    start_vmm "$1" "$3" --kernel /nested/l2/vmlinux --initramfs /nested/l2/initrd-xe.cpio \
        --cmdline "console=ttyS0 panic=-1 quiet noxsave" --serial file=serial.log --console off \
        --cpus boot=1 --memory size=128M --platform iommufd=on,vfio_p2p_dma=off \
        --device "path=$PCI/$2,id=vfio0$XE" --ivshmem "path=vram,size=${VRAM_MIB}M"
}

# --------------------------------------------------------------- VRAM rounds

CR=$(printf '\r')
# Complete result lines of the guest's rounds (xe-nested-vram).
round_lines() { grep -a -E "^L2-VRAM round=[0-9]+ (ok|BAD)=[0-9]+/[0-9]+ .*seconds=[0-9.]+$CR\$" "$RUN/$1/serial.log" 2>/dev/null | tr -d '\r'; }
begun() { grep -a -E "^L2-VRAM begin round=[0-9]+$CR\$" "$RUN/$1/serial.log" 2>/dev/null | tr -d '\r' | sed 's/.*round=//'; }
first_begun() { begun "$1" | head -n 1; }
last_begun() { begun "$1" | tail -n 1; }
round_result() { round_lines "$1" | grep -E "^L2-VRAM round=$2 " | head -n 1; }
has_round_result() {
    r=$(first_begun "$1")
    [ -n "$r" ] && [ -n "$(round_result "$1" "$r")" ]
}
filled() { grep -a -q "^L2-VRAM filled " "$RUN/$1/serial.log" 2>/dev/null; }
# The L2 kernel crashed (it reboots with panic=-1, and CH boots it again).
l2_crashed() { grep -a -q -E '^(BUG|Kernel panic)' "$RUN/$1/serial.log" 2>/dev/null; }

# vram_checked NAME [PREVIOUS_LAST_BEGUN]: the first round NAME's guest
# began in this VMM (so after its restore or migration) checked every
# chunk of the BAR and found it as it wrote it; with PREVIOUS_LAST_BEGUN,
# that round also follows the source's last one (the guest kept running).
VRAM_DETAIL=""
vram_checked() {
    VRAM_DETAIL=""
    if ! wait_alive "$1" "$ROUND_WAIT" has_round_result "$1"; then
        VRAM_DETAIL="no complete round in $1 within ${ROUND_WAIT}s; $(exit_reason "$1"); last: $(grep -a '^L2-' "$RUN/$1/serial.log" 2>/dev/null | tail -n 2 | tr -d '\r' | tr '\n' ' ')"
        return 1
    fi
    r=$(first_begun "$1")
    line=$(round_result "$1" "$r")
    VRAM_DETAIL="$line"
    if [ -n "${2:-}" ]; then
        VRAM_DETAIL="$VRAM_DETAIL (previous VMM's last round $2)"
        if [ "$r" -le "$2" ] || [ "$r" -gt $(($2 + 2)) ]; then
            VRAM_DETAIL="$VRAM_DETAIL: NOT the same guest going on"
            return 1
        fi
    fi
    case "$line" in *" ok=$CHUNKS/$CHUNKS "*) return 0 ;; esac
    return 1
}

# A round begun after `since` rounds, on a VMM that stays: for a source
# that resumed, the first round begun after round $2 must be ok.
vram_checked_after() {
    VRAM_DETAIL=""
    after=$2
    if ! wait_alive "$1" "$ROUND_WAIT" eval "[ -n \"\$(round_result $1 $((after + 1)))\" ]"; then
        VRAM_DETAIL="no round after $after in $1 within ${ROUND_WAIT}s; $(exit_reason "$1")"
        return 1
    fi
    line=$(round_result "$1" $((after + 1)))
    VRAM_DETAIL=$line
    case "$line" in *" ok=$CHUNKS/$CHUNKS "*) return 0 ;; esac
    return 1
}

# ---------------------------------------------------------------- migration

# start_receiver NAME VF LMEM URL
start_receiver() {
    start_vmm "$1" "$3" || return 1
    d=$RUN/$1
    cdev=$(cdev_of "$2") || return 1
    case "$4" in unix:*) rm -f "${4#unix:}" ;; esac
    (timeout "$MIGRATION_WAIT" "$CHR" --api-socket "$d/api.sock" receive-migration \
        "receiver_url=$4,vfio_fds=[vfio0@3],iommufd_fd=4" \
        3<>"$cdev" 4<>/dev/iommu >"$d/receive.log" 2>&1
    echo $? >"$d/receive.rc") &
    case "$4" in
    unix:*) wait_until "$API_WAIT" test -S "${4#unix:}" ;;
    tcp:*) wait_until "$API_WAIT" eval "netstat -ltn 2>/dev/null | grep -q ':${4##*:} '" ;;
    esac
}

since_send() { tail -n +"$(($(cat "$RUN/$1/mark" 2>/dev/null || echo 0) + 1))" "$RUN/$1/ch.log" | tr -d '\r'; }
outcome() {
    log=$(since_send "$1")
    case "$log" in
    *"Migration completed"*) echo completed ;;
    *"Migration failed"*) echo failed ;;
    *"Migration outcome unknown"*) echo unknown ;;
    esac
}
has_outcome() { [ -n "$(outcome "$1")" ]; }
failure_message() { since_send "$1" | grep -a -E 'Migration (failed|outcome unknown)' | tail -n 1 | sed -E 's/.*Migration (failed|outcome unknown): //' | cut -c1-300; }
completion_line() { since_send "$1" | grep -a 'Migration completed' | tail -n 1 | sed 's/.*Migration completed/Migration completed/'; }
downtime_ms() { completion_line "$1" | sed -n 's/.* with a downtime of \([0-9]*\)ms.*/\1/p'; }

send() {
    wc -l <"$RUN/$1/ch.log" >"$RUN/$1/mark"
    api "$1" send-migration "destination_url=$2" >"$RUN/$1/send.log" 2>&1 || return 1
    wait_alive "$1" "$MIGRATION_WAIT" has_outcome "$1"
}

# migrated SOURCE DEST LAST_BEGUN
migrated() {
    if [ "$(outcome "$1")" = completed ]; then
        pass completed "$(completion_line "$1")"
    else
        fail completed "source says: $(failure_message "$1")"
        diag "$1" "$2"
        return 1
    fi
    value "$SCEN/downtime_ms" "$(downtime_ms "$1")"
    note "source log: $(since_send "$1" | grep -a -E 'Precopy complete|streamed state' |
        sed 's/.* -- //' | tr '\n' ';' | cut -c1-500)"
    if wait_until "$API_WAIT" test -f "$RUN/$2/receive.rc" && [ "$(cat "$RUN/$2/receive.rc")" = 0 ]; then
        pass receive-returned "receive-migration returned 0"
    else
        fail receive-returned "receive-migration: rc $(cat "$RUN/$2/receive.rc" 2>/dev/null) $(tr -d '\r' <"$RUN/$2/receive.log" | tail -n 2)"
        diag "$2"
        return 1
    fi
    if wait_alive "$2" 60 state_is "$2" Running; then pass destination-running; else
        fail destination-running "destination state '$(vm_state "$2")'; $(exit_reason "$2")"
        diag "$2"
        return 1
    fi
    if vram_checked "$2" "$3"; then pass vram-checked "$VRAM_DETAIL"; else
        fail vram-checked "$VRAM_DETAIL"
        diag "$2"
        return 1
    fi
    if wait_until 60 eval "! alive $1"; then pass source-ended; else
        fail source-ended "the source VMM still runs after a completed migration"
        return 1
    fi
}

# survived SOURCE: a failed migration left the source running, its VRAM
# as the guest wrote it.
survived() {
    if wait_alive "$1" 60 state_is "$1" Running; then pass source-running; else
        fail source-running "source state '$(vm_state "$1")' after the failed migration; $(exit_reason "$1")"
        diag "$1"
        return 1
    fi
    if vram_checked_after "$1" "$(last_begun "$1")"; then pass vram-checked "$VRAM_DETAIL"; else
        fail vram-checked "$VRAM_DETAIL"
        diag "$1"
        return 1
    fi
}

# --------------------------------------------------------------- scenarios

# The VM: VF A, LMEM A; the guest fills its VRAM and checks a first round.
scenario_boot() {
    SCEN=boot
    started=$(uptime_s)
    boot_vmm src1 "$VF_A" "$LMEM_A" || {
        fail vmm-start "no API socket; $(exit_reason src1)"
        diag src1
        return 1
    }
    if wait_alive src1 "$BOOT_WAIT" eval "filled src1 || l2_crashed src1" && ! l2_crashed src1; then
        pass vram-filled "$(since "$started") s after start: $(grep -a '^L2-VRAM filled' "$RUN/src1/serial.log" | tr -d '\r')"
    else
        fail vram-filled "no 'L2-VRAM filled' after $(since "$started") s; $(exit_reason src1)"
        diag src1
        return 1
    fi
    vf_id="$(cat "$PCI/$VF_A/vendor"):$(cat "$PCI/$VF_A/device")"
    if grep -a -q "^L2-PCI .* $vf_id " "$RUN/src1/serial.log" && grep -a -q '^L2-VRAM bar ' "$RUN/src1/serial.log"; then
        pass devices-in-guest "$(grep -a -E '^L2-(PCI .* '"$vf_id"' |VRAM bar)' "$RUN/src1/serial.log" | tr -d '\r' | tr '\n' ' ')"
    else
        fail devices-in-guest "$(grep -a -E '^L2-(PCI|VRAM)' "$RUN/src1/serial.log" | tr -d '\r' | tr '\n' ' ')"
        return 1
    fi
    if vram_checked src1; then pass vram-checked "$VRAM_DETAIL"; else
        fail vram-checked "$VRAM_DETAIL"
        diag src1
        return 1
    fi
    SOURCE=src1
}

# Snapshot, scribble over the VF's LMEM (so what the guest finds after
# the restore can only have come from the snapshot), restore into a new
# VMM on the same VF, resume: the first round checks the whole BAR.
scenario_snapshot_restore() {
    SCEN=snapshot-restore
    if api "$SOURCE" pause && state_is "$SOURCE" Paused; then pass pause; else
        fail pause "state '$(vm_state "$SOURCE")'"
        diag "$SOURCE"
        return 1
    fi
    last=$(last_begun "$SOURCE")
    snap=$RUN/snap
    rm -rf "$snap" && mkdir -p "$snap"
    rss_before=$(peak_rss_kib "$SOURCE")
    started=$(uptime_s)
    if api "$SOURCE" snapshot "file://$snap" && [ -s "$snap/state.json" ]; then
        pass snapshot "$(since "$started") s; $(cd "$snap" && ls -l | awk 'NR > 1 { printf "%s %s B; ", $9, $5 }')"
    else
        fail snapshot "no state.json in $snap"
        diag "$SOURCE"
        return 1
    fi
    value "$SCEN/snapshot_seconds" "$(since "$started")"
    value "$SCEN/source_peak_rss_kib_before" "$rss_before"
    value "$SCEN/source_peak_rss_kib" "$(peak_rss_kib "$SOURCE")"
    value "$SCEN/state_json_bytes" "$(wc -c <"$snap/state.json")"
    if [ "$FLAVOR" = patched ]; then
        if grep -q '"vfio_migration"' "$snap/state.json"; then
            fail state-json-without-device-data "state.json holds a vfio_migration blob"
            return 1
        fi
        pass state-json-without-device-data "$(wc -c <"$snap/state.json") bytes"
        if [ -s "$snap/xe-vf-vfio0.bin" ]; then
            pass device-state-file "xe-vf-vfio0.bin $(wc -c <"$snap/xe-vf-vfio0.bin") bytes"
            value "$SCEN/device_state_file_bytes" "$(wc -c <"$snap/xe-vf-vfio0.bin")"
        else
            fail device-state-file "no xe-vf-vfio0.bin beside state.json"
            return 1
        fi
        # The engine took VF A (Intel's ids, on xe-vfio-pci) for an Xe VF
        # and parsed its stream in flight; --xe parses it again here.
        kind=$(grep -a 'migrated as' "$RUN/$SOURCE/ch.log" | tail -n 1 | sed 's/.* -- //' | cut -c1-200)
        case "$kind" in
        *"migrated as 'xe-vf'"*) pass xe-engine "$kind" ;;
        *)
            fail xe-engine "the engine did not take VF A for an Xe VF: '$kind'"
            return 1
            ;;
        esac
        out=$("$XE_VF_MIG" inspect --xe "$snap/xe-vf-vfio0.bin" 2>&1)
        rc=$?
        vram_packets=$(echo "$out" | grep -c -i 'vram')
        if [ "$rc" = 0 ] && echo "$out" | grep -q -i "0x$(printf %04x "$(cat "$PCI/$PF_A/device")")"; then
            pass inspect "$(echo "$out" | head -n 12 | tr '\n' ' ' | cut -c1-600)"
        else
            fail inspect "rc $rc: $(echo "$out" | head -n 12 | tr '\n' ' ' | cut -c1-600)"
            return 1
        fi
        note "inspect lines naming VRAM: $vram_packets"
    else
        if grep -q '"vfio_migration"' "$snap/state.json"; then
            pass device-data-in-state-json "the whole device state, VRAM included, base64 in state.json"
        else
            fail device-data-in-state-json "no vfio_migration section in state.json"
            return 1
        fi
    fi
    note "stand-in: $(standin_log | grep -a 'stop_copy_exit' | tail -n 1 | sed 's/.*VF/VF/')"
    stop_vmm "$SOURCE"
    # Overwrite the LMEM with another pattern.
    if "$VRAM_TOOL" --bar "$PCI/$LMEM_A/resource2" --seed 99 --scribble >"$RUN/scribble.log" 2>&1; then
        pass lmem-scribbled "$(tr -d '\r' <"$RUN/scribble.log" | tail -n 1)"
    else
        fail lmem-scribbled "$(tail -n 2 "$RUN/scribble.log")"
        return 1
    fi
    started=$(uptime_s)
    start_vmm rst1 "$LMEM_A" --restore "source_url=file://$snap" || {
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
    value "$SCEN/restore_seconds" "$(since "$started")"
    value "$SCEN/restore_peak_rss_kib" "$(peak_rss_kib rst1)"
    note "stand-in: $(standin_log | grep -a 'resume_data_exit' | tail -n 1 | sed 's/.*VF/VF/')"
    if ! api rst1 resume; then
        fail vram-checked "resume failed; $(exit_reason rst1)"
        diag rst1
        return 1
    fi
    if vram_checked rst1 "$last"; then pass vram-checked "$VRAM_DETAIL"; else
        fail vram-checked "$VRAM_DETAIL"
        diag rst1
        return 1
    fi
    SOURCE=rst1
    SOURCE_VF=$VF_A
    SNAP=$snap
}

# Upstream: live migration of a VF without DMA logging is refused.
scenario_live_refused() {
    SCEN=live-migration
    start_receiver dst2 "$VF_B" "$LMEM_B" "unix:$RUN/mig2.sock" || {
        fail receiver "destination not listening"
        diag dst2
        return 1
    }
    send "$SOURCE" "unix:$RUN/mig2.sock" || {
        fail refused-without-dma-logging "no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" dst2
        return 1
    }
    msg=$(failure_message "$SOURCE")
    if [ "$(outcome "$SOURCE")" = failed ] && echo "$msg" | grep -q 'start_dma_logging'; then
        pass refused-without-dma-logging "$msg"
    else
        fail refused-without-dma-logging "outcome '$(outcome "$SOURCE")': $msg"
        diag "$SOURCE"
        return 1
    fi
    survived "$SOURCE" || return 1
    stop_vmm dst2
}

# migrate NAME_OF_DEST VF LMEM URL: a live migration that must complete.
migrate_to() {
    start_receiver "$1" "$2" "$3" "$4" || {
        fail receiver "destination not listening on $4"
        diag "$1"
        return 1
    }
    send "$SOURCE" "$4" || {
        fail completed "no verdict from the source; $(exit_reason "$SOURCE")"
        diag "$SOURCE" "$1"
        return 1
    }
    last=$(last_begun "$SOURCE")
    migrated "$SOURCE" "$1" "$last" || return 1
    SOURCE=$1
    SOURCE_VF=$2
}

scenario_live_unix() {
    SCEN=live-migration
    from=$SOURCE
    migrate_to dst2 "$VF_B" "$LMEM_B" "unix:$RUN/mig2.sock" || return 1
    # Both sides offer VRAM pre-copy; the source asks the VF's VFIO fd
    # for its LMEM BAR (BAR 2). The stand-in's VFs are qemu nvme VFs,
    # which have none (their LMEM is an ivshmem BAR of the guest), so
    # VRAM goes in stop-copy, and the log says so.
    line=$(since_send "$from" | grep -a 'LMEM BAR' | tail -n 1 | sed 's/.* -- //' | cut -c1-200)
    case "$line" in
    *"no readable LMEM BAR: VRAM goes in stop-copy"*) pass vram-precopy-without-lmem-bar "$line" ;;
    *) fail vram-precopy-without-lmem-bar "source log: '$line'" ;;
    esac
}

scenario_live_tcp() {
    SCEN=live-migration-tcp
    migrate_to dst3 "$VF_A" "$LMEM_A" "tcp:127.0.0.1:6003"
}

# The destination dies inside the device-state phase (a relay kills it).
scenario_destination_killed() {
    SCEN=destination-killed
    start_receiver dst4 "$VF_B" "$LMEM_B" "unix:$RUN/mig4.sock" || {
        fail receiver "destination not listening"
        diag dst4
        return 1
    }
    mkdir -p "$RUN/relay4"
    "$RELAY" --listen "$RUN/relay4.sock" --to "$RUN/mig4.sock" --cut-at device-state \
        --cut-payload-bytes $((64 << 20)) --kill-pid "$(pid_of dst4)" \
        --report "$RUN/relay4/report.json" --timeout-s "$MIGRATION_WAIT" \
        >"$RUN/relay4/relay.log" 2>&1 &
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
        fail source-reports-failure "outcome '$(outcome "$SOURCE")' although the destination was killed"
        return 1
    fi
    wait_until 10 test -s "$RUN/relay4/report.json"
    if grep -q '"command": "DeviceState"' "$RUN/relay4/report.json" &&
        grep -q '"killed_pid": [0-9]' "$RUN/relay4/report.json"; then
        pass cut "destination killed inside DeviceState: $(tr -d '\n ' <"$RUN/relay4/report.json" | grep -o '"cut":{[^}]*}')"
    else
        fail cut "the relay did not reach DeviceState: $(tr -d '\n ' <"$RUN/relay4/report.json" | cut -c1-300)"
        return 1
    fi
    if wait_until 10 eval "! alive dst4"; then pass destination-dead; else
        fail destination-dead "destination VMM still alive"
        return 1
    fi
    survived "$SOURCE" || return 1
}

# A destination VF whose PF reports another device id: refused at Config,
# before the source pauses.
scenario_incompatible_destination() {
    SCEN=incompatible-destination
    start_receiver dst5 "$VF_C" "$LMEM_C" "unix:$RUN/mig5.sock" || {
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
        fail refused "migration to VF C ($(cat "$PCI/$VF_C/vendor"):$(cat "$PCI/$VF_C/device")) completed"
        diag "$SOURCE" dst5
        return 1
    fi
    if [ "$paused" = 0 ]; then pass refused-before-pause; else
        fail refused-before-pause "the source paused $paused time(s) before the refusal"
        return 1
    fi
    survived "$SOURCE" || return 1
    stop_vmm dst5
}

# Upstream: the snapshot restored onto VF C, whose PF reports another
# device id: the stand-in refuses the descriptor (-ENODEV, as xe), the
# restore fails.
scenario_incompatible_restore() {
    SCEN=incompatible-restore
    snap2=$RUN/snap-c
    rm -rf "$snap2" && cp -r "$SNAP" "$snap2"
    sed -i "s#$PCI/$VF_A#$PCI/$VF_C#g" "$snap2/config.json"
    start_vmm rst5 "$LMEM_C" --restore "source_url=file://$snap2" 
    if wait_until "$API_WAIT" eval "! alive rst5 || state_is rst5 Paused" && ! state_is rst5 Paused; then
        pass refused "$(exit_reason rst5)"
    else
        fail refused "restore onto VF C: state '$(vm_state rst5)'"
        stop_vmm rst5
        return 1
    fi
    if standin_log | grep -a -q "devid mismatch"; then
        pass devid-mismatch "$(standin_log | grep -a 'devid mismatch' | tail -n 1 | sed 's/.*VF/VF/')"
    else
        fail devid-mismatch "the stand-in logged no devid mismatch"
        return 1
    fi
    stop_vmm rst5
    rm -rf "$snap2"
}

# ------------------------------------------------------------------- setup

setup_fail() {
    echo "$TAG CHECK l1/$1 fail $2"
    dmesg | grep -a -i -E 'standin|xe-vfio|vfio|iommu|DMAR|nvme|pci' | tail -n 30
    exit 1
}

setup() {
    insmod /lib/modules/xe_pf_standin.ko \
        "lmem=$PF_A@$LMEM_A,$PF_B@$LMEM_B,$PF_C@$LMEM_C" vram_chunk_mb=$VRAM_CHUNK_MB ||
        setup_fail xe-modules "insmod xe_pf_standin.ko failed"
    insmod /lib/modules/xe-vfio-pci.ko dyndbg=+p || setup_fail xe-modules "insmod xe-vfio-pci.ko failed"
    [ -e /dev/iommu ] || setup_fail xe-modules "/dev/iommu missing"
    [ -d /sys/kernel/iommu_groups/0 ] || setup_fail xe-modules "no IOMMU groups: qemu's IOMMU is not in use"
    echo "$TAG CHECK l1/xe-modules pass xe_pf_standin, xe-vfio-pci ($(modinfo -F description /lib/modules/xe-vfio-pci.ko 2>/dev/null)), $(ls /sys/kernel/iommu_groups | wc -l) IOMMU groups"
    for pair in "$PF_A:$VF_A" "$PF_B:$VF_B" "$PF_C:$VF_C"; do
        pf=${pair%%:0000*}
        vf=${pair#"$pf":}
        echo xe_pf_standin >"$PCI/$pf/driver_override"
        echo "$pf" >/sys/bus/pci/drivers_probe 2>/dev/null
        [ "$(basename "$(readlink "$PCI/$pf/driver")")" = xe_pf_standin ] ||
            setup_fail xe-vfs "$pf is not bound to xe_pf_standin"
        echo 1 >"$PCI/$pf/sriov_numvfs" || setup_fail xe-vfs "sriov_numvfs of $pf"
        wait_until 10 test -e "$PCI/$vf" || setup_fail xe-vfs "VF $vf did not appear"
        [ -e "$PCI/$vf/physfn" ] || setup_fail xe-vfs "$vf is not a VF (no physfn)"
        if [ -e "$PCI/$vf/driver" ]; then
            echo "$vf" >"$PCI/$vf/driver/unbind"
        fi
        echo xe-vfio-pci >"$PCI/$vf/driver_override"
        echo "$vf" >/sys/bus/pci/drivers_probe 2>/dev/null
        [ "$(basename "$(readlink "$PCI/$vf/driver")")" = xe-vfio-pci ] ||
            setup_fail xe-vfs "$vf is not bound to xe-vfio-pci"
        cdev_of "$vf" >/dev/null || setup_fail xe-vfs "$vf has no VFIO cdev"
    done
    echo "$TAG CHECK l1/xe-vfs pass $(for vf in $VF_A $VF_B $VF_C; do
        printf '%s %s:%s group %s %s; ' "$vf" "$(cat "$PCI/$vf/vendor")" "$(cat "$PCI/$vf/device")" \
            "$(basename "$(readlink "$PCI/$vf/iommu_group")")" "$(cdev_of "$vf")"
    done)"
    echo "$TAG NOTE l1 stand-in: $(standin_log | grep -a 'STAND-IN' | sed 's/.*xe_pf_standin //' | tr '\n' ';' | cut -c1-600)"
    # Our host tooling sees the driver as it is.
    out=$("$XE_VF_MIG" host list "$VF_A" 2>&1)
    if echo "$out" | grep -q xe-vfio-pci && echo "$out" | grep -q 'STOP_COPY' && echo "$out" | grep -q 'P2P' &&
        ! echo "$out" | grep -q 'PRE_COPY'; then
        echo "$TAG CHECK l1/xe-host-list pass $(echo "$out" | tr '\n' ' ' | cut -c1-600)"
    else
        echo "$TAG CHECK l1/xe-host-list fail $(echo "$out" | tr '\n' ' ' | cut -c1-600)"
        return 1
    fi
    out=$("$XE_VF_MIG" host check "$VF_A" 2>&1)
    rc=$?
    migration=$(echo "$out" | grep -E '(^| )migration' | head -n 1)
    dirty=$(echo "$out" | grep -E 'dirty-tracking' | head -n 1)
    if echo "$migration" | grep -q 'STOP_COPY' && echo "$migration" | grep -q 'P2P' &&
        echo "$dirty" | grep -q 'device DMA logging: no'; then
        echo "$TAG CHECK l1/xe-host-check pass exit $rc; $migration; $dirty; $(echo "$out" | grep -i -E 'pf|driver' | head -n 3 | tr '\n' ';')"
    else
        echo "$TAG CHECK l1/xe-host-check fail exit $rc: $(echo "$out" | tr '\n' ' ' | cut -c1-800)"
        return 1
    fi
}

# -------------------------------------------------------------------- main

if [ "$FLAVOR" = setup ]; then
    setup
    exit $?
fi
case "$FLAVOR" in upstream | patched) ;; *)
    echo "$TAG CHECK $FLAVOR/setup/flavour fail unknown flavour '$FLAVOR'"
    exit 1
    ;;
esac
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
if scenario_boot && scenario_snapshot_restore; then
    if [ "$FLAVOR" = patched ]; then
        scenario_live_unix && scenario_live_tcp && scenario_destination_killed &&
            scenario_incompatible_destination
    else
        scenario_live_refused
        scenario_incompatible_restore
    fi
fi
for d in "$RUN"/*/; do
    [ -f "$d/pid" ] && stop_vmm "$(basename "$d")"
done
value "arcs" "$(standin_log | grep -a -o -E 'VF[0-9]+ [a-z_]+( \(stop\))? = -?[0-9]+' | sed 's/^VF[0-9]* //' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
# The driver's own arcs (dev_dbg, dynamic debug on), since L1 booted.
value "driver_arcs_since_boot" "$(dmesg | grep -a -o 'xe-vfio-pci [0-9a-f:.]*: state: [a-z_0-9]*->[a-z_0-9]*' |
    sed 's/.*state: //' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
value "scenarios_seconds" "$(since "$flavor_started")"
exit "$FAILS"
