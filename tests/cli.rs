//! The `stateset-hooks` binary as a user runs it: `serve`, `sign`, `send`, `run`.

use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn bin() -> Command {
    let mut command = Command::new(BIN);
    command
        .env_remove("RUST_LOG")
        .env("STATESET_WEBHOOK_SECRET", SECRET);
    command
}

#[test]
fn serve_refuses_to_start_without_a_secret() {
    let plugins = PluginDir::new();
    let output = bin()
        .env_remove("STATESET_WEBHOOK_SECRET")
        .args(["serve", "--listen", "127.0.0.1:0", "--plugins"])
        .arg(plugins.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no webhook secret: set STATESET_WEBHOOK_SECRET"),
        "{stderr}"
    );
}

#[test]
fn bad_options_are_refused_before_binding_naming_the_flag() {
    let plugins = PluginDir::new();
    let dir = plugins.path().to_str().unwrap();
    let cases: [(&[&str], &str); 10] = [
        (
            &["--plugins", "/no/such/dir"],
            "--plugins: /no/such/dir is not a directory",
        ),
        (
            &["--plugins", dir, "--workers", "0"],
            "--workers: must be between 1 and",
        ),
        (
            &["--plugins", dir, "--path", "hooks"],
            "--path: \"hooks\" is not a route",
        ),
        (
            &["--plugins", dir, "--timeout-ms", "0"],
            "--timeout-ms: defaults.timeout must be greater than zero",
        ),
        (
            &["--plugins", dir, "--memory-mib", "4096"],
            "--memory-mib: defaults.memory_bytes is",
        ),
        (
            &["--plugins", dir, "--max-fuel", "2000000000"],
            "--max-fuel: max.fuel is 2000000000, above the host maximum",
        ),
        (
            &["--plugins", dir, "--max-timeout-ms", "500"],
            "--timeout-ms: defaults.timeout is 1000, above max.timeout (500)",
        ),
        (
            &["--plugins", dir, "--max-connections", "0"],
            "--max-connections: must be between 1 and",
        ),
        (
            &["--plugins", dir, "--idle-timeout-ms", "0"],
            "--idle-timeout-ms: must be between 1 ms and 3600 s",
        ),
        (
            &["--plugins", dir, "--retention-days", "106751991167300"],
            "--retention-days: must be longer than zero and at most 36500 days",
        ),
    ];
    for (flags, expected) in cases {
        let output = bin()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(flags)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{flags:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        assert!(
            !stderr.contains("ready"),
            "refused before starting: {stderr}"
        );
    }
}

/// The webhook document's own recipe: openssl signs, curl sends.
#[test]
fn the_documented_curl_recipe_works_and_the_plugin_logs() {
    let plugins = PluginDir::samples();
    plugins.write("broken.wasm", b"not a component");
    let mut served = ServeProcess::start(&plugins, None);
    let script = format!(
        r#"
        WEBHOOK_SECRET="{SECRET}"
        PAYLOAD='{{"type":"order.created","data":{{"id":"order-123","status":"pending"}}}}'
        SIGNATURE=$(echo -n "$PAYLOAD" | openssl dgst -sha256 -hmac "$WEBHOOK_SECRET" | sed 's/.* //')
        curl -sS -X POST {url} \
          -H "Content-Type: application/json" \
          -H "X-StateSet-Signature: $SIGNATURE" \
          -d "$PAYLOAD"
        "#,
        url = served.url()
    );
    let output = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        r#"{"received":true}"#,
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = served.wait_for("order order-123");
    assert!(line.contains("plugin=\"orders\""), "{line}");
    assert!(
        line.contains("order order-123 created: status pending"),
        "{line}"
    );

    // `send` signs and posts a file the same way.
    let output = bin()
        .args(["send", &served.url()])
        .arg(workspace_root().join("examples/events/payment.succeeded.json"))
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "200 OK\n{\"received\":true}\n"
    );
    served.wait_for("payment pay_01JQ8ZNZ5Q7S9U1W3Y5A7C9E1G succeeded");

    // `plugins list` reads what the running server saved (every second).
    let deadline = std::time::Instant::now() + REPORT_TIMEOUT;
    let rows = loop {
        let output = bin()
            .arg("--db")
            .arg(plugins.path().join("stateset-hooks.db"))
            .args(["plugins", "list", "--json"])
            .output()
            .unwrap();
        let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let orders = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "orders")
            .cloned();
        if orders.is_some_and(|o| o["counters"]["succeeded"] == 1) {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "plugins list never showed the call: {rows}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let states: Vec<(&str, &str)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("broken", "failed"),
            ("low-stock", "active"),
            ("orders", "active"),
            ("payments", "active")
        ]
    );
    assert!(
        rows[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly component")
    );
    assert_eq!(rows[2]["subscriptions"], "order.*");
    assert_eq!(rows[2]["limits"]["timeout_ms"], 1000);
    assert_eq!(rows[0]["limits"], serde_json::Value::Null, "never loaded");

    let status = served.stop();
    let log = served.log().to_vec();
    assert!(status.success());
    let signature =
        sign(br#"{"type":"order.created","data":{"id":"order-123","status":"pending"}}"#);
    for line in &log {
        assert!(
            !line.contains(SECRET) && !line.contains(&signature),
            "leak: {line}"
        );
    }
}

#[test]
fn sign_matches_openssl() {
    let event = workspace_root().join("examples/events/order.created.json");
    let ours = bin().arg("sign").arg(&event).output().unwrap();
    let openssl = Command::new("bash")
        .args([
            "-c",
            &format!(
                "openssl dgst -sha256 -hmac '{SECRET}' < '{}' | sed 's/.* //'",
                event.display()
            ),
        ])
        .output()
        .unwrap();
    assert!(ours.status.success());
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&openssl.stdout)
    );
}

