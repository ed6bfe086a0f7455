//! `stateset-hooks shadow` and `stateset-hooks test`: a candidate runs on
//! recorded traffic, and a plugin on its own cases, without effects: no
//! request reaches the network, no kv write or delivery reaches the store.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::support::{
    ADMIN_TOKEN, BIN, PluginDir, ServeProcess, TestServer, config, event, example_event, receiver,
    store_args, wasm, workspace_root,
};

fn shadow(plugins: &PluginDir, args: &[&std::ffi::OsStr]) -> Output {
    Command::new(BIN)
        .env_remove("RUST_LOG")
        .args(store_args(plugins))
        .arg("shadow")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What a user reads of the store: every delivery (status, attempts, logs,
/// cost) and the live plugin's keys.
fn store_view(plugins: &PluginDir) -> (String, String) {
    let read = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(store_args(plugins))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout(&out)
    };
    (
        read(&["events", "list", "--json"]),
        read(&["kv", "list", "orders"]),
    )
}

/// The `orders` sample with the `discount-cap` rule: the README's candidate.
/// Its own target directory, so the samples the other tests use stay as
/// they are.
fn candidate_orders() -> PathBuf {
    let target = workspace_root().join("target/candidates");
    let status = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--quiet", "--target", "wasm32-wasip2"])
        .args([
            "--profile",
            "plugin",
            "-p",
            "orders",
            "--features",
            "discount-cap",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "building the candidate failed");
    target.join("wasm32-wasip2/plugin/orders.wasm")
}

/// Three `order.created` events `evt_TAG_N` (customer `cus_TAG`) asking
/// the fixture to act: write kv `shadow-wrote` and POST to `service/hook`.
async fn send_acting_orders(server: &TestServer, service: &str, tag: &str) {
    for n in 1..=3 {
        let data = json!({
            "id": format!("ord_{tag}_{n}"),
            "customer": { "id": format!("cus_{tag}") },
            "misbehave": "act", "url": format!("{service}/hook"), "key": "shadow-wrote",
        });
        let body = event(&format!("evt_{tag}_{n}"), "order.created", data);
        assert_eq!(server.send(&body).await.0, 200);
    }
}

/// A candidate that writes kv and POSTs to a local service, shadowed
/// against `orders`' recorded traffic while the server runs: the service
/// sees nothing, the store is as it was, the report names every request it
/// would have made, and the exit code gates on events that succeeded live.
#[tokio::test(flavor = "multi_thread")]
async fn a_shadowed_candidate_acts_on_nothing_and_its_regressions_fail_the_run() {
    let (port, received) = receiver().await;
    let service = format!("http://127.0.0.1:{port}");
    let plugins = PluginDir::new();
    let manifest = std::fs::read_to_string(workspace_root().join("plugins/orders/orders.toml"));
    plugins.add("orders", "orders", Some(&manifest.unwrap()));
    let mut server = TestServer::start(config(&plugins)).await;
    send_acting_orders(&server, &service, "shadow").await;
    server.reports(3).await;
    let before = store_view(&plugins);
    assert!(
        before.1.contains("customer/cus_shadow/orders"),
        "{}",
        before.1
    );

    // The candidate's manifest grants the service; it sits beside the
    // component, where `run` finds it.
    let candidate = tempfile::tempdir().unwrap();
    let wasm_path = candidate.path().join("actor.wasm");
    std::fs::copy(wasm("misbehave"), &wasm_path).unwrap();
    let manifest = candidate.path().join("actor.toml");
    std::fs::write(
        &manifest,
        format!("subscriptions = [\"order.*\"]\n[http]\nallowed_hosts = [\"{service}\"]\n"),
    )
    .unwrap();
    let common = |extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec![
            wasm_path.clone().into(),
            "--as".into(),
            "orders".into(),
            "--manifest".into(),
            manifest.clone().into(),
            "--allow-private-networks".into(),
        ];
        args.extend(extra.iter().map(Into::into));
        args
    };
    let as_os = |args: &[std::ffi::OsString]| -> Vec<std::ffi::OsString> { args.to_vec() };

    // The default stub answers 503: the candidate fails where live succeeded.
    let args = as_os(&common(&["--json"]));
    let out = shadow(
        &plugins,
        &args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>(),
    );
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(1), "regressions exit 1: {report:#}");
    assert_eq!(report["events"], 3, "{report:#}");
    assert_eq!(report["outcomes"]["succeeded_to_failed"], 3, "{report:#}");
    assert_eq!(report["changes"][0]["live"], "ok");
    assert!(
        report["changes"][0]["candidate"]
            .as_str()
            .unwrap()
            .contains("the service answered 503"),
        "{report:#}"
    );
    let requests = report["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 3, "{report:#}");
    for request in requests {
        assert_eq!(request["method"], "POST");
        assert_eq!(request["url"], format!("{service}/hook"));
        assert_eq!(request["status"], 503);
        assert!(request["body"].as_str().unwrap().contains("evt_shadow_"));
    }
    assert_eq!(
        report["fuel"]["live"]["count"], 3,
        "live costs recorded: {report:#}"
    );
    assert_eq!(report["fuel"]["candidate"]["count"], 3);

    // Canned answers: the candidate succeeds, so the run passes.
    let stub = candidate.path().join("stub.json");
    std::fs::write(
        &stub,
        json!([{ "url": format!("{service}/*"), "status": 202 }]).to_string(),
    )
    .unwrap();
    let args = as_os(&common(&["--stub", stub.to_str().unwrap()]));
    let out = shadow(
        &plugins,
        &args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>(),
    );
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("3 unchanged, 0 succeeded -> failed"),
        "{text}"
    );
    assert!(text.contains("(none sent): 3"), "{text}");
    assert!(
        text.contains(&format!("3 x POST {service}/hook (stubbed 202)")),
        "{text}"
    );
    assert!(
        text.contains("+ info: acted: 202"),
        "the log lines it adds: {text}"
    );

    // Nothing reached the service or the store.
    assert!(
        received.lock().unwrap().is_empty(),
        "a shadow call reached the network"
    );
    assert_eq!(store_view(&plugins), before, "the store changed");

    // The same component run for real (`run`) does reach the service: the
    // assertion above could fail.
    let one = candidate.path().join("event.json");
    std::fs::write(&one, example_event_with(&service)).unwrap();
    let out = Command::new(BIN)
        .args(store_args(&plugins))
        .arg("run")
        .arg(&wasm_path)
        .arg(&one)
        .arg("--allow-private-networks")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    assert_eq!(received.lock().unwrap().len(), 1, "run sends for real");

    // And the server ran on undisturbed.
    assert_eq!(server.send(&example_event("order.created")).await.0, 200);
    server.reports(1).await;
    server.stop().await;
}

fn example_event_with(service: &str) -> Vec<u8> {
    event(
        "evt_live_run",
        "order.created",
        json!({ "id": "ord_run", "misbehave": "act", "url": format!("{service}/hook") }),
    )
}

/// The README's worked example: the example orders sent to the host, then
/// the `discount-cap` candidate shadowed against them. The two orders the
/// live version accepted fail with the new rule (exit 1); the one it
/// refused is refused the same way.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_candidate_is_caught_before_it_goes_live() {
    let plugins = PluginDir::samples();
    let mut server = TestServer::start(config(&plugins)).await;
    // One at a time, as a sender would: the update after the creation's
    // record, so its kv read sees the order claimed.
    for name in ["order.created", "order.updated", "order.created.bad-totals"] {
        assert_eq!(server.send(&example_event(name)).await.0, 200);
        server.reports(1).await;
    }
    server.stop().await;
    let candidate = candidate_orders();
    let args: Vec<&std::ffi::OsStr> = vec![
        candidate.as_os_str(),
        "--as".as_ref(),
        "orders".as_ref(),
        "--plugins".as_ref(),
        plugins.path().as_os_str(),
    ];
    let out = shadow(&plugins, &args);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("1 unchanged, 2 succeeded -> failed, 0 failed -> succeeded"),
        "{text}"
    );
    assert!(text.contains("is over 5% of subtotal_cents 5897"), "{text}");
    assert!(text.contains("fuel candidate"), "{text}");

    // A name with no recorded deliveries is trouble (2), not a verdict.
    let args: Vec<&std::ffi::OsStr> = vec![
        candidate.as_os_str(),
        "--as".as_ref(),
        "order".as_ref(),
        "--plugins".as_ref(),
        plugins.path().as_os_str(),
    ];
    let out = shadow(&plugins, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(r#"no recorded deliveries of "order""#),
        "{stderr}"
    );
}

