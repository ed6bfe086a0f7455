//! From a stored event to plugin calls and back: acceptance, workers, retries.
//!
//! [`Dispatcher::accept`] appends an event to the [`Store`] (one pending
//! delivery per subscribed plugin) and returns once it is on disk; only then
//! does the HTTP handler answer 200. New deliveries go straight to the worker
//! queue; a poller finds everything else that is due (retries, deliveries left
//! from before a restart, replays from the command line). Workers call the
//! plugin in its sandbox; a recorder thread writes outcomes back in batches.
//! Every attempt ends in a [`Report`], logged and broadcast. A delivery is
//! in the queue at most once at a time (the in-flight set), and at least once
//! in all: a crash between a call and its record runs it again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::broadcast;

use crate::event::Event;
use crate::hooks::Config;
use crate::registry::{Plugin, Registry};
use crate::retry::{Decision, RetryPolicy};
use crate::runtime::{CallOutcome, Runtime};
use crate::store::{Appended, Attempt, DeliveryId, Due, Status, Store, StoreError, now_ms};

/// Reports buffered per listener; a listener that falls further behind
/// misses the oldest ones (it is told how many) rather than slowing plugins.
const REPORT_BUFFER: usize = 4096;

/// How often the poller looks for due deliveries: the granularity of retry
/// times and how soon a replay from the command line starts.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How often the plugin table `plugins list` reads is rewritten.
const PLUGIN_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);

/// How often succeeded events past the retention age are purged.
const RETENTION_SWEEP: Duration = Duration::from_secs(3600);

/// The outcome of one attempt of one plugin on one event.
#[derive(Debug, Clone)]
pub struct Report {
    pub event_key: Arc<str>,
    pub event_type: Arc<str>,
    pub plugin: Arc<str>,
    pub version: Arc<str>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Where the delivery stands after this attempt.
    pub status: Status,
    pub outcome: CallOutcome,
}

/// An attempt on its way to the store, and its report, sent once recorded.
type Recorded = (Attempt, Report);

/// What `accept` did with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Stored, with this many deliveries.
    New(usize),
    /// Already stored: not dispatched again.
    Duplicate,
}

