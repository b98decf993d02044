// SPDX-License-Identifier: GPL-2.0-only OR BSD-3-Clause
/*
 * Copyright 2026 The xe-vf-migration authors
 *
 * xe_pf_standin: a STAND-IN for the PF side of Intel Xe SR-IOV VF
 * migration, for the nested test of the real xe-vfio-pci driver
 * (tests/nested/tests/xe_vfio_pci.rs). It is not the xe driver and drives
 * no GPU. It implements exactly the interface xe exports to xe-vfio-pci,
 * include/drm/intel/xe_sriov_vfio.h, for a PCI device that is not a GPU:
 *
 *  - it binds (through driver_override) a PCI function with SR-IOV, the
 *    "PF", and enables its VFs on sriov_numvfs, as xe does for a GPU;
 *  - each VF's "LMEM" is a PCI memory BAR of another device the stand-in
 *    claims (lmem= below): reads and writes of VRAM go through that BAR,
 *    in bounded pieces, never all of it in memory;
 *  - it keeps each VF's control state (paused, stopped, save and restore
 *    in progress, FLR) and answers every call with the errnos xe's PF
 *    returns (xe_gt_sriov_pf_control.c, xe_sriov_pf_migration.c,
 *    xe_sriov_packet.c);
 *  - it produces and consumes the Xe packet stream with the kernel's own
 *    definitions (drivers/gpu/drm/xe/xe_sriov_packet_types.h and the
 *    descriptor KLV keys of abi/xe_driver_klvs_abi.h): DESCRIPTOR (device
 *    and revision id), per GT GuC, GGTT, MMIO, then VRAM chunks of at most
 *    vram_chunk_mb, TRAILER.
 *
 * What it cannot show: GuC, GGTT and MMIO contents mean nothing here
 * (opaque bytes of the right sizes, kept and given back), there is no
 * DMA engine copying LMEM (the CPU copies through the BAR) and no GPU
 * workload to stop; its timings are not a GPU's.
 *
 * Module parameters:
 *   lmem=PF@LMEM[,PF@LMEM...]  PCI addresses: the PF, and the device whose
 *                              BAR lmem_bar holds its VFs' LMEM (split
 *                              evenly between the VFs enabled);
 *   lmem_bar=2                 that BAR (ivshmem-plain's shared memory);
 *   vram_chunk_mb=512          largest VRAM packet, as xe's
 *                              VF_VRAM_STATE_CHUNK_MAX_SIZE;
 *   guc_bytes=4096, ggtt_bytes=8192  sizes of the opaque GuC and GGTT state.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/errno.h>
#include <linux/export.h>
#include <linux/io.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#include <drm/intel/xe_sriov_vfio.h>

/* The kernel's own packet and KLV definitions (drivers/gpu/drm/xe). */
#include "xe_sriov_packet_types.h"
#include "abi/xe_driver_klvs_abi.h"

#define STANDIN_MAX_VFS 4
#define STANDIN_MAX_PFS 4
/* xe_sriov_packet.c: XE_SRIOV_PACKET_SUPPORTED_VERSION */
#define PACKET_VERSION 1
/* GuC KLV header: key in bits 31:16, length in dwords in bits 15:0. */
#define KLV_KEY(h) ((h) >> 16)
#define KLV_LEN(h) ((h) & 0xffff)
#define KLV_HDR(key, len) (((u32)(key) << 16) | (len))
/* xe's VF_SW_FLAG_COUNT registers of the primary GT. */
#define MMIO_BYTES (4 * sizeof(u32))
/* Bounce buffer between the LMEM BAR and user memory. */
#define BOUNCE_BYTES SZ_256K

static char *lmem;
module_param(lmem, charp, 0444);
MODULE_PARM_DESC(lmem, "PF@LMEM pairs of PCI addresses, comma separated");
static int lmem_bar = 2;
module_param(lmem_bar, int, 0444);
MODULE_PARM_DESC(lmem_bar, "BAR of the LMEM device that holds the LMEM");
static unsigned int vram_chunk_mb = 512;
module_param(vram_chunk_mb, uint, 0444);
MODULE_PARM_DESC(vram_chunk_mb, "largest VRAM packet in MiB (xe: 512)");
static unsigned int guc_bytes = 4096;
module_param(guc_bytes, uint, 0444);
static unsigned int ggtt_bytes = 8192;
module_param(ggtt_bytes, uint, 0444);

/* The VF control states that decide the errnos (xe_gt_sriov_pf_control.c). */
enum standin_vf_state {
	VF_PAUSED,
	VF_STOPPED,
	VF_SAVE_WIP,
	VF_SAVE_DATA_DONE,
	VF_RESTORE_WIP,
	VF_RESTORED,
	VF_RESTORE_FAILED,
	VF_FLR_WIP,
};

