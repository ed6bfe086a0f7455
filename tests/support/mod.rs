//! Shared test support: build real plugin components, lay out plugin
//! directories, start the real server on port 0 and talk to it over HTTP.

pub mod postgres;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Duration;

use stateset_hooks::{Config, Hooks, Report, Secret, server};
use tokio::sync::{broadcast, oneshot};

pub const SECRET: &str = "test-webhook-secret";

/// The host binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_stateset-hooks");

/// How long a test waits for plugin reports before it fails: generous, as
/// large (Python, JavaScript) components compile after start-up first.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a test waits for large components to compile.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(600);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Build every plugin crate for wasm32-wasip2 once per test process and return
/// the path of one component. A separate target directory keeps this nested
/// cargo off the lock of the cargo running the tests.
pub fn wasm(crate_name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let out = BUILT.get_or_init(|| {
        let target_dir = workspace_root().join("target/plugins");
        let status = Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .env("CARGO_TARGET_DIR", &target_dir)
            .args([
                "build",
                "--quiet",
                "--target",
                "wasm32-wasip2",
                "--profile",
                "plugin",
            ])
            // The SDK by name too, so `scripts/test`'s lints cover it.
            .args([
                "-p",
                "orders",
                "-p",
                "payments",
                "-p",
                "low-stock",
                "-p",
                "misbehave",
                "-p",
                "wit-v010",
                "-p",
                "wit-v020",
                "-p",
                "stateset-hooks-sdk",
            ])
            .status()
            .expect("run cargo to build the plugins");
        assert!(
            status.success(),
            "building plugins failed (is the target installed? `rustup target add wasm32-wasip2`)"
        );
        target_dir.join("wasm32-wasip2/plugin")
    });
    out.join(format!("{}.wasm", crate_name.replace('-', "_")))
}

