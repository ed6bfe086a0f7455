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

When the manifest's `[config]` sets `review_url` (and `[http] allowed_hosts`
lets the plugin reach it), the request is also POSTed there as JSON
(`{"order_id", "shipment_id", "customer", "message"}`), and a second line
says so:

    review request for order ord_... sent to https://reviews.example/requests: 201

Each order is asked about once. The plugin remembers it in its key-value
state (`asked/ORDER_ID`, written with the delivery) and logs
`order ord_...: review already requested` for later deliveries. Two
deliveries about one order can still run at once (a split shipment), so the
request's `Idempotency-Key` names the order, `shipment-review:ORDER_ID`: the
service drops the second. Without an `order_id`, neither applies (the key is
the delivery's).

The event is returned as an error (so the delivery is recorded as failed) when
the payload is not a JSON envelope with a `data` object, when `shipped_at` or
`delivered_at` is missing or not a timestamp, when `delivered_at` is before
`shipped_at`, or when the review service cannot be reached or answers other
than 2xx (the delivery is retried; the key makes a repeat harmless). Other
event types are ignored.

Build with `./build.sh` (componentize-py); the generated `wit_world` bindings
come from `wit/` (the plugin world, WIT 0.3.0, plus `wasi:http`).
"""

import json
from datetime import datetime, timezone
from urllib.parse import urlsplit

import wit_world
from componentize_py_types import Err, Ok
from wit_world.imports import kv, outgoing_handler
from wit_world.imports.host import LogLevel, config_get, delivery_key, log
from wit_world.imports.types import (
    Fields,
    Method_Post,
    OutgoingBody,
    OutgoingRequest,
    Scheme_Http,
    Scheme_Https,
)

EVENT_TYPE = "shipment.delivered"


class WitWorld(wit_world.WitWorld):
    def on_event(self, event_type: str, payload: str) -> None:
        if event_type != EVENT_TYPE:
            return
        try:
            request = review_request(payload)
            order = request["order_id"]
            asked = f"asked/{order}" if order else None
            if asked and kv.get(asked) is not None:
                log(LogLevel.INFO, f"order {order}: review already requested")
                return
            log(LogLevel.INFO, request["message"])
            url = config_get("review_url")
            if url:
                key = f"shipment-review:{order}" if order else delivery_key()
                status = post_json(url, request, key)
                if not 200 <= status < 300:
                    raise Err(f"{url} answered {status}")
                log(LogLevel.INFO, f"review request for order {order or '(none)'} sent to {url}: {status}")
            if asked:
                kv.set(asked, b"1", None)
        except Err:
            raise
        except Exception as e:  # never trap: report anything unexpected as an error
            raise Err(f"shipment review failed: {type(e).__name__}: {e}")


def review_request(payload: str) -> dict:
    """The review request for one `shipment.delivered` envelope, or raise `Err`."""
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
    order = data.get("order_id") or ""
    number = data.get("order_number")
    order_ref = order or "(unknown order)"
    order_ref = f"{order_ref} ({number})" if number else order_ref
    who = customer(data)
    return {
        "order_id": order,
        "shipment_id": shipment,
        "customer": who,
        "message": (
            f"shipment {shipment} delivered in {took} (carrier {carrier}): "
            f"ask {who} for a review of order {order_ref}"
        ),
    }


def post_json(url: str, body: dict, idempotency_key: str) -> int:
    """POST `body` as JSON to `url` through `wasi:http`; the response status.

    `idempotency_key` is sent as `Idempotency-Key`: a request repeated under
    the same key (a retried delivery) is one request to the service.

    Blocks until the response arrives (the host bounds the wait). Raises `Err`
    naming the `wasi:http` error code when the host refuses the request (a host
    not in `[http] allowed_hosts`, say) or the request fails.
    """
    parts = urlsplit(url)
    scheme = {"http": Scheme_Http(), "https": Scheme_Https()}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise Err(f"review_url {url!r} is not an http(s) URL")
    data = json.dumps(body).encode()
    headers = Fields.from_list(
        [
            ("content-type", b"application/json"),
            ("idempotency-key", idempotency_key.encode()),
        ]
    )
    request = OutgoingRequest(headers)
    request.set_method(Method_Post())
    request.set_scheme(scheme)
    request.set_authority(parts.netloc)
    request.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    outgoing = request.body()
    # Sent first, then the body written: the host takes the body as it
    # streams, and holds only a couple of chunks before that.
    try:
        future = outgoing_handler.handle(request, None)
    except Err as e:
        raise Err(f"POST {url} failed: {type(e.value).__name__}")
    written = None
    try:
        with outgoing.write() as stream:
            for start in range(0, len(data), 4096):
                stream.blocking_write_and_flush(data[start : start + 4096])
        OutgoingBody.finish(outgoing, None)
    except Err as e:  # the response below says why, if the host refused the body
        written = e
    with future:
        with future.subscribe() as ready:
            ready.block()
        result = future.get()
    if result is None or not isinstance(result, Ok) or not isinstance(result.value, Ok):
        error = result.value.value if result is not None and isinstance(result, Ok) else result
        raise Err(f"POST {url} failed: {type(error).__name__}")
    if written is not None:
        raise Err(f"POST {url} failed: {type(written.value).__name__}")
    with result.value.value as response:
        return response.status()


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
