// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The mirror must not drift from Cloud Hypervisor's `vm-migration`.
//!
//! This crate stands in for CH's crate (with our series applied) in the
//! standalone build and the test host; `xe-vf-glue` is compiled against
//! the real one inside CH. If the two differed, code could pass every test
//! here and not build, or behave differently, in CH. This test reads the
//! public interface of both from their sources ([`api`]) and fails on a
//! shared item that differs, on a real item the mirror lacks and on a
//! mirror item the real crate lacks, unless the item is in one of the
//! allow-lists below with the reason.
//!
//! The real sources are the patched tree's `vm-migration/src`, which
//! `scripts/build-cloud-hypervisor.sh` installs in
//! `target/cloud-hypervisor/patched/vm-migration-src/`.

mod api;

use std::fmt;
use std::path::{Path, PathBuf};

use api::Api;

/// Where the build script installs the patched crate's sources, relative
/// to the workspace root.
const REAL_SOURCES: &str = "target/cloud-hypervisor/patched/vm-migration-src";

/// Items of the real crate the mirror leaves out, and why. An entry covers
/// the item named and all its members (`X::m`, `X.f`, `X: derive ..`,
/// `X: impl ..`); a trailing `*` makes it a prefix.
const MISSING_FROM_MIRROR: &[(&str, &str)] = &[
    (
        "tls",
        "TLS for the migration socket: needs rustls; only the VMM's transport uses it",
    ),
    (
        "MigratableError::Tls",
        "carries tls::TlsError (rustls); raised by the VMM's transport only",
    ),
    (
        "UffdError",
        "on-demand (userfaultfd) restore of guest memory: a variant wraps \
         vm_memory::GuestMemoryError; raised by CH's memory manager only",
    ),
    (
        "MigratableError::OnDemandRestore",
        "carries UffdError (above)",
    ),
    (
        "CompletedMigrationContext",
        "the VMM's statistics of a migration (context.rs); no component sees them",
    ),
    (
        "DowntimeContext",
        "the VMM's statistics of a migration (context.rs); no component sees them",
    ),
    (
        "MemoryMigrationContext",
        "the VMM's statistics of a migration (context.rs); no component sees them",
    ),
    (
        "MigrationContextError",
        "the VMM's statistics of a migration (context.rs); no component sees them",
    ),
    (
        "OngoingMigrationContext",
        "the VMM's statistics of a migration (context.rs); no component sees them",
    ),
    (
        "protocol::Command: derive zerocopy::*",
        "CH encodes wire values through zerocopy; the mirror encodes them by hand \
         behind the same read_from/write_to (using the traits would take a \
         zerocopy dependency that no user of the mirror has)",
    ),
    (
        "protocol::Status: derive zerocopy::*",
        "as protocol::Command's zerocopy derives",
    ),
    (
        "protocol::Request: derive zerocopy::*",
        "as protocol::Command's zerocopy derives",
    ),
    (
        "protocol::Response: derive zerocopy::*",
        "as protocol::Command's zerocopy derives",
    ),
    (
        "protocol::MemoryRange: derive zerocopy::*",
        "as protocol::Command's zerocopy derives",
    ),
];

/// Items of the mirror the real crate lacks, and why. Helpers of our own
/// belong in `xe-vf-glue` (`xe_vf_glue::wire`), not here.
const MIRROR_ONLY: &[(&str, &str)] = &[];

fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

fn api_of_dir(dir: &Path) -> Api {
    let load = |file: &str| std::fs::read_to_string(dir.join(file)).ok();
    api::crate_api(&load).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

#[test]
fn mirror_matches_the_patched_crate() {
    let real_dir = workspace_root().join(REAL_SOURCES);
    assert!(
        real_dir.join("lib.rs").is_file(),
        "{} holds no sources of Cloud Hypervisor's patched vm-migration crate: \
         run `scripts/build-cloud-hypervisor.sh --flavor patched` (scripts/test.sh \
         does) to build the patched tree and install them",
        real_dir.display()
    );
    let real = api_of_dir(&real_dir);
    let mirror = api_of_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));

    // A parser that found nothing would compare empty sets: make sure both
    // sides hold what the glue uses.
    for key in [
        "Pausable::quiesce",
        "StreamedState::send_state",
        "MigratableError::MigrateSocket",
        "protocol::Request::read_from",
        "protocol::Request::start_with_features",
        "protocol::ProtocolFeatures::DEVICE_STATE",
        "protocol::MemoryRangeTable::from_dirty_bitmap",
    ] {
        assert!(real.contains_key(key), "real crate: no {key}");
        assert!(mirror.contains_key(key), "mirror: no {key}");
    }

    let drift = compare(&real, &mirror, MISSING_FROM_MIRROR, MIRROR_ONLY);
    eprintln!(
        "{} entries identical in both crates; real {} ({} allow-listed as missing), mirror {}",
        drift.identical,
        real.len(),
        drift.allowed_missing,
        mirror.len()
    );
    assert!(
        drift.is_clean(),
        "the mirror (vmm-glue/vm-migration) drifted from {}:\n{drift}",
        real_dir.display()
    );
}

