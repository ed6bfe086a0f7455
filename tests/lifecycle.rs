//! The host's life as an app sees it: a bad configuration is refused with
//! the field named, the instance pool is sized from the workers, and shutdown
//! is graceful (in-process, and on SIGTERM to the binary).

use std::time::{Duration, Instant};

use crate::support::*;
use stateset_hooks::store::Status;
use stateset_hooks::{Config, ConfigError, Hooks};

async fn start(config: Config) -> anyhow::Result<Hooks> {
    tokio::task::spawn_blocking(move || Hooks::new(config))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn hooks_new_refuses_a_bad_config_and_names_the_field() {
    let plugins = PluginDir::new();
    type Change = fn(&mut Config);
    let cases: [(&str, Change); 5] = [
        ("path", |c| c.path = "webhooks/stateset".into()),
        ("workers", |c| c.workers = 0),
        ("queue_capacity", |c| c.queue_capacity = 0),
        ("limits", |c| c.limits.defaults.memory_bytes = 2 << 30),
        ("retry.max_attempts", |c| c.retry.max_attempts = 0),
    ];
    for (field, change) in cases {
        let mut config = config(&plugins);
        change(&mut config);
        let error = start(config).await.expect_err(field);
        let refused = error
            .downcast_ref::<ConfigError>()
            .unwrap_or_else(|| panic!("{field}: not a ConfigError: {error:#}"));
        assert_eq!(refused.field, field, "{refused}");
        assert!(error.to_string().contains(field), "{error}");
    }
}

/// More workers than the 64 instances the pool once had: every call runs,
/// none is charged to the plugin as a trap.
#[tokio::test(flavor = "multi_thread")]
async fn the_instance_pool_holds_every_worker_at_once() {
    const CALLS: usize = 80;
    let plugins = PluginDir::new();
    plugins.add("slow", "misbehave", Some(SLOW_MANIFEST));
    let mut config = config(&plugins);
    config.workers = CALLS;
    let mut server = TestServer::start(config).await;
    // Every call sleeps until the same instant, so all are alive at once.
    // (Sending 80 events takes about a second on a busy 2-core machine.)
    let until = now_ms() + 6000;
    for i in 0..CALLS {
        let (status, _) = server
            .send(&busy_until(&format!("evt_pool_{i}"), until))
            .await;
        assert_eq!(status, 200);
    }
    let all_sent = now_ms();
    assert!(
        all_sent + 2000 < until,
        "sending took too long to test this"
    );
    let reports = server.reports(CALLS).await;
    for report in &reports {
        assert_eq!(report.outcome.result, Ok(()), "{report:#?}");
        // Each started as soon as it was sent, not once another had ended.
        // (One that waited for another to end would start after `until`.)
        assert!(
            report.outcome.elapsed.as_millis() as u64 >= (until - all_sent) / 2,
            "a call waited for a slot: ran {:?}",
            report.outcome.elapsed
        );
    }
    let health = server.plugin("slow").health.snapshot();
    assert_eq!((health.succeeded, health.failed), (CALLS as u64, vec![]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_refuses_new_events_and_lets_a_running_call_finish() {
    let plugins = PluginDir::new();
    plugins.add("slow", "misbehave", Some(SLOW_MANIFEST));
    let server = TestServer::start(config(&plugins)).await;
    let (status, _) = server
        .send(&busy_until("evt_running", now_ms() + 3000))
        .await;
    assert_eq!(status, 200);
    // Long enough for the worker to have started the call, on a busy machine too.
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let hooks = server.hooks.clone();
    let stopping = tokio::spawn(async move { hooks.shutdown().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!stopping.is_finished(), "waits for the running call");
    let body = event("evt_late", "order.created", serde_json::json!({}));
    let late = reqwest::Client::new()
        .post(server.url("/webhooks/stateset"))
        .header("X-StateSet-Signature", sign(&body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 503);
    assert!(late.headers().contains_key("retry-after"));
    let message = late.text().await.unwrap();
    assert!(message.contains("shutting down"), "{message}");

    stopping.await.unwrap();
    let store = server.hooks.store();
    let running = store.event("evt_running").unwrap().expect("stored");
    assert_eq!(running.deliveries[0].status, Status::Succeeded);
    assert!(
        store.event("evt_late").unwrap().is_none(),
        "refused, not kept"
    );
    server.stop().await;
}

/// How long after sending an event its call has surely started, on a busy
/// machine too: the worker takes it from the queue at once.
const STARTED: Duration = Duration::from_millis(1000);

/// The delivery of `key` as the database has it: status and attempts.
fn delivery(plugins: &PluginDir, key: &str) -> (Status, u32) {
    let event = ServeProcess::store(plugins).event(key).unwrap().unwrap();
    let delivery = &event.deliveries[0];
    (delivery.status, delivery.attempts)
}

#[test]
fn sigterm_during_a_call_within_the_grace_period_records_it() {
    let plugins = PluginDir::new();
    plugins.add("slow", "misbehave", Some(SLOW_MANIFEST));
    let mut host = ServeProcess::start(&plugins, Some("info"));
    host.send_blocking(busy_until("evt_finish", now_ms() + 3000));
    std::thread::sleep(STARTED);
    assert!(host.stop().success());
    assert_eq!(delivery(&plugins, "evt_finish"), (Status::Succeeded, 1));
}

#[test]
fn sigterm_cuts_a_call_at_the_grace_period_and_the_next_start_runs_it() {
    let plugins = PluginDir::new();
    plugins.add("slow", "misbehave", Some(SLOW_MANIFEST));
    let grace = ["--shutdown-grace-ms", "200"];
    let mut host = ServeProcess::start_with(&plugins, Some("info"), &grace);
    // Far longer than the grace period: the call is still running when
    // the grace period ends, and only a cut lets the host exit before it.
    let until = now_ms() + 6000;
    host.send_blocking(busy_until("evt_cut", until));
    std::thread::sleep(STARTED);
    assert!(host.stop().success());
    assert!(now_ms() < until, "exited only when the call had ended");
    let log = host.log();
    assert!(
        log.iter()
            .any(|l| l.contains("cutting the running plugin calls")),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("left behind")),
        "the cut reached the call: {log:#?}"
    );
    assert_eq!(
        delivery(&plugins, "evt_cut"),
        (Status::Pending, 0),
        "a cut call is not an attempt: still pending"
    );

    // The next start runs it to the end.
    let mut restarted = ServeProcess::start(&plugins, Some("info"));
    restarted.wait_for("misbehave ok \"evt_cut\"");
    let deadline = Instant::now() + REPORT_TIMEOUT;
    while delivery(&plugins, "evt_cut").0 != Status::Succeeded {
        assert!(Instant::now() < deadline, "never recorded");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(delivery(&plugins, "evt_cut"), (Status::Succeeded, 1));
}

/// A call waiting inside one long host call (a sleep) is cut at the grace
/// period like any other: shutdown neither hangs nor leaves it behind.
#[test]
fn sigterm_cuts_a_call_waiting_in_a_host_call() {
    let plugins = PluginDir::new();
    plugins.add("sleepy", "misbehave", Some(SLOW_MANIFEST));
    let grace = ["--shutdown-grace-ms", "200"];
    let mut host = ServeProcess::start_with(&plugins, Some("info"), &grace);
    let body = event(
        "evt_blocked",
        "order.created",
        serde_json::json!({ "misbehave": "sleep-forever" }),
    );
    host.send_blocking(body);
    std::thread::sleep(STARTED);
    let signalled = Instant::now();
    assert!(host.stop().success());
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "shutdown waited {:?} for a call that sleeps forever",
        signalled.elapsed()
    );
    let log = host.log();
    assert!(
        log.iter()
            .any(|l| l.contains("cutting the running plugin calls")),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("left behind")),
        "the cut reached the sleeping call: {log:#?}"
    );
    assert_eq!(delivery(&plugins, "evt_blocked"), (Status::Pending, 0));
}
