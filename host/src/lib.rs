//! stateset-hooks: receive StateSet webhooks once, correctly, and run each
//! event through sandboxed WebAssembly plugins.
//!
//! A request is verified ([`signature`]), parsed ([`event`]), acknowledged, and
//! handed to the [`dispatch`]er, which calls every subscribed plugin from the
//! [`registry`] in a fresh, limited instance ([`runtime`]).
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
//! - [`signature`]: HMAC-SHA256 of the raw body, constant-time; pure.
//! - [`event`]: the envelope (`id`, `type`, `data`), known types, idempotency key.
//! - [`manifest`]: a plugin's optional `NAME.toml` (subscriptions, limits).
//! - [`runtime`]: wasmtime engine, WIT bindings, limits, capabilities, failures.
//! - [`registry`]: the plugin directory, names, versions, subscription filter.
//! - [`watch`]: hot reload of the plugin directory.
//! - [`health`]: per-plugin counters and quarantine.
//! - [`store`]: durable events and deliveries (SQLite), behind the `Store` trait.
//! - [`retry`]: which failures retry, and when.
//! - [`dispatch`]: queue and workers that call plugins after the 200.
//! - `http`: the webhook route and its status codes.
//! - [`hooks`]: [`Hooks`], the type an app holds; [`Config`].
//! - [`server`]: serve [`Hooks`] on a listener, with `/healthz`.
//! - [`scaffold`]: `stateset-hooks new`, a plugin project per language.

pub mod dispatch;
pub mod event;
pub mod health;
pub mod hooks;
mod http;
pub mod manifest;
pub mod registry;
pub mod retry;
pub mod runtime;
pub mod scaffold;
pub mod server;
pub mod signature;
pub mod store;
pub mod watch;

pub use dispatch::Report;
pub use event::Event;
pub use hooks::{Config, Hooks};
pub use http::ApiError;
pub use signature::Secret;
