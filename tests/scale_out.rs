//! Past one machine: several hosts on one PostgreSQL store, each test on a
//! throwaway cluster of its own (the Debian `postgresql` package, which
//! `scripts/test` installs; run as root).

use std::io::Write as _;
use std::sync::Arc;

use crate::support::postgres::Cluster;
use stateset_hooks::Event;
use stateset_hooks::runtime::FailureKind;
use stateset_hooks::runtime::kv::{KvOp, KvRead};
use stateset_hooks::store::{
    Appended, Attempt, DeliveryId, Filter, PgStore, RecordedAs, Status, Store, now_ms,
};

/// An attempt of `plugin` on delivery `id` with these kv writes (within a
/// 1 MiB quota).
fn attempt(id: i64, replays: i64, status: Status, plugin: &str, kv: Vec<KvOp>) -> Attempt {
    Attempt {
        id,
        replays,
        plugin_version: "v".into(),
        status,
        next_attempt_at: now_ms(),
        failure: None,
        // A NUL, which PostgreSQL text cannot hold, kept all the same.
        logs: vec![format!("info: attempt on {id}\0")],
        plugin: plugin.into(),
        kv: kv.into(),
        kv_quota: 1 << 20,
        cost: None,
    }
}

/// Append event `id` (type `t`) for `plugins` on `store`, which then holds
/// the deliveries: their ids.
fn append(store: &PgStore, id: &str, plugins: &[Arc<str>]) -> Vec<DeliveryId> {
    let body = format!(r#"{{"id":"{id}","type":"t","data":{{}}}}"#);
    let event = Arc::new(Event::parse(body.as_bytes()).unwrap());
    let ticket = store.append_if_new(event, plugins.to_vec());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    match runtime.block_on(ticket).unwrap().unwrap() {
        Appended::New(ids) => ids,
        Appended::Duplicate => panic!("{id} stored before"),
    }
}

/// A lease the tests can outlast.
const SHORT_LEASE: std::time::Duration = std::time::Duration::from_millis(500);

/// How a host reaches `cluster`, holding what it claims for [`SHORT_LEASE`].
fn short_leases(cluster: &Cluster) -> stateset_hooks::store::PgOptions {
    let mut options = cluster.options();
    options.lease = SHORT_LEASE;
    options
}

/// How many deliveries of `plugins` `store` claims as due now.
fn claim_due(store: &PgStore, plugins: &[Arc<str>]) -> usize {
    store.due(now_ms(), now_ms(), plugins, 10).unwrap().len()
}

/// Two hosts open the store at once (their migrations take turns under
/// the advisory lock), and the same event sent to both is stored once.
#[test]
fn two_hosts_store_one_event_once() {
    let cluster = Cluster::start();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| PgStore::open(cluster.options()).unwrap());
        let b = s.spawn(|| PgStore::open(cluster.options()).unwrap());
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
        .map(|d| attempt(d.id, d.replays, Status::Succeeded, &d.plugin, vec![]))
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
    let kv_attempt =
        |ops: Vec<KvOp>, replays| attempt(due[0].id, replays, Status::Succeeded, "orders", ops);
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
    // Only the host holding a delivery records it: one that ran it without
    // a claim (lost, released, or recorded by another) keeps no kv writes.
    let stray = KvOp::Increment {
        key: "n".into(),
        delta: 1,
    };
    let made = b
        .record(vec![kv_attempt(vec![stray], due[0].replays + 1)])
        .unwrap();
    assert_eq!(made, [RecordedAs::Superseded]);
    assert_eq!(b.kv_get("orders", "n").unwrap().as_deref(), Some(&b"5"[..]));
    assert_eq!(
        a.due(now_ms() + 1, now_ms() + 1, &plugins, 10)
            .unwrap()
            .len(),
        1
    );
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
    assert_eq!(
        orders.last_logs,
        [format!("info: attempt on {}\0", orders.id)]
    );
    assert_eq!(b.deliveries(&Filter::default()).unwrap().len(), 2);
    // The console's filters: one event, a time window, a page after an id.
    let only = |filter: Filter| b.deliveries(&filter).unwrap().len();
    let one = Filter {
        event_key: Some("evt_1".into()),
        ..Filter::default()
    };
    assert_eq!(only(one.clone()), 2);
    let later = Filter {
        since: Some(now_ms() + 60_000),
        ..one.clone()
    };
    assert_eq!(only(later), 0);
    let earlier = Filter {
        until: Some(now_ms() + 60_000),
        before_id: stored.deliveries.iter().map(|d| d.id).max(),
        ..one
    };
    assert_eq!(only(earlier), 1);
}

