// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Destination side of a live migration.
//!
//! The VM is built from the source's Config with its VFs stopped before
//! any memory arrives, and is kept private until Complete: on any failure
//! before then it is dropped (a VF whose load failed was already reset by
//! the engine), so a partly restored VF never runs. At Complete, once
//! everything is checked, it becomes this host's VM, paused; with the
//! two-step switch-over it runs only on the source's `Switchover` (see
//! [`super::switchover`]), and stays paused if the source is lost before.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use migration_ext::connection::{self, chain, is_eof};
use migration_ext::streamed::{IncomingDevices, LaneError};
use migration_ext::switchover::{self, Go};
use migration_ext::{checksum, features, verify};
use serde::Serialize;
use serde_json::json;
use xe_vf_glue::migration::{IncomingState, Snapshot};
use xe_vf_glue::protocol::{
    Command, MemoryRangeTable, ProtocolFeatures, Request, Response, DEVICE_STATE_SELF_DELIMITED,
};
use xe_vf_plugin::backend::Backend;
use xe_vf_plugin::device_config::DeviceConfig;
use xe_vf_plugin::engine::TransferOptions;

use super::conn::{Conn, Listener, MigrationUrl};
use super::lanes::ReceiveLanes;
use super::outcome::Failure;
use super::{failed, read_json_payload, MigrationConfig};
use crate::error::{HostError, HostResult};
use crate::fault::{self, FaultyStream, MigrationFault, MigrationTestOptions};
use crate::memory::COPY_CHUNK;
use crate::vm::{Vm, VmFingerprint};
use crate::vmm::{Counters, VmState, Vmm};

#[derive(Clone, Debug, Serialize)]
pub struct ReceiveReport {
    pub total_ms: f64,
    pub memory_bytes: u64,
    pub device_bytes: u64,
    /// `Memory` requests on the main connection.
    pub memory_passes: u32,
    /// Extra memory connections the source opened (`connections`).
    pub memory_connection_bytes: u64,
    /// With `verify`: the VM as it was right before it resumed (as the
    /// destination got ready, with two steps).
    pub at_switchover: Option<VmFingerprint>,
    /// With `verify`: how long taking `at_switchover` held the switch-over
    /// (part of the source's downtime; benchmarks subtract it).
    pub fingerprint_ms: f64,
    /// Verify pass: bytes checked by digest, and those that differed.
    pub verified_bytes: u64,
    pub differing_bytes: u64,
    /// Whether the switch-over had two steps (the source announced it).
    pub two_step_switchover: bool,
}

struct Receiver<'a> {
    vmm: &'a Vmm,
    req: &'a MigrationTestOptions,
    conn: Conn,
    listener: Arc<Listener>,
    lanes: Option<ReceiveLanes>,
    /// The VFs' handles, which take their state on the main connection
    /// or on connections of their own (from Config on).
    incoming: Arc<IncomingDevices>,
    vm: Option<Vm>,
    fault: Option<MigrationFault>,
    /// Optional protocol features both sides agreed to.
    features: ProtocolFeatures,
    /// State arrived (DeviceState and Complete come after it).
    state_received: bool,
    buf: Vec<u8>,
    report: ReceiveReport,
}

/// `vm.receive-migration`: waits for one migration and runs the VM it
/// brings (Running after Complete, or after Switchover with two steps;
/// Paused after CompletePaused); returns once it is over, as CH does.
/// The report is in `vm.info`'s `migration` (`{"received": …}`,
/// `{"failed": …}`, or `{"unknown": …}` when the source was lost after
/// this host was ready: the VM then stays here, Paused).
pub fn receive(vmm: &Vmm, url: &MigrationUrl, req: &MigrationTestOptions) -> HostResult<()> {
    let _op = vmm.begin("receive-migration")?;
    if vmm.has_vm() {
        return Err(HostError::conflict(
            "receive-migration",
            "Can't receive a migration when a VM is already created",
        ));
    }
    let attempt = vmm.next_migration_attempt();
    let result = receive_one(vmm, url, req);
    vmm.set_phase("idle");
    match result {
        Ok(report) => {
            let value = serde_json::to_value(&report).unwrap_or_default();
            vmm.set_last_migration(attempt, json!({ "received": value }));
            Ok(())
        }
        Err(f) => {
            if f.unknown {
                vmm.set_outcome_unknown(f.error.to_string());
            }
            vmm.set_last_migration(attempt, f.outcome());
            Err(f.error)
        }
    }
}

