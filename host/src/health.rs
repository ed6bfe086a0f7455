//! Per-plugin health: call counters by outcome, and quarantine.
//!
//! A plugin that fails on [`DEFAULT_QUARANTINE_AFTER`] different events in a
//! row, with no success between, is quarantined: its deliveries are still
//! recorded but held in the store until it is released (`plugins release`,
//! or `Hooks::release`) or a new build of it loads, so one broken plugin
//! cannot burn the workers' time on every event. Each event counts once
//! however often it is retried: one event a plugin always rejects goes to
//! the dead-letter queue and quarantines nothing. The dispatcher records each
//! outcome here; the poller and workers skip quarantined plugins.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::runtime::{Failure, FailureKind};

/// Different events failing in a row before quarantine: enough to ride out
/// a few bad events, few enough that a plugin broken for every event is
/// stopped fast.
pub const DEFAULT_QUARANTINE_AFTER: u32 = 5;

/// Counters and quarantine state of one loaded plugin.
#[derive(Debug, Default)]
pub struct Health {
    succeeded: AtomicU64,
    failed: [AtomicU64; FailureKind::ALL.len()],
    /// The events that failed since the last success, each once.
    failing_events: Mutex<Vec<Box<str>>>,
    quarantined: AtomicBool,
}

/// A point-in-time copy of [`Health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub succeeded: u64,
    /// Failures by kind, only kinds that happened.
    pub failed: Vec<(FailureKind, u64)>,
    /// Different events that failed since the last success.
    pub failing_events: u32,
    pub quarantined: bool,
}

impl Health {
    /// Count one call's outcome on event `event_key`. Returns true when this
    /// failure is the one that quarantines the plugin (so the caller logs it
    /// once). `quarantine_after` of 0 never quarantines.
    pub fn record(
        &self,
        event_key: &str,
        result: &Result<(), Failure>,
        quarantine_after: u32,
    ) -> bool {
        let mut failing = self
            .failing_events
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                self.succeeded.fetch_add(1, Ordering::Relaxed);
                failing.clear();
                false
            }
            Err(failure) => {
                self.failed[failure.kind.index()].fetch_add(1, Ordering::Relaxed);
                // Bounded: past the threshold the plugin is quarantined and
                // more keys tell nothing more.
                if !failing.iter().any(|k| &**k == event_key)
                    && failing.len() < quarantine_after as usize
                {
                    failing.push(event_key.into());
                }
                quarantine_after > 0
                    && failing.len() >= quarantine_after as usize
                    && !self.quarantined.swap(true, Ordering::Relaxed)
            }
        }
    }

    pub fn is_quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Lift a quarantine; the failure run starts again from zero.
    pub fn release(&self) {
        self.failing_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.quarantined.store(false, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        HealthSnapshot {
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: FailureKind::ALL
                .iter()
                .map(|&kind| (kind, self.failed[kind.index()].load(Ordering::Relaxed)))
                .filter(|&(_, n)| n > 0)
                .collect(),
            failing_events: self
                .failing_events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len() as u32,
            quarantined: self.is_quarantined(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(kind: FailureKind) -> Result<(), Failure> {
        Err(Failure::new(kind, "x"))
    }

    #[test]
    fn quarantines_once_after_a_run_of_different_failing_events() {
        let health = Health::default();
        for event in ["a", "b", "c", "d"] {
            assert!(!health.record(event, &fail(FailureKind::Trap), 5));
        }
        assert!(!health.is_quarantined());
        assert!(
            health.record("e", &fail(FailureKind::OutOfFuel), 5),
            "fifth event in a row"
        );
        assert!(
            !health.record("f", &fail(FailureKind::Trap), 5),
            "said once only"
        );
        assert!(health.is_quarantined());
        let snap = health.snapshot();
        assert_eq!(
            snap.failed,
            [(FailureKind::OutOfFuel, 1), (FailureKind::Trap, 5)]
        );
        health.release();
        assert!(!health.is_quarantined());
        assert_eq!(health.snapshot().failing_events, 0);
    }

    #[test]
    fn one_event_retried_many_times_counts_once() {
        let health = Health::default();
        for _ in 0..100 {
            assert!(!health.record("always-bad", &fail(FailureKind::PluginError), 5));
        }
        assert!(!health.is_quarantined());
        assert_eq!(health.snapshot().failing_events, 1);
    }

    #[test]
    fn a_success_breaks_the_run() {
        let health = Health::default();
        for i in 0..10 {
            health.record(&format!("x{i}"), &fail(FailureKind::Trap), 5);
            health.record(&format!("y{i}"), &fail(FailureKind::Trap), 5);
            health.record(&format!("z{i}"), &Ok(()), 5);
        }
        assert!(!health.is_quarantined());
        assert_eq!(health.snapshot().succeeded, 10);
    }

    #[test]
    fn zero_never_quarantines() {
        let health = Health::default();
        for i in 0..100 {
            assert!(!health.record(&i.to_string(), &fail(FailureKind::Trap), 0));
        }
        assert!(!health.is_quarantined());
    }
}
