//! `stateset-hooks serve`: flags to a [`Config`], the library's check of it,
//! then the server until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use stateset_hooks::admin::Access;
use stateset_hooks::runtime::egress::{self, HttpPolicy};
use stateset_hooks::runtime::kv::{self, KvPolicy};
use stateset_hooks::runtime::{
    DEFAULT_FUEL, DEFAULT_MAX_FUEL, DEFAULT_MAX_MEMORY_BYTES, DEFAULT_MAX_TIMEOUT,
    DEFAULT_MEMORY_BYTES, DEFAULT_TIMEOUT, LimitPolicy, Limits,
};
use stateset_hooks::{Config, ConfigError, Hooks, config, server};
use stateset_hooks::{Secrets, standard};

/// `--admin-token`'s value, which `Debug` never shows.
#[derive(Clone)]
struct AdminToken(String);

impl std::str::FromStr for AdminToken {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// The webhook secrets, one per line (or comma-separated; `#` starts a
    /// comment), instead of the environment's: read at start and again on
    /// SIGHUP, so a sender's secret rotates without a restart (old and new
    /// while it rotates, then new).
    #[arg(long, value_name = "FILE")]
    secrets_file: Option<PathBuf>,
    /// The Standard Webhooks route (`webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`), served when STATESET_STANDARD_WEBHOOK_SECRETS
    /// holds its `whsec_` secrets.
    #[arg(long, default_value = config::DEFAULT_STANDARD_PATH)]
    standard_path: String,
    /// The Standard Webhooks route's `whsec_` secrets, one per line, instead
    /// of the environment's: read at start and again on SIGHUP.
    #[arg(long, value_name = "FILE")]
    standard_secrets_file: Option<PathBuf>,
    /// How far a Standard Webhooks message's timestamp may be from now,
    /// either way, in seconds; older or newer ones get 401.
    #[arg(long, default_value_t = stateset_hooks::standard::DEFAULT_TOLERANCE.as_secs())]
    standard_tolerance_secs: u64,
    /// Where the admin app listens: `GET /metrics`, the console (`/`) and its
    /// API. Keep it off the public network: it is not the webhook port.
    #[arg(long, default_value = "127.0.0.1:3002")]
    admin_listen: SocketAddr,
    /// The bearer token the admin app requires (16 characters or more)
    /// [default: a random one per start]. Either way it is written, with the
    /// admin address, to `<db>.admin` (mode 0600).
    #[arg(long, env = "STATESET_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<AdminToken>,
    /// Serve the admin app without a token, for development: only with a
    /// loopback --admin-listen, and only to loopback Host names.
    #[arg(long, conflicts_with = "admin_token")]
    admin_dev: bool,
    /// Directory of plugins: every NAME.wasm, with an optional NAME.toml manifest.
    #[arg(long, value_name = "DIR")]
    plugins: PathBuf,
    /// The webhook route.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    path: String,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, default_value_t = config::DEFAULT_BODY_LIMIT)]
    body_limit: usize,
    /// How long a request body may take to arrive once its headers are in,
    /// in ms; a slower one gets 408 and the connection is closed.
    #[arg(long, default_value_t = config::DEFAULT_BODY_TIMEOUT.as_millis() as u64)]
    body_timeout_ms: u64,
    /// How long a request's headers may take from its first byte, in ms;
    /// then the connection is closed.
    #[arg(long, default_value_t = config::DEFAULT_HEADER_TIMEOUT.as_millis() as u64)]
    header_timeout_ms: u64,
    /// How long a connection may wait for its next request (new, or kept
    /// alive after a response), in ms; then it is closed.
    #[arg(long, default_value_t = config::DEFAULT_IDLE_TIMEOUT.as_millis() as u64)]
    idle_timeout_ms: u64,
    /// Connections served at once; more wait to be accepted until one closes.
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Plugin worker threads, also the most plugin instances alive at once
    /// [default: the number of cores].
    #[arg(long)]
    workers: Option<usize>,
    /// Deliveries held in memory for the workers (the rest wait in the store).
    #[arg(long, default_value_t = config::DEFAULT_QUEUE_CAPACITY)]
    queue_capacity: usize,
    /// The most the database may grow to, in MiB; past it new events get 503
    /// with Retry-After (however far behind plugins are, events are kept
    /// until then).
    #[arg(long, default_value_t = config::DEFAULT_STORE_MAX_BYTES >> 20)]
    store_max_mib: u64,
    /// Attempts per delivery, the first included, before it is dead.
    #[arg(long, default_value_t = stateset_hooks::retry::DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,
    /// Days to keep events whose deliveries all succeeded.
    #[arg(long, default_value_t = 7)]
    retention_days: u64,
    /// Where compiled plugins are cached, so a restart does not compile again.
    #[arg(long, value_name = "DIR", default_value = config::DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    /// The compile cache's size cap, in MiB; past it, entries no loaded
    /// plugin uses are evicted, oldest first.
    #[arg(long, default_value_t = stateset_hooks::runtime::DEFAULT_CACHE_MAX_BYTES >> 20)]
    cache_max_mib: u64,
    /// On SIGTERM or Ctrl-C, how long running plugin calls may finish before
    /// they are cut (their deliveries then run at the next start), in ms.
    #[arg(long, default_value_t = config::DEFAULT_SHUTDOWN_GRACE.as_millis() as u64)]
    shutdown_grace_ms: u64,
    #[command(flatten)]
    limits: LimitArgs,
    /// Let every plugin's manifest read this environment variable with
    /// `{ env = "VAR" }` (repeat for more). Plugin NAME reads its own
    /// STATESET_PLUGIN_<NAME>__* without it; the webhook secret never.
    #[arg(long, value_name = "VAR")]
    allow_plugin_env: Vec<String>,
}

