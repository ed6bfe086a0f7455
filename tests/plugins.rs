//! Loading plugins and containing their failures, through the real server.

use crate::support::*;
use serde_json::json;
use stateset_hooks::runtime::FailureKind;

#[tokio::test(flavor = "multi_thread")]
async fn broken_files_are_reported_and_the_rest_serve() {
    let plugins = PluginDir::samples();
    plugins
        .write("garbage.wasm", b"this is not wasm")
        .write("core.wasm", wat::parse_str("(module)").unwrap())
        .write(
            "wrong-world.wasm",
            wat::parse_str(WRONG_WORLD_COMPONENT).unwrap(),
        )
        .write(
            "no-imports.wasm",
            wat::parse_str(NO_IMPORTS_COMPONENT).unwrap(),
        )
        .write("no-imports.toml", "subscriptions = [\"payment.*\"]");
    plugins.add(
        "bad-manifest",
        "misbehave",
        Some("subscriptions = \"order.*\""),
    );
    let mut server = TestServer::start(config(&plugins)).await;

    let mut failures: Vec<(String, String)> = server
        .hooks
        .load_failures()
        .iter()
        .map(|f| {
            (
                f.path.file_name().unwrap().to_string_lossy().into_owned(),
                f.reason.clone(),
            )
        })
        .collect();
    failures.sort();
    let names: Vec<&str> = failures.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "bad-manifest.wasm",
            "core.wasm",
            "garbage.wasm",
            "wrong-world.wasm"
        ]
    );
    let reason = |name: &str| &failures.iter().find(|(n, _)| n == name).unwrap().1;
    assert!(
        reason("bad-manifest.wasm").contains("invalid manifest"),
        "{failures:#?}"
    );
    assert!(
        reason("bad-manifest.wasm").contains("line 1"),
        "{failures:#?}"
    );
    assert!(
        reason("core.wasm").contains("core wasm module, not a component"),
        "{failures:#?}"
    );
    assert!(
        reason("garbage.wasm").contains("not a WebAssembly component"),
        "{failures:#?}"
    );
    assert!(
        reason("wrong-world.wasm").contains("does not fit"),
        "{failures:#?}"
    );

    let mut loaded: Vec<String> = server
        .hooks
        .plugins()
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    loaded.sort();
    assert_eq!(loaded, ["low-stock", "no-imports", "orders", "payments"]);

    assert_eq!(
        server.send(&example_event("payment.succeeded")).await.0,
        200
    );
    let mut reports = server.reports(2).await;
    reports.sort_by(|a, b| a.plugin.cmp(&b.plugin));
    assert_eq!(&*reports[0].plugin, "no-imports");
    assert_eq!(reports[0].outcome.result, Ok(()));
    assert_eq!(&*reports[1].plugin, "payments");
    assert!(
        messages(&reports[1])[0].contains("succeeded"),
        "{reports:#?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_plugins_are_recorded_and_others_unaffected() {
    let plugins = PluginDir::samples();
    plugins
        .add(
            "misbehave",
            "misbehave",
            Some(r#"subscriptions = ["order.*"]"#),
        )
        .write("start-trap.wasm", start_trap_component())
        .write("start-trap.toml", r#"subscriptions = ["order.*"]"#);
    let mut server = TestServer::start(config(&plugins)).await;

    let mut order: serde_json::Value =
        serde_json::from_slice(&example_event("order.created")).unwrap();
    let cases = [
        ("error", FailureKind::PluginError, "refused on purpose"),
        (
            "panic",
            FailureKind::Trap,
            "wasm `unreachable` instruction executed",
        ),
        (
            "unreachable",
            FailureKind::Trap,
            "wasm `unreachable` instruction executed",
        ),
    ];
    for (i, (misbehave, kind, message)) in cases.into_iter().enumerate() {
        order["id"] = json!(format!("evt_fail_{i}"));
        order["data"]["misbehave"] = json!(misbehave);
        let (status, body) = server.send(&serde_json::to_vec(&order).unwrap()).await;
        assert_eq!(
            (status, body),
            (200, json!({ "received": true })),
            "{misbehave}"
        );

        let mut reports = server.reports(3).await;
        reports.sort_by(|a, b| a.plugin.cmp(&b.plugin));
        let [misbehaving, orders, start_trap] = &reports[..] else {
            unreachable!()
        };
        let failure = misbehaving.outcome.result.as_ref().unwrap_err();
        assert_eq!(
            (failure.kind, failure.message.as_str()),
            (kind, message),
            "{misbehave}"
        );
        assert_eq!(
            orders.outcome.result,
            Ok(()),
            "orders is unaffected by {misbehave}"
        );
        assert!(
            messages(orders)[0].contains("created: 3 items"),
            "{reports:#?}"
        );
        let failure = start_trap.outcome.result.as_ref().unwrap_err();
        assert_eq!(failure.kind, FailureKind::Trap);
    }
    // A bad order is the orders plugin's own `Err`, with its reason.
    assert_eq!(
        server
            .send(&example_event("order.created.bad-totals"))
            .await
            .0,
        200
    );
    let reports = server.reports(3).await;
    let orders = reports.iter().find(|r| &*r.plugin == "orders").unwrap();
    let failure = orders.outcome.result.as_ref().unwrap_err();
    assert_eq!(failure.kind, FailureKind::PluginError);
    assert_eq!(
        failure.message,
        "order ord_01JQ93B6X8Z0B2D4F6H8K0M2N4: total_cents is 8520, expected 7740 \
         (subtotal + tax + shipping - discount)"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_state_leaks_from_one_event_to_the_next() {
    // Each call gets a fresh instance: a plugin that grows its memory in one
    // call starts the next one from its initial size.
    let plugins = PluginDir::new();
    plugins.add("misbehave", "misbehave", None);
    let mut server = TestServer::start(config(&plugins)).await;
    let big = event(
        "evt_big",
        "order.created",
        json!({ "misbehave": "allocate", "bytes": 8 << 20 }),
    );
    let small = event("evt_small", "order.created", json!({}));
    assert_eq!(server.send(&big).await.0, 200);
    assert_eq!(server.send(&small).await.0, 200);
    let reports = server.reports(2).await;
    assert!(
        reports[0].outcome.peak_memory_bytes > 8 << 20,
        "{reports:#?}"
    );
    assert!(
        reports[1].outcome.peak_memory_bytes < 4 << 20,
        "{reports:#?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_cannot_read_what_an_earlier_call_left_in_memory() {
    // One call leaves a secret in a static, 1 MiB of heap and its stack; the
    // next instance (the same pool slot: one worker) searches every byte of
    // its linear memory for it. Fuel enough for the byte-by-byte search.
    let plugins = PluginDir::new();
    plugins.add(
        "misbehave",
        "misbehave",
        Some("subscriptions = [\"order.*\"]\n[limits]\nfuel = 100000000\n"),
    );
    let mut server = TestServer::start(config(&plugins)).await;
    let secret = |id: &str, mode: &str, first: bool| {
        let data = json!({ "misbehave": mode, "secret": "left behind", "remember_first": first });
        event(id, "order.created", data)
    };
    for (id, mode, first) in [
        ("evt_remember", "remember", false),
        ("evt_recall", "recall", false),
        ("evt_remember_2", "remember", false),
        ("evt_recall_2", "recall", false),
        // The search finds what its own call left: it can fail.
        ("evt_remember_and_recall", "recall", true),
    ] {
        assert_eq!(server.send(&secret(id, mode, first)).await.0, 200);
    }
    let reports = server.reports(5).await;
    for report in &reports[..4] {
        assert_eq!(report.outcome.result, Ok(()), "{report:#?}");
    }
    let failure = reports[4].outcome.result.clone().unwrap_err();
    assert!(
        failure.message.starts_with("found ") && failure.message.ends_with(" copies of the secret"),
        "{failure:?}"
    );
    server.stop().await;
}

/// A plugin built against each released WIT version loads and runs beside
/// the others: the host keeps that promise for every version, not only the
/// newest (the samples use 0.3.0 through the SDK).
#[tokio::test(flavor = "multi_thread")]
async fn plugins_built_against_every_released_wit_version_run() {
    let plugins = PluginDir::new();
    plugins
        .add("v010", "wit-v010", Some(r#"subscriptions = ["order.*"]"#))
        .add(
            "v020",
            "wit-v020",
            Some("subscriptions = [\"order.*\"]\n[config]\ngreeting = \"hello\"\n"),
        )
        .add("v030", "orders", None);
    let mut server = TestServer::start(config(&plugins)).await;
    assert_eq!(server.send(&example_event("order.created")).await.0, 200);
    let mut reports = server.reports(3).await;
    reports.sort_by(|a, b| a.plugin.cmp(&b.plugin));
    let seen: Vec<(&str, Vec<&str>)> = reports
        .iter()
        .map(|r| {
            assert_eq!(r.outcome.result, Ok(()), "{r:#?}");
            (&*r.plugin, messages(r))
        })
        .collect();
    assert_eq!(seen[0], ("v010", vec!["0.1.0 handled order.created"]));
    assert_eq!(
        seen[1],
        ("v020", vec!["0.2.0 handled order.created: hello"])
    );
    assert_eq!(seen[2].0, "v030");
    assert!(seen[2].1[0].contains("created: 3 items"), "{seen:?}");
    server.stop().await;
}
