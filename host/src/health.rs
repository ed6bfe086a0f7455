//! Per-plugin health: call counters by outcome, and quarantine.
//!
//! A plugin that fails on [`DEFAULT_QUARANTINE_AFTER`] different events in a
//! row, with no success between, is quarantined: its deliveries are still
//! recorded but held in the store until it is released (`plugins release`,
//! or `Hooks::release`), a new build of it loads, or a probe succeeds: after
//! a cool-down ([`DEFAULT_QUARANTINE_PROBE_AFTER`]) the poller lets one held
//! delivery through, and its success lifts the quarantine while its failure
//! starts the cool-down again. So one broken plugin
//! cannot burn the workers' time on every event. Each event counts once
//! however often it is retried: one event a plugin always rejects goes to
//! the dead-letter queue and quarantines nothing. The dispatcher records each
//! outcome here; the poller and workers skip quarantined plugins.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::runtime::{Failure, FailureKind};

/// Different events failing in a row before quarantine: enough to ride out
/// a few bad events, few enough that a plugin broken for every event is
/// stopped fast.
pub const DEFAULT_QUARANTINE_AFTER: u32 = 5;

/// How long a quarantined plugin rests before one held delivery is tried: an
/// outage of something it calls often passes within a minute, and one call a
/// minute costs the workers nothing.
pub const DEFAULT_QUARANTINE_PROBE_AFTER: Duration = Duration::from_secs(60);

/// Counters and quarantine state of one loaded plugin.
#[derive(Debug, Default)]
pub struct Health {
    succeeded: AtomicU64,
    failed: [AtomicU64; FailureKind::ALL.len()],
    /// The events that failed since the last success, each once.
    failing_events: Mutex<Vec<Box<str>>>,
    quarantined: AtomicBool,
    /// When the quarantine began, or the last probe ended (unix ms).
    resting_since: AtomicI64,
    /// The delivery being tried as a probe, and when it started (unix ms).
    probe: Mutex<Option<(i64, i64)>>,
}