/// Limits for each plugin call, and the most a plugin's manifest may ask for.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Fuel (roughly, wasm instructions) per call.
    #[arg(long, default_value_t = DEFAULT_FUEL)]
    fuel: u64,
    /// Linear memory per call, in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_BYTES >> 20)]
    memory_mib: usize,
    /// Wall-clock time per call, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT.as_millis() as u64)]
    timeout_ms: u64,
    /// The most fuel a manifest may ask for; a manifest asking for more is
    /// refused at load.
    #[arg(long, default_value_t = DEFAULT_MAX_FUEL)]
    max_fuel: u64,
    /// The most memory a manifest may ask for, in MiB.
    #[arg(long, default_value_t = DEFAULT_MAX_MEMORY_BYTES >> 20)]
    max_memory_mib: usize,
    /// The longest deadline a manifest may ask for, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_MAX_TIMEOUT.as_millis() as u64)]
    max_timeout_ms: u64,
    /// Let a host a plugin's manifest names exactly in `[http]
    /// allowed_hosts` resolve to a private address (loopback, 10/8,
    /// 192.168/16, link-local, ...). Off: plugins reach public addresses only.
    #[arg(long)]
    allow_private_networks: bool,
    /// The longest per-request time a manifest's `[http] timeout_ms` may ask
    /// for, in milliseconds.
    #[arg(long, default_value_t = egress::DEFAULT_MAX_HTTP_TIMEOUT.as_millis() as u64)]
    max_http_timeout_ms: u64,
    /// The largest request body a manifest's `[http] max_request_kib` may
    /// ask for, in KiB.
    #[arg(long, default_value_t = egress::DEFAULT_MAX_REQUEST_CEILING >> 10)]
    max_http_request_kib: u64,
    /// The largest response body a manifest's `[http] max_response_kib` may
    /// ask for, in KiB.
    #[arg(long, default_value_t = egress::DEFAULT_MAX_RESPONSE_CEILING >> 10)]
    max_http_response_kib: u64,
    /// The most requests per call a manifest's `[http] max_requests` may ask for.
    #[arg(long, default_value_t = egress::DEFAULT_MAX_REQUESTS_CEILING)]
    max_http_requests: u32,
    /// The largest `[kv] quota_kib` a manifest may ask for, in KiB.
    #[arg(long, default_value_t = kv::DEFAULT_MAX_KV_QUOTA_BYTES >> 10)]
    max_kv_quota_kib: u64,
}

