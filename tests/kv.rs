//! Per-plugin key-value state (WIT 0.3.0 `kv`) through the real server:
//! writes commit with the delivery, so a counter fed N events ends at exactly
//! N however many attempts fail or the host is killed; plugins do not see
//! one another's keys; quotas hold.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;
use stateset_hooks::runtime::kv::KvRead;
use stateset_hooks::runtime::{Failure, FailureKind};

fn counted(store: &dyn KvRead, plugin: &str) -> i64 {
    store
        .kv_get(plugin, "count")
        .unwrap()
        .map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap())
}

const COUNTER: &str = "subscriptions = [\"order.*\"]\n";

/// N events, a third of them failing their first attempts after counting:
/// the count ends at exactly N.
#[tokio::test(flavor = "multi_thread")]
async fn a_counter_counts_each_event_once_whatever_fails() {
    const EVENTS: usize = 12;
    let plugins = PluginDir::new();
    plugins.add("counter", "misbehave", Some(COUNTER));
    let mut config = config(&plugins);
    config.workers = 2;
    config.retry.max_attempts = 10;
    config.retry.base_delay = Duration::from_millis(50);
    config.retry.max_delay = Duration::from_millis(200);
    config.retry.jitter = 0.0;
    let mut server = TestServer::start(config).await;
    let fail_until = now_ms() + 700;
    for i in 0..EVENTS {
        let flaky = if i % 3 == 0 { fail_until } else { 0 };
        let body = event(
            &format!("evt_count_{i}"),
            "order.created",
            json!({ "misbehave": "count", "fail_until_ms": flaky }),
        );
        assert_eq!(server.send(&body).await.0, 200);
    }
    let (mut succeeded, mut failed) = (0, 0);
    while succeeded < EVENTS {
        let report = server.reports(1).await.remove(0);
        match report.outcome.result {
            Ok(()) => succeeded += 1,
            Err(_) => {
                failed += 1;
                assert!(report.outcome.kv_writes.is_empty(), "{report:?}");
            }
        }
    }
    assert!(failed >= EVENTS / 3, "some attempts failed: {failed}");
    assert_eq!(
        counted(server.hooks.store().as_ref(), "counter"),
        EVENTS as i64
    );
    server.stop().await;
}

