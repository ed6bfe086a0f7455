//! [`Hooks`]: the one type an application holds, whether it is the
//! `stateset-hooks` binary or an existing axum app that embeds the webhook
//! route. The composition root: the only module that knows every other one.
//!
//! [`Hooks::new`] checks the [`Config`], opens the store, builds the runtime,
//! loads the plugins, and starts the dispatcher, the watcher and the
//! housekeeping loops; [`Hooks::router`] hands out the route;
//! [`Hooks::shutdown`] stops it all in order.

use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::config::{Config, ConnectionLimits};
use crate::dispatch::{DispatchSettings, Dispatcher, Report};
use crate::housekeeping::Housekeeping;
use crate::http::{self, Endpoint};
use crate::loader::Loader;
use crate::metrics::Metrics;
use crate::registry::{LoadFailure, LoadedPlugin, Registry};
use crate::runtime::{CacheConfig, Runtime};
use crate::signature::Secrets;
use crate::status::PluginStatus;
use crate::store::{PgStore, SqliteStore, Store, now_ms};
use crate::watch::Watcher;

/// Secrets the routes read at each request and [`Hooks`] may replace.
type SharedSecrets = Arc<std::sync::RwLock<Arc<Secrets>>>;

fn shared(secrets: Secrets) -> SharedSecrets {
    Arc::new(std::sync::RwLock::new(Arc::new(secrets)))
}

/// A running webhook host: plugins loaded, workers started. Clones share it.
#[derive(Debug, Clone)]
pub struct Hooks {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: String,
    db_path: std::path::PathBuf,
    secrets: SharedSecrets,
    body_limit: usize,
    body_timeout: std::time::Duration,
    connections: ConnectionLimits,
    dispatcher: Arc<Dispatcher>,
    registry: Arc<Registry>,
    runtime: Arc<Runtime>,
    metrics: Metrics,
    /// The Standard Webhooks route: where, its secrets, its tolerance.
    standard: Option<(String, SharedSecrets, std::time::Duration)>,
    /// Held for the whole shutdown, so a second caller waits for the first.
    stopping: Mutex<()>,
    /// Taken at shutdown: nothing reloads once shutdown begins; the last
    /// status snapshot is written once the dispatcher has stopped.
    watcher: Mutex<Option<Watcher>>,
    loader: Mutex<Option<Arc<Loader>>>,
    housekeeping: Mutex<Option<Housekeeping>>,
}

