//! Past one machine: several hosts on one PostgreSQL store, each test on a
//! throwaway cluster of its own (the Debian `postgresql` package, which
//! `scripts/test` installs; run as root).

use std::sync::Arc;

use crate::support::postgres::Cluster;
use stateset_hooks::Event;
use stateset_hooks::runtime::FailureKind;
use stateset_hooks::runtime::kv::{KvOp, KvRead};
use stateset_hooks::store::{
    Appended, Attempt, Filter, PgStore, RecordedAs, Status, Store, now_ms,
};

/// Two hosts open the store at once (their migrations take turns under
/// the advisory lock), and the same event sent to both is stored once.
#[test]
fn two_hosts_store_one_event_once() {
    let cluster = Cluster::start();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| PgStore::open(&cluster.url).unwrap());
        let b = s.spawn(|| PgStore::open(&cluster.url).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    let event =
        Arc::new(Event::parse(br#"{"id":"evt_1","type":"order.created","data":{}}"#).unwrap());
    let plugins: Vec<Arc<str>> = vec!["orders".into(), "payments".into()];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (one, two) = runtime.block_on(async {
        let one = a.append_if_new(event.clone(), plugins.clone());
        let two = b.append_if_new(event.clone(), plugins.clone());
        (one.await.unwrap().unwrap(), two.await.unwrap().unwrap())
    });
    let mut outcomes = [one.clone(), two];
    outcomes.sort_by_key(|o| matches!(o, Appended::Duplicate));
    assert!(
        matches!(&outcomes[0], Appended::New(ids) if ids.len() == 2),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Appended::Duplicate);

    // The host that appended them holds them: the other sees none due.
    let (a, b) = if matches!(one, Appended::New(_)) {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(b.outstanding().unwrap(), 2);
    assert!(
        b.due(now_ms() + 1, now_ms() + 1, &plugins, 10)
            .unwrap()
            .is_empty()
    );
    let due = a.due(now_ms() + 1, now_ms() + 1, &plugins, 10).unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].event.as_ref().unwrap().key(), "evt_1");
    let attempts = due
        .iter()
        .map(|d| Attempt {
            id: d.id,
            replays: d.replays,
            plugin_version: "v".into(),
            status: Status::Succeeded,
            next_attempt_at: now_ms(),
            failure: None,
            plugin: d.plugin.clone(),
            kv: Arc::default(),
            kv_quota: 0,
        })
        .collect();
    assert_eq!(
        a.record(attempts).unwrap(),
        [RecordedAs::Given, RecordedAs::Given]
    );
    assert_eq!(a.outstanding().unwrap(), 0);
    assert!(
        a.due(now_ms() + 1, now_ms() + 1, &plugins, 10)
            .unwrap()
            .is_empty()
    );
    // Replayed, one plugin: due again, and its kv writes commit with it;
    // a compare-and-swap that no longer holds conflicts.
    assert_eq!(b.replay_event("evt_1", Some("orders")).unwrap(), 1);
    let due = a.due(now_ms() + 1, now_ms() + 1, &plugins, 10).unwrap();
    assert_eq!(due.len(), 1);
    let kv_attempt = |ops: Vec<KvOp>, replays| Attempt {
        id: due[0].id,
        replays,
        plugin_version: "v".into(),
        status: Status::Succeeded,
        next_attempt_at: now_ms(),
        failure: None,
        plugin: "orders".into(),
        kv: ops.into(),
        kv_quota: 1 << 20,
    };
    let set = KvOp::Set {
        key: "\u{1F600}".into(),
        value: b"12".to_vec(),
        expires_at: None,
    };
    let add = KvOp::Increment {
        key: "n".into(),
        delta: 5,
    };
    let made = a
        .record(vec![kv_attempt(vec![set, add], due[0].replays)])
        .unwrap();
    assert_eq!(made, [RecordedAs::Given]);
    assert_eq!(b.kv_get("orders", "n").unwrap().as_deref(), Some(&b"5"[..]));
    assert_eq!(b.kv_keys("orders", "", 10).unwrap(), ["n", "\u{1F600}"]);
    assert_eq!(
        b.kv_usage("orders").unwrap(),
        (4 + 2) + (1 + 1),
        "bytes, not characters"
    );
    assert_eq!(b.replay_event("evt_1", Some("orders")).unwrap(), 1);
    let cas = KvOp::CompareAndSwap {
        key: "n".into(),
        expected: None,
        new: b"x".to_vec(),
    };
    let made = a
        .record(vec![kv_attempt(vec![cas], due[0].replays + 1)])
        .unwrap();
    assert!(
        matches!(&made[0], RecordedAs::Conflict(m) if m.contains("changed")),
        "{made:?}"
    );
    let stored = b.event("evt_1").unwrap().unwrap();
    let orders = stored
        .deliveries
        .iter()
        .find(|d| d.plugin == "orders")
        .unwrap();
    assert_eq!(orders.status, Status::Failed);
    assert_eq!(orders.last_failure_kind, Some(FailureKind::HostError));
    assert_eq!(b.deliveries(&Filter::default()).unwrap().len(), 2);
}

/// A host that dies holding deliveries loses them when its lease ends:
/// then another host claims and runs them, and until then none does.
#[test]
fn an_expired_lease_passes_the_delivery_to_another_host() {
    let cluster = Cluster::start();
    let short = std::time::Duration::from_millis(500);
    let dying = PgStore::open_with_lease(&cluster.url, short).unwrap();
    let other = PgStore::open_with_lease(&cluster.url, short).unwrap();
    let event = Arc::new(Event::parse(br#"{"id":"evt_2","type":"t","data":{}}"#).unwrap());
    let plugins: Vec<Arc<str>> = vec!["p".into()];
    let ticket = dying.append_if_new(event, plugins.clone());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    assert!(matches!(
        runtime.block_on(ticket).unwrap().unwrap(),
        Appended::New(_)
    ));
    let due = |store: &PgStore| store.due(now_ms(), now_ms(), &plugins, 10).unwrap().len();
    assert_eq!(due(&other), 0, "leased to the host that appended it");
    drop(dying);
    std::thread::sleep(short + std::time::Duration::from_millis(100));
    assert_eq!(due(&other), 1, "the lease ran out: claimed");
    let third = PgStore::open_with_lease(&cluster.url, short).unwrap();
    assert_eq!(due(&third), 0, "held again, by the host that claimed it");
}

/// A delivery one host releases (its queue was full) wakes the other
/// hosts at once, and one of them claims it.
#[test]
fn a_released_delivery_wakes_the_others() {
    let cluster = Cluster::start();
    let busy = PgStore::open(&cluster.url).unwrap();
    let idle = PgStore::open(&cluster.url).unwrap();
    let woken = idle.wakeups().expect("listening");
    let event = Arc::new(Event::parse(br#"{"id":"evt_3","type":"t","data":{}}"#).unwrap());
    let plugins: Vec<Arc<str>> = vec!["p".into()];
    let ticket = busy.append_if_new(event, plugins.clone());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Appended::New(ids) = runtime.block_on(ticket).unwrap().unwrap() else {
        panic!("stored")
    };
    let due = |store: &PgStore| store.due(now_ms(), now_ms(), &plugins, 10).unwrap().len();
    assert_eq!(due(&idle), 0);
    Store::release(&busy, ids);
    woken
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("woken by the release");
    assert_eq!(due(&idle), 1);
}

/// Two hosts behind one load balancer, one PostgreSQL store: events sent to
/// either (every tenth to both), and each stored once, each delivery run
/// once, the plugin's shared kv counter exact.
#[test]
fn two_hosts_share_one_store_and_run_each_delivery_once() {
    use crate::support::*;
    use serde_json::json;

    const EVENTS: usize = 120;
    let cluster = Cluster::start();
    let dirs = [PluginDir::new(), PluginDir::new()];
    for dir in &dirs {
        dir.add(
            "counter",
            "misbehave",
            Some("subscriptions = [\"order.*\"]\n"),
        );
    }
    let flags = ["--store", cluster.url.as_str()];
    let mut hosts = dirs
        .each_ref()
        .map(|dir| ServeProcess::start_with(dir, Some("info"), &flags));
    for i in 0..EVENTS {
        let body = event(
            &format!("evt_{i}"),
            "order.created",
            json!({ "misbehave": "count" }),
        );
        hosts[i % 2].send_blocking(body.clone());
        if i % 10 == 0 {
            hosts[(i + 1) % 2].send_blocking(body);
        }
    }
    let store = PgStore::open(&cluster.url).unwrap();
    let succeeded = Filter {
        status: Some(Status::Succeeded),
        ..Filter::default()
    };
    let deadline = std::time::Instant::now() + REPORT_TIMEOUT;
    while store.deliveries(&succeeded).unwrap().len() < EVENTS {
        assert!(std::time::Instant::now() < deadline, "not all delivered");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let all = store.deliveries(&Filter::default()).unwrap();
    assert_eq!(
        all.len(),
        EVENTS,
        "each event stored once, one delivery each"
    );
    assert!(all.iter().all(|d| d.attempts == 1), "each run once");
    let count = store.kv_get("counter", "count").unwrap().unwrap();
    assert_eq!(
        count,
        EVENTS.to_string().into_bytes(),
        "both hosts' increments kept"
    );
    for host in &mut hosts {
        host.stop();
    }
}

/// PostgreSQL going away is a busy store (the sender gets 503 and retries),
/// not a dead host: once it is back, the store connects again.
#[test]
fn the_store_reconnects_when_postgresql_comes_back() {
    use stateset_hooks::store::StoreError;
    let cluster = Cluster::start();
    let store = PgStore::open(&cluster.url).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let append = |id: &str| {
        let body = format!(r#"{{"id":"{id}","type":"t","data":{{}}}}"#);
        let event = Arc::new(Event::parse(body.as_bytes()).unwrap());
        runtime
            .block_on(store.append_if_new(event, vec!["p".into()]))
            .unwrap()
    };
    assert!(matches!(append("evt_before"), Ok(Appended::New(_))));
    cluster.ctl("stop");
    assert!(matches!(append("evt_down"), Err(StoreError::Busy(_))));
    assert!(matches!(store.outstanding(), Err(StoreError::Busy(_))));
    cluster.ctl("start");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match append("evt_after") {
            Ok(appended) => {
                assert!(matches!(appended, Appended::New(_)));
                break;
            }
            Err(error) => assert!(std::time::Instant::now() < deadline, "{error}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(store.outstanding().unwrap(), 2, "evt_before and evt_after");
}

/// A database migrated by a newer build is refused, naming both versions;
/// hosts starting together migrate in turn (the advisory lock).
#[test]
fn a_newer_schema_is_refused() {
    let cluster = Cluster::start();
    drop(PgStore::open(&cluster.url).unwrap());
    cluster.psql("UPDATE hooks_schema SET version = version + 1");
    let error = PgStore::open(&cluster.url).unwrap_err().to_string();
    let newer = stateset_hooks::store::PG_SCHEMA_VERSION + 1;
    assert!(
        error.contains(&format!(
            "schema version {newer}, newer than version {}",
            newer - 1
        )),
        "{error}"
    );
}
