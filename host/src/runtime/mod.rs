//! The plugin runtime: wasmtime, the WIT contract and the sandbox.
//!
//! One [`Runtime`] holds the `Engine` and a `Linker` built once. A component is
//! compiled and pre-instantiated once ([`Runtime::compile`]); every call gets a
//! fresh `Store` with its own limits, so nothing leaks from one event to the
//! next. This module knows nothing of HTTP, plugin directories or storage.
//!
//! # Capabilities
//!
//! A plugin sees the `host` interface and WASI with: no preopened directories,
//! no environment variables or arguments, no sockets or name lookups, stdin
//! closed, stdout/stderr captured into the host log. Clocks and random numbers
//! work (the standard libraries need them).

mod bindings;
mod cache;
mod failure;
mod limits;
mod output;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};

use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use self::bindings::{v0_1_0, v0_2_0};
use self::cache::CompileCache;
use self::limits::{Cancelled, EpochTicker, HasLimiter, MemoryLimiter, Slots, configure_store};
use self::output::{CallTag, Capture, Output};

pub use self::failure::{Failure, FailureKind, NotRun};
pub use self::limits::{
    DEFAULT_ERROR_BYTES, DEFAULT_FUEL, DEFAULT_MEMORY_BYTES, DEFAULT_OUTPUT_BYTES, DEFAULT_TIMEOUT,
    EPOCH_TICK, LimitOverrides, LimitPolicy, Limits, MAX_WASM_STACK_BYTES, MemoryLimitExceeded,
};
pub use self::output::{LogLevel, LogLine, LogSource};

/// The engine, the linker and the epoch ticker: one per host.
pub struct Runtime {
    engine: Engine,
    linker: Linker<CallState>,
    cache: Option<CompileCache>,
    /// Components compiled (not found in the cache) since start.
    compiled: AtomicU64,
    /// One per call the instance pool can hold at once.
    slots: Slots,
    /// Set once at shutdown: every running call is cut, no new one starts.
    cancel: Arc<AtomicBool>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

/// A component compiled and pre-instantiated.
#[derive(Clone)]
pub struct Compiled {
    pre: v0_2_0::PluginPre<CallState>,
}

/// A plugin as the runtime runs it: its component, limits and configuration.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub name: Arc<str>,
    pub compiled: Compiled,
    pub limits: Limits,
    pub config: Arc<ConfigValues>,
}

/// Configuration a plugin reads with `config-get`. `Debug` shows the keys
/// only: values may be secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ConfigValues(std::collections::BTreeMap<String, String>);

impl ConfigValues {
    pub fn new(values: std::collections::BTreeMap<String, String>) -> Self {
        Self(values)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

impl std::fmt::Debug for ConfigValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").finish_non_exhaustive()
    }
}

/// Why bytes could not become a plugin.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(
        "a core wasm module, not a component: build for wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("not a WebAssembly component: {0:#}")]
    Invalid(wasmtime::Error),
    #[error("does not fit the `stateset:webhooks` plugin world: {0:#}")]
    WrongWorld(wasmtime::Error),
}

/// Everything one call produced.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    pub result: Result<(), Failure>,
    /// Fuel consumed (instantiation included).
    pub fuel_used: u64,
    pub elapsed: Duration,
    /// The most linear memory the call held at once.
    pub peak_memory_bytes: usize,
    /// Lines the plugin wrote, within the output limit.
    pub logs: Vec<LogLine>,
    /// Output bytes past the limit, dropped.
    pub dropped_output_bytes: usize,
}

