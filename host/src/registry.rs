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
use crate::runtime::{Compiled, Limits, Runtime};

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
    /// The host's defaults with the manifest's `[limits]` applied.
    pub limits: Limits,
    pub health: Health,
    pub(crate) compiled: Compiled,
}

impl Plugin {
    /// The compiled component, for [`Runtime::call`].
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }
}

/// A plugin file that did not load, and why.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub path: PathBuf,
    pub reason: String,
}

/// The plugins currently serving. Readers take a snapshot; a reload swaps it.
#[derive(Debug, Default)]
pub struct Registry {
    plugins: RwLock<Arc<[Arc<Plugin>]>>,
}

impl Registry {
    pub fn new(plugins: Vec<Plugin>) -> Self {
        let plugins: Arc<[Arc<Plugin>]> = plugins.into_iter().map(Arc::new).collect();
        Self {
            plugins: RwLock::new(plugins),
        }
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
    let limits = limits
        .defaults
        .with_overrides(&manifest.limits, &limits.max)
        .map_err(|e| anyhow::anyhow!("invalid manifest {}: {e}", manifest_path.display()))?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let compiled = runtime.compile(&bytes)?;
    Ok(Plugin {
        name: name.into(),
        version: version_of(&bytes).into(),
        path: path.to_owned(),
        manifest,
        limits,
        health: Health::default(),
        compiled,
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
