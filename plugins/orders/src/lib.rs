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
//!
//! It also counts each customer's orders in its key-value state and logs the
//! running count (`; customer cus_...: 2 orders`). An order counts once, however
//! many events name it: the first event of an order claims the key
//! `order/ORDER_ID` with a compare-and-swap, and only that one adds to
//! `customer/CUSTOMER_ID/orders`. The writes commit with the delivery, so a
//! retried event never counts twice; operators read the counts with
//! `stateset-hooks kv list orders customer/`.
//!
//! Built with the `discount-cap` feature it also refuses a discount over 5 %
//! of the subtotal: a rule change to try on recorded traffic with
//! `stateset-hooks shadow` before it goes live.

use stateset_hooks_sdk::{Event, Order, debug, export_plugin, info, kv, money, warn};

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
    #[cfg(feature = "discount-cap")]
    if discount.saturating_mul(100) > subtotal.saturating_mul(5) {
        return Err(format!(
            "order {id}: discount_cents {discount} is over 5% of subtotal_cents {subtotal}"
        ));
    }
    Ok(Summary {
        units,
        total_cents: total,
    })
}

/// How many distinct orders `customer` has, counting `order`. On an error
/// (the plugin's kv quota is full) nothing is written.
fn orders_of(customer: &str, order: &str) -> Result<i64, String> {
    let (marker, count) = (
        format!("order/{order}"),
        format!("customer/{customer}/orders"),
    );
    if !kv::compare_and_swap(&marker, None, customer)? {
        let n = kv::get(&count).and_then(|n| String::from_utf8(n).ok()?.parse().ok());
        return Ok(n.unwrap_or(0));
    }
    kv::incr(&count, 1).inspect_err(|_| kv::delete(&marker))
}

struct Orders;

impl stateset_hooks_sdk::Plugin for Orders {
    fn on_event(event: Event) -> Result<(), String> {
        if !event.event_type.starts_with("order.") {
            debug(&format!(
                "ignoring unhandled event type {}",
                event.event_type
            ));
            return Ok(());
        }
        let order: Order = event.data()?;
        if order.id.is_empty() {
            return Err(format!(
                "event {}: invalid order data: empty `id`",
                event.id
            ));
        }
        let (id, verb, currency) = (&order.id, event.action(), &order.currency);
        let line = if order.line_items.is_empty() {
            let status = order.status.as_deref().unwrap_or("unknown");
            let total = order
                .total_cents
                .map(|t| format!(", total {}", money(t, currency)));
            format!(
                "order {id} {verb}: status {status}{}",
                total.unwrap_or_default()
            )
        } else {
            let Summary { units, total_cents } = check_totals(&order)?;
            let items = if units == 1 { "item" } else { "items" };
            format!(
                "order {id} {verb}: {units} {items}, total {}",
                money(total_cents, currency)
            )
        };
        let customer = order.customer.as_ref().and_then(|c| c.id.as_deref());
        let count = match customer.map(|customer| (customer, orders_of(customer, id))) {
            Some((customer, Ok(n))) => {
                let orders = if n == 1 { "order" } else { "orders" };
                format!("; customer {customer}: {n} {orders}")
            }
            Some((customer, Err(e))) => {
                warn(&format!(
                    "order {id}: not counted for customer {customer}: {e}"
                ));
                String::new()
            }
            None => String::new(),
        };
        info(&format!("{line}{count}"));
        Ok(())
    }
}

export_plugin!(Orders);
