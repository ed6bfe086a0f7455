//! The admin route, `POST /admin/plugins/{name}/release`, and the file that
//! tells the command line where it is and which token it takes.
//!
//! [`server::run`](crate::server::run) draws a random token at start and
//! writes it with the server's address, mode `0600`, beside the database
//! (`<db>.admin`); the route refuses any request without it. So whoever may
//! read the database (and with it replay or edit every delivery) may release
//! a plugin, and nobody else who can reach the port may, whatever address
//! the server listens on or proxies in front of it. It owns that file and
//! that check; what a release does is [`Hooks::release`]'s.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use rand::Rng as _;
use serde_json::json;
use subtle::ConstantTimeEq as _;

use crate::hooks::Hooks;

/// The release route; `{name}` is the plugin's name.
pub const RELEASE_ROUTE: &str = "/admin/plugins/{name}/release";

/// Random bytes in a token: as many as an HMAC-SHA256 key, past guessing.
const TOKEN_BYTES: usize = 32;

/// Where a running server can be reached for admin requests, and how.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AdminFile {
    /// `http://ip:port` of the server.
    pub url: String,
    /// The bearer token the admin routes require.
    pub token: String,
}

impl AdminFile {
    /// A fresh token for a server listening on `addr` (an unspecified
    /// address is reached on loopback).
    pub fn new(addr: SocketAddr) -> Self {
        let mut addr = addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Self {
            url: format!("http://{addr}"),
            token: hex::encode(rand::rng().random::<[u8; TOKEN_BYTES]>()),
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

/// The admin routes, answering only `Authorization: Bearer <token>`.
pub(crate) fn router(hooks: &Hooks, token: &str) -> axum::Router {
    let state = (hooks.clone(), Arc::<str>::from(token));
    axum::Router::new()
        .route(RELEASE_ROUTE, post(release))
        .with_state(state)
}

async fn release(
    State((hooks, token)): State<(Hooks, Arc<str>)>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> (StatusCode, Json<serde_json::Value>) {
    let offered = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if !bool::from(offered.ct_eq(token.as_bytes())) {
        tracing::warn!("admin request refused: missing or wrong token");
        let error = json!({ "error": "missing or wrong admin token" });
        return (StatusCode::UNAUTHORIZED, Json(error));
    }
    if hooks.release(&name) {
        (StatusCode::OK, Json(json!({ "released": name })))
    } else {
        let error = json!({ "error": format!("no plugin named {name:?} is loaded") });
        (StatusCode::NOT_FOUND, Json(error))
    }
}
