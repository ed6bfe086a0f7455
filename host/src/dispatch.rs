//! Running plugins after the acknowledgement: a bounded queue and worker threads.
//!
//! The HTTP handler hands an accepted [`Event`] to [`Dispatcher::submit`] and
//! answers at once; a worker picks it up, asks the registry which plugins
//! subscribe, and calls each in its own sandbox. Every call ends in a
//! [`Report`], logged and broadcast to whoever listens (tests, an embedding
//! app). A failing plugin is reported, never fatal. This is the seam where a
//! durable store slots in: `submit` becomes "append if new", the queue becomes
//! "claim due deliveries".

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::broadcast;

use crate::event::Event;
use crate::registry::{Plugin, Registry};
use crate::runtime::{CallOutcome, Runtime};

/// Reports buffered per listener; a listener that falls further behind
/// misses the oldest ones (it is told how many) rather than slowing plugins.
const REPORT_BUFFER: usize = 4096;

/// The outcome of one plugin handling one event.
#[derive(Debug, Clone)]
pub struct Report {
    pub event_key: Arc<str>,
    pub event_type: Arc<str>,
    pub plugin: Arc<str>,
    pub version: Arc<str>,
    pub outcome: CallOutcome,
}

/// The queue was full: the caller should answer 503 and let the sender retry.
#[derive(Debug, thiserror::Error)]
#[error("dispatch queue is full ({capacity} events waiting)")]
pub struct Backlogged {
    pub capacity: usize,
}

/// The queue and its workers. Dropping it (or [`Dispatcher::shutdown`]) stops
/// taking events, lets the workers finish what is queued, and joins them.
#[derive(Debug)]
pub struct Dispatcher {
    queue: Option<Sender<Event>>,
    capacity: usize,
    reports: broadcast::Sender<Report>,
    workers: Vec<JoinHandle<()>>,
}

impl Dispatcher {
    /// Start `workers` threads; at most that many plugin instances are alive at once.
    pub fn start(
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        workers: usize,
        capacity: usize,
    ) -> Self {
        let (queue, jobs) = crossbeam_channel::bounded::<Event>(capacity);
        let (reports, _) = broadcast::channel(REPORT_BUFFER);
        let workers = (0..workers.max(1))
            .map(|i| {
                let worker = Worker {
                    runtime: runtime.clone(),
                    registry: registry.clone(),
                    jobs: jobs.clone(),
                    reports: reports.clone(),
                };
                std::thread::Builder::new()
                    .name(format!("plugin-worker-{i}"))
                    .spawn(move || worker.run())
                    .expect("spawn a plugin worker thread")
            })
            .collect();
        Self {
            queue: Some(queue),
            capacity,
            reports,
            workers,
        }
    }

    /// Queue an event for its subscribed plugins, without waiting.
    pub fn submit(&self, event: Event) -> Result<(), Backlogged> {
        let queue = self.queue.as_ref().expect("submit after shutdown");
        match queue.try_send(event) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Backlogged {
                capacity: self.capacity,
            }),
        }
    }

    /// Listen to every report from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Report> {
        self.reports.subscribe()
    }

    /// Events waiting for a worker.
    pub fn backlog(&self) -> usize {
        self.queue.as_ref().map_or(0, Sender::len)
    }

    /// Stop taking events, finish the queued ones, join the workers.
    pub fn shutdown(&mut self) {
        self.queue.take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker {
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    jobs: Receiver<Event>,
    reports: broadcast::Sender<Report>,
}

impl Worker {
    fn run(self) {
        // Ends when every sender is gone and the queue is empty.
        for event in self.jobs.iter() {
            let event_key: Arc<str> = event.key().into();
            let event_type: Arc<str> = event.event_type().into();
            for plugin in self.registry.subscribed(&event_type) {
                let outcome = self.call(&plugin, &event, &event_key);
                let _ = self.reports.send(Report {
                    event_key: event_key.clone(),
                    event_type: event_type.clone(),
                    plugin: plugin.name.clone(),
                    version: plugin.version.clone(),
                    outcome,
                });
            }
        }
    }

    fn call(&self, plugin: &Plugin, event: &Event, event_key: &Arc<str>) -> CallOutcome {
        let outcome = self.runtime.call(
            &plugin.compiled,
            &plugin.name,
            event_key,
            &plugin.limits,
            event.event_type(),
            event.payload(),
        );
        let (name, version, event_type) = (&*plugin.name, &*plugin.version, event.event_type());
        let micros = outcome.elapsed.as_micros() as u64;
        match &outcome.result {
            Ok(()) => tracing::debug!(
                plugin = name,
                version,
                event = &**event_key,
                event_type,
                fuel = outcome.fuel_used,
                micros,
                "plugin handled event"
            ),
            Err(failure) => tracing::warn!(
                plugin = name, version, event = &**event_key, event_type,
                kind = %failure.kind, micros, "plugin failed: {}", failure.message
            ),
        }
        outcome
    }
}
