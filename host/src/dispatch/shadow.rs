//! Shadow runs: a candidate placed as `NAME.shadow.wasm` runs on each new
//! event `NAME` gets, after the live plugin's first attempt, on a thread of
//! its own. It runs without effects (outbound HTTP answered 503 by a stub
//! and recorded, kv read from the live plugin's state and its writes
//! dropped), is never a delivery, and its outcome is recorded apart beside
//! the live call's for the console to compare. Live calls never wait for
//! it: when its queue is full an event is skipped, and counted.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::DispatchState;
use crate::event::Event;
use crate::registry::{LoadedPlugin, Shadow};
use crate::runtime::{CallOutcome, Failure};
use crate::store::{Cost, ShadowRun, now_ms};
use crate::text::escape_controls;

/// Events waiting for a shadow run; past this, new ones are skipped.
pub(super) const SHADOW_QUEUE: usize = 256;

/// A candidate's run to make, with what the live call did.
pub(super) struct ShadowJob {
    shadow: Arc<Shadow>,
    event: Arc<Event>,
    live_version: Arc<str>,
    live_error: Option<String>,
    live_cost: Cost,
}

/// A call's failure as the shadow records and compares it.
fn error_text(result: &Result<(), Failure>) -> Option<String> {
    result.as_ref().err().map(Failure::described)
}

/// After `plugin`'s first attempt on `event`: queue its candidate's run, if
/// it has one, or count the event skipped when the queue is full.
pub(super) fn offer(
    queue: Option<&Sender<ShadowJob>>,
    shared: &DispatchState,
    plugin: &LoadedPlugin,
    event: &Arc<Event>,
    live: &CallOutcome,
) {
    let (Some(queue), Some(shadow)) = (queue, shared.registry.shadow_of(&plugin.name)) else {
        return;
    };
    let job = ShadowJob {
        shadow: shadow.clone(),
        event: event.clone(),
        live_version: plugin.version.clone(),
        live_error: error_text(&live.result),
        live_cost: Cost::from(live),
    };
    if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = queue.try_send(job) {
        shadow.skipped();
    }
}

/// Runs recorded in one store write at most.
const RECORD_BATCH: usize = 32;

/// Run queued candidates until the queue closes, recording what queued up
/// meanwhile in one write; at shutdown, skip what is left.
pub(super) fn shadow_loop(shared: &DispatchState, jobs: &Receiver<ShadowJob>) {
    while let Ok(first) = jobs.recv() {
        let more = std::iter::from_fn(|| jobs.try_recv().ok());
        let runs: Vec<ShadowRun> = std::iter::once(first)
            .chain(more.take(RECORD_BATCH - 1))
            .filter_map(|job| run(shared, job))
            .collect();
        if runs.is_empty() {
            continue;
        }
        let plugin = runs[0].plugin.clone();
        if let Err(error) = shared.store.record_shadow(runs) {
            tracing::warn!(%plugin, %error, "shadow runs not recorded");
        }
    }
}

/// One candidate's run, unless the host is stopping.
fn run(shared: &DispatchState, job: ShadowJob) -> Option<ShadowRun> {
    if shared.stopping() {
        return None;
    }
    let candidate = &job.shadow.plugin;
    let key: Arc<str> = job.event.key().into();
    let outcome = match shared.runtime.call(
        &candidate.prepared,
        &key,
        job.event.event_type(),
        job.event.payload(),
    ) {
        Ok(outcome) => outcome,
        Err(not_run) => {
            tracing::debug!(plugin = %candidate.name, event = &*key, "shadow not run: {not_run}");
            return None;
        }
    };
    let run = ShadowRun {
        plugin: candidate.name.to_string(),
        event_key: key.to_string(),
        event_type: job.event.event_type().to_owned(),
        live_version: job.live_version.to_string(),
        candidate_version: candidate.version.to_string(),
        live_error: job.live_error,
        candidate_error: error_text(&outcome.result),
        live_cost: job.live_cost,
        candidate_cost: Cost::from(&outcome),
        candidate_logs: outcome.logs.iter().map(ToString::to_string).collect(),
        requests: outcome.requests,
        created_at: now_ms(),
    };
    let differs = run.differs();
    job.shadow.ran(differs);
    if differs {
        tracing::info!(
            plugin = %candidate.name, event = &*escape_controls(&key),
            live = run.live_error.as_deref().map_or("ok".into(), escape_controls).as_ref(),
            candidate = run.candidate_error.as_deref().map_or("ok".into(), escape_controls).as_ref(),
            "shadow differed from the live plugin"
        );
    }
    Some(run)
}
