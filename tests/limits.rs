//! Every sandbox limit as an obeyed/violated pair, on a real component.
//!
//! These drive the runtime directly (no HTTP) so each pair can be set just
//! under and just over the limit; `hostile.rs` proves the same failures are
//! contained inside the running server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;
use stateset_hooks::runtime::{
    CallOutcome, Compiled, FailureKind, LINE_OVERHEAD_BYTES, Limits, MAX_LINES_PER_CALL, NotRun,
    Prepared, Runtime,
};

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
        self.try_call(limits, data).expect("not cancelled")
    }

    fn try_call(&self, limits: &Limits, data: serde_json::Value) -> Result<CallOutcome, NotRun> {
        let payload = String::from_utf8(event("evt_limit", "order.created", data)).unwrap();
        let prepared = Prepared::new("misbehave", self.compiled.clone(), limits.clone());
        self.runtime.call(
            &prepared,
            &Arc::from("evt_limit"),
            "order.created",
            &payload,
        )
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
        output_bytes: 32 << 10,
        ..Limits::default()
    };
    // "flood line N" is 12-14 bytes plus the per-line overhead: 200 lines fit
    // in 32 KiB, 2,000 do not.
    let under = fixture.call(&limits, json!({ "misbehave": "log-flood", "lines": 200 }));
    assert_eq!(under.result, Ok(()));
    assert_eq!(under.logs.len(), 200);
    assert_eq!(under.dropped_output_bytes, 0);
    let over = fixture.call(&limits, json!({ "misbehave": "log-flood", "lines": 2_000 }));
    assert_eq!(over.result, Ok(()), "a flood is cut, not fatal");
    let cost: usize = over
        .logs
        .iter()
        .map(|l| l.message.len() + LINE_OVERHEAD_BYTES)
        .sum();
    assert!(cost <= 32 << 10 && cost > (32 << 10) - 100, "{cost}");
    assert_eq!(over.logs.len() + over.dropped_output_lines, 2_000);
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

/// How far past its deadline a call may end on this noisy shared machine;
/// the deadline is accurate to a timer tick (see docs/BENCHMARKS.md).
const DEADLINE_SLACK: Duration = Duration::from_millis(500);

#[test]
fn the_deadline_covers_waiting_in_host_calls() {
    let fixture = Fixture::new();
    let limits = Limits {
        timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let under = fixture.call(&limits, json!({ "misbehave": "sleep", "ms": 50 }));
    assert_eq!(under.result, Ok(()), "a short wait within the deadline");
    for over in [
        json!({ "misbehave": "sleep", "ms": 3_600_000 }),
        json!({ "misbehave": "sleep-forever" }),
    ] {
        let started = Instant::now();
        let outcome = fixture.call(&limits, over.clone());
        let took = started.elapsed();
        assert_eq!(kind(&outcome), Some(FailureKind::Timeout), "{over}");
        assert!(
            took >= limits.timeout && took < limits.timeout + DEADLINE_SLACK,
            "{over} took {took:?}"
        );
    }
}

#[test]
fn a_cut_reaches_a_call_waiting_in_a_host_call() {
    let fixture = Fixture::new();
    let limits = Limits {
        timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    std::thread::scope(|scope| {
        let call = scope.spawn(|| {
            let started = Instant::now();
            let ended = fixture.try_call(&limits, json!({ "misbehave": "sleep-forever" }));
            (ended.map(|o| o.result), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        fixture.runtime.cancel_calls();
        let (ended, took) = call.join().unwrap();
        assert_eq!(ended, Err(NotRun::Cancelled));
        assert!(
            took < Duration::from_millis(300) + DEADLINE_SLACK,
            "{took:?}"
        );
    });
}

/// Five million empty `host.log` calls: each costs fuel, so a metered call
/// runs out; unmetered, the deadline ends it. Either way the host keeps (and
/// logs) at most `MAX_LINES_PER_CALL` lines.
#[test]
fn a_flood_of_empty_log_lines_is_bounded() {
    let fixture = Fixture::new();
    let lines = |n: u64| json!({ "misbehave": "empty-log-flood", "lines": n });
    let under = fixture.call(&Limits::default(), lines(500));
    assert_eq!(under.result, Ok(()));
    assert_eq!(under.logs.len(), 500);
    assert_eq!(under.dropped_output_lines, 0);

    let metered = fixture.call(&Limits::default(), lines(5_000_000));
    assert_eq!(kind(&metered), Some(FailureKind::OutOfFuel));
    assert_eq!(metered.logs.len(), MAX_LINES_PER_CALL);
    assert!(metered.dropped_output_lines > 0);

    let unmetered = fixture.call(&unlimited_fuel(), lines(5_000_000));
    assert!(
        matches!(kind(&unmetered), None | Some(FailureKind::Timeout)),
        "{:?}",
        unmetered.result
    );
    assert_eq!(unmetered.logs.len(), MAX_LINES_PER_CALL);
}

/// Tables are host memory too: a million-element table fits a 16 MiB limit
/// and not a 4 MiB one.
#[test]
fn table_growth_counts_against_the_memory_limit() {
    let runtime = Runtime::new(None, 1).unwrap();
    let compiled = runtime.compile(&table_grow_component()).unwrap();
    let call = |memory_mib: usize| {
        let prepared = Prepared::new(
            "tables",
            compiled.clone(),
            Limits {
                memory_bytes: memory_mib << 20,
                ..Limits::default()
            },
        );
        let key = Arc::from("evt_tables");
        runtime
            .call(&prepared, &key, "order.created", "{}")
            .unwrap()
    };
    let under = call(16);
    assert_eq!(under.result, Ok(()));
    assert!(
        under.peak_memory_bytes >= 8_000_000,
        "{}",
        under.peak_memory_bytes
    );
    assert_eq!(kind(&call(4)), Some(FailureKind::OutOfMemory));
}