impl Hooks {
    /// Check the configuration, open the store, load the plugins and start
    /// the workers; deliveries left pending by an earlier run resume. Plugins
    /// that fail to load are logged and listed in [`Hooks::load_failures`];
    /// the host runs on. A bad setting is an error naming its field.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        let store: Arc<dyn Store> = match &config.postgres {
            Some(options) => {
                Arc::new(PgStore::open(options.clone()).map_err(|e| anyhow::anyhow!("{e}"))?)
            }
            None => Arc::new(
                SqliteStore::open_capped(
                    &config.db_path,
                    config.busy_timeout,
                    config.store_max_bytes,
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
        };
        // One pool slot per worker: the workers can never exhaust it.
        let cache = config.cache_dir.clone().map(|dir| CacheConfig {
            dir,
            max_bytes: config.cache_max_bytes,
        });
        // A slot per worker, and one for the shadow runner.
        let runtime = Arc::new(Runtime::new(cache.as_ref(), config.workers + 1)?);
        runtime.use_kv(store.clone());
        let registry = Arc::new(Registry::default());
        let (mut loader, mut watcher) = (None, None);
        if let Some(dir) = &config.plugins_dir {
            let started = Arc::new(Loader::start(
                dir.clone(),
                runtime.clone(),
                registry.clone(),
                config.grants(),
                store.clone(),
            )?);
            // Watch first: a file deployed while the others load is queued too.
            if config.watch {
                watcher = Some(Watcher::start(dir, started.clone())?);
            }
            started.load_all()?;
            loader = Some(started);
        }
        let settings = DispatchSettings {
            workers: config.workers,
            queue_capacity: config.queue_capacity,
            retry: config.retry.clone(),
            quarantine_after: config.quarantine_after,
            quarantine_probe_after: config.quarantine_probe_after,
            shutdown_grace: config.shutdown_grace,
        };
        let metrics = Metrics::new(store.clone(), registry.clone());
        let dispatcher = Arc::new(Dispatcher::start(
            runtime.clone(),
            registry.clone(),
            store.clone(),
            metrics.clone(),
            &settings,
        ));
        let housekeeping = Housekeeping::start(store, registry.clone(), config.retention)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: config.path,
                db_path: config.db_path,
                secrets: shared(config.secrets),
                body_limit: config.body_limit,
                body_timeout: config.body_timeout,
                connections: config.connections,
                dispatcher,
                registry,
                runtime,
                metrics,
                standard: config
                    .standard
                    .map(|s| (s.path, shared(s.secrets), s.tolerance)),
                stopping: Mutex::new(()),
                watcher: Mutex::new(watcher),
                loader: Mutex::new(loader),
                housekeeping: Mutex::new(Some(housekeeping)),
            }),
        })
    }

    /// The webhook route, ready to `merge` into an app's `Router`. The route
    /// keeps the host running even if every `Hooks` handle is dropped.
    pub fn router(&self) -> axum::Router {
        let endpoint = Endpoint {
            secrets: self.inner.secrets.clone(),
            body_limit: self.inner.body_limit,
            body_timeout: self.inner.body_timeout,
            dispatcher: self.inner.dispatcher.clone(),
            metrics: self.inner.metrics.clone(),
            standard: self
                .inner
                .standard
                .as_ref()
                .map(|(_, secrets, tolerance)| (secrets.clone(), *tolerance)),
            _keep_alive: self.inner.clone(),
        };
        let standard = self.inner.standard.as_ref().map(|(path, ..)| path.as_str());
        http::router(&self.inner.path, standard, Arc::new(endpoint))
    }

    /// Names of the host's long-lived threads that have ended while it runs
    /// (a worker, the poller, the recorder, the store writer, a housekeeping
    /// loop): empty when healthy. `/healthz` answers 503 naming them.
    pub fn threads_gone(&self) -> Vec<String> {
        let mut gone = self.inner.dispatcher.threads_gone();
        gone.extend(self.store().threads_gone());
        if let Some(housekeeping) = &*self.inner.housekeeping.lock().expect("housekeeping lock") {
            gone.extend(housekeeping.threads_gone());
        }
        gone
    }

    /// The host's metrics: [`Metrics::encode`] for a scrape body, or
    /// [`Metrics::register`] into an app's own registry.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Replace the webhook secrets (a rotation: old and new, then new
    /// alone); the next request is checked against these.
    pub fn set_secrets(&self, secrets: Secrets) {
        let fingerprints = secrets.fingerprints();
        *self.inner.secrets.write().expect("secrets lock") = Arc::new(secrets);
        tracing::info!(secrets = %fingerprints, "webhook secrets replaced");
    }

    /// Replace the Standard Webhooks route's secrets; false (and nothing
    /// done) when the host serves no such route.
    pub fn set_standard_secrets(&self, secrets: Secrets) -> bool {
        let Some((_, current, _)) = &self.inner.standard else {
            return false;
        };
        let fingerprints = secrets.fingerprints();
        *current.write().expect("secrets lock") = Arc::new(secrets);
        tracing::info!(secrets = %fingerprints, "Standard Webhooks secrets replaced");
        true
    }

    /// The database file.
    pub fn db_path(&self) -> &std::path::Path {
        &self.inner.db_path
    }

    /// What `server::run` allows each client connection.
    pub fn connection_limits(&self) -> ConnectionLimits {
        self.inner.connections
    }

    /// Every plugin report from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Report> {
        self.inner.dispatcher.subscribe()
    }

    /// The serving plugins.
    pub fn plugins(&self) -> Arc<[Arc<LoadedPlugin>]> {
        self.inner.registry.snapshot()
    }

    /// Every plugin name the host knows and where it stands, as `plugins list` shows it.
    pub fn status(&self) -> Vec<PluginStatus> {
        self.inner.registry.status(now_ms())
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn Store> {
        self.inner.dispatcher.store()
    }

    /// Load plugin `name` from the plugin directory again, as the watcher
    /// would on a change (or unload it if its file is gone).
    pub fn reload(&self, name: &str) {
        if let Some(loader) = &*self.inner.loader.lock().expect("loader lock") {
            loader.request(name);
        }
    }

    /// Lift a plugin's quarantine: its held deliveries run from the next
    /// poll. Returns false if no plugin has that name.
    pub fn release(&self, name: &str) -> bool {
        let Some(plugin) = self.inner.registry.get(name) else {
            return false;
        };
        plugin.health.release();
        tracing::info!(plugin = name, version = %plugin.version, "plugin released from quarantine");
        true
    }

    /// Plugin files that did not load, with the reasons.
    pub fn load_failures(&self) -> Vec<LoadFailure> {
        self.inner.registry.failures()
    }

    /// The runtime, to run a plugin directly.
    pub fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    /// Stop gracefully: new webhooks get 503 with `Retry-After`; queued
    /// deliveries stay pending in the store; plugin calls running now get up
    /// to [`Config::shutdown_grace`] to finish and are cut after it (a cut
    /// call is not an attempt: it runs at the next start); every outcome is
    /// recorded and the plugin status saved one last time; the watcher, the
    /// loader (a compile in progress finishes but is not swapped in) and the
    /// housekeeping loops stop. Each write was committed and synced when it
    /// was made, so nothing is left to flush. A cut call, even one waiting
    /// inside a host call, returns within an epoch tick. Later calls wait
    /// for the first to finish.
    pub async fn shutdown(&self) {
        let inner = self.inner.clone();
        let stopped = tokio::task::spawn_blocking(move || inner.shutdown());
        if let Err(error) = stopped.await {
            tracing::error!(%error, "shutdown did not finish cleanly");
        }
    }
}

impl Inner {
    fn shutdown(&self) {
        let _one_at_a_time = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
        self.watcher.lock().expect("watcher lock").take();
        self.loader.lock().expect("loader lock").take();
        self.dispatcher.shutdown();
        self.housekeeping.lock().expect("housekeeping lock").take();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}