/// A host holds its deliveries as long as it lives (it renews the lease);
/// one that dies loses them when its lease ends: then another host claims
/// and runs them, and until then none does.
#[test]
fn an_expired_lease_passes_the_delivery_to_another_host() {
    let cluster = Cluster::start();
    let leased = short_leases(&cluster);
    let dying = PgStore::open(leased.clone()).unwrap();
    let other = PgStore::open(leased.clone()).unwrap();
    let plugins: Vec<Arc<str>> = vec!["p".into()];
    append(&dying, "evt_2", &plugins);
    let due = |store: &PgStore| claim_due(store, &plugins);
    assert_eq!(due(&other), 0, "leased to the host that appended it");
    std::thread::sleep(SHORT_LEASE * 3);
    assert_eq!(due(&other), 0, "renewed: its host still holds it");
    drop(dying);
    std::thread::sleep(SHORT_LEASE + std::time::Duration::from_millis(100));
    assert_eq!(due(&other), 1, "the lease ran out: claimed");
    let third = PgStore::open(leased.clone()).unwrap();
    assert_eq!(due(&third), 0, "held again, by the host that claimed it");
}

/// A host whose store work is stuck (its one pooled connection waits on a
/// lock another session holds) still renews its leases: no other host
/// claims what it holds, and its attempt, once the lock goes, is the one
/// recorded.
#[test]
fn a_host_stuck_on_the_store_keeps_its_leases() {
    let cluster = Cluster::start();
    let mut leased = short_leases(&cluster);
    leased.pool_size = 1;
    let stuck = PgStore::open(leased.clone()).unwrap();
    let other = PgStore::open(leased).unwrap();
    let plugins: Vec<Arc<str>> = vec!["p".into()];
    let ids = append(&stuck, "evt_5", &plugins);
    let due = |store: &PgStore| claim_due(store, &plugins);
    // Another session holds plugin p's kv lock: the attempt's record (it
    // writes kv) waits for it on `stuck`'s only pooled connection.
    let mut holder = cluster.session();
    let mut to_holder = holder.stdin.take().unwrap();
    writeln!(
        to_holder,
        "SELECT pg_advisory_lock(hashtextextended('kv:p', 0));"
    )
    .unwrap();
    let locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted";
    while cluster.query(locks) != "1" {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::scope(|s| {
        let recording = s.spawn(|| {
            let add = KvOp::Increment {
                key: "n".into(),
                delta: 1,
            };
            stuck.record(vec![attempt(ids[0], 0, Status::Succeeded, "p", vec![add])])
        });
        std::thread::sleep(SHORT_LEASE * 3);
        assert!(!recording.is_finished(), "the record waits on the lock");
        assert_eq!(due(&other), 0, "renewed all the while: still held");
        // The session ends, and its lock with it.
        drop(to_holder);
        holder.wait().unwrap();
        assert_eq!(recording.join().unwrap().unwrap(), [RecordedAs::Given]);
    });
    assert_eq!(other.kv_get("p", "n").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(due(&other), 0, "recorded");
}

/// A delivery one host releases (its queue was full) wakes the other
/// hosts at once, and one of them claims it.
#[test]
fn a_released_delivery_wakes_the_others() {
    let cluster = Cluster::start();
    let busy = PgStore::open(cluster.options()).unwrap();
    let idle = PgStore::open(cluster.options()).unwrap();
    let woken = idle.wakeups().expect("listening");
    let plugins: Vec<Arc<str>> = vec!["p".into()];
    let ids = append(&busy, "evt_3", &plugins);
    let due = |store: &PgStore| claim_due(store, &plugins);
    assert_eq!(due(&idle), 0);
    Store::release(&busy, ids);
    woken
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("woken by the release");
    assert_eq!(due(&idle), 1);
}

/// A host shutting down gives up what it still holds (its queue, its cut
/// calls): another host claims it at once, not when the lease ends.
#[test]
fn a_host_stopping_hands_over_what_it_held() {
    let cluster = Cluster::start();
    let stopping = PgStore::open(cluster.options()).unwrap();
    let other = PgStore::open(cluster.options()).unwrap();
    let plugins: Vec<Arc<str>> = vec!["p".into(), "q".into()];
    append(&stopping, "evt_4", &plugins);
    let due = |store: &PgStore| claim_due(store, &plugins);
    assert_eq!(due(&other), 0, "held by the host that appended them");
    stopping.release_held();
    assert_eq!(due(&other), 2, "handed over");
}

/// Two hosts behind a load balancer on one PostgreSQL store: 5,000 events
/// round-robin, every tenth also sent to the other host (500 duplicates).
/// One host is SIGKILLed mid-stream and started again. Every event is
/// acknowledged (the balancer sends to the live host), stored once, and
/// delivered; a run is lost only when its host died before recording it (a
/// live host renews its leases, however long its queue, so no two live
/// hosts run one delivery); the plugin's shared kv counter is exact, since
/// a call's kv writes commit with its recorded attempt.
#[test]
fn two_hosts_one_store_one_dies() {
    use crate::support::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, RwLock};

    const EVENTS: usize = 5_000;
    let cluster = Cluster::start();
    let dirs = [PluginDir::new(), PluginDir::new()];
    for dir in &dirs {
        dir.add(
            "counter",
            "misbehave",
            Some("subscriptions = [\"order.*\"]\n"),
        );
    }
    // Renewed every third of it; how long the dead host's deliveries wait.
    let flags = ["--store", cluster.url.as_str(), "--store-lease-secs", "5"];
    let start = |dir| ServeProcess::start_with(dir, Some("info"), &flags);
    let mut hosts = [start(&dirs[0]), start(&dirs[1])];
    let urls = Arc::new(RwLock::new(hosts.each_ref().map(ServeProcess::url)));
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..EVENTS)
            .map(|i| {
                let data = serde_json::json!({ "misbehave": "count" });
                event(&format!("evt_{i}"), "order.created", data)
            })
            .collect(),
    );

    // Eight clients; each event goes to host i % 2, or to the other host
    // when that one does not answer 200 (as a load balancer would).
    let (next, acked) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let duplicates = Arc::new(Mutex::new(Vec::new()));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let began = std::time::Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (urls, bodies, next, acked, duplicates) = (
                urls.clone(),
                bodies.clone(),
                next.clone(),
                acked.clone(),
                duplicates.clone(),
            );
            runtime.spawn(async move {
                let client = reqwest::Client::new();
                let send = async |host: usize, body: &[u8]| {
                    for attempt in 0.. {
                        let url = urls.read().unwrap()[(host + attempt) % 2].clone();
                        let response = post_signed(&client, &url, body.to_vec()).await;
                        if let Ok(response) = response
                            && response.status() == 200
                        {
                            let answer: serde_json::Value = response.json().await.unwrap();
                            // A retry may find the event stored: the host
                            // died after the commit, before its answer.
                            return (answer["duplicate"] == true, attempt > 0);
                        }
                        assert!(attempt < 200, "no host acknowledged the event");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    unreachable!()
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let (duplicate, retried) = send(i % 2, body).await;
                    assert!(
                        !duplicate || retried,
                        "evt_{i}: first sent, yet a duplicate"
                    );
                    acked.fetch_add(1, Ordering::Relaxed);
                    if i % 10 == 0 {
                        let (again, _) = send((i + 1) % 2, body).await;
                        duplicates.lock().unwrap().push(again);
                    }
                }
            })
        })
        .collect();

    // Mid-stream, host 0 dies; a second later it starts again.
    while acked.load(Ordering::Relaxed) < EVENTS / 2 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    hosts[0].kill();
    let killed_at = now_ms();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let restarted = start(&dirs[0]);
    urls.write().unwrap()[0] = restarted.url();
    let dead = std::mem::replace(&mut hosts[0], restarted);
    for client in clients {
        runtime.block_on(client).unwrap();
    }
    assert_eq!(acked.load(Ordering::Relaxed), EVENTS);
    let duplicates = duplicates.lock().unwrap();
    assert_eq!(duplicates.len(), EVENTS / 10);
    assert!(
        duplicates.iter().all(|d| *d),
        "a second send is a duplicate"
    );

    let store = PgStore::open(cluster.options()).unwrap();
    let succeeded = Filter {
        status: Some(Status::Succeeded),
        ..Filter::default()
    };
    let deadline = std::time::Instant::now() + REPORT_TIMEOUT;
    eprintln!("all acknowledged after {:?}", began.elapsed());
    while store.deliveries(&succeeded).unwrap().len() < EVENTS {
        if std::time::Instant::now() > deadline {
            let all = store.deliveries(&Filter::default()).unwrap();
            let left: Vec<_> = all
                .iter()
                .filter(|d| d.status != Status::Succeeded)
                .collect();
            let warnings: Vec<_> = hosts
                .iter_mut()
                .flat_map(|host| host.log().to_vec())
                .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                .collect();
            panic!(
                "{} of {} not delivered: {:#?}\nthe hosts warned: {warnings:#?}",
                left.len(),
                all.len(),
                &left[..left.len().min(3)]
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    eprintln!("all delivered after {:?}", began.elapsed());
    let all = store.deliveries(&Filter::default()).unwrap();
    assert_eq!(all.len(), EVENTS, "each event stored once, one delivery");
    let count = store.kv_get("counter", "count").unwrap().unwrap();
    assert_eq!(count, EVENTS.to_string().into_bytes(), "counted once each");

    // Every call each process made, from the plugin's own log line
    // `count N after evt_I at MS`: by event, which process ran it, when.
    let mut runs: std::collections::HashMap<String, Vec<(usize, u64)>> = Default::default();
    for host in &mut hosts {
        host.stop();
    }
    let mut dead = dead;
    let logs = [
        dead.log().to_vec(),
        hosts[0].log().to_vec(),
        hosts[1].log().to_vec(),
    ];
    for (process, log) in logs.iter().enumerate() {
        for line in log {
            let Some((_, call)) = line.split_once(" after evt_") else {
                continue;
            };
            let (n, rest) = call.split_once(" at ").unwrap();
            let at = rest.split_whitespace().next().unwrap().parse().unwrap();
            runs.entry(format!("evt_{n}"))
                .or_default()
                .push((process, at));
        }
    }
    assert_eq!(runs.len(), EVENTS, "every event's call logged");
    // A run counts as an attempt unless its host died before recording it:
    // no live host ran a delivery another host also ran (its lease held,
    // however long its queue). A failed attempt (a call cut at its time
    // limit on a loaded machine) runs again, recorded both times.
    let attempts: std::collections::HashMap<&str, u32> = all
        .iter()
        .map(|d| (d.event_key.as_str(), d.attempts))
        .collect();
    let mut died_with = 0;
    for (event, calls) in &runs {
        let (dead, live): (Vec<_>, Vec<_>) = calls.iter().partition(|(p, _)| *p == 0);
        assert!(
            dead.iter().all(|(_, at)| *at <= killed_at),
            "{event}: run by the dead host after it died: {calls:?}"
        );
        assert!(
            live.len() as u32 <= attempts[event.as_str()],
            "{event}: {} live runs, {} recorded: {calls:?}\nthe hosts warned: {:#?}",
            live.len(),
            attempts[event.as_str()],
            logs.iter()
                .flatten()
                .filter(|line| ["WARN", "ERROR", "does not count"]
                    .iter()
                    .any(|cause| line.contains(cause)))
                .take(40)
                .collect::<Vec<_>>()
        );
        if !dead.is_empty() && !live.is_empty() {
            died_with += 1;
        }
    }
    eprintln!("{died_with} of {EVENTS} deliveries ran again after the host died");
}

/// PostgreSQL going away is a busy store (the sender gets 503 and retries),
/// not a dead host: once it is back, the store connects again.
#[test]
fn the_store_reconnects_when_postgresql_comes_back() {
    use stateset_hooks::store::StoreError;
    let cluster = Cluster::start();
    let store = PgStore::open(cluster.options()).unwrap();
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

/// PostgreSQL stopped and started while events arrive: meanwhile every
/// event gets 503 with `Retry-After`, never 200 for an event that is not
/// committed (each acknowledged one is in the store afterwards); the host
/// stays up, says so in its log, acknowledges again once the server is
/// back, and delivers everything.
#[test]
fn postgresql_restarting_under_load_loses_nothing() {
    use crate::support::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    let cluster = Cluster::start();
    let dir = PluginDir::new();
    dir.add(
        "counter",
        "misbehave",
        Some("subscriptions = [\"order.*\"]\n"),
    );
    let mut host = ServeProcess::start_with(&dir, Some("info"), &["--store", &cluster.url]);
    let (url, stop) = (host.url(), Arc::new(AtomicBool::new(false)));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let (refused, others) = (Arc::new(Mutex::new(0)), Arc::new(Mutex::new(Vec::new())));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (url, stop, acked) = (url.clone(), stop.clone(), acked.clone());
            let (refused, others) = (refused.clone(), others.clone());
            runtime.spawn(async move {
                let client = reqwest::Client::new();
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let id = format!("evt_{c}_{n}");
                    let data = serde_json::json!({ "misbehave": "count" });
                    let body = event(&id, "order.created", data);
                    let response = post_signed(&client, &url, body)
                        .await
                        .expect("the host stays up");
                    match response.status().as_u16() {
                        200 => acked.lock().unwrap().push(id),
                        503 if response.headers().contains_key("retry-after") => {
                            *refused.lock().unwrap() += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                        other => others.lock().unwrap().push(other),
                    }
                }
            })
        })
        .collect();
    let acked_count = || acked.lock().unwrap().len();
    let wait_for = |n: usize| {
        let deadline = std::time::Instant::now() + REPORT_TIMEOUT;
        while acked_count() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "not acknowledged again"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    wait_for(200);
    cluster.ctl("stop");
    std::thread::sleep(std::time::Duration::from_secs(2));
    cluster.ctl("start");
    let before = acked_count();
    wait_for(before + 200);
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        runtime.block_on(client).unwrap();
    }
    assert!(
        *refused.lock().unwrap() > 0,
        "refused while PostgreSQL was down"
    );
    assert_eq!(*others.lock().unwrap(), Vec::<u16>::new());

    let store = PgStore::open(cluster.options()).unwrap();
    let acked = acked.lock().unwrap();
    let deadline = std::time::Instant::now() + REPORT_TIMEOUT;
    let stored = loop {
        let all = store.deliveries(&Filter::default()).unwrap();
        if all.iter().all(|d| d.status == Status::Succeeded) {
            break all;
        }
        assert!(std::time::Instant::now() < deadline, "the workers resumed");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let stored: std::collections::HashSet<_> = stored.into_iter().map(|d| d.event_key).collect();
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged, not stored: {lost:?}");
    let log = host.log().join("\n");
    assert!(log.contains("reconnecting"), "{log}");
    assert!(log.contains("PostgreSQL connection open again"), "{log}");
    // The store's outage failed calls as the host's error, not the plugin's.
    assert!(!log.contains("quarantined"), "{log}");
    assert!(host.stop().success());
}

/// TLS to the store: with the CA that signed the server's certificate
/// trusted (`--store-ca`), every connection is encrypted; without it the
/// store refuses to connect rather than trust an unknown certificate.
#[test]
fn the_store_speaks_tls_and_verifies_the_server() {
    let cluster = Cluster::start_tls();
    let untrusted = PgStore::open(cluster.options()).unwrap_err().to_string();
    assert!(untrusted.contains("certificate"), "{untrusted}");

    let mut trusted = cluster.options();
    trusted.ca_file = Some(cluster.ca());
    let store = PgStore::open(trusted).unwrap();
    assert_eq!(store.outstanding().unwrap(), 0);
    let connections = cluster.query(
        "SELECT count(*) FILTER (WHERE s.ssl) || '/' || count(*)
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()",
    );
    let n = stateset_hooks::store::DEFAULT_POOL_SIZE + 3;
    assert_eq!(
        connections,
        format!("{n}/{n}"),
        "the pool, appends, lease renewal, LISTEN"
    );
}

/// A database migrated by a newer build is refused, naming both versions;
/// hosts starting together migrate in turn (the advisory lock).
#[test]
fn a_newer_schema_is_refused() {
    let cluster = Cluster::start();
    drop(PgStore::open(cluster.options()).unwrap());
    cluster.psql("UPDATE hooks_schema SET version = version + 1");
    let error = PgStore::open(cluster.options()).unwrap_err().to_string();
    let newer = stateset_hooks::store::PG_SCHEMA_VERSION + 1;
    assert!(
        error.contains(&format!(
            "schema version {newer}, newer than version {}",
            newer - 1
        )),
        "{error}"
    );
}

/// Retention, one body for both stores: events all of whose deliveries
/// succeeded are deleted once old enough, the rest are kept; kv entries
/// whose TTL ran out are deleted.
#[test]
fn retention_purges_alike_on_both_stores() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = stateset_hooks::store::SqliteStore::open(
        &dir.path().join("hooks.db"),
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    let postgres = PgStore::open(cluster.options()).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for store in [&sqlite as &dyn Store, &postgres] {
        let mut ids = Vec::new();
        for key in ["evt_done", "evt_dead", "evt_waiting"] {
            let body = format!(r#"{{"id":"{key}","type":"t","data":{{}}}}"#);
            let event = Arc::new(Event::parse(body.as_bytes()).unwrap());
            let Appended::New(new) = runtime
                .block_on(store.append_if_new(event, vec!["p".into()]))
                .unwrap()
                .unwrap()
            else {
                panic!("stored")
            };
            ids.extend(new);
        }
        let ttl = KvOp::Set {
            key: "short".into(),
            value: b"1".to_vec(),
            expires_at: Some(now_ms() - 1),
        };
        store
            .record(vec![
                attempt(ids[0], 0, Status::Succeeded, "p", vec![ttl]),
                attempt(ids[1], 0, Status::Dead, "p", vec![]),
            ])
            .unwrap();
        assert_eq!(store.purge_succeeded(now_ms() + 1).unwrap(), 1, "{store:?}");
        assert!(store.event("evt_done").unwrap().is_none());
        assert!(store.event("evt_dead").unwrap().is_some());
        assert!(store.event("evt_waiting").unwrap().is_some());
        assert_eq!(store.purge_succeeded(now_ms() - 60_000).unwrap(), 0);
        assert_eq!(store.purge_expired_kv(now_ms()).unwrap(), 1, "{store:?}");
        assert_eq!(store.kv_usage("p").unwrap(), 0);
    }
}
