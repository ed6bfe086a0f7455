//! The PostgreSQL store: several hosts, one database. WORK IN PROGRESS on
//! the `pg-store` branch (issue 13): schema and migrations under an advisory
//! lock, group-committed appends, due deliveries and recorded attempts.
//! Still to come: the rest of [`Store`], leases (`FOR UPDATE SKIP LOCKED`),
//! `LISTEN/NOTIFY` wake-ups, kv, reconnection, and the contract tests shared
//! with SQLite.
//!
//! One thread owns a single-threaded tokio runtime and two connections: one
//! for transactions (group-committed appends, recorded attempts), one for
//! reads. The store's blocking methods spawn their work onto that runtime and
//! wait for the answer, so they may be called from any thread, in a runtime
//! or not, as [`super::SqliteStore`]'s are.

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::{Client, NoTls};

use super::{Appended, Attempt, Due, RecordedAs, StoreError, Unreadable, now_ms};
use crate::event::Event;

/// The schema version this build reads and writes (`hooks_schema.version`).
pub const PG_SCHEMA_VERSION: i32 = 1;

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
    /// Reads, pipelined: `Client` takes `&self`.
    reader: Arc<Client>,
    /// Transactions, one at a time.
    writer: Arc<Mutex<Client>>,
    appends: Option<mpsc::UnboundedSender<Append>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connect to `url` (`postgres://user@host:port/db`), migrate the schema
    /// under the advisory lock, and start the store's thread.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Failed(e.to_string()))?;
        let (mut writer, reader) = runtime
            .block_on(async { Ok::<_, StoreError>((connect(url).await?, connect(url).await?)) })?;
        runtime.block_on(migrate(&mut writer))?;
        let writer = Arc::new(Mutex::new(writer));
        let (appends, queue) = mpsc::unbounded_channel();
        let handle = runtime.handle().clone();
        let committer = writer.clone();
        let thread = std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn(move || runtime.block_on(group_commit(committer, queue)))
            .map_err(|e| StoreError::Failed(e.to_string()))?;
        Ok(Self {
            handle,
            reader: Arc::new(reader),
            writer,
            appends: Some(appends),
            thread: Some(thread),
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

    /// Store `event` with one pending delivery per plugin unless its key is
    /// already stored; resolves after the commit.
    pub fn append_if_new(
        &self,
        event: Arc<Event>,
        plugins: Vec<Arc<str>>,
    ) -> oneshot::Receiver<Result<Appended, StoreError>> {
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

    /// Deliveries due at `now` for these plugins, oldest first, leaving out
    /// never-attempted ones created after `fresh_after`. (No lease yet: one
    /// host at a time.)
    pub fn due(
        &self,
        now: i64,
        fresh_after: i64,
        plugins: &[Arc<str>],
        limit: usize,
    ) -> Result<Vec<Due>, StoreError> {
        if plugins.is_empty() {
            return Ok(Vec::new());
        }
        let reader = self.reader.clone();
        let plugins: Vec<String> = plugins.iter().map(|p| p.to_string()).collect();
        let limit = limit as i64;
        self.run(async move {
            let rows = reader
                .query(
                    "SELECT d.id, d.plugin, d.attempts, d.event_key, e.body, d.replays
                     FROM deliveries d JOIN events e ON e.key = d.event_key
                     WHERE d.status IN ('pending', 'failed') AND d.next_attempt_at <= $1
                       AND (d.attempts > 0 OR d.updated_at <= $2) AND d.plugin = ANY($3)
                     ORDER BY d.next_attempt_at, d.id LIMIT $4",
                    &[&now, &fresh_after, &plugins, &limit],
                )
                .await
                .map_err(classify)?;
            Ok(rows.iter().map(due_row).collect())
        })
    }

    /// Record attempts in one transaction, saying what became of each.
    pub fn record(&self, attempts: Vec<Attempt>) -> Result<Vec<RecordedAs>, StoreError> {
        let writer = self.writer.clone();
        self.run(async move {
            let mut client = writer.lock().await;
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
                             last_failure_message = $5, plugin_version = $6, updated_at = $7
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
                made.push(if updated == 0 {
                    RecordedAs::Superseded
                } else {
                    RecordedAs::Given
                });
            }
            tx.commit().await.map_err(classify)?;
            Ok(made)
        })
    }

    /// Deliveries waiting for their first attempt (or replayed).
    pub fn outstanding(&self) -> Result<usize, StoreError> {
        let reader = self.reader.clone();
        self.run(async move {
            let row = reader
                .query_one(
                    "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'",
                    &[],
                )
                .await
                .map_err(classify)?;
            Ok(row.get::<_, i64>(0) as usize)
        })
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
async fn group_commit(writer: Arc<Mutex<Client>>, mut queue: mpsc::UnboundedReceiver<Append>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = queue.try_recv() {
            batch.push(more);
        }
        let results = append_batch(&mut *writer.lock().await, &batch).await;
        for (append, result) in batch.into_iter().zip(results) {
            let _ = append.reply.send(result);
        }
    }
}

/// One transaction for the batch, each append in its own savepoint: one
/// that fails is rolled back alone and only its caller is told.
async fn append_batch(client: &mut Client, batch: &[Append]) -> Vec<Result<Appended, StoreError>> {
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
        let appended = append(&savepoint, event, plugins, now).await;
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
                "INSERT INTO deliveries (event_key, plugin, status, attempts, next_attempt_at, created_at, updated_at)
                 VALUES ($1, $2, 'pending', 0, $3, $3, $3) RETURNING id",
                &[&event.key(), &&**plugin, &now],
            )
            .await?;
        ids.push(row.get(0));
    }
    Ok(Appended::New(ids))
}

