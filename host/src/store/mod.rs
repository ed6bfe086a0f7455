//! Durable storage of events and their deliveries: the seam between the host
//! and whatever keeps its data.
//!
//! [`Store`] is shaped by what the host needs (append an event if its key is
//! new, find due deliveries, record outcomes, list and replay), not by SQL.
//! [`SqliteStore`] is the embedded implementation, for one host;
//! [`PgStore`] is PostgreSQL, for several hosts sharing one database. What to retry and when is decided in `retry.rs`.

mod postgres;
mod sqlite;

use std::sync::Arc;

use crate::event::Event;
use crate::runtime::FailureKind;
use crate::runtime::egress::stub::RecordedRequest;
use crate::runtime::kv::{KvOp, KvRead};
use crate::status::PluginStatus;

pub use self::postgres::{
    DEFAULT_LEASE, DEFAULT_POOL_SIZE, DEFAULT_STATEMENT_TIMEOUT, PG_SCHEMA_VERSION, PgOptions,
    PgStore,
};
pub use self::sqlite::{DEFAULT_DB_PATH, SCHEMA_VERSION, SqliteSnapshot, SqliteStore};

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not yet attempted, or replayed.
    Pending,
    Succeeded,
    /// The last attempt failed; another is scheduled.
    Failed,
    /// Every attempt failed: the dead-letter queue.
    Dead,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Succeeded, Self::Failed, Self::Dead]
            .into_iter()
            .find(|status| status.as_str() == s)
    }
}

/// What `append_if_new` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Stored, with these deliveries (one per plugin), all due now.
    New(Vec<DeliveryId>),
    /// The key was already stored; nothing changed.
    Duplicate,
}

pub type DeliveryId = i64;

/// A delivery ready to run.
#[derive(Debug, Clone)]
pub struct Due {
    pub id: DeliveryId,
    pub plugin: Arc<str>,
    /// Attempts made before this one.
    pub attempts: u32,
    /// Times the delivery had been replayed when it was read.
    pub replays: i64,
    /// When the event was received (Unix ms): end-to-end latency starts here.
    pub received_at: i64,
    /// The event, or why its stored row is not one (a file written by
    /// something else): such a delivery is recorded as a `host-error`.
    pub event: Result<Arc<Event>, Unreadable>,
}

/// A stored event that cannot be handed to a plugin.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub key: String,
    pub reason: String,
}

/// The result of one attempt, to record.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: DeliveryId,
    /// The delivery's replay count when the attempt began: an attempt begun
    /// before a replay is not recorded, so the replay runs after it.
    pub replays: i64,
    pub plugin_version: Arc<str>,
    pub status: Status,
    /// When to try again (unix ms), for `Failed`.
    pub next_attempt_at: i64,
    pub failure: Option<(FailureKind, String)>,
    /// The lines the call wrote (kept as the delivery's last logs).
    pub logs: Vec<String>,
    /// The plugin that ran it, whose key-value state `kv` writes.
    pub plugin: Arc<str>,
    /// A successful call's key-value writes: committed with this record, or
    /// (a compare-and-swap that no longer holds) not at all, the delivery
    /// then failed and due again.
    pub kv: Arc<[KvOp]>,
    /// The plugin's kv quota in bytes, checked again as `kv` commits.
    pub kv_quota: u64,
    /// What the call cost, if it ran.
    pub cost: Option<Cost>,
}

/// What one call cost: kept with a delivery's last attempt, for comparing
/// a candidate with it (`shadow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cost {
    /// Fuel consumed, instantiation included.
    pub fuel: u64,
    /// Wall-clock time of the call, in microseconds.
    pub micros: u64,
}

impl From<&crate::runtime::CallOutcome> for Cost {
    fn from(outcome: &crate::runtime::CallOutcome) -> Self {
        Self {
            fuel: outcome.fuel_used,
            micros: outcome.elapsed.as_micros().try_into().unwrap_or(u64::MAX),
        }
    }
}

impl Cost {
    /// From the stored columns: both or nothing.
    fn from_columns(fuel: Option<i64>, micros: Option<i64>) -> Option<Self> {
        Some(Self {
            fuel: u64::try_from(fuel?).ok()?,
            micros: u64::try_from(micros?).ok()?,
        })
    }

    /// As stored (a number too big for a column saturates).
    fn columns(cost: Option<Self>) -> (Option<i64>, Option<i64>) {
        let column = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        (cost.map(|c| column(c.fuel)), cost.map(|c| column(c.micros)))
    }
}