/// What differs between two interfaces, after the allow-lists.
#[derive(Debug, Default)]
struct Drift {
    /// Key, the real value, the mirror's value.
    differing: Vec<(String, String, String)>,
    /// In the real crate only, not allow-listed.
    missing: Vec<(String, String)>,
    /// In the mirror only, not allow-listed.
    extra: Vec<(String, String)>,
    /// Allow-list entries that cover nothing (the item came back or went).
    stale: Vec<String>,
    identical: usize,
    allowed_missing: usize,
}

impl Drift {
    fn is_clean(&self) -> bool {
        self.differing.is_empty()
            && self.missing.is_empty()
            && self.extra.is_empty()
            && self.stale.is_empty()
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, real, mirror) in &self.differing {
            writeln!(
                f,
                "DIFFERS  {key}\n    real:   {real}\n    mirror: {mirror}"
            )?;
        }
        for (key, value) in &self.missing {
            writeln!(f, "MISSING  {key}\n    real:   {value}")?;
        }
        for (key, value) in &self.extra {
            writeln!(f, "EXTRA    {key}\n    mirror: {value}")?;
        }
        for entry in &self.stale {
            writeln!(f, "STALE    allow-list entry '{entry}' covers nothing")?;
        }
        Ok(())
    }
}

/// Whether the allow-list entry `entry` covers `key`.
fn covers(entry: &str, key: &str) -> bool {
    if let Some(prefix) = entry.strip_suffix('*') {
        return key.starts_with(prefix);
    }
    key == entry
        || key
            .strip_prefix(entry)
            .is_some_and(|rest| rest.starts_with([':', '.']))
}

fn compare(
    real: &Api,
    mirror: &Api,
    missing_ok: &[(&str, &str)],
    extra_ok: &[(&str, &str)],
) -> Drift {
    let mut drift = Drift::default();
    let mut used = vec![false; missing_ok.len() + extra_ok.len()];
    for (key, value) in real {
        match mirror.get(key) {
            Some(m) if m == value => drift.identical += 1,
            Some(m) => drift
                .differing
                .push((key.clone(), value.clone(), m.clone())),
            None => match missing_ok.iter().position(|(e, _)| covers(e, key)) {
                Some(i) => {
                    used[i] = true;
                    drift.allowed_missing += 1;
                }
                None => drift.missing.push((key.clone(), value.clone())),
            },
        }
    }
    for (key, value) in mirror.iter().filter(|(k, _)| !real.contains_key(*k)) {
        match extra_ok.iter().position(|(e, _)| covers(e, key)) {
            Some(i) => used[missing_ok.len() + i] = true,
            None => drift.extra.push((key.clone(), value.clone())),
        }
    }
    let entries = missing_ok.iter().chain(extra_ok);
    for ((entry, _), used) in entries.zip(used) {
        if !used {
            drift.stale.push(entry.to_string());
        }
    }
    drift
}

/// The comparison itself, on small crates held in memory: it must tell
/// apart what differs and nothing else, or the test above proves nothing.
mod comparison {
    use super::*;

