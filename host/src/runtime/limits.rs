//! Every limit a plugin call runs under, and the one place they are applied.
//!
//! Owns the defaults (each a named constant saying why that value), the
//! per-call memory limiter, the epoch ticker that turns wall-clock time into
//! wasm interrupts, and [`configure_store`], which puts them all on a fresh
//! `Store`. It does not decide what a failure means; `failure.rs` does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    UpdateDeadline,
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

/// Stack per call for wasm and the host functions it calls (calls run on
/// their own stacks so they can be abandoned at the deadline): the wasm
/// stack plus room for the host's side of WASI.
pub(crate) const ASYNC_STACK_BYTES: usize = MAX_WASM_STACK_BYTES + (1 << 20);

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

/// The most a manifest may ask for unless the operator raises it
/// (`--max-fuel`, `--max-memory-mib`, `--max-timeout-ms`): ten times the
/// default fuel and deadline, four times the default memory. Enough for
/// interpreted plugins (CPython, SpiderMonkey) handling one event; a
/// manifest asking for more is refused at load, not silently clamped.
pub const DEFAULT_MAX_FUEL: u64 = 100_000_000;
pub const DEFAULT_MAX_MEMORY_BYTES: usize = 256 << 20;
pub const DEFAULT_MAX_TIMEOUT: Duration = Duration::from_secs(10);

/// The most the operator may let a manifest ask for: what the engine and
/// the instance pool are built for.
pub const HOST_MAX_FUEL: u64 = 1_000_000_000;
pub const HOST_MAX_MEMORY_BYTES: usize = 1 << 30;
pub const HOST_MAX_TIMEOUT: Duration = Duration::from_secs(30);
pub const HOST_MAX_OUTPUT_BYTES: usize = 1 << 20;
pub const HOST_MAX_ERROR_BYTES: usize = 64 << 10;

/// The most calls one pool is built for: far above any worker count (the
/// host allows 1024), low enough that the pool's totals fit in a `u32`.
pub(crate) const MAX_CONCURRENT_CALLS: u32 = 1 << 16;

/// The pooling allocator: instances come from pre-reserved slots with
/// copy-on-write memory images, so a fresh instance per event costs
/// microseconds, not a round of `mmap`s. Sized for `concurrent_calls` calls
/// at once, each able to reach every per-call maximum below, so a call that
/// holds a [`Slots`] permit never finds the pool exhausted.
///
/// How a slot's memory is reset between calls, so nothing of one call is
/// readable in the next: with `pagemap_scan` (Linux 6.7 and later) the
/// kernel says which pages the call wrote, and up to
/// [`KEEP_RESIDENT_SCANNED`] of them are restored in place by memset; the
/// rest, and everything without it, is given back with `madvise` and
/// faulted in again copy-on-write. Each `madvise` changes page tables of a
/// process whose other threads may have cached them, which costs every core
/// an interrupt (a TLB shootdown); that was the largest single cost of a
/// call under load.
pub(crate) fn pooling(concurrent_calls: u32, pagemap_scan: bool) -> InstanceAllocationStrategy {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(concurrent_calls)
        .total_core_instances(concurrent_calls * MAX_INSTANCES as u32)
        .total_memories(concurrent_calls * MAX_MEMORIES as u32)
        .total_tables(concurrent_calls * MAX_TABLES as u32)
        .max_core_instances_per_component(MAX_INSTANCES as u32)
        .max_memories_per_component(MAX_MEMORIES as u32)
        .max_tables_per_component(MAX_TABLES as u32)
        .max_memory_size(HOST_MAX_MEMORY_BYTES)
        .table_elements(MAX_TABLE_ELEMENTS)
        .total_stacks(concurrent_calls)
        // Interpreters (CPython, SpiderMonkey) have large instance contexts.
        .max_core_instance_size(4 << 20)
        .max_component_instance_size(4 << 20);
    if pagemap_scan {
        pool.pagemap_scan(wasmtime::Enabled::Yes)
            .linear_memory_keep_resident(KEEP_RESIDENT_SCANNED)
            .table_keep_resident(KEEP_RESIDENT_SCANNED);
    } else {
        // Without the scan the first bytes are reset by memset whether the
        // call wrote them or not. Measured on the do-nothing and orders
        // plugins (plugin_call bench): 0 KiB costs the do-nothing call 3 µs
        // more; 1 MiB costs the orders call 15 µs more (a memset of mostly
        // untouched stack).
        pool.linear_memory_keep_resident(64 << 10)
            .table_keep_resident(64 << 10);
    }
    InstanceAllocationStrategy::Pooling(pool)
}