/// Killed with SIGKILL mid-stream and started again: every event counted
/// exactly once.
#[test]
fn a_counter_survives_sigkill_exactly() {
    const EVENTS: usize = 30;
    let plugins = PluginDir::new();
    plugins.add("counter", "misbehave", Some(COUNTER));
    let mut host = ServeProcess::start_with(&plugins, Some("info"), &["--workers", "1"]);
    for i in 0..EVENTS {
        let body = event(
            &format!("evt_kill_{i}"),
            "order.created",
            json!({ "misbehave": "count", "ms": 100 }),
        );
        host.send_blocking(body);
    }
    // Three seconds of work, one worker: killed mid-stream without warning.
    host.kill();
    let before = counted(&*ServeProcess::store(&plugins), "counter");
    assert!(
        before < EVENTS as i64,
        "all counted before the kill: {before}"
    );
    let mut host = ServeProcess::start(&plugins, Some("info"));
    let store = ServeProcess::store(&plugins);
    let deadline = Instant::now() + REPORT_TIMEOUT;
    while counted(&*store, "counter") < EVENTS as i64 {
        assert!(
            Instant::now() < deadline,
            "counted {}",
            counted(&*store, "counter")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counted(&*store, "counter"), EVENTS as i64);
    host.stop();

    // What an operator sees.
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(BIN)
            .args(store_args(&plugins))
            .arg("kv")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(cli(&["list", "counter"]), "count\t2 bytes\n");
    assert_eq!(cli(&["get", "counter", "count"]), format!("{EVENTS}\n"));
}

/// One plugin's keys are its own, and its quota holds.
#[tokio::test(flavor = "multi_thread")]
async fn each_plugin_sees_only_its_own_keys_within_its_quota() {
    let plugins = PluginDir::new();
    plugins
        .add(
            "writer",
            "misbehave",
            Some("subscriptions = [\"order.created\"]\n[kv]\nquota_kib = 4\n"),
        )
        .add(
            "reader",
            "misbehave",
            Some("subscriptions = [\"order.updated\"]\n"),
        );
    let mut server = TestServer::start(config(&plugins)).await;
    let set = |id: &str, bytes: u64| {
        event(
            id,
            "order.created",
            json!({ "misbehave": "kv-set", "key": "secret", "bytes": bytes }),
        )
    };
    assert_eq!(server.send(&set("evt_set", 100)).await.0, 200);
    let report = server.reports(1).await.remove(0);
    assert_eq!(report.outcome.result, Ok(()));
    let get = event(
        "evt_get",
        "order.updated",
        json!({ "misbehave": "kv-get", "key": "secret" }),
    );
    assert_eq!(server.send(&get).await.0, 200);
    let report = server.reports(1).await.remove(0);
    assert_eq!(messages(&report), ["get secret: none"]);
    let store = server.hooks.store().clone();
    assert_eq!(
        store.kv_get("writer", "secret").unwrap().map(|v| v.len()),
        Some(100)
    );

    assert_eq!(server.send(&set("evt_big", 8 << 10)).await.0, 200);
    let report = server.reports(1).await.remove(0);
    let failure = report.outcome.result.unwrap_err();
    assert!(failure.message.contains("kv quota"), "{failure:?}");
    assert_eq!(
        store.kv_get("writer", "secret").unwrap().map(|v| v.len()),
        Some(100)
    );
    server.stop().await;
}

/// The `orders` sample counts each customer's distinct orders: a second
/// event about the same order does not count again, another order does.
#[tokio::test(flavor = "multi_thread")]
async fn the_orders_sample_counts_distinct_orders_per_customer() {
    let plugins = PluginDir::samples();
    let mut server = TestServer::start(config(&plugins)).await;
    let created: serde_json::Value =
        serde_json::from_slice(&example_event("order.created")).unwrap();
    let customer = created["data"]["customer"]["id"].as_str().unwrap();
    let mut second = created.clone();
    second["id"] = json!("evt_second_order");
    second["data"]["id"] = json!("ord_second");
    let mut anonymous = created.clone();
    anonymous["id"] = json!("evt_anonymous");
    anonymous["data"]["id"] = json!("ord_anonymous");
    anonymous["data"]["customer"] = serde_json::Value::Null;

    let mut counts = Vec::new();
    for body in [
        example_event("order.created"),
        example_event("order.updated"),
        serde_json::to_vec(&second).unwrap(),
        serde_json::to_vec(&anonymous).unwrap(),
    ] {
        assert_eq!(server.send(&body).await.0, 200);
        let report = server
            .reports(1)
            .await
            .into_iter()
            .find(|r| &*r.plugin == "orders")
            .unwrap();
        let line = messages(&report).join(" | ");
        counts.push(line.split_once("; ").map(|(_, count)| count.to_owned()));
    }
    let said = |n: &str| Some(format!("customer {customer}: {n}"));
    assert_eq!(
        counts,
        [said("1 order"), said("1 order"), said("2 orders"), None]
    );
    let store = server.hooks.store().clone();
    let count = store.kv_get("orders", &format!("customer/{customer}/orders"));
    assert_eq!(count.unwrap().as_deref(), Some(&b"2"[..]));
    server.stop().await;
}

/// A store whose reads hang cannot hold a call past its deadline: the read
/// is awaited like any host future, and the call ends as a timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_store_read_cannot_hold_a_call_past_its_deadline() {
    let (failure, elapsed) = read_through(|| {
        std::thread::sleep(Duration::from_secs(5));
        Ok(None)
    })
    .await;
    assert_eq!(failure.kind, FailureKind::Timeout, "{failure:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

/// A store whose read fails (PostgreSQL restarting) fails the call as the
/// host's error, not the plugin's: retried, and no step towards quarantine.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_store_read_is_the_hosts_error() {
    let (failure, _) = read_through(|| Err("store busy: PostgreSQL is unreachable".into())).await;
    assert_eq!(failure.kind, FailureKind::HostError, "{failure:?}");
    assert!(failure.message.contains("unreachable"), "{failure:?}");
}

/// A store whose every read is `get`; nothing else is asked of it.
struct Gets(fn() -> Result<Option<Vec<u8>>, String>);

impl KvRead for Gets {
    fn kv_get(&self, _: &str, _: &str) -> Result<Option<Vec<u8>>, String> {
        (self.0)()
    }
    fn kv_keys(&self, _: &str, _: &str, _: usize) -> Result<Vec<String>, String> {
        unreachable!()
    }
    fn kv_usage(&self, _: &str) -> Result<u64, String> {
        unreachable!()
    }
}

/// A plugin's `kv-get` call (300 ms deadline) on a store that reads with
/// `get`: how it failed, and how long it took.
async fn read_through(get: fn() -> Result<Option<Vec<u8>>, String>) -> (Failure, Duration) {
    use stateset_hooks::loader::{Grants, load_file};
    use stateset_hooks::runtime::Runtime;
    use std::sync::Arc;

    let runtime = Arc::new(Runtime::new(None, 1).unwrap());
    runtime.use_kv(Arc::new(Gets(get)));
    let plugins = PluginDir::new();
    plugins.add("reader", "misbehave", Some("[limits]\ntimeout_ms = 300\n"));
    let path = plugins.path().join("reader.wasm");
    let loaded = load_file(&runtime, &path, &Grants::default()).unwrap();
    let payload = event(
        "evt_hung",
        "order.created",
        json!({ "misbehave": "kv-get", "key": "k" }),
    );
    let outcome = tokio::task::spawn_blocking(move || {
        let payload = String::from_utf8(payload).unwrap();
        runtime.call(
            &loaded.prepared,
            &Arc::from("evt_hung"),
            "order.created",
            &payload,
        )
    })
    .await
    .unwrap()
    .unwrap();
    (outcome.result.unwrap_err(), outcome.elapsed)
}

/// Two deliveries claim one key side by side: the second to commit
/// conflicts, its report says `Failed` (though its call returned `Ok`), and
/// it runs again on the state as it now is.
#[tokio::test(flavor = "multi_thread")]
async fn a_conflict_at_commit_is_reported_failed_and_runs_again() {
    use stateset_hooks::store::Status;
    let plugins = PluginDir::new();
    plugins.add("claimer", "misbehave", Some(COUNTER));
    let mut config = config(&plugins);
    config.workers = 2;
    config.retry.max_attempts = 5;
    let mut server = TestServer::start(config).await;
    for id in ["evt_a", "evt_b"] {
        let body = event(
            id,
            "order.created",
            json!({ "misbehave": "claim", "key": "k", "ms": 500 }),
        );
        assert_eq!(server.send(&body).await.0, 200);
    }
    let reports = server.reports(3).await;
    let statuses: Vec<Status> = reports.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [Status::Succeeded, Status::Failed, Status::Succeeded],
        "{reports:#?}"
    );
    assert_eq!(
        reports[1].outcome.result,
        Ok(()),
        "the call itself succeeded"
    );
    assert_eq!(messages(&reports[1]), ["claimed k: true"]);
    assert_eq!(reports[2].event_key, reports[1].event_key);
    assert_eq!(
        messages(&reports[2]),
        ["claimed k: false"],
        "it sees the claim"
    );
    server.stop().await;
}
