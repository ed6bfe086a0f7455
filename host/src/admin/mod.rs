//! The admin listener's app: `GET /metrics`, the console (`GET /`) and the
//! JSON API it uses (`/api/...`, in `api.rs`), behind one access check; and
//! the file that tells the command line where it is and which token it takes.
//!
//! Every route but the console's static files needs `Authorization: Bearer
//! <token>`, compared in constant time: the operator's `--admin-token`, or
//! one drawn at start. Either is written with the listener's address, mode
//! `0600`, beside the database (`<db>.admin`), so whoever may read the
//! database (and with it replay or edit every delivery) may use the
//! console, and nobody else who can reach the port may. A token in a header,
//! never a cookie, is what keeps other sites' pages from acting for a
//! logged-in browser. [`Access::Open`] (no token) is for development on
//! loopback only: it answers only requests whose `Host` is loopback (no DNS
//! rebinding) and state changes only as JSON with no foreign `Origin`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use rand::Rng as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::hooks::Hooks;
use crate::metrics::CONTENT_TYPE;

mod api;
mod console;

/// The release route; `{name}` is the plugin's name.
pub const RELEASE_ROUTE: &str = "/api/plugins/{name}/release";

/// Shortest `--admin-token` taken: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// Random bytes in a token: as many as an HMAC-SHA256 key, past guessing.
const TOKEN_BYTES: usize = 32;

/// Where a running server can be reached for admin requests, and how. Its
/// `Debug` leaves the token out.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct AdminFile {
    /// `http://ip:port` of the server.
    pub url: String,
    /// The bearer token the admin routes require (empty: none).
    pub token: String,
}

impl std::fmt::Debug for AdminFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminFile")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Who may use the admin listener.
#[derive(Clone)]
pub enum Access {
    /// Requests bearing this token.
    Token(Arc<str>),
    /// Anyone who reaches it from loopback (`--admin-dev`).
    Open,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Token(_) => "Token(..)",
            Self::Open => "Open",
        })
    }
}

impl Access {
    /// A random token, as many bytes as an HMAC-SHA256 key: past guessing.
    pub fn random() -> Self {
        Self::Token(hex::encode(rand::rng().random::<[u8; TOKEN_BYTES]>()).into())
    }

    /// The operator's token; one shorter than [`MIN_TOKEN_LEN`] is refused.
    pub fn token(token: &str) -> Result<Self, String> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the admin token must be at least {MIN_TOKEN_LEN} characters"
            ));
        }
        Ok(Self::Token(token.into()))
    }

    /// Whether a request with these headers may go on, and if not why.
    fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), &'static str> {
        match self {
            Self::Token(token) => {
                let offered = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| bearer(v.as_bytes()))
                    .unwrap_or_default();
                // Hashes compared, so not even the token's length shows in
                // the time a refusal takes.
                let (offered, token) = (Sha256::digest(offered), Sha256::digest(token.as_bytes()));
                if bool::from(offered.as_slice().ct_eq(token.as_slice())) {
                    Ok(())
                } else {
                    Err("missing or wrong admin token")
                }
            }
            Self::Open => {
                if !headers.get(header::HOST).is_some_and(is_loopback_host) {
                    return Err("without a token, only a loopback Host is answered");
                }
                let host = headers.get(header::HOST).map(|h| h.as_bytes());
                let foreign = headers
                    .get(header::ORIGIN)
                    .is_some_and(|o| o.as_bytes().strip_prefix(b"http://") != host);
                let json = headers
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
                if *method != Method::GET && (foreign || !json) {
                    return Err("a change must come as JSON from this console's own origin");
                }
                Ok(())
            }
        }
    }
}

fn is_loopback_host(host: &header::HeaderValue) -> bool {
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    matches!(name, "localhost" | "[::1]")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The credentials of `Bearer <token>` (the scheme in any case).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

impl AdminFile {
    /// The admin listener at `addr` (an unspecified address is reached on
    /// loopback) and the token it takes (empty when [`Access::Open`]).
    pub fn new(addr: SocketAddr, access: &Access) -> Self {
        let mut addr = addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let token = match access {
            Access::Token(token) => token.to_string(),
            Access::Open => String::new(),
        };
        Self {
            url: format!("http://{addr}"),
            token,
        }
    }

    /// The file beside database `db`.
    pub fn path(db: &Path) -> PathBuf {
        let mut path = db.as_os_str().to_owned();
        path.push(".admin");
        path.into()
    }

    /// Write it beside `db`, readable by the owner only.
    pub fn write(&self, db: &Path) -> std::io::Result<()> {
        let path = Self::path(db);
        // Replaced, not rewritten: an old file may have looser permissions.
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(&serde_json::to_vec(self).expect("admin file serializes"))
    }

    /// The file a running server wrote beside `db`.
    pub fn read(db: &Path) -> anyhow::Result<Self> {
        let path = Self::path(db);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read {}: {e} (is `serve` running with this --db?)",
                path.display()
            )
        })?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Remove the file beside `db`, at shutdown.
    pub fn remove(db: &Path) {
        let _ = std::fs::remove_file(Self::path(db));
    }
}