/// With `pagemap_scan`, the most of a slot's written memory reset in place
/// rather than given back: a compiled plugin's stack and heap for one event
/// fit (a Rust plugin writes about 100 KiB to 1 MiB); an interpreter's tens
/// of MiB mostly do not, and are given back as before.
pub(crate) const KEEP_RESIDENT_SCANNED: usize = 4 << 20;

/// The most calls the pool can hold at once: a counting semaphore. A call
/// waits here for a slot rather than failing inside the allocator, so a busy
/// pool is never mistaken for a broken plugin.
#[derive(Debug)]
pub(crate) struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

/// A held slot; dropping it frees the slot.
pub(crate) struct SlotPermit<'a>(&'a Slots);

impl Slots {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            free: Mutex::new(capacity),
            freed: Condvar::new(),
        }
    }

    /// Wait for a free slot.
    pub(crate) fn acquire(&self) -> SlotPermit<'_> {
        let mut free = self.free.lock().expect("slots lock");
        while *free == 0 {
            free = self.freed.wait(free).expect("slots lock");
        }
        *free -= 1;
        SlotPermit(self)
    }
}

impl Drop for SlotPermit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().expect("slots lock") += 1;
        self.0.freed.notify_one();
    }
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
    /// The host's maximum: the most an operator may let a manifest ask for.
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
                    "limits.{key} = {v}{unit} is above the most this host grants a plugin, \
                     {max}{unit}"
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

/// The limits plugins get: the host's defaults, and the most a manifest may
/// raise them to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitPolicy {
    pub defaults: Limits,
    pub max: Limits,
}

impl Default for LimitPolicy {
    fn default() -> Self {
        Self {
            defaults: Limits::default(),
            max: Limits {
                fuel: Some(DEFAULT_MAX_FUEL),
                memory_bytes: DEFAULT_MAX_MEMORY_BYTES,
                timeout: DEFAULT_MAX_TIMEOUT,
                ..Limits::host_max()
            },
        }
    }
}

impl LimitPolicy {
    /// A plugin's limits: the defaults with its manifest's `[limits]` applied.
    pub fn for_plugin(&self, overrides: &LimitOverrides) -> Result<Limits, String> {
        self.defaults.with_overrides(overrides, &self.max)
    }

    /// Refuse a policy the host cannot honour: a zero budget, a default above
    /// the maximum, or a maximum above what the engine is built for. The
    /// message names the field (`defaults.timeout`, `max.memory_bytes`, ...).
    pub fn validate(&self) -> Result<(), String> {
        let host = Limits::host_max();
        let (d, m) = (&self.defaults, &self.max);
        let unmetered = u64::MAX;
        let checks: [(&str, u128, u128, u128); 5] = [
            (
                "fuel",
                d.fuel.unwrap_or(unmetered).into(),
                m.fuel.unwrap_or(unmetered).into(),
                host.fuel.unwrap_or(unmetered).into(),
            ),
            (
                "memory_bytes",
                d.memory_bytes as u128,
                m.memory_bytes as u128,
                host.memory_bytes as u128,
            ),
            (
                "timeout",
                d.timeout.as_millis(),
                m.timeout.as_millis(),
                host.timeout.as_millis(),
            ),
            (
                "output_bytes",
                d.output_bytes as u128,
                m.output_bytes as u128,
                host.output_bytes as u128,
            ),
            (
                "error_bytes",
                d.error_bytes as u128,
                m.error_bytes as u128,
                host.error_bytes as u128,
            ),
        ];
        for (field, default, max, host_max) in checks {
            let budget = matches!(field, "fuel" | "memory_bytes" | "timeout");
            if budget && default == 0 {
                return Err(format!("defaults.{field} must be greater than zero"));
            }
            if max > host_max {
                return Err(format!(
                    "max.{field} is {max}, above the host maximum of {host_max}"
                ));
            }
            if default > max {
                return Err(format!(
                    "defaults.{field} is {default}, above max.{field} ({max})"
                ));
            }
        }
        Ok(())
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

/// Put every limit on a fresh store: fuel, memory and table limiter, and
/// the deadline, checked on every epoch tick along with `cancel` (set when
/// the host shuts down and cuts the calls still running).
pub(crate) fn configure_store<T: HasLimiter>(
    store: &mut Store<T>,
    limits: &Limits,
    deadline: Instant,
    cancel: tokio::sync::watch::Receiver<bool>,
) {
    match limits.fuel {
        Some(fuel) => store.set_fuel(fuel).expect("engine has fuel metering on"),
        // Metering is an engine setting; "off" for one call means "unbounded".
        None => store
            .set_fuel(u64::MAX)
            .expect("engine has fuel metering on"),
    }
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if *cancel.borrow() {
            Err(Cancelled.into())
        } else if Instant::now() >= deadline {
            // Traps with `Trap::Interrupt`, classified as a timeout.
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Continue(1))
        }
    });
    store.limiter(|state| state.limiter());
}

