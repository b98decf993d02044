// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The two-step switch-over (`ProtocolFeatures::SWITCHOVER`, patches 0010
//! and 0011 of our Cloud Hypervisor series): never two running copies of
//! the VM.
//!
//! With a single `Complete`, a destination that resumed the VM and whose
//! `Ok` was lost leaves the VM running on both hosts, since the source
//! resumes its own copy on any failure. With two steps the destination
//! answers `Complete` once it holds and has checked everything ("ready"),
//! but keeps the VM paused; the source then sends `Switchover` and from
//! that moment never resumes the VM by itself. Who runs the VM when
//! something fails:
//!
//! | when | source | destination |
//! | --- | --- | --- |
//! | before ready | resumes | discards |
//! | ready, `Switchover` not sent (the write failed before any byte went out) | resumes | keeps it paused, says so (it cannot know) |
//! | `Switchover` sent, no answer (drop, stall, EOF) | stays paused, outcome unknown | runs it if it got `Switchover`, else keeps it paused |
//! | `Switchover` sent, answered Error (the destination could not resume) | resumes | discards |
//!
//! An outcome is "unknown" on a side that cannot tell whether the other
//! runs the VM: it stays paused and its error (`migration.last` is
//! `{"unknown": …}`) says how an operator decides: wait for the
//! destination's `receive-migration` to end, then look at it with
//! `ch-remote info`: Running there, delete the source's VM; no VM there
//! (or no destination), resume the source's; Paused on both, resume one
//! and delete the other. A peer that does not announce `SWITCHOVER`
//! gets the single step, and the source logs the risk.

use std::io::{self, Read, Write};

use log::warn;
use serde_json::{json, Value};
use xe_vf_glue::error_chain::Chain;
use xe_vf_glue::protocol::{Command, ProtocolFeatures, Request, Response, Status};

use super::conn::Conn;
use super::{is_eof, MAX_ERROR_MESSAGE};
use crate::error::HostError;

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

/// A migration that did not end as planned: `error` says why; with
/// `unknown`, this side cannot tell whether the other runs the VM, and
/// keeps its own copy paused.
#[derive(Debug)]
pub struct Failure {
    pub error: HostError,
    pub unknown: bool,
}

impl From<HostError> for Failure {
    fn from(error: HostError) -> Self {
        Failure {
            error,
            unknown: false,
        }
    }
}

impl Failure {
    pub fn unknown(error: HostError) -> Self {
        Failure {
            error,
            unknown: true,
        }
    }

    /// What `migration.last` shows: `{"failed": …}` or `{"unknown": …}`.
    pub fn outcome(&self) -> Value {
        let body = json!({ "error": self.error.messages(), "phase": self.error.phase });
        if self.unknown {
            json!({ "unknown": body })
        } else {
            json!({ "failed": body })
        }
    }
}

/// Source: whether the two steps are used, from what it `announced` and
/// the destination `answered`; warns when the destination cannot take
/// them.
pub fn negotiated(announced: ProtocolFeatures, answered: ProtocolFeatures) -> bool {
    let two_step = (announced & answered).contains(ProtocolFeatures::SWITCHOVER);
    if announced.contains(ProtocolFeatures::SWITCHOVER) && !two_step {
        warn!(
            "The destination does not support the two-step switch-over: if its answer to \
             Complete is lost, both may run the VM (this one resumes on any failure)"
        );
    }
    two_step
}

/// Source: sends `Switchover`. An error means no byte of it left this
/// host (the kernel took none), so the destination cannot act on it and
/// the source may resume. Once any byte went out, the request counts as
/// sent: a later failure leaves the outcome unknown. (Patch 0011 is
/// stricter: any failed write of `Switchover` leaves it unknown there.)
pub fn send(conn: &mut Conn) -> Result<(), HostError> {
    let mut raw = Vec::new();
    Request::switchover()
        .write_to(&mut raw)
        .map_err(|e| HostError::failed("switchover", Chain(&e)))?;
    let mut written = 0;
    while written < raw.len() {
        match conn.write(&raw[written..]) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if written == 0 => {
                return Err(HostError::failed(
                    "switchover",
                    format!("Switchover was not sent: {e}"),
                ))
            }
            Err(e) => {
                warn!("Switchover went out in part ({written} bytes): {e}");
                return Ok(());
            }
        }
    }
    if written == 0 {
        return Err(HostError::failed(
            "switchover",
            "Switchover was not sent: the connection took no byte",
        ));
    }
    Ok(())
}

/// Why the destination did not confirm the switch-over.
#[derive(Debug)]
pub enum Unconfirmed {
    /// It answered Error: it does not run the VM, the source may.
    Refused(HostError),
    /// No answer: it may run the VM.
    NoAnswer(HostError),
}

