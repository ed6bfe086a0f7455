//! One trace per event, from the sender's request to each plugin call: the
//! W3C `traceparent` a sender sent (or a new one), kept with the event in
//! the store so a call that runs later, after a restart or on another host,
//! still joins it.
//!
//! The webhook route's span (`webhook`) and each call's (`plugin.call`) carry
//! the trace id, the event key and type as fields, so logs correlate in any
//! build. With the `otel` cargo feature the spans also become OpenTelemetry
//! spans of that trace, children of the sender's span (exported over OTLP
//! when the binary is given `--otlp-endpoint`).

use rand::Rng as _;

/// The header a sender's trace context comes in.
pub const TRACEPARENT: &str = "traceparent";

/// A W3C trace context: which trace, and which span is the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// A header value of version `00`; anything else (another version, ids
    /// of zeros, bad hex) is `None`, and the event starts a trace of its own.
    pub fn parse(value: &[u8]) -> Option<Self> {
        let value = std::str::from_utf8(value).ok()?.trim();
        let mut parts = value.split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let lower_hex = |s: &str, len| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !lower_hex(trace, 32) || !lower_hex(parent, 16) || !lower_hex(flags, 2) {
            return None;
        }
        let mut out = Self {
            trace_id: [0; 16],
            parent_id: [0; 8],
            sampled: false,
        };
        hex::decode_to_slice(trace, &mut out.trace_id).ok()?;
        hex::decode_to_slice(parent, &mut out.parent_id).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        out.sampled = flags & 1 == 1;
        if out.trace_id == [0; 16] || out.parent_id == [0; 8] {
            return None;
        }
        Some(out)
    }

    /// A new trace, its root span standing for the request.
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        Self {
            trace_id: rng.random::<[u8; 16]>(),
            parent_id: rng.random::<[u8; 8]>(),
            sampled: true,
        }
    }

    /// The context a request's span `span` starts: a child of the sender's
    /// `traceparent` (`header`), if valid. What is kept with the event is
    /// `span`'s own context when spans are exported, so calls become its
    /// children; else the sender's, or a new trace.
    pub fn for_request(header: Option<&[u8]>, span: &tracing::Span) -> Self {
        let sent = header.and_then(Self::parse);
        if let Some(sent) = &sent {
            sent.adopt(span);
        }
        #[cfg(feature = "otel")]
        {
            use opentelemetry::trace::TraceContextExt as _;
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            let context = span.context();
            let own = context.span().span_context().clone();
            if own.is_valid() {
                return Self {
                    trace_id: own.trace_id().to_bytes(),
                    parent_id: own.span_id().to_bytes(),
                    sampled: own.is_sampled(),
                };
            }
        }
        sent.unwrap_or_else(Self::new_root)
    }

    /// The trace id as 32 hex digits, as logs and trace viewers show it.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// Make `span` a child of this context (with the `otel` feature; its
    /// fields say which trace either way).
    pub fn adopt(&self, span: &tracing::Span) {
        #[cfg(feature = "otel")]
        {
            use opentelemetry::trace::{
                SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
            };
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            let flags = if self.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            let remote = SpanContext::new(
                TraceId::from_bytes(self.trace_id),
                SpanId::from_bytes(self.parent_id),
                flags,
                true,
                TraceState::default(),
            );
            let context = opentelemetry::Context::new().with_remote_span_context(remote);
            if let Err(error) = span.set_parent(context) {
                tracing::debug!(%error, "span not joined to the event's trace");
            }
        }
        #[cfg(not(feature = "otel"))]
        let _ = span;
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.parent_id),
            u8::from(self.sampled)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_a_bad_one_is_none() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(header.as_bytes()).unwrap();
        assert_eq!(parsed.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(parsed.sampled);
        assert_eq!(parsed.to_string(), header);
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad}");
        }
        let root = TraceParent::new_root();
        assert_eq!(TraceParent::parse(root.to_string().as_bytes()), Some(root));
    }
}
