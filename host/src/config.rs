//! [`Config`]: how a host is set up, its defaults, and the one check of it.
//!
//! Owns every setting an embedding app or the command line can change, the
//! named defaults, and [`Config::validate`], which [`Hooks::new`] runs before
//! anything starts: a bad value is an error naming the field, never a panic
//! or odd behaviour later. It starts nothing itself.
//!
//! [`Hooks::new`]: crate::Hooks::new

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::health::{DEFAULT_QUARANTINE_AFTER, DEFAULT_QUARANTINE_PROBE_AFTER};
use crate::loader::Grants;
use crate::manifest::EnvGrant;
use crate::retry::RetryPolicy;
use crate::runtime::egress::HttpPolicy;
use crate::runtime::kv::KvPolicy;
use crate::runtime::{DEFAULT_CACHE_MAX_BYTES, LimitPolicy};
use crate::signature::{Secret, Secrets};
use crate::store::DEFAULT_DB_PATH;

/// Default webhook route, as in the StateSet webhook document.
pub const DEFAULT_PATH: &str = "/webhooks/stateset";

/// The health route `server::app` serves beside the webhook; the webhook
/// route may not take it.
pub const HEALTH_PATH: &str = "/healthz";

/// Default body limit: StateSet events are a few KiB; 1 MiB leaves room for
/// large orders and refuses abuse early.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// The largest body limit accepted: every accepted body is held in memory
/// and stored whole, so a limit past this is a mistake, not a need.
pub const MAX_BODY_LIMIT: usize = 64 << 20;

/// Deliveries held in memory for the workers; the rest wait in the store.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;

/// The largest worker queue: its slots are allocated up front, and past a
/// million the store is the better place for waiting work.
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;

/// The most the database may grow to before new events get 503 with
/// `Retry-After`: what the store can hold is the limit, not how far one
/// plugin is behind. 8 GiB holds a million events of a few KiB with their
/// deliveries several times over (a plugin down for days at a steady
/// webhook rate), and keeps an outage from filling the disk the rest of the
/// machine needs.
pub const DEFAULT_STORE_MAX_BYTES: u64 = 8 << 30;

/// The smallest database size limit accepted: the schema and a few of the
/// largest bodies must fit.
pub const MIN_STORE_MAX_BYTES: u64 = 16 << 20;

/// The most worker threads: each is also a slot in the instance pool, which
/// reserves address space for the largest memories a call may grow.
pub const MAX_WORKERS: usize = 1024;

/// How long a write waits for a lock held by another connection (a
/// command-line replay, a `sqlite3` shell) before the request gets 503.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The compile cache, in the working directory like the database.
pub const DEFAULT_CACHE_DIR: &str = "stateset-hooks-cache";

/// How long events whose deliveries all succeeded are kept.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest retention accepted, 100 years: past any real need, and far
/// inside the millisecond timestamps the purge computes its cut-off in (a
/// retention that overflowed them would purge everything at once).
pub const MAX_RETENTION: Duration = Duration::from_secs(36_500 * 24 * 3600);

/// How long a client has to send a request's headers once it sends the
/// first byte: StateSet sends a few hundred bytes at once, so 10 s is generous
/// on a slow network and holds a client that trickles them (slowloris) no
/// longer than that.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has to send a whole body once its headers are in: the
/// default 1 MiB limit at a slow 50 KiB/s takes 20 s; past 30 s it is
/// trickling. Answered with 408.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection may wait for its next request (after opening, or
/// after its last response): keep-alive spares a sender a handshake per
/// webhook in a burst, and 30 s of silence means the burst is over.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections served at once; more wait in the listen backlog until one
/// closes. Each is a socket and a task: 512 is half the common default limit
/// of 1024 open files, leaving the rest for the database, plugins and cache.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// The most connections accepted as a setting: each holds a file
/// descriptor, and past this the process limit is the real cap anyway.
pub const MAX_CONNECTIONS: usize = 1 << 16;

/// The longest header, body or idle timeout accepted: an hour already lets
/// one client hold a connection for an hour; longer is a mistake.
pub const MAX_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long shutdown lets running plugin calls finish before cutting them:
/// ten default call deadlines, well inside the 30 s most process managers
/// wait between SIGTERM and SIGKILL.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What one client connection may take, enforced by [`crate::server::run`]
/// (an app that serves the router itself applies its own; the body timeout
/// is the route's and applies everywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From a request's first byte to the end of its headers.
    pub header_timeout: Duration,
    /// Waiting for a request's first byte, on a new or kept-alive connection.
    pub idle_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The Standard Webhooks route: where, its `whsec_` secrets
