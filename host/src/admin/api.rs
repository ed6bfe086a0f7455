//! The JSON API the console uses, and anyone with the admin token may:
//! events, dead letters and plugins, read and replayed or released. It only
//! reads and replays through the [`Store`](crate::store::Store) and
//! [`Hooks`], as the command line does; the access check is the caller's
//! (`admin/mod.rs`).
//!
//! - `GET /api/events?type=&status=&plugin=&q=&since=&until=&before=&limit=`:
//!   newest first, each event with its deliveries; `next` pages on.
//! - `GET /api/events/{key}`: the body and every delivery.
//! - `POST /api/events/{key}/replay` `{"plugin": "name"}` (or `{}` for all).
//! - `GET /api/dlq?plugin=&limit=`, `POST /api/dlq/replay` `{"ids": [..]}`
//!   (or `{"all": true}`).
//! - `GET /api/plugins`, `POST /api/plugins/{name}/release`.
//! - `GET /api/plugins/{name}/shadow?limit=`: the candidate shadowing it
//!   (`NAME.shadow.wasm`) and its recorded runs beside the live calls,
//!   newest first, with how their outcomes compare.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::hooks::Hooks;
use crate::store::{DeliveryId, DeliveryRecord, Filter, Status, StoreError};

/// Rows per page unless asked.
const PAGE: usize = 50;
/// The most rows a page holds.
const MAX_PAGE: usize = 500;

pub(super) fn router(hooks: &Hooks) -> axum::Router {
    axum::Router::new()
        .route("/api/events", get(events))
        .route("/api/events/{key}", get(event))
        .route("/api/events/{key}/replay", post(replay_event))
        .route("/api/dlq", get(dlq))
        .route("/api/dlq/replay", post(replay_dead))
        .route("/api/plugins", get(plugins))
        .route("/api/plugins/{name}/shadow", get(shadow))
        .route(super::RELEASE_ROUTE, post(release))
        .with_state(hooks.clone())
}

/// A refusal as JSON: `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        Self(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type Answer = Result<Json<Value>, ApiError>;

/// Run a blocking store call off the async threads.
async fn blocking<T: Send + 'static>(
    hooks: &Hooks,
    work: impl FnOnce(&Hooks) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let hooks = hooks.clone();
    tokio::task::spawn_blocking(move || work(&hooks))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

#[derive(Debug, Deserialize, Default)]
struct EventsQuery {
    #[serde(rename = "type")]
    event_type: Option<String>,
    status: Option<String>,
    plugin: Option<String>,
    /// An event id.
    q: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    before: Option<DeliveryId>,
    limit: Option<usize>,
}

fn filled(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

fn status(value: Option<String>) -> Result<Option<Status>, ApiError> {
    filled(value)
        .map(|s| {
            Status::parse(&s).ok_or_else(|| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("unknown status {s:?}: pending, succeeded, failed or dead"),
                )
            })
        })
        .transpose()
}

/// The events a page of matching deliveries names, newest first, each with
/// all its deliveries, and the cursor for the next page (none when this one
/// is the last). A full page leaves out its last event, which may go on
/// past it: the next page starts there, so no event is cut in two.
fn page(hooks: &Hooks, rows: Vec<DeliveryRecord>, limit: usize) -> Result<Value, StoreError> {
    let mut keys: Vec<&str> = Vec::new();
    for row in &rows {
        if !keys.contains(&row.event_key.as_str()) {
            keys.push(&row.event_key);
        }
    }
    let full = rows.len() == limit;
    if full && keys.len() > 1 {
        keys.pop();
    }
    let next = full
        .then(|| {
            rows.iter()
                .filter(|d| keys.contains(&d.event_key.as_str()))
                .map(|d| d.id)
                .min()
        })
        .flatten();
    let mut events = Vec::with_capacity(keys.len());
    for key in keys {
        // Gone meanwhile (purged): left out.
        if let Some(event) = hooks.store().event(key)? {
            events.push(json!({
                "key": event.key,
                "event_type": event.event_type,
                "received_at": event.received_at,
                "deliveries": event.deliveries,
            }));
        }
    }
    Ok(json!({ "events": events, "next": next }))
}

async fn events(State(hooks): State<Hooks>, Query(q): Query<EventsQuery>) -> Answer {
    let limit = q.limit.unwrap_or(PAGE).clamp(1, MAX_PAGE);
    let filter = Filter {
        status: status(q.status)?,
        plugin: filled(q.plugin),
        event_type: filled(q.event_type),
        event_key: filled(q.q).map(|k| k.trim().to_owned()),
        since: q.since,
        until: q.until,
        before_id: q.before,
        limit: Some(limit),
    };
    let page = blocking(&hooks, move |h| {
        let rows = h.store().deliveries(&filter)?;
        page(h, rows, limit)
    })
    .await?;
    Ok(Json(page))
}

