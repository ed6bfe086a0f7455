//! Outbound HTTP from a real plugin to a real server on loopback: the
//! allowlist, the address check, redirects, body caps, timeouts, the request
//! budget and the idempotency key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use axum::routing::get;
use serde_json::json;
use stateset_hooks::loader::{Grants, load_file};
use stateset_hooks::runtime::{CallOutcome, FailureKind, Runtime};

/// A server for plugins to call.
async fn remote() -> SocketAddr {
    let app = axum::Router::new()
        .route("/ok", get(|| async { "hello" }))
        .route(
            "/echo-key",
            get(|headers: axum::http::HeaderMap| async move {
                let key = headers.get("idempotency-key").cloned();
                key.map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned())
            }),
        )
        .route(
            "/redirect",
            get(|| async { axum::response::Redirect::temporary("/ok") }),
        )
        .route("/big", get(|| async { "x".repeat(2 << 20) }))
        .route(
            "/echo-len",
            axum::routing::post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct Caller {
    runtime: Arc<Runtime>,
    plugins: PluginDir,
}

impl Caller {
    fn new() -> Self {
        Self {
            runtime: Arc::new(Runtime::new(None, 4).unwrap()),
            plugins: PluginDir::new(),
        }
    }

    /// Load the fixture under `manifest` and fetch `url` `times` times.
    async fn fetch(
        &self,
        manifest: &str,
        private: bool,
        url: &str,
        times: u64,
    ) -> anyhow::Result<CallOutcome> {
        let data = json!({ "misbehave": "fetch", "url": url, "times": times });
        self.call(manifest, private, data).await
    }

    /// Load the fixture under `manifest` and call it with event `data`.
    async fn call(
        &self,
        manifest: &str,
        private: bool,
        data: serde_json::Value,
    ) -> anyhow::Result<CallOutcome> {
        self.plugins.add("fetcher", "misbehave", Some(manifest));
        let mut grants = Grants::default();
        grants.http.allow_private_networks = private;
        let loaded = load_file(
            &self.runtime,
            &self.plugins.path().join("fetcher.wasm"),
            &grants,
        )?;
        let payload = event("evt_http", "order.created", data);
        let runtime = self.runtime.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let payload = String::from_utf8(payload).unwrap();
            let key = Arc::from("evt_http");
            runtime.call(&loaded.prepared, &key, "order.created", &payload)
        })
        .await
        .unwrap()
        .expect("not cancelled");
        Ok(outcome)
    }
}

fn lines(outcome: &CallOutcome) -> Vec<&str> {
    outcome.logs.iter().map(|l| l.message.as_str()).collect()
}

