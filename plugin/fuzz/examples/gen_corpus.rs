// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Writes the seed corpus: small valid inputs for every target and a few
//! broken variants of them, so the fuzzer starts past the magic numbers
//! and checksums.
//!
//! `cargo run --manifest-path plugin/fuzz/Cargo.toml --example gen_corpus
//! -- plugin/fuzz/corpus` (scripts/fuzz.sh --gen-corpus does this).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use xe_vf_plugin::emulated::EmulatedXeVf;
use xe_vf_plugin::state_format::{EncoderOptions, StateEncoder, StateHeader, DEVICE_KIND_XE_VF};
use xe_vf_plugin::xe_stream::{
    descriptor_packet, trailer_header, write_packet, Descriptor, Klv, PacketHeader, PacketType,
};
use xe_vf_plugin::{DeviceIdentity, DeviceState, MigrationDevice, MigrationFlags};
use xe_vf_plugin_fuzz::{restore_config, ParserInput};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "plugin/fuzz/corpus".into()),
    );
    state_seeds(&root.join("state_decoder"))?;
    roundtrip_seeds(&root.join("state_roundtrip"))?;
    let saved = saved_stream()?;
    parser_seeds(&root.join("xe_stream_parser"), &saved)?;
    restore_seeds(&root.join("xe_restore"), &saved)?;
    Ok(())
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(name), bytes)?;
    println!("{}/{name}: {} bytes", dir.display(), bytes.len());
    Ok(())
}

/// Device bytes with zero runs on both sides of some data.
fn mixed_data() -> Vec<u8> {
    let mut raw = vec![0u8; 8192];
    raw.extend((0..100u32).map(|i| (i * 37 % 251) as u8));
    raw.extend(std::iter::repeat_n(0u8, 4096));
    raw.extend_from_slice(b"tail");
    raw
}

fn encode(raw: &[u8], estimated: u64, chunk_size: u32, zero_elision: bool) -> Result<Vec<u8>> {
    let identity = DeviceIdentity {
        vendor_id: 0x8086,
        device_id: 0xe20b,
        revision_id: 0,
        vram_size: Some(16 * 1024),
    };
    let header = StateHeader::new(
        DEVICE_KIND_XE_VF,
        identity,
        MigrationFlags::XE_VF.bits(),
        estimated,
    );
    let options = EncoderOptions {
        chunk_size,
        zero_elision,
        zero_block: 512.min(chunk_size),
    };
    let mut out = Vec::new();
    let mut encoder = StateEncoder::new(&mut out, header, options)?;
    encoder.write_all(raw)?;
    encoder.finish()?;
    Ok(out)
}

fn state_seeds(dir: &Path) -> Result<()> {
    let raw = mixed_data();
    let len = raw.len() as u64;
    put(dir, "empty", &encode(&[], 0, 4096, true)?)?;
    put(
        dir,
        "data-small-chunks",
        &encode(&raw[8192..8292], 100, 16, true)?,
    )?;
    let mixed = encode(&raw, len, 4096, true)?;
    put(dir, "zero-data-zero", &mixed)?;
    put(dir, "size-unknown", &encode(&raw, 0, 4096, true)?)?;
    // The header's MIG_DATA_SIZE is an estimate: one that misses decodes.
    put(
        dir,
        "wrong-announced-size",
        &encode(&raw, len + 1, 4096, true)?,
    )?;
    put(
        dir,
        "no-elision",
        &encode(&raw[8000..8400], 400, 128, false)?,
    )?;
    put(dir, "truncated", &mixed[..mixed.len() - 7])?;
    let mut flipped = mixed.clone();
    let at = flipped.len() - 30;
    flipped[at] ^= 0x40;
    put(dir, "payload-bit-flip", &flipped)?;
    let mut embedded = mixed;
    embedded.extend_from_slice(b"bytes after END belong to the carrier");
    put(dir, "embedded", &embedded)?;
    Ok(())
}

