//! The plugins the host knows by name: those serving, those still loading,
//! and those whose file failed to load.
//!
//! Owns the set readers take snapshots of, the subscription filter applied
//! before anything is instantiated, and each name's [`PluginStatus`]. Changes
//! come from one place, the [loader](crate::loader): it swaps an entry in one
//! step, so calls in flight finish on the version they started with. This
//! module reads no files and compiles nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::health::Health;
use crate::manifest::Manifest;
use crate::runtime::Prepared;
use crate::status::{Counters, LimitSummary, PluginState, PluginStatus};

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

/// A plugin file that did not load, and why.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub path: PathBuf,
    pub reason: String,
}

/// The plugins currently serving, the ones loading and the failed files.
/// Readers take a snapshot; a reload swaps one entry.
#[derive(Debug, Default)]
pub struct Registry {
    serving: RwLock<Arc<[Arc<LoadedPlugin>]>>,
    /// Plugins queued or compiling after start-up, with their manifests:
    /// events get deliveries for them, which wait until they load.
    loading: RwLock<BTreeMap<Arc<str>, Manifest>>,
    /// The latest failed load of each name.
    failures: RwLock<BTreeMap<Arc<str>, LoadFailure>>,
}

impl Registry {
    /// Every serving plugin, sorted by name.
    pub fn snapshot(&self) -> Arc<[Arc<LoadedPlugin>]> {
        self.serving.read().expect("registry lock").clone()
    }

    /// The serving plugin called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.snapshot().iter().find(|p| &*p.name == name).cloned()
    }

    /// Names of the plugins an event of this type goes to: serving and not
    /// quarantined, or still loading.
    pub fn subscribed_names(&self, event_type: &str) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self
            .snapshot()
            .iter()
            .filter(|p| p.manifest.subscribes_to(event_type) && !p.health.is_quarantined())
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

    /// Names that can take deliveries now: serving and not quarantined.
    pub fn active_names(&self) -> Vec<Arc<str>> {
        self.snapshot()
            .iter()
            .filter(|p| !p.health.is_quarantined())
            .map(|p| p.name.clone())
            .collect()
    }

    /// Files that failed to load, with the reasons.
    pub fn failures(&self) -> Vec<LoadFailure> {
        let failures = self.failures.read().expect("registry lock");
        failures.values().cloned().collect()
    }

    /// Note that `name` will load later; events for it wait in the store.
    pub(crate) fn mark_loading(&self, name: Arc<str>, manifest: Manifest) {
        self.loading
            .write()
            .expect("registry lock")
            .insert(name, manifest);
    }

    /// Serve `plugin`, replacing the version of the same name; returns the old one.
    pub(crate) fn upsert(&self, plugin: LoadedPlugin) -> Option<Arc<LoadedPlugin>> {
        let name = plugin.name.clone();
        self.settle(&name, None);
        let mut serving = self.serving.write().expect("registry lock");
        let old = serving.iter().find(|p| p.name == name).cloned();
        let mut next: Vec<Arc<LoadedPlugin>> =
            serving.iter().filter(|p| p.name != name).cloned().collect();
        next.push(Arc::new(plugin));
        next.sort_by(|a, b| a.name.cmp(&b.name));
        *serving = next.into();
        old
    }

    /// Stop serving `name` (its file is gone); returns it if it was serving.
    pub(crate) fn remove(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.settle(name, None);
        let mut serving = self.serving.write().expect("registry lock");
        let old = serving.iter().find(|p| &*p.name == name).cloned();
        *serving = serving
            .iter()
            .filter(|p| &*p.name != name)
            .cloned()
            .collect();
        old
    }

    /// Keep serving `name` as it is: its file loaded unchanged.
    pub(crate) fn keep(&self, name: &str) {
        self.settle(name, None);
    }

    /// Record that `name` failed to load; a serving version keeps serving.
    pub(crate) fn set_failure(&self, name: &str, failure: LoadFailure) {
        self.settle(name, Some(failure));
    }

    /// `name` is no longer loading; its failure is now `failure`.
    fn settle(&self, name: &str, failure: Option<LoadFailure>) {
        self.loading.write().expect("registry lock").remove(name);
        let mut failures = self.failures.write().expect("registry lock");
        match failure {
            Some(failure) => failures.insert(name.into(), failure),
            None => failures.remove(name),
        };
    }

    /// Every name the host knows, with its state, as of `now` (unix ms).
    pub fn status(&self, now: i64) -> Vec<PluginStatus> {
        let failures = self.failures.read().expect("registry lock").clone();
        let mut rows: Vec<PluginStatus> = self
            .snapshot()
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
                    updated_at: now,
                }
            })
            .collect();
        for (name, manifest) in self.loading.read().expect("registry lock").iter() {
            rows.push(PluginStatus {
                name: name.to_string(),
                version: None,
                state: PluginState::Loading,
                reason: None,
                subscriptions: manifest.describe(),
                limits: None,
                counters: Counters::default(),
                updated_at: now,
            });
        }
        for (name, failure) in failures {
            if rows.iter().any(|r| *r.name == *name) {
                continue;
            }
            rows.push(PluginStatus {
                name: name.to_string(),
                version: None,
                state: PluginState::Failed,
                reason: Some(failure.reason),
                subscriptions: String::new(),
                limits: None,
                counters: Counters::default(),
                updated_at: now,
            });
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }
}
