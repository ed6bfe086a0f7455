// Return refunds: a stateset-hooks plugin in JavaScript.
//
// Subscribes to `return.*` (see `return-refund.toml`). For each return event it
// computes the refund due from the returned line items and logs it at info:
//
//   return ret_... for order ord_...: refund 749.00 USD for 1 item
//   return ret_... for order ord_...: refund 202.50 USD for 3 items (restocking fee 22.50 USD)
//
// The rule:
//   - each line is worth quantity x unit_price_cents;
//   - a line whose `condition` is "opened" or "damaged" pays a restocking fee of
//     10% of its value (rounded to the nearest cent), unless its `reason` is the
//     merchant's fault: damaged_in_transit, defective, wrong_item, not_as_described;
//   - the refund is the sum of the line values minus the fees; "items" counts units
//     (the sum of the quantities).
// Amounts are integer minor units of `data.currency` (default USD), printed with
// two decimals. When the event carries `refund_subtotal_cents` and it differs
// from the sum of the line values, a warning is logged too (the event still
// succeeds).
//
// On `return.created` it also acts:
//   - it adds the refund to a running total per currency in its key-value
//     state (`refunds/USD`, committed with the delivery, so a retried event
//     never counts twice) and logs `refunds due so far: 1498.00 USD`;
//   - when the manifest's `[config]` sets `refund_url` (and `[http]
//     allowed_hosts` lets the plugin reach it), it POSTs the refund there as
//     JSON (`{"return_id", "order_id", "currency", "refund_cents"}`) with
//     `fetch`, carrying the delivery's `Idempotency-Key`, and logs
//     `refund for return ret_... sent to URL: 201`.
//
// The event is returned as an error (the delivery is recorded as failed) when
// the payload is not a JSON envelope with a `data` object, when `line_items` is
// missing, not a list or empty, when a line's quantity is not a positive
// integer or its unit_price_cents not a non-negative integer, or when the
// refund service cannot be reached or answers other than 2xx (the delivery is
// retried; the key makes a repeat harmless). Event types other than
// `return.*` are ignored.
//
// Build with `./build.sh` (componentize-js); the WIT comes from ../../wit/v0.3.0.

import { configGet, deliveryKey, log } from 'stateset:webhooks/host@0.3.0';
import { increment } from 'stateset:webhooks/kv@0.3.0';

const RESTOCKING_FEE_PERCENT = 10;
const FEE_CONDITIONS = new Set(['opened', 'damaged']);
const MERCHANT_FAULT_REASONS = new Set([
  'damaged_in_transit',
  'defective',
  'wrong_item',
  'not_as_described',
]);

// `result<_, string>`: returning is `ok`; throwing a string is `err(string)`.
// An async export: componentize-js runs the event loop until it settles.
export async function onEvent(eventType, payload) {
  if (!eventType.startsWith('return.')) {
    return;
  }
  try {
    const due = refund(payload);
    for (const [level, message] of due.lines) {
      log(level, message);
    }
    if (eventType === 'return.created') {
      await act(due);
    }
  } catch (e) {
    throw typeof e === 'string' ? e : `return refund failed: ${e}`;
  }
}

// Count the refund in the running total and send it to `refund_url`, if set.
async function act({ id, order, currency, cents }) {
  const total = increment(`refunds/${currency}`, BigInt(cents));
  log('info', `refunds due so far: ${money(Number(total))} ${currency}`);
  const url = configGet('refund_url');
  if (!url) {
    return;
  }
  let response;
  try {
    response = await fetch(url, {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        // The same on every attempt of this delivery: the service can drop a repeat.
        'idempotency-key': deliveryKey(),
      },
      body: JSON.stringify({ return_id: id, order_id: order, currency, refund_cents: cents }),
    });
  } catch (e) {
    throw `POST ${url} failed: ${e.message || e}`;
  }
  if (!response.ok) {
    throw `${url} answered ${response.status}`;
  }
  log('info', `refund for return ${id} sent to ${url}: ${response.status}`);
}

// The refund due for one return envelope: its lines to log ([level, message])
// and the figures to act on; throws a string on error.
function refund(payload) {
  let envelope;
  try {
    envelope = JSON.parse(payload);
  } catch (e) {
    throw `payload is not JSON: ${e.message}`;
  }
  const data = envelope && typeof envelope === 'object' ? envelope.data : undefined;
  if (!data || typeof data !== 'object' || Array.isArray(data)) {
    throw 'event has no data object';
  }
  const id = data.id || '(no id)';
  const order = data.order_id || '(unknown order)';
  const currency = data.currency || 'USD';
  const items = data.line_items;
  if (!Array.isArray(items) || items.length === 0) {
    throw `return ${id}: no line items`;
  }

  let units = 0;
  let gross = 0;
  let fees = 0;
  items.forEach((item, n) => {
    const what = `return ${id}: line ${n + 1}${item && item.sku ? ` (${item.sku})` : ''}`;
    if (!item || typeof item !== 'object') {
      throw `${what} is not an object`;
    }
    const { quantity, unit_price_cents: price } = item;
    if (!Number.isSafeInteger(quantity) || quantity <= 0) {
      throw `${what}: quantity is ${JSON.stringify(quantity)}, expected a positive integer`;
    }
    if (!Number.isSafeInteger(price) || price < 0) {
      throw `${what}: unit_price_cents is ${JSON.stringify(price)}, expected a non-negative integer`;
    }
    const value = quantity * price;
    if (FEE_CONDITIONS.has(item.condition) && !MERCHANT_FAULT_REASONS.has(item.reason)) {
      fees += Math.round((value * RESTOCKING_FEE_PERCENT) / 100);
    }
    units += quantity;
    gross += value;
  });
  if (!Number.isSafeInteger(gross)) {
    throw `return ${id}: amounts overflow`;
  }

  const lines = [];
  const expected = data.refund_subtotal_cents;
  if (Number.isSafeInteger(expected) && expected !== gross) {
    lines.push([
      'warn',
      `return ${id}: refund_subtotal_cents is ${expected}, line items add up to ${gross}`,
    ]);
  }
  const fee = fees > 0 ? ` (restocking fee ${money(fees)} ${currency})` : '';
  const noun = units === 1 ? 'item' : 'items';
  lines.push([
    'info',
    `return ${id} for order ${order}: refund ${money(gross - fees)} ${currency} for ${units} ${noun}${fee}`,
  ]);
  return { lines, id, order, currency, cents: gross - fees };
}

// Minor units to a decimal string with two places: 74900 -> "749.00".
function money(cents) {
  const sign = cents < 0 ? '-' : '';
  const abs = Math.abs(cents);
  return `${sign}${Math.floor(abs / 100)}.${String(abs % 100).padStart(2, '0')}`;
}
