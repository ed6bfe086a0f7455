//! End-to-end load: the host (a child process, release build, durable store,
//! every limit on) with no plugins and with the three sample plugins, against
//! a reference endpoint that only verifies the signature and parses the JSON,
//! side by side in one run. wrk generates the maximum-rate load (`load.lua`:
//! every request a unique signed event); reqwest clients the paced one.
//!
//! `cargo bench -p stateset-hooks-cli --bench load` (`LOAD_SECONDS=N` per phase,
//! default 10; `LOAD_CONNECTIONS`, default 64). Under `cargo test --benches`
//! it runs one second per phase against the test build, as a smoke test.
//!
//! `-- --store postgres` measures the PostgreSQL store instead, on a
//! throwaway cluster (as the tests start one): acknowledged req/s and
//! end-to-end events/s of one host and of two hosts sharing the database,
//! as ratios to one SQLite host in the same run, and how long after one
//! host's death the other has finished the deliveries the dead one held.
//!
//! Prints acknowledged requests per second as ratios to the reference,
//! acknowledgement latency percentiles, whether every delivery succeeded and
//! how long after the load the last one did, whether the backlog grows at
//! half the maximum rate, and the host's peak memory.

#[allow(dead_code)] // the benchmarks use a part of it
#[path = "../../tests/support/mod.rs"]
mod support;

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use stateset_hooks::Secret;
use stateset_hooks::store::{Filter, PgStore, SqliteStore, Status, Store};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The example events the load sends, one of each sample plugin's types.
const EVENTS: [&str; 3] = ["order.created", "payment.succeeded", "inventory.low_stock"];

/// Signed bodies: realistic events of all three plugins' types, each with a
/// unique event id and order id (as `load.lua` makes them for wrk), so the
/// host stores and dispatches every one and no two touch the same order's
/// key-value state.
fn bodies(n: usize, phase: &str) -> Vec<(Bytes, String)> {
    let secret = Secret::new(support::SECRET).unwrap();
    let templates: Vec<String> = EVENTS
        .iter()
        .map(|name| String::from_utf8(support::example_event(name)).unwrap())
        .collect();
    (0..n)
        .map(|i| {
            let suffix = format!("_{}_{phase}_{i}", std::process::id());
            let body = Bytes::from(unique_ids(&templates[i % templates.len()], &suffix));
            let signature = secret.sign(&body);
            (body, signature)
        })
        .collect()
}

/// `text` with `suffix` after every event id (`"evt_…"`) and order id
/// (`"ord_…"`).
fn unique_ids(text: &str, suffix: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4 * suffix.len());
    let mut rest = text;
    while let Some(at) = ["\"evt_", "\"ord_"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        let end = at + 1 + rest[at + 1..].find('"').unwrap();
        out.push_str(&rest[..end]);
        out.push_str(suffix);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The reference: verify, parse, answer. No store, no plugins.
async fn reference(listener: tokio::net::TcpListener) {
    let secret = Arc::new(Secret::new(support::SECRET).unwrap());
    let app = axum::Router::new().route(
        "/webhooks/stateset",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let secret = secret.clone();
            async move {
                let signature = headers.get("x-stateset-signature").map(|v| v.as_bytes());
                if secret.verify(&body, signature).is_err() {
                    return (StatusCode::UNAUTHORIZED, "bad signature");
                }
                match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(_) => (StatusCode::OK, r#"{"received":true}"#),
                    Err(_) => (StatusCode::BAD_REQUEST, "bad json"),
                }
            }
        }),
    );
    axum::serve(listener, app).await.unwrap();
}

/// One load phase: what was acknowledged, and how fast.
struct Run {
    acked: usize,
    refused: usize,
    elapsed: Duration,
    /// Acknowledgement latency at the 50th, 99th and 99.9th percentiles.
    percentiles: [Duration; 3],
}

impl Run {
    fn rate(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64()
    }

    fn latency_ms(&self) -> String {
        let [p50, p99, p999] = self.percentiles.map(|d| d.as_secs_f64() * 1e3);
        format!("{p50:.2} / {p99:.2} / {p999:.2}")
    }
}

