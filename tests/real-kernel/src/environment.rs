// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the guest kernel offers before any device is touched: its release,
//! the `/dev/vfio` nodes and the VFIO container API version.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use vfio_bindings::bindings::vfio::{VFIO_API_VERSION, VFIO_BASE, VFIO_TYPE};

const DEV_VFIO: &str = "/dev/vfio";
const VFIO_CONTAINER: &str = "/dev/vfio/vfio";

/// `VFIO_GET_API_VERSION` is `_IO(VFIO_TYPE, VFIO_BASE + 0)`: no direction,
/// no size, so the request number is just type and number.
const VFIO_GET_API_VERSION: libc::c_ulong =
    ((VFIO_TYPE as libc::c_ulong) << 8) | VFIO_BASE as libc::c_ulong;

#[derive(Debug, Serialize)]
pub struct Environment {
    /// `uname -r`.
    pub kernel_release: String,
    /// `uname -v`.
    pub kernel_version: String,
    /// Entries of `/dev/vfio`, sorted.
    pub dev_vfio: Vec<String>,
    pub vfio_api_version: i32,
}

fn read_trimmed(path: &str) -> anyhow::Result<String> {
    Ok(fs::read_to_string(path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_string())
}

fn list_dev_vfio() -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(
        Path::new(DEV_VFIO).is_dir(),
        "{DEV_VFIO} does not exist: are the vfio modules loaded?"
    );
    let mut names = Vec::new();
    for entry in fs::read_dir(DEV_VFIO).with_context(|| format!("listing {DEV_VFIO}"))? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Asks the container node for its API version, the first ioctl any VFIO
/// user makes.
fn vfio_api_version(container: &File) -> anyhow::Result<i32> {
    // SAFETY: VFIO_GET_API_VERSION takes no argument and only returns an
    // int; the fd is a valid open file for the duration of the call.
    let ret = unsafe { libc::ioctl(container.as_raw_fd(), VFIO_GET_API_VERSION) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error()).context("VFIO_GET_API_VERSION");
    }
    Ok(ret)
}

/// Reads the kernel identity and checks the VFIO container is usable.
pub fn probe() -> anyhow::Result<Environment> {
    let kernel_release = read_trimmed("/proc/sys/kernel/osrelease")?;
    let kernel_version = read_trimmed("/proc/sys/kernel/version")?;
    let dev_vfio = list_dev_vfio()?;
    let container = OpenOptions::new()
        .read(true)
        .write(true)
        .open(VFIO_CONTAINER)
        .with_context(|| format!("opening {VFIO_CONTAINER}"))?;
    let vfio_api_version = vfio_api_version(&container)?;
    anyhow::ensure!(
        vfio_api_version == VFIO_API_VERSION as i32,
        "VFIO API version {vfio_api_version}, expected {VFIO_API_VERSION}"
    );
    Ok(Environment {
        kernel_release,
        kernel_version,
        dev_vfio,
        vfio_api_version,
    })
}
