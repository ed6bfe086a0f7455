//! The HTTP surface: the webhook route and its status codes.
//!
//! Owns the order of checks on a request (signature header, size, signature,
//! envelope, hand-off) and the one error type that turns each refusal into a
//! status, a short JSON body and a log line naming the cause. It knows axum,
//! not wasmtime: accepted events go to the [`Dispatcher`]. Its state is its
//! own [`Endpoint`], built by the composition root (`hooks.rs`).

use std::sync::{Arc, RwLock};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;

use crate::dispatch::{Accepted, Dispatcher};
use crate::event::{Event, EventError};
use crate::metrics::{Metrics, Received};
use crate::signature::{SIGNATURE_HEADER, Secrets, SignatureError, decode_header};
use crate::standard::{self, StandardError};
use crate::trace::{TRACEPARENT, TraceParent};
use tracing::Instrument as _;

/// Seconds a sender is asked to wait when the host cannot take an event now.
const RETRY_AFTER_SECS: u64 = 5;

/// What the webhook route needs: how to check a request, and where accepted
/// events go.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Shared with [`crate::Hooks::set_secrets`], which replaces them.
    pub secrets: Arc<RwLock<Arc<Secrets>>>,
    pub body_limit: usize,
    pub body_timeout: std::time::Duration,
    pub dispatcher: Arc<Dispatcher>,
    pub metrics: Metrics,
    /// The Standard Webhooks route's secrets (replaced by
    /// [`crate::Hooks::set_standard_secrets`]) and timestamp tolerance.
    pub standard: Option<(Arc<RwLock<Arc<Secrets>>>, std::time::Duration)>,
    /// Whatever must live as long as the route does (the host behind it):
    /// an app may drop its handle and keep only the router.
    pub _keep_alive: Arc<dyn std::any::Any + Send + Sync>,
}

/// The webhook route alone on `path` (and the Standard Webhooks route on
/// `standard`, if given), for mounting in any axum app.
pub(crate) fn router(path: &str, standard: Option<&str>, endpoint: Arc<Endpoint>) -> axum::Router {
    let mut router = axum::Router::new().route(path, post(receive).fallback(method_not_allowed));
    if let Some(standard) = standard {
        router = router.route(
            standard,
            post(receive_standard).fallback(method_not_allowed),
        );
    }
    router.with_state(endpoint)
}

async fn receive(
    State(endpoint): State<Arc<Endpoint>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let received = check_and_accept(&endpoint, &headers, body).await;
    answer(&endpoint, received)
}

async fn receive_standard(
    State(endpoint): State<Arc<Endpoint>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let received = check_standard_and_accept(&endpoint, &headers, body).await;
    answer(&endpoint, received)
}

/// The sender's answer, counted.
fn answer(
    endpoint: &Endpoint,
    received: Result<Accepted, ApiError>,
) -> Result<Json<serde_json::Value>, ApiError> {
    endpoint.metrics.received(match &received {
        Ok(Accepted::New(_)) => Received::Accepted,
        Ok(Accepted::Duplicate) => Received::Duplicate,
        Err(error) => error.metric(),
    });
    Ok(match received? {
        Accepted::New(_) => Json(json!({ "received": true })),
        Accepted::Duplicate => Json(json!({ "received": true, "duplicate": true })),
    })
}

