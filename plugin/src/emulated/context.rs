// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The emulated VF's own execution context.
//!
//! On hardware a VF's migration data is produced and consumed by the
//! kernel and the device, not by the VMM's threads. The emulated VF's
//! producer and consumer threads are therefore started by a thread of the
//! device's own, created with the device: restrictions the VMM puts on
//! its threads afterwards (seccomp filters) do not reach them, as they do
//! not reach a driver, and a test of the VMM's filters sees only the
//! VMM's own system calls.

use std::io;
use std::sync::mpsc::{channel, sync_channel, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct DeviceContext {
    jobs: Mutex<Option<Sender<Job>>>,
    thread: Option<JoinHandle<()>>,
}

fn ended() -> io::Error {
    io::Error::other("the emulated VF's context thread has ended")
}

impl DeviceContext {
    pub(crate) fn new() -> io::Result<Self> {
        let (jobs, requests) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("xe-vf-device".into())
            .spawn(move || {
                while let Ok(job) = requests.recv() {
                    job();
                }
            })?;
        Ok(DeviceContext {
            jobs: Mutex::new(Some(jobs)),
            thread: Some(thread),
        })
    }

    /// Runs `work` on a new thread named `name`, created by the device's
    /// own thread.
    pub(crate) fn spawn<T: Send + 'static>(
        &self,
        name: &str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<JoinHandle<T>> {
        let (reply, spawned) = sync_channel(1);
        let name = name.to_string();
        let job: Job = Box::new(move || {
            let _ = reply.send(std::thread::Builder::new().name(name).spawn(work));
        });
        self.jobs
            .lock()
            .map_err(|_| ended())?
            .as_ref()
            .ok_or_else(ended)?
            .send(job)
            .map_err(|_| ended())?;
        spawned.recv().map_err(|_| ended())?
    }
}

impl Drop for DeviceContext {
    fn drop(&mut self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_a_thread_the_context_created() {
        let context = DeviceContext::new().unwrap();
        let caller = std::thread::current().id();
        let handle = context
            .spawn("probe", move || {
                let me = std::thread::current();
                (me.id() != caller, me.name().map(str::to_string))
            })
            .unwrap();
        assert_eq!(handle.join().unwrap(), (true, Some("probe".to_string())));
    }
}
