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
