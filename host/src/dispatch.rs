//! Running plugins after the acknowledgement: a bounded queue and worker threads.
//!
//! The HTTP handler hands an accepted [`Event`] to [`Dispatcher::submit`],
//! which queues one delivery per subscribed plugin, and answers at once; any
//! free worker calls the plugin in its own sandbox. Every call ends in a
//! [`Report`], logged and broadcast to whoever listens (tests, an embedding
//! app). A failing plugin is reported, never fatal. This is the seam where a
//! durable store slots in: `submit` becomes "append if new", the queue becomes
//! "claim due deliveries".

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::broadcast;

use crate::event::Event;
use crate::hooks::Config;
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
#[error("dispatch queue is full ({capacity} deliveries waiting)")]
pub struct Backlogged {
    pub capacity: usize,
}

/// One event for one plugin: the unit of work.
struct Delivery {
    event: Arc<Event>,
    plugin: Arc<Plugin>,
}

/// The queue and its workers. Dropping it (or [`Dispatcher::shutdown`]) stops
/// taking events, lets the workers finish what is queued, and joins them.
#[derive(Debug)]
pub struct Dispatcher {
    registry: Arc<Registry>,
    /// Held while an event's deliveries are queued, so they go in all or none.
    queue: Mutex<Option<Sender<Delivery>>>,
    capacity: usize,
    reports: broadcast::Sender<Report>,
    workers: Vec<JoinHandle<()>>,
}

impl Dispatcher {
    /// Start `config.workers` threads; at most that many plugin instances are
    /// alive at once, and each event's plugins may run side by side.
    pub fn start(runtime: Arc<Runtime>, registry: Arc<Registry>, config: &Config) -> Self {
        let capacity = config.queue_capacity;
        let (queue, jobs) = crossbeam_channel::bounded::<Delivery>(capacity);
        let (reports, _) = broadcast::channel(REPORT_BUFFER);
        let workers = (0..config.workers.max(1))
            .map(|i| {
                let worker = Worker {
                    runtime: runtime.clone(),
                    jobs: jobs.clone(),
                    reports: reports.clone(),
                    quarantine_after: config.quarantine_after,
                };
                std::thread::Builder::new()
                    .name(format!("plugin-worker-{i}"))
                    .spawn(move || worker.run())
                    .expect("spawn a plugin worker thread")
            })
            .collect();
        Self {
            registry,
            queue: Mutex::new(Some(queue)),
            capacity,
            reports,
            workers,
        }
    }

    /// Queue one delivery per subscribed plugin, without waiting: all of them,
    /// or none when the queue has no room.
    pub fn submit(&self, event: Event) -> Result<(), Backlogged> {
        let plugins = self.registry.subscribed(event.event_type());
        if plugins.is_empty() {
            return Ok(());
        }
        let event = Arc::new(event);
        let queue = self.queue.lock().expect("queue lock");
        let queue = queue.as_ref().expect("submit after shutdown");
        // Workers only take from the queue, so the room seen here can only grow.
        if queue.len() + plugins.len() > self.capacity {
            return Err(Backlogged {
                capacity: self.capacity,
            });
        }
        for plugin in plugins {
            let delivery = Delivery {
                event: event.clone(),
                plugin,
            };
            queue.try_send(delivery).map_err(|_| Backlogged {
                capacity: self.capacity,
            })?;
        }
        Ok(())
    }

    /// Listen to every report from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Report> {
        self.reports.subscribe()
    }

    /// Deliveries waiting for a worker.
    pub fn backlog(&self) -> usize {
        let queue = self.queue.lock().expect("queue lock");
        queue.as_ref().map_or(0, Sender::len)
    }

    /// Stop taking events, finish the queued ones, join the workers.
    pub fn shutdown(&mut self) {
        self.queue.lock().expect("queue lock").take();
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
    jobs: Receiver<Delivery>,
    reports: broadcast::Sender<Report>,
    quarantine_after: u32,
}

impl Worker {
    fn run(self) {
        // Ends when the sender is gone and the queue is empty.
        for Delivery { event, plugin } in self.jobs.iter() {
            let event_key: Arc<str> = event.key().into();
            if plugin.health.is_quarantined() {
                tracing::debug!(plugin = %plugin.name, event = %event_key, "skipped: plugin quarantined");
                continue;
            }
            let outcome = self.call(&plugin, &event, &event_key);
            let _ = self.reports.send(Report {
                event_key,
                event_type: event.event_type().into(),
                plugin: plugin.name.clone(),
                version: plugin.version.clone(),
                outcome,
            });
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
        if plugin.health.record(&outcome.result, self.quarantine_after) {
            tracing::error!(
                plugin = name,
                version,
                failures = self.quarantine_after,
                "plugin quarantined after failing {} times in a row: it gets no events until reloaded or released",
                self.quarantine_after
            );
        }
        outcome
    }
}
