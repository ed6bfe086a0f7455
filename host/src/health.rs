//! Per-plugin health: call counters by outcome, and quarantine.
//!
//! A plugin that fails [`DEFAULT_QUARANTINE_AFTER`] times in a row stops
//! receiving events until it is reloaded or released, so one broken plugin
//! cannot burn the workers' time on every event. The dispatcher records each
//! outcome here; the registry skips quarantined plugins.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::runtime::{Failure, FailureKind};

/// Consecutive failures before quarantine: enough to ride out a few bad
/// events, few enough that a plugin broken for every event is stopped fast.
pub const DEFAULT_QUARANTINE_AFTER: u32 = 5;

/// Counters and quarantine state of one loaded plugin.
#[derive(Debug, Default)]
pub struct Health {
    succeeded: AtomicU64,
    failed: [AtomicU64; FailureKind::ALL.len()],
    consecutive_failures: AtomicU32,
    quarantined: AtomicBool,
}

/// A point-in-time copy of [`Health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub succeeded: u64,
    /// Failures by kind, only kinds that happened.
    pub failed: Vec<(FailureKind, u64)>,
    pub consecutive_failures: u32,
    pub quarantined: bool,
}

impl Health {
    /// Count one call's outcome. Returns true when this failure is the one that
    /// quarantines the plugin (so the caller logs it once). `quarantine_after`
    /// of 0 never quarantines.
    pub fn record(&self, result: &Result<(), Failure>, quarantine_after: u32) -> bool {
        match result {
            Ok(()) => {
                self.succeeded.fetch_add(1, Ordering::Relaxed);
                self.consecutive_failures.store(0, Ordering::Relaxed);
                false
            }
            Err(failure) => {
                self.failed[failure.kind.index()].fetch_add(1, Ordering::Relaxed);
                let run = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                quarantine_after > 0
                    && run >= quarantine_after
                    && !self.quarantined.swap(true, Ordering::Relaxed)
            }
        }
    }

    pub fn is_quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Lift a quarantine; the failure run starts again from zero.
    pub fn release(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
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
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
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
    fn quarantines_once_after_a_run_of_failures() {
        let health = Health::default();
        for _ in 0..4 {
            assert!(!health.record(&fail(FailureKind::Trap), 5));
        }
        assert!(!health.is_quarantined());
        assert!(
            health.record(&fail(FailureKind::OutOfFuel), 5),
            "fifth in a row"
        );
        assert!(
            !health.record(&fail(FailureKind::Trap), 5),
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
    }

    #[test]
    fn a_success_breaks_the_run() {
        let health = Health::default();
        for _ in 0..10 {
            health.record(&fail(FailureKind::Trap), 5);
            health.record(&fail(FailureKind::Trap), 5);
            health.record(&Ok(()), 5);
        }
        assert!(!health.is_quarantined());
        assert_eq!(health.snapshot().succeeded, 10);
    }

    #[test]
    fn zero_never_quarantines() {
        let health = Health::default();
        for _ in 0..100 {
            assert!(!health.record(&fail(FailureKind::Trap), 0));
        }
        assert!(!health.is_quarantined());
    }
}