impl Runtime {
    /// Build the engine (fuel metering, epoch interruption, bounded wasm
    /// stack, an instance pool for `concurrent_calls` calls at once) and the
    /// linker (WASI plus every WIT version's `host` interface). With a
    /// `cache_dir`, compiled code survives restarts. Calls past
    /// `concurrent_calls` wait for a free slot.
    pub fn new(cache_dir: Option<&Path>, concurrent_calls: usize) -> anyhow::Result<Self> {
        let concurrent_calls = concurrent_calls.max(1);
        let pool_size = u32::try_from(concurrent_calls)
            .ok()
            .filter(|&n| n <= limits::MAX_CONCURRENT_CALLS)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{concurrent_calls} concurrent calls is more than the pool can hold ({})",
                    limits::MAX_CONCURRENT_CALLS
                )
            })?;
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(MAX_WASM_STACK_BYTES)
            .allocation_strategy(limits::pooling(pool_size));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        v0_1_0::Plugin::add_to_linker::<_, HasSelf<CallState>>(&mut linker, |state| state)?;
        v0_2_0::Plugin::add_to_linker::<_, HasSelf<CallState>>(&mut linker, |state| state)?;
        let cache = match cache_dir {
            Some(dir) => Some(CompileCache::open(dir, &engine).map_err(|e| {
                anyhow::anyhow!("cannot use compile cache directory {}: {e}", dir.display())
            })?),
            None => None,
        };
        let ticker = EpochTicker::start(&engine);
        Ok(Self {
            engine,
            linker,
            cache,
            compiled: AtomicU64::new(0),
            slots: Slots::new(concurrent_calls),
            cancel: Arc::new(AtomicBool::new(false)),
            _ticker: ticker,
        })
    }

    /// Compile and pre-instantiate a component. Slow (milliseconds to
    /// seconds): keep it off the request path.
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled, CompileError> {
        if is_core_module(bytes) {
            return Err(CompileError::CoreModule);
        }
        let cached = self.cache.as_ref().and_then(|c| c.get(&self.engine, bytes));
        let component = match cached {
            Some(component) => component,
            None => {
                let component =
                    Component::new(&self.engine, bytes).map_err(CompileError::Invalid)?;
                self.compiled.fetch_add(1, Ordering::Relaxed);
                if let Some(cache) = &self.cache {
                    cache.put(bytes, &component);
                }
                component
            }
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(CompileError::WrongWorld)?;
        let pre = v0_2_0::PluginPre::new(pre).map_err(CompileError::WrongWorld)?;
        Ok(Compiled { pre })
    }

    /// Whether the compile cache holds these bytes' compiled code.
    pub fn is_cached(&self, bytes: &[u8]) -> bool {
        self.cache.as_ref().is_some_and(|c| c.contains(bytes))
    }

    /// Components compiled since start, cache hits not counted.
    pub fn compiled_count(&self) -> u64 {
        self.compiled.load(Ordering::Relaxed)
    }

    /// Cut every running call short and refuse new ones: the host is
    /// shutting down. A call running wasm code returns
    /// [`NotRun::Cancelled`] within an epoch tick; one blocked inside a host
    /// call (a sleep) sees the cut only once that host call returns.
    pub fn cancel_calls(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Run `on-event` once in a fresh, limited instance. Blocking: call it from
    /// a thread that may block (a worker, `spawn_blocking`). Waits for a pool
    /// slot when `concurrent_calls` calls are already running.
    pub fn call(
        &self,
        prepared: &Prepared,
        event: &Arc<str>,
        event_type: &str,
        payload: &str,
    ) -> Result<CallOutcome, NotRun> {
        let _slot = self.slots.acquire();
        if self.cancel.load(Ordering::Relaxed) {
            return Err(NotRun::Cancelled);
        }
        let (compiled, plugin, limits) = (&prepared.compiled, &prepared.name, &prepared.limits);
        let tag = CallTag {
            plugin: plugin.clone(),
            event: event.clone(),
        };
        let output = Arc::new(Mutex::new(Output::new(tag, limits.output_bytes)));
        let state = CallState::new(&output, limits, prepared.config.clone());
        let mut store = Store::new(&self.engine, state);
        configure_store(&mut store, limits, &self.cancel);
        let fuel_before = store.get_fuel().unwrap_or(0);

        let start = Instant::now();
        let called = compiled
            .pre
            .instantiate(&mut store)
            .and_then(|instance| instance.call_on_event(&mut store, event_type, payload));
        let elapsed = start.elapsed();

        let result = match called {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(Failure::new(
                FailureKind::PluginError,
                truncate_message(message, limits.error_bytes),
            )),
            Err(error) if error.is::<Cancelled>() => return Err(NotRun::Cancelled),
            Err(error) if error.is::<wasmtime::PoolConcurrencyLimitError>() => {
                return Err(NotRun::PoolExhausted);
            }
            Err(error) => {
                tracing::debug!(%plugin, %event, "plugin call failed: {error:?}");
                Err(Failure::from_wasmtime(&error))
            }
        };
        let fuel_used = fuel_before.saturating_sub(store.get_fuel().unwrap_or(0));
        let peak_memory_bytes = store.data().limiter.peak();
        drop(store);
        let mut output = lock(&output);
        let logs = output.finish();
        Ok(CallOutcome {
            result,
            fuel_used,
            elapsed,
            peak_memory_bytes,
            logs,
            dropped_output_bytes: output.dropped_bytes(),
        })
    }
}

/// Core modules start `\0asm` then version 1; components use another layer.
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\0asm\x01\0\0\0")
}

