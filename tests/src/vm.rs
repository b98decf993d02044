// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VM of the test host: guest memory, a vCPU and Xe VFs.
//!
//! Guest memory is split in two: the vCPU writes the low half, and the
//! high half is cut into one DMA slice per VF, into which its workload
//! writes records. Every VF may DMA anywhere in guest memory (its DMA
//! ranges are all of it), as a VMM maps it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use xe_vf_glue::device_set::XeVfSet;
use xe_vf_glue::error_chain::Chain;
use xe_vf_glue::migration::Pausable;
use xe_vf_glue::protocol::MemoryRange;
use xe_vf_glue::XeVfDevice;
use xe_vf_plugin::device_config::DeviceConfig;
use xe_vf_plugin::emulated::{EmulatedXeVf, Fault, GuestDmaRegion, StateDigest};

use crate::error::{HostError, HostResult};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::vcpu::Vcpu;

/// Most VFs one VM may have (also from a migration peer).
pub const MAX_DEVICES: usize = 16;
/// Longest device id accepted.
pub const MAX_ID_LEN: usize = 64;

/// One `--device`: its id and the spec string as the user gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    pub id: String,
    pub spec: String,
}

/// What a VM is made of: `config.json` of a snapshot, and what the
/// migration `Config` command carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub memory_size: u64,
    pub vcpu_workload: bool,
    pub devices: Vec<DeviceEntry>,
}

/// Ids come from users and migration peers: bounded, plain characters.
pub fn check_device_id(id: &str) -> HostResult<()> {
    let plain = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if id.is_empty() || id.len() > MAX_ID_LEN || !plain {
        return Err(HostError::bad_request(
            "device id",
            format!("'{id}' must be 1..={MAX_ID_LEN} characters of [A-Za-z0-9_.-]"),
        ));
    }
    Ok(())
}