/// Source, after [`send`]: reads the destination's answer.
pub fn confirmation<R: Read>(conn: &mut R) -> Result<(), Unconfirmed> {
    let phase = "switchover";
    let response = Response::read_from(conn).map_err(|e| {
        Unconfirmed::NoAnswer(HostError::failed(
            phase,
            if is_eof(&e) {
                "the destination closed the connection without answering".to_string()
            } else {
                format!("no answer from the destination: {}", Chain(&e))
            },
        ))
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
            Err(Unconfirmed::Refused(HostError::failed(
                phase,
                format!("destination refused: {message}"),
            )))
        }
        other => Err(Unconfirmed::NoAnswer(HostError::failed(
            phase,
            format!("destination answered {other:?}"),
        ))),
    }
}

/// What a ready destination got from the source.
#[derive(Debug)]
pub enum Go {
    /// Run the VM (unless it came with `CompletePaused`).
    Switchover,
    /// The source gave up and runs the VM itself.
    Abandon,
}

/// Destination, ready: waits (as long as reads may block) for the
/// source's go. An error means the source was lost: it may or may not
/// have sent `Switchover`, so the VM must stay paused.
pub fn await_go<R: Read>(conn: &mut R) -> Result<Go, HostError> {
    let phase = "switchover";
    let request = Request::read_from(conn).map_err(|e| {
        HostError::failed(
            phase,
            if is_eof(&e) {
                "the source closed the connection before Switchover".to_string()
            } else {
                format!("no Switchover from the source: {}", Chain(&e))
            },
        )
    })?;
    match request.command() {
        Command::Switchover => Ok(Go::Switchover),
        Command::Abandon => Ok(Go::Abandon),
        other => Err(HostError::failed(
            phase,
            format!("{other:?} where Switchover was due"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn pair() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Conn::from(a), b)
    }

    #[test]
    fn switchover_goes_out_and_is_confirmed() {
        let (mut source, mut destination) = pair();
        send(&mut source).unwrap();
        assert!(matches!(await_go(&mut destination), Ok(Go::Switchover)));
        Response::ok().write_to(&mut destination).unwrap();
        confirmation(&mut source).unwrap();
    }

    #[test]
    fn a_switchover_no_byte_of_which_left_is_not_sent() {
        let (mut source, destination) = pair();
        drop(destination);
        let err = send(&mut source).unwrap_err();
        assert_eq!(err.phase, "switchover");
        assert!(err.cause.contains("was not sent"), "{err}");
    }

    #[test]
    fn an_error_answer_is_a_refusal_silence_is_not() {
        let (mut source, mut destination) = pair();
        super::super::write_error(&mut destination, "resume devices: EIO").unwrap();
        match confirmation(&mut source) {
            Err(Unconfirmed::Refused(e)) => assert!(e.cause.contains("EIO"), "{e}"),
            other => panic!("{other:?}"),
        }

        let (mut source, destination) = pair();
        drop(destination);
        assert!(matches!(
            confirmation(&mut source),
            Err(Unconfirmed::NoAnswer(_))
        ));

        // A status that is neither Ok nor Error settles nothing.
        let (mut source, mut destination) = pair();
        Response::new(Status::Invalid, 0)
            .write_to(&mut destination)
            .unwrap();
        assert!(matches!(
            confirmation(&mut source),
            Err(Unconfirmed::NoAnswer(_))
        ));
    }

    #[test]
    fn a_ready_destination_that_loses_the_source_is_told_so() {
        let (source, mut destination) = pair();
        drop(source);
        let err = await_go(&mut destination).unwrap_err();
        assert!(err.cause.contains("before Switchover"), "{err}");

        let (mut source, mut destination) = pair();
        Request::abandon().write_to(&mut source).unwrap();
        assert!(matches!(await_go(&mut destination), Ok(Go::Abandon)));

        let (mut source, mut destination) = pair();
        Request::complete().write_to(&mut source).unwrap();
        assert!(await_go(&mut destination).is_err());
    }

    #[test]
    fn outcomes_say_failed_or_unknown() {
        let f = Failure::from(HostError::failed("complete", "x"));
        assert!(f.outcome()["failed"].is_object());
        let u = Failure::unknown(HostError::failed("switchover", "y").context(SOURCE_UNKNOWN));
        let o = u.outcome();
        assert_eq!(o["unknown"]["phase"], "switchover");
        assert_eq!(o["unknown"]["error"][0], SOURCE_UNKNOWN);
    }

    #[test]
    fn only_switchover_in_both_announcements_means_two_steps() {
        let both = ProtocolFeatures::SWITCHOVER | ProtocolFeatures::DEVICE_STATE;
        assert!(negotiated(both, both));
        assert!(!negotiated(both, ProtocolFeatures::DEVICE_STATE));
        assert!(!negotiated(ProtocolFeatures::DEVICE_STATE, both));
    }
}