/* What a save emits, in order. */
enum standin_save_step {
	SAVE_DESCRIPTOR,
	SAVE_GUC,
	SAVE_GGTT,
	SAVE_MMIO,
	SAVE_VRAM,
	SAVE_TRAILER,
	SAVE_END,
};

struct standin_vf {
	unsigned int vfid;
	unsigned long state;
	/* serializes control calls and data transfer of this VF */
	struct mutex lock;
	/* this VF's share of the LMEM BAR */
	u64 lmem_offset;
	u64 lmem_size;
	/* between the LMEM BAR and user memory, BOUNCE_BYTES */
	void *bounce;
	/* opaque per-GT state of the right sizes */
	u8 *guc;
	u8 *ggtt;
	u8 mmio[MMIO_BYTES];

	/* save cursor: the packet being read */
	enum standin_save_step step;
	struct xe_sriov_packet_hdr out_hdr;
	size_t out_hdr_done;
	u64 out_done;
	const void *out_buf;
	u32 desc[2 * (1 + 1)];
	u64 vram_offset;

	/* restore cursor: the packet being written */
	struct xe_sriov_packet_hdr in_hdr;
	size_t in_hdr_done;
	u64 in_done;
	void *in_buf;

	/* figures, printed when a transfer ends */
	u64 bytes;
	unsigned int packets;
	unsigned int vram_packets;
};

/* The opaque type of xe_sriov_vfio.h: here, the stand-in's PF. */
struct xe_device {
	struct pci_dev *pdev;
	struct pci_dev *lmem_pdev;
	void __iomem *lmem;
	u64 lmem_size;
	u16 devid;
	u16 revid;
	unsigned int num_vfs;
	struct standin_vf vfs[STANDIN_MAX_VFS + 1];
};

static struct pci_driver standin_driver;

#define vf_info(xe, vf, fmt, ...) \
	pci_info((xe)->pdev, "VF%u " fmt, (vf)->vfid, ##__VA_ARGS__)

static struct standin_vf *pick_vf(struct xe_device *xe, unsigned int vfid)
{
	if (!xe)
		return ERR_PTR(-EPERM);
	/* PFID is 0; VFs are 1..num_vfs (xe_sriov_vfio.c) */
	if (vfid == 0 || vfid > xe->num_vfs)
		return ERR_PTR(-EINVAL);
	return &xe->vfs[vfid];
}

static void free_in_packet(struct standin_vf *vf)
{
	kvfree(vf->in_buf);
	vf->in_buf = NULL;
	vf->in_hdr_done = 0;
	vf->in_done = 0;
}

/* What an FLR leaves: no control state, no migration data in flight. */
static void vf_reset_state(struct standin_vf *vf)
{
	vf->state = 0;
	vf->step = SAVE_END;
	free_in_packet(vf);
}

/* ------------------------------------------------------------- control */

struct xe_device *xe_sriov_vfio_get_pf(struct pci_dev *pdev)
{
	void *drvdata = pci_iov_get_pf_drvdata(pdev, &standin_driver);

	return IS_ERR(drvdata) ? NULL : drvdata;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_get_pf, "xe-vfio-pci");

bool xe_sriov_vfio_migration_supported(struct xe_device *xe)
{
	return !!xe;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_migration_supported, "xe-vfio-pci");

int xe_sriov_vfio_flr_prepare(struct xe_device *xe, unsigned int vfid)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	int ret = 0;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	mutex_lock(&vf->lock);
	if (test_and_set_bit(VF_FLR_WIP, &vf->state))
		ret = -EALREADY;
	mutex_unlock(&vf->lock);
	vf_info(xe, vf, "flr_prepare = %d\n", ret);
	return ret;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_flr_prepare, "xe-vfio-pci");

int xe_sriov_vfio_wait_flr_done(struct xe_device *xe, unsigned int vfid)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	bool flr;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	mutex_lock(&vf->lock);
	/* xe: 0 at once when no FLR is in progress */
	flr = test_bit(VF_FLR_WIP, &vf->state);
	if (flr)
		vf_reset_state(vf);
	mutex_unlock(&vf->lock);
	vf_info(xe, vf, "wait_flr_done = 0 (%s)\n", flr ? "VF state reset" : "no FLR pending");
	return 0;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_wait_flr_done, "xe-vfio-pci");

