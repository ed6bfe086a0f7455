//! The `stateset-hooks` command line: a thin layer over the library.
//!
//! One file per command family: `serve.rs`, `run.rs` (one plugin, one event),
//! `cases.rs` (`test`: a plugin's own cases), `shadow.rs` (a candidate on
//! stored events), `store_commands.rs` (`events`, `dlq`, `plugins`),
//! `scaffold.rs` (`new`);
//! `sign` and `send` are short enough to live here.

mod cases;
mod receive;
mod run;
mod scaffold;
mod serve;
mod shadow;
mod store_commands;
mod telemetry;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use stateset_hooks::signature::{SECRET_ENV, SECRETS_ENV, SIGNATURE_HEADER};
use stateset_hooks::{Secret, Secrets};
use telemetry::LogFormat;

/// Receive StateSet webhooks and run them through sandboxed WebAssembly plugins.
///
/// The webhook secret is read from the STATESET_WEBHOOK_SECRET environment variable.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    store: store_commands::StoreArgs,
    /// How log lines are written to stderr: `text` for people, `json` (one
    /// object per line) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "STATESET_LOG_FORMAT")]
    log_format: LogFormat,
    /// Export spans (each webhook, plugin call and record, in the sender's
    /// W3C trace) over OTLP/HTTP to this collector, e.g.
    /// `http://127.0.0.1:4318`. Needs a build with `--features otel`.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "STATESET_OTLP_ENDPOINT"
    )]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the webhook host.
    Serve(Box<serve::ServeArgs>),
    /// Print the X-StateSet-Signature of a body for the configured secret.
    Sign {
        /// The body to sign, byte for byte.
        file: PathBuf,
        /// Sign with the secret of this fingerprint (as the host logs it)
        /// [default: the first secret].
        #[arg(long, value_name = "FINGERPRINT")]
        secret: Option<String>,
    },
    /// Sign a body, POST it to a URL, print the status and response.
    Send {
        /// Where to send it, e.g. http://127.0.0.1:3000/webhooks/stateset
        url: String,
        /// The event JSON to send, byte for byte.
        file: PathBuf,
        /// Sign with the secret of this fingerprint (as the host logs it)
        /// [default: the first secret].
        #[arg(long, value_name = "FINGERPRINT")]
        secret: Option<String>,
        /// `stateset` (X-StateSet-Signature) or `standard` (Standard
        /// Webhooks, with a secret from STATESET_STANDARD_WEBHOOK_SECRETS;
        /// the body's `id`, or a random one, is the webhook-id).
        #[arg(long, value_enum, default_value_t = Scheme::Stateset)]
        scheme: Scheme,
    },
    /// Stand in for a service plugins call: print each request received
    /// (method, path, Idempotency-Key, body) and answer 201.
    Receive {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:3001")]
        listen: std::net::SocketAddr,
    },
    /// Write a ready-to-build plugin project that handles one event type.
    New {
        /// The plugin's name (lower-case, digits, '-'); also the directory.
        name: String,
        /// The language to write it in.
        #[arg(long, value_enum)]
        lang: scaffold::Lang,
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
    /// Plugins' key-value state, as committed (works while the server runs).
    #[command(subcommand)]
    Kv(store_commands::KvCommand),
    /// Run one plugin on one event locally and print its result, fuel used,
    /// time and peak memory: no server, no secret needed.
    Run {
        /// The plugin component (.wasm).
        plugin: PathBuf,
        /// The event JSON (a whole envelope with `type` and `data`).
        event: PathBuf,
        #[command(flatten)]
        limits: serve::LimitArgs,
        /// Let the manifest read this environment variable (repeat for
        /// more), as `serve --allow-plugin-env` does.
        #[arg(long, value_name = "VAR")]
        allow_plugin_env: Vec<String>,
    },
    /// Run a plugin's test cases (CASES_DIR/*.json: an event, the kv state
    /// before, canned HTTP answers, what must come of it) without a server;
    /// prints a table and exits 1 if one fails (2 on an error).
    Test {
        /// The plugin component (.wasm).
        plugin: PathBuf,
        /// The directory of cases.
        cases: PathBuf,
        /// The manifest [default: PLUGIN.toml beside it].
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        #[command(flatten)]
        limits: serve::LimitArgs,
        /// Let the manifest read this environment variable (repeat for
        /// more), as `serve --allow-plugin-env` does.
        #[arg(long, value_name = "VAR")]
        allow_plugin_env: Vec<String>,
    },
    /// Try a candidate for a live plugin's place on the stored events,
    /// without effects (no HTTP sent, no kv written, nothing recorded), and
    /// compare with what the live version recorded; exits 1 if an event
    /// that succeeded live fails (2 on an error). Reads only: safe beside a
    /// running server.
    Shadow(Box<shadow::ShadowArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // These print the plugin's lines themselves; the log would repeat them.
    let default_filter = match cli.command {
        Command::Run { .. } | Command::Test { .. } | Command::Shadow(_) => "warn,plugin=off",
        _ => "info",
    };
    let _telemetry =
        match telemetry::init(cli.log_format, default_filter, cli.otlp_endpoint.as_deref()) {
            Ok(telemetry) => telemetry,
            Err(error) => {
                eprintln!("error: {error:#}");
                return ExitCode::FAILURE;
            }
        };
    let location = match cli.store.location() {
        Ok(location) => location,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    // `shadow` and `test` exit 1 for what they found: trouble is 2.
    let trouble = match cli.command {
        Command::Shadow(_) | Command::Test { .. } => 2,
        _ => 1,
    };
    let result = match cli.command {
        Command::Serve(args) => serve::serve(*args, &location),
        Command::New {
            name,
            lang,
            event,
            dir,
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            scaffold::new_plugin(&dir, &name, lang, &event).map(|files| {
                for file in files {
                    println!("wrote {}", file.display());
                }
                println!("next: cd {} && ./build.sh", dir.display());
                ExitCode::SUCCESS
            })
        }
        Command::Events(command) => store_commands::events(&location, command),
        Command::Dlq(command) => store_commands::dlq(&location, command),
        Command::Plugins(command) => store_commands::plugins(&location, command),
        Command::Kv(command) => store_commands::kv(&location, command),
        Command::Sign { file, secret } => sign(&file, secret.as_deref()),
        Command::Send {
            url,
            file,
            secret,
            scheme,
        } => send(&url, &file, secret.as_deref(), scheme),
        Command::Receive { listen } => receive::receive(listen),
        Command::Run {
            plugin,
            event,
            limits,
            allow_plugin_env,
        } => run::run(&run::Args {
            plugin: &plugin,
            event: &event,
            store: &location,
            limits: &limits,
            allow_env: &allow_plugin_env,
        }),
        Command::Test {
            plugin,
            cases,
            manifest,
            limits,
            allow_plugin_env,
        } => cases::test(&cases::Args {
            plugin: &plugin,
            cases: &cases,
            manifest: manifest.as_deref(),
            limits: &limits,
            allow_env: &allow_plugin_env,
        }),
        Command::Shadow(args) => shadow::shadow(&args, &location),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(trouble)
        }
    }
}

/// The webhook secrets from the environment: `STATESET_WEBHOOK_SECRET`
/// (taken byte for byte, as always), and during a rotation
/// `STATESET_WEBHOOK_SECRETS` (separated by commas or newlines); either or
/// both.
pub fn secrets_from_env() -> anyhow::Result<Secrets> {
    let one =
        std::env::var_os(SECRET_ENV).and_then(|value| Secret::new(value.into_encoded_bytes()).ok());
    let listed = std::env::var(SECRETS_ENV)
        .ok()
        .and_then(|text| Secrets::parse(&text).ok());
    let all = one
        .into_iter()
        .chain(listed.iter().flat_map(|s| s.iter().cloned()));
    Secrets::new(all).map_err(|_| {
        anyhow::anyhow!(
            "no webhook secret: set {SECRET_ENV} to the signing secret StateSet uses for this \
             endpoint, e.g. `export {SECRET_ENV}=...` ({SECRETS_ENV} holds several while one \
             rotates)"
        )
    })
}

/// How `send` signs.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Scheme {
    Stateset,
    Standard,
}

