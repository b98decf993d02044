// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A small, bounded HTTP/1.1 server side: one request per connection,
//! `Content-Length` bodies only, JSON answers.

use std::io::{self, Read, Write};

/// Longest request line plus headers.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body (API bodies are a few hundred bytes).
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Why a request could not be read; `status` is the answer to give.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct ParseError {
    pub status: u16,
    pub reason: String,
}

fn bad(status: u16, reason: impl Into<String>) -> ParseError {
    ParseError {
        status,
        reason: reason.into(),
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Reads one request. `conn` is written to only for `100 Continue`.
pub fn read_request<S: Read + Write>(conn: &mut S) -> Result<Request, ParseError> {
    let io_err = |e: io::Error| bad(400, format!("reading request: {e}"));
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(bad(431, format!("request head exceeds {MAX_HEAD} bytes")));
        }
        let n = conn.read(&mut chunk).map_err(io_err)?;
        if n == 0 {
            return Err(bad(400, "connection closed inside the request head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head_end > MAX_HEAD {
        return Err(bad(431, format!("request head exceeds {MAX_HEAD} bytes")));
    }
    let head = std::str::from_utf8(&buf[..head_end - 4])
        .map_err(|_| bad(400, "request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && t.starts_with('/') => (m, t, v),
        _ => return Err(bad(400, format!("malformed request line '{request_line}'"))),
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(bad(505, format!("unsupported version '{version}'")));
    }
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(400, format!("malformed header line '{line}'")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let len: usize = value
                .parse()
                .map_err(|_| bad(400, format!("bad Content-Length '{value}'")))?;
            if content_length.is_some_and(|l| l != len) {
                return Err(bad(400, "conflicting Content-Length headers"));
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad(
                411,
                "chunked bodies are not supported; send Content-Length",
            ));
        } else if name.eq_ignore_ascii_case("expect") && value.eq_ignore_ascii_case("100-continue")
        {
            expect_continue = true;
        }
    }
    let len = content_length.unwrap_or(0);
    if len > MAX_BODY {
        return Err(bad(413, format!("body of {len} bytes exceeds {MAX_BODY}")));
    }
    let mut body = buf[head_end..].to_vec();
    if body.len() > len {
        return Err(bad(400, "more bytes than Content-Length announced"));
    }
    if expect_continue && body.len() < len {
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(io_err)?;
    }
    let have = body.len();
    body.resize(len, 0);
    conn.read_exact(&mut body[have..]).map_err(io_err)?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    Ok(Request {
        method: method.to_string(),
        path,
        body,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Writes a complete response and ends the exchange.
pub fn write_response<W: Write>(conn: &mut W, status: u16, body: &[u8]) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nConnection: close\r\n",
        reason(status)
    );
    if status != 204 {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    if status != 204 {
        conn.write_all(body)?;
    }
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory connection: reads `input`, collects writes.
    struct Fake {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn parse(raw: &[u8]) -> Result<Request, ParseError> {
        read_request(&mut Fake {
            input: io::Cursor::new(raw.to_vec()),
            output: Vec::new(),
        })
    }

    #[test]
    fn curl_style_requests_parse() {
        let r = parse(b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl\r\nAccept: */*\r\n\r\n").unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/api/v1/vm.pause");
        assert!(r.body.is_empty());
        let r = parse(b"PUT /api/v1/vm.snapshot HTTP/1.1\r\ncontent-length: 7\r\n\r\n{\"a\":1}")
            .unwrap();
        assert_eq!(r.body, b"{\"a\":1}");
    }

    #[test]
    fn hostile_requests_are_refused_with_a_status() {
        let cases: [(&[u8], u16); 7] = [
            (b"GET / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413),
            (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
            (b"GET / HTTP/2\r\n\r\n", 505),
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", 400),
            (b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
        ];
        for (raw, status) in cases {
            assert_eq!(parse(raw).unwrap_err().status, status, "{raw:?}");
        }
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD * 2));
        assert_eq!(parse(&long).unwrap_err().status, 431);
    }

    #[test]
    fn responses_carry_length_and_close() {
        let mut out = Vec::new();
        write_response(&mut out, 200, b"{}").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }
}
