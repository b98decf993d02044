// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Bounded, pipelined byte pumps and deadline-aware fd I/O.
//!
//! Device data moves through a fixed pool of buffers: one thread fills
//! them, the caller drains them, so reading the source overlaps writing
//! the destination while memory stays `depth * buffer_size`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::{JoinHandle, Scope, ScopedJoinHandle};
use std::time::Duration;

/// Waits until `fd` is ready for `events` or `timeout` passes.
fn wait_fd(fd: &File, events: libc::c_short, timeout: Duration, what: &str) -> io::Result<()> {
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid, initialised pollfd and we pass a count
        // of exactly one; poll does not retain the pointer.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        match rc {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{what} stalled: no progress for {} ms", timeout.as_millis()),
                ))
            }
            n if n > 0 => return Ok(()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// A device data fd whose reads and writes fail after `timeout` without
/// progress instead of blocking forever on a stuck device.
pub struct DeadlineFd {
    file: File,
    timeout: Duration,
}

impl DeadlineFd {
    pub fn new(file: File, timeout: Duration) -> Self {
        DeadlineFd { file, timeout }
    }
}

impl Read for DeadlineFd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        wait_fd(&self.file, libc::POLLIN, self.timeout, "device data stream")?;
        self.file.read(buf)
    }
}

impl Write for DeadlineFd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        wait_fd(
            &self.file,
            libc::POLLOUT,
            self.timeout,
            "device data stream",
        )?;
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The reading thread of a [`ReadAhead`]: a plain thread for a reader
/// the pump owns, a scoped one for a reader borrowed from the caller.
enum Reader<'scope> {
    Owned(JoinHandle<()>),
    Scoped(ScopedJoinHandle<'scope, ()>),
}

/// Reads `reader` to EOF on a thread of its own into a bounded buffer pool.
pub struct ReadAhead<'scope> {
    filled: Option<Filled>,
    empty: Option<SyncSender<Chunk>>,
    thread: Option<Reader<'scope>>,
}

/// One buffer of the pool and how much of it holds data.
///
/// The buffer keeps its full length for its whole life, so handing it
/// back and forth never re-initialises it (truncating and growing a
/// `Vec` again zero-fills the regrown part: a memset of the whole stream
/// on the destination).
pub struct Chunk {
    buf: Vec<u8>,
    len: usize,
}

impl std::ops::Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Where the consumer takes filled buffers (or the reader's error).
type Filled = Receiver<io::Result<Chunk>>;

/// Both ends of the buffer pool, and the loop the reading thread runs.
struct Pool {
    filled_tx: SyncSender<io::Result<Chunk>>,
    empty_rx: Receiver<Chunk>,
    fill: usize,
}

impl Pool {
    /// The pool and the consumer's ends of it.
    fn new(fill: usize, headroom: usize, depth: usize) -> (Self, Filled, SyncSender<Chunk>) {
        let depth = depth.max(1);
        let fill = fill.max(1);
        let capacity = fill.saturating_add(headroom);
        let (filled_tx, filled) = sync_channel::<io::Result<Chunk>>(depth);
        let (empty, empty_rx) = sync_channel::<Chunk>(depth);
        for _ in 0..depth {
            // Cannot block: the channel holds `depth` items.
            let _ = empty.try_send(Chunk {
                buf: vec![0u8; capacity],
                len: 0,
            });
        }
        let pool = Pool {
            filled_tx,
            empty_rx,
            fill,
        };
        (pool, filled, empty)
    }

    /// Fills buffers from `reader` until EOF, an error, or the consumer
    /// going away.
    fn run<R: Read>(self, mut reader: R) {
        let mut at_eof = false;
        while let Ok(mut chunk) = self.empty_rx.recv() {
            chunk.len = 0;
            if at_eof {
                let _ = self.filled_tx.send(Ok(chunk));
                return;
            }
            // Every chunk is made by `new` with `capacity` bytes.
            let buf = &mut chunk.buf[..];
            let mut len = 0;
            let result = loop {
                if len >= self.fill {
                    break Ok(());
                }
                match reader.read(&mut buf[len..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break Err(e),
                    Ok(0) => {
                        at_eof = true;
                        break Ok(());
                    }
                    Ok(n) => len += n,
                }
            };
            match result {
                Ok(()) => {
                    chunk.len = len;
                    let end = len == 0;
                    if self.filled_tx.send(Ok(chunk)).is_err() || end {
                        return;
                    }
                }
                Err(e) => {
                    let _ = self.filled_tx.send(Err(e));
                    return;
                }
            }
        }
    }
}

const THREAD_NAME: &str = "xe-read-ahead";

impl ReadAhead<'static> {
    /// Starts reading; at most `depth` buffers of `buffer_size` exist, and
    /// each is filled completely unless the reader ends.
    pub fn spawn<R: Read + Send + 'static>(
        reader: R,
        buffer_size: usize,
        depth: usize,
    ) -> io::Result<Self> {
        let (pool, filled, empty) = Pool::new(buffer_size, 0, depth);
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || pool.run(reader))?;
        Ok(ReadAhead {
            filled: Some(filled),
            empty: Some(empty),
            thread: Some(Reader::Owned(thread)),
        })
    }
}

