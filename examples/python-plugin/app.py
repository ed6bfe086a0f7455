"""Shipment review requests: a stateset-hooks plugin in Python.

Subscribes to `shipment.delivered` (see `shipment-review.toml`). For each
delivered shipment it computes how long delivery took, from `data.shipped_at`
to `data.delivered_at` (ISO-8601 timestamps; one without an offset is taken as
UTC), and logs a review request at info:

    shipment shp_... delivered in 2 days 22 hours (carrier UPS): ask Maya Chen for a review of order ord_... (SS-104821)

The duration is the largest non-zero unit of days, hours, minutes and seconds,
followed by the next smaller unit when that is non-zero, rounded down
("2 days 22 hours", "3 days", "5 hours 3 minutes", "45 seconds").
The customer is the shipping address's name, else `data.customer.email`, else
`data.customer_id`, else "the customer". The order number in parentheses is
left out when the event has none.

The event is returned as an error (so the delivery is recorded as failed) when
the payload is not a JSON envelope with a `data` object, when `shipped_at` or
`delivered_at` is missing or not a timestamp, or when `delivered_at` is before
`shipped_at`. Other event types are ignored.

Build with `./build.sh` (componentize-py); the generated `wit_world` bindings
come from `../../wit/v0.1.0` at build time.
"""

import json
from datetime import datetime, timezone

import wit_world
from componentize_py_types import Err
from wit_world.imports.host import LogLevel, log

EVENT_TYPE = "shipment.delivered"


class WitWorld(wit_world.WitWorld):
    def on_event(self, event_type: str, payload: str) -> None:
        if event_type != EVENT_TYPE:
            return
        try:
            message = review_request(payload)
        except Err:
            raise
        except Exception as e:  # never trap: report anything unexpected as an error
            raise Err(f"shipment review failed: {type(e).__name__}: {e}")
        log(LogLevel.INFO, message)


def review_request(payload: str) -> str:
    """The log line for one `shipment.delivered` envelope, or raise `Err`."""
    try:
        envelope = json.loads(payload)
    except ValueError as e:
        raise Err(f"payload is not JSON: {e}")
    data = envelope.get("data") if isinstance(envelope, dict) else None
    if not isinstance(data, dict):
        raise Err("event has no data object")

    shipment = data.get("id") or "(no id)"
    shipped = timestamp(data, "shipped_at", shipment)
    delivered = timestamp(data, "delivered_at", shipment)
    if delivered < shipped:
        raise Err(
            f"shipment {shipment}: delivered_at {data['delivered_at']} "
            f"is before shipped_at {data['shipped_at']}"
        )

    took = humanize(int((delivered - shipped).total_seconds()))
    carrier = data.get("carrier") or "unknown"
    order = data.get("order_id") or "(unknown order)"
    number = data.get("order_number")
    order_ref = f"{order} ({number})" if number else order
    return (
        f"shipment {shipment} delivered in {took} (carrier {carrier}): "
        f"ask {customer(data)} for a review of order {order_ref}"
    )


def timestamp(data: dict, field: str, shipment: str) -> datetime:
    value = data.get(field)
    if value is None or value == "":
        raise Err(f"shipment {shipment}: {field} is missing")
    if not isinstance(value, str):
        raise Err(f"shipment {shipment}: {field} is not a string: {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Err(f"shipment {shipment}: {field} is not an ISO-8601 timestamp: {value!r}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


def customer(data: dict) -> str:
    address = data.get("shipping_address")
    if isinstance(address, dict) and address.get("name"):
        return address["name"]
    who = data.get("customer")
    if isinstance(who, dict) and who.get("email"):
        return who["email"]
    return data.get("customer_id") or "the customer"


def humanize(seconds: int) -> str:
    """Largest non-zero unit, plus the next one if non-zero: "2 days 22 hours"."""
    units = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))
    parts = []
    for name, size in units:
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n} {name}{'' if n == 1 else 's'}")
        if len(parts) == 2 or (parts and n == 0):
            break
    return " ".join(parts) or "0 seconds"
