//! `midcall serve DIR`: many agents and tenants, per-agent routes, tenant walls, reloads with
//! requests in flight, and the operator API under /v1/admin/ (on both engines).

use std::collections::BTreeSet;
use std::future::ready;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::servers::{Recorded, Reply, TestServer};
use crate::support::{wait_for, wait_until, Engine, WAIT};

const T1_KEY: &str = "tenant-one-inbound-key";
const T2_KEY: &str = "tenant-two-inbound-key";
const OPS_KEY: &str = "ops-admin-key-0123456789abcdef";

/// An agent file: one webhook automation per id, each POSTing `{n}` to `rx/<agent>/<id>`.
pub(crate) fn agent_file(agent: &str, tenant: &str, key: &str, ids: &[&str], rx: &str) -> String {
    let mut t = format!(
        "[agent]\nid = \"{agent}\"\ntenant = \"{tenant}\"\n\n[inbound]\nrate_limit = {{ per_second = 10000, burst = 10000 }}\n"
    );
    for id in ids {
        t.push_str(&format!(
            "\n[[automations]]\nid = \"{id}\"\ntrigger = {{ on = \"webhook\" }}\nauth = {{ bearer = \"{{{{secrets.{key}}}}}\" }}\nsteps = [ {{ send_webhook = {{ url = \"{rx}/{agent}/{id}\", body = {{ n = \"{{{{payload.n}}}}\" }} }} }} ]\n"
        ));
    }
    t
}

/// `dir/agents` with these agent files in it.
pub(crate) fn agents_dir(dir: &Path, files: &[(&str, String)]) -> std::path::PathBuf {
    let agents = dir.join("agents");
    std::fs::create_dir(&agents).unwrap();
    for (name, text) in files {
        std::fs::write(agents.join(name), text).unwrap();
    }
    agents
}

/// A `midcall serve` child, killed on drop, its stdout lines sent to a channel.
pub(crate) struct Served {
    pub(crate) child: std::process::Child,
    pub(crate) addr: SocketAddr,
    pub(crate) lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    pub(crate) async fn start(path: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
        let (child, addr, lines) = crate::support::spawn_serve(path, args, env).await;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if tx.send(l).is_err() {
                    // Keep draining so the server never blocks on a full pipe.
                }
            }
        });
        Served {
            child,
            addr,
            lines: rx,
        }
    }

    /// Waits (up to 20 s) for a stdout line containing `what`; the line.
    pub(crate) async fn line(&self, what: &str) -> String {
        wait_for(
            &format!("serve to print a line with {what:?}"),
            Duration::from_secs(20),
            || ready(self.lines.try_iter().find(|l| l.contains(what))),
        )
        .await
    }
}

/// One HTTP/1.1 request on a new connection: (status, body).
pub(crate) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let (status, _, body) = exchange(addr, method, path, headers, body).await;
    (status, body)
}

/// One HTTP/1.1 request on a new connection: (status, response head, body).
pub(crate) async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    parse_response(&out)
}

fn parse_response(out: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

async fn start(addr: SocketAddr, path: &str, key: &str, n: u32) -> u16 {
    let auth = format!("Bearer {key}");
    request(
        addr,
        "POST",
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &format!(r#"{{"n": {n}}}"#),
    )
    .await
    .0
}

async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let auth = format!("Bearer {OPS_KEY}");
    let (status, body) = request(addr, method, path, &[("Authorization", &auth)], "").await;
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|_| json!({"raw": body})),
    )
}

fn paths(got: &Arc<Mutex<Vec<Recorded>>>) -> Vec<String> {
    got.lock().unwrap().iter().map(|r| r.uri.clone()).collect()
}

async fn receiver(fail: Arc<AtomicBool>) -> (TestServer, Arc<Mutex<Vec<Recorded>>>) {
    let got: Arc<Mutex<Vec<Recorded>>> = Arc::default();
    let g = got.clone();
    let rx = TestServer::http(move |r, _| {
        if fail.load(Ordering::SeqCst) {
            Reply::Json(500, json!({"error": "crm down"}))
        } else {
            g.lock().unwrap().push(r.clone());
            Reply::ok(json!({}))
        }
    })
    .await;
    (rx, got)
}