/// A temporary plugin directory, and beside it the host's compile cache
/// (which may not live in the plugin directory).
pub struct PluginDir {
    pub dir: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl PluginDir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            state: tempfile::tempdir().unwrap(),
        }
    }

    /// Where the host caches compiled plugins for this directory.
    pub fn cache_path(&self) -> PathBuf {
        self.state.path().join("cache")
    }

    /// The three sample plugins with the manifests they ship with.
    pub fn samples() -> Self {
        let dir = Self::new();
        for name in ["orders", "payments", "low-stock"] {
            let manifest = workspace_root().join(format!("plugins/{name}/{name}.toml"));
            dir.add(
                name,
                name,
                Some(&std::fs::read_to_string(manifest).unwrap()),
            );
        }
        dir
    }

    /// Copy crate `crate_name`'s component in as `name.wasm`, with a manifest.
    pub fn add(&self, name: &str, crate_name: &str, manifest: Option<&str>) -> &Self {
        std::fs::copy(wasm(crate_name), self.path().join(format!("{name}.wasm"))).unwrap();
        if let Some(manifest) = manifest {
            std::fs::write(self.path().join(format!("{name}.toml")), manifest).unwrap();
        }
        self
    }

    pub fn write(&self, file: &str, bytes: impl AsRef<[u8]>) -> &Self {
        std::fs::write(self.path().join(file), bytes).unwrap();
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub fn config(plugins: &PluginDir) -> Config {
    let mut config = Config::new(Secret::new(SECRET).unwrap());
    config.plugins_dir = Some(plugins.path().to_owned());
    config.db_path = plugins.path().join("stateset-hooks.db");
    config.cache_dir = Some(plugins.cache_path());
    // One attempt per delivery unless a test is about retries: every report a
    // test waits for is then caused by an event it sent.
    config.retry.max_attempts = 1;
    // One worker: reports arrive in the order events were sent, so a later
    // event's report proves an earlier event reached no (other) plugin.
    config.workers = 1;
    // The same tests on the other store: `scripts/test` runs the
    // store-behaviour modules again with a cluster of its own.
    if let Some(server) = postgres::shared_server() {
        config.postgres = Some(
            stateset_hooks::store::PgOptions::new(&postgres::database_for(&server, plugins.path()))
                .unwrap(),
        );
    }
    config
}

/// The command-line flags that name the store `config(plugins)` uses:
/// `--db FILE`, and `--store URL` when the tests run on PostgreSQL.
pub fn store_args(plugins: &PluginDir) -> Vec<std::ffi::OsString> {
    match postgres::shared_server() {
        Some(server) => vec![
            "--db".into(),
            plugins.path().join("stateset-hooks.db").into(),
            "--store".into(),
            postgres::database_for(&server, plugins.path()).into(),
            // A host killed and started again is a new host: what the dead
            // one held waits for its lease, which the tests keep short.
            "--store-lease-secs".into(),
            "3".into(),
        ],
        None => vec![
            "--db".into(),
            plugins.path().join("stateset-hooks.db").into(),
        ],
    }
}

/// The admin token every in-process test server takes.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// The real server on 127.0.0.1:0, in this process, with its admin app on
/// another port of its own.
pub struct TestServer {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub hooks: Hooks,
    reports: broadcast::Receiver<Report>,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        let hooks = tokio::task::spawn_blocking(move || Hooks::new(config))
            .await
            .unwrap()
            .expect("host starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = server::AdminListener {
            listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            access: stateset_hooks::admin::Access::token(ADMIN_TOKEN).unwrap(),
        };
        let admin_addr = admin.listener.local_addr().unwrap();
        let reports = hooks.subscribe();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server::run(listener, Some(admin), hooks.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            admin_addr,
            hooks,
            reports,
            client: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `path` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// POST `body` to the webhook route with this signature header (or none).
    pub async fn post(&self, body: &[u8], signature: Option<&str>) -> (u16, serde_json::Value) {
        let mut request = self
            .client
            .post(self.url("/webhooks/stateset"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("X-StateSet-Signature", signature);
        }
        let response = request.send().await.expect("request reaches the server");
        let status = response.status().as_u16();
        let json = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    /// POST `body` signed with the test secret.
    pub async fn send(&self, body: &[u8]) -> (u16, serde_json::Value) {
        self.post(body, Some(&sign(body))).await
    }

    /// The next `n` plugin reports, in the order they happened.
    pub async fn reports(&mut self, n: usize) -> Vec<Report> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let report = tokio::time::timeout(REPORT_TIMEOUT, self.reports.recv())
                .await
                .unwrap_or_else(|_| panic!("waited for {n} reports, got {}: {out:#?}", out.len()))
                .expect("report channel open and not lagging");
            out.push(report);
        }
        out
    }

    /// Reports until `n` different (event, plugin) pairs have one, the last
    /// of each kept: a delivery whose kv writes conflicted at commit (the
    /// `orders` sample's compare-and-swap, with one order in many events)
    /// runs again and reports twice.
    pub async fn reports_per_delivery(&mut self, n: usize) -> Vec<Report> {
        let mut by: std::collections::HashMap<(Arc<str>, Arc<str>), Report> = Default::default();
        while by.len() < n {
            let report = tokio::time::timeout(REPORT_TIMEOUT, self.reports.recv())
                .await
                .unwrap_or_else(|_| panic!("waited for {n} deliveries' reports, got {}", by.len()))
                .expect("report channel open and not lagging");
            by.insert((report.event_key.clone(), report.plugin.clone()), report);
        }
        by.into_values().collect()
    }

    /// Wait until no plugin is loading. Large components (Python, JavaScript)
    /// compile in the background after start-up; on a busy machine that can
    /// take longer than [`REPORT_TIMEOUT`], which is about dispatch, not
    /// compilation.
    pub async fn wait_loaded(&self) {
        let started = std::time::Instant::now();
        while self
            .hooks
            .status()
            .iter()
            .any(|p| p.state == stateset_hooks::status::PluginState::Loading)
        {
            assert!(
                started.elapsed() < LOAD_TIMEOUT,
                "plugins still loading after {LOAD_TIMEOUT:?}: {:?}",
                self.hooks.status()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The names of the plugins serving, in order.
    pub fn serving(&self) -> Vec<String> {
        let plugins = self.hooks.plugins();
        plugins.iter().map(|p| p.name.to_string()).collect()
    }

    /// The loaded plugin called `name`.
    pub fn plugin(&self, name: &str) -> Arc<stateset_hooks::registry::LoadedPlugin> {
        let plugins = self.hooks.plugins();
        let found = plugins.iter().find(|p| &*p.name == name);
        found.unwrap_or_else(|| panic!("no plugin {name}")).clone()
    }

    /// Stop the server gracefully: running plugin calls finish (or are cut
    /// at the grace period); queued ones stay pending in the store.
    pub async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// `stateset-hooks serve` as a child process on 127.0.0.1:0, database and
/// compile cache in the plugin directory, its log lines read on a thread.
/// Killed when dropped, so a failed assertion leaves no server behind.
pub struct ServeProcess {
    pub child: Child,
    pub addr: String,
    /// The admin listener's `ip:port`.
    pub admin_addr: String,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ServeProcess {
    /// Start and wait until ready. `rust_log` sets the log filter (the
    /// host's default when `None`).
    pub fn start(plugins: &PluginDir, rust_log: Option<&str>) -> Self {
        Self::start_with(plugins, rust_log, &[])
    }

    /// [`ServeProcess::start`] with more `serve` flags.
    pub fn start_with(plugins: &PluginDir, rust_log: Option<&str>, flags: &[&str]) -> Self {
        let mut command = Command::new(BIN);
        command
            .env_remove("RUST_LOG")
            .env("STATESET_WEBHOOK_SECRET", SECRET);
        if let Some(filter) = rust_log {
            command.env("RUST_LOG", filter);
        }
        let mut child = command
            .args(store_args(plugins))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .arg("--plugins")
            .arg(plugins.path())
            .arg("--cache-dir")
            .arg(plugins.cache_path())
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut served = Self {
            child,
            addr: String::new(),
            admin_addr: String::new(),
            lines,
            seen: Vec::new(),
        };
        let ready = served.wait_for("stateset-hooks ready");
        // A text line (`address=...`), or a JSON one (`--log-format json`).
        let field = |name: &str| {
            match serde_json::from_str::<serde_json::Value>(&ready) {
                Ok(json) => json["fields"][name].as_str().map(str::to_owned),
                Err(_) => ready
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix(&format!("{name}=")))
                    .map(str::to_owned),
            }
            .unwrap_or_else(|| panic!("the ready line names the {name}: {ready}"))
        };
        served.addr = field("address");
        served.admin_addr = field("admin");
        served
    }

    /// Wait for a log line containing `needle` and return it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        self.wait_for_each(&[needle]).remove(0)
    }

    /// Wait for a log line containing each of `needles`, in whatever order
    /// they come (two events' calls, the log of a call and of its receipt,
    /// may interleave); the lines, in the needles' order.
    pub fn wait_for_each(&mut self, needles: &[&str]) -> Vec<String> {
        let mut found: Vec<Option<String>> = vec![None; needles.len()];
        while let Some(missing) = found.iter().position(Option::is_none) {
            let Ok(line) = self.lines.recv_timeout(REPORT_TIMEOUT) else {
                panic!(
                    "no log line with {:?}; saw:\n{}",
                    needles[missing],
                    self.seen.join("\n")
                )
            };
            self.seen.push(line.clone());
            if let Some(slot) = (found.iter_mut().zip(needles))
                .find(|(slot, needle)| slot.is_none() && line.contains(*needle))
                .map(|(slot, _)| slot)
            {
                *slot = Some(line);
            }
        }
        found.into_iter().flatten().collect()
    }

    pub fn url(&self) -> String {
        format!("http://{}/webhooks/stateset", self.addr)
    }

    /// Every log line so far.
    pub fn log(&mut self) -> &[String] {
        self.seen.extend(self.lines.try_iter());
        &self.seen
    }

    /// SIGTERM, then wait for a clean exit; the exit status.
    /// POST `body`, signed, from outside the test's runtime (curl), and
    /// expect 200.
    pub fn send_blocking(&self, body: Vec<u8>) {
        let status = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .args(["-H", &format!("X-StateSet-Signature: {}", sign(&body))])
            .args(["--data-binary", &String::from_utf8(body).unwrap()])
            .arg(self.url())
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&status.stdout), "200");
    }

    /// SIGKILL: no shutdown, no last writes.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.wait_for("stopped");
        self.child.wait().unwrap()
    }

    /// The store this server uses, opened beside it.
    pub fn store(plugins: &PluginDir) -> Box<dyn stateset_hooks::store::Store> {
        match postgres::shared_server() {
            Some(server) => {
                let url = postgres::database_for(&server, plugins.path());
                let options = stateset_hooks::store::PgOptions::new(&url).unwrap();
                Box::new(stateset_hooks::store::PgStore::open(options).unwrap())
            }
            None => Box::new(
                stateset_hooks::store::SqliteStore::open(
                    &plugins.path().join("stateset-hooks.db"),
                    Duration::from_secs(5),
                )
                .unwrap(),
            ),
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sign(body: &[u8]) -> String {
    Secret::new(SECRET).unwrap().sign(body)
}

/// POST `body` to `url`, signed with the test secret.
pub async fn post_signed(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(url)
        .header("X-StateSet-Signature", sign(&body))
        .body(body)
        .send()
        .await
}

/// An example event shipped under `examples/events/`.
pub fn example_event(name: &str) -> Vec<u8> {
    std::fs::read(workspace_root().join(format!("examples/events/{name}.json"))).unwrap()
}

/// A small event of `event_type` whose `data` is `data`.
pub fn event(id: &str, event_type: &str, data: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "id": id, "type": event_type, "data": data })).unwrap()
}

/// Milliseconds since the Unix epoch, as the fixture plugin reads the clock.
pub fn now_ms() -> u64 {
    stateset_hooks::store::now_ms() as u64
}

/// An event the `misbehave` fixture takes until `until_ms` (wall clock) to
/// handle, sleeping in 1 ms slices: a long call that burns little fuel.
pub fn busy_until(id: &str, until_ms: u64) -> Vec<u8> {
    event(
        id,
        "order.created",
        serde_json::json!({ "misbehave": "busy-until", "until_ms": until_ms }),
    )
}

/// A manifest that gives the `misbehave` fixture room for long calls.
pub const SLOW_MANIFEST: &str = "[limits]\ntimeout_ms = 10000\n";

/// Messages a report's plugin logged.
pub fn messages(report: &Report) -> Vec<&str> {
    report
        .outcome
        .logs
        .iter()
        .map(|l| l.message.as_str())
        .collect()
}

// Hand-written components in the text format, for what no toolchain emits on purpose.

/// The smallest plugin any WIT toolchain could emit: exports `on-event`,
/// imports nothing (no `host`, no WASI), always answers `ok`.
pub const NO_IMPORTS_COMPONENT: &str = r#"
(component
  (core module $m
    (memory (export "memory") 1)
    (global $next (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $at i32)
      (local.set $at (global.get $next))
      (global.set $next (i32.add (global.get $next) (local.get 3)))
      (local.get $at))
    ;; result<_, string> comes back through a return area at address 0;
    ;; its first byte 0 means `ok`.
    (func (export "on-event") (param i32 i32 i32 i32) (result i32)
      (i32.store8 (i32.const 0) (i32.const 0))
      (i32.const 0)))
  (core instance $i (instantiate $m))
  (func (export "on-event")
    (param "event-type" string) (param "payload" string) (result (result (error string)))
    (canon lift (core func $i "on-event") (memory (core memory $i "memory")) (realloc (core func $i "realloc")))))
"#;

/// [`NO_IMPORTS_COMPONENT`] with `functions` more functions of straight-line
/// arithmetic: the same behaviour, a larger component that takes the
/// compiler a while (about 600 bytes of code each).
pub fn padded_component(functions: usize) -> Vec<u8> {
    let mut padding = String::new();
    for f in 0..functions {
        padding.push_str("(func (param i64) (result i64) local.get 0");
        for i in 0..100 {
            padding.push_str(&format!(
                " i64.const {} i64.mul i64.const {i} i64.add",
                f * 131 + i
            ));
        }
        padding.push_str(")\n");
    }
    let text = NO_IMPORTS_COMPONENT.replacen(
        "(memory (export \"memory\") 1)",
        &format!("(memory (export \"memory\") 1)\n{padding}"),
        1,
    );
    wat::parse_str(text).unwrap()
}

/// A plugin written in WAT: one core module exporting `on-event`, which runs
/// `on_event` and returns `ok`. `module` adds fields to that module, `before`
/// adds definitions to the component ahead of it.
pub fn wat_plugin(before: &str, module: &str, on_event: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(component
  {before}
  (core module $m
    (memory (export "memory") 1)
    {module}
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    (func (export "on-event") (param i32 i32 i32 i32) (result i32) {on_event} (i32.const 0)))
  (core instance $i (instantiate $m))
  (func (export "on-event")
    (param "event-type" string) (param "payload" string) (result (result (error string)))
    (canon lift (core func $i "on-event") (memory (core memory $i "memory")) (realloc (core func $i "realloc")))))"#
    ))
    .unwrap()
}