fn receive_one(
    vmm: &Vmm,
    url: &MigrationUrl,
    req: &MigrationTestOptions,
) -> Result<ReceiveReport, Failure> {
    let timeout = Duration::from_secs(req.timeout_s.clamp(1, 3600));
    let listener = Arc::new(
        Listener::bind(url).map_err(|e| HostError::failed("listen", format!("{url:?}: {e}")))?,
    );
    info!("Receiving migration: receiver_url={url:?}");
    vmm.set_phase("receive: listening");
    let conn = listener
        .accept(timeout)
        .and_then(|c| c.set_timeouts(timeout).map(|()| c))
        .map_err(|e| HostError::failed("accept", e))?;
    let started = Instant::now();
    let mut receiver = Receiver {
        vmm,
        req,
        conn,
        listener,
        lanes: None,
        incoming: Arc::new(IncomingDevices::none()),
        vm: None,
        fault: req.fault.clone(),
        features: ProtocolFeatures::empty(),
        state_received: false,
        buf: vec![0u8; COPY_CHUNK],
        report: ReceiveReport {
            total_ms: 0.0,
            memory_bytes: 0,
            device_bytes: 0,
            memory_passes: 0,
            memory_connection_bytes: 0,
            at_switchover: None,
            fingerprint_ms: 0.0,
            verified_bytes: 0,
            differing_bytes: 0,
            two_step_switchover: false,
        },
    };
    let result = receiver.run();
    // Extra connections end with the migration, whatever its outcome.
    if let Some(mut lanes) = receiver.lanes.take() {
        let _ = lanes.finish();
    }
    let result = match result {
        Ok((vm, resume)) => {
            for d in vm.devices().devices_mut() {
                d.set_transfer_options(TransferOptions::default());
            }
            if receiver.features.contains(ProtocolFeatures::SWITCHOVER) {
                receiver.report.two_step_switchover = true;
                receiver.switch_over(vm, resume)
            } else {
                receiver.single_step(vm, resume).map_err(Failure::from)
            }
        }
        Err(e) => Err(Failure::from(e)),
    };
    match result {
        Ok(()) => {
            receiver.report.total_ms = started.elapsed().as_secs_f64() * 1e3;
            Counters::add(&vmm.counters.migrations_received, 1);
            info!(
                "migration received: {} memory bytes, {} device bytes",
                receiver.report.memory_bytes, receiver.report.device_bytes
            );
            Ok(receiver.report)
        }
        Err(f) if f.unknown => {
            error!(
                "receive-migration outcome unknown in {}: {}; the VM stays Paused here",
                f.error.phase, f.error.cause
            );
            Err(f)
        }
        Err(f) => {
            error!(
                "receive-migration failed in {}: {}; VM discarded",
                f.error.phase, f.error.cause
            );
            // Best effort: the source may already be gone.
            let _ = connection::write_error(&mut receiver.conn, &f.error.to_string());
            receiver.vm.take();
            Counters::add(&vmm.counters.migrations_failed, 1);
            Err(f)
        }
    }
}

/// A failure on a VF's connection of its own, named by its VF.
fn lane_failure(e: LaneError) -> HostError {
    match e.id {
        Some(id) => failed(format!("device-state {id}"), &e.error),
        None => failed("device-state connection", &e.error),
    }
}

