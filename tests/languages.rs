//! Plugins in three languages in one host: the Rust samples, the Python
//! example (componentize-py) and the JavaScript example (componentize-js),
//! each built from source with its real toolchain by its own build script,
//! fed one stream of events over HTTP.

use std::collections::BTreeMap;
use std::process::Command;

use crate::support::*;

fn build(example: &str, output: &str) -> std::path::PathBuf {
    let dir = workspace_root().join("examples").join(example);
    let status = Command::new("bash")
        .arg(dir.join("build.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "{example}/build.sh failed");
    dir.join(output)
}

/// The tests by name, `toolchains::...`: `scripts/test` runs them beside the
/// rest of the suite, as they spend most of their time in the toolchains.
mod toolchains {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn rust_python_and_javascript_plugins_share_one_stream() {
        // The two toolchains install and build side by side.
        let (python, js) = std::thread::scope(|scope| {
            let python = scope.spawn(|| build("python-plugin", "shipment-review.wasm"));
            let js = build("js-plugin", "return-refund.wasm");
            (python.join().unwrap(), js)
        });
        // Each example posts to a service of its own and keeps state in kv.
        let (reviews, reviewed) = receiver().await;
        let (refunds, refunded) = receiver().await;
        let plugins = PluginDir::samples();
        for (wasm, name, setting, port, path) in [
            (&python, "shipment-review", "review_url", reviews, "reviews"),
            (&js, "return-refund", "refund_url", refunds, "refunds"),
        ] {
            std::fs::copy(wasm, plugins.path().join(format!("{name}.wasm"))).unwrap();
            let manifest = std::fs::read_to_string(wasm.with_extension("toml")).unwrap()
                + &format!(
                    "\n[config]\n{setting} = \"http://127.0.0.1:{port}/{path}\"\n\
                     [http]\nallowed_hosts = [\"http://127.0.0.1:{port}\"]\n"
                );
            std::fs::write(plugins.path().join(format!("{name}.toml")), manifest).unwrap();
        }
        let mut config = config(&plugins);
        config.http.allow_private_networks = true;
        let mut server = TestServer::start(config).await;

        let mut delivered_again: serde_json::Value =
            serde_json::from_slice(&example_event("shipment.delivered")).unwrap();
        delivered_again["id"] = serde_json::json!("evt_delivered_again");
        let stream = [
            example_event("order.created"),
            example_event("shipment.delivered"),
            example_event("payment.refunded"),
            example_event("return.created"),
            example_event("inventory.low_stock"),
            example_event("payment.failed"),
        ];
        for body in &stream {
            assert_eq!(server.send(body).await.0, 200);
        }
        // The events wait in the store while the large components compile.
        server.wait_loaded().await;
        let failures = server.hooks.load_failures();
        assert!(failures.is_empty(), "{failures:?}");
        let mut handled: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut keys: BTreeMap<String, String> = BTreeMap::new();
        for report in server.reports(stream.len()).await {
            assert_eq!(report.outcome.result, Ok(()), "{report:#?}");
            keys.insert(
                report.plugin.to_string(),
                format!("{}:{}", report.event_key, report.plugin),
            );
            handled
                .entry(report.plugin.to_string())
                .or_default()
                .push(format!(
                    "{}: {}",
                    report.event_type,
                    messages(&report).join(" | ")
                ));
        }
        // A second delivery notice for the same order: kv says it was asked.
        let again = serde_json::to_vec(&delivered_again).unwrap();
        assert_eq!(server.send(&again).await.0, 200);
        let report = server.reports(1).await.remove(0);
        assert_eq!(
            messages(&report),
            ["order ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E: review already requested"]
        );

        let plugin = |name: &str| handled.get(name).cloned().unwrap_or_default();
        assert_eq!(
            plugin("shipment-review"),
            [format!(
                "shipment.delivered: shipment shp_01JQBB4D6F8H0K2M4P6R8T0V2X delivered in 2 days 22 hours \
                 (carrier UPS): ask Maya Chen for a review of order ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E (SS-104821) \
                 | review request for order ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E sent to \
                 http://127.0.0.1:{reviews}/reviews: 201"
            )]
        );
        assert_eq!(
            plugin("return-refund"),
            [format!(
                "return.created: return ret_01JQ3N8P4R6T8V0X2Z4B6D8F0H for order ord_01JPZ4R7T9V1X3Z5B7D9F1H3K5: \
                 refund 749.00 USD for 1 item | refunds due so far: 749.00 USD \
                 | refund for return ret_01JQ3N8P4R6T8V0X2Z4B6D8F0H sent to http://127.0.0.1:{refunds}/refunds: 201"
            )]
        );
        assert_eq!(plugin("orders").len(), 1);
        assert_eq!(plugin("low-stock").len(), 1);
        assert_eq!(plugin("payments").len(), 2, "refunded and failed");

        // What each service got: one request, with the delivery's key.
        let reviewed = reviewed.lock().unwrap().clone();
        assert_eq!(reviewed.len(), 1, "asked once: {reviewed:?}");
        // Keyed by the order: two deliveries about one order are one request.
        assert_eq!(
            reviewed[0].0,
            "shipment-review:ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E"
        );
        assert_eq!(reviewed[0].1["customer"], "Maya Chen");
        let refunded = refunded.lock().unwrap().clone();
        assert_eq!(refunded.len(), 1, "{refunded:?}");
        assert_eq!(refunded[0].0, keys["return-refund"]);
        assert_eq!(refunded[0].1["refund_cents"], 74900);
        // And what each keeps, committed with its delivery.
        let store = server.hooks.store().clone();
        let asked = store.kv_get("shipment-review", "asked/ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E");
        assert!(asked.unwrap().is_some());
        let total = store.kv_get("return-refund", "refunds/USD").unwrap();
        assert_eq!(total.as_deref(), Some(&b"74900"[..]));
        server.stop().await;
    }

    /// `stateset-hooks new` in each language, built with the generated build
    /// script outside this repository, loaded together, fed one event over HTTP.
    #[tokio::test(flavor = "multi_thread")]
    async fn new_projects_in_every_language_build_and_handle_events() {
        let projects = tempfile::tempdir().unwrap();
        let plugins = PluginDir::new();
        // Each project is written, then all three build side by side.
        let dirs: Vec<(String, std::path::PathBuf)> = ["rust", "python", "js"]
            .into_iter()
            .map(|lang| {
                let name = format!("hello-{lang}");
                let dir = projects.path().join(&name);
                let new = Command::new(env!("CARGO_BIN_EXE_stateset-hooks"))
                    .args(["new", &name, "--lang", lang, "--event", "order.*", "--dir"])
                    .arg(&dir)
                    .output()
                    .unwrap();
                assert!(
                    new.status.success(),
                    "{}",
                    String::from_utf8_lossy(&new.stderr)
                );
                (name, dir)
            })
            .collect();
        std::thread::scope(|scope| {
            for (name, dir) in &dirs {
                scope.spawn(move || {
                    // The host binary on PATH, as the build script expects
                    // it to run the project's example case.
                    let bin_dir = std::path::Path::new(BIN).parent().unwrap();
                    let path = std::env::join_paths(
                        std::iter::once(bin_dir.to_owned())
                            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
                    )
                    .unwrap();
                    let build = Command::new(dir.join("build.sh"))
                        // Reuse one target directory across runs for the Rust project.
                        .env(
                            "CARGO_TARGET_DIR",
                            workspace_root().join("target/scaffolded"),
                        )
                        .env("PATH", path)
                        .output()
                        .unwrap();
                    let out = String::from_utf8_lossy(&build.stdout);
                    assert!(
                        build.status.success(),
                        "{name}: {out}{}",
                        String::from_utf8_lossy(&build.stderr)
                    );
                    assert!(
                        out.contains("example.json") && out.contains("1 case: 1 passed"),
                        "{name}: the build ran its case: {out}"
                    );
                });
            }
        });
        for (name, dir) in &dirs {
            for ext in ["wasm", "toml"] {
                let file = format!("{name}.{ext}");
                std::fs::copy(dir.join(&file), plugins.path().join(&file)).unwrap();
            }
        }
        let mut server = TestServer::start(config(&plugins)).await;
        // One worker: had the payment reached anyone, its reports would come first.
        assert_eq!(server.send(&example_event("payment.failed")).await.0, 200);
        assert_eq!(server.send(&example_event("order.created")).await.0, 200);
        server.wait_loaded().await;
        let failures = server.hooks.load_failures();
        assert!(failures.is_empty(), "{failures:?}");
        let mut lines: Vec<String> = server
            .reports(3)
            .await
            .iter()
            .map(|r| messages(r).join(" "))
            .collect();
        lines.sort();
        let order = "order.created for ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E";
        assert_eq!(
            lines,
            [
                format!("hello-js handled {order}"),
                format!("hello-python handled {order}"),
                format!("hello-rust handled {order}"),
            ],
            "each handles its subscribed type only"
        );
        server.stop().await;
    }
}
