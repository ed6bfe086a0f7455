//! Plugin status as `plugins list` shows it: one typed row per plugin name.
//!
//! Owns the states a plugin can be in, its counters and limits as data, and
//! the table people read. The registry builds rows ([`Registry::status`]),
//! the store keeps the last snapshot so the command line can read it while the
//! server runs, and the command line prints [`Table`]. Nothing here reads files,
//! the store or the registry.
//!
//! [`Registry::status`]: crate::registry::Registry::status

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::runtime::{FailureKind, Limits};
use crate::text::escape_controls;

/// Where a plugin stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginState {
    /// Loaded and receiving events.
    Active,
    /// Loaded, but failed too often in a row: no events until released.
    Quarantined,
    /// Queued or compiling; its events are stored and wait for it.
    Loading,
    /// Its file did not load, and no earlier version serves.
    Failed,
}

impl PluginState {
    pub const ALL: [PluginState; 4] =
        [Self::Active, Self::Quarantined, Self::Loading, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Quarantined => "quarantined",
            Self::Loading => "loading",
            Self::Failed => "failed",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == name)
    }
}

impl fmt::Display for PluginState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Calls since the plugin loaded, by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub succeeded: u64,
    /// Failures by kind; kinds that never happened are left out.
    pub failed: BTreeMap<FailureKind, u64>,
}

/// The limits a loaded plugin runs under, in the units a manifest uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSummary {
    /// `None`: unmetered.
    pub fuel: Option<u64>,
    pub memory_mib: usize,
    pub timeout_ms: u64,
    pub output_kib: usize,
}

impl From<&Limits> for LimitSummary {
    fn from(limits: &Limits) -> Self {
        Self {
            fuel: limits.fuel,
            memory_mib: limits.memory_bytes >> 20,
            timeout_ms: limits.timeout.as_millis() as u64,
            output_kib: limits.output_bytes >> 10,
        }
    }
}

impl fmt::Display for LimitSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fuel {
            Some(fuel) => write!(f, "fuel {fuel}")?,
            None => f.write_str("fuel unmetered")?,
        }
        write!(
            f,
            ", memory {} MiB, timeout {} ms, output {} KiB",
            self.memory_mib, self.timeout_ms, self.output_kib
        )
    }
}

/// A candidate shadowing a plugin (`NAME.shadow.wasm`): its version and
/// how its runs compared with the live calls since it loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowStatus {
    pub version: String,
    /// New events it ran beside the live plugin.
    pub runs: u64,
    /// Runs whose outcome (ok, or the error text) differed from the live call's.
    pub differed: u64,
    /// New events it did not run: its queue was full (live calls never wait
    /// for a shadow).
    pub skipped: u64,
}

impl fmt::Display for ShadowStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} runs, {} differed, {} skipped",
            self.version, self.runs, self.differed, self.skipped
        )
    }
}

/// One plugin name's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginStatus {
    pub name: String,
    /// The serving version (short SHA-256); `None` while loading or failed.
    pub version: Option<String>,
    pub state: PluginState,
    /// Why it failed to load; for an active plugin, why its replacement did not.
    pub reason: Option<String>,
    /// `order.*, payment.refunded`, or `*` for every event.
    pub subscriptions: String,
    /// `None` until it loads.
    pub limits: Option<LimitSummary>,
    pub counters: Counters,
    /// The candidate shadowing it, if one is loaded.
    #[serde(default)]
    pub shadow: Option<ShadowStatus>,
    /// When this row was taken (unix ms).
    pub updated_at: i64,
}

/// Rows as a table for people, one line per plugin (and one more for a reason).
#[derive(Debug)]
pub struct Table<'a>(pub &'a [PluginStatus]);

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<16} {:<13} {:<12} {:<24} {:<60} counters",
            "name", "version", "state", "subscriptions", "limits"
        )?;
        for row in self.0 {
            let limits = row.limits.as_ref().map(|l| l.to_string());
            let mut counters = format!("succeeded {}", row.counters.succeeded);
            for (kind, n) in &row.counters.failed {
                counters.push_str(&format!(", {kind} {n}"));
            }
            writeln!(
                f,
                "{:<16} {:<13} {:<12} {:<24} {:<60} {counters}",
                escape_controls(&row.name),
                row.version.as_deref().unwrap_or("-"),
                row.state,
                escape_controls(&row.subscriptions),
                limits.as_deref().unwrap_or("-"),
            )?;
            if let Some(reason) = &row.reason {
                writeln!(f, "{:<16} reason: {}", "", escape_controls(reason))?;
            }
            if let Some(shadow) = &row.shadow {
                writeln!(f, "{:<16} shadowing: {shadow}", "")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_kinds_round_trip_through_their_names() {
        for state in PluginState::ALL {
            assert_eq!(PluginState::parse(state.as_str()), Some(state));
        }
        let counters = Counters {
            succeeded: 3,
            failed: BTreeMap::from([(FailureKind::OutOfFuel, 2)]),
        };
        let json = serde_json::to_string(&counters).unwrap();
        assert_eq!(json, r#"{"succeeded":3,"failed":{"out-of-fuel":2}}"#);
        assert_eq!(serde_json::from_str::<Counters>(&json).unwrap(), counters);
    }

    #[test]
    fn the_table_shows_limits_counters_and_reasons() {
        let row = PluginStatus {
            name: "orders".into(),
            version: Some("0123456789ab".into()),
            state: PluginState::Active,
            reason: Some("replacement failed to load: bad magic".into()),
            subscriptions: "order.*".into(),
            limits: Some(LimitSummary::from(&Limits::default())),
            counters: Counters {
                succeeded: 7,
                failed: BTreeMap::from([(FailureKind::Timeout, 1)]),
            },
            shadow: Some(ShadowStatus {
                version: "fedcba987654".into(),
                runs: 5,
                differed: 2,
                skipped: 0,
            }),
            updated_at: 0,
        };
        let table = Table(&[row]).to_string();
        assert!(table.contains("orders"), "{table}");
        assert!(table.contains("fuel 10000000, memory 64 MiB, timeout 1000 ms, output 64 KiB"));
        assert!(table.contains("succeeded 7, timeout 1"), "{table}");
        assert!(table.contains("reason: replacement failed to load: bad magic"));
        assert!(
            table.contains("shadowing: fedcba987654: 5 runs, 2 differed, 0 skipped"),
            "{table}"
        );
    }
}
