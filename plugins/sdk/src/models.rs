//! Typed models of StateSet event `data`: the fields the webhook document
//! uses (`id`, `status`, `sku`, `quantity_available`, ...) and the ones a
//! realistic payload carries (line items, amounts, currency, addresses).
//!
//! Amounts are integer minor units (`*_cents`) in `currency`. Every field the
//! document does not require is optional or defaults to empty/zero; fields a
//! model does not name are ignored, so a payload with more in it still reads.

use serde::Deserialize;

fn usd() -> String {
    "USD".to_owned()
}

/// `order.*`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Order {
    pub id: String,
    pub order_number: Option<String>,
    pub status: Option<String>,
    pub payment_status: Option<String>,
    pub fulfillment_status: Option<String>,
    #[serde(default = "usd")]
    pub currency: String,
    pub customer: Option<Customer>,
    pub shipping_address: Option<Address>,
    pub billing_address: Option<Address>,
    #[serde(default)]
    pub line_items: Vec<LineItem>,
    pub subtotal_cents: Option<u64>,
    #[serde(default)]
    pub discount_cents: u64,
    #[serde(default)]
    pub tax_cents: u64,
    #[serde(default)]
    pub shipping_cents: u64,
    pub total_cents: Option<u64>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

/// A line of an order or a return.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct LineItem {
    pub id: Option<String>,
    pub product_id: Option<String>,
    #[serde(default)]
    pub sku: String,
    pub name: Option<String>,
    pub quantity: u64,
    pub unit_price_cents: u64,
    /// `quantity * unit_price_cents` when the sender includes it.
    pub total_cents: Option<u64>,
    /// Returns: why the item came back.
    pub reason: Option<String>,
    /// Returns: `new`, `opened`, `damaged`, ...
    pub condition: Option<String>,
}

/// A customer as orders embed it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Customer {
    pub id: Option<String>,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
}

/// A postal address.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Address {
    pub name: Option<String>,
    pub line1: Option<String>,
    pub line2: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub postal_code: Option<String>,
    pub country: Option<String>,
}

/// `payment.*`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Payment {
    pub id: String,
    pub order_id: Option<String>,
    pub customer_id: Option<String>,
    pub status: Option<String>,
    pub amount_cents: u64,
    pub amount_refunded_cents: Option<u64>,
    #[serde(default = "usd")]
    pub currency: String,
    pub failure_code: Option<String>,
    pub failure_reason: Option<String>,
}

/// `shipment.*`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Shipment {
    pub id: String,
    pub order_id: Option<String>,
    pub status: Option<String>,
    pub carrier: Option<String>,
    pub tracking_number: Option<String>,
    pub shipped_at: Option<String>,
    pub delivered_at: Option<String>,
}

/// `inventory.updated`, `inventory.low_stock`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct InventoryLevel {
    pub sku: String,
    pub warehouse_id: Option<String>,
    pub location: Option<String>,
    pub quantity_on_hand: Option<i64>,
    pub quantity_reserved: Option<i64>,
    /// Negative when oversold.
    pub quantity_available: i64,
    /// `low_stock_threshold`, or `threshold` in shorter payloads.
    #[serde(alias = "threshold")]
    pub low_stock_threshold: Option<u64>,
    pub reorder_point: Option<u64>,
    /// Order in multiples of this (`case_pack` in some payloads).
    #[serde(alias = "case_pack")]
    pub reorder_quantity: Option<u64>,
    pub min_order_quantity: Option<u64>,
    /// Stock to order up to (`max_stock_level` in some payloads).
    #[serde(alias = "max_stock_level")]
    pub target_stock: Option<u64>,
    pub lead_time_days: Option<u64>,
    /// Average units sold per day.
    pub daily_sales_velocity: Option<f64>,
}

/// `return.*`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Return {
    pub id: String,
    pub order_id: Option<String>,
    pub status: Option<String>,
    #[serde(default = "usd")]
    pub currency: String,
    #[serde(default)]
    pub line_items: Vec<LineItem>,
    pub refund_subtotal_cents: Option<u64>,
}