fn write_case(dir: &Path, name: &str, case: Value) {
    std::fs::write(dir.join(name), serde_json::to_vec_pretty(&case).unwrap()).unwrap();
}

/// `stateset-hooks test`: cases with kv state before and after, canned
/// answers and expected requests, against a host name that does not exist
/// (nothing is resolved or sent). Failing cases say why and fail the run.
#[test]
fn plugin_test_cases_pass_or_fail_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("actor.wasm");
    std::fs::copy(wasm("misbehave"), &plugin).unwrap();
    std::fs::write(
        dir.path().join("actor.toml"),
        "[http]\nallowed_hosts = [\"https://api.example.test\"]\n",
    )
    .unwrap();
    let cases = dir.path().join("cases");
    std::fs::create_dir(&cases).unwrap();
    let act = json!({
        "id": "evt_case", "type": "order.created",
        "data": { "misbehave": "act", "url": "https://api.example.test/hook", "key": "acted" }
    });
    write_case(
        &cases,
        "1-acts.json",
        json!({
            "event": act,
            "kv": { "other": "x" },
            "http": [{ "method": "POST", "url": "https://api.example.test/hook", "status": 201 }],
            "expect": {
                "logs": ["acted: 201"],
                "requests": [{ "method": "POST", "url": "https://api.example.test/hook",
                               "body_contains": "evt_case" }],
                "kv": { "acted": "1", "other": "x", "never": null }
            }
        }),
    );
    write_case(
        &cases,
        "2-refuses.json",
        json!({
            "event": { "type": "order.created", "data": { "misbehave": "error" } },
            "expect": { "error": "refused on purpose", "requests": [] }
        }),
    );
    let run = || {
        Command::new(BIN)
            .arg("test")
            .arg(&plugin)
            .arg(&cases)
            .output()
            .unwrap()
    };
    let out = run();
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("2 cases: 2 passed, 0 failed"), "{text}");

    // The service unavailable (no canned answer: 503), and wrong state.
    write_case(
        &cases,
        "3-unavailable.json",
        json!({ "event": act, "expect": { "kv": { "acted": "1" } } }),
    );
    write_case(
        &cases,
        "4-wrong-state.json",
        json!({
            "event": act,
            "http": [{ "url": "https://api.example.test/*", "status": 200 }],
            "expect": { "kv": { "acted": "2" }, "requests": [] }
        }),
    );
    let out = run();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("4 cases: 2 passed, 2 failed"), "{text}");
    let line = |case: &str| {
        text.lines()
            .find(|l| l.starts_with(case))
            .unwrap()
            .to_owned()
    };
    assert!(
        line("3-unavailable")
            .contains("expected ok, got failed (plugin-error): the service answered 503"),
        "{text}"
    );
    let wrong = line("4-wrong-state");
    assert!(wrong.contains("FAIL"), "{wrong}");
    assert!(
        wrong.contains(r#"kv "acted" is Some("1"), expected Some("2")"#),
        "{wrong}"
    );
    assert!(
        wrong.contains("unexpected request POST https://api.example.test/hook"),
        "{wrong}"
    );
}

