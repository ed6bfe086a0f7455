//! The plugins the host knows by name: those serving, those still loading,
//! those whose file failed to load, and the candidates shadowing them.
//!
//! Owns the set readers take snapshots of, the subscription filter applied
//! before anything is instantiated, and each name's [`PluginStatus`]. Changes
//! come from one place, the [loader](crate::loader): it swaps an entry in one
//! step, so calls in flight finish on the version they started with. This
//! module reads no files and compiles nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::health::Health;
use crate::manifest::Manifest;
use crate::runtime::Prepared;
use crate::status::{Counters, LimitSummary, PluginState, PluginStatus, ShadowStatus};

/// One loaded plugin: a version of a `NAME.wasm` with its manifest.
#[derive(Debug)]
pub struct LoadedPlugin {
    pub name: Arc<str>,
    /// Short SHA-256 of the component's bytes.
    pub version: Arc<str>,
    pub path: PathBuf,
    pub manifest: Manifest,
    pub health: Health,
    /// What the runtime runs: the component, the host's default limits with
    /// the manifest's `[limits]` applied, and the resolved `[config]`.
    pub prepared: Prepared,
}

/// A candidate shadowing a serving plugin (`NAME.shadow.wasm`): loaded
/// under the live plugin's name and manifest, run without effects, with
/// its tally since it loaded.
#[derive(Debug)]
pub struct Shadow {
    pub plugin: LoadedPlugin,
    runs: AtomicU64,
    differed: AtomicU64,
    skipped: AtomicU64,
}

impl Shadow {
    pub(crate) fn new(plugin: LoadedPlugin) -> Self {
        Self {
            plugin,
            runs: AtomicU64::new(0),
            differed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// Count a run, and whether it differed from the live call.
    pub(crate) fn ran(&self, differed: bool) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        if differed {
            self.differed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count an event it did not run (its queue was full).
    pub(crate) fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn status(&self) -> ShadowStatus {
        ShadowStatus {
            version: self.plugin.version.to_string(),
            runs: self.runs.load(Ordering::Relaxed),
            differed: self.differed.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }
}

/// A plugin file that did not load, and why.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub path: PathBuf,
    pub reason: String,
}

/// The plugins currently serving, the ones loading and the failed files,
/// under one lock: a plugin moves from loading to serving in one step, so an
/// event arriving meanwhile finds it in one or the other. Readers take a
/// snapshot; a reload swaps one entry.
#[derive(Debug, Default)]
pub struct Registry {
    state: RwLock<State>,
}

#[derive(Debug, Default)]
struct State {
    serving: Arc<[Arc<LoadedPlugin>]>,
    /// Plugins queued or compiling after start-up, with their manifests:
    /// events get deliveries for them, which wait until they load.
    loading: BTreeMap<Arc<str>, Manifest>,
    /// The latest failed load of each name.
    failures: BTreeMap<Arc<str>, LoadFailure>,
    /// Candidates, by the name of the plugin each shadows.
    shadows: BTreeMap<Arc<str>, Arc<Shadow>>,
}

impl State {
    /// `name` is no longer loading; its failure is now `failure`.
    fn settle(&mut self, name: &str, failure: Option<LoadFailure>) {
        self.loading.remove(name);
        match failure {
            Some(failure) => self.failures.insert(name.into(), failure),
            None => self.failures.remove(name),
        };
    }
}

impl Registry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("registry lock")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().expect("registry lock")
    }

    /// Every serving plugin, sorted by name.
    pub fn snapshot(&self) -> Arc<[Arc<LoadedPlugin>]> {
        self.read().serving.clone()
    }

    /// The serving plugin called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.snapshot().iter().find(|p| &*p.name == name).cloned()
    }

    /// Names of the plugins an event of this type goes to: serving (a
    /// quarantined plugin's deliveries are held until it is released), or
    /// still loading.
    pub fn subscribed_names(&self, event_type: &str) -> Vec<Arc<str>> {
        let state = self.read();
        let serving = state
            .serving
            .iter()
            .filter(|p| p.manifest.subscribes_to(event_type))
            .map(|p| p.name.clone());
        let loading = state
            .loading
            .iter()
            .filter(|(_, manifest)| manifest.subscribes_to(event_type))
            .map(|(name, _)| name.clone());
        serving.chain(loading).collect()
    }

    /// Names that can take deliveries now: serving and not quarantined.
    pub fn active_names(&self) -> Vec<Arc<str>> {
        self.snapshot()
            .iter()
            .filter(|p| !p.health.is_quarantined())
            .map(|p| p.name.clone())
            .collect()
    }

