// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! HTTP/1.1 as Cloud Hypervisor's API server (micro-http) speaks it, so
//! that `ch-remote` and anything written against CH talk to the test host
//! unchanged:
//!
//! * keep-alive connections, several requests per connection, answered in
//!   order; `Content-Length` bodies only, bounded;
//! * status line `HTTP/1.1 <code> ` (no reason phrase: ch-remote parses
//!   everything up to the CR as the number), then `Server`, `Connection:
//!   keep-alive` and, except for 204 (and 100), `Content-Type:
//!   application/json` and `Content-Length` (0 without a body);
//! * a request micro-http cannot parse is answered 400 by micro-http
//!   itself (`Server: Firecracker API`, a `{ "error": … }` body), and
//!   what was read but not answered is dropped.

use std::io::{self, Read, Write};

/// Longest request line plus headers.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body (API bodies are a few hundred bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// What CH's routes answer with.
const SERVER: &str = "Cloud Hypervisor API";
/// What micro-http answers with when it cannot parse a request.
const PARSER_SERVER: &str = "Firecracker API";

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent (CH routes on it whole, query included).
    pub path: String,
    /// `None` without a `Content-Length` or with `Content-Length: 0`, as
    /// micro-http reports it.
    pub body: Option<Vec<u8>>,
}

/// A request micro-http would refuse; the text is micro-http's.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn invalid() -> ParseError {
    ParseError("Invalid request.".to_string())
}

/// Reads requests one after the other from a keep-alive connection.
pub struct RequestReader<S> {
    conn: S,
    buf: Vec<u8>,
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

impl<S: Read> RequestReader<S> {
    pub fn new(conn: S) -> Self {
        RequestReader {
            conn,
            buf: Vec::with_capacity(1024),
        }
    }

    /// Drops what was read but not parsed (after a refused request).
    pub fn discard_buffered(&mut self) {
        self.buf.clear();
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.conn
    }

    /// Reads more bytes; `false` at end of stream.
    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 1024];
        let n = self.conn.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The next request: `Ok(None)` once the client closed the connection
    /// between requests, `Err` for an I/O error (the connection is done),
    /// `Ok(Some(Err))` for a request micro-http would refuse.
    #[allow(clippy::type_complexity)]
    pub fn next_request(&mut self) -> io::Result<Option<Result<Request, ParseError>>> {
        let head_end = loop {
            if let Some(end) = find_head_end(&self.buf) {
                break end;
            }
            if self.buf.len() > MAX_HEAD {
                return Ok(Some(Err(invalid())));
            }
            if !self.fill()? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a request",
                ));
            }
        };
        if head_end > MAX_HEAD {
            return Ok(Some(Err(invalid())));
        }
        let head = match parse_head(&self.buf[..head_end - 4]) {
            Ok(h) => h,
            Err(e) => return Ok(Some(Err(e))),
        };
        let len = head.content_length;
        if len > MAX_BODY {
            return Ok(Some(Err(ParseError(format!(
                "Request payload with size {len} is larger than the limit of {MAX_BODY} \
                 allowed by server."
            )))));
        }
        while self.buf.len() < head_end + len {
            if !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a request body",
                ));
            }
        }
        let body: Vec<u8> = self.buf[head_end..head_end + len].to_vec();
        self.buf.drain(..head_end + len);
        Ok(Some(Ok(Request {
            method: head.method,
            path: head.target,
            body: (!body.is_empty()).then_some(body),
        })))
    }
}

struct Head {
    method: String,
    target: String,
    content_length: usize,
}

fn parse_head(raw: &[u8]) -> Result<Head, ParseError> {
    let head = std::str::from_utf8(raw).map_err(|_| invalid())?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err(invalid()),
    };
    if !matches!(method, "GET" | "PUT" | "PATCH" | "DELETE") {
        return Err(ParseError(
            "Invalid HTTP Method: Unsupported HTTP method.".to_string(),
        ));
    }
    if target.is_empty() {
        return Err(ParseError(
            "Invalid URI: Empty URI not allowed.".to_string(),
        ));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(ParseError(
            "Invalid HTTP Version: Unsupported HTTP version.".to_string(),
        ));
    }
    let mut content_length = 0usize;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(invalid)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().map_err(|_| {
                ParseError(format!(
                    "Invalid header. Reason: Invalid value. Key:Content-Length; Value: {value}"
                ))
            })?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // micro-http takes chunked bodies; no CH client sends them.
            return Err(ParseError(format!(
                "Invalid header. Reason: Unsupported value. Key:Transfer-Encoding; Value: {value}"
            )));
        }
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        content_length,
    })
}

