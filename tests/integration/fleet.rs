//! Many processes as one: the shared cache tier on a real Redis, the PostgreSQL engine's
//! migrations, claims and replay protection shared between processes, and three `midcall
//! serve` processes on one database with one killed and the database restarted.

use std::collections::{BTreeMap, BTreeSet};
use std::future::ready;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::json;

use midcall::cache::SharedCacheConfig;
use midcall::events::{DeliveryLog, Event, EventBus, EventType};
use midcall::exec::{Budget, CacheStatus, Status};
use midcall::{ActionSet, Automations, Call, CallInfo, MapSecrets, Runtime, Secret};

use crate::support::servers::{Reply, TestServer};
use crate::support::services::{shared_postgres, Postgres, Redis};
use crate::support::{call_info, load_toml, loopback_policy, wait_until, AGENT, WAIT};

const FLEET_SECRET: &str = "fleet-secret-0123456789abcdef";

fn lookup_set(origin: &str) -> ActionSet {
    load_toml(&format!(
        "{AGENT}[[actions]]\nname = \"lookup\"\ndescription = \"d\"\nurl = \"{origin}/c?p={{{{call.from_number}}}}\"\ncache = {{ ttl_s = 300, scope = \"tenant\" }}\nextract = {{ \"c.v\" = \"$.v\" }}\ndedupe = false\non_failure = {{ say = \"fallback\" }}\n\n[[actions]]\nname = \"change\"\ndescription = \"d\"\nmethod = \"POST\"\nurl = \"{origin}/change\"\ninvalidates = [\"lookup\"]\ndedupe = false\n"
    ))
    .unwrap()
}

fn fleet_runtime(redis: &str, secret: &str) -> Runtime {
    Runtime::builder()
        .egress(loopback_policy())
        .shared_cache(
            SharedCacheConfig::new(redis, Secret::new(secret))
                .unwrap()
                .op_timeout(Duration::from_millis(50)),
        )
        .build()
        .unwrap()
}

fn call_in(tenant: &str, id: &str) -> Call {
    Call::new(CallInfo {
        tenant: tenant.into(),
        id: id.into(),
        ..call_info()
    })
}

async fn run(rt: &Runtime, set: &ActionSet, action: &str, call: &mut Call) -> midcall::Outcome {
    rt.execute(
        set.action(action).unwrap(),
        call,
        json!({}),
        &Budget::new(Duration::from_secs(5)),
    )
    .await
}

/// The cache entries Redis holds.
fn redis_entries(redis: &Redis) -> usize {
    let port = redis.port.to_string();
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port, "--scan", "--pattern", "midcall:c:*"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Waits until Redis holds `n` cache entries (a put runs on its own task).
async fn wait_for_entries(redis: &Redis, n: usize) {
    wait_until(&format!("redis to hold {n} entries"), WAIT, || {
        ready(redis_entries(redis) == n)
    })
    .await;
}

/// Process A fills the shared tier; process B (its own in-process cache, its own connection)
/// hits it; another tenant, or a process with another fleet secret, never does; an
/// invalidation on B reaches A's own cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_on_b_for_an_entry_filled_by_a_and_invalidation_reaches_every_process() {
    let redis = Redis::start();
    let server = TestServer::http(|r, n| {
        if r.uri.starts_with("/change") {
            Reply::ok(json!({}))
        } else {
            Reply::ok(json!({"v": n}))
        }
    })
    .await;
    let set = lookup_set(&server.origin());
    let a = fleet_runtime(&redis.url(), FLEET_SECRET);
    let b = fleet_runtime(&redis.url(), FLEET_SECRET);
    a.check_shared_cache(Duration::from_secs(2)).await.unwrap();
    b.check_shared_cache(Duration::from_secs(2)).await.unwrap();

    let out = run(&a, &set, "lookup", &mut call_in("acme", "c1")).await;
    assert_eq!((out.status, out.cache), (Status::Ok, CacheStatus::Miss));
    wait_for_entries(&redis, 1).await;
    let mut cb = call_in("acme", "c2");
    let out = run(&b, &set, "lookup", &mut cb).await;
    assert_eq!(
        (out.status, out.cache),
        (Status::CacheHit, CacheStatus::Hit),
        "B hits what A filled"
    );
    assert_eq!(out.llm_result, json!({"c.v": 1}));
    assert_eq!(server.request_count(), 1, "one upstream request for both");

    // Another tenant never sees it.
    let out = run(&b, &set, "lookup", &mut call_in("globex", "c3")).await;
    assert_eq!(out.cache, CacheStatus::Miss);
    // Another fleet (another secret) computes other keys.
    let other = fleet_runtime(&redis.url(), "another-fleet-secret-000000");
    other
        .check_shared_cache(Duration::from_secs(2))
        .await
        .unwrap();
    let out = run(&other, &set, "lookup", &mut call_in("acme", "c4")).await;
    assert_eq!(out.cache, CacheStatus::Miss);
    assert_eq!(server.request_count(), 3);

    // B changes the data: A's own cache drops the entry too (pub/sub), and Redis's goes.
    let out = run(&b, &set, "change", &mut call_in("acme", "c5")).await;
    assert_eq!(out.status, Status::Ok);
    let (a, set) = (&a, &set);
    wait_until(
        "A's cached entry to be invalidated by B's change",
        WAIT,
        || async move {
            run(a, set, "lookup", &mut call_in("acme", "c6"))
                .await
                .cache
                == CacheStatus::Miss
        },
    )
    .await;
}

