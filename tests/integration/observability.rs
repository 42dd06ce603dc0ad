//! Tracing spans and metrics for actions: names, fields, bounded labels, no secrets.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use midcall::exec::Budget;
use midcall::{Call, MapSecrets, Runtime};

use crate::support::servers::{Reply, TestServer};
use crate::support::Capture;
use crate::support::{call_info, load_toml, AGENT};

const SECRET: &str = "sk_live_OBSERVE_9f8e7d";

fn runtime() -> Runtime {
    Runtime::builder()
        .egress(crate::support::loopback_policy())
        .secrets(Arc::new(MapSecrets::new().with("TOKEN", SECRET)))
        .build()
        .unwrap()
}

fn run_actions(origin: &str) {
    let text = format!(
        "{AGENT}[[actions]]\nname = \"lookup\"\ndescription = \"d\"\nurl = \"{origin}/v1/c/{{{{secrets.TOKEN}}}}?key={{{{secrets.TOKEN}}}}&p={{{{call.from_number}}}}\"\nheaders = {{ Authorization = \"Bearer {{{{secrets.TOKEN}}}}\" }}\nextract = {{ v = \"$.v\" }}\n[[actions]]\nname = \"broken\"\ndescription = \"d\"\nurl = \"{origin}/500?key={{{{secrets.TOKEN}}}}\"\nheaders = {{ Authorization = \"Bearer {{{{secrets.TOKEN}}}}\" }}\n"
    );
    let set = load_toml(&text).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let runtime = runtime();
        let mut c = Call::new(call_info());
        let b = Budget::new(Duration::from_secs(5));
        let ok = runtime
            .execute(set.action("lookup").unwrap(), &mut c, json!({}), &b)
            .await;
        assert_eq!(ok.status.as_str(), "ok", "{:?}", ok.error);
        let bad = runtime
            .execute(set.action("broken").unwrap(), &mut c, json!({}), &b)
            .await;
        assert_eq!(bad.status.as_str(), "http_error");
        for o in [&ok, &bad] {
            let all = format!(
                "{o:?} {} {}",
                o.to_json(),
                o.error.as_ref().map(|e| e.to_string()).unwrap_or_default()
            );
            assert!(!all.contains(SECRET), "secret in outcome: {all}");
        }
    });
}

fn server() -> (tokio::runtime::Runtime, TestServer) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(TestServer::http(|r, _| {
        if r.uri.starts_with("/500") {
            Reply::Json(500, json!({}))
        } else {
            Reply::ok(json!({"v": 1}))
        }
    }));
    (rt, s)
}

#[test]
fn each_action_has_a_span_with_its_fields_and_no_secret() {
    let (_rt, server) = server();
    let capture = Capture::default();
    let subscriber = capture.subscriber(tracing_subscriber::fmt::format::FmtSpan::CLOSE);
    tracing::subscriber::with_default(subscriber, || run_actions(&server.origin()));
    let out = capture.text();
    let closes: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("action{") && l.contains("close"))
        .collect();
    assert!(closes.len() >= 2, "{out}");
    let lookup = closes
        .iter()
        .find(|l| l.contains("action=\"lookup\"") || l.contains("action=lookup"))
        .expect("lookup span");
    assert!(lookup.contains("call_id=call_123"), "{lookup}");
    assert!(
        lookup.contains("status=\"ok\"") || lookup.contains("status=ok"),
        "{lookup}"
    );
    assert!(lookup.contains("attempts=1"), "{lookup}");
    assert!(
        lookup.contains("/v1/c/***"),
        "URL path with the secret redacted: {lookup}"
    );
    assert!(!lookup.contains("key="), "no query string: {lookup}");
    let broken = closes
        .iter()
        .find(|l| l.contains("broken"))
        .expect("broken span");
    assert!(broken.contains("http_error"), "{broken}");
    assert!(!out.contains(SECRET), "secret in tracing output:\n{out}");
}

#[test]
fn metrics_have_units_in_names_and_bounded_labels() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let (_rt, server) = server();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || run_actions(&server.origin()));
    let snapshot = snapshotter.snapshot().into_vec();
    let mut seen = Vec::new();
    for (key, _, _, value) in &snapshot {
        let k = key.key();
        let labels: Vec<(String, String)> = k
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect();
        for (name, v) in &labels {
            assert!(
                ["action", "status", "host"].contains(&name.as_str()),
                "unbounded label {name}={v}"
            );
            assert!(!v.contains(SECRET) && !v.contains("call_123"));
        }
        seen.push((k.name().to_string(), labels, value));
    }
    let find = |name: &str, action: &str| {
        seen.iter()
            .find(|(n, l, _)| n == name && l.iter().any(|(k, v)| k == "action" && v == action))
            .unwrap_or_else(|| panic!("{name} for {action} in {seen:?}"))
    };
    match &find("midcall_actions_total", "lookup").2 {
        DebugValue::Counter(n) => assert_eq!(*n, 1),
        v => panic!("{v:?}"),
    }
    let (_, labels, v) = find("midcall_action_duration_seconds", "broken");
    assert!(labels.contains(&("status".into(), "http_error".into())));
    assert!(matches!(v, DebugValue::Histogram(h) if h.len() == 1));
    assert!(seen
        .iter()
        .any(|(n, _, v)| n == "midcall_connections_opened_total"
            && matches!(v, DebugValue::Counter(1))));
}
