//! Automations and the inbound webhook endpoint, against the real server on loopback with a
//! raw HTTP client: every answer, signatures, replay, rate limits, call completion scoping,
//! the post-call payload, run_action from a payload, and the run log.

use std::future::ready;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use midcall::events::{signing, EventBus};
use midcall::server::SIGNATURE_TOLERANCE_S;
use midcall::time;
use midcall::{
    ActionSet, Automations, Call, CallEnd, CallInfo, InboundServer, MapSecrets, Runtime,
    Transcript, Turn,
};

use crate::support::servers::{Recorded, Reply, TestServer};
use crate::support::{agent, call_info, loopback_policy, wait_until, WAIT};

const INBOUND_KEY: &str = "k3y-for-tests";
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OUT_WHSEC: &str = "whsec_dGVzdC1rZXktZm9yLW91dGJvdW5k";

fn secrets() -> Arc<MapSecrets> {
    Arc::new(
        MapSecrets::new()
            .with("INBOUND_KEY", INBOUND_KEY)
            .with("INBOUND_WHSEC", WHSEC)
            .with("OUT_WHSEC", OUT_WHSEC)
            .with("CRM_TOKEN", "crm-secret-token"),
    )
}

/// The config: one bookable action on `crm`, webhook automations (bearer, signed) and
/// call_completed automations scoped to front-desk and to all agents.
fn config(crm: &str, hooks: &str, inbound: &str) -> ActionSet {
    agent(&format!(
        r#"name = "Front desk"
phone_number = "+15550001111"

[[actions]]
name = "book_appointment"
description = "Book"
method = "POST"
url = "{crm}/appointments"
headers = {{ Authorization = "Bearer {{{{secrets.CRM_TOKEN}}}}" }}
parameters = {{ type = "object", required = ["slot"], properties = {{ slot = {{ type = "string" }} }} }}
body = {{ slot = "{{{{args.slot}}}}" }}
extract = {{ "appointment.id" = "$.id" }}

[[automations]]
id = "callback"
trigger = {{ on = "webhook" }}
auth = {{ bearer = "{{{{secrets.INBOUND_KEY}}}}" }}
steps = [ {{ run_action = {{ action = "book_appointment", args = {{ slot = "{{{{payload.slot}}}}" }} }} }},
          {{ send_webhook = {{ url = "{hooks}/booked", body = {{ slot = "{{{{payload.slot}}}}", appointment = "{{{{state.appointment.id}}}}" }} }} }} ]

[[automations]]
id = "signed"
trigger = {{ on = "webhook" }}
auth = {{ signing_secret = "{{{{secrets.INBOUND_WHSEC}}}}" }}
steps = [ {{ send_webhook = {{ url = "{hooks}/signed", body = {{ got = "{{{{payload.x}}}}" }} }} }} ]

[[automations]]
id = "crm-sync"
trigger = {{ on = "call_completed", agents = ["front-desk"] }}
steps = [ {{ send_webhook = {{ url = "{hooks}/crm-sync?token={{{{secrets.CRM_TOKEN}}}}", signing_secret = "{{{{secrets.OUT_WHSEC}}}}", headers = {{ X-Agent = "{{{{call.agent_id}}}}" }} }} }} ]

[[automations]]
id = "everyone"
trigger = {{ on = "call_completed", agents = "all" }}
steps = [ {{ send_webhook = {{ url = "{hooks}/everyone", body = {{ call = "{{{{call.id}}}}", outcome = "{{{{payload.outcome | default: null}}}}", turns = "{{{{transcript}}}}" }} }} }} ]
{inbound}"#
    ))
}

#[test]
fn a_webhook_run_may_not_run_an_action_that_reads_the_call() {
    let text = format!(
        "{}[[actions]]\nname = \"book\"\ndescription = \"d\"\nmethod = \"POST\"\nurl = \"https://s.example.com/a\"\nbody = {{ phone = \"{{{{call.from_number}}}}\" }}\n[[automations]]\nid = \"cb\"\ntrigger = {{ on = \"webhook\" }}\nauth = {{ bearer = \"{{{{secrets.K}}}}\" }}\nsteps = [ {{ run_action = {{ action = \"book\" }} }} ]\n",
        crate::support::AGENT
    );
    let e = crate::support::load_toml(&text).unwrap_err().to_string();
    assert!(
        e.contains("automation \"cb\": steps[0].run_action.action: action \"book\" reads {{call.from_number}} in its body, but a run started by a webhook has no call"),
        "{e}"
    );
    // The same action from a call_completed automation is fine: that run has its call.
    let ok = text.replace(
        "trigger = { on = \"webhook\" }\nauth = { bearer = \"{{secrets.K}}\" }",
        "trigger = { on = \"call_completed\", agents = \"all\" }",
    );
    crate::support::load_toml(&ok).unwrap();
}

