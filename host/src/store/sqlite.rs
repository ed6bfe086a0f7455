//! The embedded store: one SQLite file in WAL mode, bundled SQLite (nothing
//! to install), schema in `schema.sql`.
//!
//! All writes go through one writer thread that commits whatever has queued
//! up in one transaction with one sync (group commit): many concurrent
//! webhooks share the cost of durability; a second thread makes each commit
//! durable while the writer goes on with the next. Reads use their own
//! connection, so listing and dispatch never wait for a sync. Other
//! processes (the `events` and `dlq` commands) open the same file while the
//! server runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params, params_from_iter};
use tokio::sync::oneshot;

use super::{
    AppendTicket, Appended, Attempt, CommitMetrics, DeliveryId, DeliveryRecord, Due, EventRecord,
    Filter, RecordedAs, ShadowRun, Status, Store, StoreError, StoreStats, Unreadable, now_ms,
};
use crate::contain::contain;
use crate::event::Event;
use crate::runtime::FailureKind;
use crate::runtime::kv::{KvOp, KvRead, parse_integer};
use crate::status::{PluginState, PluginStatus};
use crate::trace::TraceParent;

/// Where the database goes unless configured: the working directory.
pub const DEFAULT_DB_PATH: &str = "stateset-hooks.db";

/// Writes committed together at most: bounds one transaction's latency.
const MAX_BATCH: usize = 1024;

const SCHEMA: &str = include_str!("schema.sql");

/// The schema version this build reads and writes (`PRAGMA user_version`,
/// set by `schema.sql`). Older files are migrated at open; newer ones are
/// refused, as this build cannot know what they mean.
pub const SCHEMA_VERSION: i64 = 7;

type Op = Box<dyn FnOnce(&Connection) -> rusqlite::Result<usize> + Send>;

enum Write {
    Append {
        event: Arc<Event>,
        plugins: Vec<Arc<str>>,
        reply: oneshot::Sender<Result<Appended, StoreError>>,
    },
    Op {
        /// Taken when run: a batch runs once.
        op: Option<Op>,
        reply: mpsc::Sender<Result<usize, StoreError>>,
    },
}

/// The SQLite store.
pub struct SqliteStore {
    path: PathBuf,
    writes: Option<mpsc::Sender<Write>>,
    writer: Option<JoinHandle<()>>,
    /// Ends once the writer has.
    syncer: Option<JoinHandle<()>>,
    reader: Mutex<Connection>,
    commits: CommitMetrics,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Open (or create) the database. `busy_timeout` is how long a write waits
    /// for a lock held by another connection before it fails as busy.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<Self, StoreError> {
        Self::open_capped(path, busy_timeout, u64::MAX)
    }

    /// [`SqliteStore::open`], with writes that would grow the database past
    /// `max_bytes` failing as [`StoreError::Full`].
    pub fn open_capped(
        path: &Path,
        busy_timeout: Duration,
        max_bytes: u64,
    ) -> Result<Self, StoreError> {
        let writer_conn = connect(path, busy_timeout)?;
        migrate(&writer_conn, path)?;
        let page_size: i64 = writer_conn
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .map_err(classify)?;
        let page_size = u64::try_from(page_size).unwrap_or(4096);
        // SQLite's own cap: a write past it fails with SQLITE_FULL, as on a
        // full disk. The pragma takes a page count, at most 2^32 - 2.
        let pages = (max_bytes / page_size.max(1)).clamp(1, u64::from(u32::MAX - 1));
        writer_conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .map_err(classify)?;
        let reader = connect(path, busy_timeout)?;
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(run)
                .map_err(|e| StoreError::Failed(e.to_string()))
        };
        // Commits are made durable on a thread of their own when the WAL
        // file can be opened (it can once the migration has run); else each
        // commit syncs in the writer.
        let wal_path = wal_path(path);
        let wal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&wal_path);
        let (syncs, syncer) = match wal {
            Ok(wal) => {
                writer_conn
                    .execute_batch("PRAGMA synchronous = NORMAL")
                    .map_err(classify)?;
                let (syncs, committed) = mpsc::channel();
                let syncer = spawn("store-sync", Box::new(move || sync_loop(wal, committed)))?;
                (Some(syncs), Some(syncer))
            }
            Err(error) => {
                tracing::warn!(wal = %wal_path.display(), %error, "cannot open the WAL file: every commit syncs in the writer");
                (None, None)
            }
        };
        let (writes, queue) = mpsc::channel();
        let commits = CommitMetrics::default();
        let observed = commits.clone();
        let writer = spawn(
            "store-writer",
            Box::new(move || write_loop(writer_conn, queue, syncs, &observed)),
        )?;
        Ok(Self {
            path: path.to_owned(),
            writes: Some(writes),
            writer: Some(writer),
            syncer,
            reader: Mutex::new(reader),
            commits,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, write: Write) -> Result<(), StoreError> {
        self.writes
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(write)
            .map_err(|_| StoreError::Closed)
    }

    /// Run `op` in the writer's next transaction and wait for the commit.
    fn op(
        &self,
        op: impl FnOnce(&Connection) -> rusqlite::Result<usize> + Send + 'static,
    ) -> Result<usize, StoreError> {
        let (reply, done) = mpsc::channel();
        self.write(Write::Op {
            op: Some(Box::new(op)),
            reply,
        })?;
        done.recv().map_err(|_| StoreError::Closed)?
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.reader.lock().expect("reader lock");
        f(&conn).map_err(classify)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // The writer ends when its queue closes, the syncer when the writer
        // has.
        self.writes.take();
        for thread in [self.writer.take(), self.syncer.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
    }
}

/// SQLite's write-ahead log beside the database file.
fn wal_path(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

fn connect(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    create_private(path)
        .map_err(|e| StoreError::Failed(format!("cannot create {}: {e}", path.display())))?;
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Failed(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(busy_timeout).map_err(classify)?;
    // WAL: readers never block the writer. synchronous=FULL: a commit is on
    // disk (WAL fsynced) before it returns, which is what a 200 promises (the
    // writer's own connection leaves that sync to the syncer thread).
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )
    .map_err(classify)?;
    Ok(conn)
}

/// Create the database file readable and writable by its owner only (it
/// holds every event body: customer data). SQLite gives its `-wal` and
/// `-shm` files the same mode. An existing file is left as it is.
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Bring a database written by an earlier version up to `schema.sql`
/// ([`SCHEMA_VERSION`]), or refuse one written by a later version. Version 0
/// is a new file. Version 1 kept the plugin table's limits and counters as
/// display text; it is a snapshot the server rewrites every second, so its
/// rows are dropped. Version 5 counts each plugin's kv bytes: counted once
/// from the rows of an older file. All in one transaction, so a migration
/// cut short is done again at the next open.
fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(classify)?;
    if version > SCHEMA_VERSION {
        return Err(newer_schema(path, version));
    }
    conn.execute_batch("BEGIN IMMEDIATE").map_err(classify)?;
    let migrated = upgrade(conn, version);
    let end = if migrated.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    conn.execute_batch(end).map_err(classify)?;
    migrated.map_err(classify)?;
    if version != SCHEMA_VERSION {
        tracing::info!(db = %path.display(), from = version, to = SCHEMA_VERSION, "database schema migrated");
    }
    Ok(())
}

fn newer_schema(path: &Path, version: i64) -> StoreError {
    StoreError::Failed(format!(
        "{} has schema version {version}, newer than version {SCHEMA_VERSION} that this \
         build of stateset-hooks knows: run a newer stateset-hooks on it, or use another --db",
        path.display()
    ))
}

/// The steps of [`migrate`], inside its transaction.
fn upgrade(conn: &Connection, version: i64) -> rusqlite::Result<()> {
    if version == 1 {
        conn.execute("DELETE FROM plugins", [])?;
    }
    conn.execute_batch(SCHEMA)?;
    if version < 5 {
        conn.execute_batch(
            "DELETE FROM plugin_kv_usage;
             INSERT INTO plugin_kv_usage (plugin, bytes)
                 SELECT plugin, SUM(length(CAST(key AS BLOB)) + length(value))
                 FROM plugin_kv GROUP BY plugin;",
        )?;
    }
    // Columns added since: checked by column, not by number, so a migration
    // cut short completes at the next open. Version 3 counts replays;
    // version 6 keeps each delivery's last log lines and each event's trace;
    // version 7 its last call's fuel and time.
    for (table, column, definition) in [
        ("deliveries", "replays", "INTEGER NOT NULL DEFAULT 0"),
        ("deliveries", "last_logs", "TEXT"),
        ("events", "traceparent", "TEXT"),
        ("deliveries", "last_fuel", "INTEGER"),
        ("deliveries", "last_duration_us", "INTEGER"),
        ("plugins", "shadow", "TEXT"),
    ] {
        let present: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
            [table, column],
            |row| row.get(0),
        )?;
        if !present {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
            ))?;
        }
    }
    conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
}

