#!/usr/bin/env bash
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# One-time preparation of the nested Cloud Hypervisor test (scripts/nested/
# run.sh), from Debian packages only, cached outside the clone and keyed by
# every input:
#
#   kernel-<key>/   the L1 kernel (bzImage), the same build's vmlinux (the
#                   L2 guest kernel: ELF with a PVH entry, which CH boots),
#                   mdev.ko, mtty.ko and mtty_nolog.ko (mtty without its
#                   DMA-logging ops, standing in for an Xe VF, which cannot
#                   log its DMA). Built from Debian's linux-source-7.3
#                   (trixie-backports) with `allnoconfig` + l1-kernel.config.
#   l2-<key>.cpio.gz  the L2 initramfs: busybox and l2-init.sh.
#   busybox-<version> busybox from Debian's busybox-static.
#   xe-modules-<key>/ xe_pf_standin.ko and xe-vfio-pci.ko (see
#                   prepare_xe_modules), for the xe-vfio-pci test.
#
# Why a kernel is built at all: every Debian kernel reachable here
# (bookworm 6.12, bookworm-backports 6.12, trixie 6.12, trixie-backports
# 7.3, sid 7.2; checked 2026-11) has CONFIG_IOMMUFD unset, and Cloud
# Hypervisor receives a migrated VFIO device only through a VFIO cdev fd
# plus an iommufd fd (Debian's VFIO also has no IOMMUFD_DRIVER, so its DMA
# logging reports are stubs). Why 7.3: xe-vfio-pci is in Linux since
# v6.19, and the xe-vfio-pci test builds it from the same tree.
#
# The source package comes from trixie-backports through a private apt
# configuration under the cache (its own sources list, lists and archive
# directories; the machine's apt sources stay as they are): apt checks the
# .deb against the signed index, with the keys of debian-archive-keyring.
#
# Prints KEY=VALUE lines on stdout (everything else goes to stderr):
#   NESTED_KERNEL_DIR, NESTED_L2_INITRD, NESTED_XE_MODULES_DIR, NESTED_BUSYBOX.
#
# Usage: scripts/nested/prepare.sh
# Environment: XE_CACHE_DIR (default ~/.cache/xe-vf-migration),
#   XE_NESTED_SOURCE_PKG (default linux-source-7.3), XE_NESTED_SOURCE_SUITE
#   (the Debian suite it comes from, default trixie-backports), XE_NESTED_JOBS.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE="${XE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/xe-vf-migration}/nested"
SOURCE_PKG="${XE_NESTED_SOURCE_PKG:-linux-source-7.3}"
SOURCE_SUITE="${XE_NESTED_SOURCE_SUITE:-trixie-backports}"
DEBIAN_MIRROR=http://deb.debian.org/debian
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
JOBS="${XE_NESTED_JOBS:-$(($(nproc) + 1))}"
# Bumped when this script changes how an output is made (part of every key).
RECIPE=2
# Options the tests cannot do without; checked in the final .config.
REQUIRED_CONFIG=(KVM KVM_AMD IOMMUFD IOMMUFD_DRIVER VFIO VFIO_GROUP VFIO_CONTAINER
    VFIO_DEVICE_CDEV VFIO_IOMMU_TYPE1 PVH SERIAL_8250_CONSOLE DEVTMPFS TMPFS UNIX INET
    SECCOMP_FILTER MODULES DYNAMIC_DEBUG BLK_DEV_INITRD RD_GZIP)

log() { echo "[nested-prepare] $*" >&2; }
die() {
    echo "[nested-prepare] ERROR: $*" >&2
    exit 1
}
is_root() { [ "$(id -u)" = 0 ]; }
sha() { sha256sum | cut -c1-16; }

# ---------------------------------------------------------------- host tools

ensure_tools() {
    local -a missing=()
    local pair
    for pair in qemu-system-x86_64:qemu-system-x86 gcc:gcc make:make flex:flex bison:bison \
        bc:bc cpio:cpio xz:xz-utils gzip:gzip dpkg-deb:dpkg apt-get:apt perl:perl; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    # objtool (x86_64 kernels) needs libelf's headers.
    [ -f /usr/include/libelf.h ] || missing+=(libelf-dev)
    if [ "${#missing[@]}" -gt 0 ]; then
        is_root || die "missing host packages: ${missing[*]} (run as root or install them)"
        log "installing ${missing[*]}"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o DPkg::Lock::Timeout=300 "${missing[@]}" >&2
    fi
}

