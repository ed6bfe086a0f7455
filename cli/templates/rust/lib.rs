//! {{name}}: a stateset-hooks plugin. Handles `{{event}}` (see `{{name}}.toml`).
//!
//! The SDK (in `sdk/`) gives typed events (`event.data::<Order>()`), the host
//! log, `config("key")` from the manifest, `kv` (state committed with each
//! delivery) and `http` (outbound calls to the hosts the manifest allows).

use stateset_hooks_sdk::{Event, Plugin, export_plugin, info};

struct Handler;

impl Plugin for Handler {
    fn on_event(event: Event) -> Result<(), String> {
        let id = event.raw_data()["id"].as_str().unwrap_or("(no id)");
        info(&format!("{{name}} handled {} for {id}", event.event_type));
        // Return Err("reason".into()) to record the delivery as failed (it is retried).
        // Acting, once the manifest allows it:
        //   let seen = stateset_hooks_sdk::kv::incr("events", 1)?;
        //   stateset_hooks_sdk::http::post_json("https://api.example.com/hook", &body)?.error_for_status()?;
        Ok(())
    }
}

export_plugin!(Handler);