/// ([`crate::standard::parse_secrets`]), and how far a message's timestamp
/// may be from now either way.
#[derive(Debug, Clone)]
pub struct StandardRoute {
    pub path: String,
    pub secrets: Secrets,
    pub tolerance: Duration,
}

/// Where the Standard Webhooks route is unless configured.
pub const DEFAULT_STANDARD_PATH: &str = "/webhooks/standard";

/// How the host is set up. Build with [`Config::new`] and change fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// The webhook secrets: a signature made with any of them is accepted
    /// (several while a sender rotates; [`Hooks::set_secrets`] replaces them
    /// while it runs).
    ///
    /// [`Hooks::set_secrets`]: crate::Hooks::set_secrets
    pub secrets: Secrets,
    /// The route the webhook is served on.
    pub path: String,
    /// A second route, for senders that sign as Standard Webhooks do
    /// (`webhook-id`, `webhook-timestamp`, `webhook-signature`); off when
    /// `None`.
    pub standard: Option<StandardRoute>,
    /// Largest body accepted, in bytes.
    pub body_limit: usize,
    /// How long a body may take to arrive once the headers are in (then 408).
    pub body_timeout: Duration,
    /// Header and idle timeouts and the connection cap of `server::run`.
    pub connections: ConnectionLimits,
    /// Directory of `*.wasm` plugins (with optional `NAME.toml` manifests).
    pub plugins_dir: Option<PathBuf>,
    /// Limits for every plugin call, and the most a manifest may raise them to.
    pub limits: LimitPolicy,
    /// Environment variables every plugin's manifest may read with
    /// `{ env = "VAR" }`, besides its own `STATESET_PLUGIN_<NAME>__*`. Never
    /// the webhook secret.
    pub plugin_env: BTreeSet<String>,
    /// Outbound HTTP: whether a host a manifest's `[http] allowed_hosts`
    /// names exactly may resolve to a private address (loopback, RFC 1918,
    /// link-local, unique local, ...; off by default: plugins reach public
    /// addresses only), and the most a manifest's `[http]` may ask for.
    pub http: HttpPolicy,
    /// The largest `[kv] quota_kib` a manifest may ask for.
    pub kv: KvPolicy,
    /// Different events failing in a row after which a plugin is
    /// quarantined (its deliveries held until released); 0 never.
    pub quarantine_after: u32,
    /// How long a quarantined plugin rests before one held delivery is tried
    /// as a probe; its success lifts the quarantine.
    pub quarantine_probe_after: Duration,
    /// Plugin worker threads: also the most instances alive at once.
    pub workers: usize,
    /// Deliveries held in memory for the workers.
    pub queue_capacity: usize,
    /// The SQLite database file.
    pub db_path: PathBuf,
    /// A PostgreSQL store instead of the SQLite file: several hosts share
    /// it. `db_path` then only places the admin token file (`<db>.admin`).
    pub postgres: Option<crate::store::PgOptions>,
    /// How long a store write waits for a lock before failing as busy (503).
    pub busy_timeout: Duration,
    /// Retry schedule for failed deliveries.
    pub retry: RetryPolicy,
    /// The most the database may grow to, in bytes; past it new events get 503.
    pub store_max_bytes: u64,
    /// How long events whose deliveries all succeeded are kept.
    pub retention: Duration,
    /// Reload plugins when files in `plugins_dir` change.
    pub watch: bool,
    /// Where compiled components are cached across restarts; `None` compiles
    /// every start. Never inside `plugins_dir`: it holds native code the host
    /// runs, and the plugin directory is the plugin authors'.
    pub cache_dir: Option<PathBuf>,
    /// The compile cache's size cap; past it, entries no loaded plugin uses
    /// are evicted.
    pub cache_max_bytes: u64,
    /// How long [`Hooks::shutdown`](crate::Hooks::shutdown) waits for running
    /// plugin calls before cutting them short.
    pub shutdown_grace: Duration,
}

