//! The PostgreSQL store: several hosts, one database (`--store
//! postgres://…`).
//!
//! - Idempotency is the `events` primary key, across hosts; appends are
//!   group-committed and acknowledged after the commit.
//! - Work is claimed, not assigned: a host holds the deliveries it appended
//!   or claimed (`FOR UPDATE SKIP LOCKED`) under a lease, which it renews
//!   while it lives; recording or replaying releases them, and a dead
//!   host's lease, expired, lets another host claim them. `LISTEN/NOTIFY` wakes every host when deliveries are released or
//!   replayed.
//! - One plugin's kv commits take turns across hosts (an advisory lock).
//! - The schema is migrated at start under an advisory lock; a newer one is
//!   refused. A connection lost is a busy store (503) until it comes back.
//!
//! One thread owns a single-threaded tokio runtime and three connections:
//! one for transactions (group-committed appends, claims, recorded
//! attempts), one for reads, one listening. The store's blocking methods spawn their work onto that runtime and
//! wait for the answer, so they may be called from any thread, in a runtime
//! or not, as [`super::SqliteStore`]'s are.

mod link;

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;

pub use self::link::{DEFAULT_LEASE, DEFAULT_POOL_SIZE, DEFAULT_STATEMENT_TIMEOUT, PgOptions};
use self::link::{Link, LinkGuard, Pool};

use super::{
    AppendTicket, Appended, Attempt, CommitMetrics, DeliveryId, DeliveryRecord, Due, EventRecord,
    Filter, RecordedAs, ShadowRun, Status, Store, StoreError, StoreStats, Unreadable, now_ms,
};
use crate::event::Event;
use crate::runtime::FailureKind;
use crate::runtime::kv::{KvOp, KvRead, parse_integer};
use crate::status::{PluginState, PluginStatus};
use crate::trace::TraceParent;

/// The schema version this build reads and writes (`hooks_schema.version`).
pub const PG_SCHEMA_VERSION: i32 = 3;

/// This host's claim on the deliveries it runs.
#[derive(Debug, Clone)]
struct Claim {
    /// Names this process: random per start.
    host: String,
    lease_ms: i64,
}

impl Claim {
    fn new(lease: std::time::Duration) -> Self {
        Self {
            host: format!("{:016x}", rand::random::<u64>()),
            lease_ms: lease.as_millis() as i64,
        }
    }
}

/// How soon a delivery whose kv writes no longer applied runs again.
const KV_CONFLICT_RETRY_MS: i64 = 100;

/// Any number the hosts sharing a database agree on: the advisory lock that
/// serialises their migrations at start.
const MIGRATION_LOCK: i64 = 0x5354_4154_4553_4554; // "STATESET"

/// Each schema version's migration from the one before: `MIGRATIONS[0]`
/// makes version 1. A database at [`PG_SCHEMA_VERSION`] runs none, so a
/// host starting beside busy ones takes no table locks.
const MIGRATIONS: [&str; PG_SCHEMA_VERSION as usize] = [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3];

/// Version 2: each delivery's last log lines (a JSON array of strings) and
/// each event's W3C trace context.
const SCHEMA_V2: &str = "
ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS last_logs TEXT;
ALTER TABLE events ADD COLUMN IF NOT EXISTS traceparent TEXT;
";