/// How soon a delivery whose key-value writes no longer applied runs again.
const KV_CONFLICT_RETRY: Duration = Duration::from_millis(100);

/// Apply a successful call's key-value writes in order; `Err` inside is a
/// conflict (a compare-and-swap that no longer holds, an increment of what
/// is no longer an integer, writes that together with other deliveries'
/// would pass the plugin's `quota`), after which the caller rolls them all
/// back. The plugin's expired keys are deleted first.
fn apply_kv(
    tx: &Connection,
    plugin: &str,
    ops: &[KvOp],
    quota: u64,
    now: i64,
) -> rusqlite::Result<Result<(), String>> {
    if ops.is_empty() {
        return Ok(Ok(()));
    }
    tx.prepare_cached(
        "DELETE FROM plugin_kv WHERE plugin = ?1 AND expires_at IS NOT NULL AND expires_at <= ?2",
    )?
    .execute(params![plugin, now])?;
    let usage = || kv_usage_in(tx, plugin);
    let before = usage()?;
    let current = |key: &str| -> rusqlite::Result<Option<Vec<u8>>> {
        tx.prepare_cached(
            "SELECT CAST(value AS BLOB) FROM plugin_kv WHERE plugin = ?1 AND key = ?2
               AND (expires_at IS NULL OR expires_at > ?3)",
        )?
        .query_row(params![plugin, key, now], |row| row.get(0))
        .optional()
    };
    let put = |key: &str, value: &[u8], expires_at: Option<i64>| -> rusqlite::Result<usize> {
        tx.prepare_cached(
            "INSERT INTO plugin_kv (plugin, key, value, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value,
                 expires_at = excluded.expires_at",
        )?
        .execute(params![plugin, key, value, expires_at])
    };
    // An increment keeps the key's TTL (the expired are deleted above).
    let put_keeping_ttl = |key: &str, value: &[u8]| -> rusqlite::Result<usize> {
        tx.prepare_cached(
            "INSERT INTO plugin_kv (plugin, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value",
        )?
        .execute(params![plugin, key, value])
    };
    for op in ops {
        match op {
            KvOp::Set {
                key,
                value,
                expires_at,
            } => {
                put(key, value, *expires_at)?;
            }
            KvOp::Delete { key } => {
                tx.prepare_cached("DELETE FROM plugin_kv WHERE plugin = ?1 AND key = ?2")?
                    .execute(params![plugin, key])?;
            }
            KvOp::Increment { key, delta } => {
                let n = match current(key)? {
                    None => 0,
                    Some(bytes) => match parse_integer(key, &bytes) {
                        Ok(n) => n,
                        Err(conflict) => return Ok(Err(format!("kv conflict: {conflict}"))),
                    },
                };
                let Some(sum) = n.checked_add(*delta) else {
                    return Ok(Err(format!("kv conflict: key {key:?} would overflow")));
                };
                put_keeping_ttl(key, sum.to_string().as_bytes())?;
            }
            KvOp::CompareAndSwap { key, expected, new } => {
                if current(key)? != *expected {
                    return Ok(Err(format!(
                        "kv conflict: key {key:?} changed since the call read it"
                    )));
                }
                put(key, new, None)?;
            }
        }
    }
    // Each call checks the quota against what was committed when it wrote;
    // deliveries running side by side are checked together here.
    let after = usage()?;
    if after > before && after > quota {
        return Ok(Err(format!(
            "kv quota: this delivery's writes would take the plugin to {after} bytes, \
             past its quota of {quota}"
        )));
    }
    Ok(Ok(()))
}

/// Bytes of `plugin`'s keys and values, expired ones not yet deleted included.
fn kv_usage_in(conn: &Connection, plugin: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT bytes FROM plugin_kv_usage WHERE plugin = ?1")?
        .query_row(params![plugin], |row| row.get::<_, i64>(0))
        .optional()
        .map(|bytes| bytes.unwrap_or(0).max(0) as u64)
}

impl KvRead for SqliteStore {
    fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.read(|conn| kv_get_in(conn, plugin, key))
            .map_err(|e| e.to_string())
    }

    fn kv_keys(&self, plugin: &str, prefix: &str, limit: usize) -> Result<Vec<String>, String> {
        self.read(|conn| kv_keys_in(conn, plugin, prefix, limit))
            .map_err(|e| e.to_string())
    }

    fn kv_usage(&self, plugin: &str) -> Result<u64, String> {
        self.read(|conn| kv_usage_in(conn, plugin))
            .map_err(|e| e.to_string())
    }

    /// A local file in WAL mode: a reader never waits for the writer, and
    /// a key read takes microseconds, less than a hand-off to another
    /// thread. (A disk that stops answering would hold the call; a store
    /// over a network reads on the blocking pool instead.)
    fn reads_in_place(&self) -> bool {
        true
    }
}

fn kv_get_in(conn: &Connection, plugin: &str, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached(
        "SELECT CAST(value AS BLOB) FROM plugin_kv WHERE plugin = ?1 AND key = ?2
           AND (expires_at IS NULL OR expires_at > ?3)",
    )?
    .query_row(params![plugin, key, now_ms()], |row| row.get(0))
    .optional()
}

fn kv_keys_in(
    conn: &Connection,
    plugin: &str,
    prefix: &str,
    limit: usize,
) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT key FROM plugin_kv WHERE plugin = ?1 AND substr(key, 1, length(?2)) = ?2
           AND (expires_at IS NULL OR expires_at > ?3) ORDER BY key LIMIT ?4",
    )?;
    stmt.query_map(params![plugin, prefix, now_ms(), limit as i64], |row| {
        row.get(0)
    })?
    .collect()
}

