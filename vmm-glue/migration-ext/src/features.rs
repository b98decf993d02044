// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Negotiation in `Start`: the source names the optional features it
//! speaks in `Start`'s header, the destination answers with those of them
//! it accepts in the padding of its `Ok`, and neither side uses a feature
//! the other did not name. A peer that predates features sends and
//! ignores zeros there, so it gets the protocol as it was.

use std::io::{Read, Write};

use log::debug;
use vm_migration::protocol::{ProtocolFeatures, Request, Response};
use vm_migration::MigratableError;

use crate::connection::read_answer;

/// Every optional feature this crate implements.
pub const SUPPORTED_FEATURES: ProtocolFeatures = ProtocolFeatures::DEVICE_STATE
    .union(ProtocolFeatures::SWITCHOVER)
    .union(ProtocolFeatures::DEVICE_STATE_CONNECTIONS)
    .union(ProtocolFeatures::VERIFY)
    .union(ProtocolFeatures::VRAM_PRECOPY);

/// Source: sends `Start` offering `offered`; returns the features both
/// sides speak.
pub fn start<C: Read + Write>(
    conn: &mut C,
    offered: ProtocolFeatures,
) -> Result<ProtocolFeatures, MigratableError> {
    Request::start_with_features(offered).write_to(conn)?;
    let answered = read_answer(conn)?.features();
    let agreed = answered & offered;
    debug!("migration features: offered {offered:?}, agreed {agreed:?}");
    Ok(agreed)
}

/// Destination: the answer to a `Start` request, accepting what both
/// `request` offers and this side `accepts`; returns the answer and the
/// features agreed.
pub fn answer(
    request: &Request,
    accepts: ProtocolFeatures,
) -> Result<(Response, ProtocolFeatures), MigratableError> {
    request.sender_protocol_version()?;
    let agreed = request.sender_features() & accepts;
    debug!("migration features: agreed {agreed:?}");
    Ok((Response::ok_with_features(agreed), agreed))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use vm_migration::protocol::Command;

    use super::*;

    #[test]
    fn both_sides_agree_on_what_both_name() {
        let (mut source, mut destination) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let request = Request::read_from(&mut destination).unwrap();
            assert_eq!(request.command(), Command::Start);
            let (response, agreed) = answer(&request, ProtocolFeatures::DEVICE_STATE).unwrap();
            response.write_to(&mut destination).unwrap();
            agreed
        });
        let agreed = start(&mut source, SUPPORTED_FEATURES).unwrap();
        assert_eq!(agreed, ProtocolFeatures::DEVICE_STATE);
        assert_eq!(peer.join().unwrap(), ProtocolFeatures::DEVICE_STATE);
    }

    #[test]
    fn a_destination_that_predates_features_agrees_to_none() {
        let (mut source, mut destination) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            Request::read_from(&mut destination).unwrap();
            Response::ok().write_to(&mut destination).unwrap();
        });
        assert_eq!(
            start(&mut source, SUPPORTED_FEATURES).unwrap(),
            ProtocolFeatures::empty()
        );
        peer.join().unwrap();
    }

    #[test]
    fn a_start_of_an_unknown_version_is_refused() {
        let mut raw = Vec::new();
        Request::start().write_to(&mut raw).unwrap();
        raw[2..4].copy_from_slice(&9u16.to_le_bytes());
        let request = Request::read_from(&mut &raw[..]).unwrap();
        assert!(answer(&request, SUPPORTED_FEATURES).is_err());
    }
}
