//! Payment monitor. Subscribes to `payment.*` (see `payments.toml`) and logs
//! each payment's outcome: `payment.succeeded` at info, `payment.failed` at
//! warn with its `failure_reason`, and `payment.refunded` at info plus a warn
//! line starting `FLAG: large refund` when the refunded amount
//! (`amount_refunded_cents`, else `amount_cents`) is above a threshold. Other
//! `payment.*` types are logged at debug and accepted. Amounts are integer minor
//! units in `data.currency` (default `USD`), printed with two decimals.
//!
//! Configuration (WIT 0.2.0 `config-get`, from `[config]` in `payments.toml`):
//! `refund_flag_cents`, the refund threshold in cents (default `50000`, that is
//! 500.00). It may come from the host's environment:
//! `refund_flag_cents = { env = "PAYMENTS_REFUND_FLAG_CENTS" }`.

use serde::Deserialize;
use serde::de::DeserializeOwned;

wit_bindgen::generate!({ path: "../../wit/v0.2.0", world: "plugin" });

use stateset::webhooks::host::{LogLevel, config_get, log};

const DEFAULT_REFUND_FLAG_CENTS: u64 = 50_000;

#[derive(Deserialize)]
struct Payment {
    id: String,
    amount_cents: u64,
    #[serde(default = "usd")]
    currency: String,
    order_id: Option<String>,
    failure_reason: Option<String>,
    amount_refunded_cents: Option<u64>,
}

fn usd() -> String {
    "USD".to_owned()
}

/// Parsed per call rather than in a `const` so a bad value is reported as a
/// delivery error naming the variable instead of failing the build obscurely.
fn refund_flag_cents() -> Result<u64, String> {
    match config_get("refund_flag_cents") {
        None => Ok(DEFAULT_REFUND_FLAG_CENTS),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|e| format!("config refund_flag_cents {raw:?} is not a number of cents: {e}")),
    }
}

/// Two decimals: the host's sample data is in two-decimal currencies only.
fn money(cents: u64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, cents % 100)
}

fn describe(p: &Payment, outcome: &str, amount: &str) -> String {
    let order = p.order_id.as_deref().map(|o| format!(" for order {o}"));
    format!(
        "payment {} {outcome}: {amount}{}",
        p.id,
        order.unwrap_or_default()
    )
}

/// The envelope's `id` and its `data` as `T`; errors name the event so the
/// failed delivery is easy to find.
fn parse_data<T: DeserializeOwned>(payload: &str, what: &str) -> Result<(String, T), String> {
    #[derive(Deserialize)]
    struct Envelope {
        #[serde(default)]
        id: String,
        data: Option<serde_json::Value>,
    }
    let event: Envelope =
        serde_json::from_str(payload).map_err(|e| format!("invalid event JSON: {e}"))?;
    let evt = event.id;
    let data = event
        .data
        .ok_or_else(|| format!("event {evt} has no data"))?;
    match serde_json::from_value(data) {
        Ok(data) => Ok((evt, data)),
        Err(e) => Err(format!("event {evt}: invalid {what} data: {e}")),
    }
}

struct Plugin;

impl Guest for Plugin {
    fn on_event(event_type: String, payload: String) -> Result<(), String> {
        let known = ["payment.succeeded", "payment.failed", "payment.refunded"];
        if !known.contains(&event_type.as_str()) {
            // Providers add new payment types over time; they are not errors.
            let line = format!("ignoring unhandled event type {event_type}");
            log(LogLevel::Debug, &line);
            return Ok(());
        }
        let (evt, p): (_, Payment) = parse_data(&payload, "payment")?;
        if p.id.is_empty() {
            return Err(format!("event {evt}: invalid payment data: empty `id`"));
        }
        let amount = money(p.amount_cents, &p.currency);
        match event_type.as_str() {
            "payment.succeeded" => log(LogLevel::Info, &describe(&p, "succeeded", &amount)),
            "payment.failed" => {
                let reason = p.failure_reason.as_deref().unwrap_or("unknown reason");
                let line = describe(&p, "failed", &amount);
                log(LogLevel::Warn, &format!("{line} (reason: {reason})"));
            }
            _ => {
                let refunded = p.amount_refunded_cents.unwrap_or(p.amount_cents);
                if refunded > p.amount_cents {
                    let (id, paid) = (&p.id, p.amount_cents);
                    return Err(format!(
                        "payment {id}: amount_refunded_cents {refunded} exceeds amount_cents {paid}"
                    ));
                }
                let threshold = refund_flag_cents()?;
                let back = money(refunded, &p.currency);
                log(
                    LogLevel::Info,
                    &describe(&p, "refunded", &format!("{back} of {amount}")),
                );
                if refunded > threshold {
                    let limit = money(threshold, &p.currency);
                    let line = format!(
                        "FLAG: large refund on payment {}: {back} is above the {limit} threshold",
                        p.id
                    );
                    log(LogLevel::Warn, &line);
                }
            }
        }
        Ok(())
    }
}

export!(Plugin);
