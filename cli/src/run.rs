//! `stateset-hooks run`: one plugin on one event, no server, no secret; prints
//! the result, fuel used, time, peak memory, the lines it logged and the kv
//! writes it would commit. It reads the plugin's kv state from the store
//! (`--db` when that exists, or `--store`) and changes nothing there.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use stateset_hooks::loader::Grants;
use stateset_hooks::manifest::EnvGrant;
use stateset_hooks::registry::LoadedPlugin;
use stateset_hooks::runtime::kv::{EmptyKv, KvOp, KvRead};
use stateset_hooks::runtime::{Failure, Runtime};
use stateset_hooks::signature::SECRET_ENV;
use stateset_hooks::store::{PgStore, SqliteSnapshot};
use stateset_hooks::text::escape_controls;
use stateset_hooks::{Event, Secret};

use crate::serve::LimitArgs;

/// What `run` was asked.
pub struct Args<'a> {
    pub plugin: &'a Path,
    pub event: &'a Path,
    pub store: &'a crate::store_commands::Location,
    pub limits: &'a LimitArgs,
    pub allow_env: &'a [String],
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let Args {
        plugin,
        event,
        store,
        limits,
        allow_env,
    } = *args;
    let grants = grants(limits, allow_env)?;
    let body = std::fs::read(event).with_context(|| format!("cannot read {}", event.display()))?;
    let event = Event::parse(&body)
        .with_context(|| format!("{} is not a webhook event", event.display()))?;
    let runtime = Runtime::new(None, 1)?;
    let state: Arc<dyn KvRead> = match &store.postgres {
        Some(options) => {
            Arc::new(PgStore::open_read_only(options.clone()).map_err(|e| anyhow::anyhow!("{e}"))?)
        }
        None if store.db.exists() => Arc::new(SqliteSnapshot::open(&store.db)?),
        None => Arc::new(EmptyKv),
    };
    runtime.use_kv(state);
    let loaded = load(&runtime, plugin, None, &grants)?;
    if !loaded.manifest.subscribes_to(event.event_type()) {
        eprintln!(
            "note: {}'s manifest does not subscribe to {}; the host would not deliver it",
            loaded.name,
            event.event_type()
        );
    }
    let outcome = runtime.call(
        &loaded.prepared,
        &Arc::from(event.key()),
        event.event_type(),
        event.payload(),
    )?;
    let result = describe_result(&outcome.result);
    println!("plugin:      {} {}", loaded.name, loaded.version);
    println!("event:       {} {}", event.event_type(), event.key());
    println!("result:      {result}");
    println!("fuel used:   {}", outcome.fuel_used);
    println!("time:        {:.3} ms", outcome.elapsed.as_secs_f64() * 1e3);
    println!("peak memory: {} KiB", outcome.peak_memory_bytes >> 10);
    for line in &outcome.logs {
        let message = escape_controls(&line.message);
        println!("log {:?} {:?}: {message}", line.level, line.source);
    }
    if outcome.result.is_ok() {
        for op in outcome.kv_writes.iter() {
            println!("kv write:    {} (not committed by run)", describe(op));
        }
    }
    Ok(if outcome.result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What the operator grants a plugin run outside the server, as `serve`
/// would grant it (the same flags), the webhook secret withheld if set.
pub fn grants(limits: &LimitArgs, allow_env: &[String]) -> anyhow::Result<Grants> {
    let policy = limits.policy();
    if let Err(reason) = policy.validate() {
        bail!("{reason} (--fuel, --memory-mib, --timeout-ms and their --max-* flags)");
    }
    let mut env = EnvGrant::new(allow_env.iter().cloned());
    if let Some(secret) = std::env::var_os(SECRET_ENV) {
        env = env.withholding(Secret::new(secret.into_encoded_bytes())?);
    }
    Ok(Grants {
        limits: policy,
        env,
        http: limits.http(),
        kv: limits.kv(),
    })
}

/// Load `wasm` as the server would, under `manifest` when one is named (it
/// must exist), else under the `NAME.toml` beside it (none: the defaults).
pub fn load(
    runtime: &Runtime,
    wasm: &Path,
    manifest: Option<&Path>,
    grants: &Grants,
) -> anyhow::Result<LoadedPlugin> {
    let loaded = match manifest {
        Some(manifest) if !manifest.exists() => bail!("no manifest at {}", manifest.display()),
        Some(manifest) => {
            let name = wasm
                .file_stem()
                .and_then(|s| s.to_str())
                .with_context(|| format!("{}: the file name is not valid UTF-8", wasm.display()))?;
            stateset_hooks::loader::load_as(runtime, wasm, name, manifest, grants)
        }
        None => stateset_hooks::loader::load_file(runtime, wasm, grants),
    };
    loaded.with_context(|| format!("cannot load {}", wasm.display()))
}

/// A call's result in a word or a line: `ok`, or the failure's kind and
/// its message, control characters escaped.
pub fn describe_result(result: &Result<(), Failure>) -> String {
    match result {
        Ok(()) => "ok".to_owned(),
        Err(failure) => escape_controls(&failure.described()).into_owned(),
    }
}

/// One kv write as `run` prints it: keys quoted and escaped, values only
/// by size.
pub fn describe(op: &KvOp) -> String {
    match op {
        KvOp::Set {
            key,
            value,
            expires_at,
        } => {
            let ttl = if expires_at.is_some() {
                ", with a TTL"
            } else {
                ""
            };
            format!("set {key:?} ({} bytes{ttl})", value.len())
        }
        KvOp::Delete { key } => format!("delete {key:?}"),
        KvOp::Increment { key, delta } => format!("increment {key:?} by {delta}"),
        KvOp::CompareAndSwap { key, new, .. } => {
            format!("compare-and-swap {key:?} ({} bytes)", new.len())
        }
    }
}
