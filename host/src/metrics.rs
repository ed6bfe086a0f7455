//! What the host counts for Prometheus: every metric's name, help, labels
//! and buckets, and the scrape body (`GET /metrics` on the admin listener).
//!
//! Counters and histograms are updated where things happen (the webhook
//! route, the recorder, the store's commits); gauges (deliveries by status,
//! the backlog, plugins by state) are read from the store and the registry
//! at each scrape. Labels are bounded: a plugin's name, an outcome, a status
//! or a state (kebab-case, as the command line and the console name them),
//! never an event id, a URL or error text. An embedding app
//! registers the same metrics into its own registry ([`Metrics::register`]).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::registry::Registry as Plugins;
use crate::runtime::CallOutcome;
use crate::status::PluginState;
use crate::store::{CommitMetrics, Status, Store, now_ms};

/// Every metric's name starts with this.
pub const PREFIX: &str = "stateset_hooks";

/// What [`Metrics::encode`] writes: OpenMetrics text, which Prometheus reads.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How a webhook request ended, as `webhooks_received_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Received {
    Accepted,
    Duplicate,
    BadSignature,
    /// A Standard Webhooks timestamp outside the tolerance.
    StaleTimestamp,
    BadJson,
    TooLarge,
    BodyTimeout,
    BadRequest,
    /// 503: the store could not take it, or the host is stopping.
    Refused,
}