/// Writes one response as CH's server does: a 204 has no body headers,
/// any other status has them (`Content-Length: 0` without a body).
pub fn write_response<W: Write>(conn: &mut W, status: u16, body: Option<&[u8]>) -> io::Result<()> {
    write_with_server(conn, SERVER, status, body)
}

/// Writes micro-http's own answer to a request it could not parse.
pub fn write_parse_error<W: Write>(conn: &mut W, e: &ParseError) -> io::Result<()> {
    let body =
        format!("{{ \"error\": \"{e}\nAll previous unanswered requests will be dropped.\" }}");
    write_with_server(conn, PARSER_SERVER, 400, Some(body.as_bytes()))
}

fn write_with_server<W: Write>(
    conn: &mut W,
    server: &str,
    status: u16,
    body: Option<&[u8]>,
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} \r\nServer: {server}\r\nConnection: keep-alive\r\n")
        .into_bytes();
    let body = body.unwrap_or_default();
    if !matches!(status, 100 | 204) {
        out.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    conn.write_all(&out)?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(raw: &[u8]) -> Vec<Result<Request, ParseError>> {
        let mut reader = RequestReader::new(io::Cursor::new(raw.to_vec()));
        let mut out = Vec::new();
        while let Ok(Some(r)) = reader.next_request() {
            let stop = r.is_err();
            out.push(r);
            if stop {
                break;
            }
        }
        out
    }

    #[test]
    fn ch_remote_and_curl_requests_parse_and_keep_alive() {
        let raw = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n\
                    PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
                    Content-Length: 7\r\n\r\n{\"a\":1}\
                    PUT /api/v1/vm.pause HTTP/1.1\r\ncontent-length: 0\r\n\r\n";
        let got = parse_all(raw);
        assert_eq!(got.len(), 3);
        let r = got[0].as_ref().unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/api/v1/vmm.ping")
        );
        assert_eq!(r.body, None);
        assert_eq!(
            got[1].as_ref().unwrap().body.as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(
            got[2].as_ref().unwrap().body,
            None,
            "Content-Length 0 is no body"
        );
    }

    #[test]
    fn hostile_requests_get_micro_http_errors() {
        let cases: [(&[u8], &str); 5] = [
            (
                b"POST / HTTP/1.1\r\n\r\n",
                "Invalid HTTP Method: Unsupported HTTP method.",
            ),
            (b"GARBAGE\r\n\r\n", "Invalid request."),
            (
                b"GET / HTTP/2\r\n\r\n",
                "Invalid HTTP Version: Unsupported HTTP version.",
            ),
            (
                b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                "Invalid header. Reason: Invalid value. Key:Content-Length; Value: x",
            ),
            (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", "Invalid request."),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_all(raw)[0].as_ref().unwrap_err().0, want, "{raw:?}");
        }
        let big = parse_all(b"GET / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n");
        assert!(big[0]
            .as_ref()
            .unwrap_err()
            .0
            .contains("larger than the limit"));
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD * 2));
        assert!(parse_all(&long)[0].is_err());
        // A body cut short is an I/O error, not a request.
        let mut reader = RequestReader::new(io::Cursor::new(
            b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc".to_vec(),
        ));
        assert!(reader.next_request().is_err());
    }

    #[test]
    fn responses_are_byte_exact() {
        let mut out = Vec::new();
        write_response(&mut out, 404, Some(b"[\"Not Found\"]")).unwrap();
        assert_eq!(
            out,
            b"HTTP/1.1 404 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\
              Content-Type: application/json\r\nContent-Length: 13\r\n\r\n[\"Not Found\"]"
        );
        let mut out = Vec::new();
        write_response(&mut out, 204, None).unwrap();
        assert_eq!(
            out,
            b"HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n"
        );
        let mut out = Vec::new();
        write_response(&mut out, 200, None).unwrap();
        assert_eq!(
            out,
            b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\
              Content-Type: application/json\r\nContent-Length: 0\r\n\r\n"
        );
    }
}
