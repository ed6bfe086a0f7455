//! The PostgreSQL store: several hosts, one database (`--store
//! postgres://…`).
//!
//! - Idempotency is the `events` primary key, across hosts; appends are
//!   group-committed and acknowledged after the commit.
//! - Work is claimed, not assigned: a host holds the deliveries it appended
//!   or claimed (`FOR UPDATE SKIP LOCKED`) under a lease; recording or
//!   replaying releases them, and an expired lease lets another host claim
//!   them. `LISTEN/NOTIFY` wakes every host when deliveries are released or
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

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::{Client, NoTls};

use super::{
    AppendTicket, Appended, Attempt, DeliveryId, DeliveryRecord, Due, EventRecord, Filter,
    RecordedAs, Status, Store, StoreError, Unreadable, now_ms,
};
use crate::event::Event;
use crate::runtime::FailureKind;
use crate::runtime::kv::{KvOp, KvRead, parse_integer};
use crate::status::{PluginState, PluginStatus};

/// The schema version this build reads and writes (`hooks_schema.version`).
pub const PG_SCHEMA_VERSION: i32 = 1;

/// How long a delivery is one host's once that host appended it or read it
/// due: past it (the host died, or stalled), any host may run it. Longer
/// than any call's deadline and its wait in the queue.
pub const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(300);

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

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hooks_schema (version INTEGER NOT NULL);
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
    /// Reads.
    reader: Arc<Link>,
    /// Transactions, one at a time.
    writer: Arc<Link>,
    appends: Option<mpsc::UnboundedSender<Append>>,
    thread: Option<JoinHandle<()>>,
    /// Signals from `LISTEN hooks_due`, until the poller takes them.
    wakeups: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
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
    /// Connect to `url` (`postgres://user@host:port/db`), migrate the schema
    /// under the advisory lock, and start the store's thread.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with_lease(url, DEFAULT_LEASE)
    }

    /// [`PgStore::open`], holding what this host runs for `lease`.
    pub fn open_with_lease(url: &str, lease: std::time::Duration) -> Result<Self, StoreError> {
        let claim = Claim::new(lease);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Failed(e.to_string()))?;
        let (mut writer, reader) = runtime
            .block_on(async { Ok::<_, StoreError>((connect(url).await?, connect(url).await?)) })?;
        let (wake, wakeups) = std::sync::mpsc::channel();
        runtime.block_on(listen(url, wake))?;
        runtime.block_on(migrate(&mut writer))?;
        let writer = Arc::new(Link::new(url, writer));
        let (appends, queue) = mpsc::unbounded_channel();
        let handle = runtime.handle().clone();
        let (committer, appender) = (writer.clone(), claim.clone());
        let thread = std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn(move || runtime.block_on(group_commit(committer, queue, appender)))
            .map_err(|e| StoreError::Failed(e.to_string()))?;
        Ok(Self {
            handle,
            claim,
            reader: Arc::new(Link::new(url, reader)),
            writer,
            appends: Some(appends),
            thread: Some(thread),
            wakeups: std::sync::Mutex::new(Some(wakeups)),
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

    /// Run `work` with the writing connection, one at a time.
    fn write<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(LinkGuard) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, tokio_postgres::Error>> + Send,
    {
        let writer = self.writer.clone();
        self.run(async move { work(writer.lock().await?).await.map_err(classify) })
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
     d.created_at, d.updated_at";

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
    let event = Event::parse(body).map(Arc::new).map_err(|e| Unreadable {
        key,
        reason: format!("the stored event is not deliverable: {e}"),
    });
    Due {
        id: row.get(0),
        plugin: row.get::<_, String>(1).into(),
        attempts: row.get::<_, i32>(2) as u32,
        replays: row.get(5),
        event,
    }
}

/// A connection that comes back: each use checks it, and a closed one (the
/// server restarted, the network dropped) is replaced. While the server is
/// unreachable, uses fail at once as busy (the sender gets 503 with
/// `Retry-After`; workers leave deliveries pending) and a new connection is
/// tried at most once a second. The loss and the recovery are logged once
/// each.
struct Link {
    url: String,
    client: Arc<Mutex<Option<Client>>>,
    /// When connecting last failed; `None` while connected.
    down_since: std::sync::Mutex<Option<std::time::Instant>>,
}

type LinkGuard = tokio::sync::OwnedMappedMutexGuard<Option<Client>, Client>;

/// How long an unreachable server is left alone between tries.
const RECONNECT_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

impl Link {
    fn new(url: &str, client: Client) -> Self {
        Self {
            url: url.to_owned(),
            client: Arc::new(Mutex::new(Some(client))),
            down_since: std::sync::Mutex::new(None),
        }
    }

    async fn lock(&self) -> Result<LinkGuard, StoreError> {
        let mut slot = self.client.clone().lock_owned().await;
        if slot.as_ref().is_some_and(Client::is_closed) {
            tracing::warn!("the PostgreSQL connection closed; reconnecting");
            *slot = None;
            *self.down_since.lock().expect("link lock") = Some(std::time::Instant::now());
        }
        if slot.is_none() {
            let since = *self.down_since.lock().expect("link lock");
            if since.is_some_and(|t| t.elapsed() < RECONNECT_BACKOFF) {
                return Err(StoreError::Busy("PostgreSQL is unreachable".into()));
            }
            match connect(&self.url).await {
                Ok(client) => {
                    tracing::info!("PostgreSQL connection open again");
                    *self.down_since.lock().expect("link lock") = None;
                    *slot = Some(client);
                }
                Err(error) => {
                    *self.down_since.lock().expect("link lock") = Some(std::time::Instant::now());
                    return Err(StoreError::Busy(format!(
                        "PostgreSQL is unreachable: {error}"
                    )));
                }
            }
        }
        Ok(tokio::sync::OwnedMutexGuard::map(slot, |slot| {
            slot.as_mut().expect("connected above")
        }))
    }
}

/// A third connection, `LISTEN`ing on [`DUE_CHANNEL`]: each notification is
/// a wake-up for the poller.
async fn listen(url: &str, wake: std::sync::mpsc::Sender<()>) -> Result<(), StoreError> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(classify)?;
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    if wake.send(()).is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::error!(%error, "the PostgreSQL listening connection ended; polling only");
                    break;
                }
                None => break,
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {DUE_CHANNEL}"))
        .await
        .map_err(classify)?;
    // The connection lives as long as its client.
    tokio::spawn(async move {
        let _client = client;
        std::future::pending::<()>().await
    });
    Ok(())
}

