// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! RESUMING: a consumer thread parses what the caller writes and applies
//! each packet to the device as it arrives, as the PF driver does.

use std::fs::File;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::context::DeviceContext;
use super::sock::data_pair;
use super::state::DeviceModel;
use crate::xe_stream::{
    ExpectedIdentity, PacketHeader, PacketType, ParserLimits, XeStreamError, XeStreamParser,
    XeStreamSummary, XeStreamVisitor,
};

/// Read size of the consumer.
const READ_CHUNK: usize = 256 * 1024;

/// A running RESUMING session.
pub(crate) struct ResumeStream {
    /// A dup of the caller's end, to end the stream at RESUMING -> STOP
    /// even if the caller still holds its fd.
    caller_end: UnixStream,
    thread: Option<JoinHandle<Result<XeStreamSummary, XeStreamError>>>,
}

impl ResumeStream {
    /// Starts the consumer and returns the caller's write end.
    pub(crate) fn start(
        context: &DeviceContext,
        model: Arc<DeviceModel>,
    ) -> io::Result<(Self, File)> {
        let (device, caller) = data_pair()?;
        let caller_end = UnixStream::from(OwnedFd::from(caller.try_clone()?));
        let thread = context.spawn("xe-vf-restore", move || consume(&model, device))?;
        Ok((
            ResumeStream {
                caller_end,
                thread: Some(thread),
            },
            caller,
        ))
    }

    /// Ends the stream (the consumer drains what was written, then sees
    /// EOF) and returns the load result.
    pub(crate) fn finish(mut self) -> Result<XeStreamSummary, XeStreamError> {
        self.end(Shutdown::Write)
    }

    fn end(&mut self, how: Shutdown) -> Result<XeStreamSummary, XeStreamError> {
        if let Err(e) = self.caller_end.shutdown(how) {
            // ENOTCONN: the consumer already closed its end.
            log::debug!("shutdown of the resume stream: {e}");
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(XeStreamError::Io(io::Error::other(
                "restore thread panicked",
            ))),
            None => Err(XeStreamError::Poisoned),
        }
    }
}

impl Drop for ResumeStream {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.end(Shutdown::Both);
        }
    }
}

fn consume(model: &DeviceModel, mut socket: UnixStream) -> Result<XeStreamSummary, XeStreamError> {
    let config = &model.config;
    let mut parser = XeStreamParser::new(ParserLimits {
        identity: Some(ExpectedIdentity {
            device_id: config.device_id,
            revision_id: config.revision_id,
        }),
        lmem_size: Some(config.lmem_per_tile()),
        tiles: Some(config.tiles),
        gts: Some(config.gt_count()),
    });
    let mut applier = Applier { model };
    let mut buf = vec![0u8; READ_CHUNK];
    let result = loop {
        let n = match socket.read(&mut buf) {
            Ok(0) => break parser.finish(),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(XeStreamError::Io(e)),
        };
        if let Err(e) = parser.feed(&buf[..n], &mut applier) {
            break Err(e);
        }
    };
    match &result {
        Ok(s) => log::debug!(
            "emulated Xe VF restored {} packets, {} bytes",
            s.packets,
            s.total_bytes
        ),
        Err(e) => log::warn!("emulated Xe VF restore failed (errno {}): {e}", e.errno()),
    }
    // Dropping `socket` here: a writer still writing gets EPIPE.
    result
}

/// Applies packets to the device model.
struct Applier<'a> {
    model: &'a DeviceModel,
}

impl Applier<'_> {
    fn reject(kind: PacketType, reason: String) -> XeStreamError {
        XeStreamError::Rejected {
            kind,
            reason,
            errno: libc::EINVAL,
        }
    }
}

impl XeStreamVisitor for Applier<'_> {
    fn on_header(&mut self, _index: u64, _at: u64, h: &PacketHeader) -> Result<(), XeStreamError> {
        let config = &self.model.config;
        match h.kind {
            PacketType::Descriptor | PacketType::Trailer => return Ok(()),
            _ if config.tile_of(h.gt_id) != h.tile_id => {
                return Err(Self::reject(
                    h.kind,
                    format!("gt_id {} is not on tile_id {}", h.gt_id, h.tile_id),
                ))
            }
            PacketType::Vram => return Ok(()),
            _ => {}
        }
        let expected = match h.kind {
            PacketType::Ggtt => config.ggtt_size_of(h.gt_id),
            PacketType::Mmio => config.mmio_size,
            _ => config.guc_size,
        };
        if h.offset != 0 || h.size != expected {
            return Err(Self::reject(
                h.kind,
                format!(
                    "offset {} size {} for GT {}; the VF has {expected} bytes at offset 0",
                    h.offset, h.size, h.gt_id
                ),
            ));
        }
        Ok(())
    }

    fn on_payload(
        &mut self,
        h: &PacketHeader,
        offset_in_packet: u64,
        data: &[u8],
    ) -> Result<(), XeStreamError> {
        match h.kind {
            PacketType::Descriptor | PacketType::Trailer => Ok(()),
            PacketType::Vram => {
                let at = self.model.tile_base(h.tile_id) + h.offset + offset_in_packet;
                self.model
                    .vram
                    .write_at(data, at)
                    .map_err(XeStreamError::Io)
            }
            kind => {
                let mut gt = self
                    .model
                    .gt(h.gt_id)
                    .ok_or_else(|| Self::reject(kind, format!("no GT {}", h.gt_id)))?;
                let blob = gt
                    .component_mut(kind)
                    .ok_or_else(|| Self::reject(kind, "not a GT component".into()))?;
                let (start, len) = (offset_in_packet as usize, blob.len());
                let dst = blob
                    .get_mut(start..start + data.len())
                    .ok_or_else(|| Self::reject(kind, format!("payload beyond {len} bytes")))?;
                dst.copy_from_slice(data);
                Ok(())
            }
        }
    }
}
