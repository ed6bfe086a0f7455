//! The webhook route over real HTTP: statuses, bodies, and which plugins run.
//!
//! Every test starts the real server on port 0 with real plugin components.
//! The host runs one worker, so reports arrive in the order events were sent:
//! a report for a later, valid event proves the refused ones reached no plugin.

use crate::support::*;
use serde_json::json;

const ORDER_ID: &str = "ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E";
const ORDER_EVENT: &str = "evt_01JQ8ZK5A9C2E4G6J8K0M2P4R6";

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_event_reaches_only_its_subscribed_plugin() {
    let plugins = PluginDir::samples();
    let mut server = TestServer::start(config(&plugins)).await;

    let (status, body) = server.send(&example_event("order.created")).await;
    assert_eq!((status, body), (200, json!({ "received": true })));
    let (status, _) = server.send(&example_event("inventory.low_stock")).await;
    assert_eq!(status, 200);

    let reports = server.reports(2).await;
    assert_eq!(&*reports[0].plugin, "orders", "{reports:#?}");
    assert_eq!(&*reports[0].event_key, ORDER_EVENT);
    assert_eq!(reports[0].outcome.result, Ok(()));
    assert_eq!(
        messages(&reports[0]),
        [format!(
            "order {ORDER_ID} created: 3 items, total 66.68 USD; customer cus_01JQ2F8XW3K9M4N7P1R5T6V8YZ: 1 order"
        )]
    );
    // The low-stock event is the next report: nothing else ran the order.
    assert_eq!(&*reports[1].plugin, "low-stock");
    assert!(
        messages(&reports[1])[0].starts_with("reorder suggestion: SKU BTL-STEEL-750"),
        "{reports:#?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_signatures_get_401_and_run_nothing() {
    let plugins = PluginDir::samples();
    let mut server = TestServer::start(config(&plugins)).await;
    let body = example_event("order.created");
    let good = sign(&body);
    let mut tampered = body.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    let wrong_secret = stateset_hooks::Secret::new("not-the-secret")
        .unwrap()
        .sign(&body);

    let cases: [(&str, &[u8], Option<&str>, &str); 6] = [
        (
            "tampered body",
            &tampered,
            Some(&good),
            "signature does not match the body",
        ),
        (
            "wrong secret",
            &body,
            Some(&wrong_secret),
            "signature does not match the body",
        ),
        (
            "missing header",
            &body,
            None,
            "missing X-StateSet-Signature header",
        ),
        (
            "non-hex",
            &body,
            Some(&"g".repeat(64)),
            "malformed X-StateSet-Signature header: expected 64 hex digits",
        ),
        (
            "too short",
            &body,
            Some(&good[..62]),
            "malformed X-StateSet-Signature header: expected 64 hex digits",
        ),
        (
            "too long",
            &body,
            Some(&format!("{good}00")),
            "malformed X-StateSet-Signature header: expected 64 hex digits",
        ),
    ];
    for (case, body, signature, message) in cases {
        let (status, response) = server.post(body, signature).await;
        assert_eq!(status, 401, "{case}");
        assert_eq!(response, json!({ "error": message }), "{case}");
    }
    // Upper-case hex is the same signature.
    let (status, _) = server.post(&body, Some(&good.to_uppercase())).await;
    assert_eq!(status, 200);
    let reports = server.reports(1).await;
    assert_eq!(&*reports[0].event_key, ORDER_EVENT);
    assert_eq!(&*reports[0].plugin, "orders");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_oversize_and_wrong_method_are_refused_precisely() {
    let plugins = PluginDir::samples();
    let mut config = config(&plugins);
    config.body_limit = 4096;
    let mut server = TestServer::start(config).await;

    let cases: [(&[u8], u16, &str); 4] = [
        (b"{not json", 400, "body is not valid JSON"),
        (
            br#"{"data":{}}"#,
            400,
            "body is not valid JSON: missing field `type`",
        ),
        (
            br#"{"type":"order.created","data":"x"}"#,
            400,
            "`data` must be an object",
        ),
        (br#"{"type":"order.created"}"#, 400, "`data` is missing"),
    ];
    for (body, want_status, want) in cases {
        let (status, response) = server.send(body).await;
        assert_eq!(status, want_status, "{}", String::from_utf8_lossy(body));
        let error = response["error"].as_str().unwrap();
        assert!(
            error.starts_with(want),
            "{error:?} should start with {want:?}"
        );
    }

    // Oversize, declared up front: refused before the body is read.
    let big = vec![b' '; 5000];
    let (status, response) = server.send(&big).await;
    assert_eq!(status, 413);
    assert_eq!(
        response,
        json!({ "error": "body larger than the limit of 4096 bytes" })
    );

    // Oversize, streamed without a length: refused once the limit is passed.
    assert_eq!(chunked_post(&server, 10, 1000).await, 413);

    let response = reqwest::get(server.url("/webhooks/stateset"))
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!({ "error": "only POST is allowed here" })
    );

    let response = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(response.status(), 200);

    // None of the above reached a plugin.
    let (status, _) = server.send(&example_event("payment.refunded")).await;
    assert_eq!(status, 200);
    let reports = server.reports(1).await;
    assert_eq!(&*reports[0].plugin, "payments");
    server.stop().await;
}

/// POST `chunks` chunks of `size` bytes with no Content-Length, the way a
/// streaming client does, and return the status code.
async fn chunked_post(server: &TestServer, chunks: usize, size: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /webhooks/stateset HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\
         x-stateset-signature: {}\r\n\r\n",
        "0".repeat(64)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..chunks {
        let chunk = format!("{size:x}\r\n{}\r\n", " ".repeat(size));
        // The server may answer and close before every chunk is written.
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut response = vec![0u8; 12];
    stream.read_exact(&mut response).await.unwrap();
    String::from_utf8_lossy(&response[9..12]).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_without_id_and_of_unknown_types_are_accepted() {
    let plugins = PluginDir::new();
    // No manifest: this plugin receives every event.
    plugins.add("everything", "misbehave", None);
    let mut server = TestServer::start(config(&plugins)).await;

    // The webhook document's own curl example: no `id`.
    let body = br#"{"type":"order.created","data":{"id":"order-123","status":"pending"}}"#;
    assert_eq!(server.send(body).await.0, 200);
    assert_eq!(
        server
            .send(&event("evt_x", "invoice.paid", json!({})))
            .await
            .0,
        200
    );

    let reports = server.reports(2).await;
    let body_hash = format!("sha256:{}", sha256_hex(body));
    assert_eq!(&*reports[0].event_key, body_hash);
    assert_eq!(&*reports[1].event_type, "invoice.paid");
    assert!(
        reports.iter().all(|r| r.outcome.result.is_ok()),
        "{reports:#?}"
    );
    server.stop().await;
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// An existing axum app mounts the webhook route beside its own routes, and
/// the mounted route behaves exactly like `serve`'s (no socket needed).
#[tokio::test(flavor = "multi_thread")]
async fn an_axum_app_can_mount_the_webhook_route() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    let plugins = PluginDir::samples();
    let config = config(&plugins);
    let hooks = tokio::task::spawn_blocking(move || stateset_hooks::Hooks::new(config))
        .await
        .unwrap()
        .unwrap();
    let mut reports = hooks.subscribe();
    let app = axum::Router::new()
        .route(
            "/orders",
            axum::routing::get(|| async { "the app's own route" }),
        )
        .merge(hooks.router());

    let own = app
        .clone()
        .oneshot(Request::get("/orders").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(own.status(), 200);

    let body = example_event("payment.failed");
    let webhook = Request::post("/webhooks/stateset")
        .header("X-StateSet-Signature", sign(&body))
        .body(Body::from(body))
        .unwrap();
    assert_eq!(app.oneshot(webhook).await.unwrap().status(), 200);
    let report = tokio::time::timeout(REPORT_TIMEOUT, reports.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&*report.plugin, "payments");
    assert!(messages(&report)[0].contains("failed"), "{report:#?}");
}