impl Received {
    fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::BadSignature => "bad-signature",
            Self::StaleTimestamp => "stale-timestamp",
            Self::BadJson => "bad-json",
            Self::TooLarge => "too-large",
            Self::BodyTimeout => "body-timeout",
            Self::BadRequest => "bad-request",
            Self::Refused => "refused",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PluginOutcome {
    plugin: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

type Histograms = Family<PluginLabel, Histogram, fn() -> Histogram>;

/// The host's metrics. Cheap to update from any thread.
#[derive(Debug, Clone)]
pub struct Metrics {
    received: Family<OutcomeLabel, Counter>,
    deliveries: Family<PluginOutcome, Counter>,
    call_seconds: Histograms,
    call_fuel: Histograms,
    call_memory: Histograms,
    end_to_end: Histograms,
    commits: CommitMetrics,
    gauges: Arc<Gauges>,
}

/// Read at each scrape.
#[derive(Debug)]
struct Gauges {
    store: Arc<dyn Store>,
    plugins: Arc<Plugins>,
}

impl Metrics {
    pub(crate) fn new(store: Arc<dyn Store>, plugins: Arc<Plugins>) -> Self {
        Self {
            received: Family::default(),
            deliveries: Family::default(),
            // 100 µs to 3.3 s: a call's time limit is seconds at most.
            call_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
            }),
            // 10 thousand to 42 billion units.
            call_fuel: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(10_000.0, 4.0, 12))
            }),
            // 64 KiB to 512 MiB.
            call_memory: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(65_536.0, 2.0, 14))
            }),
            // 1 ms to 36 h: retries back off for hours.
            end_to_end: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 28))
            }),
            commits: store.commit_metrics(),
            gauges: Arc::new(Gauges { store, plugins }),
        }
    }

    /// Register every metric into `registry` (an app's own, say), named
    /// `stateset_hooks_*` there.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix(PREFIX);
        r.register(
            "webhooks_received",
            "Webhook requests, by how they ended",
            self.received.clone(),
        );
        r.register(
            "deliveries",
            "Recorded delivery attempts, by plugin and outcome (succeeded, a failure kind, or dead)",
            self.deliveries.clone(),
        );
        r.register_with_unit(
            "plugin_call_duration",
            "Time of each plugin call",
            Unit::Seconds,
            self.call_seconds.clone(),
        );
        r.register(
            "plugin_fuel_consumed",
            "Fuel each plugin call consumed",
            self.call_fuel.clone(),
        );
        r.register_with_unit(
            "plugin_peak_memory",
            "The most linear memory each plugin call held",
            Unit::Bytes,
            self.call_memory.clone(),
        );
        r.register_with_unit(
            "end_to_end_latency",
            "From receiving an event to a plugin's successful delivery of it",
            Unit::Seconds,
            self.end_to_end.clone(),
        );
        r.register_with_unit(
            "store_commit_duration",
            "Time of each store commit (a batch of writes)",
            Unit::Seconds,
            self.commits.seconds.clone(),
        );
        r.register(
            "store_commit_writes",
            "Writes carried by each store commit",
            self.commits.writes.clone(),
        );
        r.register_collector(Box::new(self.gauges.clone()));
    }

    /// The metrics in the OpenMetrics text format ([`CONTENT_TYPE`]), as
    /// `GET /metrics` serves them. Reads the store: call it off the async
    /// threads.
    pub fn encode(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text
    }

    pub(crate) fn received(&self, outcome: Received) {
        self.received
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// One recorded attempt: its outcome as the store took it, and what
    /// the call cost.
    pub(crate) fn attempt(
        &self,
        plugin: &str,
        status: Status,
        outcome: &CallOutcome,
        received_at: i64,
    ) {
        let label = PluginLabel {
            plugin: plugin.to_owned(),
        };
        let name = match (&outcome.result, status) {
            (_, Status::Dead) => "dead",
            (Ok(()), Status::Succeeded) => "succeeded",
            // Ran, but not recorded as run (replayed meanwhile, its kv
            // writes conflicted): it runs again.
            (Ok(()), _) => "not-recorded",
            (Err(failure), _) => failure.kind.as_str(),
        };
        self.deliveries
            .get_or_create(&PluginOutcome {
                plugin: label.plugin.clone(),
                outcome: name,
            })
            .inc();
        if outcome.fuel_used == 0 && outcome.elapsed.is_zero() {
            return; // the host's failure: no call was made
        }
        self.call_seconds
            .get_or_create(&label)
            .observe(outcome.elapsed.as_secs_f64());
        self.call_fuel
            .get_or_create(&label)
            .observe(outcome.fuel_used as f64);
        self.call_memory
            .get_or_create(&label)
            .observe(outcome.peak_memory_bytes as f64);
        if status == Status::Succeeded {
            let waited = (now_ms() - received_at).max(0) as f64 / 1000.0;
            self.end_to_end.get_or_create(&label).observe(waited);
        }
    }
}

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = now_ms();
        // A store that cannot answer now leaves its gauges out of this
        // scrape (absent, not zero), and says so in the log.
        match self.store.stats(now) {
            Ok(stats) => {
                // Not `deliveries`: that is the counter's family name.
                let mut family = encoder.encode_descriptor(
                    "store_deliveries",
                    "Deliveries in the store, by status",
                    None,
                    prometheus_client::metrics::MetricType::Gauge,
                )?;
                for status in [
                    Status::Pending,
                    Status::Failed,
                    Status::Succeeded,
                    Status::Dead,
                ] {
                    let n = stats.count(status);
                    ConstGauge::new(n as i64)
                        .encode(family.encode_family(&[("status", status.as_str())])?)?;
                }
                let backlog = stats
                    .oldest_due
                    .map_or(0.0, |due| (now - due).max(0) as f64 / 1000.0);
                let gauge = ConstGauge::new(backlog);
                gauge.encode(encoder.encode_descriptor(
                    "delivery_backlog",
                    "How long the oldest due delivery has waited",
                    Some(&Unit::Seconds),
                    gauge.metric_type(),
                )?)?;
            }
            Err(error) => tracing::warn!(%error, "metrics: could not read the store's counts"),
        }
        let status = self.plugins.status(now);
        let mut family = encoder.encode_descriptor(
            "plugins",
            "Plugins the host knows, by state",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for state in PluginState::ALL {
            let n = status.iter().filter(|p| p.state == state).count();
            ConstGauge::new(n as i64)
                .encode(family.encode_family(&[("state", state.as_str())])?)?;
        }
        Ok(())
    }
}