/// A setting [`Config::validate`] refused, named by its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The field as written in [`Config`], e.g. `workers` or `limits.defaults.timeout`.
    pub field: &'static str,
    pub reason: String,
}

impl Config {
    /// Every secret, as bytes and as the text it may be written in (a
    /// `whsec_` secret's base64): what no plugin may read.
    fn withheld(&self) -> Vec<Secret> {
        let mut all: Vec<Secret> = self.secrets.iter().cloned().collect();
        if let Some(standard) = &self.standard {
            for secret in standard.secrets.iter() {
                all.push(secret.clone());
                all.extend(crate::standard::text_forms(secret));
            }
        }
        all
    }

    pub fn new(secret: Secret) -> Self {
        Self {
            secrets: Secrets::one(secret),
            path: DEFAULT_PATH.to_owned(),
            body_limit: DEFAULT_BODY_LIMIT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            connections: ConnectionLimits::default(),
            plugins_dir: None,
            standard: None,
            limits: LimitPolicy::default(),
            plugin_env: BTreeSet::new(),
            http: HttpPolicy::default(),
            kv: KvPolicy::default(),
            quarantine_after: DEFAULT_QUARANTINE_AFTER,
            quarantine_probe_after: DEFAULT_QUARANTINE_PROBE_AFTER,
            workers: default_workers(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            db_path: DEFAULT_DB_PATH.into(),
            postgres: None,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            retry: RetryPolicy::default(),
            store_max_bytes: DEFAULT_STORE_MAX_BYTES,
            retention: DEFAULT_RETENTION,
            watch: true,
            cache_dir: Some(DEFAULT_CACHE_DIR.into()),
            cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    /// Check every setting; the first bad one is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field, reason: String| Err(ConfigError { field, reason });
        if !is_route(&self.path) {
            return fail(
                "path",
                format!(
                    "{:?} is not a route: '/' then segments of letters, digits, '-', '_', '.', '~'",
                    self.path
                ),
            );
        }
        if self.path == HEALTH_PATH {
            return fail("path", format!("{HEALTH_PATH} is the health route"));
        }
        if let Some(standard) = &self.standard {
            if !is_route(&standard.path) || [HEALTH_PATH, &self.path].contains(&&*standard.path) {
                return fail(
                    "standard.path",
                    format!(
                        "{:?} is not a route of its own beside {:?} and {HEALTH_PATH}",
                        standard.path, self.path
                    ),
                );
            }
            if standard.tolerance.is_zero() {
                return fail("standard.tolerance", "must be more than zero".into());
            }
        }
        let ranges = [
            ("body_limit", self.body_limit, MAX_BODY_LIMIT),
            ("workers", self.workers, MAX_WORKERS),
            ("queue_capacity", self.queue_capacity, MAX_QUEUE_CAPACITY),
            (
                "connections.max_connections",
                self.connections.max_connections,
                MAX_CONNECTIONS,
            ),
            (
                "retry.max_attempts",
                self.retry.max_attempts as usize,
                usize::MAX,
            ),
        ];
        for (field, value, max) in ranges {
            if value == 0 || value > max {
                let reason = if max == usize::MAX {
                    format!("must be greater than zero, got {value}")
                } else {
                    format!("must be between 1 and {max}, got {value}")
                };
                return fail(field, reason);
            }
        }
        if !(0.0..=1.0).contains(&self.retry.jitter) {
            return fail(
                "retry.jitter",
                format!("must be between 0 and 1, got {}", self.retry.jitter),
            );
        }
        if self.retry.base_delay > self.retry.max_delay {
            return fail(
                "retry.base_delay",
                "must not be longer than retry.max_delay".into(),
            );
        }
        let timeouts = [
            ("quarantine_probe_after", self.quarantine_probe_after),
            ("body_timeout", self.body_timeout),
            (
                "connections.header_timeout",
                self.connections.header_timeout,
            ),
            ("connections.idle_timeout", self.connections.idle_timeout),
        ];
        for (field, value) in timeouts {
            if value.is_zero() || value > MAX_CONNECTION_TIMEOUT {
                return fail(
                    field,
                    format!(
                        "must be between 1 ms and {} s, got {value:?}",
                        MAX_CONNECTION_TIMEOUT.as_secs()
                    ),
                );
            }
        }
        if self.store_max_bytes < MIN_STORE_MAX_BYTES {
            return fail(
                "store_max_bytes",
                format!(
                    "must be at least {} MiB, got {} bytes",
                    MIN_STORE_MAX_BYTES >> 20,
                    self.store_max_bytes
                ),
            );
        }
        if self.retention.is_zero() || self.retention > MAX_RETENTION {
            return fail(
                "retention",
                format!(
                    "must be longer than zero and at most {} days, got {} s",
                    MAX_RETENTION.as_secs() / 86_400,
                    self.retention.as_secs()
                ),
            );
        }
        if let Err(reason) = self.limits.validate() {
            return fail("limits", reason);
        }
        if let Err(reason) = self.grants().env.validate() {
            return fail("plugin_env", reason);
        }
        if let Some(dir) = &self.plugins_dir
            && !dir.is_dir()
        {
            return fail(
                "plugins_dir",
                format!("{} is not a directory", dir.display()),
            );
        }
        if let (Some(plugins), Some(cache)) = (&self.plugins_dir, &self.cache_dir)
            && resolved(cache).starts_with(resolved(plugins))
        {
            return fail(
                "cache_dir",
                format!(
                    "{} is inside the plugin directory {}: the cache holds native code \
                     the host runs, and the plugin directory is the plugin authors'",
                    cache.display(),
                    plugins.display()
                ),
            );
        }
        Ok(())
    }
}

impl Config {
    /// What the operator grants every plugin: limits, each its own
    /// `STATESET_PLUGIN_<NAME>__*` and [`Config::plugin_env`] (never the
    /// webhook secret), and outbound HTTP and kv within their policies.
    pub fn grants(&self) -> Grants {
        Grants {
            limits: self.limits.clone(),
            env: self.withheld().into_iter().fold(
                EnvGrant::new(self.plugin_env.iter().cloned()),
                EnvGrant::withholding,
            ),
            http: self.http.clone(),
            kv: self.kv,
        }
    }
}

/// `path` made absolute with its links resolved, as far as it exists (a cache
/// directory may not exist yet).
fn resolved(path: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut existing = path;
    loop {
        if let Ok(real) = existing.canonicalize() {
            return missing.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_owned());
                existing = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
            }
            _ => return path.to_owned(),
        }
    }
}

