//! One worker thread: take a due delivery, call its plugin in a fresh
//! sandbox, decide what the outcome means (succeeded, retry, dead,
//! quarantine) and hand the attempt to the recorder.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::{Receiver, Sender};

use super::{DispatchState, Recorded, Report};
use crate::event::Event;
use crate::registry::LoadedPlugin;
use crate::retry::{Decision, RetryPolicy};
use crate::runtime::{CallOutcome, NotRun};
use crate::store::{Attempt, Due, Status, now_ms};

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

impl Worker {
    pub(super) fn run(self) {
        let _alive = Alive(&self.shared);
        // Ends when the queue's sender is gone (shutdown) and the queue is empty.
        for due in self.jobs.iter() {
            let plugin = self.shared.registry.get(&due.plugin);
            let runnable = plugin.filter(|p| !p.health.is_quarantined());
            let Some(plugin) = runnable.filter(|_| !self.shared.stopping()) else {
                // Unloaded, quarantined or shutting down: it waits in the store.
                self.shared.in_flight.release([due.id]);
                continue;
            };
            if due.attempts == 0 {
                let _ =
                    self.shared
                        .backlog
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
            let attempt = due.attempts + 1;
            let outcome = match self.call(&plugin, &due.event, attempt) {
                Ok(outcome) => outcome,
                Err(not_run) => {
                    // The host's doing, not the plugin's: not an attempt. It
                    // stays due in the store and runs again (at the next
                    // start, after a shutdown cut).
                    tracing::warn!(plugin = %plugin.name, event = due.event.key(), "plugin call not run: {not_run}");
                    self.shared.in_flight.release([due.id]);
                    continue;
                }
            };
            let (status, next_attempt_at) = match &outcome.result {
                Ok(()) => (Status::Succeeded, now_ms()),
                Err(failure) => match self.retry.after_failure(attempt, failure.kind) {
                    Decision::RetryAfter(delay) => {
                        (Status::Failed, now_ms() + delay.as_millis() as i64)
                    }
                    Decision::Dead => (Status::Dead, now_ms()),
                },
            };
            if status == Status::Dead {
                tracing::error!(
                    plugin = %plugin.name, event = due.event.key(), attempts = attempt,
                    "delivery is dead: in the dead-letter queue until replayed"
                );
            }
            let record = Attempt {
                id: due.id,
                plugin_version: plugin.version.clone(),
                status,
                next_attempt_at,
                failure: outcome
                    .result
                    .as_ref()
                    .err()
                    .map(|f| (f.kind, f.message.clone())),
            };
            let report = Report {
                event_key: due.event.key().into(),
                event_type: due.event.event_type().into(),
                plugin: plugin.name.clone(),
                version: plugin.version.clone(),
                attempt,
                status,
                outcome,
            };
            let _ = self.record.send((record, report));
        }
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
                kind = %failure.kind, micros, "plugin failed: {}", failure.message
            ),
        }
        if plugin.health.record(&outcome.result, self.quarantine_after) {
            tracing::error!(
                plugin = name,
                version,
                "plugin quarantined after failing {} times in a row: it gets no events until reloaded or released",
                self.quarantine_after
            );
        }
        Ok(outcome)
    }
}