int xe_sriov_vfio_suspend_device(struct xe_device *xe, unsigned int vfid)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	int ret = 0;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	mutex_lock(&vf->lock);
	if (test_bit(VF_STOPPED, &vf->state))
		ret = -EPERM;
	else if (test_bit(VF_PAUSED, &vf->state))
		ret = -ESTALE;
	else
		set_bit(VF_PAUSED, &vf->state);
	mutex_unlock(&vf->lock);
	vf_info(xe, vf, "suspend_device = %d\n", ret);
	return ret;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_suspend_device, "xe-vfio-pci");

int xe_sriov_vfio_resume_device(struct xe_device *xe, unsigned int vfid)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	int ret = 0;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	mutex_lock(&vf->lock);
	if (!test_bit(VF_PAUSED, &vf->state))
		ret = -EPERM;
	else if (test_bit(VF_SAVE_WIP, &vf->state) || test_bit(VF_RESTORE_WIP, &vf->state))
		ret = -EBUSY;
	else
		clear_bit(VF_PAUSED, &vf->state);
	mutex_unlock(&vf->lock);
	vf_info(xe, vf, "resume_device = %d\n", ret);
	return ret;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_resume_device, "xe-vfio-pci");

/* Header of the next packet a save emits (tile 0, GT 0: one GT here). */
static void save_next(struct xe_device *xe, struct standin_vf *vf)
{
	u64 chunk = (u64)vram_chunk_mb << 20;
	u8 type = 0;
	u64 size = 0, offset = 0;

	vf->out_buf = NULL;
	switch (vf->step) {
	case SAVE_DESCRIPTOR:
		vf->desc[0] = KLV_HDR(MIGRATION_KLV_DEVICE_DEVID_KEY,
				      MIGRATION_KLV_DEVICE_DEVID_LEN);
		vf->desc[1] = xe->devid;
		vf->desc[2] = KLV_HDR(MIGRATION_KLV_DEVICE_REVID_KEY,
				      MIGRATION_KLV_DEVICE_REVID_LEN);
		vf->desc[3] = xe->revid;
		type = XE_SRIOV_PACKET_TYPE_DESCRIPTOR;
		size = sizeof(vf->desc);
		vf->out_buf = vf->desc;
		break;
	case SAVE_GUC:
		type = XE_SRIOV_PACKET_TYPE_GUC;
		size = guc_bytes;
		vf->out_buf = vf->guc;
		break;
	case SAVE_GGTT:
		type = XE_SRIOV_PACKET_TYPE_GGTT;
		size = ggtt_bytes;
		vf->out_buf = vf->ggtt;
		break;
	case SAVE_MMIO:
		type = XE_SRIOV_PACKET_TYPE_MMIO;
		size = MMIO_BYTES;
		vf->out_buf = vf->mmio;
		break;
	case SAVE_VRAM:
		type = XE_SRIOV_PACKET_TYPE_VRAM;
		offset = vf->vram_offset;
		size = min(vf->lmem_size - offset, chunk);
		vf->vram_packets++;
		break;
	case SAVE_TRAILER:
		type = XE_SRIOV_PACKET_TYPE_TRAILER;
		break;
	case SAVE_END:
		return;
	}
	memset(&vf->out_hdr, 0, sizeof(vf->out_hdr));
	vf->out_hdr.version = PACKET_VERSION;
	vf->out_hdr.type = type;
	vf->out_hdr.offset = offset;
	vf->out_hdr.size = size;
	vf->out_hdr_done = 0;
	vf->out_done = 0;
	vf->packets++;
}

/* The packet being read is complete: on to the next one. */
static void save_advance(struct xe_device *xe, struct standin_vf *vf)
{
	if (vf->step == SAVE_VRAM) {
		vf->vram_offset += vf->out_hdr.size;
		if (vf->vram_offset < vf->lmem_size) {
			save_next(xe, vf);
			return;
		}
	}
	vf->step++;
	/* xe saves VRAM only when the VF has some */
	if (vf->step == SAVE_VRAM && !vf->lmem_size)
		vf->step++;
	save_next(xe, vf);
}

