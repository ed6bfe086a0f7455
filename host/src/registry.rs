//! The loaded plugins: which exist, their versions and manifests, and which
//! ones an event goes to.
//!
//! Owns reading a plugin directory (`NAME.wasm` plus optional `NAME.toml`),
//! naming and versioning each plugin, and the subscription filter applied
//! before anything is instantiated. A file that fails to load is reported
//! with its path and reason and the rest load on. Compiling belongs to the
//! runtime; running belongs to the dispatcher.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use sha2::{Digest, Sha256};

use crate::health::Health;
use crate::manifest::Manifest;
use crate::runtime::{Guest, Limits, Runtime};
use crate::store::PluginRow;

/// Hex digits of the SHA-256 of a component's bytes that make its version:
/// enough to tell builds apart in a log line.
const VERSION_HEX_DIGITS: usize = 12;

/// One loaded plugin.
#[derive(Debug)]
pub struct Plugin {
    pub name: Arc<str>,
    /// Short SHA-256 of the component's bytes.
    pub version: Arc<str>,
    pub path: PathBuf,
    pub manifest: Manifest,
    pub health: Health,
    /// What the runtime runs: the component, the host's default limits with
    /// the manifest's `[limits]` applied, and the resolved `[config]`.
    pub guest: Guest,
}

/// A plugin file that did not load, and why.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub path: PathBuf,
    pub reason: String,
}

/// The plugins currently serving, and the files that failed to load.
/// Readers take a snapshot; a reload swaps one entry, so calls in flight
/// finish on the version they started with.
#[derive(Debug, Default)]
pub struct Registry {
    plugins: RwLock<Arc<[Arc<Plugin>]>>,
    failures: RwLock<Vec<LoadFailure>>,
}

impl Registry {
    pub fn new(plugins: Vec<Plugin>, failures: Vec<LoadFailure>) -> Self {
        let plugins: Arc<[Arc<Plugin>]> = plugins.into_iter().map(Arc::new).collect();
        Self {
            plugins: RwLock::new(plugins),
            failures: RwLock::new(failures),
        }
    }

    /// Add a plugin, or replace the one of the same name; returns the old one.
    pub fn upsert(&self, plugin: Plugin) -> Option<Arc<Plugin>> {
        let name = plugin.name.clone();
        self.clear_failure(&plugin.path);
        let mut plugins = self.plugins.write().expect("registry lock");
        let mut next: Vec<Arc<Plugin>> =
            plugins.iter().filter(|p| p.name != name).cloned().collect();
        let old = plugins.iter().find(|p| p.name == name).cloned();
        next.push(Arc::new(plugin));
        next.sort_by(|a, b| a.name.cmp(&b.name));
        *plugins = next.into();
        old
    }

    /// Stop serving a plugin; returns it if it was loaded.
    pub fn remove(&self, name: &str) -> Option<Arc<Plugin>> {
        let mut plugins = self.plugins.write().expect("registry lock");
        let old = plugins.iter().find(|p| &*p.name == name).cloned();
        *plugins = plugins
            .iter()
            .filter(|p| &*p.name != name)
            .cloned()
            .collect();
        old
    }

    /// Record that a file failed to load (replacing an earlier failure of it).
    pub fn set_failure(&self, failure: LoadFailure) {
        let mut failures = self.failures.write().expect("registry lock");
        failures.retain(|f| f.path != failure.path);
        failures.push(failure);
    }

    pub fn clear_failure(&self, path: &Path) {
        self.failures
            .write()
            .expect("registry lock")
            .retain(|f| f.path != path);
    }

    /// Files that failed to load, with the reasons.
    pub fn failures(&self) -> Vec<LoadFailure> {
        self.failures.read().expect("registry lock").clone()
    }

