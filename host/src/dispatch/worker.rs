//! One worker thread: take a due delivery, call its plugin in a fresh
//! sandbox, decide what the outcome means (succeeded, retry, dead,
//! quarantine) and hand the attempt to the recorder. A delivery the host
//! itself fails (a panic, a stored event that is not one) is recorded as a
//! `host-error` attempt; the worker goes on.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::{DispatchState, Recorded, Report};
use crate::contain::contain;
use crate::event::Event;
use crate::health::Change;
use crate::registry::LoadedPlugin;
use crate::retry::{Decision, RetryPolicy};
use crate::runtime::{CallOutcome, Failure, FailureKind, LogLine, NotRun};
use crate::store::{Attempt, Cost, Due, Status, now_ms};
use crate::text::escape_controls;

pub(super) struct Worker {
    pub(super) shared: Arc<DispatchState>,
    pub(super) jobs: Receiver<Due>,
    pub(super) record: Sender<Recorded>,
    pub(super) retry: RetryPolicy,
    pub(super) quarantine_after: u32,
}

/// Counts the worker out when its thread ends, however it ends.
struct Alive<'a>(&'a DispatchState);

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        *self.0.workers_alive.lock().expect("workers lock") -= 1;
        self.0.worker_exited.notify_all();
    }
}

/// The span of one delivery's call: in the event's trace (the sender's, or
/// the one begun when it arrived), named by plugin, event and attempt.
fn call_span(due: &Due) -> tracing::Span {
    let (event, event_type, trace) = match &due.event {
        Ok(event) => (event.key(), event.event_type(), event.trace()),
        Err(unreadable) => (unreadable.key.as_str(), "", None),
    };
    let span = tracing::info_span!(
        "plugin.call",
        plugin = %due.plugin,
        event,
        event_type,
        attempt = due.attempts + 1,
        trace_id = tracing::field::Empty,
    );
    if let Some(trace) = trace {
        span.record("trace_id", trace.trace_id_hex());
        trace.adopt(&span);
    }
    span
}

impl Worker {
    pub(super) fn run(self) {
        let _alive = Alive(&self.shared);
        // Ends when the queue's sender is gone (shutdown) and the queue is empty.
        for due in self.jobs.iter() {
            let span = call_span(&due);
            // A panic costs this delivery one attempt, recorded as the
            // host's failure, never the worker.
            let recorded = span.in_scope(|| {
                contain(|| self.handle(&due)).unwrap_or_else(|panic| {
                    tracing::error!(plugin = %due.plugin, delivery = due.id, panic, "the host panicked handling a delivery");
                    Some(self.host_error(&due, format!("the host panicked handling this delivery: {panic}")))
                })
            });
            match recorded {
                Some((attempt, report)) => {
                    let _ = self.record.send((attempt, report, span));
                }
                None => self.shared.in_flight.release([due.id]),
            }
            if let Some(plugin) = self.shared.registry.get(&due.plugin) {
                plugin.health.end_probe(due.id, now_ms());
            }
        }
    }

    /// Run one delivery; `None` when it was not run and waits in the store.
    fn handle(&self, due: &Due) -> Option<(Attempt, Report)> {
        let event = match &due.event {
            Ok(event) => event,
            Err(unreadable) => {
                tracing::error!(plugin = %due.plugin, event = unreadable.key, "{}", unreadable.reason);
                return Some(self.host_error(due, unreadable.reason.clone()));
            }
        };
        let plugin = self.shared.registry.get(&due.plugin);
        let runnable = plugin.filter(|p| p.health.may_run(due.id));
        // Unloaded, quarantined or shutting down: it waits in the store.
        let plugin = runnable.filter(|_| !self.shared.stopping())?;
        let attempt = due.attempts + 1;
        let outcome = match self.call(&plugin, event, attempt) {
            Ok(outcome) => outcome,
            Err(not_run) => {
                // The host's doing, not the plugin's: not an attempt. It
                // stays due in the store and runs again (at the next
                // start, after a shutdown cut).
                tracing::warn!(plugin = %plugin.name, event = event.key(), "plugin call not run: {not_run}");
                return None;
            }
        };
        if due.attempts == 0 && due.replays == 0 {
            self.shared.offer_shadow(&plugin, event, &outcome);
        }
        let status = self.status_after(attempt, outcome.result.as_ref().err().map(|f| f.kind));
        if status.0 == Status::Dead {
            tracing::error!(
                plugin = %plugin.name, event = event.key(), attempts = attempt,
                "delivery is dead: in the dead-letter queue until replayed"
            );
        }
        let record = Attempt {
            id: due.id,
            replays: due.replays,
            plugin_version: plugin.version.clone(),
            status: status.0,
            next_attempt_at: status.1,
            failure: outcome
                .result
                .as_ref()
                .err()
                .map(|f| (f.kind, f.message.clone())),
            logs: outcome.logs.iter().map(LogLine::to_string).collect(),
            plugin: plugin.name.clone(),
            kv: outcome.kv_writes.clone(),
            kv_quota: plugin.prepared.kv_quota,
            cost: Some(Cost::from(&outcome)),
        };
        let report = Report {
            event_key: event.key().into(),
            event_type: event.event_type().into(),
            plugin: plugin.name.clone(),
            version: plugin.version.clone(),
            attempt,
            received_at: due.received_at,
            status: status.0,
            outcome,
        };
        Some((record, report))
    }