fn error(outcome: &CallOutcome) -> String {
    let failure = outcome.result.as_ref().unwrap_err();
    assert_eq!(failure.kind, FailureKind::PluginError, "{failure:?}");
    failure.message.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listed_host_is_reached_within_its_bounds() {
    let addr = remote().await;
    let base = format!("http://127.0.0.1:{}", addr.port());
    let caller = Caller::new();
    let manifest = format!(
        "[http]\nallowed_hosts = [\"{base}\"]\ntimeout_ms = 300\nmax_requests = 2\nmax_response_kib = 1024\n"
    );
    let fetch = |path: &str, times: u64| {
        let url = format!("{base}{path}");
        let manifest = manifest.clone();
        let caller = &caller;
        async move { caller.fetch(&manifest, true, &url, times).await.unwrap() }
    };

    let ok = fetch("/ok", 1).await;
    assert_eq!(ok.result, Ok(()));
    assert_eq!(lines(&ok), ["fetched 200 5 bytes: hello"]);

    // The delivery's identity rides along, for the API to dedupe on.
    let key = fetch("/echo-key", 1).await;
    assert_eq!(lines(&key), ["fetched 200 16 bytes: evt_http:fetcher"]);

    // Not followed: the plugin sees the 3xx and must ask again.
    let redirect = fetch("/redirect", 1).await;
    assert_eq!(redirect.result, Ok(()));
    assert!(
        lines(&redirect)[0].starts_with("fetched 307 "),
        "{redirect:?}"
    );

    let big = fetch("/big", 1).await;
    assert!(error(&big).contains("HttpResponseBodySize"), "{big:?}");

    // A request body of many chunks goes out whole, up to its cap (256 KiB).
    let post = |bytes: u64| {
        let data =
            json!({ "misbehave": "fetch", "url": format!("{base}/echo-len"), "post_bytes": bytes });
        let (manifest, caller) = (manifest.clone(), &caller);
        async move { caller.call(&manifest, true, data).await.unwrap() }
    };
    let sent = post(200 << 10).await;
    let length = (200 << 10) + r#"{"pad":""}"#.len();
    assert_eq!(
        lines(&sent),
        [format!("fetched 200 6 bytes: {length}")],
        "{sent:?}"
    );
    let over = post(300 << 10).await;
    assert!(error(&over).contains("HttpRequestBodySize"), "{over:?}");

    // The request's own timeout comes before the call's 1 s deadline.
    let slow = fetch("/slow", 1).await;
    let message = error(&slow);
    assert!(message.contains("Timeout"), "{message}");
    assert!(slow.elapsed < Duration::from_secs(1), "{:?}", slow.elapsed);

    let budget = fetch("/ok", 3).await;
    assert_eq!(lines(&budget).len(), 2);
    assert!(error(&budget).contains("HttpRequestDenied"), "{budget:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn everything_else_is_denied() {
    let addr = remote().await;
    let port = addr.port();
    let caller = Caller::new();
    let listed = |host: &str| format!("[http]\nallowed_hosts = [\"http://{host}:{port}\"]\n");

    // Not listed (another port, no [http] at all): denied by the allowlist.
    let other = caller
        .fetch(
            &listed("127.0.0.1"),
            true,
            &format!("http://127.0.0.1:{}/ok", port - 1),
            1,
        )
        .await
        .unwrap();
    assert!(error(&other).contains("HttpRequestDenied"), "{other:?}");
    let none = caller
        .fetch("", true, &format!("http://127.0.0.1:{port}/ok"), 1)
        .await
        .unwrap();
    assert!(error(&none).contains("HttpRequestDenied"), "{none:?}");

    // Listed, but a private address the operator did not allow: by IP and
    // by a name that resolves to one.
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("http://{host}:{port}/ok");
        let denied = caller.fetch(&listed(host), false, &url, 1).await.unwrap();
        assert!(
            error(&denied).contains("DestinationIpProhibited"),
            "{host}: {denied:?}"
        );
    }

    // Malformed entries refuse the manifest at load.
    for entry in [
        "*",
        "https://*",
        "https://api.example.com/v1",
        "https://a.*.example.com",
    ] {
        let manifest = format!("[http]\nallowed_hosts = [\"{entry}\"]\n");
        let refused = caller.fetch(&manifest, true, "http://x/", 1).await;
        let reason = format!("{:#}", refused.unwrap_err());
        assert!(
            reason.contains("http.allowed_hosts entry"),
            "{entry}: {reason}"
        );
    }
}

/// Run `sample` under `manifest` (private networks allowed, for loopback) on
/// the example `event_type`: its report, and what the receiver got.
async fn act(
    sample: &str,
    manifest: &str,
    event_type: &str,
    received: &Received,
) -> (stateset_hooks::Report, Vec<(String, serde_json::Value)>) {
    let plugins = PluginDir::new();
    plugins.add(sample, sample, Some(manifest));
    let mut config = config(&plugins);
    config.http.allow_private_networks = true;
    let mut server = TestServer::start(config).await;
    assert_eq!(server.send(&example_event(event_type)).await.0, 200);
    let report = server.reports(1).await.remove(0);
    assert_eq!(report.outcome.result, Ok(()), "{report:#?}");
    server.stop().await;
    let got = received.lock().unwrap().clone();
    (report, got)
}

/// The `low-stock` sample acts: with `purchase_url` configured and allowed,
/// it POSTs its suggestion, and the delivery's idempotency key comes along.
#[tokio::test(flavor = "multi_thread")]
async fn low_stock_posts_its_suggestion_with_the_delivery_key() {
    let (port, received) = receiver().await;
    let manifest = format!(
        "subscriptions = [\"inventory.low_stock\"]\n\
         [config]\npurchase_url = \"http://127.0.0.1:{port}/purchases\"\n\
         [http]\nallowed_hosts = [\"http://127.0.0.1:{port}\"]\n"
    );
    let (report, received) = act("low-stock", &manifest, "inventory.low_stock", &received).await;
    let sent = format!("suggestion sent to http://127.0.0.1:{port}/purchases: 201");
    assert_eq!(messages(&report).last(), Some(&sent.as_str()));
    assert_eq!(received.len(), 1);
    let (key, body) = &received[0];
    assert_eq!(key, &format!("{}:low-stock", report.event_key));
    assert_eq!(body["sku"], "BTL-STEEL-750");
    assert!(body["units"].as_u64().unwrap() > 0, "{body}");
}

/// The `payments` sample acts: a flagged refund goes to `fraud_review_url`.
#[tokio::test(flavor = "multi_thread")]
async fn payments_posts_a_flagged_refund_for_review() {
    let (port, received) = receiver().await;
    let manifest = format!(
        "subscriptions = [\"payment.*\"]\n\
         [config]\nrefund_flag_cents = \"100\"\n\
         fraud_review_url = \"http://127.0.0.1:{port}/reviews\"\n\
         [http]\nallowed_hosts = [\"http://127.0.0.1:{port}\"]\n"
    );
    let (report, received) = act("payments", &manifest, "payment.refunded", &received).await;
    assert!(
        messages(&report)[1].starts_with("FLAG: large refund"),
        "{report:#?}"
    );
    let sent = format!("flagged refund sent to http://127.0.0.1:{port}/reviews: 201");
    assert_eq!(messages(&report).last(), Some(&sent.as_str()));
    assert_eq!(received.len(), 1);
    let (key, body) = &received[0];
    assert_eq!(key, &format!("{}:payments", report.event_key));
    assert!(body["refunded_cents"].as_u64().unwrap() > 100, "{body}");
}
