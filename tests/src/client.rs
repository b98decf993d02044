// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A tiny HTTP-over-unix-socket client for the host's API, used by the
//! integration tests and benchmarks.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// Largest response accepted (vm.info of a few devices is a few KiB).
const MAX_RESPONSE: u64 = 16 << 20;

#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

/// A parsed answer: status and JSON body (`Null` if there was none).
#[derive(Clone, Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Value,
}

impl ApiResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// A failure body's messages (CH's error chain) joined by ": ", or "".
    pub fn error(&self) -> String {
        self.body
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(": ")
            })
            .unwrap_or_default()
    }
}

impl ApiClient {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        ApiClient {
            socket: socket.as_ref().to_path_buf(),
            timeout: Duration::from_secs(120),
        }
    }

    /// How long one request may take before it is an error.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `method path` with an optional JSON body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> io::Result<ApiResponse> {
        let mut conn = UnixStream::connect(&self.socket)?;
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
        if !body.is_empty() {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        conn.write_all(req.as_bytes())?;
        // Keep-alive: the server does not close; read by Content-Length.
        let mut raw = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = response_end(&raw)? {
                raw.truncate(end);
                return parse_response(&raw);
            }
            if raw.len() as u64 > MAX_RESPONSE {
                return Err(invalid("response too large"));
            }
            let n = conn.read(&mut chunk)?;
            if n == 0 {
                return Err(invalid(
                    "connection closed before the response was complete",
                ));
            }
            raw.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn get(&self, endpoint: &str) -> io::Result<ApiResponse> {
        self.request("GET", &format!("/api/v1/{endpoint}"), None)
    }

    pub fn put(&self, endpoint: &str, body: Option<&Value>) -> io::Result<ApiResponse> {
        self.request("PUT", &format!("/api/v1/{endpoint}"), body)
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Where a complete response in `raw` ends, if it is complete.
fn response_end(raw: &[u8]) -> io::Result<Option<usize>> {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| invalid("head not UTF-8"))?;
    let mut length = 0usize;
    for line in head.lines().skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(format!("bad Content-Length '{value}'")))?;
            }
        }
    }
    let end = head_end + 4 + length;
    Ok((raw.len() >= end).then_some(end))
}

/// Parses one complete response (no chunked bodies).
pub fn parse_response(raw: &[u8]) -> io::Result<ApiResponse> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("response has no complete head"))?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| invalid("head not UTF-8"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line '{status_line}'")))?;
    let body = &raw[head_end + 4..];
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| invalid(format!("body is not JSON: {e}")))?
    };
    Ok(ApiResponse { status, body })
}