impl VmConfig {
    /// Builds the config from `--device` specs; ids default to `_xe<N>`
    /// (generated here, never parsed: `_` ids are reserved for the VMM).
    pub fn from_specs(memory_size: u64, vcpu_workload: bool, specs: &[String]) -> HostResult<Self> {
        let mut devices = Vec::new();
        for (index, spec) in specs.iter().enumerate() {
            let config = DeviceConfig::parse(spec)
                .map_err(|e| HostError::bad_request(format!("--device '{spec}'"), e))?;
            let id = config.id.clone().unwrap_or_else(|| format!("_xe{index}"));
            devices.push(DeviceEntry {
                id,
                spec: spec.clone(),
            });
        }
        let config = VmConfig {
            memory_size,
            vcpu_workload,
            devices,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks a config that may come from a file or a peer.
    pub fn validate(&self) -> HostResult<()> {
        if self.devices.len() > MAX_DEVICES {
            return Err(HostError::bad_request(
                "config",
                format!(
                    "{} devices exceed the limit of {MAX_DEVICES}",
                    self.devices.len()
                ),
            ));
        }
        for (i, d) in self.devices.iter().enumerate() {
            check_device_id(&d.id)?;
            if self.devices[..i].iter().any(|o| o.id == d.id) {
                return Err(HostError::bad_request(
                    "config",
                    format!("device id '{}' is used twice", d.id),
                ));
            }
        }
        Ok(())
    }

    /// The config as CH's `VmConfig` shows it in `vm.info`: memory size,
    /// one vCPU, no payload (there is no guest), and each VF as a
    /// `DeviceConfig` (`path` for a real one) with our spec beside it in
    /// `x_xe_vf` (the schema allows extra keys).
    pub fn to_ch_config(&self) -> Value {
        let devices: Vec<Value> = self
            .devices
            .iter()
            .map(|d| {
                let mut dev =
                    json!({ "id": d.id, "iommu": false, "pci_segment": 0, "x_xe_vf": d.spec });
                if let Ok(parsed) = DeviceConfig::parse(&d.spec) {
                    if let Some(path) = parsed.path {
                        dev["path"] = json!(path);
                    }
                }
                dev
            })
            .collect();
        json!({
            "cpus": { "boot_vcpus": 1, "max_vcpus": 1 },
            "memory": { "size": self.memory_size },
            "payload": {},
            "devices": devices,
            "x_vcpu_workload": self.vcpu_workload,
        })
    }

    /// Reads the subset of CH's `VmConfig` (`vm.create`) the host has:
    /// `memory.size` (CH's default 512 MiB when absent), `devices` (a
    /// VFIO `path` with its `id`, or an emulated VF's spec in `x_xe_vf`),
    /// `x_vcpu_workload`. Anything else the host cannot model (disks,
    /// net, a payload to boot...) is refused by name.
    pub fn from_ch_config(value: &Value) -> HostResult<Self> {
        let phase = "vm.create";
        let obj = value
            .as_object()
            .ok_or_else(|| HostError::bad_request(phase, "the VM config is not a JSON object"))?;
        let mut memory_size = 512 << 20;
        let mut vcpu_workload = true;
        let mut specs = Vec::new();
        for (key, v) in obj {
            match key.as_str() {
                "memory" => {
                    memory_size = v["size"].as_u64().ok_or_else(|| {
                        HostError::bad_request(phase, "memory.size must be a number of bytes")
                    })?;
                    if let Some(other) = v.as_object().and_then(|m| m.keys().find(|k| *k != "size"))
                    {
                        return Err(HostError::bad_request(
                            phase,
                            format!("memory.{other}: not supported by the xe-vf test host"),
                        ));
                    }
                }
                "x_vcpu_workload" => {
                    vcpu_workload = v.as_bool().ok_or_else(|| {
                        HostError::bad_request(phase, "x_vcpu_workload must be a boolean")
                    })?
                }
                // No guest runs: there is nothing to boot from.
                "payload" | "cpus" => {}
                "devices" => {
                    for d in v.as_array().into_iter().flatten() {
                        let spec = match (d["x_xe_vf"].as_str(), d["path"].as_str()) {
                            (Some(spec), _) => spec.to_string(),
                            (None, Some(path)) => match d["id"].as_str() {
                                Some(id) => format!("path={path},id={id}"),
                                None => format!("path={path}"),
                            },
                            (None, None) => {
                                return Err(HostError::bad_request(
                                    phase,
                                    "devices: each needs a path (or an emulated VF in x_xe_vf)",
                                ))
                            }
                        };
                        specs.push(spec);
                    }
                }
                other if v.is_null() || v == &json!([]) || v == &json!(false) => {
                    let _ = other;
                }
                other => {
                    return Err(HostError::bad_request(
                        phase,
                        format!("{other}: not supported by the xe-vf test host"),
                    ))
                }
            }
        }
        Self::from_specs(memory_size, vcpu_workload, &specs)
    }

    /// The DMA slice of device `index` in the high half of memory.
    fn dma_slice(&self, index: usize) -> (u64, u64) {
        let half = self.memory_size / 2;
        let n = self.devices.len().max(1) as u64;
        let len = (half / n) / PAGE_SIZE * PAGE_SIZE;
        (half + index as u64 * len, len)
    }
}

fn device_config(entry: &DeviceEntry) -> HostResult<DeviceConfig> {
    let phase = format!("device {}", entry.id);
    let config = DeviceConfig::parse(&entry.spec).map_err(|e| HostError::bad_request(&phase, e))?;
    if let Some(id) = &config.id {
        if *id != entry.id {
            return Err(HostError::bad_request(
                phase,
                format!("spec id '{id}' differs from the device's id"),
            ));
        }
    }
    Ok(config)
}

/// Builds one device from its entry (restore from a snapshot).
pub type DeviceBuilder<'a> =
    &'a mut dyn FnMut(&DeviceEntry, DeviceConfig) -> HostResult<XeVfDevice>;

/// A running (or paused) VM.
pub struct Vm {
    config: VmConfig,
    memory: Arc<GuestMemory>,
    vcpu: Vcpu,
    devices: Mutex<XeVfSet>,
}

/// What `vm.info` shows of one device.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    pub id: String,
    pub spec: String,
    pub vf_state: String,
    pub digest: Option<StateDigest>,
}

/// The frozen state of a VM at one moment (switchover, pause).
#[derive(Clone, Debug, Serialize)]
pub struct VmFingerprint {
    pub memory_crc32c: u32,
    pub devices: Vec<DeviceInfo>,
}

impl Vm {
    /// Creates memory and devices. With `build` given, devices come from
    /// it (restore from a snapshot); otherwise they are opened fresh. The
    /// vCPU starts stopped; devices are RUNNING unless `stopped`.
    pub fn create(
        config: VmConfig,
        stopped: bool,
        mut build: Option<DeviceBuilder<'_>>,
    ) -> HostResult<Self> {
        config.validate()?;
        let memory = Arc::new(
            GuestMemory::new(config.memory_size)
                .map_err(|e| HostError::bad_request("guest memory", e))?,
        );
        let vcpu = Vcpu::new(memory.clone(), config.vcpu_workload, 0x5eed_cafe)
            .map_err(|e| HostError::failed("vcpu", e))?;
        let mut set = XeVfSet::default();
        for (index, entry) in config.devices.iter().enumerate() {
            let dc = device_config(entry)?;
            let mut dev = match build.as_mut() {
                Some(b) => b(entry, dc)?,
                None => XeVfDevice::new(&entry.id, dc)
                    .map_err(|e| HostError::failed(format!("device {}", entry.id), e))?,
            };
            dev.set_dma_ranges(vec![MemoryRange {
                gpa: 0,
                length: config.memory_size,
            }]);
            set.push(dev);
            // Stop before the DMA window opens, so a fresh VF on a
            // destination never writes into memory being received.
            if stopped {
                set.pause()
                    .map_err(|e| HostError::failed("pause devices", Chain(&e)))?;
            }
            let (offset, len) = config.dma_slice(index);
            if let Some(emu) = set.devices()[index].backend().emulated() {
                let file = memory
                    .dup_file()
                    .map_err(|e| HostError::failed("guest memory", e))?;
                emu.attach_guest_memory(GuestDmaRegion { file, offset, len });
            }
        }
        Ok(Vm {
            config,
            memory,
            vcpu,
            devices: Mutex::new(set),
        })
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    pub fn vcpu(&self) -> &Vcpu {
        &self.vcpu
    }

    pub fn devices(&self) -> MutexGuard<'_, XeVfSet> {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// vCPU stops first, then every VF (all to RUNNING_P2P, then STOP).
    pub fn pause(&self) -> HostResult<()> {
        self.vcpu.set_running(false);
        if let Err(e) = self.devices().pause() {
            self.vcpu.set_running(true);
            return Err(HostError::failed("pause devices", Chain(&e)));
        }
        Ok(())
    }

    /// VFs back to RUNNING (all out of STOP first), then the vCPU.
    pub fn resume(&self) -> HostResult<()> {
        self.devices()
            .resume()
            .map_err(|e| HostError::failed("resume devices", Chain(&e)))?;
        self.vcpu.set_running(true);
        Ok(())
    }

    /// Per-device state and digests (emulated VFs only have digests).
    pub fn device_infos(&self) -> Vec<DeviceInfo> {
        let set = self.devices();
        set.devices()
            .iter()
            .zip(&self.config.devices)
            .map(|(d, entry)| DeviceInfo {
                id: entry.id.clone(),
                spec: entry.spec.clone(),
                vf_state: d
                    .state()
                    .map(|s| s.name().to_string())
                    .unwrap_or_else(|e| format!("unknown ({})", Chain(&e))),
                digest: d.backend().emulated().and_then(|e| e.digest().ok()),
            })
            .collect()
    }

    /// The emulated VF `id`, for the test hooks named by `phase`.
    fn emulated_device(&self, id: &str, phase: &str) -> HostResult<Arc<EmulatedXeVf>> {
        let set = self.devices();
        let index = self
            .config
            .devices
            .iter()
            .position(|d| d.id == id)
            .ok_or_else(|| HostError::bad_request(phase, format!("no device '{id}'")))?;
        set.devices()[index]
            .backend()
            .emulated()
            .cloned()
            .ok_or_else(|| HostError::bad_request(phase, format!("device '{id}' is not emulated")))
    }

    /// Test hook: hands `fault` to the emulated VF `id`.
    pub fn inject_fault(&self, id: &str, fault: Fault) -> HostResult<()> {
        self.emulated_device(id, "inject-fault")?
            .inject_fault(fault);
        log::warn!("fault injection: device {id}: {fault:?}");
        Ok(())
    }

    /// Test hook: fills the emulated VF `id`'s VRAM and blobs from `seed`
    /// (about `zero_percent` of the pages zero), so its state differs
    /// from a reset one even with its workload off.
    pub fn fill_device(&self, id: &str, seed: u64, zero_percent: u8) -> HostResult<()> {
        self.emulated_device(id, "fill-device")?
            .fill_vram(seed, zero_percent)
            .map_err(|e| HostError::failed("fill-device", e))
    }

    /// Stops the VM for good (`vm.shutdown`, `vm.delete`): the vCPU
    /// stops and the VFs go to STOP.
    pub fn shut_down(&self) {
        self.vcpu.set_running(false);
        if let Err(e) = self.devices().pause() {
            log::warn!("shutting down: {}", Chain(&e));
        }
    }

    /// Memory checksum and device digests, as they are now.
    pub fn fingerprint(&self) -> HostResult<VmFingerprint> {
        Ok(VmFingerprint {
            memory_crc32c: self
                .memory
                .crc32c()
                .map_err(|e| HostError::failed("memory checksum", e))?,
            devices: self.device_infos(),
        })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.vcpu.set_running(false);
        for d in self.devices().devices() {
            if let Some(emu) = d.backend().emulated() {
                emu.detach_guest_memory();
            }
        }
    }
}