#[derive(Clone, Copy)]
struct Opts {
    deliver: bool,
    concurrency: usize,
    grace: Duration,
    read_timeout: Duration,
}

const DEFAULT: Opts = Opts {
    deliver: true,
    concurrency: 16,
    grace: Duration::from_secs(5),
    read_timeout: midcall::server::DEFAULT_READ_TIMEOUT,
};

struct Inbound {
    addr: SocketAddr,
    grace: Duration,
    automations: Automations,
    bus: EventBus,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Inbound {
    async fn start(set: ActionSet) -> Inbound {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(set, dir, DEFAULT).await
    }

    async fn start_in(set: ActionSet, dir: tempfile::TempDir, opts: Opts) -> Inbound {
        let set = Arc::new(set);
        let runtime = Runtime::builder()
            .egress(loopback_policy())
            .secrets(secrets())
            .build()
            .unwrap();
        let bus = EventBus::builder(dir.path().join("outbox.db"))
            .webhooks(&set)
            .secrets(secrets())
            .egress(loopback_policy())
            .retry_schedule(vec![Duration::from_millis(50)])
            .jitter(0.0)
            .deliver(opts.deliver)
            .build()
            .unwrap();
        let automations = Automations::builder(set, runtime, bus.clone())
            .concurrency(opts.concurrency)
            .start()
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = InboundServer::new(automations.clone())
            .header_read_timeout(opts.read_timeout)
            .body_read_timeout(opts.read_timeout)
            .metrics(Arc::new(|| "midcall_test_metric 1\n".to_string()));
        let task = tokio::spawn(server.serve(listener, async {
            let _ = rx.await;
        }));
        Inbound {
            addr,
            grace: opts.grace,
            automations,
            bus,
            stop: Some(tx),
            server: Some(task),
            _dir: dir,
        }
    }

    async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.server.take() {
            t.await.unwrap().unwrap();
        }
        self.automations.shutdown(self.grace).await;
        self.bus.close().await;
        self._dir
    }
}

/// An HTTP answer as read off the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Sends `head` (request line and headers, without the blank line) and `body`, reads the
/// answer until the server closes.
async fn send_raw(addr: SocketAddr, head: &str, body: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let _ = s.write_all(body).await;
    read_answer(&mut s).await
}

