//! Write a stateset-hooks plugin in a few lines.
//!
//! ```ignore
//! use stateset_hooks_sdk::{Event, Order, info};
//!
//! struct Greeter;
//!
//! impl stateset_hooks_sdk::Plugin for Greeter {
//!     fn on_event(event: Event) -> Result<(), String> {
//!         let order: Order = event.data()?;
//!         info(&format!("order {} is {}", order.id, order.status.unwrap_or_default()));
//!         Ok(())
//!     }
//! }
//!
//! stateset_hooks_sdk::export_plugin!(Greeter);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the crate must be
//! a `cdylib`. Which events arrive is set in the plugin's manifest
//! (`NAME.toml`, `subscriptions = ["order.*"]`), not in code.
//!
//! - [`Event`]: the envelope, with `data()` to read it as a typed model.
//! - [`models`]: orders, payments, shipments, inventory and returns as the
//!   StateSet webhook document and realistic payloads carry them; every field
//!   the document does not require is optional, and unknown fields are kept
//!   out of the way, not rejected.
//! - [`trace`], [`debug`], [`info`], [`warn`], [`error`]: the host log.
//! - [`config`]: values from the manifest's `[config]`.
//! - [`http`]: outbound requests to the hosts the manifest's `[http]` allows.
//! - [`kv`]: the plugin's own key-value state, committed with the delivery.
//! - [`delivery_key`]: this delivery's identity, the same on every attempt.
//!
//! Built against WIT `stateset:webhooks@0.3.0`.

pub mod http;
pub mod kv;
pub mod models;

use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

pub use models::*;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/v0.3.0",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "stateset_hooks_sdk::bindings",
    });
}

use bindings::stateset::webhooks::host::{self, LogLevel};

/// A plugin: one function from an event to a result.
pub trait Plugin {
    /// Handle one event. `Err(reason)` records the delivery as failed (and
    /// retried, per the host's retry policy).
    fn on_event(event: Event) -> Result<(), String>;
}

/// Export a [`Plugin`] as the component's `on-event`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __StatesetHooksExport;

        impl $crate::bindings::Guest for __StatesetHooksExport {
            fn on_event(event_type: String, payload: String) -> Result<(), String> {
                let event = $crate::Event::parse(event_type, &payload)?;
                <$plugin as $crate::Plugin>::on_event(event)
            }
        }

        $crate::bindings::__export_world!(__StatesetHooksExport with_types_in $crate::bindings);
    };
}

/// One webhook event: the envelope's fields, and its `data` to read as a model.
///
/// `data` is kept as the text it arrived as and parsed only when read, into
/// the type asked for: a plugin pays for the fields its model names, not for
/// a tree of the whole payload.
#[derive(Debug, Clone)]
pub struct Event {
    /// The envelope's `id` (empty if the sender gave none).
    pub id: String,
    /// The event type, e.g. `order.created`.
    pub event_type: String,
    /// The envelope's `created_at`, if any.
    pub created_at: Option<String>,
    data: Box<RawValue>,
    /// `data` as untyped JSON, parsed the first time it is asked for.
    untyped: OnceLock<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    id: String,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

impl Event {
    /// Parse the payload the host passes (the whole envelope). Checks that
    /// it is JSON; `data` is read later, by [`Event::data`].
    pub fn parse(event_type: String, payload: &str) -> Result<Self, String> {
        let envelope: Envelope<'_> =
            serde_json::from_str(payload).map_err(|e| format!("invalid event JSON: {e}"))?;
        let data = match envelope.data {
            Some(data) => data.to_owned(),
            None => RawValue::from_string("null".into()).expect("null is JSON"),
        };
        Ok(Self {
            id: envelope.id,
            event_type,
            created_at: envelope.created_at,
            data,
            untyped: OnceLock::new(),
        })
    }

    /// The event's `data` as `T` (a model from [`models`], or your own type).
    /// The error names the event and what did not fit.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(self.data.get())
            .map_err(|e| format!("event {} ({}): invalid data: {e}", self.id, self.event_type))
    }

    /// The event's `data` as untyped JSON.
    pub fn raw_data(&self) -> &serde_json::Value {
        self.untyped.get_or_init(|| {
            serde_json::from_str(self.data.get()).expect("data was parsed as JSON once already")
        })
    }

    /// The part of the type after the first dot: `created` for `order.created`.
    pub fn action(&self) -> &str {
        self.event_type
            .split_once('.')
            .map_or("", |(_, action)| action)
    }
}

/// A configuration value from the manifest's `[config]`.
pub fn config(key: &str) -> Option<String> {
    host::config_get(key)
}

/// This delivery's identity, `EVENT_KEY:PLUGIN`, the same on every attempt.
/// A delivery runs at least once: send this as the idempotency key of
/// anything the plugin does elsewhere ([`http`] already does).
pub fn delivery_key() -> String {
    host::delivery_key()
}

/// Log at trace level.
pub fn trace(message: &str) {
    host::log(LogLevel::Trace, message);
}

/// Log at debug level.
pub fn debug(message: &str) {
    host::log(LogLevel::Debug, message);
}

/// Log at info level: what the plugin did with an event.
pub fn info(message: &str) {
    host::log(LogLevel::Info, message);
}

/// Log at warn level: something looks wrong but the event was handled.
pub fn warn(message: &str) {
    host::log(LogLevel::Warn, message);
}

/// Log at error level.
pub fn error(message: &str) {
    host::log(LogLevel::Error, message);
}

/// `cents` of `currency` as `12.34 USD`.
pub fn money(cents: u64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, cents % 100)
}