/// Why an event could not be accepted now; the sender should retry.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("dispatch backlog is over its high-water mark ({0} deliveries waiting)")]
    Backlogged(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// New deliveries go to the workers straight from `accept`; the poller
/// leaves never-attempted ones younger than this alone, so it cannot pick up
/// a delivery that `accept` is about to queue. Ones the queue had no room for
/// start this much later.
pub const FAST_PATH_GRACE: Duration = Duration::from_secs(1);

/// Deliveries queued or running; none is queued twice.
#[derive(Debug, Default)]
struct InFlight(Mutex<InFlightSets>);

#[derive(Debug, Default)]
struct InFlightSets {
    running: HashSet<DeliveryId>,
    /// Released while the poller was reading: its rows for these are stale.
    released_during_poll: Option<HashSet<DeliveryId>>,
}

impl InFlight {
    fn claim(&self, id: DeliveryId) -> bool {
        self.0.lock().expect("in-flight lock").running.insert(id)
    }

    fn release(&self, ids: impl IntoIterator<Item = DeliveryId>) {
        let mut sets = self.0.lock().expect("in-flight lock");
        let InFlightSets {
            running,
            released_during_poll,
        } = &mut *sets;
        for id in ids {
            running.remove(&id);
            if let Some(released) = released_during_poll {
                released.insert(id);
            }
        }
    }

    fn begin_poll(&self) {
        self.0.lock().expect("in-flight lock").released_during_poll = Some(HashSet::new());
    }

    /// Claim a delivery the poller read, unless its outcome was recorded
    /// after the read began (the row said pending; it no longer is).
    fn claim_polled(&self, id: DeliveryId) -> bool {
        let mut sets = self.0.lock().expect("in-flight lock");
        if sets
            .released_during_poll
            .as_ref()
            .is_some_and(|r| r.contains(&id))
        {
            return false;
        }
        sets.running.insert(id)
    }

    fn end_poll(&self) {
        self.0.lock().expect("in-flight lock").released_during_poll = None;
    }
}

/// What the threads share.
#[derive(Debug)]
struct Shared {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    runtime: Arc<Runtime>,
    /// Taken at shutdown so workers drain and stop.
    queue: RwLock<Option<Sender<Due>>>,
    capacity: usize,
    in_flight: InFlight,
    /// Deliveries waiting for a first attempt, as last counted plus since.
    backlog: AtomicUsize,
    reports: broadcast::Sender<Report>,
    stop: AtomicBool,
}

impl Shared {
    /// Queue a delivery unless it is already queued; false when the queue is full.
    fn enqueue(&self, due: Due, polled: bool) -> bool {
        let claimed = if polled {
            self.in_flight.claim_polled(due.id)
        } else {
            self.in_flight.claim(due.id)
        };
        if !claimed {
            return true;
        }
        let id = due.id;
        let queue = self.queue.read().expect("queue lock");
        let sent = queue.as_ref().is_some_and(|q| q.try_send(due).is_ok());
        if !sent {
            // Still pending in the store: the poller will find it.
            self.in_flight.release([id]);
        }
        sent
    }
}

/// The workers, the poller and the recorder. Dropping it (or
/// [`Dispatcher::shutdown`]) stops them once the queued calls are done.
#[derive(Debug)]
pub struct Dispatcher {
    shared: Arc<Shared>,
    high_water: usize,
    threads: Vec<JoinHandle<()>>,
    recorder: Option<(Sender<Recorded>, JoinHandle<()>)>,
}

impl Dispatcher {
    /// Start `config.workers` workers (the most plugin instances alive at
    /// once), the poller and the recorder.
    pub fn start(
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        store: Arc<dyn Store>,
        config: &Config,
    ) -> Self {
        let capacity = config.queue_capacity;
        let (queue, jobs) = crossbeam_channel::bounded::<Due>(capacity);
        let (reports, _) = broadcast::channel(REPORT_BUFFER);
        let shared = Arc::new(Shared {
            backlog: AtomicUsize::new(store.outstanding().unwrap_or(0)),
            store,
            registry,
            runtime,
            queue: RwLock::new(Some(queue)),
            capacity,
            in_flight: InFlight::default(),
            reports,
            stop: AtomicBool::new(false),
        });
        let (record, records) = crossbeam_channel::unbounded();
        let recorder = spawn("store-recorder", {
            let shared = shared.clone();
            move || record_loop(&shared, records)
        });
        let mut threads: Vec<JoinHandle<()>> = (0..config.workers.max(1))
            .map(|i| {
                let worker = Worker {
                    shared: shared.clone(),
                    jobs: jobs.clone(),
                    record: record.clone(),
                    retry: config.retry.clone(),
                    quarantine_after: config.quarantine_after,
                };
                spawn(&format!("plugin-worker-{i}"), move || worker.run())
            })
            .collect();
        threads.push(spawn("dispatch-poller", {
            let shared = shared.clone();
            let retention = config.retention;
            move || poll_loop(&shared, retention)
        }));
        Self {
            shared,
            high_water: config.backlog_high_water,
            threads,
            recorder: Some((record, recorder)),
        }
    }

    /// Store the event with a delivery per subscribed plugin; resolves once it
    /// is on disk. New deliveries start at once.
    pub async fn accept(&self, event: Event) -> Result<Accepted, AcceptError> {
        let backlog = self.shared.backlog.load(Ordering::Relaxed);
        if backlog >= self.high_water {
            return Err(AcceptError::Backlogged(backlog));
        }
        let plugins = self.shared.registry.subscribed_names(event.event_type());
        let event = Arc::new(event);
        let ticket = self
            .shared
            .store
            .append_if_new(event.clone(), plugins.clone());
        match ticket.await.map_err(|_| StoreError::Closed)?? {
            Appended::Duplicate => Ok(Accepted::Duplicate),
            Appended::New(ids) => {
                self.shared.backlog.fetch_add(ids.len(), Ordering::Relaxed);
                for (id, plugin) in ids.iter().zip(plugins) {
                    let due = Due {
                        id: *id,
                        plugin,
                        attempts: 0,
                        event: event.clone(),
                    };
                    if !self.shared.enqueue(due, false) {
                        break;
                    }
                }
                Ok(Accepted::New(ids.len()))
            }
        }
    }

    /// Listen to every report from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Report> {
        self.shared.reports.subscribe()
    }

    /// The store behind this dispatcher.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// Stop polling, finish the queued calls, record them, join every thread.
    /// What is still pending stays in the store for the next start.
    pub fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.queue.write().expect("queue lock").take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        if let Some((record, recorder)) = self.recorder.take() {
            drop(record);
            let _ = recorder.join();
        }
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .unwrap_or_else(|e| panic!("spawn the {name} thread: {e}"))
}