int xe_sriov_vfio_stop_copy_enter(struct xe_device *xe, unsigned int vfid)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	int ret = 0;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	mutex_lock(&vf->lock);
	if (test_bit(VF_STOPPED, &vf->state) || !test_bit(VF_PAUSED, &vf->state)) {
		ret = -EPERM;
	} else if (test_bit(VF_RESTORE_WIP, &vf->state)) {
		ret = -EBUSY;
	} else if (test_and_set_bit(VF_SAVE_WIP, &vf->state)) {
		ret = -EALREADY;
	} else {
		/*
		 * xe's control worker produces GuC, GGTT, MMIO and VRAM
		 * packets into a ring of 5 and then marks the save data done,
		 * without waiting for the reader; the stand-in produces the
		 * same packets lazily, as they are read, so the data is "done"
		 * from the start: stop_copy_exit succeeds after a partial read
		 * too, as on xe (which then frees the packets left).
		 */
		set_bit(VF_SAVE_DATA_DONE, &vf->state);
		vf->step = SAVE_DESCRIPTOR;
		vf->vram_offset = 0;
		vf->bytes = 0;
		vf->packets = 0;
		vf->vram_packets = 0;
		save_next(xe, vf);
	}
	mutex_unlock(&vf->lock);
	vf_info(xe, vf, "stop_copy_enter = %d\n", ret);
	return ret;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_stop_copy_enter, "xe-vfio-pci");

int xe_sriov_vfio_stop_copy_exit(struct xe_device *xe, unsigned int vfid)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	int ret = 0;
	bool complete;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	mutex_lock(&vf->lock);
	complete = vf->step == SAVE_END;
	if (!test_bit(VF_SAVE_DATA_DONE, &vf->state)) {
		ret = -EIO;
	} else {
		clear_bit(VF_SAVE_DATA_DONE, &vf->state);
		clear_bit(VF_SAVE_WIP, &vf->state);
		vf->step = SAVE_END;
	}
	mutex_unlock(&vf->lock);
	vf_info(xe, vf, "stop_copy_exit = %d (%s: %llu bytes read, %u packets, %u VRAM)\n",
		ret, complete ? "whole stream read" : "stream NOT read to its end",
		vf->bytes, vf->packets, vf->vram_packets);
	return ret;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_stop_copy_exit, "xe-vfio-pci");

int xe_sriov_vfio_resume_data_enter(struct xe_device *xe, unsigned int vfid)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	int ret = 0;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	mutex_lock(&vf->lock);
	if (test_bit(VF_STOPPED, &vf->state) || !test_bit(VF_PAUSED, &vf->state)) {
		ret = -EPERM;
	} else if (test_bit(VF_SAVE_WIP, &vf->state)) {
		ret = -EBUSY;
	} else if (test_and_set_bit(VF_RESTORE_WIP, &vf->state)) {
		ret = -EALREADY;
	} else {
		clear_bit(VF_RESTORED, &vf->state);
		clear_bit(VF_RESTORE_FAILED, &vf->state);
		free_in_packet(vf);
		vf->bytes = 0;
		vf->packets = 0;
		vf->vram_packets = 0;
	}
	mutex_unlock(&vf->lock);
	vf_info(xe, vf, "resume_data_enter = %d\n", ret);
	return ret;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_resume_data_enter, "xe-vfio-pci");

int xe_sriov_vfio_resume_data_exit(struct xe_device *xe, unsigned int vfid)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	int ret = 0;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	mutex_lock(&vf->lock);
	if (test_bit(VF_RESTORE_FAILED, &vf->state)) {
		ret = -EIO;
	} else if (!test_bit(VF_RESTORED, &vf->state)) {
		/*
		 * No TRAILER came: xe waits for its restore worker until a
		 * timeout and fails; nothing more can arrive here.
		 */
		ret = -ETIMEDOUT;
	}
	clear_bit(VF_RESTORE_WIP, &vf->state);
	free_in_packet(vf);
	mutex_unlock(&vf->lock);
	vf_info(xe, vf, "resume_data_exit = %d (%llu bytes written, %u packets, %u VRAM)\n",
		ret, vf->bytes, vf->packets, vf->vram_packets);
	return ret;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_resume_data_exit, "xe-vfio-pci");

int xe_sriov_vfio_error(struct xe_device *xe, unsigned int vfid)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	int ret = 0;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	mutex_lock(&vf->lock);
	if (test_and_set_bit(VF_STOPPED, &vf->state))
		ret = -ESTALE;
	mutex_unlock(&vf->lock);
	vf_info(xe, vf, "error (stop) = %d\n", ret);
	return ret;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_error, "xe-vfio-pci");

ssize_t xe_sriov_vfio_stop_copy_size(struct xe_device *xe, unsigned int vfid)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	const size_t hdr = sizeof(struct xe_sriov_packet_hdr);
	ssize_t size;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	/*
	 * xe_gt_sriov_pf_migration_size(): each component plus one header,
	 * VRAM counted with one header however many chunks it takes, and
	 * neither descriptor nor trailer.
	 */
	size = guc_bytes + hdr + ggtt_bytes + hdr + MMIO_BYTES + hdr;
	if (vf->lmem_size)
		size += vf->lmem_size + hdr;
	return size;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_stop_copy_size, "xe-vfio-pci");

