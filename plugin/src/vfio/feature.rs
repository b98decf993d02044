// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Argument buffers of the `VFIO_DEVICE_FEATURE` ioctl, built and parsed
//! without a kernel.
//!
//! Keeping the byte layout here, apart from the syscall, lets unit tests
//! check every buffer byte for byte against the uAPI
//! (`include/uapi/linux/vfio.h`) and lets a fake kernel answer them.

use std::os::raw::c_ulong;

use thiserror::Error;
use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE};

use crate::uapi::{
    DeviceState, MigrationFlags, FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP, FEATURE_GET, FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE,
    FEATURE_MIG_DEVICE_STATE, FEATURE_PROBE, FEATURE_SET,
};

/// `VFIO_DEVICE_FEATURE` = `_IO(VFIO_TYPE, VFIO_BASE + 17)`.
pub(crate) const VFIO_DEVICE_FEATURE: c_ulong =
    ioctl_expr(_IOC_NONE, VFIO_TYPE as u32, VFIO_BASE + 17, 0);
/// `VFIO_DEVICE_RESET` = `_IO(VFIO_TYPE, VFIO_BASE + 11)`.
pub(crate) const VFIO_DEVICE_RESET: c_ulong =
    ioctl_expr(_IOC_NONE, VFIO_TYPE as u32, VFIO_BASE + 11, 0);
/// `VFIO_DEVICE_GET_REGION_INFO` = `_IO(VFIO_TYPE, VFIO_BASE + 8)`.
pub(crate) const VFIO_DEVICE_GET_REGION_INFO: c_ulong =
    ioctl_expr(_IOC_NONE, VFIO_TYPE as u32, VFIO_BASE + 8, 0);

/// `sizeof(struct vfio_device_feature)`: `argsz` and `flags`, then the payload.
pub(crate) const HEADER_LEN: usize = 8;

/// Payload offsets of `struct vfio_device_feature_mig_state`.
pub(crate) const MIG_STATE_DEVICE_STATE: usize = 0;
pub(crate) const MIG_STATE_DATA_FD: usize = 4;
/// Payload offsets of `struct vfio_device_feature_dma_logging_control`.
pub(crate) const LOG_CONTROL_PAGE_SIZE: usize = 0;
pub(crate) const LOG_CONTROL_NUM_RANGES: usize = 8;
pub(crate) const LOG_CONTROL_RESERVED: usize = 12;
pub(crate) const LOG_CONTROL_RANGES: usize = 16;
pub(crate) const LOG_CONTROL_LEN: usize = 24;
/// `sizeof(struct vfio_device_feature_dma_logging_range)`.
pub(crate) const LOG_RANGE_LEN: usize = 16;
/// Payload offsets of `struct vfio_device_feature_dma_logging_report`.
pub(crate) const LOG_REPORT_IOVA: usize = 0;
pub(crate) const LOG_REPORT_LENGTH: usize = 8;
pub(crate) const LOG_REPORT_PAGE_SIZE: usize = 16;
pub(crate) const LOG_REPORT_BITMAP: usize = 24;
pub(crate) const LOG_REPORT_LEN: usize = 32;

/// The kernel's `LOG_MAX_RANGES` with 4 KiB pages (one page of ranges);
/// more ranges fail with `E2BIG`.
pub const MAX_DMA_LOGGING_RANGES: usize = 256;
/// Smallest page size the kernel accepts for a dirty report.
pub const MIN_DMA_LOGGING_PAGE_SIZE: u64 = 4096;
/// Upper bound of one report's bitmap (one bit per page): 16 MiB covers
/// 512 GiB of IOVA at 4 KiB pages. Larger ranges are queried in pieces.
pub const MAX_DIRTY_BITMAP_BYTES: usize = 16 << 20;

/// Why a DMA logging request was refused before reaching the kernel.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DmaLoggingError {
    #[error("page size {0:#x} is not a power of two of at least 4 KiB")]
    PageSize(u64),
    #[error("no IOVA range given")]
    NoRanges,
    #[error("{0} IOVA ranges exceed the kernel's limit of {MAX_DMA_LOGGING_RANGES}")]
    TooManyRanges(usize),
    #[error("IOVA range {iova:#x}+{length:#x} is empty, unaligned to the page size or overflows")]
    BadRange { iova: u64, length: u64 },
    #[error("dirty bitmap of {0} bytes exceeds the {MAX_DIRTY_BITMAP_BYTES} byte bound")]
    BitmapTooLarge(u64),
}