/// The secret `fingerprint` names among `secrets`, or the first.
fn pick(secrets: &Secrets, fingerprint: Option<&str>) -> anyhow::Result<Secret> {
    match fingerprint {
        None => Ok(secrets.first().clone()),
        Some(wanted) => secrets.find(wanted).cloned().with_context(|| {
            format!(
                "no secret has the fingerprint {wanted:?}; these do: {}",
                secrets.fingerprints()
            )
        }),
    }
}

fn sign(file: &Path, fingerprint: Option<&str>) -> anyhow::Result<ExitCode> {
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    println!("{}", pick(&secrets_from_env()?, fingerprint)?.sign(&body));
    Ok(ExitCode::SUCCESS)
}

fn send(
    url: &str,
    file: &Path,
    fingerprint: Option<&str>,
    scheme: Scheme,
) -> anyhow::Result<ExitCode> {
    use stateset_hooks::standard;
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let headers: Vec<(&str, String)> = match scheme {
        Scheme::Stateset => {
            let secret = pick(&secrets_from_env()?, fingerprint)?;
            vec![(SIGNATURE_HEADER, secret.sign(&body))]
        }
        Scheme::Standard => {
            let text = std::env::var(standard::SECRETS_ENV)
                .with_context(|| format!("--scheme standard: set {}", standard::SECRETS_ENV))?;
            let secrets = standard::parse_secrets(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", standard::SECRETS_ENV))?;
            let secret = pick(&secrets, fingerprint)?;
            let id = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned));
            let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            let now = since_epoch.as_secs() as i64;
            let id = id.unwrap_or_else(|| {
                format!("msg_{:x}{:x}", since_epoch.as_nanos(), std::process::id())
            });
            let signature = standard::sign(&secret, &id, now, &body);
            vec![
                (standard::ID_HEADER, id),
                (standard::TIMESTAMP_HEADER, now.to_string()),
                (standard::SIGNATURE_HEADER, signature),
            ]
        }
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut request = reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request
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
