//! When a failed delivery is tried again, and when it is given up (dead).
//!
//! Which kinds retry: a failure that can pass by itself (`plugin-error`,
//! `trap`, `timeout`, `load-error`, `host-error`: a dependency was down, the
//! machine was loaded, the plugin was being replaced) retries with exponential backoff and
//! jitter. A plugin that ran out of fuel, memory or stack on an event will do
//! so again on the same event with the same limits, so those go straight to
//! the dead-letter queue, to be replayed once the plugin or its limits change.

use std::time::Duration;

use rand::Rng;

use crate::runtime::FailureKind;

/// Attempts in all, the first included: with the default delays the last
/// retry comes about two and a half hours after the event, long enough to
/// ride out a deploy or an outage of something a plugin calls.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// The first retry's delay; each later one is [`BACKOFF_FACTOR`] times longer.
pub const DEFAULT_BASE_DELAY: Duration = Duration::from_secs(1);
/// No retry waits longer than this.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(3600);
/// Growth of the delay per attempt: 1 s, 4 s, 16 s, 64 s, ~4 min, ~17 min, 1 h.
pub const BACKOFF_FACTOR: u32 = 4;
/// Each delay is moved by up to this fraction either way, so deliveries that
/// failed together (a dependency outage) do not all retry in the same instant.
pub const DEFAULT_JITTER: f64 = 0.2;

/// The retry schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Fraction of each delay to randomise, 0 to 1.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            base_delay: DEFAULT_BASE_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
            jitter: DEFAULT_JITTER,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again after this long.
    RetryAfter(Duration),
    /// Give up: the delivery is dead.
    Dead,
}

/// Whether a failure of this kind can pass on its own.
pub fn retries(kind: FailureKind) -> bool {
    match kind {
        FailureKind::PluginError
        | FailureKind::Trap
        | FailureKind::Timeout
        | FailureKind::LoadError
        | FailureKind::HostError => true,
        FailureKind::OutOfFuel | FailureKind::OutOfMemory | FailureKind::StackOverflow => false,
    }
}

impl RetryPolicy {
    /// Decide after attempt number `attempt` (1 for the first) failed.
    pub fn after_failure(&self, attempt: u32, kind: FailureKind) -> Decision {
        if !retries(kind) || attempt >= self.max_attempts {
            return Decision::Dead;
        }
        let exponent = attempt.saturating_sub(1).min(16);
        let delay = self
            .base_delay
            .saturating_mul(BACKOFF_FACTOR.saturating_pow(exponent))
            .min(self.max_delay);
        let spread = delay.as_secs_f64() * self.jitter.clamp(0.0, 1.0);
        let jittered = if spread > 0.0 {
            delay.as_secs_f64() + rand::rng().random_range(-spread..=spread)
        } else {
            delay.as_secs_f64()
        };
        Decision::RetryAfter(Duration::from_secs_f64(jittered.max(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact() -> RetryPolicy {
        RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn default_schedule_grows_and_is_capped() {
        let delays: Vec<u64> = (1..DEFAULT_MAX_ATTEMPTS)
            .map(
                |attempt| match exact().after_failure(attempt, FailureKind::PluginError) {
                    Decision::RetryAfter(d) => d.as_secs(),
                    Decision::Dead => panic!("attempt {attempt} should retry"),
                },
            )
            .collect();
        assert_eq!(delays, [1, 4, 16, 64, 256, 1024, 3600]);
        assert_eq!(
            exact().after_failure(DEFAULT_MAX_ATTEMPTS, FailureKind::PluginError),
            Decision::Dead
        );
    }

    #[test]
    fn resource_exhaustion_is_dead_at_once() {
        for kind in [
            FailureKind::OutOfFuel,
            FailureKind::OutOfMemory,
            FailureKind::StackOverflow,
        ] {
            assert_eq!(exact().after_failure(1, kind), Decision::Dead, "{kind}");
        }
        for kind in [
            FailureKind::Trap,
            FailureKind::Timeout,
            FailureKind::LoadError,
        ] {
            assert!(
                matches!(exact().after_failure(1, kind), Decision::RetryAfter(_)),
                "{kind}"
            );
        }
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let policy = RetryPolicy::default();
        for _ in 0..1000 {
            let Decision::RetryAfter(d) = policy.after_failure(2, FailureKind::Trap) else {
                panic!()
            };
            assert!((3.2..=4.8).contains(&d.as_secs_f64()), "{d:?}");
        }
    }
}
