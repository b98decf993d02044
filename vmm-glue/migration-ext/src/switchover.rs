// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The two-step switch-over (`ProtocolFeatures::SWITCHOVER`): never two
//! running copies of the VM.
//!
//! With a single `Complete`, a destination that resumed the VM and whose
//! `Ok` was lost leaves the VM running on both hosts, since the source
//! resumes its own copy on any failure. With two steps the destination
//! answers `Complete` once it holds and has checked everything ("ready"),
//! but keeps the VM paused; the source then sends `Switchover`
//! ([`hand_over`]) and from that moment never resumes the VM by itself.
//! Who runs the VM when something fails:
//!
//! | when | source | destination |
//! | --- | --- | --- |
//! | before ready | resumes | discards |
//! | ready, `Switchover` not sent (no byte of it left) | resumes | keeps it paused, says so (it cannot know) |
//! | `Switchover` sent, no answer (drop, stall, EOF) | stays paused, outcome unknown | runs it if it got `Switchover` ([`await_go`]), else keeps it paused |
//! | `Switchover` sent, answered `Error` (the destination could not resume) | resumes | discards |
//!
//! An outcome is "unknown" on a side that cannot tell whether the other
//! runs the VM: it stays paused, and its error says how an operator
//! decides ([`SOURCE_UNKNOWN`], [`DESTINATION_KEPT`]). A peer that does not
//! agree to `SWITCHOVER` gets the single step, and the source logs the
//! risk ([`negotiated`]).

use std::io::{self, Read, Write};

use anyhow::anyhow;
use log::warn;
use vm_migration::protocol::{Command, ProtocolFeatures, Request, Response, Status};
use vm_migration::MigratableError;

use crate::connection::{is_eof, MAX_ERROR_MESSAGE};

/// Outermost message of a source's unknown outcome.
pub const SOURCE_UNKNOWN: &str = "Migration outcome unknown: the destination did not confirm that \
     it runs the VM, which stays Paused here. Query the destination (ch-remote info) once its \
     receive-migration has ended: if the VM runs there, delete this one (ch-remote delete); if \
     not, resume this one (ch-remote resume)";

/// Outermost message of a destination that lost the source while ready.
pub const DESTINATION_KEPT: &str = "Lost the source after this VM was ready: it stays Paused \
     here and may run on the source. Query the source (ch-remote info): if the VM runs there, \
     delete this one (ch-remote delete); if it is paused or gone, resume this one (ch-remote \
     resume) and delete the source's";

/// Outermost message of a migration refused because the last one's
/// outcome is unknown.
pub const OUTCOME_UNKNOWN_REFUSAL: &str = "Refusing to migrate: the last migration's outcome is \
     unknown, so this VM may run on the other host. Check there first: if the VM runs there, \
     delete this one (ch-remote delete); if not, resume this one (ch-remote resume), or migrate \
     it as it is with outcome_checked=on";

/// A VM whose last migration's outcome is `unknown` (its reason) may run
/// on the other host: migrating this copy could leave two running. So a
/// new migration waits for the user's decision: the VM resumed here (the
/// VMM then forgets the unknown outcome), or `checked` (the user says they
/// looked at the other host).
pub fn check_outcome_known(unknown: Option<&str>, checked: bool) -> Result<(), MigratableError> {
    match unknown {
        None => Ok(()),
        Some(reason) if checked => {
            warn!("Migrating a VM whose last migration's outcome is unknown, as the user checked: {reason}");
            Ok(())
        }
        Some(reason) => Err(MigratableError::MigrateSend(
            anyhow!("{reason}").context(OUTCOME_UNKNOWN_REFUSAL),
        )),
    }
}

/// Source: whether the two steps are used, from what it `offered` and
/// both `agreed` to; warns when the destination cannot take them.
pub fn negotiated(offered: ProtocolFeatures, agreed: ProtocolFeatures) -> bool {
    let two_step = agreed.contains(ProtocolFeatures::SWITCHOVER);
    if offered.contains(ProtocolFeatures::SWITCHOVER) && !two_step {
        warn!(
            "The destination does not support the two-step switch-over: if its answer to \
             Complete is lost, both may run the VM (this one resumes on any failure)"
        );
    }
    two_step
}

