#!/usr/bin/env bash
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# "Hardware truth" test: boots a stock Debian kernel (6.12 by default) under
# qemu TCG and runs the guest test binary (crate xe-vf-kernel-test) against
# two instances of the kernel's sample mdev driver mtty, which implements
# VFIO migration v2 (STOP_COPY, P2P, PRE_COPY) since Linux 6.7.
#
# Everything comes from Debian packages, unpacked with `dpkg -x` under
# <repo>/target/real-kernel (no kernel is installed on the host); mtty.ko is
# built out of tree against the unpacked headers. Downloads, unpacking and
# the module build are cached with stamp files, so a second run only
# rebuilds the test binary and the initramfs and boots.
#
# Usage: scripts/real-kernel-test.sh
# Environment:
#   XE_KERNEL_SERIES        kernel series to look for (default 6.12)
#   XE_KERNEL_ABI           exact Debian kernel ABI, e.g. 6.12.117+deb12
#   XE_KERNEL_BOOT_TIMEOUT  seconds before the guest is killed (default 600)
#   XE_KERNEL_REFRESH=1     forget the pinned kernel and resolve it again
# Exit status: 0 only if the guest printed "XE-VF-KERNEL-TEST: RESULT pass".

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(git -C "$SCRIPT_DIR" rev-parse --show-toplevel 2>/dev/null || (cd "$SCRIPT_DIR/.." && pwd))
WORK="$REPO/target/real-kernel"
CARGO_OUT="${CARGO_TARGET_DIR:-$REPO/target}"
SERIES="${XE_KERNEL_SERIES:-6.12}"
MIN_SERIES=6.7 # first kernel whose mtty implements VFIO migration
BOOT_TIMEOUT="${XE_KERNEL_BOOT_TIMEOUT:-600}"
TAG="XE-VF-KERNEL-TEST:"
# Kernel modules the guest needs besides mtty (dependencies are added).
GUEST_MODULES=(vfio vfio_iommu_type1 mdev)

