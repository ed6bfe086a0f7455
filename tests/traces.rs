//! Traces: the sender's W3C `traceparent` is honoured and each plugin call
//! and its record join the event's trace; the binary exports the spans over
//! OTLP/HTTP to a collector (here a real HTTP server that decodes them).

use serde_json::json;

use crate::support::*;

#[cfg(feature = "otel")]
#[test]
fn spans_of_a_webhook_and_its_calls_join_the_senders_trace_over_otlp() {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message as _;

    // The collector: every OTLP/HTTP request body, decoded.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let collector = listener.local_addr().unwrap();
    let received = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: bytes::Bytes| async move {
            let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
            let mut all = received.lock().unwrap();
            for resource in request.resource_spans {
                for scope in resource.scope_spans {
                    all.extend(scope.spans);
                }
            }
            ""
        }),
    );
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });

    let plugins = PluginDir::new();
    plugins.add("notify", "misbehave", None);
    let endpoint = format!("http://{collector}");
    // Quiet logs (the host's spans off for them): spans are exported anyway.
    let quiet = "warn,plugin=info,stateset_hooks::serve=info";
    let mut host = ServeProcess::start_with(&plugins, Some(quiet), &["--otlp-endpoint", &endpoint]);
    let sender_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let sender_span = "00f067aa0ba902b7";
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let traced = event("evt_traced", "order.created", json!({}));
        let response = client
            .post(host.url())
            .header("X-StateSet-Signature", sign(&traced))
            .header("traceparent", format!("00-{sender_trace}-{sender_span}-01"))
            .body(traced)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let untraced = event("evt_untraced", "order.created", json!({}));
        let response = post_signed(&client, &host.url(), untraced).await.unwrap();
        assert_eq!(response.status(), 200);
    });
    host.wait_for_each(&[
        "misbehave ok \"evt_traced\"",
        "misbehave ok \"evt_untraced\"",
    ]);
    // SIGTERM: the exporter flushes what it holds before the process ends.
    assert!(host.stop().success());

    let spans = spans.lock().unwrap();
    let event_of = |span: &Span| {
        span.attributes
            .iter()
            .find(|kv| kv.key == "event")
            .and_then(|kv| kv.value.as_ref())
            .map(|v| format!("{:?}", v.value))
            .unwrap_or_default()
    };
    let find = |name: &str, event: &str| {
        spans
            .iter()
            .find(|s| s.name == name && event_of(s).contains(event))
            .unwrap_or_else(|| panic!("no {name} span for {event} in {spans:#?}"))
    };
    let webhook = find("webhook", "evt_traced");
    assert_eq!(hex::encode(&webhook.trace_id), sender_trace);
    assert_eq!(
        hex::encode(&webhook.parent_span_id),
        sender_span,
        "a child of the sender's span"
    );
    let call = find("plugin.call", "evt_traced");
    assert_eq!(call.trace_id, webhook.trace_id, "the call is in the trace");
    assert_eq!(
        call.parent_span_id, webhook.span_id,
        "a child of the webhook"
    );
    let record = spans
        .iter()
        .find(|s| s.name == "store.record" && s.parent_span_id == call.span_id)
        .expect("the call's record is its child");
    assert_eq!(record.trace_id, webhook.trace_id);

    // No traceparent: the webhook starts a trace, and its call joins it.
    let root = find("webhook", "evt_untraced");
    assert!(root.parent_span_id.is_empty(), "a root span");
    let call = find("plugin.call", "evt_untraced");
    assert_eq!(
        (&call.trace_id, &call.parent_span_id),
        (&root.trace_id, &root.span_id)
    );
}

/// A build without the `otel` feature says so rather than drop spans.
#[cfg(not(feature = "otel"))]
#[test]
fn an_otlp_endpoint_is_refused_by_a_build_without_otel() {
    let output = std::process::Command::new(BIN)
        .args([
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
            "plugins",
            "list",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("--features otel"), "{said}");
}

/// Without any exporter the trace still reaches the logs: the webhook's and
/// the call's lines carry the sender's trace id.
#[test]
fn the_senders_trace_id_is_in_the_log_lines_of_its_event() {
    let plugins = PluginDir::new();
    plugins.add("notify", "misbehave", None);
    let mut host = ServeProcess::start_with(&plugins, Some("info"), &["--log-format", "json"]);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let body = event("evt_logged", "order.created", json!({}));
    let status = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .args(["-H", &format!("X-StateSet-Signature: {}", sign(&body))])
        .args([
            "-H",
            &format!("traceparent: 00-{trace}-b7ad6b7169203331-01"),
        ])
        .args(["--data-binary", &String::from_utf8(body).unwrap()])
        .arg(host.url())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&status.stdout), "200");
    // The call may log before the receipt does.
    for line in host.wait_for_each(&["event received", "misbehave ok"]) {
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["span"]["trace_id"], trace, "{line}");
        assert_eq!(json["span"]["event"], "evt_logged", "{line}");
    }
    assert!(host.stop().success());
}
