// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary `--device` strings: the parser accepts or names what is wrong,
//! never panics, and whatever it accepts prints back to an equal config.

#![no_main]

use libfuzzer_sys::fuzz_target;
use xe_vf_plugin::device_config::DeviceConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = std::str::from_utf8(data) else {
        return;
    };
    match DeviceConfig::parse(spec) {
        Ok(config) => {
            let printed = config.to_string();
            let again = DeviceConfig::parse(&printed).unwrap_or_else(|e| {
                panic!("canonical form {printed:?} of {spec:?} does not parse: {e}")
            });
            assert_eq!(config, again, "round trip of {spec:?} via {printed:?}");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
