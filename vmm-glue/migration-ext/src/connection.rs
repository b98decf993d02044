// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the extensions need of a migration connection, and the answers
//! they read and write on it.
//!
//! The VMM opens connections with its own transport (Cloud Hypervisor's
//! `SocketStream`, TLS included; the test host's sockets), so every
//! connection of ours is as secure as the main one.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::anyhow;
use vm_migration::protocol::{Response, Status};
use vm_migration::MigratableError;

/// A migration connection.
pub trait Connection: Read + Write + Send {
    /// Bounds how long a read may wait (`None`: as long as it takes).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Connection for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Connection for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

/// `e` and its causes, joined by ": " (a `MigratableError`'s `Display`
/// leaves its cause out).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// Largest message an `Error` answer carries.
pub const MAX_ERROR_MESSAGE: u64 = 64 * 1024;

/// How long a source waits for the reason of a refusal after a write
/// failed.
pub const REFUSAL_WAIT: Duration = Duration::from_secs(1);

/// Writes an `Error` answer carrying `message`. (An additive extension:
/// Cloud Hypervisor's `Error` has no payload, and its peers close the
/// connection after an `Error` without reading further.)
pub fn write_error(conn: &mut dyn Write, message: &str) -> io::Result<()> {
    let bytes = message.as_bytes();
    let bytes = &bytes[..bytes.len().min(MAX_ERROR_MESSAGE as usize)];
    Response::new(Status::Error, bytes.len() as u64)
        .write_to(conn)
        .map_err(|e| match e {
            MigratableError::MigrateSocket(io) => io,
            other => io::Error::other(other),
        })?;
    conn.write_all(bytes)
}

fn send_error(message: String) -> MigratableError {
    MigratableError::MigrateSend(anyhow!(message))
}

/// Whether a protocol read failed because the peer closed the connection.
pub fn is_eof(e: &MigratableError) -> bool {
    matches!(e, MigratableError::MigrateSocket(io) if io.kind() == io::ErrorKind::UnexpectedEof)
}

/// Reads the message an `Error` answer carries (at most
/// [`MAX_ERROR_MESSAGE`] bytes; a longer one is not read). Peers that
/// predate messages send none.
pub fn read_message(conn: &mut dyn Read, response: &Response) -> Option<String> {
    if response.length() == 0 || response.length() > MAX_ERROR_MESSAGE {
        return None;
    }
    let mut buf = vec![0u8; response.length() as usize];
    conn.read_exact(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Reads the destination's answer. `Ok` is returned (its padding or a
/// payload may carry more); anything else is an error naming the
/// destination's reason, if it gave one.
pub fn read_answer(conn: &mut dyn Read) -> Result<Response, MigratableError> {
    let response = Response::read_from(conn).map_err(|e| {
        if is_eof(&e) {
            send_error("the destination closed the connection without answering".into())
        } else {
            MigratableError::MigrateSend(anyhow!(e).context("no answer from the destination"))
        }
    })?;
    match response.status() {
        Status::Ok => Ok(response),
        Status::Error => Err(send_error(match read_message(conn, &response) {
            Some(message) => format!("destination refused: {message}"),
            None => "destination answered Error".to_string(),
        })),
        other => Err(send_error(format!("destination answered {other:?}"))),
    }
}

/// Reads the destination's answer and expects a plain `Ok`.
pub fn expect_ok(conn: &mut dyn Read) -> Result<(), MigratableError> {
    let response = read_answer(conn)?;
    if response.length() != 0 {
        return Err(send_error(format!(
            "the destination's Ok carries {} unexpected bytes",
            response.length()
        )));
    }
    Ok(())
}

/// After a write to the destination failed: the reason it gave before it
/// closed the connection, if it gave one within [`REFUSAL_WAIT`]. A
/// destination that refuses data mid-stream answers `Error` and hangs up;
/// without this the source would report only a broken pipe.
pub fn refusal<C: Connection>(conn: &mut C) -> Option<String> {
    conn.set_read_timeout(Some(REFUSAL_WAIT)).ok()?;
    let response = Response::read_from(conn).ok()?;
    if response.status() != Status::Error {
        return None;
    }
    read_message(conn, &response)
}

/// A read past a socket's timeout fails with `EAGAIN` ("Resource
/// temporarily unavailable"), which names neither the wait nor the knob
/// that bounds it: say that the destination did not answer within
/// `timeout_s`. Other errors pass unchanged.
pub fn name_answer_timeout(error: MigratableError, timeout: Duration) -> MigratableError {
    match error {
        MigratableError::MigrateSocket(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            MigratableError::MigrateSend(anyhow!(e).context(format!(
                "no answer from the destination within timeout_s ({} s)",
                timeout.as_secs()
            )))
        }
        other => other,
    }
}

/// `error`, with the destination's reason appended when it gave one.
pub fn with_refusal<C: Connection>(conn: &mut C, error: MigratableError) -> MigratableError {
    match refusal(conn) {
        Some(reason) => MigratableError::MigrateSend(
            anyhow!(error).context(format!("the destination said: {reason}")),
        ),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_past_the_timeout_names_the_wait_other_errors_pass() {
        let timeout = Duration::from_secs(8);
        let timed_out = MigratableError::MigrateSocket(io::Error::from(io::ErrorKind::WouldBlock));
        let named = name_answer_timeout(timed_out, timeout);
        assert!(
            chain(&named).contains("no answer from the destination within timeout_s (8 s)"),
            "{}",
            chain(&named)
        );
        let eof = MigratableError::MigrateSocket(io::Error::from(io::ErrorKind::UnexpectedEof));
        assert!(is_eof(&name_answer_timeout(eof, timeout)));
    }

    #[test]
    fn answers_say_who_refused_and_why() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        Response::ok().write_to(&mut b).unwrap();
        expect_ok(&mut a).unwrap();

        write_error(&mut b, "device gpu0: devid mismatch").unwrap();
        let e = expect_ok(&mut a).unwrap_err();
        assert!(chain(&e).contains("destination refused: device gpu0: devid mismatch"));

        Response::error().write_to(&mut b).unwrap();
        let e = expect_ok(&mut a).unwrap_err();
        assert!(
            chain(&e).contains("destination answered Error"),
            "{}",
            chain(&e)
        );

        Response::new(Status::Ok, 3).write_to(&mut b).unwrap();
        assert!(expect_ok(&mut a).is_err());

        drop(b);
        let e = expect_ok(&mut a).unwrap_err();
        assert!(chain(&e).contains("closed the connection without answering"));
    }

    #[test]
    fn a_refusal_is_read_after_a_failed_write_and_silence_is_not_one() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write_error(&mut b, "stream truncated").unwrap();
        assert_eq!(refusal(&mut a).as_deref(), Some("stream truncated"));
        // Nothing comes: the wait is bounded.
        let started = std::time::Instant::now();
        assert_eq!(refusal(&mut a), None);
        assert!(started.elapsed() < REFUSAL_WAIT * 3);
        drop(b);
    }

    #[test]
    fn long_messages_are_cut_on_the_way_out() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let long = "x".repeat(MAX_ERROR_MESSAGE as usize + 10);
        let writer = std::thread::spawn(move || write_error(&mut b, &long));
        let response = Response::read_from(&mut a).unwrap();
        assert_eq!(response.length(), MAX_ERROR_MESSAGE);
        let mut rest = Vec::new();
        a.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len() as u64, MAX_ERROR_MESSAGE);
        writer.join().unwrap().unwrap();
    }
}
