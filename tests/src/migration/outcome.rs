// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! How a migration that did not end as planned shows in `vm.info`'s
//! `migration.last` (and `GET vmm.migration`): `{"failed": …}`, or
//! `{"unknown": …}` on a side that cannot tell whether the other runs the
//! VM and keeps its own copy paused (see `migration_ext::switchover` for
//! who runs the VM after each failure).

use serde_json::{json, Value};

use crate::error::HostError;

/// A migration that did not end as planned: `error` says why; with
/// `unknown`, this side cannot tell whether the other runs the VM, and
/// keeps its own copy paused.
#[derive(Debug)]
pub struct Failure {
    pub error: HostError,
    pub unknown: bool,
}

impl From<HostError> for Failure {
    fn from(error: HostError) -> Self {
        Failure {
            error,
            unknown: false,
        }
    }
}

impl Failure {
    pub fn unknown(error: HostError) -> Self {
        Failure {
            error,
            unknown: true,
        }
    }

    /// What `migration.last` shows: `{"failed": …}` or `{"unknown": …}`.
    pub fn outcome(&self) -> Value {
        let body = json!({ "error": self.error.messages(), "phase": self.error.phase });
        if self.unknown {
            json!({ "unknown": body })
        } else {
            json!({ "failed": body })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_say_failed_or_unknown() {
        let f = Failure::from(HostError::failed("complete", "x"));
        assert!(f.outcome()["failed"].is_object());
        let u = Failure::unknown(HostError::failed("switchover", "y").context("outer"));
        let o = u.outcome();
        assert_eq!(o["unknown"]["phase"], "switchover");
        assert_eq!(o["unknown"]["error"][0], "outer");
        assert_eq!(o["unknown"]["error"][1], "switchover: y");
    }
}
