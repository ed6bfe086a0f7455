//! stateset-hooks: receive StateSet webhooks once, correctly, and run each
//! event through sandboxed WebAssembly plugins.
//!
//! A request is verified ([`signature`]), parsed ([`event`]), stored and
//! acknowledged, and handed to the [`dispatch`]er, which calls every
//! subscribed plugin from the [`registry`] in a fresh, limited instance
//! ([`runtime`]).
//!
//! Embed it in an axum app:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use stateset_hooks::{Config, Hooks, Secret};
//!
//! let mut config = Config::new(Secret::new("my-webhook-secret")?);
//! config.plugins_dir = Some("plugins".into());
//! let hooks = Hooks::new(config)?;
//! let app = axum::Router::new().merge(hooks.router());
//! # let _ = app; Ok(()) }
//! ```
//!
//! # Layout
//!
//! From the leaves up; every import points down this list.
//!
//! - [`text`]: control characters in outside text escaped for logs and terminals.
//! - `contain`: a panic in one unit of a long-lived thread's work, caught.
//! - [`signature`]: HMAC-SHA256 of the raw body, constant-time; pure.
//! - [`event`]: the envelope (`id`, `type`, `data`), known types, idempotency key.
//! - [`runtime`]: wasmtime engine, WIT bindings, limits, capabilities, failures.
//! - [`status`]: plugin states, counters and the `plugins list` table, as types.
//! - [`store`]: durable events and deliveries (SQLite, or PostgreSQL for several hosts), behind the `Store` trait.
//! - [`manifest`]: a plugin's optional `NAME.toml` (subscriptions, limits, config).
//! - [`plugin_file`]: reading the untrusted plugin directory: regular files, size caps.
//! - [`health`]: per-plugin counters and quarantine.
//! - [`registry`]: the plugins by name: serving, loading, failed; the subscription filter.
//! - [`loader`]: the one loader thread and its queue; reading and compiling plugin files.
//! - [`watch`]: the plugin directory watcher, which feeds the loader.
//! - [`retry`]: which failures retry, and when.
//! - [`dispatch`]: acceptance, the worker queue and workers, outcomes back to the store.
//! - [`housekeeping`]: the status snapshot and retention purge loops.
//! - `http`: the webhook route and its status codes.
//! - [`config`]: [`Config`], its defaults and its validation.
//! - [`hooks`]: [`Hooks`], the composition root an app holds.
//! - [`admin`]: the token-protected release route and the file naming it.
//! - [`server`]: serve [`Hooks`] on a listener, with `/healthz`, connection cap and timeouts.

pub mod admin;
pub mod config;
mod contain;
pub mod dispatch;
pub mod event;
pub mod health;
pub mod hooks;
pub mod housekeeping;
mod http;
pub mod loader;
pub mod manifest;
pub mod metrics;
pub mod plugin_file;
pub mod registry;
pub mod retry;
pub mod runtime;
pub mod server;
pub mod signature;
pub mod standard;
pub mod status;
pub mod store;
pub mod text;
pub mod trace;
pub mod watch;

pub use config::{Config, ConfigError};
pub use dispatch::Report;
pub use event::Event;
pub use hooks::Hooks;
pub use http::ApiError;
pub use signature::{Secret, Secrets};
