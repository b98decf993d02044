// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary bytes as an Xe VF packet stream, fed to the push parser in
//! input-chosen splits, with and without device limits. The parser must
//! never panic, must give the same verdict for every split, and must keep
//! its visitor contract: payload slices in order, exactly `size` bytes
//! per packet, the descriptor before anything else.

#![no_main]

use libfuzzer_sys::fuzz_target;
use xe_vf_plugin::xe_stream::{
    inspect, inspect_with_limits, Descriptor, PacketHeader, PacketType, ParserLimits,
    XeStreamError, XeStreamParser, XeStreamSummary, XeStreamVisitor, HEADER_LEN,
};
use xe_vf_plugin_fuzz::{ParserInput, Splits};

/// Checks the order of callbacks against the contract in `XeStreamVisitor`.
#[derive(Default)]
struct ContractVisitor {
    headers: u64,
    current: Option<PacketHeader>,
    payload_done: u64,
    descriptor_seen: bool,
    trailer_seen: bool,
}

impl XeStreamVisitor for ContractVisitor {
    fn on_header(
        &mut self,
        index: u64,
        _stream_offset: u64,
        header: &PacketHeader,
    ) -> Result<(), XeStreamError> {
        assert!(!self.trailer_seen, "header after the trailer");
        assert!(
            self.current.is_none(),
            "header before the previous packet ended"
        );
        assert_eq!(index, self.headers, "packet indices skip");
        assert_eq!(PacketHeader::decode(&header.encode()).unwrap(), *header);
        if index == 0 {
            assert_eq!(header.kind, PacketType::Descriptor);
        }
        self.headers += 1;
        self.current = Some(*header);
        self.payload_done = 0;
        Ok(())
    }

    fn on_descriptor(&mut self, descriptor: &Descriptor) -> Result<(), XeStreamError> {
        assert!(!self.descriptor_seen, "second descriptor");
        self.descriptor_seen = true;
        // Decoding what we encode gives the same descriptor back.
        let payload = descriptor.encode().unwrap();
        assert_eq!(&Descriptor::decode(&payload).unwrap(), descriptor);
        Ok(())
    }

    fn on_payload(
        &mut self,
        header: &PacketHeader,
        offset_in_packet: u64,
        data: &[u8],
    ) -> Result<(), XeStreamError> {
        let current = self.current.expect("payload outside a packet");
        assert_eq!(*header, current);
        assert!(!data.is_empty(), "empty payload slice");
        assert_eq!(offset_in_packet, self.payload_done, "payload out of order");
        self.payload_done += data.len() as u64;
        assert!(
            self.payload_done <= header.size,
            "payload beyond the header's size"
        );
        Ok(())
    }

    fn on_packet_end(&mut self, header: &PacketHeader) -> Result<(), XeStreamError> {
        let current = self.current.take().expect("packet end outside a packet");
        assert_eq!(*header, current);
        assert_eq!(self.payload_done, header.size, "packet ended early");
        Ok(())
    }

    fn on_trailer(&mut self) -> Result<(), XeStreamError> {
        assert!(self.descriptor_seen, "trailer without a descriptor");
        assert!(!self.trailer_seen, "second trailer");
        self.trailer_seen = true;
        Ok(())
    }
}

/// Feeds `stream` in pieces whose sizes come from `seed` (up to 2^1..2^10
/// bytes); `None` feeds it whole. Returns the verdict as text, so errors
/// compare.
fn parse(
    stream: &[u8],
    limits: ParserLimits,
    seed: Option<u16>,
) -> Result<XeStreamSummary, String> {
    let mut parser = XeStreamParser::new(limits);
    let mut visitor = ContractVisitor::default();
    let mut rest = stream;
    let mut splits = Splits::new(u32::from(seed.unwrap_or(0)));
    let mut fed = 0u64;
    while !rest.is_empty() {
        let n = match seed {
            None => rest.len(),
            Some(seed) => splits.next(1 << (seed % 10 + 1)),
        }
        .min(rest.len());
        if let Err(e) = parser.feed(&rest[..n], &mut visitor) {
            // Poisoned from now on.
            assert!(parser.feed(b"x", &mut ()).is_err());
            assert!(!parser.is_finished());
            return Err(e.to_string());
        }
        fed += n as u64;
        assert_eq!(parser.bytes_consumed(), fed);
        rest = &rest[n..];
    }
    let finished = parser.is_finished();
    assert_eq!(finished, visitor.trailer_seen);
    let result = parser.finish();
    if let Ok(summary) = &result {
        assert!(finished);
        assert_eq!(summary.total_bytes, stream.len() as u64);
        assert!(summary.packets >= 2);
        assert_eq!(summary.packets, visitor.headers);
        let per_type: u64 = summary.per_type.iter().map(|s| s.packets).sum();
        assert_eq!(per_type, summary.packets);
        let payload: u64 = summary.per_type.iter().map(|s| s.payload_bytes).sum();
        assert_eq!(
            payload + summary.packets * HEADER_LEN as u64,
            summary.total_bytes
        );
        assert_eq!(
            summary.vram_bytes,
            summary.stats(PacketType::Vram).payload_bytes
        );
    }
    result.map_err(|e| e.to_string())
}

fuzz_target!(|input: &[u8]| {
    let Some(ParserInput {
        limits,
        keep_packets,
        split_seed,
        stream,
    }) = ParserInput::parse(input)
    else {
        return;
    };

    let whole = parse(stream, limits, None);
    let split = parse(stream, limits, Some(split_seed));
    assert_eq!(whole, split, "verdict depends on how the stream is split");

    // Without limits, a stream accepted with limits is accepted too.
    let unlimited = parse(stream, ParserLimits::default(), Some(split_seed));
    if whole.is_ok() {
        assert_eq!(unlimited, whole);
    }

    // inspect is the same parser behind a reader.
    let inspected = inspect_with_limits(stream, limits, keep_packets);
    let verdict = inspected.as_ref().map(|i| i.summary.clone());
    assert_eq!(verdict.map_err(|e| e.to_string()), whole);
    if let Ok(inspection) = &inspected {
        if keep_packets {
            assert_eq!(inspection.packets.len() as u64, inspection.summary.packets);
        }
    }
    assert_eq!(inspect(stream, false).is_ok(), unlimited.is_ok());
});
