//! `stateset-hooks test PLUGIN.wasm CASES_DIR`: a plugin's own test cases,
//! run without a server, a store or a network. Each `*.json` file in the
//! directory is one case: an event, the key-value state before, canned
//! answers to the outbound requests, and what must come of it (ok or the
//! error, log lines, the requests made, the state after). Prints a table;
//! exits non-zero when a case fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use stateset_hooks::Event;
use stateset_hooks::registry::LoadedPlugin;
use stateset_hooks::runtime::egress::stub::{CannedResponse, HttpStub, RecordedRequest};
use stateset_hooks::runtime::kv::MemoryKv;
use stateset_hooks::runtime::{CallOutcome, DryRun, Runtime};
use stateset_hooks::text::escape_controls;

use crate::run::describe_result;
use crate::serve::LimitArgs;

/// One case file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// The webhook body: an envelope with `type` and `data`, or the path of
    /// a file holding one (relative to the case).
    event: serde_json::Value,
    /// The plugin's key-value state before the call (text values).
    #[serde(default)]
    kv: BTreeMap<String, String>,
    /// Answers to outbound requests; any other gets `http_otherwise`.
    #[serde(default)]
    http: Vec<CannedResponse>,
    /// The status of a request no `http` entry answers.
    #[serde(default = "default_status")]
    http_otherwise: u16,
    #[serde(default)]
    expect: Expect,
}

fn default_status() -> u16 {
    stateset_hooks::runtime::egress::stub::DEFAULT_STUB_STATUS
}

/// What must come of a case. Unset parts are not checked, except the
/// result: ok unless `error` or `ok = false` says otherwise.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    ok: Option<bool>,
    /// The call fails with a message containing this.
    error: Option<String>,
    /// Each appears in some log line (`level: message`).
    #[serde(default)]
    logs: Vec<String>,
    /// Exactly these requests, in this order (`[]`: none at all).
    requests: Option<Vec<ExpectedRequest>>,
    /// These keys hold these values after the call (`null`: absent); other
    /// keys are not checked.
    #[serde(default)]
    kv: BTreeMap<String, Option<String>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedRequest {
    method: Option<String>,
    url: String,
    /// The body contains this.
    body_contains: Option<String>,
}

/// What `test` was asked.
pub struct Args<'a> {
    pub plugin: &'a Path,
    pub cases: &'a Path,
    pub manifest: Option<&'a Path>,
    pub limits: &'a LimitArgs,
    pub allow_env: &'a [String],
}

