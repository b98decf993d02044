#!/usr/bin/env bash
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# End to end with the real Cloud Hypervisor, a real guest and a real kernel
# VFIO device, on a machine whose own /dev/kvm cannot run guests:
#
#   L0 (this host)  qemu TCG, -cpu EPYC,+svm,+npt: qemu emulates AMD SVM with
#                   nested paging, so KVM works inside
#   L1              our kernel (scripts/nested/prepare.sh) with KVM, VFIO,
#                   IOMMUFD, mtty and mtty_nolog; runs scenarios.sh, which
#                   drives the real cloud-hypervisor through the real
#                   ch-remote
#   L2              a guest with an mtty mdev passed through, printing a
#                   tick line every second
#
# Suites (--suite): `mtty` (the above, tests/nested/tests/cloud_hypervisor.rs)
# and `xe` (tests/nested/tests/xe_vfio_pci.rs): L1 is a q35 machine with
# qemu's IOMMU, three nvme functions with SR-IOV standing in for Xe PFs
# and three ivshmem-plain devices holding their VFs' "VRAM"; it loads the
# real xe-vfio-pci (built from the L1 kernel's tree) and our PF stand-in
# xe_pf_standin, binds a VF of each PF to xe-vfio-pci and runs
# scenarios-xe.sh: the L2 guest writes and checks a pattern over its VRAM
# BAR while Cloud Hypervisor snapshots, restores and migrates it.
#
# Flavours: `upstream` always; `patched` (our series, issue 10) according to
# --patched: `off`; `auto` runs it when vmm-glue/cloud-hypervisor/patches
# holds a series (a failing build then fails the test); `require` fails
# when it cannot run. tests/nested/tests/cloud_hypervisor.rs chooses.
#
# Output: the L1 lines the test reads ("XE-NESTED: CHECK ...", "VALUE",
# "RESULT") on stdout, progress on stderr. Exit status 0 only if every
# step passed and L1 printed "XE-NESTED: RESULT pass".
#
# Usage: scripts/nested/run.sh [--suite mtty|xe] [--patched off|auto|require]
#            [--timeout SECONDS]
# Environment: XE_NESTED_SUITE, XE_NESTED_PATCHED, XE_NESTED_TIMEOUT (default 1800),
#   XE_NESTED_CH_UPSTREAM / XE_NESTED_CH_PATCHED (a directory holding
#   cloud-hypervisor and ch-remote to use instead of building them),
#   XE_NESTED_CPU (qemu -cpu, default EPYC,+svm,+npt), XE_NESTED_STALL
#   (seconds without a line from L1 before it is stopped, default 120),
#   XE_NESTED_STALL_RETRIES (boots after a stalled one, default 1),
#   XE_NESTED_VRAM_MIB (the xe suite's VRAM per VF, default 256),
#   XE_NESTED_XE_MEM (the xe suite's L1 memory, MiB, default 4096),
#   XE_CACHE_DIR (see prepare.sh), CARGO_TARGET_DIR.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CARGO_OUT="${CARGO_TARGET_DIR:-$REPO/target}"
SUITE="${XE_NESTED_SUITE:-mtty}"
# The xe suite's VRAM per VF, MiB (a power of two: ivshmem's BAR).
XE_NESTED_VRAM_MIB="${XE_NESTED_VRAM_MIB:-256}"
PATCHED="${XE_NESTED_PATCHED:-auto}"
TIMEOUT="${XE_NESTED_TIMEOUT:-1800}"
CPU="${XE_NESTED_CPU:-EPYC,+svm,+npt}"
STALL="${XE_NESTED_STALL:-120}"
TAG="XE-NESTED:"

log() { echo "[nested] $*" >&2; }
die() {
    echo "[nested] ERROR: $*" >&2
    echo "$TAG RESULT fail"
    exit 1
}
usage() {
    sed -n '/^# Usage:/,/^#   XE_CACHE_DIR/p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
    --suite) SUITE=${2:?--suite needs a value}; shift 2 ;;
    --patched) PATCHED=${2:?--patched needs a value}; shift 2 ;;
    --timeout) TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
    -h | --help) usage ;;
    *) echo "unknown argument '$1'" >&2; usage ;;
    esac
