#!/bin/busybox sh
# shellcheck shell=dash
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the real-kernel test initramfs (see scripts/real-kernel-test.sh).
# Loads the VFIO + mdev modules and mtty, creates two mtty instances and runs
# the guest test binary against them, then powers the VM off. Every line the
# host parses starts with "XE-VF-KERNEL-TEST:"; on any setup failure this
# prints a RESULT fail line itself so the host never waits for the timeout.

/bin/busybox --install -s /bin
export PATH=/bin
TAG="XE-VF-KERNEL-TEST:"
MTTY_TYPE=mtty-2
UUID_A=0b7a6f1e-3c52-4f0e-9a11-5e1d00000a01
UUID_B=0b7a6f1e-3c52-4f0e-9a11-5e1d00000b02

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

uptime_s() { cut -d' ' -f1 /proc/uptime; }

fail() {
    echo "$TAG RESULT fail {\"stage\":\"init\",\"error\":\"$1\"}"
    dmesg | tail -n 40
    poweroff -f
}

# Waits up to ~10 s for a path to appear (device nodes, sysfs entries).
wait_for() {
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1))
        [ "$i" -gt 100 ] && return 1
        sleep 0.1
    done
}

echo "$TAG init started at uptime $(uptime_s) s, kernel $(uname -r)"

while read -r module; do
    [ -n "$module" ] || continue
    insmod "/lib/modules/$module.ko" || fail "insmod $module"
done < /etc/modules.load
echo "$TAG modules loaded: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"

wait_for /dev/vfio/vfio || fail "/dev/vfio/vfio did not appear"
TYPE_DIR=/sys/class/mdev_bus/mtty/mdev_supported_types/$MTTY_TYPE
wait_for "$TYPE_DIR/create" || fail "$TYPE_DIR missing"
echo "$TAG $MTTY_TYPE available_instances $(cat "$TYPE_DIR/available_instances")"
for uuid in $UUID_A $UUID_B; do
    echo "$uuid" > "$TYPE_DIR/create" || fail "creating mdev $uuid"
    wait_for "/sys/bus/mdev/devices/$uuid/iommu_group" || fail "mdev $uuid has no iommu_group"
done

# Keep kernel messages off the console while the test prints its lines.
dmesg -n 1
echo "$TAG test start at uptime $(uptime_s) s"
/usr/local/bin/xe-vf-kernel-test "/sys/bus/mdev/devices/$UUID_A" "/sys/bus/mdev/devices/$UUID_B"
rc=$?
echo "$TAG test end at uptime $(uptime_s) s, exit status $rc"
echo "$TAG kernel messages about vfio/mdev/mtty:"
dmesg | grep -iE 'vfio|mdev|mtty' | tail -n 20
sync
poweroff -f
