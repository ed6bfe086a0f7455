//! Rotating the webhook secret without a restart: the secrets file read
//! again on SIGHUP, under continuous traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use serde_json::json;
use stateset_hooks::Secret;

use crate::support::*;

/// Old only, old and new, new only: events keep coming, signed with
/// whichever secret the sender is on, and none is refused or lost. An
/// unreadable file keeps the secrets as they were. The log names which
/// secret each event matched, by fingerprint.
#[test]
fn a_rotation_under_traffic_refuses_and_loses_nothing() {
    let plugins = PluginDir::new();
    let file = plugins.path().join("secrets");
    std::fs::write(&file, "# the sender's secret\nold-secret-0001\n").unwrap();
    let mut host = ServeProcess::start_with(
        &plugins,
        Some("info"),
        &["--secrets-file", file.to_str().unwrap()],
    );
    let (old, new) = (
        Secret::new("old-secret-0001").unwrap(),
        Secret::new("new-secret-0002").unwrap(),
    );

    // The sender: one request at a time; phase 0 signs with the old secret,
    // 1 alternates, 2 signs with the new.
    let phase = Arc::new(AtomicU8::new(0));
    let (sent, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let url = host.url();
    let sender = {
        let (phase, sent, stop, old, new) = (
            phase.clone(),
            sent.clone(),
            stop.clone(),
            old.clone(),
            new.clone(),
        );
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let client = reqwest::Client::new();
            let mut refused = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let n = sent.load(Ordering::Relaxed);
                let body = event(&format!("evt_rot_{n}"), "order.created", json!({}));
                let secret = match phase.load(Ordering::Relaxed) {
                    0 => &old,
                    1 if n % 2 == 0 => &old,
                    _ => &new,
                };
                let status = runtime.block_on(async {
                    client
                        .post(&url)
                        .header("X-StateSet-Signature", secret.sign(&body))
                        .body(body)
                        .send()
                        .await
                        .unwrap()
                        .status()
                });
                if status != 200 {
                    refused.push((n, status));
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            refused
        })
    };
    let pid = host.child.id().to_string();
    let hangup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status();
        assert!(status.unwrap().success());
    };
    let after = |more: usize| {
        let from = sent.load(Ordering::Relaxed);
        while sent.load(Ordering::Relaxed) < from + more {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };

    after(50);
    std::fs::write(&file, "old-secret-0001\nnew-secret-0002\n").unwrap();
    hangup();
    host.wait_for("webhook secrets replaced");
    phase.store(1, Ordering::Relaxed);
    after(50);
    // The sender is on the new secret (and its last old request answered)
    // before the host drops the old one.
    phase.store(2, Ordering::Relaxed);
    after(2);
    // An empty file is refused: the secrets stay.
    std::fs::write(&file, "# nothing yet\n").unwrap();
    hangup();
    host.wait_for("holds no secret; the secrets stay as they were");
    after(20);
    std::fs::write(&file, "new-secret-0002\n").unwrap();
    hangup();
    let replaced = host.wait_for("webhook secrets replaced");
    assert!(
        replaced.contains(&new.fingerprint()) && !replaced.contains(&old.fingerprint()),
        "{replaced}"
    );
    after(50);
    stop.store(true, Ordering::Relaxed);
    let refused = sender.join().unwrap();
    assert!(
        refused.is_empty(),
        "refused during the rotation: {refused:?}"
    );

    // Now the old secret is refused.
    let body = event("evt_rot_old", "order.created", json!({}));
    let status = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .args(["-H", &format!("X-StateSet-Signature: {}", old.sign(&body))])
        .args(["--data-binary", &String::from_utf8(body).unwrap()])
        .arg(host.url())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&status.stdout), "401");

    let total = sent.load(Ordering::Relaxed);
    assert!(host.stop().success());
    let log = host.log().join("\n");
    for secret in [&old, &new] {
        assert!(
            log.contains(&format!("secret=\"{}\"", secret.fingerprint())),
            "events matched {} by fingerprint",
            secret.fingerprint()
        );
    }
    assert!(!log.contains("old-secret-0001") && !log.contains("new-secret-0002"));
    let db = rusqlite::Connection::open(plugins.path().join("stateset-hooks.db")).unwrap();
    let stored: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM events WHERE key LIKE 'evt_rot_%'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(stored as usize, total, "every acknowledged event is stored");
}
