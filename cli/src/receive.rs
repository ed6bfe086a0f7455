//! `stateset-hooks receive`: a stand-in for the services plugins call (a
//! warehouse's purchase API, a fraud-review queue), to try plugins that act
//! on one machine. It prints each request (method, path, `Idempotency-Key`
//! and body) on one line and answers `201 {"received":true}`. `scripts/demo`
//! runs it beside the host.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use stateset_hooks::text::escape_controls;

/// Serve on `listen` until interrupted.
pub fn receive(listen: SocketAddr) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        println!("receiving on http://{}", listener.local_addr()?);
        let app = axum::Router::new().fallback(print_request);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn print_request(
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let key = headers.get("idempotency-key").map_or("none".into(), |v| {
        String::from_utf8_lossy(v.as_bytes()).into_owned()
    });
    let body = String::from_utf8_lossy(&body);
    println!(
        "{method} {} idempotency-key={} {}",
        escape_controls(&uri.to_string()),
        escape_controls(&key),
        escape_controls(&body)
    );
    (StatusCode::CREATED, r#"{"received":true}"#)
}