/// What [`Store::record`] made of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedAs {
    /// As given.
    Given,
    /// Not recorded: the delivery was replayed while the attempt ran, and
    /// runs again.
    Superseded,
    /// The call succeeded but its kv writes no longer applied (a
    /// compare-and-swap that no longer holds, the quota): recorded as a
    /// failed `host-error` with this message, due again shortly.
    Conflict(String),
}

/// One delivery as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryRecord {
    pub id: DeliveryId,
    pub event_key: String,
    pub event_type: String,
    pub plugin: String,
    pub status: Status,
    pub attempts: u32,
    pub last_failure_kind: Option<FailureKind>,
    pub last_failure_message: Option<String>,
    pub plugin_version: Option<String>,
    pub next_attempt_at: i64,
    pub created_at: i64,
    pub updated_at: i64,
    /// The lines the last attempt's call wrote.
    pub last_logs: Vec<String>,
    /// What the last attempt's call cost (none before it ran, or recorded
    /// by a version that did not keep it).
    pub last_cost: Option<Cost>,
}

/// The stored form of an attempt's log lines: a JSON array of strings.
fn logs_json(logs: &[String]) -> Option<String> {
    (!logs.is_empty()).then(|| serde_json::to_string(logs).expect("strings serialize"))
}

/// An attempt's log lines from their stored form (none if unreadable).
fn logs_from_json(stored: Option<&str>) -> Vec<String> {
    stored
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default()
}

/// One event as stored, with its deliveries.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventRecord {
    pub key: String,
    pub event_type: String,
    pub received_at: i64,
    /// The body exactly as signed.
    pub body: String,
    pub deliveries: Vec<DeliveryRecord>,
}

/// One run of a shadow candidate (`NAME.shadow.wasm`) on a new event,
/// beside its live plugin's first attempt: kept apart from deliveries, and
/// never acted on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShadowRun {
    /// The live plugin it shadows.
    pub plugin: String,
    pub event_key: String,
    pub event_type: String,
    pub live_version: String,
    pub candidate_version: String,
    /// `None`: the call succeeded; else `failed (kind): message`.
    pub live_error: Option<String>,
    pub candidate_error: Option<String>,
    pub live_cost: Cost,
    pub candidate_cost: Cost,
    /// The lines the candidate wrote.
    pub candidate_logs: Vec<String>,
    /// The outbound requests it made, answered by the stub, none sent.
    pub requests: Vec<RecordedRequest>,
    /// Unix ms.
    pub created_at: i64,
}

impl ShadowRun {
    /// Did the candidate's outcome differ from the live call's?
    pub fn differs(&self) -> bool {
        self.live_error != self.candidate_error
    }
}

/// Shadow runs kept per plugin (the newest), past the retention purge's age.
pub const SHADOW_RUNS_KEPT: usize = 10_000;

/// How many deliveries stand in each status, and since when the oldest due
/// one has been due, for the metrics.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    pub by_status: Vec<(Status, u64)>,
    /// `next_attempt_at` of the oldest delivery due now (Unix ms).
    pub oldest_due: Option<i64>,
}

impl StoreStats {
    pub fn count(&self, status: Status) -> u64 {
        self.by_status
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }
}

/// How long a store's commits take and how many writes each carries: the
/// store observes them, the metrics register them.
#[derive(Debug, Clone)]
pub struct CommitMetrics {
    pub seconds: prometheus_client::metrics::histogram::Histogram,
    pub writes: prometheus_client::metrics::histogram::Histogram,
}

impl Default for CommitMetrics {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
        Self {
            // 50 µs to 1.6 s.
            seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            // 1 to 1,024.
            writes: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
        }
    }
}

impl CommitMetrics {
    /// A commit of `writes` writes that began at `started`.
    pub fn observe(&self, started: std::time::Instant, writes: usize) {
        self.seconds.observe(started.elapsed().as_secs_f64());
        self.writes.observe(writes as f64);
    }
}

/// Which deliveries to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub status: Option<Status>,
    pub plugin: Option<String>,
    pub event_type: Option<String>,
    /// One event's deliveries (its key: the envelope's `id`).
    pub event_key: Option<String>,
    /// Created at or after this time (Unix ms).
    pub since: Option<i64>,
    /// Created before this time (Unix ms).
    pub until: Option<i64>,
    /// Ids below this one only: the next page after a listing's last id.
    pub before_id: Option<DeliveryId>,
    pub limit: Option<usize>,
}

/// Why the store could not do what was asked. Callers answer 503 and retry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store busy: {0}")]
    Busy(String),
    /// The database reached its size limit, or the disk is full.
    #[error("store full: {0}")]
    Full(String),
    #[error("store failed: {0}")]
    Failed(String),
    #[error("store closed")]
    Closed,
}