async fn connect(url: &str) -> Result<Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(classify)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::error!(%error, "the PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Bring the schema to [`PG_SCHEMA_VERSION`] under the advisory lock, so
/// hosts starting together do not race; refuse a newer one.
async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(classify)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(classify)?;
    // "already exists, skipping" for every table at every start is noise.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(classify)?;
    tx.batch_execute(SCHEMA).await.map_err(classify)?;
    let version: Option<i32> = tx
        .query_opt("SELECT version FROM hooks_schema", &[])
        .await
        .map_err(classify)?
        .map(|row| row.get(0));
    match version {
        Some(v) if v > PG_SCHEMA_VERSION => {
            return Err(StoreError::Failed(format!(
                "the database has schema version {v}, newer than version {PG_SCHEMA_VERSION} \
                 that this build of stateset-hooks knows: run a newer stateset-hooks on it"
            )));
        }
        Some(_) => {
            tx.execute(
                "UPDATE hooks_schema SET version = $1",
                &[&PG_SCHEMA_VERSION],
            )
            .await
            .map_err(classify)?;
        }
        None => {
            tx.execute(
                "INSERT INTO hooks_schema (version) VALUES ($1)",
                &[&PG_SCHEMA_VERSION],
            )
            .await
            .map_err(classify)?;
        }
    }
    tx.commit().await.map_err(classify)
}

/// The store's thread: take the appends queued, commit them together in
/// one transaction (group commit), answer everyone. Ends when the store is
/// dropped.
async fn group_commit(writer: Arc<Link>, mut queue: mpsc::UnboundedReceiver<Append>, claim: Claim) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = queue.try_recv() {
            batch.push(more);
        }
        let results = match writer.lock().await {
            Ok(mut client) => append_batch(&mut client, &batch, &claim).await,
            Err(error) => vec![Err(error); batch.len()],
        };
        for (append, result) in batch.into_iter().zip(results) {
            let _ = append.reply.send(result);
        }
    }
}