fn not_sent(cause: String) -> MigratableError {
    MigratableError::MigrateSend(anyhow!("Switchover was not sent: {cause}"))
}

fn unknown(cause: anyhow::Error) -> MigratableError {
    MigratableError::SwitchoverUnconfirmed(cause.context(SOURCE_UNKNOWN))
}

/// Source, once the destination answered `Complete`: hands the VM over
/// ([`send_switchover`], then [`read_confirmation`]).
///
/// - `Ok`: the destination runs the VM (or holds it, after
///   `CompletePaused`).
/// - `MigrateSend`: no byte of the request left, or the destination
///   answered `Error`: it does not run the VM, and the source may resume.
/// - `SwitchoverUnconfirmed`: the request (or part of it) left and no
///   answer came: the destination may run the VM, so the source must stay
///   paused for an operator to decide.
pub fn hand_over<C: Read + Write>(conn: &mut C) -> Result<(), MigratableError> {
    send_switchover(conn)?;
    read_confirmation(conn)
}

/// Sends `Switchover`. `MigrateSend` means no byte of it left this host
/// (the kernel took none), so the destination cannot act on it; once any
/// byte went out, a failure is `SwitchoverUnconfirmed`.
pub fn send_switchover<C: Write>(conn: &mut C) -> Result<(), MigratableError> {
    let mut raw = Vec::new();
    Request::switchover().write_to(&mut raw)?;
    let mut written = 0;
    while written < raw.len() {
        match conn.write(&raw[written..]) {
            Ok(0) if written == 0 => return Err(not_sent("the connection took no byte".into())),
            Ok(0) => {
                return Err(unknown(anyhow!(
                    "the connection closed after {written} bytes of Switchover"
                )))
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if written == 0 => return Err(not_sent(e.to_string())),
            Err(e) => {
                return Err(unknown(
                    anyhow!(e).context(format!("Switchover went out in part ({written} bytes)")),
                ))
            }
        }
    }
    Ok(())
}

/// Reads the destination's answer to `Switchover`: see [`hand_over`].
pub fn read_confirmation<C: Read>(conn: &mut C) -> Result<(), MigratableError> {
    let response = Response::read_from(conn).map_err(|e| {
        unknown(if is_eof(&e) {
            anyhow!("the destination closed the connection without answering")
        } else {
            anyhow!(e).context("no answer from the destination")
        })
    })?;
    match response.status() {
        Status::Ok => Ok(()),
        Status::Error => {
            // The status alone settles it; the message is a courtesy.
            let mut message = String::new();
            if response.length() <= MAX_ERROR_MESSAGE {
                let mut buf = vec![0u8; response.length() as usize];
                if conn.read_exact(&mut buf).is_ok() {
                    message = String::from_utf8_lossy(&buf).into_owned();
                }
            }
            Err(MigratableError::MigrateSend(anyhow!(
                "destination refused: {message}"
            )))
        }
        other => Err(unknown(anyhow!("destination answered {other:?}"))),
    }
}

/// What a ready destination got from the source.
#[derive(Debug, PartialEq, Eq)]
pub enum Go {
    /// Run the VM (unless it came with `CompletePaused`).
    Switchover,
    /// The source gave up and runs the VM itself.
    Abandon,
}

/// Destination, ready: waits (as long as its reads may block) for the
/// source's go. An error means the source was lost: it may or may not
/// have sent `Switchover`, so the VM must stay paused; the error says so
/// ([`DESTINATION_KEPT`]).
pub fn await_go<C: Read>(conn: &mut C) -> Result<Go, MigratableError> {
    let kept =
        |cause: anyhow::Error| MigratableError::MigrateReceive(cause.context(DESTINATION_KEPT));
    let request = Request::read_from(conn).map_err(|e| {
        kept(if is_eof(&e) {
            anyhow!("the source closed the connection before Switchover")
        } else {
            anyhow!(e).context("no Switchover from the source")
        })
    })?;
    match request.command() {
        Command::Switchover => Ok(Go::Switchover),
        Command::Abandon => Ok(Go::Abandon),
        other => Err(kept(anyhow!("{other:?} where Switchover was due"))),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::connection::{chain, write_error};

    #[test]
    fn a_vm_whose_last_outcome_is_unknown_migrates_only_once_the_user_checked() {
        check_outcome_known(None, false).unwrap();
        let e = check_outcome_known(Some(SOURCE_UNKNOWN), false).unwrap_err();
        assert!(matches!(e, MigratableError::MigrateSend(_)), "{e:?}");
        let said = chain(&e);
        assert!(said.contains(OUTCOME_UNKNOWN_REFUSAL), "{said}");
        assert!(said.contains("outcome_checked=on"), "{said}");
        // The reason it is unknown follows, with how to decide.
        assert!(said.ends_with(SOURCE_UNKNOWN), "{said}");
        check_outcome_known(Some(SOURCE_UNKNOWN), true).unwrap();
    }

    #[test]
    fn switchover_goes_out_and_is_confirmed() {
        let (mut source, mut destination) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let go = await_go(&mut destination).unwrap();
            Response::ok().write_to(&mut destination).unwrap();
            go
        });
        hand_over(&mut source).unwrap();
        assert_eq!(peer.join().unwrap(), Go::Switchover);
    }

    #[test]
    fn a_switchover_no_byte_of_which_left_is_not_sent() {
        let (mut source, destination) = UnixStream::pair().unwrap();
        drop(destination);
        let e = hand_over(&mut source).unwrap_err();
        assert!(matches!(e, MigratableError::MigrateSend(_)), "{e:?}");
        assert!(
            chain(&e).contains("Switchover was not sent"),
            "{}",
            chain(&e)
        );
    }

    #[test]
    fn an_error_answer_is_a_refusal_silence_is_not() {
        let (mut source, mut destination) = UnixStream::pair().unwrap();
        write_error(&mut destination, "resume devices: EIO").unwrap();
        let e = hand_over(&mut source).unwrap_err();
        assert!(matches!(e, MigratableError::MigrateSend(_)), "{e:?}");
        assert!(chain(&e).contains("destination refused: resume devices: EIO"));

        let (mut source, mut destination) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            Request::read_from(&mut destination).unwrap();
            // Gone without an answer.
        });
        let e = hand_over(&mut source).unwrap_err();
        peer.join().unwrap();
        assert!(
            matches!(e, MigratableError::SwitchoverUnconfirmed(_)),
            "{e:?}"
        );
        assert!(chain(&e).contains("ch-remote resume"), "{}", chain(&e));

        // A status that is neither Ok nor Error settles nothing.
        let (mut source, mut destination) = UnixStream::pair().unwrap();
        Response::new(Status::Invalid, 0)
            .write_to(&mut destination)
            .unwrap();
        assert!(matches!(
            hand_over(&mut source),
            Err(MigratableError::SwitchoverUnconfirmed(_))
        ));
    }

    #[test]
    fn a_ready_destination_that_loses_the_source_is_told_so() {
        let (source, mut destination) = UnixStream::pair().unwrap();
        drop(source);
        let e = await_go(&mut destination).unwrap_err();
        assert!(chain(&e).contains("before Switchover"), "{}", chain(&e));
        assert!(chain(&e).contains("Lost the source after this VM was ready"));

        let (mut source, mut destination) = UnixStream::pair().unwrap();
        Request::abandon().write_to(&mut source).unwrap();
        assert_eq!(await_go(&mut destination).unwrap(), Go::Abandon);

        let (mut source, mut destination) = UnixStream::pair().unwrap();
        Request::complete().write_to(&mut source).unwrap();
        assert!(await_go(&mut destination).is_err());
    }

    #[test]
    fn only_switchover_in_both_announcements_means_two_steps() {
        let both = ProtocolFeatures::SWITCHOVER | ProtocolFeatures::DEVICE_STATE;
        assert!(negotiated(both, both));
        assert!(!negotiated(both, ProtocolFeatures::DEVICE_STATE));
        assert!(!negotiated(
            ProtocolFeatures::DEVICE_STATE,
            ProtocolFeatures::DEVICE_STATE
        ));
    }
}