/// A component whose start-up code traps: every call fails at instantiation.
pub fn start_trap_component() -> Vec<u8> {
    wat_plugin("", "(func $start unreachable) (start $start)", "")
}

/// A component that fits another world: it exports `handle`, not `on-event`.
pub const WRONG_WORLD_COMPONENT: &str = r#"
(component
  (core module $m (func (export "handle")))
  (core instance $i (instantiate $m))
  (func (export "handle") (canon lift (core func $i "handle"))))
"#;

/// A plugin whose `on-event` grows a table by a million elements: host
/// memory outside linear memory, which the memory limit must still count.
pub fn table_grow_component() -> Vec<u8> {
    wat_plugin(
        "",
        "(table $t 1 funcref)",
        "(drop (table.grow $t (ref.null func) (i32.const 1000000)))",
    )
}

/// A plugin of `instances` core instances, each with its own memory: past
/// the per-call maximum of the instance pool when there are more than 16.
pub fn many_memories_component(instances: usize) -> Vec<u8> {
    let before = "(core module $mem (memory 1))\n".to_owned()
        + &"(core instance (instantiate $mem))\n".repeat(instances - 1);
    wat_plugin(&before, "", "")
}

pub type Received = Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

/// A service the samples post to: it keeps each JSON body with its
/// `Idempotency-Key` and answers 201.
pub async fn receiver() -> (u16, Received) {
    let received: Received = Default::default();
    let keep = received.clone();
    let handler = move |headers: axum::http::HeaderMap, body: axum::Json<serde_json::Value>| async move {
        let key = headers["idempotency-key"].to_str().unwrap().to_owned();
        keep.lock().unwrap().push((key, body.0));
        axum::http::StatusCode::CREATED
    };
    let app = axum::Router::new().route("/{*path}", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, received)
}