/// Routes name the agent; the plain route works while an id is unique; a key of one tenant
/// never starts another tenant's automation; runs and endpoints carry their agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_of_agents_routes_per_agent_behind_tenant_walls() {
    let (rx, got) = receiver(Arc::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let o = rx.origin();
    let agents = agents_dir(
        dir.path(),
        &[
            ("a1.toml", agent_file("a1", "t1", "T1_KEY", &["notify"], &o)),
            ("a2.toml", agent_file("a2", "t1", "T1_KEY", &["notify"], &o)),
            (
                "b.toml",
                agent_file("b", "t2", "T2_KEY", &["notify", "b-only"], &o),
            ),
        ],
    );
    std::fs::write(agents.join("README.md"), "not an agent file").unwrap();
    let db = dir.path().join("outbox.db");
    let s = Served::start(
        &agents,
        &["--db", db.to_str().unwrap()],
        &[
            ("MIDCALL_SECRET_T1_KEY", T1_KEY),
            ("MIDCALL_SECRET_T2_KEY", T2_KEY),
        ],
    )
    .await;
    let a = s.addr;
    let r = |agent: &str, id: &str| format!("/v1/agents/{agent}/automations/{id}/webhook");
    assert_eq!(start(a, &r("a1", "notify"), T1_KEY, 1).await, 202);
    assert_eq!(
        start(a, &r("a2", "notify"), T1_KEY, 2).await,
        202,
        "one tenant, one key"
    );
    assert_eq!(start(a, &r("b", "notify"), T2_KEY, 3).await, 202);
    // The walls: each tenant's key opens only its own tenant's automations.
    assert_eq!(start(a, &r("a1", "notify"), T2_KEY, 4).await, 401);
    assert_eq!(start(a, &r("b", "notify"), T1_KEY, 5).await, 401);
    assert_eq!(start(a, &r("b", "b-only"), T1_KEY, 6).await, 401);
    assert_eq!(
        start(a, "/v1/automations/b-only/webhook", T1_KEY, 7).await,
        401
    );
    // The plain route: unique ids only.
    assert_eq!(
        start(a, "/v1/automations/b-only/webhook", T2_KEY, 8).await,
        202
    );
    let (status, body) = request(
        a,
        "POST",
        "/v1/automations/notify/webhook",
        &[("Authorization", &format!("Bearer {T1_KEY}"))],
        "{}",
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("/v1/agents/<agent>/automations/notify/webhook"),
        "{body}"
    );
    assert_eq!(start(a, &r("nobody", "notify"), T1_KEY, 9).await, 404);
    assert_eq!(start(a, &r("a1", "b-only"), T1_KEY, 10).await, 404);

    wait_until("four deliveries", WAIT, || ready(paths(&got).len() == 4)).await;
    let mut p = paths(&got);
    p.sort();
    assert_eq!(p, ["/a1/notify", "/a2/notify", "/b/b-only", "/b/notify"]);
    let bodies: BTreeSet<String> = got
        .lock()
        .unwrap()
        .iter()
        .map(|r| format!("{} {}", r.uri, r.json()["n"]))
        .collect();
    assert!(bodies.contains("/b/b-only 8"), "{bodies:?}");
    let log = midcall::RunLog::open(&db).unwrap();
    let names: BTreeSet<String> = log
        .runs(None, None, 100)
        .unwrap()
        .into_iter()
        .map(|r| r.automation)
        .collect();
    assert_eq!(
        names,
        ["a1/notify", "a2/notify", "b/b-only", "b/notify"]
            .map(String::from)
            .into(),
    );
    let endpoints: BTreeSet<String> = midcall::events::DeliveryLog::open(&db)
        .unwrap()
        .deliveries(None, None, 100)
        .unwrap()
        .into_iter()
        .map(|d| d.endpoint)
        .collect();
    assert!(
        endpoints.contains("b/automation b-only step 1"),
        "{endpoints:?}"
    );
}