/// Redis stopped mid-test: actions still succeed, as misses, well within their budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_costs_nothing_but_the_hit() {
    let mut redis = Redis::start();
    let server = TestServer::http(|_, n| Reply::ok(json!({"v": n}))).await;
    let set = lookup_set(&server.origin());
    let a = fleet_runtime(&redis.url(), FLEET_SECRET);
    a.check_shared_cache(Duration::from_secs(2)).await.unwrap();
    redis.stop();
    for i in 0..20 {
        // A different caller each time: every one is a miss in both tiers.
        let mut c = Call::new(CallInfo {
            from_number: format!("+1555000{i:04}"),
            ..call_info()
        });
        let started = Instant::now();
        let out = run(&a, &set, "lookup", &mut c).await;
        let took = started.elapsed();
        assert_eq!(
            (out.status, out.cache),
            (Status::Ok, CacheStatus::Miss),
            "{i}"
        );
        assert!(
            took < Duration::from_secs(2),
            "call {i} took {took:?} with Redis down (each Redis operation is capped at 50 ms here)"
        );
    }
    // Back up: the tier is used again (a new caller each time: a miss, so a write).
    redis.restart();
    let (a, set, redis) = (&a, &set, &redis);
    let mut i = 0;
    wait_until(
        "the tier to be written again once Redis is back",
        WAIT,
        || {
            i += 1;
            let mut c = Call::new(CallInfo {
                from_number: format!("+1555100{i:04}"),
                ..call_info()
            });
            async move {
                run(a, set, "lookup", &mut c).await;
                redis_entries(redis) > 0
            }
        },
    )
    .await;
}

