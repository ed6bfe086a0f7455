//! [`Hooks`]: the one type an application holds, whether it is this crate's
//! binary or an existing axum app that embeds the webhook route.
//!
//! Owns the host's configuration and wiring: it loads the plugins, starts the
//! dispatcher and hands out the `Router`. The binary's `serve` is a thin
//! wrapper over the same calls (see `server.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::dispatch::{Dispatcher, Report};
use crate::health::DEFAULT_QUARANTINE_AFTER;
use crate::registry::{self, LimitPolicy, LoadFailure, Plugin, Registry};
use crate::runtime::Runtime;
use crate::signature::Secret;

/// Default webhook route, as in the StateSet webhook document.
pub const DEFAULT_PATH: &str = "/webhooks/stateset";

/// Default body limit: StateSet events are a few KiB; 1 MiB leaves room for
/// large orders and refuses abuse early.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// Default events waiting for a worker before new ones get 503: a few seconds
/// of work at the plugin rates measured on a 2-core machine.
pub const DEFAULT_QUEUE_CAPACITY: usize = 10_000;

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
    /// Events queued for workers before the host answers 503.
    pub queue_capacity: usize,
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
    load_failures: Arc<[LoadFailure]>,
}

impl Hooks {
    /// Load the plugins and start the workers. Plugins that fail to load are
    /// logged and listed in [`Hooks::load_failures`]; the host runs on.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let runtime = Arc::new(Runtime::new()?);
        let (plugins, failures) = match &config.plugins_dir {
            Some(dir) => registry::load_dir(&runtime, dir, &config.limits)?,
            None => Default::default(),
        };
        let registry = Arc::new(Registry::new(plugins));
        let dispatcher = Dispatcher::start(runtime.clone(), registry.clone(), &config);
        Ok(Self {
            shared: Arc::new(Shared { config, dispatcher }),
            registry,
            runtime,
            load_failures: failures.into(),
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
    pub fn load_failures(&self) -> &[LoadFailure] {
        &self.load_failures
    }

    /// The runtime, to run a plugin directly.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }
}
