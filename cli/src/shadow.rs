//! `stateset-hooks shadow CANDIDATE.wasm --as NAME`: run stored events
//! through a candidate for a live plugin's place, without effects, and
//! compare with what the live version recorded for the same events.
//!
//! Without effects: outbound HTTP is answered by a stub and recorded, never
//! sent; kv reads see the live plugin's state as it is now and writes are
//! dropped; nothing is written to the store, which is opened read-only (so
//! a running server is undisturbed). Events run in parallel, one call per
//! core. Exits 1 when an event that succeeded live fails with the candidate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use stateset_hooks::Event;
use stateset_hooks::manifest::Subscriptions;
use stateset_hooks::registry::LoadedPlugin;
use stateset_hooks::runtime::egress::stub::{CannedResponse, HttpStub, RecordedRequest};
use stateset_hooks::runtime::kv::KvRead;
use stateset_hooks::runtime::{CallOutcome, DryRun, Failure, Runtime};
use stateset_hooks::store::{
    Cost, DeliveryRecord, EventRecord, Filter, PgStore, SqliteSnapshot, Status, Store, StoreError,
    now_ms,
};
use stateset_hooks::text::escape_controls;

use crate::run::describe_result;
use crate::serve::LimitArgs;
use crate::store_commands::Location;

/// What `shadow` was asked.
#[derive(Debug, clap::Args)]
pub struct ShadowArgs {
    /// The candidate component (.wasm).
    candidate: PathBuf,
    /// The live plugin it would replace: its events, recorded outcomes,
    /// kv state and (unless --manifest) manifest.
    #[arg(long = "as", value_name = "NAME")]
    live: String,
    /// The live plugins' directory, where NAME.toml (the live manifest) is.
    #[arg(long, value_name = "DIR", required_unless_present = "manifest")]
    plugins: Option<PathBuf>,
    /// Run the candidate under this manifest instead of the live one.
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Only events received within this long, e.g. 30m, 24h, 7d.
    #[arg(long, value_name = "DURATION", value_parser = parse_age)]
    since: Option<Duration>,
    /// Only the newest N events [default: 1000, unless --since].
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    /// Only events of this type or glob, e.g. order.* .
    #[arg(long = "type", value_name = "PATTERN")]
    event_type: Option<String>,
    /// The status every outbound request is answered with.
    #[arg(long, value_name = "STATUS", default_value_t = stateset_hooks::runtime::egress::stub::DEFAULT_STUB_STATUS)]
    stub_status: u16,
    /// Canned answers to outbound requests, before --stub-status: a JSON
    /// array of {"method", "url" (a trailing * matches a prefix), "status",
    /// "headers", "body"}.
    #[arg(long, value_name = "FILE")]
    stub: Option<PathBuf>,
    /// Calls at once [default: the cores].
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Events whose log lines differ to show.
    #[arg(long, value_name = "N", default_value_t = 5)]
    sample: usize,
    /// Print JSON, for CI.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    limits: LimitArgs,
    /// Let the manifest read this environment variable (repeat for more),
    /// as `serve --allow-plugin-env` does.
    #[arg(long, value_name = "VAR")]
    allow_plugin_env: Vec<String>,
}

