//! Event webhooks against real local receivers: signing, subscriptions, retries, Retry-After,
//! 410, ordering, replay, overload, and crash safety with a killed child process.

use std::future::ready;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use midcall::events::{signing, DeliveryLog, Event, EventBus, EventType, PublishError};
use midcall::{ActionSet, MapSecrets, Transcript, Turn};

use crate::support::servers::{Recorded, Reply, TestServer};
use crate::support::{call_info, load_toml, wait_for, wait_until, Engine, AGENT, WAIT};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// An independent Standard Webhooks verifier, written from the specification with ring.
fn verify_independently(r: &Recorded) -> bool {
    let id = r.header("webhook-id").unwrap();
    let ts = r.header("webhook-timestamp").unwrap();
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut msg = format!("{id}.{ts}.").into_bytes();
    msg.extend_from_slice(&r.body);
    let expected =
        base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(&key, &msg).as_ref());
    r.header("webhook-signature")
        .unwrap()
        .split(' ')
        .any(|s| s == format!("v1,{expected}"))
}

#[test]
fn signature_matches_the_reference_vector() {
    let sig = signing::sign(
        SECRET,
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        br#"{"test": 2432232314}"#,
    )
    .unwrap();
    assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    assert!(signing::verify(
        SECRET,
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        br#"{"test": 2432232314}"#,
        &sig,
        1614265330,
        300
    ));
    assert!(!signing::verify(
        SECRET,
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        br#"{"test": 2432232315}"#,
        &sig,
        1614265330,
        300
    ));
    // Rotation: one signature per secret.
    let two =
        signing::signature_header(&format!("{SECRET} whsec_dGVzdC1rZXk="), "id", 1, b"{}").unwrap();
    assert_eq!(two.split(' ').count(), 2);
    assert!(signing::sign("not-a-secret", "id", 1, b"").is_err());
}

fn agent(hooks: &str) -> ActionSet {
    load_toml(&format!("{AGENT}{hooks}")).unwrap()
}

fn hook(label: &str, url: &str, subs: &[&str]) -> String {
    let subs: Vec<String> = subs.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[[webhooks]]\nlabel = \"{label}\"\nurl = \"{url}\"\nsubscriptions = [{}]\nsigning_secret = \"{{{{secrets.WHSEC}}}}\"\nheaders = {{ X-Team = \"north\" }}\n",
        subs.join(", ")
    )
}

/// One webhook "h" on `server`, subscribed to `error`: the outbox directory (keep it alive) and
/// the bus builder.
fn error_hook(
    server: &TestServer,
    engine: Engine,
) -> (tempfile::TempDir, midcall::events::EventBusBuilder) {
    let set = agent(&hook("h", &format!("{}/h", server.origin()), &["error"]));
    let dir = tempfile::tempdir().unwrap();
    let builder = bus(&engine.db(dir.path(), "o.db"), &set);
    (dir, builder)
}

/// Waits until exactly `n` deliveries of the log have `status`.
async fn wait_for_status(log: &DeliveryLog, status: &str, n: usize) {
    wait_until(status, WAIT, || {
        ready(log.deliveries(None, Some(status), 10).unwrap().len() == n)
    })
    .await;
}

fn bus(db: &std::path::Path, set: &ActionSet) -> midcall::events::EventBusBuilder {
    EventBus::builder(db)
        .webhooks(set)
        .secrets(Arc::new(MapSecrets::new().with("WHSEC", SECRET)))
        .egress(crate::support::loopback_policy())
        .retry_schedule(vec![Duration::from_millis(50), Duration::from_millis(100)])
        .jitter(0.0)
}

