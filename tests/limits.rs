//! Every sandbox limit as an obeyed/violated pair, on a real component.
//!
//! These drive the runtime directly (no HTTP) so each pair can be set just
//! under and just over the limit; `hostile.rs` proves the same failures are
//! contained inside the running server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;
use stateset_hooks::runtime::{CallOutcome, Compiled, FailureKind, Limits, Prepared, Runtime};

struct Fixture {
    runtime: Runtime,
    compiled: Compiled,
}

impl Fixture {
    fn new() -> Self {
        let runtime = Runtime::new(None, 1).unwrap();
        let compiled = runtime
            .compile(&std::fs::read(wasm("misbehave")).unwrap())
            .unwrap();
        Self { runtime, compiled }
    }

    fn call(&self, limits: &Limits, data: serde_json::Value) -> CallOutcome {
        let payload = String::from_utf8(event("evt_limit", "order.created", data)).unwrap();
        let prepared = Prepared {
            name: "misbehave".into(),
            compiled: self.compiled.clone(),
            limits: limits.clone(),
            config: Default::default(),
        };
        self.runtime
            .call(
                &prepared,
                &Arc::from("evt_limit"),
                "order.created",
                &payload,
            )
            .expect("not cancelled")
    }
}

fn kind(outcome: &CallOutcome) -> Option<FailureKind> {
    outcome.result.as_ref().err().map(|f| f.kind)
}

fn unlimited_fuel() -> Limits {
    Limits {
        fuel: None,
        ..Limits::default()
    }
}

#[test]
fn fuel_just_under_and_just_over() {
    let fixture = Fixture::new();
    let work = json!({ "misbehave": "spin", "iterations": 200_000 });
    let needed = fixture.call(&unlimited_fuel(), work.clone()).fuel_used;
    assert!(needed > 200_000, "the spin costs fuel: {needed}");

    let limits = |fuel: u64| Limits {
        fuel: Some(fuel),
        ..Limits::default()
    };
    let under = fixture.call(&limits(needed + needed / 100), work.clone());
    assert_eq!(under.result, Ok(()), "1% more fuel than needed is enough");
    let over = fixture.call(&limits(needed - needed / 100), work);
    assert_eq!(kind(&over), Some(FailureKind::OutOfFuel));
}

#[test]
fn memory_just_under_and_just_over() {
    let fixture = Fixture::new();
    let limits = Limits {
        memory_bytes: 32 << 20,
        ..Limits::default()
    };
    let under = fixture.call(
        &limits,
        json!({ "misbehave": "allocate", "bytes": 28 << 20 }),
    );
    assert_eq!(under.result, Ok(()));
    assert!(under.peak_memory_bytes <= 32 << 20);
    let over = fixture.call(
        &limits,
        json!({ "misbehave": "allocate", "bytes": 33 << 20 }),
    );
    assert_eq!(kind(&over), Some(FailureKind::OutOfMemory));
    assert!(
        over.peak_memory_bytes <= 32 << 20,
        "never granted past the limit"
    );
    assert!(
        over.result
            .unwrap_err()
            .message
            .starts_with("memory limit of 33554432 bytes exceeded"),
    );
}