#[test]
fn bad_cache_urls_and_secrets_are_clear_errors_without_the_password() {
    let e = SharedCacheConfig::new("http://u:hunter2@h/", Secret::new(FLEET_SECRET)).unwrap_err();
    assert!(!e.is_transient(), "a wrong URL is the operator's to fix");
    let e = e.to_string();
    assert!(
        e.contains("not a Redis URL") && !e.contains("hunter2"),
        "{e}"
    );
    let e = SharedCacheConfig::new("redis://127.0.0.1:6379", Secret::new("short")).unwrap_err();
    assert!(!e.is_transient());
    let e = e.to_string();
    assert!(e.contains("16 bytes"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cache_url_fails_the_start_check_naming_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://:hunter2@127.0.0.1:{port}");
    let rt = fleet_runtime(&url, FLEET_SECRET);
    let e = rt
        .check_shared_cache(Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(
        e.is_transient(),
        "an unreachable server may answer later: {e}"
    );
    let e = e.to_string();
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
}

// ---- PostgreSQL ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_once_newer_refused_and_errors_hide_the_password() {
    let pg = shared_postgres();
    let url = pg.database();
    let set = load_toml(AGENT).unwrap();
    // Eight processes' worth of openers at once on an empty database.
    let opened = futures_util::future::join_all((0..8).map(|_| {
        let url = url.clone();
        let set = set.clone();
        async move {
            let bus = EventBus::builder(&url)
                .webhooks(&set)
                .deliver(false)
                .build()?;
            bus.close().await;
            Ok::<_, String>(())
        }
    }))
    .await;
    assert!(opened.iter().all(|r| r.is_ok()), "{opened:?}");
    let db = url.rsplit('/').next().unwrap();
    assert_eq!(pg.psql(db, "SELECT version FROM schema_version"), "1");
    assert_eq!(pg.psql(db, "SELECT count(*) FROM schema_version"), "1");

    pg.psql(db, "UPDATE schema_version SET version = 99");
    let e = DeliveryLog::open(&url).unwrap_err();
    assert!(!e.is_transient(), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("schema version 99") && e.contains("newer midcall"),
        "{e}"
    );
    assert!(e.contains(db), "names the database: {e}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bad = format!("postgres://midcall:hunter2@127.0.0.1:{port}/x");
    let e = EventBus::builder(&bad).deliver(false).build().unwrap_err();
    assert!(
        matches!(&e, midcall::events::BusError::Store(s) if s.is_transient()),
        "a server that is not there may be later: {e:?}"
    );
    let e = e.to_string();
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(!e.contains("hunter2") && e.contains("***"), "{e}");
    let e = DeliveryLog::open("postgres://x@[::1:bad/")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a PostgreSQL URL"), "{e}");
}

fn hook_set(url: &str) -> ActionSet {
    load_toml(&format!(
        "{AGENT}[[webhooks]]\nlabel = \"h\"\nurl = \"{url}\"\nsubscriptions = [\"message\"]\nsigning_secret = \"{{{{secrets.WHSEC}}}}\"\n"
    ))
    .unwrap()
}

fn secrets() -> Arc<MapSecrets> {
    Arc::new(
        MapSecrets::new()
            .with("WHSEC", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .with("INBOUND_WHSEC", "whsec_dGVzdC1rZXktZm9yLWluYm91bmQ="),
    )
}

/// Two workers (two pools, as two processes would have) on one database: every event is sent
/// once, and per-call order holds across both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_outbox_never_send_one_attempt_twice_and_keep_call_order() {
    let got: Arc<Mutex<Vec<(String, i64, String)>>> = Arc::default();
    let g = got.clone();
    let server = TestServer::http(move |r, _| {
        let j = r.json();
        g.lock().unwrap().push((
            j["call_id"].as_str().unwrap().to_string(),
            j["payload"]["n"].as_i64().unwrap(),
            r.header("webhook-id").unwrap().to_string(),
        ));
        Reply::After(
            Duration::from_millis(1),
            Box::new(Reply::Json(200, json!({}))),
        )
    })
    .await;
    let url = shared_postgres().database();
    let set = hook_set(&format!("{}/h", server.origin()));
    let build = || {
        EventBus::builder(&url)
            .webhooks(&set)
            .secrets(secrets())
            .egress(loopback_policy())
            .build()
            .unwrap()
    };
    let (w1, w2) = (build(), build());
    for i in 0..300 {
        let call = CallInfo {
            id: format!("call_{}", i % 30),
            ..call_info()
        };
        let bus = if i % 2 == 0 { &w1 } else { &w2 };
        bus.publish_durable(&Event::new(EventType::Message, json!({"n": i})), &call)
            .await
            .unwrap();
    }
    // Every delivery recorded as delivered: nothing is left to be sent again.
    let log = DeliveryLog::open(&url).unwrap();
    wait_until("300 recorded as delivered", WAIT, || {
        ready(log.deliveries(None, Some("delivered"), 1000).unwrap().len() == 300)
    })
    .await;
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 300, "no attempt was sent twice");
    let ids: BTreeSet<&String> = got.iter().map(|(_, _, id)| id).collect();
    assert_eq!(ids.len(), 300);
    let mut per_call: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (c, n, _) in &got {
        per_call.entry(c.as_str()).or_default().push(*n);
    }
    for (c, ns) in per_call {
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, sorted, "call {c} in order");
    }
    w1.close().await;
    w2.close().await;
}

/// An idle worker in one process is woken by another process's commit (`NOTIFY`), not at its
/// next poll: 20 events published one at a time by a publisher that delivers nothing, each
/// waited for, arrive in well under the ~10 s that the idle poll (up to 1 s each, 0.5 s on
/// average) would take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_one_process_wakes_an_idle_worker_in_another() {
    let server = TestServer::http(|_, _| Reply::Json(200, json!({}))).await;
    let url = shared_postgres().database();
    let set = hook_set(&format!("{}/h", server.origin()));
    let bus = |deliver: bool| {
        EventBus::builder(&url)
            .webhooks(&set)
            .secrets(secrets())
            .egress(loopback_policy())
            .deliver(deliver)
            .build()
            .unwrap()
    };
    let (publisher, worker) = (bus(false), bus(true));
    // The worker's listening connection is up once a first event has been woken for.
    publisher
        .publish_durable(
            &Event::new(EventType::Message, json!({"n": -1})),
            &call_info(),
        )
        .await
        .unwrap();
    wait_until("the first event", WAIT, || {
        ready(server.request_count() == 1)
    })
    .await;
    let started = Instant::now();
    for i in 0..20 {
        let call = CallInfo {
            id: format!("call_{i}"),
            ..call_info()
        };
        publisher
            .publish_durable(&Event::new(EventType::Message, json!({"n": i})), &call)
            .await
            .unwrap();
        wait_until("the event", WAIT, || ready(server.request_count() == i + 2)).await;
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "20 events took {took:?}: the idle worker waited for its poll instead of being notified"
    );
    publisher.close().await;
    worker.close().await;
}