/// The cases the `orders` sample ships (the README's example) pass
/// against the sample as built.
#[test]
fn the_samples_cases_pass() {
    let root = workspace_root();
    let out = Command::new(BIN)
        .arg("test")
        .arg(wasm("orders"))
        .arg(root.join("plugins/orders/cases"))
        .arg("--manifest")
        .arg(root.join("plugins/orders/orders.toml"))
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("3 cases: 3 passed, 0 failed"), "{text}");
}

/// `orders.shadow.wasm` beside `orders`: the candidate runs on each new
/// event after the live call, under the live manifest (which grants the
/// service), and acts on nothing: the service sees no request, the live
/// state no write, the store no delivery for it. Its runs are recorded
/// apart, in `plugins list` and the admin API, compared with the live calls.
#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_beside_the_live_plugin_runs_new_events_and_acts_on_nothing() {
    let (port, received) = receiver().await;
    let service = format!("http://127.0.0.1:{port}");
    let plugins = PluginDir::new();
    let manifest = std::fs::read_to_string(workspace_root().join("plugins/orders/orders.toml"));
    let manifest = format!(
        "{}\n[http]\nallowed_hosts = [\"{service}\"]\n",
        manifest.unwrap()
    );
    plugins.add("orders", "orders", Some(&manifest));
    plugins.add("orders.shadow", "misbehave", None);
    let mut config = config(&plugins);
    config.http.allow_private_networks = true;
    let mut server = TestServer::start(config).await;
    send_acting_orders(&server, &service, "in_shadow").await;
    let reports = server.reports(3).await;
    assert!(
        reports.iter().all(|r| &*r.plugin == "orders"),
        "{reports:?}"
    );
    let store = server.hooks.store().clone();
    let mut runs = Vec::new();
    for _ in 0..300 {
        let s = store.clone();
        runs = tokio::task::spawn_blocking(move || s.shadow_runs("orders", 10).unwrap())
            .await
            .unwrap();
        if runs.len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(runs.len(), 3, "one run per new event: {runs:?}");
    for run in &runs {
        assert_eq!(run.live_error, None, "{run:?}");
        let candidate = run.candidate_error.as_deref().unwrap_or("ok");
        assert!(candidate.contains("the service answered 503"), "{run:?}");
        assert_eq!(run.requests.len(), 1, "{run:?}");
        assert_eq!(run.requests[0].url, format!("{service}/hook"));
        assert_eq!(run.requests[0].status, Some(503));
        assert!(run.live_cost.fuel > 0 && run.candidate_cost.fuel > 0);
    }
    assert!(
        received.lock().unwrap().is_empty(),
        "a shadow reached the network"
    );
    let s = store.clone();
    let (wrote, deliveries) = tokio::task::spawn_blocking(move || {
        (
            s.kv_get("orders", "shadow-wrote").unwrap(),
            s.deliveries(&stateset_hooks::store::Filter::default())
                .unwrap(),
        )
    })
    .await
    .unwrap();
    assert_eq!(wrote, None, "a shadow's kv write was kept");
    assert_eq!(deliveries.len(), 3, "{deliveries:?}");
    assert!(
        deliveries.iter().all(|d| d.plugin == "orders"),
        "{deliveries:?}"
    );

    let status = server.hooks.status();
    let orders = status.iter().find(|p| p.name == "orders").unwrap();
    let shadow = orders.shadow.as_ref().expect("orders is shadowed");
    assert_eq!((shadow.runs, shadow.differed), (3, 3), "{shadow:?}");
    assert!(
        !status.iter().any(|p| p.name.contains("shadow")),
        "not a plugin: {status:?}"
    );
    let answer: Value = reqwest::Client::new()
        .get(server.admin_url("/api/plugins/orders/shadow"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["compared"]["succeeded_to_failed"], 3, "{answer:#}");
    assert_eq!(answer["shadow"]["version"], shadow.version.as_str());

    // A replay is not a new event: the shadow does not run again.
    let s = store.clone();
    let n = tokio::task::spawn_blocking(move || s.replay_event("evt_in_shadow_1", None).unwrap())
        .await
        .unwrap();
    assert_eq!(n, 1);
    server.reports(1).await;
    assert_eq!(server.hooks.status()[0].shadow.as_ref().unwrap().runs, 3);
    server.stop().await;
}

/// A candidate whose live plugin is not there says so, and starts
/// shadowing once the live plugin arrives; a candidate for a candidate is
/// refused.
#[test]
fn a_shadow_without_its_live_plugin_is_flagged_until_it_arrives() {
    let plugins = PluginDir::new();
    plugins.add("ghost.shadow", "misbehave", None);
    // Nor does a shadow of a shadow run: it is refused, saying why.
    plugins.add("ghost.shadow.shadow", "misbehave", None);
    let mut host = ServeProcess::start(&plugins, Some("info"));
    // Logged while loading, before the host is ready.
    let log = host.log();
    let warned = log
        .iter()
        .find(|l| l.contains("no live plugin has this name"));
    assert!(
        warned.is_some_and(|l| l.contains("WARN") && l.contains("ghost.wasm")),
        "{log:#?}"
    );
    let refused = log.iter().find(|l| l.contains("not another shadow"));
    assert!(
        refused.is_some_and(|l| l.contains("ghost.shadow.shadow.wasm")),
        "{log:#?}"
    );
    plugins.add("ghost", "misbehave", None);
    let line = host.wait_for("its shadow, loaded before it, runs from now on");
    assert!(line.contains("plugin=\"ghost\""), "{line}");
}

/// A credential the operator grants from the environment, slipped by the
/// plugin into its log lines, its stdout, a request's query (percent-encoded)
/// and body, and its error: `test` and `run` show each place it went, and
/// none of its forms.
#[test]
fn a_granted_credential_never_shows_in_what_a_call_leaves() {
    const TOKEN: &str = "sk+live/leak=1";
    let forms = [TOKEN, "sk%2Blive%2Fleak%3D1", "c2srbGl2ZS9sZWFrPTE"];
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("leaky.wasm");
    std::fs::copy(wasm("misbehave"), &plugin).unwrap();
    std::fs::write(
        dir.path().join("leaky.toml"),
        "[config]\ntoken = { env = \"LEAKY_TOKEN\" }\n\
         [http]\nallowed_hosts = [\"https://api.example.test\"]\n",
    )
    .unwrap();
    let leak = json!({
        "type": "order.created",
        "data": { "misbehave": "leak-config", "url": "https://api.example.test/hook" }
    });
    let cases = dir.path().join("cases");
    std::fs::create_dir(&cases).unwrap();
    write_case(
        &cases,
        "1-scrubbed.json",
        json!({
            "event": leak,
            "expect": {
                "error": "failed (Ok(503)) with [redacted]",
                "logs": ["info: token is [redacted]", "stdout: stdout token [redacted]"],
                "requests": [{ "method": "POST", "url": "https://api.example.test/hook?q=[redacted]",
                               "body_contains": "{\"client_secret\":\"[redacted]\"}" }]
            }
        }),
    );
    // Expecting what is not there, so the run prints what is.
    write_case(
        &cases,
        "2-shows-what-it-got.json",
        json!({
            "event": leak,
            "expect": { "error": "nothing like this", "logs": ["nor this"],
                        "requests": [{ "url": "https://elsewhere.test/" }] }
        }),
    );
    let with_token = |command: &mut Command| {
        let out = command
            .env("LEAKY_TOKEN", TOKEN)
            .args(["--allow-plugin-env", "LEAKY_TOKEN"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for form in forms {
            assert!(!text.contains(form), "{form} shows in:\n{text}");
        }
        text
    };
    let tested = with_token(Command::new(BIN).arg("test").arg(&plugin).arg(&cases));
    assert!(
        tested.contains("1-scrubbed.json") && tested.contains("1 passed, 1 failed"),
        "{tested}"
    );
    assert!(tested.contains("?q=[redacted]"), "{tested}");

    let event = dir.path().join("event.json");
    std::fs::write(&event, serde_json::to_vec(&leak).unwrap()).unwrap();
    let ran = with_token(Command::new(BIN).arg("run").arg(&plugin).arg(&event));
    assert!(ran.contains("token is [redacted]"), "{ran}");
}
