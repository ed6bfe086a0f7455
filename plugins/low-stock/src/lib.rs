//! Reorder suggestions. Subscribes to `inventory.low_stock` (see
//! `low-stock.toml`) and logs how many units of the SKU to reorder, at info, or
//! at warn when nothing is left to sell. It reads the stock figures StateSet
//! sends with the event: `sku` and `quantity_available` (required),
//! `low_stock_threshold` (or `threshold`, else 0), and optionally `reorder_point`,
//! `target_stock` (or `max_stock_level`), `lead_time_days`,
//! `daily_sales_velocity` (average units sold per day), `reorder_quantity` (or
//! `case_pack`), `min_order_quantity` and `warehouse_id` (or `location`).
//!
//! With `purchase_url` in its manifest's `[config]` (and that host in
//! `[http] allowed_hosts`), it also POSTs the suggestion there as JSON
//! (`sku`, `units`, `warehouse`, `event`) with the delivery's
//! `Idempotency-Key`, so a repeated delivery is one purchase suggestion. A
//! failed POST fails the delivery, which is retried. Without it, nothing
//! leaves the plugin: it logs what it would have sent
//! (`not sent (no purchase_url in [config]): {...}`).

use stateset_hooks_sdk::{Event, InventoryLevel, debug, export_plugin, http, info, warn};

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
fn reorder_quantity(s: &InventoryLevel, threshold: u64) -> u64 {
    let lead_demand = match (s.daily_sales_velocity, s.lead_time_days) {
        // `as` saturates and maps NaN to 0, so bad velocities just mean no demand.
        (Some(v), Some(days)) => (v * days as f64).ceil().max(0.0) as u64,
        _ => 0,
    };
    let target = s.target_stock.unwrap_or_else(|| {
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
    let lot = s.reorder_quantity.filter(|&n| n > 0).unwrap_or(1);
    let rounded = short.div_ceil(lot).saturating_mul(lot);
    rounded.max(s.min_order_quantity.unwrap_or(0))
}

struct LowStock;

impl stateset_hooks_sdk::Plugin for LowStock {
    fn on_event(event: Event) -> Result<(), String> {
        if event.event_type != "inventory.low_stock" {
            debug(&format!(
                "ignoring unhandled event type {}",
                event.event_type
            ));
            return Ok(());
        }
        let s: InventoryLevel = event.data()?;
        if s.sku.is_empty() {
            return Err(format!(
                "event {}: invalid inventory data: empty `sku`",
                event.id
            ));
        }
        let threshold = s.low_stock_threshold.unwrap_or(0);
        let units = reorder_quantity(&s, threshold);
        let at = s.warehouse_id.as_deref().or(s.location.as_deref());
        let at = at.map(|w| format!(" at {w}")).unwrap_or_default();
        let (sku, available) = (&s.sku, s.quantity_available);
        let line = format!(
            "reorder suggestion: SKU {sku}{at}: order {units} units \
             (available {available}, threshold {threshold})"
        );
        // Out of stock is worth more attention than running low.
        if available <= 0 {
            warn(&line)
        } else {
            info(&line)
        }
        let suggestion = serde_json::json!({
            "sku": sku,
            "units": units,
            "warehouse": s.warehouse_id.as_deref().or(s.location.as_deref()),
            "event": event.id,
        });
        http::post_json_to_config("purchase_url", "suggestion", &suggestion)
    }
}

export_plugin!(LowStock);
