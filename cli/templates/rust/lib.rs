//! {{name}}: a stateset-hooks plugin. Handles `{{event}}` (see `{{name}}.toml`).

wit_bindgen::generate!({ path: "wit", world: "plugin" });

use stateset::webhooks::host::{LogLevel, log};

struct Plugin;

impl Guest for Plugin {
    fn on_event(event_type: String, payload: String) -> Result<(), String> {
        let event: serde_json::Value =
            serde_json::from_str(&payload).map_err(|e| format!("invalid event JSON: {e}"))?;
        let id = event["data"]["id"].as_str().unwrap_or("(no id)");
        log(LogLevel::Info, &format!("{{name}} handled {event_type} for {id}"));
        // Return Err("reason".into()) to record the delivery as failed (it is retried).
        Ok(())
    }
}

export!(Plugin);
