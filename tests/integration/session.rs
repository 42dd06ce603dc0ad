//! The call session against real local servers: every tool call ends in exactly one end state,
//! cancellation drops what it should and finishes what it should, held side effects wait for
//! the end of the turn, parallel tool calls fire their fillers, unknown tools are the caller's
//! fault, and a short turn budget never opens a healthy host's breaker.

use std::future::ready;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use midcall::exec::{Budget, Fault, Status};
use midcall::{ActionSet, CallSession, Runtime, StatePath, ToolCall};

use crate::support::servers::{json_response, read_request, wait_closed, write_all, RawServer};
use crate::support::{call_info, load_toml, loopback_policy, wait_until, AGENT, WAIT};

fn agent(actions: &str) -> Arc<ActionSet> {
    let text = format!("{AGENT}{actions}");
    Arc::new(load_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}")))
}

fn action(name: &str, origin: &str, rest: &str) -> String {
    format!(
        "[[actions]]\nname = \"{name}\"\ndescription = \"d\"\nurl = \"{origin}/{name}\"\n{rest}\n"
    )
}

async fn session(rt: &Runtime, agent: &Arc<ActionSet>) -> CallSession {
    rt.start_call(agent.clone(), call_info(), Duration::from_secs(1))
        .await
}

fn runtime() -> Runtime {
    Runtime::builder()
        .egress(loopback_policy())
        .build()
        .unwrap()
}

fn long() -> Budget {
    Budget::new(Duration::from_secs(10))
}

/// A server that counts requests and then never answers, reporting the close of each
/// connection that carried a request (a warm-up connection that carried none is not counted).
async fn hanging(requests: Arc<AtomicUsize>) -> RawServer {
    RawServer::start(Arc::new(move |mut s, _, closed, count| {
        let requests = requests.clone();
        Box::pin(async move {
            if read_request(&mut s).await.is_some() {
                requests.fetch_add(1, Ordering::SeqCst);
                wait_closed(s, closed, count).await;
            }
        })
    }))
    .await
}

/// A server that counts requests and answers each with `body` after `delay`.
async fn answering(delay: Duration, body: &'static str, requests: Arc<AtomicUsize>) -> RawServer {
    RawServer::start(Arc::new(move |mut s, _, _, _| {
        let requests = requests.clone();
        Box::pin(async move {
            while read_request(&mut s).await.is_some() {
                requests.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                if !write_all(&mut s, &json_response(body)).await {
                    return;
                }
            }
        })
    }))
    .await
}

/// Waits (bounded: only a hang exceeds it) for the upstream to see `n` connections closed.
async fn closed(server: &RawServer, n: usize) {
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while server.closed_count.load(Ordering::SeqCst) < n {
            server.closed.notified().await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "the upstream never saw the connection closed"
    );
}

#[tokio::test]
async fn cancelling_a_hung_get_ends_cancelled_and_closes_the_connection() {
    let requests = Arc::new(AtomicUsize::new(0));
    let server = hanging(requests.clone()).await;
    let agent = agent(&action("lookup", &server.origin(), "timeout_ms = 20000"));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let handle = call.tool("lookup", ToolCall::new("tc_1", json!({})), long());
    wait_until("the request at the upstream", WAIT, || {
        ready(requests.load(Ordering::SeqCst) == 1)
    })
    .await;
    handle.cancel();
    let o = handle.await;
    assert_eq!(o.status, Status::Cancelled);
    assert_eq!(o.status.as_str(), "cancelled");
    assert_eq!(o.to_json()["status"], "cancelled");
    assert_eq!(o.error.as_ref().unwrap().fault(), Fault::Caller);
    assert!(
        o.say.is_none(),
        "no fallback line for a caller who moved on"
    );
    closed(&server, 1).await;
    let records = call.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].status, Status::Cancelled);
    assert_eq!(call.running(), 0);
}