fn roundtrip_seeds(dir: &Path) -> Result<()> {
    let raw = mixed_data();
    // [options, split seed, device bytes]: see fuzz_targets/state_roundtrip.rs.
    for (name, opts, split, data) in [
        ("elide-chunk4096", 0x0b, 13, &raw[..]),
        ("plain-chunk512", 0x08, 7, &raw[8000..]),
        ("elide-chunk16-byte-writes", 0x15, 0, &raw[8100..8400]),
        ("elide-chunk1", 0x01, 3, &raw[8180..8200]),
    ] {
        let mut input = vec![opts, split];
        input.extend_from_slice(data);
        put(dir, name, &input)?;
    }
    Ok(())
}

/// The STOP_COPY stream of a `restore_config` device with filled VRAM.
fn saved_stream() -> Result<Vec<u8>> {
    let vf = EmulatedXeVf::new(restore_config())?;
    vf.fill_vram(7, 50)?;
    vf.set_state(DeviceState::RunningP2p)?;
    vf.set_state(DeviceState::Stop)?;
    let mut fd = vf
        .set_state(DeviceState::StopCopy)?
        .ok_or("STOP -> STOP_COPY gave no data fd")?;
    let mut stream = Vec::new();
    fd.read_to_end(&mut stream)?;
    vf.set_state(DeviceState::Stop)?;
    Ok(stream)
}

/// DESCRIPTOR (with `device_id`, an unknown KLV) + one GGTT packet + TRAILER.
fn small_stream(device_id: u16, vram: Option<(u64, u64)>) -> Result<Vec<u8>> {
    let config = restore_config();
    let mut descriptor = Descriptor::new(device_id, config.revision_id);
    descriptor.other.push(Klv {
        key: 0x1234,
        value: vec![0xdead_beef],
    });
    let (header, payload) = descriptor_packet(&descriptor)?;
    let mut out = Vec::new();
    write_packet(&mut out, &header, &payload)?;
    let ggtt = vec![0x5au8; config.ggtt_size as usize];
    let h = PacketHeader::new(PacketType::Ggtt, 0, 1, 0, config.ggtt_size);
    write_packet(&mut out, &h, &ggtt)?;
    if let Some((offset, size)) = vram {
        let h = PacketHeader::new(PacketType::Vram, 0, 0, offset, size);
        write_packet(&mut out, &h, &vec![0xa5u8; size as usize])?;
    }
    write_packet(&mut out, &trailer_header(), &[])?;
    Ok(out)
}

fn parser_seeds(dir: &Path, saved: &[u8]) -> Result<()> {
    let device_id = restore_config().device_id;
    let with_prefix = |prefix: [u8; 3], stream: &[u8]| {
        let mut input = prefix.to_vec();
        input.extend_from_slice(stream);
        input
    };
    let all = ParserInput::prefix_all_limits(0x0305);
    put(dir, "device-stream", &with_prefix(all, saved))?;
    put(
        dir,
        "device-stream-no-limits",
        &with_prefix([0, 9, 0], saved),
    )?;
    let small = small_stream(device_id, Some((4096, 64)))?;
    put(dir, "small", &with_prefix(all, &small))?;
    put(dir, "small-byte-feeds", &with_prefix([0x80, 0, 0], &small))?;
    let other = small_stream(0x1234, None)?;
    put(dir, "other-device", &with_prefix(all, &other))?;
    put(
        dir,
        "vram-out-of-bounds",
        &with_prefix(all, &small_stream(device_id, Some((16 * 1024 - 8, 64)))?),
    )?;
    put(
        dir,
        "truncated",
        &with_prefix(all, &small[..small.len() - 30]),
    )?;
    Ok(())
}

fn restore_seeds(dir: &Path, saved: &[u8]) -> Result<()> {
    let device_id = restore_config().device_id;
    put(dir, "device-stream", saved)?;
    put(dir, "small", &small_stream(device_id, Some((0, 100)))?)?;
    put(dir, "other-device", &small_stream(device_id ^ 1, None)?)?;
    put(
        dir,
        "vram-out-of-bounds",
        &small_stream(device_id, Some((16 * 1024 - 8, 64)))?,
    )?;
    put(dir, "truncated", &saved[..saved.len() / 2])?;
    let mut bad_gt = small_stream(device_id, None)?;
    // GGTT packet header's gt_id (first header after the descriptor).
    let descriptor_len = 24 + u64::from_le_bytes(bad_gt[16..24].try_into()?) as usize;
    bad_gt[descriptor_len + 3] = 7;
    put(dir, "no-such-gt", &bad_gt)?;
    Ok(())
}
