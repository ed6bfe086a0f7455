//! The `stateset-hooks` command line: a thin layer over the library.

mod store_commands;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use stateset_hooks::registry::LimitPolicy;
use stateset_hooks::runtime::{Limits, Runtime};
use stateset_hooks::signature::{SECRET_ENV, SIGNATURE_HEADER};
use stateset_hooks::{Config, Event, Hooks, Secret, hooks, server};

/// Receive StateSet webhooks and run them through sandboxed WebAssembly plugins.
///
/// The webhook secret is read from the STATESET_WEBHOOK_SECRET environment variable.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The SQLite database of events and deliveries.
    #[arg(long, global = true, value_name = "PATH", default_value = stateset_hooks::store::DEFAULT_DB_PATH)]
    db: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the webhook host.
    Serve(ServeArgs),
    /// Print the X-StateSet-Signature of a body for the configured secret.
    Sign {
        /// The body to sign, byte for byte.
        file: PathBuf,
    },
    /// Sign a body, POST it to a URL, print the status and response.
    Send {
        /// Where to send it, e.g. http://127.0.0.1:3000/webhooks/stateset
        url: String,
        /// The event JSON to send, byte for byte.
        file: PathBuf,
    },
    /// Write a ready-to-build plugin project that handles one event type.
    New {
        /// The plugin's name (lower-case, digits, '-'); also the directory.
        name: String,
        /// The language to write it in.
        #[arg(long, value_enum)]
        lang: stateset_hooks::scaffold::Lang,
        /// The event type it subscribes to.
        #[arg(long, default_value = "order.created")]
        event: String,
        /// Where to create it [default: ./NAME].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Inspect and replay stored events (works while the server runs).
    #[command(subcommand)]
    Events(store_commands::EventsCommand),
    /// The dead-letter queue: deliveries whose every attempt failed.
    #[command(subcommand)]
    Dlq(store_commands::DlqCommand),
    /// The plugins the server has loaded (works while the server runs).
    #[command(subcommand)]
    Plugins(store_commands::PluginsCommand),
    /// Run one plugin on one event locally and print its result, fuel used,
    /// time and peak memory: no server, no secret needed.
    Run {
        /// The plugin component (.wasm).
        plugin: PathBuf,
        /// The event JSON (a whole envelope with `type` and `data`).
        event: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Directory of plugins: every NAME.wasm, with an optional NAME.toml manifest.
    #[arg(long, value_name = "DIR")]
    plugins: PathBuf,
    /// The webhook route.
    #[arg(long, default_value = hooks::DEFAULT_PATH)]
    path: String,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, default_value_t = hooks::DEFAULT_BODY_LIMIT)]
    body_limit: usize,
    /// Plugin worker threads, also the most plugin instances alive at once
    /// [default: the number of cores].
    #[arg(long)]
    workers: Option<usize>,
    /// Deliveries held in memory for the workers (the rest wait in the store).
    #[arg(long, default_value_t = hooks::DEFAULT_QUEUE_CAPACITY)]
    queue_capacity: usize,
    /// Deliveries waiting for a first attempt at which new events get 503
    /// with Retry-After.
    #[arg(long, default_value_t = hooks::DEFAULT_BACKLOG_HIGH_WATER)]
    backlog_high_water: usize,
    /// Attempts per delivery, the first included, before it is dead.
    #[arg(long, default_value_t = stateset_hooks::retry::DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,
    /// Days to keep events whose deliveries all succeeded.
    #[arg(long, default_value_t = 7)]
    retention_days: u64,
    /// Where compiled plugins are cached, so a restart does not compile again.
    #[arg(long, value_name = "DIR", default_value = hooks::DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Limits for each plugin call.
#[derive(Debug, Args)]
struct LimitArgs {
    /// Fuel (roughly, wasm instructions) per call.
    #[arg(long, default_value_t = stateset_hooks::runtime::DEFAULT_FUEL)]
    fuel: u64,
    /// Linear memory per call, in MiB.
    #[arg(long, default_value_t = stateset_hooks::runtime::DEFAULT_MEMORY_BYTES >> 20)]
    memory_mib: usize,
    /// Wall-clock time per call, in milliseconds.
    #[arg(long, default_value_t = stateset_hooks::runtime::DEFAULT_TIMEOUT.as_millis() as u64)]
    timeout_ms: u64,
}