both_engines!(subscribers_get_only_their_types_signed_in_the_envelope);
async fn subscribers_get_only_their_types_signed_in_the_envelope(engine: Engine) {
    let a = TestServer::http(|_, _| Reply::Json(200, json!({}))).await;
    let b = TestServer::http(|_, _| Reply::Json(204, json!({}))).await;
    let set = agent(&format!(
        "{}{}",
        hook(
            "warehouse",
            &format!("{}/a", a.origin()),
            &["transcript", "phone_call_ended"]
        ),
        hook("crm", &format!("{}/b", b.origin()), &["action"])
    ));
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(&engine.db(dir.path(), "outbox.db"), &set)
        .build()
        .unwrap();
    let call = call_info();
    let mut t = Transcript::default();
    t.push(Turn::user("hello", "2025-11-03T19:33:18.330Z"));
    t.push(Turn::ai(
        "hi there",
        "2025-11-03T19:33:19.000Z",
        Some(1),
        Some("node_a".into()),
    ));
    bus.publish(&Event::transcript(&t), &call).unwrap();
    bus.publish(&Event::error("E1", "nobody subscribes to this"), &call)
        .unwrap();
    bus.publish_durable(&Event::phone_call_ended(42.5, "caller_hung_up", &t), &call)
        .await
        .unwrap();
    wait_until("two deliveries", WAIT, || ready(a.request_count() == 2)).await;
    // Wait for the event: both deliveries are recorded; none was ever made for crm.
    let log = bus.log().unwrap();
    wait_for_status(&log, "delivered", 2).await;
    assert_eq!(log.deliveries(None, None, 10).unwrap().len(), 2);
    assert_eq!(b.request_count(), 0, "crm subscribed to action only");
    let reqs = a.requests.lock().unwrap().clone();
    for r in &reqs {
        assert_eq!(r.method, "POST");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.header("user-agent").unwrap().starts_with("midcall/"));
        assert_eq!(r.header("x-team"), Some("north"));
        assert!(r.header("webhook-id").unwrap().starts_with("msg_"));
        let ts: i64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
        assert!((ts - midcall::time::now_ms() / 1000).abs() < 60);
        assert!(verify_independently(r), "signature verifies");
    }
    let first = reqs[0].json();
    assert_eq!(first["type"], "event_transcript");
    assert_eq!(first["call_id"], "call_123");
    assert_eq!(first["from_number"], "+15551234567");
    assert_eq!(first["is_outgoing"], false);
    assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(first["payload"]["transcript"], t.to_value());
    let ended = reqs[1].json();
    assert_eq!(ended["type"], "event_phone_call_ended");
    assert_eq!(ended["payload"]["duration_seconds"], 42.5);
    assert_eq!(ended["payload"]["end_reason"], "caller_hung_up");
    // The log says delivered.
    let log = bus.log().unwrap();
    let rows = log.deliveries(Some("call_123"), None, 10).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r.status == "delivered" && r.attempts == 1),
        "{rows:?}"
    );
    bus.close().await;
}

both_engines!(retries_follow_the_schedule_and_are_re_signed);
async fn retries_follow_the_schedule_and_are_re_signed(engine: Engine) {
    let server = TestServer::http(|_, n| {
        if n <= 2 {
            Reply::Json(500, json!({"e": n}))
        } else {
            Reply::Json(200, json!({}))
        }
    })
    .await;
    let (_dir, bus) = error_hook(&server, engine);
    let bus = bus.build().unwrap();
    bus.publish_durable(&Event::error("E", "m"), &call_info())
        .await
        .unwrap();
    wait_until("three attempts", WAIT, || {
        ready(server.request_count() == 3)
    })
    .await;
    let reqs = server.requests.lock().unwrap().clone();
    let id = reqs[0].header("webhook-id").unwrap();
    assert!(
        reqs.iter().all(|r| r.header("webhook-id") == Some(id)),
        "stable webhook-id"
    );
    assert!(
        reqs.iter().all(verify_independently),
        "each attempt is signed for its own timestamp"
    );
    let log = bus.log().unwrap();
    wait_for_status(&log, "delivered", 1).await;
    let d = &log.deliveries(None, None, 10).unwrap()[0];
    assert_eq!((d.status.as_str(), d.attempts), ("delivered", 3));
    let attempts = log.attempts(d.id).unwrap();
    assert_eq!(
        attempts.iter().map(|a| a.status_code).collect::<Vec<_>>(),
        [Some(500), Some(500), Some(200)]
    );
    assert!(attempts[0].response_prefix.contains("\"e\":1"));
    let gap1 = attempts[1].at_ms - attempts[0].at_ms - attempts[0].duration_ms;
    let gap2 = attempts[2].at_ms - attempts[1].at_ms - attempts[1].duration_ms;
    assert!(gap1 >= 45, "first retry after ~50 ms: {gap1}");
    assert!(gap2 >= 95, "second retry after ~100 ms: {gap2}");
    bus.close().await;
}