/// A database read without changing it: a read-only connection, no
/// migration, no writer. What `stateset-hooks run` reads plugins' state
/// from and `shadow` reads events and deliveries from, so trying a plugin
/// leaves the host's database as it was, also while the server runs.
#[derive(Debug)]
pub struct SqliteSnapshot {
    conn: Mutex<Connection>,
    path: PathBuf,
    version: i64,
}

impl SqliteSnapshot {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        use rusqlite::OpenFlags;
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| StoreError::Failed(format!("cannot open {}: {e}", path.display())))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(classify)?;
        if version > SCHEMA_VERSION {
            return Err(newer_schema(path, version));
        }
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_owned(),
            version,
        })
    }

    /// Key-value reads: nothing in a file that predates key-value state
    /// (schema version 3 or less).
    fn read<T: Default>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, String> {
        if self.version < 4 {
            return Ok(T::default());
        }
        f(&self.conn.lock().expect("snapshot lock")).map_err(|e| e.to_string())
    }

    /// Events and deliveries, from a file at this build's schema version
    /// (an older one is brought up to it by `serve`).
    fn read_records<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        if self.version != SCHEMA_VERSION {
            return Err(StoreError::Failed(format!(
                "{} has schema version {}, older than version {SCHEMA_VERSION} that this build \
                 reads: start `serve` of this build on it once to migrate it",
                self.path.display(),
                self.version
            )));
        }
        f(&self.conn.lock().expect("snapshot lock")).map_err(classify)
    }

    /// Deliveries matching `filter`, newest first, as [`Store::deliveries`].
    pub fn deliveries(&self, filter: &Filter) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.read_records(|conn| select_deliveries(conn, filter))
    }

    /// One event and its deliveries, as [`Store::event`].
    pub fn event(&self, key: &str) -> Result<Option<EventRecord>, StoreError> {
        self.read_records(|conn| select_event(conn, key))
    }
}

impl KvRead for SqliteSnapshot {
    fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.read(|conn| kv_get_in(conn, plugin, key))
    }

    fn kv_keys(&self, plugin: &str, prefix: &str, limit: usize) -> Result<Vec<String>, String> {
        self.read(|conn| kv_keys_in(conn, plugin, prefix, limit))
    }

    fn reads_in_place(&self) -> bool {
        true
    }

    /// Counted from the rows, as a version 4 file has no usage table.
    fn kv_usage(&self, plugin: &str) -> Result<u64, String> {
        self.read(|conn| {
            conn.query_row(
                "SELECT COALESCE(SUM(length(CAST(key AS BLOB)) + length(value)), 0)
                 FROM plugin_kv WHERE plugin = ?1",
                params![plugin],
                |row| row.get::<_, i64>(0),
            )
            .map(|bytes| bytes.max(0) as u64)
        })
    }
}

/// Deliveries matching `filter`, newest first.
fn select_deliveries(conn: &Connection, filter: &Filter) -> rusqlite::Result<Vec<DeliveryRecord>> {
    let mut sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.key = d.event_key WHERE 1 = 1"
    );
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(status) = filter.status {
        sql.push_str(" AND d.status = ?");
        args.push(status.as_str().to_owned().into());
    }
    if let Some(plugin) = &filter.plugin {
        sql.push_str(" AND d.plugin = ?");
        args.push(plugin.clone().into());
    }
    if let Some(event_type) = &filter.event_type {
        sql.push_str(" AND e.event_type = ?");
        args.push(event_type.clone().into());
    }
    if let Some(key) = &filter.event_key {
        sql.push_str(" AND d.event_key = ?");
        args.push(key.clone().into());
    }
    for (bound, clause) in [
        (filter.since, " AND d.created_at >= ?"),
        (filter.until, " AND d.created_at < ?"),
        (filter.before_id, " AND d.id < ?"),
    ] {
        if let Some(bound) = bound {
            sql.push_str(clause);
            args.push(bound.into());
        }
    }
    sql.push_str(&format!(
        " ORDER BY d.id DESC LIMIT {}",
        filter.limit.unwrap_or(i64::MAX as usize)
    ));
    conn.prepare(&sql)?
        .query_map(params_from_iter(args), delivery_row)?
        .collect()
}

/// One event and its deliveries.
fn select_event(conn: &Connection, key: &str) -> rusqlite::Result<Option<EventRecord>> {
    let event = conn
        .query_row(
            "SELECT key, event_type, received_at, body FROM events WHERE key = ?1",
            [key],
            |row| {
                Ok(EventRecord {
                    key: row.get(0)?,
                    event_type: row.get(1)?,
                    received_at: row.get(2)?,
                    body: String::from_utf8_lossy(&row.get::<_, Vec<u8>>(3)?).into_owned(),
                    deliveries: Vec::new(),
                })
            },
        )
        .optional()?;
    let Some(mut event) = event else {
        return Ok(None);
    };
    event.deliveries = conn
        .prepare(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.key = d.event_key
                 WHERE d.event_key = ?1 ORDER BY d.plugin"
        ))?
        .query_map([key], delivery_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(Some(event))
}

fn classify(error: rusqlite::Error) -> StoreError {
    match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::Busy(error.to_string())
        }
        Some(ErrorCode::DiskFull) => StoreError::Full(error.to_string()),
        _ => StoreError::Failed(error.to_string()),
    }
}

/// The writer thread: take what is queued, commit it in one transaction,
/// have it synced and everyone answered. Ends when the store is dropped.
fn write_loop(
    mut conn: Connection,
    queue: mpsc::Receiver<Write>,
    syncs: Option<mpsc::Sender<Vec<Reply>>>,
    commits: &CommitMetrics,
) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        // A panic loses this batch (its transaction rolls back as it
        // unwinds), not the writer: every caller is told and the next batch
        // runs.
        let started = std::time::Instant::now();
        let committed = contain(|| commit(&mut conn, &mut batch)).unwrap_or_else(|panic| {
            Err(StoreError::Failed(format!(
                "the store writer panicked: {panic}"
            )))
        });
        commits.observe(started, batch.len());
        let (results, failed) = match committed {
            Ok(results) => (results, false),
            Err(error) => {
                tracing::error!(cause = %error, writes = batch.len(), "store commit failed");
                (vec![Err(error); batch.len()], true)
            }
        };
        let replies: Vec<Reply> = batch
            .into_iter()
            .zip(results)
            .map(|(write, result)| match write {
                Write::Append { reply, .. } => Reply::Append(reply, result),
                Write::Op { reply, .. } => Reply::Op(reply, result),
            })
            .collect();
        match &syncs {
            // Answered once the syncer has made the commit durable, while
            // this thread goes on with the next batch.
            Some(syncs) if !failed => {
                if let Err(unsent) = syncs.send(replies) {
                    let error = StoreError::Failed("the store's sync thread is gone".into());
                    unsent.0.into_iter().for_each(|r| r.fail(error.clone()));
                }
            }
            _ => replies.into_iter().for_each(Reply::send),
        }
    }
}

/// A committed write's answer, for its caller.
enum Reply {
    Append(
        oneshot::Sender<Result<Appended, StoreError>>,
        Result<Outcome, StoreError>,
    ),
    Op(
        mpsc::Sender<Result<usize, StoreError>>,
        Result<Outcome, StoreError>,
    ),
}

impl Reply {
    fn send(self) {
        match self {
            Reply::Append(reply, result) => drop(reply.send(result.map(|o| match o {
                Outcome::Appended(a) => a,
                Outcome::Count(_) => unreachable!("results follow the batch"),
            }))),
            Reply::Op(reply, result) => drop(reply.send(result.map(|o| match o {
                Outcome::Count(n) => n,
                Outcome::Appended(_) => unreachable!("results follow the batch"),
            }))),
        }
    }

