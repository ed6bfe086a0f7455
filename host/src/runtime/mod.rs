//! The plugin runtime: wasmtime, the WIT contract and the sandbox.
//!
//! One [`Runtime`] holds the `Engine` and a `Linker` built once. A component is
//! compiled and pre-instantiated once ([`Runtime::compile`]); every call gets a
//! fresh `Store` with its own limits, so nothing leaks from one event to the
//! next. This module knows nothing of the HTTP server, plugin directories or SQL.
//!
//! # Capabilities
//!
//! A plugin sees the `host` interface and WASI with: no preopened directories,
//! no environment variables or arguments, no sockets or name lookups, stdin
//! closed, stdout/stderr captured into the host log. Clocks and random numbers
//! work (the standard libraries need them). `wasi:http/outgoing-handler`
//! reaches only what the manifest's `[http]` section lists ([`egress`]).

mod bindings;
mod cache;
pub mod egress;
mod failure;
pub mod kv;
mod limits;
mod output;
mod secrets;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sha2::Digest as _;
use wasmtime::component::{Component, Linker, LinkerInstance, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreContextMut, Trap};

use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use self::bindings::{v0_1_0, v0_2_0, v0_3_0};
use self::cache::CompileCache;
pub use self::cache::{CacheConfig, CacheError, DEFAULT_CACHE_MAX_BYTES};
use self::egress::stub::{HttpStub, RecordedRequest};
use self::egress::{Egress, HttpGrant};
use self::kv::{KvError, KvOp, KvRead, KvSession};
use self::limits::{Cancelled, EpochTicker, HasLimiter, MemoryLimiter, Slots, configure_store};
use self::output::{CallTag, Capture, Output};
use crate::text::escape_controls;

use self::failure::HostFault;
pub use self::failure::{Failure, FailureKind, NotRun};
pub use self::limits::{
    DEFAULT_ERROR_BYTES, DEFAULT_FUEL, DEFAULT_MAX_FUEL, DEFAULT_MAX_MEMORY_BYTES,
    DEFAULT_MAX_TIMEOUT, DEFAULT_MEMORY_BYTES, DEFAULT_OUTPUT_BYTES, DEFAULT_TIMEOUT, EPOCH_TICK,
    LimitOverrides, LimitPolicy, Limits, MAX_WASM_STACK_BYTES, MemoryLimitExceeded,
};
pub use self::output::{LINE_OVERHEAD_BYTES, LogLevel, LogLine, LogSource, MAX_LINES_PER_CALL};

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
    cancel: tokio::sync::watch::Sender<bool>,
    /// Where plugins' committed key-value state is read (the store).
    kv: std::sync::OnceLock<Arc<dyn KvRead>>,
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
    /// Its compile cache entry, kept while it is loaded.
    cache_entry: Option<PathBuf>,
    /// SHA-256 of the component's bytes, hashed once per compile.
    digest: [u8; 32],
}

impl Compiled {
    /// The component's version: the start of the SHA-256 of its bytes, the
    /// same as [`crate::loader::version_of`].
    pub fn version(&self) -> String {
        version_hex(&self.digest)
    }
}

/// Hex digits of a component digest that name its version: enough to tell
/// builds apart in a log line.
const VERSION_HEX_DIGITS: usize = 12;

pub(crate) fn version_hex(digest: &[u8; 32]) -> String {
    let mut hex = hex::encode(digest);
    hex.truncate(VERSION_HEX_DIGITS);
    hex
}

/// A plugin as the runtime runs it: its component, limits, configuration
/// and what it may reach over HTTP.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub name: Arc<str>,
    pub compiled: Compiled,
    pub limits: Limits,
    pub config: Arc<ConfigValues>,
    pub http: Arc<HttpGrant>,
    /// Bytes its key-value state may hold.
    pub kv_quota: u64,
    /// Run without effects: see [`DryRun`]. `None` for a live plugin.
    pub dry_run: Option<Arc<DryRun>>,
}

/// A call that acts on nothing, for trying a plugin (`shadow`, `test`):
/// outbound HTTP is answered by `http` and recorded in the outcome, never
/// sent, and key-value state is read from `kv` when given (else from the
/// runtime's store, as a live call reads it). A call never commits its kv
/// writes anyway: they are in its outcome for the caller to commit or drop.
#[derive(Clone)]
pub struct DryRun {
    pub http: Arc<HttpStub>,
    pub kv: Option<Arc<dyn KvRead>>,
}