/// One signed webhook delivered to two processes starts one run; the second answer is what a
/// replay gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_webhook_id_on_two_processes_starts_one_run() {
    let url = shared_postgres().database();
    let set = Arc::new(
        load_toml(&format!(
            "{AGENT}[[automations]]\nid = \"signed\"\ntrigger = {{ on = \"webhook\" }}\nauth = {{ signing_secret = \"{{{{secrets.INBOUND_WHSEC}}}}\" }}\nsteps = [ {{ send_webhook = {{ url = \"http://127.0.0.1:9/x\" }} }} ]\n"
        ))
        .unwrap(),
    );
    let start = || {
        let rt = Runtime::builder()
            .egress(loopback_policy())
            .secrets(secrets())
            .build()
            .unwrap();
        let bus = EventBus::builder(&url)
            .webhooks(&set)
            .secrets(secrets())
            .egress(loopback_policy())
            .deliver(false)
            .build()
            .unwrap();
        Automations::builder(set.clone(), rt, bus).start().unwrap()
    };
    let (p1, p2) = (start(), start());
    for round in 0..20 {
        let wid = format!("msg_inbound_{round}");
        let (r1, r2) = tokio::join!(
            p1.start_webhook_once("signed", json!({"x": round}), Some(&wid)),
            p2.start_webhook_once("signed", json!({"x": round}), Some(&wid)),
        );
        let oks = [&r1, &r2].iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 1, "round {round}: {r1:?} {r2:?}");
        let refused = if r1.is_ok() { &r2 } else { &r1 };
        assert!(
            matches!(refused, Err(midcall::StartError::Replayed(id)) if *id == wid),
            "{refused:?}"
        );
    }
    let runs = p1.log().unwrap().runs(None, None, 100).unwrap();
    assert_eq!(runs.len(), 20);
    p1.shutdown(Duration::from_secs(1)).await;
    p2.shutdown(Duration::from_secs(1)).await;
}

// ---- three `midcall serve` processes on one database ----

const KEY: &str = "k3y-for-the-fleet";

