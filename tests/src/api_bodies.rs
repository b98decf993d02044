// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Cloud Hypervisor's request bodies, field for field as `ch-remote`
//! sends them (`vmm/src/api/mod.rs`, `vmm/src/config.rs` at the pinned
//! commit), with CH's defaults and CH's validation messages. Each field is
//! either honoured or refused by the test host with a message naming it;
//! a field CH does not have is an error (CH would ignore it silently).

use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;
use std::time::Duration;

use migration_ext::final_pass::FinalPassMode;
use migration_ext::vram::VramPrecopyMode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{HostError, HostResult};
use crate::migration::conn::MigrationUrl;

/// CH's `MAX_MIGRATION_CONNECTIONS`.
pub const MAX_MIGRATION_CONNECTIONS: u32 = 128;

fn default_downtime_ms() -> NonZeroU64 {
    NonZeroU64::new(300).unwrap_or(NonZeroU64::MIN)
}

fn default_timeout_s() -> NonZeroU64 {
    NonZeroU64::new(3600).unwrap_or(NonZeroU64::MIN)
}

fn default_connections() -> NonZeroU32 {
    NonZeroU32::MIN
}

/// What to do when precopy has not converged within `timeout_s`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeoutStrategy {
    /// Abort the migration; the VM runs on at the source.
    #[default]
    Cancel,
    /// Pause and migrate anyway, whatever the downtime.
    Ignore,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMode {
    #[default]
    Precopy,
    Postcopy,
}

/// `vm.send-migration` (CH's `VmSendMigrationData`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationData {
    pub destination_url: String,
    /// Memory by fd over a unix socket: refused (see [`Self::check`]).
    #[serde(default)]
    pub local: bool,
    /// Only with `local` (CH's rule), so refused with it.
    #[serde(default)]
    pub preserve_source: bool,
    /// Downtime the precopy loop aims for: honoured.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: NonZeroU64,
    /// Longest precopy phase: honoured (with `timeout_strategy`); the
    /// host also takes it as the longest a peer may stay silent (CH
    /// leaves that to TCP keepalive, 2-3 min, which tests cannot wait).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: NonZeroU64,
    #[serde(default)]
    pub timeout_strategy: TimeoutStrategy,
    /// Parallel connections for memory: honoured over TCP as CH does.
    #[serde(default = "default_connections")]
    pub connections: NonZeroU32,
    /// mTLS: refused.
    #[serde(default)]
    pub tls_dir: Option<PathBuf>,
    /// Postcopy: refused.
    #[serde(default)]
    pub memory_mode: MigrationMode,
    /// How the final memory pass covers the pages a VF may have written
    /// without logging them (our series' field, `final_pass=` of the
    /// patched ch-remote): honoured.
    #[serde(default)]
    pub final_pass: FinalPassMode,
    /// VRAM pre-copy through the VFs' BARs (our series' field,
    /// `vram_precopy=` of the patched ch-remote): honoured; a test's
    /// armed option overrides it.
    #[serde(default)]
    pub vram_precopy: VramPrecopyMode,
    /// After a migration whose outcome is unknown: the user checked that
    /// the VM does not run on the other host (our series' field,
    /// `outcome_checked=on` of the patched ch-remote): honoured.
    #[serde(default)]
    pub outcome_checked: bool,
}

fn invalid(message: impl std::fmt::Display) -> HostError {
    HostError::failed("", message)
}

/// CH's `tcp_address_to_server_name`: `host:port` or `[v6]:port`.
fn check_tcp_address(address: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, rest) = rest
            .split_once(']')
            .ok_or("Missing closing ']' for bracketed IPv6 address")?;
        let port = rest
            .strip_prefix(':')
            .ok_or("Missing port separator after bracketed host")?;
        (host, port)
    } else {
        address.rsplit_once(':').ok_or("Missing TCP port")?
    };
    if host.is_empty() {
        return Err("Host must not be empty".into());
    }
    if port.is_empty() {
        return Err("Port must not be empty".into());
    }
    port.parse::<u16>()
        .map_err(|_| format!("Invalid TCP port: {port}"))?;
    Ok(())
}