    /// Answer with `error` instead: the write is not known to be durable.
    fn fail(self, error: StoreError) {
        match self {
            Reply::Append(reply, _) => drop(reply.send(Err(error))),
            Reply::Op(reply, _) => drop(reply.send(Err(error))),
        }
    }
}

/// The syncer thread: make what the writer committed durable with one
/// `fdatasync` of the WAL file for every commit that has queued up since the
/// last one, then answer their callers. The writer commits without a sync
/// (`synchronous = NORMAL`) and goes on while the disk works; nobody hears
/// of a write before the sync that covers it. Ends when the writer has.
fn sync_loop(wal: std::fs::File, committed: mpsc::Receiver<Vec<Reply>>) {
    while let Ok(first) = committed.recv() {
        let replies: Vec<Reply> = std::iter::once(first)
            .chain(committed.try_iter())
            .flatten()
            .collect();
        match wal.sync_data() {
            Ok(()) => replies.into_iter().for_each(Reply::send),
            Err(error) => {
                tracing::error!(%error, writes = replies.len(), "store sync failed: the writes it covers are refused");
                let error =
                    StoreError::Failed(format!("the store could not sync its log: {error}"));
                replies.into_iter().for_each(|r| r.fail(error.clone()));
            }
        }
    }
}

#[derive(Clone)]
enum Outcome {
    Appended(Appended),
    Count(usize),
}

/// One transaction and one sync for the whole batch, each write in its own
/// savepoint: a write that fails is rolled back alone and only its caller is
/// told (an HTTP sender then gets 503 and retries); the others commit. If
/// the transaction itself cannot begin or commit, every write fails.
fn commit(
    conn: &mut Connection,
    batch: &mut [Write],
) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
    let now = now_ms();
    let mut tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(classify)?;
    let mut results = Vec::with_capacity(batch.len());
    for write in batch {
        // Dropped without `commit`, a savepoint rolls back to where it began.
        let savepoint = tx.savepoint().map_err(classify)?;
        let result = match write {
            Write::Append { event, plugins, .. } => {
                append(&savepoint, event, plugins, now).map(Outcome::Appended)
            }
            Write::Op { op, .. } => {
                let op = op.take().expect("a batch runs once");
                op(&savepoint).map(Outcome::Count)
            }
        };
        results.push(match result {
            Ok(outcome) => savepoint.commit().map(|()| outcome).map_err(classify),
            // A full disk or an I/O error can make SQLite roll back the
            // whole transaction: then every write of the batch is lost.
            Err(error) if savepoint.is_autocommit() => return Err(classify(error)),
            Err(error) => {
                tracing::warn!(cause = %error, "a store write failed alone; the rest of its batch goes on");
                Err(classify(error))
            }
        });
    }
    tx.commit().map_err(classify)?;
    Ok(results)
}

fn append(
    tx: &Connection,
    event: &Event,
    plugins: &[Arc<str>],
    now: i64,
) -> rusqlite::Result<Appended> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO events (key, event_type, received_at, body, traceparent)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (key) DO NOTHING",
        )?
        .execute(params![
            event.key(),
            event.event_type(),
            now,
            event.payload().as_bytes(),
            event.trace().map(ToString::to_string)
        ])?;
    if inserted == 0 {
        return Ok(Appended::Duplicate);
    }
    let mut insert = tx.prepare_cached(
        "INSERT INTO deliveries (event_key, plugin, status, attempts, next_attempt_at, created_at, updated_at)
         VALUES (?1, ?2, 'pending', 0, ?3, ?3, ?3)",
    )?;
    let mut ids = Vec::with_capacity(plugins.len());
    for plugin in plugins {
        insert.execute(params![event.key(), &**plugin, now])?;
        ids.push(tx.last_insert_rowid());
    }
    Ok(Appended::New(ids))
}

/// Shadow runs past their retention: received before `before`, or past
/// the newest [`super::SHADOW_RUNS_KEPT`] of their plugin.
const SHADOW_PRUNE: &str = "DELETE FROM shadow_runs WHERE created_at < ?1 OR id IN (
    SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY plugin ORDER BY id DESC) AS newer
                    FROM shadow_runs) WHERE newer > ?2)";

const DELIVERY_COLUMNS: &str = "d.id, d.event_key, e.event_type, d.plugin, d.status, d.attempts,
     d.last_failure_kind, d.last_failure_message, d.plugin_version, d.next_attempt_at,
     d.created_at, d.updated_at, d.last_logs, d.last_fuel, d.last_duration_us";

/// A column holding a name one of our enums parses; anything else is an error
/// naming the column, not a silent default.
fn named<T>(
    row: &rusqlite::Row<'_>,
    idx: usize,
    parse: fn(&str) -> Option<T>,
) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    parse(&text).ok_or_else(|| unreadable(idx, format!("unknown value {text:?}")))
}

/// A column holding JSON written by `serde_json`.
fn json<T: serde::de::DeserializeOwned>(
    row: &rusqlite::Row<'_>,
    idx: usize,
) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| unreadable(idx, e.to_string()))
}

fn unreadable(idx: usize, reason: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, reason.into())
}

/// A due delivery. Its event is parsed again as it was on arrival; a body
/// that does not parse (written by something other than this host) makes an
/// [`Unreadable`] event, which is recorded, rather than an error that would
/// stop every other due delivery.
fn due_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Due> {
    let key: String = row.get(3)?;
    let event = match row.get_ref(4)? {
        ValueRef::Blob(body) | ValueRef::Text(body) => {
            let trace = row
                .get::<_, Option<String>>(7)?
                .and_then(|t| TraceParent::parse(t.as_bytes()));
            // Under the key it was stored by (a Standard message's is not
            // its body's).
            Event::parse(body)
                .map(|e| Arc::new(e.with_trace(trace).with_key(key.clone())))
                .map_err(|e| e.to_string())
        }
        other => Err(format!("body is stored as {}", other.data_type())),
    };
    Ok(Due {
        id: row.get(0)?,
        plugin: row.get::<_, String>(1)?.into(),
        attempts: row.get(2)?,
        replays: row.get(5)?,
        received_at: row.get(6)?,
        event: event.map_err(|reason| Unreadable {
            key,
            reason: format!("the stored event is not deliverable: {reason}"),
        }),
    })
}

fn delivery_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    let failure_kind: Option<String> = row.get(6)?;
    Ok(DeliveryRecord {
        id: row.get(0)?,
        event_key: row.get(1)?,
        event_type: row.get(2)?,
        plugin: row.get(3)?,
        status: named(row, 4, Status::parse)?,
        attempts: row.get(5)?,
        last_failure_kind: match failure_kind {
            Some(_) => Some(named(row, 6, FailureKind::parse)?),
            None => None,
        },
        last_failure_message: row.get(7)?,
        plugin_version: row.get(8)?,
        next_attempt_at: row.get(9)?,
        created_at: row.get(10)?,
        updated_at: row.get(11)?,
        last_logs: super::logs_from_json(row.get::<_, Option<String>>(12)?.as_deref()),
        last_cost: super::Cost::from_columns(row.get(13)?, row.get(14)?),
    })
}