async fn read_answer(s: &mut TcpStream) -> Answer {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// POSTs `body` to the automation with extra `headers`.
async fn post(addr: SocketAddr, id: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut head = format!("POST /v1/automations/{id}/webhook HTTP/1.1\r\nHost: {addr}");
    for (n, v) in headers {
        head.push_str(&format!("\r\n{n}: {v}"));
    }
    head.push_str(&format!("\r\nContent-Length: {}", body.len()));
    send_raw(addr, &head, body.as_bytes()).await
}

const JSON: (&str, &str) = ("Content-Type", "application/json");

fn bearer() -> String {
    format!("Bearer {INBOUND_KEY}")
}

async fn receivers() -> (TestServer, TestServer) {
    let crm = TestServer::http(|r, n| {
        if r.uri.starts_with("/appointments") {
            Reply::Json(201, json!({"id": format!("apt_{n}"), "status": "booked"}))
        } else {
            Reply::Json(404, json!({}))
        }
    })
    .await;
    let hooks = TestServer::http(|_, _| Reply::Json(200, json!({"ok": true}))).await;
    (crm, hooks)
}

fn requests_to(server: &TestServer, path: &str) -> Vec<Recorded> {
    server
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.uri.starts_with(path))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_of_the_inbound_endpoint() {
    let (crm, hooks) = receivers().await;
    let set = config(
        &crm.origin(),
        &hooks.origin(),
        "[inbound]\nrate_limit = { per_second = 100.0, burst = 1000 }\n",
    );
    let srv = Inbound::start(set).await;
    let a = srv.addr;
    let key = bearer();
    let auth = ("Authorization", key.as_str());

    // 202 with a run id; the run books with the payload's slot.
    let ok = post(
        a,
        "callback",
        &[auth, JSON],
        r#"{"slot": "2025-11-04T15:00"}"#,
    )
    .await;
    assert_eq!(ok.status, 202, "{ok:?}");
    let run_id = ok.json()["run_id"].as_str().unwrap().to_string();
    assert!(run_id.starts_with("run_"));

    // 401: no key, a wrong key, a key in the wrong scheme.
    let none = post(a, "callback", &[JSON], "{}").await;
    assert_eq!(none.status, 401);
    assert_eq!(none.error(), "missing Authorization: Bearer <key>");
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let wrong = post(
        a,
        "callback",
        &[("Authorization", "Bearer k3y-for-test"), JSON],
        "{}",
    )
    .await;
    assert_eq!(
        (wrong.status, wrong.error().as_str()),
        (401, "invalid bearer key")
    );
    let basic = post(
        a,
        "callback",
        &[("Authorization", "Basic azN5"), JSON],
        "{}",
    )
    .await;
    assert_eq!(basic.status, 401);
    assert!(!wrong.body.contains(INBOUND_KEY) && !basic.body.contains(INBOUND_KEY));

    // 404 unknown automation and unknown route; 405 for GET on the webhook route.
    let unknown = post(a, "nope", &[auth, JSON], "{}").await;
    assert_eq!(
        (unknown.status, unknown.error().as_str()),
        (404, "no automation \"nope\"")
    );
    let route = send_raw(a, &format!("GET /v2/else HTTP/1.1\r\nHost: {a}"), b"").await;
    assert_eq!(route.status, 404);
    let get = send_raw(
        a,
        &format!("GET /v1/automations/callback/webhook HTTP/1.1\r\nHost: {a}"),
        b"",
    )
    .await;
    assert_eq!((get.status, get.header("allow")), (405, Some("POST")));

    // 409: a call_completed automation cannot be started from outside.
    let conflict = post(a, "crm-sync", &[auth, JSON], "{}").await;
    assert_eq!(conflict.status, 409);
    assert_eq!(
        conflict.error(),
        "automation \"crm-sync\" is triggered by call_completed and cannot be started by a webhook"
    );

    // 415: not JSON, or no content type.
    let text = post(
        a,
        "callback",
        &[auth, ("Content-Type", "text/plain")],
        "slot=1",
    )
    .await;
    assert_eq!(text.status, 415);
    let untyped = post(a, "callback", &[auth], "{}").await;
    assert_eq!(untyped.status, 415);

    // 413 from Content-Length, before any body byte is read.
    let big = send_raw(
        a,
        &format!("POST /v1/automations/callback/webhook HTTP/1.1\r\nHost: {a}\r\nAuthorization: {key}\r\nContent-Type: application/json\r\nContent-Length: 262145"),
        b"",
    )
    .await;
    assert_eq!(big.status, 413);
    assert_eq!(big.error(), "the body is over the limit of 262144 bytes");
    // 413 while reading a chunked body that has no Content-Length.
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(format!("POST /v1/automations/callback/webhook HTTP/1.1\r\nHost: {a}\r\nAuthorization: {key}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..5 {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .is_err()
            || s.write_all(&chunk).await.is_err()
            || s.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let streamed = read_answer(&mut s).await;
    assert_eq!(streamed.status, 413, "{streamed:?}");

    // 400: invalid JSON with its position; a payload that does not fit the steps.
    let bad = post(a, "callback", &[auth, JSON], "{\n  \"slot\": 15:00\n}").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.error()
            .starts_with("invalid JSON at line 2 column 13: "),
        "{}",
        bad.error()
    );
    let missing = post(a, "callback", &[auth, JSON], r#"{"when": "tomorrow"}"#).await;
    assert_eq!(missing.status, 400);
    assert!(
        missing
            .error()
            .starts_with("steps[0].run_action.args: no value for payload.slot"),
        "{}",
        missing.error()
    );
    let typed = post(a, "callback", &[auth, JSON], r#"{"slot": 15}"#).await;
    assert_eq!(typed.status, 400);
    assert!(typed.error().contains("slot"), "{}", typed.error());

    // Health and metrics.
    let health = send_raw(a, &format!("GET /healthz HTTP/1.1\r\nHost: {a}"), b"").await;
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"status": "ok"}))
    );
    let metrics = send_raw(a, &format!("GET /metrics HTTP/1.1\r\nHost: {a}"), b"").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("midcall_test_metric 1"));

    // Only the one valid request became a run; it booked and then queued its webhook.
    assert!(srv.automations.wait_idle(Duration::from_secs(10)).await);
    let log = srv.automations.log().unwrap();
    let runs = log.runs(None, None, 100).unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].id, run_id);
    assert_eq!(runs[0].status, "succeeded", "{runs:?}");
    let booking = requests_to(&crm, "/appointments");
    assert_eq!(booking.len(), 1);
    assert_eq!(booking[0].json()["slot"], "2025-11-04T15:00");
    assert_eq!(
        booking[0].header("authorization"),
        Some("Bearer crm-secret-token")
    );
    wait_until("the booked webhook", WAIT, || {
        ready(!requests_to(&hooks, "/booked").is_empty())
    })
    .await;
    assert_eq!(
        requests_to(&hooks, "/booked")[0].json(),
        json!({"slot": "2025-11-04T15:00", "appointment": "apt_1"})
    );
    srv.stop().await;
}