impl SendMigrationData {
    pub fn downtime(&self) -> Duration {
        Duration::from_millis(self.downtime_ms.get())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s.get())
    }

    /// CH's `VmSendMigrationData::validate`, same rules and words.
    fn validate(&self) -> HostResult<()> {
        let v = |m: &str| invalid(format!("Error validating send migration parameters: {m}"));
        if let Some(addr) = self.destination_url.strip_prefix("tcp:") {
            check_tcp_address(addr).map_err(|e| {
                invalid(e).context(
                    "Error validating send migration parameters: destination_url must use \
                     tcp:<host>:<port> or unix:<path>.",
                )
            })?;
        } else if self
            .destination_url
            .strip_prefix("unix:")
            .is_some_and(|p| !p.is_empty())
        {
            if self.connections.get() > 1 {
                return Err(v(
                    "UNIX sockets and connections option cannot be used at the same time.",
                ));
            }
            if self.tls_dir.is_some() {
                return Err(v(
                    "UNIX sockets and TLS encryption cannot be used at the same time.",
                ));
            }
        } else {
            return Err(v(
                "destination_url must use tcp:<host>:<port> or unix:<path>.",
            ));
        }
        if self.connections.get() > MAX_MIGRATION_CONNECTIONS {
            return Err(v(&format!(
                "connections must not exceed {MAX_MIGRATION_CONNECTIONS}."
            )));
        }
        if self.local {
            if !self.destination_url.starts_with("unix:") {
                return Err(v("local option is only supported with UNIX sockets."));
            }
            if self.connections.get() > 1 {
                return Err(v(
                    "local option and connections option cannot be used at the same time.",
                ));
            }
        }
        if self.preserve_source && !self.local {
            return Err(v(
                "preserve_source option is only supported with the local option.",
            ));
        }
        if self.memory_mode == MigrationMode::Postcopy {
            if self.local {
                return Err(v(
                    "memory_mode=postcopy and local options are mutually exclusive.",
                ));
            }
            if self.connections.get() > 1 {
                return Err(v(
                    "memory_mode=postcopy currently requires a single connection (connections=1).",
                ));
            }
        }
        Ok(())
    }

    /// CH's validation, then what the test host does not do, each named
    /// by its field. The chain is CH's for a refused configuration.
    pub fn check(&self) -> HostResult<MigrationUrl> {
        self.validate()
            .and_then(|()| {
                let refuse = |field: &str, why: &str| {
                    Err(invalid(format!(
                        "{field}: not supported by the xe-vf test host ({why})"
                    )))
                };
                if self.tls_dir.is_some() {
                    return refuse("tls_dir", "no TLS; use a unix socket or a trusted link");
                }
                if self.local {
                    return refuse("local", "guest memory is not handed over by fd");
                }
                if self.memory_mode == MigrationMode::Postcopy {
                    return refuse("memory_mode=postcopy", "only precopy is implemented");
                }
                MigrationUrl::parse(&self.destination_url).map_err(invalid)
            })
            .map_err(|e| e.context("Invalid send migration configuration"))
    }
}

/// `vm.receive-migration` (CH's `VmReceiveMigrationData`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationData {
    pub receiver_url: String,
    #[serde(default)]
    pub tls_dir: Option<PathBuf>,
    #[serde(default)]
    pub memory_mode: MigrationMode,
    /// VFIO cdev fds for the VFs (CH passes them by SCM_RIGHTS; the
    /// numbers in JSON mean nothing): refused, the test host opens its
    /// VFs itself.
    #[serde(default)]
    pub vfio_fds: Option<Vec<Value>>,
    #[serde(default)]
    pub iommufd_fd: Option<Value>,
    /// Memory zones to move to host NUMA nodes: the host has no zones.
    #[serde(default)]
    pub zone_updates: Vec<ZoneUpdate>,
    /// Where pre-copied VRAM is kept (our series' field, `vram_dir=` of
    /// the patched ch-remote): honoured, over a test's armed option.
    #[serde(default)]
    pub vram_dir: Option<PathBuf>,
}