impl std::fmt::Debug for DryRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DryRun")
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// `compiled` under `limits`, granted nothing else: no configuration, no
    /// outbound HTTP, no key-value quota.
    pub fn new(name: impl Into<Arc<str>>, compiled: Compiled, limits: Limits) -> Self {
        Self {
            name: name.into(),
            compiled,
            limits,
            config: Arc::default(),
            http: Arc::default(),
            kv_quota: 0,
            dry_run: None,
        }
    }

    /// The same plugin, run without effects.
    pub fn dry(mut self, dry_run: DryRun) -> Self {
        self.dry_run = Some(Arc::new(dry_run));
        self
    }
}

/// Configuration a plugin reads with `config-get`. `Debug` shows the keys
/// only: values may be secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ConfigValues {
    values: std::collections::BTreeMap<String, String>,
    /// The values read from the environment (credentials), scrubbed from
    /// the call's lines, error and recorded requests.
    secrets: secrets::Secrets,
}

impl ConfigValues {
    /// `values`, those under `from_env` read from the environment.
    pub fn new(
        values: std::collections::BTreeMap<String, String>,
        from_env: std::collections::BTreeSet<String>,
    ) -> Self {
        let secrets =
            secrets::Secrets::new(from_env.iter().filter_map(|key| values.get(key).cloned()));
        Self { values, secrets }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The values read from the environment, to scrub.
    pub(crate) fn secrets(&self) -> &secrets::Secrets {
        &self.secrets
    }
}

impl std::fmt::Debug for ConfigValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
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
    /// Lines past the limit or the line cap, dropped.
    pub dropped_output_lines: usize,
    /// The key-value writes of a successful call, to commit with its record.
    pub kv_writes: Arc<[KvOp]>,
    /// In a dry run, the outbound requests the call made (none otherwise).
    pub requests: Vec<RecordedRequest>,
}

impl Runtime {
    /// Build the engine (fuel metering, epoch interruption, bounded wasm
    /// stack, an instance pool for `concurrent_calls` calls at once) and the
    /// linker (WASI plus every WIT version's `host` interface). With a
    /// `cache`, compiled code survives restarts (a cache directory that is
    /// not safe to run code from is refused and logged, and not used). Calls
    /// past `concurrent_calls` wait for a free slot.
    pub fn new(cache: Option<&CacheConfig>, concurrent_calls: usize) -> anyhow::Result<Self> {
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
        let config = |pagemap_scan| {
            let mut config = Config::new();
            config
                .consume_fuel(true)
                .epoch_interruption(true)
                .max_wasm_stack(MAX_WASM_STACK_BYTES)
                .async_stack_size(limits::ASYNC_STACK_BYTES)
                .allocation_strategy(limits::pooling(pool_size, pagemap_scan));
            config
        };
        // The kernel's page scan where it has one (Linux 6.7+), else without.
        let engine = Engine::new(&config(true)).or_else(|_| Engine::new(&config(false)))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        add_host_to_linker(&mut linker)?;
        let cache = cache.and_then(|cache| match CompileCache::open(cache, &engine) {
            Ok(cache) => Some(cache),
            Err(error) => {
                tracing::error!(
                    dir = %cache.dir.display(), %error,
                    "compile cache refused: compiling every plugin at every start instead"
                );
                None
            }
        });
        let ticker = EpochTicker::start(&engine);
        Ok(Self {
            engine,
            linker,
            cache,
            compiled: AtomicU64::new(0),
            slots: Slots::new(concurrent_calls),
            cancel: tokio::sync::watch::Sender::new(false),
            kv: std::sync::OnceLock::new(),
            _ticker: ticker,
        })
    }