/// The route's checks in order, then the hand-off.
async fn check_and_accept(
    endpoint: &Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, ApiError> {
    let signature = headers.get(SIGNATURE_HEADER).map(|v| v.as_bytes());
    // Refuse what cannot verify before reading a byte of the body.
    decode_header(signature)?;
    let body = read_body(endpoint, headers, body).await?;
    let secrets = endpoint.secrets.read().expect("secrets lock").clone();
    let matched = secrets.verify(&body, signature)?.fingerprint();
    accept_verified(endpoint, headers, &body, &matched, None).await
}

/// The Standard Webhooks route's checks: the headers and the timestamp
/// before the body is read, then the signatures; `webhook-id` is the
/// idempotency key.
async fn check_standard_and_accept(
    endpoint: &Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, ApiError> {
    let (secrets, tolerance) = endpoint
        .standard
        .as_ref()
        .expect("routed only when configured");
    let header = |name: &str| {
        let svix = standard::SVIX_HEADERS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s);
        headers
            .get(name)
            .or_else(|| headers.get(svix?))
            .map(|v: &header::HeaderValue| v.as_bytes())
    };
    let message = standard::Headers {
        id: header(standard::ID_HEADER),
        timestamp: header(standard::TIMESTAMP_HEADER),
        signature: header(standard::SIGNATURE_HEADER),
    };
    let now = crate::store::now_ms() / 1000;
    let envelope = standard::Envelope::check(message, now, *tolerance)?;
    let body = read_body(endpoint, headers, body).await?;
    let secrets = secrets.read().expect("secrets lock").clone();
    let matched = envelope.verify(&secrets, &body)?.fingerprint();
    let key = standard::key(&envelope.id);
    accept_verified(endpoint, headers, &body, &matched, Some(key)).await
}

/// The body, within the size limit and the body timeout.
async fn read_body(
    endpoint: &Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<bytes::Bytes, ApiError> {
    let limit = endpoint.body_limit;
    if content_length(headers).is_some_and(|len| len > limit as u64) {
        return Err(ApiError::TooLarge { limit });
    }
    // A client that trickles its body holds a connection and a task: it
    // gets the body timeout, counted from the end of the headers.
    let timeout = endpoint.body_timeout;
    tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::BodyTimeout { timeout })?
        .map_err(|error| ApiError::from_body_error(error, limit))
}

/// A body whose signature verified (with secret `matched`): in the
/// `webhook` span, joined to the sender's trace.
async fn accept_verified(
    endpoint: &Endpoint,
    headers: &HeaderMap,
    body: &[u8],
    matched: &str,
    key: Option<String>,
) -> Result<Accepted, ApiError> {
    // Only a verified request joins the sender's trace (an unsigned one
    // cannot put spans in any trace it names, or turn sampling off).
    let span = tracing::info_span!(
        "webhook",
        event = tracing::field::Empty,
        event_type = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let trace = TraceParent::for_request(headers.get(TRACEPARENT).map(|v| v.as_bytes()), &span);
    span.record("trace_id", trace.trace_id_hex());
    accept(endpoint, body, trace, matched, key)
        .instrument(span)
        .await
}

/// A verified body: parsed, stored, handed to the plugins, in the
/// `webhook` span.
async fn accept(
    endpoint: &Endpoint,
    body: &[u8],
    trace: TraceParent,
    secret: &str,
    key: Option<String>,
) -> Result<Accepted, ApiError> {
    let mut event = Event::parse(body)?.with_trace(Some(trace));
    if let Some(key) = key {
        event = event.with_key(key);
    }
    let span = tracing::Span::current();
    span.record("event", event.key());
    span.record("event_type", event.event_type());
    if !event.is_known_type() {
        tracing::info!(
            event = event.key(),
            event_type = event.event_type(),
            "event of a type the webhook document does not list"
        );
    }
    let (key, event_type) = (event.key().to_owned(), event.event_type().to_owned());
    let accepted = endpoint
        .dispatcher
        .accept(event)
        .await
        .map_err(|error| ApiError::Unavailable(error.to_string()))?;
    match accepted {
        Accepted::New(deliveries) => {
            tracing::info!(
                event = key,
                event_type,
                deliveries,
                secret,
                "event received"
            );
        }
        Accepted::Duplicate => tracing::info!(
            event = key,
            event_type,
            "duplicate event: already stored, not dispatched again"
        ),
    }
    Ok(accepted)
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Every way a webhook request is refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Standard(#[from] StandardError),
    #[error("body larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the body did not arrive within {timeout:?}")]
    BodyTimeout { timeout: std::time::Duration },
    #[error("only POST is allowed here")]
    MethodNotAllowed,
    #[error("temporarily unable to accept events: {0}")]
    Unavailable(String),
}

impl ApiError {
    fn from_body_error(error: axum::Error, limit: usize) -> Self {
        // `to_bytes` wraps the limit error; find it anywhere in the chain.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
        while let Some(e) = source {
            if e.is::<http_body_util::LengthLimitError>() {
                return Self::TooLarge { limit };
            }
            source = e.source();
        }
        Self::BodyRead(error.to_string())
    }

    /// How `webhooks_received_total` counts this refusal.
    fn metric(&self) -> Received {
        match self {
            Self::Signature(_) => Received::BadSignature,
            Self::Standard(StandardError::TooOld { .. } | StandardError::TooNew { .. }) => {
                Received::StaleTimestamp
            }
            Self::Standard(_) => Received::BadSignature,
            Self::Event(_) => Received::BadJson,
            Self::TooLarge { .. } => Received::TooLarge,
            Self::BodyTimeout { .. } => Received::BodyTimeout,
            Self::BodyRead(_) | Self::MethodNotAllowed => Received::BadRequest,
            Self::Unavailable(_) => Received::Refused,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Signature(_) | Self::Standard(_) => StatusCode::UNAUTHORIZED,
            Self::Event(_) | Self::BodyRead(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // The messages name causes, never header or secret values.
        tracing::warn!(status = status.as_u16(), cause = %self, "webhook refused");
        let body = Json(json!({ "error": self.to_string() }));
        match self {
            Self::MethodNotAllowed => (status, [(header::ALLOW, "POST")], body).into_response(),
            Self::Unavailable(_) => (
                status,
                [(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
                body,
            )
                .into_response(),
            _ => (status, body).into_response(),
        }
    }
}