impl Receiver<'_> {
    fn phase(&self, phase: &str) {
        self.vmm.set_phase(format!("receive: {phase}"));
    }

    /// Test hook: fires the requested fault if it is for `phase`.
    fn inject(&mut self, phase: &str) {
        if let Some(f) = fault::take_for(&mut self.fault, phase) {
            self.vmm.set_phase(format!("receive: fault at {phase}"));
            f.fire(&self.conn);
        }
    }

    fn ok(&mut self, phase: &str) -> HostResult<()> {
        Response::ok()
            .write_to(&mut self.conn)
            .map_err(|e| failed(phase, &e))
    }

    fn vm(&self, phase: &str) -> HostResult<&Vm> {
        self.vm
            .as_ref()
            .ok_or_else(|| HostError::bad_request(phase, "command before Config"))
    }

    /// Stops the extra connections (device-state ones end when the source
    /// closes them) and returns the first failure of a device-state one.
    fn device_lane_error(&mut self) -> Option<HostError> {
        if let Some(mut lanes) = self.lanes.take() {
            let _ = lanes.finish();
        }
        self.incoming.take_lane_error().map(lane_failure)
    }

    /// Serves commands until Complete; returns the VM to install.
    fn run(&mut self) -> HostResult<(Vm, bool)> {
        let result = self.serve_commands();
        let lane_may_be_why = |e: &HostError| {
            e.phase == "abandon" || (e.phase == "read command" && e.cause.contains("timed out"))
        };
        if matches!(&result, Err(e) if lane_may_be_why(e)) {
            // The source gave up, or went silent while a VF's state was
            // due on its own connection; a VF that failed there is why.
            if let Some(e) = self.device_lane_error() {
                return Err(e);
            }
        }
        result
    }

    /// Waits for the next command; while VF state streams in on its own
    /// connections, the main connection may be silent for longer than
    /// the timeout.
    fn wait_for_command(&self) -> HostResult<()> {
        let timeout = Duration::from_secs(self.req.timeout_s.clamp(1, 3600));
        loop {
            let mut pfd = libc::pollfd {
                fd: self.conn.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd on our stack, count 1.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            match rc {
                0 if self.incoming.streaming() => continue,
                0 => {
                    return Err(HostError::failed(
                        "read command",
                        format!(
                            "migration socket error: timed out: the peer was silent for {} s",
                            timeout.as_secs()
                        ),
                    ))
                }
                n if n > 0 => return Ok(()),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(HostError::failed("read command", e));
                    }
                }
            }
        }
    }

    fn serve_commands(&mut self) -> HostResult<(Vm, bool)> {
        let mut started = false;
        loop {
            self.wait_for_command()?;
            let request = Request::read_from(&mut self.conn).map_err(|e| {
                if is_eof(&e) {
                    HostError::failed(
                        "read command",
                        "the source closed the connection before Complete",
                    )
                } else {
                    failed("read command", &e)
                }
            })?;
            if !started && request.command() != Command::Start {
                return Err(HostError::bad_request(
                    "start",
                    format!("first command is {:?}, not Start", request.command()),
                ));
            }
            match request.command() {
                Command::Start => {
                    self.phase("start");
                    started = true;
                    let mut accepts = self.req.protocol_features();
                    // Test hooks at the device stream work on the main
                    // connection's path: keep the streams there.
                    let hooked = self.req.stall_at.as_deref() == Some("device-state")
                        || self
                            .fault
                            .as_ref()
                            .is_some_and(|f| f.phase == "device-state");
                    if hooked {
                        accepts -= ProtocolFeatures::DEVICE_STATE_CONNECTIONS;
                    }
                    let (answer, agreed) = features::answer(&request, accepts)
                        .map_err(|e| HostError::bad_request("start", chain(&e)))?;
                    self.features = agreed;
                    answer
                        .write_to(&mut self.conn)
                        .map_err(|e| failed("start", &e))?;
                }
                Command::Config => self.config(&request)?,
                Command::VerifySetup => self.verify_setup(&request)?,
                Command::Memory => self.memory(&request)?,
                Command::Digests => self.digests(&request)?,
                Command::DeviceState => self.device_state(&request)?,
                Command::State => self.state(&request)?,
                Command::Complete | Command::CompletePaused => {
                    return self.complete(request.command() == Command::Complete);
                }
                Command::Switchover => {
                    return Err(HostError::bad_request(
                        "switchover",
                        "Switchover before Complete",
                    ))
                }
                Command::Abandon => {
                    let _ = self.ok("abandon");
                    return Err(HostError::failed(
                        "abandon",
                        "the source abandoned the migration",
                    ));
                }
                other => {
                    return Err(HostError::bad_request(
                        "command",
                        format!("{other:?} is not supported by this host"),
                    ))
                }
            }
        }
    }

    /// `VerifySetup` (agreed as `VERIFY`): from now on every page that
    /// arrives is hashed.
    fn verify_setup(&mut self, request: &Request) -> HostResult<()> {
        let phase = "verify setup";
        self.phase(phase);
        if !self.features.contains(ProtocolFeatures::VERIFY) {
            return Err(HostError::bad_request(phase, "VerifySetup without VERIFY"));
        }
        let memory = self.vm(phase)?.memory().clone();
        verify::receive_setup(
            &mut self.conn,
            request.length(),
            memory.arrivals(),
            &memory.regions(),
        )
        .map_err(|e| HostError::bad_request(phase, chain(&e)))?;
        self.ok(phase)
    }

    /// `Digests`: answered with the pages whose digest differs here.
    fn digests(&mut self, request: &Request) -> HostResult<()> {
        let phase = "digests";
        self.phase(phase);
        let memory = self.vm(phase)?.memory().clone();
        let (checked, differ) =
            verify::answer_digests(&mut self.conn, request.length(), memory.arrivals())
                .map_err(|e| HostError::bad_request(phase, chain(&e)))?;
        self.report.verified_bytes += checked;
        self.report.differing_bytes += differ;
        Ok(())
    }

    /// Builds the VM (VFs stopped) and checks each source VF's description
    /// against its own (`IncomingDevices::check`), before the source
    /// pauses anything.
    fn config(&mut self, request: &Request) -> HostResult<()> {
        self.phase("config");
        if self.vm.is_some() {
            return Err(HostError::bad_request("config", "Config sent twice"));
        }
        let mut config: MigrationConfig =
            read_json_payload(&mut self.conn, request.length(), "config")?;
        config.vm.validate()?;
        for entry in &mut config.vm.devices {
            if let Some(spec) = self.req.device_overrides.get(&entry.id) {
                info!(
                    "device {}: using local spec '{spec}' instead of the source's",
                    entry.id
                );
                entry.spec = spec.clone();
            }
            let parsed = DeviceConfig::parse(&entry.spec)
                .map_err(|e| HostError::bad_request(format!("config: device {}", entry.id), e))?;
            if parsed.fd.is_some() {
                return Err(HostError::bad_request(
                    format!("config: device {}", entry.id),
                    "fd= names a descriptor of the source process; map the device with device_overrides",
                ));
            }
        }
        if !self.features.contains(ProtocolFeatures::DEVICE_STATE) {
            if let Some(entry) = config.vm.devices.first() {
                return Err(HostError::bad_request(
                    "config",
                    format!(
                        "the source does not stream device state (DEVICE_STATE): device {} \
                         cannot be received",
                        entry.id
                    ),
                ));
            }
        }
        let vm = Vm::create(config.vm.clone(), true, None)?;
        if self.req.prefault_vram {
            for d in vm.devices().devices_mut() {
                if let Backend::Emulated(vf) = d.backend() {
                    vf.prefault_vram()
                        .map_err(|e| HostError::failed("config: prefault VRAM", e))?;
                }
            }
        }
        for (id, faults) in &self.req.device_faults {
            for f in faults {
                vm.inject_fault(id, f.to_fault()?)?;
            }
        }
        let timeout = Duration::from_secs(self.req.timeout_s.clamp(1, 3600));
        let handles: Vec<(String, Box<dyn IncomingState>)> = {
            let mut set = vm.devices();
            set.devices_mut()
                .iter_mut()
                .map(|d| {
                    d.set_transfer_options(TransferOptions {
                        device_timeout: timeout,
                        ..TransferOptions::default()
                    });
                    let handle: Box<dyn IncomingState> = Box::new(d.incoming());
                    (xe_vf_glue::migration::Snapshottable::id(d), handle)
                })
                .collect()
        };
        let mut incoming = IncomingDevices::check(handles, &config.streamed)
            .map_err(|e| HostError::conflict("config", chain(&e)))?;
        if self.features.contains(ProtocolFeatures::VRAM_PRECOPY) {
            let dir = self.req.vram_dir.clone().unwrap_or_else(std::env::temp_dir);
            incoming = incoming.with_vram_dir(dir);
        }
        self.incoming = Arc::new(incoming);
        let lane_fault = fault::take_for(&mut self.fault, "vram-precopy");
        self.lanes = Some(ReceiveLanes::start(
            self.listener.clone(),
            vm.memory().clone(),
            self.incoming.clone(),
            timeout,
            lane_fault,
        )?);
        self.vm = Some(vm);
        self.ok("config")
    }

    fn memory(&mut self, request: &Request) -> HostResult<()> {
        self.report.memory_passes += 1;
        let phase = "memory";
        self.phase(phase);
        self.inject(phase);
        // `memory#N`: the Nth Memory command (with the vCPU idle, the
        // second is the final pass).
        self.inject(&format!("memory#{}", self.report.memory_passes));
        // The source may go, or this side drop, before the table as well as
        // inside the memory: both are the same failure.
        let table = MemoryRangeTable::read_from(&mut self.conn, request.length()).map_err(|e| {
            if is_eof(&e) {
                HostError::failed(phase, "the source closed the connection mid-transfer")
            } else {
                HostError::bad_request(phase, chain(&e))
            }
        })?;
        let memory = self.vm(phase)?.memory().clone();
        for r in table.regions() {
            memory
                .receive_range(r, &mut self.conn, &mut self.buf)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        HostError::failed(phase, "the source closed the connection mid-transfer")
                    } else {
                        HostError::failed(phase, e)
                    }
                })?;
            self.report.memory_bytes += r.length;
            Counters::add(&self.vmm.counters.memory_bytes_received, r.length);
        }
        self.ok(phase)
    }

    /// One VF's state on the main connection, after State, into its
    /// handle (`IncomingDevices::receive`).
    fn device_state(&mut self, request: &Request) -> HostResult<()> {
        if !self.features.contains(ProtocolFeatures::DEVICE_STATE) {
            return Err(HostError::bad_request(
                "device-state",
                "DeviceState without the DEVICE_STATE feature",
            ));
        }
        if !self.state_received {
            return Err(HostError::bad_request(
                "device-state",
                "DeviceState before State",
            ));
        }
        // The stream ends itself: a DeviceState that announces a length
        // is not ours.
        if request.length() != DEVICE_STATE_SELF_DELIMITED {
            return Err(HostError::bad_request(
                "device-state",
                format!(
                    "DeviceState announcing {} bytes (the stream delimits itself)",
                    request.length()
                ),
            ));
        }
        let index = request.device_index();
        let id = self.incoming.id(index).unwrap_or("?").to_string();
        let phase = format!("device-state {id}");
        self.phase(&phase);
        if self.req.stall_at.as_deref() == Some("device-state") {
            self.vmm.set_phase("receive: stalled");
            std::thread::sleep(Duration::from_secs(self.req.timeout_s.clamp(1, 3600)));
            return Err(HostError::failed(&phase, "stalled on request (stall_at)"));
        }
        let stream_fault = fault::take_for(&mut self.fault, "device-state");
        let mut reader = self
            .conn
            .try_clone()
            .and_then(|c| Ok(FaultyStream::new(c, self.conn.try_clone()?, stream_fault)))
            .map_err(|e| HostError::failed(&phase, e))?;
        let bytes = self
            .incoming
            .receive(index, &mut reader)
            .map_err(|e| failed(&phase, &e))?;
        self.report.device_bytes += bytes;
        Counters::add(&self.vmm.counters.device_bytes_received, bytes);
        self.ok(&phase)
    }

    fn state(&mut self, request: &Request) -> HostResult<()> {
        self.phase("state");
        // All memory is in: the extra connections have closed (CH's cleanup).
        if let Some(mut lanes) = self.lanes.take() {
            let bytes = lanes.finish();
            if let Some(e) = self.incoming.take_lane_error() {
                return Err(lane_failure(e));
            }
            let device_bytes = self.incoming.lane_bytes();
            self.report.device_bytes += device_bytes;
            Counters::add(&self.vmm.counters.device_bytes_received, device_bytes);
            let bytes = bytes?;
            self.report.memory_connection_bytes = bytes;
            self.report.memory_bytes += bytes;
            Counters::add(&self.vmm.counters.memory_bytes_received, bytes);
        }
        self.inject("state");
        if self.state_received {
            return Err(HostError::bad_request("state", "State sent twice"));
        }
        let tree: Snapshot = read_json_payload(&mut self.conn, request.length(), "state")?;
        let vm = self.vm("state")?;
        for entry in &vm.config().devices {
            if !tree.snapshots.contains_key(&entry.id) {
                return Err(HostError::bad_request(
                    "state",
                    format!("no section for device {}", entry.id),
                ));
            }
        }
        self.state_received = true;
        self.ok("state")
    }

    /// Checks that everything arrived; returns the VM, still paused.
    fn complete(&mut self, resume: bool) -> HostResult<(Vm, bool)> {
        self.phase("complete");
        self.inject("complete");
        if !self.state_received {
            return Err(HostError::bad_request("complete", "Complete before State"));
        }
        self.incoming
            .check_all_received()
            .map_err(|e| HostError::bad_request("complete", chain(&e)))?;
        let vm = self
            .vm
            .take()
            .ok_or_else(|| HostError::bad_request("complete", "no VM"))?;
        {
            let memory = vm.memory();
            checksum::log_if_enabled("when ready", &**memory, &memory.regions());
        }
        if self.req.verify {
            let t = Instant::now();
            match vm.fingerprint() {
                Ok(f) => self.report.at_switchover = Some(f),
                Err(e) => {
                    self.vm = Some(vm);
                    return Err(e);
                }
            }
            self.report.fingerprint_ms = t.elapsed().as_secs_f64() * 1e3;
        }
        Ok((vm, resume))
    }

    /// A source without the two-step switch-over: the VM runs, then the
    /// Ok goes out. If it cannot, the source resumes its own copy, so
    /// this one is discarded (both may have run meanwhile: the risk the
    /// source logged).
    fn single_step(&mut self, vm: Vm, resume: bool) -> HostResult<()> {
        let vm = Arc::new(vm);
        self.vmm.install(vm.clone(), VmState::Paused);
        if resume {
            if let Err(e) = self.vmm.resume_vm(&vm) {
                self.discard();
                return Err(e);
            }
            self.inject("resumed");
        }
        if let Err(e) = self.ok("complete") {
            self.discard();
            return Err(e);
        }
        Ok(())
    }

    /// Two steps: answers Complete ("ready") with the VM installed here
    /// but paused, then runs it on the source's Switchover. Before ready
    /// is out, a failure discards it; after, a lost source leaves it
    /// paused (an unknown outcome), since the source may have sent
    /// Switchover; an explicit Abandon, or a resume that fails, discards
    /// it.
    fn switch_over(&mut self, vm: Vm, resume: bool) -> Result<(), Failure> {
        let vm = Arc::new(vm);
        self.vmm.install(vm.clone(), VmState::Paused);
        // Ready did not go out whole: the source cannot have read it, so
        // it cannot send Switchover.
        if let Err(e) = self.ok("complete") {
            self.discard();
            return Err(e.into());
        }
        self.phase("ready");
        self.inject("ready");
        let go = switchover::await_go(&mut self.conn)
            .map_err(|e| Failure::unknown(failed("switchover", &e)))?;
        if let Go::Abandon = go {
            self.discard();
            let _ = self.ok("abandon");
            return Err(HostError::failed("abandon", "the source abandoned the migration").into());
        }
        self.phase("switchover");
        self.inject("switchover");
        if resume {
            if let Err(e) = self.vmm.resume_vm(&vm) {
                // Not running here: the source, told so, resumes its own.
                self.discard();
                return Err(e.into());
            }
            self.inject("resumed");
        }
        if let Err(e) = self.ok("switchover") {
            // The VM runs here; the source, told nothing, stays paused.
            warn!(
                "the source was not told that the VM runs here ({}): its outcome is unknown \
                 and its VM stays paused",
                e.cause
            );
        }
        Ok(())
    }

    /// The VM being received is not this host's after all.
    fn discard(&mut self) {
        if let Some(vm) = self.vmm.uninstall() {
            vm.shut_down();
        }
    }
}