    /// Compile and pre-instantiate a component. Slow (milliseconds to
    /// seconds): keep it off the request path.
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled, CompileError> {
        if is_core_module(bytes) {
            return Err(CompileError::CoreModule);
        }
        let digest: [u8; 32] = sha2::Sha256::digest(bytes).into();
        let cache_entry = self.cache.as_ref().map(|cache| cache.path(&digest));
        let cached = self
            .cache
            .as_ref()
            .zip(cache_entry.as_deref())
            .and_then(|(cache, entry)| cache.get(&self.engine, entry));
        let component = match cached {
            Some(component) => component,
            None => {
                let component =
                    Component::new(&self.engine, bytes).map_err(CompileError::Invalid)?;
                self.compiled.fetch_add(1, Ordering::Relaxed);
                if let Some((cache, entry)) = self.cache.as_ref().zip(cache_entry.as_deref()) {
                    cache.put(entry, &component);
                }
                component
            }
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(CompileError::WrongWorld)?;
        let pre = v0_2_0::PluginPre::new(pre).map_err(CompileError::WrongWorld)?;
        Ok(Compiled {
            pre,
            cache_entry,
            digest,
        })
    }

    /// Read plugins' committed key-value state from `reader` (set once, by
    /// the host, to its store). Without it, `kv` calls fail in the plugin.
    pub fn use_kv(&self, reader: Arc<dyn KvRead>) {
        let _ = self.kv.set(reader);
    }

    /// Whether the compile cache holds these bytes' compiled code.
    pub fn is_cached(&self, bytes: &[u8]) -> bool {
        let digest: [u8; 32] = sha2::Sha256::digest(bytes).into();
        self.cache.as_ref().is_some_and(|c| c.contains(&digest))
    }

    /// Bring the compile cache under its cap, evicting entries none of
    /// `loaded` (the components loaded now) uses. Call it when loading is done.
    pub fn trim_cache<'a>(&self, loaded: impl IntoIterator<Item = &'a Compiled>) {
        if let Some(cache) = &self.cache {
            let in_use = loaded
                .into_iter()
                .filter_map(|c| c.cache_entry.as_deref())
                .collect();
            cache.evict(&in_use);
        }
    }

    /// Components compiled since start, cache hits not counted.
    pub fn compiled_count(&self) -> u64 {
        self.compiled.load(Ordering::Relaxed)
    }

    /// Cut every running call short and refuse new ones: the host is
    /// shutting down. A running call returns [`NotRun::Cancelled`] within an
    /// epoch tick, whether it runs wasm code or waits in a host call.
    pub fn cancel_calls(&self) {
        self.cancel.send_replace(true);
    }

    /// Run `on-event` once in a fresh, limited instance. Blocking: call it from
    /// a thread that may block (a worker, `spawn_blocking`), not from async
    /// code. Waits for a pool slot when `concurrent_calls` calls are already
    /// running.
    ///
    /// The call ends by its deadline whatever the plugin does: wasm code is
    /// interrupted on the epoch tick past it, and a call waiting inside a host
    /// call (a sleep, a poll on a clock) is abandoned when the deadline's
    /// timer fires. Both end as [`FailureKind::Timeout`].
    pub fn call(
        &self,
        prepared: &Prepared,
        event: &Arc<str>,
        event_type: &str,
        payload: &str,
    ) -> Result<CallOutcome, NotRun> {
        let _slot = self.slots.acquire();
        let mut cancelled = self.cancel.subscribe();
        if *cancelled.borrow() {
            return Err(NotRun::Cancelled);
        }
        let (compiled, plugin, limits) = (&prepared.compiled, &prepared.name, &prepared.limits);
        let tag = CallTag {
            plugin: plugin.clone(),
            event: event.clone(),
            dry: prepared.dry_run.is_some(),
        };
        let secrets = prepared.config.secrets();
        let output = Arc::new(Mutex::new(Output::new(
            tag.clone(),
            limits.output_bytes,
            secrets.clone(),
        )));
        let start = Instant::now();
        let deadline = start + limits.timeout;
        let dry = prepared.dry_run.as_deref();
        let stub = dry.map(|d| (d.http.clone(), secrets.clone()));
        let egress = Egress::new(prepared.http.clone(), deadline, tag, stub);
        let reader = dry
            .and_then(|d| d.kv.clone())
            .or_else(|| self.kv.get().cloned());
        let kv = KvSession::new(plugin.clone(), reader, prepared.kv_quota);
        let state = CallState::new(&output, limits, prepared.config.clone(), egress, kv);
        let mut store = Store::new(&self.engine, state);
        configure_store(&mut store, limits, deadline, cancelled.clone());
        let fuel_before = store.get_fuel().unwrap_or(0);

        let ended = EXECUTOR.with(|executor| {
            executor.block_on(async {
                let call = async {
                    let instance = compiled.pre.instantiate_async(&mut store).await?;
                    instance
                        .call_on_event(&mut store, event_type, payload)
                        .await
                };
                tokio::select! {
                    called = call => Ended::Returned(called),
                    () = tokio::time::sleep_until(deadline.into()) => Ended::Deadline,
                    _ = cancelled.wait_for(|&cut| cut) => Ended::Cancelled,
                }
            })
        });
        let elapsed = start.elapsed();

        let result = match ended {
            Ended::Returned(Ok(Ok(()))) => Ok(()),
            Ended::Returned(Ok(Err(message))) => Err(Failure::new(
                FailureKind::PluginError,
                truncate_message(secrets.scrub(&message).into_owned(), limits.error_bytes),
            )),
            Ended::Returned(Err(error)) if error.is::<Cancelled>() => {
                return Err(NotRun::Cancelled);
            }
            Ended::Returned(Err(error)) if error.is::<wasmtime::PoolConcurrencyLimitError>() => {
                return Err(NotRun::PoolExhausted);
            }
            Ended::Returned(Err(error)) => {
                let event = escape_controls(event);
                let cause = escape_controls(&format!("{error:?}")).into_owned();
                tracing::debug!(%plugin, %event, "plugin call failed: {cause}");
                Err(Failure::from_wasmtime(&error))
            }
            Ended::Deadline => Err(Failure::from_wasmtime(&Trap::Interrupt.into())),
            Ended::Cancelled => return Err(NotRun::Cancelled),
        };
        let fuel_used = fuel_before.saturating_sub(store.get_fuel().unwrap_or(0));
        let state = store.into_data();
        let peak_memory_bytes = state.limiter.peak();
        let requests = state.egress.recorded();
        // A call's writes leave only with its success.
        let kv_writes = match &result {
            Ok(()) => state.kv.into_ops().into(),
            Err(_) => Arc::default(),
        };
        let mut output = lock(&output);
        let logs = output.finish();
        Ok(CallOutcome {
            result,
            fuel_used,
            elapsed,
            peak_memory_bytes,
            logs,
            dropped_output_bytes: output.dropped_bytes(),
            dropped_output_lines: output.dropped_lines(),
            kv_writes,
            requests,
        })
    }

