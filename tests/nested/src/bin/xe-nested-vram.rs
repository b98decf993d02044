// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `xe-nested-vram`: the L2 guest's VRAM workload in the xe-vfio-pci nested
//! test. Maps a PCI memory BAR (its sysfs `resourceN` file), writes a
//! known pattern over all of it, then round after round checks every chunk
//! against the checksum of what it wrote and rewrites one chunk with its
//! next generation. Its state (checksums, generations, round number) lives
//! in guest memory, so it migrates with the guest: the first round that
//! begins after a restore or a migration checks the whole BAR as the
//! source left it.
//!
//! ```text
//! xe-nested-vram --bar /sys/bus/pci/devices/0000:00:05.0/resource2 [--chunk-mib 4] [--seed 1]
//! xe-nested-vram --bar ... --seed 99 --scribble     # write once and exit
//! ```
//!
//! Lines (one per event, for the serial console):
//! `L2-VRAM filled bytes=B chunks=N chunk=C seconds=S`,
//! `L2-VRAM begin round=R`, `L2-VRAM round=R ok=N/N mutated=C seconds=S`
//! or `L2-VRAM round=R BAD=K/N first=C ...`.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use xe_vf_nested_test::vram::{checksum, fill, Checksum, Words};

#[derive(Debug, Parser)]
#[command(about = "Write a pattern over a PCI BAR and keep checking it, chunk by chunk")]
struct Args {
    /// The BAR's sysfs resource file.
    #[arg(long)]
    bar: PathBuf,
    /// Chunk size in MiB (one checksum per chunk).
    #[arg(long, default_value_t = 4)]
    chunk_mib: usize,
    /// Seed of the pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pause between rounds, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pause_ms: u64,
    /// Write the pattern of --seed once and exit (the test overwrites a
    /// VF's LMEM with it before a restore).
    #[arg(long)]
    scribble: bool,
}

/// A shared mapping of the BAR.
struct Bar {
    base: NonNull<u64>,
    words: usize,
}

impl Bar {
    fn map(path: &PathBuf) -> Result<Bar> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len() as usize;
        if len == 0 || !len.is_multiple_of(8) {
            bail!(
                "{}: {len} bytes is not a BAR of 64-bit words",
                path.display()
            );
        }
        // SAFETY: a fresh shared mapping of the whole file; nothing else in
        // this process aliases it, and it stays mapped for the process's life.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmap of {}", path.display()));
        }
        let base = NonNull::new(ptr.cast::<u64>()).context("mmap returned NULL")?;
        Ok(Bar {
            base,
            words: len / 8,
        })
    }

    fn chunk(&mut self, index: usize, words: usize) -> BarChunk<'_> {
        BarChunk {
            bar: self,
            first: index * words,
            words,
        }
    }
}

/// Words `first..first + words` of the BAR.
struct BarChunk<'a> {
    bar: &'a mut Bar,
    first: usize,
    words: usize,
}

impl Words for BarChunk<'_> {
    fn len(&self) -> usize {
        self.words
    }
    fn read(&self, index: usize) -> u64 {
        assert!(self.first + index < self.bar.words);
        // SAFETY: in bounds (asserted) of a live mapping; volatile because
        // the memory is a device BAR another party (the PF) writes too.
        unsafe {
            self.bar
                .base
                .as_ptr()
                .add(self.first + index)
                .read_volatile()
        }
    }
    fn write(&mut self, index: usize, word: u64) {
        assert!(self.first + index < self.bar.words);
        // SAFETY: as in `read`.
        unsafe {
            self.bar
                .base
                .as_ptr()
                .add(self.first + index)
                .write_volatile(word)
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut bar = Bar::map(&args.bar)?;
    let chunk_words = args.chunk_mib * (1 << 20) / 8;
    if chunk_words == 0 || !bar.words.is_multiple_of(chunk_words) {
        bail!(
            "{} bytes of BAR is not a whole number of {} MiB chunks",
            bar.words * 8,
            args.chunk_mib
        );
    }
    let chunks = bar.words / chunk_words;
    let started = Instant::now();
    let mut sums: Vec<Checksum> = Vec::with_capacity(chunks);
    let mut generations = vec![0u64; chunks];
    for c in 0..chunks {
        sums.push(fill(&mut bar.chunk(c, chunk_words), args.seed, c as u64, 0));
    }
    if args.scribble {
        println!(
            "scribbled {} with seed {} in {:.1} s",
            args.bar.display(),
            args.seed,
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    println!(
        "L2-VRAM filled bytes={} chunks={chunks} chunk={} seconds={:.1}",
        bar.words * 8,
        chunk_words * 8,
        started.elapsed().as_secs_f64()
    );
    let mut round: u64 = 0;
    loop {
        round += 1;
        let started = Instant::now();
        println!("L2-VRAM begin round={round}");
        let mut bad = Vec::new();
        for (c, sum) in sums.iter().enumerate() {
            if checksum(&bar.chunk(c, chunk_words)) != *sum {
                bad.push(c);
            }
        }
        // Keep changing part of it: the next generation of one chunk.
        let mutated = (round as usize) % chunks;
        generations[mutated] += 1;
        sums[mutated] = fill(
            &mut bar.chunk(mutated, chunk_words),
            args.seed,
            mutated as u64,
            generations[mutated],
        );
        let seconds = started.elapsed().as_secs_f64();
        if bad.is_empty() {
            println!(
                "L2-VRAM round={round} ok={chunks}/{chunks} mutated={mutated} seconds={seconds:.1}"
            );
        } else {
            println!(
                "L2-VRAM round={round} BAD={}/{chunks} first={} mutated={mutated} seconds={seconds:.1}",
                bad.len(),
                bad[0]
            );
        }
        thread::sleep(Duration::from_millis(args.pause_ms));
    }
}