/// CH's `VmMemoryZoneUpdateData`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneUpdate {
    pub id: String,
    pub host_numa_node: u32,
}

impl ReceiveMigrationData {
    /// CH's `VmReceiveMigrationData::validate`, then the host's refusals.
    pub fn check(&self) -> HostResult<MigrationUrl> {
        let checked = (|| {
            if let Some(addr) = self.receiver_url.strip_prefix("tcp:") {
                check_tcp_address(addr).map_err(|e| {
                    invalid(e).context(
                        "Expected receiver_url in the form of either `tcp:<host>:<port>` or `unix:<path>:`",
                    )
                })?;
            } else if self
                .receiver_url
                .strip_prefix("unix:")
                .is_some_and(|p| !p.is_empty())
            {
                if self.tls_dir.is_some() {
                    return Err(invalid(
                        "UNIX sockets and TLS encryption cannot be used at the same time",
                    ));
                }
            } else {
                return Err(invalid(
                    "Expected receiver_url to either use `tcp` or `unix` prefix",
                ));
            }
            let mut ids: Vec<&str> = self.zone_updates.iter().map(|z| z.id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.len() != self.zone_updates.len() {
                return Err(invalid(
                    "More than one update was defined for at least one memory zone",
                ));
            }
            if ids.contains(&"") {
                return Err(invalid(
                    "One or more memory zone updates contained an empty ID",
                ));
            }
            if let Some(dir) = self.vram_dir.as_ref().filter(|d| !d.is_dir()) {
                return Err(invalid(format!("vram_dir {dir:?} is not a directory")));
            }
            let refuse = |field: &str, why: &str| {
                Err(invalid(format!(
                    "{field}: not supported by the xe-vf test host ({why})"
                )))
            };
            if self.tls_dir.is_some() {
                return refuse("tls_dir", "no TLS; use a unix socket or a trusted link");
            }
            if self.memory_mode == MigrationMode::Postcopy {
                return refuse("memory_mode=postcopy", "only precopy is implemented");
            }
            if self.vfio_fds.as_ref().is_some_and(|v| !v.is_empty()) {
                return refuse("vfio_fds", "the host opens its VFs itself");
            }
            if self.iommufd_fd.as_ref().is_some_and(|v| !v.is_null()) {
                return refuse("iommufd_fd", "the host has no iommufd");
            }
            if !self.zone_updates.is_empty() {
                return refuse("zone_updates", "guest memory has no zones");
            }
            MigrationUrl::parse(&self.receiver_url).map_err(invalid)
        })();
        checked.map_err(|e| e.context("Invalid receive migration configuration"))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryRestoreMode {
    #[default]
    Copy,
    OnDemand,
}

/// `vm.restore` (CH's `RestoreConfig`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    pub source_url: String,
    /// A hint for the copy restore; memory is read eagerly anyway.
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub memory_restore_mode: MemoryRestoreMode,
    #[serde(default)]
    pub net_fds: Option<Vec<Value>>,
    #[serde(default)]
    pub vfio_fds: Option<Vec<Value>>,
    #[serde(default)]
    pub iommufd_fd: Option<Value>,
    /// Resume the VM once restored (else it stays Paused): honoured.
    #[serde(default)]
    pub resume: bool,
    #[serde(default)]
    pub zone_updates: Vec<ZoneUpdate>,
}

impl RestoreConfig {
    pub fn check(&self) -> HostResult<()> {
        let refuse = |field: &str, why: &str| {
            Err(invalid(format!(
                "{field}: not supported by the xe-vf test host ({why})"
            )))
        };
        if self.memory_restore_mode == MemoryRestoreMode::OnDemand {
            return refuse("memory_restore_mode=OnDemand", "memory is restored by copy");
        }
        if self.net_fds.as_ref().is_some_and(|v| !v.is_empty()) {
            return refuse("net_fds", "the host has no network devices");
        }
        if self.vfio_fds.as_ref().is_some_and(|v| !v.is_empty()) {
            return refuse("vfio_fds", "the host opens its VFs itself");
        }
        if self.iommufd_fd.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("iommufd_fd", "the host has no iommufd");
        }
        if !self.zone_updates.is_empty() {
            return refuse("zone_updates", "guest memory has no zones");
        }
        Ok(())
    }
}

/// `vm.snapshot` (CH's `VmSnapshotConfig`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    pub destination_url: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(json: &str) -> SendMigrationData {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn ch_defaults_and_what_ch_remote_sends() {
        let s = send(r#"{"destination_url":"unix:/x"}"#);
        assert_eq!(s.downtime(), Duration::from_millis(300));
        assert_eq!(s.timeout(), Duration::from_secs(3600));
        assert_eq!(s.connections.get(), 1);
        assert_eq!(s.timeout_strategy, TimeoutStrategy::Cancel);
        // ch-remote send-migration destination_url=unix:/x
        let s = send(
            r#"{"destination_url":"unix:/x","local":false,"preserve_source":false,
                "downtime_ms":300,"timeout_s":3600,"timeout_strategy":"Cancel",
                "connections":1,"tls_dir":null,"memory_mode":"Precopy"}"#,
        );
        assert!(s.check().is_ok());
        let r: ReceiveMigrationData = serde_json::from_str(
            r#"{"receiver_url":"tcp:0.0.0.0:6000","tls_dir":null,"memory_mode":"Precopy",
                "vfio_fds":null,"iommufd_fd":null,"zone_updates":[]}"#,
        )
        .unwrap();
        assert!(r.check().is_ok());
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (
                r#"{"destination_url":"unix:/x","local":true}"#,
                "local: not supported",
            ),
            (
                r#"{"destination_url":"unix:/x","preserve_source":true}"#,
                "preserve_source option is only supported with the local option.",
            ),
            (
                r#"{"destination_url":"tcp:h:1","tls_dir":"/t"}"#,
                "tls_dir: not supported",
            ),
            (
                r#"{"destination_url":"tcp:h:1","memory_mode":"Postcopy"}"#,
                "memory_mode=postcopy: not supported",
            ),
            (
                r#"{"destination_url":"unix:/x","connections":2}"#,
                "UNIX sockets and connections option cannot be used at the same time.",
            ),
            (
                r#"{"destination_url":"tcp:h:1","connections":129}"#,
                "must not exceed 128",
            ),
            (r#"{"destination_url":"tcp:h"}"#, "Missing TCP port"),
            (
                r#"{"destination_url":"file:///x"}"#,
                "destination_url must use",
            ),
        ];
        for (json, want) in cases {
            let e = send(json).check().unwrap_err();
            let text = e.messages().join(" | ");
            assert!(text.contains(want), "{json}: {text}");
            assert_eq!(e.messages()[0], "Invalid send migration configuration");
        }
        assert!(serde_json::from_str::<SendMigrationData>(
            r#"{"destination_url":"unix:/x","downtime_ms":0}"#
        )
        .is_err());
        assert!(serde_json::from_str::<SendMigrationData>(
            r#"{"destination_url":"unix:/x","fault":{}}"#
        )
        .is_err());
        let recv = |json: &str| {
            serde_json::from_str::<ReceiveMigrationData>(json)
                .unwrap()
                .check()
        };
        for (json, want) in [
            (
                r#"{"receiver_url":"unix:/x","vfio_fds":[{"id":"gpu0","fd":-1}]}"#,
                "vfio_fds",
            ),
            (
                r#"{"receiver_url":"unix:/x","iommufd_fd":-1}"#,
                "iommufd_fd",
            ),
            (
                r#"{"receiver_url":"unix:/x","tls_dir":"/t"}"#,
                "UNIX sockets and TLS",
            ),
            (r#"{"receiver_url":"tcp:h:1","tls_dir":"/t"}"#, "tls_dir"),
            (
                r#"{"receiver_url":"unix:/x","zone_updates":[{"id":"z","host_numa_node":0}]}"#,
                "zone_updates",
            ),
            (r#"{"receiver_url":"x"}"#, "`tcp` or `unix` prefix"),
        ] {
            let text = recv(json).unwrap_err().messages().join(" | ");
            assert!(text.contains(want), "{json}: {text}");
        }
    }
}