#[test]
fn deadline_just_under_and_just_over() {
    let fixture = Fixture::new();
    let limits = Limits {
        fuel: None,
        timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    // About a tenth of the deadline's worth of work (measured, not assumed).
    let probe = fixture.call(
        &limits,
        json!({ "misbehave": "spin", "iterations": 1_000_000 }),
    );
    assert_eq!(probe.result, Ok(()));
    let per_iteration = probe.elapsed.as_secs_f64() / 1e6;
    let iterations = (0.05 / per_iteration) as u64;
    let under = fixture.call(
        &limits,
        json!({ "misbehave": "spin", "iterations": iterations }),
    );
    assert_eq!(
        under.result,
        Ok(()),
        "{:?} of work in a 500 ms deadline",
        under.elapsed
    );

    let started = Instant::now();
    let over = fixture.call(&limits, json!({ "misbehave": "loop" }));
    let took = started.elapsed();
    assert_eq!(kind(&over), Some(FailureKind::Timeout));
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(
        took < Duration::from_millis(1500),
        "ended promptly: {took:?}"
    );
}

#[test]
fn stack_just_under_and_just_over() {
    let fixture = Fixture::new();
    let limits = unlimited_fuel();
    let under = fixture.call(&limits, json!({ "misbehave": "recurse", "depth": 1_000 }));
    assert_eq!(under.result, Ok(()));
    let over = fixture.call(
        &limits,
        json!({ "misbehave": "recurse", "depth": 10_000_000 }),
    );
    assert_eq!(kind(&over), Some(FailureKind::StackOverflow));
}

#[test]
fn output_just_under_and_just_over() {
    let fixture = Fixture::new();
    let limits = Limits {
        output_bytes: 4096,
        ..Limits::default()
    };
    // "flood line N" is 12-14 bytes: 200 lines fit in 4 KiB, 2,000 do not.
    let under = fixture.call(&limits, json!({ "misbehave": "log-flood", "lines": 200 }));
    assert_eq!(under.result, Ok(()));
    assert_eq!(under.logs.len(), 200);
    assert_eq!(under.dropped_output_bytes, 0);
    let over = fixture.call(&limits, json!({ "misbehave": "log-flood", "lines": 2_000 }));
    assert_eq!(over.result, Ok(()), "a flood is cut, not fatal");
    let kept: usize = over.logs.iter().map(|l| l.message.len()).sum();
    assert!(kept <= 4096 && kept > 4000, "{kept}");
    assert!(
        over.dropped_output_bytes > 20_000,
        "{}",
        over.dropped_output_bytes
    );

    // stdout and stderr share the same budget and are tagged by stream.
    let stdio = fixture.call(&limits, json!({ "misbehave": "stdout-flood", "lines": 3 }));
    let lines: Vec<_> = stdio
        .logs
        .iter()
        .map(|l| (l.source, l.message.as_str()))
        .collect();
    use stateset_hooks::runtime::LogSource::{Stderr, Stdout};
    assert_eq!(
        lines,
        [
            (Stdout, "stdout line 0"),
            (Stdout, "stdout line 1"),
            (Stdout, "stdout line 2"),
            (Stderr, "a line on stderr")
        ]
    );
}

#[test]
fn error_message_just_under_and_just_over() {
    let fixture = Fixture::new();
    let limits = Limits::default();
    let under = fixture.call(
        &limits,
        json!({ "misbehave": "huge-error", "bytes": limits.error_bytes }),
    );
    assert_eq!(under.result.unwrap_err().message.len(), limits.error_bytes);
    let over = fixture.call(
        &limits,
        json!({ "misbehave": "huge-error", "bytes": 5 << 20 }),
    );
    let failure = over.result.unwrap_err();
    assert_eq!(failure.kind, FailureKind::PluginError);
    assert!(
        failure
            .message
            .ends_with(" ... [cut: 5242880 bytes in all]"),
        "{}",
        &failure.message[4000..]
    );
    assert!(failure.message.len() < limits.error_bytes + 64);
}

#[test]
fn denied_capabilities_fail_inside_the_plugin() {
    let fixture = Fixture::new();
    let limits = Limits::default();
    let message = |data| fixture.call(&limits, data).result.unwrap_err().message;
    let file = message(json!({ "misbehave": "read-file", "path": "/etc/passwd" }));
    assert!(file.starts_with("read-file denied:"), "{file}");
    let env = message(json!({ "misbehave": "read-env" }));
    assert!(
        env.starts_with("read-env denied: environment variable not found (0 vars)"),
        "{env}"
    );
    let socket = message(json!({ "misbehave": "connect" }));
    assert!(socket.starts_with("connect denied:"), "{socket}");
}
