#!/bin/busybox sh
# shellcheck shell=dash
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of L1, the qemu TCG guest of the nested Cloud Hypervisor test (see
# scripts/nested/run.sh). Checks that KVM came up (qemu emulates AMD SVM
# with nested paging, so kvm_amd loads), loads mdev, mtty and mtty_nolog
# (or, with xe_nested.suite=xe, sets up the xe-vfio-pci suite through
# scenarios-xe.sh setup), runs scenarios.sh (scenarios-xe.sh) for each
# flavour named on the kernel command line
# (xe_nested.flavors=upstream,patched) and powers off. Every line the host
# reads starts with "XE-NESTED:"; the last one is "XE-NESTED: RESULT
# pass|fail", printed on every path, so the host never waits for its
# timeout when something here goes wrong.

/bin/busybox --install -s /bin
export PATH=/bin
TAG="XE-NESTED:"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# The kernel's console is ttyS1 (its own log on the host); the test's
# lines go to ttyS0.
exec >/dev/ttyS0 2>&1

finish() {
    echo "$TAG RESULT $1"
    sync
    reboot -f
}
die() {
    echo "$TAG CHECK l1/$1 fail $2"
    dmesg | tail -n 30
    finish fail
}

# Loopback, for migrations over TCP inside L1 (CONFIG_INET).
ip link set lo up || die net "cannot bring up lo"

echo "$TAG L1 up at $(cut -d' ' -f1 /proc/uptime) s, kernel $(uname -r), $(nproc) cpu(s), $(grep -c -w svm /proc/cpuinfo) with svm"

# KVM: the whole test rests on it.
if [ ! -c /dev/kvm ]; then
    die kvm "/dev/kvm is missing: KVM did not come up in L1 ($(dmesg | grep -i -E 'kvm|svm' | tail -n 3 | tr '\n' ' '))"
fi
if ! (exec 5<>/dev/kvm) 2>/dev/null; then
    die kvm "/dev/kvm cannot be opened"
fi
echo "$TAG CHECK l1/kvm pass $(dmesg | grep -m 1 -o 'kvm_amd: Nested Paging.*' | tr -d '\r')"

suite=$(sed -n 's/.*xe_nested.suite=\([a-z]*\).*/\1/p' /proc/cmdline)
if [ "$suite" = xe ]; then
    # The xe-vfio-pci suite: PF stand-in, the real driver, VFs bound.
    /nested/scenarios-xe.sh setup || finish fail
    runner=/nested/scenarios-xe.sh
else
    for m in mdev mtty mtty_nolog; do
        # dyndbg: mtty logs each migration-state arc to dmesg (see scenarios.sh).
        insmod "/lib/modules/$m.ko" dyndbg=+p || die modules "insmod $m.ko failed"
    done
    for node in /dev/iommu /dev/vfio/vfio /sys/class/mdev_bus/mtty /sys/class/mdev_bus/mtty_nolog; do
        [ -e "$node" ] || die modules "$node missing"
    done
    echo "$TAG CHECK l1/modules pass mdev mtty mtty_nolog, /dev/iommu, /dev/vfio/vfio"

    runner=/nested/scenarios.sh
fi

# A heartbeat, so the host tells a stopped L1 from a long step.
(while sleep 15; do echo "$TAG ALIVE $(cut -d' ' -f1 /proc/uptime)"; done) &

flavors=$(sed -n 's/.*xe_nested.flavors=\([a-z,]*\).*/\1/p' /proc/cmdline)
[ -n "$flavors" ] || die flavors "no xe_nested.flavors= on the kernel command line"
failed=0
for flavor in $(echo "$flavors" | tr ',' ' '); do
    "$runner" "$flavor" || failed=1
done
echo "$TAG L1 done at $(cut -d' ' -f1 /proc/uptime) s"
if [ "$failed" = 0 ]; then finish pass; else finish fail; fi
