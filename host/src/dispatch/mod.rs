//! From a stored event to plugin calls and back: acceptance, workers, retries.
//!
//! [`Dispatcher::accept`] appends an event to the [`Store`] (one pending
//! delivery per subscribed plugin) and returns once it is on disk; only then
//! does the HTTP handler answer 200. New deliveries go straight to the worker
//! queue; a poller finds everything else that is due (retries, deliveries left
//! from before a restart, replays from the command line). Workers call the
//! plugin in its sandbox (`worker.rs`); a recorder thread writes outcomes back
//! in batches. Every attempt ends in a [`Report`], logged and broadcast. A
//! delivery is in the queue at most once at a time (`in_flight.rs`), and at
//! least once in all: a crash between a call and its record runs it again.
//! A candidate shadowing a plugin runs beside it on a thread of its own
//! (`shadow.rs`), never as a delivery.
//!
//! It knows nothing of HTTP or of how the host is configured as a whole: it
//! gets a [`DispatchSettings`].

mod in_flight;
mod shadow;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::broadcast;

use self::in_flight::InFlight;
use self::shadow::ShadowJob;
use self::worker::Worker;
use crate::contain::contain;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::retry::RetryPolicy;
use crate::runtime::{CallOutcome, Runtime};
use crate::store::{
    Appended, Attempt, DeliveryId, Due, RecordedAs, Status, Store, StoreError, now_ms,
};

/// Reports buffered per listener; a listener that falls further behind
/// misses the oldest ones (it is told how many) rather than slowing plugins.
const REPORT_BUFFER: usize = 4096;

/// How often the poller looks for due deliveries: the granularity of retry
/// times and how soon a replay from the command line starts.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// New deliveries go to the workers straight from `accept`; the poller
/// leaves never-attempted ones younger than this alone, so it cannot pick up
/// a delivery that `accept` is about to queue. Ones the queue had no room for
/// start this much later.
pub const FAST_PATH_GRACE: Duration = Duration::from_secs(1);

/// How long the recorder waits after a batch of outcomes could not be
/// written before it lets those deliveries run again.
const RECORD_FAILURE_PAUSE: Duration = Duration::from_secs(1);

/// After the grace period, how long cut calls get to return before shutdown
/// leaves them behind. A cut call returns within an epoch tick, waiting in a
/// host call or not; this bounds shutdown should one ever not.
pub const CUT_WAIT: Duration = Duration::from_secs(1);

/// What the dispatcher needs to know of the host's configuration.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Worker threads: the most plugin calls at once.
    pub workers: usize,
    /// Deliveries held in memory for the workers.
    pub queue_capacity: usize,
    pub retry: RetryPolicy,
    /// Different events failing in a row that quarantine a plugin; 0 never.
    pub quarantine_after: u32,
    /// How long a quarantined plugin rests before one delivery probes it.
    pub quarantine_probe_after: Duration,
    /// How long `shutdown` lets running calls finish before cutting them.
    pub shutdown_grace: Duration,
}

/// The outcome of one attempt of one plugin on one event.
#[derive(Debug, Clone)]
pub struct Report {
    pub event_key: Arc<str>,
    pub event_type: Arc<str>,
    pub plugin: Arc<str>,
    pub version: Arc<str>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When the event was received (Unix ms).
    pub received_at: i64,
    /// Where the delivery stands after this attempt, as recorded: `Failed`
    /// for a call that succeeded but whose kv writes no longer applied (it
    /// runs again), `Pending` for an attempt not recorded (replayed while it
    /// ran, or the store could not write; it runs again).
    pub status: Status,
    pub outcome: CallOutcome,
}

/// An attempt on its way to the store, and its report, sent once recorded.
type Recorded = (Attempt, Report, tracing::Span);

/// What `accept` did with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Stored, with this many deliveries.
    New(usize),
    /// Already stored: not dispatched again.
    Duplicate,
}

/// Why an event could not be accepted now; the sender should retry. How far
/// behind plugins are is not a reason: deliveries wait in the store, and only
/// a store that cannot take the event (full, busy, failing) refuses it.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("the host is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the threads share.
#[derive(Debug)]
struct DispatchState {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    runtime: Arc<Runtime>,
    metrics: Metrics,
    /// Taken at shutdown so workers stop.
    queue: RwLock<Option<Sender<Due>>>,
    /// Candidates' runs; taken at shutdown so the shadow thread stops.
    shadows: RwLock<Option<Sender<ShadowJob>>>,
    capacity: usize,
    probe_after: Duration,
    in_flight: InFlight,
    reports: broadcast::Sender<Report>,
    /// Set at shutdown: no new event is accepted, no queued call starts.
    stopping: AtomicBool,
    /// Workers still running, for shutdown to wait on.
    workers_alive: Mutex<usize>,
    worker_exited: Condvar,
}