/// The admin listener's whole app: the console's files for anyone, every
/// other route (the API, `/metrics`) behind `access`.
pub fn router(hooks: &Hooks, access: Access) -> axum::Router {
    let guarded = api::router(hooks)
        .route(
            "/metrics",
            axum::routing::get({
                let hooks = hooks.clone();
                // A scrape reads the store: off the async threads.
                move || async move {
                    let metrics = hooks.metrics().clone();
                    match tokio::task::spawn_blocking(move || metrics.encode()).await {
                        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
                        Err(error) => {
                            let error = json!({ "error": error.to_string() });
                            (StatusCode::INTERNAL_SERVER_ERROR, Json(error)).into_response()
                        }
                    }
                }
            }),
        )
        .layer(middleware::from_fn_with_state(access, guard));
    console::router().merge(guarded)
}

async fn guard(State(access): State<Access>, request: Request, next: Next) -> Response {
    match access.check(request.method(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(why) => {
            tracing::warn!(path = %request.uri().path(), "admin request refused: {why}");
            let status = match access {
                Access::Token(_) => StatusCode::UNAUTHORIZED,
                Access::Open => StatusCode::FORBIDDEN,
            };
            (status, Json(json!({ "error": why }))).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (name.clone(), value.parse().unwrap()))
            .collect()
    }

    #[test]
    fn a_token_is_checked_whole_and_a_short_one_refused() {
        let access = Access::token("sixteen-chars-ok").unwrap();
        let bearer = |t: &str| headers(&[(header::AUTHORIZATION, &format!("Bearer {t}"))]);
        assert!(
            access
                .check(&Method::GET, &bearer("sixteen-chars-ok"))
                .is_ok()
        );
        for wrong in ["sixteen-chars-o", "sixteen-chars-ok!", ""] {
            assert!(
                access.check(&Method::GET, &bearer(wrong)).is_err(),
                "{wrong:?}"
            );
        }
        assert!(access.check(&Method::GET, &HeaderMap::new()).is_err());
        let lower = headers(&[(header::AUTHORIZATION, "bearer sixteen-chars-ok")]);
        assert!(
            access.check(&Method::GET, &lower).is_ok(),
            "the scheme in any case"
        );
        assert!(Access::token("fifteen-chars-x").is_err());
    }

    /// Without a token: loopback Host names only (a DNS name rebound to
    /// 127.0.0.1 is refused), and changes only as JSON from this origin.
    #[test]
    fn the_open_console_answers_loopback_only_and_no_other_site() {
        let open = Access::Open;
        let host = |h: &str| (header::HOST, h.to_owned());
        for allowed in [
            "127.0.0.1:3001",
            "localhost:3001",
            "[::1]:3001",
            "localhost",
        ] {
            let h = headers(&[(header::HOST, allowed)]);
            assert!(open.check(&Method::GET, &h).is_ok(), "{allowed}");
        }
        for refused in [
            "evil.example:3001",
            "127.0.0.1.evil.example",
            "10.0.0.1:3001",
        ] {
            let h = headers(&[(header::HOST, refused)]);
            assert!(open.check(&Method::GET, &h).is_err(), "{refused}");
        }
        let (name, value) = host("127.0.0.1:3001");
        let json = (header::CONTENT_TYPE, "application/json");
        let post = |extra: &[(header::HeaderName, &str)]| {
            let mut all = vec![(name.clone(), value.as_str())];
            all.extend_from_slice(extra);
            open.check(&Method::POST, &headers(&all))
        };
        assert!(post(std::slice::from_ref(&json)).is_ok());
        assert!(post(&[json.clone(), (header::ORIGIN, "http://127.0.0.1:3001")]).is_ok());
        let other_port = (header::ORIGIN, "http://127.0.0.1:8080");
        assert!(
            post(&[json.clone(), other_port]).is_err(),
            "another local app"
        );
        assert!(post(&[]).is_err(), "a form post");
        assert!(post(&[(header::CONTENT_TYPE, "text/plain")]).is_err());
        assert!(post(&[json, (header::ORIGIN, "https://evil.example")]).is_err());
    }
}
