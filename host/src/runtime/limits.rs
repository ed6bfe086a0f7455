//! Every limit a plugin call runs under, and the one place they are applied.
//!
//! Owns the defaults (each a named constant saying why that value), the
//! per-call memory limiter, the epoch ticker that turns wall-clock time into
//! wasm interrupts, and [`configure_store`], which puts them all on a fresh
//! `Store`. It does not decide what a failure means; `failure.rs` does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
};

/// Fuel per call: about a thousand times what a realistic order event costs a
/// Rust plugin (about 8,000 units), so honest plugins never meet it and a
/// runaway loop stops within milliseconds.
pub const DEFAULT_FUEL: u64 = 10_000_000;

/// Linear memory per call, summed over the component's memories: far above a
/// JSON handler's needs (a Rust plugin peaks under 2 MiB), small enough that
/// many calls can run at once on a small machine.
pub const DEFAULT_MEMORY_BYTES: usize = 64 << 20;

/// Wall-clock budget per call, for what fuel cannot see (time spent in host
/// calls) and as a backstop when fuel is generous.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Log lines plus captured stdout/stderr per call. Past it, output is dropped
/// and the host logs how much was cut.
pub const DEFAULT_OUTPUT_BYTES: usize = 64 << 10;

/// The longest `Err` message kept from a plugin; longer ones are cut and say so.
pub const DEFAULT_ERROR_BYTES: usize = 4 << 10;

/// Wasm stack per call. Deep recursion traps with `stack-overflow` well before
/// the host thread's own stack (2 MiB for tokio's blocking threads) is at risk.
pub const MAX_WASM_STACK_BYTES: usize = 512 << 10;

/// How often the epoch advances; deadlines are accurate to about this much.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Component instances per call: a component is a handful of core instances.
const MAX_INSTANCES: usize = 64;
/// Tables and memories per call, for the same reason.
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 16;
/// Elements per table: generous for indirect-call tables of large languages
/// (CPython), still bounded.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The most a manifest may grant one plugin: a plugin that needs more is
/// refused at load time rather than silently clamped.
pub const HOST_MAX_FUEL: u64 = 1_000_000_000;
pub const HOST_MAX_MEMORY_BYTES: usize = 1 << 30;
pub const HOST_MAX_TIMEOUT: Duration = Duration::from_secs(30);
pub const HOST_MAX_OUTPUT_BYTES: usize = 1 << 20;
pub const HOST_MAX_ERROR_BYTES: usize = 64 << 10;

/// Component instances alive at once per engine: the workers (one per core
/// on the machines this runs on) plus `run` and headroom. A call past it
/// waits for no slot; it fails, so keep it above `--workers`.
const POOL_INSTANCES: u32 = 64;

/// The pooling allocator: instances come from pre-reserved slots with
/// copy-on-write memory images, so a fresh instance per event costs
/// microseconds, not a round of `mmap`s. Sized so every call can reach the
/// host maximum of every per-call limit below.
pub(crate) fn pooling() -> InstanceAllocationStrategy {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(POOL_INSTANCES)
        .total_core_instances(POOL_INSTANCES * 16)
        .total_memories(POOL_INSTANCES * 2)
        .total_tables(POOL_INSTANCES * 2)
        .max_core_instances_per_component(MAX_INSTANCES as u32)
        .max_memories_per_component(MAX_MEMORIES as u32)
        .max_tables_per_component(MAX_TABLES as u32)
        .max_memory_size(HOST_MAX_MEMORY_BYTES)
        .table_elements(MAX_TABLE_ELEMENTS)
        // Interpreters (CPython, SpiderMonkey) have large instance contexts.
        .max_core_instance_size(4 << 20)
        .max_component_instance_size(4 << 20)
        // Reset the first 64 KiB by memset rather than madvise, so a small
        // plugin's next instance finds them resident. Measured on the
        // do-nothing and orders plugins (plugin_call bench): 0 KiB costs the
        // do-nothing call 3 µs more; 1 MiB costs the orders call 15 µs more
        // (a memset of mostly untouched stack).
        .linear_memory_keep_resident(64 << 10)
        .table_keep_resident(64 << 10);
    InstanceAllocationStrategy::Pooling(pool)
}

/// Limits for one plugin call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Fuel units; `None` turns metering off for this call (benchmarks).
    pub fuel: Option<u64>,
    /// Bytes of linear memory, summed over the component's memories.
    pub memory_bytes: usize,
    /// Wall-clock deadline.
    pub timeout: Duration,
    /// Bytes of log lines and captured stdout/stderr.
    pub output_bytes: usize,
    /// Bytes of an `Err` message.
    pub error_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: Some(DEFAULT_FUEL),
            memory_bytes: DEFAULT_MEMORY_BYTES,
            timeout: DEFAULT_TIMEOUT,
            output_bytes: DEFAULT_OUTPUT_BYTES,
            error_bytes: DEFAULT_ERROR_BYTES,
        }
    }
}

impl Limits {
    /// The host's maximum: what a manifest may ask for at most.
    pub fn host_max() -> Self {
        Self {
            fuel: Some(HOST_MAX_FUEL),
            memory_bytes: HOST_MAX_MEMORY_BYTES,
            timeout: HOST_MAX_TIMEOUT,
            output_bytes: HOST_MAX_OUTPUT_BYTES,
            error_bytes: HOST_MAX_ERROR_BYTES,
        }
    }

