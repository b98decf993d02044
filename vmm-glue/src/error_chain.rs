// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Printing an error with its causes.
//!
//! Cloud Hypervisor's `MigratableError` says only which phase failed
//! ("Failed to receive migratable component snapshot"); why is in its
//! `source()` chain. Logs and reports that show one line print the whole
//! chain with [`Chain`].

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its causes, `": "` between them
/// (as `anyhow`'s `{:#}`).
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// `e` and its causes on one line.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use anyhow::anyhow;
    use vm_migration::MigratableError;

    use super::*;

    #[test]
    fn prints_every_cause_in_order() {
        let inner = anyhow!("bad magic").context("device gpu0");
        let e = MigratableError::MigrateReceive(inner);
        assert_eq!(
            chain(&e),
            "Failed to receive migratable component snapshot: device gpu0: bad magic"
        );
        let io = std::io::Error::other("plain");
        assert_eq!(Chain(&io).to_string(), "plain");
    }
}