    /// One instance of `prepared` that every call reuses: no isolation
    /// between calls, so never used for events. It is the reference the
    /// fresh instance per event is measured against (the `plugin_call`
    /// benchmark): the same component, limits, WASI and key-value reads,
    /// without instantiation or memory reset.
    #[doc(hidden)]
    pub fn reused_instance(&self, prepared: &Prepared) -> wasmtime::Result<ReusedInstance> {
        let tag = CallTag {
            plugin: prepared.name.clone(),
            event: "reused".into(),
            dry: false,
        };
        let output = Arc::new(Mutex::new(Output::new(
            tag.clone(),
            prepared.limits.output_bytes,
            prepared.config.secrets().clone(),
        )));
        let far = Instant::now() + Duration::from_secs(3600);
        let egress = Egress::new(prepared.http.clone(), far, tag, None);
        let kv = KvSession::new(
            prepared.name.clone(),
            self.kv.get().cloned(),
            prepared.kv_quota,
        );
        let state = CallState::new(
            &output,
            &prepared.limits,
            prepared.config.clone(),
            egress,
            kv,
        );
        let mut store = Store::new(&self.engine, state);
        configure_store(&mut store, &prepared.limits, far, self.cancel.subscribe());
        let plugin = EXECUTOR.with(|executor| {
            executor.block_on(prepared.compiled.pre.instantiate_async(&mut store))
        })?;
        Ok(ReusedInstance {
            store,
            plugin,
            output,
            fuel: prepared.limits.fuel.unwrap_or(u64::MAX),
        })
    }
}

/// See [`Runtime::reused_instance`].
#[doc(hidden)]
pub struct ReusedInstance {
    store: Store<CallState>,
    plugin: v0_2_0::Plugin,
    output: Arc<Mutex<Output>>,
    /// Given again before each call.
    fuel: u64,
}

impl std::fmt::Debug for ReusedInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReusedInstance").finish_non_exhaustive()
    }
}

impl ReusedInstance {
    /// Call `on-event` again, with fresh fuel, log lines and key-value
    /// session.
    pub fn call(
        &mut self,
        event_type: &str,
        payload: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        self.store.set_fuel(self.fuel)?;
        let state = self.store.data_mut();
        state.kv = state.kv.fresh();
        let (store, instance) = (&mut self.store, &self.plugin);
        let result = EXECUTOR
            .with(|executor| executor.block_on(instance.call_on_event(store, event_type, payload)));
        lock(&self.output).finish();
        result
    }
}