    /// Apply a manifest's `[limits]` over these defaults; refuse any value
    /// above `max`.
    pub fn with_overrides(
        &self,
        overrides: &LimitOverrides,
        max: &Limits,
    ) -> Result<Limits, String> {
        fn pick<T: PartialOrd + std::fmt::Display>(
            key: &str,
            asked: Option<T>,
            default: T,
            max: T,
            unit: &str,
        ) -> Result<T, String> {
            match asked {
                Some(v) if v > max => Err(format!(
                    "limits.{key} = {v}{unit} is above the host maximum of {max}{unit}"
                )),
                Some(v) => Ok(v),
                None => Ok(default),
            }
        }
        let fuel = match (overrides.fuel, self.fuel) {
            (None, default) => default,
            (Some(asked), _) => Some(pick(
                "fuel",
                Some(asked),
                0,
                max.fuel.unwrap_or(u64::MAX),
                "",
            )?),
        };
        let mib = |bytes: usize| bytes >> 20;
        let kib = |bytes: usize| bytes >> 10;
        let millis = |d: Duration| d.as_millis() as u64;
        Ok(Limits {
            fuel,
            memory_bytes: pick(
                "memory_mib",
                overrides.memory_mib,
                mib(self.memory_bytes),
                mib(max.memory_bytes),
                " MiB",
            )? << 20,
            timeout: Duration::from_millis(pick(
                "timeout_ms",
                overrides.timeout_ms,
                millis(self.timeout),
                millis(max.timeout),
                " ms",
            )?),
            output_bytes: pick(
                "output_kib",
                overrides.output_kib,
                kib(self.output_bytes),
                kib(max.output_bytes),
                " KiB",
            )? << 10,
            error_bytes: pick(
                "error_kib",
                overrides.error_kib,
                kib(self.error_bytes),
                kib(max.error_bytes),
                " KiB",
            )? << 10,
        })
    }
}

/// A manifest's `[limits]` table: each key optional, each within the host's maximum.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    pub fuel: Option<u64>,
    pub memory_mib: Option<usize>,
    pub timeout_ms: Option<u64>,
    pub output_kib: Option<usize>,
    pub error_kib: Option<usize>,
}

/// Put every limit on a fresh store: fuel, deadline, memory and table limiter.
pub(crate) fn configure_store<T: HasLimiter>(store: &mut Store<T>, limits: &Limits) {
    match limits.fuel {
        Some(fuel) => store.set_fuel(fuel).expect("engine has fuel metering on"),
        // Metering is an engine setting; "off" for one call means "unbounded".
        None => store
            .set_fuel(u64::MAX)
            .expect("engine has fuel metering on"),
    }
    store.set_epoch_deadline(deadline_ticks(limits.timeout));
    store.epoch_deadline_trap();
    store.limiter(|state| state.limiter());
}

fn deadline_ticks(timeout: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    // Round up, and add one tick: the current epoch may be about to end.
    (timeout.as_nanos().div_ceil(tick) as u64).max(1) + 1
}

/// Store data that carries a [`MemoryLimiter`].
pub(crate) trait HasLimiter {
    fn limiter(&mut self) -> &mut MemoryLimiter;
}

/// The error a memory grow past the limit traps with.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded: growing to {requested} bytes")]
pub struct MemoryLimitExceeded {
    pub limit: usize,
    pub requested: usize,
}

/// Enforces the memory limit across all of a call's memories and records the
/// peak, so `run` can report it.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    limit: usize,
    total: usize,
    peak: usize,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            total: 0,
            peak: 0,
        }
    }

    pub(crate) fn peak(&self) -> usize {
        self.peak
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let requested = self.total - current.min(self.total) + desired;
        if requested > self.limit {
            // An error, not `Ok(false)`: the call traps at once with a cause we
            // can classify, instead of a guest allocator aborting somewhere else.
            return Err(MemoryLimitExceeded {
                limit: self.limit,
                requested,
            }
            .into());
        }
        self.total = requested;
        self.peak = self.peak.max(requested);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on one thread; stops and
/// joins that thread when dropped.
#[derive(Debug)]
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engine: &Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine.weak();
        let thread = std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        match engine.upgrade() {
                            Some(engine) => engine.increment_epoch(),
                            None => break,
                        }
                    }
                }
            })
            .expect("spawn the epoch ticker thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_rounds_up_and_adds_a_tick() {
        assert_eq!(deadline_ticks(Duration::from_secs(1)), 101);
        assert_eq!(deadline_ticks(Duration::from_millis(15)), 3);
        assert_eq!(deadline_ticks(Duration::ZERO), 2);
    }

    #[test]
    fn overrides_apply_within_the_host_maximum() {
        let defaults = Limits::default();
        let max = Limits::host_max();
        let asked = LimitOverrides {
            fuel: Some(20_000_000),
            memory_mib: Some(16),
            timeout_ms: Some(250),
            ..LimitOverrides::default()
        };
        let limits = defaults.with_overrides(&asked, &max).unwrap();
        assert_eq!(limits.fuel, Some(20_000_000));
        assert_eq!(limits.memory_bytes, 16 << 20);
        assert_eq!(limits.timeout, Duration::from_millis(250));
        assert_eq!(limits.output_bytes, defaults.output_bytes);
        let greedy = LimitOverrides {
            memory_mib: Some(4096),
            ..LimitOverrides::default()
        };
        assert_eq!(
            defaults.with_overrides(&greedy, &max).unwrap_err(),
            "limits.memory_mib = 4096 MiB is above the host maximum of 1024 MiB"
        );
    }

    #[test]
    fn limiter_counts_all_memories_and_refuses_past_the_limit() {
        let mut limiter = MemoryLimiter::new(100);
        assert!(limiter.memory_growing(0, 60, None).unwrap());
        // A second memory: 60 + 30 = 90.
        assert!(limiter.memory_growing(0, 30, None).unwrap());
        let err = limiter.memory_growing(30, 50, None).unwrap_err();
        assert!(err.is::<MemoryLimitExceeded>(), "{err}");
        assert_eq!(limiter.peak(), 90);
    }
}
