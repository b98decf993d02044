// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! STOP_COPY: a producer thread writes the Xe packet stream into the
//! device end of a socket pair; the caller reads the other end.

use std::fs::File;
use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::context::DeviceContext;
use super::faults::SaveFaults;
use super::sock::{data_pair, send_all};
use super::state::{lock, DeviceModel, SCAN_CHUNK};
use crate::xe_stream::{descriptor_packet, trailer_header, PacketHeader, PacketType};

/// Set when the session ends; wakes a stalled producer.
#[derive(Default)]
struct Cancel {
    cancelled: Mutex<bool>,
    cv: Condvar,
}

impl Cancel {
    fn is_set(&self) -> bool {
        *lock(&self.cancelled)
    }

    fn set(&self) {
        *lock(&self.cancelled) = true;
        self.cv.notify_all();
    }

    fn wait(&self) {
        let mut c = lock(&self.cancelled);
        while !*c {
            c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A running STOP_COPY session.
pub(crate) struct SaveStream {
    cancel: Arc<Cancel>,
    socket: UnixStream,
    thread: Option<JoinHandle<io::Result<u64>>>,
}

impl SaveStream {
    /// Starts the producer and returns the caller's read end.
    pub(crate) fn start(
        context: &DeviceContext,
        model: Arc<DeviceModel>,
        faults: SaveFaults,
    ) -> io::Result<(Self, File)> {
        let (device, caller) = data_pair()?;
        let cancel = Arc::new(Cancel::default());
        let socket = device.try_clone()?;
        let thread = {
            let cancel = cancel.clone();
            context.spawn("xe-vf-save", move || {
                let mut sink = Sink {
                    socket: device,
                    pos: 0,
                    faults,
                    cancel: &cancel,
                };
                let result = produce(&model, &mut sink);
                // EOF for the reader, even though `SaveStream` still
                // holds a clone of this end.
                let how = if result.is_ok() {
                    Shutdown::Write
                } else {
                    Shutdown::Both
                };
                let _ = sink.socket.shutdown(how);
                match &result {
                    Ok(n) => log::debug!("emulated Xe VF save stream complete: {n} bytes"),
                    Err(e) => log::debug!("emulated Xe VF save stream ended early: {e}"),
                }
                result
            })?
        };
        Ok((
            SaveStream {
                cancel,
                socket,
                thread: Some(thread),
            },
            caller,
        ))
    }

    /// Ends the session promptly, finished or not, and joins the producer.
    pub(crate) fn stop(mut self) {
        self.shutdown_and_join();
    }

    fn shutdown_and_join(&mut self) {
        self.cancel.set();
        // Wakes a producer blocked on a full socket.
        let _ = self.socket.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("emulated Xe VF save thread panicked");
            }
        }
    }
}

impl Drop for SaveStream {
    fn drop(&mut self) {
        self.shutdown_and_join();
    }
}

/// The device end, with save faults applied on the way out.
struct Sink<'a> {
    socket: UnixStream,
    pos: u64,
    faults: SaveFaults,
    cancel: &'a Cancel,
}

impl Sink<'_> {
    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        if self.cancel.is_set() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "save stream closed",
            ));
        }
        let end = self.pos + data.len() as u64;
        if let Some(stall) = self.faults.stall_after.filter(|s| *s < end) {
            let keep = stall.saturating_sub(self.pos) as usize;
            self.put_unstalled(&data[..keep])?;
            log::debug!("emulated Xe VF save stream stalls at byte {stall} (injected)");
            self.cancel.wait();
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stalled save stream closed",
            ));
        }
        self.put_unstalled(data)
    }

    fn put_unstalled(&mut self, data: &[u8]) -> io::Result<()> {
        let end = self.pos + data.len() as u64;
        match self
            .faults
            .corrupt_at
            .filter(|c| (self.pos..end).contains(c))
        {
            Some(at) => {
                let mut copy = data.to_vec();
                copy[(at - self.pos) as usize] ^= 0xff;
                send_all(&self.socket, &copy)?;
            }
            None => send_all(&self.socket, data)?,
        }
        self.pos = end;
        Ok(())
    }

    fn header(&mut self, header: &PacketHeader) -> io::Result<()> {
        self.put(&header.encode())
    }
}

/// Writes the whole stream: descriptor; per GT its GuC, GGTT, MMIO (and
/// the tile's VRAM chunks after the tile's primary GT); trailer.
fn produce(model: &DeviceModel, sink: &mut Sink<'_>) -> io::Result<u64> {
    let config = &model.config;
    let (header, payload) = descriptor_packet(&config.descriptor())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    sink.header(&header)?;
    sink.put(&payload)?;
    let mut buf = vec![0u8; SCAN_CHUNK];
    for gt_id in 0..config.gt_count() {
        let tile = config.tile_of(gt_id);
        for kind in [PacketType::Guc, PacketType::Ggtt, PacketType::Mmio] {
            // A copy bounded by the config, so the GT lock is not held
            // while the reader is slow.
            let blob = model
                .gt(gt_id)
                .and_then(|gt| gt.component(kind).map(<[u8]>::to_vec))
                .unwrap_or_default();
            // xe saves a component only when it has bytes (a media GT has
            // no GGTT).
            if blob.is_empty() {
                continue;
            }
            sink.header(&PacketHeader::new(kind, tile, gt_id, 0, blob.len() as u64))?;
            sink.put(&blob)?;
        }
        if config.is_primary_gt(gt_id) {
            save_vram(model, sink, tile, gt_id, &mut buf)?;
        }
    }
    sink.header(&trailer_header())?;
    Ok(sink.pos)
}

fn save_vram(
    model: &DeviceModel,
    sink: &mut Sink<'_>,
    tile: u8,
    gt_id: u8,
    buf: &mut [u8],
) -> io::Result<()> {
    let lmem = model.config.lmem_per_tile();
    let chunk = model.config.vram_chunk_size;
    let base = model.tile_base(tile);
    let mut offset = 0;
    while offset < lmem {
        let size = chunk.min(lmem - offset);
        sink.header(&PacketHeader::new(
            PacketType::Vram,
            tile,
            gt_id,
            offset,
            size,
        ))?;
        let mut done = 0;
        while done < size {
            let n = (size - done).min(buf.len() as u64) as usize;
            model.vram.read_at(&mut buf[..n], base + offset + done)?;
            sink.put(&buf[..n])?;
            done += n as u64;
        }
        offset += size;
    }
    Ok(())
}
