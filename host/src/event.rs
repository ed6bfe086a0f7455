//! The webhook envelope: parse a verified body into an [`Event`].
//!
//! Owns the envelope's shape (`id`, `type`, `created_at`, `data`), the event
//! types StateSet documents, the key an event is known by, and what any body
//! must be to be accepted at all: UTF-8 JSON nested at most [`MAX_DEPTH`]
//! deep, all of it, unknown fields included. It keeps the body as validated
//! text, so plugins receive exactly what the sender signed and handing it to
//! one cannot fail. It does not know signatures, HTTP or plugins.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::trace::TraceParent;

/// Every event type the StateSet webhook document names (it lists fifteen). Other types are
/// accepted too (StateSet may add some); they reach plugins subscribed to them
/// or to everything.
pub const KNOWN_EVENT_TYPES: [&str; 15] = [
    "order.created",
    "order.updated",
    "order.cancelled",
    "order.completed",
    "payment.succeeded",
    "payment.failed",
    "payment.refunded",
    "shipment.created",
    "shipment.shipped",
    "shipment.delivered",
    "inventory.updated",
    "inventory.low_stock",
    "return.created",
    "return.approved",
    "return.completed",
];

/// The deepest nesting of arrays and objects accepted anywhere in a body.
/// StateSet events nest a few levels (`data`, `items`, an item, its fields);
/// 64 leaves room for that and stays under the 128 levels `serde_json`
/// parses by default, so every accepted body parses in a plugin that uses it.
pub const MAX_DEPTH: usize = 64;

/// One verified, parsed webhook event.
#[derive(Clone)]
pub struct Event {
    key: String,
    id: Option<String>,
    event_type: String,
    created_at: Option<String>,
    /// The whole body, proven UTF-8 JSON within [`MAX_DEPTH`].
    body: Arc<str>,
    /// The trace it belongs to (the sender's `traceparent`, or one begun
    /// when it arrived), kept with it in the store.
    trace: Option<TraceParent>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default, borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "type")]
    event_type: serde_json::Value,
    #[serde(default)]
    created_at: Option<serde_json::Value>,
    /// Only checked to be an object here (plugins read it): borrowed as
    /// text, so no tree of it is built.
    #[serde(borrow)]
    data: Option<&'a serde_json::value::RawValue>,
}

impl Event {
    /// Parse a body that has already passed signature verification.
    pub fn parse(body: &[u8]) -> Result<Self, EventError> {
        let body = std::str::from_utf8(body).map_err(|e| EventError::NotUtf8 {
            offset: e.valid_up_to(),
        })?;
        check_depth(body)?;
        // Unknown fields are skipped, but `serde_json` still checks their
        // syntax: with the two checks above the whole body is proven.
        let envelope: Envelope<'_> =
            serde_json::from_str(body).map_err(|e| EventError::NotJson(e.to_string()))?;
        let serde_json::Value::String(event_type) = envelope.event_type else {
            return Err(EventError::TypeNotString);
        };
        if event_type.is_empty() {
            return Err(EventError::TypeNotString);
        }
        match envelope.data {
            Some(data) if data.get().starts_with('{') => {}
            Some(_) => return Err(EventError::DataNotObject),
            None => return Err(EventError::MissingData),
        }
        let id = envelope
            .id
            .map(|id| id.into_owned())
            .filter(|id| !id.is_empty());
        let created_at = match envelope.created_at {
            Some(serde_json::Value::String(s)) => Some(s),
            _ => None,
        };
        let key = match &id {
            Some(id) => id.clone(),
            None => format!("sha256:{}", hex::encode(Sha256::digest(body))),
        };
        Ok(Self {
            key,
            id,
            event_type,
            created_at,
            body: body.into(),
            trace: None,
        })
    }

    /// The same event under another idempotency key: a Standard Webhooks
    /// message's `webhook-id`.
    pub fn with_key(mut self, key: String) -> Self {
        self.key = key;
        self
    }

    /// The same event in trace `trace`.
    pub fn with_trace(mut self, trace: Option<TraceParent>) -> Self {
        self.trace = trace;
        self
    }

    /// The trace it belongs to, if one was kept.
    pub fn trace(&self) -> Option<&TraceParent> {
        self.trace.as_ref()
    }

    /// The idempotency key: the envelope's `id`, or `sha256:<hex>` of the body
    /// when the sender gave none.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The envelope's `id`, if any.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The envelope's `type`, for example `order.created`.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The envelope's `created_at`, if it was a string.
    pub fn created_at(&self) -> Option<&str> {
        self.created_at.as_deref()
    }

    /// Whether the type is one of [`KNOWN_EVENT_TYPES`].
    pub fn is_known_type(&self) -> bool {
        KNOWN_EVENT_TYPES.contains(&self.event_type.as_str())
    }

