#!/bin/busybox sh
# shellcheck shell=dash
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the L2 guest of the xe-vfio-pci nested test (scripts/nested/
# scenarios-xe.sh). Lists its PCI devices once (the VF passed through with
# xe-vfio-pci, and the "VRAM" BAR: Cloud Hypervisor's ivshmem device,
# mapped over the L1 BAR the PF stand-in keeps as that VF's LMEM), then
# runs xe-nested-vram over that BAR for ever: it writes a known pattern
# over all of it, then round after round checks every chunk against the
# checksum of what it wrote and rewrites one chunk.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

IVSHMEM_ID="0x1af4:0x1110"
echo "L2-BOOT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"
vram=""
for dev in /sys/bus/pci/devices/*; do
    [ -e "$dev/vendor" ] || continue
    id="$(cat "$dev/vendor"):$(cat "$dev/device")"
    echo "L2-PCI $(basename "$dev") $id class=$(cat "$dev/class")"
    [ "$id" = "$IVSHMEM_ID" ] && [ -z "$vram" ] && vram=$dev
done
if [ -z "$vram" ]; then
    echo "L2-VRAM none: no ivshmem device ($IVSHMEM_ID)"
    exec sleep 100000
fi
# Memory decoding on, so the BAR answers.
echo 1 >"$vram/enable"
echo "L2-VRAM bar $(basename "$vram") resource2 $(sed -n 3p "$vram/resource")"
exec /bin/xe-nested-vram --bar "$vram/resource2" --chunk-mib 4 --seed "$(cut -d' ' -f1 /proc/uptime | tr -d .)"