/// What one recorded outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// This failure quarantined the plugin.
    Quarantined,
    /// This success (a probe's) lifted the quarantine.
    Released,
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
    /// Count one call's outcome on event `event_key`, at `now` (unix ms):
    /// what it changed, for the caller to log once. `quarantine_after` of 0
    /// never quarantines.
    pub fn record(
        &self,
        event_key: &str,
        result: &Result<(), Failure>,
        quarantine_after: u32,
        now: i64,
    ) -> Change {
        let mut failing = self
            .failing_events
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                self.succeeded.fetch_add(1, Ordering::Relaxed);
                failing.clear();
                if self.quarantined.swap(false, Ordering::Relaxed) {
                    Change::Released
                } else {
                    Change::None
                }
            }
            Err(failure) if failure.kind == FailureKind::HostError => {
                // The host's failure (its store was down): counted, but
                // neither for nor against the plugin's quarantine.
                self.failed[failure.kind.index()].fetch_add(1, Ordering::Relaxed);
                Change::None
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
                if quarantine_after > 0
                    && failing.len() >= quarantine_after as usize
                    && !self.quarantined.swap(true, Ordering::Relaxed)
                {
                    self.resting_since.store(now, Ordering::Relaxed);
                    Change::Quarantined
                } else {
                    Change::None
                }
            }
        }
    }

    /// Take delivery `id` as the probe if the plugin is quarantined, has
    /// rested `rest` by `now` (unix ms) and no probe is out.
    pub fn start_probe(&self, id: i64, now: i64, rest: Duration) -> bool {
        let mut probe = self.probe.lock().unwrap_or_else(|e| e.into_inner());
        if !self.probe_may_start(*probe, now, rest) {
            return false;
        }
        *probe = Some((id, now));
        true
    }

    /// Whether a probe could start now: quarantined, rested, none out.
    pub fn probe_due(&self, now: i64, rest: Duration) -> bool {
        let probe = *self.probe.lock().unwrap_or_else(|e| e.into_inner());
        self.probe_may_start(probe, now, rest)
    }

    /// A probe out for a whole rest is taken as lost (its delivery was never
    /// queued), so a lost one cannot keep the plugin quarantined for ever.
    fn probe_may_start(&self, probe: Option<(i64, i64)>, now: i64, rest: Duration) -> bool {
        let rest = rest.as_millis() as i64;
        self.is_quarantined()
            && now - self.resting_since.load(Ordering::Relaxed) >= rest
            && probe.is_none_or(|(_, started)| now - started >= rest)
    }

    /// Whether the plugin may run delivery `id` now: not quarantined, or it
    /// is the probe.
    pub fn may_run(&self, id: i64) -> bool {
        !self.is_quarantined()
            || self
                .probe
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|(probe, _)| probe == id)
    }

    /// Delivery `id` is done with, however it ended; if it was the probe,
    /// the rest starts again from `now`.
    pub fn end_probe(&self, id: i64, now: i64) {
        let mut probe = self.probe.lock().unwrap_or_else(|e| e.into_inner());
        if probe.is_some_and(|(probe, _)| probe == id) {
            *probe = None;
            self.resting_since.store(now, Ordering::Relaxed);
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
    fn the_hosts_own_errors_neither_quarantine_nor_release() {
        let health = Health::default();
        for event in ["a", "b", "c", "d", "e", "f"] {
            let change = health.record(event, &fail(FailureKind::HostError), 5, 0);
            assert_eq!(change, Change::None, "the store was down, not the plugin");
        }
        assert!(!health.is_quarantined());
        assert_eq!(health.snapshot().failed, [(FailureKind::HostError, 6)]);
        // Nor does one break a run of the plugin's own failures.
        for event in ["a", "b", "c", "d"] {
            health.record(event, &fail(FailureKind::Trap), 5, 0);
        }
        health.record("x", &fail(FailureKind::HostError), 5, 0);
        assert_eq!(
            health.record("e", &fail(FailureKind::Trap), 5, 0),
            Change::Quarantined
        );
    }

    #[test]
    fn quarantines_once_after_a_run_of_different_failing_events() {
        let health = Health::default();
        for event in ["a", "b", "c", "d"] {
            let change = health.record(event, &fail(FailureKind::Trap), 5, 0);
            assert_eq!(change, Change::None);
        }
        assert!(!health.is_quarantined());
        assert!(
            health.record("e", &fail(FailureKind::OutOfFuel), 5, 0) == Change::Quarantined,
            "fifth event in a row"
        );
        assert!(
            health.record("f", &fail(FailureKind::Trap), 5, 0) == Change::None,
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
            let change = health.record("always-bad", &fail(FailureKind::PluginError), 5, 0);
            assert_eq!(change, Change::None);
        }
        assert!(!health.is_quarantined());
        assert_eq!(health.snapshot().failing_events, 1);
    }

    #[test]
    fn after_its_rest_one_probe_runs_and_its_success_releases() {
        let health = Health::default();
        let rest = Duration::from_secs(60);
        health.record("a", &fail(FailureKind::Trap), 1, 1_000);
        assert!(!health.may_run(7));
        assert!(!health.start_probe(7, 30_000, rest), "still resting");
        assert!(health.start_probe(7, 61_000, rest));
        assert!(!health.start_probe(8, 61_000, rest), "one probe at a time");
        assert_eq!((health.may_run(7), health.may_run(8)), (true, false));
        health.record("b", &fail(FailureKind::Trap), 1, 62_000);
        health.end_probe(7, 62_000);
        assert!(!health.probe_due(100_000, rest), "failed: resting again");
        assert!(health.start_probe(9, 122_000, rest));
        assert_eq!(health.record("c", &Ok(()), 1, 123_000), Change::Released);
        health.end_probe(9, 123_000);
        assert!(!health.is_quarantined() && health.may_run(10));
    }

    #[test]
    fn a_success_breaks_the_run() {
        let health = Health::default();
        for i in 0..10 {
            health.record(&format!("x{i}"), &fail(FailureKind::Trap), 5, 0);
            health.record(&format!("y{i}"), &fail(FailureKind::Trap), 5, 0);
            health.record(&format!("z{i}"), &Ok(()), 5, 0);
        }
        assert!(!health.is_quarantined());
        assert_eq!(health.snapshot().succeeded, 10);
    }

    #[test]
    fn zero_never_quarantines() {
        let health = Health::default();
        for i in 0..100 {
            let change = health.record(&i.to_string(), &fail(FailureKind::Trap), 0, 0);
            assert_eq!(change, Change::None);
        }
        assert!(!health.is_quarantined());
    }
}