impl LimitArgs {
    /// Outbound HTTP, as the flags set it.
    pub fn http(&self) -> HttpPolicy {
        HttpPolicy {
            allow_private_networks: self.allow_private_networks,
            max_timeout: Duration::from_millis(self.max_http_timeout_ms),
            max_request_bytes: self.max_http_request_kib.saturating_mul(1 << 10),
            max_response_bytes: self.max_http_response_kib.saturating_mul(1 << 10),
            max_requests: self.max_http_requests,
        }
    }

    /// Plugin state, as the flags set it.
    pub fn kv(&self) -> KvPolicy {
        KvPolicy {
            max_quota_bytes: self.max_kv_quota_kib.saturating_mul(1 << 10),
        }
    }

    pub fn policy(&self) -> LimitPolicy {
        let LimitPolicy { defaults, max } = LimitPolicy::default();
        LimitPolicy {
            defaults: Limits {
                fuel: Some(self.fuel),
                memory_bytes: self.memory_mib << 20,
                timeout: Duration::from_millis(self.timeout_ms),
                ..defaults
            },
            max: Limits {
                fuel: Some(self.max_fuel),
                memory_bytes: self.max_memory_mib << 20,
                timeout: Duration::from_millis(self.max_timeout_ms),
                ..max
            },
        }
    }
}

/// The flag that sets a [`Config`] field, so a refusal names what the user typed.
fn flag(field: &str, reason: &str) -> &'static str {
    match field {
        "path" => "--path",
        "body_limit" => "--body-limit",
        "body_timeout" => "--body-timeout-ms",
        "connections.header_timeout" => "--header-timeout-ms",
        "connections.idle_timeout" => "--idle-timeout-ms",
        "connections.max_connections" => "--max-connections",
        "plugins_dir" => "--plugins",
        "workers" => "--workers",
        "queue_capacity" => "--queue-capacity",
        "store_max_bytes" => "--store-max-mib",
        "retry.max_attempts" => "--max-attempts",
        "retention" => "--retention-days",
        "plugin_env" => "--allow-plugin-env",
        "cache_dir" => "--cache-dir",
        "limits" if reason.starts_with("max.fuel") => "--max-fuel",
        "limits" if reason.starts_with("max.memory_bytes") => "--max-memory-mib",
        "limits" if reason.starts_with("max.timeout") => "--max-timeout-ms",
        "limits" if reason.contains(".fuel") => "--fuel",
        "limits" if reason.contains(".memory_bytes") => "--memory-mib",
        "limits" if reason.contains(".timeout") => "--timeout-ms",
        _ => "a setting",
    }
}