/// A pending durable append; resolves once the event is on disk. A dropped
/// sender means the store is closed.
pub type AppendTicket = tokio::sync::oneshot::Receiver<Result<Appended, StoreError>>;

/// What the host needs from storage.
pub trait Store: KvRead + Send + Sync + std::fmt::Debug + 'static {
    /// Store `event` with one pending delivery per plugin unless its key is
    /// already stored. The ticket resolves after the write is synced to disk;
    /// concurrent appends share one transaction and one sync.
    fn append_if_new(&self, event: Arc<Event>, plugins: Vec<Arc<str>>) -> AppendTicket;

    /// Deliveries due at `now` (unix ms) for these plugins, oldest first,
    /// leaving out never-attempted ones created after `fresh_after`.
    fn due(
        &self,
        now: i64,
        fresh_after: i64,
        plugins: &[Arc<str>],
        limit: usize,
    ) -> Result<Vec<Due>, StoreError>;

    /// Record attempts (batched with other writes; blocks until committed),
    /// saying what became of each, in order. An attempt on a delivery
    /// replayed since it began is not recorded: the delivery stays pending
    /// and runs again.
    fn record(&self, attempts: Vec<Attempt>) -> Result<Vec<RecordedAs>, StoreError>;

    /// Deliveries matching `filter`, newest first.
    fn deliveries(&self, filter: &Filter) -> Result<Vec<DeliveryRecord>, StoreError>;

    /// One event and its deliveries.
    fn event(&self, key: &str) -> Result<Option<EventRecord>, StoreError>;

    /// Make an event's deliveries (or one plugin's) pending again, due now;
    /// returns how many. Adds a delivery for a named plugin that had none.
    fn replay_event(&self, key: &str, plugin: Option<&str>) -> Result<usize, StoreError>;

    /// Make dead deliveries pending again: these ids, or all when `None`.
    fn replay_dead(&self, ids: Option<&[DeliveryId]>) -> Result<usize, StoreError>;

    /// Delete events all of whose deliveries succeeded and that were received
    /// before `before` (unix ms); returns how many. Shadow runs made before
    /// it, and past the newest [`SHADOW_RUNS_KEPT`] of a plugin, go too.
    fn purge_succeeded(&self, before: i64) -> Result<usize, StoreError>;

    /// Delete key-value entries whose TTL ran out by `now` (unix ms);
    /// returns how many. Reads already ignore them; a plugin's quota counts
    /// them until they are deleted (here, or when it next writes).
    fn purge_expired_kv(&self, now: i64) -> Result<usize, StoreError>;

    /// Record shadow runs. [`Store::purge_succeeded`] deletes those older
    /// than it is given and those past the newest [`SHADOW_RUNS_KEPT`] of
    /// each plugin.
    fn record_shadow(&self, runs: Vec<ShadowRun>) -> Result<(), StoreError>;

    /// A plugin's shadow runs, newest first.
    fn shadow_runs(&self, plugin: &str, limit: usize) -> Result<Vec<ShadowRun>, StoreError>;

    /// Replace the saved plugin status table with `rows`.
    fn save_plugins(&self, rows: Vec<PluginStatus>) -> Result<(), StoreError>;

    /// The plugin status table as last saved, by name.
    fn plugins(&self) -> Result<Vec<PluginStatus>, StoreError>;

    /// Deliveries waiting for their first attempt (or replayed): the backlog.
    fn outstanding(&self) -> Result<usize, StoreError>;

    /// Deliveries by status and the oldest due at `now`, for the metrics.
    fn stats(&self, now: i64) -> Result<StoreStats, StoreError>;

    /// The histograms this store's commits are observed in.
    fn commit_metrics(&self) -> CommitMetrics;

    /// The most attempts one [`Store::record`] call should carry: one
    /// transaction's worth.
    fn record_batch(&self) -> usize {
        1024
    }

    /// Give up this host's hold on deliveries it will not run now (its
    /// queue was full), so another host may: they are pending all the same.
    /// Does not wait. A store with one host holds nothing.
    fn release(&self, _ids: Vec<DeliveryId>) {}

    /// At shutdown: give up the hold on every delivery this host has not
    /// finished, so other hosts (or this one's next start) run them now,
    /// not once the lease ends. Waits for it.
    fn release_held(&self) {}

    /// A signal each time deliveries may have become due elsewhere (another
    /// host released or replayed some): the poller looks at once rather than
    /// at its next interval. `None`: nothing but this host changes the store.
    fn wakeups(&self) -> Option<std::sync::mpsc::Receiver<()>> {
        None
    }

    /// Names of the store's own threads that have ended while it is open
    /// (a store that needs none has none to lose).
    fn threads_gone(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