    /// Every loaded candidate.
    pub fn shadows(&self) -> Vec<Arc<Shadow>> {
        self.read().shadows.values().cloned().collect()
    }

    /// The candidate shadowing `name`, if one is loaded.
    pub fn shadow_of(&self, name: &str) -> Option<Arc<Shadow>> {
        self.read().shadows.get(name).cloned()
    }

    /// Make `shadow` the candidate shadowing `name` (`None`: no longer
    /// shadowed), settling the load of `file` (its `NAME.shadow`); returns
    /// the one it replaces.
    pub(crate) fn set_shadow(
        &self,
        name: &str,
        file: &str,
        shadow: Option<LoadedPlugin>,
    ) -> Option<Arc<Shadow>> {
        let mut state = self.write();
        state.settle(file, None);
        match shadow {
            Some(plugin) => state
                .shadows
                .insert(name.into(), Arc::new(Shadow::new(plugin))),
            None => state.shadows.remove(name),
        }
    }

    /// Files that failed to load, with the reasons.
    pub fn failures(&self) -> Vec<LoadFailure> {
        self.read().failures.values().cloned().collect()
    }

    /// Note that `name` will load later; events for it wait in the store.
    pub(crate) fn mark_loading(&self, name: Arc<str>, manifest: Manifest) {
        self.write().loading.insert(name, manifest);
    }

    /// Serve `plugin`, replacing the version of the same name; returns the old one.
    pub(crate) fn upsert(&self, plugin: LoadedPlugin) -> Option<Arc<LoadedPlugin>> {
        let name = plugin.name.clone();
        let mut state = self.write();
        state.settle(&name, None);
        let old = state.serving.iter().find(|p| p.name == name).cloned();
        let mut next: Vec<Arc<LoadedPlugin>> = state
            .serving
            .iter()
            .filter(|p| p.name != name)
            .cloned()
            .collect();
        next.push(Arc::new(plugin));
        next.sort_by(|a, b| a.name.cmp(&b.name));
        state.serving = next.into();
        old
    }

    /// Stop serving `name` (its file is gone); returns it if it was serving.
    pub(crate) fn remove(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        let mut state = self.write();
        state.settle(name, None);
        let old = state.serving.iter().find(|p| &*p.name == name).cloned();
        state.serving = state
            .serving
            .iter()
            .filter(|p| &*p.name != name)
            .cloned()
            .collect();
        old
    }

    /// Keep serving `name` as it is: its file loaded unchanged.
    pub(crate) fn keep(&self, name: &str) {
        self.write().settle(name, None);
    }

    /// Record that `name` failed to load; a serving version keeps serving.
    pub(crate) fn set_failure(&self, name: &str, failure: LoadFailure) {
        self.write().settle(name, Some(failure));
    }

    /// Every name the host knows, with its state, as of `now` (unix ms).
    pub fn status(&self, now: i64) -> Vec<PluginStatus> {
        let state = self.read();
        let failures = &state.failures;
        let mut rows: Vec<PluginStatus> = state
            .serving
            .iter()
            .map(|p| {
                let health = p.health.snapshot();
                PluginStatus {
                    name: p.name.to_string(),
                    version: Some(p.version.to_string()),
                    state: if health.quarantined {
                        PluginState::Quarantined
                    } else {
                        PluginState::Active
                    },
                    // Its version serves on; say why the new file did not load.
                    reason: failures
                        .get(&p.name)
                        .map(|f| format!("replacement failed to load: {}", f.reason)),
                    subscriptions: p.manifest.describe(),
                    limits: Some(LimitSummary::from(&p.prepared.limits)),
                    counters: Counters {
                        succeeded: health.succeeded,
                        failed: health.failed.into_iter().collect(),
                    },
                    shadow: state.shadows.get(&p.name).map(|s| s.status()),
                    updated_at: now,
                }
            })
            .collect();
        for (name, manifest) in &state.loading {
            rows.push(PluginStatus {
                name: name.to_string(),
                version: None,
                state: PluginState::Loading,
                reason: None,
                subscriptions: manifest.describe(),
                limits: None,
                counters: Counters::default(),
                shadow: None,
                updated_at: now,
            });
        }
        for (name, failure) in failures {
            if rows.iter().any(|r| *r.name == **name) {
                continue;
            }
            rows.push(PluginStatus {
                name: name.to_string(),
                version: None,
                state: PluginState::Failed,
                reason: Some(failure.reason.clone()),
                subscriptions: String::new(),
                limits: None,
                counters: Counters::default(),
                shadow: None,
                updated_at: now,
            });
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }
}