async fn event(State(hooks): State<Hooks>, Path(key): Path<String>) -> Answer {
    let wanted = key.clone();
    let Some(event) = blocking(&hooks, move |h| h.store().event(&wanted)).await? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no event {key:?} is stored"),
        ));
    };
    let mut answer = json!(event);
    // Pretty-printed for reading; the stored body stays as it was signed.
    answer["pretty"] = serde_json::from_str::<Value>(&event.body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .into();
    Ok(Json(answer))
}

#[derive(Debug, Deserialize, Default)]
struct ReplayEvent {
    plugin: Option<String>,
}

async fn replay_event(
    State(hooks): State<Hooks>,
    Path(key): Path<String>,
    body: Option<Json<ReplayEvent>>,
) -> Answer {
    let plugin = body.and_then(|Json(b)| filled(b.plugin));
    let (wanted, named) = (key.clone(), plugin.clone());
    let n = blocking(&hooks, move |h| {
        h.store().replay_event(&wanted, named.as_deref())
    })
    .await?;
    if n == 0 {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("nothing to replay for {key:?}"),
        ));
    }
    tracing::info!(
        event = key,
        plugin = plugin.as_deref().unwrap_or("*"),
        deliveries = n,
        "replayed from the console"
    );
    Ok(Json(json!({ "replayed": n })))
}

#[derive(Debug, Deserialize, Default)]
struct DlqQuery {
    plugin: Option<String>,
    limit: Option<usize>,
}

async fn dlq(State(hooks): State<Hooks>, Query(q): Query<DlqQuery>) -> Answer {
    let filter = Filter {
        status: Some(Status::Dead),
        plugin: filled(q.plugin),
        limit: Some(q.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE)),
        ..Filter::default()
    };
    let rows = blocking(&hooks, move |h| h.store().deliveries(&filter)).await?;
    Ok(Json(json!({ "deliveries": rows })))
}

#[derive(Debug, Deserialize, Default)]
struct ReplayDead {
    ids: Option<Vec<DeliveryId>>,
    #[serde(default)]
    all: bool,
}

async fn replay_dead(State(hooks): State<Hooks>, Json(body): Json<ReplayDead>) -> Answer {
    let ids = match (body.ids, body.all) {
        (Some(ids), false) if !ids.is_empty() => Some(ids),
        (None, true) => None,
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "name the delivery ids to replay (\"ids\"), or send \"all\": true".into(),
            ));
        }
    };
    let n = blocking(&hooks, move |h| h.store().replay_dead(ids.as_deref())).await?;
    tracing::info!(deliveries = n, "dead deliveries replayed from the console");
    Ok(Json(json!({ "replayed": n })))
}

async fn plugins(State(hooks): State<Hooks>) -> Answer {
    Ok(Json(json!({
        "plugins": hooks.status(),
        "failed_to_load": hooks.load_failures().iter().map(|f| json!({
            "file": f.path.display().to_string(),
            "reason": f.reason,
        })).collect::<Vec<_>>(),
    })))
}

#[derive(Debug, Deserialize, Default)]
struct ShadowQuery {
    limit: Option<usize>,
}

async fn shadow(
    State(hooks): State<Hooks>,
    Path(name): Path<String>,
    Query(q): Query<ShadowQuery>,
) -> Answer {
    let limit = q.limit.unwrap_or(PAGE).clamp(1, MAX_PAGE);
    let plugin = name.clone();
    let runs = blocking(&hooks, move |h| h.store().shadow_runs(&plugin, limit)).await?;
    let count = |live_ok: bool, candidate_ok: bool| {
        runs.iter()
            .filter(|r| {
                r.differs()
                    && r.live_error.is_none() == live_ok
                    && r.candidate_error.is_none() == candidate_ok
            })
            .count()
    };
    let status = hooks.status().into_iter().find(|p| p.name == name);
    Ok(Json(json!({
        "plugin": name,
        "shadow": status.and_then(|p| p.shadow),
        "compared": {
            "runs": runs.len(),
            "same": runs.iter().filter(|r| !r.differs()).count(),
            "succeeded_to_failed": count(true, false),
            "failed_to_succeeded": count(false, true),
            "error_changed": count(false, false),
        },
        "runs": runs,
    })))
}

async fn release(State(hooks): State<Hooks>, Path(name): Path<String>) -> Answer {
    if hooks.release(&name) {
        Ok(Json(json!({ "released": name })))
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no plugin named {name:?} is loaded"),
        ))
    }
}
