//! Host-side bindings, one module per released WIT version of `stateset:webhooks`.
//!
//! Each version's WIT is frozen under `wit/`, so a plugin built against an old
//! version keeps loading after a new one ships: the linker offers every
//! version's `host` interface, and a component imports the one it was built
//! against (or none). `on-event` is the same in every version so far, so one
//! version's export bindings call them all; a version that changes the export
//! gets its own arm where `Compiled` is built. The `host` imports are
//! defined against the store in `mod.rs` (so they can charge fuel); these
//! modules give them their types.
//!
//! Exports are called async so that a call can be abandoned at its deadline
//! even while the plugin waits inside a host call (a sleep, a poll); the
//! `host` imports are quick and stay synchronous.

/// `stateset:webhooks@0.1.0`: `on-event` plus the `host.log` import.
pub mod v0_1_0 {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wit/v0.1.0",
        exports: { default: async },
    });
}

/// `stateset:webhooks@0.2.0`: 0.1.0 plus `host.config-get`.
pub mod v0_2_0 {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wit/v0.2.0",
        exports: { default: async },
    });
}

/// `stateset:webhooks@0.3.0`: 0.2.0 plus `host.delivery-key` and the `kv`
/// interface.
pub mod v0_3_0 {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wit/v0.3.0",
        exports: { default: async },
    });
}