/// Version 3: each delivery's last call's fuel and time (microseconds),
/// shadow runs, and each plugin's shadow status.
const SCHEMA_V3: &str = "
ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS last_fuel BIGINT;
ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS last_duration_us BIGINT;
ALTER TABLE plugins ADD COLUMN IF NOT EXISTS shadow TEXT;
CREATE TABLE IF NOT EXISTS shadow_runs (
    id                    BIGSERIAL PRIMARY KEY,
    plugin                TEXT NOT NULL,
    event_key             TEXT NOT NULL,
    event_type            TEXT NOT NULL,
    live_version          TEXT NOT NULL,
    candidate_version     TEXT NOT NULL,
    live_error            TEXT,
    candidate_error       TEXT,
    live_fuel             BIGINT NOT NULL,
    live_duration_us      BIGINT NOT NULL,
    candidate_fuel        BIGINT NOT NULL,
    candidate_duration_us BIGINT NOT NULL,
    candidate_logs        TEXT NOT NULL,
    requests              TEXT NOT NULL,
    created_at            BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS shadow_runs_plugin ON shadow_runs (plugin, id);
";

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS events (
    key         TEXT PRIMARY KEY,
    event_type  TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    body        BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id                   BIGSERIAL PRIMARY KEY,
    event_key            TEXT NOT NULL REFERENCES events (key) ON DELETE CASCADE,
    plugin               TEXT NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'dead')),
    attempts             INTEGER NOT NULL DEFAULT 0,
    next_attempt_at      BIGINT NOT NULL,
    last_failure_kind    TEXT,
    last_failure_message TEXT,
    plugin_version       TEXT,
    created_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL,
    replays              BIGINT NOT NULL DEFAULT 0,
    claimed_by           TEXT,
    lease_until          BIGINT,
    UNIQUE (event_key, plugin)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_attempt_at)
    WHERE status IN ('pending', 'failed');
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);
CREATE TABLE IF NOT EXISTS plugins (
    name          TEXT PRIMARY KEY,
    version       TEXT,
    state         TEXT NOT NULL CHECK (state IN ('active', 'quarantined', 'loading', 'failed')),
    reason        TEXT,
    subscriptions TEXT NOT NULL,
    limits        TEXT NOT NULL,
    counters      TEXT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS plugin_kv (
    plugin     TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      BYTEA NOT NULL,
    expires_at BIGINT,
    PRIMARY KEY (plugin, key)
);
CREATE INDEX IF NOT EXISTS plugin_kv_expiry ON plugin_kv (plugin, expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS plugin_kv_usage (
    plugin TEXT PRIMARY KEY,
    bytes  BIGINT NOT NULL
);
CREATE OR REPLACE FUNCTION plugin_kv_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE plugin_kv_usage SET bytes = bytes - octet_length(OLD.key) - length(OLD.value)
            WHERE plugin = OLD.plugin;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO plugin_kv_usage (plugin, bytes)
            VALUES (NEW.plugin, octet_length(NEW.key) + length(NEW.value))
            ON CONFLICT (plugin) DO UPDATE SET bytes = plugin_kv_usage.bytes + EXCLUDED.bytes;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER plugin_kv_counted AFTER INSERT OR UPDATE OR DELETE ON plugin_kv
    FOR EACH ROW EXECUTE FUNCTION plugin_kv_count();
-- One call's kv writes, applied in one round trip: NULL when they applied,
-- else why not ({integer|overflow|changed, key} or {quota, bytes}) and
-- none of them kept. One plugin's writes take turns across every host (an
-- advisory lock), so what is read here (an increment's value, a
-- compare-and-swap's check, the usage) is still true when the write lands.
CREATE OR REPLACE FUNCTION hooks_apply_kv(p_plugin TEXT, p_now BIGINT, p_quota BIGINT, p_ops JSONB)
RETURNS TEXT[] LANGUAGE plpgsql AS $$
DECLARE
    op JSONB;
    k TEXT;
    cur BYTEA;
    txt TEXT;
    n NUMERIC;
    used_before BIGINT;
    used_after BIGINT;
    why TEXT;
    what TEXT;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('kv:' || p_plugin, 0));
    DELETE FROM plugin_kv WHERE plugin = p_plugin AND expires_at IS NOT NULL AND expires_at <= p_now;
    used_before := COALESCE((SELECT bytes FROM plugin_kv_usage WHERE plugin = p_plugin), 0);
    BEGIN
        FOR op IN SELECT value FROM jsonb_array_elements(p_ops) LOOP
            k := op->>'key';
            CASE op->>'op'
            WHEN 'set' THEN
                INSERT INTO plugin_kv (plugin, key, value, expires_at)
                    VALUES (p_plugin, k, decode(op->>'value', 'hex'), (op->>'expires_at')::BIGINT)
                    ON CONFLICT (plugin, key) DO UPDATE
                    SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at;
            WHEN 'delete' THEN
                DELETE FROM plugin_kv WHERE plugin = p_plugin AND key = k;
            WHEN 'increment' THEN
                cur := (SELECT value FROM plugin_kv WHERE plugin = p_plugin AND key = k);
                n := 0;
                IF cur IS NOT NULL THEN
                    BEGIN
                        txt := convert_from(cur, 'UTF8');
                    EXCEPTION WHEN OTHERS THEN
                        txt := '';
                    END;
                    IF txt !~ '^[+-]?[0-9]+$' OR txt::NUMERIC NOT BETWEEN -9223372036854775808 AND 9223372036854775807 THEN
                        RAISE SQLSTATE 'HK001' USING MESSAGE = 'integer', DETAIL = k;
                    END IF;
                    n := txt::NUMERIC;
                END IF;
                n := n + (op->>'delta')::NUMERIC;
                IF n NOT BETWEEN -9223372036854775808 AND 9223372036854775807 THEN
                    RAISE SQLSTATE 'HK001' USING MESSAGE = 'overflow', DETAIL = k;
                END IF;
                INSERT INTO plugin_kv (plugin, key, value)
                    VALUES (p_plugin, k, convert_to(n::BIGINT::TEXT, 'UTF8'))
                    ON CONFLICT (plugin, key) DO UPDATE SET value = EXCLUDED.value;
            WHEN 'compare-and-swap' THEN
                cur := (SELECT value FROM plugin_kv WHERE plugin = p_plugin AND key = k);
                IF cur IS DISTINCT FROM decode(op->>'expected', 'hex') THEN
                    RAISE SQLSTATE 'HK001' USING MESSAGE = 'changed', DETAIL = k;
                END IF;
                INSERT INTO plugin_kv (plugin, key, value, expires_at)
                    VALUES (p_plugin, k, decode(op->>'new', 'hex'), NULL)
                    ON CONFLICT (plugin, key) DO UPDATE SET value = EXCLUDED.value, expires_at = NULL;
            END CASE;
        END LOOP;
        used_after := COALESCE((SELECT bytes FROM plugin_kv_usage WHERE plugin = p_plugin), 0);
        IF used_after > used_before AND used_after > p_quota THEN
            RAISE SQLSTATE 'HK001' USING MESSAGE = 'quota', DETAIL = used_after::TEXT;
        END IF;
    EXCEPTION WHEN SQLSTATE 'HK001' THEN
        GET STACKED DIAGNOSTICS why = MESSAGE_TEXT, what = PG_EXCEPTION_DETAIL;
        RETURN ARRAY[why, what];
    END;
    RETURN NULL;
END $$;
";

/// An append waiting for the next group commit.
struct Append {
    event: Arc<Event>,
    plugins: Vec<Arc<str>>,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// The PostgreSQL store.
pub struct PgStore {
    handle: tokio::runtime::Handle,
    claim: Claim,
    /// Claims, recorded attempts, reads (appends have their own link).
    pool: Arc<Pool>,
    appends: Option<mpsc::UnboundedSender<Append>>,
    /// Deliveries to release, gathered into one statement by [`releaser`].
    releases: mpsc::UnboundedSender<Vec<DeliveryId>>,
    thread: Option<JoinHandle<()>>,
    /// Signals from `LISTEN hooks_due`, until the poller takes them.
    wakeups: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    commits: CommitMetrics,
}

/// The channel every host listens on: deliveries became due (released,
/// replayed).
const DUE_CHANNEL: &str = "hooks_due";

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connect as `options` say, migrate the schema under the advisory
    /// lock, and start the store's thread.
    pub fn open(options: PgOptions) -> Result<Self, StoreError> {
        Self::start(options, false)
    }

    /// [`PgStore::open`] for looking only (`run`'s kv state): every
    /// transaction read-only, no migration, one connection for reads.
    pub fn open_read_only(mut options: PgOptions) -> Result<Self, StoreError> {
        options.read_only = true;
        options.pool_size = 1;
        Self::start(options, true)
    }

    /// Connect and migrate on the store's own thread and runtime (so this
    /// may be called from inside another runtime), then leave the thread
    /// committing appends.
    fn start(options: PgOptions, read_only: bool) -> Result<Self, StoreError> {
        let claim = Claim::new(options.lease);
        let (wake, wakeups) = std::sync::mpsc::channel();
        let (appends, queue) = mpsc::unbounded_channel();
        let (releases, to_release) = mpsc::unbounded_channel();
        let releasing = claim.host.clone();
        let (ready, started) = std::sync::mpsc::channel();
        let committer = claim.clone();
        let commits = CommitMetrics::default();
        let observed = commits.clone();
        let thread = std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        return drop(ready.send(Err(StoreError::Failed(error.to_string()))));
                    }
                };
                let options = Arc::new(options);
                let opened = runtime.block_on(async {
                    let appender = Link::open(&options).await?;
                    if read_only {
                        check_version(&*appender.lock().await?).await?;
                    } else {
                        migrate(&mut *appender.lock().await?).await?;
                        link::listen(options.clone(), DUE_CHANNEL, wake).await?;
                    }
                    // Leases are renewed on a connection of their own: never
                    // queued behind this host's claims and records, however
                    // busy, so only a dead or cut-off host lets them lapse.
                    let renewal = match read_only {
                        true => None,
                        false => Some(Link::open(&options).await?),
                    };
                    let pool = Pool::open(&options).await?;
                    Ok::<_, StoreError>((Arc::new(appender), renewal, Arc::new(pool)))
                });
                match opened {
                    Ok((appender, renewal, pool)) => {
                        runtime.spawn(releaser(pool.clone(), releasing, to_release));
                        if let Some(renewal) = renewal {
                            runtime.spawn(renewer(renewal, committer.clone()));
                        }
                        let _ = ready.send(Ok((runtime.handle().clone(), pool)));
                        runtime.block_on(group_commit(appender, queue, committer, observed));
                    }
                    Err(error) => drop(ready.send(Err(error))),
                }
            })
            .map_err(|e| StoreError::Failed(e.to_string()))?;
        let (handle, pool) = match started.recv() {
            Ok(Ok(opened)) => opened,
            Ok(Err(error)) => {
                let _ = thread.join();
                return Err(error);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(StoreError::Closed);
            }
        };
        Ok(Self {
            handle,
            claim,
            pool,
            appends: Some(appends),
            releases,
            thread: Some(thread),
            wakeups: std::sync::Mutex::new(Some(wakeups)),
            commits,
        })
    }

    /// Run `work` on the store's thread and wait for it: callable from any
    /// thread, in a tokio runtime or not.
    fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (reply, answer) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = reply.send(work.await);
        });
        answer.recv().map_err(|_| StoreError::Closed)?
    }

    /// Run `work` with a connection of the pool.
    fn with_connection<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(LinkGuard) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, tokio_postgres::Error>> + Send,
    {
        let link = self.pool.get();
        self.run(async move { work(link.lock().await?).await.map_err(classify) })
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.appends.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

const DELIVERY_COLUMNS: &str = "d.id, d.event_key, e.event_type, d.plugin, d.status, d.attempts,
     d.last_failure_kind, d.last_failure_message, d.plugin_version, d.next_attempt_at,
     d.created_at, d.updated_at, d.last_logs, d.last_fuel, d.last_duration_us";

fn delivery_row(row: &tokio_postgres::Row) -> Result<DeliveryRecord, StoreError> {
    let status: String = row.get(4);
    let kind: Option<String> = row.get(6);
    Ok(DeliveryRecord {
        id: row.get(0),
        event_key: row.get(1),
        event_type: row.get(2),
        plugin: row.get(3),
        status: Status::parse(&status).ok_or_else(|| unreadable("deliveries.status", &status))?,
        attempts: row.get::<_, i32>(5) as u32,
        last_failure_kind: match kind {
            Some(kind) => Some(
                FailureKind::parse(&kind)
                    .ok_or_else(|| unreadable("deliveries.last_failure_kind", &kind))?,
            ),
            None => None,
        },
        last_failure_message: row.get(7),
        plugin_version: row.get(8),
        next_attempt_at: row.get(9),
        created_at: row.get(10),
        updated_at: row.get(11),
        last_logs: super::logs_from_json(row.get::<_, Option<&str>>(12)),
        last_cost: super::Cost::from_columns(row.get(13), row.get(14)),
    })
}

fn unreadable(column: &str, value: &str) -> StoreError {
    StoreError::Failed(format!("{column} holds an unknown value {value:?}"))
}

fn json<T: serde::de::DeserializeOwned>(text: String) -> Result<T, StoreError> {
    serde_json::from_str(&text).map_err(|e| StoreError::Failed(format!("stored JSON: {e}")))
}

/// A due delivery; a stored body that does not parse is an [`Unreadable`]
/// event, recorded as a host error, not an error that stops the others.
fn due_row(row: &tokio_postgres::Row) -> Due {
    let key: String = row.get(3);
    let body: &[u8] = row.get(4);
    let trace = row
        .get::<_, Option<&str>>(7)
        .and_then(|t| TraceParent::parse(t.as_bytes()));
    // Under the key it was stored by (a Standard message's is not its body's).
    let event = Event::parse(body)
        .map(|e| Arc::new(e.with_trace(trace).with_key(key.clone())))
        .map_err(|e| Unreadable {
            key,
            reason: format!("the stored event is not deliverable: {e}"),
        });
    Due {
        id: row.get(0),
        plugin: row.get::<_, String>(1).into(),
        attempts: row.get::<_, i32>(2) as u32,
        replays: row.get(5),
        received_at: row.get(6),
        event,
    }
}

async fn schema_version(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<i32>, StoreError> {
    Ok(client
        .query_opt("SELECT version FROM hooks_schema", &[])
        .await
        .map_err(classify)?
        .map(|row| row.get(0)))
}

fn newer(version: i32) -> StoreError {
    StoreError::Failed(format!(
        "the database has schema version {version}, newer than version {PG_SCHEMA_VERSION} \
         that this build of stateset-hooks knows: run a newer stateset-hooks on it"
    ))
}

/// For a store opened read-only: the schema must be there and known.
async fn check_version(client: &Client) -> Result<(), StoreError> {
    match schema_version(client).await {
        Ok(Some(v)) if v > PG_SCHEMA_VERSION => Err(newer(v)),
        Ok(Some(_)) => Ok(()),
        Ok(None) | Err(_) => Err(StoreError::Failed(
            "the database has no stateset-hooks schema: run `serve --store` on it first".into(),
        )),
    }
}

/// Bring the schema to [`PG_SCHEMA_VERSION`] under the advisory lock, so
/// hosts starting together do not race; refuse a newer one.
async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(classify)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(classify)?;
    // "already exists, skipping" at a first start is noise.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS hooks_schema (version INTEGER NOT NULL)",
    )
    .await
    .map_err(classify)?;
    let version = schema_version(&tx).await?;
    let from = match version {
        Some(v) if v > PG_SCHEMA_VERSION => return Err(newer(v)),
        Some(v) if v == PG_SCHEMA_VERSION => return tx.commit().await.map_err(classify),
        Some(v) => v,
        None => 0,
    };
    for migration in &MIGRATIONS[from as usize..] {
        tx.batch_execute(migration).await.map_err(classify)?;
    }
    tx.batch_execute("DELETE FROM hooks_schema")
        .await
        .map_err(classify)?;
    tx.execute(
        "INSERT INTO hooks_schema (version) VALUES ($1)",
        &[&PG_SCHEMA_VERSION],
    )
    .await
    .map_err(classify)?;
    tracing::info!(from, to = PG_SCHEMA_VERSION, "PostgreSQL schema migrated");
    tx.commit().await.map_err(classify)
}