done
case "$PATCHED" in off | auto | require) ;; *) die "--patched: '$PATCHED' is not off, auto or require" ;; esac
case "$SUITE" in
mtty) WORK="$REPO/target/nested" ;;
xe) WORK="$REPO/target/nested-xe" ;;
*) die "--suite: '$SUITE' is not mtty or xe" ;;
esac

TIMINGS=()
now() { date +%s.%N; }
phase_done() {
    local t
    t=$(awk -v a="$2" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    TIMINGS+=("\"$1\":$t")
    log "phase $1 took ${t}s"
}

# ------------------------------------------------------- cloud-hypervisor

declare -A CH_DIR=()

# The flavour's binaries: a directory the user names, else the build
# script's (cached) output.
ch_binaries() {
    local flavor=$1 given=$2
    if [ -n "$given" ]; then
        if [ ! -x "$given/cloud-hypervisor" ] || [ ! -x "$given/ch-remote" ]; then
            die "$given holds no cloud-hypervisor and ch-remote"
        fi
        log "$flavor: using $given"
        CH_DIR[$flavor]=$given
        return 0
    fi
    CH_DIR[$flavor]=$("$REPO/scripts/build-cloud-hypervisor.sh" --flavor "$flavor" --print-dir) ||
        die "building the $flavor cloud-hypervisor failed"
}

build_ch() {
    FLAVORS=(upstream)
    ch_binaries upstream "${XE_NESTED_CH_UPSTREAM:-}"
    local series=0
    compgen -G "$REPO/vmm-glue/cloud-hypervisor/patches/*.patch" >/dev/null && series=1
    [ -n "${XE_NESTED_CH_PATCHED:-}" ] && series=1
    case "$PATCHED:$series" in
    off:*) log "patched flavour switched off (--patched off)" ;;
    auto:0) log "patched flavour skipped: no series in vmm-glue/cloud-hypervisor/patches yet" ;;
    require:0) die "--patched require, but vmm-glue/cloud-hypervisor/patches holds no series" ;;
    *)
        ch_binaries patched "${XE_NESTED_CH_PATCHED:-}"
        FLAVORS+=(patched)
        ;;
    esac
}

# -------------------------------------------------------------- our tools

build_tools() {
    log "cargo build --release (xe-vf-mig, xe-nested-relay, xe-nested-vram)"
    (cd "$REPO" && cargo build -q --release -p xe-vf-plugin --bin xe-vf-mig \
        -p xe-vf-nested-test --bin xe-nested-relay --bin xe-nested-vram >&2) ||
        die "cargo build failed"
    XE_VF_MIG="$CARGO_OUT/release/xe-vf-mig"
    RELAY="$CARGO_OUT/release/xe-nested-relay"
    VRAM_TOOL="$CARGO_OUT/release/xe-nested-vram"
}

# ---------------------------------------------------------- L1 initramfs

# Certificates for the TLS migrations (mutual TLS, as CH's tls_dir wants):
# a CA made for this run, the receiver's certificate for 127.0.0.1 in
# $1/server (server-cert.pem, server-key.pem, ca-cert.pem), the sender's in
# $1/client (client-cert.pem, client-key.pem, ca-cert.pem). P-256 keys:
# the handshakes run under emulation.
make_tls_certs() {
    local dir=$1 tmp
    command -v openssl >/dev/null || die "openssl is needed to make the TLS test certificates"
    tmp=$(mktemp -d)
    mkdir -p "$dir/server" "$dir/client"
    {
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj "/CN=xe-nested test CA" -keyout "$tmp/ca-key.pem" -out "$tmp/ca-cert.pem" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
        local role cn ext
        for role in server client; do
            if [ "$role" = server ]; then
                cn=127.0.0.1
                ext="subjectAltName=IP:127.0.0.1
extendedKeyUsage=serverAuth"
            else
                cn="xe-nested migration source"
                ext="extendedKeyUsage=clientAuth"
            fi
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$cn" \
                -keyout "$dir/$role/$role-key.pem" -out "$tmp/$role.csr"
            printf '%s\nbasicConstraints=CA:FALSE\n' "$ext" >"$tmp/$role.ext"
            openssl x509 -req -days 2 -in "$tmp/$role.csr" -CA "$tmp/ca-cert.pem" \
                -CAkey "$tmp/ca-key.pem" -CAcreateserial -extfile "$tmp/$role.ext" \
                -out "$dir/$role/$role-cert.pem"
            cp "$tmp/ca-cert.pem" "$dir/$role/ca-cert.pem"
        done
    } >"$WORK/openssl.log" 2>&1 || die "making the TLS test certificates failed (see $WORK/openssl.log)"
    rm -rf "$tmp"
}