/// Find due deliveries for the plugins that can take them, refresh the
/// backlog count, purge old succeeded events now and then.
fn poll_loop(shared: &Shared, retention: Duration) {
    let mut last_sweep: Option<Instant> = None;
    let mut last_snapshot: Option<Instant> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        if last_snapshot.is_none_or(|t| t.elapsed() >= PLUGIN_SNAPSHOT_INTERVAL) {
            if let Err(error) = shared.store.save_plugins(shared.registry.rows(now_ms())) {
                tracing::warn!(%error, "could not save the plugin table");
            }
            last_snapshot = Some(Instant::now());
        }
        if last_sweep.is_none_or(|t| t.elapsed() >= RETENTION_SWEEP) {
            let before = now_ms() - retention.as_millis() as i64;
            match shared.store.purge_succeeded(before) {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "purged succeeded events past retention"),
                Err(error) => tracing::warn!(%error, "retention purge failed"),
            }
            last_sweep = Some(Instant::now());
        }
        let active: Vec<Arc<str>> = shared
            .registry
            .snapshot()
            .iter()
            .filter(|p| !p.health.is_quarantined())
            .map(|p| p.name.clone())
            .collect();
        let room = {
            let queue = shared.queue.read().expect("queue lock");
            queue.as_ref().map_or(0, |q| shared.capacity - q.len())
        };
        if room > 0 {
            shared.in_flight.begin_poll();
            let now = now_ms();
            let fresh_after = now - FAST_PATH_GRACE.as_millis() as i64;
            match shared.store.due(now, fresh_after, &active, room) {
                Ok(due) => {
                    for due in due {
                        if !shared.enqueue(due, true) {
                            break;
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "could not read due deliveries"),
            }
            shared.in_flight.end_poll();
        }
        if let Ok(n) = shared.store.outstanding() {
            shared.backlog.store(n, Ordering::Relaxed);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Write attempts back in batches; only then may a delivery be queued again.
fn record_loop(shared: &Shared, records: Receiver<Recorded>) {
    while let Ok(first) = records.recv() {
        let mut batch = vec![first];
        batch.extend(records.try_iter().take(1023));
        let ids: Vec<DeliveryId> = batch.iter().map(|(a, _)| a.id).collect();
        let (attempts, reports): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        if let Err(error) = shared.store.record(attempts) {
            // Left pending in the store: they run again (at least once).
            tracing::error!(%error, deliveries = ids.len(), "could not record outcomes; they will run again");
        }
        shared.in_flight.release(ids);
        for report in reports {
            let _ = shared.reports.send(report);
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    jobs: Receiver<Due>,
    record: Sender<Recorded>,
    retry: RetryPolicy,
    quarantine_after: u32,
}

impl Worker {
    fn run(self) {
        // Ends when the queue's sender is gone and the queue is empty.
        for due in self.jobs.iter() {
            let plugin = self.shared.registry.get(&due.plugin);
            let Some(plugin) = plugin.filter(|p| !p.health.is_quarantined()) else {
                // Unloaded or quarantined: the delivery waits in the store.
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
            let outcome = self.call(&plugin, &due.event, attempt);
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

    fn call(&self, plugin: &Plugin, event: &Event, attempt: u32) -> CallOutcome {
        let event_key: Arc<str> = event.key().into();
        let outcome = self.shared.runtime.call(
            &plugin.guest,
            &event_key,
            event.event_type(),
            event.payload(),
        );
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
        outcome
    }
}
