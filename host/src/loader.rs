//! The one plugin loader: every load, reload and unload of a plugin
//! directory goes through its queue and its thread.
//!
//! Start-up, the directory [watcher](crate::watch), large components compiled
//! after start-up and [`Hooks::reload`](crate::Hooks::reload) all feed one
//! queue of "NAME changed". One thread takes names off it in order and loads
//! each from the directory *as it is then*, so loads of the same name never
//! overlap and the newest bytes on disk always win: a change that lands while
//! an older build compiles queues the name again, and the second load reads
//! the new file. A name already waiting in the queue is not queued twice.
//!
//! A file `NAME.shadow.wasm` is not a plugin of its own but a candidate
//! shadowing `NAME`: loaded under `NAME`'s manifest (the operator's, never
//! one beside the candidate), run without effects beside each new event's
//! first live call, its outcomes recorded apart (`dispatch/shadow.rs`).
//!
//! Owns naming and versioning plugins, and the decision to serve, replace,
//! keep or unload; [`plugin_file`](crate::plugin_file) reads the files. Compiling belongs to
//! the runtime; the serving set belongs to the registry.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use anyhow::Context as _;
use sha2::{Digest, Sha256};

use crate::contain::contain;
use crate::health::Health;
use crate::manifest::EnvGrant;
use crate::plugin_file::{read_component, read_manifest};
use crate::registry::{LoadFailure, LoadedPlugin, Registry};
use crate::runtime::egress::HttpPolicy;
use crate::runtime::kv::KvPolicy;
use crate::runtime::{DryRun, LimitPolicy, Runtime};
use crate::store::{Filter, Status, Store};
use crate::text::escape_controls;

/// Components larger than this, and not in the compile cache, are compiled
/// after the host starts serving (CPython and JavaScript engines are 10-20 MB
/// and take seconds to compile). Their events are stored meanwhile and
/// delivered once they load.
pub const LARGE_COMPONENT_BYTES: u64 = 2 << 20;

/// What ends the name of a candidate's file: `orders.shadow.wasm` shadows
/// `orders`.
pub const SHADOW_SUFFIX: &str = ".shadow";

/// What the operator grants every plugin; a manifest asking for more is
/// refused at load.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// Default limits, and the most a manifest may raise them to.
    pub limits: LimitPolicy,
    /// The environment variables a manifest may read.
    pub env: EnvGrant,
    /// Private networks or not, and the most a manifest's `[http]` may ask.
    pub http: HttpPolicy,
    /// The most a manifest's `[kv]` may ask.
    pub kv: KvPolicy,
}

/// Owns the loader thread. Dropping it stops the thread: a compile in
/// progress runs to its end (it cannot be interrupted, and a large one takes
/// seconds) but is not swapped in, and nothing queued is loaded. Dropping does
/// not wait for that compile.
#[derive(Debug)]
pub struct Loader {
    shared: Arc<LoaderState>,
}

#[derive(Debug)]
struct LoaderState {
    dir: PathBuf,
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    grants: Grants,
    store: Arc<dyn Store>,
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stop: bool,
}

#[derive(Debug)]
enum Job {
    Load(Arc<str>),
    /// Signal once every job queued before this one is done.
    Done(mpsc::Sender<()>),
}