/// The store's thread: take the appends queued, commit them together in
/// one transaction (group commit), answer everyone. Ends when the store is
/// dropped.
async fn group_commit(
    link: Arc<Link>,
    mut queue: mpsc::UnboundedReceiver<Append>,
    claim: Claim,
    commits: CommitMetrics,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = queue.try_recv() {
            batch.push(more);
        }
        let started = std::time::Instant::now();
        let results = match link.lock().await {
            Ok(mut client) => append_batch(&mut client, &batch, &claim).await,
            Err(error) => vec![Err(error); batch.len()],
        };
        commits.observe(started, batch.len());
        for (append, result) in batch.into_iter().zip(results) {
            let _ = append.reply.send(result);
        }
    }
}

/// The batch in one transaction and two statements (the events, then the
/// new ones' deliveries). Should that fail, each append again in a
/// savepoint of its own, so that one bad event fails alone and only its
/// sender is told.
async fn append_batch(
    client: &mut Client,
    batch: &[Append],
    claim: &Claim,
) -> Vec<Result<Appended, StoreError>> {
    match append_together(client, batch, claim).await {
        Ok(results) => results,
        Err(error) => {
            tracing::debug!(error = %classify(error), "appending one by one");
            append_each(client, batch, claim).await
        }
    }
}

