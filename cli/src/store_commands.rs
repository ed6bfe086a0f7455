//! Where the store is (`--db`, or `--store` and its flags) and the `events`,
//! `dlq`, `plugins` and `kv` commands: read and replay the store, also while
//! the server runs (SQLite in WAL mode lets both at the file at once;
//! PostgreSQL serves everyone; the server's poller picks replayed deliveries
//! up within its poll interval, or at once on PostgreSQL). `plugins
//! release` alone asks the running server, over its token-protected admin
//! route.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use stateset_hooks::admin::{AdminFile, RELEASE_ROUTE};
use stateset_hooks::config::DEFAULT_BUSY_TIMEOUT;
use stateset_hooks::status::Table;
use stateset_hooks::store::{
    DeliveryRecord, Filter, PgOptions, PgStore, SqliteStore, Status, Store, now_ms,
};
use stateset_hooks::text::escape_controls;

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List deliveries (one row per event and plugin), newest first.
    List {
        /// Only this status: pending, succeeded, failed (retry scheduled) or dead.
        #[arg(long, value_parser = parse_status)]
        status: Option<Status>,
        /// Only this plugin.
        #[arg(long)]
        plugin: Option<String>,
        /// Only this event type, e.g. order.created.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        format: Format,
    },
    /// Show one event: its body and every delivery.
    Show {
        /// The event's key: its `id`, or `sha256:<hex>` for events without one.
        key: String,
        #[command(flatten)]
        format: Format,
    },
    /// Run an event's deliveries again (all, or one plugin's).
    Replay {
        key: String,
        /// Only this plugin (it gets the event even if it had no delivery).
        #[arg(long)]
        plugin: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead deliveries: every attempt failed.
    List {
        #[command(flatten)]
        format: Format,
    },
    /// Make dead deliveries pending again.
    Replay {
        /// Replay every dead delivery.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Delivery ids, as `dlq list` shows them.
        ids: Vec<i64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// The plugins the server has loaded: version, subscriptions, limits,
    /// state (active, quarantined, failed with the reason) and counters.
    List {
        #[command(flatten)]
        format: Format,
    },
    /// Lift a plugin's quarantine in the running server: its held deliveries
    /// run at once. Uses the address and token the server wrote beside the
    /// database (`<db>.admin`, readable by its owner only).
    Release {
        /// The plugin's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// A plugin's keys (starting with PREFIX), with their sizes.
    List {
        plugin: String,
        prefix: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// One key's value, as stored (control characters escaped).
    Get { plugin: String, key: String },
}

#[derive(Debug, Args)]
pub struct Format {
    /// Print JSON instead of a table, for scripts.
    #[arg(long)]
    json: bool,
}

fn parse_status(s: &str) -> Result<Status, String> {
    Status::parse(s)
        .ok_or_else(|| format!("unknown status {s:?}: pending, succeeded, failed or dead"))
}

/// Where the store is, for every command: the SQLite file, or PostgreSQL.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The SQLite database of events and deliveries (with --store, only
    /// where the admin token file `<db>.admin` goes).
    #[arg(long, global = true, value_name = "PATH", default_value = stateset_hooks::store::DEFAULT_DB_PATH)]
    db: PathBuf,
    /// A PostgreSQL store shared by several hosts, instead of the SQLite
    /// file: `postgres://user:password@host:port/database`, with
    /// `?sslmode=disable|prefer|require` (default prefer: TLS when the
    /// server offers it, its certificate always verified).
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "STATESET_STORE",
        hide_env_values = true
    )]
    store: Option<String>,
    /// PostgreSQL connections for claims, attempts and reads; each host
    /// opens three more (appends, lease renewal, LISTEN).
    #[arg(long, global = true, value_name = "N", default_value_t = stateset_hooks::store::DEFAULT_POOL_SIZE)]
    store_pool: usize,
    /// The server cancels a store statement running longer (the request
    /// gets 503 with Retry-After).
    #[arg(long, global = true, value_name = "MS", default_value_t = stateset_hooks::store::DEFAULT_STATEMENT_TIMEOUT.as_millis() as u64)]
    store_statement_timeout_ms: u64,
    /// How long a delivery a host appended or claimed stays its own: after
    /// a host dies, another runs its deliveries once this has passed.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = stateset_hooks::store::DEFAULT_LEASE.as_secs())]
    store_lease_secs: u64,
    /// PEM certificates trusted for the PostgreSQL server's TLS besides the
    /// web's public roots (a private CA, or the server's own certificate).
    #[arg(long, global = true, value_name = "FILE")]
    store_ca: Option<PathBuf>,
}

impl StoreArgs {
    pub fn location(&self) -> anyhow::Result<Location> {
        let postgres = match &self.store {
            None => None,
            Some(url) => {
                let mut options =
                    PgOptions::new(url).map_err(|e| anyhow::anyhow!("--store: {e}"))?;
                for (flag, value) in [
                    ("--store-pool", self.store_pool as u64),
                    (
                        "--store-statement-timeout-ms",
                        self.store_statement_timeout_ms,
                    ),
                    ("--store-lease-secs", self.store_lease_secs),
                ] {
                    if value == 0 {
                        bail!("{flag} must be at least 1");
                    }
                }
                options.pool_size = self.store_pool;
                options.statement_timeout = Duration::from_millis(self.store_statement_timeout_ms);
                options.lease = Duration::from_secs(self.store_lease_secs);
                options.ca_file = self.store_ca.clone();
                Some(options)
            }
        };
        Ok(Location {
            db: self.db.clone(),
            postgres,
        })
    }
}