/// `run` of the `orders` sample on the example `order.created`, with
/// `--db`: its stdout, once it succeeded.
fn run_orders(db: &std::path::Path) -> String {
    let output = bin()
        .env_remove("STATESET_WEBHOOK_SECRET")
        .arg("--db")
        .arg(db)
        .arg("run")
        .arg(wasm("orders"))
        .arg(workspace_root().join("examples/events/order.created.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}");
    stdout
}

#[test]
fn run_reports_result_fuel_time_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("absent.db");
    let stdout = run_orders(&db);
    assert!(stdout.contains("result:      ok"), "{stdout}");
    let fuel: u64 = field(&stdout, "fuel used:").parse().unwrap();
    assert!((1_000..10_000_000).contains(&fuel), "{stdout}");
    assert!(field(&stdout, "time:").ends_with("ms"), "{stdout}");
    assert!(field(&stdout, "peak memory:").ends_with("KiB"), "{stdout}");
    assert!(
        stdout.contains("order ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E created"),
        "{stdout}"
    );
    // The kv writes the call would commit, shown and not committed.
    let writes: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("kv write:    "))
        .collect();
    assert_eq!(
        writes,
        [
            "compare-and-swap \"order/ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E\" (30 bytes) (not committed by run)",
            "increment \"customer/cus_01JQ2F8XW3K9M4N7P1R5T6V8YZ/orders\" by 1 (not committed by run)",
        ],
        "{stdout}"
    );
    assert!(!db.exists(), "run wrote a database");

    // With a database, run reads the plugin's state from it and changes
    // nothing there: this order was counted before, so no writes.
    drop(stateset_hooks::store::SqliteStore::open(&db, Duration::from_secs(5)).unwrap());
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "INSERT INTO plugin_kv (plugin, key, value) VALUES
                 ('orders', 'order/ord_01JQ8ZK4M7T2VX9C3N5B6R8W1E', x'00'),
                 ('orders', 'customer/cus_01JQ2F8XW3K9M4N7P1R5T6V8YZ/orders', '5');",
        )
        .unwrap();
    let before = std::fs::read(&db).unwrap();
    let stdout = run_orders(&db);
    assert!(
        stdout.contains("cus_01JQ2F8XW3K9M4N7P1R5T6V8YZ: 5 orders"),
        "{stdout}"
    );
    assert!(!stdout.contains("kv write"), "{stdout}");
    assert!(
        std::fs::read(&db).unwrap() == before,
        "run changed the database"
    );

    let output = bin()
        .arg("run")
        .arg(wasm("orders"))
        .arg(workspace_root().join("examples/events/order.created.bad-totals.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(
        stdout.contains("result:      failed (plugin-error): order ord_01JQ93B6X8Z0B2D4F6H8K0M2N4"),
        "{stdout}"
    );
}

/// `receive` prints each request on one line (control characters escaped)
/// and answers 201: the stand-in service of `scripts/demo`.
#[test]
fn receive_prints_each_request_and_answers_201() {
    use std::io::BufRead;
    let mut receiver = bin()
        .args(["receive", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(receiver.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first.strip_prefix("receiving on ").unwrap().to_owned();
    let output = Command::new("curl")
        .args([
            "-s",
            "-w",
            " %{http_code}",
            "-H",
            "idempotency-key: evt_1:low-stock",
        ])
        .args(["-d", "{\"sku\":\"A\\u0007\"}\u{1b}[2J"])
        .arg(format!("{url}/purchases?x=1"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        r#"{"received":true} 201"#
    );
    let line = lines.next().unwrap().unwrap();
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    assert_eq!(
        line,
        r#"POST /purchases?x=1 idempotency-key=evt_1:low-stock {"sku":"A\u0007"}\u{1b}[2J"#
    );
}

fn field<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {stdout}"))
        .trim()
}

/// `sign` picks a secret by the fingerprint the host logs; an unknown one
/// is refused naming those there are.
#[test]
fn sign_picks_a_secret_by_fingerprint() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), br#"{"type":"order.created","data":{}}"#).unwrap();
    let (old, new) = (
        stateset_hooks::Secret::new("old-secret").unwrap(),
        stateset_hooks::Secret::new("new-secret").unwrap(),
    );
    let sign = |fingerprint: Option<&str>| {
        let mut command = bin();
        command
            .env_remove("STATESET_WEBHOOK_SECRET")
            .env("STATESET_WEBHOOK_SECRETS", "old-secret,new-secret")
            .arg("sign")
            .arg(file.path());
        if let Some(fingerprint) = fingerprint {
            command.args(["--secret", fingerprint]);
        }
        command.output().unwrap()
    };
    let body = std::fs::read(file.path()).unwrap();
    let printed = |o: std::process::Output| String::from_utf8(o.stdout).unwrap().trim().to_owned();
    assert_eq!(printed(sign(None)), old.sign(&body), "the first by default");
    assert_eq!(printed(sign(Some(&new.fingerprint()))), new.sign(&body));
    let unknown = sign(Some("00000000"));
    assert!(!unknown.status.success());
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        said.contains(&old.fingerprint()) && said.contains(&new.fingerprint()),
        "{said}"
    );
    assert!(
        !said.contains("old-secret") && !said.contains("new-secret"),
        "{said}"
    );
    // STATESET_WEBHOOK_SECRET is taken byte for byte: a comma is part of it.
    let output = bin()
        .env("STATESET_WEBHOOK_SECRET", " one,two ")
        .arg("sign")
        .arg(file.path())
        .output()
        .unwrap();
    let whole = stateset_hooks::Secret::new(" one,two ")
        .unwrap()
        .sign(&body);
    assert_eq!(printed(output), whole);
}