fn truncate_message(mut message: String, max: usize) -> String {
    if message.len() > max {
        let total = message.len();
        message.truncate(output::floor_char_boundary(&message, max));
        message.push_str(&format!(" ... [cut: {total} bytes in all]"));
    }
    message
}

fn lock(output: &Mutex<Output>) -> MutexGuard<'_, Output> {
    output
        .lock()
        .expect("output lock is never poisoned: no panics while held")
}

/// The data of one call's `Store`.
pub(crate) struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    output: Arc<Mutex<Output>>,
    config: Arc<ConfigValues>,
}

impl CallState {
    fn new(output: &Arc<Mutex<Output>>, limits: &Limits, config: Arc<ConfigValues>) -> Self {
        let wasi = WasiCtx::builder()
            .stdout(Capture::new(output.clone(), LogSource::Stdout))
            .stderr(Capture::new(output.clone(), LogSource::Stderr))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(limits.memory_bytes),
            output: output.clone(),
            config,
        }
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HasLimiter for CallState {
    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
}

impl CallState {
    fn log(&mut self, level: LogLevel, message: &str) {
        lock(&self.output).line(level, LogSource::Log, message);
    }
}

/// Each WIT version's `log-level` is its own type; they map the same way.
macro_rules! log_level {
    ($wit:ty, $level:expr) => {{
        type Wit = $wit;
        match $level {
            Wit::Trace => LogLevel::Trace,
            Wit::Debug => LogLevel::Debug,
            Wit::Info => LogLevel::Info,
            Wit::Warn => LogLevel::Warn,
            Wit::Error => LogLevel::Error,
        }
    }};
}

impl v0_1_0::stateset::webhooks::host::Host for CallState {
    fn log(&mut self, level: v0_1_0::stateset::webhooks::host::LogLevel, message: String) {
        let level = log_level!(v0_1_0::stateset::webhooks::host::LogLevel, level);
        CallState::log(self, level, &message);
    }
}

impl v0_2_0::stateset::webhooks::host::Host for CallState {
    fn log(&mut self, level: v0_2_0::stateset::webhooks::host::LogLevel, message: String) {
        let level = log_level!(v0_2_0::stateset::webhooks::host::LogLevel, level);
        CallState::log(self, level, &message);
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_on_a_char_boundary_and_say_so() {
        assert_eq!(truncate_message("short".into(), 10), "short");
        assert_eq!(
            truncate_message("ééé".into(), 3),
            "é ... [cut: 6 bytes in all]"
        );
    }

    #[test]
    fn core_modules_are_told_apart_from_components() {
        assert!(is_core_module(b"\0asm\x01\0\0\0rest"));
        assert!(!is_core_module(b"\0asm\x0d\0\x01\0rest"));
    }
}