# Copies a binary and the shared libraries it loads into a staging root:
# stage_binary BINARY DEST [ROOT] (ROOT defaults to L1's, $STAGE).
stage_binary() {
    local bin=$1 dest=$2 root=${3:-$STAGE} lib
    mkdir -p "$root$(dirname "$dest")"
    cp "$bin" "$root$dest"
    for lib in $(ldd "$bin" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' || true); do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

# The L2 guest of the xe suite: busybox, l2-xe-init.sh and xe-nested-vram
# with its libraries, uncompressed (CH boots it as it is).
build_l2_xe_initramfs() {
    local root="$WORK/l2-root"
    rm -rf "$root"
    mkdir -p "$root"/{bin,dev,proc,sys}
    cp "$NESTED_BUSYBOX" "$root/bin/busybox"
    install -m 0755 "$HERE/l2-xe-init.sh" "$root/init"
    stage_binary "$VRAM_TOOL" /bin/xe-nested-vram "$root"
    chmod 0755 "$root/bin/busybox"
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$1"
}

build_l1_initramfs() {
    STAGE="$WORK/l1-root"
    L1_INITRD="$WORK/l1.cpio"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"/{bin,dev,proc,sys,tmp,run,lib/modules,nested/bin,nested/l2}
    cp "$NESTED_BUSYBOX" "$STAGE/bin/busybox"
    chmod 0755 "$STAGE/bin/busybox"
    install -m 0755 "$HERE/l1-init.sh" "$STAGE/init"
    cp "$NESTED_KERNEL_DIR/vmlinux" "$STAGE/nested/l2/vmlinux"
    if [ "$SUITE" = xe ]; then
        install -m 0755 "$HERE/scenarios-xe.sh" "$STAGE/nested/scenarios-xe.sh"
        cp "$NESTED_XE_MODULES_DIR"/{xe_pf_standin,xe-vfio-pci}.ko "$STAGE/lib/modules/"
        build_l2_xe_initramfs "$STAGE/nested/l2/initrd-xe.cpio"
        stage_binary "$VRAM_TOOL" /nested/bin/xe-nested-vram
    else
        install -m 0755 "$HERE/scenarios.sh" "$STAGE/nested/scenarios.sh"
        cp "$NESTED_KERNEL_DIR"/{mdev,mtty,mtty_nolog}.ko "$STAGE/lib/modules/"
        cp "$NESTED_L2_INITRD" "$STAGE/nested/l2/initrd.cpio.gz"
        make_tls_certs "$STAGE/nested/tls"
    fi
    local flavor
    for flavor in "${FLAVORS[@]}"; do
        stage_binary "${CH_DIR[$flavor]}/cloud-hypervisor" "/nested/$flavor/cloud-hypervisor"
        stage_binary "${CH_DIR[$flavor]}/ch-remote" "/nested/$flavor/ch-remote"
    done
    stage_binary "$XE_VF_MIG" /nested/bin/xe-vf-mig
    stage_binary "$RELAY" /nested/bin/xe-nested-relay
    # Uncompressed: L1 unpacks it under emulation, where gzip is slow.
    (cd "$STAGE" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$L1_INITRD"
    log "L1 initramfs $(du -h "$L1_INITRD" | cut -f1)"
}

# ------------------------------------------------------------------ boot

# What qemu says about the vCPU of a stalled L1 (registers, halted or not,
# local APIC), kept in stall.txt.
monitor_dump() {
    local cmd
    timeout 10 cat "$MONITOR.out" &
    local reader=$!
    for cmd in "info status" "info cpus" "info registers" "info lapic" "info pic"; do
        echo "$cmd" >"$MONITOR.in"
        sleep 1
    done
    wait "$reader"
}

boot_l1() {
    SERIAL_LOG="$WORK/serial.log"
    KERNEL_LOG="$WORK/kernel.log"
    MONITOR="$WORK/monitor"
    rm -f "$SERIAL_LOG" "$KERNEL_LOG" "$MONITOR.in" "$MONITOR.out"
    # qemu's human monitor on two FIFOs, to ask it about a stalled L1.
    mkfifo "$MONITOR.in" "$MONITOR.out"
    local flavors
    flavors=$(
        IFS=,
        echo "${FLAVORS[*]}"
    )
    # The xe suite's machine: q35 with qemu's IOMMU (an L1 VF goes to L2
    # through VFIO), per PF an nvme function with one SR-IOV VF (qemu 7.2's
    # only device with SR-IOV; its VF is what xe-vfio-pci binds, and it is
    # a real VF: is_virtfn, pci_iov_vf_id) and an ivshmem-plain device
    # whose BAR 2 holds that VF's LMEM. PFs A and B report Intel's ids
    # (use-intel-id: 8086:5845), so their VFs are what the patched engine
    # takes for Xe VFs (Intel, on xe-vfio-pci): it parses their stream in
    # flight. PF C keeps qemu's (1b36:0010): another device id in its
    # descriptor and other PCI ids, the incompatible destination.
    local machine=() append=""
    if [ "$SUITE" = xe ]; then
        machine=(-machine q35 -device intel-iommu,aw-bits=48 -m "${XE_NESTED_XE_MEM:-4096}")
        local pf lmem_addr n=0 extra
        for pf in a b c; do
            extra=""
            [ "$pf" = c ] || extra=",use-intel-id=on"
            lmem_addr=$((8 + n))
            machine+=(-device "nvme-subsys,id=subsys_$pf,nqn=xe-standin-$pf"
                -device "nvme,serial=xe-standin-$pf,subsys=subsys_$pf,addr=0x$((4 + n)),sriov_max_vfs=1,sriov_vq_flexible=2,sriov_vi_flexible=1,max_ioqpairs=4,msix_qsize=3$extra"
                -object "memory-backend-ram,id=lmem_$pf,size=${XE_NESTED_VRAM_MIB}M,share=on"
                -device "ivshmem-plain,memdev=lmem_$pf,addr=0x$(printf %x "$lmem_addr")")
            n=$((n + 1))
        done
        # qemu's IOMMU on TCG remaps no interrupts, so MSIs are not
        # isolated: iommufd and type1 refuse to bind (EPERM) unless told
        # that this test machine accepts it.
        append=" intel_iommu=on iommufd.allow_unsafe_interrupts=1 vfio_iommu_type1.allow_unsafe_interrupts=1"
        append+=" xe_nested.suite=xe xe_nested.vram_mib=$XE_NESTED_VRAM_MIB"
    else
        machine=(-m 2048)
    fi
    log "booting L1 (qemu TCG, -cpu $CPU, suite $SUITE) for flavour(s) $flavors, timeout ${TIMEOUT}s, serial log $SERIAL_LOG, kernel log $KERNEL_LOG"
    QEMU_RC=0
    STALLED=0
    # -smp 1: multi-threaded TCG with 2 vCPUs was slower for this load.
    # tsc=unstable: built-in KVM records the TSC rate before the kernel
    # refines it; without it some restores fail in KVM_SET_TSC_KHZ.
    # ttyS0 carries the test's lines, ttyS1 the kernel's console.
    # highres=off: a periodic LAPIC tick (the kernel has HZ_PERIODIC,
    # but high-resolution timers drive even that tick one-shot). With the one-shot timer,
    # qemu 7.2's TCG now and then leaves the halted vCPU asleep with the
    # timer's vector pending in IRR (stall.txt: HLT=1, IF=1, IRR 236,
    # timer current_count 0) and nothing re-arms it; a periodic timer
    # raises it again every tick, which wakes the vCPU.
    timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 \
        -accel tcg -cpu "$CPU" "${machine[@]}" -smp 1 \
        -nodefaults -display none -no-reboot \
        -serial "file:$SERIAL_LOG" -serial "file:$KERNEL_LOG" -monitor "pipe:$MONITOR" \
        -kernel "$NESTED_KERNEL_DIR/bzImage" -initrd "$L1_INITRD" \
        -append "console=ttyS1 panic=-1 tsc=unstable highres=off xe_nested.flavors=$flavors$append" \
        </dev/null >"$WORK/qemu.log" 2>&1 &
    local pid=$! size last=-1 quiet=0
    # L1 prints a heartbeat every 15 s: silence means it stopped.
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        size=$(stat -c %s "$SERIAL_LOG" 2>/dev/null || echo 0)
        if [ "$size" = "$last" ]; then
            quiet=$((quiet + 5))
        else
            quiet=0
            last=$size
        fi
        if [ "$quiet" -ge "$STALL" ]; then
            log "L1 printed nothing for ${STALL}s: stopping it"
            STALLED=1
            monitor_dump >"$WORK/stall.txt" 2>&1
            kill "$pid" 2>/dev/null # timeout passes the signal on to qemu
            break
        fi
    done
    wait "$pid" || QEMU_RC=$?
}

report() {
    local lines results fails
    lines=$(grep -a "^$TAG " "$SERIAL_LOG" 2>/dev/null | grep -v "^$TAG ALIVE " | tr -d '\r' || true)
    [ -n "$lines" ] && echo "$lines"
    (
        IFS=,
        echo "$TAG HOST {\"seconds\":{${TIMINGS[*]}},\"flavors\":\"${FLAVORS[*]}\",\"suite\":\"$SUITE\"}"
    )
    results=$(grep -c "^$TAG RESULT " <<<"$lines" || true)
    fails=$(grep -c "^$TAG CHECK [^ ]* fail" <<<"$lines" || true)
    if [ "$results" = 1 ] && grep -q "^$TAG RESULT pass$" <<<"$lines" && [ "$fails" = 0 ]; then
        log "PASS (flavours: ${FLAVORS[*]})"
        return 0
    fi
    if [ "$STALLED" = 1 ]; then
        log "FAIL: L1 stalled: no output (not even its heartbeat) for ${STALL}s"
    elif [ "$QEMU_RC" = 124 ] || [ "$QEMU_RC" = 137 ]; then
        log "FAIL: L1 did not finish within ${TIMEOUT}s and was killed"
    elif [ "$results" = 0 ]; then
        log "FAIL: L1 printed no RESULT line (qemu exit status $QEMU_RC)"
    else
        log "FAIL: $fails failed step(s)"
    fi
    log "last lines of $SERIAL_LOG:"
    tail -n 80 "$SERIAL_LOG" 2>/dev/null | tr -d '\r' >&2 || true
    if [ "$STALLED" = 1 ]; then
        log "qemu's view of the stalled L1 (also in $WORK/stall.txt):"
        grep -aE 'VM status|CPU #|RIP=|LVTT|Timer|ISR|IRR' "$WORK/stall.txt" | head -n 20 >&2 || true
    fi
    log "last lines of $KERNEL_LOG:"
    tail -n 40 "$KERNEL_LOG" 2>/dev/null | tr -d '\r' >&2 || true
    [ -s "$WORK/qemu.log" ] && { log "qemu said:"; cat "$WORK/qemu.log" >&2; }
    [ "$results" = 0 ] && echo "$TAG RESULT fail"
    return 1
}

main() {
    local t env_lines
    mkdir -p "$WORK"
    t=$(now)
    env_lines=$("$HERE/prepare.sh") || die "preparation failed"
    eval "$env_lines"
    phase_done prepare "$t"

    t=$(now)
    build_ch
    phase_done cloud_hypervisor "$t"

    t=$(now)
    build_tools
    build_l1_initramfs
    phase_done tools_and_initramfs "$t"

    t=$(now)
    boot_l1
    phase_done l1_run "$t"
    # A stalled L1 is qemu's emulation stopping, not a failed check: boot
    # it once more (every scenario from the start), saying so.
    local retries="${XE_NESTED_STALL_RETRIES:-1}"
    while [ "$STALLED" = 1 ] && [ "$retries" -gt 0 ]; do
        retries=$((retries - 1))
        cp "$WORK/stall.txt" "$WORK/stall-before-retry.txt"
        cp "$SERIAL_LOG" "$WORK/serial-before-retry.log"
        log "L1 stalled (qemu's view in $WORK/stall-before-retry.txt); booting it again, every scenario from the start"
        echo "$TAG NOTE L1 stalled and was booted again"
        t=$(now)
        boot_l1
        phase_done l1_retry "$t"
    done
    report
}

main "$@"