    /// The body exactly as received and signed: UTF-8 JSON, as parsing proved.
    pub fn payload(&self) -> &str {
        &self.body
    }
}

/// Refuse nesting past [`MAX_DEPTH`] before a parser recurses into it. Counts
/// brackets outside strings; syntax is the parser's job.
fn check_depth(body: &str) -> Result<(), EventError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (offset, byte) in body.bytes().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(EventError::TooDeep { offset });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

impl fmt::Debug for Event {
    /// Shows what identifies the event, never the payload: it may carry
    /// customer data that does not belong in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("key", &self.key)
            .field("type", &self.event_type)
            .field("bytes", &self.body.len())
            .finish()
    }
}

/// Why a verified body is not an event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("body is not UTF-8: invalid byte at offset {offset}")]
    NotUtf8 { offset: usize },
    #[error(
        "body nests arrays and objects deeper than {MAX_DEPTH} levels (at byte offset {offset})"
    )]
    TooDeep { offset: usize },
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("`type` must be a non-empty string")]
    TypeNotString,
    #[error("`data` is missing")]
    MissingData,
    #[error("`data` must be an object")]
    DataNotObject,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Event, EventError> {
        Event::parse(s.as_bytes())
    }

    #[test]
    fn full_envelope() {
        let e = parse(
            r#"{"id":"evt_1","type":"order.created","created_at":"2026-11-28T10:00:00Z","data":{"id":"order-1"}}"#,
        )
        .unwrap();
        assert_eq!(e.key(), "evt_1");
        assert_eq!(e.id(), Some("evt_1"));
        assert_eq!(e.event_type(), "order.created");
        assert_eq!(e.created_at(), Some("2026-11-28T10:00:00Z"));
        assert!(e.is_known_type());
        assert!(e.payload().starts_with(r#"{"id":"evt_1""#));
    }

    #[test]
    fn no_id_is_keyed_by_body_hash() {
        let body = r#"{"type":"order.created","data":{"id":"order-123","status":"pending"}}"#;
        let e = parse(body).unwrap();
        assert_eq!(e.id(), None);
        assert_eq!(
            e.key(),
            format!("sha256:{}", hex::encode(Sha256::digest(body)))
        );
        assert_eq!(parse(body).unwrap().key(), e.key(), "same body, same key");
    }

    #[test]
    fn unknown_type_is_accepted() {
        let e = parse(r#"{"type":"invoice.paid","data":{}}"#).unwrap();
        assert!(!e.is_known_type());
        assert_eq!(e.event_type(), "invoice.paid");
    }

    #[test]
    fn fifteen_documented_types() {
        let mut types = KNOWN_EVENT_TYPES.to_vec();
        types.sort();
        types.dedup();
        assert_eq!(types.len(), 15);
    }

    #[test]
    fn bad_envelopes_name_the_problem() {
        assert!(matches!(parse("{not json"), Err(EventError::NotJson(_))));
        assert!(matches!(parse("[1,2]"), Err(EventError::NotJson(_))));
        assert_eq!(
            parse(r#"{"data":{}}"#).unwrap_err().to_string(),
            "body is not valid JSON: missing field `type` at line 1 column 11"
        );
        assert_eq!(
            parse(r#"{"type":7,"data":{}}"#).unwrap_err(),
            EventError::TypeNotString
        );
        assert_eq!(
            parse(r#"{"type":"order.created"}"#).unwrap_err(),
            EventError::MissingData
        );
        assert_eq!(
            parse(r#"{"type":"order.created","data":[1]}"#).unwrap_err(),
            EventError::DataNotObject
        );
    }

    #[test]
    fn the_whole_body_must_be_utf8_json_of_bounded_depth() {
        let bad_utf8 = b"{\"type\":\"order.created\",\"data\":{},\"extra\":\"\xff\"}";
        assert_eq!(
            Event::parse(bad_utf8).unwrap_err(),
            EventError::NotUtf8 { offset: 43 }
        );
        let deep = |n: usize| {
            format!(
                r#"{{"type":"order.created","data":{{}},"extra":{}{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert!(parse(&deep(MAX_DEPTH - 1)).is_ok());
        assert!(matches!(
            parse(&deep(MAX_DEPTH)),
            Err(EventError::TooDeep { .. })
        ));
        assert!(matches!(
            parse(&deep(100_000)),
            Err(EventError::TooDeep { .. })
        ));
        // Brackets inside strings, escaped quotes included, are not nesting.
        let text = format!(
            r#"{{"type":"order.created","data":{{"note":"\"{}"}}}}"#,
            "[".repeat(1000)
        );
        assert!(parse(&text).is_ok());
    }
}
