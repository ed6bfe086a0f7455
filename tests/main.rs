//! The product's integration tests: the real server over real HTTP, the
//! `stateset-hooks` binary as a user runs it, and real plugin components.
//!
//! One test binary, one module per concern: the host (and wasmtime) is
//! linked once, not once per file. Run one concern with its module path,
//! e.g. `cargo test -p stateset-hooks-cli --test integration receiver::`.

mod support;

mod cli;
mod connections;
mod console;
mod deliverable;
mod durability;
mod egress;
mod hostile;
mod kv;
mod languages;
mod lifecycle;
mod limits;
mod plugins;
mod quarantine;
mod receiver;
mod reload;
mod rotation;
mod scale_out;
mod shadow;
mod standard;
mod traces;
mod untrusted_text;