impl LimitArgs {
    fn limits(&self) -> anyhow::Result<Limits> {
        if self.fuel == 0 || self.memory_mib == 0 || self.timeout_ms == 0 {
            bail!("--fuel, --memory-mib and --timeout-ms must be greater than zero");
        }
        Ok(Limits {
            fuel: Some(self.fuel),
            memory_bytes: self.memory_mib << 20,
            timeout: Duration::from_millis(self.timeout_ms),
            ..Limits::default()
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` prints the plugin's lines itself; the log would repeat them.
    let default_filter = match cli.command {
        Command::Run { .. } => "warn,plugin=off",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(args, &cli.db),
        Command::New {
            name,
            lang,
            event,
            dir,
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            stateset_hooks::scaffold::new_plugin(&dir, &name, lang, &event).map(|files| {
                for file in files {
                    println!("wrote {}", file.display());
                }
                println!("next: cd {} && ./build.sh", dir.display());
                ExitCode::SUCCESS
            })
        }
        Command::Events(command) => store_commands::events(&cli.db, command),
        Command::Dlq(command) => store_commands::dlq(&cli.db, command),
        Command::Plugins(command) => store_commands::plugins(&cli.db, command),
        Command::Sign { file } => sign(&file),
        Command::Send { url, file } => send(&url, &file),
        Command::Run {
            plugin,
            event,
            limits,
        } => run(&plugin, &event, &limits),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn secret_from_env() -> anyhow::Result<Secret> {
    let value = std::env::var(SECRET_ENV).map_err(|_| {
        anyhow::anyhow!(
            "no webhook secret: set {SECRET_ENV} to the signing secret StateSet uses for this \
             endpoint, e.g. `export {SECRET_ENV}=...`"
        )
    })?;
    Secret::new(value).with_context(|| format!("{SECRET_ENV} is set but empty"))
}

fn serve(args: ServeArgs, db: &Path) -> anyhow::Result<ExitCode> {
    // Every option is checked before a socket is bound or a plugin compiled.
    let mut config = Config::new(secret_from_env()?);
    if !args.path.starts_with('/') {
        bail!("--path must start with '/', got {:?}", args.path);
    }
    if args.workers == Some(0)
        || args.queue_capacity == 0
        || args.body_limit == 0
        || args.max_attempts == 0
        || args.backlog_high_water == 0
    {
        bail!(
            "--workers, --queue-capacity, --body-limit, --max-attempts and --backlog-high-water \
             must be greater than zero"
        );
    }
    if !args.plugins.is_dir() {
        bail!(
            "plugin directory {} does not exist (create it, or pass --plugins DIR)",
            args.plugins.display()
        );
    }
    config.path = args.path;
    config.body_limit = args.body_limit;
    config.plugins_dir = Some(args.plugins);
    config.limits.defaults = args.limits.limits()?;
    config.queue_capacity = args.queue_capacity;
    config.backlog_high_water = args.backlog_high_water;
    config.retry.max_attempts = args.max_attempts;
    config.retention = Duration::from_secs(args.retention_days * 24 * 3600);
    config.db_path = db.to_owned();
    config.cache_dir = Some(args.cache_dir);
    if let Some(workers) = args.workers {
        config.workers = workers;
    }

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let hooks = tokio::task::block_in_place(|| Hooks::new(config.clone()))?;
        let names: Vec<_> = hooks.plugins().iter().map(|p| p.name.to_string()).collect();
        tracing::info!(
            address = %listener.local_addr()?,
            path = %config.path,
            db = %config.db_path.display(),
            plugins = ?names,
            failed = hooks.load_failures().len(),
            "stateset-hooks ready"
        );
        server::run(listener, hooks, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install a SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing requests and queued plugin calls");
}

fn sign(file: &Path) -> anyhow::Result<ExitCode> {
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    println!("{}", secret_from_env()?.sign(&body));
    Ok(ExitCode::SUCCESS)
}

fn send(url: &str, file: &Path) -> anyhow::Result<ExitCode> {
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let signature = secret_from_env()?.sign(&body);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let response = reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await
            .with_context(|| format!("cannot POST to {url}"))?;
        let status = response.status();
        println!("{status}");
        println!("{}", response.text().await.unwrap_or_default());
        Ok(if status.is_success() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

fn run(plugin: &Path, event: &Path, limits: &LimitArgs) -> anyhow::Result<ExitCode> {
    let limits = limits.limits()?;
    let body = std::fs::read(event).with_context(|| format!("cannot read {}", event.display()))?;
    let event = Event::parse(body.into())
        .with_context(|| format!("{} is not a webhook event", event.display()))?;
    let runtime = Runtime::new(None)?;
    let policy = LimitPolicy {
        defaults: limits.clone(),
        max: Limits::host_max(),
    };
    let loaded = stateset_hooks::registry::load_file(&runtime, plugin, &policy)
        .with_context(|| format!("cannot load {}", plugin.display()))?;
    if !loaded.manifest.subscribes_to(event.event_type()) {
        eprintln!(
            "note: {}'s manifest does not subscribe to {}; the host would not deliver it",
            loaded.name,
            event.event_type()
        );
    }
    let outcome = runtime.call(
        &loaded.guest,
        &Arc::from(event.key()),
        event.event_type(),
        event.payload(),
    );
    let result = match &outcome.result {
        Ok(()) => "ok".to_owned(),
        Err(failure) => format!("failed ({}): {}", failure.kind, failure.message),
    };
    println!("plugin:      {} {}", loaded.name, loaded.version);
    println!("event:       {} {}", event.event_type(), event.key());
    println!("result:      {result}");
    println!("fuel used:   {}", outcome.fuel_used);
    println!("time:        {:.3} ms", outcome.elapsed.as_secs_f64() * 1e3);
    println!("peak memory: {} KiB", outcome.peak_memory_bytes >> 10);
    for line in &outcome.logs {
        println!("log {:?} {:?}: {}", line.level, line.source, line.message);
    }
    Ok(if outcome.result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