pub fn test(args: &Args) -> anyhow::Result<ExitCode> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(args.cases)
        .with_context(|| format!("cannot read {}", args.cases.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.json cases in {}", args.cases.display());
    }
    let runtime = Runtime::new(None, 1)?;
    let grants = crate::run::grants(args.limits, args.allow_env)?;
    let plugin = crate::run::load(&runtime, args.plugin, args.manifest, &grants)?;
    println!("{} {}", plugin.name, plugin.version);
    let width = files
        .iter()
        .map(|f| display_name(f).len())
        .max()
        .unwrap_or(0);
    let mut failed = 0;
    for file in &files {
        let (verdict, fuel, detail) = match run_case(&runtime, &plugin, file) {
            Ok((outcome, problems)) if problems.is_empty() => {
                ("ok", outcome.fuel_used.to_string(), String::new())
            }
            Ok((outcome, problems)) => ("FAIL", outcome.fuel_used.to_string(), problems.join("; ")),
            Err(error) => ("FAIL", "-".into(), format!("{error:#}")),
        };
        if verdict != "ok" {
            failed += 1;
        }
        let row = format!(
            "{:<width$}  {verdict:<4}  fuel {fuel:>10}  {}",
            display_name(file),
            escape_controls(&detail)
        );
        println!("{}", row.trim_end());
    }
    let passed = files.len() - failed;
    let cases = if files.len() == 1 { "case" } else { "cases" };
    println!("{} {cases}: {passed} passed, {failed} failed", files.len());
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn display_name(file: &Path) -> String {
    file.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// Run one case; its outcome and every way it missed its expectation.
fn run_case(
    runtime: &Runtime,
    plugin: &LoadedPlugin,
    file: &Path,
) -> anyhow::Result<(CallOutcome, Vec<String>)> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let case: Case = serde_json::from_str(&text).context("not a test case")?;
    let body = match &case.event {
        serde_json::Value::String(path) => {
            let path = file.parent().unwrap_or(Path::new(".")).join(path);
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?
        }
        event => serde_json::to_vec(event)?,
    };
    let event = Event::parse(&body).context("`event` is not a webhook event")?;
    let mut problems = Vec::new();
    if !plugin.manifest.subscribes_to(event.event_type()) {
        problems.push(format!(
            "the manifest does not subscribe to {}: the host would never deliver it",
            event.event_type()
        ));
    }
    let state = Arc::new(MemoryKv::new(
        case.kv.into_iter().map(|(k, v)| (k, v.into_bytes())),
    ));
    let prepared = plugin.prepared.clone().dry(DryRun {
        http: Arc::new(HttpStub {
            responses: case.http,
            otherwise: case.http_otherwise,
        }),
        kv: Some(state.clone()),
    });
    let outcome = runtime.call(
        &prepared,
        &Arc::from(event.key()),
        event.event_type(),
        event.payload(),
    )?;
    let expect = case.expect;
    let want_ok = expect.ok.unwrap_or(expect.error.is_none());
    match (&outcome.result, want_ok) {
        (Ok(()), false) => problems.push("expected a failure, got ok".into()),
        (Err(_), true) => problems.push(format!(
            "expected ok, got {}",
            describe_result(&outcome.result)
        )),
        (Err(failure), false) => {
            if let Some(wanted) = &expect.error
                && !failure.message.contains(wanted.as_str())
            {
                problems.push(format!(
                    "expected an error containing {wanted:?}, got {}",
                    describe_result(&outcome.result)
                ));
            }
        }
        (Ok(()), true) => {}
    }
    let lines: Vec<String> = outcome.logs.iter().map(ToString::to_string).collect();
    for wanted in &expect.logs {
        if !lines.iter().any(|line| line.contains(wanted.as_str())) {
            problems.push(format!("no log line contains {wanted:?}"));
        }
    }
    if let Some(wanted) = &expect.requests {
        problems.extend(check_requests(wanted, &outcome.requests));
    }
    if !expect.kv.is_empty() {
        if outcome.result.is_ok()
            && let Err(refused) = state.apply(&outcome.kv_writes)
        {
            problems.push(format!("its kv writes would not commit: {refused}"));
        }
        let after = state.entries();
        for (key, wanted) in &expect.kv {
            let held = after
                .get(key)
                .map(|v| String::from_utf8_lossy(v).into_owned());
            if held != *wanted {
                problems.push(format!("kv {key:?} is {held:?}, expected {wanted:?}"));
            }
        }
    }
    Ok((outcome, problems))
}

/// How the requests made differ from those expected, in order.
fn check_requests(wanted: &[ExpectedRequest], made: &[RecordedRequest]) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, want) in wanted.iter().enumerate() {
        let Some(got) = made.get(i) else {
            problems.push(format!("request {} to {} was not made", i + 1, want.url));
            continue;
        };
        let method_ok = want
            .method
            .as_ref()
            .is_none_or(|m| m.eq_ignore_ascii_case(&got.method));
        let body_ok = want
            .body_contains
            .as_ref()
            .is_none_or(|b| got.body.contains(b.as_str()));
        if !method_ok || got.url != want.url || !body_ok {
            problems.push(format!(
                "request {}: expected {} {}{}, got {} {} with body {:?}",
                i + 1,
                want.method.as_deref().unwrap_or("any method"),
                want.url,
                want.body_contains
                    .as_ref()
                    .map_or(String::new(), |b| format!(" containing {b:?}")),
                got.method,
                got.url,
                got.body
            ));
        }
        if let Some(why) = &got.refused {
            problems.push(format!("request {} was refused: {why}", i + 1));
        }
    }
    for extra in made.iter().skip(wanted.len()) {
        problems.push(format!("unexpected request {} {}", extra.method, extra.url));
    }
    problems
}
