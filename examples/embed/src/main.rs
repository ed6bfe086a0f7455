//! An existing axum app that mounts the stateset-hooks webhook route beside
//! its own routes.
//!
//! ```text
//! scripts/build-plugins            # puts the sample plugins in target/plugins-dir
//! STATESET_WEBHOOK_SECRET=dev-secret cargo run -p embed -- target/plugins-dir
//! ```
//!
//! Then `GET /` is the app's own route and `POST /webhooks/stateset` is the
//! webhook host, with the same verification, limits and plugins as `serve`.
//! `GET /metrics` is the app's one Prometheus registry: its own counter and
//! the host's `stateset_hooks_*` metrics side by side. The app decides who
//! may read it (here: it listens on loopback only). Ctrl-C shuts the host
//! down gracefully before the app exits.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use stateset_hooks::{Config, Hooks, Secret};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    let secret = std::env::var("STATESET_WEBHOOK_SECRET")
        .map_err(|_| anyhow::anyhow!("set STATESET_WEBHOOK_SECRET"))?;
    let mut config = Config::new(Secret::new(secret)?);
    config.plugins_dir = std::env::args().nth(1).map(Into::into);
    // Loading compiles components: keep it off the async threads.
    let hooks = tokio::task::spawn_blocking(move || Hooks::new(config)).await??;

    // The app's own registry, with the host's metrics registered into it.
    let mut registry = Registry::default();
    let visits = Counter::<u64>::default();
    registry.register(
        "shop_visits",
        "Visits to the shop's own route",
        visits.clone(),
    );
    hooks.metrics().register(&mut registry);
    let registry = Arc::new(registry);

    let app = Router::new()
        .route(
            "/",
            get(move || async move {
                visits.inc();
                "my shop's own API"
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                // The host's gauges read its store: off the async threads.
                let text = tokio::task::spawn_blocking(move || {
                    let mut text = String::new();
                    prometheus_client::encoding::text::encode(&mut text, &registry)
                        .expect("writing to a String cannot fail");
                    text
                })
                .await
                .expect("the encoder does not panic");
                (
                    [(header::CONTENT_TYPE, stateset_hooks::metrics::CONTENT_TYPE)],
                    text,
                )
            }),
        )
        .merge(hooks.router());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            // Webhooks now get 503 + Retry-After; running plugin calls finish
            // (or are cut after the grace period); every outcome is recorded.
            hooks.shutdown().await;
        })
        .await?;
    Ok(())
}