pub fn serve(args: ServeArgs, at: &crate::store_commands::Location) -> anyhow::Result<ExitCode> {
    let db = &at.db;
    let secrets = match &args.secrets_file {
        Some(file) => read_secrets(file)?,
        None => crate::secrets_from_env()?,
    };
    let mut config = Config::new(secrets.first().clone());
    config.secrets = secrets;
    let standard_secrets = match &args.standard_secrets_file {
        Some(file) => Some(read_standard_secrets(file)?),
        None => match std::env::var(standard::SECRETS_ENV) {
            Ok(text) => Some(
                standard::parse_secrets(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", standard::SECRETS_ENV))?,
            ),
            Err(_) => None,
        },
    };
    if let Some(secrets) = standard_secrets {
        config.standard = Some(config::StandardRoute {
            path: args.standard_path.clone(),
            secrets,
            tolerance: Duration::from_secs(args.standard_tolerance_secs),
        });
    }
    config.path = args.path;
    config.body_limit = args.body_limit;
    config.body_timeout = Duration::from_millis(args.body_timeout_ms);
    config.connections.header_timeout = Duration::from_millis(args.header_timeout_ms);
    config.connections.idle_timeout = Duration::from_millis(args.idle_timeout_ms);
    config.connections.max_connections = args.max_connections;
    config.plugins_dir = Some(args.plugins);
    config.limits = args.limits.policy();
    config.plugin_env = args.allow_plugin_env.into_iter().collect();
    config.http = args.limits.http();
    config.kv = args.limits.kv();
    config.queue_capacity = args.queue_capacity;
    config.store_max_bytes = args.store_max_mib.saturating_mul(1 << 20);
    config.retry.max_attempts = args.max_attempts;
    config.retention = Duration::from_secs(args.retention_days.saturating_mul(24 * 3600));
    config.db_path = db.to_owned();
    config.postgres = at.postgres.clone();
    config.cache_dir = Some(args.cache_dir);
    config.cache_max_bytes = args.cache_max_mib << 20;
    config.shutdown_grace = Duration::from_millis(args.shutdown_grace_ms);
    if let Some(workers) = args.workers {
        config.workers = workers;
    }
    // Every option is checked, by the library's own check, before a socket
    // is bound or a plugin compiled.
    if let Err(ConfigError { field, reason }) = config.validate() {
        bail!("{}: {reason}", flag(field, &reason));
    }

    let access = match (&args.admin_token, args.admin_dev) {
        (Some(AdminToken(token)), _) => {
            Access::token(token).map_err(|why| anyhow::anyhow!("--admin-token: {why}"))?
        }
        (None, true) if args.admin_listen.ip().is_loopback() => Access::Open,
        (None, true) => bail!(
            "--admin-dev: the admin app runs without a token only on loopback, not on {}",
            args.admin_listen
        ),
        (None, false) => Access::random(),
    };

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // Taken before anything slow (loading plugins): a SIGHUP from now on
        // reloads secrets, and never ends the process.
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot listen for SIGHUP")?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let admin = tokio::net::TcpListener::bind(args.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {} (--admin-listen)", args.admin_listen))?;
        let hooks = tokio::task::block_in_place(|| Hooks::new(config.clone()))?;
        let names: Vec<_> = hooks.plugins().iter().map(|p| p.name.to_string()).collect();
        tracing::info!(
            address = %listener.local_addr()?,
            admin = %admin.local_addr()?,
            path = %config.path,
            db = %config.db_path.display(),
            plugins = ?names,
            failed = hooks.load_failures().len(),
            "stateset-hooks ready"
        );
        let admin = server::AdminListener {
            listener: admin,
            access,
        };
        let files = (args.secrets_file, args.standard_secrets_file);
        tokio::spawn(reload_secrets_on_sighup(hangups, files, hooks.clone()));
        server::run(listener, Some(admin), hooks, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

fn read_secrets(file: &std::path::Path) -> anyhow::Result<Secrets> {
    read_secrets_file("--secrets-file", file, |text| {
        Secrets::parse(text).map_err(|_| "holds no secret".into())
    })
}

fn read_standard_secrets(file: &std::path::Path) -> anyhow::Result<Secrets> {
    read_secrets_file("--standard-secrets-file", file, |text| {
        standard::parse_secrets(text).map_err(|e| e.to_string())
    })
}

/// A secrets file named by `flag`, parsed; errors name the flag and file.
fn read_secrets_file(
    flag: &str,
    file: &std::path::Path,
    parse: impl Fn(&str) -> Result<Secrets, String>,
) -> anyhow::Result<Secrets> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{flag}: cannot read {}", file.display()))?;
    parse(&text).map_err(|why| anyhow::anyhow!("{flag}: {}: {why}", file.display()))
}

/// On each SIGHUP, the secrets files again (the StateSet one, the Standard
/// Webhooks one); one that cannot be read (or holds none) keeps its secrets
/// as they were, and the log says why. Without a file, SIGHUP does nothing
/// (it never stops the server).
async fn reload_secrets_on_sighup(
    mut hangups: tokio::signal::unix::Signal,
    files: (Option<PathBuf>, Option<PathBuf>),
    hooks: Hooks,
) {
    while hangups.recv().await.is_some() {
        if files.0.is_none() && files.1.is_none() {
            tracing::info!("SIGHUP: no secrets file to read again (--secrets-file)");
        }
        if let Some(file) = &files.0 {
            match read_secrets(file) {
                Ok(secrets) => hooks.set_secrets(secrets),
                Err(error) => tracing::error!("{error:#}; the secrets stay as they were"),
            }
        }
        if let Some(file) = &files.1 {
            match read_standard_secrets(file) {
                Ok(secrets) => {
                    hooks.set_standard_secrets(secrets);
                }
                Err(error) => tracing::error!("{error:#}; the secrets stay as they were"),
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install a SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: refusing new events, finishing running plugin calls");
}
