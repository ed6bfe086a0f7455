//! Every acknowledged event can be delivered: the whole body must be UTF-8
//! JSON of bounded depth to be acknowledged at all, and a delivery the host
//! cannot run (a stored row written by something else) is recorded as a
//! `host-error` while the workers go on with the rest.

use crate::support::*;
use serde_json::json;
use stateset_hooks::runtime::FailureKind;
use stateset_hooks::store::Status;

#[tokio::test(flavor = "multi_thread")]
async fn bodies_that_are_not_wholly_utf8_json_of_bounded_depth_get_400() {
    let plugins = PluginDir::new();
    plugins.add("alpha", "misbehave", None);
    let mut server = TestServer::start(config(&plugins)).await;

    let invalid_utf8 =
        b"{\"id\":\"evt_bytes\",\"type\":\"order.created\",\"data\":{},\"extra\":\"\xff\xfe\"}";
    let (status, response) = server.send(invalid_utf8).await;
    assert_eq!(status, 400, "{response}");
    assert_eq!(
        response["error"],
        "body is not UTF-8: invalid byte at offset 60"
    );

    let deep = format!(
        r#"{{"id":"evt_deep","type":"order.created","data":{{}},"extra":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let (status, response) = server.send(deep.as_bytes()).await;
    assert_eq!(status, 400, "{response}");
    let error = response["error"].as_str().unwrap();
    assert!(error.contains("deeper than 64 levels"), "{error}");

    // Alive, and none of the above was stored or reached a plugin.
    let (status, _) = server
        .send(&event("evt_fine", "order.created", json!({})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(&*server.reports(1).await[0].event_key, "evt_fine");
    for key in ["evt_bytes", "evt_deep"] {
        assert!(server.hooks.store().event(key).unwrap().is_none(), "{key}");
    }
    server.stop().await;
}

/// A row the old host would have stored (invalid UTF-8 in an unknown field)
/// panicked the worker that took it, for ever, at every start. Written into
/// the file directly, it is now recorded as the host's failure and the
/// worker goes on.
#[tokio::test(flavor = "multi_thread")]
async fn an_undeliverable_stored_event_is_a_host_error_and_the_workers_go_on() {
    let plugins = PluginDir::new();
    plugins.add("alpha", "misbehave", None);
    let config = config(&plugins);
    let db = config.db_path.clone();
    let mut server = TestServer::start(config).await;

    let body = b"{\"id\":\"evt_poison\",\"type\":\"order.created\",\"data\":{},\"x\":\"\xff\"}";
    // One transaction: the retention sweep must not see the event alone.
    let mut sqlite = rusqlite::Connection::open(&db).unwrap();
    let tx = sqlite.transaction().unwrap();
    tx.execute(
        "INSERT INTO events (key, event_type, received_at, body) VALUES ('evt_poison', 'order.created', 0, ?1)",
        [&body[..]],
    )
    .unwrap();
    tx.execute(
        "INSERT INTO deliveries (event_key, plugin, status, attempts, next_attempt_at, created_at, updated_at)
         VALUES ('evt_poison', 'alpha', 'pending', 0, 0, 0, 0)",
        [],
    )
    .unwrap();
    tx.commit().unwrap();

    let report = &server.reports(1).await[0];
    assert_eq!(&*report.event_key, "evt_poison");
    assert_eq!(report.status, Status::Dead, "one attempt in these tests");
    let failure = report.outcome.result.as_ref().unwrap_err();
    assert_eq!(failure.kind, FailureKind::HostError);
    assert!(failure.message.contains("not UTF-8"), "{}", failure.message);
    let stored = server.hooks.store().event("evt_poison").unwrap().unwrap();
    assert_eq!(stored.deliveries[0].status, Status::Dead);
    assert_eq!(
        stored.deliveries[0].last_failure_kind,
        Some(FailureKind::HostError)
    );

    // The one worker is alive: the next event runs, and the host is healthy.
    let (status, _) = server
        .send(&event("evt_next", "order.created", json!({})))
        .await;
    assert_eq!(status, 200);
    let report = &server.reports(1).await[0];
    assert_eq!(
        (&*report.event_key, report.status),
        ("evt_next", Status::Succeeded)
    );
    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(server.hooks.threads_gone().is_empty());
    server.stop().await;
}
