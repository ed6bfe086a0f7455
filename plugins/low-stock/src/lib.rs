//! Reorder suggestions. Subscribes to `inventory.low_stock` (see
//! `low-stock.toml`) and logs how many units of the SKU to reorder, at info, or
//! at warn when nothing is left to sell. It reads the stock figures StateSet
//! sends with the event: `sku` and `quantity_available` (required),
//! `low_stock_threshold` (or `threshold`, else 0), and optionally `reorder_point`,
//! `target_stock` (or `max_stock_level`), `lead_time_days`,
//! `daily_sales_velocity` (average units sold per day), `reorder_quantity` (or
//! `case_pack`), `min_order_quantity` and `warehouse_id` (or `location`). It
//! only suggests; nothing is ordered. Nothing to configure.

use serde::Deserialize;
use serde::de::DeserializeOwned;

wit_bindgen::generate!({ path: "../../wit/v0.1.0", world: "plugin" });

use stateset::webhooks::host::{LogLevel, log};

// Aliases are separate fields rather than `#[serde(alias)]`, which rejects an
// event that happens to carry both spellings.
#[derive(Deserialize)]
struct StockLevel {
    sku: String,
    // Negative when oversold: backorders to cover on top of the target.
    quantity_available: i64,
    low_stock_threshold: Option<u64>,
    threshold: Option<u64>,
    reorder_point: Option<u64>,
    target_stock: Option<u64>,
    max_stock_level: Option<u64>,
    lead_time_days: Option<u64>,
    daily_sales_velocity: Option<f64>,
    reorder_quantity: Option<u64>,
    case_pack: Option<u64>,
    min_order_quantity: Option<u64>,
    warehouse_id: Option<String>,
    location: Option<String>,
}

/// Units to order so that stock is back at its target once the order lands.
///
/// target = `target_stock` if given, else 2 x max(threshold, `reorder_point`)
///          plus the demand expected during the lead time,
///          ceil(`daily_sales_velocity` x `lead_time_days`);
/// order  = target - available (0 if already at target), rounded up to a whole
///          number of `reorder_quantity` lots and raised to `min_order_quantity`.
///
/// Doubling the alert level keeps a safety stock's worth above it, so the very
/// next sale does not raise the alert again. Arithmetic saturates: this is a
/// suggestion, and an absurd input must not abort the plugin.
fn reorder_quantity(s: &StockLevel, threshold: u64) -> u64 {
    let lead_demand = match (s.daily_sales_velocity, s.lead_time_days) {
        // `as` saturates and maps NaN to 0, so bad velocities just mean no demand.
        (Some(v), Some(days)) => (v * days as f64).ceil().max(0.0) as u64,
        _ => 0,
    };
    let target = s.target_stock.or(s.max_stock_level).unwrap_or_else(|| {
        let safety = threshold.max(s.reorder_point.unwrap_or(0));
        safety.saturating_mul(2).saturating_add(lead_demand)
    });
    let short = match u64::try_from(s.quantity_available) {
        Ok(available) => target.saturating_sub(available),
        Err(_) => target.saturating_add(s.quantity_available.unsigned_abs()),
    };
    if short == 0 {
        return 0;
    }
    let lot = s
        .reorder_quantity
        .or(s.case_pack)
        .filter(|&n| n > 0)
        .unwrap_or(1);
    let rounded = short.div_ceil(lot).saturating_mul(lot);
    rounded.max(s.min_order_quantity.unwrap_or(0))
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
        if event_type != "inventory.low_stock" {
            let line = format!("ignoring unhandled event type {event_type}");
            log(LogLevel::Debug, &line);
            return Ok(());
        }
        let (evt, s): (_, StockLevel) = parse_data(&payload, "inventory")?;
        if s.sku.is_empty() {
            return Err(format!("event {evt}: invalid inventory data: empty `sku`"));
        }
        let threshold = s.low_stock_threshold.or(s.threshold).unwrap_or(0);
        let units = reorder_quantity(&s, threshold);
        let at = s.warehouse_id.as_deref().or(s.location.as_deref());
        let at = at.map(|w| format!(" at {w}")).unwrap_or_default();
        let (sku, available) = (&s.sku, s.quantity_available);
        let level = if available <= 0 {
            LogLevel::Warn
        } else {
            LogLevel::Info
        };
        log(
            level,
            &format!(
                "reorder suggestion: SKU {sku}{at}: order {units} units \
                 (available {available}, threshold {threshold})"
            ),
        );
        Ok(())
    }
}

export!(Plugin);