impl Loader {
    /// Start the loader thread for plugin directory `dir`. Nothing is loaded
    /// until [`Loader::load_all`] or [`Loader::request`].
    pub(crate) fn start(
        dir: PathBuf,
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        grants: Grants,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Self> {
        let shared = Arc::new(LoaderState {
            dir,
            runtime,
            registry,
            grants,
            store,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        std::thread::Builder::new()
            .name("plugin-loader".into())
            .spawn({
                let shared = shared.clone();
                move || shared.run()
            })
            .context("cannot start the plugin loader thread")?;
        Ok(Self { shared })
    }

    /// Queue every plugin in the directory and wait until all but the large,
    /// uncached ones have loaded; those are marked loading (their events are
    /// stored and wait) and compile next. Only an unreadable directory is an
    /// error: a file that fails to load is logged and recorded.
    pub(crate) fn load_all(&self) -> anyhow::Result<()> {
        let dir = &self.shared.dir;
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read the plugin directory {}", dir.display()))?;
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            // Not only regular files: anything else named `*.wasm` is
            // refused by the reader, and the refusal is reported.
            .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && !path.is_dir())
            .filter_map(|path| plugin_name(&path))
            .collect();
        names.sort();
        let mut later = Vec::new();
        for name in names {
            let path = dir.join(format!("{name}.wasm"));
            if !self.shared.is_large_and_uncached(&path) {
                self.request(&name);
                continue;
            }
            if name.ends_with(SHADOW_SUFFIX) {
                // Nothing waits for a candidate: it loads after start-up.
                later.push(name);
                continue;
            }
            match read_manifest(&path.with_extension("toml")) {
                Ok(manifest) => {
                    tracing::info!(plugin = name, "large plugin: compiling after start-up");
                    self.shared
                        .registry
                        .mark_loading(name.as_str().into(), manifest);
                    later.push(name);
                }
                Err(error) => self.shared.failed(&name, path, &error),
            }
        }
        let (done, loaded) = mpsc::channel();
        self.shared.push(Job::Done(done));
        for name in later {
            self.request(&name);
        }
        // If the thread stops first, it drops the queue and the sender with
        // it (see `Stopped`); either way we go on.
        let _ = loaded.recv();
        Ok(())
    }

    /// Load `name` from the directory again (or unload it if its file is
    /// gone), after whatever is queued before it.
    pub fn request(&self, name: &str) {
        self.shared.request(name);
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.queue.lock().expect("loader lock").stop = true;
        self.shared.wake.notify_one();
    }
}

impl LoaderState {
    /// Queue a load of `name` unless one is queued already.
    fn request(&self, name: &str) {
        let mut queue = self.queue.lock().expect("loader lock");
        let queued = queue
            .jobs
            .iter()
            .any(|job| matches!(job, Job::Load(n) if &**n == name));
        if !queued && !queue.stop {
            queue.jobs.push_back(Job::Load(name.into()));
            self.wake.notify_one();
        }
    }

    /// Queue a job; once stopped, drop it (a `Done` sender with it).
    fn push(&self, job: Job) {
        let mut queue = self.queue.lock().expect("loader lock");
        if !queue.stop {
            queue.jobs.push_back(job);
            self.wake.notify_one();
        }
    }

    fn run(&self) {
        let _stopped = Stopped(self);
        loop {
            let job = {
                let mut queue = self.queue.lock().expect("loader lock");
                loop {
                    if queue.stop {
                        return;
                    }
                    if let Some(job) = queue.jobs.pop_front() {
                        break job;
                    }
                    queue = self.wake.wait(queue).expect("loader lock");
                }
            };
            match job {
                Job::Load(name) => {
                    // A panic while loading one plugin (a bug, in the
                    // compiler say) fails that plugin, not the loader.
                    if let Err(reason) = contain(|| self.load(&name)) {
                        let path = self.dir.join(format!("{name}.wasm"));
                        let error = anyhow::anyhow!("the loader panicked: {reason}");
                        self.failed(&name, path, &error);
                    }
                    let queue = self.queue.lock().expect("loader lock");
                    if !queue.jobs.iter().any(|job| matches!(job, Job::Load(_))) {
                        drop(queue);
                        // Nothing left to load: what serves now is what the
                        // cache must keep.
                        let serving = self.registry.snapshot();
                        let shadows = self.registry.shadows();
                        let candidates = shadows.iter().map(|s| &s.plugin.prepared.compiled);
                        self.runtime.trim_cache(
                            serving
                                .iter()
                                .map(|p| &p.prepared.compiled)
                                .chain(candidates),
                        );
                    }
                }
                Job::Done(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    fn stopping(&self) -> bool {
        self.queue.lock().expect("loader lock").stop
    }

    /// Make the registry match `NAME.wasm` and `NAME.toml` as they are now.
    fn load(&self, name: &str) {
        if let Some(live) = name.strip_suffix(SHADOW_SUFFIX) {
            if live.ends_with(SHADOW_SUFFIX) {
                let path = self.dir.join(format!("{name}.wasm"));
                if !path.exists() {
                    return self.registry.keep(name);
                }
                let error = anyhow::anyhow!("a shadow shadows a live plugin, not another shadow");
                return self.failed(name, path, &error);
            }
            return self.load_shadow(live, name);
        }
        let path = self.dir.join(format!("{name}.wasm"));
        if !path.exists() {
            if self.stopping() {
                return;
            }
            if let Some(old) = self.registry.remove(name) {
                tracing::info!(
                    plugin = name, version = %old.version, kept_deliveries = self.waiting_deliveries(name),
                    "plugin unloaded: its file is gone; its pending deliveries are kept and resume if it returns"
                );
            }
            return;
        }
        let loaded = load_file(&self.runtime, &path, &self.grants);
        if self.stopping() {
            return; // the host is shutting down: swap nothing in
        }
        let plugin = match loaded {
            Ok(plugin) => plugin,
            Err(error) => return self.failed(name, path, &error),
        };
        let current = self.registry.get(name);
        if let Some(current) =
            current.filter(|c| c.version == plugin.version && c.manifest == plugin.manifest)
        {
            // The same build and manifest: keep it (and its counters and
            // quarantine); a failed replacement in between is moot now.
            drop(current);
            self.registry.keep(name);
            return;
        }
        let (version, subscriptions) = (plugin.version.clone(), plugin.manifest.describe());
        match self.registry.upsert(plugin) {
            Some(old) => tracing::info!(
                plugin = name, old_version = %old.version, %version, %subscriptions, "plugin replaced"
            ),
            None => {
                tracing::info!(plugin = name, %version, %subscriptions, "plugin loaded");
                if let Some(shadow) = self.registry.shadow_of(name) {
                    let shadow = &shadow.plugin.version;
                    tracing::info!(plugin = name, %shadow, "its shadow, loaded before it, runs from now on");
                }
            }
        }
        // Its candidate runs under its manifest, which may have changed.
        let shadow = format!("{name}{SHADOW_SUFFIX}");
        if self.dir.join(format!("{shadow}.wasm")).exists() {
            self.request(&shadow);
        }
    }

    /// Make the candidate shadowing `live` match `file.wasm` (its
    /// `NAME.shadow.wasm`) as it is now, under `live`'s manifest.
    fn load_shadow(&self, live: &str, file: &str) {
        let path = self.dir.join(format!("{file}.wasm"));
        if !path.exists() {
            if !self.stopping()
                && let Some(old) = self.registry.set_shadow(live, file, None)
            {
                tracing::info!(plugin = live, version = %old.plugin.version, "shadow removed: its file is gone");
            }
            return;
        }
        let manifest = self.dir.join(format!("{live}.toml"));
        let loaded = load_as(&self.runtime, &path, live, &manifest, &self.grants);
        if self.stopping() {
            return;
        }
        let mut plugin = match loaded {
            Ok(plugin) => plugin,
            Err(error) => return self.failed(file, path, &error),
        };
        let current = self.registry.shadow_of(live);
        if current.is_some_and(|c| {
            c.plugin.version == plugin.version && c.plugin.manifest == plugin.manifest
        }) {
            self.registry.keep(file);
            return;
        }
        plugin.prepared = plugin.prepared.dry(DryRun {
            http: Arc::default(),
            kv: None,
        });
        let version = plugin.version.clone();
        self.registry.set_shadow(live, file, Some(plugin));
        match self.registry.get(live) {
            Some(_) => tracing::info!(
                plugin = live, %version,
                "shadow loaded: it runs beside the live plugin on each new event, without effects"
            ),
            None => tracing::warn!(
                plugin = live, %version,
                "shadow loaded, but no live plugin has this name: it runs once {live}.wasm is loaded"
            ),
        }
    }

    fn failed(&self, name: &str, path: PathBuf, error: &anyhow::Error) {
        // The reason can carry the author's text (a config key, a variable
        // name): escaped once here, for the log and `plugins list` alike.
        let reason = escape_controls(&format!("{error:#}")).into_owned();
        let serving = self.registry.get(name).map(|p| p.version.to_string());
        tracing::error!(
            path = %path.display(), %reason, still_serving = ?serving,
            "plugin failed to load; the previous version (if any) keeps serving"
        );
        self.registry
            .set_failure(name, LoadFailure { path, reason });
    }

    fn is_large_and_uncached(&self, path: &Path) -> bool {
        let large = std::fs::metadata(path).is_ok_and(|m| m.len() > LARGE_COMPONENT_BYTES);
        large && read_component(path).is_ok_and(|bytes| !self.runtime.is_cached(&bytes))
    }

    fn waiting_deliveries(&self, name: &str) -> usize {
        [Status::Pending, Status::Failed]
            .into_iter()
            .map(|status| {
                let filter = Filter {
                    status: Some(status),
                    plugin: Some(name.to_owned()),
                    ..Filter::default()
                };
                self.store.deliveries(&filter).map_or(0, |d| d.len())
            })
            .sum()
    }
}

/// Marks the loader stopped when its thread ends, however it ends, and drops
/// what is queued: a start-up waiting on a `Done` is released, and later
/// requests are not left in a queue nobody reads.
struct Stopped<'a>(&'a LoaderState);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.stop = true;
        queue.jobs.clear();
    }
}

/// The plugin a path belongs to: `NAME.wasm` or `NAME.toml`, not hidden
/// (temporary files of an atomic deploy start with a dot), and with no
/// control characters (the name is in every log line about the plugin).
pub(crate) fn plugin_name(path: &Path) -> Option<String> {
    let ext = path.extension()?.to_str()?;
    let stem = path.file_stem()?.to_str()?;
    let named = !stem.starts_with('.') && !stem.chars().any(char::is_control);
    (matches!(ext, "wasm" | "toml") && named).then(|| stem.to_owned())
}

/// Load one `NAME.wasm` and its optional `NAME.toml`: read, check the
/// manifest against what the operator `grants`, compile.
pub fn load_file(runtime: &Runtime, path: &Path, grants: &Grants) -> anyhow::Result<LoadedPlugin> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{}: the file name is not valid UTF-8", path.display()))?;
    load_as(runtime, path, name, &path.with_extension("toml"), grants)
}

/// Load the component at `path` as plugin `name` under the manifest at
/// `manifest_path` (none there: the defaults), as [`load_file`] does: a
/// candidate for a live plugin's place (`shadow`) is loaded this way.
pub fn load_as(
    runtime: &Runtime,
    path: &Path,
    name: &str,
    manifest_path: &Path,
    grants: &Grants,
) -> anyhow::Result<LoadedPlugin> {
    let manifest = read_manifest(manifest_path)?;
    let invalid = |e: String| anyhow::anyhow!("invalid manifest {}: {e}", manifest_path.display());
    let limits = grants
        .limits
        .for_plugin(&manifest.limits)
        .map_err(invalid)?;
    let config = manifest
        .resolve_config(name, &grants.env)
        .map_err(invalid)?;
    let http = manifest.http.grant(&grants.http).map_err(invalid)?;
    let kv_quota = manifest.kv.quota(&grants.kv).map_err(invalid)?;
    let bytes = read_component(path)?;
    let compiled = runtime.compile(&bytes)?;
    let name: Arc<str> = name.into();
    Ok(LoadedPlugin {
        name: name.clone(),
        version: compiled.version().into(),
        path: path.to_owned(),
        manifest,
        health: Health::default(),
        prepared: crate::runtime::Prepared {
            name,
            compiled,
            limits,
            config: Arc::new(config),
            http: Arc::new(http),
            kv_quota,
            dry_run: None,
        },
    })
}

/// A component's version: the start of the SHA-256 of its bytes.
pub fn version_of(bytes: &[u8]) -> String {
    crate::runtime::version_hex(&Sha256::digest(bytes).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_files_are_told_from_others() {
        assert_eq!(
            plugin_name(Path::new("/p/orders.wasm")).as_deref(),
            Some("orders")
        );
        assert_eq!(
            plugin_name(Path::new("/p/orders.toml")).as_deref(),
            Some("orders")
        );
        assert_eq!(plugin_name(Path::new("/p/.orders.wasm.tmp")), None);
        assert_eq!(plugin_name(Path::new("/p/.orders.wasm")), None);
        assert_eq!(plugin_name(Path::new("/p/stateset-hooks.db-wal")), None);
        assert_eq!(plugin_name(Path::new("/p/notes.txt")), None);
        assert_eq!(plugin_name(Path::new("/p/a\nERROR forged.wasm")), None);
    }
}