both_engines!(a_delivery_fails_after_the_last_retry_and_can_be_replayed);
async fn a_delivery_fails_after_the_last_retry_and_can_be_replayed(engine: Engine) {
    let healthy = Arc::new(AtomicUsize::new(0));
    let h = healthy.clone();
    let server = TestServer::http(move |_, _| {
        if h.load(Ordering::SeqCst) == 1 {
            Reply::Json(200, json!({}))
        } else {
            Reply::Json(502, json!({}))
        }
    })
    .await;
    let (_dir, bus) = error_hook(&server, engine);
    let bus = bus.build().unwrap();
    bus.publish_durable(&Event::error("E", "m"), &call_info())
        .await
        .unwrap();
    let log = bus.log().unwrap();
    wait_for_status(&log, "failed", 1).await;
    assert_eq!(server.request_count(), 3, "one attempt and two retries");
    healthy.store(1, Ordering::SeqCst);
    let mut log = bus.log().unwrap();
    let id = log.deliveries(None, Some("failed"), 10).unwrap()[0].id;
    assert_eq!(log.replay_id(id).unwrap(), 1);
    bus.wake();
    wait_for_status(&log, "delivered", 1).await;
    assert_eq!(server.request_count(), 4);
    bus.close().await;
}

both_engines!(retry_after_on_429_and_503_is_honoured);
async fn retry_after_on_429_and_503_is_honoured(engine: Engine) {
    for code in [429u16, 503] {
        let server = TestServer::http(move |_, n| {
            if n == 1 {
                Reply::Raw {
                    status: code,
                    headers: vec![("retry-after".into(), "1".into())],
                    body: vec![],
                }
            } else {
                Reply::Json(200, json!({}))
            }
        })
        .await;
        let (_dir, bus) = error_hook(&server, engine);
        let bus = bus.build().unwrap();
        bus.publish_durable(&Event::error("E", "m"), &call_info())
            .await
            .unwrap();
        wait_until("two attempts", WAIT, || ready(server.request_count() == 2)).await;
        let log = bus.log().unwrap();
        // Wait for the event: the answer to the second attempt is recorded after it arrives.
        let a = wait_for("the second attempt recorded", WAIT, || {
            let d = &log.deliveries(None, None, 1).unwrap()[0];
            let a = log.attempts(d.id).unwrap();
            ready((a.len() == 2).then_some(a))
        })
        .await;
        let gap = a[1].at_ms - a[0].at_ms - a[0].duration_ms;
        assert!(
            gap >= 950,
            "{code}: waited {gap} ms for Retry-After: 1, not the 50 ms schedule"
        );
        bus.close().await;
    }
}

both_engines!(gone_disables_the_endpoint_later_events_are_skipped_and_replayable);
async fn gone_disables_the_endpoint_later_events_are_skipped_and_replayable(engine: Engine) {
    let gone = Arc::new(AtomicUsize::new(1));
    let g = gone.clone();
    let server = TestServer::http(move |_, _| {
        if g.load(Ordering::SeqCst) == 1 {
            Reply::Json(410, json!({}))
        } else {
            Reply::Json(200, json!({}))
        }
    })
    .await;
    let (_dir, bus) = error_hook(&server, engine);
    let bus = bus.build().unwrap();
    let call = call_info();
    bus.publish_durable(&Event::error("E1", "m"), &call)
        .await
        .unwrap();
    let log = bus.log().unwrap();
    wait_for_status(&log, "failed", 1).await;
    bus.publish_durable(&Event::error("E2", "m"), &call)
        .await
        .unwrap();
    bus.publish_durable(&Event::error("E3", "m"), &call)
        .await
        .unwrap();
    wait_for_status(&log, "skipped", 2).await;
    assert_eq!(
        server.request_count(),
        1,
        "nothing more sent to a gone endpoint"
    );
    let skipped = log.deliveries(None, Some("skipped"), 10).unwrap();
    assert_eq!(skipped.len(), 2, "stored as skipped, never dropped");
    gone.store(0, Ordering::SeqCst);
    let mut log = bus.log().unwrap();
    assert_eq!(log.replay_since(0, "skipped").unwrap(), 2);
    bus.wake();
    wait_for_status(&log, "delivered", 2).await;
    bus.close().await;
}

