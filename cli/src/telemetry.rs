//! Where the binary's logs and spans go: log lines to stderr (text or JSON),
//! and, with `--otlp-endpoint` in a build with the `otel` feature, the spans
//! (`webhook`, `plugin.call`, `store.record`) to an OpenTelemetry collector
//! over OTLP/HTTP, batched on a thread of their own.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One object per line, for log shippers.
    Json,
}

/// Keeps the span exporter until the process ends, then flushes it.
pub struct Telemetry {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("warning: spans not all exported: {error}");
        }
    }
}

/// Install the subscriber: `RUST_LOG` (or `default_filter`) picks what is
/// logged; `otlp` is where spans are exported, if anywhere: the host's
/// spans whatever the log filter (quiet logs keep their traces).
pub fn init(
    format: LogFormat,
    default_filter: &str,
    otlp: Option<&str>,
) -> anyhow::Result<Telemetry> {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let text = matches!(format, LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter())
    });
    let json = matches!(format, LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter())
    });
    let registry = tracing_subscriber::registry().with(text).with(json);

    #[cfg(feature = "otel")]
    {
        let provider = otlp.map(exporter).transpose()?;
        let layer = provider.as_ref().map(|provider| {
            use opentelemetry::trace::TracerProvider as _;
            let spans = tracing_subscriber::filter::Targets::new()
                .with_target("stateset_hooks", tracing::Level::INFO);
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("stateset-hooks"))
                .with_filter(spans)
        });
        registry.with(layer).init();
        Ok(Telemetry { provider })
    }
    #[cfg(not(feature = "otel"))]
    {
        if otlp.is_some() {
            anyhow::bail!(
                "--otlp-endpoint: this build exports no spans; build it with `--features otel`"
            );
        }
        registry.init();
        Ok(Telemetry {})
    }
}

/// The OTLP/HTTP exporter to `endpoint` (a collector's base URL, such as
/// `http://127.0.0.1:4318`; spans go to its `/v1/traces`).
#[cfg(feature = "otel")]
fn exporter(endpoint: &str) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| anyhow::anyhow!("--otlp-endpoint: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("stateset-hooks")
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
