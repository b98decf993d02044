// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The API socket: a unix socket only its owner can use, one thread per
//! connection (bounded), keep-alive connections as CH's server keeps them.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};

use crate::api;
use crate::http;
use crate::migration::conn::remove_stale_socket;
use crate::vmm::Vmm;

/// Connections served at once; more are answered 503 at once.
const MAX_CONNECTIONS: usize = 32;
/// How long a connection may stay silent, inside a request or between
/// two (a keep-alive connection nobody uses any more is closed).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Binds `path` with mode 0600 (set through the umask, so there is no
/// window in which others could connect).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    remove_stale_socket(path)?;
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    listener
}

/// Serves the API until `vmm.shutdown`.
pub fn serve(listener: UnixListener, path: PathBuf, vmm: Arc<Vmm>) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    info!("API listening on {}", path.display());
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!("API accept failed: {e}");
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            let body = serde_json::json!(["Too many connections"]).to_string();
            let _ = http::write_response(&mut conn, 503, Some(body.as_bytes()));
            continue;
        }
        let vmm = vmm.clone();
        let active_conn = active.clone();
        let path = path.clone();
        let spawned = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                serve_connection(conn, &vmm, &path);
                active_conn.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            warn!("cannot spawn an API thread: {e}");
        }
    }
    Ok(())
}

/// Answers the requests of one keep-alive connection in order, until the
/// client closes it or stays silent too long. What micro-http cannot
/// parse is answered 400 and, with everything read but not answered,
/// dropped; the connection stays open, as micro-http keeps it.
fn serve_connection(conn: UnixStream, vmm: &Arc<Vmm>, path: &Path) {
    let _ = conn.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IDLE_TIMEOUT));
    let mut reader = http::RequestReader::new(conn);
    loop {
        let req = match reader.next_request() {
            Ok(Some(Ok(req))) => req,
            Ok(Some(Err(e))) => {
                warn!("API request refused: {e}");
                if http::write_parse_error(reader.get_mut(), &e).is_err() {
                    return;
                }
                reader.discard_buffered();
                continue;
            }
            Ok(None) => return,
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    warn!("API connection: {e}");
                }
                return;
            }
        };
        let reply = api::handle(vmm, &req.method, &req.path, req.body.as_deref());
        if let Err(e) = http::write_response(reader.get_mut(), reply.status, reply.body.as_deref())
        {
            warn!("API reply could not be written: {e}");
            return;
        }
        if reply.shutdown {
            info!("vmm.shutdown: exiting");
            let _ = std::fs::remove_file(path);
            std::process::exit(0);
        }
    }
}