/// One `VFIO_DEVICE_FEATURE` argument: header, payload and, for DMA logging,
/// the side buffer the payload points to.
///
/// Invariants, upheld by the constructors (the only writers outside tests):
/// the buffer is `argsz` bytes long, the payload is 8-byte aligned like the
/// kernel's structs, and a pointer stored in the payload refers to `side`,
/// which is owned here and sized as the payload declares. That is what makes
/// handing the buffer to the kernel sound.
#[derive(Debug)]
pub(crate) struct FeatureRequest {
    words: Vec<u64>,
    side: Vec<u64>,
}

impl FeatureRequest {
    fn new(flags: u32, payload_len: usize) -> Self {
        debug_assert_eq!(payload_len % 8, 0);
        let len = HEADER_LEN + payload_len;
        let mut req = FeatureRequest {
            words: vec![0; len / 8],
            side: Vec::new(),
        };
        // Payloads are a few dozen bytes, far below u32::MAX.
        req.put_u32(0, len as u32);
        req.put_u32(4, flags);
        req
    }

    /// `PROBE` for a feature: succeeds if the device supports `GET`/`SET`
    /// (as given in `access`) of it.
    pub(crate) fn probe(feature: u32, access: u32) -> Self {
        Self::new(FEATURE_PROBE | access | feature, 0)
    }

    /// `GET` of `VFIO_DEVICE_FEATURE_MIGRATION`.
    pub(crate) fn get_migration() -> Self {
        Self::new(FEATURE_GET | FEATURE_MIGRATION, 8)
    }

    /// `GET` of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
    pub(crate) fn get_mig_state() -> Self {
        Self::new(FEATURE_GET | FEATURE_MIG_DEVICE_STATE, 8)
    }

    /// `SET` of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`; `data_fd` starts at
    /// -1 so "no stream" reads the same whatever the kernel leaves there.
    pub(crate) fn set_mig_state(state: DeviceState) -> Self {
        let mut req = Self::new(FEATURE_SET | FEATURE_MIG_DEVICE_STATE, 8);
        req.put_u32(HEADER_LEN + MIG_STATE_DEVICE_STATE, state.raw());
        req.put_u32(HEADER_LEN + MIG_STATE_DATA_FD, (-1i32) as u32);
        req
    }

    /// `GET` of `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`.
    pub(crate) fn get_mig_data_size() -> Self {
        Self::new(FEATURE_GET | FEATURE_MIG_DATA_SIZE, 8)
    }