async fn append_together(
    client: &mut Client,
    batch: &[Append],
    claim: &Claim,
) -> Result<Vec<Result<Appended, StoreError>>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let now = now_ms();
    // In key order, so that two hosts' batches lock the same keys in the
    // same order (no deadlock).
    let mut events: Vec<&Event> = batch.iter().map(|a| &*a.event).collect();
    events.sort_by_key(|e| e.key());
    let keys: Vec<&str> = events.iter().map(|e| e.key()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type()).collect();
    let bodies: Vec<&[u8]> = events.iter().map(|e| e.payload().as_bytes()).collect();
    let traces: Vec<Option<String>> = events
        .iter()
        .map(|e| e.trace().map(ToString::to_string))
        .collect();
    let mut fresh: std::collections::HashSet<String> = tx
        .query(
            "INSERT INTO events (key, event_type, received_at, body, traceparent)
             SELECT k, t, $3, b, p
             FROM unnest($1::TEXT[], $2::TEXT[], $4::BYTEA[], $5::TEXT[]) AS e (k, t, b, p)
             ON CONFLICT (key) DO NOTHING RETURNING key",
            &[&keys, &types, &now, &bodies, &traces],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    // The first append of a key just stored is new; the others (sent twice
    // at once) are duplicates.
    let new: Vec<bool> = batch.iter().map(|a| fresh.remove(a.event.key())).collect();
    let (mut owners, mut plugins) = (Vec::new(), Vec::new());
    for (append, _) in batch.iter().zip(&new).filter(|(_, new)| **new) {
        for plugin in &append.plugins {
            owners.push(append.event.key());
            plugins.push(&**plugin);
        }
    }
    // The appending host runs them first (the dispatcher's fast path): they
    // are this host's until recorded or the lease ends.
    let ids: std::collections::HashMap<(String, String), DeliveryId> = tx
        .query(
            "INSERT INTO deliveries (event_key, plugin, status, attempts, next_attempt_at,
                 created_at, updated_at, claimed_by, lease_until)
             SELECT k, p, 'pending', 0, $3, $3, $3, $4, $5
             FROM unnest($1::TEXT[], $2::TEXT[]) AS d (k, p)
             RETURNING event_key, plugin, id",
            &[
                &owners,
                &plugins,
                &now,
                &claim.host,
                &(now + claim.lease_ms),
            ],
        )
        .await?
        .iter()
        .map(|row| ((row.get(0), row.get(1)), row.get(2)))
        .collect();
    tx.commit().await?;
    Ok(batch
        .iter()
        .zip(new)
        .map(|(append, new)| {
            if !new {
                return Ok(Appended::Duplicate);
            }
            let key = append.event.key().to_owned();
            Ok(Appended::New(
                append
                    .plugins
                    .iter()
                    .map(|plugin| ids[&(key.clone(), plugin.to_string())])
                    .collect(),
            ))
        })
        .collect())
}

/// Each append in a savepoint of its own: one that fails is rolled back
/// alone and only its caller is told.
async fn append_each(
    client: &mut Client,
    batch: &[Append],
    claim: &Claim,
) -> Vec<Result<Appended, StoreError>> {
    let failed_all = |error: StoreError| vec![Err(error); batch.len()];
    let mut tx = match client.transaction().await {
        Ok(tx) => tx,
        Err(error) => return failed_all(classify(error)),
    };
    let now = now_ms();
    let mut results = Vec::with_capacity(batch.len());
    for Append { event, plugins, .. } in batch {
        let savepoint = match tx.savepoint("append").await {
            Ok(savepoint) => savepoint,
            Err(error) => return failed_all(classify(error)),
        };
        let appended = append(&savepoint, event, plugins, now, claim).await;
        results.push(match appended {
            Ok(appended) => savepoint
                .commit()
                .await
                .map(|()| appended)
                .map_err(classify),
            Err(error) => Err(classify(error)),
        });
    }
    match tx.commit().await {
        Ok(()) => results,
        Err(error) => failed_all(classify(error)),
    }
}

async fn append(
    tx: &tokio_postgres::Transaction<'_>,
    event: &Event,
    plugins: &[Arc<str>],
    now: i64,
    claim: &Claim,
) -> Result<Appended, tokio_postgres::Error> {
    let inserted = tx
        .execute(
            "INSERT INTO events (key, event_type, received_at, body, traceparent)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (key) DO NOTHING",
            &[
                &event.key(),
                &event.event_type(),
                &now,
                &event.payload().as_bytes(),
                &event.trace().map(ToString::to_string),
            ],
        )
        .await?;
    if inserted == 0 {
        return Ok(Appended::Duplicate);
    }
    let mut ids = Vec::with_capacity(plugins.len());
    for plugin in plugins {
        let row = tx
            .query_one(
                // The appending host runs it first (the dispatcher's fast
                // path): it is this host's until recorded or the lease ends.
                "INSERT INTO deliveries (event_key, plugin, status, attempts, next_attempt_at,
                     created_at, updated_at, claimed_by, lease_until)
                 VALUES ($1, $2, 'pending', 0, $3, $3, $3, $4, $5) RETURNING id",
                &[
                    &event.key(),
                    &&**plugin,
                    &now,
                    &claim.host,
                    &(now + claim.lease_ms),
                ],
            )
            .await?;
        ids.push(row.get(0));
    }
    Ok(Appended::New(ids))
}