/// wrk (`-t2`) with `connections` keep-alive connections for `seconds` at
/// its maximum rate against `url`, sending what `load.lua` makes.
fn wrk(url: &str, connections: usize, seconds: u64) -> Run {
    let events: Vec<String> = EVENTS
        .iter()
        .map(|name| {
            let path = support::workspace_root().join(format!("examples/events/{name}.json"));
            path.display().to_string()
        })
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/load.lua");
    let output = std::process::Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .args(["--latency", "-s", script, url])
        .env("LOAD_SECRET", support::SECRET)
        .env("LOAD_EVENTS", events.join(":"))
        .env(
            "LOAD_RUN",
            format!("{}{}", std::process::id(), support::now_ms()),
        )
        .output()
        .expect("wrk runs the load (`apt-get install wrk`; scripts/bench installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let result = stdout
        .lines()
        .find_map(|l| l.strip_prefix("wrk-result "))
        .unwrap_or_else(|| {
            panic!(
                "wrk printed no result: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let field = |name: &str| -> u64 {
        result
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {result}"))
    };
    let requests = field("requests") as usize;
    let refused = field("non_2xx") as usize;
    Run {
        acked: requests - refused,
        refused: refused + field("socket_errors") as usize,
        elapsed: Duration::from_micros(field("duration_us")),
        percentiles: ["p50_us", "p99_us", "p999_us"].map(|p| Duration::from_micros(field(p))),
    }
}

/// `connections` keep-alive clients for `seconds`, each sending as fast as it
/// can, or at `per_connection_rate` requests per second; client `c` sends to
/// `urls[c % urls.len()]` (several hosts behind one balancer).
async fn load(
    urls: &[String],
    bodies: Arc<Vec<(Bytes, String)>>,
    connections: usize,
    seconds: u64,
    per_connection_rate: Option<f64>,
) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let url = urls[c % urls.len()].clone();
            let (bodies, stop) = (bodies.clone(), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .unwrap();
                let (mut acked, mut refused, mut latencies) = (0, 0, Vec::new());
                let mut i = c;
                let interval = per_connection_rate.map(|r| Duration::from_secs_f64(1.0 / r));
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(interval) = interval {
                        next += interval;
                        tokio::time::sleep_until(next.into()).await;
                    }
                    let (body, signature) = &bodies[i % bodies.len()];
                    i += connections;
                    let sent = Instant::now();
                    let response = client
                        .post(&url)
                        .header("x-stateset-signature", signature)
                        .body(body.clone())
                        .send()
                        .await;
                    match response {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                            latencies.push(sent.elapsed());
                            acked += 1;
                        }
                        _ => refused += 1,
                    }
                }
                (acked, refused, latencies)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let (mut acked, mut refused, mut latencies) = (0, 0, Vec::new());
    for task in tasks {
        let (a, r, l) = task.await.unwrap();
        acked += a;
        refused += r;
        latencies.extend(l);
    }
    latencies.sort();
    let at = |p: f64| {
        let i = (latencies.len() as f64 * p) as usize;
        latencies
            .get(i.min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Run {
        acked,
        refused,
        elapsed,
        percentiles: [at(0.5), at(0.99), at(0.999)],
    }
}

fn peak_rss_kib(child: &Child) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Start the host; also returns how long it took from spawn to ready.
fn start_host(dir: &support::PluginDir) -> (support::ServeProcess, Duration) {
    let started = Instant::now();
    let filter = "warn,stateset_hooks=info,plugin=off,stateset_hooks::http=warn";
    let host = support::ServeProcess::start(dir, Some(filter));
    (host, started.elapsed())
}

/// A maximum-rate run, then the wait for its backlog to drain.
struct Saturated {
    run: Run,
    /// Deliveries finished per second, from the first request to the last
    /// plugin call.
    end_to_end: f64,
    backlog: usize,
    drain: Duration,
}

async fn saturate(
    urls: &[String],
    store: &dyn Store,
    bodies: Arc<Vec<(Bytes, String)>>,
    connections: usize,
    seconds: u64,
) -> Saturated {
    let done_before = succeeded(store);
    let run = load(urls, bodies, connections, seconds, None).await;
    // Plugin calls keep running after the acks: wait for the backlog to drain.
    let drained_from = Instant::now();
    let backlog = store.outstanding().unwrap_or(0);
    while store.outstanding().unwrap_or(0) > 0 && drained_from.elapsed() < Duration::from_secs(600)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain = drained_from.elapsed();
    let delivered = succeeded(store) - done_before;
    Saturated {
        end_to_end: delivered as f64 / (run.elapsed + drain).as_secs_f64(),
        run,
        backlog,
        drain,
    }
}

fn succeeded(store: &dyn Store) -> usize {
    store
        .deliveries(&Filter {
            status: Some(Status::Succeeded),
            limit: Some(usize::MAX >> 1),
            ..Filter::default()
        })
        .map_or(0, |d| d.len())
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` from tooling: nothing to list
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // then this is a smoke run that proves the benchmark works, not a measure.
    let measuring = std::env::args().any(|a| a == "--bench");
    let args: Vec<String> = std::env::args().collect();
    let postgres = args.windows(2).any(|w| w == ["--store", "postgres"])
        || std::env::var("LOAD_STORE").is_ok_and(|s| s == "postgres");
    let seconds = env_or("LOAD_SECONDS", if measuring { 10 } else { 1 });
    let connections = env_or("LOAD_CONNECTIONS", 64) as usize;
    let plugins = support::PluginDir::samples();
    let n = 1_000_000.min(seconds as usize * 40_000).max(10_000);
    let bodies = |phase: &str| Arc::new(bodies(n, phase));
    if postgres {
        return compare_stores(&plugins, bodies, connections, seconds).await;
    }
    let bodies = bodies("sqlite");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reference_url = format!(
        "http://{}/webhooks/stateset",
        listener.local_addr().unwrap()
    );
    tokio::spawn(reference(listener));
    // wrk runs as a blocking child process: off the runtime that serves
    // the reference.
    let max_rate =
        |url: String| tokio::task::spawn_blocking(move || wrk(&url, connections, seconds));
    let reference_max = max_rate(reference_url).await.unwrap();

    // The store alone: no plugins, so every event is stored and nothing runs.
    let empty = support::PluginDir::new();
    let (store_only, _) = start_host(&empty);
    let store_only_max = max_rate(store_only.url()).await.unwrap();
    drop(store_only);

    // Start-up with the three plugins: cold (empty compile cache), then warm.
    let (cold, cold_startup) = start_host(&plugins);
    drop(cold);
    let (host, warm_startup) = start_host(&plugins);
    let store = SqliteStore::open(
        &plugins.path().join("stateset-hooks.db"),
        Duration::from_secs(5),
    )
    .unwrap();
    let host_max = max_rate(host.url()).await.unwrap();
    // Plugin calls go on after the acks: how long until the backlog is done,
    // and whether every delivery succeeded.
    let drained_from = Instant::now();
    let backlog = store.outstanding().unwrap_or(0);
    while store.outstanding().unwrap_or(0) > 0 && drained_from.elapsed() < Duration::from_secs(600)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain = drained_from.elapsed();
    let delivered = succeeded(&store);

    // Half the maximum acknowledged rate, paced (reqwest clients, as wrk
    // cannot pace): latency, and whether the backlog stays flat while
    // plugins keep up.
    let half = host_max.rate() / 2.0;
    let backlog_before = store.outstanding().unwrap_or(0);
    let paced = load(
        &[host.url()],
        bodies,
        connections,
        seconds,
        Some(half / connections as f64),
    )
    .await;
    let backlog_end = store.outstanding().unwrap_or(0);
    let peak_kib = peak_rss_kib(&host.child);
    drop(host);

    let ratio = |run: &Run| run.rate() / reference_max.rate();
    println!(
        "\nload: wrk -t2 -c{connections}, {seconds} s per phase, {} cores, events of 3 types (3 sample plugins)\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| figure | value | ratio to reference |");
    println!("| --- | --- | --- |");
    println!(
        "| reference (verify + parse) acked req/s | {:.0} | 1.00 |",
        reference_max.rate()
    );
    println!(
        "| host, store only (no plugins) acked req/s | {:.0} | {:.2} |",
        store_only_max.rate(),
        ratio(&store_only_max)
    );
    println!(
        "| host, 3 sample plugins, acked req/s | {:.0} | {:.2} |",
        host_max.rate(),
        ratio(&host_max)
    );
    println!(
        "| refused (non-200 or socket error) in the max runs: store only / plugins | {} / {} | |",
        store_only_max.refused, host_max.refused
    );
    // wrk counts the responses it read before it stopped; requests still in
    // flight then were stored too, so at least every acknowledged event must
    // have its delivery succeeded.
    let verdict = if delivered >= host_max.acked && drain <= Duration::from_secs(5) {
        "every acknowledged event's delivery succeeded within 5 s of the end"
    } else {
        "NOT every acknowledged event's delivery succeeded within 5 s of the end"
    };
    println!(
        "| deliveries succeeded (acked {}), backlog at the end, drained in | {delivered}, {backlog}, {:.1} s: {verdict} | |",
        host_max.acked,
        drain.as_secs_f64()
    );
    println!(
        "| ack latency p50 / p99 / p999 at max, ms | {} | reference {} |",
        host_max.latency_ms(),
        reference_max.latency_ms()
    );
    println!(
        "| paced at half max ({half:.0} req/s): acked req/s | {:.0} | |",
        paced.rate()
    );
    println!(
        "| paced: ack latency p50 / p99 / p999, ms | {} | |",
        paced.latency_ms()
    );
    println!("| paced: backlog at start / end | {backlog_before} / {backlog_end} | |");
    println!(
        "| host peak memory (VmHWM) | {:.1} MiB | |",
        peak_kib as f64 / 1024.0
    );
    println!(
        "| start-up to ready, 3 plugins: cold / warm cache | {:.0} ms / {:.0} ms | |",
        cold_startup.as_secs_f64() * 1e3,
        warm_startup.as_secs_f64() * 1e3
    );
}

/// `--store postgres`: one SQLite host, one PostgreSQL host, two
/// PostgreSQL hosts on one database, side by side; then one of the two dies
/// holding deliveries, and the other finishes them once the lease ends.
async fn compare_stores(
    samples: &support::PluginDir,
    bodies: impl Fn(&str) -> Arc<Vec<(Bytes, String)>>,
    connections: usize,
    seconds: u64,
) {
    const LEASE_SECS: u64 = 5;
    let filter = "warn,stateset_hooks=info,plugin=off,stateset_hooks::http=warn";
    let cluster = support::postgres::Cluster::start();
    let (host, _) = start_host(samples);
    let store = SqliteStore::open(
        &samples.path().join("stateset-hooks.db"),
        Duration::from_secs(5),
    )
    .unwrap();
    let sqlite = saturate(
        &[host.url()],
        &store,
        bodies("sqlite"),
        connections,
        seconds,
    )
    .await;
    drop(host);

    // Each phase on a database of its own; every host loads the same three
    // samples from one folder (one compile cache).
    let database =
        |phase: &str| support::postgres::database_for(&cluster.url, &samples.path().join(phase));
    let serve = |url: &str| {
        let lease = LEASE_SECS.to_string();
        let flags = ["--store", url, "--store-lease-secs", &lease];
        support::ServeProcess::start_with(samples, Some(filter), &flags)
    };
    let open =
        |url: &str| PgStore::open(stateset_hooks::store::PgOptions::new(url).unwrap()).unwrap();
    let one_url = database("pg1");
    let one = serve(&one_url);
    let pg_one = saturate(
        &[one.url()],
        &open(&one_url),
        bodies("pg1"),
        connections,
        seconds,
    )
    .await;
    drop(one);

    let two_url = database("pg2");
    let mut two = [serve(&two_url), serve(&two_url)];
    let store = open(&two_url);
    let urls = two.each_ref().map(support::ServeProcess::url);
    let pg_two = saturate(&urls, &store, bodies("pg2"), connections, seconds).await;

    // A burst to the first host alone, then SIGKILL as the last is
    // acknowledged: what it held is the other's once the lease ends.
    let burst = load(
        &urls[..1],
        bodies("failover"),
        connections,
        1.max(seconds / 5),
        None,
    )
    .await;
    two[0].kill();
    let died = Instant::now();
    let held = store.outstanding().unwrap_or(0);
    while store.outstanding().unwrap_or(0) > 0 && died.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failover = died.elapsed();
    drop(two);

    println!(
        "\nload, store compared: {connections} connections, {seconds} s per phase, {} cores, 3 sample plugins\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| store, hosts | acked req/s | ratio | end-to-end events/s | ratio | backlog after, drained in |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, s) in [
        ("SQLite, one host", &sqlite),
        ("PostgreSQL, one host", &pg_one),
        ("PostgreSQL, two hosts", &pg_two),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.0} | {:.2} | {}, {:.1} s |",
            s.run.rate(),
            s.run.rate() / sqlite.run.rate(),
            s.end_to_end,
            s.end_to_end / sqlite.end_to_end,
            s.backlog,
            s.drain.as_secs_f64()
        );
    }
    println!(
        "\nfailover: a burst of {} events to one host, killed at its last ack holding {held} \
         deliveries; the other host finished them {:.1} s later (lease {LEASE_SECS} s)",
        burst.acked,
        failover.as_secs_f64()
    );
}
