//! Hot reload: watch the plugin directory and tell the loader which plugins
//! changed.
//!
//! A change to `NAME.wasm` or `NAME.toml` queues plugin NAME on the
//! [loader](crate::loader) once the directory has been quiet for
//! [`RELOAD_DEBOUNCE`]; the loader compiles it off the request path and swaps
//! it in. Hidden files (an atomic deploy's temporary file) and other files (a
//! database beside the plugins) are ignored.
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

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::loader::{Loader, plugin_name};

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

impl Watcher {
    /// Watch `dir` and queue changed plugins on `loader`.
    pub(crate) fn start(dir: &Path, loader: Arc<Loader>) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event
                    && is_change(&event.kind)
                {
                    let _ = tx.send(event.paths);
                }
            })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        let thread = std::thread::Builder::new()
            .name("plugin-watcher".into())
            .spawn(move || debounce(&rx, &loader))?;
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

/// Whether an event changes a file. Opening or reading one does not: the
/// loader opens every plugin it loads, and taking that for a change would
/// reload it again, for ever. A file closed after writing does (a copy in
/// place ends with it).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Collect changed names until no plugin file has changed for the debounce
/// time, then queue them; other files do not hold the reload back.
fn debounce(changes: &mpsc::Receiver<Vec<PathBuf>>, loader: &Loader) {
    let mut pending = BTreeSet::new();
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
                    loader.request(&name);
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, ModifyKind};

    use super::*;

    #[test]
    fn opening_a_plugin_is_not_a_change() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Any)));
    }
}
