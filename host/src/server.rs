//! Serving [`Hooks`] on TCP listeners: the webhook route plus `GET /healthz`
//! on one, the admin app ([`admin::router`]: metrics, console, API) on
//! another, and what each client connection may take.
//!
//! Takes a bound listener so tests can use port 0 and the binary can report
//! bind errors before anything else starts. Owns the connection rules of
//! [`ConnectionLimits`]: a cap on connections served at once (more wait to be
//! accepted), a header timeout from a request's first byte, and an idle
//! timeout while a connection waits for its next request. The body timeout
//! belongs to the route (`http.rs`), so an app that serves the router itself
//! keeps it. It does not know what a request means.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::admin::{self, Access, AdminFile};
use crate::config::{ConnectionLimits, HEALTH_PATH};
use crate::hooks::Hooks;

/// How long the accept loop rests after `accept` fails (out of file
/// descriptors, say), so it does not spin while the cause lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How often a connection that is running a request checks whether it is
/// waiting again: the idle timeout then counts from at most this late.
const BUSY_RECHECK: Duration = Duration::from_millis(250);

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

/// The admin app's listener and who may use it.
#[derive(Debug)]
pub struct AdminListener {
    pub listener: TcpListener,
    pub access: Access,
}

/// Connections the admin listener serves at once.
const ADMIN_CONNECTIONS: usize = 64;

/// Serve until `shutdown` resolves, then shut down in order: [`Hooks::shutdown`]
/// first (webhooks arriving meanwhile get 503 with `Retry-After`, running
/// plugin calls get the grace period), then the listeners close and the
/// webhook requests still in flight finish. With `admin`, also serves the
/// admin app there, its address and token written beside the database
/// ([`AdminFile`], for the command line) and removed at the end.
pub async fn run(
    listener: TcpListener,
    admin: Option<AdminListener>,
    hooks: Hooks,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let db = hooks.db_path().to_owned();
    let limits = hooks.connection_limits();
    let (closing, closed) = watch::channel(false);
    if let Some(AdminListener { listener, access }) = admin {
        AdminFile::new(listener.local_addr()?, &access).write(&db)?;
        let app = admin::router(&hooks, access);
        tokio::spawn(serve_admin(listener, app, limits, closed.clone()));
    }
    let hooks_for_shutdown = hooks.clone();
    // A connection holds a permit until it ends: at the cap, the loop stops
    // accepting and newcomers wait in the kernel's listen backlog.
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let stopped = async move {
        shutdown.await;
        hooks_for_shutdown.shutdown().await;
    };
    accept(&listener, &app(&hooks), limits, &permits, &closed, stopped).await;
    drop(listener);
    closing.send_replace(true);
    // Every permit back: every connection has finished.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
    AdminFile::remove(&db);
    Ok(())
}

/// The admin app until the server closes, under the same connection rules
/// and a cap of its own: a busy console never takes a webhook's slot.
async fn serve_admin(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    closed: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    let mut watching = closed.clone();
    let stopped = async move {
        let _ = watching.wait_for(|closed| *closed).await;
    };
    accept(&listener, &app, limits, &permits, &closed, stopped).await;
}

/// Accept connections on `listener` and serve `app` on each, one permit
/// each, until `stopped` resolves.
async fn accept(
    listener: &TcpListener,
    app: &axum::Router,
    limits: ConnectionLimits,
    permits: &Arc<Semaphore>,
    closed: &watch::Receiver<bool>,
    stopped: impl Future<Output = ()>,
) {
    let mut stopped = pin!(stopped);
    loop {
        let permit = tokio::select! {
            () = &mut stopped => return,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "could not accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(
            stream,
            app.clone(),
            limits,
            closed.clone(),
            permit,
        ));
    }
}

/// Where a connection stands, for its timeouts.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request's first byte since then (the idle timeout).
    Waiting(Instant),
    /// A request's head has been arriving since then (the header timeout).
    Head(Instant),
    /// This many requests are being handled: the route's timeouts apply.
    Busy(usize),
}

type Shared = Arc<Mutex<Phase>>;

fn lock(phase: &Shared) -> std::sync::MutexGuard<'_, Phase> {
    phase.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve_connection(
    stream: TcpStream,
    app: axum::Router,
    limits: ConnectionLimits,
    mut closing: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    // A new connection owes its first request head within the header
    // timeout: one that never sends a byte cannot hold a slot for the
    // (longer) idle timeout.
    let phase: Shared = Arc::new(Mutex::new(Phase::Head(Instant::now())));
    let io = TokioIo::new(Watched {
        stream,
        phase: phase.clone(),
    });
    let service = service_fn({
        let phase = phase.clone();
        move |request: Request<Incoming>| {
            let busy = Busy::start(&phase);
            let app = app.clone();
            async move {
                let response = app.oneshot(request.map(Body::new)).await;
                drop(busy);
                response
            }
        }
    });
    let mut conn = pin!(http1::Builder::new().serve_connection(io, service));
    let mut graceful = false;
    loop {
        let now = Instant::now();
        let deadline = match *lock(&phase) {
            Phase::Waiting(since) => since + limits.idle_timeout,
            Phase::Head(since) => since + limits.header_timeout,
            Phase::Busy(_) => now + BUSY_RECHECK,
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            _ = closing.wait_for(|closing| *closing), if !graceful => {
                // Nothing being handled: close now rather than wait out a
                // half-sent request's header timeout.
                if !matches!(*lock(&phase), Phase::Busy(_)) {
                    return;
                }
                graceful = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(deadline) => {}
        }
        let expired = match *lock(&phase) {
            Phase::Waiting(since) => since + limits.idle_timeout <= Instant::now(),
            Phase::Head(since) => since + limits.header_timeout <= Instant::now(),
            Phase::Busy(_) => false,
        };
        if expired {
            // No request is being handled: dropping the connection closes it.
            tracing::debug!(phase = ?*lock(&phase), "closing a connection past its timeout");
            return;
        }
    }
}

/// Marks a connection busy while a request is handled; waiting again after.
struct Busy(Shared);

impl Busy {
    fn start(phase: &Shared) -> Self {
        let mut p = lock(phase);
        *p = match *p {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        };
        Self(phase.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut p = lock(&self.0);
        *p = match *p {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Waiting(Instant::now()),
        };
    }
}

/// The client's stream, noting a request's first byte (its head starts).
struct Watched {
    stream: TcpStream,
    phase: Shared,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            let mut phase = lock(&self.phase);
            if let Phase::Waiting(_) = *phase {
                *phase = Phase::Head(Instant::now());
            }
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
