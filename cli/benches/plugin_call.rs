//! Plugin dispatch: a fresh isolated instance plus one `on-event` call, with
//! every limit on, for a do-nothing component and for the `orders` plugin on a
//! realistic order, fuel metering on and off; plus the host's checks on the
//! request path (signature, envelope).
//!
//! `cargo bench -p stateset-hooks-cli --bench plugin_call`

#[allow(dead_code)] // the benchmarks use a part of it
#[path = "../../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use stateset_hooks::runtime::{Limits, Prepared, Runtime};
use stateset_hooks::{Event, Secret};

fn plugin_calls(c: &mut Criterion) {
    let runtime = Runtime::new(None, 1).unwrap();
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
            let prepared = Prepared {
                name: plugin.clone(),
                compiled: compiled.clone(),
                limits: limits.clone(),
                config: Default::default(),
                http: Default::default(),
            };
            group.bench_function(format!("{name}/{metering}"), |b| {
                b.iter(|| {
                    let outcome = runtime
                        .call(&prepared, &key, event.event_type(), event.payload())
                        .unwrap();
                    assert!(outcome.result.is_ok());
                    black_box(outcome)
                })
            });
        }
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

criterion_group!(benches, plugin_calls, request_path);
criterion_main!(benches);
