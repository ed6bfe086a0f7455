//! Never lose an acknowledged event: idempotency, retries, dead letters,
//! replay, a crash in the middle of traffic, and a store that stops writing.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;
use stateset_hooks::runtime::FailureKind;
use stateset_hooks::store::{Filter, SqliteStore, Status, Store};

#[tokio::test(flavor = "multi_thread")]
async fn duplicates_are_acknowledged_and_dispatched_once() {
    let plugins = PluginDir::new();
    plugins.add("counter", "misbehave", None);
    let mut server = TestServer::start(config(&plugins)).await;

    let with_id = event("evt_dup", "order.created", json!({}));
    let without_id = br#"{"type":"order.created","data":{"id":"order-123"}}"#.to_vec();
    for body in [&with_id, &without_id] {
        assert_eq!(server.send(body).await, (200, json!({ "received": true })));
        let again = json!({ "received": true, "duplicate": true });
        assert_eq!(server.send(body).await, (200, again.clone()));
        assert_eq!(server.send(body).await, (200, again));
    }
    // A later event's report comes right after the two originals: the
    // duplicates ran nothing.
    assert_eq!(
        server
            .send(&event("evt_after", "order.created", json!({})))
            .await
            .0,
        200
    );
    let keys: Vec<String> = server
        .reports(3)
        .await
        .iter()
        .map(|r| r.event_key.to_string())
        .collect();
    assert_eq!(keys[0], "evt_dup");
    assert!(keys[1].starts_with("sha256:"), "{keys:?}");
    assert_eq!(keys[2], "evt_after");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_retry_with_backoff_then_succeed_or_die_and_replay() {
    let plugins = PluginDir::new();
    plugins.add("sync", "misbehave", None);
    let mut config = config(&plugins);
    config.retry.max_attempts = 3;
    config.retry.base_delay = Duration::from_millis(300);
    config.retry.jitter = 0.0;
    let mut server = TestServer::start(config).await;

    // Down for 0.9 s: attempts at 0, 0.3 s and 1.5 s fail, fail, succeed.
    let flaky = event(
        "evt_flaky",
        "order.created",
        json!({ "misbehave": "fail-until", "until_ms": now_ms() + 900 }),
    );
    assert_eq!(server.send(&flaky).await.0, 200);
    let reports = server.reports(3).await;
    let seen: Vec<(u32, Status)> = reports.iter().map(|r| (r.attempt, r.status)).collect();
    assert_eq!(
        seen,
        [
            (1, Status::Failed),
            (2, Status::Failed),
            (3, Status::Succeeded)
        ]
    );
    let stored = server.hooks.store().event("evt_flaky").unwrap().unwrap();
    assert_eq!(stored.deliveries[0].status, Status::Succeeded);
    assert_eq!(stored.deliveries[0].attempts, 3);

    // Always failing: dead after the third attempt, in the dead-letter queue.
    let broken = event(
        "evt_broken",
        "order.created",
        json!({ "misbehave": "fail-until", "until_ms": now_ms() + 600_000 }),
    );
    assert_eq!(server.send(&broken).await.0, 200);
    let reports = server.reports(3).await;
    assert_eq!(reports[2].status, Status::Dead);
    let dead = server
        .hooks
        .store()
        .deliveries(&Filter {
            status: Some(Status::Dead),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_key, "evt_broken");
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].last_failure_kind, Some(FailureKind::PluginError));
    assert!(
        dead[0]
            .last_failure_message
            .as_deref()
            .unwrap()
            .starts_with("not yet")
    );
    server.stop().await;

    // "Fixed": the same plugin name is now a build that handles the event.
    // Restart on the same database, replay the DLQ from the command line
    // while the server runs.
    std::fs::copy(wasm("orders"), plugins.path().join("sync.wasm")).unwrap();
    let mut config = crate::support::config(&plugins);
    config.retry.max_attempts = 3;
    let mut server = TestServer::start(config).await;
    let output = Command::new(BIN)
        .args(store_args(&plugins))
        .args(["dlq", "replay", "--all"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "1 dead deliveries pending again\n"
    );
    let replayed = server.reports(1).await;
    assert_eq!(&*replayed[0].event_key, "evt_broken");
    assert_eq!(replayed[0].attempt, 4);
    // The orders build rejects this event's data, but it ran: the version
    // recorded is the new one.
    let stored = server.hooks.store().event("evt_broken").unwrap().unwrap();
    assert_eq!(
        stored.deliveries[0].plugin_version.as_deref(),
        Some(&*replayed[0].version)
    );
    assert_eq!(
        &*replayed[0].version,
        server.plugin("sync").version.as_ref()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_cannot_write_gets_503_and_recovers() {
    let plugins = PluginDir::samples();
    let mut config = config(&plugins);
    config.busy_timeout = Duration::from_millis(200);
    let db = config.db_path.clone();
    let mut server = TestServer::start(config).await;
    assert_eq!(server.send(&example_event("order.created")).await.0, 200);
    server.reports(1).await;

    // Another process holds the write lock: every append waits, then fails.
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    for i in 0..5 {
        let response = reqwest::Client::new()
            .post(server.url("/webhooks/stateset"))
            .header(
                "X-StateSet-Signature",
                sign(&event(
                    &format!("evt_locked_{i}"),
                    "payment.succeeded",
                    json!({"id": "p", "amount_cents": 1}),
                )),
            )
            .body(event(
                &format!("evt_locked_{i}"),
                "payment.succeeded",
                json!({"id": "p", "amount_cents": 1}),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "5");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("store busy"),
            "{body}"
        );
    }
    blocker.execute_batch("COMMIT").unwrap();

    // Back: the sender's retry is stored and handled; nothing refused was kept.
    let retried = event(
        "evt_locked_0",
        "payment.succeeded",
        json!({"id": "p", "amount_cents": 1}),
    );
    assert_eq!(
        server.send(&retried).await,
        (200, json!({ "received": true }))
    );
    let report = server.reports(1).await;
    assert_eq!(&*report[0].event_key, "evt_locked_0");
    assert!(
        server
            .hooks
            .store()
            .event("evt_locked_1")
            .unwrap()
            .is_none()
    );
    server.stop().await;
}

/// A plugin far behind (here 100,001 deliveries held for one that is not
/// loaded, written into the file directly) is its own problem: the store has
/// room, so other events are accepted and delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_far_behind_does_not_get_other_events_refused() {
    let plugins = PluginDir::new();
    plugins.add(
        "other",
        "misbehave",
        Some(r#"subscriptions = ["payment.*"]"#),
    );
    let config = config(&plugins);
    drop(SqliteStore::open(&config.db_path, Duration::from_secs(5)).unwrap());
    rusqlite::Connection::open(&config.db_path)
        .unwrap()
        .execute_batch(
            "BEGIN;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100001)
             INSERT INTO events (key, event_type, received_at, body)
                 SELECT 'evt_held_' || i, 'order.created', 0,
                        CAST('{\"type\":\"order.created\",\"data\":{}}' AS BLOB) FROM n;
             INSERT INTO deliveries (event_key, plugin, status, attempts, next_attempt_at, created_at, updated_at)
                 SELECT key, 'stuck', 'pending', 0, 0, 0, 0 FROM events;
             COMMIT;",
        )
        .unwrap();
    let mut server = TestServer::start(config).await;
    let body = event("evt_pay", "payment.succeeded", json!({}));
    assert_eq!(server.send(&body).await, (200, json!({ "received": true })));
    let report = &server.reports(1).await[0];
    assert_eq!((&*report.event_key, &*report.plugin), ("evt_pay", "other"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_at_its_size_limit_gets_503() {
    let plugins = PluginDir::new();
    let mut config = config(&plugins);
    config.store_max_bytes = stateset_hooks::config::MIN_STORE_MAX_BYTES;
    let server = TestServer::start(config).await;
    let pad = "x".repeat(900 << 10);
    let mut refused = None;
    for i in 0..40 {
        let body = event(
            &format!("evt_big_{i}"),
            "order.created",
            json!({ "pad": pad }),
        );
        let (status, response) = server.send(&body).await;
        if status != 200 {
            refused = Some((i, status, response));
            break;
        }
    }
    let (i, status, response) = refused.expect("a 16 MiB store refuses forty 900 KiB events");
    assert_eq!(status, 503, "{response}");
    let error = response["error"].as_str().unwrap();
    assert!(error.contains("store full"), "{error}");
    assert!(i >= 10, "refused only once full: after {i} events");
    server.stop().await;
}

/// A replay that lands while the delivery runs is not overwritten by that
/// run's outcome: the delivery runs again after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_while_the_delivery_runs_runs_it_again_after() {
    let plugins = PluginDir::new();
    plugins.add("slow", "misbehave", Some(SLOW_MANIFEST));
    let mut server = TestServer::start(config(&plugins)).await;
    let body = busy_until("evt_running", now_ms() + 2000);
    assert_eq!(server.send(&body).await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await; // the call is running
    let replayed = server
        .hooks
        .store()
        .replay_event("evt_running", None)
        .unwrap();
    assert_eq!(replayed, 1);
    let runs: Vec<(String, Status)> = server
        .reports(2)
        .await
        .iter()
        .map(|r| (r.event_key.to_string(), r.status))
        .collect();
    // The first run's outcome is not recorded over the replay: its report
    // says the delivery is still pending, and the second run settles it.
    assert_eq!(
        runs,
        [
            ("evt_running".to_owned(), Status::Pending),
            ("evt_running".to_owned(), Status::Succeeded)
        ]
    );
    let stored = server.hooks.store().event("evt_running").unwrap().unwrap();
    assert_eq!(stored.deliveries[0].status, Status::Succeeded);
    server.stop().await;
}

/// Event keys each plugin logged handling (the fixture logs `misbehave ok "KEY"`).
fn handled(host: &mut ServeProcess) -> Vec<(String, String)> {
    host.log()
        .iter()
        .filter_map(|line| {
            let key = line.split("misbehave ok \"").nth(1)?.split('"').next()?;
            let plugin = line.split("plugin=\"").nth(1)?.split('"').next()?;
            Some((key.to_owned(), plugin.to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_loses_no_acknowledged_event() {
    const EVENTS: usize = 2400;
    const CLIENTS: usize = 8;
    const KILL_AFTER: usize = 1000;
    let plugins = PluginDir::new();
    plugins
        .add("alpha", "misbehave", None)
        .add("beta", "misbehave", None);
    let mut host = ServeProcess::start(&plugins, Some("info"));
    let url = format!("http://{}/webhooks/stateset", host.addr);

    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::new();
    let senders: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (client, url, acked, count) =
                (client.clone(), url.clone(), acked.clone(), count.clone());
            tokio::spawn(async move {
                for i in (c..EVENTS).step_by(CLIENTS) {
                    let key = format!("evt_crash_{i}");
                    let body = event(&key, "order.created", json!({ "n": i }));
                    let sent = client
                        .post(&url)
                        .header("X-StateSet-Signature", sign(&body))
                        .body(body)
                        .send()
                        .await;
                    match sent {
                        Ok(response) if response.status() == 200 => {
                            acked.lock().unwrap().push(key);
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(response) => panic!("unexpected {}", response.status()),
                        Err(_) => {} // the host is dead: not acknowledged
                    }
                }
            })
        })
        .collect();

    while count.load(Ordering::Relaxed) < KILL_AFTER {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    host.child.kill().unwrap(); // SIGKILL: no shutdown, no flush
    host.child.wait().unwrap();
    for sender in senders {
        sender.await.unwrap();
    }
    let acked: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let before_crash = handled(&mut host);
    assert!(acked.len() >= KILL_AFTER, "{}", acked.len());

    // Restart on the same database: everything acknowledged is there and
    // every delivery for it completes.
    let mut restarted = ServeProcess::start(&plugins, Some("info"));
    let store = ServeProcess::store(&plugins);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = store
            .deliveries(&Filter {
                status: Some(Status::Succeeded),
                ..Filter::default()
            })
            .unwrap();
        let done: HashSet<(String, String)> =
            done.into_iter().map(|d| (d.event_key, d.plugin)).collect();
        let missing: Vec<&String> = acked
            .iter()
            .filter(|k| {
                !done.contains(&((*k).clone(), "alpha".into()))
                    || !done.contains(&((*k).clone(), "beta".into()))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged events not handled, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for key in &acked {
        assert!(
            store.event(key).unwrap().is_some(),
            "{key} acknowledged but not stored"
        );
    }

    // Handled twice: ran before the crash, but its outcome was not yet
    // recorded, so it ran again after the restart.
    let mut runs: HashMap<(String, String), usize> = HashMap::new();
    for handled in before_crash.into_iter().chain(handled(&mut restarted)) {
        *runs.entry(handled).or_default() += 1;
    }
    let twice = runs.values().filter(|&&n| n > 1).count();
    println!(
        "crash test: {} sent, {} acknowledged before SIGKILL, all {} stored and handled; {twice} deliveries handled twice",
        EVENTS,
        acked.len(),
        acked.len()
    );
}

/// A database an earlier version wrote (schema 1, plugin limits as display
/// text) opens, and `plugins list` reads it rather than failing on old rows.
#[test]
fn a_version_1_database_opens_without_its_old_plugin_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE plugins (name TEXT PRIMARY KEY, version TEXT, state TEXT NOT NULL,
                 reason TEXT, subscriptions TEXT NOT NULL, limits TEXT NOT NULL,
                 counters TEXT NOT NULL, updated_at INTEGER NOT NULL);
             INSERT INTO plugins VALUES ('orders', 'abc', 'active', NULL, 'order.*',
                 'fuel 10000000, memory 64 MiB', '{\"succeeded\":1,\"failed\":{}}', 0);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    let store = SqliteStore::open(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(store.plugins().unwrap(), vec![]);
}