impl DispatchState {
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

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// After a plugin's first attempt on a new event: its candidate's turn.
    fn offer_shadow(
        &self,
        plugin: &crate::registry::LoadedPlugin,
        event: &Arc<Event>,
        live: &CallOutcome,
    ) {
        let queue = self.shadows.read().expect("shadow queue lock");
        shadow::offer(queue.as_ref(), self, plugin, event, live);
    }
}

/// The threads a running dispatcher owns, taken by the first shutdown.
#[derive(Debug)]
struct Threads {
    workers: Vec<JoinHandle<()>>,
    poller: JoinHandle<()>,
    record: Sender<Recorded>,
    /// Dropped to tell the recorder to write what it has and stop, even if
    /// a worker left behind still holds a `record` sender.
    close: Sender<()>,
    recorder: JoinHandle<()>,
    shadow: JoinHandle<()>,
}

/// The workers, the poller and the recorder, until [`Dispatcher::shutdown`]
/// (or drop).
#[derive(Debug)]
pub struct Dispatcher {
    shared: Arc<DispatchState>,
    grace: Duration,
    threads: Mutex<Option<Threads>>,
}

impl Dispatcher {
    /// Start `settings.workers` workers (the most plugin instances alive at
    /// once), the poller and the recorder.
    pub fn start(
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        store: Arc<dyn Store>,
        metrics: Metrics,
        settings: &DispatchSettings,
    ) -> Self {
        let capacity = settings.queue_capacity;
        let workers = settings.workers.max(1);
        let (queue, jobs) = crossbeam_channel::bounded::<Due>(capacity);
        let (shadows, shadow_jobs) = crossbeam_channel::bounded(shadow::SHADOW_QUEUE);
        let (reports, _) = broadcast::channel(REPORT_BUFFER);
        let shared = Arc::new(DispatchState {
            store,
            registry,
            runtime,
            metrics,
            queue: RwLock::new(Some(queue)),
            shadows: RwLock::new(Some(shadows)),
            capacity,
            probe_after: settings.quarantine_probe_after,
            in_flight: InFlight::default(),
            reports,
            stopping: AtomicBool::new(false),
            workers_alive: Mutex::new(workers),
            worker_exited: Condvar::new(),
        });
        let (record, records) = crossbeam_channel::unbounded();
        let (close, closed) = crossbeam_channel::bounded(0);
        let recorder = spawn("store-recorder", {
            let shared = shared.clone();
            move || record_loop(&shared, &records, &closed)
        });
        let workers = (0..workers)
            .map(|i| {
                let worker = Worker {
                    shared: shared.clone(),
                    jobs: jobs.clone(),
                    record: record.clone(),
                    retry: settings.retry.clone(),
                    quarantine_after: settings.quarantine_after,
                };
                spawn(&format!("plugin-worker-{i}"), move || worker.run())
            })
            .collect();
        let poller = spawn("dispatch-poller", {
            let shared = shared.clone();
            move || poll_loop(&shared)
        });
        let shadow = spawn("shadow-runner", {
            let shared = shared.clone();
            move || {
                // A panic in one shadow run must not end the others.
                while contain(|| shadow::shadow_loop(&shared, &shadow_jobs)).is_err() {
                    tracing::error!("the shadow runner panicked; it goes on with the next run");
                }
            }
        });
        Self {
            shared,
            grace: settings.shutdown_grace,
            threads: Mutex::new(Some(Threads {
                workers,
                poller,
                record,
                close,
                recorder,
                shadow,
            })),
        }
    }

