//! Serving [`Hooks`] on a TCP listener: the webhook route plus `GET /healthz`.
//!
//! Takes a bound listener so tests can use port 0 and the binary can report
//! bind errors before anything else starts.

use std::future::Future;

use axum::routing::get;
use tokio::net::TcpListener;

use crate::hooks::Hooks;

/// The whole app the binary serves.
pub fn app(hooks: &Hooks) -> axum::Router {
    hooks.router().route("/healthz", get(|| async { "ok" }))
}

/// Serve until `shutdown` resolves, then finish in-flight requests and the
/// queued plugin calls.
pub async fn run(
    listener: TcpListener,
    hooks: Hooks,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(&hooks))
        .with_graceful_shutdown(shutdown)
        .await?;
    // `hooks` is now the last handle to the dispatcher: dropping it drains the
    // queue and joins the workers, which blocks, so not on an async thread.
    tokio::task::spawn_blocking(move || drop(hooks))
        .await
        .map_err(std::io::Error::other)
}
