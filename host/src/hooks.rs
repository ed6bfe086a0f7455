//! [`Hooks`]: the one type an application holds, whether it is this crate's
//! binary or an existing axum app that embeds the webhook route.
//!
//! Owns the host's configuration and wiring: it loads the plugins, starts the
//! dispatcher and hands out the `Router`. The binary's `serve` is a thin
//! wrapper over the same calls (see `server.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::dispatch::{Dispatcher, Report};
use crate::health::DEFAULT_QUARANTINE_AFTER;
use crate::registry::{self, LimitPolicy, LoadFailure, Plugin, Registry};
use crate::retry::RetryPolicy;
use crate::runtime::Runtime;
use crate::signature::Secret;
use crate::store::{DEFAULT_DB_PATH, SqliteStore, Store};
use crate::watch::{Reloader, Watcher};

/// Default webhook route, as in the StateSet webhook document.
pub const DEFAULT_PATH: &str = "/webhooks/stateset";

/// Default body limit: StateSet events are a few KiB; 1 MiB leaves room for
/// large orders and refuses abuse early.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// Deliveries held in memory for the workers; the rest wait in the store.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;

/// Deliveries waiting for a first attempt before new events get 503 with
/// `Retry-After`: about a minute of work at the plugin rates measured on a
/// 2-core machine, so a sender is slowed before the backlog grows unbounded.
pub const DEFAULT_BACKLOG_HIGH_WATER: usize = 100_000;

/// How long a write waits for a lock held by another connection (a
/// command-line replay, a `sqlite3` shell) before the request gets 503.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The compile cache, in the working directory like the database.
pub const DEFAULT_CACHE_DIR: &str = "stateset-hooks-cache";

/// How long events whose deliveries all succeeded are kept.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How the host is set up. Build with [`Config::new`] and change fields.
#[derive(Debug, Clone)]
pub struct Config {
    pub secret: Secret,
    /// The route the webhook is served on.
    pub path: String,
    /// Largest body accepted, in bytes.
    pub body_limit: usize,
    /// Directory of `*.wasm` plugins (with optional `NAME.toml` manifests).
    pub plugins_dir: Option<PathBuf>,
    /// Limits for every plugin call, and the most a manifest may raise them to.
    pub limits: LimitPolicy,
    /// Consecutive failures after which a plugin is quarantined; 0 never.
    pub quarantine_after: u32,
    /// Plugin worker threads: also the most instances alive at once.
    pub workers: usize,
    /// Deliveries held in memory for the workers.
    pub queue_capacity: usize,
    /// The SQLite database file.
    pub db_path: PathBuf,
    /// How long a store write waits for a lock before failing as busy (503).
    pub busy_timeout: Duration,
    /// Retry schedule for failed deliveries.
    pub retry: RetryPolicy,
    /// Backlog (deliveries waiting for a first attempt) at which new events get 503.
    pub backlog_high_water: usize,
    /// How long events whose deliveries all succeeded are kept.
    pub retention: Duration,
    /// Reload plugins when files in `plugins_dir` change.
    pub watch: bool,
    /// Where compiled components are cached across restarts; `None` compiles
    /// every start.
    pub cache_dir: Option<PathBuf>,
}

impl Config {
    pub fn new(secret: Secret) -> Self {
        Self {
            secret,
            path: DEFAULT_PATH.to_owned(),
            body_limit: DEFAULT_BODY_LIMIT,
            plugins_dir: None,
            limits: LimitPolicy {
                defaults: Default::default(),
                max: crate::runtime::Limits::host_max(),
            },
            quarantine_after: DEFAULT_QUARANTINE_AFTER,
            workers: default_workers(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            db_path: DEFAULT_DB_PATH.into(),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            retry: RetryPolicy::default(),
            backlog_high_water: DEFAULT_BACKLOG_HIGH_WATER,
            retention: DEFAULT_RETENTION,
            watch: true,
            cache_dir: Some(DEFAULT_CACHE_DIR.into()),
        }
    }
}

/// One worker per core: plugin calls are CPU-bound.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// What the HTTP handlers share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Config,
    pub dispatcher: Dispatcher,
}

/// A running webhook host: plugins loaded, workers started.
#[derive(Debug, Clone)]
pub struct Hooks {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    runtime: Arc<Runtime>,
    _watcher: Option<Arc<Watcher>>,
}

impl Hooks {
    /// Open the store, load the plugins and start the workers; deliveries
    /// left pending by an earlier run resume. Plugins that fail to load are
    /// logged and listed in [`Hooks::load_failures`]; the host runs on.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&config.db_path, config.busy_timeout)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let runtime = Arc::new(Runtime::new(config.cache_dir.as_deref())?);
        let loaded = match &config.plugins_dir {
            Some(dir) => registry::load_dir(&runtime, dir, &config.limits, true)?,
            None => Default::default(),
        };
        let deferred: Vec<Arc<str>> = loaded.deferred.iter().map(|(n, _)| n.clone()).collect();
        let registry = Arc::new(Registry::new(loaded));
        let mut watcher = None;
        if let Some(dir) = &config.plugins_dir {
            let reloader = Reloader {
                dir: dir.clone(),
                runtime: runtime.clone(),
                registry: registry.clone(),
                limits: config.limits.clone(),
                store: store.clone(),
            };
            if !deferred.is_empty() {
                let reloader = reloader.clone();
                std::thread::Builder::new()
                    .name("plugin-loader".into())
                    .spawn(move || deferred.iter().for_each(|name| reloader.reload(name)))?;
            }
            if config.watch {
                watcher = Some(Arc::new(Watcher::start(reloader)?));
            }
        }
        let dispatcher = Dispatcher::start(runtime.clone(), registry.clone(), store, &config);
        Ok(Self {
            shared: Arc::new(Shared { config, dispatcher }),
            registry,
            runtime,
            _watcher: watcher,
        })
    }

    /// The webhook route, ready to `merge` into an app's `Router`.
    pub fn router(&self) -> axum::Router {
        crate::http::router(self.shared.clone())
    }

    /// Every plugin report from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Report> {
        self.shared.dispatcher.subscribe()
    }

    /// The loaded plugins.
    pub fn plugins(&self) -> Arc<[Arc<Plugin>]> {
        self.registry.snapshot()
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn Store> {
        self.shared.dispatcher.store()
    }

    /// Lift a plugin's quarantine. Returns false if no plugin has that name.
    pub fn release(&self, name: &str) -> bool {
        let Some(plugin) = self.registry.get(name) else {
            return false;
        };
        plugin.health.release();
        tracing::info!(plugin = name, version = %plugin.version, "plugin released from quarantine");
        true
    }

    /// Plugin files that did not load, with the reasons.
    pub fn load_failures(&self) -> Vec<LoadFailure> {
        self.registry.failures()
    }

    /// The runtime, to run a plugin directly.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }
}