/// One worker per core: plugin calls are CPU-bound.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// A literal route axum takes as is: no parameters, wildcards or empty segments.
fn is_route(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    rest.split('/').all(|segment| {
        !segment.is_empty()
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new(Secret::new("s").unwrap())
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(config().validate(), Ok(()));
    }

    #[test]
    fn each_bad_setting_is_named() {
        type Edit = fn(&mut Config);
        let cases: [(&str, Edit); 14] = [
            ("path", |c| c.path = "webhooks".into()),
            ("path", |c| c.path = "/hooks/{id}".into()),
            ("path", |c| c.path = "/healthz".into()),
            ("workers", |c| c.workers = 0),
            ("workers", |c| c.workers = MAX_WORKERS + 1),
            ("body_limit", |c| c.body_limit = 0),
            ("body_timeout", |c| c.body_timeout = Duration::ZERO),
            ("retention", |c| c.retention = Duration::MAX),
            ("connections.idle_timeout", |c| {
                c.connections.idle_timeout = Duration::from_secs(7200)
            }),
            ("connections.max_connections", |c| {
                c.connections.max_connections = 0
            }),
            ("limits", |c| c.limits.max.memory_bytes = 4 << 30),
            ("plugin_env", |c| {
                c.plugin_env.insert(crate::signature::SECRET_ENV.into());
            }),
            ("plugins_dir", |c| {
                c.plugins_dir = Some("/no/such/dir".into())
            }),
            ("cache_dir", |c| {
                c.plugins_dir = Some(std::env::temp_dir());
                c.cache_dir = Some(std::env::temp_dir().join("new/../cache"));
            }),
        ];
        for (field, change) in cases {
            let mut config = config();
            change(&mut config);
            let error = config.validate().unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
    }

    #[test]
    fn routes_are_literal_paths() {
        assert!(is_route("/webhooks/stateset"));
        assert!(is_route("/v1/hooks.stateset~x_y-z"));
        for bad in ["", "/", "//x", "/x/", "/:id", "/*rest", "/a b", "x"] {
            assert!(!is_route(bad), "{bad:?}");
        }
    }
}