/// Releases as they come, gathered: whatever queued meanwhile is one
/// statement and one notification (a host past its queue's capacity
/// releases on every request).
async fn releaser(
    pool: Arc<Pool>,
    host: String,
    mut releases: mpsc::UnboundedReceiver<Vec<DeliveryId>>,
) {
    while let Some(mut ids) = releases.recv().await {
        while let Ok(more) = releases.try_recv() {
            ids.extend(more);
        }
        let n = ids.len();
        if let Err(error) = release_claims(pool.get(), host.clone(), Some(ids)).await {
            // Held until the lease ends: then any host takes them.
            tracing::warn!(%error, deliveries = n, "could not release deliveries");
        }
    }
}

/// Keeps this host's leases alive, every third of a lease, on a connection
/// of its own: a delivery waits in a busy host's queue as long as it must
/// without another host running it too. Only a host that died (or lost the
/// store for a whole lease) lets its deliveries go.
async fn renewer(link: Link, claim: Claim) {
    let every = std::time::Duration::from_millis((claim.lease_ms / 3).max(1) as u64);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let renewed = async {
            let client = link.lock().await?;
            client
                .execute(
                    // Rows locked now are being recorded or claimed:
                    // skipped, never waited on (no deadlock with a batch).
                    "UPDATE deliveries SET lease_until = $1
                     WHERE id IN (
                         SELECT id FROM deliveries
                         WHERE status IN ('pending', 'failed') AND claimed_by = $2
                         FOR UPDATE SKIP LOCKED)",
                    &[&(now_ms() + claim.lease_ms), &claim.host],
                )
                .await
                .map_err(classify)
        };
        if let Err(error) = renewed.await {
            tracing::warn!(%error, "could not renew the leases this host holds");
        }
    }
}

/// Give up this host's hold on `ids` (all it holds when `None`) and wake
/// every host's poller.
async fn release_claims(
    link: Arc<Link>,
    host: String,
    ids: Option<Vec<DeliveryId>>,
) -> Result<u64, StoreError> {
    let client = link.lock().await?;
    let released = client
        .execute(
            "UPDATE deliveries SET claimed_by = NULL, lease_until = NULL
             WHERE claimed_by = $2 AND ($1::BIGINT[] IS NULL OR id = ANY($1))",
            &[&ids, &host],
        )
        .await
        .map_err(classify)?;
    client
        .execute("SELECT pg_notify($1, '')", &[&DUE_CHANNEL])
        .await
        .map_err(classify)?;
    Ok(released)
}

/// One call's kv writes as `hooks_apply_kv` takes them: a JSON array,
/// bytes in hex.
fn kv_ops_json(ops: &[KvOp]) -> String {
    use serde_json::json;
    let ops: Vec<_> = ops
        .iter()
        .map(|op| match op {
            KvOp::Set {
                key,
                value,
                expires_at,
            } => json!({ "op": "set", "key": key, "value": hex::encode(value), "expires_at": expires_at }),
            KvOp::Delete { key } => json!({ "op": "delete", "key": key }),
            KvOp::Increment { key, delta } => {
                json!({ "op": "increment", "key": key, "delta": delta.to_string() })
            }
            KvOp::CompareAndSwap { key, expected, new } => json!({
                "op": "compare-and-swap",
                "key": key,
                "expected": expected.as_ref().map(hex::encode),
                "new": hex::encode(new),
            }),
        })
        .collect();
    serde_json::Value::from(ops).to_string()
}

/// Why `hooks_apply_kv` kept none of a call's writes, as the SQLite store
/// words it.
fn kv_refusal(why: &[String], quota: i64) -> String {
    match why {
        [kind, key] if kind == "integer" => {
            format!("kv conflict: {}", parse_integer(key, b"").unwrap_err())
        }
        [kind, key] if kind == "overflow" => format!("kv conflict: key {key:?} would overflow"),
        [kind, key] if kind == "changed" => {
            format!("kv conflict: key {key:?} changed since the call read it")
        }
        [kind, bytes] if kind == "quota" => format!(
            "kv quota: this delivery's writes would take the plugin to {bytes} bytes, \
             past its quota of {quota}"
        ),
        other => format!("kv writes refused: {other:?}"),
    }
}

/// Attempts per recording transaction: a plugin's hot kv rows (a counter
/// every event bumps) get a new row version per write, and a transaction
/// that writes one a thousand times slows down with each.
const RECORD_BATCH: usize = 64;

impl Store for PgStore {
    fn record_batch(&self) -> usize {
        RECORD_BATCH
    }

    /// Store `event` with one pending delivery per plugin unless its key is
    /// already stored; resolves after the commit.
    fn append_if_new(&self, event: Arc<Event>, plugins: Vec<Arc<str>>) -> AppendTicket {
        let (reply, ticket) = oneshot::channel();
        if let Some(appends) = &self.appends {
            let _ = appends.send(Append {
                event,
                plugins,
                reply,
            });
        }
        ticket
    }