/* ---------------------------------------------------------------- save */

/* Copies up to len payload bytes of the current packet to user memory. */
static ssize_t save_payload(struct xe_device *xe, struct standin_vf *vf,
			    char __user *buf, size_t len)
{
	u64 left = vf->out_hdr.size - vf->out_done;

	len = min_t(u64, len, left);
	if (vf->step != SAVE_VRAM) {
		if (copy_to_user(buf, (const u8 *)vf->out_buf + vf->out_done, len))
			return -EFAULT;
		return len;
	}
	/* VRAM: from the LMEM BAR, a bounce buffer at a time. */
	len = min_t(size_t, len, BOUNCE_BYTES);
	memcpy_fromio(vf->bounce, xe->lmem + vf->lmem_offset + vf->out_hdr.offset + vf->out_done,
		      len);
	if (copy_to_user(buf, vf->bounce, len))
		return -EFAULT;
	return len;
}

ssize_t xe_sriov_vfio_data_read(struct xe_device *xe, unsigned int vfid,
				char __user *buf, size_t len)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	ssize_t consumed = 0, ret = 0;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	if (mutex_lock_interruptible(&vf->lock))
		return -EINTR;
	/* xe_sriov_pf_migration_read(): fill len across packets, 0 at the end */
	while (consumed < len && vf->step != SAVE_END) {
		if (vf->out_hdr_done < sizeof(vf->out_hdr)) {
			size_t n = min(len - consumed, sizeof(vf->out_hdr) - vf->out_hdr_done);
			u8 *hdr = (u8 *)&vf->out_hdr + vf->out_hdr_done;

			if (copy_to_user(buf + consumed, hdr, n)) {
				ret = -EFAULT;
				break;
			}
			vf->out_hdr_done += n;
			ret = n;
		} else {
			ret = save_payload(xe, vf, buf + consumed, len - consumed);
			if (ret < 0)
				break;
			vf->out_done += ret;
		}
		consumed += ret;
		if (vf->out_hdr_done == sizeof(vf->out_hdr) && vf->out_done == vf->out_hdr.size)
			save_advance(xe, vf);
		if (need_resched()) {
			mutex_unlock(&vf->lock);
			cond_resched();
			mutex_lock(&vf->lock);
		}
	}
	vf->bytes += consumed;
	mutex_unlock(&vf->lock);
	return ret < 0 ? ret : consumed;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_data_read, "xe-vfio-pci");

/* ------------------------------------------------------------- restore */

/* The descriptor's KLVs (xe_sriov_packet_process_descriptor()). */
static int restore_descriptor(struct xe_device *xe, struct standin_vf *vf)
{
	const struct xe_sriov_packet_hdr *hdr = &vf->in_hdr;
	const u32 *klv = vf->in_buf;
	u32 n = hdr->size / sizeof(u32), i = 0;

	if (hdr->tile_id || hdr->gt_id)
		return -EINVAL;
	if (hdr->size % sizeof(u32)) {
		vf_info(xe, vf, "Aborting migration, descriptor not in KLV format (size=%llu)\n",
			hdr->size);
		return -EINVAL;
	}
	while (i < n) {
		u32 key = KLV_KEY(klv[i]), len = KLV_LEN(klv[i]);

		if (i + 1 + len > n) {
			vf_info(xe, vf, "Aborting migration, corrupted descriptor KLVs\n");
			return -EINVAL;
		}
		if (key == MIGRATION_KLV_DEVICE_DEVID_KEY && len >= 1 && klv[i + 1] != xe->devid) {
			vf_info(xe, vf, "Aborting migration, devid mismatch %#06x!=%#06x\n",
				klv[i + 1], xe->devid);
			return -ENODEV;
		}
		if (key == MIGRATION_KLV_DEVICE_REVID_KEY && len >= 1 && klv[i + 1] != xe->revid) {
			vf_info(xe, vf, "Aborting migration, revid mismatch %#06x!=%#06x\n",
				klv[i + 1], xe->revid);
			return -ENODEV;
		}
		i += 1 + len;
	}
	return 0;
}

/*
 * A complete header: checks that xe makes as the packet is produced to
 * the device (xe_sriov_packet_init_from_hdr(), xe_sriov_pf_migration_
 * restore_produce()), then the storage for a small packet.
 */