struct Serve {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Drop for Serve {
    /// A failing test must not leave servers running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn_serve(file: &std::path::Path, db: &str, cache: &str) -> Serve {
    let (child, addr, lines) = crate::support::spawn_serve(
        file,
        &[
            "--db",
            db,
            "--cache-url",
            cache,
            "--attempt-timeout-ms",
            "1000",
            // A loaded 2-core CI machine can take more than the default 5 ms to answer a
            // first Redis GET; these tests are about what crosses processes, not the deadline.
            "--cache-op-timeout-ms",
            "1000",
        ],
        &[
            ("MIDCALL_SECRET_INBOUND_KEY", KEY),
            ("MIDCALL_SECRET_CACHE_KEY", FLEET_SECRET),
            (
                "MIDCALL_SECRET_WHSEC",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
        ],
    )
    .await;
    // Keep reading so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Serve { child, addr }
}

/// POSTs a webhook start; the status.
async fn start_run(addr: std::net::SocketAddr, automation: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v1/automations/{automation}/webhook HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Three processes, a kill and a database restart on a 2-core machine: a minute for each wait,
/// which only a lost event or run can exceed.
const LONG: Duration = Duration::from_secs(60);

/// 1,000 events published durably by one process and 100 webhook-started runs spread over
/// three `midcall serve` processes on one PostgreSQL database; one server is killed with
/// SIGKILL mid-delivery and PostgreSQL is restarted in the middle. Every event and every run's
/// delivery arrives, duplicates (a killed worker's attempts taken over) share the webhook-id,
/// every run succeeded once, and the delivery log across processes is complete. The cache: a
/// run_action on B hits what A's filled in Redis; with Redis stopped runs still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_serve_processes_deliver_everything_through_a_kill_and_a_database_restart() {
    let mut pg = Postgres::start();
    let mut redis = Redis::start();
    let db = pg.database();
    let got: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let g = got.clone();
    let receiver = TestServer::http(move |r, _| {
        let j = r.json();
        let what = if r.uri.starts_with("/events") {
            format!("event {}", j["payload"]["n"])
        } else {
            format!("run {}", j["n"])
        };
        g.lock()
            .unwrap()
            .push((what, r.header("webhook-id").unwrap_or_default().to_string()));
        Reply::After(
            Duration::from_millis(20),
            Box::new(Reply::Json(200, json!({}))),
        )
    })
    .await;
    let crm = TestServer::http(|_, n| Reply::ok(json!({"v": n}))).await;
    let text = format!(
        "{AGENT}[[actions]]\nname = \"lookup\"\ndescription = \"d\"\nurl = \"{crm}/c?p={{{{args.p}}}}\"\nparameters = {{ type = \"object\", properties = {{ p = {{ type = \"string\" }} }} }}\ncache = {{ ttl_s = 300, scope = \"tenant\" }}\nextract = {{ \"c.v\" = \"$.v\" }}\n\n[[webhooks]]\nlabel = \"events\"\nurl = \"{rx}/events\"\nsubscriptions = [\"message\"]\nsigning_secret = \"{{{{secrets.WHSEC}}}}\"\n\n[[automations]]\nid = \"notify\"\ntrigger = {{ on = \"webhook\" }}\nauth = {{ bearer = \"{{{{secrets.INBOUND_KEY}}}}\" }}\nsteps = [ {{ send_webhook = {{ url = \"{rx}/run\", body = {{ n = \"{{{{payload.n}}}}\" }} }} }} ]\n\n[[automations]]\nid = \"lookup\"\ntrigger = {{ on = \"webhook\" }}\nauth = {{ bearer = \"{{{{secrets.INBOUND_KEY}}}}\" }}\nsteps = [ {{ run_action = {{ action = \"lookup\", args = {{ p = \"{{{{payload.p}}}}\" }} }} }} ]\n\n[inbound]\nrate_limit = {{ per_second = 1000, burst = 1000 }}\n",
        crm = crm.origin(),
        rx = receiver.origin()
    );
    let set = load_toml(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, &text).unwrap();
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(spawn_serve(&file, &db, &redis.url()).await);
    }

