//! Text a plugin or a sender controls cannot forge a host log line or drive
//! the terminal: control characters in a plugin's `Err` message are escaped
//! in the host log (text or JSON) and in the `events list` and `dlq list`
//! tables.

use std::process::Command;

use crate::support::*;

/// The bad-totals order with a forged log line for its id: the orders plugin
/// names the order's id in its error, so the sender's text goes through the
/// plugin into the host's log line.
async fn send_forged_order(host: &ServeProcess) {
    let mut body: serde_json::Value =
        serde_json::from_slice(&example_event("order.created.bad-totals")).unwrap();
    body["data"]["id"] = "ord\u{1b}[31m\nERROR forged line".into();
    let body = serde_json::to_vec(&body).unwrap();
    let sent = reqwest::Client::new()
        .post(host.url())
        .header("X-StateSet-Signature", sign(&body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_stay_one_object_per_line_whatever_a_plugin_returns() {
    let plugins = PluginDir::samples();
    let flags = ["--max-attempts", "1", "--log-format", "json"];
    let mut host = ServeProcess::start_with(&plugins, Some("info"), &flags);
    send_forged_order(&host).await;
    let line = host.wait_for("plugin failed");
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(json["level"], "WARN", "{line}");
    assert_eq!(json["fields"]["plugin"], "orders", "{line}");
    assert!(
        line.contains(r"ord\\u{1b}[31m\\nERROR forged line"),
        "{line}"
    );
    host.wait_for("delivery is dead");
    host.stop();
    for line in host.log() {
        let json: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        assert!(
            json["timestamp"].is_string() && json["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn control_characters_from_a_plugin_are_escaped_in_logs_and_tables() {
    let plugins = PluginDir::samples();
    let mut host = ServeProcess::start_with(&plugins, Some("info"), &["--max-attempts", "1"]);
    send_forged_order(&host).await;
    let line = host.wait_for("plugin failed");
    assert!(line.contains(r"ord\u{1b}[31m\nERROR forged line"), "{line}");
    host.wait_for("delivery is dead");
    assert!(
        !host.log().iter().any(|l| l.starts_with("ERROR forged")),
        "a plugin forged a log line"
    );

    for command in [&["events", "list"][..], &["dlq", "list"]] {
        let output = Command::new(BIN)
            .arg("--db")
            .arg(plugins.path().join("stateset-hooks.db"))
            .args(command)
            .output()
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(output.status.success(), "{command:?}");
        assert!(
            stdout.contains(r"ord\u{1b}[31m\nERROR forged line"),
            "{command:?}: {stdout}"
        );
        assert!(
            !stdout.contains('\u{1b}'),
            "{command:?}: a raw escape reached the terminal"
        );
    }
    host.stop();
}
