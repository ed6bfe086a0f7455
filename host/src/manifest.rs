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
//! [http]            # outbound HTTP: nothing unless listed
//! allowed_hosts = ["https://api.example.com", "https://*.myshop.example:8443"]
//! timeout_ms = 5000
//!
//! [config]          # read by plugins built against WIT 0.2.0 with `config-get`
//! refund_flag_cents = "50000"
//! api_token = { env = "STATESET_PLUGIN_ORDERS__TOKEN" }   # from the host's environment
//! ```
//!
//! The manifest is the plugin author's, not the operator's: it may read only
//! the environment variables the operator grants ([`EnvGrant`]), and never
//! the webhook secret.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;

use crate::runtime::egress::HttpManifest;
use crate::runtime::kv::KvManifest;
use crate::runtime::{ConfigValues, LimitOverrides};
use crate::signature::{SECRET_ENV, SECRETS_ENV, Secret};

/// The variables webhook secrets are read from: never a plugin's.
const SECRET_VARIABLES: [&str; 3] = [SECRET_ENV, SECRETS_ENV, crate::standard::SECRETS_ENV];

/// The start of the environment variables meant for plugins: plugin `NAME`
/// may read `STATESET_PLUGIN_<NAME>__*` (see [`plugin_env_prefix`]), names
/// an operator sets on purpose for that plugin, never ones the host, the
/// system or another plugin uses.
pub const PLUGIN_ENV_PREFIX: &str = "STATESET_PLUGIN_";

/// The prefix of the variables plugin `plugin` may read without a grant:
/// `payments` gets `STATESET_PLUGIN_PAYMENTS__`, `low-stock`
/// `STATESET_PLUGIN_LOW_STOCK__`. Only a name of lower-case letters and
/// digits in `-`-separated words has one: for those the mapping is one to
/// one and the double `_` ends the name, so no plugin's prefix starts
/// another's (`orders` cannot read `orders-eu`'s variables).
pub fn plugin_env_prefix(plugin: &str) -> Option<String> {
    let canonical = plugin.split('-').all(|word| {
        !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    });
    canonical.then(|| {
        format!(
            "{PLUGIN_ENV_PREFIX}{}__",
            plugin.to_ascii_uppercase().replace('-', "_")
        )
    })
}

/// Which of the host's environment variables a manifest may read with
/// `{ env = "VAR" }`: its own plugin's `STATESET_PLUGIN_<NAME>__*`, and those
/// the operator allows by name for every plugin. A variable holding a
/// webhook secret is never readable, whatever its name. `Debug` shows names
/// only.
#[derive(Clone, Default)]
pub struct EnvGrant {
    allow: BTreeSet<String>,
    withheld: Vec<Secret>,
}

impl EnvGrant {
    /// Plugins may read `STATESET_PLUGIN_*` and the variables in `allow`.
    pub fn new(allow: impl IntoIterator<Item = String>) -> Self {
        Self {
            allow: allow.into_iter().collect(),
            withheld: Vec::new(),
        }
    }

    /// Never hand `secret` to a plugin, whichever variable holds it.
    pub fn withholding(mut self, secret: Secret) -> Self {
        self.withheld.push(secret);
        self
    }

    /// Refuse an allow list that names a webhook secret's variable.
    pub fn validate(&self) -> Result<(), String> {
        match self
            .allow
            .iter()
            .find(|name| SECRET_VARIABLES.contains(&name.as_str()))
        {
            Some(name) => Err(format!(
                "{name} holds the webhook secret: plugins may never read it"
            )),
            None => Ok(()),
        }
    }

    fn allows(&self, plugin: &str, name: &str) -> bool {
        let own = plugin_env_prefix(plugin).is_some_and(|prefix| name.starts_with(&prefix));
        !SECRET_VARIABLES.contains(&name) && (own || self.allow.contains(name))
    }
}

