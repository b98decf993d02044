// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Process resource figures for reports and benchmarks.

use std::fs;

fn status_kib(field: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Peak resident set size (`VmHWM`) in bytes. Shared memory the process
/// only reaches through `pread`/`pwrite` (memfd-backed VRAM) is not in it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

/// User plus system CPU time of this process, in seconds.
pub fn cpu_seconds() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer we own.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: getrusage returned 0, so it initialised the struct.
    let u = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(u.ru_utime) + secs(u.ru_stime))
}

/// Number of open file descriptors of this process.
pub fn open_fds() -> Option<usize> {
    fs::read_dir("/proc/self/fd").ok().map(|d| d.count())
}

/// Number of threads of this process.
pub fn threads() -> Option<u64> {
    status_kib("Threads:")
}

#[cfg(test)]
mod tests {
    #[test]
    fn figures_are_read() {
        assert!(super::peak_rss_bytes().unwrap() > 0);
        assert!(super::rss_bytes().unwrap() <= super::peak_rss_bytes().unwrap());
        assert!(super::open_fds().unwrap() >= 3);
        assert!(super::threads().unwrap() >= 1);
        assert!(super::cpu_seconds().unwrap() >= 0.0);
    }
}