# ------------------------------------------------------------- Debian debs

# apt with the private configuration for SOURCE_SUITE: apt_private
# apt-get|apt-cache ARGS...
APT_DIR="$CACHE/apt-$SOURCE_SUITE"
apt_private() {
    local tool=$1
    shift
    "$tool" -o Dir::Etc::SourceList="$APT_DIR/sources.list" \
        -o Dir::Etc::SourceParts="$APT_DIR/sources.list.d" \
        -o Dir::Etc::Preferences="$APT_DIR/preferences" \
        -o Dir::Etc::PreferencesParts="$APT_DIR/preferences.d" \
        -o Dir::State::Lists="$APT_DIR/lists" \
        -o Dir::Cache="$APT_DIR/cache" \
        -o APT::Sandbox::User=root "$@"
}

apt_private_setup() {
    [ -f "$KEYRING" ] || die "$KEYRING missing (package debian-archive-keyring)"
    mkdir -p "$APT_DIR"/{sources.list.d,preferences.d,lists/partial,cache/archives/partial}
    echo "deb [signed-by=$KEYRING] $DEBIAN_MIRROR $SOURCE_SUITE main" >"$APT_DIR/sources.list.tmp"
    mv "$APT_DIR/sources.list.tmp" "$APT_DIR/sources.list"
    : >"$APT_DIR/preferences"
}

apt_private_update() {
    log "apt-get update ($SOURCE_SUITE, private lists in $APT_DIR)"
    apt_private apt-get update -q >&2 || die "apt-get update of $SOURCE_SUITE failed"
    APT_PRIVATE_UPDATED=1
}