both_engines!(per_call_order_holds_while_the_first_event_is_retried);
async fn per_call_order_holds_while_the_first_event_is_retried(engine: Engine) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let fails = Arc::new(AtomicUsize::new(0));
    let f2 = fails.clone();
    let server = TestServer::http(move |r, _| {
        let code = r.json()["payload"]["code"].as_str().unwrap().to_string();
        if code == "first" && f2.fetch_add(1, Ordering::SeqCst) < 2 {
            return Reply::Json(500, json!({}));
        }
        s2.lock().unwrap().push(code);
        Reply::Json(200, json!({}))
    })
    .await;
    let (_dir, bus) = error_hook(&server, engine);
    let bus = bus.build().unwrap();
    let call = call_info();
    for code in ["first", "second", "third"] {
        bus.publish(&Event::error(code, "m"), &call).unwrap();
    }
    wait_until("three delivered", WAIT, || {
        ready(seen.lock().unwrap().len() == 3)
    })
    .await;
    assert_eq!(*seen.lock().unwrap(), ["first", "second", "third"]);
    assert_eq!(
        fails.load(Ordering::SeqCst),
        3,
        "first failed twice, then succeeded"
    );
    bus.close().await;
}

both_engines!(a_full_channel_refuses_and_counts_never_drops_silently);
async fn a_full_channel_refuses_and_counts_never_drops_silently(engine: Engine) {
    let set = agent(&hook("h", "http://127.0.0.1:9/h", &["error"]));
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(&engine.db(dir.path(), "o.db"), &set)
        .channel_capacity(4)
        .deliver(false)
        .build()
        .unwrap();
    let call = call_info();
    let mut refused = 0;
    let mut accepted = 0;
    for i in 0..20_000 {
        match bus.publish(&Event::error(&format!("E{i}"), "m"), &call) {
            Ok(()) => accepted += 1,
            Err(PublishError::Overloaded) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "a channel of 4 overflows");
    assert_eq!(bus.overloaded_count(), refused);
    bus.close().await;
    let log = bus.log().unwrap();
    assert_eq!(
        log.deliveries(None, None, 100_000).unwrap().len() as u64,
        accepted,
        "every accepted event is stored"
    );
}

/// The child of the crash-safety test: publishes durably, then delivers until killed or done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by crash_safety_under_sigkill as a child process"]
async fn crash_child() {
    let (Ok(db), Ok(url), Ok(marker)) = (
        std::env::var("CRASH_DB"),
        std::env::var("CRASH_URL"),
        std::env::var("CRASH_MARKER"),
    ) else {
        return;
    };
    let set = agent(&hook("h", &url, &["message"]));
    // A short attempt timeout keeps the lease (the timeout plus 1 to 10 s) that a killed process leaves
    // on its claimed deliveries short.
    let bus = bus(std::path::Path::new(&db), &set)
        .attempt_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    if std::env::var("CRASH_RESUME").is_err() {
        // Fifty calls, so per-call ordering still lets deliveries run side by side; published
        // concurrently, so the writer group-commits them.
        let results = futures_util::future::join_all((0..1000).map(|i| {
            let bus = bus.clone();
            async move {
                let call = midcall::CallInfo {
                    id: format!("call_{}", i % 50),
                    ..call_info()
                };
                bus.publish_durable(&Event::new(EventType::Message, json!({"n": i})), &call)
                    .await
            }
        }))
        .await;
        assert!(results.iter().all(|r| r.is_ok()));
        std::fs::write(marker, b"1").unwrap();
    }
    let log = bus.log().unwrap();
    // Bounded below the parent's wait for this process, so a stuck child ends by itself.
    wait_until("no pending deliveries", Duration::from_secs(45), || {
        ready(log.deliveries(None, Some("pending"), 1).unwrap().is_empty())
    })
    .await;
}

both_engines!(crash_safety_under_sigkill);
async fn crash_safety_under_sigkill(engine: Engine) {
    let got: Arc<Mutex<Vec<(i64, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let server = TestServer::http(move |r, _| {
        let n = r.json()["payload"]["n"].as_i64().unwrap();
        g.lock()
            .unwrap()
            .push((n, r.header("webhook-id").unwrap().to_string()));
        Reply::After(
            Duration::from_millis(2),
            Box::new(Reply::Json(200, json!({}))),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = engine
        .db(dir.path(), "crash.db")
        .to_str()
        .unwrap()
        .to_string();
    let marker = dir.path().join("published");
    let spawn = |resume: bool| {
        let mut c = std::process::Command::new(std::env::current_exe().unwrap());
        c.args([
            "events::crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("CRASH_DB", &db)
        .env("CRASH_MARKER", &marker)
        .env("CRASH_URL", format!("{}/hook", server.origin()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        if resume {
            c.env("CRASH_RESUME", "1");
        }
        c.spawn().unwrap()
    };
    let mut child = spawn(false);
    wait_until("published", WAIT, || ready(marker.exists())).await;
    wait_until("some deliveries", WAIT, || {
        ready(got.lock().unwrap().len() >= 100)
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = got.lock().unwrap().len();
    assert!(at_kill < 1000, "killed midway ({at_kill} delivered)");
    let mut child = spawn(true);
    // Longer than the child's own 45 s bound on delivering the rest.
    let status = wait_for("the resumed child to exit", Duration::from_secs(60), || {
        ready(child.try_wait().unwrap())
    })
    .await;
    assert!(status.success());
    let got = got.lock().unwrap().clone();
    let mut by_event: std::collections::BTreeMap<i64, std::collections::BTreeSet<String>> =
        Default::default();
    for (n, id) in &got {
        by_event.entry(*n).or_default().insert(id.clone());
    }
    assert_eq!(by_event.len(), 1000, "every event arrived at least once");
    assert!(
        by_event.values().all(|ids| ids.len() == 1),
        "duplicates carry the same webhook-id"
    );
}

both_engines!(the_deliveries_command_lists_and_replays);
async fn the_deliveries_command_lists_and_replays(engine: Engine) {
    let set = agent(&hook("warehouse", "http://127.0.0.1:9/h", &["error"]));
    let dir = tempfile::tempdir().unwrap();
    let db = engine.db(dir.path(), "o.db");
    let bus = bus(&db, &set).deliver(false).build().unwrap();
    bus.publish_durable(&Event::error("E1", "m"), &call_info())
        .await
        .unwrap();
    bus.close().await;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_midcall"))
            .args(args)
            .output()
            .unwrap()
    };
    let db_s = db.to_str().unwrap();
    let o = run(&["deliveries", "--db", db_s, "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(v["delivery"]["status"], "pending");
    assert_eq!(v["delivery"]["event_type"], "event_error");
    assert_eq!(v["delivery"]["endpoint"], "warehouse");
    let o = run(&["deliveries", "--db", db_s, "--status", "pending"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("event_error"));
    let o = run(&["deliveries", "replay", "--db", db_s, "--id", "1"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("0 deliveries"),
        "a pending one is not replayed"
    );
    let o = run(&["deliveries", "--db", "/nonexistent/o.db"]);
    assert_eq!(o.status.code(), Some(2));
}

both_engines!(delivered_events_are_purged_in_batches_and_nothing_else);
async fn delivered_events_are_purged_in_batches_and_nothing_else(engine: Engine) {
    let server = TestServer::http(|r, _| {
        if r.json()["payload"]["code"] == "keep" {
            Reply::Json(500, json!({}))
        } else {
            Reply::Json(200, json!({}))
        }
    })
    .await;
    let (_dir, bus) = error_hook(&server, engine);
    let bus = bus.build().unwrap();
    let call = call_info();
    for i in 0..5 {
        bus.publish(
            &Event::error(&format!("E{i}"), "m"),
            &midcall::CallInfo {
                id: format!("c{i}"),
                ..call.clone()
            },
        )
        .unwrap();
    }
    bus.publish(&Event::error("keep", "m"), &call).unwrap();
    let mut log = bus.log().unwrap();
    wait_for_status(&log, "delivered", 5).await;
    let later = midcall::time::now_ms() + 1;
    assert_eq!(log.purge_delivered(later, 3).unwrap(), 3, "a batch at most");
    assert_eq!(log.purge_delivered(later, 3).unwrap(), 2);
    assert_eq!(log.purge_delivered(later, 3).unwrap(), 0);
    let left = log.deliveries(None, None, 10).unwrap();
    assert_eq!(left.len(), 1, "the undelivered one stays");
    assert_ne!(left[0].status, "delivered");
    bus.close().await;
}

both_engines!(an_endpoint_failing_past_the_window_is_disabled);
async fn an_endpoint_failing_past_the_window_is_disabled(engine: Engine) {
    let server = TestServer::http(|_, _| Reply::Json(500, json!({}))).await;
    let (_dir, bus) = error_hook(&server, engine);
    let bus = bus
        .retry_schedule(vec![Duration::from_millis(20); 5])
        .disable_after(Duration::ZERO)
        .build()
        .unwrap();
    let call = call_info();
    bus.publish_durable(&Event::error("E1", "m"), &call)
        .await
        .unwrap();
    let log = bus.log().unwrap();
    wait_for_status(&log, "failed", 1).await;
    let d = &log.deliveries(None, Some("failed"), 10).unwrap()[0];
    assert_eq!(d.attempts, 2, "the second failure is past a zero window");
    assert!(
        d.last_error.as_deref().unwrap().contains("disable window"),
        "{d:?}"
    );
    bus.publish_durable(&Event::error("E2", "m"), &call)
        .await
        .unwrap();
    assert_eq!(log.deliveries(None, Some("skipped"), 10).unwrap().len(), 1);
    bus.close().await;
}

fn schema_version(db: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn an_outbox_from_before_schema_versions_is_upgraded_with_its_rows() {
    // A database as midcall wrote it before automations: no `target`, no version table.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, type TEXT NOT NULL, call_id TEXT NOT NULL, body BLOB NOT NULL, created_ms INTEGER NOT NULL);
             CREATE TABLE deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT, event_seq INTEGER NOT NULL REFERENCES events(seq), endpoint TEXT NOT NULL, call_id TEXT NOT NULL, webhook_id TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, due_ms INTEGER NOT NULL, lease_ms INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL, done_ms INTEGER, last_error TEXT);
             INSERT INTO events VALUES (1, 'evt_1', 'event_phone_call_ended', 'call_old', x'7b7d', 1000);
             INSERT INTO deliveries (event_seq, endpoint, call_id, webhook_id, status, due_ms, created_ms) VALUES (1, 'crm', 'call_old', 'msg_1', 'delivered', 1000, 1000);",
        )
        .unwrap();
    }
    let log = DeliveryLog::open(&db).unwrap();
    let rows = log.deliveries(Some("call_old"), None, 10).unwrap();
    assert_eq!(rows.len(), 1, "the old row survives the upgrade");
    assert_eq!(schema_version(&db), 2);
    let c = rusqlite::Connection::open(&db).unwrap();
    let has_target: bool = c
        .prepare("SELECT 1 FROM pragma_table_info('deliveries') WHERE name = 'target'")
        .unwrap()
        .exists([])
        .unwrap();
    assert!(has_target);
    // Opening again changes nothing.
    drop(log);
    DeliveryLog::open(&db).unwrap();
    assert_eq!(schema_version(&db), 2);
}

#[test]
fn an_outbox_from_a_newer_midcall_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("new.db");
    std::fs::write(&db, b"").unwrap();
    DeliveryLog::open(&db).unwrap();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("UPDATE schema_version SET version = 99", [])
        .unwrap();
    let e = DeliveryLog::open(&db).unwrap_err();
    assert!(
        !e.is_transient(),
        "a newer schema is not mended by trying again"
    );
    let e = e.to_string();
    assert!(e.contains("new.db"), "{e}");
    assert!(
        e.contains("schema version 99 was written by a newer midcall; this one knows up to 2"),
        "{e}"
    );
}

#[test]
fn many_openers_of_an_empty_database_at_once_migrate_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fresh.db");
    std::fs::write(&db, b"").unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || DeliveryLog::open(&db).map(|_| ()))
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    assert_eq!(schema_version(&db), 2);
    let c = rusqlite::Connection::open(&db).unwrap();
    let rows: i64 = c
        .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1);
}
