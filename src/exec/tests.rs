//! Timer behaviour of the executor's parts, on tokio's paused clock (no sockets, no sleeps).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::breaker::Breakers;
use super::dedupe::{dedupe_key, RecentToolCalls};
use super::outcome::Outcome;

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_at_its_threshold_and_probes_after_its_cooldown() {
    let b = Arc::new(Breakers::new(3, Duration::from_secs(5)));
    for _ in 0..3 {
        b.check("crm").expect("closed").record(false);
    }
    assert!(b.check("crm").is_none(), "open after three failures");
    assert!(b.check("other").is_some(), "per host");
    tokio::time::advance(Duration::from_millis(4_999)).await;
    assert!(b.check("crm").is_none(), "still cooling down");
    tokio::time::advance(Duration::from_millis(1)).await;
    let probe = b.check("crm").expect("one probe after the cooldown");
    assert!(b.check("crm").is_none(), "only one probe at a time");
    probe.record(true);
    assert!(b.check("crm").is_some(), "a successful probe closes it");
}

#[tokio::test(start_paused = true)]
async fn a_failed_or_dropped_probe_keeps_the_breaker_from_sticking() {
    let b = Arc::new(Breakers::new(1, Duration::from_secs(5)));
    b.check("crm").unwrap().record(false);
    tokio::time::advance(Duration::from_secs(5)).await;
    b.check("crm").unwrap().record(false);
    assert!(b.check("crm").is_none(), "a failed probe opens it again");
    tokio::time::advance(Duration::from_secs(5)).await;
    drop(b.check("crm").unwrap());
    assert!(
        b.check("crm").is_some(),
        "a dropped probe (barge-in) lets the next request probe"
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_is_remembered_for_the_dedupe_window_only() {
    let mut recent = RecentToolCalls::default();
    let window = Duration::from_secs(30);
    let key = dedupe_key("book", &json!({"slot": "15:00", "reason": "checkup"}));
    // Canonical arguments: the key does not depend on the order of the keys.
    assert_eq!(
        key,
        dedupe_key("book", &json!({"reason": "checkup", "slot": "15:00"}))
    );
    assert_ne!(key, dedupe_key("book", &json!({"slot": "16:00"})));
    recent.remember(key, &Outcome::new("book", None), window);
    tokio::time::advance(Duration::from_millis(29_999)).await;
    assert!(recent.find(key, window).is_some());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(recent.find(key, window).is_none(), "the window has ended");
}

/// Every transport error kind, as the transport makes them.
fn every_transport_error() -> Vec<crate::transport::TransportError> {
    use crate::transport::{ConnectError, EgressRefusal, TransportError};
    let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "os error 104");
    vec![
        TransportError::Timeout { got_headers: false },
        TransportError::Timeout { got_headers: true },
        TransportError::Connect(ConnectError::Egress(EgressRefusal::PlainHttp)),
        TransportError::Connect(ConnectError::Egress(EgressRefusal::Address(
            "10.0.0.1".parse().unwrap(),
        ))),
        TransportError::Connect(ConnectError::Dns(io())),
        TransportError::Connect(ConnectError::NoAddress),
        TransportError::Connect(ConnectError::Tcp(io())),
        TransportError::Connect(ConnectError::Tls(std::io::Error::other(
            "invalid peer certificate: UnknownIssuer; see https://docs.rs/rustls",
        ))),
        TransportError::Connect(ConnectError::BadUri),
        TransportError::Io {
            stale: false,
            message: "client error (SendRequest): connection error: peer closed connection without sending TLS close_notify: https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof".into(),
        },
        TransportError::TooLarge { limit: 1024 },
    ]
}

#[test]
fn the_model_gets_a_short_stable_reason_for_every_transport_error() {
    use super::error::{classify, describe_transport, Failure};
    use super::outcome::llm_result;
    for budget_cut in [false, true] {
        for e in every_transport_error() {
            let c = classify(&e, budget_cut);
            let detail = describe_transport(&e);
            let f = Failure::new(c.kind, c.fault, c.retry, format!("action \"a\": {detail}"));
            let mut err = f.error.clone();
            err = err.with_reason(c.reason);
            let shown = llm_result(c.kind.status(), &[], Some(&err), 2048);
            let message = shown["message"].as_str().unwrap();
            assert_eq!(message, c.reason, "{e:?}");
            assert!(
                !message.contains("://")
                    && !message.contains("error (")
                    && !message.contains("os error")
                    && !message.contains("rustls")
                    && message.len() < 80,
                "{e:?}: {message}"
            );
            // The operator keeps the detail.
            assert!(err.to_string().contains(&detail), "{e:?}");
        }
    }
}
