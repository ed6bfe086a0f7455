//! Host-side bindings, one module per released WIT version of `stateset:webhooks`.
//!
//! Each version's WIT is frozen under `wit/`, so a plugin built against an old
//! version keeps loading after a new one ships. This module owns only the
//! generated code; what the imports do lives in `host_api.rs`.

/// `stateset:webhooks@0.1.0`: `on-event` plus the `host.log` import.
pub mod v0_1_0 {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wit/v0.1.0",
    });
}
