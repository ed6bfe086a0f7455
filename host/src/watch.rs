//! Hot reload: watch the plugin directory and swap plugins in and out while
//! the host serves.
//!
//! A change to `NAME.wasm` or `NAME.toml` reloads plugin NAME once the
//! directory has been quiet for [`RELOAD_DEBOUNCE`]. The new build is compiled
//! on this thread, off the request path, then swapped into the registry in one
//! step: calls in flight finish on the old version, new calls get the new one.
//! A replacement that fails to load leaves the old version serving. A removed
//! `NAME.wasm` stops receiving events; its pending deliveries stay in the
//! store and resume if it comes back.
//!
//! Deploy by writing a temporary file and renaming it over `NAME.wasm` (the
//! rename is atomic). A file copied in place is seen half-written first; that
//! load fails, the old version keeps serving, and the completed file reloads
//! on the next event.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher as _};

use crate::registry::{self, LimitPolicy, LoadFailure, Registry};
use crate::runtime::Runtime;
use crate::store::{Filter, Status, Store};

/// Quiet time after the last change before reloading: long enough for a copy
/// or a build's several writes to settle, short enough to feel immediate.
pub const RELOAD_DEBOUNCE: Duration = Duration::from_millis(250);

/// Watches one plugin directory until dropped.
pub struct Watcher {
    watcher: Option<notify::RecommendedWatcher>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

/// What a reload needs.
#[derive(Clone)]
pub(crate) struct Reloader {
    pub dir: PathBuf,
    pub runtime: Arc<Runtime>,
    pub registry: Arc<Registry>,
    pub limits: LimitPolicy,
    pub store: Arc<dyn Store>,
}

impl Watcher {
    pub(crate) fn start(reloader: Reloader) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event {
                    let _ = tx.send(event.paths);
                }
            })?;
        watcher.watch(&reloader.dir, RecursiveMode::NonRecursive)?;
        let thread = std::thread::Builder::new()
            .name("plugin-watcher".into())
            .spawn(move || reloader.run(rx))?;
        Ok(Self {
            watcher: Some(watcher),
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Dropping the watcher drops the channel's sender; the thread ends.
        self.watcher.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The plugin a path belongs to: `NAME.wasm` or `NAME.toml`, not hidden
/// (temporary files of an atomic deploy start with a dot).
fn plugin_name(path: &Path) -> Option<String> {
    let ext = path.extension()?.to_str()?;
    let stem = path.file_stem()?.to_str()?;
    (matches!(ext, "wasm" | "toml") && !stem.starts_with('.')).then(|| stem.to_owned())
}

impl Reloader {
    fn run(self, changes: mpsc::Receiver<Vec<PathBuf>>) {
        let mut pending = BTreeSet::new();
        // Reload once no plugin file has changed for the debounce time; other
        // files in the directory (a database, say) do not hold it back.
        let mut quiet_at: Option<Instant> = None;
        loop {
            let wait = quiet_at.map_or(Duration::from_secs(3600), |at| {
                at.saturating_duration_since(Instant::now())
            });
            match changes.recv_timeout(wait) {
                Ok(paths) => {
                    let names: Vec<String> = paths.iter().filter_map(|p| plugin_name(p)).collect();
                    if !names.is_empty() {
                        pending.extend(names);
                        quiet_at = Some(Instant::now() + RELOAD_DEBOUNCE);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    quiet_at = None;
                    for name in std::mem::take(&mut pending) {
                        self.reload(&name);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Load (or unload) plugin `name` from the directory as it is now.
    pub(crate) fn reload(&self, name: &str) {
        let path = self.dir.join(format!("{name}.wasm"));
        if !path.exists() {
            self.registry.clear_failure(&path);
            if let Some(old) = self.registry.remove(name) {
                let waiting = self.waiting_deliveries(name);
                tracing::info!(
                    plugin = name, version = %old.version, kept_deliveries = waiting,
                    "plugin unloaded: its file is gone; its pending deliveries are kept and resume if it returns"
                );
            }
            return;
        }
        match registry::load_file(&self.runtime, &path, &self.limits) {
            Ok(plugin) => {
                let current = self.registry.get(name);
                if current
                    .as_ref()
                    .is_some_and(|c| c.version == plugin.version && c.manifest == plugin.manifest)
                {
                    return;
                }
                let version = plugin.version.clone();
                match self.registry.upsert(plugin) {
                    Some(old) => tracing::info!(
                        plugin = name, old_version = %old.version, %version, "plugin replaced"
                    ),
                    None => tracing::info!(plugin = name, %version, "plugin loaded"),
                }
            }
            Err(error) => {
                let reason = format!("{error:#}");
                let serving = self.registry.get(name).map(|p| p.version.to_string());
                tracing::error!(
                    path = %path.display(), %reason, still_serving = ?serving,
                    "plugin failed to load; the previous version (if any) keeps serving"
                );
                self.registry.set_failure(LoadFailure { path, reason });
            }
        }
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
    }
}