/// How a call's future ended: it returned, or it was abandoned.
enum Ended<T> {
    Returned(wasmtime::Result<T>),
    Deadline,
    Cancelled,
}

thread_local! {
    /// Drives the calls a thread makes: a single-threaded tokio runtime with
    /// timers, so a plugin waiting in a host call waits on this thread under
    /// the call's deadline rather than parking it.
    static EXECUTOR: Executor = Executor(Some(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build a single-threaded tokio runtime"),
    ));
}

/// A thread's call runtime. When the thread ends it is shut down without
/// waiting for its blocking tasks: a store read abandoned at a deadline may
/// still hang, and must not hold the thread's exit.
struct Executor(Option<tokio::runtime::Runtime>);

impl Executor {
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.0
            .as_ref()
            .expect("runtime until dropped")
            .block_on(future)
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
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
    http: WasiHttpCtx,
    egress: Egress,
    kv: KvSession,
    table: ResourceTable,
    limiter: MemoryLimiter,
    output: Arc<Mutex<Output>>,
    config: Arc<ConfigValues>,
}

impl CallState {
    fn new(
        output: &Arc<Mutex<Output>>,
        limits: &Limits,
        config: Arc<ConfigValues>,
        egress: Egress,
        kv: KvSession,
    ) -> Self {
        let wasi = WasiCtx::builder()
            .stdout(Capture::new(output.clone(), LogSource::Stdout))
            .stderr(Capture::new(output.clone(), LogSource::Stderr))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        Self {
            wasi,
            http: WasiHttpCtx::new(),
            egress,
            kv,
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

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.egress,
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

/// The most random bytes one `wasi:random` call returns. The call is
/// synchronous host work that neither fuel nor the deadline can interrupt,
/// so it is kept short: 64 KiB is far more than any key or nonce needs.
const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// Fuel a `host` import costs, on top of one unit per byte it is handed: the
/// host's work per call (lifting the string, a lock, maybe a log record) is
/// worth thousands of wasm instructions, so a flood of empty log lines runs
/// out of fuel like any other loop instead of running free in host code.
pub const HOST_CALL_FUEL: u64 = 1_000;

/// Take `cost` fuel from the call, or trap with `out-of-fuel` when it has less.
fn charge(store: &mut StoreContextMut<'_, CallState>, cost: u64) -> wasmtime::Result<()> {
    let left = store.get_fuel()?;
    store.set_fuel(left.saturating_sub(cost))?;
    if left < cost {
        return Err(Trap::OutOfFuel.into());
    }
    Ok(())
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

/// Define `host.log` for one WIT version's instance of the linker.
macro_rules! define_log {
    ($host:expr, $level:ty) => {
        $host.func_wrap(
            "log",
            |mut store: StoreContextMut<'_, CallState>, (level, message): ($level, String)| {
                charge(&mut store, HOST_CALL_FUEL + message.len() as u64)?;
                store.data_mut().log(log_level!($level, level), &message);
                Ok(())
            },
        )
    };
}

/// The `host` interface of every WIT version, written against the store (not
/// bindgen's `Host` traits) so each import can charge fuel.
fn add_host_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    let mut host = linker.instance("stateset:webhooks/host@0.1.0")?;
    define_log!(host, v0_1_0::stateset::webhooks::host::LogLevel)?;
    let mut host = linker.instance("stateset:webhooks/host@0.2.0")?;
    define_log!(host, v0_2_0::stateset::webhooks::host::LogLevel)?;
    define_config_get(&mut host)?;
    let mut host = linker.instance("stateset:webhooks/host@0.3.0")?;
    define_log!(host, v0_3_0::stateset::webhooks::host::LogLevel)?;
    define_config_get(&mut host)?;
    host.func_wrap(
        "delivery-key",
        |mut store: StoreContextMut<'_, CallState>, (): ()| {
            charge(&mut store, HOST_CALL_FUEL)?;
            Ok((store.data().egress.tag.delivery_key(),))
        },
    )?;
    add_kv_to_linker(linker)
}

fn define_config_get(host: &mut LinkerInstance<'_, CallState>) -> wasmtime::Result<()> {
    host.func_wrap(
        "config-get",
        |mut store: StoreContextMut<'_, CallState>, (key,): (String,)| {
            charge(&mut store, HOST_CALL_FUEL + key.len() as u64)?;
            Ok((store.data().config.get(&key).map(str::to_owned),))
        },
    )
}

