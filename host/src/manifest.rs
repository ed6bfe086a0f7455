//! A plugin's manifest: the optional `NAME.toml` next to `NAME.wasm`.
//!
//! Owns the manifest's format and the event-type patterns it subscribes with.
//! A plugin without a manifest, or whose manifest has no `subscriptions`,
//! receives every event. It does not read files; `loader.rs` does.
//!
//! ```toml
//! # orders.toml
//! subscriptions = ["order.*", "payment.refunded"]
//!
//! [limits]          # each optional, each within the host's maximum
//! fuel = 20000000
//! memory_mib = 32
//! timeout_ms = 500
//! output_kib = 64
//! error_kib = 4
//!
//! [config]          # read by plugins built against WIT 0.2.0 with `config-get`
//! refund_flag_cents = "50000"
//! api_token = { env = "ORDERS_API_TOKEN" }   # from the host's environment
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::runtime::{ConfigValues, LimitOverrides};

/// The parsed manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Event types to deliver; `None` means every event.
    #[serde(default)]
    pub subscriptions: Option<Subscriptions>,
    /// Per-plugin limits over the host's defaults.
    #[serde(default)]
    pub limits: LimitOverrides,
    /// Values the plugin reads with `config-get`.
    #[serde(default)]
    pub config: BTreeMap<String, ConfigSource>,
}

/// Where a configuration value comes from. `Debug` never shows a value.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ConfigSource {
    /// Written in the manifest.
    Value(String),
    /// Read from the host's environment when the plugin loads.
    Env { env: String },
}

impl fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => f.write_str("<value>"),
            Self::Env { env } => write!(f, "env:{env}"),
        }
    }
}

impl Manifest {
    /// Parse a manifest's text; errors carry the line and column.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Resolve `[config]`, reading environment references now. The error
    /// names the key and variable, never a value.
    pub fn resolve_config(&self) -> Result<ConfigValues, String> {
        let mut values = BTreeMap::new();
        for (key, source) in &self.config {
            let value = match source {
                ConfigSource::Value(value) => value.clone(),
                ConfigSource::Env { env } => std::env::var(env)
                    .map_err(|_| format!("config.{key}: environment variable {env} is not set"))?,
            };
            values.insert(key.clone(), value);
        }
        Ok(ConfigValues::new(values))
    }

    /// The subscriptions for people: `order.*, payment.refunded`, or `*` for all.
    pub fn describe(&self) -> String {
        match &self.subscriptions {
            Some(subs) => subs.patterns().join(", "),
            None => "*".to_owned(),
        }
    }

    /// Whether an event of this type is delivered to the plugin.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.subscriptions
            .as_ref()
            .is_none_or(|subs| subs.matches(event_type))
    }
}

/// Event-type patterns: an exact type (`order.created`), or a glob where `*`
/// matches any run of characters (`order.*`, `*.created`, `*`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct Subscriptions(Vec<String>);

impl Subscriptions {
    pub fn matches(&self, event_type: &str) -> bool {
        self.0.iter().any(|pattern| glob_match(pattern, event_type))
    }

    pub fn patterns(&self) -> &[String] {
        &self.0
    }
}

impl TryFrom<Vec<String>> for Subscriptions {
    type Error = String;

    fn try_from(patterns: Vec<String>) -> Result<Self, Self::Error> {
        if let Some(bad) = patterns.iter().find(|p| p.trim().is_empty()) {
            return Err(format!("empty subscription pattern {bad:?}"));
        }
        Ok(Self(patterns))
    }
}

/// `*` matches any run of characters (dots included); everything else literally.
fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = parts.collect();
    let Some(last) = parts.pop() else {
        // No `*` at all: exact match.
        return rest.is_empty();
    };
    for middle in parts {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("order.*", "order.created"));
        assert!(!glob_match("order.*", "orders.created"));
        assert!(!glob_match("order.*", "payment.failed"));
        assert!(glob_match("*", "anything.at_all"));
        assert!(glob_match("*.created", "return.created"));
        assert!(glob_match("inventory.low_stock", "inventory.low_stock"));
        assert!(!glob_match("inventory.low_stock", "inventory.low_stock2"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-x-c"));
        assert!(
            !glob_match("ab*ba", "aba"),
            "prefix and suffix may not overlap"
        );
    }

    #[test]
    fn no_manifest_or_no_subscriptions_means_everything() {
        assert!(Manifest::default().subscribes_to("invoice.paid"));
        assert!(Manifest::parse("").unwrap().subscribes_to("order.created"));
    }

    #[test]
    fn subscriptions_filter() {
        let m = Manifest::parse(r#"subscriptions = ["order.*", "payment.refunded"]"#).unwrap();
        assert!(m.subscribes_to("order.cancelled"));
        assert!(m.subscribes_to("payment.refunded"));
        assert!(!m.subscribes_to("payment.succeeded"));
        let none = Manifest::parse("subscriptions = []").unwrap();
        assert!(!none.subscribes_to("order.created"));
    }

    #[test]
    fn config_values_and_environment_references() {
        let m = Manifest::parse(
            "[config]\nplain = \"50000\"\nsecret = { env = \"MANIFEST_TEST_SECRET\" }\nmissing = { env = \"MANIFEST_TEST_UNSET\" }",
        )
        .unwrap();
        let shown = format!("{m:?}");
        assert!(!shown.contains("50000"), "{shown}");
        let err = m.resolve_config().unwrap_err();
        assert_eq!(
            err,
            "config.missing: environment variable MANIFEST_TEST_UNSET is not set"
        );
        let m = Manifest::parse("[config]\nplain = \"50000\"\nhome = { env = \"PATH\" }").unwrap();
        let values = m.resolve_config().unwrap();
        assert_eq!(values.get("plain"), Some("50000"));
        assert_eq!(values.get("home"), std::env::var("PATH").ok().as_deref());
        assert!(!format!("{values:?}").contains("50000"));
    }

    #[test]
    fn errors_name_the_line() {
        let err = Manifest::parse("\nsubscriptons = [\"order.*\"]").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = Manifest::parse(r#"subscriptions = [""]"#).unwrap_err();
        assert!(err.to_string().contains("empty subscription"), "{err}");
    }
}