    /// Store the event with a delivery per subscribed plugin; resolves once it
    /// is on disk. New deliveries start at once.
    pub async fn accept(&self, event: Event) -> Result<Accepted, AcceptError> {
        if self.shared.stopping() {
            return Err(AcceptError::ShuttingDown);
        }
        let plugins = self.shared.registry.subscribed_names(event.event_type());
        let received_at = now_ms();
        let event = Arc::new(event);
        let ticket = self
            .shared
            .store
            .append_if_new(event.clone(), plugins.clone());
        match ticket.await.map_err(|_| StoreError::Closed)?? {
            Appended::Duplicate => Ok(Accepted::Duplicate),
            Appended::New(ids) => {
                let mut queued = 0;
                for (id, plugin) in ids.iter().zip(plugins) {
                    let due = Due {
                        id: *id,
                        plugin,
                        attempts: 0,
                        replays: 0,
                        received_at,
                        event: Ok(event.clone()),
                    };
                    if !self.shared.enqueue(due, false) {
                        break;
                    }
                    queued += 1;
                }
                if queued < ids.len() {
                    // For another host, or this one's poller, to take.
                    self.shared.store.release(ids[queued..].to_vec());
                }
                Ok(Accepted::New(ids.len()))
            }
        }
    }

    /// Names of its threads that have ended while it runs: a worker, the
    /// poller or the recorder gone means deliveries stop, so `/healthz` says so.
    pub fn threads_gone(&self) -> Vec<String> {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let Some(threads) = &*threads else {
            return Vec::new(); // shut down: none is meant to run
        };
        threads
            .workers
            .iter()
            .chain([&threads.poller, &threads.recorder, &threads.shadow])
            .filter(|t| t.is_finished())
            .map(|t| t.thread().name().unwrap_or("unnamed").to_owned())
            .collect()
    }

