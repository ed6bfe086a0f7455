//! Plugin dispatch: a fresh isolated instance plus one `on-event` call, with
//! every limit on, for a do-nothing component and for the `orders` plugin on a
//! realistic order, fuel metering on and off, against the same call on one
//! instance reused from call to call (no isolation: the reference); plus the host's checks on the
//! request path (signature, envelope); and one outbound HTTP call made by a
//! plugin against the same request made directly with reqwest, to the same
//! server on loopback; and a key-value get plus set inside a call.
//!
//! `cargo bench -p stateset-hooks-cli --bench plugin_call`

#[allow(dead_code)] // the benchmarks use a part of it
#[path = "../../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use stateset_hooks::runtime::egress::{AllowedHost, HttpGrant};
use stateset_hooks::runtime::{Limits, Prepared, Runtime};
use stateset_hooks::{Event, Secret};

fn plugin_calls(c: &mut Criterion) {
    let runtime = Runtime::new(None, 1).unwrap();
    // `orders` counts customers in kv: it reads an empty state each call.
    runtime.use_kv(Arc::new(stateset_hooks::runtime::kv::EmptyKv));
    let orders = runtime
        .compile(&std::fs::read(support::wasm("orders")).unwrap())
        .unwrap();
    let nothing = runtime
        .compile(&wat::parse_str(support::NO_IMPORTS_COMPONENT).unwrap())
        .unwrap();
    let body = support::example_event("order.created");
    let event = Event::parse(&body).unwrap();
    let (plugin, key): (Arc<str>, Arc<str>) = ("bench".into(), event.key().into());
    let fuel_on = Limits::default();
    let fuel_off = Limits {
        fuel: None,
        ..Limits::default()
    };

    let mut group = c.benchmark_group("plugin_call");
    for (name, compiled) in [("do-nothing", &nothing), ("orders", &orders)] {
        for (metering, limits) in [("fuel-on", &fuel_on), ("fuel-off", &fuel_off)] {
            let prepared = Prepared::new(plugin.clone(), compiled.clone(), limits.clone());
            group.bench_function(format!("{name}/{metering}"), |b| {
                b.iter(|| {
                    let outcome = runtime
                        .call(&prepared, &key, event.event_type(), event.payload())
                        .unwrap();
                    assert!(outcome.result.is_ok(), "{outcome:?}");
                    black_box(outcome)
                })
            });
        }
        // The reference: the same call on one instance kept from call to
        // call (no isolation), fuel on. Not for the do-nothing component:
        // its allocator only bumps, so one instance runs out of memory.
        if name != "orders" {
            continue;
        }
        let prepared = Prepared::new(plugin.clone(), compiled.clone(), fuel_on.clone());
        let mut reused = runtime.reused_instance(&prepared).unwrap();
        group.bench_function(format!("{name}/reused-instance"), |b| {
            b.iter(|| {
                let result = reused.call(event.event_type(), event.payload()).unwrap();
                assert!(result.is_ok(), "{result:?}");
                black_box(result)
            })
        });
    }
    group.finish();
}

fn request_path(c: &mut Criterion) {
    let body = bytes::Bytes::from(support::example_event("order.created"));
    let secret = Secret::new(support::SECRET).unwrap();
    let signature = secret.sign(&body);
    c.bench_function("signature/verify", |b| {
        b.iter(|| secret.verify(black_box(&body), Some(signature.as_bytes())))
    });
    c.bench_function("event/parse", |b| {
        b.iter(|| Event::parse(black_box(&body)).unwrap())
    });
}

fn outbound(c: &mut Criterion) {
    let server = tokio::runtime::Runtime::new().unwrap();
    let listener = server
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/ok", axum::routing::get(|| async { "hello" }));
    server.spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("http://127.0.0.1:{}/ok", addr.port());

    let runtime = Runtime::new(None, 1).unwrap();
    let fixture = runtime
        .compile(&std::fs::read(support::wasm("misbehave")).unwrap())
        .unwrap();
    let grant = HttpGrant {
        allowed: vec![AllowedHost::parse(&format!("http://127.0.0.1:{}", addr.port())).unwrap()],
        allow_private: true,
        ..HttpGrant::default()
    };
    let call = |data: serde_json::Value| {
        let payload =
            String::from_utf8(support::event("evt_bench", "order.created", data)).unwrap();
        let prepared = Prepared {
            http: Arc::new(grant.clone()),
            kv_quota: 1 << 20,
            ..Prepared::new("fetcher", fixture.clone(), Limits::default())
        };
        (prepared, payload)
    };
    let key: Arc<str> = "evt_bench".into();
    let mut group = c.benchmark_group("outbound");
    // State for the kv case, in a real store.
    let state = tempfile::tempdir().unwrap();
    let kv_db = state.path().join("kv.db");
    let store = stateset_hooks::store::SqliteStore::open(&kv_db, std::time::Duration::from_secs(5));
    runtime.use_kv(Arc::new(store.unwrap()));
    for (name, data) in [
        ("plugin-call-without-fetch", serde_json::json!({})),
        (
            "plugin-call-with-one-fetch",
            serde_json::json!({ "misbehave": "fetch", "url": url }),
        ),
        (
            "plugin-call-with-kv-get-set",
            serde_json::json!({ "misbehave": "kv-get-set" }),
        ),
    ] {
        let (prepared, payload) = call(data);
        group.bench_function(name, |b| {
            b.iter(|| {
                let outcome = runtime
                    .call(&prepared, &key, "order.created", &payload)
                    .unwrap();
                assert_eq!(outcome.result, Ok(()), "{outcome:?}");
                black_box(outcome)
            })
        });
    }
    // Pooled (keep-alive), and a new connection each time as the plugin's
    // request makes: the like-for-like comparison.
    let pooled = reqwest::Client::new();
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for (name, client) in [
        ("direct-reqwest-get", &pooled),
        ("direct-reqwest-get-new-connection", &fresh),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                server.block_on(async {
                    let response = client.get(&url).send().await.unwrap();
                    black_box(response.bytes().await.unwrap())
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, plugin_calls, request_path, outbound);
criterion_main!(benches);