/// Where the store is: the SQLite file, or PostgreSQL (`--store`).
#[derive(Debug, Clone)]
pub struct Location {
    pub db: PathBuf,
    pub postgres: Option<PgOptions>,
}

fn open(at: &Location) -> anyhow::Result<Box<dyn Store>> {
    if let Some(options) = &at.postgres {
        return Ok(Box::new(
            PgStore::open(options.clone()).map_err(|e| anyhow::anyhow!("{e}"))?,
        ));
    }
    let db = &at.db;
    if !db.exists() {
        bail!(
            "no database at {} (pass --db, or run `serve` first)",
            db.display()
        );
    }
    Ok(Box::new(
        SqliteStore::open(db, DEFAULT_BUSY_TIMEOUT).map_err(|e| anyhow::anyhow!("{e}"))?,
    ))
}

pub fn events(at: &Location, command: EventsCommand) -> anyhow::Result<ExitCode> {
    let store = open(at)?;
    match command {
        EventsCommand::List {
            status,
            plugin,
            event_type,
            limit,
            format,
        } => {
            let filter = Filter {
                status,
                plugin,
                event_type,
                limit: Some(limit),
                ..Filter::default()
            };
            print_deliveries(&store.deliveries(&filter)?, format.json)?;
        }
        EventsCommand::Show { key, format } => {
            let event = store
                .event(&key)?
                .with_context(|| format!("no event with key {key:?}"))?;
            if format.json {
                println!("{}", serde_json::to_string_pretty(&event)?);
            } else {
                let (key, event_type) = (
                    escape_controls(&event.key),
                    escape_controls(&event.event_type),
                );
                println!("event:    {key} ({event_type})");
                println!("received: {}", event.received_at);
                println!("body:     {}", event.body);
                print_deliveries(&event.deliveries, false)?;
            }
        }
        EventsCommand::Replay { key, plugin } => {
            let n = store.replay_event(&key, plugin.as_deref())?;
            if n == 0 {
                bail!("nothing to replay for {key:?}");
            }
            println!("{n} deliveries pending again");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn dlq(at: &Location, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let store = open(at)?;
    match command {
        DlqCommand::List { format } => {
            let filter = Filter {
                status: Some(Status::Dead),
                ..Filter::default()
            };
            print_deliveries(&store.deliveries(&filter)?, format.json)?;
        }
        DlqCommand::Replay { all, ids } => {
            if !all && ids.is_empty() {
                bail!("name delivery ids to replay, or pass --all");
            }
            let n = store.replay_dead(if all { None } else { Some(&ids) })?;
            println!("{n} dead deliveries pending again");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn plugins(at: &Location, command: PluginsCommand) -> anyhow::Result<ExitCode> {
    let format = match command {
        PluginsCommand::List { format } => format,
        PluginsCommand::Release { name } => return release(&at.db, &name),
    };
    let store = open(at)?;
    let rows = store.plugins()?;
    if format.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    let age = rows
        .iter()
        .map(|r| r.updated_at)
        .max()
        .map(|at| (now_ms() - at) / 1000);
    print!("{}", Table(&rows));
    if let Some(age) = age.filter(|&a| a > 5) {
        println!("(saved {age} s ago: the server may not be running)");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn kv(at: &Location, command: KvCommand) -> anyhow::Result<ExitCode> {
    let store = open(at)?;
    let failed = |e: String| anyhow::anyhow!("{e}");
    match command {
        KvCommand::List {
            plugin,
            prefix,
            limit,
        } => {
            let keys = store
                .kv_keys(&plugin, prefix.as_deref().unwrap_or(""), limit)
                .map_err(failed)?;
            for key in keys {
                let size = store
                    .kv_get(&plugin, &key)
                    .map_err(failed)?
                    .map_or(0, |v| v.len());
                println!("{}\t{size} bytes", escape_controls(&key));
            }
            Ok(ExitCode::SUCCESS)
        }
        KvCommand::Get { plugin, key } => match store.kv_get(&plugin, &key).map_err(failed)? {
            Some(value) => {
                println!("{}", escape_controls(&String::from_utf8_lossy(&value)));
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("{plugin} has no key {}", escape_controls(&key));
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

fn release(db: &Path, name: &str) -> anyhow::Result<ExitCode> {
    let admin = AdminFile::read(db)?;
    let url = format!(
        "{}{}",
        admin.url,
        RELEASE_ROUTE.replace("{name}", &urlencode(name))
    );
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut request = reqwest::Client::new()
            .post(&url)
            .json(&serde_json::json!({}));
        if !admin.token.is_empty() {
            request = request.bearer_auth(&admin.token);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", admin.url))?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "{status}: {}",
                body["error"].as_str().unwrap_or("no reason given")
            );
        }
        println!("{name} released: its held deliveries run now");
        Ok(ExitCode::SUCCESS)
    })
}

/// A plugin name as one URL path segment.
fn urlencode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_deliveries(rows: &[DeliveryRecord], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    println!(
        "{:>8}  {:<10} {:>8}  {:<16} {:<22} {:<32} last failure",
        "id", "status", "attempts", "plugin", "type", "event"
    );
    for d in rows {
        let failure = match (d.last_failure_kind, &d.last_failure_message) {
            (Some(kind), Some(message)) => format!("{kind}: {}", escape_controls(message)),
            _ => String::new(),
        };
        println!(
            "{:>8}  {:<10} {:>8}  {:<16} {:<22} {:<32} {failure}",
            d.id,
            d.status.as_str(),
            d.attempts,
            escape_controls(&d.plugin),
            escape_controls(&d.event_type),
            escape_controls(&d.event_key)
        );
    }
    Ok(())
}