impl<'scope> ReadAhead<'scope> {
    /// Like [`ReadAhead::spawn`], but for a reader that lives only as long
    /// as `scope` (a socket the VMM lends), and with `headroom`: a buffer
    /// has `headroom` bytes beyond `fill` and is handed on once it holds
    /// at least `fill` bytes.
    ///
    /// Full buffers mean few, large writes downstream however small the
    /// reader's pieces are (a decoder returns one record per read). The
    /// headroom lets a reader that can land a whole record in the
    /// caller's buffer (a DATA record of up to `headroom` bytes) always
    /// do so, instead of staging it and copying it over in parts.
    pub fn spawn_scoped<'env, R: Read + Send + 'scope>(
        scope: &'scope Scope<'scope, 'env>,
        reader: R,
        fill: usize,
        headroom: usize,
        depth: usize,
    ) -> io::Result<Self> {
        let (pool, filled, empty) = Pool::new(fill, headroom, depth);
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn_scoped(scope, move || pool.run(reader))?;
        Ok(ReadAhead {
            filled: Some(filled),
            empty: Some(empty),
            thread: Some(Reader::Scoped(thread)),
        })
    }

    /// Next chunk; an empty chunk means EOF.
    pub fn next_chunk(&mut self) -> io::Result<Chunk> {
        match self.filled.as_ref().map(Receiver::recv) {
            Some(Ok(r)) => r,
            _ => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "read-ahead thread ended unexpectedly",
            )),
        }
    }

    /// Hands a drained buffer back to the reader.
    pub fn recycle(&self, chunk: Chunk) {
        if let Some(empty) = &self.empty {
            let _ = empty.try_send(chunk);
        }
    }

    /// Stops the reader and waits for it. The caller must first make its
    /// source return (EOF, error, or closed by the device), or this waits
    /// for the source's own timeout.
    pub fn join(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Without a receiver the thread's next send fails, so it stops
        // after the read it may be blocked in.
        drop(self.filled.take());
        drop(self.empty.take());
        match self.thread.take() {
            Some(Reader::Owned(t)) => {
                let _ = t.join();
            }
            Some(Reader::Scoped(t)) => {
                let _ = t.join();
            }
            None => {}
        }
    }
}

impl Drop for ReadAhead<'_> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns at most `step` bytes per read, as a socket does.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.data.len().min(buf.len()).min(self.step);
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn recycled_chunks_carry_every_byte_in_order() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut out = Vec::new();
        std::thread::scope(|s| {
            let reader = Trickle {
                data: &data,
                step: 3000,
            };
            let mut ra = ReadAhead::spawn_scoped(s, reader, 8192, 4096, 2).unwrap();
            loop {
                let chunk = ra.next_chunk().unwrap();
                if chunk.is_empty() {
                    break;
                }
                // Filled to at least `fill` unless the reader ended, never
                // beyond `fill + headroom`.
                assert!(chunk.len() <= 8192 + 4096);
                assert!(chunk.len() >= 8192 || out.len() + chunk.len() == data.len());
                out.extend_from_slice(&chunk);
                ra.recycle(chunk);
            }
        });
        assert!(out == data);
    }
}