fn classify(error: tokio_postgres::Error) -> StoreError {
    // Connection-level failures are worth a retry by the sender (503).
    if error.is_closed() {
        return StoreError::Busy(format!("PostgreSQL connection closed: {error}"));
    }
    StoreError::Failed(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    /// A throwaway PostgreSQL cluster on loopback, in a temporary directory,
    /// stopped and removed when dropped. Needs the Debian `postgresql`
    /// package and root (it runs the server as `postgres`).
    struct Cluster {
        bin: PathBuf,
        dir: PathBuf,
        url: String,
    }

    impl Cluster {
        fn start() -> Self {
            let bin = std::fs::read_dir("/usr/lib/postgresql")
                .expect("PostgreSQL is installed (scripts/test installs it)")
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .max()
                .expect("a PostgreSQL version");
            let dir = std::env::temp_dir().join(format!("hooks-pg-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let as_postgres = |args: &[&str]| {
                let status = Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .args(args)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(status.success(), "{args:?}");
            };
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            let port = 20000 + (std::process::id() % 20000) as u16;
            let data = dir.join("data");
            let (data, log) = (data.to_str().unwrap(), dir.join("log"));
            let initdb = bin.join("initdb");
            as_postgres(&[
                initdb.to_str().unwrap(),
                "-D",
                data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--no-locale",
            ]);
            let options = format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off",
                dir.display()
            );
            let pg_ctl = bin.join("pg_ctl");
            as_postgres(&[
                pg_ctl.to_str().unwrap(),
                "-D",
                data,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-o",
                &options,
                "start",
            ]);
            Self {
                bin,
                dir,
                url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            }
        }
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            let pg_ctl = self.bin.join("pg_ctl");
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(pg_ctl)
                .args(["-D"])
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "-w", "stop"])
                .status();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Two hosts open the store at once (their migrations take turns under
    /// the advisory lock), and the same event sent to both is stored once.
    #[test]
    fn two_hosts_store_one_event_once() {
        let cluster = Cluster::start();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| PgStore::open(&cluster.url).unwrap());
            let b = s.spawn(|| PgStore::open(&cluster.url).unwrap());
            (a.join().unwrap(), b.join().unwrap())
        });
        let event =
            Arc::new(Event::parse(br#"{"id":"evt_1","type":"order.created","data":{}}"#).unwrap());
        let plugins: Vec<Arc<str>> = vec!["orders".into(), "payments".into()];
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (one, two) = runtime.block_on(async {
            let one = a.append_if_new(event.clone(), plugins.clone());
            let two = b.append_if_new(event.clone(), plugins.clone());
            (one.await.unwrap().unwrap(), two.await.unwrap().unwrap())
        });
        let mut outcomes = [one, two];
        outcomes.sort_by_key(|o| matches!(o, Appended::Duplicate));
        assert!(
            matches!(&outcomes[0], Appended::New(ids) if ids.len() == 2),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[1], Appended::Duplicate);

        // Either host sees both deliveries due, and records them.
        assert_eq!(b.outstanding().unwrap(), 2);
        let due = b.due(now_ms() + 1, now_ms() + 1, &plugins, 10).unwrap();
        assert_eq!(due.len(), 2);
        assert_eq!(due[0].event.as_ref().unwrap().key(), "evt_1");
        let attempts = due
            .iter()
            .map(|d| Attempt {
                id: d.id,
                replays: d.replays,
                plugin_version: "v".into(),
                status: super::super::Status::Succeeded,
                next_attempt_at: now_ms(),
                failure: None,
                plugin: d.plugin.clone(),
                kv: Arc::default(),
                kv_quota: 0,
            })
            .collect();
        assert_eq!(
            a.record(attempts).unwrap(),
            [RecordedAs::Given, RecordedAs::Given]
        );
        assert_eq!(a.outstanding().unwrap(), 0);
        assert!(
            a.due(now_ms() + 1, now_ms() + 1, &plugins, 10)
                .unwrap()
                .is_empty()
        );
    }
}