fn parse_age(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: a number and a unit, e.g. 30m, 24h, 7d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

/// The store, read-only.
enum Source {
    Sqlite(Arc<SqliteSnapshot>),
    Postgres(Arc<PgStore>),
}

impl Source {
    fn open(at: &Location) -> anyhow::Result<Self> {
        let failed = |e: StoreError| anyhow::anyhow!("{e}");
        Ok(match &at.postgres {
            Some(options) => Self::Postgres(Arc::new(
                PgStore::open_read_only(options.clone()).map_err(failed)?,
            )),
            None if !at.db.exists() => bail!(
                "no database at {} (pass --db, or --store for PostgreSQL)",
                at.db.display()
            ),
            None => Self::Sqlite(Arc::new(SqliteSnapshot::open(&at.db).map_err(failed)?)),
        })
    }

    fn deliveries(&self, filter: &Filter) -> Result<Vec<DeliveryRecord>, StoreError> {
        match self {
            Self::Sqlite(db) => db.deliveries(filter),
            Self::Postgres(db) => db.deliveries(filter),
        }
    }

    fn event(&self, key: &str) -> Result<Option<EventRecord>, StoreError> {
        match self {
            Self::Sqlite(db) => db.event(key),
            Self::Postgres(db) => db.event(key),
        }
    }

    fn kv(&self) -> Arc<dyn KvRead> {
        match self {
            Self::Sqlite(db) => db.clone(),
            Self::Postgres(db) => db.clone(),
        }
    }
}

/// One stored event and its live delivery.
struct Recorded {
    live: DeliveryRecord,
    event: Event,
}

/// The live plugin's deliveries the selection names, newest first, with
/// their events; and how many were left out, by why.
fn select(
    source: &Source,
    args: &ShadowArgs,
    candidate: &LoadedPlugin,
) -> anyhow::Result<(Vec<Recorded>, BTreeMap<&'static str, usize>)> {
    let pattern = args
        .event_type
        .as_ref()
        .map(|p| Subscriptions::try_from(vec![p.clone()]))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--type: {e}"))?;
    let last = args.last.or(args.since.is_none().then_some(1000));
    let since = args
        .since
        .map(|age| now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
    const PAGE: usize = 500;
    let mut picked = Vec::new();
    let mut skipped = BTreeMap::new();
    let mut before_id = None;
    'pages: loop {
        let page = source.deliveries(&Filter {
            plugin: Some(args.live.clone()),
            since,
            before_id,
            limit: Some(PAGE),
            ..Filter::default()
        })?;
        for live in &page {
            if last.is_some_and(|n| picked.len() >= n) {
                break 'pages;
            }
            if pattern
                .as_ref()
                .is_some_and(|p| !p.matches(&live.event_type))
            {
                continue;
            }
            if !candidate.manifest.subscribes_to(&live.event_type) {
                *skipped
                    .entry("not subscribed by the candidate")
                    .or_default() += 1;
                continue;
            }
            let Some(stored) = source.event(&live.event_key)? else {
                *skipped.entry("purged since listed").or_default() += 1;
                continue;
            };
            match Event::parse(stored.body.as_bytes()) {
                Ok(event) => picked.push(Recorded {
                    live: live.clone(),
                    event: event.with_key(stored.key),
                }),
                Err(_) => *skipped.entry("stored body not an event").or_default() += 1,
            }
        }
        match page.last() {
            Some(oldest) if page.len() == PAGE => before_id = Some(oldest.id),
            _ => break,
        }
    }
    Ok((picked, skipped))
}

pub fn shadow(args: &ShadowArgs, at: &Location) -> anyhow::Result<ExitCode> {
    let grants = crate::run::grants(&args.limits, &args.allow_plugin_env)?;
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let runtime = Runtime::new(None, jobs)?;
    // The live plugin's manifest, not the candidate's: the operator grants.
    // One named with --manifest must exist; the live one may be absent
    // (the defaults).
    let manifest = match (&args.manifest, &args.plugins) {
        (Some(path), _) if !path.exists() => bail!("no manifest at {}", path.display()),
        (Some(path), _) => path.clone(),
        (None, Some(dir)) => dir.join(format!("{}.toml", args.live)),
        (None, None) => bail!("pass --plugins DIR (where the live NAME.toml is) or --manifest"),
    };
    let candidate =
        stateset_hooks::loader::load_as(&runtime, &args.candidate, &args.live, &manifest, &grants)
            .with_context(|| format!("cannot load {}", args.candidate.display()))?;
    let stub = HttpStub {
        responses: match &args.stub {
            None => Vec::new(),
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                serde_json::from_str::<Vec<CannedResponse>>(&text)
                    .with_context(|| format!("{}: not a JSON array of responses", file.display()))?
            }
        },
        otherwise: args.stub_status,
    };
    let source = Source::open(at)?;
    runtime.use_kv(source.kv());
    let (recorded, skipped) = select(&source, args, &candidate)?;
    if recorded.is_empty() {
        bail!(
            "no recorded deliveries of {:?} match (is it the live plugin's name, and has it run?)",
            args.live
        );
    }
    let prepared = candidate.prepared.clone().dry(DryRun {
        http: Arc::new(stub),
        kv: None,
    });

    // Every core calls, taking the next event as it finishes one.
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let mut outcomes: Vec<Option<CallOutcome>> = Vec::new();
    outcomes.resize_with(recorded.len(), || None);
    let results = std::sync::Mutex::new(outcomes);
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(recorded.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(r) = recorded.get(i) else { break };
                    let key = Arc::from(r.event.key());
                    let outcome = runtime
                        .call(&prepared, &key, r.event.event_type(), r.event.payload())
                        .ok();
                    results.lock().expect("results")[i] = outcome;
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let outcomes = results.into_inner().expect("results");
    let report = Report::new(args, &candidate, &recorded, &outcomes, elapsed, skipped);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    Ok(if report.outcomes.succeeded_to_failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The comparison, as printed and as `--json`.
#[derive(serde::Serialize)]
struct Report {
    plugin: String,
    candidate_version: String,
    /// The versions that ran the live attempts compared.
    live_versions: Vec<String>,
    events: usize,
    skipped: BTreeMap<&'static str, usize>,
    elapsed_ms: u128,
    events_per_second: f64,
    outcomes: Outcomes,
    changes: Vec<Change>,
    fuel: Side<Distribution>,
    time_us: Side<Distribution>,
    logs: Vec<LogDiff>,
    requests: Vec<EventRequest>,
}

#[derive(Default, serde::Serialize)]
struct Outcomes {
    unchanged: usize,
    succeeded_to_failed: usize,
    failed_to_succeeded: usize,
    error_changed: usize,
    /// Pending live (never attempted yet): nothing to compare with.
    not_run_live: usize,
    /// The candidate could not be called (the host shutting down).
    not_run: usize,
}

#[derive(serde::Serialize)]
struct Change {
    event: String,
    event_type: String,
    change: &'static str,
    live: String,
    candidate: String,
}

#[derive(serde::Serialize)]
struct Side<T> {
    live: T,
    candidate: T,
}

#[derive(serde::Serialize)]
struct Distribution {
    count: usize,
    median: Option<u64>,
    p99: Option<u64>,
    max: Option<u64>,
}

impl Distribution {
    fn of(mut values: Vec<u64>) -> Self {
        values.sort_unstable();
        let at = |q: f64| {
            let rank = ((values.len() as f64) * q).ceil() as usize;
            values.get(rank.saturating_sub(1)).copied()
        };
        Self {
            count: values.len(),
            median: at(0.5),
            p99: at(0.99),
            max: values.last().copied(),
        }
    }
}

#[derive(serde::Serialize)]
struct LogDiff {
    event: String,
    added: Vec<String>,
    removed: Vec<String>,
}

#[derive(serde::Serialize)]
struct EventRequest {
    event: String,
    #[serde(flatten)]
    request: RecordedRequest,
}

/// The error text of a live delivery, as a candidate's is described.
fn live_error(live: &DeliveryRecord) -> Option<String> {
    let failure = Failure {
        kind: live.last_failure_kind?,
        message: live.last_failure_message.clone().unwrap_or_default(),
    };
    Some(describe_result(&Err(failure)))
}

impl Report {
    fn new(
        args: &ShadowArgs,
        candidate: &LoadedPlugin,
        recorded: &[Recorded],
        outcomes: &[Option<CallOutcome>],
        elapsed: Duration,
        skipped: BTreeMap<&'static str, usize>,
    ) -> Self {
        let mut counts = Outcomes::default();
        let mut changes = Vec::new();
        let mut logs = Vec::new();
        let mut requests = Vec::new();
        let mut live_versions: Vec<String> = Vec::new();
        for (r, outcome) in recorded.iter().zip(outcomes) {
            let key = r.live.event_key.clone();
            if let Some(version) = &r.live.plugin_version
                && !live_versions.contains(version)
            {
                live_versions.push(version.clone());
            }
            let Some(outcome) = outcome else {
                counts.not_run += 1;
                continue;
            };
            requests.extend(outcome.requests.iter().map(|request| EventRequest {
                event: key.clone(),
                request: request.clone(),
            }));
            let candidate_says = describe_result(&outcome.result);
            let live_says = match r.live.status {
                Status::Succeeded => "ok".to_owned(),
                Status::Pending => "pending".to_owned(),
                Status::Failed | Status::Dead => live_error(&r.live).unwrap_or_default(),
            };
            let change = match (r.live.status, &outcome.result) {
                (Status::Pending, _) => {
                    counts.not_run_live += 1;
                    None
                }
                (Status::Succeeded, Ok(())) => None,
                (Status::Succeeded, Err(_)) => {
                    counts.succeeded_to_failed += 1;
                    Some("succeeded -> failed")
                }
                (_, Ok(())) => {
                    counts.failed_to_succeeded += 1;
                    Some("failed -> succeeded")
                }
                (_, Err(_)) if live_says != candidate_says => {
                    counts.error_changed += 1;
                    Some("error changed")
                }
                (_, Err(_)) => None,
            };
            match change {
                Some(change) => changes.push(Change {
                    event: key.clone(),
                    event_type: r.live.event_type.clone(),
                    change,
                    live: live_says,
                    candidate: candidate_says,
                }),
                None if r.live.status != Status::Pending => counts.unchanged += 1,
                None => {}
            }
            if logs.len() < args.sample && r.live.status != Status::Pending {
                let now: Vec<String> = outcome.logs.iter().map(ToString::to_string).collect();
                let added = difference(&now, &r.live.last_logs);
                let removed = difference(&r.live.last_logs, &now);
                if !added.is_empty() || !removed.is_empty() {
                    logs.push(LogDiff {
                        event: key.clone(),
                        added,
                        removed,
                    });
                }
            }
        }
        let ran: Vec<&CallOutcome> = outcomes.iter().flatten().collect();
        let live_costs: Vec<_> = recorded.iter().filter_map(|r| r.live.last_cost).collect();
        let seconds = elapsed.as_secs_f64().max(1e-9);
        Self {
            plugin: args.live.clone(),
            candidate_version: candidate.version.to_string(),
            live_versions,
            events: recorded.len(),
            skipped,
            elapsed_ms: elapsed.as_millis(),
            events_per_second: (ran.len() as f64 / seconds).round(),
            outcomes: counts,
            changes,
            fuel: Side {
                live: Distribution::of(live_costs.iter().map(|c| c.fuel).collect()),
                candidate: Distribution::of(ran.iter().map(|o| o.fuel_used).collect()),
            },
            time_us: Side {
                live: Distribution::of(live_costs.iter().map(|c| c.micros).collect()),
                candidate: Distribution::of(ran.iter().map(|o| Cost::from(*o).micros).collect()),
            },
            logs,
            requests,
        }
    }

    fn print(&self) {
        let o = &self.outcomes;
        println!(
            "shadow of {} by candidate {} (live: {})",
            self.plugin,
            self.candidate_version,
            if self.live_versions.is_empty() {
                "-".to_owned()
            } else {
                self.live_versions.join(", ")
            }
        );
        println!(
            "{} events in {} ms ({} events/s), no effects",
            self.events, self.elapsed_ms, self.events_per_second
        );
        for (why, n) in &self.skipped {
            println!("  left out: {n} ({why})");
        }
        println!();
        println!(
            "outcomes: {} unchanged, {} succeeded -> failed, {} failed -> succeeded, \
             {} error changed, {} not yet run live",
            o.unchanged,
            o.succeeded_to_failed,
            o.failed_to_succeeded,
            o.error_changed,
            o.not_run_live
        );
        if o.not_run > 0 {
            println!("  {} not run (the host was shutting down)", o.not_run);
        }
        for c in &self.changes {
            println!(
                "  {:<20} {} ({})",
                c.change,
                escape_controls(&c.event),
                escape_controls(&c.event_type)
            );
            println!("      live:      {}", c.live);
            println!("      candidate: {}", c.candidate);
        }
        println!();
        let cell = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        println!(
            "{:<16} {:>10} {:>10} {:>10} {:>8}",
            "", "median", "p99", "max", "events"
        );
        for (name, d) in [
            ("fuel live", &self.fuel.live),
            ("fuel candidate", &self.fuel.candidate),
            ("time live µs", &self.time_us.live),
            ("time cand. µs", &self.time_us.candidate),
        ] {
            println!(
                "{name:<16} {:>10} {:>10} {:>10} {:>8}",
                cell(d.median),
                cell(d.p99),
                cell(d.max),
                d.count
            );
        }
        if !self.logs.is_empty() {
            println!();
            println!("log lines that differ (a sample):");
            for diff in &self.logs {
                println!("  {}", escape_controls(&diff.event));
                for line in &diff.removed {
                    println!("    - {}", escape_controls(line));
                }
                for line in &diff.added {
                    println!("    + {}", escape_controls(line));
                }
            }
        }
        println!();
        if self.requests.is_empty() {
            println!("outbound requests: none");
        } else {
            let mut by_target: BTreeMap<(String, String, String), usize> = BTreeMap::new();
            for r in &self.requests {
                let answer = match (&r.request.status, &r.request.refused) {
                    (Some(status), _) => format!("stubbed {status}"),
                    (None, why) => format!("refused: {}", why.as_deref().unwrap_or("?")),
                };
                *by_target
                    .entry((r.request.method.clone(), r.request.url.clone(), answer))
                    .or_default() += 1;
            }
            println!(
                "outbound requests the candidate would have made (none sent): {}",
                self.requests.len()
            );
            for ((method, url, answer), n) in by_target {
                println!("  {n:>6} x {method} {} ({answer})", escape_controls(&url));
            }
        }
    }
}

/// Lines of `a` not matched by a line of `b` (as multisets, in `a`'s order).
fn difference(a: &[String], b: &[String]) -> Vec<String> {
    let mut left: Vec<&String> = b.iter().collect();
    a.iter()
        .filter(|line| match left.iter().position(|other| other == line) {
            Some(i) => {
                left.swap_remove(i);
                false
            }
            None => true,
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_percentiles() {
        assert_eq!(parse_age("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_age("30m"), Ok(Duration::from_secs(1_800)));
        assert!(parse_age("24").is_err() && parse_age("h").is_err() && parse_age("1y").is_err());
        let d = Distribution::of((1..=200).collect());
        assert_eq!((d.median, d.p99, d.max), (Some(100), Some(198), Some(200)));
        let none = Distribution::of(Vec::new());
        assert_eq!((none.median, none.max, none.count), (None, None, 0));
    }

    #[test]
    fn log_differences_count_repeated_lines() {
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let live = lines(&["a", "b", "b"]);
        let candidate = lines(&["b", "c"]);
        assert_eq!(difference(&candidate, &live), ["c"]);
        assert_eq!(difference(&live, &candidate), ["a", "b"]);
    }
}