log() { echo "[real-kernel] $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
now() { date +%s.%N; }
# Prints "<phase>: <seconds>" and remembers it for the summary.
TIMINGS=()
phase_done() {
    local t
    t=$(awk -v a="$2" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    TIMINGS+=("$1=${t}s")
    log "phase $1 took ${t}s"
}
is_root() { [ "$(id -u)" = 0 ]; }

# ---------------------------------------------------------------- host tools

# Installs missing host tools (root only); the kernel itself is never installed.
ensure_tools() {
    local -a missing=()
    local tool pkg
    for pair in qemu-system-x86_64:qemu-system-x86 make:make xz:xz-utils gzip:gzip \
        dpkg:dpkg apt-get:apt apt-cache:apt awk:gawk; do
        tool=${pair%%:*}
        pkg=${pair#*:}
        command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        is_root || die "missing host packages: ${missing[*]} (run as root or install them)"
        log "installing host tools: ${missing[*]}"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
    command -v "${CARGO:-cargo}" >/dev/null 2>&1 || die "cargo not found"
}

# Installs the exact compiler the kernel headers name (e.g. gcc-12), root only.
ensure_compiler() {
    local cc=$1
    command -v "$cc" >/dev/null 2>&1 && return 0
    is_root || die "$cc not found (install package ${cc#x86_64-linux-gnu-})"
    log "installing ${cc#x86_64-linux-gnu-}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${cc#x86_64-linux-gnu-}" >&2
}

# ------------------------------------------------------- kernel resolution

# Lists "series abi" for every amd64 unsigned image apt knows, e.g.
# "6.12 6.12.117+deb12" (bookworm-security naming) or "6.1 6.1.0-28".
list_kernel_abis() {
    apt-cache pkgnames linux-image-6 2>/dev/null |
        grep -E '^linux-image-6\.[0-9]+[.-].*-amd64-unsigned$' |
        grep -vE -- '-(cloud|rt)-amd64-unsigned$' |
        sed -E 's/^linux-image-(6\.[0-9]+)([.-].*)-amd64-unsigned$/\1 \1\2/' |
        sort -V
}

# Picks the newest ABI of $SERIES, else the newest of the series closest to
# it that is >= $MIN_SERIES.
pick_kernel_abi() {
    local abis best
    abis=$(list_kernel_abis)
    best=$(awk -v s="$SERIES" '$1 == s { a = $2 } END { print a }' <<<"$abis")
    if [ -z "$best" ]; then
        best=$(awk -v want="$SERIES" -v min="$MIN_SERIES" '
            function minor(v) { split(v, p, "."); return p[2] + 0 }
            minor($1) >= minor(min) {
                d = minor($1) - minor(want); if (d < 0) d = -d
                if (best == "" || d < bd || (d == bd && minor($1) >= minor(bs))) { best = $2; bd = d; bs = $1 }
            }
            END { print best }' <<<"$abis")
        [ -n "$best" ] && log "NOTE: no linux-image-$SERIES in apt; using closest >= $MIN_SERIES: $best"
    fi
    echo "$best"
}

# Field of an apt package record.
apt_field() { apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n "s/^$2: //p" | head -n 1; }

# Resolves (once, then pinned in kernel.env) the package set to use.
resolve_kernel() {
    local env_file="$WORK/kernel.env"
    if [ -n "${XE_KERNEL_REFRESH:-}" ]; then rm -f "$env_file"; fi
    if [ -f "$env_file" ] && { [ -z "${XE_KERNEL_ABI:-}" ] || grep -qx "ABI=${XE_KERNEL_ABI}" "$env_file"; }; then
        # shellcheck source=/dev/null
        . "$env_file"
        return 0
    fi
    # Fresh lists, so the pin names an upload the mirror still has.
    if is_root; then
        log "apt-get update"
        apt-get update -q >&2
    else
        log "NOTE: not root, resolving against apt's current lists"
    fi
    local abi="${XE_KERNEL_ABI:-}"
    [ -n "$abi" ] || abi=$(pick_kernel_abi)
    [ -n "$abi" ] || die "no linux-image-6.x (>= $MIN_SERIES) amd64 package in apt; on bookworm enable bookworm-security or bookworm-backports"
    local image="linux-image-$abi-amd64-unsigned"
    local version depends headers_common kbuild series
    version=$(apt_field "$image" Version)
    [ -n "$version" ] || die "$image not available"
    depends=$(apt_field "linux-headers-$abi-amd64" Depends)
    headers_common=$(grep -oE 'linux-headers-[^ ,]+-common' <<<"$depends" | head -n 1)
    kbuild=$(grep -oE 'linux-kbuild-[^ ,]+' <<<"$depends" | head -n 1)
    if [ -z "$headers_common" ] || [ -z "$kbuild" ]; then
        die "cannot read the dependencies of linux-headers-$abi-amd64"
    fi
    series=$(sed -E 's/^(6\.[0-9]+).*/\1/' <<<"$abi")
    local source="linux-source-$series"
    # Prefer the source of the very same upload; mtty.c is what matters.
    local source_spec="$source=$version"
    if ! apt-cache show "$source_spec" >/dev/null 2>&1; then
        log "NOTE: $source $version not in apt; using its candidate version"
        source_spec="$source"
    fi
    mkdir -p "$WORK"
    cat >"$env_file" <<EOF
ABI=$abi
SERIES=$series
VERSION=$version
PACKAGES="$image=$version linux-headers-$abi-amd64=$version $headers_common=$version $kbuild=$version $source_spec busybox-static"
EOF
    # shellcheck source=/dev/null
    . "$env_file"
}

# ---------------------------------------------------------- download/unpack

download_packages() {
    local stamp="$WORK/stamps/download-$ABI"
    [ -f "$stamp" ] && return 0
    mkdir -p "$WORK/debs" "$WORK/stamps"
    log "downloading: $PACKAGES"
    # shellcheck disable=SC2086 # PACKAGES is a word list
    (cd "$WORK/debs" && apt-get download -q -o APT::Sandbox::User=root $PACKAGES >&2)
    touch "$stamp"
}

unpack_packages() {
    local stamp="$WORK/stamps/unpack-$ABI"
    ROOT="$WORK/root-$ABI"
    HEADERS="$ROOT/usr/src/linux-headers-$ABI-amd64"
    KREL="$ABI-amd64"
    [ -f "$stamp" ] && return 0
    rm -rf "$ROOT"
    mkdir -p "$ROOT"
    local deb name version spec
    for deb in "$WORK"/debs/*.deb; do
        name=$(dpkg-deb -f "$deb" Package)
        version=$(dpkg-deb -f "$deb" Version)
        # debs/ may hold other uploads from earlier pins: take only ours.
        for spec in $PACKAGES; do
            if [ "$spec" = "$name=$version" ] || [ "$spec" = "$name" ]; then
                log "unpacking $(basename "$deb")"
                dpkg -x "$deb" "$ROOT"
                break
            fi
        done
    done
    # The headers' Makefile includes the common tree by its installed path.
    sed -i -E "s|^include /usr/src/|include $ROOT/usr/src/|" "$HEADERS/Makefile"
    [ -f "$ROOT/boot/vmlinuz-$KREL" ] || die "vmlinuz-$KREL missing after unpack"
    touch "$stamp"
}

# -------------------------------------------------------------- mtty module

build_mtty() {
    local stamp="$WORK/stamps/mtty-$ABI"
    MTTY_DIR="$WORK/mtty-$ABI"
    [ -f "$stamp" ] && return 0
    local tarball
    tarball=$(ls "$ROOT"/usr/src/linux-source-*.tar.xz)
    rm -rf "$MTTY_DIR"
    mkdir -p "$MTTY_DIR"
    log "extracting samples/vfio-mdev/mtty.c from $(basename "$tarball")"
    tar -xJf "$tarball" -C "$MTTY_DIR" --wildcards --strip-components=3 '*/samples/vfio-mdev/mtty.c'
    echo 'obj-m := mtty.o' >"$MTTY_DIR/Kbuild"

    # Debian builds its kernels with a pinned gcc; use the same one.
    local cc_var cc want have
    cc_var=$(sed -n -E 's/^CC = .*\)(gcc-[0-9]+)$/\1/p' "$HEADERS/.kernelvariables")
    cc="x86_64-linux-gnu-${cc_var:-gcc}"
    ensure_compiler "$cc"
    want=$(sed -n -E 's/^CONFIG_CC_VERSION_TEXT="(.*)"/\1/p' "$HEADERS/.config")
    have=$("$cc" --version | head -n 1)
    if [ "$want" != "$have" ]; then
        log "NOTE: kernel built with '$want', building mtty with '$have'"
    fi
    log "building mtty.ko with $cc"
    # BTF for an out-of-tree sample is not needed and would need pahole.
    make -s -C "$HEADERS" M="$MTTY_DIR" CONFIG_DEBUG_INFO_BTF_MODULES= modules >&2
    local vermagic
    vermagic=$(modinfo_field "$MTTY_DIR/mtty.ko" vermagic)
    [ "${vermagic%% *}" = "$KREL" ] || die "mtty.ko vermagic '$vermagic' does not match $KREL"
    touch "$stamp"
}

# ------------------------------------------------------------------ modules

# One field of an uncompressed module's .modinfo (NUL-separated key=value).
modinfo_field() { tr '\0' '\n' <"$1" | sed -n "s/^$2=//p" | head -n 1; }

# Decompresses the guest modules and their dependencies into $MODULES_DIR
# and writes their load order (dependencies first) to $MODULES_DIR/load.
prepare_modules() {
    local stamp="$WORK/stamps/modules-$ABI"
    MODULES_DIR="$WORK/modules-$ABI"
    [ -f "$stamp" ] && return 0
    rm -rf "$MODULES_DIR"
    mkdir -p "$MODULES_DIR"
    declare -A files=()
    local f base
    while IFS= read -r f; do
        base=$(basename "$f")
        base=${base%%.ko*}
        files[${base//-/_}]=$f
    done < <(find "$ROOT/lib/modules/$KREL" -name '*.ko*')

    declare -A seen=()
    local -a order=()
    add_module() {
        local name=${1//-/_} src dep
        [ -n "${seen[$name]:-}" ] && return 0
        seen[$name]=1
        src=${files[$name]:-}
        [ -n "$src" ] || die "module $name not found in the kernel package"
        case "$src" in
            *.ko.xz) xz -dc "$src" >"$MODULES_DIR/$name.ko" ;;
            *.ko.zst) zstd -qdc "$src" >"$MODULES_DIR/$name.ko" ;;
            *.ko.gz) gzip -dc "$src" >"$MODULES_DIR/$name.ko" ;;
            *) cp "$src" "$MODULES_DIR/$name.ko" ;;
        esac
        for dep in $(modinfo_field "$MODULES_DIR/$name.ko" depends | tr ',' ' '); do
            add_module "$dep"
        done
        order+=("$name")
    }
    files[mtty]="$MTTY_DIR/mtty.ko"
    local m
    for m in "${GUEST_MODULES[@]}" mtty; do add_module "$m"; done
    printf '%s\n' "${order[@]}" >"$MODULES_DIR/load"
    log "guest modules (load order): ${order[*]}"
    touch "$stamp"
}

# ------------------------------------------------------- guest binary + initrd

build_guest_binary() {
    log "cargo build --release -p xe-vf-kernel-test, --bin xe-vf-mig"
    (cd "$REPO" && "${CARGO:-cargo}" build -q --release -p xe-vf-kernel-test >&2)
    GUEST_BIN="$CARGO_OUT/release/xe-vf-kernel-test"
    [ -x "$GUEST_BIN" ] || die "$GUEST_BIN was not built"
    # The guest test also runs `xe-vf-mig host list|check` on the mdevs.
    (cd "$REPO" && "${CARGO:-cargo}" build -q --release -p xe-vf-plugin --bin xe-vf-mig >&2)
    GUEST_TOOL="$CARGO_OUT/release/xe-vf-mig"
    [ -x "$GUEST_TOOL" ] || die "$GUEST_TOOL was not built"
}

# Copies a file to the same absolute path inside the staging root.
stage_file() {
    mkdir -p "$STAGE$(dirname "$1")"
    cp -L "$1" "$STAGE$1"
}

build_initramfs() {
    STAGE="$WORK/initramfs"
    INITRD="$WORK/initramfs.cpio.gz"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"/{bin,dev,proc,sys,etc,lib/modules,usr/local/bin}
    cp "$ROOT/bin/busybox" "$STAGE/bin/busybox"
    ln -s busybox "$STAGE/bin/sh"
    cp "$SCRIPT_DIR/lib/real-kernel-init.sh" "$STAGE/init"
    chmod 0755 "$STAGE/init"
    cp "$MODULES_DIR"/*.ko "$STAGE/lib/modules/"
    cp "$MODULES_DIR/load" "$STAGE/etc/modules.load"
    cp "$GUEST_BIN" "$STAGE/usr/local/bin/xe-vf-kernel-test"
    cp "$GUEST_TOOL" "$STAGE/usr/local/bin/xe-vf-mig"
    # Dynamic glibc: the libraries ldd lists plus the loader.
    local lib
    for lib in $(ldd "$GUEST_BIN" "$GUEST_TOOL" | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
        stage_file "$lib"
    done
    (cd "$STAGE" && find . | LC_ALL=C sort | "$ROOT/bin/busybox" cpio -o -H newc 2>/dev/null) |
        gzip -1 >"$INITRD"
    log "initramfs $(du -h "$INITRD" | cut -f1)"
}

# ----------------------------------------------------------------- boot

boot_guest() {
    SERIAL_LOG="$WORK/serial.log"
    rm -f "$SERIAL_LOG"
    log "booting $KREL under qemu TCG (timeout ${BOOT_TIMEOUT}s), serial log $SERIAL_LOG"
    local rc=0
    # thread=single: with multi-threaded TCG this kernel hits a spurious
    # "Oops: int3" in ~1 of 20 boots (a vCPU runs a stale int3 of a
    # finished text_poke_bp(), i.e. static-key/alternative patching racing
    # with cross-vCPU code invalidation). Round-robin TCG keeps 2 guest CPUs
    # but runs them on one host thread: 0 oopses in 20 boots, ~10% slower.
    timeout --kill-after=10 "$BOOT_TIMEOUT" qemu-system-x86_64 \
        -accel tcg,thread=single -m 1024 -smp 2 -nodefaults -display none -no-reboot \
        -serial "file:$SERIAL_LOG" \
        -kernel "$ROOT/boot/vmlinuz-$KREL" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 rdinit=/init mitigations=off" \
        </dev/null >"$WORK/qemu.log" 2>&1 || rc=$?
    QEMU_RC=$rc
}

# Guest uptime printed by /init on the given marker line.
guest_uptime() {
    { grep -a "^$TAG $1 at uptime" "$SERIAL_LOG" || true; } | tr -d '\r' |
        sed -E 's/.* uptime ([0-9.]+) s.*/\1/' | head -n 1
}

report() {
    local results verdict count
    results=$(grep -a "^$TAG RESULT " "$SERIAL_LOG" 2>/dev/null | tr -d '\r' || true)
    count=$(grep -c . <<<"$results" || true)
    verdict=$(awk '{ print $3 }' <<<"$results" | head -n 1)
    local start end
    start=$(guest_uptime "test start")
    end=$(guest_uptime "test end")
    [ -n "$start" ] && TIMINGS+=("guest-boot-to-test=${start}s")
    [ -n "$start" ] && [ -n "$end" ] &&
        TIMINGS+=("guest-test=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')s")
    # One line per check: name, verdict, time (details are in the JSON).
    { grep -aE "^$TAG check [a-z0-9_]+: (pass|FAIL) in" "$SERIAL_LOG" 2>/dev/null || true; } | tr -d '\r' |
        sed -E "s/^$TAG check ([a-z0-9_]+): (pass|FAIL) in ([0-9.]+ ms).*/\2 \1 (\3)/" |
        while IFS= read -r line; do log "check $line"; done
    # shellcheck disable=SC2153 # VERSION comes from kernel.env
    log "kernel $KREL (packages $VERSION), timings: ${TIMINGS[*]}"
    if [ "$QEMU_RC" = 124 ] || [ "$QEMU_RC" = 137 ]; then
        log "FAIL: guest did not finish within ${BOOT_TIMEOUT}s"
    elif [ "$count" = 1 ] && [ "$verdict" = pass ]; then
        echo "$results"
        log "PASS"
        return 0
    elif [ "$count" -gt 1 ]; then
        log "FAIL: $count RESULT lines"
    else
        log "FAIL: no passing RESULT line (qemu exit status $QEMU_RC)"
    fi
    [ -n "$results" ] && echo "$results"
    if grep -aqE 'Oops:|Kernel panic' "$SERIAL_LOG" 2>/dev/null; then
        log "the guest kernel oopsed or panicked:"
        grep -aE -A4 'Oops:|Kernel panic' "$SERIAL_LOG" | tr -d '\r' | head -n 20 >&2
    fi
    log "last lines of $SERIAL_LOG:"
    tail -n 60 "$SERIAL_LOG" 2>/dev/null | tr -d '\r' >&2 || true
    [ -s "$WORK/qemu.log" ] && { log "qemu said:"; cat "$WORK/qemu.log" >&2; }
    return 1
}

main() {
    local t
    mkdir -p "$WORK"
    t=$(now)
    ensure_tools
    resolve_kernel
    log "kernel packages: $PACKAGES"
    download_packages
    phase_done download "$t"

    t=$(now)
    unpack_packages
    build_mtty
    prepare_modules
    phase_done kernel-build "$t"

    t=$(now)
    build_guest_binary
    build_initramfs
    phase_done guest-build "$t"

    t=$(now)
    boot_guest
    phase_done boot-and-test "$t"
    report
}

main "$@"