    fn api_of(files: &[(&str, &str)]) -> Api {
        let load = |name: &str| {
            files
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, text)| text.to_string())
        };
        api::crate_api(&load).unwrap()
    }

    fn lib(text: &str) -> Api {
        api_of(&[("lib.rs", text)])
    }

    fn keys(list: &[(String, String)]) -> Vec<&str> {
        list.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// The keys that differ between the two one-file crates.
    fn differing(real: &str, mirror: &str) -> Vec<String> {
        let drift = compare(&lib(real), &lib(mirror), &[], &[]);
        assert!(
            drift.missing.is_empty() && drift.extra.is_empty(),
            "{drift}"
        );
        drift.differing.into_iter().map(|(k, _, _)| k).collect()
    }

    const BASE: &str = r#"
        use std::io::{self, Read};
        use std::result;
        use thiserror::Error;

        #[derive(Debug, Error)]
        pub enum E {
            #[error("Socket error")]
            Socket(#[source] io::Error),
            #[error("gone {0}")]
            Gone(String),
        }

        pub trait P {
            fn f(&mut self) -> result::Result<(), E> {
                Ok(())
            }
            fn g(&self) -> u8;
        }

        pub fn read<'a, T>(fd: &mut dyn Read, t: &'a T) -> Option<&'a T>
        where
            T: Clone + Send,
        {
            None
        }

        #[repr(u16)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub enum S {
            #[default]
            A,
            B,
            C = 0x100,
        }

        #[derive(Clone, Default)]
        pub struct R {
            status: S,
            pub length: u64,
        }

        impl R {
            pub fn new(length: u64) -> Self {
                R { status: S::A, length }
            }
            fn hidden(&self) {}
        }

        impl TryFrom<u16> for S {
            type Error = E;
            fn try_from(v: u16) -> Result<Self, Self::Error> {
                todo!()
            }
        }

        pub const LIMIT: u64 = u64::MAX;

        bitflags::bitflags! {
            #[derive(Clone, Copy)]
            pub struct F: u32 {
                const ONE = 1 << 0;
            }
        }
    "#;

    #[test]
    fn equivalent_spellings_compare_equal() {
        // Same interface, written differently throughout.
        let respelled = r#"
            use std::io::Read;
            use thiserror::Error;

            /// Docs do not count.
            #[derive(Error, Debug)]
            pub enum E {
                #[error("Socket error")]
                Socket(#[source] std::io::Error),
                #[error("gone {0}")]
                Gone(std::string::String),
            }

            pub trait P {
                fn f(&mut self) -> Result<(), crate::E> {
                    Ok(())
                }
                fn g(&self) -> u8;
            }

            pub fn read<'a, T: Send + Clone>(input: &mut dyn Read, _: &'a T) -> Option<&'a T> {
                unimplemented!()
            }

            #[repr(u16)]
            #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
            pub enum S {
                #[default]
                A = 0,
                B = 1,
                C = 256,
            }

            #[derive(Default, Clone)]
            pub struct R {
                status: S,
                pub length: u64,
            }

            impl R {
                pub fn new(n: u64) -> R {
                    R { length: n, ..Default::default() }
                }
            }

            impl TryFrom<u16> for S {
                type Error = E;
                fn try_from(value: u16) -> Result<S, Self::Error> {
                    unimplemented!()
                }
            }

            pub const LIMIT: u64 = 0xffff_ffff_ffff_ffff;

            bitflags::bitflags! {
                #[derive(Clone, Copy)]
                pub struct F: u32 {
                    const ONE = 1;
                }
            }
        "#;
        let base = lib(BASE);
        for key in [
            "E::Socket",
            "P::f",
            "read",
            "S::C",
            "R.status",
            "R::new",
            "S: impl std::convert::TryFrom<u16>",
            "LIMIT",
            "F::ONE",
        ] {
            assert!(base.contains_key(key), "no {key} in {base:#?}");
        }
        let drift = compare(&base, &lib(respelled), &[], &[]);
        assert!(drift.is_clean(), "{drift}");
        assert!(drift.identical >= 25, "only {} shared", drift.identical);
    }

    #[test]
    fn a_changed_signature_is_reported() {
        let generic = BASE.replace(
            "pub fn read<'a, T>(fd: &mut dyn Read, t: &'a T)",
            "pub fn read<'a, T, R: Read>(fd: &mut R, t: &'a T)",
        );
        assert_eq!(differing(BASE, &generic), ["read"]);
        let other_error = BASE.replace(
            "fn f(&mut self) -> result::Result<(), E>",
            "fn f(&mut self) -> result::Result<(), io::Error>",
        );
        assert_eq!(differing(BASE, &other_error), ["P::f"]);
        let by_value = BASE.replace("fn g(&self) -> u8;", "fn g(self) -> u8;");
        assert_eq!(differing(BASE, &by_value), ["P::g"]);
        let bound = BASE.replace("T: Clone + Send,", "T: Clone,");
        assert_eq!(differing(BASE, &bound), ["read"]);
        let method = BASE.replace("pub fn new(length: u64)", "pub fn new(length: u32)");
        assert_eq!(differing(BASE, &method), ["R::new"]);
    }

    #[test]
    fn derives_texts_values_fields_and_defaults_count() {
        let cases = [
            (
                "#[derive(Clone, Default)]\n        pub struct R",
                "#[derive(Clone, Default, Debug)]\n        pub struct R",
                "R: derive std::fmt::Debug",
            ),
            (
                r#"#[error("Socket error")]"#,
                r#"#[error("socket: {0}")]"#,
                "E::Socket",
            ),
            ("C = 0x100,", "C = 0x101,", "S::C"),
            (
                "#[default]\n            A,",
                "A,\n            #[default]",
                "S::A",
            ),
            (
                "fn f(&mut self) -> result::Result<(), E> {\n                Ok(())",
                "fn f(&mut self) -> result::Result<(), E> {\n                todo!()",
                "P::f",
            ),
            ("const ONE = 1 << 0;", "const ONE = 1 << 1;", "F::ONE"),
            ("status: S,", "state: S,", "R.state"),
            ("pub length: u64,", "length: u64,", "R.length"),
            ("#[repr(u16)]", "#[repr(u32)]", "S"),
            (
                "pub const LIMIT: u64 = u64::MAX;",
                "pub const LIMIT: u64 = 7;",
                "LIMIT",
            ),
            (
                "type Error = E;",
                "type Error = io::Error;",
                "S: impl std::convert::TryFrom<u16>",
            ),
        ];
        for (from, to, key) in cases {
            assert!(BASE.contains(from), "{from}");
            let changed = BASE.replace(from, to);
            let drift = compare(&lib(BASE), &lib(&changed), &[], &[]);
            let all: Vec<&str> = drift
                .differing
                .iter()
                .map(|(k, _, _)| k.as_str())
                .chain(keys(&drift.missing))
                .chain(keys(&drift.extra))
                .collect();
            assert!(all.contains(&key), "{from} -> {to}: {all:?}");
            assert!(!drift.is_clean());
        }
    }

    #[test]
    fn missing_and_extra_items_fail_unless_allow_listed() {
        let real = BASE.replace(
            "Gone(String),",
            "Gone(String),\n #[error(\"tls\")] Tls(#[source] TlsError),",
        ) + "pub mod tls { pub struct TlsError; pub fn connect() {} }";
        let mirror = BASE.replace(
            "pub fn new(",
            "pub fn to_bytes(&self) -> [u8; 16] { todo!() }\n pub fn new(",
        );
        let (real, mirror) = (api_of(&[("lib.rs", &real)]), api_of(&[("lib.rs", &mirror)]));

        let drift = compare(&real, &mirror, &[], &[]);
        assert_eq!(
            keys(&drift.missing),
            ["E::Tls", "tls", "tls::TlsError", "tls::connect"]
        );
        assert_eq!(keys(&drift.extra), ["R::to_bytes"]);
        assert!(!drift.is_clean());

        let missing_ok = [("tls", "rustls"), ("E::Tls", "rustls")];
        let extra_ok = [("R::to_bytes", "ours")];
        let drift = compare(&real, &mirror, &missing_ok, &extra_ok);
        assert!(drift.is_clean(), "{drift}");
        assert_eq!(drift.allowed_missing, 4);

        // An entry that covers nothing fails too, so the lists stay true.
        let stale = [("tls", "rustls"), ("E::Tls", "rustls"), ("E::Uffd", "gone")];
        let drift = compare(&real, &mirror, &stale, &extra_ok);
        assert_eq!(drift.stale, ["E::Uffd"]);
        assert!(!drift.is_clean());
        // Nor does an entry cover a mere namesake.
        assert!(!covers("E::Tls", "E::TlsConfig"));
        assert!(covers(
            "R: derive zerocopy::*",
            "R: derive zerocopy::IntoBytes"
        ));
    }

    #[test]
    fn items_are_found_in_modules_and_through_reexports() {
        let lib_rs = "mod ctx;\npub mod protocol;\npub use ctx::{Stats, Ctx as Context};";
        let ctx = "pub struct Stats { pub bytes: u64 }\npub struct Ctx;\nimpl Ctx { pub fn new() -> Self { Ctx } }\npub struct Hidden;";
        let protocol =
            "use crate::Stats;\npub fn stats() -> Stats { todo!() }\nmod inner { pub fn no() {} }";
        let api = api_of(&[
            ("lib.rs", lib_rs),
            ("ctx.rs", ctx),
            ("protocol.rs", protocol),
        ]);
        let keys: Vec<&str> = api.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "Context",
                "Context::new",
                "Stats",
                "Stats.bytes",
                "protocol",
                "protocol::stats"
            ]
        );
        assert_eq!(api["protocol::stats"], "fn stats() -> crate::ctx::Stats");
        assert_eq!(api["Context::new"], "fn new() -> crate::ctx::Ctx");
    }

    #[test]
    fn unreadable_sources_are_errors() {
        let load = |_: &str| None;
        assert!(api::crate_api(&load).unwrap_err().contains("lib.rs"));
        let load = |name: &str| (name == "lib.rs").then(|| "mod gone;".to_string());
        assert!(api::crate_api(&load).unwrap_err().contains("gone"));
        let load = |_: &str| Some("pub fn (".to_string());
        assert!(api::crate_api(&load).is_err());
    }
}