/// One transaction for the batch, each append in its own savepoint: one
/// that fails is rolled back alone and only its caller is told.
async fn append_batch(
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
            "INSERT INTO events (key, event_type, received_at, body) VALUES ($1, $2, $3, $4)
             ON CONFLICT (key) DO NOTHING",
            &[
                &event.key(),
                &event.event_type(),
                &now,
                &event.payload().as_bytes(),
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

/// Apply a successful call's kv writes, as `sqlite.rs`'s `apply_kv` does:
/// the plugin's expired keys go first; `Err` inside is a conflict.
async fn apply_kv(
    tx: &tokio_postgres::Transaction<'_>,
    a: &Attempt,
    now: i64,
) -> Result<Result<(), String>, tokio_postgres::Error> {
    let plugin = &*a.plugin;
    // One plugin's kv commits take turns across every host, so a read here
    // (an increment's value, a compare-and-swap's check, the usage) is still
    // true when its write lands: without it two hosts' increments race.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("kv:{plugin}")],
    )
    .await?;
    tx.execute(
        "DELETE FROM plugin_kv WHERE plugin = $1 AND expires_at IS NOT NULL AND expires_at <= $2",
        &[&plugin, &now],
    )
    .await?;
    let usage = async || -> Result<i64, tokio_postgres::Error> {
        let row = tx
            .query_opt(
                "SELECT bytes FROM plugin_kv_usage WHERE plugin = $1",
                &[&plugin],
            )
            .await?;
        Ok(row.map_or(0, |r| r.get(0)))
    };
    let before = usage().await?;
    for op in a.kv.iter() {
        let current = async |key: &str| -> Result<Option<Vec<u8>>, tokio_postgres::Error> {
            let row = tx
                .query_opt(
                    "SELECT value FROM plugin_kv WHERE plugin = $1 AND key = $2
                       AND (expires_at IS NULL OR expires_at > $3)",
                    &[&plugin, &key, &now],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        };
        match op {
            KvOp::Set {
                key,
                value,
                expires_at,
            } => {
                tx.execute(
                    "INSERT INTO plugin_kv (plugin, key, value, expires_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (plugin, key) DO UPDATE SET value = EXCLUDED.value,
                         expires_at = EXCLUDED.expires_at",
                    &[&plugin, key, value, expires_at],
                )
                .await?;
            }
            KvOp::Delete { key } => {
                tx.execute(
                    "DELETE FROM plugin_kv WHERE plugin = $1 AND key = $2",
                    &[&plugin, key],
                )
                .await?;
            }
            KvOp::Increment { key, delta } => {
                let n = match current(key).await? {
                    None => 0,
                    Some(bytes) => match parse_integer(key, &bytes) {
                        Ok(n) => n,
                        Err(conflict) => return Ok(Err(format!("kv conflict: {conflict}"))),
                    },
                };
                let Some(sum) = n.checked_add(*delta) else {
                    return Ok(Err(format!("kv conflict: key {key:?} would overflow")));
                };
                tx.execute(
                    "INSERT INTO plugin_kv (plugin, key, value) VALUES ($1, $2, $3)
                     ON CONFLICT (plugin, key) DO UPDATE SET value = EXCLUDED.value",
                    &[&plugin, key, &sum.to_string().into_bytes()],
                )
                .await?;
            }
            KvOp::CompareAndSwap { key, expected, new } => {
                if current(key).await? != *expected {
                    return Ok(Err(format!(
                        "kv conflict: key {key:?} changed since the call read it"
                    )));
                }
                tx.execute(
                    "INSERT INTO plugin_kv (plugin, key, value, expires_at) VALUES ($1, $2, $3, NULL)
                     ON CONFLICT (plugin, key) DO UPDATE SET value = EXCLUDED.value, expires_at = NULL",
                    &[&plugin, key, new],
                )
                .await?;
            }
        }
    }
    let after = usage().await?;
    let quota = i64::try_from(a.kv_quota).unwrap_or(i64::MAX);
    if after > before && after > quota {
        return Ok(Err(format!(
            "kv quota: this delivery's writes would take the plugin to {after} bytes, \
             past its quota of {quota}"
        )));
    }
    Ok(Ok(()))
}

impl Store for PgStore {
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
        let writer = self.writer.clone();
        let claim = self.claim.clone();
        let plugins: Vec<String> = plugins.iter().map(|p| p.to_string()).collect();
        let limit = limit as i64;
        self.run(async move {
            // Claimed, not assigned: rows another host holds under a live
            // lease, or is claiming this instant, are skipped.
            let rows = writer
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
                             ORDER BY next_attempt_at, id LIMIT $4
                             FOR UPDATE SKIP LOCKED)
                         RETURNING id, plugin, attempts, event_key, replays, next_attempt_at)
                     SELECT c.id, c.plugin, c.attempts, c.event_key, e.body, c.replays
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
        let writer = self.writer.clone();
        self.run(async move {
            let mut client = writer.lock().await?;
            let tx = client.transaction().await.map_err(classify)?;
            let now = now_ms();
            let mut made = Vec::with_capacity(attempts.len());
            for a in &attempts {
                let (kind, message) = match &a.failure {
                    Some((kind, message)) => (Some(kind.as_str()), Some(message.as_str())),
                    None => (None, None),
                };
                let updated = tx
                    .execute(
                        "UPDATE deliveries SET status = $2, attempts = attempts + 1,
                             next_attempt_at = $3, last_failure_kind = $4,
                             last_failure_message = $5, plugin_version = $6, updated_at = $7,
                             claimed_by = NULL, lease_until = NULL
                         WHERE id = $1 AND replays = $8",
                        &[
                            &a.id,
                            &a.status.as_str(),
                            &a.next_attempt_at,
                            &kind,
                            &message,
                            &&*a.plugin_version,
                            &now,
                            &a.replays,
                        ],
                    )
                    .await
                    .map_err(classify)?;
                let mut recorded_as = RecordedAs::Given;
                if updated == 0 {
                    recorded_as = RecordedAs::Superseded;
                } else if a.status == Status::Succeeded && !a.kv.is_empty() {
                    tx.batch_execute("SAVEPOINT attempt").await.map_err(classify)?;
                    if let Err(conflict) = apply_kv(&tx, a, now).await.map_err(classify)? {
                        tx.batch_execute("ROLLBACK TO SAVEPOINT attempt")
                            .await
                            .map_err(classify)?;
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
                        recorded_as = RecordedAs::Conflict(conflict);
                    }
                    tx.batch_execute("RELEASE SAVEPOINT attempt").await.map_err(classify)?;
                }
                made.push(recorded_as);
            }
            tx.commit().await.map_err(classify)?;
            Ok(made)
        })
    }

    /// Deliveries matching `filter`, newest first.
    fn deliveries(&self, filter: &Filter) -> Result<Vec<DeliveryRecord>, StoreError> {
        let reader = self.reader.clone();
        let filter = filter.clone();
        self.run(async move {
            let status = filter.status.map(Status::as_str);
            let limit = filter.limit.map_or(i64::MAX, |n| n as i64);
            let rows = reader
                .lock()
                .await?
                .query(
                    &format!(
                        "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.key = d.event_key
                         WHERE ($1::TEXT IS NULL OR d.status = $1) AND ($2::TEXT IS NULL OR d.plugin = $2)
                           AND ($3::TEXT IS NULL OR e.event_type = $3)
                         ORDER BY d.id DESC LIMIT $4"
                    ),
                    &[&status, &filter.plugin, &filter.event_type, &limit],
                )
                .await
                .map_err(classify)?;
            rows.iter().map(delivery_row).collect()
        })
    }

    /// One event and its deliveries.
    fn event(&self, key: &str) -> Result<Option<EventRecord>, StoreError> {
        let reader = self.reader.clone();
        let key = key.to_owned();
        self.run(async move {
            let Some(row) = reader
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
            let deliveries = reader
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
        self.write(move |mut client| async move {
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
        self.write(move |client| async move {
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
        self.write(move |client| async move {
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
        self.write(move |client| async move {
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
        self.write(move |mut client| async move {
            let tx = client.transaction().await?;
            tx.execute("DELETE FROM plugins", &[]).await?;
            for r in &rows {
                let limits = serde_json::to_string(&r.limits).expect("limits serialize");
                let counters = serde_json::to_string(&r.counters).expect("counters serialize");
                tx.execute(
                    "INSERT INTO plugins (name, version, state, reason, subscriptions, limits, counters, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[
                        &r.name,
                        &r.version,
                        &r.state.as_str(),
                        &r.reason,
                        &r.subscriptions,
                        &limits,
                        &counters,
                        &r.updated_at,
                    ],
                )
                .await?;
            }
            tx.commit().await
        })
    }

    /// The plugin status table as last saved, by name.
    fn plugins(&self) -> Result<Vec<PluginStatus>, StoreError> {
        let reader = self.reader.clone();
        self.run(async move {
            let rows = reader
                .lock()
                .await?
                .query(
                    "SELECT name, version, state, reason, subscriptions, limits, counters, updated_at
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
                    })
                })
                .collect()
        })
    }

    /// Deliveries waiting for their first attempt (or replayed).
    fn outstanding(&self) -> Result<usize, StoreError> {
        let reader = self.reader.clone();
        self.run(async move {
            let row = reader
                .lock()
                .await?
                .query_one(
                    "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'",
                    &[],
                )
                .await
                .map_err(classify)?;
            Ok(row.get::<_, i64>(0) as usize)
        })
    }

    fn release(&self, ids: Vec<DeliveryId>) {
        let (writer, host) = (self.writer.clone(), self.claim.host.clone());
        self.handle.spawn(async move {
            let client = match writer.lock().await {
                Ok(client) => client,
                Err(error) => {
                    tracing::warn!(%error, deliveries = ids.len(), "could not release deliveries");
                    return;
                }
            };
            let released = client
                .execute(
                    "UPDATE deliveries SET claimed_by = NULL, lease_until = NULL
                     WHERE id = ANY($1) AND claimed_by = $2",
                    &[&ids, &host],
                )
                .await;
            let notified = match released {
                Ok(_) => {
                    client
                        .execute("SELECT pg_notify($1, '')", &[&DUE_CHANNEL])
                        .await
                }
                Err(error) => Err(error),
            };
            if let Err(error) = notified {
                // Held until the lease ends: then any host takes them.
                tracing::warn!(%error, deliveries = ids.len(), "could not release deliveries");
            }
        });
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
        let (reader, plugin, key) = (self.reader.clone(), plugin.to_owned(), key.to_owned());
        self.run(async move {
            let row = reader
                .lock()
                .await?
                .query_opt(
                    "SELECT value FROM plugin_kv WHERE plugin = $1 AND key = $2
                       AND (expires_at IS NULL OR expires_at > $3)",
                    &[&plugin, &key, &now_ms()],
                )
                .await
                .map_err(classify)?;
            Ok(row.map(|r| r.get(0)))
        })
        .map_err(|e| e.to_string())
    }

    fn kv_keys(&self, plugin: &str, prefix: &str, limit: usize) -> Result<Vec<String>, String> {
        let (reader, plugin, prefix) = (self.reader.clone(), plugin.to_owned(), prefix.to_owned());
        let limit = limit as i64;
        self.run(async move {
            let rows = reader
                .lock()
                .await?
                .query(
                    "SELECT key FROM plugin_kv WHERE plugin = $1 AND starts_with(key, $2)
                       AND (expires_at IS NULL OR expires_at > $3) ORDER BY key COLLATE \"C\" LIMIT $4",
                    &[&plugin, &prefix, &now_ms(), &limit],
                )
                .await
                .map_err(classify)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .map_err(|e| e.to_string())
    }

    fn kv_usage(&self, plugin: &str) -> Result<u64, String> {
        let (reader, plugin) = (self.reader.clone(), plugin.to_owned());
        self.run(async move {
            let row = reader
                .lock()
                .await?
                .query_opt(
                    "SELECT bytes FROM plugin_kv_usage WHERE plugin = $1",
                    &[&plugin],
                )
                .await
                .map_err(classify)?;
            Ok(row.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
        })
        .map_err(|e| e.to_string())
    }
}

fn classify(error: tokio_postgres::Error) -> StoreError {
    // Connection-level failures are worth a retry by the sender (503).
    if error.is_closed() {
        return StoreError::Busy(format!("PostgreSQL connection closed: {error}"));
    }
    StoreError::Failed(error.to_string())
}
