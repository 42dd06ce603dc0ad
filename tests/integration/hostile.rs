//! Hostile input end to end: injection through values that came from responses or the model,
//! limits on what a response can do, and a secret that never leaks.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use midcall::exec::{Budget, Status};
use midcall::state::ConversationState;
use midcall::{Call, MapSecrets, Runtime};

use crate::support::servers::{Reply, TestServer};
use crate::support::Capture;
use crate::support::{call_info, load_toml, AGENT};

const SECRET: &str = "sk_live_HOSTILE_2f1e0d9c";

fn runtime() -> Runtime {
    Runtime::builder()
        .egress(crate::support::loopback_policy())
        .secrets(Arc::new(MapSecrets::new().with("TOKEN", SECRET)))
        .dedupe_window(Duration::ZERO)
        .build()
        .unwrap()
}

fn long() -> Budget {
    Budget::new(Duration::from_secs(5))
}

#[tokio::test]
async fn a_line_break_extracted_from_a_response_cannot_reach_a_header() {
    let server = TestServer::http(|r, _| {
        if r.uri == "/first" {
            Reply::ok(json!({"token": "abc\r\nX-Admin: true"}))
        } else {
            Reply::ok(json!({}))
        }
    })
    .await;
    let text = format!(
        "{AGENT}[[actions]]\nname = \"first\"\ndescription = \"d\"\nurl = \"{o}/first\"\nextract = {{ \"session.token\" = \"$.token\" }}\n[[actions]]\nname = \"second\"\ndescription = \"d\"\nurl = \"{o}/second\"\nheaders = {{ X-Session = \"{{{{state.session.token}}}}\" }}\n",
        o = server.origin()
    );
    let set = load_toml(&text).unwrap();
    let rt = runtime();
    let mut c = Call::new(call_info());
    assert_eq!(
        rt.execute(set.action("first").unwrap(), &mut c, json!({}), &long())
            .await
            .status,
        Status::Ok
    );
    let out = rt
        .execute(set.action("second").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.status, Status::Rejected);
    let e = out.error.unwrap();
    assert!(e.is_render());
    assert!(
        e.to_string()
            .contains("header \"x-session\": rendered value contains a carriage return"),
        "{e}"
    );
    assert_eq!(
        server.request_count(),
        1,
        "the second request was never sent"
    );
}

#[tokio::test]
async fn a_response_cannot_flood_state_or_the_model() {
    let server = TestServer::http(|r, _| match r.uri.as_str() {
        "/many" => Reply::ok(json!({"items": (0..1500).collect::<Vec<_>>()})),
        "/huge" => Reply::ok(json!({"blob": "x".repeat(300 * 1024)})),
        _ => Reply::ok(json!({})),
    })
    .await;
    let text = format!(
        "{AGENT}[[actions]]\nname = \"many\"\ndescription = \"d\"\nurl = \"{o}/many\"\nextract = {{ items = {{ path = \"$.items[*]\", all = true }} }}\n[[actions]]\nname = \"huge\"\ndescription = \"d\"\nurl = \"{o}/huge\"\nextract = {{ blob = \"$.blob\" }}\non_failure = {{ set = {{ \"huge.failed\" = true }} }}\n",
        o = server.origin()
    );
    let set = load_toml(&text).unwrap();
    let rt = runtime();
    let mut c = Call::new(call_info());
    let out = rt
        .execute(set.action("many").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.status, Status::InvalidResponse);
    assert!(out
        .error
        .unwrap()
        .to_string()
        .contains("selected 1500 nodes, more than the 1000 allowed"));
    // 300 KiB into a state capped at 256 KiB: refused, the fallback still applies.
    let out = rt
        .execute(set.action("huge").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.status, Status::InvalidResponse);
    let e = out.error.unwrap();
    assert!(e.is_state(), "{e:?}");
    assert!(
        e.to_string().contains("over the cap of 262144 bytes"),
        "{e}"
    );
    assert_eq!(c.state.to_value(), json!({"huge": {"failed": true}}));
    assert!(c.state.used_bytes() <= ConversationState::new().cap_bytes());
}

/// Runs actions with the secret in the path, query, a header and the body through every kind
/// of outcome, and looks for the secret in everything that is shown.
#[test]
fn the_secret_appears_in_no_log_error_or_outcome() {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = server_rt.block_on(TestServer::http(|r, _| {
        match r.uri.split('?').next().unwrap() {
            p if p.ends_with("/ok") => Reply::ok(json!({"v": 1})),
            p if p.ends_with("/500") => Reply::Json(500, json!({"echo": "nothing"})),
            p if p.ends_with("/html") => Reply::Raw {
                status: 200,
                headers: vec![("content-type".into(), "text/html".into())],
                body: b"<p>".to_vec(),
            },
            p if p.ends_with("/hang") => Reply::Hang,
            _ => Reply::Json(404, json!({})),
        }
    }));
    let o = server.origin();
    let mut text = String::from(AGENT);
    for (name, path, extra) in [
        ("ok", "ok", ""),
        ("err500", "500", ""),
        ("html", "html", ""),
        ("hang", "hang", "timeout_ms = 100\n"),
        ("refused", "ok", ""),
    ] {
        let origin = if name == "refused" {
            "http://127.0.0.1:9".to_string()
        } else {
            o.clone()
        };
        text.push_str(&format!(
            "[[actions]]\nname = \"{name}\"\ndescription = \"d\"\nmethod = \"POST\"\nurl = \"{origin}/k/{{{{secrets.TOKEN}}}}/{path}?key={{{{secrets.TOKEN}}}}\"\nheaders = {{ Authorization = \"Bearer {{{{secrets.TOKEN}}}}\" }}\nbody = {{ token = \"{{{{secrets.TOKEN}}}}\", note = \"t={{{{secrets.TOKEN}}}}\" }}\nextract = {{ v = \"$.v\" }}\n{extra}"
        ));
    }
    text.push_str("[[actions]]\nname = \"missing\"\ndescription = \"d\"\nurl = \"https://e.example.com/{{args.nope}}\"\nheaders = { Authorization = \"Bearer {{secrets.TOKEN}}\" }\n");
    let set = load_toml(&text).unwrap();
    let capture = Capture::default();
    let subscriber = capture.subscriber(tracing_subscriber::fmt::format::FmtSpan::FULL);
    let mut shown = Vec::new();
    tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let runtime = runtime();
            let mut c = Call::new(call_info());
            let mut statuses = Vec::new();
            for a in set.actions() {
                let out = runtime.execute(a, &mut c, json!({}), &long()).await;
                statuses.push(out.status);
                shown.push(format!("{out:?}"));
                shown.push(out.to_json().to_string());
                if let Some(e) = &out.error {
                    shown.push(format!("{e} {e:?}"));
                }
            }
            assert_eq!(
                statuses,
                [
                    Status::Ok,
                    Status::HttpError,
                    Status::InvalidResponse,
                    Status::TimedOut,
                    Status::TransportError,
                    Status::Rejected
                ]
            );
            shown.push(format!("{runtime:?} {c:?}"));
        });
    });
    let logs = capture.text();
    assert!(logs.contains("action"), "spans were captured");
    shown.push(logs);
    for s in &shown {
        assert!(!s.contains(SECRET), "the secret leaked into: {s}");
        assert!(
            !s.contains("sk_live_HOSTILE"),
            "a part of the secret leaked into: {s}"
        );
    }
    // The server did get it where it belongs.
    let r = server.requests.lock().unwrap()[0].clone();
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_eq!(r.json()["token"], Value::String(SECRET.into()));
}