/// Two tenants reading one secret for inbound keys is refused by `check DIR` and by `serve`
/// (a key of one would open the other's automations); so are two files with one agent id.
#[test]
fn a_secret_shared_across_tenants_or_a_duplicate_agent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = "http://127.0.0.1:9";
    std::fs::write(
        dir.path().join("a.toml"),
        agent_file("a", "t1", "SHARED", &["x"], o),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        agent_file("b", "t2", "SHARED", &["y"], o),
    )
    .unwrap();
    let midcall = env!("CARGO_BIN_EXE_midcall");
    let out = std::process::Command::new(midcall)
        .args(["check", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("\"a\" (tenant \"t1\") and \"b\" (tenant \"t2\")")
            && err.contains("secrets.SHARED"),
        "{err}"
    );
    let out = std::process::Command::new(midcall)
        .args([
            "serve",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("MIDCALL_SECRET_SHARED", "k")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("secrets.SHARED"));

    // Not only inbound keys: any secret a template of two tenants reads.
    let header = "\n[[webhooks]]\nurl = \"http://127.0.0.1:9/x\"\nsubscriptions = [\"message\"]\nheaders = { X-Token = \"{{secrets.A_TOKEN}}\" }\n";
    std::fs::write(
        dir.path().join("a.toml"),
        agent_file("a", "t1", "A_KEY", &["x"], o) + header,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        agent_file("b", "t2", "B_KEY", &["y"], o) + header,
    )
    .unwrap();
    let out = std::process::Command::new(midcall)
        .args(["check", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("secrets.A_TOKEN"));
    // No agent file may read the admin key.
    std::fs::write(
        dir.path().join("b.toml"),
        agent_file("b", "t2", "OPS", &["y"], o),
    )
    .unwrap();
    let out = std::process::Command::new(midcall)
        .args([
            "serve",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-secret",
            "OPS",
        ])
        .env("MIDCALL_SECRET_OPS", OPS_KEY)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reads secrets.OPS, the admin key"), "{err}");
    assert!(!err.contains(OPS_KEY));

    std::fs::write(
        dir.path().join("b.toml"),
        agent_file("a", "t1", "SHARED", &["y"], o),
    )
    .unwrap();
    let out = std::process::Command::new(midcall)
        .args(["check", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("two agent files have [agent] id = \"a\"")
    );
}

/// 200 requests in flight (headers sent, body not yet) across a reload from a file change:
/// every one answered 202, every run done once. A broken edit is refused with file and line
/// and the version in service stays; SIGHUP reloads too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_requests_in_flight_across_a_reload_are_all_answered() {
    let (rx, got) = receiver(Arc::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let agents = dir.path().join("agents");
    std::fs::create_dir(&agents).unwrap();
    let file = agents.join("a1.toml");
    let o = rx.origin();
    std::fs::write(&file, agent_file("a1", "t1", "T1_KEY", &["notify"], &o)).unwrap();
    let db = dir.path().join("outbox.db");
    let s = Served::start(
        &agents,
        &["--db", db.to_str().unwrap(), "--watch-ms", "100"],
        &[("MIDCALL_SECRET_T1_KEY", T1_KEY)],
    )
    .await;
    let addr = s.addr;
    let body = r#"{"n": 1}"#;
    let mut open = Vec::new();
    for i in 0..200 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/agents/a1/automations/notify/webhook HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {T1_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{",
            body.len() + i.to_string().len() - 1
        );
        c.write_all(head.as_bytes()).await.unwrap();
        open.push((c, i));
    }
    // The reload happens while all 200 wait for the rest of their body.
    std::fs::write(
        &file,
        agent_file("a1", "t1", "T1_KEY", &["notify", "second"], &o),
    )
    .unwrap();
    s.line("reloaded: a1").await;
    let answers = futures_util::future::join_all(open.into_iter().map(|(mut c, i)| async move {
        c.write_all(format!(r#""n": {i}}}"#).as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        parse_response(&out).0
    }))
    .await;
    assert_eq!(answers.len(), 200);
    assert!(answers.iter().all(|&s| s == 202), "{answers:?}");
    assert_eq!(
        start(
            addr,
            "/v1/agents/a1/automations/second/webhook",
            T1_KEY,
            500
        )
        .await,
        202,
        "the new automation is served"
    );
    wait_until("201 deliveries", WAIT, || ready(paths(&got).len() == 201)).await;
    let ns: BTreeSet<String> = got
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.uri == "/a1/notify")
        .map(|r| r.json()["n"].to_string())
        .collect();
    assert_eq!(ns.len(), 200, "every request's run, once");

    // A broken edit: refused with file and line, the version in service stays.
    std::fs::write(&file, "[agent]\nid = \"a1\"\ntenant = 7\n").unwrap();
    let refused = s.line("reload refused").await;
    assert!(refused.contains("a1.toml:3"), "{refused}");
    assert_eq!(
        start(
            addr,
            "/v1/agents/a1/automations/second/webhook",
            T1_KEY,
            501
        )
        .await,
        202
    );
    // Every run done before "second" goes: a queued run whose automation a reload removed
    // fails naming it (a loaded machine may not have run 501 yet).
    let log = midcall::RunLog::open(&db).unwrap();
    wait_until("every run finished", WAIT, || {
        ready(log.runs(None, Some("succeeded"), 1000).unwrap().len() == 202)
    })
    .await;
    // Fixed, without "second", applied by SIGHUP (the watcher also sees it).
    std::fs::write(&file, agent_file("a1", "t1", "T1_KEY", &["notify"], &o)).unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &s.child.id().to_string()])
        .status();
    s.line("reloaded: a1").await;
    assert_eq!(
        start(
            addr,
            "/v1/agents/a1/automations/second/webhook",
            T1_KEY,
            502
        )
        .await,
        404
    );
    // A file added adds its agent; removed, removes it.
    let b = agents.join("b.toml");
    std::fs::write(&b, agent_file("b", "t1", "T1_KEY", &["hello"], &o)).unwrap();
    s.line("reloaded: a1, b").await;
    assert_eq!(
        start(addr, "/v1/agents/b/automations/hello/webhook", T1_KEY, 503).await,
        202
    );
    std::fs::remove_file(&b).unwrap();
    let line = s.line("reloaded:").await;
    assert!(line.ends_with("reloaded: a1"), "{line}");
    assert_eq!(
        start(addr, "/v1/agents/b/automations/hello/webhook", T1_KEY, 504).await,
        404
    );
    // Egress is fixed at start: a changed [egress] is refused, the version in service stays.
    std::fs::write(
        &file,
        agent_file("a1", "t1", "T1_KEY", &["notify"], &o) + "\n[egress]\nallow_http = true\n",
    )
    .unwrap();
    let refused = s.line("reload refused").await;
    assert!(refused.contains("[egress] section changed"), "{refused}");
    assert_eq!(
        start(
            addr,
            "/v1/agents/a1/automations/notify/webhook",
            T1_KEY,
            505
        )
        .await,
        202
    );
}

fn qs(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The operator API: key checks, filters, cursors, bad input, replay, recover, disable and
/// enable, runs.
async fn the_operator_api_lists_replays_recovers_and_disables(engine: Engine) {
    let fail = Arc::new(AtomicBool::new(true));
    let (rx, got) = receiver(fail.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let o = rx.origin();
    let agents = agents_dir(
        dir.path(),
        &[
            ("a1.toml", agent_file("a1", "t1", "T1_KEY", &["notify"], &o)),
            ("b.toml", agent_file("b", "t2", "T2_KEY", &["notify"], &o)),
        ],
    );
    let db = engine.db(dir.path(), "outbox.db");
    let s = Served::start(
        &agents,
        &[
            "--db",
            db.to_str().unwrap(),
            "--admin-secret",
            "OPS_KEY",
            "--retry-schedule-ms",
            "20",
        ],
        &[
            ("MIDCALL_SECRET_T1_KEY", T1_KEY),
            ("MIDCALL_SECRET_T2_KEY", T2_KEY),
            ("MIDCALL_SECRET_OPS_KEY", OPS_KEY),
        ],
    )
    .await;
    let a = s.addr;
    for n in 0..3 {
        assert_eq!(
            start(a, "/v1/agents/a1/automations/notify/webhook", T1_KEY, n).await,
            202
        );
    }
    assert_eq!(
        start(a, "/v1/agents/b/automations/notify/webhook", T2_KEY, 9).await,
        202
    );

    // The key.
    let (status, body) = request(a, "GET", "/v1/admin/deliveries", &[], "").await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = request(
        a,
        "GET",
        "/v1/admin/deliveries",
        &[("Authorization", &format!("Bearer {T1_KEY}"))],
        "",
    )
    .await;
    assert_eq!(status, 401, "an inbound key is not the admin key");

    // Four failed deliveries (two attempts each), then the filters.
    wait_until(
        "four failed deliveries",
        Duration::from_secs(20),
        || async move {
            let (_, v) = admin(a, "GET", "/v1/admin/deliveries?status=failed").await;
            v["deliveries"].as_array().map_or(0, Vec::len) == 4
        },
    )
    .await;
    let (status, v) = admin(a, "GET", "/v1/admin/deliveries?status=failed&agent=a1").await;
    assert_eq!(status, 200, "{v}");
    let list = v["deliveries"].as_array().unwrap();
    assert_eq!(list.len(), 3, "{v}");
    for d in list {
        assert_eq!(d["agent"], "a1");
        assert_eq!(d["endpoint"], "a1/automation notify step 1");
        let attempts = d["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{d}");
        assert_eq!(attempts[0]["status_code"], 500);
        assert!(attempts[0]["response_snippet"]
            .as_str()
            .unwrap()
            .contains("crm down"));
        assert!(attempts[0]["duration_ms"].is_number());
    }
    let count = |v: &Value| v["deliveries"].as_array().map_or(0, Vec::len);
    assert_eq!(
        count(&admin(a, "GET", "/v1/admin/deliveries?tenant=t2").await.1),
        1
    );
    assert_eq!(
        count(&admin(a, "GET", "/v1/admin/deliveries?tenant=t1").await.1),
        3
    );
    let ep_query = format!(
        "/v1/admin/deliveries?endpoint={}",
        qs("a1/automation notify step 1")
    );
    assert_eq!(count(&admin(a, "GET", &ep_query).await.1), 3);
    let call = list[0]["call_id"].as_str().unwrap().to_string();
    let (_, by_call) = admin(a, "GET", &format!("/v1/admin/deliveries?call_id={call}")).await;
    assert_eq!(count(&by_call), 1);
    assert_eq!(by_call["deliveries"][0]["call_id"], call);
    assert_eq!(
        count(
            &admin(a, "GET", "/v1/admin/deliveries?tenant=nobody")
                .await
                .1
        ),
        0
    );
    assert_eq!(
        count(
            &admin(
                a,
                "GET",
                "/v1/admin/deliveries?event=automation:notify&status=failed"
            )
            .await
            .1
        ),
        4
    );
    assert_eq!(
        count(&admin(a, "GET", "/v1/admin/deliveries?until=0").await.1),
        0
    );
    assert_eq!(
        count(
            &admin(a, "GET", "/v1/admin/deliveries?since=2020-01-01T00:00:00Z")
                .await
                .1
        ),
        4
    );
    // Pages of two.
    let (_, p1) = admin(a, "GET", "/v1/admin/deliveries?agent=a1&limit=2").await;
    assert_eq!(count(&p1), 2);
    let cursor = p1["next_cursor"].as_str().unwrap().to_string();
    let (_, p2) = admin(
        a,
        "GET",
        &format!("/v1/admin/deliveries?agent=a1&limit=2&cursor={cursor}"),
    )
    .await;
    assert_eq!(count(&p2), 1);
    assert!(p2["next_cursor"].is_null());
    let ids: BTreeSet<i64> = p1["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .chain(p2["deliveries"].as_array().unwrap())
        .map(|d| d["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    // Bad input: 400 naming the parameter; unknown ids 404.
    for (q, names) in [
        ("status=lost", "status"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("colour=red", "colour"),
        ("since=yesterday", "since"),
        ("cursor=abc", "cursor"),
    ] {
        let (status, v) = admin(a, "GET", &format!("/v1/admin/deliveries?{q}")).await;
        assert_eq!(status, 400, "{q}: {v}");
        assert!(v["error"].as_str().unwrap().contains(names), "{q}: {v}");
    }
    assert_eq!(admin(a, "GET", "/v1/admin/deliveries/999999").await.0, 404);
    assert_eq!(admin(a, "GET", "/v1/admin/deliveries/abc").await.0, 404);
    assert_eq!(admin(a, "GET", "/v1/admin/nothing").await.0, 404);
    let first = *ids.iter().next().unwrap();
    assert_eq!(
        admin(a, "GET", &format!("/v1/admin/deliveries/{first}/replay"))
            .await
            .0,
        405
    );

    // The receiver is back: replay one, then recover the endpoint's other failures.
    fail.store(false, Ordering::SeqCst);
    let (status, v) = admin(a, "POST", &format!("/v1/admin/deliveries/{first}/replay")).await;
    assert_eq!(status, 200, "{v}");
    let one = format!("/v1/admin/deliveries/{first}");
    let one = one.as_str();
    wait_until(
        "the replayed delivery",
        Duration::from_secs(20),
        || async move { admin(a, "GET", one).await.1["status"] == "delivered" },
    )
    .await;
    let (_, d) = admin(a, "GET", &format!("/v1/admin/deliveries/{first}")).await;
    assert_eq!(d["status"], "delivered", "{d}");
    assert_eq!(d["attempts"].as_array().unwrap().len(), 3);
    let ep = qs("a1/automation notify step 1");
    let (status, v) = admin(a, "POST", &format!("/v1/admin/endpoints/{ep}/recover")).await;
    assert_eq!(status, 400, "since is required: {v}");
    let (status, v) = admin(
        a,
        "POST",
        &format!("/v1/admin/endpoints/{ep}/recover?since=0"),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["replayed"], 2, "{v}");
    wait_until("a1's three delivered", WAIT, || {
        ready(paths(&got).iter().filter(|p| *p == "/a1/notify").count() == 3)
    })
    .await;
    assert_eq!(
        admin(a, "POST", "/v1/admin/endpoints/nowhere/disable")
            .await
            .0,
        404
    );

    // Disable b's endpoint: a new run's delivery is skipped; enable and recover: delivered.
    let bep = qs("b/automation notify step 1");
    let (status, v) = admin(a, "POST", &format!("/v1/admin/endpoints/{bep}/disable")).await;
    assert_eq!((status, v["disabled"].clone()), (200, json!(true)), "{v}");
    assert_eq!(
        start(a, "/v1/agents/b/automations/notify/webhook", T2_KEY, 10).await,
        202
    );
    wait_until(
        "b's skipped delivery",
        Duration::from_secs(20),
        || async move {
            count(
                &admin(a, "GET", "/v1/admin/deliveries?agent=b&status=skipped")
                    .await
                    .1,
            ) == 1
        },
    )
    .await;
    assert_eq!(
        count(
            &admin(a, "GET", "/v1/admin/deliveries?agent=b&status=skipped")
                .await
                .1
        ),
        1
    );
    let (_, eps) = admin(a, "GET", "/v1/admin/endpoints").await;
    let b_state = eps["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint"] == "b/automation notify step 1")
        .cloned()
        .unwrap();
    assert_eq!(b_state["disabled"], true, "{eps}");
    assert_eq!(b_state["agent"], "b");
    assert_eq!(
        admin(a, "POST", &format!("/v1/admin/endpoints/{bep}/enable"))
            .await
            .0,
        200
    );
    let (_, v) = admin(
        a,
        "POST",
        &format!("/v1/admin/endpoints/{bep}/recover?since=0"),
    )
    .await;
    assert_eq!(v["replayed"], 2, "the failed one and the skipped one: {v}");
    wait_until("b's two delivered", WAIT, || {
        ready(paths(&got).iter().filter(|p| *p == "/b/notify").count() == 2)
    })
    .await;

    // Runs.
    let (status, v) = admin(a, "GET", "/v1/admin/runs?agent=b").await;
    assert_eq!(status, 200, "{v}");
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert!(runs
        .iter()
        .all(|r| r["automation"] == "b/notify" && r["agent"] == "b"));
    let id = runs[0]["id"].as_str().unwrap();
    let (status, r) = admin(a, "GET", &format!("/v1/admin/runs/{id}")).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["steps"][0]["kind"], "send_webhook");
    assert_eq!(r["steps"][0]["status"], "ok");
    assert_eq!(admin(a, "GET", "/v1/admin/runs/run_nothing").await.0, 404);
    assert_eq!(admin(a, "GET", "/v1/admin/runs?status=lost").await.0, 400);
    let (_, p1) = admin(a, "GET", "/v1/admin/runs?limit=3").await;
    let c = p1["next_cursor"].as_str().unwrap().to_string();
    let (_, p2) = admin(
        a,
        "GET",
        &format!("/v1/admin/runs?limit=3&cursor={}", qs(&c)),
    )
    .await;
    assert_eq!(
        p1["runs"].as_array().unwrap().len() + p2["runs"].as_array().unwrap().len(),
        5
    );

    // No secret anywhere in what the API shows.
    let (_, agents) = admin(a, "GET", "/v1/admin/agents").await;
    let text = agents.to_string();
    assert!(text.contains("\"id\":\"a1\""), "{text}");
    for secret in [T1_KEY, T2_KEY, OPS_KEY] {
        assert!(!text.contains(secret));
    }
}
both_engines!(the_operator_api_lists_replays_recovers_and_disables);

/// Without an admin key the API and the console are off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_key_the_operator_api_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a1.toml");
    std::fs::write(
        &file,
        agent_file("a1", "t1", "T1_KEY", &["notify"], "http://127.0.0.1:9"),
    )
    .unwrap();
    let db = dir.path().join("outbox.db");
    let s = Served::start(
        &file,
        &["--db", db.to_str().unwrap()],
        &[("MIDCALL_SECRET_T1_KEY", T1_KEY)],
    )
    .await;
    let (status, v) = admin(s.addr, "GET", "/v1/admin/deliveries").await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("--admin-secret"));
    assert_eq!(request(s.addr, "GET", "/console", &[], "").await.0, 404);
    // A key too short, or named and missing, stops the start with a clear error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_midcall"))
        .args([
            "serve",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-secret",
            "NOPE",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("MIDCALL_SECRET_NOPE"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_midcall"))
        .args(["serve", file.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .env("MIDCALL_SECRET_ADMIN_KEY", "short")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("16 characters"));
}

fn set(text: &str) -> Arc<midcall::ActionSet> {
    Arc::new(midcall::ActionSet::from_str("t.toml", text, midcall::Syntax::Toml).unwrap())
}

fn hook(label: &str, url: &str, extra: &str) -> String {
    format!("\n[[webhooks]]\nlabel = \"{label}\"\nurl = \"{url}\"\nsubscriptions = [\"message\", \"phone_call_ended\", \"post_call_processing_completed\"]\n{extra}\n")
}

/// With many agents, an event goes only to its own agent's webhooks; a call_completed
/// automation with `agents = "all"` hears its own tenant's agents only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_call_completed_automations_stay_inside_their_tenant() {
    let (rx, got) = receiver(Arc::default()).await;
    let o = rx.origin();
    let a = set(&format!(
        "[agent]\nid = \"a\"\ntenant = \"t1\"\n{}\n[[automations]]\nid = \"everyone\"\ntrigger = {{ on = \"call_completed\", agents = \"all\" }}\nsteps = [ {{ send_webhook = {{ url = \"{o}/everyone\", body = {{ call = \"{{{{call.id}}}}\" }} }} }} ]\n",
        hook("a-events", &format!("{o}/a-events"), "")
    ));
    let a2 = set(&format!(
        "[agent]\nid = \"a2\"\ntenant = \"t1\"\n{}",
        hook("events", &format!("{o}/a2-events"), "")
    ));
    let b = set(&format!(
        "[agent]\nid = \"b\"\ntenant = \"t2\"\n{}",
        hook("events", &format!("{o}/b-events"), "")
    ));
    let agents = midcall::config::Agents::many(vec![a, a2, b]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let runtime = midcall::Runtime::builder()
        .egress(crate::support::loopback_policy())
        .build()
        .unwrap();
    let bus = midcall::EventBus::builder(dir.path().join("outbox.db"))
        .agents(&agents)
        .egress(crate::support::loopback_policy())
        .build()
        .unwrap();
    let automations = midcall::Automations::for_agents(agents, runtime, bus.clone())
        .start()
        .unwrap();
    let info = |agent: &str, id: &str| midcall::CallInfo {
        id: id.into(),
        agent_id: agent.into(),
        ..crate::support::call_info()
    };
    bus.publish_durable(
        &midcall::events::Event::new(midcall::events::EventType::Message, json!({"to": "b"})),
        &info("b", "call_b"),
    )
    .await
    .unwrap();
    let end = midcall::CallEnd::new(Duration::from_secs(3), "user_hangup");
    let from_b = automations
        .complete_call(&midcall::Call::new(info("b", "call_b2")), &end)
        .await
        .unwrap();
    assert!(from_b.is_empty(), "t1's automation never hears t2's calls");
    let from_a2 = automations
        .complete_call(&midcall::Call::new(info("a2", "call_a2")), &end)
        .await
        .unwrap();
    assert_eq!(from_a2.len(), 1, "\"all\" is all of t1's agents");
    let gone = automations
        .complete_call(&midcall::Call::new(info("gone", "call_gone")), &end)
        .await
        .unwrap();
    assert!(
        gone.is_empty(),
        "an agent not loaded starts nothing of another's"
    );
    // b's message and its two call-end events, a2's two, and one automation delivery.
    wait_until("six deliveries", WAIT, || ready(paths(&got).len() == 6)).await;
    let mut p = paths(&got);
    p.sort();
    assert_eq!(
        p,
        [
            "/a2-events",
            "/a2-events",
            "/b-events",
            "/b-events",
            "/b-events",
            "/everyone"
        ]
    );
    let everyone = got
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.uri == "/everyone")
        .map(|r| r.json())
        .unwrap();
    assert_eq!(everyone["call"], "call_a2");
    automations.shutdown(Duration::from_secs(1)).await;
    bus.close().await;
}

/// `max_per_second` holds an endpoint to its rate: 12 events at 4/s (a burst of 4) take about
/// two seconds, where unthrottled they land at once; all arrive. A generous bound only a
/// missing throttle breaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_endpoint_gets_its_rate_and_every_event() {
    let times: Arc<Mutex<Vec<tokio::time::Instant>>> = Arc::default();
    let t = times.clone();
    let rx = TestServer::http(move |_, _| {
        t.lock().unwrap().push(tokio::time::Instant::now());
        Reply::ok(json!({}))
    })
    .await;
    let fast: Arc<Mutex<Vec<tokio::time::Instant>>> = Arc::default();
    let f = fast.clone();
    let rx2 = TestServer::http(move |_, _| {
        f.lock().unwrap().push(tokio::time::Instant::now());
        Reply::ok(json!({}))
    })
    .await;
    let s = set(&format!(
        "[agent]\nid = \"a\"\ntenant = \"t1\"\n{}{}",
        hook(
            "slow",
            &format!("{}/slow", rx.origin()),
            "max_per_second = 4"
        ),
        hook("fast", &format!("{}/fast", rx2.origin()), "")
    ));
    let dir = tempfile::tempdir().unwrap();
    let bus = midcall::EventBus::builder(dir.path().join("outbox.db"))
        .webhooks(&s)
        .egress(crate::support::loopback_policy())
        .build()
        .unwrap();
    for i in 0..12 {
        let call = midcall::CallInfo {
            id: format!("call_{i}"),
            ..crate::support::call_info()
        };
        bus.publish_durable(
            &midcall::events::Event::new(midcall::events::EventType::Message, json!({"n": i})),
            &call,
        )
        .await
        .unwrap();
    }
    wait_until(
        "twelve events at each endpoint",
        Duration::from_secs(30),
        || ready(times.lock().unwrap().len() == 12 && fast.lock().unwrap().len() == 12),
    )
    .await;
    let span = |v: &Arc<Mutex<Vec<tokio::time::Instant>>>| {
        let v = v.lock().unwrap();
        assert_eq!(v.len(), 12, "every event arrives");
        *v.last().unwrap() - v[0]
    };
    let slow = span(&times);
    assert!(
        slow >= Duration::from_millis(1500),
        "12 events at 4/s arrived within {slow:?}"
    );
    assert!(
        span(&fast) < slow / 2,
        "the unthrottled endpoint is not held back"
    );
    bus.close().await;
}

/// A webhook with a `signing_key` carries `v1a` (ed25519) beside `v1` (HMAC); the receiver
/// checks it with the public key `midcall webhooks public-key` prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_carry_an_ed25519_signature_the_published_key_verifies() {
    use midcall::events::signing;
    let (secret, public) = signing::generate_key().unwrap();
    let (rx, got) = receiver(Arc::default()).await;
    let text = format!(
        "[agent]\nid = \"a\"\ntenant = \"t1\"\n{}",
        hook(
            "signed",
            &format!("{}/signed", rx.origin()),
            "signing_secret = \"{{secrets.WHSEC}}\"\nsigning_key = \"{{secrets.ED_KEY}}\""
        )
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.toml");
    std::fs::write(&file, &text).unwrap();
    let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let secrets = Arc::new(
        midcall::MapSecrets::new()
            .with("WHSEC", whsec)
            .with("ED_KEY", secret.as_str()),
    );
    let bus = midcall::EventBus::builder(dir.path().join("outbox.db"))
        .webhooks(&set(&text))
        .secrets(secrets)
        .egress(crate::support::loopback_policy())
        .build()
        .unwrap();
    bus.publish_durable(
        &midcall::events::Event::new(midcall::events::EventType::Message, json!({"n": 1})),
        &crate::support::call_info(),
    )
    .await
    .unwrap();
    wait_until("the delivery", WAIT, || ready(paths(&got).len() == 1)).await;
    let r = got.lock().unwrap()[0].clone();
    let (id, ts, sig) = (
        r.header("webhook-id").unwrap().to_string(),
        r.header("webhook-timestamp")
            .unwrap()
            .parse::<i64>()
            .unwrap(),
        r.header("webhook-signature").unwrap().to_string(),
    );
    assert!(sig.contains("v1,") && sig.contains("v1a,"), "{sig}");
    let now = midcall::time::now_ms() / 1000;
    assert!(signing::verify_ed25519(
        &public, &id, ts, &r.body, &sig, now, 300
    ));
    assert!(signing::verify(whsec, &id, ts, &r.body, &sig, now, 300));
    let mut tampered = r.body.to_vec();
    tampered.push(b' ');
    assert!(!signing::verify_ed25519(
        &public, &id, ts, &tampered, &sig, now, 300
    ));
    bus.close().await;

    let midcall = env!("CARGO_BIN_EXE_midcall");
    let out = std::process::Command::new(midcall)
        .args(["webhooks", "public-key", file.to_str().unwrap(), "--json"])
        .env("MIDCALL_SECRET_ED_KEY", &secret)
        .output()
        .unwrap();
    assert!(out.status.success());
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["public_key"], public);
    assert_eq!(line["webhook"], "signed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains(&secret[5..]),
        "the private key is never printed"
    );
    let out = std::process::Command::new(midcall)
        .args(["webhooks", "public-key", file.to_str().unwrap()])
        .env_remove("MIDCALL_SECRET_ED_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ED_KEY"));
    // A literal key in a config file is refused.
    let bad = text.replace("{{secrets.ED_KEY}}", &secret);
    let e = midcall::ActionSet::from_str("t.toml", &bad, midcall::Syntax::Toml).unwrap_err();
    assert!(e.to_string().contains("signing_key"), "{e}");
    assert!(!e.to_string().contains(&secret[5..]));
}

/// A receiver that echoes the request (a debug endpoint) does not put a secret into the
/// delivery log, the admin API or the console: the response is kept with it as ***.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_echoed_by_the_receiver_is_not_kept_in_the_log() {
    let rx = TestServer::http(|r, _| {
        Reply::Json(
            500,
            json!({"you_sent": r.header("x-token").unwrap_or_default()}),
        )
    })
    .await;
    let text = format!(
        "[agent]\nid = \"a\"\ntenant = \"t1\"\n{}",
        hook(
            "echo",
            &format!("{}/echo", rx.origin()),
            "headers = { X-Token = \"{{secrets.TOKEN}}\" }"
        )
    );
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let bus = midcall::EventBus::builder(&db)
        .webhooks(&set(&text))
        .secrets(Arc::new(
            midcall::MapSecrets::new().with("TOKEN", "tok-very-secret-value"),
        ))
        .egress(crate::support::loopback_policy())
        .retry_schedule(Vec::new())
        .build()
        .unwrap();
    bus.publish_durable(
        &midcall::events::Event::new(midcall::events::EventType::Message, json!({})),
        &crate::support::call_info(),
    )
    .await
    .unwrap();
    let log = midcall::events::DeliveryLog::open(&db).unwrap();
    wait_until("the failed delivery", WAIT, || {
        ready(log.deliveries(None, Some("failed"), 10).unwrap().len() == 1)
    })
    .await;
    let d = &log.deliveries(None, None, 10).unwrap()[0];
    let attempts = log.attempts(d.id).unwrap();
    let kept = &attempts[0].response_prefix;
    assert!(kept.contains("***"), "{kept}");
    assert!(!kept.contains("tok-very-secret-value"), "{kept}");
    bus.close().await;
}

/// A delivery waiting for its next attempt shows when it is due, and replaying it is a
/// conflict (409), not a second copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_delivery_shows_its_next_attempt_and_is_not_replayed() {
    let (rx, _) = receiver(Arc::new(AtomicBool::new(true))).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a1.toml");
    std::fs::write(
        &file,
        agent_file("a1", "t1", "T1_KEY", &["notify"], &rx.origin()),
    )
    .unwrap();
    let db = dir.path().join("outbox.db");
    let s = Served::start(
        &file,
        &[
            "--db",
            db.to_str().unwrap(),
            "--admin-secret",
            "OPS_KEY",
            "--retry-schedule-ms",
            "600000",
        ],
        &[
            ("MIDCALL_SECRET_T1_KEY", T1_KEY),
            ("MIDCALL_SECRET_OPS_KEY", OPS_KEY),
        ],
    )
    .await;
    assert_eq!(
        start(s.addr, "/v1/automations/notify/webhook", T1_KEY, 1).await,
        202
    );
    let addr = s.addr;
    let d = wait_for(
        "the first attempt",
        Duration::from_secs(20),
        || async move {
            let (_, v) = admin(addr, "GET", "/v1/admin/deliveries").await;
            let d = v["deliveries"][0].clone();
            (d["attempts_made"] == 1).then_some(d)
        },
    )
    .await;
    assert_eq!(d["status"], "pending", "{d}");
    let next = d["next_attempt_ms"].as_i64().unwrap();
    let created = d["created_ms"].as_i64().unwrap();
    assert!(
        next >= created + 400_000,
        "the retry is 10 min (jittered) away: {d}"
    );
    let (status, v) = admin(
        s.addr,
        "POST",
        &format!("/v1/admin/deliveries/{}/replay", d["id"]),
    )
    .await;
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("pending"));
}

/// Console sessions: the cookie's flags, the page headers, a session from one process
/// accepted by another with the same admin key, a logout ending it where it was served;
/// and failures from an address are limited (429) without locking the key out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_cross_processes_and_failures_never_lock_the_key_out() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a1.toml");
    std::fs::write(
        &file,
        agent_file("a1", "t1", "T1_KEY", &["notify"], "http://127.0.0.1:9"),
    )
    .unwrap();
    let env = [
        ("MIDCALL_SECRET_T1_KEY", T1_KEY),
        ("MIDCALL_SECRET_OPS_KEY", OPS_KEY),
    ];
    let serve = |name: &str| {
        let db = dir.path().join(name);
        let file = file.clone();
        async move {
            Served::start(
                &file,
                &["--db", db.to_str().unwrap(), "--admin-secret", "OPS_KEY"],
                &env,
            )
            .await
        }
    };
    let (a, b) = (serve("a.db").await, serve("b.db").await);
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, head, _) = exchange(
        a.addr,
        "POST",
        "/console/login",
        &form,
        &format!("secret={OPS_KEY}"),
    )
    .await;
    assert_eq!(status, 303);
    let set_cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap()
        .to_string();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    assert!(
        !set_cookie.contains("Secure"),
        "plain HTTP on loopback: {set_cookie}"
    );
    assert!(set_cookie.contains("Max-Age=43200"), "12 h: {set_cookie}");
    let cookie = set_cookie
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = |addr: SocketAddr| {
        let cookie = cookie.clone();
        async move { exchange(addr, "GET", "/console/agents", &[("Cookie", &cookie)], "").await }
    };
    let (status, head, body) = page(b.addr).await;
    assert_eq!(status, 200, "the other process accepts the session");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(
        lower.contains("frame-ancestors 'none'") && lower.contains("x-frame-options: deny"),
        "{head}"
    );
    let csrf = body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let (status, _, _) = exchange(
        a.addr,
        "POST",
        "/console/logout",
        &[("Cookie", &cookie), form[0]],
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(status, 303);
    let (status, head, _) = page(a.addr).await;
    assert_eq!(status, 303, "logged out where the logout was served");
    assert!(
        head.contains("location: /console/login") || head.contains("Location: /console/login"),
        "{head}"
    );
    assert_eq!(
        page(b.addr).await.0,
        200,
        "another process does not know of the logout"
    );

    // Wrong keys from this address run out (429); the right key still gets in.
    let mut limited = false;
    for _ in 0..400 {
        let (status, _) = request(
            b.addr,
            "GET",
            "/v1/admin/runs",
            &[("Authorization", "Bearer wrong-key")],
            "",
        )
        .await;
        assert!(status == 401 || status == 429, "{status}");
        if status == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "failures are rate limited");
    assert_eq!(admin(b.addr, "GET", "/v1/admin/runs").await.0, 200);
    // The same bucket: it refills at 20/s, so on a loaded machine a token may come back
    // between two requests and a wrong login or two still get 401; a bucket of the login's
    // own would let a burst of 100 through.
    let mut allowed = 0;
    loop {
        let (status, _, _) =
            exchange(b.addr, "POST", "/console/login", &form, "secret=wrong").await;
        assert!(status == 401 || status == 429, "{status}");
        if status == 429 {
            break;
        }
        allowed += 1;
        assert!(
            allowed < 10,
            "a login from the same address is limited too (by the API's failures)"
        );
    }
    let (status, _, _) = exchange(
        b.addr,
        "POST",
        "/console/login",
        &form,
        &format!("secret={OPS_KEY}"),
    )
    .await;
    assert_eq!(status, 303, "the right key logs in");
}

