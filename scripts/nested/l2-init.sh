#!/bin/busybox sh
# shellcheck shell=dash
# Copyright 2026 The xe-vf-migration authors
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the L2 guest (booted by Cloud Hypervisor inside L1, see
# scripts/nested/run.sh). Lists its PCI devices once, so L1 can see that the
# mtty VFIO device reached the guest, then prints a numbered tick line about
# every second forever. A restored or migrated guest continues the count,
# which is how L1 tells "this guest kept running" from "a guest booted".
#
# Each tick also goes through the device: the guest reads the scratch
# register of the mtty UART (I/O BAR 0, offset 7; mtty keeps it in its
# migration state), prints it as scr=, then writes the tick number there.
# So on every tick scr must equal the previous tick's number (mod 256), on
# the source and after a restore or migration alike: a device whose state
# was lost reads 0, one restored from another instant reads another value.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

MTTY_ID="0x4348:0x3253"
echo "L2-BOOT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"
mtty=""
for dev in /sys/bus/pci/devices/*; do
    [ -e "$dev/vendor" ] || continue
    id="$(cat "$dev/vendor"):$(cat "$dev/device")"
    echo "L2-PCI $(basename "$dev") $id class=$(cat "$dev/class")"
    [ "$id" = "$MTTY_ID" ] && [ -z "$mtty" ] && mtty=$dev
done
if [ -n "$mtty" ]; then
    echo 1 >"$mtty/enable"
    echo "L2-MTTY $(basename "$mtty") bar0 $(head -n 1 "$mtty/resource")"
fi

# The UART scratch register through the BAR's sysfs file (one outb/inb).
scr_read() { dd if="$mtty/resource0" bs=1 skip=7 count=1 2>/dev/null | od -An -tu1 | tr -d ' '; }
scr_write() { printf '%b' "\\$(printf %03o "$1")" | dd of="$mtty/resource0" bs=1 seek=7 count=1 conv=notrunc 2>/dev/null; }

i=0
while :; do
    i=$((i + 1))
    if [ -n "$mtty" ]; then
        scr=$(scr_read)
        scr_write $((i % 256))
        echo "L2-TICK $i up=$(cut -d' ' -f1 /proc/uptime) scr=${scr:-none}"
    else
        echo "L2-TICK $i up=$(cut -d' ' -f1 /proc/uptime)"
    fi
    sleep 1
done