    /// `SET` of `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` for `ranges`
    /// (`(iova, length)` pairs), validated as the kernel would.
    pub(crate) fn dma_logging_start(
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<Self, DmaLoggingError> {
        check_page_size(page_size)?;
        if ranges.is_empty() {
            return Err(DmaLoggingError::NoRanges);
        }
        if ranges.len() > MAX_DMA_LOGGING_RANGES {
            return Err(DmaLoggingError::TooManyRanges(ranges.len()));
        }
        let mut side = Vec::with_capacity(ranges.len() * (LOG_RANGE_LEN / 8));
        for &(iova, length) in ranges {
            check_range(iova, length, page_size)?;
            side.push(iova);
            side.push(length);
        }
        let mut req = Self::new(FEATURE_SET | FEATURE_DMA_LOGGING_START, LOG_CONTROL_LEN);
        req.put_u64(HEADER_LEN + LOG_CONTROL_PAGE_SIZE, page_size);
        // Bounded by MAX_DMA_LOGGING_RANGES above.
        req.put_u32(HEADER_LEN + LOG_CONTROL_NUM_RANGES, ranges.len() as u32);
        req.put_u32(HEADER_LEN + LOG_CONTROL_RESERVED, 0);
        // The heap buffer does not move when `side` is moved into `req`.
        req.put_u64(HEADER_LEN + LOG_CONTROL_RANGES, side.as_ptr() as u64);
        req.side = side;
        Ok(req)
    }

    /// `SET` of `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP` (no payload).
    pub(crate) fn dma_logging_stop() -> Self {
        Self::new(FEATURE_SET | FEATURE_DMA_LOGGING_STOP, 0)
    }

    /// `GET` of `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` with a zeroed bitmap
    /// of one bit per page of `[iova, iova + length)`, bounded in size.
    pub(crate) fn dma_logging_report(
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Self, DmaLoggingError> {
        check_page_size(page_size)?;
        check_range(iova, length, page_size)?;
        let pages = length / page_size;
        let words = pages.div_ceil(64);
        let bytes = words.saturating_mul(8);
        if bytes > MAX_DIRTY_BITMAP_BYTES as u64 {
            return Err(DmaLoggingError::BitmapTooLarge(bytes));
        }
        // Bounded by MAX_DIRTY_BITMAP_BYTES, so it fits usize.
        let side = vec![0u64; words as usize];
        let mut req = Self::new(FEATURE_GET | FEATURE_DMA_LOGGING_REPORT, LOG_REPORT_LEN);
        req.put_u64(HEADER_LEN + LOG_REPORT_IOVA, iova);
        req.put_u64(HEADER_LEN + LOG_REPORT_LENGTH, length);
        req.put_u64(HEADER_LEN + LOG_REPORT_PAGE_SIZE, page_size);
        req.put_u64(HEADER_LEN + LOG_REPORT_BITMAP, side.as_ptr() as u64);
        req.side = side;
        Ok(req)
    }

    /// `argsz` of the header.
    #[cfg(test)]
    pub(crate) fn argsz(&self) -> u32 {
        self.get_u32(0)
    }

    /// `flags` of the header.
    #[cfg(test)]
    pub(crate) fn flags(&self) -> u32 {
        self.get_u32(4)
    }

    /// The whole buffer as the kernel sees it (header then payload).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    /// Pointer handed to the ioctl; valid for `argsz` bytes while `self` is
    /// exclusively borrowed.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }

    /// Reply of `GET MIGRATION`.
    pub(crate) fn migration_flags(&self) -> MigrationFlags {
        MigrationFlags::from_bits(self.get_u64(HEADER_LEN))
    }

    /// Raw `device_state` of a `MIG_DEVICE_STATE` reply.
    pub(crate) fn device_state(&self) -> u32 {
        self.get_u32(HEADER_LEN + MIG_STATE_DEVICE_STATE)
    }

    /// `data_fd` of a `MIG_DEVICE_STATE SET` reply (-1: no stream).
    pub(crate) fn data_fd(&self) -> i32 {
        self.get_u32(HEADER_LEN + MIG_STATE_DATA_FD) as i32
    }

    /// `stop_copy_length` of a `MIG_DATA_SIZE` reply.
    pub(crate) fn stop_copy_length(&self) -> u64 {
        self.get_u64(HEADER_LEN)
    }

    /// Page size of a `DMA_LOGGING_START` reply: the driver may round it.
    pub(crate) fn dma_logging_page_size(&self) -> u64 {
        self.get_u64(HEADER_LEN + LOG_CONTROL_PAGE_SIZE)
    }

    /// The side buffer: DMA logging ranges, or the dirty bitmap.
    #[cfg(test)]
    pub(crate) fn side(&self) -> &[u64] {
        &self.side
    }

    /// The dirty bitmap of a `DMA_LOGGING_REPORT`, bit `n` = page `n`.
    pub(crate) fn into_bitmap(self) -> Vec<u64> {
        self.side
    }

    /// Lets a fake kernel write its reply into the payload.
    #[cfg(test)]
    pub(crate) fn reply_u32(&mut self, payload_offset: usize, value: u32) {
        self.put_u32(HEADER_LEN + payload_offset, value);
    }

    /// Lets a fake kernel write its reply into the payload.
    #[cfg(test)]
    pub(crate) fn reply_u64(&mut self, payload_offset: usize, value: u64) {
        self.put_u64(HEADER_LEN + payload_offset, value);
    }

    /// Lets a fake kernel fill the dirty bitmap.
    #[cfg(test)]
    pub(crate) fn side_mut(&mut self) -> &mut [u64] {
        &mut self.side
    }

    /// Reads a `u64` at byte `offset` (8-byte aligned).
    pub(crate) fn get_u64(&self, offset: usize) -> u64 {
        self.words.get(offset / 8).copied().unwrap_or(0)
    }

    /// Reads a `u32` at byte `offset` (4-byte aligned).
    pub(crate) fn get_u32(&self, offset: usize) -> u32 {
        let word = self.get_u64(offset / 8 * 8).to_ne_bytes();
        let at = offset % 8;
        let mut out = [0u8; 4];
        out.copy_from_slice(&word[at..at + 4]);
        u32::from_ne_bytes(out)
    }

    fn put_u64(&mut self, offset: usize, value: u64) {
        if let Some(w) = self.words.get_mut(offset / 8) {
            *w = value;
        }
    }

    fn put_u32(&mut self, offset: usize, value: u32) {
        if let Some(w) = self.words.get_mut(offset / 8) {
            let mut bytes = w.to_ne_bytes();
            let at = offset % 8;
            bytes[at..at + 4].copy_from_slice(&value.to_ne_bytes());
            *w = u64::from_ne_bytes(bytes);
        }
    }
}

fn check_page_size(page_size: u64) -> Result<(), DmaLoggingError> {
    if page_size < MIN_DMA_LOGGING_PAGE_SIZE || !page_size.is_power_of_two() {
        return Err(DmaLoggingError::PageSize(page_size));
    }
    Ok(())
}

fn check_range(iova: u64, length: u64, page_size: u64) -> Result<(), DmaLoggingError> {
    let aligned = iova.is_multiple_of(page_size) && length.is_multiple_of(page_size);
    if length == 0 || !aligned || iova.checked_add(length).is_none() {
        return Err(DmaLoggingError::BadRange { iova, length });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use vfio_bindings::bindings::vfio as b;

    fn header(argsz: u32, flags: u32) -> Vec<u8> {
        [argsz.to_ne_bytes(), flags.to_ne_bytes()].concat()
    }

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        // _IO(';', nr) = (';' << 8) | nr: no direction, no size.
        assert_eq!(VFIO_DEVICE_FEATURE, 0x3b75);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
        assert_eq!(VFIO_DEVICE_FEATURE, ((b';' as c_ulong) << 8) | 117);
        assert_eq!(VFIO_DEVICE_RESET, ((b';' as c_ulong) << 8) | 111);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        // vfio-ioctls keeps its numbers private; vfio-bindings has the parts.
        assert_eq!(b::VFIO_TYPE, b';');
        assert_eq!(b::VFIO_BASE, 100);
    }

    #[test]
    fn layouts_match_kernel_bindings() {
        assert_eq!(size_of::<b::vfio_device_feature>(), HEADER_LEN);
        assert_eq!(offset_of!(b::vfio_device_feature, argsz), 0);
        assert_eq!(offset_of!(b::vfio_device_feature, flags), 4);
        assert_eq!(offset_of!(b::vfio_device_feature, data), HEADER_LEN);

        assert_eq!(size_of::<b::vfio_device_feature_migration>(), 8);
        assert_eq!(offset_of!(b::vfio_device_feature_migration, flags), 0);

        assert_eq!(size_of::<b::vfio_device_feature_mig_state>(), 8);
        assert_eq!(
            offset_of!(b::vfio_device_feature_mig_state, device_state),
            MIG_STATE_DEVICE_STATE
        );
        assert_eq!(
            offset_of!(b::vfio_device_feature_mig_state, data_fd),
            MIG_STATE_DATA_FD
        );

        assert_eq!(size_of::<b::vfio_device_feature_mig_data_size>(), 8);
        assert_eq!(
            offset_of!(b::vfio_device_feature_mig_data_size, stop_copy_length),
            0
        );

        type Ctl = b::vfio_device_feature_dma_logging_control;
        assert_eq!(size_of::<Ctl>(), LOG_CONTROL_LEN);
        assert_eq!(offset_of!(Ctl, page_size), LOG_CONTROL_PAGE_SIZE);
        assert_eq!(offset_of!(Ctl, num_ranges), LOG_CONTROL_NUM_RANGES);
        assert_eq!(offset_of!(Ctl, __reserved), LOG_CONTROL_RESERVED);
        assert_eq!(offset_of!(Ctl, ranges), LOG_CONTROL_RANGES);

        type Range = b::vfio_device_feature_dma_logging_range;
        assert_eq!(size_of::<Range>(), LOG_RANGE_LEN);
        assert_eq!(offset_of!(Range, iova), 0);
        assert_eq!(offset_of!(Range, length), 8);

        type Report = b::vfio_device_feature_dma_logging_report;
        assert_eq!(size_of::<Report>(), LOG_REPORT_LEN);
        assert_eq!(offset_of!(Report, iova), LOG_REPORT_IOVA);
        assert_eq!(offset_of!(Report, length), LOG_REPORT_LENGTH);
        assert_eq!(offset_of!(Report, page_size), LOG_REPORT_PAGE_SIZE);
        assert_eq!(offset_of!(Report, bitmap), LOG_REPORT_BITMAP);
    }

    #[test]
    fn get_migration_encoding() {
        let req = FeatureRequest::get_migration();
        let mut want = header(16, 0x1_0000 | 1);
        want.extend_from_slice(&[0; 8]);
        assert_eq!(req.bytes(), want);
        assert_eq!(req.argsz(), 16);
        assert_eq!(req.flags(), b::VFIO_DEVICE_FEATURE_GET | 1);
    }

    #[test]
    fn mig_state_encodings() {
        let mut want = header(16, 0x1_0000 | 2);
        want.extend_from_slice(&[0; 8]);
        assert_eq!(FeatureRequest::get_mig_state().bytes(), want);

        for state in DeviceState::ALL {
            let req = FeatureRequest::set_mig_state(state);
            let mut want = header(16, 0x2_0000 | 2);
            want.extend_from_slice(&state.raw().to_ne_bytes());
            want.extend_from_slice(&(-1i32).to_ne_bytes());
            assert_eq!(req.bytes(), want, "{state}");
            assert_eq!(req.device_state(), state.raw());
            assert_eq!(req.data_fd(), -1);
        }
    }

    #[test]
    fn mig_data_size_encoding() {
        let mut want = header(16, 0x1_0000 | 9);
        want.extend_from_slice(&[0; 8]);
        assert_eq!(FeatureRequest::get_mig_data_size().bytes(), want);
    }

    #[test]
    fn probe_encoding() {
        let req = FeatureRequest::probe(FEATURE_DMA_LOGGING_START, FEATURE_SET);
        assert_eq!(req.bytes(), header(8, 0x4_0000 | 0x2_0000 | 6));
    }

    #[test]
    fn dma_logging_encodings() {
        let req =
            FeatureRequest::dma_logging_start(4096, &[(0, 0x10000), (0x100000, 0x2000)]).unwrap();
        let ptr = req.side().as_ptr() as u64;
        let mut want = header(32, 0x2_0000 | 6);
        want.extend_from_slice(&4096u64.to_ne_bytes());
        want.extend_from_slice(&2u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&ptr.to_ne_bytes());
        assert_eq!(req.bytes(), want);
        assert_eq!(req.side(), &[0, 0x10000, 0x100000, 0x2000]);

        assert_eq!(
            FeatureRequest::dma_logging_stop().bytes(),
            header(8, 0x2_0000 | 7)
        );

        // 130 pages -> 3 words of bitmap.
        let req = FeatureRequest::dma_logging_report(0x4000, 130 * 4096, 4096).unwrap();
        assert_eq!(req.side().len(), 3);
        let ptr = req.side().as_ptr() as u64;
        let mut want = header(40, 0x1_0000 | 8);
        for v in [0x4000u64, 130 * 4096, 4096, ptr] {
            want.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(req.bytes(), want);
    }

    #[test]
    fn dma_logging_is_validated_before_the_kernel() {
        use DmaLoggingError::*;
        let start = FeatureRequest::dma_logging_start;
        assert_eq!(start(4096, &[]).unwrap_err(), NoRanges);
        assert_eq!(start(3000, &[(0, 4096)]).unwrap_err(), PageSize(3000));
        assert_eq!(start(2048, &[(0, 4096)]).unwrap_err(), PageSize(2048));
        let many = vec![(0u64, 4096u64); MAX_DMA_LOGGING_RANGES + 1];
        assert_eq!(start(4096, &many).unwrap_err(), TooManyRanges(257));
        assert!(matches!(start(4096, &[(1, 4096)]), Err(BadRange { .. })));
        assert!(matches!(start(4096, &[(0, 0)]), Err(BadRange { .. })));
        assert!(matches!(
            start(4096, &[(u64::MAX - 4095, 8192)]),
            Err(BadRange { .. })
        ));
        let report = FeatureRequest::dma_logging_report;
        assert!(matches!(report(0, 1 << 50, 4096), Err(BitmapTooLarge(_))));
        assert!(report(0, 512 << 30, 4096).is_ok());
        assert!(matches!(report(0, 100, 4096), Err(BadRange { .. })));
    }

    #[test]
    fn replies_are_decoded() {
        let mut req = FeatureRequest::get_migration();
        req.reply_u64(0, 7);
        let flags = req.migration_flags();
        assert!(flags.contains(MigrationFlags::STOP_COPY));
        assert!(flags.contains(MigrationFlags::P2P));
        assert!(flags.contains(MigrationFlags::PRE_COPY));
        assert_eq!(flags.unknown_bits(), 0);

        let mut req = FeatureRequest::set_mig_state(DeviceState::StopCopy);
        req.reply_u32(MIG_STATE_DATA_FD, 42);
        assert_eq!(req.data_fd(), 42);
        assert_eq!(req.device_state(), 3);

        let mut req = FeatureRequest::get_mig_data_size();
        req.reply_u64(0, 0x1234_5678_9abc);
        assert_eq!(req.stop_copy_length(), 0x1234_5678_9abc);
    }
}
