//! Serving [`Hooks`] on a TCP listener: the webhook route plus `GET /healthz`.
//!
//! Takes a bound listener so tests can use port 0 and the binary can report
//! bind errors before anything else starts.

use std::future::Future;

use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::config::HEALTH_PATH;
use crate::hooks::Hooks;

/// The whole app the binary serves.
pub fn app(hooks: &Hooks) -> axum::Router {
    let probe = hooks.clone();
    hooks
        .router()
        .route(HEALTH_PATH, get(move || health(probe.clone())))
}

/// 200 `ok`, or 503 naming the essential threads that are gone: without
/// them events are still stored but no longer delivered.
async fn health(hooks: Hooks) -> (StatusCode, String) {
    let gone = hooks.threads_gone();
    if gone.is_empty() {
        (StatusCode::OK, "ok".into())
    } else {
        let gone = gone.join(", ");
        tracing::error!(threads = gone, "health check failed: threads gone");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("threads gone: {gone}"),
        )
    }
}

/// Serve until `shutdown` resolves, then shut down in order: [`Hooks::shutdown`]
/// first (webhooks arriving meanwhile get 503 with `Retry-After`, running
/// plugin calls get the grace period), then the listener closes and the
/// requests still in flight finish.
pub async fn run(
    listener: TcpListener,
    hooks: Hooks,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app(&hooks);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            hooks.shutdown().await;
        })
        .await
}
