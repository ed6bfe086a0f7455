//! A second source: senders that sign as Standard Webhooks do, on their own
//! route, through the same store and plugins.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use stateset_hooks::config::{DEFAULT_STANDARD_PATH, StandardRoute};
use stateset_hooks::standard;

use crate::support::*;

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn unix_now() -> i64 {
    stateset_hooks::store::now_ms() / 1000
}

/// POST `body` to the Standard route with these headers; the status and the
/// error (if any).
async fn post(server: &TestServer, headers: &[(&str, String)], body: &[u8]) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(server.url(DEFAULT_STANDARD_PATH))
        .body(body.to_vec());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (status, body["error"].as_str().unwrap_or("").to_owned())
}

fn signed(id: &str, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let secret = standard::parse_secret(WHSEC).unwrap();
    vec![
        (standard::ID_HEADER, id.to_owned()),
        (standard::TIMESTAMP_HEADER, timestamp.to_string()),
        (
            standard::SIGNATURE_HEADER,
            standard::sign(&secret, id, timestamp, body),
        ),
    ]
}

/// A signed message is stored under its `webhook-id` and delivered; the same
/// id again is a duplicate whatever its body; stale, future, unsigned and
/// mis-signed messages get 401 naming why, and nothing is kept of them.
#[tokio::test(flavor = "multi_thread")]
async fn standard_webhooks_are_verified_deduplicated_by_id_and_delivered() {
    let plugins = PluginDir::new();
    plugins.add("notify", "misbehave", None);
    let mut config = config(&plugins);
    config.standard = Some(StandardRoute {
        path: DEFAULT_STANDARD_PATH.into(),
        secrets: standard::parse_secrets(WHSEC).unwrap(),
        tolerance: Duration::from_secs(300),
    });
    let mut server = TestServer::start(config).await;

    let body = serde_json::to_vec(&json!({
        "type": "order.created",
        "timestamp": "2026-11-29T12:00:00Z",
        "data": { "id": "ord_1" }
    }))
    .unwrap();
    let now = unix_now();
    let (status, error) = post(&server, &signed("msg_one", now, &body), &body).await;
    assert_eq!((status, error.as_str()), (200, ""));
    let report = &server.reports(1).await[0];
    assert_eq!(
        &*report.event_key, "standard:msg_one",
        "webhook-id is the key, in a namespace of its own"
    );
    assert_eq!(&*report.event_type, "order.created");

    // The same webhook-id again, even re-signed later: a duplicate.
    let (status, _) = post(&server, &signed("msg_one", now + 1, &body), &body).await;
    assert_eq!(status, 200);
    let stored = server.hooks.store().event("standard:msg_one").unwrap();
    assert_eq!(stored.unwrap().deliveries.len(), 1);
    // Run again (a replay, as a retry or a restart would): the same key.
    let replayed = server.hooks.store().replay_event("standard:msg_one", None);
    assert_eq!(replayed.unwrap(), 1);
    assert_eq!(&*server.reports(1).await[0].event_key, "standard:msg_one");

    let now = unix_now();
    let refusals: Vec<(Vec<(&str, String)>, &str)> = vec![
        (signed("msg_old", now - 301, &body), "in the past"),
        (signed("msg_new", now + 301, &body), "in the future"),
        (vec![], "missing webhook-id header"),
        (
            signed("msg_bad", now, &body)
                .into_iter()
                .map(|(n, v)| {
                    let v = if n == standard::SIGNATURE_HEADER {
                        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=".into()
                    } else {
                        v
                    };
                    (n, v)
                })
                .collect(),
            "no signature",
        ),
        (
            // The StateSet scheme's header is not this route's.
            vec![("X-StateSet-Signature", sign(&body))],
            "missing webhook-id",
        ),
    ];
    for (headers, why) in refusals {
        let (status, error) = post(&server, &headers, &body).await;
        assert_eq!(status, 401, "{why}");
        assert!(error.contains(why), "{error:?} should say {why:?}");
    }
    // Signed for another body: refused.
    let other = br#"{"type":"order.created","data":{}}"#;
    let (status, _) = post(&server, &signed("msg_swap", now, &body), other).await;
    assert_eq!(status, 401);
    for id in ["msg_old", "msg_new", "msg_bad", "msg_swap"] {
        let key = standard::key(id);
        assert!(server.hooks.store().event(&key).unwrap().is_none(), "{key}");
    }
    // Svix's names for the same headers are taken too.
    let svix: Vec<(&str, String)> = signed("msg_svix", now, &body)
        .into_iter()
        .map(|(name, value)| (name.replace("webhook-", "svix-").leak() as &str, value))
        .collect();
    assert_eq!(post(&server, &svix, &body).await.0, 200);
    let metrics = server.hooks.metrics().encode();
    assert!(
        metrics.contains("stateset_hooks_webhooks_received_total{outcome=\"stale-timestamp\"} 2"),
        "{metrics}"
    );
    server.stop().await;
}

/// `send --scheme standard` signs as a Standard Webhooks sender does, and
/// `serve` takes it; its secrets file is read again on SIGHUP, so the
/// route's secret rotates without a restart.
#[test]
fn send_scheme_standard_reaches_serve_and_its_secret_rotates() {
    let plugins = PluginDir::new();
    plugins.add("notify", "misbehave", None);
    let secrets = plugins.path().join("standard-secrets");
    std::fs::write(&secrets, format!("# the sender's\n{WHSEC}\n")).unwrap();
    let flags = ["--standard-secrets-file", secrets.to_str().unwrap()];
    let mut host = ServeProcess::start_with(&plugins, Some("info"), &flags);
    let url = host
        .url()
        .replace("/webhooks/stateset", DEFAULT_STANDARD_PATH);
    let send = |id: &str, whsec: &str| {
        let file = plugins.path().join(format!("{id}.json"));
        let body = format!(r#"{{"id":"{id}","type":"order.created","data":{{}}}}"#);
        std::fs::write(&file, body).unwrap();
        let output = Command::new(BIN)
            .env(standard::SECRETS_ENV, whsec)
            .args(["send", "--scheme", "standard", &url])
            .arg(&file)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let said = send("msg_cli_1", WHSEC);
    assert!(said.starts_with("200"), "{said}");
    host.wait_for("misbehave ok");

    let next = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    std::fs::write(&secrets, format!("{next}\n")).unwrap();
    let pid = host.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    host.wait_for("Standard Webhooks secrets replaced");
    let refused = send("msg_cli_2", WHSEC);
    assert!(refused.starts_with("401"), "the old secret: {refused}");
    let said = send("msg_cli_3", next);
    assert!(said.starts_with("200"), "{said}");
    assert!(host.stop().success());
}