    // The shared cache across processes first (Redis up).
    assert_eq!(
        start_run(servers[0].addr, "lookup", r#"{"p": "ada"}"#).await,
        202
    );
    let log = midcall::RunLog::open(&db).unwrap();
    let succeeded = |automation: &str| {
        log.runs(Some(automation), Some("succeeded"), 1000)
            .unwrap()
            .len()
    };
    wait_until("the first lookup run", LONG, || {
        ready(succeeded("lookup") == 1)
    })
    .await;
    wait_for_entries(&redis, 1).await;
    assert_eq!(
        start_run(servers[1].addr, "lookup", r#"{"p": "ada"}"#).await,
        202
    );
    wait_until("the second lookup run", LONG, || {
        ready(succeeded("lookup") == 2)
    })
    .await;
    assert_eq!(
        crm.request_count(),
        1,
        "B's run hit the entry A's run filled"
    );

    // 1,000 events, durably, on ten calls; 100 runs over the three servers.
    let publisher = EventBus::builder(&db)
        .webhooks(&set)
        .deliver(false)
        .build()
        .unwrap();
    let published = futures_util::future::join_all((0..1000).map(|i| {
        let p = publisher.clone();
        async move {
            let call = CallInfo {
                id: format!("call_{}", i % 10),
                ..call_info()
            };
            p.publish_durable(&Event::new(EventType::Message, json!({"n": i})), &call)
                .await
        }
    }))
    .await;
    assert!(published.iter().all(|r| r.is_ok()));
    for n in 0..100 {
        let s = &servers[n % 3];
        assert_eq!(
            start_run(s.addr, "notify", &format!(r#"{{"n": {n}}}"#)).await,
            202
        );
    }
    let delivered = |got: &Arc<Mutex<Vec<(String, String)>>>| {
        got.lock()
            .unwrap()
            .iter()
            .map(|(w, _)| w.clone())
            .collect::<BTreeSet<_>>()
            .len()
    };
    wait_until("200 delivered", LONG, || ready(delivered(&got) >= 200)).await;
    let killed = servers.remove(0);
    drop(killed); // SIGKILL, mid-delivery
    let at_kill = delivered(&got);
    wait_until("500 delivered", LONG, || ready(delivered(&got) >= 500)).await;
    pg.restart();
    let at_restart = delivered(&got);
    wait_until(
        &format!("1100 delivered (killed at {at_kill}, database restarted at {at_restart})"),
        Duration::from_secs(60),
        || ready(delivered(&got) >= 1100),
    )
    .await;
    let all = got.lock().unwrap().clone();
    let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (what, id) in &all {
        ids.entry(what.clone()).or_default().insert(id.clone());
    }
    assert_eq!(
        ids.len(),
        1100,
        "every event and every run's delivery arrived (killed at {at_kill}, database restarted at {at_restart})"
    );
    assert!(
        ids.values().all(|s| s.len() == 1),
        "duplicates share the webhook-id"
    );
    let duplicates = all.len() - ids.len();
    eprintln!(
        "fleet: 1000 events + 100 runs delivered; {duplicates} duplicate attempts (same webhook-id); killed at {at_kill}, restarted at {at_restart}"
    );
    // A run's delivery can arrive before the run's own end is recorded: wait for the ends.
    wait_until("every run finished", LONG, || {
        ready(
            log.runs(Some("notify"), None, 1000)
                .unwrap()
                .iter()
                .all(|r| r.status != "running" && r.status != "queued"),
        )
    })
    .await;
    let runs = log.runs(Some("notify"), None, 1000).unwrap();
    assert_eq!(runs.len(), 100, "one run per request");
    assert!(runs.iter().all(|r| r.status == "succeeded"), "{runs:?}");
    assert!(
        runs.iter().all(|r| r.steps.len() == 1),
        "each step recorded once"
    );
    let dlog = DeliveryLog::open(&db).unwrap();
    // The receiver answers before the sender records the attempt: wait for the last records.
    let all_recorded = || {
        dlog.deliveries(None, None, 5000)
            .unwrap()
            .iter()
            .all(|d| d.status == "delivered")
    };
    wait_until("every delivery recorded", LONG, || ready(all_recorded())).await;
    let deliveries = dlog.deliveries(None, None, 5000).unwrap();
    assert_eq!(deliveries.len(), 1100);
    let pending: Vec<_> = deliveries
        .iter()
        .filter(|d| d.status != "delivered")
        .collect();
    assert!(pending.is_empty(), "{pending:?}");

    // Redis stopped: a run whose action misses everywhere still succeeds, well within budget.
    redis.stop();
    assert_eq!(
        start_run(servers[0].addr, "lookup", r#"{"p": "grace"}"#).await,
        202
    );
    wait_until("a lookup with Redis down", LONG, || {
        ready(succeeded("lookup") == 3)
    })
    .await;
    let r = &log.runs(Some("lookup"), Some("succeeded"), 1).unwrap()[0];
    assert!(
        r.steps[0].duration_ms < 2000,
        "the step took {} ms with Redis down",
        r.steps[0].duration_ms
    );
    assert_eq!(crm.request_count(), 2);
    publisher.close().await;
    drop(servers);
}