static int restore_header(struct xe_device *xe, struct standin_vf *vf)
{
	const struct xe_sriov_packet_hdr *hdr = &vf->in_hdr;

	if (hdr->version != PACKET_VERSION)
		return -EINVAL;
	switch (hdr->type) {
	case XE_SRIOV_PACKET_TYPE_DESCRIPTOR:
	case XE_SRIOV_PACKET_TYPE_TRAILER:
		break;
	case XE_SRIOV_PACKET_TYPE_GGTT:
	case XE_SRIOV_PACKET_TYPE_MMIO:
	case XE_SRIOV_PACKET_TYPE_GUC:
	case XE_SRIOV_PACKET_TYPE_VRAM:
		/* one tile, one GT */
		if (hdr->tile_id || hdr->gt_id)
			goto invalid;
		break;
	default:
		goto invalid;
	}
	if (hdr->type == XE_SRIOV_PACKET_TYPE_VRAM) {
		u64 end = hdr->offset + hdr->size;

		/* xe's restore worker fails the restore (EINVAL): async here too */
		if (end > vf->lmem_size || end < hdr->size) {
			vf_info(xe, vf, "Failed to restore VRAM data: %llu+%llu beyond %llu\n",
				hdr->offset, hdr->size, vf->lmem_size);
			set_bit(VF_RESTORE_FAILED, &vf->state);
		}
		return 0;
	}
	if (!hdr->size)
		return 0;
	/* xe allocates the payload as it comes; so does the stand-in */
	if (hdr->size > max_t(u64, max(guc_bytes, ggtt_bytes), SZ_64K))
		return -ENOMEM;
	vf->in_buf = kvzalloc(hdr->size, GFP_KERNEL);
	return vf->in_buf ? 0 : -ENOMEM;
invalid:
	vf_info(xe, vf, "Received invalid restore packet (type:%u, tile:%u, GT:%u)\n",
		hdr->type, hdr->tile_id, hdr->gt_id);
	return -EINVAL;
}

/*
 * A complete packet. Descriptor and trailer are handled as they are
 * written (xe: synchronously, the error returned by write()); the other
 * packets go to xe's restore worker, whose failures surface as -EIO on
 * the next write and in resume_data_exit: VF_RESTORE_FAILED here.
 */
static int restore_packet(struct xe_device *xe, struct standin_vf *vf)
{
	const struct xe_sriov_packet_hdr *hdr = &vf->in_hdr;
	int ret = 0;

	vf->packets++;
	switch (hdr->type) {
	case XE_SRIOV_PACKET_TYPE_DESCRIPTOR:
		ret = restore_descriptor(xe, vf);
		break;
	case XE_SRIOV_PACKET_TYPE_TRAILER:
		if (hdr->tile_id || hdr->gt_id || hdr->offset || hdr->size)
			ret = -EINVAL;
		else
			set_bit(VF_RESTORED, &vf->state);
		break;
	case XE_SRIOV_PACKET_TYPE_GUC:
	case XE_SRIOV_PACKET_TYPE_GGTT:
	case XE_SRIOV_PACKET_TYPE_MMIO: {
		u8 *dst = hdr->type == XE_SRIOV_PACKET_TYPE_GUC ? vf->guc :
			  hdr->type == XE_SRIOV_PACKET_TYPE_GGTT ? vf->ggtt : vf->mmio;
		size_t want = hdr->type == XE_SRIOV_PACKET_TYPE_GUC ? guc_bytes :
			      hdr->type == XE_SRIOV_PACKET_TYPE_GGTT ? ggtt_bytes : MMIO_BYTES;

		if (hdr->size != want) {
			vf_info(xe, vf, "Failed to restore type %u data: %llu bytes, want %zu\n",
				hdr->type, hdr->size, want);
			set_bit(VF_RESTORE_FAILED, &vf->state);
		} else {
			memcpy(dst, vf->in_buf, want);
		}
		break;
	}
	case XE_SRIOV_PACKET_TYPE_VRAM:
		vf->vram_packets++;
		break;
	}
	free_in_packet(vf);
	return ret;
}

/* Up to len payload bytes of the current packet from user memory. */
static ssize_t restore_payload(struct xe_device *xe, struct standin_vf *vf,
			       const char __user *buf, size_t len)
{
	const struct xe_sriov_packet_hdr *hdr = &vf->in_hdr;
	u64 left = hdr->size - vf->in_done;

	len = min_t(u64, len, left);
	if (hdr->type != XE_SRIOV_PACKET_TYPE_VRAM) {
		if (copy_from_user((u8 *)vf->in_buf + vf->in_done, buf, len))
			return -EFAULT;
		return len;
	}
	len = min_t(size_t, len, BOUNCE_BYTES);
	if (copy_from_user(vf->bounce, buf, len))
		return -EFAULT;
	/* xe_sriov_pf_migration: a chunk beyond the VF's LMEM fails the restore */
	if (!test_bit(VF_RESTORE_FAILED, &vf->state))
		memcpy_toio(xe->lmem + vf->lmem_offset + hdr->offset + vf->in_done,
			    vf->bounce, len);
	return len;
}