fn signed_headers(id: &str, ts: i64, body: &str, secret: &str) -> Vec<(String, String)> {
    vec![
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), ts.to_string()),
        (
            "webhook-signature".into(),
            signing::sign(secret, id, ts, body.as_bytes()).unwrap(),
        ),
    ]
}

async fn post_signed(a: SocketAddr, headers: &[(String, String)], body: &str) -> Answer {
    let mut h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    h.push(JSON);
    post(a, "signed", &h, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_are_checked_and_replays_refused() {
    let (crm, hooks) = receivers().await;
    let srv = Inbound::start(config(&crm.origin(), &hooks.origin(), "")).await;
    let a = srv.addr;
    let now = time::now_ms() / 1000;

    // The specification's reference vector (secret, id, timestamp, body → signature) is
    // refused only for its age: its timestamp is from 2021.
    let reference = vec![
        (
            "webhook-id".to_string(),
            "msg_p5jXN8AQM9LWM0D4loKWxJek".to_string(),
        ),
        ("webhook-timestamp".to_string(), "1614265330".to_string()),
        (
            "webhook-signature".to_string(),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".to_string(),
        ),
    ];
    let old = post_signed(a, &reference, r#"{"test": 2432232314}"#).await;
    assert_eq!(old.status, 401);
    assert_eq!(
        old.error(),
        format!("webhook-timestamp is more than {SIGNATURE_TOLERANCE_S} s from the server's clock")
    );

    // Fresh and correct: accepted. Several v1 entries: any valid one counts.
    let body = r#"{"x": "hello"}"#;
    let mut good = signed_headers("msg_1", now, body, WHSEC);
    good[2].1 = format!("v1,AAAA {}", good[2].1);
    let accepted = post_signed(a, &good, body).await;
    assert_eq!(accepted.status, 202, "{accepted:?}");

    // The same webhook-id again, even correctly signed: a replay.
    let replay = post_signed(a, &signed_headers("msg_1", now, body, WHSEC), body).await;
    assert_eq!(replay.status, 401);
    assert_eq!(
        replay.error(),
        "this webhook-id was already used (replay refused)"
    );

    // A tampered body, a tampered timestamp, a stale one, a wrong secret, no headers.
    let h = signed_headers("msg_2", now, body, WHSEC);
    let tampered = post_signed(a, &h, r#"{"x": "hellO"}"#).await;
    assert_eq!(
        (tampered.status, tampered.error().as_str()),
        (401, "invalid webhook-signature")
    );
    let mut moved = signed_headers("msg_3", now, body, WHSEC);
    moved[1].1 = (now - 1).to_string();
    let moved = post_signed(a, &moved, body).await;
    assert_eq!(
        (moved.status, moved.error().as_str()),
        (401, "invalid webhook-signature")
    );
    let stale_ts = now - SIGNATURE_TOLERANCE_S - 5;
    let stale = post_signed(a, &signed_headers("msg_4", stale_ts, body, WHSEC), body).await;
    assert_eq!(stale.status, 401);
    let future = post_signed(a, &signed_headers("msg_5", now + 400, body, WHSEC), body).await;
    assert_eq!(future.status, 401);
    let other = post_signed(a, &signed_headers("msg_6", now, body, OUT_WHSEC), body).await;
    assert_eq!(other.status, 401);
    let bare = post(a, "signed", &[JSON], body).await;
    assert_eq!(bare.status, 401);
    assert!(bare.error().starts_with("missing webhook-id"));
    // msg_2 was refused, so it was not remembered: correctly signed, it is accepted.
    let later = post_signed(a, &signed_headers("msg_2", now, body, WHSEC), body).await;
    assert_eq!(later.status, 202);

    assert!(srv.automations.wait_idle(Duration::from_secs(10)).await);
    wait_until("two signed runs delivered", WAIT, || {
        ready(requests_to(&hooks, "/signed").len() == 2)
    })
    .await;
    assert_eq!(
        requests_to(&hooks, "/signed")[0].json(),
        json!({"got": "hello"})
    );

    // The same request twice at once: exactly one run.
    let h = signed_headers("msg_twice", now, body, WHSEC);
    let (x, y) = tokio::join!(post_signed(a, &h, body), post_signed(a, &h, body));
    let mut both = [x.status, y.status];
    both.sort();
    assert_eq!(both, [202, 401]);

    // Webhook-ids are remembered in the outbox: a replay after a restart is still refused.
    let dir = srv.stop().await;
    let srv = Inbound::start_in(config(&crm.origin(), &hooks.origin(), ""), dir, DEFAULT).await;
    let again = post_signed(srv.addr, &signed_headers("msg_1", now, body, WHSEC), body).await;
    assert_eq!(again.status, 401);
    assert_eq!(
        again.error(),
        "this webhook-id was already used (replay refused)"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_per_key_answers_429_with_retry_after() {
    let (crm, hooks) = receivers().await;
    let set = config(
        &crm.origin(),
        &hooks.origin(),
        "[inbound]\nrate_limit = { per_second = 0.5, burst = 3 }\n",
    );
    let srv = Inbound::start(set).await;
    let a = srv.addr;
    let key = bearer();
    let mut statuses = Vec::new();
    for i in 0..5 {
        let r = post(
            a,
            "callback",
            &[("Authorization", key.as_str()), JSON],
            &format!(r#"{{"slot": "s{i}"}}"#),
        )
        .await;
        statuses.push(r.status);
        if r.status == 429 {
            let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=2).contains(&wait), "Retry-After {wait}");
        }
    }
    assert_eq!(statuses, vec![202, 202, 202, 429, 429]);
    // Failed authentication draws on the address's bucket: after three bad keys even the
    // wrong-key attempts are slowed down.
    let mut bad = Vec::new();
    for i in 0..5 {
        let k = format!("Bearer guess-{i}");
        bad.push(
            post(a, "callback", &[("Authorization", k.as_str()), JSON], "{}")
                .await
                .status,
        );
    }
    assert_eq!(bad, vec![401, 401, 401, 429, 429]);
    srv.stop().await;
}

fn finished_call(agent_id: &str, id: &str) -> Call {
    let mut call = Call::new(CallInfo {
        id: id.into(),
        agent_id: agent_id.into(),
        ..call_info()
    });
    call.state
        .set(
            &midcall::StatePath::parse("customer.name").unwrap(),
            json!("Dana Reyes"),
        )
        .unwrap();
    call.state
        .set(
            &midcall::StatePath::parse("appointment.id").unwrap(),
            json!("apt_77"),
        )
        .unwrap();
    let mut t = Transcript::default();
    t.push(Turn::ai(
        "Thanks for calling Acme Dental.",
        "2025-11-03T19:33:18.500Z",
        Some(0),
        Some("greeting".into()),
    ));
    t.push(Turn::user(
        "I'd like to book a cleaning.",
        "2025-11-03T19:33:21.000Z",
    ));
    call.transcript = t;
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_completed_automations_follow_their_agent_scope() {
    let (crm, hooks) = receivers().await;
    let set = config(&crm.origin(), &hooks.origin(), "");
    let srv = Inbound::start(set).await;

    let front = finished_call("front-desk", "call_front");
    let end =
        CallEnd::new(Duration::from_millis(93_400), "user_hangup").outcome("appointment_booked");
    let runs = srv.automations.complete_call(&front, &end).await.unwrap();
    assert_eq!(runs.len(), 2, "crm-sync (front-desk only) and everyone");
    let other = finished_call("billing", "call_billing");
    let runs = srv
        .automations
        .complete_call(
            &other,
            &CallEnd::new(Duration::from_secs(5), "agent_hangup"),
        )
        .await
        .unwrap();
    assert_eq!(runs.len(), 1, "only everyone");

    assert!(srv.automations.wait_idle(Duration::from_secs(10)).await);
    wait_until("three deliveries", WAIT, || {
        ready(
            requests_to(&hooks, "/crm-sync").len() == 1
                && requests_to(&hooks, "/everyone").len() == 2,
        )
    })
    .await;
    let sync = &requests_to(&hooks, "/crm-sync")[0];
    // URL secrets and headers are rendered at delivery; with no body the post-call payload
    // is sent, signed.
    assert_eq!(sync.uri, "/crm-sync?token=crm-secret-token");
    assert_eq!(sync.header("x-agent"), Some("front-desk"));
    let id = sync.header("webhook-id").unwrap();
    let ts: i64 = sync.header("webhook-timestamp").unwrap().parse().unwrap();
    assert!(signing::verify(
        OUT_WHSEC,
        id,
        ts,
        &sync.body,
        sync.header("webhook-signature").unwrap(),
        time::now_ms() / 1000,
        60
    ));
    let expected = json!({
        "call_id": "call_front",
        "from_number": "+15551234567",
        "to_number": "+15557654321",
        "is_outgoing": false,
        "started_at": "2025-11-03T19:33:18.330Z",
        "duration_seconds": 93.4,
        "end_reason": "user_hangup",
        "outcome": "appointment_booked",
        "agent": {"id": "front-desk", "name": "Front desk", "phone_number": "+15550001111"},
        "transcript": [
            {"transcript": "Thanks for calling Acme Dental.", "speaker": "ai", "createdAt": "2025-11-03T19:33:18.500Z", "step": 0, "node_id": "greeting"},
            {"transcript": "I'd like to book a cleaning.", "speaker": "user", "createdAt": "2025-11-03T19:33:21.000Z"}
        ],
        "custom_fields": {"customer": {"name": "Dana Reyes"}, "appointment": {"id": "apt_77"}}
    });
    assert_eq!(sync.json(), expected);
    // Key order is part of the shape.
    let keys: Vec<String> = sync.json().as_object().unwrap().keys().cloned().collect();
    let want: Vec<String> = expected.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, want);

    let everyone: Vec<Value> = requests_to(&hooks, "/everyone")
        .iter()
        .map(|r| r.json())
        .collect();
    let calls: Vec<&str> = everyone
        .iter()
        .map(|v| v["call"].as_str().unwrap())
        .collect();
    assert!(
        calls.contains(&"call_front") && calls.contains(&"call_billing"),
        "{calls:?}"
    );
    let front_body = everyone.iter().find(|v| v["call"] == "call_front").unwrap();
    assert_eq!(front_body["outcome"], "appointment_booked");
    let billing_body = everyone
        .iter()
        .find(|v| v["call"] == "call_billing")
        .unwrap();
    assert_eq!(billing_body["outcome"], Value::Null);
    assert_eq!(front_body["turns"], expected["transcript"]);

    // The run log: three runs succeeded; the outbox holds no secret.
    let log = srv.automations.log().unwrap();
    let runs = log.runs(None, None, 10).unwrap();
    assert_eq!(runs.len(), 3);
    assert!(runs
        .iter()
        .all(|r| r.status == "succeeded" && r.trigger == "call_completed"));
    assert!(runs
        .iter()
        .all(|r| r.steps.len() == 1 && r.steps[0].detail.starts_with("queued as delivery ")));
    let dir = srv.stop().await;
    let bytes = std::fs::read(dir.path().join("outbox.db")).unwrap();
    let hay = String::from_utf8_lossy(&bytes);
    assert!(
        !hay.contains("crm-secret-token"),
        "a secret reached the outbox"
    );

    // Retention: runs go with their deliveries, not before (a delivery needs its run's context).
    let db = dir.path().join("outbox.db");
    let mut log = midcall::events::DeliveryLog::open(&db).unwrap();
    let later = time::now_ms() + 1000;
    assert_eq!(log.purge_delivered(later, 1).unwrap(), 1);
    let left = midcall::RunLog::open(&db)
        .unwrap()
        .runs(None, None, 10)
        .unwrap();
    assert_eq!(left.len(), 2, "only the run whose delivery went: {left:?}");
    assert_eq!(log.purge_delivered(later, 100).unwrap(), 2);
    assert!(midcall::RunLog::open(&db)
        .unwrap()
        .runs(None, None, 10)
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_stops_the_run_and_says_why() {
    let crm = TestServer::http(|_, _| Reply::Json(503, json!({"error": "down"}))).await;
    let hooks = TestServer::http(|_, _| Reply::Json(200, json!({}))).await;
    let srv = Inbound::start(config(&crm.origin(), &hooks.origin(), "")).await;
    let key = bearer();
    let r = post(
        srv.addr,
        "callback",
        &[("Authorization", key.as_str()), JSON],
        r#"{"slot": "x"}"#,
    )
    .await;
    assert_eq!(r.status, 202);
    assert!(srv.automations.wait_idle(Duration::from_secs(10)).await);
    let run = srv
        .automations
        .log()
        .unwrap()
        .run(r.json()["run_id"].as_str().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(run.status, "failed");
    assert_eq!(run.steps.len(), 1, "the send_webhook step never ran");
    assert_eq!(run.steps[0].status, "failed");
    let error = run.error.unwrap();
    assert!(
        error.starts_with("step 1 (run_action): book_appointment: http_error, HTTP 503"),
        "{error}"
    );
    assert!(requests_to(&hooks, "/booked").is_empty());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_work_survives_a_shutdown_and_resumes() {
    // First life: a slow CRM, one run at a time, no delivery, and no grace at shutdown, so
    // runs are left queued and one is cut off mid-action.
    let slow = TestServer::http(|_, n| {
        Reply::After(
            Duration::from_millis(300),
            Box::new(Reply::Json(201, json!({"id": format!("apt_{n}")}))),
        )
    })
    .await;
    let hooks = TestServer::http(|_, _| Reply::Json(200, json!({}))).await;
    let first = Opts {
        deliver: false,
        concurrency: 1,
        grace: Duration::ZERO,
        ..DEFAULT
    };
    let dir = tempfile::tempdir().unwrap();
    let srv = Inbound::start_in(config(&slow.origin(), &hooks.origin(), ""), dir, first).await;
    let key = bearer();
    for i in 0..5 {
        let r = post(
            srv.addr,
            "callback",
            &[("Authorization", key.as_str()), JSON],
            &format!(r#"{{"slot": "s{i}"}}"#),
        )
        .await;
        assert_eq!(r.status, 202);
    }
    wait_until("the first booking to reach the CRM", WAIT, || {
        ready(slow.request_count() >= 1)
    })
    .await;
    let dir = srv.stop().await;
    let runs = midcall::RunLog::open(dir.path().join("outbox.db"))
        .unwrap()
        .runs(None, None, 100)
        .unwrap();
    assert_eq!(runs.len(), 5);
    assert!(runs.iter().all(|r| r.status != "failed"), "{runs:?}");
    assert!(
        runs.iter().filter(|r| r.status == "succeeded").count() < 5,
        "the shutdown left work: {runs:?}"
    );
    assert!(hooks.request_count() == 0);

    // Second life on the same outbox: every run completes and every webhook arrives, once.
    let fast = TestServer::http(|_, n| Reply::Json(201, json!({"id": format!("apt_{n}")}))).await;
    let srv = Inbound::start_in(config(&fast.origin(), &hooks.origin(), ""), dir, DEFAULT).await;
    assert!(srv.automations.wait_idle(Duration::from_secs(10)).await);
    wait_until("5 deliveries", WAIT, || {
        ready(requests_to(&hooks, "/booked").len() == 5)
    })
    .await;
    let mut slots: Vec<String> = requests_to(&hooks, "/booked")
        .iter()
        .map(|r| r.json()["slot"].as_str().unwrap().to_string())
        .collect();
    slots.sort();
    assert_eq!(slots, vec!["s0", "s1", "s2", "s3", "s4"]);
    // A booking cut off by the first shutdown was sent again on the second life with the same
    // Idempotency-Key (it is derived from the run id and step), so the CRM can tell.
    let mut keys: std::collections::HashMap<String, Vec<String>> = Default::default();
    for r in requests_to(&slow, "/appointments")
        .into_iter()
        .chain(requests_to(&fast, "/appointments"))
    {
        let slot = r.json()["slot"].as_str().unwrap().to_string();
        let key = r.header("idempotency-key").unwrap().to_string();
        keys.entry(slot).or_default().push(key);
    }
    assert_eq!(keys.len(), 5);
    for (slot, k) in &keys {
        assert!(k.iter().all(|x| *x == k[0]), "{slot}: {k:?}");
    }
    assert!(
        keys.values().any(|k| k.len() == 2),
        "one booking was cut off and sent again: {keys:?}"
    );
    let runs = srv
        .automations
        .log()
        .unwrap()
        .runs(None, None, 100)
        .unwrap();
    assert!(
        runs.iter()
            .all(|r| r.status == "succeeded" && r.steps.len() == 2),
        "{runs:?}"
    );
    srv.stop().await;
}

/// Starts `midcall serve` on an ephemeral port; returns the child, its address and the rest
/// of its stdout.
async fn spawn_serve(
    file: &std::path::Path,
    db: &std::path::Path,
) -> (std::process::Child, SocketAddr, crate::support::StdoutLines) {
    crate::support::spawn_serve(
        file,
        &["--db", db.to_str().unwrap()],
        &[("MIDCALL_SECRET_INBOUND_KEY", INBOUND_KEY)],
    )
    .await
}

/// SIGTERM, and the exit status.
async fn terminate(child: std::process::Child) -> std::process::ExitStatus {
    let mut child = child;
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap()
}

fn midcall_json(args: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_midcall"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `midcall serve` as a user runs it: prints its address, answers webhooks, serves Prometheus
/// metrics, and on SIGTERM stops cleanly with every accepted run and queued delivery in the
/// outbox, which `midcall runs` and `midcall deliveries` then show; the next start finishes
/// what was left queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_binary_answers_exports_metrics_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    let db = dir.path().join("outbox.db");
    let dbs = db.to_str().unwrap();
    // The receiver is down (discard port): deliveries stay queued.
    std::fs::write(
        &file,
        format!(
            "{}[[automations]]\nid = \"notify\"\ntrigger = {{ on = \"webhook\" }}\nauth = {{ bearer = \"{{{{secrets.INBOUND_KEY}}}}\" }}\nsteps = [ {{ send_webhook = {{ url = \"http://127.0.0.1:9/hook\", body = {{ n = \"{{{{payload.n}}}}\" }} }} }} ]\n",
            crate::support::AGENT
        ),
    )
    .unwrap();
    let (child, addr, rest) = spawn_serve(&file, &db).await;
    let key = bearer();
    for n in 0..10 {
        let r = post(
            addr,
            "notify",
            &[("Authorization", key.as_str()), JSON],
            &format!(r#"{{"n": {n}}}"#),
        )
        .await;
        assert_eq!(r.status, 202, "{r:?}");
    }
    let refused = post(addr, "notify", &[JSON], "{}").await;
    assert_eq!(refused.status, 401);
    let metrics = send_raw(addr, &format!("GET /metrics HTTP/1.1\r\nHost: {addr}"), b"").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert!(
        metrics
            .body
            .contains("midcall_inbound_requests_total{status=\"202\"} 10"),
        "{}",
        metrics.body
    );
    // Runs are counted by outcome as they finish.
    wait_until(
        "midcall_automation_runs_total to appear",
        WAIT,
        || async move {
            let m = send_raw(addr, &format!("GET /metrics HTTP/1.1\r\nHost: {addr}"), b"").await;
            m.body
                .contains("midcall_automation_runs_total{status=\"succeeded\"}")
        },
    )
    .await;

    let status = terminate(child).await;
    assert!(status.success(), "serve exits 0 on SIGTERM: {status:?}");
    let said: Vec<String> = rest.map_while(Result::ok).collect();
    assert!(
        said.iter()
            .any(|l| l.contains("stopped; queued work stays in")),
        "{said:?}"
    );

    // Nothing lost: ten runs, none failed; each finished run has its pending delivery.
    let runs = midcall_json(&["runs", "--db", dbs, "--json"]);
    assert_eq!(runs.len(), 10);
    assert!(
        runs.iter()
            .all(|r| r["status"] == "succeeded" || r["status"] == "queued"),
        "{runs:?}"
    );
    let done = runs.iter().filter(|r| r["status"] == "succeeded").count();
    let deliveries = midcall_json(&["deliveries", "--db", dbs, "--json"]);
    assert_eq!(deliveries.len(), done);
    assert!(
        deliveries
            .iter()
            .all(|d| d["delivery"]["status"] == "pending"),
        "{deliveries:?}"
    );

    // The next start runs whatever was still queued.
    let (child, _, _rest) = spawn_serve(&file, &db).await;
    let mut finished = false;
    for _ in 0..500 {
        let runs = midcall_json(&["runs", "--db", dbs, "--json"]);
        if runs.iter().all(|r| r["status"] == "succeeded") {
            finished = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(terminate(child).await.success());
    assert!(finished, "queued runs resumed");
    assert_eq!(
        midcall_json(&["deliveries", "--db", dbs, "--json"]).len(),
        10
    );
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_midcall"))
        .args(["runs", "--db", dbs])
        .output()
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.starts_with("run "), "{table}");
    assert!(
        table.contains("step 1 send_webhook") && table.contains("queued as delivery"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_missing_on_the_server_is_503_not_500() {
    let set = agent(
        "[[automations]]\nid = \"cb\"\ntrigger = { on = \"webhook\" }\nauth = { bearer = \"{{secrets.NOT_SET_ANYWHERE}}\" }\nsteps = [ { send_webhook = { url = \"http://127.0.0.1:9/x\" } } ]\n",
    );
    let srv = Inbound::start(set).await;
    let key = bearer();
    let r = post(
        srv.addr,
        "cb",
        &[("Authorization", key.as_str()), JSON],
        "{}",
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.error(),
        "the inbound credentials are not available on this server"
    );
    srv.stop().await;
}

/// A client that stops sending: in its headers the connection is closed, in its body it gets
/// 408; both after the read limits (set to 300 ms here; 10 s by default), neither holds the
/// server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_headers_and_bodies_are_cut_off_after_the_read_limits() {
    let (crm, hooks) = receivers().await;
    let limit = Duration::from_millis(300);
    let opts = Opts {
        read_timeout: limit,
        ..DEFAULT
    };
    let srv = Inbound::start_in(
        config(&crm.origin(), &hooks.origin(), ""),
        tempfile::tempdir().unwrap(),
        opts,
    )
    .await;
    let a = srv.addr;
    let started = tokio::time::Instant::now();
    let key = bearer();
    let stalled_body = async {
        let mut s = TcpStream::connect(a).await.unwrap();
        s.write_all(format!("POST /v1/automations/callback/webhook HTTP/1.1\r\nHost: {a}\r\nAuthorization: {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"slot\":").as_bytes()).await.unwrap();
        read_answer(&mut s).await
    };
    let stalled_headers = async {
        let mut s = TcpStream::connect(a).await.unwrap();
        s.write_all(b"POST /v1/automations/callback/webhook HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
        started.elapsed()
    };
    let (body, headers_closed_after) = tokio::join!(stalled_body, stalled_headers);
    assert_eq!(body.status, 408, "{body:?}");
    assert_eq!(body.error(), "the body took too long to arrive");
    assert!(started.elapsed() >= limit);
    // Held to the limit, never past a generous bound (only a limit not applied exceeds it).
    assert!(
        (limit..Duration::from_secs(10)).contains(&headers_closed_after),
        "{headers_closed_after:?}"
    );
    srv.stop().await;
}
