//! Order totals check. Subscribes to `order.*` (see `orders.toml`) and checks
//! that each order's arithmetic is consistent: every line item's `total_cents`
//! (when present) is `quantity * unit_price_cents`, `subtotal_cents` is the sum
//! of the line totals, and `total_cents` is `subtotal_cents + tax_cents +
//! shipping_cents - discount_cents` (the last three default to 0). A consistent
//! order is logged at info; an inconsistent or unreadable one is returned as an
//! error so the delivery is recorded as failed. Events without line items (a
//! slim `order.cancelled`, say) are only logged with their status. Amounts are
//! integer minor units in `data.currency` (default `USD`), printed with two
//! decimals. Nothing to configure.

use serde::Deserialize;
use serde::de::DeserializeOwned;

wit_bindgen::generate!({ path: "../../wit/v0.1.0", world: "plugin" });

use stateset::webhooks::host::{LogLevel, log};

#[derive(Deserialize)]
struct Order {
    id: String,
    status: Option<String>,
    #[serde(default = "usd")]
    currency: String,
    #[serde(default)]
    line_items: Vec<LineItem>,
    subtotal_cents: Option<u64>,
    total_cents: Option<u64>,
    #[serde(default)]
    tax_cents: u64,
    #[serde(default)]
    shipping_cents: u64,
    #[serde(default)]
    discount_cents: u64,
}

#[derive(Deserialize)]
struct LineItem {
    sku: String,
    quantity: u64,
    unit_price_cents: u64,
    total_cents: Option<u64>,
}

fn usd() -> String {
    "USD".to_owned()
}

/// Verified figures of a consistent order.
struct Summary {
    units: u64,
    total_cents: u64,
}

fn check_totals(order: &Order) -> Result<Summary, String> {
    let id = &order.id;
    let overflow = || format!("order {id}: amounts overflow");
    let check = |field: &str, found: Option<u64>, want: u64, why: &str| match found {
        None => Err(format!("order {id}: has line items but no {field}")),
        Some(f) if f != want => Err(format!(
            "order {id}: {field} is {f}, expected {want} ({why})"
        )),
        Some(_) => Ok(()),
    };
    let (mut units, mut subtotal) = (0u64, 0u64);
    for (n, item) in order.line_items.iter().enumerate() {
        let (q, p) = (item.quantity, item.unit_price_cents);
        let line_total = q.checked_mul(p).ok_or_else(overflow)?;
        if item.total_cents.is_some() {
            let field = format!("line {} ({}) total_cents", n + 1, item.sku);
            check(&field, item.total_cents, line_total, &format!("{q} x {p}"))?;
        }
        units = units.checked_add(q).ok_or_else(overflow)?;
        subtotal = subtotal.checked_add(line_total).ok_or_else(overflow)?;
    }
    let why = "sum of line totals";
    check("subtotal_cents", order.subtotal_cents, subtotal, why)?;
    let (tax, ship, discount) = (order.tax_cents, order.shipping_cents, order.discount_cents);
    let gross = subtotal.checked_add(tax).and_then(|g| g.checked_add(ship));
    let gross = gross.ok_or_else(overflow)?;
    let total = gross.checked_sub(discount).ok_or_else(|| {
        format!("order {id}: discount_cents {discount} exceeds subtotal + tax + shipping {gross}")
    })?;
    let why = "subtotal + tax + shipping - discount";
    check("total_cents", order.total_cents, total, why)?;
    Ok(Summary {
        units,
        total_cents: total,
    })
}

/// Two decimals: the host's sample data is in two-decimal currencies only.
fn money(cents: u64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, cents % 100)
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
        let Some(verb) = event_type.strip_prefix("order.") else {
            let line = format!("ignoring unhandled event type {event_type}");
            log(LogLevel::Debug, &line);
            return Ok(());
        };
        let (evt, order): (_, Order) = parse_data(&payload, "order")?;
        if order.id.is_empty() {
            return Err(format!("event {evt}: invalid order data: empty `id`"));
        }
        let (id, currency) = (&order.id, &order.currency);
        let line = if order.line_items.is_empty() {
            let status = order.status.as_deref().unwrap_or("unknown");
            let total = order
                .total_cents
                .map(|t| format!(", total {}", money(t, currency)));
            let total = total.unwrap_or_default();
            format!("order {id} {verb}: status {status}{total}")
        } else {
            let Summary { units, total_cents } = check_totals(&order)?;
            let items = if units == 1 { "item" } else { "items" };
            let total = money(total_cents, currency);
            format!("order {id} {verb}: {units} {items}, total {total}")
        };
        log(LogLevel::Info, &line);
        Ok(())
    }
}

export!(Plugin);