# Candidate version of a package: `candidate PKG [private]`. The machine's
# apt, or the private one for SOURCE_SUITE; either updates its lists once
# when it does not know the package.
APT_UPDATED=0
APT_PRIVATE_UPDATED=0
candidate() {
    local v
    if [ "${2:-}" = private ]; then
        v=$(apt_private apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p')
        if { [ -z "$v" ] || [ "$v" = "(none)" ]; } && [ "$APT_PRIVATE_UPDATED" = 0 ]; then
            apt_private_update
            v=$(apt_private apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p')
        fi
        if [ -z "$v" ] || [ "$v" = "(none)" ]; then
            die "package $1 is not in $SOURCE_SUITE"
        fi
        echo "$v"
        return 0
    fi
    v=$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p')
    if { [ -z "$v" ] || [ "$v" = "(none)" ]; } && [ "$APT_UPDATED" = 0 ] && is_root; then
        log "apt-get update (no candidate for $1)"
        apt-get update -q >&2
        APT_UPDATED=1
        v=$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p')
    fi
    if [ -z "$v" ] || [ "$v" = "(none)" ]; then
        die "package $1 is not available from apt"
    fi
    echo "$v"
}

# The cached .deb of package $1 at version $2, if there is one.
cached_deb() {
    find "$CACHE/debs" -maxdepth 1 -name "${1}_*.deb" | while read -r d; do
        [ "$(dpkg-deb -f "$d" Version)" = "$2" ] && echo "$d"
    done | head -n 1
}

# Path of package $1 at version $2 in the cache, downloaded if needed
# (`deb_file PKG VERSION [private]`: from SOURCE_SUITE; apt checks it
# against the signed index either way).
deb_file() {
    local pkg=$1 version=$2 where=${3:-} f
    mkdir -p "$CACHE/debs"
    f=$(cached_deb "$pkg" "$version")
    if [ -z "$f" ]; then
        log "downloading $pkg=$version${where:+ ($SOURCE_SUITE)}"
        if [ "$where" = private ]; then
            # Lists from an earlier run may name a version the pool no
            # longer holds: refresh them once and try again.
            (cd "$CACHE/debs" && apt_private apt-get download -q "$pkg=$version" >&2) ||
                { [ "$APT_PRIVATE_UPDATED" = 0 ] && apt_private_update &&
                    (cd "$CACHE/debs" && apt_private apt-get download -q "$pkg=$version" >&2); } ||
                die "cannot download $pkg=$version from $SOURCE_SUITE"
        else
            (cd "$CACHE/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version" >&2) ||
                die "cannot download $pkg=$version"
        fi
        f=$(cached_deb "$pkg" "$version")
    fi
    [ -n "$f" ] || die "$pkg=$version missing after download"
    echo "$f"
}

# ------------------------------------------------------------------ busybox

prepare_busybox() {
    local version deb out
    version=$(candidate busybox-static)
    out="$CACHE/busybox-${version//[:~+]/_}"
    if [ ! -x "$out" ]; then
        deb=$(deb_file busybox-static "$version")
        local tmp
        tmp=$(mktemp -d)
        dpkg-deb -x "$deb" "$tmp"
        [ -x "$tmp/bin/busybox" ] || die "busybox-static $version has no /bin/busybox"
        cp "$tmp/bin/busybox" "$out.tmp" && mv "$out.tmp" "$out"
        rm -rf "$tmp"
    fi
    BUSYBOX=$out
    BUSYBOX_VERSION=$version
}

# ------------------------------------------------------------------- kernel

# Writes the no-DMA-logging variant of mtty.c ($1) to $2: the same driver
# under the name mtty_nolog (so both load side by side) without the line
# that installs its vfio_log_ops. VFIO then answers DMA_LOGGING_START with
# ENOTTY, as for an Xe VF.
make_mtty_nolog() {
    local src=$1 dst=$2
    sed -e 's/^#define MTTY_CLASS_NAME "mtty"$/#define MTTY_CLASS_NAME "mtty_nolog"/' \
        -e 's/^#define MTTY_NAME\([[:space:]]*\)"mtty"$/#define MTTY_NAME\1"mtty_nolog"/' \
        -e 's/^\([[:space:]]*\.name[[:space:]]*=[[:space:]]*\)"mtty",$/\1"mtty_nolog",/' \
        -e 's/^static const struct vfio_log_ops mtty_log_ops = {$/static const struct vfio_log_ops mtty_log_ops __maybe_unused = {/' \
        -e '/^[[:space:]]*vdev->log_ops = &mtty_log_ops;$/d' \
        "$src" >"$dst"
    # Every edit must have applied, or the variant is not what it claims.
    if ! grep -q '^#define MTTY_CLASS_NAME "mtty_nolog"$' "$dst" ||
        ! grep -qE '^#define MTTY_NAME[[:space:]]*"mtty_nolog"$' "$dst" ||
        ! grep -qE '^[[:space:]]*\.name[[:space:]]*=[[:space:]]*"mtty_nolog",$' "$dst" ||
        grep -q 'log_ops = ' "$dst"; then
        die "mtty.c of $SOURCE_PKG does not have the expected shape for the no-logging variant"
    fi
}

# mtty.c of the source package (cached alone, so computing the key never
# unpacks the whole tree).
mtty_source() {
    local version=$1 out="$CACHE/src-files/mtty-${1//[:~+]/_}.c"
    if [ ! -f "$out" ]; then
        local deb
        deb=$(deb_file "$SOURCE_PKG" "$version" private)
        mkdir -p "$CACHE/src-files"
        dpkg-deb --fsys-tarfile "$deb" | tar -x -O --wildcards './usr/src/linux-source-*.tar.xz' |
            tar -xJ -O --wildcards '*/samples/vfio-mdev/mtty.c' >"$out.tmp"
        [ -s "$out.tmp" ] || die "$SOURCE_PKG $version has no samples/vfio-mdev/mtty.c"
        mv "$out.tmp" "$out"
    fi
    echo "$out"
}

prepare_kernel() {
    local version gcc_id key out variant_text
    version=$(candidate "$SOURCE_PKG" private)
    gcc_id=$(gcc --version | head -n 1)
    variant_text=$(mktemp)
    make_mtty_nolog "$(mtty_source "$version")" "$variant_text"
    # Keyed by what goes in: sources, options, compiler, the variant's text.
    key=$(printf '%s\n' "recipe=$RECIPE" "source=$SOURCE_PKG=$version" "gcc=$gcc_id" \
        "$(cat "$HERE/l1-kernel.config")" "$(sha256sum <"$variant_text")" | sha)
    rm -f "$variant_text"
    out="$CACHE/kernel-$key"
    NESTED_KERNEL_DIR=$out
    KERNEL_KEY=$key
    KBUILD_WORK="$CACHE/kbuild/${SOURCE_PKG}_${version//[:~+]/_}"
    if [ -f "$out/BUILD-INFO" ]; then
        log "kernel: cached ($out)"
        return 0
    fi
    local started work src build
    started=$(date +%s)
    work="$CACHE/kbuild/${SOURCE_PKG}_${version//[:~+]/_}"
    src="$work/src"
    build="$work/build"
    if [ ! -f "$src/Makefile" ]; then
        local deb
        deb=$(deb_file "$SOURCE_PKG" "$version" private)
        log "unpacking $(basename "$deb")"
        rm -rf "$src" && mkdir -p "$src"
        dpkg-deb --fsys-tarfile "$deb" | tar -x -O --wildcards './usr/src/linux-source-*.tar.xz' |
            tar -xJ -C "$src" --strip-components=1
        [ -f "$src/Makefile" ] || die "$SOURCE_PKG $version: no kernel tree inside"
    fi
    mkdir -p "$build"
    log "kernel: configuring ($SOURCE_PKG $version, allnoconfig + l1-kernel.config)"
    make -s -C "$src" O="$build" KCONFIG_ALLCONFIG="$HERE/l1-kernel.config" allnoconfig >&2
    local opt
    for opt in "${REQUIRED_CONFIG[@]}"; do
        grep -q "^CONFIG_$opt=y$" "$build/.config" ||
            die "kernel config: CONFIG_$opt is not =y after allnoconfig (see l1-kernel.config)"
    done
    grep -q '^CONFIG_SAMPLE_VFIO_MDEV_MTTY=m$' "$build/.config" ||
        die "kernel config: CONFIG_SAMPLE_VFIO_MDEV_MTTY is not =m"
    log "kernel: building bzImage and modules with -j$JOBS (minutes on 2 cores)"
    make -s -C "$build" -j"$JOBS" bzImage modules >&2 || die "kernel build failed"

    log "kernel: building mtty_nolog.ko out of tree"
    local variant="$work/mtty-nolog"
    rm -rf "$variant" && mkdir -p "$variant"
    make_mtty_nolog "$src/samples/vfio-mdev/mtty.c" "$variant/mtty_nolog.c"
    echo 'obj-m := mtty_nolog.o' >"$variant/Kbuild"
    make -s -C "$build" M="$variant" modules >&2 || die "building mtty_nolog.ko failed"

    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    cp "$build/arch/x86/boot/bzImage" "$build/vmlinux" "$build/.config" "$out.tmp/"
    cp "$build/drivers/vfio/mdev/mdev.ko" "$build/samples/vfio-mdev/mtty.ko" \
        "$variant/mtty_nolog.ko" "$out.tmp/"
    {
        echo "source=$SOURCE_PKG=$version"
        echo "release=$(cat "$build/include/config/kernel.release")"
        echo "gcc=$gcc_id"
        echo "key=$key"
        echo "build_seconds=$(($(date +%s) - started))"
    } >"$out.tmp/BUILD-INFO"
    rm -rf "$out" && mv "$out.tmp" "$out"
    log "kernel: built in $(($(date +%s) - started)) s ($out)"
}

# ---------------------------------------------------- xe-vfio-pci modules

# The modules of the xe-vfio-pci test, built out of tree against the L1
# kernel's build tree: xe_pf_standin.ko (ours, tests/nested/xe-pf-standin:
# the stand-in for xe's PF side) and xe-vfio-pci.ko from the kernel tree's
# drivers/vfio/pci/xe, unmodified (its Kconfig entry depends on DRM_XE,
# which the L1 kernel does not build, so it is built as an external module
# from a copy of its main.c and Makefile whose sha256 is checked against
# the tree's). Keyed by the kernel and the stand-in's sources.
prepare_xe_modules() {
    local standin="$HERE/../../tests/nested/xe-pf-standin" key out
    key=$(printf '%s\n' "recipe=$RECIPE" "kernel=$KERNEL_KEY" \
        "$(cat "$standin/xe_pf_standin.c" "$standin/Kbuild" | sha256sum)" | sha)
    out="$CACHE/xe-modules-$key"
    NESTED_XE_MODULES_DIR=$out
    if [ -f "$out/BUILD-INFO" ]; then
        log "xe modules: cached ($out)"
        return 0
    fi
    local build="$KBUILD_WORK/build" src="$KBUILD_WORK/src" work started
    [ -f "$build/Module.symvers" ] ||
        die "the L1 kernel's build tree ($build) is gone: remove $NESTED_KERNEL_DIR to rebuild it"
    started=$(date +%s)
    work="$KBUILD_WORK/xe-modules"
    rm -rf "$work" && mkdir -p "$work/standin" "$work/xe-vfio-pci"
    cp "$standin/xe_pf_standin.c" "$standin/Kbuild" "$work/standin/"
    log "xe modules: building xe_pf_standin.ko"
    make -s -C "$build" M="$work/standin" modules >&2 || die "building xe_pf_standin.ko failed"
    cp "$src/drivers/vfio/pci/xe/main.c" "$src/drivers/vfio/pci/xe/Makefile" "$work/xe-vfio-pci/"
    local f
    for f in main.c Makefile; do
        [ "$(sha256sum <"$work/xe-vfio-pci/$f")" = "$(sha256sum <"$src/drivers/vfio/pci/xe/$f")" ] ||
            die "the copy of drivers/vfio/pci/xe/$f differs from the tree's"
    done
    log "xe modules: building xe-vfio-pci.ko from $SOURCE_PKG's drivers/vfio/pci/xe"
    make -s -C "$build" M="$work/xe-vfio-pci" CONFIG_XE_VFIO_PCI=m \
        KBUILD_EXTRA_SYMBOLS="$work/standin/Module.symvers" modules >&2 ||
        die "building xe-vfio-pci.ko failed"
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    cp "$work/standin/xe_pf_standin.ko" "$work/xe-vfio-pci/xe-vfio-pci.ko" "$out.tmp/"
    {
        echo "kernel=$KERNEL_KEY"
        echo "xe_vfio_pci_main_c_sha256=$(sha256sum <"$src/drivers/vfio/pci/xe/main.c" | cut -c1-64)"
        echo "key=$key"
        echo "build_seconds=$(($(date +%s) - started))"
    } >"$out.tmp/BUILD-INFO"
    rm -rf "$out" && mv "$out.tmp" "$out"
    log "xe modules: built in $(($(date +%s) - started)) s ($out)"
}

# ------------------------------------------------------------ L2 initramfs

prepare_l2_initrd() {
    local key out
    key=$(printf '%s\n' "recipe=$RECIPE" "busybox=$BUSYBOX_VERSION" "$(cat "$HERE/l2-init.sh")" | sha)
    out="$CACHE/l2-$key.cpio.gz"
    NESTED_L2_INITRD=$out
    [ -f "$out" ] && return 0
    local root
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,dev,proc,sys}
    cp "$BUSYBOX" "$root/bin/busybox"
    cp "$HERE/l2-init.sh" "$root/init"
    chmod 0755 "$root/init" "$root/bin/busybox"
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -9 >"$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$root"
}

main() {
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9 # one preparation at a time per cache
    ensure_tools
    apt_private_setup
    prepare_busybox
    prepare_kernel
    prepare_xe_modules
    prepare_l2_initrd
    echo "NESTED_KERNEL_DIR=$NESTED_KERNEL_DIR"
    echo "NESTED_L2_INITRD=$NESTED_L2_INITRD"
    echo "NESTED_XE_MODULES_DIR=$NESTED_XE_MODULES_DIR"
    echo "NESTED_BUSYBOX=$BUSYBOX"
}

main "$@"