impl Store for SqliteStore {
    fn append_if_new(&self, event: Arc<Event>, plugins: Vec<Arc<str>>) -> AppendTicket {
        let (reply, ticket) = oneshot::channel();
        let write = Write::Append {
            event,
            plugins,
            reply,
        };
        // If the writer is gone the reply is dropped with the write, and the
        // ticket resolves to an error the caller reads as "closed".
        let _ = self.write(write);
        ticket
    }

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
        let placeholders = vec!["?"; plugins.len()].join(", ");
        let sql = format!(
            "SELECT d.id, d.plugin, d.attempts, d.event_key, e.body, d.replays, e.received_at,
                 e.traceparent
             FROM deliveries d JOIN events e ON e.key = d.event_key
             WHERE d.status IN ('pending', 'failed') AND d.next_attempt_at <= ?
               AND (d.attempts > 0 OR d.updated_at <= ?)
               AND d.plugin IN ({placeholders})
             ORDER BY d.next_attempt_at, d.id LIMIT ?"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let args = [now, fresh_after]
                .into_iter()
                .map(rusqlite::types::Value::Integer)
                .chain(
                    plugins
                        .iter()
                        .map(|p| rusqlite::types::Value::Text(p.to_string())),
                )
                .chain(std::iter::once(rusqlite::types::Value::Integer(
                    limit as i64,
                )));
            let rows = stmt.query_map(params_from_iter(args), due_row)?;
            // One row that cannot be read must not hold back the others.
            Ok(rows
                .filter_map(|row| {
                    row.inspect_err(
                        |error| tracing::error!(%error, "unreadable delivery row skipped"),
                    )
                    .ok()
                })
                .collect())
        })
    }

    fn record(&self, attempts: Vec<Attempt>) -> Result<Vec<RecordedAs>, StoreError> {
        let outcomes = Arc::new(Mutex::new(Vec::with_capacity(attempts.len())));
        let made = outcomes.clone();
        self.op(move |tx| {
            let mut made = made.lock().expect("record outcomes");
            let mut update = tx.prepare_cached(
                "UPDATE deliveries SET status = ?2, attempts = attempts + 1, next_attempt_at = ?3,
                    last_failure_kind = ?4, last_failure_message = ?5, plugin_version = ?6,
                    updated_at = ?7, last_logs = ?9, last_fuel = ?10, last_duration_us = ?11
                 WHERE id = ?1 AND replays = ?8",
            )?;
            let now = now_ms();
            for a in &attempts {
                let (kind, message) = match &a.failure {
                    Some((kind, message)) => (Some(kind.as_str()), Some(message.as_str())),
                    None => (None, None),
                };
                tx.execute_batch("SAVEPOINT attempt")?;
                let updated = update.execute(params![
                    a.id,
                    a.status.as_str(),
                    a.next_attempt_at,
                    kind,
                    message,
                    &*a.plugin_version,
                    now,
                    a.replays,
                    super::logs_json(&a.logs),
                    super::Cost::columns(a.cost).0,
                    super::Cost::columns(a.cost).1,
                ])?;
                let mut recorded_as = RecordedAs::Given;
                if updated == 0 {
                    recorded_as = RecordedAs::Superseded;
                    tracing::info!(
                        delivery = a.id,
                        "replayed while an attempt ran: that attempt is not recorded and the delivery runs again"
                    );
                } else if a.status == Status::Succeeded
                    && let Err(conflict) = apply_kv(tx, &a.plugin, &a.kv, a.kv_quota, now)?
                {
                    // Its state changed under it: nothing of it is kept, and
                    // it runs again on the state as it now is.
                    tx.execute_batch("ROLLBACK TO attempt")?;
                    tracing::warn!(delivery = a.id, plugin = %a.plugin, "{conflict}: the delivery runs again");
                    update.execute(params![
                        a.id,
                        Status::Failed.as_str(),
                        now + KV_CONFLICT_RETRY.as_millis() as i64,
                        FailureKind::HostError.as_str(),
                        conflict,
                        &*a.plugin_version,
                        now,
                        a.replays,
                        super::logs_json(&a.logs),
                        super::Cost::columns(a.cost).0,
                        super::Cost::columns(a.cost).1,
                    ])?;
                    recorded_as = RecordedAs::Conflict(conflict);
                }
                made.push(recorded_as);
                tx.execute_batch("RELEASE attempt")?;
            }
            Ok(attempts.len())
        })?;
        Ok(std::mem::take(
            &mut *outcomes.lock().expect("record outcomes"),
        ))
    }

    fn deliveries(&self, filter: &Filter) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.read(|conn| select_deliveries(conn, filter))
    }

    fn event(&self, key: &str) -> Result<Option<EventRecord>, StoreError> {
        self.read(|conn| select_event(conn, key))
    }

    fn replay_event(&self, key: &str, plugin: Option<&str>) -> Result<usize, StoreError> {
        let (key, plugin) = (key.to_owned(), plugin.map(str::to_owned));
        self.op(move |tx| {
            let now = now_ms();
            if let Some(plugin) = &plugin {
                // A plugin added after the event arrived can be given it too.
                tx.execute(
                    "INSERT INTO deliveries (event_key, plugin, status, attempts, next_attempt_at, created_at, updated_at)
                     SELECT key, ?2, 'pending', 0, ?3, ?3, ?3 FROM events WHERE key = ?1
                     ON CONFLICT (event_key, plugin) DO NOTHING",
                    params![key, plugin, now],
                )?;
            }
            tx.execute(
                "UPDATE deliveries SET status = 'pending', next_attempt_at = ?3, updated_at = ?3,
                     replays = replays + 1
                 WHERE event_key = ?1 AND (?2 IS NULL OR plugin = ?2)",
                params![key, plugin, now],
            )
        })
    }

    fn replay_dead(&self, ids: Option<&[DeliveryId]>) -> Result<usize, StoreError> {
        let ids = ids.map(<[DeliveryId]>::to_vec);
        self.op(move |tx| {
            let now = now_ms();
            match ids {
                None => tx.execute(
                    "UPDATE deliveries SET status = 'pending', next_attempt_at = ?1, updated_at = ?1,
                         replays = replays + 1
                     WHERE status = 'dead'",
                    [now],
                ),
                Some(ids) => {
                    let mut update = tx.prepare_cached(
                        "UPDATE deliveries SET status = 'pending', next_attempt_at = ?2, updated_at = ?2,
                             replays = replays + 1
                         WHERE id = ?1 AND status = 'dead'",
                    )?;
                    let mut n = 0;
                    for id in ids {
                        n += update.execute(params![id, now])?;
                    }
                    Ok(n)
                }
            }
        })
    }

    fn purge_succeeded(&self, before: i64) -> Result<usize, StoreError> {
        self.op(move |tx| {
            tx.execute(SHADOW_PRUNE, params![before, super::SHADOW_RUNS_KEPT as i64])?;
            tx.execute(
                "DELETE FROM events WHERE received_at < ?1 AND NOT EXISTS (
                     SELECT 1 FROM deliveries d WHERE d.event_key = events.key AND d.status != 'succeeded')",
                [before],
            )
        })
    }

    fn purge_expired_kv(&self, now: i64) -> Result<usize, StoreError> {
        self.op(move |tx| {
            tx.execute(
                "DELETE FROM plugin_kv WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                [now],
            )
        })
    }

    fn save_plugins(&self, rows: Vec<PluginStatus>) -> Result<(), StoreError> {
        self.op(move |tx| {
            tx.execute("DELETE FROM plugins", [])?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO plugins (name, version, state, reason, subscriptions, limits, counters, updated_at, shadow)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for r in &rows {
                let limits = serde_json::to_string(&r.limits).expect("limits serialize");
                let counters = serde_json::to_string(&r.counters).expect("counters serialize");
                let shadow = r.shadow.as_ref().map(|s| serde_json::to_string(s).expect("shadow serializes"));
                insert.execute(params![
                    r.name, r.version, r.state.as_str(), r.reason, r.subscriptions, limits, counters, r.updated_at, shadow
                ])?;
            }
            Ok(rows.len())
        })
        .map(drop)
    }

    fn record_shadow(&self, runs: Vec<ShadowRun>) -> Result<(), StoreError> {
        self.op(move |tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO shadow_runs (plugin, event_key, event_type, live_version,
                    candidate_version, live_error, candidate_error, live_fuel, live_duration_us,
                    candidate_fuel, candidate_duration_us, candidate_logs, requests, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            for r in &runs {
                let (live, candidate) = (
                    super::Cost::columns(Some(r.live_cost)),
                    super::Cost::columns(Some(r.candidate_cost)),
                );
                insert.execute(params![
                    r.plugin,
                    r.event_key,
                    r.event_type,
                    r.live_version,
                    r.candidate_version,
                    r.live_error,
                    r.candidate_error,
                    live.0,
                    live.1,
                    candidate.0,
                    candidate.1,
                    serde_json::to_string(&r.candidate_logs).expect("strings serialize"),
                    serde_json::to_string(&r.requests).expect("requests serialize"),
                    r.created_at,
                ])?;
            }
            Ok(runs.len())
        })
        .map(drop)
    }

    fn shadow_runs(&self, plugin: &str, limit: usize) -> Result<Vec<ShadowRun>, StoreError> {
        self.read(|conn| {
            conn.prepare(
                "SELECT plugin, event_key, event_type, live_version, candidate_version, live_error,
                        candidate_error, live_fuel, live_duration_us, candidate_fuel,
                        candidate_duration_us, candidate_logs, requests, created_at
                 FROM shadow_runs WHERE plugin = ?1 ORDER BY id DESC LIMIT ?2",
            )?
            .query_map(params![plugin, limit as i64], |row| {
                let cost = |fuel: usize| -> rusqlite::Result<super::Cost> {
                    super::Cost::from_columns(row.get(fuel)?, row.get(fuel + 1)?)
                        .ok_or_else(|| unreadable(fuel, "a negative cost".into()))
                };
                Ok(ShadowRun {
                    plugin: row.get(0)?,
                    event_key: row.get(1)?,
                    event_type: row.get(2)?,
                    live_version: row.get(3)?,
                    candidate_version: row.get(4)?,
                    live_error: row.get(5)?,
                    candidate_error: row.get(6)?,
                    live_cost: cost(7)?,
                    candidate_cost: cost(9)?,
                    candidate_logs: json(row, 11)?,
                    requests: json(row, 12)?,
                    created_at: row.get(13)?,
                })
            })?
            .collect()
        })
    }

    fn plugins(&self) -> Result<Vec<PluginStatus>, StoreError> {
        self.read(|conn| {
            conn.prepare(
                "SELECT name, version, state, reason, subscriptions, limits, counters, updated_at, shadow
                 FROM plugins ORDER BY name",
            )?
            .query_map([], |row| {
                Ok(PluginStatus {
                    name: row.get(0)?,
                    version: row.get(1)?,
                    state: named(row, 2, PluginState::parse)?,
                    reason: row.get(3)?,
                    subscriptions: row.get(4)?,
                    limits: json(row, 5)?,
                    counters: json(row, 6)?,
                    updated_at: row.get(7)?,
                    shadow: match row.get_ref(8)? {
                        ValueRef::Null => None,
                        _ => Some(json(row, 8)?),
                    },
                })
            })?
            .collect()
        })
    }

    fn outstanding(&self) -> Result<usize, StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'",
                [],
                |row| row.get::<_, i64>(0),
            )
        })
        .map(|n| n as usize)
    }

    fn stats(&self, now: i64) -> Result<StoreStats, StoreError> {
        self.read(|conn| {
            let by_status = conn
                .prepare_cached("SELECT status, COUNT(*) FROM deliveries GROUP BY status")?
                .query_map([], |row| {
                    Ok((named(row, 0, Status::parse)?, row.get::<_, i64>(1)? as u64))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let oldest_due = conn.query_row(
                "SELECT MIN(next_attempt_at) FROM deliveries
                 WHERE status IN ('pending', 'failed') AND next_attempt_at <= ?1",
                [now],
                |row| row.get(0),
            )?;
            Ok(StoreStats {
                by_status,
                oldest_due,
            })
        })
    }

    fn commit_metrics(&self) -> CommitMetrics {
        self.commits.clone()
    }

    fn threads_gone(&self) -> Vec<String> {
        [("store-writer", &self.writer), ("store-sync", &self.syncer)]
            .into_iter()
            .filter(|(_, thread)| thread.as_ref().is_some_and(|t| t.is_finished()))
            .map(|(name, _)| name.to_owned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn append_write(body: &str) -> (Write, oneshot::Receiver<Result<Appended, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        let event = Arc::new(Event::parse(body.as_bytes()).unwrap());
        let plugins = vec![Arc::from("p")];
        (
            Write::Append {
                event,
                plugins,
                reply,
            },
            answer,
        )
    }

    #[test]
    fn commits_are_synced_apart_and_the_wal_stays_bounded() {
        // 40 MiB of events in a few large batches: every append is answered
        // (by the syncer), and the WAL is checkpointed and reused rather
        // than grown to hold them all.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, Duration::from_secs(5)).unwrap();
        assert!(store.syncer.is_some(), "the WAL file opens for the syncer");
        let padding = "x".repeat(2000);
        let tickets: Vec<_> = (0..20_000)
            .map(|i| {
                let body = format!(r#"{{"id":"evt_{i}","type":"t","data":{{"pad":"{padding}"}}}}"#);
                let event = Arc::new(Event::parse(body.as_bytes()).unwrap());
                store.append_if_new(event, vec![Arc::from("p")])
            })
            .collect();
        for ticket in tickets {
            let appended = ticket.blocking_recv().unwrap().unwrap();
            assert!(matches!(appended, Appended::New(_)));
        }
        assert_eq!(store.outstanding().unwrap(), 20_000);
        let wal_bytes = std::fs::metadata(wal_path(&path)).unwrap().len();
        assert!(wal_bytes < 16 << 20, "the WAL grew to {wal_bytes} bytes");
        assert!(store.threads_gone().is_empty());
    }

    #[test]
    fn one_failing_write_fails_alone_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(SqliteStore::open(&path, Duration::from_secs(5)).unwrap());
        let mut conn = connect(&path, Duration::from_secs(5)).unwrap();
        conn.execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.key = 'evt_poison'
             BEGIN SELECT RAISE(ABORT, 'poisoned on purpose'); END;",
        )
        .unwrap();
        let mut batch = Vec::new();
        for key in ["evt_a", "evt_poison", "evt_c"] {
            batch.push(append_write(&format!(r#"{{"id":"{key}","type":"t","data":{{}}}}"#)).0);
        }
        let results = commit(&mut conn, &mut batch).unwrap();
        assert!(matches!(
            results[0],
            Ok(Outcome::Appended(Appended::New(_)))
        ));
        assert!(matches!(&results[1], Err(StoreError::Failed(m)) if m.contains("poisoned")));
        assert!(matches!(
            results[2],
            Ok(Outcome::Appended(Appended::New(_)))
        ));
        let keys: Vec<String> = conn
            .prepare("SELECT key FROM events ORDER BY key")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(keys, ["evt_a", "evt_c"]);
        let deliveries: i64 = conn
            .query_row("SELECT COUNT(*) FROM deliveries", [], |row| row.get(0))
            .unwrap();
        assert_eq!(deliveries, 2, "the failed write left nothing behind");
    }

    /// A first attempt of plugin `p` on delivery `id`, with these kv writes.
    fn kv_attempt(id: DeliveryId, status: Status, kv: Vec<KvOp>, kv_quota: u64) -> Attempt {
        Attempt {
            id,
            replays: 0,
            plugin_version: "v".into(),
            status,
            next_attempt_at: now_ms(),
            failure: None,
            logs: vec!["info: <script>x</script>\0".into()],
            plugin: "p".into(),
            kv: kv.into(),
            kv_quota,
            cost: Some(super::super::Cost {
                fuel: 1234,
                micros: 56,
            }),
        }
    }

    /// Shadow runs read back as recorded, newest first; the retention purge
    /// deletes those made before its cut.
    #[test]
    fn shadow_runs_are_kept_apart_and_purged_with_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), Duration::from_secs(5)).unwrap();
        let run = |key: &str, created_at: i64| ShadowRun {
            plugin: "orders".into(),
            event_key: key.into(),
            event_type: "order.created".into(),
            live_version: "live".into(),
            candidate_version: "cand".into(),
            live_error: None,
            candidate_error: Some("failed (plugin-error): no".into()),
            live_cost: super::super::Cost { fuel: 1, micros: 2 },
            candidate_cost: super::super::Cost { fuel: 3, micros: 4 },
            candidate_logs: vec!["info: x".into()],
            requests: Vec::new(),
            created_at,
        };
        let now = now_ms();
        store
            .record_shadow(vec![run("evt_old", now - 10_000), run("evt_new", now)])
            .unwrap();
        let runs = store.shadow_runs("orders", 10).unwrap();
        assert_eq!(runs, [run("evt_new", now), run("evt_old", now - 10_000)]);
        assert!(runs[0].differs());
        assert!(store.shadow_runs("payments", 10).unwrap().is_empty());
        store.purge_succeeded(now - 5_000).unwrap();
        assert_eq!(
            store.shadow_runs("orders", 10).unwrap(),
            [run("evt_new", now)]
        );
    }

    /// What the metrics and the console read: counts by status, the oldest
    /// due delivery, an attempt's log lines, and the listing's filters.
    #[test]
    fn stats_logs_and_filters_read_what_was_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, Duration::from_secs(5)).unwrap();
        let conn = connect(&path, Duration::from_secs(5)).unwrap();
        let received = now_ms() - 5_000;
        let mut ids = Vec::new();
        for key in ["evt_1", "evt_2", "evt_3"] {
            let body = format!(r#"{{"id":"{key}","type":"t","data":{{}}}}"#);
            let event = Event::parse(body.as_bytes()).unwrap();
            match append(&conn, &event, &["p".into()], received).unwrap() {
                Appended::New(new) => ids.extend(new),
                Appended::Duplicate => unreachable!(),
            }
        }
        let made = store
            .record(vec![kv_attempt(ids[0], Status::Succeeded, vec![], 0)])
            .unwrap();
        assert_eq!(made, [RecordedAs::Given]);
        let stats = store.stats(now_ms()).unwrap();
        assert_eq!(
            (stats.count(Status::Succeeded), stats.count(Status::Pending)),
            (1, 2)
        );
        assert_eq!(stats.oldest_due, Some(received), "pending since received");
        assert_eq!(store.stats(received - 1).unwrap().oldest_due, None);

        let list = |filter: Filter| store.deliveries(&filter).unwrap();
        let first = list(Filter {
            event_key: Some("evt_1".into()),
            ..Filter::default()
        });
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].last_logs, ["info: <script>x</script>\0"]);
        let cost = super::super::Cost {
            fuel: 1234,
            micros: 56,
        };
        assert_eq!(first[0].last_cost, Some(cost), "the call's cost is kept");
        let older = list(Filter {
            before_id: Some(ids[2]),
            limit: Some(1),
            ..Filter::default()
        });
        assert_eq!(older.iter().map(|d| d.id).collect::<Vec<_>>(), [ids[1]]);
        let window = |since, until| {
            list(Filter {
                since,
                until,
                ..Filter::default()
            })
            .len()
        };
        assert_eq!(window(Some(received), Some(received + 1)), 3);
        assert_eq!(window(Some(received + 1), None), 0);
        assert_eq!(window(None, Some(received)), 0);
    }

    #[test]
    fn kv_writes_commit_with_a_success_and_a_conflict_keeps_none_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, Duration::from_secs(5)).unwrap();
        let conn = connect(&path, Duration::from_secs(5)).unwrap();
        let mut ids = Vec::new();
        for key in ["evt_1", "evt_2", "evt_3"] {
            let body = format!(r#"{{"id":"{key}","type":"t","data":{{}}}}"#);
            let event = Event::parse(body.as_bytes()).unwrap();
            match append(&conn, &event, &["p".into()], now_ms()).unwrap() {
                Appended::New(new) => ids.extend(new),
                Appended::Duplicate => unreachable!(),
            }
        }
        let attempt = |id, status, kv| kv_attempt(id, status, kv, 1 << 20);
        let set = |key: &str, value: &str| KvOp::Set {
            key: key.into(),
            value: value.into(),
            expires_at: None,
        };
        let b_absent = KvOp::CompareAndSwap {
            key: "b".into(),
            expected: None,
            new: b"y".to_vec(),
        };
        let made = store
            .record(vec![
                attempt(
                    ids[0],
                    Status::Succeeded,
                    vec![
                        set("b", "x"),
                        KvOp::Increment {
                            key: "n".into(),
                            delta: 2,
                        },
                    ],
                ),
                // Failed calls carry no writes; if one did, it would not apply.
                attempt(ids[1], Status::Failed, vec![set("c", "never")]),
                // Read "b" absent, but evt_1 set it first: nothing of it stays.
                attempt(ids[2], Status::Succeeded, vec![set("a", "1"), b_absent]),
            ])
            .unwrap();
        assert_eq!(made[..2], [RecordedAs::Given, RecordedAs::Given]);
        assert!(
            matches!(&made[2], RecordedAs::Conflict(m) if m.contains("changed since")),
            "{made:?}"
        );
        assert_eq!(store.kv_get("p", "b").unwrap(), Some(b"x".to_vec()));
        assert_eq!(store.kv_get("p", "n").unwrap(), Some(b"2".to_vec()));
        assert_eq!(store.kv_get("p", "c").unwrap(), None);
        assert_eq!(store.kv_get("p", "a").unwrap(), None);
        assert_eq!(store.kv_get("other", "b").unwrap(), None);
        assert_eq!(store.kv_keys("p", "", 10).unwrap(), ["b", "n"]);
        let conflicted = &store.event("evt_3").unwrap().unwrap().deliveries[0];
        assert_eq!(conflicted.status, Status::Failed);
        assert_eq!(conflicted.last_failure_kind, Some(FailureKind::HostError));
        assert!(
            conflicted
                .last_failure_message
                .as_deref()
                .unwrap()
                .contains("kv conflict")
        );
    }

    #[test]
    fn kv_usage_counts_bytes_expired_keys_go_and_the_quota_holds_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, Duration::from_secs(5)).unwrap();
        let conn = connect(&path, Duration::from_secs(5)).unwrap();
        let mut ids = Vec::new();
        for key in ["evt_1", "evt_2", "evt_3", "evt_4"] {
            let body = format!(r#"{{"id":"{key}","type":"t","data":{{}}}}"#);
            let event = Event::parse(body.as_bytes()).unwrap();
            let Appended::New(new) = append(&conn, &event, &["p".into()], now_ms()).unwrap() else {
                unreachable!()
            };
            ids.extend(new);
        }
        let attempt = |id, kv, kv_quota| kv_attempt(id, Status::Succeeded, kv, kv_quota);
        let set = |key: &str, bytes: usize, expires_at: Option<i64>| KvOp::Set {
            key: key.into(),
            value: vec![b'v'; bytes],
            expires_at,
        };
        let count = |key: &str| KvOp::Increment {
            key: key.into(),
            delta: 1,
        };
        let soon = now_ms() + 60_000;
        store
            .record(vec![attempt(
                ids[0],
                vec![
                    set("gone", 10, Some(now_ms() - 1)),
                    // Four bytes of key in one character.
                    set("\u{1F600}", 10, None),
                    KvOp::Set {
                        key: "n".into(),
                        value: b"1".to_vec(),
                        expires_at: Some(soon),
                    },
                ],
                1 << 20,
            )])
            .unwrap();
        assert_eq!(store.kv_get("p", "gone").unwrap(), None);
        assert_eq!(store.kv_keys("p", "", 10).unwrap(), ["n", "\u{1F600}"]);
        // Expired keys count until deleted.
        assert_eq!(store.kv_usage("p").unwrap(), (4 + 10) + (4 + 10) + (1 + 1));

        // The plugin's next writes delete its expired keys first; an
        // increment keeps the key's TTL.
        store
            .record(vec![attempt(ids[1], vec![count("n")], 1 << 20)])
            .unwrap();
        assert_eq!(store.kv_usage("p").unwrap(), (4 + 10) + (1 + 1));
        let ttl: Option<i64> = conn
            .query_row(
                "SELECT expires_at FROM plugin_kv WHERE key = 'n'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(ttl, Some(soon));

        // Two deliveries, each within the quota alone, not together: the
        // second is refused at commit and runs again.
        let quota = 14 + 2 + 2 * (1 + 20);
        store
            .record(vec![
                attempt(ids[2], vec![set("a", 20, None)], quota),
                attempt(ids[3], vec![set("b", 21, None)], quota),
            ])
            .unwrap();
        assert!(store.kv_get("p", "a").unwrap().is_some());
        assert_eq!(store.kv_get("p", "b").unwrap(), None);
        let refused = &store.event("evt_4").unwrap().unwrap().deliveries[0];
        assert_eq!(refused.status, Status::Failed);
        assert!(
            refused
                .last_failure_message
                .as_deref()
                .unwrap()
                .contains("past its quota"),
            "{refused:?}"
        );

        // The sweep deletes what expired, whoever owns it.
        store
            .record(vec![attempt(
                ids[3],
                vec![set("brief", 1, Some(now_ms() - 1))],
                1 << 20,
            )])
            .unwrap();
        assert_eq!(store.purge_expired_kv(now_ms()).unwrap(), 1);
        let usage: i64 = conn
            .query_row(
                "SELECT SUM(length(CAST(key AS BLOB)) + length(value)) FROM plugin_kv",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            store.kv_usage("p").unwrap(),
            usage as u64,
            "the triggers agree with the rows"
        );
    }

    #[test]
    fn a_newer_schema_is_refused_naming_both_versions_and_an_older_one_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let newer = dir.path().join("newer.db");
        Connection::open(&newer)
            .unwrap()
            .execute_batch(&format!("PRAGMA user_version = {};", SCHEMA_VERSION + 1))
            .unwrap();
        let error = SqliteStore::open(&newer, Duration::from_secs(5)).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(&format!("schema version {}", SCHEMA_VERSION + 1))
                && message.contains(&format!("newer than version {SCHEMA_VERSION}")),
            "{message}"
        );

        let older = dir.path().join("older.db");
        Connection::open(&older)
            .unwrap()
            .execute_batch(
                "CREATE TABLE plugins (name TEXT PRIMARY KEY, version TEXT, state TEXT NOT NULL,
                     reason TEXT, subscriptions TEXT NOT NULL, limits TEXT NOT NULL,
                     counters TEXT NOT NULL, updated_at INTEGER NOT NULL);
                 CREATE TABLE events (key TEXT PRIMARY KEY, event_type TEXT NOT NULL,
                     received_at INTEGER NOT NULL, body BLOB NOT NULL);
                 CREATE TABLE deliveries (id INTEGER PRIMARY KEY, event_key TEXT NOT NULL,
                     plugin TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                     next_attempt_at INTEGER NOT NULL, last_failure_kind TEXT,
                     last_failure_message TEXT, plugin_version TEXT, created_at INTEGER NOT NULL,
                     updated_at INTEGER NOT NULL, UNIQUE (event_key, plugin));
                 INSERT INTO events VALUES ('evt_old', 't', 0, '{\"type\":\"t\",\"data\":{}}');
                 INSERT INTO deliveries (event_key, plugin, status, next_attempt_at, created_at, updated_at)
                     VALUES ('evt_old', 'p', 'pending', 0, 0, 0);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        let store = SqliteStore::open(&older, Duration::from_secs(5)).unwrap();
        let due = store.due(1, 1, &[Arc::from("p")], 10).unwrap();
        assert_eq!((due.len(), due[0].replays), (1, 0), "old rows read");
        drop(store);
        let version: i64 = Connection::open(&older)
            .unwrap()
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);

        // Version 4 had kv rows and no usage table: counted at the upgrade.
        let v4 = dir.path().join("v4.db");
        drop(SqliteStore::open(&v4, Duration::from_secs(5)).unwrap());
        Connection::open(&v4)
            .unwrap()
            .execute_batch(
                "DROP TRIGGER plugin_kv_added; DROP TRIGGER plugin_kv_changed;
                 DROP TRIGGER plugin_kv_removed; DROP INDEX plugin_kv_expiry;
                 DROP TABLE plugin_kv_usage;
                 INSERT INTO plugin_kv (plugin, key, value) VALUES ('p', 'k', x'010203');
                 PRAGMA user_version = 4;",
            )
            .unwrap();
        let store = SqliteStore::open(&v4, Duration::from_secs(5)).unwrap();
        assert_eq!(store.kv_usage("p").unwrap(), 1 + 3);
    }

    #[test]
    fn the_database_and_its_wal_are_private_to_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.db");
        let store = SqliteStore::open(&path, Duration::from_secs(5)).unwrap();
        store.purge_succeeded(0).unwrap(); // a write: the WAL exists
        for file in [path.clone(), dir.path().join("private.db-wal")] {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
    }
}