impl fmt::Debug for EnvGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvGrant")
            .field("prefix", &PLUGIN_ENV_PREFIX)
            .field("allow", &self.allow)
            .field("withheld", &self.withheld.len())
            .finish()
    }
}

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
    /// What the plugin may reach over HTTP; nothing without it.
    #[serde(default)]
    pub http: HttpManifest,
    /// Its key-value state's quota.
    #[serde(default)]
    pub kv: KvManifest,
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

    /// Resolve plugin `plugin`'s `[config]`, reading the environment
    /// references `grant` allows it now; any other reference refuses the
    /// whole manifest. The error names the key and variable, never a value.
    pub fn resolve_config(&self, plugin: &str, grant: &EnvGrant) -> Result<ConfigValues, String> {
        let mut values = BTreeMap::new();
        let mut from_env = BTreeSet::new();
        for (key, source) in &self.config {
            let value = match source {
                ConfigSource::Value(value) => value.clone(),
                ConfigSource::Env { env } if !grant.allows(plugin, env) => {
                    let own = plugin_env_prefix(plugin).map_or_else(
                        || "no variables of its own: its name is not lower-case words".into(),
                        |prefix| format!("{prefix}*"),
                    );
                    return Err(format!(
                        "config.{key}: environment variable {env} is not granted to plugins \
                         (this one may read {own} and the variables the operator allows with \
                         --allow-plugin-env)"
                    ));
                }
                ConfigSource::Env { env } => {
                    from_env.insert(key.clone());
                    std::env::var(env).map_err(|_| {
                        format!("config.{key}: environment variable {env} is not set")
                    })?
                }
            };
            if grant
                .withheld
                .iter()
                .any(|s| s.appears_in(value.as_bytes()))
            {
                return Err(format!(
                    "config.{key}: the value holds the webhook secret; plugins may never read it"
                ));
            }
            values.insert(key.clone(), value);
        }
        Ok(ConfigValues::new(values, from_env))
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
        // Event types are words joined by dots (`inventory.low_stock`); a
        // pattern is shown in log lines, so it holds nothing else.
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*');
        if let Some(bad) = patterns.iter().find(|p| !p.chars().all(allowed)) {
            return Err(format!(
                "subscription pattern {:?} has characters other than letters, digits, \
                 '.', '_', '-' and '*'",
                bad.escape_debug().to_string()
            ));
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
    fn config_values_and_granted_environment_references() {
        let path = std::env::var("PATH").unwrap();
        let grant = EnvGrant::new(["PATH".to_owned()]);
        let m =
            Manifest::parse("[config]\nplain = \"50000\"\nsearch = { env = \"PATH\" }").unwrap();
        let shown = format!("{m:?}");
        assert!(!shown.contains("50000"), "{shown}");
        let values = m.resolve_config("payments", &grant).unwrap();
        assert_eq!(values.get("plain"), Some("50000"));
        assert_eq!(values.get("search"), Some(path.as_str()));
        assert!(!format!("{values:?}").contains("50000"));

        let refused = |toml: &str, grant: &EnvGrant| {
            Manifest::parse(toml)
                .unwrap()
                .resolve_config("payments", grant)
                .unwrap_err()
        };
        // Its own prefix is granted: the variable is read, and found unset.
        let missing = refused(
            "[config]\nmissing = { env = \"STATESET_PLUGIN_PAYMENTS__UNSET\" }",
            &grant,
        );
        assert_eq!(
            missing,
            "config.missing: environment variable STATESET_PLUGIN_PAYMENTS__UNSET is not set"
        );
        for name in [
            "HOME",
            SECRET_ENV,
            "PATHX",
            "STATESET_PLUGIN_ORDERS__TOKEN",
            "STATESET_PLUGIN_PAYMENTS_TOKEN",
            "STATESET_PLUGIN_PAYMENTS_EU__TOKEN",
            "stateset_plugin_payments_x",
        ] {
            let err = refused(&format!("[config]\nk = {{ env = \"{name}\" }}"), &grant);
            assert!(err.contains("is not granted to plugins"), "{err}");
        }
        // A granted variable that holds the secret is refused, without its value.
        let secret = Secret::new(&path.as_bytes()[path.len() / 2..]).unwrap();
        let err = refused(
            "[config]\nk = { env = \"PATH\" }",
            &grant.clone().withholding(secret),
        );
        assert!(err.contains("holds the webhook secret"), "{err}");
        assert!(!err.contains(&path), "{err}");
    }

    #[test]
    fn each_plugin_has_its_own_prefix_and_none_starts_another() {
        let prefix = |name| plugin_env_prefix(name);
        assert_eq!(prefix("payments").unwrap(), "STATESET_PLUGIN_PAYMENTS__");
        assert_eq!(prefix("low-stock").unwrap(), "STATESET_PLUGIN_LOW_STOCK__");
        for odd in [
            "Payments",
            "low_stock",
            "a--b",
            "-a",
            "a-",
            "ünï",
            "v2.x",
            "",
        ] {
            assert_eq!(prefix(odd), None, "{odd}");
        }
        let orders = prefix("orders").unwrap();
        assert!(!prefix("orders-eu").unwrap().starts_with(&orders));
        assert!(!"STATESET_PLUGIN_ORDERS_EU__TOKEN".starts_with(&orders));
    }

    #[test]
    fn the_secret_variables_cannot_be_granted() {
        for variable in SECRET_VARIABLES {
            let err = EnvGrant::new([variable.to_owned()]).validate().unwrap_err();
            assert!(err.contains("webhook secret"), "{err}");
        }
        assert!(
            EnvGrant::new(["ORDERS_TOKEN".to_owned()])
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn errors_name_the_line() {
        let err = Manifest::parse("\nsubscriptons = [\"order.*\"]").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = Manifest::parse(r#"subscriptions = [""]"#).unwrap_err();
        assert!(err.to_string().contains("empty subscription"), "{err}");
        let err = Manifest::parse(r#"subscriptions = ["order.*\nERROR forged"]"#).unwrap_err();
        assert!(
            err.to_string().contains("has characters other than"),
            "{err}"
        );
        assert!(!err.to_string().contains("*\nERROR"), "{err}");
    }
}
