//! Drop in, replace, remove: hot reload under traffic, broken replacements,
//! WIT versions side by side, manifest configuration and the compile cache.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;
use stateset_hooks::status::PluginState;
use stateset_hooks::store::{Filter, Status};
use stateset_hooks::watch::RELOAD_DEBOUNCE;

/// Deploy the way the README recommends: write aside, rename over.
fn deploy(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.wasm.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).unwrap();
}

fn version(bytes: &[u8]) -> String {
    stateset_hooks::loader::version_of(bytes)
}

/// Wait until plugin `name` serves `version` (or is gone, for `None`).
async fn wait_for_version(server: &TestServer, name: &str, version: Option<&str>) {
    let deadline = Instant::now() + REPORT_TIMEOUT;
    loop {
        let plugins = server.hooks.plugins();
        let serving = plugins
            .iter()
            .find(|p| &*p.name == name)
            .map(|p| p.version.to_string());
        if serving.as_deref() == version {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} serves {serving:?}, want {version:?}"
        );
        tokio::time::sleep(RELOAD_DEBOUNCE / 5).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_are_added_replaced_and_removed_under_traffic() {
    let plugins = PluginDir::new();
    plugins.add("steady", "orders", Some(r#"subscriptions = ["order.*"]"#));
    plugins.write("swap.toml", r#"subscriptions = ["order.*"]"#);
    let mut config = config(&plugins);
    config.workers = 2;
    let mut server = TestServer::start(config).await;
    let (a, b) = (
        std::fs::read(wasm("misbehave")).unwrap(),
        std::fs::read(wasm("orders")).unwrap(),
    );
    let (va, vb) = (version(&a), version(&b));

    // Continuous signed traffic until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let traffic = tokio::spawn({
        let (stop, sent, url) = (stop.clone(), sent.clone(), server.url("/webhooks/stateset"));
        async move {
            let client = reqwest::Client::new();
            let template: serde_json::Value =
                serde_json::from_slice(&example_event("order.created")).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let mut order = template.clone();
                order["id"] = json!(format!("evt_traffic_{}", sent.load(Ordering::Relaxed)));
                let body = serde_json::to_vec(&order).unwrap();
                let response = post_signed(&client, &url, body).await.unwrap();
                assert_eq!(response.status(), 200, "no 5xx, no refusal during reloads");
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    deploy(plugins.path(), "swap", &a);
    wait_for_version(&server, "swap", Some(&va)).await;
    for i in 0..20 {
        let (bytes, v) = if i % 2 == 0 { (&b, &vb) } else { (&a, &va) };
        deploy(plugins.path(), "swap", bytes);
        wait_for_version(&server, "swap", Some(v)).await;
        tokio::time::sleep(Duration::from_millis(50)).await; // let some events through
    }
    std::fs::remove_file(plugins.path().join("swap.wasm")).unwrap();
    wait_for_version(&server, "swap", None).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let sent = sent.load(Ordering::Relaxed);

    // Every event reached `steady`; every `swap` run was done by one build
    // and shows exactly that build's behaviour.
    let mut steady = 0;
    let mut by_version: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + REPORT_TIMEOUT;
    let store = server.hooks.store().clone();
    while steady < sent {
        assert!(
            Instant::now() < deadline,
            "{steady} of {sent} events handled by steady"
        );
        for report in server.reports(1).await {
            match &*report.plugin {
                "steady" => steady += 1,
                "swap" => {
                    let message = messages(&report).join(" ");
                    if *report.version == *va {
                        assert!(message.starts_with("misbehave ok"), "{message}");
                    } else {
                        assert_eq!(&*report.version, vb, "only the two builds ever ran");
                        assert!(
                            message.starts_with("order ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E created"),
                            "{message}"
                        );
                    }
                    assert_eq!(report.outcome.result, Ok(()));
                    *by_version.entry(report.version.to_string()).or_default() += 1;
                }
                other => panic!("unexpected plugin {other}"),
            }
        }
    }
    assert!(
        by_version.len() == 2,
        "both builds handled events: {by_version:?}"
    );

    // Deliveries for `swap` that were waiting when it was removed are kept,
    // and run when it comes back.
    let waiting = |status| {
        store
            .deliveries(&Filter {
                status: Some(status),
                plugin: Some("swap".into()),
                ..Filter::default()
            })
            .unwrap()
            .len()
    };
    let kept = waiting(Status::Pending);
    deploy(plugins.path(), "swap", &b);
    wait_for_version(&server, "swap", Some(&vb)).await;
    let deadline = Instant::now() + REPORT_TIMEOUT;
    while waiting(Status::Pending) > 0 {
        assert!(
            Instant::now() < deadline,
            "kept deliveries resume ({kept} were kept)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "reload test: {sent} events, {by_version:?} runs by version, {kept} deliveries kept while removed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_replacement_keeps_the_old_version_serving() {
    let plugins = PluginDir::samples();
    let mut server = TestServer::start(config(&plugins)).await;
    let serving = server.plugin("orders").version.clone();

    // Written in place (no rename), and not a component at all.
    std::fs::write(
        plugins.path().join("orders.wasm"),
        b"\0asm half a component",
    )
    .unwrap();
    let deadline = Instant::now() + REPORT_TIMEOUT;
    while server.hooks.load_failures().is_empty() {
        assert!(Instant::now() < deadline, "the failed reload is reported");
        tokio::time::sleep(RELOAD_DEBOUNCE / 5).await;
    }
    let failure = &server.hooks.load_failures()[0];
    assert!(failure.path.ends_with("orders.wasm"));
    assert!(
        failure.reason.contains("not a WebAssembly component"),
        "{}",
        failure.reason
    );
    assert_eq!(server.plugin("orders").version, serving);

    assert_eq!(server.send(&example_event("order.created")).await.0, 200);
    let report = &server.reports(1).await[0];
    assert_eq!((&*report.plugin, &report.version), ("orders", &serving));
    assert_eq!(report.outcome.result, Ok(()));

    // An invalid manifest is refused the same way, naming the line.
    std::fs::write(
        plugins.path().join("orders.toml"),
        "subscriptions = [\"order.*\"]\nfuel = 12\n",
    )
    .unwrap();
    std::fs::copy(wasm("orders"), plugins.path().join("orders.wasm")).unwrap();
    let deadline = Instant::now() + REPORT_TIMEOUT;
    loop {
        let failures = server.hooks.load_failures();
        if let Some(f) = failures
            .iter()
            .find(|f| f.reason.contains("invalid manifest"))
        {
            assert!(f.reason.contains("line 2"), "{}", f.reason);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "manifest failure reported: {failures:?}"
        );
        tokio::time::sleep(RELOAD_DEBOUNCE / 5).await;
    }
    assert_eq!(server.plugin("orders").version, serving);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wit_versions_run_side_by_side_and_config_reaches_the_plugin() {
    // orders is built against 0.1.0; payments against 0.2.0 (config-get).
    let plugins = PluginDir::samples();
    let mut server = TestServer::start(config(&plugins)).await;
    assert_eq!(server.send(&example_event("order.created")).await.0, 200);
    assert_eq!(server.send(&example_event("payment.refunded")).await.0, 200);
    let reports = server.reports(2).await;
    assert!(
        reports.iter().all(|r| r.outcome.result.is_ok()),
        "{reports:#?}"
    );
    let refund = reports.iter().find(|r| &*r.plugin == "payments").unwrap();
    assert!(
        messages(refund)[1].contains("above the 500.00 USD threshold"),
        "{refund:#?}"
    );

    // Raise the threshold in the manifest: a reload, and the flag is gone.
    let manifest = "subscriptions = [\"payment.*\"]\n[config]\nrefund_flag_cents = \"100000\"\n";
    std::fs::write(plugins.path().join("payments.toml"), manifest).unwrap();
    let deadline = Instant::now() + REPORT_TIMEOUT;
    while server
        .plugin("payments")
        .manifest
        .config
        .get("refund_flag_cents")
        != Some(&stateset_hooks::manifest::ConfigSource::Value(
            "100000".into(),
        ))
    {
        assert!(
            Instant::now() < deadline,
            "manifest change reloads the plugin"
        );
        tokio::time::sleep(RELOAD_DEBOUNCE / 5).await;
    }
    let mut again: serde_json::Value =
        serde_json::from_slice(&example_event("payment.refunded")).unwrap();
    again["id"] = json!("evt_refund_again");
    assert_eq!(
        server.send(&serde_json::to_vec(&again).unwrap()).await.0,
        200
    );
    let report = &server.reports(1).await[0];
    assert_eq!(
        messages(report).len(),
        1,
        "no flag under the new threshold: {report:#?}"
    );
    server.stop().await;
}

#[test]
fn a_warm_cache_restart_does_not_compile_and_a_corrupt_entry_is_recompiled() {
    let plugins = PluginDir::samples();
    let start = || {
        let mut config = config(&plugins);
        config.watch = false;
        stateset_hooks::Hooks::new(config).unwrap()
    };
    let cold = start();
    assert_eq!(cold.runtime().compiled_count(), 3);
    drop(cold);
    let warm = start();
    assert_eq!(
        warm.runtime().compiled_count(),
        0,
        "every component came from the cache"
    );
    assert_eq!(warm.plugins().len(), 3);
    drop(warm);

    let entry = std::fs::read_dir(plugins.cache_path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    let mut bytes = std::fs::read(&entry).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&entry, bytes).unwrap();
    let repaired = start();
    assert_eq!(
        repaired.runtime().compiled_count(),
        1,
        "the corrupt entry, and only it"
    );
    assert_eq!(repaired.plugins().len(), 3);
}

/// The start-up load of a large, slow-to-compile old build races the
/// watcher's load of a small new build deployed meanwhile: the newest bytes
/// on disk win, and stay.
#[tokio::test(flavor = "multi_thread")]
async fn the_newest_build_wins_over_a_slower_older_one() {
    // About 8 MB: several seconds to compile here (3 s for half as much), so
    // the old build is still compiling when the new one lands, even on a
    // machine busy enough to pause this test for a while.
    let old = padded_component(10_000);
    assert!(
        old.len() as u64 > stateset_hooks::loader::LARGE_COMPONENT_BYTES,
        "large enough to compile after start-up: {} bytes",
        old.len()
    );
    let new = wat::parse_str(NO_IMPORTS_COMPONENT).unwrap();
    let plugins = PluginDir::new();
    plugins.write("racer.wasm", &old);
    let server = TestServer::start(config(&plugins)).await;
    // The old build is still loading (queued or compiling); deploy the new one.
    let racer = |server: &TestServer| {
        let status = server.hooks.status();
        status.into_iter().find(|s| s.name == "racer").unwrap()
    };
    assert_eq!(racer(&server).state, PluginState::Loading);
    deploy(plugins.path(), "racer", &new);
    wait_for_version(&server, "racer", Some(&version(&new))).await;

    // Give the old build's compile all the time it needs to finish (measured
    // here, on this machine), then check it did not win after all.
    let compile = {
        let runtime = stateset_hooks::runtime::Runtime::new(None, 1).unwrap();
        let started = Instant::now();
        runtime.compile(&old).unwrap();
        started.elapsed()
    };
    tokio::time::sleep(compile + RELOAD_DEBOUNCE * 2).await;
    wait_for_version(&server, "racer", Some(&version(&new))).await;
    let racer = racer(&server);
    assert_eq!(racer.version.as_deref(), Some(version(&new).as_str()));
    assert_eq!(racer.state, PluginState::Active);
    server.stop().await;
}
