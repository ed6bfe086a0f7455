//! Quarantine loses no event: one event a plugin always rejects goes to the
//! dead-letter queue and quarantines nothing; a quarantined plugin's
//! deliveries are recorded and held, and run once `plugins release` lifts it.

use std::process::Command;
use std::time::Duration;

use crate::support::*;
use serde_json::json;
use stateset_hooks::store::Status;

fn rejected(id: &str) -> Vec<u8> {
    event(id, "order.created", json!({ "misbehave": "error" }))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_event_always_rejected_is_dead_and_quarantines_nothing() {
    let plugins = PluginDir::new();
    plugins.add("picky", "misbehave", None);
    let mut config = config(&plugins);
    let attempts = stateset_hooks::health::DEFAULT_QUARANTINE_AFTER + 2;
    config.retry.max_attempts = attempts;
    config.retry.base_delay = Duration::from_millis(20);
    config.retry.max_delay = Duration::from_millis(100);
    config.retry.jitter = 0.0;
    let mut server = TestServer::start(config).await;

    assert_eq!(server.send(&rejected("evt_bad")).await.0, 200);
    let reports = server.reports(attempts as usize).await;
    assert_eq!(reports.last().unwrap().status, Status::Dead);
    assert!(!server.plugin("picky").health.is_quarantined());

    let (status, _) = server
        .send(&event("evt_good", "order.created", json!({})))
        .await;
    assert_eq!(status, 200);
    let report = &server.reports(1).await[0];
    assert_eq!(
        (&*report.event_key, report.status),
        ("evt_good", Status::Succeeded)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quarantined_plugins_deliveries_are_held_and_run_when_released() {
    let plugins = PluginDir::new();
    plugins.add("fragile", "misbehave", None);
    let mut config = config(&plugins);
    config.quarantine_after = 2;
    let mut server = TestServer::start(config).await;

    for id in ["evt_bad_1", "evt_bad_2"] {
        assert_eq!(server.send(&rejected(id)).await.0, 200);
    }
    server.reports(2).await;
    assert!(server.plugin("fragile").health.is_quarantined());

    // Quarantined: new events are stored with a delivery each, held pending.
    for id in ["evt_held_1", "evt_held_2"] {
        let (status, _) = server.send(&event(id, "order.created", json!({}))).await;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for id in ["evt_held_1", "evt_held_2"] {
        let stored = server.hooks.store().event(id).unwrap().unwrap();
        assert_eq!(stored.deliveries.len(), 1, "{id} has a delivery");
        assert_eq!(stored.deliveries[0].status, Status::Pending, "{id}");
    }

    // Released from the command line: they run.
    let db = plugins.path().join("stateset-hooks.db");
    let wrong = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["plugins", "release", "nobody"])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("no plugin named \"nobody\""));
    let output = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["plugins", "release", "fragile"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut ran: Vec<(String, Status)> = server
        .reports(2)
        .await
        .iter()
        .map(|r| (r.event_key.to_string(), r.status))
        .collect();
    ran.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        ran,
        [
            ("evt_held_1".into(), Status::Succeeded),
            ("evt_held_2".into(), Status::Succeeded)
        ]
    );

    // Without the token the admin route refuses.
    let refused = reqwest::Client::new()
        .post(server.admin_url("/api/plugins/fragile/release"))
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quarantined_plugin_is_probed_after_its_rest_and_a_success_releases_it() {
    let plugins = PluginDir::new();
    plugins.add("flaky", "misbehave", None);
    let mut config = config(&plugins);
    config.quarantine_after = 2;
    config.quarantine_probe_after = Duration::from_secs(2);
    let mut server = TestServer::start(config).await;

    for id in ["evt_down_1", "evt_down_2"] {
        assert_eq!(server.send(&rejected(id)).await.0, 200);
    }
    server.reports(2).await;
    assert!(server.plugin("flaky").health.is_quarantined());
    let held = event("evt_probe", "order.created", json!({}));
    assert_eq!(server.send(&held).await.0, 200);

    // Nobody releases it: after its rest, the held delivery is tried, and
    // its success lifts the quarantine.
    let report = &server.reports(1).await[0];
    assert_eq!(
        (&*report.event_key, report.status),
        ("evt_probe", Status::Succeeded)
    );
    assert!(!server.plugin("flaky").health.is_quarantined());
    let (status, _) = server
        .send(&event("evt_after", "order.created", json!({})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(&*server.reports(1).await[0].event_key, "evt_after");
    server.stop().await;
}
