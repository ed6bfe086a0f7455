//! Operating the host: `/metrics` scraped after real events, the admin API
//! behind its token, and the console driven in headless Chromium (Debian's
//! `chromium`, which `scripts/test` installs) by `tests/console/drive.mjs`.

use std::process::Command;

use serde_json::{Value, json};

use crate::support::*;

/// The value of the sample `name{labels}` in a scrape, if present.
fn sample(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(name_and_labels)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

async fn scrape(server: &TestServer) -> String {
    let response = reqwest::Client::new()
        .get(server.admin_url("/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

/// Each way a webhook ends is counted by outcome, each recorded attempt by
/// plugin and outcome with its cost, and the store's and plugins' state is
/// read at the scrape; nothing in it names an event.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_the_sent_events_did() {
    let plugins = PluginDir::new();
    plugins.add("notify", "misbehave", None);
    let mut config = config(&plugins);
    config.body_limit = 4096;
    let mut server = TestServer::start(config).await;

    let ok = event("evt_metrics_ok", "order.created", json!({}));
    let refused = event(
        "evt_metrics_refused",
        "order.created",
        json!({ "misbehave": "error" }),
    );
    assert_eq!(server.send(&ok).await.0, 200);
    assert_eq!(server.send(&refused).await.0, 200);
    assert_eq!(server.send(&ok).await.0, 200, "a duplicate");
    assert_eq!(server.post(&ok, Some(&"0".repeat(64))).await.0, 401);
    assert_eq!(server.send(b"{not json").await.0, 400);
    let large = event(
        "evt_large",
        "order.created",
        json!({ "pad": "x".repeat(5000) }),
    );
    assert_eq!(server.send(&large).await.0, 413);
    server.reports(2).await;

    let text = scrape(&server).await;
    let received = |outcome: &str| {
        sample(
            &text,
            &format!("stateset_hooks_webhooks_received_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(received("accepted"), Some(2.0), "{text}");
    assert_eq!(received("duplicate"), Some(1.0));
    assert_eq!(received("bad-signature"), Some(1.0));
    assert_eq!(received("bad-json"), Some(1.0));
    assert_eq!(received("too-large"), Some(1.0));
    let delivered = |outcome: &str| {
        sample(
            &text,
            &format!("stateset_hooks_deliveries_total{{plugin=\"notify\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(delivered("succeeded"), Some(1.0), "{text}");
    assert_eq!(delivered("dead"), Some(1.0), "one attempt allowed: dead");
    for histogram in [
        "stateset_hooks_plugin_call_duration_seconds",
        "stateset_hooks_plugin_fuel_consumed",
        "stateset_hooks_plugin_peak_memory_bytes",
    ] {
        let count = sample(&text, &format!("{histogram}_count{{plugin=\"notify\"}}"));
        assert_eq!(count, Some(2.0), "{histogram}: {text}");
        let sum = sample(&text, &format!("{histogram}_sum{{plugin=\"notify\"}}"));
        assert!(sum.is_some_and(|s| s > 0.0), "{histogram} sum: {text}");
    }
    let end_to_end = "stateset_hooks_end_to_end_latency_seconds_count{plugin=\"notify\"}";
    assert_eq!(sample(&text, end_to_end), Some(1.0), "successes only");
    let status = |s: &str| {
        sample(
            &text,
            &format!("stateset_hooks_store_deliveries{{status=\"{s}\"}}"),
        )
    };
    assert_eq!(
        (status("succeeded"), status("dead"), status("pending")),
        (Some(1.0), Some(1.0), Some(0.0))
    );
    assert_eq!(
        sample(&text, "stateset_hooks_delivery_backlog_seconds"),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "stateset_hooks_plugins{state=\"active\"}"),
        Some(1.0)
    );
    let commits = sample(&text, "stateset_hooks_store_commit_writes_count");
    assert!(commits.is_some_and(|n| n >= 1.0), "{text}");
    assert!(
        !text.contains("evt_"),
        "no event id in a label or anywhere: {text}"
    );
    let mut families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    let all = families.len();
    families.sort_unstable();
    families.dedup();
    assert_eq!(families.len(), all, "each family named once: {text}");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");

    // Only with the token.
    let client = reqwest::Client::new();
    for token in [None, Some("wrong-token-wrong-token")] {
        let mut request = client.get(server.admin_url("/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.unwrap().status(), 401);
    }
    // And never on the webhook port.
    let public = client.get(server.url("/metrics")).send().await.unwrap();
    assert_ne!(public.status(), 200);
    server.stop().await;
}

async fn api(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, server.admin_url(path))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The API the console uses: events newest first and filtered, one event
/// with its body, deliveries and log lines, replay, the dead letters, the
/// plugins; all of it only with the token.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_lists_shows_and_replays() {
    use reqwest::Method;
    let plugins = PluginDir::new();
    plugins.add("notify", "misbehave", None);
    let mut server = TestServer::start(config(&plugins)).await;
    let refused = event(
        "evt_api_dead",
        "order.created",
        json!({ "misbehave": "error" }),
    );
    let fine = event("evt_api_ok", "payment.captured", json!({}));
    assert_eq!(server.send(&refused).await.0, 200);
    assert_eq!(server.send(&fine).await.0, 200);
    server.reports(2).await;

    let (status, all) = api(&server, Method::GET, "/api/events", None).await;
    assert_eq!(status, 200);
    let keys: Vec<&str> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["evt_api_ok", "evt_api_dead"], "newest first");
    for (query, expect) in [
        ("type=payment.captured", vec!["evt_api_ok"]),
        ("status=dead", vec!["evt_api_dead"]),
        ("q=evt_api_dead", vec!["evt_api_dead"]),
        ("plugin=nobody", vec![]),
        ("since=9999999999999", vec![]),
        ("limit=1", vec!["evt_api_ok"]),
    ] {
        let (_, page) = api(&server, Method::GET, &format!("/api/events?{query}"), None).await;
        let got: Vec<&str> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["key"].as_str().unwrap())
            .collect();
        assert_eq!(got, expect, "{query}");
    }
    let (_, first) = api(&server, Method::GET, "/api/events?limit=1", None).await;
    let next = first["next"].as_i64().expect("a next page");
    let (_, second) = api(
        &server,
        Method::GET,
        &format!("/api/events?limit=1&before={next}"),
        None,
    )
    .await;
    assert_eq!(second["events"][0]["key"], "evt_api_dead");
    let (status, _) = api(&server, Method::GET, "/api/events?status=lost", None).await;
    assert_eq!(status, 400);

    let (_, shown) = api(&server, Method::GET, "/api/events/evt_api_ok", None).await;
    assert_eq!(shown["event_type"], "payment.captured");
    assert!(shown["pretty"].as_str().unwrap().contains("\n  \"id\""));
    let delivery = &shown["deliveries"][0];
    assert_eq!(
        (&delivery["plugin"], &delivery["status"]),
        (&json!("notify"), &json!("succeeded"))
    );
    assert_eq!(
        delivery["last_logs"],
        json!(["info: misbehave ok \"evt_api_ok\""])
    );
    let (status, _) = api(&server, Method::GET, "/api/events/evt_none", None).await;
    assert_eq!(status, 404);

    let (_, dlq) = api(&server, Method::GET, "/api/dlq", None).await;
    let dead = &dlq["deliveries"][0];
    assert_eq!(dead["event_key"], "evt_api_dead");
    assert_eq!(dead["last_failure_kind"], "plugin-error");
    let (status, _) = api(&server, Method::POST, "/api/dlq/replay", Some(json!({}))).await;
    assert_eq!(status, 400, "neither ids nor all");
    let ids = json!({ "ids": [dead["id"]] });
    let (status, replayed) = api(&server, Method::POST, "/api/dlq/replay", Some(ids)).await;
    assert_eq!((status, &replayed["replayed"]), (200, &json!(1)));
    server.reports(1).await;
    let one = Some(json!({ "plugin": "notify" }));
    let (status, replayed) = api(&server, Method::POST, "/api/events/evt_api_ok/replay", one).await;
    assert_eq!((status, &replayed["replayed"]), (200, &json!(1)));
    assert_eq!(&*server.reports(1).await[0].event_key, "evt_api_ok");

    let (_, listed) = api(&server, Method::GET, "/api/plugins", None).await;
    assert_eq!(listed["plugins"][0]["name"], "notify");
    assert_eq!(listed["plugins"][0]["state"], "active");
    let (status, _) = api(&server, Method::POST, "/api/plugins/nobody/release", None).await;
    assert_eq!(status, 404);

    // The console's page holds no data and is served to anyone, with a
    // policy that runs no inline script; the API is not.
    let client = reqwest::Client::new();
    let page = client.get(server.admin_url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'") && !policy.contains("unsafe-inline"));
    for path in [
        "/api/events",
        "/api/dlq",
        "/api/plugins",
        "/api/events/evt_api_ok",
    ] {
        let refused = client.get(server.admin_url(path)).send().await.unwrap();
        assert_eq!(refused.status(), 401, "{path}");
    }
    let replay = client
        .post(server.admin_url("/api/dlq/replay"))
        .json(&json!({ "all": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 401);
    server.stop().await;
}

/// Where Debian's Chromium is; the test fails (never skips) without it.
fn chromium() -> &'static str {
    let path = "/usr/bin/chromium";
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: install Debian's chromium (scripts/test does)"
    );
    path
}

/// `tests/console`'s driver dependencies, installed from its lockfile when
/// missing.
fn driver_dir() -> std::path::PathBuf {
    let dir = workspace_root().join("tests/console");
    if !dir.join("node_modules/playwright-core").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm ci in tests/console");
    }
    dir
}

/// A failed event found, seen and replayed in a real browser once its
/// plugin is fixed; a sender's and a plugin's markup stays text. Screenshots
/// of each page land in `target/console-screenshots`.
#[test]
fn a_browser_finds_a_failed_event_and_replays_it_after_the_fix() {
    let browser = chromium();
    let driver = driver_dir();
    let plugins = PluginDir::new();
    plugins.add("notify", "misbehave", None);
    let token = "console-test-token-0123456789";
    let mut host = ServeProcess::start_with(
        &plugins,
        Some("info"),
        &["--admin-token", token, "--max-attempts", "1"],
    );
    let failed = "evt_console_refused";
    host.send_blocking(event(
        failed,
        "order.created",
        json!({
            "misbehave": "error",
            "note": "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">",
        }),
    ));
    let hostile = "evt_<img src=x onerror=window.__pwned=3>";
    host.send_blocking(event(hostile, "order.created", json!({})));
    host.wait_for_each(&["delivery is dead", "misbehave ok"]);

    // The fix: a build that handles every event.
    let fixed = plugins.path().join("notify.wasm.new");
    std::fs::copy(wasm("wit-v020"), &fixed).unwrap();
    std::fs::rename(&fixed, plugins.path().join("notify.wasm")).unwrap();
    host.wait_for("plugin replaced");

    // A candidate beside it that refuses what the live version handles.
    let candidate = plugins.path().join(".notify.shadow.wasm.new");
    std::fs::copy(wasm("misbehave"), &candidate).unwrap();
    std::fs::rename(&candidate, plugins.path().join("notify.shadow.wasm")).unwrap();
    host.wait_for("shadow loaded");
    let shadowed = "evt_shadow_<img src=x onerror=window.__pwned=4>";
    host.send_blocking(event(
        shadowed,
        "order.created",
        json!({ "misbehave": "error" }),
    ));
    host.wait_for("shadow differed");

    let shots = workspace_root().join("target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let output = Command::new("node")
        .arg("drive.mjs")
        .current_dir(&driver)
        .env("CONSOLE_URL", format!("http://{}", host.admin_addr))
        .env("ADMIN_TOKEN", token)
        .env("FAILED_EVENT", failed)
        .env("HOSTILE_EVENT", hostile)
        .env("SHADOW_EVENT", shadowed)
        .env("PLUGIN", "notify")
        .env("SCREENSHOTS", &shots)
        .env("CHROMIUM", browser)
        .output()
        .expect("node runs");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{said}\n{}\nthe host logged:\n{}",
        String::from_utf8_lossy(&output.stderr),
        host.log().join("\n")
    );
    assert!(
        said.contains("ok after the replay the delivery succeeded"),
        "{said}"
    );
    for page in [
        "events",
        "dead-letters",
        "event-dead",
        "event-replayed",
        "plugins",
        "shadow",
    ] {
        let shot = shots.join(format!("{page}.png"));
        let bytes = std::fs::read(&shot).unwrap_or_default();
        assert!(bytes.starts_with(b"\x89PNG"), "{} saved", shot.display());
    }
    assert!(host.stop().success());
}