    /// Listen to every report from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Report> {
        self.shared.reports.subscribe()
    }

    /// The store behind this dispatcher.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// Stop: refuse new events, start no queued call, let running calls
    /// finish for up to the grace period and cut the rest, record every
    /// outcome, join every thread. What did not run stays pending in the
    /// store for the next start. Blocking: the grace period plus [`CUT_WAIT`]
    /// for the calls, then the last store writes (each bounded by the store's
    /// busy timeout). A call that does not return within `CUT_WAIT` of the
    /// cut is left behind, its outcome unrecorded. Later calls wait for the
    /// first to finish.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        // Held to the end, so a second caller waits for this one.
        let mut held = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let Some(threads) = held.take() else {
            return;
        };
        self.shared.queue.write().expect("queue lock").take();
        self.shared
            .shadows
            .write()
            .expect("shadow queue lock")
            .take();
        let mut running = self.wait_for_workers(self.grace);
        if running > 0 {
            tracing::warn!(
                calls = running,
                grace_ms = self.grace.as_millis() as u64,
                "shutdown grace period over: cutting the running plugin calls; \
                 their deliveries stay pending for the next start"
            );
            self.shared.runtime.cancel_calls();
            running = self.wait_for_workers(CUT_WAIT);
        }
        if running == 0 {
            for worker in threads.workers {
                let _ = worker.join();
            }
        } else {
            tracing::error!(
                calls = running,
                "plugin calls did not stop when cut: left behind; \
                 their deliveries stay pending for the next start"
            );
        }
        let _ = threads.poller.join();
        // The live calls are done or left behind: a shadow call is cut too,
        // and what is queued skipped. Waited for as long as cut calls are.
        self.shared.runtime.cancel_calls();
        let cut_by = std::time::Instant::now() + CUT_WAIT;
        while !threads.shadow.is_finished() && std::time::Instant::now() < cut_by {
            std::thread::sleep(Duration::from_millis(5));
        }
        if threads.shadow.is_finished() {
            let _ = threads.shadow.join();
        } else {
            tracing::error!("the shadow runner did not stop when cut: left behind");
        }
        drop(threads.record);
        drop(threads.close);
        let _ = threads.recorder.join();
        // What is still pending here (queued, or cut) is another host's.
        self.shared.store.release_held();
    }

    /// Wait up to `limit` for every worker to exit; how many still run.
    fn wait_for_workers(&self, limit: Duration) -> usize {
        let alive = self.shared.workers_alive.lock().expect("workers lock");
        let (alive, _) = self
            .shared
            .worker_exited
            .wait_timeout_while(alive, limit, |alive| *alive > 0)
            .expect("workers lock");
        *alive
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

/// Find due deliveries for the plugins that can take them, every
/// [`POLL_INTERVAL`] until shutdown.
fn poll_loop(shared: &DispatchState) {
    let wakeups = shared.store.wakeups();
    while !shared.stopping() {
        if let Err(panic) = contain(|| poll_once(shared)) {
            shared.in_flight.end_poll();
            tracing::error!(panic, "the poller panicked; it polls again next interval");
        }
        match &wakeups {
            // Woken early when another host makes work due; a burst of
            // signals is one poll.
            Some(wakeups) => match wakeups.recv_timeout(POLL_INTERVAL) {
                Ok(()) => while wakeups.try_recv().is_ok() {},
                Err(RecvTimeoutError::Timeout) => {}
                // The store stopped listening: poll on the interval alone.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(POLL_INTERVAL),
            },
            None => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

fn poll_once(shared: &DispatchState) {
    let room = {
        let queue = shared.queue.read().expect("queue lock");
        queue.as_ref().map_or(0, |q| shared.capacity - q.len())
    };
    if room > 0 {
        let active = shared.registry.active_names();
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
        probe_quarantined(shared, now, fresh_after);
        shared.in_flight.end_poll();
    }
}

/// Queue one held delivery of each quarantined plugin that has rested long
/// enough, as its probe.
fn probe_quarantined(shared: &DispatchState, now: i64, fresh_after: i64) {
    for plugin in shared.registry.snapshot().iter() {
        if !plugin.health.probe_due(now, shared.probe_after) {
            continue;
        }
        let names = [plugin.name.clone()];
        let Ok(Some(due)) = shared
            .store
            .due(now, fresh_after, &names, 1)
            .map(|d| d.into_iter().next())
        else {
            continue;
        };
        let id = due.id;
        if plugin.health.start_probe(id, now, shared.probe_after) {
            tracing::info!(plugin = %plugin.name, delivery = id, "quarantined plugin rested: probing it with one delivery");
            if !shared.enqueue(due, true) {
                plugin.health.end_probe(id, now);
            }
        }
    }
}

/// Write attempts back in batches; only then may a delivery be queued again.
/// Ends when every sender is gone, or at `closed` after writing what came.
fn record_loop(shared: &DispatchState, records: &Receiver<Recorded>, closed: &Receiver<()>) {
    loop {
        let first = crossbeam_channel::select! {
            recv(records) -> first => match first {
                Ok(first) => first,
                Err(_) => return,
            },
            recv(closed) -> _ => {
                let rest: Vec<Recorded> = records.try_iter().collect();
                if !rest.is_empty() {
                    write(shared, rest);
                }
                return;
            }
        };
        let mut batch = vec![first];
        batch.extend(records.try_iter().take(shared.store.record_batch() - 1));
        write(shared, batch);
    }
}

fn write(shared: &DispatchState, batch: Vec<Recorded>) {
    let ids: Vec<DeliveryId> = batch.iter().map(|(a, ..)| a.id).collect();
    // Each attempt's record is a span of its call's, open while the batch
    // that carries it is written.
    let mut spans = Vec::with_capacity(batch.len());
    let (attempts, reports): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|(attempt, report, call)| {
            spans.push(
                tracing::info_span!(parent: &call, "store.record", status = tracing::field::Empty),
            );
            (attempt, report)
        })
        .unzip();
    let recorded = contain(|| shared.store.record(attempts))
        .unwrap_or_else(|panic| Err(StoreError::Failed(format!("panic: {panic}"))));
    let written = recorded.is_ok();
    let recorded = recorded.unwrap_or_else(|error| {
        // Left pending in the store: they run again (at least once), but
        // not at once: a store that cannot write (full, failing) is not
        // hammered by the same calls every poll.
        tracing::error!(%error, deliveries = ids.len(), "could not record outcomes; they will run again");
        std::thread::sleep(RECORD_FAILURE_PAUSE);
        vec![RecordedAs::Superseded; ids.len()]
    });
    // Released whatever happened, so none is stuck in the queue's books.
    shared.in_flight.release(ids);
    for ((mut report, recorded_as), span) in reports.into_iter().zip(recorded).zip(spans) {
        // Where the delivery stands is what the store made of the attempt.
        match recorded_as {
            RecordedAs::Given => {}
            RecordedAs::Superseded => {
                if written {
                    tracing::info!(
                        plugin = %report.plugin,
                        event = %report.event_key,
                        "this run does not count: the delivery was replayed, or another host \
                         took it over, while it ran"
                    );
                }
                report.status = Status::Pending
            }
            RecordedAs::Conflict(_) => report.status = Status::Failed,
        }
        span.record("status", report.status.as_str());
        shared.metrics.attempt(
            &report.plugin,
            report.status,
            &report.outcome,
            report.received_at,
        );
        let _ = shared.reports.send(report);
    }
}