/// The error the epoch callback stops a call with once the host cancels
/// calls; `Runtime::call` turns it into [`NotRun::Cancelled`](super::NotRun).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the host is shutting down: the call was cut short")]
pub(crate) struct Cancelled;

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

/// What one table element costs the host: a pointer-sized slot in the pool.
const TABLE_ELEMENT_BYTES: usize = size_of::<usize>();

/// Enforces the memory limit across all of a call's memories and tables
/// (each element counted at [`TABLE_ELEMENT_BYTES`], so 64 tables of a
/// million elements cannot hold half a gigabyte outside the limit), and
/// records the peak, so `run` can report it.
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

impl MemoryLimiter {
    /// One memory or table grows from `current` to `desired` bytes.
    fn grow(&mut self, current: usize, desired: usize) -> wasmtime::Result<bool> {
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
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(current, desired)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        self.grow(current * TABLE_ELEMENT_BYTES, desired * TABLE_ELEMENT_BYTES)
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
    fn slots_are_handed_back_when_a_permit_drops() {
        let slots = Arc::new(Slots::new(1));
        let held = slots.acquire();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn({
            let slots = slots.clone();
            move || {
                let _permit = slots.acquire();
                tx.send(()).unwrap();
            }
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(50)).is_err(),
            "the only slot is taken: the second caller waits"
        );
        drop(held);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("freed slot taken");
        waiter.join().unwrap();
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
            "limits.memory_mib = 4096 MiB is above the most this host grants a plugin, 1024 MiB"
        );
    }

    #[test]
    fn the_default_ceiling_is_well_below_the_engines() {
        let (ceiling, engine) = (LimitPolicy::default().max, Limits::host_max());
        assert!(ceiling.fuel.unwrap() * 10 <= engine.fuel.unwrap());
        assert!(ceiling.memory_bytes * 4 <= engine.memory_bytes);
        assert!(ceiling.timeout * 3 <= engine.timeout);
        let greedy = LimitOverrides {
            fuel: Some(DEFAULT_MAX_FUEL + 1),
            ..LimitOverrides::default()
        };
        assert!(LimitPolicy::default().for_plugin(&greedy).is_err());
    }

    #[test]
    fn a_policy_names_the_field_it_cannot_honour() {
        assert_eq!(LimitPolicy::default().validate(), Ok(()));
        let mut zero = LimitPolicy::default();
        zero.defaults.timeout = Duration::ZERO;
        assert_eq!(
            zero.validate().unwrap_err(),
            "defaults.timeout must be greater than zero"
        );
        let mut huge = LimitPolicy::default();
        huge.max.memory_bytes = 2 << 30;
        assert!(
            huge.validate()
                .unwrap_err()
                .starts_with("max.memory_bytes is"),
            "{huge:?}"
        );
        let mut above = LimitPolicy::default();
        above.defaults.fuel = None;
        assert!(
            above
                .validate()
                .unwrap_err()
                .starts_with("defaults.fuel is")
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
