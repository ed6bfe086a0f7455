"""{{name}}: a stateset-hooks plugin. Handles `{{event}}` (see `{{name}}.toml`)."""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports.host import LogLevel, log


class WitWorld(wit_world.WitWorld):
    def on_event(self, event_type: str, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError as e:
            raise Err(f"invalid event JSON: {e}")
        data = event.get("data") or {}
        log(LogLevel.INFO, f"{{name}} handled {event_type} for {data.get('id', '(no id)')}")
        # raise Err("reason") to record the delivery as failed (it is retried).