    /// Every plugin and failed file as a row for `plugins list`.
    pub fn rows(&self, now: i64) -> Vec<PluginRow> {
        let mut rows: Vec<PluginRow> = self
            .snapshot()
            .iter()
            .map(|p| {
                let health = p.health.snapshot();
                let failed: serde_json::Map<String, serde_json::Value> = health
                    .failed
                    .iter()
                    .map(|(kind, n)| (kind.to_string(), (*n).into()))
                    .collect();
                let l = &p.guest.limits;
                PluginRow {
                    name: p.name.to_string(),
                    version: Some(p.version.to_string()),
                    state: if health.quarantined {
                        "quarantined"
                    } else {
                        "active"
                    }
                    .into(),
                    reason: None,
                    subscriptions: p.manifest.describe(),
                    limits: format!(
                        "fuel {}, memory {} MiB, timeout {} ms, output {} KiB",
                        l.fuel.map_or("unmetered".into(), |f| f.to_string()),
                        l.memory_bytes >> 20,
                        l.timeout.as_millis(),
                        l.output_bytes >> 10
                    ),
                    counters:
                        serde_json::json!({ "succeeded": health.succeeded, "failed": failed })
                            .to_string(),
                    updated_at: now,
                }
            })
            .collect();
        for failure in self.failures() {
            let name = failure
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            if rows.iter().any(|r| r.name == name) {
                // Its previous version still serves; say why the new one did not load.
                if let Some(row) = rows.iter_mut().find(|r| r.name == name) {
                    row.reason = Some(format!("replacement failed to load: {}", failure.reason));
                }
                continue;
            }
            rows.push(PluginRow {
                name,
                version: None,
                state: "failed".into(),
                reason: Some(failure.reason),
                subscriptions: String::new(),
                limits: String::new(),
                counters: "{}".into(),
                updated_at: now,
            });
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// Every loaded plugin, sorted by name.
    pub fn snapshot(&self) -> Arc<[Arc<Plugin>]> {
        self.plugins.read().expect("registry lock").clone()
    }

    /// The plugins subscribed to `event_type` and not quarantined, by name.
    pub fn subscribed(&self, event_type: &str) -> Vec<Arc<Plugin>> {
        self.snapshot()
            .iter()
            .filter(|p| p.manifest.subscribes_to(event_type) && !p.health.is_quarantined())
            .cloned()
            .collect()
    }

    /// The plugin called `name`, if loaded.
    pub fn get(&self, name: &str) -> Option<Arc<Plugin>> {
        self.snapshot().iter().find(|p| &*p.name == name).cloned()
    }
}

/// The limits a plugin gets: the host's defaults, and the most a manifest may ask.
#[derive(Debug, Clone, Default)]
pub struct LimitPolicy {
    pub defaults: Limits,
    pub max: Limits,
}

/// Load every `*.wasm` in `dir`. Files that fail are logged and returned
/// beside the plugins that loaded; only an unreadable directory is an error.
pub fn load_dir(
    runtime: &Runtime,
    dir: &Path,
    limits: &LimitPolicy,
) -> anyhow::Result<(Vec<Plugin>, Vec<LoadFailure>)> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the plugin directory {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
        .collect();
    paths.sort();

    let (mut plugins, mut failures) = (Vec::new(), Vec::new());
    for path in paths {
        match load_file(runtime, &path, limits) {
            Ok(plugin) => {
                tracing::info!(
                    plugin = %plugin.name,
                    version = %plugin.version,
                    subscriptions = %plugin.manifest.describe(),
                    "plugin loaded"
                );
                plugins.push(plugin);
            }
            Err(error) => {
                let reason = format!("{error:#}");
                tracing::error!(path = %path.display(), %reason, "plugin failed to load");
                failures.push(LoadFailure { path, reason });
            }
        }
    }
    Ok((plugins, failures))
}

/// Load one `NAME.wasm` and its optional `NAME.toml`.
pub fn load_file(runtime: &Runtime, path: &Path, limits: &LimitPolicy) -> anyhow::Result<Plugin> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{}: the file name is not valid UTF-8", path.display()))?;
    let manifest_path = path.with_extension("toml");
    let manifest = read_manifest(&manifest_path)?;
    let invalid = |e: String| anyhow::anyhow!("invalid manifest {}: {e}", manifest_path.display());
    let limits = limits
        .defaults
        .with_overrides(&manifest.limits, &limits.max)
        .map_err(invalid)?;
    let config = manifest.resolve_config().map_err(invalid)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let compiled = runtime.compile(&bytes)?;
    let name: Arc<str> = name.into();
    Ok(Plugin {
        name: name.clone(),
        version: version_of(&bytes).into(),
        path: path.to_owned(),
        manifest,
        health: Health::default(),
        guest: Guest {
            name,
            compiled,
            limits,
            config: Arc::new(config),
        },
    })
}

fn read_manifest(path: &Path) -> anyhow::Result<Manifest> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            Manifest::parse(&text).with_context(|| format!("invalid manifest {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read manifest {}", path.display())),
    }
}

/// A component's version: the start of the SHA-256 of its bytes.
pub fn version_of(bytes: &[u8]) -> String {
    let mut hex = hex::encode(Sha256::digest(bytes));
    hex.truncate(VERSION_HEX_DIGITS);
    hex
}
