//! Two small background loops that keep the store current and tidy: the
//! plugin status snapshot `plugins list` reads, and the purge of succeeded
//! events past retention and of kv keys past their TTL.
//!
//! Each runs on its own thread on its own period and stops (at once, not at
//! its next tick) when [`Housekeeping`] is dropped. Neither touches the
//! dispatch path.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::registry::Registry;
use crate::store::{Store, now_ms};

/// How often the plugin status table `plugins list` reads is rewritten.
pub const STATUS_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);

/// How often succeeded events past the retention age, and expired kv keys,
/// are purged.
pub const RETENTION_SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// The running loops; dropping it stops and joins them.
#[derive(Debug)]
pub struct Housekeeping {
    stop: Arc<Stop>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Stop {
    stopped: Mutex<bool>,
    signal: Condvar,
}

impl Stop {
    /// Sleep for `period`; false once stopped.
    fn wait(&self, period: Duration) -> bool {
        let stopped = self.stopped.lock().expect("stop lock");
        let (stopped, _) = self
            .signal
            .wait_timeout_while(stopped, period, |stopped| !*stopped)
            .expect("stop lock");
        !*stopped
    }
}

impl Housekeeping {
    /// Start both loops. The snapshot is written every period and once more
    /// when stopped; the purge runs at once, then every period.
    pub fn start(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        retention: Duration,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(Stop::default());
        let snapshot = std::thread::Builder::new()
            .name("status-snapshot".into())
            .spawn({
                let (stop, store) = (stop.clone(), store.clone());
                move || loop {
                    // Once more after the stop, so the last counters are kept.
                    let go_on = stop.wait(STATUS_SNAPSHOT_INTERVAL);
                    if let Err(error) = store.save_plugins(registry.status(now_ms())) {
                        tracing::warn!(%error, "could not save the plugin status table");
                    }
                    if !go_on {
                        break;
                    }
                }
            })?;
        let purge = std::thread::Builder::new()
            .name("retention-purge".into())
            .spawn({
                let stop = stop.clone();
                move || loop {
                    let before = now_ms() - retention.as_millis() as i64;
                    match store.purge_succeeded(before) {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(events = n, "purged succeeded events past retention")
                        }
                        Err(error) => tracing::warn!(%error, "retention purge failed"),
                    }
                    match store.purge_expired_kv(now_ms()) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(keys = n, "purged kv keys past their TTL"),
                        Err(error) => tracing::warn!(%error, "kv TTL purge failed"),
                    }
                    if !stop.wait(RETENTION_SWEEP_INTERVAL) {
                        break;
                    }
                }
            })?;
        Ok(Self {
            stop,
            threads: vec![snapshot, purge],
        })
    }
}

impl Housekeeping {
    /// Names of the loops that have ended before being stopped.
    pub fn threads_gone(&self) -> Vec<String> {
        self.threads
            .iter()
            .filter(|t| t.is_finished())
            .map(|t| t.thread().name().unwrap_or("unnamed").to_owned())
            .collect()
    }
}

impl Drop for Housekeeping {
    fn drop(&mut self) {
        *self.stop.stopped.lock().expect("stop lock") = true;
        self.stop.signal.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