/// Each agent has its own inbound token buckets: requests to another agent (whose rate is
/// high) never refill the buckets of an agent with a low one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_has_its_own_inbound_rate() {
    let dir = tempfile::tempdir().unwrap();
    let slow = agent_file("slow", "t1", "T1_KEY", &["x"], "http://127.0.0.1:9").replace(
        "per_second = 10000, burst = 10000",
        "per_second = 0.01, burst = 1",
    );
    let fast = agent_file("fast", "t1", "FAST_KEY", &["y"], "http://127.0.0.1:9");
    let agents = agents_dir(dir.path(), &[("slow.toml", slow), ("fast.toml", fast)]);
    let db = dir.path().join("outbox.db");
    let s = Served::start(
        &agents,
        &["--db", db.to_str().unwrap()],
        &[
            ("MIDCALL_SECRET_T1_KEY", T1_KEY),
            ("MIDCALL_SECRET_FAST_KEY", "fast-agent-inbound-key"),
        ],
    )
    .await;
    let slow_route = "/v1/agents/slow/automations/x/webhook";
    assert_eq!(start(s.addr, slow_route, T1_KEY, 1).await, 202);
    for n in 0..5 {
        // The same key sent to the fast agent: refused there, and no token for the slow one.
        assert_eq!(
            start(s.addr, "/v1/agents/fast/automations/y/webhook", T1_KEY, n).await,
            401
        );
    }
    assert_eq!(
        start(s.addr, slow_route, T1_KEY, 2).await,
        429,
        "the slow agent's burst is spent"
    );
}