ssize_t xe_sriov_vfio_data_write(struct xe_device *xe, unsigned int vfid,
				 const char __user *buf, size_t len)
{
	struct standin_vf *vf = pick_vf(xe, vfid);
	ssize_t produced = 0, ret = 0;

	if (IS_ERR(vf))
		return PTR_ERR(vf);
	if (mutex_lock_interruptible(&vf->lock))
		return -EINTR;
	while (produced < len) {
		if (test_bit(VF_RESTORE_FAILED, &vf->state)) {
			ret = -EIO;
			break;
		}
		if (vf->in_hdr_done < sizeof(vf->in_hdr)) {
			size_t n = min(len - produced, sizeof(vf->in_hdr) - vf->in_hdr_done);
			u8 *hdr = (u8 *)&vf->in_hdr + vf->in_hdr_done;

			if (copy_from_user(hdr, buf + produced, n)) {
				ret = -EFAULT;
				break;
			}
			vf->in_hdr_done += n;
			vf->in_done = 0;
			ret = n;
			if (vf->in_hdr_done == sizeof(vf->in_hdr)) {
				int err = restore_header(xe, vf);

				if (err) {
					free_in_packet(vf);
					ret = err;
					break;
				}
			}
		} else {
			ret = restore_payload(xe, vf, buf + produced, len - produced);
			if (ret < 0)
				break;
			vf->in_done += ret;
		}
		produced += ret;
		if (vf->in_hdr_done == sizeof(vf->in_hdr) && vf->in_done == vf->in_hdr.size) {
			int err = restore_packet(xe, vf);

			if (err) {
				ret = err;
				break;
			}
		}
		if (need_resched()) {
			mutex_unlock(&vf->lock);
			cond_resched();
			mutex_lock(&vf->lock);
		}
	}
	vf->bytes += produced;
	mutex_unlock(&vf->lock);
	return ret < 0 ? ret : produced;
}
EXPORT_SYMBOL_FOR_MODULES(xe_sriov_vfio_data_write, "xe-vfio-pci");

/* ------------------------------------------------------------ PCI side */

/* The LMEM device named for this PF in lmem=, or NULL. */
static struct pci_dev *find_lmem(struct pci_dev *pf)
{
	const char *name = pci_name(pf);
	char *list, *cursor, *pair;
	struct pci_dev *found = NULL;

	if (!lmem)
		return NULL;
	list = kstrdup(lmem, GFP_KERNEL);
	if (!list)
		return NULL;
	cursor = list;
	while ((pair = strsep(&cursor, ",")) && !found) {
		char *at = strchr(pair, '@');
		unsigned int domain, bus, slot, fn;

		if (!at)
			continue;
		*at = '\0';
		if (strcmp(pair, name))
			continue;
		if (sscanf(at + 1, "%x:%x:%x.%x", &domain, &bus, &slot, &fn) != 4)
			break;
		found = pci_get_domain_bus_and_slot(domain, bus, PCI_DEVFN(slot, fn));
	}
	kfree(list);
	return found;
}

static void standin_free_vfs(struct xe_device *xe)
{
	unsigned int n;

	for (n = 1; n <= STANDIN_MAX_VFS; n++) {
		struct standin_vf *vf = &xe->vfs[n];

		free_in_packet(vf);
		kvfree(vf->guc);
		kvfree(vf->ggtt);
		kvfree(vf->bounce);
		vf->guc = NULL;
		vf->ggtt = NULL;
		vf->bounce = NULL;
	}
}

