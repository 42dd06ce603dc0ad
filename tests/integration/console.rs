//! The console in a real browser: headless Chromium, driven by playwright-core
//! (`tests/browser/console.mjs`), against a live `midcall serve` with a delivery that failed.
//! Log in (a wrong key refused), see the failure, a replay without the CSRF token refused,
//! press replay, see it delivered; runs, a call's timeline, phone width. Screenshots of each
//! page go to `tests/browser/artifacts/`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::operator::{agent_file, agents_dir, request, Served};
use crate::support::servers::{Reply, TestServer};
use crate::support::{wait_until, WAIT};

const T1_KEY: &str = "tenant-one-inbound-key";
const OPS_KEY: &str = "console-admin-key-abcdef0123456789";

/// What the browser test needs, or a panic naming how to get it.
fn browser_tools() -> (PathBuf, PathBuf) {
    let root = crate::support::root();
    let chromium = std::env::var_os("CHROMIUM_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.exists(),
        "{} not found: install the Debian package `chromium` (apt-get install chromium fonts-dejavu-core); .ci/run does",
        chromium.display()
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node not found: install Node.js (the Debian package `nodejs`) to drive the browser"
    );
    let script = root.join("tests/browser/console.mjs");
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run `npm ci` in tests/browser (.ci/run does)"
    );
    (chromium, script)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium_logs_in_shows_a_failure_and_replays_it() {
    let (chromium, script) = browser_tools();
    let fail = Arc::new(AtomicBool::new(true));
    let delivered = Arc::new(Mutex::new(0usize));
    let (f, d) = (fail.clone(), delivered.clone());
    let rx = TestServer::http(move |_, _| {
        if f.load(Ordering::SeqCst) {
            Reply::Json(503, json!({"error": "the CRM is down for maintenance"}))
        } else {
            *d.lock().unwrap() += 1;
            Reply::ok(json!({"ok": true}))
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let o = rx.origin();
    let mut front = agent_file(
        "front-desk",
        "acme-dental",
        "T1_KEY",
        &["callback-request"],
        &o,
    );
    front.push_str(&format!(
        "\n[[actions]]\nname = \"lookup_customer\"\ndescription = \"Look up the caller's account\"\nurl = \"{o}/customers?phone={{{{call.from_number}}}}\"\nheaders = {{ Authorization = \"Bearer {{{{secrets.CRM_TOKEN}}}}\" }}\n\n[[webhooks]]\nlabel = \"Transcripts to the warehouse\"\nurl = \"{o}/warehouse\"\nsubscriptions = [\"transcript\", \"phone_call_ended\"]\nsigning_secret = \"{{{{secrets.WHSEC}}}}\"\nmax_per_second = 20\n"
    ));
    let agents = agents_dir(
        dir.path(),
        &[
            ("front-desk.toml", front),
            (
                "outage-line.toml",
                agent_file("outage-line", "city-power", "T2_KEY", &["report"], &o),
            ),
        ],
    );
    let db = dir.path().join("outbox.db");
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
            ("MIDCALL_SECRET_T2_KEY", "tenant-two-inbound-key"),
            ("MIDCALL_SECRET_OPS_KEY", OPS_KEY),
            ("MIDCALL_SECRET_CRM_TOKEN", "crm-token-never-shown"),
            (
                "MIDCALL_SECRET_WHSEC",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
        ],
    )
    .await;
    let auth = format!("Bearer {T1_KEY}");
    let (status, body) = request(
        s.addr,
        "POST",
        "/v1/agents/front-desk/automations/callback-request/webhook",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        r#"{"n": 7}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    // The delivery fails twice (the receiver answers 503), then is failed.
    let (addr, admin) = (s.addr, format!("Bearer {OPS_KEY}"));
    let admin = admin.as_str();
    wait_until("the delivery to fail", WAIT, || async move {
        let (_, b) = request(
            addr,
            "GET",
            "/v1/admin/deliveries?status=failed",
            &[("Authorization", admin)],
            "",
        )
        .await;
        b.contains("\"status\":\"failed\"")
    })
    .await;
    fail.store(false, Ordering::SeqCst);

    let out_dir = crate::support::root().join("tests/browser/artifacts");
    let _ = std::fs::remove_dir_all(&out_dir);
    let script2 = script.clone();
    let base = format!("http://{}", s.addr);
    let out2 = out_dir.clone();
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(&script2)
            .env("BASE_URL", base)
            .env("ADMIN_KEY", OPS_KEY)
            .env("OUT_DIR", &out2)
            .env("CHROMIUM_PATH", &chromium)
            .env(
                "SECRETS",
                format!("{T1_KEY},tenant-two-inbound-key,crm-token-never-shown,MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            )
            .env("TIMEOUT_MS", "30000")
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser test took over 3 minutes")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("console test: ok"),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    for shot in [
        "login.png",
        "agents.png",
        "deliveries.png",
        "delivery.png",
        "delivered.png",
        "runs.png",
        "run.png",
        "call.png",
        "deliveries-phone.png",
    ] {
        let p = out_dir.join(shot);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 1000, "{} missing or empty", p.display());
    }
    assert_eq!(
        *delivered.lock().unwrap(),
        1,
        "the replay reached the receiver once"
    );
}
