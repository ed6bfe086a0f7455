//! The hostile plugin suite: every misbehaviour is contained by the running
//! server. Each failure is classified right, ends within its limit, the host
//! keeps answering HTTP, and the well-behaved `orders` plugin, subscribed to
//! the same events and running alongside, gets exactly the results it gets
//! when nothing misbehaves.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;
use serde_json::json;
use stateset_hooks::Report;
use stateset_hooks::runtime::{FailureKind, Limits};

/// Deadline given to the `slowpoke` plugin, which has fuel to spare, so an
/// infinite loop meets the clock rather than the fuel.
const SLOWPOKE_TIMEOUT: Duration = Duration::from_millis(300);

fn order_with(id: &str, misbehave: serde_json::Value) -> Vec<u8> {
    let mut order: serde_json::Value =
        serde_json::from_slice(&example_event("order.created")).unwrap();
    order["id"] = json!(id);
    if let serde_json::Value::Object(extra) = misbehave {
        for (k, v) in extra {
            order["data"][k] = v;
        }
    }
    serde_json::to_vec(&order).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_hostile_plugin_is_contained() {
    let plugins = PluginDir::samples();
    plugins
        .add(
            "hostile",
            "misbehave",
            Some(r#"subscriptions = ["order.*"]"#),
        )
        .add(
            "slowpoke",
            "misbehave",
            Some(&format!(
                "subscriptions = [\"slow.*\"]\n[limits]\nfuel = 1000000000\ntimeout_ms = {}",
                SLOWPOKE_TIMEOUT.as_millis()
            )),
        )
        .write("start-trap.wasm", start_trap_component())
        .write("start-trap.toml", r#"subscriptions = ["order.*"]"#);
    let mut config = config(&plugins);
    config.workers = 2;
    config.quarantine_after = 0; // every case below must reach the plugin
    config.limits.max = Limits::host_max(); // slowpoke's fuel
    let mut server = TestServer::start(config).await;

    // What `orders` says about this order when nothing misbehaves.
    let expected = "order ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E created: 3 items, total 66.68 USD; \
                    customer cus_01JQ2F8XW3K9M4N7P1R5T6V8YZ: 1 order";

    let cases: Vec<(&str, serde_json::Value, FailureKind, &str)> = vec![
        (
            "loop",
            json!({"misbehave": "loop"}),
            FailureKind::OutOfFuel,
            "",
        ),
        (
            "grow-forever",
            json!({"misbehave": "grow-forever"}),
            FailureKind::OutOfMemory,
            "memory limit",
        ),
        (
            "huge-allocation",
            json!({"misbehave": "allocate", "bytes": 1u64 << 30}),
            FailureKind::OutOfMemory,
            "memory limit",
        ),
        (
            "recursion",
            json!({"misbehave": "recurse", "depth": 10_000_000}),
            FailureKind::StackOverflow,
            "",
        ),
        (
            "panic",
            json!({"misbehave": "panic"}),
            FailureKind::Trap,
            "unreachable",
        ),
        (
            "unreachable",
            json!({"misbehave": "unreachable"}),
            FailureKind::Trap,
            "unreachable",
        ),
        (
            "huge-error",
            json!({"misbehave": "huge-error", "bytes": 5 << 20}),
            FailureKind::PluginError,
            "[cut: 5242880 bytes in all]",
        ),
        (
            "read-file",
            json!({"misbehave": "read-file", "path": "/etc/passwd"}),
            FailureKind::PluginError,
            "read-file denied",
        ),
        (
            "read-env",
            json!({"misbehave": "read-env"}),
            FailureKind::PluginError,
            "read-env denied",
        ),
        (
            "connect",
            json!({"misbehave": "connect"}),
            FailureKind::PluginError,
            "connect denied",
        ),
    ];

    // Hostile events, with good orders interleaved so `orders` runs alongside.
    for (name, misbehave, _, _) in &cases {
        assert_eq!(
            server
                .send(&order_with(&format!("evt_{name}"), misbehave.clone()))
                .await
                .0,
            200,
            "{name}"
        );
        assert_eq!(
            server
                .send(&order_with(&format!("evt_good_{name}"), json!({})))
                .await
                .0,
            200
        );
    }
    let flood = order_with(
        "evt_log-flood",
        json!({"misbehave": "log-flood", "lines": 5_000}),
    );
    assert_eq!(server.send(&flood).await.0, 200);
    // Loops where fuel does not help: slowpoke has fuel to spare, so only
    // its deadline can end them. `slow.*` events reach slowpoke alone.
    let slow_cases = ["loop", "loop-in-host-calls"];
    for name in slow_cases {
        let body = event(
            &format!("evt_slow_{name}"),
            "slow.loop",
            json!({ "misbehave": name }),
        );
        assert_eq!(server.send(&body).await.0, 200);
    }

    // The host answers as before while all that runs.
    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let (status, body) = server
        .send(&br#"{"type":"order.created","data":[]}"#[..])
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("`data` must be an object"))
    );

    // Every order.* event reaches hostile, orders and start-trap.
    let total = (cases.len() * 2 + 1) * 3 + slow_cases.len();
    let reports = server.reports_per_delivery(total).await;
    let by: HashMap<(String, String), &Report> = reports
        .iter()
        .map(|r| ((r.event_key.to_string(), r.plugin.to_string()), r))
        .collect();
    let get = |event: &str, plugin: &str| {
        *by.get(&(event.to_owned(), plugin.to_owned()))
            .unwrap_or_else(|| panic!("no report of {plugin} for {event}"))
    };

    for (name, _, kind, needle) in &cases {
        let report = get(&format!("evt_{name}"), "hostile");
        let failure = report.outcome.result.as_ref().unwrap_err();
        assert_eq!(failure.kind, *kind, "{name}: {failure:?}");
        assert!(
            failure.message.contains(needle),
            "{name}: {}",
            failure.message
        );
        assert!(
            report.outcome.elapsed < Duration::from_secs(1),
            "{name} ended within the deadline: {:?}",
            report.outcome.elapsed
        );
        for event in [format!("evt_{name}"), format!("evt_good_{name}")] {
            let orders = get(&event, "orders");
            assert_eq!(orders.outcome.result, Ok(()), "orders beside {name}");
            assert_eq!(messages(orders), [expected], "orders beside {name}");
            let start_trap = get(&event, "start-trap");
            assert_eq!(
                start_trap.outcome.result.as_ref().unwrap_err().kind,
                FailureKind::Trap
            );
        }
    }

    let flood = get("evt_log-flood", "hostile");
    assert_eq!(
        flood.outcome.result,
        Ok(()),
        "a log flood is cut, not fatal"
    );
    assert!(flood.outcome.dropped_output_bytes > 0);

    for name in slow_cases {
        let report = get(&format!("evt_slow_{name}"), "slowpoke");
        let failure = report.outcome.result.as_ref().unwrap_err();
        assert_eq!(failure.kind, FailureKind::Timeout, "{name}");
        let took = report.outcome.elapsed;
        assert!(
            took >= SLOWPOKE_TIMEOUT && took < SLOWPOKE_TIMEOUT * 3,
            "{name}: {took:?}"
        );
    }

    let counted = server.plugin("hostile").health.snapshot();
    assert_eq!(
        counted.succeeded,
        1 + cases.len() as u64,
        "the flood and the good orders"
    );
    let failed: u64 = counted.failed.iter().map(|(_, n)| n).sum();
    assert_eq!(failed, cases.len() as u64);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_failing_in_a_row_is_quarantined_until_released() {
    let plugins = PluginDir::samples();
    plugins.add("flaky", "misbehave", Some(r#"subscriptions = ["order.*"]"#));
    let mut server = TestServer::start(config(&plugins)).await;
    let after = stateset_hooks::health::DEFAULT_QUARANTINE_AFTER as usize;

    for i in 0..after {
        let body = order_with(&format!("evt_q{i}"), json!({"misbehave": "error"}));
        assert_eq!(server.send(&body).await.0, 200);
    }
    let reports = server.reports_per_delivery(after * 2).await;
    assert_eq!(
        reports.iter().filter(|r| &*r.plugin == "flaky").count(),
        after
    );
    assert!(server.plugin("flaky").health.is_quarantined());

    // Quarantined: the next event reaches orders only.
    assert_eq!(
        server.send(&order_with("evt_after", json!({}))).await.0,
        200
    );
    let next = server.reports(1).await;
    assert_eq!(&*next[0].plugin, "orders");
    assert_eq!(&*next[0].event_key, "evt_after");

    assert!(server.hooks.release("flaky"));
    assert!(!server.plugin("flaky").health.is_quarantined());
    assert_eq!(
        server.send(&order_with("evt_released", json!({}))).await.0,
        200
    );
    let mut both: Vec<String> = server
        .reports(2)
        .await
        .iter()
        .map(|r| r.plugin.to_string())
        .collect();
    both.sort();
    assert_eq!(both, ["flaky", "orders"]);
    server.stop().await;
}

/// Plugins that wait forever inside host calls, twice as many as there are
/// workers: each is cut at its deadline as a `timeout`, and `orders`, behind
/// them in the same queue, still handles every event.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_plugins_do_not_hold_the_workers() {
    let plugins = PluginDir::new();
    plugins
        .add("orders", "orders", Some(r#"subscriptions = ["order.*"]"#))
        .add(
            "sleepy",
            "misbehave",
            Some(&format!(
                "subscriptions = [\"order.*\"]\n[limits]\ntimeout_ms = {}",
                SLOWPOKE_TIMEOUT.as_millis()
            )),
        );
    let mut config = config(&plugins);
    config.workers = 2;
    let mut server = TestServer::start(config).await;
    const EVENTS: usize = 4;
    for i in 0..EVENTS {
        let body = order_with(
            &format!("evt_wait{i}"),
            json!({"misbehave": "sleep-forever"}),
        );
        assert_eq!(server.send(&body).await.0, 200);
    }
    let (mut timeouts, mut handled) = (0, 0);
    while timeouts < EVENTS || handled < EVENTS {
        let report = server.reports(1).await.remove(0);
        match &*report.plugin {
            "sleepy" => {
                let failure = report.outcome.result.as_ref().unwrap_err();
                assert_eq!(failure.kind, FailureKind::Timeout, "{report:#?}");
                assert!(report.outcome.elapsed < SLOWPOKE_TIMEOUT + Duration::from_millis(500));
                timeouts += usize::from(report.attempt == 1);
            }
            _ => {
                assert_eq!(report.outcome.result, Ok(()), "{report:#?}");
                handled += 1;
            }
        }
    }
    server.stop().await;
}

/// A manifest is the plugin author's: it reads only the variables the
/// operator grants, never the webhook secret, and a refusal names the
/// variable without echoing any value.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_reads_only_the_environment_the_operator_grants() {
    let plugins = PluginDir::new();
    let asks = |var: &str| format!("[config]\ntoken = {{ env = \"{var}\" }}\n");
    plugins
        .add("thief", "orders", Some(&asks("STATESET_WEBHOOK_SECRET")))
        .add("snoop", "orders", Some(&asks("HOME")))
        .add(
            "neighbour",
            "orders",
            Some(&asks("STATESET_PLUGIN_GRANTED__TOKEN")),
        )
        .add("granted", "orders", Some(&asks("PATH")));
    let mut config = config(&plugins);
    config.plugin_env.insert("PATH".into());
    let server = TestServer::start(config).await;
    assert_eq!(server.serving(), ["granted"]);
    let failures = server.hooks.load_failures();
    assert_eq!(failures.len(), 3, "{failures:?}");
    for failure in &failures {
        assert!(
            failure.reason.contains("is not granted to plugins"),
            "{failure:?}"
        );
        assert!(!failure.reason.contains(SECRET), "{failure:?}");
    }
    let status = serde_json::to_string(&server.hooks.status()).unwrap();
    assert!(!status.contains(SECRET));
    server.stop().await;
}

/// The operator sets the ceiling: a manifest asking for more fuel, memory or
/// time than it allows is refused at load, naming the limit; raised, it loads.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_asking_above_the_operators_ceiling_is_refused() {
    let plugins = PluginDir::new();
    plugins
        .add("fuel", "orders", Some("[limits]\nfuel = 100000001\n"))
        .add("memory", "orders", Some("[limits]\nmemory_mib = 257\n"))
        .add("time", "orders", Some("[limits]\ntimeout_ms = 10001\n"))
        .add("requests", "orders", Some("[http]\nmax_requests = 101\n"))
        .add(
            "response",
            "orders",
            Some("[http]\nmax_response_kib = 16385\n"),
        )
        .add("quota", "orders", Some("[kv]\nquota_kib = 65537\n"))
        // Would wrap to 0 bytes if multiplied unchecked.
        .add(
            "wrap",
            "orders",
            Some("[kv]\nquota_kib = 18014398509481984\n"),
        )
        .add(
            "modest",
            "orders",
            Some("[limits]\nfuel = 100000000\ntimeout_ms = 10000\n[http]\nmax_requests = 100\n"),
        );
    let server = TestServer::start(config(&plugins)).await;
    assert_eq!(server.serving(), ["modest"]);
    let reasons: std::collections::BTreeMap<String, String> = server
        .hooks
        .load_failures()
        .into_iter()
        .map(|f| {
            (
                f.path.file_stem().unwrap().to_string_lossy().into_owned(),
                f.reason,
            )
        })
        .collect();
    for (plugin, key) in [
        ("fuel", "fuel"),
        ("memory", "memory_mib"),
        ("time", "timeout_ms"),
    ] {
        let reason = &reasons[plugin];
        assert!(reason.contains(&format!("limits.{key} = ")), "{reason}");
        assert!(
            reason.contains("above the most this host grants a plugin"),
            "{reason}"
        );
    }
    for (plugin, said) in [
        (
            "requests",
            "http.max_requests = 101 is above the maximum, 100",
        ),
        (
            "response",
            "http.max_response_kib = 16385 is above the maximum, 16384",
        ),
        ("quota", "kv.quota_kib = 65537 is above the maximum, 65536"),
        (
            "wrap",
            "kv.quota_kib = 18014398509481984 is above the maximum",
        ),
    ] {
        assert!(reasons[plugin].contains(said), "{}", reasons[plugin]);
    }
    server.stop().await;

    // The operator raises the ceilings (`--max-fuel`, `--max-http-requests`,
    // `--max-kv-quota-kib`, ...): the same manifests load, except the absurd one.
    let mut raised = config(&plugins);
    raised.limits.max = Limits::host_max();
    raised.http.max_requests = 1000;
    raised.http.max_response_bytes = 32 << 20;
    raised.kv.max_quota_bytes = 1 << 30;
    let server = TestServer::start(raised).await;
    assert_eq!(server.hooks.plugins().len(), 7);
    assert_eq!(server.hooks.load_failures().len(), 1);
    server.stop().await;
}

/// Every file in the plugin directory is the plugin author's: a FIFO is
/// refused without being opened for a blocking read, an oversized component
/// without being read, and a manifest linked to the host's environment is
/// not followed.
#[tokio::test(flavor = "multi_thread")]
async fn files_in_the_plugin_directory_are_untrusted() {
    let plugins = PluginDir::new();
    plugins.add("orders", "orders", None);
    let dir = plugins.path();
    let made = std::process::Command::new("mkfifo")
        .arg(dir.join("fifo.wasm"))
        .status();
    assert!(made.unwrap().success());
    plugins.add("fifo-manifest", "orders", None);
    std::process::Command::new("mkfifo")
        .arg(dir.join("fifo-manifest.toml"))
        .status()
        .unwrap();
    plugins.add("environ", "orders", None);
    std::os::unix::fs::symlink("/proc/self/environ", dir.join("environ.toml")).unwrap();
    let huge = std::fs::File::create(dir.join("huge.wasm")).unwrap();
    huge.set_len(stateset_hooks::plugin_file::MAX_COMPONENT_BYTES + 1)
        .unwrap();

    let server = TestServer::start(config(&plugins)).await;
    assert_eq!(server.serving(), ["orders"]);
    let failures = server.hooks.load_failures();
    let reason = |name: &str| {
        let found = failures
            .iter()
            .find(|f| f.path.ends_with(format!("{name}.wasm")));
        found
            .unwrap_or_else(|| panic!("{name}: {failures:?}"))
            .reason
            .clone()
    };
    assert!(reason("fifo").contains("not a regular file"));
    assert!(reason("fifo-manifest").contains("not a regular file"));
    assert!(reason("huge").contains("larger than 67108864 bytes"));
    assert!(reason("environ").contains("not a regular file"));
    let path = std::env::var("PATH").unwrap();
    let shown = format!(
        "{failures:?}{}",
        serde_json::to_string(&server.hooks.status()).unwrap()
    );
    assert!(
        !shown.contains(&path) && !shown.contains("PATH="),
        "{shown}"
    );
    server.stop().await;
}

fn cache_entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    entries.sort();
    entries
}

/// The compile cache holds native code the host runs: it is created 0700,
/// not used when others may write to it, never inside the plugin directory,
/// and kept under its size cap by evicting entries no loaded plugin uses.
#[test]
fn the_compile_cache_is_guarded() {
    use std::os::unix::fs::PermissionsExt as _;
    let plugins = PluginDir::new();
    plugins.add("orders", "orders", None);
    let start = |max_bytes: Option<u64>| {
        let mut config = config(&plugins);
        config.watch = false;
        config.cache_max_bytes = max_bytes.unwrap_or(config.cache_max_bytes);
        stateset_hooks::Hooks::new(config).unwrap()
    };
    let cache = plugins.cache_path();
    drop(start(None));
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let orders_entry = cache_entries(&cache);
    assert_eq!(orders_entry.len(), 1);

    // Writable by others: refused, so every start compiles and writes nothing.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    plugins.add("payments", "payments", None);
    let hooks = start(None);
    assert_eq!(
        hooks.runtime().compiled_count(),
        2,
        "the cache was not read"
    );
    assert_eq!(hooks.plugins().len(), 2);
    drop(hooks);
    assert_eq!(cache_entries(&cache), orders_entry, "nor written");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();

    // Over the cap: an entry no loaded plugin uses goes, the ones in use stay.
    drop(start(None));
    assert_eq!(cache_entries(&cache).len(), 2);
    std::fs::remove_file(plugins.path().join("payments.wasm")).unwrap();
    plugins.add("low-stock", "low-stock", None);
    let hooks = start(Some(1));
    assert_eq!(hooks.runtime().compiled_count(), 1, "low-stock only");
    drop(hooks);
    let kept = cache_entries(&cache);
    assert_eq!(
        kept.len(),
        2,
        "orders (read) and low-stock (written): {kept:?}"
    );
    assert!(kept.contains(&orders_entry[0]));

    // A plugin replaced while the host runs: its old build's entry goes.
    let hooks = start(Some(1));
    assert_eq!(hooks.runtime().compiled_count(), 0);
    std::fs::copy(wasm("payments"), plugins.path().join("orders.wasm")).unwrap();
    hooks.reload("orders");
    let deadline = std::time::Instant::now() + REPORT_TIMEOUT;
    while cache_entries(&cache).contains(&orders_entry[0]) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            cache_entries(&cache)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        cache_entries(&cache).len(),
        2,
        "low-stock and the new orders"
    );
    drop(hooks);

    // Inside the plugin directory: refused by name.
    let mut inside = config(&plugins);
    inside.cache_dir = Some(plugins.path().join("cache"));
    let error = stateset_hooks::Hooks::new(inside).unwrap_err().to_string();
    assert!(error.contains("cache_dir"), "{error}");
    assert!(error.contains("inside the plugin directory"), "{error}");
}

/// Each call's share of the instance pool is fixed: a component needing more
/// memories than a call may hold is refused at load, not left to fail (or
/// starve other plugins) at call time.
#[tokio::test(flavor = "multi_thread")]
async fn a_component_needing_more_than_a_calls_share_of_the_pool_is_refused() {
    let plugins = PluginDir::new();
    plugins
        .write("sixteen.wasm", many_memories_component(15))
        .write("seventeen.wasm", many_memories_component(17));
    let mut server = TestServer::start(config(&plugins)).await;
    assert_eq!(server.serving(), ["sixteen"]);
    let failures = server.hooks.load_failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].reason.contains("memories"), "{failures:?}");
    assert_eq!(server.send(&example_event("order.created")).await.0, 200);
    assert_eq!(server.reports(1).await[0].outcome.result, Ok(()));
    server.stop().await;
}