#[tokio::test]
async fn a_dropped_handle_still_records_its_end_state() {
    let requests = Arc::new(AtomicUsize::new(0));
    let server = hanging(requests.clone()).await;
    let agent = agent(&action("lookup", &server.origin(), "timeout_ms = 20000"));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let handle = call.tool("lookup", ToolCall::new("tc_1", json!({})), long());
    wait_until("the request", WAIT, || {
        ready(requests.load(Ordering::SeqCst) == 1)
    })
    .await;
    drop(handle);
    wait_until("the end state", WAIT, || ready(call.running() == 0)).await;
    let records = call.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].status, Status::Cancelled);
    assert_eq!(records[0].tool_call_id.as_deref(), Some("tc_1"));
}

#[tokio::test]
async fn cancelling_a_coalesced_miss_with_one_waiter_leaves_nothing_running() {
    let requests = Arc::new(AtomicUsize::new(0));
    let server = hanging(requests.clone()).await;
    let agent = agent(&action(
        "lookup",
        &server.origin(),
        "timeout_ms = 20000\ncache = { ttl_s = 60 }",
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let handle = call.tool("lookup", json!({}).into(), long());
    wait_until("the request", WAIT, || {
        ready(requests.load(Ordering::SeqCst) == 1)
    })
    .await;
    handle.cancel();
    assert_eq!(handle.await.status, Status::Cancelled);
    // The shared fetch had no other waiter: its request and connection are dropped.
    closed(&server, 1).await;
    // And it left the in-flight table: the same request again is a new fetch, not a join.
    let again = call.tool(
        "lookup",
        json!({}).into(),
        Budget::new(Duration::from_millis(300)),
    );
    wait_until("a second request", WAIT, || {
        ready(requests.load(Ordering::SeqCst) == 2)
    })
    .await;
    again.cancel();
    assert_eq!(again.await.status, Status::Cancelled);
    assert_eq!(rt.cache_usage().await.0, 0, "nothing was cached");
}

#[tokio::test]
async fn barge_in_during_a_sent_post_finishes_it_once_and_dedupes_the_reissue() {
    let requests = Arc::new(AtomicUsize::new(0));
    let r2 = requests.clone();
    let server = RawServer::start(Arc::new(move |mut s, _, _, _| {
        let requests = r2.clone();
        Box::pin(async move {
            while read_request(&mut s).await.is_some() {
                requests.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                if !write_all(
                    &mut s,
                    &json_response(r#"{"id":"apt_1","status":"booked"}"#),
                )
                .await
                {
                    return;
                }
            }
        })
    }))
    .await;
    let agent = agent(&action(
        "book",
        &server.origin(),
        "method = \"POST\"\ntimeout_ms = 3000\nbody = { slot = \"{{args.slot}}\" }\nextract = { \"appointment.id\" = \"$.id\" }",
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let first = call.tool(
        "book",
        ToolCall::new("tc_1", json!({"slot": "15:00"})),
        long(),
    );
    wait_until("the booking at the upstream", WAIT, || {
        ready(requests.load(Ordering::SeqCst) == 1)
    })
    .await;
    call.barge_in();
    let o = first.await;
    assert_eq!(
        o.status,
        Status::Cancelled,
        "the interrupted handle hears cancelled"
    );
    // The model re-issues the same booking after the barge-in: it waits for the one sent.
    let again = call
        .tool(
            "book",
            ToolCall::new("tc_2", json!({"slot": "15:00"})),
            long(),
        )
        .await;
    assert_eq!(again.status, Status::Ok, "{again:?}");
    assert!(again.deduplicated);
    assert_eq!(requests.load(Ordering::SeqCst), 1, "booked exactly once");
    assert_eq!(
        call.state()
            .get(&StatePath::parse("appointment.id").unwrap()),
        Some(&json!("apt_1"))
    );
    wait_until("both end states", WAIT, || ready(call.running() == 0)).await;
    let records = call.records();
    let detached: Vec<_> = records.iter().filter(|o| o.detached).collect();
    assert_eq!(detached.len(), 1, "{records:?}");
    assert_eq!(detached[0].status, Status::Ok);
    assert_eq!(detached[0].tool_call_id.as_deref(), Some("tc_1"));
    assert_eq!(records.len(), 2);
}

#[tokio::test]
async fn a_held_action_is_sent_at_the_end_of_the_turn_and_discarded_by_a_barge_in() {
    let requests = Arc::new(AtomicUsize::new(0));
    let server = answering(Duration::ZERO, r#"{"id":"n1"}"#, requests.clone()).await;
    let agent = agent(&action(
        "note",
        &server.origin(),
        "method = \"POST\"\nhold = \"end_of_turn\"\ndedupe = false",
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let held = call.tool("note", ToolCall::new("tc_1", json!({})), long());
    call.barge_in();
    let o = held.await;
    assert_eq!(o.status, Status::Cancelled);
    assert_eq!(requests.load(Ordering::SeqCst), 0, "nothing was sent");

    // Issued after the barge-in: waits for the next end of turn.
    let held = call.tool("note", ToolCall::new("tc_2", json!({})), long());
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(requests.load(Ordering::SeqCst), 0, "held until end_turn");
    call.end_turn();
    let o = held.await;
    assert_eq!(o.status, Status::Ok, "{o:?}");
    assert_eq!(requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn parallel_tool_calls_fire_their_fillers() {
    let server = answering(
        Duration::from_millis(150),
        r#"{"v":1}"#,
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    let filler = |say: &str| {
        format!("timeout_ms = 2000\nfiller = {{ after_ms = 30, say = \"{say}\" }}\nextract = {{ \"r.v\" = \"$.v\" }}")
    };
    let agent = agent(&format!(
        "{}{}",
        action("slots", &server.origin(), &filler("Checking the calendar.")),
        action(
            "insurance",
            &server.origin(),
            &filler("Checking your plan.")
        ),
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h2 = heard.clone();
    let outs = call
        .tools_parallel(
            vec![
                ("slots".into(), ToolCall::new("tc_1", json!({}))),
                ("insurance".into(), ToolCall::new("tc_2", json!({}))),
            ],
            long(),
            move |action, line| h2.lock().unwrap().push(format!("{action}: {line}")),
        )
        .await;
    assert_eq!(outs.len(), 2);
    assert!(
        outs.iter()
            .all(|o| o.status == Status::Ok && o.filler_fired),
        "{outs:?}"
    );
    let mut heard = heard.lock().unwrap().clone();
    heard.sort();
    assert_eq!(
        heard,
        [
            "insurance: Checking your plan.",
            "slots: Checking the calendar."
        ]
    );
}

#[tokio::test]
async fn the_filler_line_is_also_a_future() {
    let server = answering(
        Duration::from_millis(100),
        r#"{"v":1}"#,
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    let agent = agent(&action(
        "slow",
        &server.origin(),
        "filler = { after_ms = 20, say = \"One moment.\" }",
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let handle = call.tool("slow", json!({}).into(), long());
    let line = handle.filler();
    assert_eq!(line.await.as_deref(), Some("One moment."));
    assert!(handle.await.filler_fired);
    // A fast call ends without one.
    let handle = call.tool("nope", json!({}).into(), long());
    assert_eq!(handle.filler().await, None);
}

#[tokio::test]
async fn an_unknown_tool_is_rejected_as_the_callers_fault_and_lists_the_tools() {
    let agent = agent(&format!(
        "{}{}",
        action("lookup", "http://127.0.0.1:9", ""),
        action("book", "http://127.0.0.1:9", "method = \"POST\""),
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let o = call
        .tool("lookup_customr", ToolCall::new("tc_1", json!({})), long())
        .await;
    assert_eq!(o.status, Status::Rejected);
    let e = o.error.as_ref().unwrap();
    assert!(e.is_unknown_tool());
    assert_eq!(e.fault(), Fault::Caller);
    assert!(e.to_string().contains("the tools are: book, lookup"), "{e}");
    assert_eq!(o.llm_result["error"], "rejected");
    assert_eq!(call.records().len(), 1);
}

#[tokio::test]
async fn arguments_that_fail_the_schema_are_the_callers_fault() {
    let agent = agent(&action(
        "book",
        "http://127.0.0.1:9",
        "method = \"POST\"\nparameters = { type = \"object\", required = [\"slot\"], properties = { slot = { type = \"string\" } } }",
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let o = call.tool("book", json!({"slot": 3}).into(), long()).await;
    assert_eq!(o.status, Status::Rejected);
    assert_eq!(o.error.unwrap().fault(), Fault::Caller);
}

#[tokio::test]
async fn tight_turn_budgets_never_open_a_healthy_hosts_breaker() {
    let server = answering(
        Duration::from_millis(100),
        r#"{"v":1}"#,
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    let agent = agent(&action(
        "lookup",
        &server.origin(),
        "timeout_ms = 3000\ndedupe = false",
    ));
    let rt = Runtime::builder()
        .egress(loopback_policy())
        .breaker_threshold(3)
        .build()
        .unwrap();
    let call = session(&rt, &agent).await;
    for _ in 0..6 {
        let o = call
            .tool(
                "lookup",
                json!({}).into(),
                Budget::new(Duration::from_millis(10)),
            )
            .await;
        assert_eq!(o.status, Status::TimedOut);
        assert_eq!(
            o.error.unwrap().fault(),
            Fault::Local,
            "the turn was too short"
        );
    }
    let o = call.tool("lookup", json!({}).into(), long()).await;
    assert_eq!(o.status, Status::Ok, "the breaker stayed closed: {o:?}");
}

#[tokio::test]
async fn a_thousand_tool_calls_cancelled_at_random_points_each_end_once_and_leak_no_task() {
    let server = RawServer::start(Arc::new(|mut s, n, closed, count| {
        Box::pin(async move {
            while read_request(&mut s).await.is_some() {
                // Answers at once, after a little while, or never (until the client leaves).
                match n % 3 {
                    0 => {}
                    1 => tokio::time::sleep(Duration::from_millis(3)).await,
                    _ => return wait_closed(s, closed, count).await,
                }
                if !write_all(&mut s, &json_response(r#"{"v":1}"#)).await {
                    return;
                }
            }
        })
    }))
    .await;
    let agent = agent(&format!(
        "{}{}",
        action(
            "read",
            &server.origin(),
            "timeout_ms = 2000\ndedupe = false\nextract = { \"r.v\" = \"$.v\" }"
        ),
        action(
            "write",
            &server.origin(),
            "method = \"POST\"\ntimeout_ms = 2000\nextract = { \"w.v\" = \"$.v\" }"
        ),
    ));
    let rt = Runtime::builder()
        .egress(loopback_policy())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let call = session(&rt, &agent).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    wait_until("the warm-up connection to close", WAIT, || {
        ready(server.closed_count.load(Ordering::SeqCst) >= server.accepted())
    })
    .await;
    let before = metrics.num_alive_tasks();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut handles = Vec::new();
    for i in 0..1000u32 {
        let r = next();
        let name = if r % 4 == 0 { "write" } else { "read" };
        // Distinct arguments: each call is its own, none answered by another.
        let h = call.tool(
            name,
            ToolCall::new(format!("tc_{i}"), json!({"n": i})),
            Budget::new(Duration::from_millis(500)),
        );
        match (r >> 8) % 4 {
            0 => h.cancel(),
            1 => drop(h),
            2 => handles.push((h, true)),
            _ => handles.push((h, false)),
        }
        if (r >> 16) % 8 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let mut later = Vec::new();
    for (h, cancel) in handles {
        if cancel {
            tokio::task::yield_now().await;
            h.cancel();
        }
        later.push(h);
    }
    let outs = futures_util::future::join_all(later).await;
    assert!(outs
        .iter()
        .all(|o| !matches!(o.status, Status::Ok) || o.error.is_none()));
    wait_until("every tool call to end", WAIT, || {
        ready(call.running() == 0)
    })
    .await;
    let records = call.records();
    assert_eq!(records.len(), 1000, "one end state each");
    let mut ids: Vec<&str> = records
        .iter()
        .map(|o| o.tool_call_id.as_deref().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 1000, "no tool call ended twice");
    let by_status = |s: Status| records.iter().filter(|o| o.status == s).count();
    assert!(by_status(Status::Cancelled) > 0, "some were cancelled");
    drop(outs);
    wait_until("every task started for them to end", WAIT, || {
        ready(metrics.num_alive_tasks() <= before)
    })
    .await;
}

#[test]
fn on_interrupt_and_hold_are_checked_at_load_all_together() {
    let text = format!(
        "{AGENT}{}{}{}",
        action(
            "a",
            "https://crm.example.com",
            "on_interrupt = \"sometimes\""
        ),
        action("b", "https://crm.example.com", "hold = \"end_of_turn\""),
        action(
            "c",
            "https://crm.example.com",
            "method = \"POST\"\nhold = \"later\""
        ),
    );
    let e = load_toml(&text).unwrap_err().to_string();
    assert!(
        e.contains("on_interrupt") && e.contains("\"sometimes\""),
        "{e}"
    );
    assert!(e.contains("reads are never held"), "{e}");
    assert!(e.contains("\"later\""), "{e}");
}

#[tokio::test]
async fn the_session_publishes_connected_every_action_and_the_end_itself() {
    use crate::support::servers::{Reply, TestServer};
    let hooks = TestServer::http(|_, _| Reply::ok(json!({}))).await;
    let requests = Arc::new(AtomicUsize::new(0));
    let crm = hanging(requests.clone()).await;
    let text = format!(
        "{}{}[[webhooks]]\nurl = \"{}/events\"\nsubscriptions = [\"phone_call_connected\", \"action\", \"phone_call_ended\", \"post_call_processing_completed\"]\n",
        action("lookup", &crm.origin(), "timeout_ms = 20000"),
        action("nothing", &hooks.origin(), "method = \"POST\""),
        hooks.origin(),
    );
    let agent = agent(&text);
    let dir = tempfile::tempdir().unwrap();
    // The bus gets the runtime's network settings: loopback is allowed only there.
    let rt = Runtime::builder()
        .egress(loopback_policy())
        .event_bus(
            midcall::EventBus::builder(dir.path().join("outbox.db"))
                .webhooks(&agent)
                .retry_schedule(vec![Duration::from_millis(50)]),
        )
        .build()
        .unwrap();
    let call = session(&rt, &agent).await;
    let ok = call
        .tool("nothing", ToolCall::new("tc_1", json!({})), long())
        .await;
    assert_eq!(ok.status, Status::Ok, "{ok:?}");
    let hung = call.tool("lookup", ToolCall::new("tc_2", json!({})), long());
    wait_until("the lookup at the CRM", WAIT, || {
        ready(requests.load(Ordering::SeqCst) == 1)
    })
    .await;
    drop(hung);
    call.end(midcall::CallEnd::new(Duration::from_secs(3), "user_hangup"))
        .await
        .unwrap();
    let events = || {
        hooks
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.uri == "/events")
            .map(|r| r.json())
            .collect::<Vec<_>>()
    };
    wait_until("five event deliveries", WAIT, || ready(events().len() == 5)).await;
    let events = events();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for kind in [
        "event_phone_call_connected",
        "event_phone_call_ended",
        "event_post_call_processing_completed",
    ] {
        assert_eq!(kinds.iter().filter(|k| **k == kind).count(), 1, "{kinds:?}");
    }
    let mut actions: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["type"] == "event_action")
        .map(|e| {
            (
                e["payload"]["tool_call_id"].as_str().unwrap().to_string(),
                e["payload"]["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    actions.sort();
    assert_eq!(
        actions,
        [
            ("tc_1".into(), "ok".into()),
            ("tc_2".into(), "cancelled".into())
        ]
    );
    rt.event_bus().unwrap().close().await;
}

#[test]
fn building_a_bus_or_starting_automations_outside_tokio_is_an_error_not_a_panic() {
    let agent = agent(&action("a", "https://crm.example.com", ""));
    let dir = tempfile::tempdir().unwrap();
    let e = midcall::EventBus::builder(dir.path().join("outbox.db"))
        .build()
        .unwrap_err();
    assert!(
        matches!(e, midcall::events::BusError::NoRuntime(_)),
        "{e:?}"
    );
    assert!(e.to_string().contains("tokio runtime"), "{e}");
    // A bus that does not deliver needs no runtime; the automations' worker does.
    let bus = midcall::EventBus::builder(dir.path().join("outbox.db"))
        .deliver(false)
        .build()
        .unwrap();
    let rt = Runtime::builder().build().unwrap();
    let e = midcall::Automations::builder(agent, rt, bus)
        .start()
        .unwrap_err();
    assert!(
        matches!(e, midcall::automation::StartupError::NoRuntime),
        "{e:?}"
    );
    assert!(e.to_string().contains("tokio runtime"), "{e}");
}

#[tokio::test]
async fn a_call_stopped_before_its_first_poll_sends_nothing_even_with_finish() {
    let requests = Arc::new(AtomicUsize::new(0));
    let server = answering(Duration::ZERO, r#"{"id":"x"}"#, requests.clone()).await;
    let agent = agent(&action(
        "book",
        &server.origin(),
        "method = \"POST\"\ndedupe = false",
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    // On this single-threaded test runtime the tool's task has not run yet.
    let h = call.tool("book", json!({}).into(), long());
    call.barge_in();
    assert_eq!(h.await.status, Status::Cancelled);
    wait_until("the end state", WAIT, || ready(call.running() == 0)).await;
    assert_eq!(requests.load(Ordering::SeqCst), 0, "nothing was sent");
    assert!(!call.records()[0].detached);
}

#[tokio::test]
async fn a_reissued_call_waits_for_the_first_only_within_its_own_budget() {
    let requests = Arc::new(AtomicUsize::new(0));
    let server = answering(
        Duration::from_millis(1500),
        r#"{"id":"apt_1"}"#,
        requests.clone(),
    )
    .await;
    let agent = agent(&action(
        "book",
        &server.origin(),
        "method = \"POST\"\ntimeout_ms = 5000\nextract = { \"appointment.id\" = \"$.id\" }",
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let first = call.tool("book", ToolCall::new("tc_1", json!({})), long());
    wait_until("the booking", WAIT, || {
        ready(requests.load(Ordering::SeqCst) == 1)
    })
    .await;
    call.barge_in();
    assert_eq!(first.await.status, Status::Cancelled);
    // The first goes on detached for 1.5 s; this turn has 100 ms.
    let again = call
        .tool(
            "book",
            ToolCall::new("tc_2", json!({})),
            Budget::new(Duration::from_millis(100)),
        )
        .await;
    assert_eq!(again.status, Status::TimedOut, "{again:?}");
    assert_eq!(again.error.unwrap().fault(), Fault::Local);
    wait_until("the detached booking", WAIT, || ready(call.running() == 0)).await;
    assert_eq!(requests.load(Ordering::SeqCst), 1, "still booked once");
}

#[tokio::test]
async fn a_panicking_filler_callback_still_ends_the_call_once() {
    let requests = Arc::new(AtomicUsize::new(0));
    let server = answering(Duration::from_millis(100), r#"{"v":1}"#, requests.clone()).await;
    let agent = agent(&action(
        "slow",
        &server.origin(),
        "filler = { after_ms = 10, say = \"One moment.\" }",
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let o = call
        .tool("slow", json!({}).into(), long())
        .on_filler(|_| panic!("the embedder's callback panicked"))
        .await;
    assert_eq!(o.status, Status::Cancelled);
    wait_until("the end state", WAIT, || ready(call.running() == 0)).await;
    assert_eq!(call.records().len(), 1);
    // The in-flight entry was cleared: the same call runs (and ends) normally.
    let o = call.tool("slow", json!({}).into(), long()).await;
    assert_eq!(o.status, Status::Ok, "{o:?}");
}

#[test]
fn a_prefetched_action_cannot_be_held() {
    let text = format!(
        "{AGENT}{}",
        action(
            "p",
            "https://crm.example.com",
            "method = \"POST\"\nprefetch = \"call_start\"\nhold = \"end_of_turn\""
        ),
    );
    let e = load_toml(&text).unwrap_err().to_string();
    assert!(e.contains("it cannot be held"), "{e}");
}

#[tokio::test]
async fn a_fresh_cache_hit_is_answered_at_once_and_recorded() {
    let requests = Arc::new(AtomicUsize::new(0));
    let server = answering(Duration::ZERO, r#"{"v":1}"#, requests.clone()).await;
    let agent = agent(&action(
        "lookup",
        &server.origin(),
        "cache = { ttl_s = 60 }\ndedupe = false\nextract = { \"r.v\" = \"$.v\" }",
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let first = call.tool("lookup", json!({}).into(), long()).await;
    assert_eq!(first.status, Status::Ok);
    // No task and no wait: the handle is ready when tool() returns.
    let hit = futures_util::FutureExt::now_or_never(call.tool(
        "lookup",
        ToolCall::new("tc_2", json!({})),
        long(),
    ))
    .expect("answered without a wait");
    assert_eq!(hit.status, Status::CacheHit);
    assert_eq!(hit.tool_call_id.as_deref(), Some("tc_2"));
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    assert_eq!(call.records().len(), 2);
    assert_eq!(
        call.state().get(&StatePath::parse("r.v").unwrap()),
        Some(&json!(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_caps_the_host_and_refuses_what_cannot_fit() {
    // A server that serves 8 at a time (each in 1 s) and counts how many it held at once. The
    // second is long so the bounds below have room: only a real bug crosses them.
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (n2, m2) = (now.clone(), most.clone());
    let server = RawServer::start(Arc::new(move |mut s, _, _, _| {
        let (now, most) = (n2.clone(), m2.clone());
        Box::pin(async move {
            while read_request(&mut s).await.is_some() {
                let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(at_once, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                if !write_all(&mut s, &json_response(r#"{"v":1}"#)).await {
                    return;
                }
            }
        })
    }))
    .await;
    let agent = agent(&action(
        "lookup",
        &server.origin(),
        "timeout_ms = 5000\nmax_in_flight = 8\ndedupe = false\non_failure = { say = \"The system is busy.\" }",
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let calls = |n: usize| -> Vec<(String, ToolCall)> {
        (0..n)
            .map(|i| {
                (
                    "lookup".to_string(),
                    ToolCall::new(format!("tc_{i}"), json!({"i": i})),
                )
            })
            .collect()
    };
    // Enough budget for two rounds (2 s): everyone is served, never more than 8 at once.
    let outs = call
        .tools_parallel(calls(16), Budget::new(Duration::from_secs(4)), |_, _| {})
        .await;
    assert!(outs.iter().all(|o| o.status == Status::Ok), "{outs:?}");
    assert_eq!(
        most.load(Ordering::SeqCst),
        8,
        "the host never held more than 8"
    );
    // A budget for one round only (1.5 s): the second eight cannot fit and are refused, not
    // timed out.
    let outs = call
        .tools_parallel(
            calls(16),
            Budget::new(Duration::from_millis(1500)),
            |_, _| {},
        )
        .await;
    let ok = outs.iter().filter(|o| o.status == Status::Ok).count();
    let busy: Vec<_> = outs
        .iter()
        .filter(|o| o.error.as_ref().is_some_and(|e| e.is_host_busy()))
        .collect();
    assert_eq!(ok, 8, "{outs:?}");
    assert_eq!(busy.len(), 8, "{outs:?}");
    for o in busy {
        assert_eq!(o.status, Status::Rejected);
        assert_eq!(o.error.as_ref().unwrap().fault(), Fault::Local);
        assert!(o.error.as_ref().unwrap().to_string().contains("host_busy"));
        assert_eq!(o.say.as_deref(), Some("The system is busy."));
        // Refused well before the turn's end: when a slot could no longer leave the host's
        // typical 1 s, about 0.5 s in. Waiting the turn out takes 1.5 s; the bound sits between.
        assert!(
            o.timings.total < Duration::from_secs(1),
            "{:?}",
            o.timings.total
        );
    }
    assert!(most.load(Ordering::SeqCst) <= 8);
}

#[test]
fn max_in_flight_is_the_hosts_and_checked_at_load() {
    let text = format!(
        "{AGENT}{}{}",
        action("a", "https://crm.example.com", "max_in_flight = 8"),
        action("b", "https://crm.example.com", "max_in_flight = 4"),
    );
    let e = load_toml(&text).unwrap_err().to_string();
    assert!(
        e.contains("differs from the 8 that action \"a\" sets"),
        "{e}"
    );
    let e = load_toml(&format!(
        "{AGENT}{}",
        action("a", "https://x.example.com", "max_in_flight = 0")
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("out of range"), "{e}");
    // One action's cap covers every action to the same origin.
    let set = load_toml(&format!(
        "{AGENT}{}{}",
        action("a", "https://crm.example.com", "max_in_flight = 8"),
        action("b", "https://crm.example.com", ""),
    ))
    .unwrap();
    assert_eq!(set.action("b").unwrap().max_in_flight(), Some(8));
}

#[test]
fn origins_table_sets_the_hosts_cap_and_is_checked() {
    // [[origins]] caps every action to the origin.
    let set = load_toml(&format!(
        "{AGENT}{}{}[[origins]]\nurl = \"https://crm.example.com\"\nmax_in_flight = 6\n",
        action("a", "https://crm.example.com", ""),
        action("b", "https://other.example.com", ""),
    ))
    .unwrap();
    assert_eq!(set.action("a").unwrap().max_in_flight(), Some(6));
    assert_eq!(set.action("b").unwrap().max_in_flight(), None);
    // An action that disagrees names the table; a typo'd origin lists the real ones; a path
    // is refused; every problem at once.
    let e = load_toml(&format!(
        "{AGENT}{}[[origins]]\nurl = \"https://crm.example.com\"\nmax_in_flight = 6\n\n[[origins]]\nurl = \"https://crm.exampel.com\"\nmax_in_flight = 2\n\n[[origins]]\nurl = \"https://crm.example.com/v1\"\n",
        action("a", "https://crm.example.com", "max_in_flight = 8"),
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("8 differs from the 6 that [[origins]] 1 sets"),
        "{e}"
    );
    assert!(
        e.contains("no action is sent to https://crm.exampel.com (the actions' origins: https://crm.example.com)"),
        "{e}"
    );
    assert!(e.contains("is not just scheme and host"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_read_is_hedged_and_the_first_answer_wins() {
    // Every odd request is slow (800 ms), every even one fast.
    let requests = Arc::new(AtomicUsize::new(0));
    let r2 = requests.clone();
    let server = RawServer::start(Arc::new(move |mut s, _, _, _| {
        let requests = r2.clone();
        Box::pin(async move {
            while read_request(&mut s).await.is_some() {
                let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
                if n % 2 == 1 {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                }
                if !write_all(&mut s, &json_response(r#"{"v":1}"#)).await {
                    return;
                }
            }
        })
    }))
    .await;
    let agent = agent(&format!(
        "{}{}",
        action(
            "hedged",
            &server.origin(),
            "timeout_ms = 3000\nhedge_after_ms = 50\ndedupe = false\nextract = { \"r.v\" = \"$.v\" }"
        ),
        action("plain", &server.origin(), "timeout_ms = 3000\ndedupe = false"),
    ));
    let rt = runtime();
    let call = session(&rt, &agent).await;
    let o = call.tool("hedged", json!({}).into(), long()).await;
    assert_eq!(o.status, Status::Ok, "{o:?}");
    assert_eq!(o.attempts, 2, "the hedge went out");
    assert_eq!(requests.load(Ordering::SeqCst), 2);
    // The hedge's answer came long before the slow one would have (a generous bound).
    assert!(
        o.timings.total < Duration::from_millis(600),
        "{:?}",
        o.timings.total
    );
    // Without a hedge the slow request is waited out.
    let before = requests.load(Ordering::SeqCst);
    let o = call.tool("plain", json!({}).into(), long()).await;
    assert_eq!(o.attempts, 1);
    assert_eq!(requests.load(Ordering::SeqCst), before + 1);
}

#[test]
fn only_reads_are_hedged() {
    let e = load_toml(&format!(
        "{AGENT}{}",
        action(
            "b",
            "https://s.example.com",
            "method = \"POST\"\nhedge_after_ms = 50"
        )
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("only reads are hedged"), "{e}");
    let e = load_toml(&format!(
        "{AGENT}{}",
        action("g", "https://s.example.com", "hedge_after_ms = \"soon\"")
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("\"auto\""), "{e}");
    load_toml(&format!(
        "{AGENT}{}",
        action("g", "https://s.example.com", "hedge_after_ms = \"auto\"")
    ))
    .unwrap();
}