    /// Claims the deliveries due at `now` for these plugins, oldest first:
    /// those no other host holds under a live lease (leaving out
    /// never-attempted ones created after `fresh_after`), now this host's
    /// for the lease.
    fn due(
        &self,
        now: i64,
        fresh_after: i64,
        plugins: &[Arc<str>],
        limit: usize,
    ) -> Result<Vec<Due>, StoreError> {
        if plugins.is_empty() {
            return Ok(Vec::new());
        }
        let link = self.pool.get();
        let claim = self.claim.clone();
        let plugins: Vec<String> = plugins.iter().map(|p| p.to_string()).collect();
        let limit = limit as i64;
        self.run(async move {
            // Claimed, not assigned: rows another host holds under a live
            // lease, or is claiming this instant, are skipped.
            let rows = link
                .lock()
                .await?
                .query(
                    "WITH claimed AS (
                         UPDATE deliveries SET claimed_by = $5, lease_until = $1 + $6
                         WHERE id IN (
                             SELECT id FROM deliveries
                             WHERE status IN ('pending', 'failed') AND next_attempt_at <= $1
                               AND (attempts > 0 OR updated_at <= $2) AND plugin = ANY($3)
                               AND (lease_until IS NULL OR lease_until <= $1 OR claimed_by = $5)
                             -- Those nobody holds first: this host's own
                             -- are mostly in its queue already.
                             ORDER BY claimed_by IS NOT NULL, next_attempt_at, id LIMIT $4
                             FOR UPDATE SKIP LOCKED)
                         RETURNING id, plugin, attempts, event_key, replays, next_attempt_at)
                     SELECT c.id, c.plugin, c.attempts, c.event_key, e.body, c.replays,
                         e.received_at, e.traceparent
                     FROM claimed c JOIN events e ON e.key = c.event_key
                     ORDER BY c.next_attempt_at, c.id",
                    &[
                        &now,
                        &fresh_after,
                        &plugins,
                        &limit,
                        &claim.host,
                        &claim.lease_ms,
                    ],
                )
                .await
                .map_err(classify)?;
            Ok(rows.iter().map(due_row).collect())
        })
    }

    /// Record attempts in one transaction, saying what became of each.
    fn record(&self, attempts: Vec<Attempt>) -> Result<Vec<RecordedAs>, StoreError> {
        let (link, host) = (self.pool.get(), self.claim.host.clone());
        self.run(async move {
            let mut client = link.lock().await?;
            let tx = client.transaction().await.map_err(classify)?;
            // Prepared once for the batch: one round trip per statement run.
            let update = tx
                .prepare(
                    "UPDATE deliveries SET status = $2, attempts = attempts + 1,
                         next_attempt_at = $3, last_failure_kind = $4,
                         last_failure_message = $5, plugin_version = $6, updated_at = $7,
                         claimed_by = NULL, lease_until = NULL, last_logs = $10,
                         last_fuel = $11, last_duration_us = $12
                     WHERE id = $1 AND replays = $8 AND claimed_by = $9",
                )
                .await
                .map_err(classify)?;
            let apply_kv = tx
                .prepare("SELECT hooks_apply_kv($1, $2, $3, $4::TEXT::JSONB)")
                .await
                .map_err(classify)?;
            // Every plugin's kv lock at once, in name order: two hosts
            // recording for the same plugins never wait on each other in a
            // circle.
            let mut writers: Vec<&str> = attempts
                .iter()
                .filter(|a| a.status == Status::Succeeded && !a.kv.is_empty())
                .map(|a| &*a.plugin)
                .collect();
            writers.sort_unstable();
            writers.dedup();
            for plugin in writers {
                tx.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended('kv:' || $1, 0))",
                    &[&plugin],
                )
                .await
                .map_err(classify)?;
            }
            let now = now_ms();
            let mut made = Vec::with_capacity(attempts.len());
            for a in &attempts {
                // PostgreSQL text cannot hold NUL; a plugin's message can.
                let (kind, message) = match &a.failure {
                    Some((kind, message)) => (Some(kind.as_str()), Some(message.replace('\0', "\u{FFFD}"))),
                    None => (None, None),
                };
                let updated = tx
                    .execute(
                        &update,
                        &[
                            &a.id,
                            &a.status.as_str(),
                            &a.next_attempt_at,
                            &kind,
                            &message,
                            &&*a.plugin_version,
                            &now,
                            &a.replays,
                            &host,
                            // JSON escapes a NUL, which PostgreSQL text cannot hold.
                            &super::logs_json(&a.logs),
                            &super::Cost::columns(a.cost).0,
                            &super::Cost::columns(a.cost).1,
                        ],
                    )
                    .await
                    .map_err(classify)?;
                // Replayed, released or claimed by another host meanwhile
                // (even one that has recorded since): that run is the one
                // that counts, and this one's kv writes are dropped.
                if updated == 0 {
                    made.push(RecordedAs::Superseded);
                    continue;
                }
                if a.status != Status::Succeeded || a.kv.is_empty() {
                    made.push(RecordedAs::Given);
                    continue;
                }
                let quota = i64::try_from(a.kv_quota).unwrap_or(i64::MAX);
                let refused: Option<Vec<String>> = tx
                    .query_one(&apply_kv, &[&&*a.plugin, &now, &quota, &kv_ops_json(&a.kv)])
                    .await
                    .map_err(classify)?
                    .get(0);
                let Some(refused) = refused else {
                    made.push(RecordedAs::Given);
                    continue;
                };
                let conflict = kv_refusal(&refused, quota);
                tracing::warn!(delivery = a.id, plugin = %a.plugin, "{conflict}: the delivery runs again");
                tx.execute(
                    "UPDATE deliveries SET status = 'failed', next_attempt_at = $2,
                         last_failure_kind = 'host-error', last_failure_message = $3,
                         updated_at = $4, claimed_by = NULL, lease_until = NULL
                     WHERE id = $1",
                    &[&a.id, &(now + KV_CONFLICT_RETRY_MS), &conflict, &now],
                )
                .await
                .map_err(classify)?;
                made.push(RecordedAs::Conflict(conflict));
            }
            tx.commit().await.map_err(classify)?;
            Ok(made)
        })
    }

    /// Deliveries matching `filter`, newest first.
    fn deliveries(&self, filter: &Filter) -> Result<Vec<DeliveryRecord>, StoreError> {
        let link = self.pool.get();
        let filter = filter.clone();
        self.run(async move {
            let status = filter.status.map(Status::as_str);
            let limit = filter.limit.map_or(i64::MAX, |n| n as i64);
            let rows = link
                .lock()
                .await?
                .query(
                    &format!(
                        "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.key = d.event_key
                         WHERE ($1::TEXT IS NULL OR d.status = $1) AND ($2::TEXT IS NULL OR d.plugin = $2)
                           AND ($3::TEXT IS NULL OR e.event_type = $3)
                           AND ($5::TEXT IS NULL OR d.event_key = $5)
                           AND ($6::BIGINT IS NULL OR d.created_at >= $6)
                           AND ($7::BIGINT IS NULL OR d.created_at < $7)
                           AND ($8::BIGINT IS NULL OR d.id < $8)
                         ORDER BY d.id DESC LIMIT $4"
                    ),
                    &[
                        &status,
                        &filter.plugin,
                        &filter.event_type,
                        &limit,
                        &filter.event_key,
                        &filter.since,
                        &filter.until,
                        &filter.before_id,
                    ],
                )
                .await
                .map_err(classify)?;
            rows.iter().map(delivery_row).collect()
        })
    }

    /// One event and its deliveries.
    fn event(&self, key: &str) -> Result<Option<EventRecord>, StoreError> {
        let link = self.pool.get();
        let key = key.to_owned();
        self.run(async move {
            let Some(row) = link
                .lock()
                .await?
                .query_opt(
                    "SELECT key, event_type, received_at, body FROM events WHERE key = $1",
                    &[&key],
                )
                .await
                .map_err(classify)?
            else {
                return Ok(None);
            };
            let deliveries = link
                .lock()
                .await?
                .query(
                    &format!(
                        "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.key = d.event_key
                         WHERE d.event_key = $1 ORDER BY d.plugin"
                    ),
                    &[&key],
                )
                .await
                .map_err(classify)?;
            Ok(Some(EventRecord {
                key: row.get(0),
                event_type: row.get(1),
                received_at: row.get(2),
                body: String::from_utf8_lossy(row.get::<_, &[u8]>(3)).into_owned(),
                deliveries: deliveries.iter().map(delivery_row).collect::<Result<_, _>>()?,
            }))
        })
    }

    /// Make an event's deliveries (or one plugin's, added if it had none)
    /// pending again, due now; returns how many.
    fn replay_event(&self, key: &str, plugin: Option<&str>) -> Result<usize, StoreError> {
        let (key, plugin) = (key.to_owned(), plugin.map(str::to_owned));
        self.with_connection(move |mut client| async move {
            let tx = client.transaction().await?;
            let now = now_ms();
            if let Some(plugin) = &plugin {
                tx.execute(
                    "INSERT INTO deliveries (event_key, plugin, status, attempts, next_attempt_at, created_at, updated_at)
                     SELECT key, $2, 'pending', 0, $3, $3, $3 FROM events WHERE key = $1
                     ON CONFLICT (event_key, plugin) DO NOTHING",
                    &[&key, plugin, &now],
                )
                .await?;
            }
            let n = tx
                .execute(
                    "UPDATE deliveries SET status = 'pending', next_attempt_at = $3, updated_at = $3,
                         replays = replays + 1, claimed_by = NULL, lease_until = NULL
                     WHERE event_key = $1 AND ($2::TEXT IS NULL OR plugin = $2)",
                    &[&key, &plugin, &now],
                )
                .await?;
            tx.execute("SELECT pg_notify($1, '')", &[&DUE_CHANNEL]).await?;
            tx.commit().await?;
            Ok(n as usize)
        })
    }

    /// Make dead deliveries pending again: these ids, or all when `None`.
    fn replay_dead(&self, ids: Option<&[DeliveryId]>) -> Result<usize, StoreError> {
        let ids = ids.map(<[DeliveryId]>::to_vec);
        self.with_connection(move |client| async move {
            let n = client
                .execute(
                    "UPDATE deliveries SET status = 'pending', next_attempt_at = $2, updated_at = $2,
                         replays = replays + 1, claimed_by = NULL, lease_until = NULL
                     WHERE status = 'dead' AND ($1::BIGINT[] IS NULL OR id = ANY($1))",
                    &[&ids, &now_ms()],
                )
                .await?;
            client.execute("SELECT pg_notify($1, '')", &[&DUE_CHANNEL]).await?;
            Ok(n as usize)
        })
    }

    /// Delete events received before `before` all of whose deliveries
    /// succeeded; returns how many.
    fn purge_succeeded(&self, before: i64) -> Result<usize, StoreError> {
        self.with_connection(move |client| async move {
            // Shadow runs past their retention: older than `before`, or
            // past the newest SHADOW_RUNS_KEPT of their plugin.
            client
                .execute(
                    "DELETE FROM shadow_runs WHERE created_at < $1 OR id IN (
                         SELECT id FROM (SELECT id, ROW_NUMBER() OVER (
                             PARTITION BY plugin ORDER BY id DESC) AS newer FROM shadow_runs) n
                         WHERE newer > $2)",
                    &[&before, &(super::SHADOW_RUNS_KEPT as i64)],
                )
                .await?;
            let n = client
                .execute(
                    "DELETE FROM events WHERE received_at < $1 AND NOT EXISTS (
                         SELECT 1 FROM deliveries d WHERE d.event_key = events.key
                           AND d.status != 'succeeded')",
                    &[&before],
                )
                .await?;
            Ok(n as usize)
        })
    }

    fn purge_expired_kv(&self, now: i64) -> Result<usize, StoreError> {
        self.with_connection(move |client| async move {
            let n = client
                .execute(
                    "DELETE FROM plugin_kv WHERE expires_at IS NOT NULL AND expires_at <= $1",
                    &[&now],
                )
                .await?;
            Ok(n as usize)
        })
    }

    /// Replace the saved plugin status table with `rows`.
    fn save_plugins(&self, rows: Vec<PluginStatus>) -> Result<(), StoreError> {
        self.with_connection(move |mut client| async move {
            let tx = client.transaction().await?;
            // Hosts saving at once take turns (else both insert a name).
            tx.batch_execute("LOCK TABLE plugins IN SHARE ROW EXCLUSIVE MODE; DELETE FROM plugins")
                .await?;
            for r in &rows {
                let limits = serde_json::to_string(&r.limits).expect("limits serialize");
                let counters = serde_json::to_string(&r.counters).expect("counters serialize");
                tx.execute(
                    "INSERT INTO plugins (name, version, state, reason, subscriptions, limits, counters, updated_at, shadow)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[
                        &r.name,
                        &r.version,
                        &r.state.as_str(),
                        &r.reason,
                        &r.subscriptions,
                        &limits,
                        &counters,
                        &r.updated_at,
                        &r.shadow.as_ref().map(|s| serde_json::to_string(s).expect("shadow serializes")),
                    ],
                )
                .await?;
            }
            tx.commit().await
        })
    }

    fn record_shadow(&self, runs: Vec<ShadowRun>) -> Result<(), StoreError> {
        self.with_connection(move |mut client| async move {
            let tx = client.transaction().await?;
            let insert = tx
                .prepare(
                    "INSERT INTO shadow_runs (plugin, event_key, event_type, live_version,
                        candidate_version, live_error, candidate_error, live_fuel,
                        live_duration_us, candidate_fuel, candidate_duration_us, candidate_logs,
                        requests, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                )
                .await?;
            // PostgreSQL text cannot hold NUL; a plugin's message can (JSON
            // escapes it in the rest).
            let text = |t: &Option<String>| t.as_ref().map(|t| t.replace('\0', "\u{FFFD}"));
            for r in &runs {
                let (live, candidate) = (
                    super::Cost::columns(Some(r.live_cost)),
                    super::Cost::columns(Some(r.candidate_cost)),
                );
                tx.execute(
                    &insert,
                    &[
                        &r.plugin,
                        &r.event_key,
                        &r.event_type,
                        &r.live_version,
                        &r.candidate_version,
                        &text(&r.live_error),
                        &text(&r.candidate_error),
                        &live.0,
                        &live.1,
                        &candidate.0,
                        &candidate.1,
                        &serde_json::to_string(&r.candidate_logs).expect("strings serialize"),
                        &serde_json::to_string(&r.requests).expect("requests serialize"),
                        &r.created_at,
                    ],
                )
                .await?;
            }
            tx.commit().await
        })
    }

    fn shadow_runs(&self, plugin: &str, limit: usize) -> Result<Vec<ShadowRun>, StoreError> {
        let link = self.pool.get();
        let plugin = plugin.to_owned();
        self.run(async move {
            let rows = link
                .lock()
                .await?
                .query(
                    "SELECT plugin, event_key, event_type, live_version, candidate_version,
                            live_error, candidate_error, live_fuel, live_duration_us,
                            candidate_fuel, candidate_duration_us, candidate_logs, requests,
                            created_at
                     FROM shadow_runs WHERE plugin = $1 ORDER BY id DESC LIMIT $2",
                    &[&plugin, &(limit as i64)],
                )
                .await
                .map_err(classify)?;
            rows.iter()
                .map(|row| {
                    let cost = |at: usize| {
                        super::Cost::from_columns(row.get(at), row.get(at + 1))
                            .ok_or_else(|| unreadable("shadow_runs cost", "negative"))
                    };
                    Ok(ShadowRun {
                        plugin: row.get(0),
                        event_key: row.get(1),
                        event_type: row.get(2),
                        live_version: row.get(3),
                        candidate_version: row.get(4),
                        live_error: row.get(5),
                        candidate_error: row.get(6),
                        live_cost: cost(7)?,
                        candidate_cost: cost(9)?,
                        candidate_logs: json(row.get(11))?,
                        requests: json(row.get(12))?,
                        created_at: row.get(13),
                    })
                })
                .collect()
        })
    }

    /// The plugin status table as last saved, by name.
    fn plugins(&self) -> Result<Vec<PluginStatus>, StoreError> {
        let link = self.pool.get();
        self.run(async move {
            let rows = link
                .lock()
                .await?
                .query(
                    "SELECT name, version, state, reason, subscriptions, limits, counters, updated_at, shadow
                     FROM plugins ORDER BY name",
                    &[],
                )
                .await
                .map_err(classify)?;
            rows.iter()
                .map(|row| {
                    let state: String = row.get(2);
                    Ok(PluginStatus {
                        name: row.get(0),
                        version: row.get(1),
                        state: PluginState::parse(&state)
                            .ok_or_else(|| unreadable("plugins.state", &state))?,
                        reason: row.get(3),
                        subscriptions: row.get(4),
                        limits: json(row.get(5))?,
                        counters: json(row.get(6))?,
                        updated_at: row.get(7),
                        shadow: row.get::<_, Option<String>>(8).map(json).transpose()?,
                    })
                })
                .collect()
        })
    }

    /// Deliveries waiting for their first attempt (or replayed).
    fn outstanding(&self) -> Result<usize, StoreError> {
        self.with_connection(|client| async move {
            let row = client
                .query_one(
                    "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'",
                    &[],
                )
                .await?;
            Ok(row.get::<_, i64>(0) as usize)
        })
    }

    fn stats(&self, now: i64) -> Result<StoreStats, StoreError> {
        self.with_connection(move |client| async move {
            let rows = client
                .query(
                    "SELECT status, COUNT(*) FROM deliveries GROUP BY status",
                    &[],
                )
                .await?;
            let by_status = rows
                .iter()
                .filter_map(|row| Some((Status::parse(row.get(0))?, row.get::<_, i64>(1) as u64)))
                .collect();
            let oldest_due = client
                .query_one(
                    "SELECT MIN(next_attempt_at) FROM deliveries
                     WHERE status IN ('pending', 'failed') AND next_attempt_at <= $1",
                    &[&now],
                )
                .await?
                .get(0);
            Ok(StoreStats {
                by_status,
                oldest_due,
            })
        })
    }

    fn commit_metrics(&self) -> CommitMetrics {
        self.commits.clone()
    }

    fn release(&self, ids: Vec<DeliveryId>) {
        let _ = self.releases.send(ids);
    }

    fn release_held(&self) {
        let (link, host) = (self.pool.get(), self.claim.host.clone());
        match self.run(release_claims(link, host, None)) {
            Ok(0) => {}
            Ok(n) => tracing::info!(deliveries = n, "released the deliveries this host held"),
            Err(error) => {
                tracing::warn!(%error, "could not release the deliveries this host held; they wait for their lease")
            }
        }
    }

    fn wakeups(&self) -> Option<std::sync::mpsc::Receiver<()>> {
        self.wakeups.lock().expect("wakeups lock").take()
    }

    fn threads_gone(&self) -> Vec<String> {
        match &self.thread {
            Some(thread) if thread.is_finished() => vec!["store-postgres".to_owned()],
            _ => Vec::new(),
        }
    }
}

