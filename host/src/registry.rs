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

/// Components larger than this, and not in the compile cache, are compiled
/// after the host starts serving (CPython and JavaScript engines are 10-20 MB
/// and take seconds to compile). Their events are stored meanwhile and
/// delivered once they load.
pub const LARGE_COMPONENT_BYTES: u64 = 2 << 20;

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
    /// Plugins still compiling after start-up, with their manifests: events
    /// get deliveries for them, which wait until they load.
    loading: RwLock<Vec<(Arc<str>, Manifest)>>,
}

impl Registry {
    pub fn new(loaded: Loaded) -> Self {
        let plugins: Arc<[Arc<Plugin>]> = loaded.plugins.into_iter().map(Arc::new).collect();
        Self {
            plugins: RwLock::new(plugins),
            failures: RwLock::new(loaded.failures),
            loading: RwLock::new(loaded.deferred),
        }
    }

    /// Names of the plugins an event of this type goes to: loaded and not
    /// quarantined, or still loading.
    pub fn subscribed_names(&self, event_type: &str) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self
            .subscribed(event_type)
            .into_iter()
            .map(|p| p.name.clone())
            .collect();
        let loading = self.loading.read().expect("registry lock");
        names.extend(
            loading
                .iter()
                .filter(|(_, manifest)| manifest.subscribes_to(event_type))
                .map(|(name, _)| name.clone()),
        );
        names
    }

    fn done_loading(&self, name: &str) {
        self.loading
            .write()
            .expect("registry lock")
            .retain(|(n, _)| &**n != name);
    }

    /// Add a plugin, or replace the one of the same name; returns the old one.
    pub fn upsert(&self, plugin: Plugin) -> Option<Arc<Plugin>> {
        let name = plugin.name.clone();
        self.clear_failure(&plugin.path);
        self.done_loading(&name);
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
        self.done_loading(name);
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
        if let Some(name) = failure.path.file_stem().and_then(|s| s.to_str()) {
            self.done_loading(name);
        }
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
        for (name, manifest) in self.loading.read().expect("registry lock").iter() {
            rows.push(PluginRow {
                name: name.to_string(),
                version: None,
                state: "loading".into(),
                reason: None,
                subscriptions: manifest.describe(),
                limits: String::new(),
                counters: "{}".into(),
                updated_at: now,
            });
        }
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

/// What loading a directory found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub plugins: Vec<Plugin>,
    pub failures: Vec<LoadFailure>,
    /// Large, uncached components left to compile after start-up.
    pub deferred: Vec<(Arc<str>, Manifest)>,
}

/// Load every `*.wasm` in `dir`. Files that fail are logged and returned
/// beside the plugins that loaded; only an unreadable directory is an error.
/// With `defer_large`, large components not in the compile cache are only
/// named (with their manifests) for loading later.
pub fn load_dir(
    runtime: &Runtime,
    dir: &Path,
    limits: &LimitPolicy,
    defer_large: bool,
) -> anyhow::Result<Loaded> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the plugin directory {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
        .collect();
    paths.sort();

    let mut loaded = Loaded::default();
    for path in paths {
        if defer_large && is_large_and_uncached(runtime, &path) {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            match read_manifest(&path.with_extension("toml")) {
                Ok(manifest) => {
                    tracing::info!(plugin = name, "large plugin: compiling after start-up");
                    loaded.deferred.push((name.into(), manifest));
                    continue;
                }
                Err(error) => {
                    let reason = format!("{error:#}");
                    tracing::error!(path = %path.display(), %reason, "plugin failed to load");
                    loaded.failures.push(LoadFailure { path, reason });
                    continue;
                }
            }
        }
        match load_file(runtime, &path, limits) {
            Ok(plugin) => {
                tracing::info!(
                    plugin = %plugin.name,
                    version = %plugin.version,
                    subscriptions = %plugin.manifest.describe(),
                    "plugin loaded"
                );
                loaded.plugins.push(plugin);
            }
            Err(error) => {
                let reason = format!("{error:#}");
                tracing::error!(path = %path.display(), %reason, "plugin failed to load");
                loaded.failures.push(LoadFailure { path, reason });
            }
        }
    }
    Ok(loaded)
}

fn is_large_and_uncached(runtime: &Runtime, path: &Path) -> bool {
    let large = std::fs::metadata(path).is_ok_and(|m| m.len() > LARGE_COMPONENT_BYTES);
    large && std::fs::read(path).is_ok_and(|bytes| !runtime.is_cached(&bytes))
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
