// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The API socket: a unix socket only its owner can use, one thread per
//! connection (bounded), one request per connection.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};

use crate::api::{self, Reply};
use crate::error::HostError;
use crate::http;
use crate::migration::conn::remove_stale_socket;
use crate::vmm::Vmm;

/// Connections served at once; more are answered 503 at once.
const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
            let e = HostError::new(503, "api", "too many connections");
            let r = Reply::error(&e);
            let _ = http::write_response(&mut conn, 503, &r.body);
            continue;
        }
        let vmm = vmm.clone();
        let active_conn = active.clone();
        let path = path.clone();
        let spawned = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                serve_one(conn, &vmm, &path);
                active_conn.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            warn!("cannot spawn an API thread: {e}");
        }
    }
    Ok(())
}

fn serve_one(mut conn: UnixStream, vmm: &Vmm, path: &Path) {
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = conn.set_write_timeout(Some(REQUEST_TIMEOUT));
    let reply = match http::read_request(&mut conn) {
        Ok(req) => api::handle(vmm, &req.method, &req.path, &req.body),
        Err(e) => Reply::error(&HostError::new(e.status, "http", e.reason)),
    };
    if let Err(e) = http::write_response(&mut conn, reply.status, &reply.body) {
        warn!("API reply could not be written: {e}");
    }
    if reply.shutdown {
        info!("vmm.shutdown: exiting");
        let _ = std::fs::remove_file(path);
        std::process::exit(0);
    }
}