impl KvRead for PgStore {
    fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        let (plugin, key) = (plugin.to_owned(), key.to_owned());
        self.with_connection(|client| async move {
            let row = client
                .query_opt(
                    "SELECT value FROM plugin_kv WHERE plugin = $1 AND key = $2
                       AND (expires_at IS NULL OR expires_at > $3)",
                    &[&plugin, &key, &now_ms()],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
        .map_err(|e| e.to_string())
    }

    fn kv_keys(&self, plugin: &str, prefix: &str, limit: usize) -> Result<Vec<String>, String> {
        let (plugin, prefix) = (plugin.to_owned(), prefix.to_owned());
        let limit = limit as i64;
        self.with_connection(move |client| async move {
            let rows = client
                .query(
                    "SELECT key FROM plugin_kv WHERE plugin = $1 AND starts_with(key, $2)
                       AND (expires_at IS NULL OR expires_at > $3) ORDER BY key COLLATE \"C\" LIMIT $4",
                    &[&plugin, &prefix, &now_ms(), &limit],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .map_err(|e| e.to_string())
    }

    fn kv_usage(&self, plugin: &str) -> Result<u64, String> {
        let plugin = plugin.to_owned();
        self.with_connection(|client| async move {
            let row = client
                .query_opt(
                    "SELECT bytes FROM plugin_kv_usage WHERE plugin = $1",
                    &[&plugin],
                )
                .await?;
            Ok(row.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
        })
        .map_err(|e| e.to_string())
    }
}

fn classify(error: tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    // Worth a retry by the sender (503): the connection went, the server is
    // shutting down or starting, a statement ran out of time, or two
    // transactions collided.
    let passing = [
        SqlState::QUERY_CANCELED,
        SqlState::ADMIN_SHUTDOWN,
        SqlState::CRASH_SHUTDOWN,
        SqlState::CANNOT_CONNECT_NOW,
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::LOCK_NOT_AVAILABLE,
        SqlState::TOO_MANY_CONNECTIONS,
    ];
    let unreachable = error.is_closed()
        || std::error::Error::source(&error).is_some_and(|e| e.is::<std::io::Error>());
    // The server's own words (`db error` alone says nothing).
    let text = match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(&error) {
            Some(cause) => format!("{error}: {cause}"),
            None => error.to_string(),
        },
    };
    if unreachable || error.code().is_some_and(|code| passing.contains(code)) {
        return StoreError::Busy(format!("PostgreSQL: {text}"));
    }
    StoreError::Failed(format!("PostgreSQL: {text}"))
}