/// `stateset:webhooks/kv@0.3.0`, on the call's [`KvSession`]. Each call
/// costs fuel like the `host` imports, for the bytes passed in and the bytes
/// handed back. Reads of the committed state are awaited like any host
/// future, so the call's deadline holds while one waits. A refusal (a cap,
/// the quota) is the plugin's `err`; a failure of the store is a trap, the
/// host's problem rather than an answer the plugin should act on.
fn add_kv_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    type Ctx<'a> = StoreContextMut<'a, CallState>;
    fn trap(error: KvError) -> wasmtime::Error {
        match error {
            KvError::Refused(message) => wasmtime::Error::msg(format!("kv: {message}")),
            KvError::Store(message) => wasmtime::Error::new(HostFault(format!("kv: {message}"))),
        }
    }
    fn answer<T>(result: Result<T, KvError>) -> wasmtime::Result<(Result<T, String>,)> {
        match result {
            Ok(value) => Ok((Ok(value),)),
            Err(KvError::Refused(message)) => Ok((Err(message),)),
            Err(store) => Err(trap(store)),
        }
    }
    let mut kv = linker.instance("stateset:webhooks/kv@0.3.0")?;
    kv.func_wrap_async("get", move |mut store: Ctx<'_>, (key,): (String,)| {
        Box::new(async move {
            charge(&mut store, HOST_CALL_FUEL + key.len() as u64)?;
            let value = store.data().kv.get(&key).await.map_err(trap)?;
            charge(&mut store, value.as_ref().map_or(0, Vec::len) as u64)?;
            Ok((value,))
        })
    })?;
    kv.func_wrap_async(
        "set",
        |mut store: Ctx<'_>, (key, value, ttl_ms): (String, Vec<u8>, Option<u64>)| {
            Box::new(async move {
                charge(
                    &mut store,
                    HOST_CALL_FUEL + (key.len() + value.len()) as u64,
                )?;
                let expires_at = ttl_ms.map(kv::expires_at);
                answer(store.data_mut().kv.set(key, value, expires_at).await)
            })
        },
    )?;
    kv.func_wrap("delete", move |mut store: Ctx<'_>, (key,): (String,)| {
        charge(&mut store, HOST_CALL_FUEL + key.len() as u64)?;
        // A key past the cap names nothing stored: deleting it is a no-op.
        // Past the writes-per-call cap, a delete the plugin relies on would
        // be lost silently: that traps.
        if key.is_empty() || key.len() > kv::MAX_KEY_BYTES {
            return Ok(());
        }
        store.data_mut().kv.delete(key).map_err(trap)
    })?;
    kv.func_wrap_async(
        "keys",
        move |mut store: Ctx<'_>, (prefix, limit): (String, u32)| {
            Box::new(async move {
                charge(&mut store, HOST_CALL_FUEL + prefix.len() as u64)?;
                let limit = (limit as usize).min(kv::MAX_OPS_PER_CALL);
                let keys = store.data().kv.keys(&prefix, limit).await.map_err(trap)?;
                charge(
                    &mut store,
                    keys.iter().map(String::len).sum::<usize>() as u64,
                )?;
                Ok((keys,))
            })
        },
    )?;
    kv.func_wrap_async(
        "increment",
        |mut store: Ctx<'_>, (key, delta): (String, i64)| {
            Box::new(async move {
                charge(&mut store, HOST_CALL_FUEL + key.len() as u64)?;
                answer(store.data_mut().kv.increment(key, delta).await)
            })
        },
    )?;
    kv.func_wrap_async(
        "compare-and-swap",
        |mut store: Ctx<'_>, (key, expected, new): (String, Option<Vec<u8>>, Vec<u8>)| {
            Box::new(async move {
                let bytes = key.len() + expected.as_ref().map_or(0, Vec::len) + new.len();
                charge(&mut store, HOST_CALL_FUEL + bytes as u64)?;
                answer(
                    store
                        .data_mut()
                        .kv
                        .compare_and_swap(key, expected, new)
                        .await,
                )
            })
        },
    )?;
    Ok(())
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