    /// Where a delivery stands after attempt `attempt` ended with this failure
    /// (none: it succeeded), and when it is due again.
    fn status_after(&self, attempt: u32, failure: Option<FailureKind>) -> (Status, i64) {
        let Some(kind) = failure else {
            return (Status::Succeeded, now_ms());
        };
        match self.retry.after_failure(attempt, kind) {
            Decision::RetryAfter(delay) => (Status::Failed, now_ms() + delay.as_millis() as i64),
            Decision::Dead => (Status::Dead, now_ms()),
        }
    }

    /// An attempt the host failed: recorded as `host-error` and retried like
    /// any failure, never counted against the plugin's health.
    fn host_error(&self, due: &Due, message: String) -> (Attempt, Report) {
        let attempt = due.attempts + 1;
        let (status, next_attempt_at) = self.status_after(attempt, Some(FailureKind::HostError));
        let version: Arc<str> = self
            .shared
            .registry
            .get(&due.plugin)
            .map_or_else(|| "".into(), |p| p.version.clone());
        let (event_key, event_type): (Arc<str>, Arc<str>) = match &due.event {
            Ok(event) => (event.key().into(), event.event_type().into()),
            Err(unreadable) => (unreadable.key.as_str().into(), "".into()),
        };
        let failure = Failure::new(FailureKind::HostError, message);
        let record = Attempt {
            id: due.id,
            replays: due.replays,
            plugin_version: version.clone(),
            status,
            next_attempt_at,
            failure: Some((failure.kind, failure.message.clone())),
            logs: Vec::new(),
            plugin: due.plugin.clone(),
            kv: Arc::default(),
            kv_quota: 0,
            cost: None,
        };
        let report = Report {
            event_key,
            event_type,
            plugin: due.plugin.clone(),
            version,
            attempt,
            received_at: due.received_at,
            status,
            outcome: CallOutcome {
                result: Err(failure),
                fuel_used: 0,
                elapsed: std::time::Duration::ZERO,
                peak_memory_bytes: 0,
                logs: Vec::new(),
                dropped_output_bytes: 0,
                dropped_output_lines: 0,
                kv_writes: Arc::default(),
                requests: Vec::new(),
            },
        };
        (record, report)
    }

    fn call(
        &self,
        plugin: &LoadedPlugin,
        event: &Event,
        attempt: u32,
    ) -> Result<CallOutcome, NotRun> {
        let event_key: Arc<str> = event.key().into();
        let outcome = self.shared.runtime.call(
            &plugin.prepared,
            &event_key,
            event.event_type(),
            event.payload(),
        )?;
        let (name, version, event_type) = (&*plugin.name, &*plugin.version, event.event_type());
        let micros = outcome.elapsed.as_micros() as u64;
        match &outcome.result {
            Ok(()) => tracing::debug!(
                plugin = name,
                version,
                event = &*event_key,
                event_type,
                attempt,
                fuel = outcome.fuel_used,
                micros,
                "plugin handled event"
            ),
            Err(failure) => tracing::warn!(
                plugin = name, version, event = &*event_key, event_type, attempt,
                kind = %failure.kind, micros, "plugin failed: {}", escape_controls(&failure.message)
            ),
        }
        let change =
            plugin
                .health
                .record(&event_key, &outcome.result, self.quarantine_after, now_ms());
        if change == Change::Released {
            tracing::info!(
                plugin = name,
                version,
                "plugin released from quarantine: a probe delivery succeeded"
            );
        }
        if change == Change::Quarantined {
            tracing::error!(
                plugin = name,
                version,
                "plugin quarantined after failing on {} different events in a row: its deliveries \
                 are held in the store until it is released (`plugins release {name}`), reloaded, \
                 or a probe after its rest succeeds",
                self.quarantine_after
            );
        }
        Ok(outcome)
    }
}
