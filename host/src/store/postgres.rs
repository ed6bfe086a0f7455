//! The PostgreSQL store: several hosts, one database. WORK IN PROGRESS on
//! the `pg-store` branch (issue 13): schema and migrations under an advisory
//! lock, group-committed appends, due deliveries and recorded attempts.
//! Still to come: the rest of [`Store`], leases (`FOR UPDATE SKIP LOCKED`),
//! `LISTEN/NOTIFY` wake-ups, kv, reconnection, and the contract tests shared
//! with SQLite.
//!
//! One thread owns a single-threaded tokio runtime and the connections; the
//! store's blocking methods send it requests and wait for the answer, so they
//! may be called from any thread, as [`super::SqliteStore`]'s are.

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, NoTls};

use super::{Appended, StoreError, now_ms};
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

enum Request {
    Append {
        event: Arc<Event>,
        plugins: Vec<Arc<str>>,
        reply: oneshot::Sender<Result<Appended, StoreError>>,
    },
}

/// The PostgreSQL store.
pub struct PgStore {
    requests: Option<mpsc::UnboundedSender<Request>>,
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
        let mut client = runtime.block_on(connect(url))?;
        runtime.block_on(migrate(&mut client))?;
        let (requests, queue) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn(move || runtime.block_on(serve(client, queue)))
            .map_err(|e| StoreError::Failed(e.to_string()))?;
        Ok(Self {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Store `event` with one pending delivery per plugin unless its key is
    /// already stored; resolves after the commit.
    pub fn append_if_new(
        &self,
        event: Arc<Event>,
        plugins: Vec<Arc<str>>,
    ) -> oneshot::Receiver<Result<Appended, StoreError>> {
        let (reply, ticket) = oneshot::channel();
        if let Some(requests) = &self.requests {
            let _ = requests.send(Request::Append {
                event,
                plugins,
                reply,
            });
        }
        ticket
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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
            tx.execute("UPDATE hooks_schema SET version = $1", &[&PG_SCHEMA_VERSION])
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

/// The store's thread: take what is queued, commit appends together in one
/// transaction (group commit), answer everyone.
async fn serve(mut client: Client, mut queue: mpsc::UnboundedReceiver<Request>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = queue.try_recv() {
            batch.push(more);
        }
        let results = append_batch(&mut client, &batch).await;
        for (request, result) in batch.into_iter().zip(results) {
            match request {
                Request::Append { reply, .. } => drop(reply.send(result)),
            }
        }
    }
}

/// One transaction for the batch, each append in its own savepoint: one
/// that fails is rolled back alone and only its caller is told.
async fn append_batch(client: &mut Client, batch: &[Request]) -> Vec<Result<Appended, StoreError>> {
    let failed_all = |error: StoreError| vec![Err(error); batch.len()];
    let mut tx = match client.transaction().await {
        Ok(tx) => tx,
        Err(error) => return failed_all(classify(error)),
    };
    let now = now_ms();
    let mut results = Vec::with_capacity(batch.len());
    for request in batch {
        let Request::Append { event, plugins, .. } = request;
        let savepoint = match tx.savepoint("append").await {
            Ok(savepoint) => savepoint,
            Err(error) => return failed_all(classify(error)),
        };
        let appended = append(&savepoint, event, plugins, now).await;
        results.push(match appended {
            Ok(appended) => savepoint.commit().await.map(|()| appended).map_err(classify),
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
        let event = Arc::new(Event::parse(br#"{"id":"evt_1","type":"order.created","data":{}}"#).unwrap());
        let plugins: Vec<Arc<str>> = vec!["orders".into(), "payments".into()];
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (one, two) = runtime.block_on(async {
            let one = a.append_if_new(event.clone(), plugins.clone());
            let two = b.append_if_new(event.clone(), plugins.clone());
            (one.await.unwrap().unwrap(), two.await.unwrap().unwrap())
        });
        let mut outcomes = [one, two];
        outcomes.sort_by_key(|o| matches!(o, Appended::Duplicate));
        assert!(matches!(&outcomes[0], Appended::New(ids) if ids.len() == 2), "{outcomes:?}");
        assert_eq!(outcomes[1], Appended::Duplicate);
    }
}