static int standin_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct xe_device *xe;
	unsigned int n;
	int ret;

	if (!pdev->is_physfn || pci_sriov_get_totalvfs(pdev) < 1)
		return dev_err_probe(&pdev->dev, -ENODEV, "not an SR-IOV PF\n");
	if (lmem_bar < 0 || lmem_bar >= PCI_STD_NUM_BARS)
		return -EINVAL;

	xe = devm_kzalloc(&pdev->dev, sizeof(*xe), GFP_KERNEL);
	if (!xe)
		return -ENOMEM;
	xe->pdev = pdev;
	xe->devid = pdev->device;
	xe->revid = pdev->revision;

	xe->lmem_pdev = find_lmem(pdev);
	if (!xe->lmem_pdev)
		return dev_err_probe(&pdev->dev, -ENODEV, "no LMEM device named for %s in lmem=\n",
				     pci_name(pdev));
	ret = pci_enable_device_mem(xe->lmem_pdev);
	if (ret)
		goto put;
	ret = pci_request_region(xe->lmem_pdev, lmem_bar, "xe_pf_standin LMEM");
	if (ret)
		goto disable;
	xe->lmem_size = pci_resource_len(xe->lmem_pdev, lmem_bar);
	xe->lmem = pci_iomap(xe->lmem_pdev, lmem_bar, 0);
	if (!xe->lmem || !xe->lmem_size) {
		ret = -ENOMEM;
		goto release;
	}

	for (n = 1; n <= STANDIN_MAX_VFS; n++) {
		struct standin_vf *vf = &xe->vfs[n];

		vf->vfid = n;
		mutex_init(&vf->lock);
		vf->step = SAVE_END;
		vf->guc = kvzalloc(guc_bytes, GFP_KERNEL);
		vf->ggtt = kvzalloc(ggtt_bytes, GFP_KERNEL);
		vf->bounce = kvmalloc(BOUNCE_BYTES, GFP_KERNEL);
		if (!vf->guc || !vf->ggtt || !vf->bounce) {
			ret = -ENOMEM;
			goto free;
		}
		/* Opaque contents, distinct per PF and VF. */
		memset(vf->guc, 0x40 + n, guc_bytes);
		memset(vf->ggtt, 0x80 + n, ggtt_bytes);
		memset(vf->mmio, n, MMIO_BYTES);
	}
	pci_set_drvdata(pdev, xe);
	pci_info(pdev, "xe PF STAND-IN: devid %#06x revid %#04x, LMEM %s BAR%d %llu MiB, VRAM chunks of %u MiB\n",
		 xe->devid, xe->revid, pci_name(xe->lmem_pdev), lmem_bar,
		 xe->lmem_size >> 20, vram_chunk_mb);
	return 0;

free:
	standin_free_vfs(xe);
	pci_iounmap(xe->lmem_pdev, xe->lmem);
release:
	pci_release_region(xe->lmem_pdev, lmem_bar);
disable:
	pci_disable_device(xe->lmem_pdev);
put:
	pci_dev_put(xe->lmem_pdev);
	return ret;
}

static void standin_remove(struct pci_dev *pdev)
{
	struct xe_device *xe = pci_get_drvdata(pdev);

	/* VF drivers are gone once this returns; then drvdata may go. */
	pci_disable_sriov(pdev);
	xe->num_vfs = 0;
	standin_free_vfs(xe);
	pci_iounmap(xe->lmem_pdev, xe->lmem);
	pci_release_region(xe->lmem_pdev, lmem_bar);
	pci_disable_device(xe->lmem_pdev);
	pci_dev_put(xe->lmem_pdev);
}

/* sriov_numvfs: each VF gets an even share of the LMEM BAR. */
static int standin_sriov_configure(struct pci_dev *pdev, int num_vfs)
{
	struct xe_device *xe = pci_get_drvdata(pdev);
	unsigned int n;
	int ret;

	if (num_vfs == 0) {
		pci_disable_sriov(pdev);
		xe->num_vfs = 0;
		return 0;
	}
	if (num_vfs > STANDIN_MAX_VFS)
		return -EINVAL;
	for (n = 1; n <= num_vfs; n++) {
		struct standin_vf *vf = &xe->vfs[n];

		vf_reset_state(vf);
		vf->lmem_size = round_down(div_u64(xe->lmem_size, num_vfs), PAGE_SIZE);
		vf->lmem_offset = (n - 1) * vf->lmem_size;
	}
	/* Set before the VFs appear: their driver asks for it at probe. */
	xe->num_vfs = num_vfs;
	ret = pci_enable_sriov(pdev, num_vfs);
	if (ret) {
		xe->num_vfs = 0;
		return ret;
	}
	pci_info(pdev, "enabled %d VF(s), %llu MiB of LMEM each\n", num_vfs,
		 xe->vfs[1].lmem_size >> 20);
	return num_vfs;
}

/* Bound only through driver_override: no id matches by itself. */
static const struct pci_device_id standin_ids[] = {
	{ }
};

static struct pci_driver standin_driver = {
	.name = "xe_pf_standin",
	.id_table = standin_ids,
	.probe = standin_probe,
	.remove = standin_remove,
	.sriov_configure = standin_sriov_configure,
	/* the PF does no DMA here, so its VFs' IOMMU group can go to VFIO */
	.driver_managed_dma = true,
};
module_pci_driver(standin_driver);

MODULE_LICENSE("Dual BSD/GPL");
MODULE_DESCRIPTION("STAND-IN for the xe PF side of xe-vfio-pci (xe_sriov_vfio.h), for tests");
