//! Payment monitor. Subscribes to `payment.*` (see `payments.toml`) and logs
//! each payment's outcome: `payment.succeeded` at info, `payment.failed` at
//! warn with its `failure_reason`, and `payment.refunded` at info plus a warn
//! line starting `FLAG: large refund` when the refunded amount
//! (`amount_refunded_cents`, else `amount_cents`) is above a threshold. Other
//! `payment.*` types are logged at debug and accepted. Amounts are integer minor
//! units in `data.currency` (default `USD`), printed with two decimals.
//!
//! Configuration (`[config]` in `payments.toml`):
//! `refund_flag_cents`, the refund threshold in cents (default `50000`, that is
//! 500.00). It may come from the host's environment:
//! `refund_flag_cents = { env = "STATESET_PLUGIN_PAYMENTS__REFUND_FLAG_CENTS" }`.
//! With `fraud_review_url` (and that host in `[http] allowed_hosts`), a
//! flagged refund is also POSTed there as JSON (`payment`, `order`,
//! `refunded_cents`, `currency`, `event`) with the delivery's
//! `Idempotency-Key`. A failed POST fails the delivery, which is retried.
//! Without it, the plugin logs what it would have sent
//! (`not sent (no fraud_review_url in [config]): {...}`).

use stateset_hooks_sdk::{Event, Payment, config, debug, export_plugin, http, info, money, warn};

const DEFAULT_REFUND_FLAG_CENTS: u64 = 50_000;

/// Read per call, so a bad value is reported as a delivery error naming the key.
fn refund_flag_cents() -> Result<u64, String> {
    match config("refund_flag_cents") {
        None => Ok(DEFAULT_REFUND_FLAG_CENTS),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|e| format!("config refund_flag_cents {raw:?} is not a number of cents: {e}")),
    }
}

fn describe(p: &Payment, outcome: &str, amount: &str) -> String {
    let order = p.order_id.as_deref().map(|o| format!(" for order {o}"));
    format!(
        "payment {} {outcome}: {amount}{}",
        p.id,
        order.unwrap_or_default()
    )
}

struct Payments;

impl stateset_hooks_sdk::Plugin for Payments {
    fn on_event(event: Event) -> Result<(), String> {
        if !["succeeded", "failed", "refunded"].contains(&event.action()) {
            // Providers add new payment types over time; they are not errors.
            debug(&format!(
                "ignoring unhandled event type {}",
                event.event_type
            ));
            return Ok(());
        }
        let p: Payment = event.data()?;
        if p.id.is_empty() {
            return Err(format!(
                "event {}: invalid payment data: empty `id`",
                event.id
            ));
        }
        let amount = money(p.amount_cents, &p.currency);
        match event.action() {
            "succeeded" => info(&describe(&p, "succeeded", &amount)),
            "failed" => {
                let reason = p.failure_reason.as_deref().unwrap_or("unknown reason");
                warn(&format!(
                    "{} (reason: {reason})",
                    describe(&p, "failed", &amount)
                ));
            }
            _ => {
                let (refunded, paid) = (
                    p.amount_refunded_cents.unwrap_or(p.amount_cents),
                    p.amount_cents,
                );
                if refunded > paid {
                    return Err(format!(
                        "payment {}: amount_refunded_cents {refunded} exceeds amount_cents {paid}",
                        p.id
                    ));
                }
                let threshold = refund_flag_cents()?;
                let back = money(refunded, &p.currency);
                info(&describe(&p, "refunded", &format!("{back} of {amount}")));
                if refunded > threshold {
                    let limit = money(threshold, &p.currency);
                    warn(&format!(
                        "FLAG: large refund on payment {}: {back} is above the {limit} threshold",
                        p.id
                    ));
                    let review = serde_json::json!({
                        "payment": p.id,
                        "order": p.order_id,
                        "refunded_cents": refunded,
                        "currency": p.currency,
                        "event": event.id,
                    });
                    http::post_json_to_config("fraud_review_url", "flagged refund", &review)?;
                }
            }
        }
        Ok(())
    }
}

export_plugin!(Payments);
