//! The response cache, coalescing, stale-while-revalidate, prefetch, duplicate tool calls and
//! invalidation, against real local servers with request counters.

use std::future::ready;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use midcall::exec::{Budget, CacheStatus, Status};
use midcall::{ActionSet, Call, CallInfo, CallSession, Runtime, StatePath, ToolCall};

use crate::support::servers::{Reply, TestServer};
use crate::support::{call_info, load_toml, wait_for, wait_until, AGENT, WAIT};

fn runtime() -> Runtime {
    Runtime::builder()
        .egress(crate::support::loopback_policy())
        .build()
        .unwrap()
}

fn set(origin: &str, cache: &str) -> ActionSet {
    let text = format!(
        "{AGENT}[[actions]]\nname = \"lookup\"\ndescription = \"d\"\nurl = \"{origin}/c?p={{{{call.from_number}}}}\"\ncache = {cache}\nextract = {{ \"c.v\" = \"$.v\" }}\ndedupe = false\non_failure = {{ say = \"fallback\" }}\n"
    );
    load_toml(&text).unwrap()
}

fn call_in(tenant: &str, id: &str) -> Call {
    Call::new(CallInfo {
        tenant: tenant.into(),
        id: id.into(),
        ..call_info()
    })
}

fn long() -> Budget {
    Budget::new(Duration::from_secs(10))
}

/// A server answering `{"v": n}` with n counting requests, after `delay`.
async fn counting(delay: Duration) -> TestServer {
    TestServer::http(move |_, n| Reply::After(delay, Box::new(Reply::ok(json!({"v": n}))))).await
}

fn v(call: &Call) -> Option<Value> {
    call.state.get(&StatePath::parse("c.v").unwrap()).cloned()
}

#[tokio::test]
async fn a_hit_follows_a_miss_and_fills_state() {
    let server = counting(Duration::ZERO).await;
    let set = set(&server.origin(), "{ ttl_s = 300, scope = \"tenant\" }");
    let rt = runtime();
    let mut c1 = call_in("acme", "call_1");
    let out = rt
        .execute(set.action("lookup").unwrap(), &mut c1, json!({}), &long())
        .await;
    assert_eq!(
        (out.status, out.cache, out.attempts),
        (Status::Ok, CacheStatus::Miss, 1)
    );
    let mut c2 = call_in("acme", "call_2");
    let out = rt
        .execute(set.action("lookup").unwrap(), &mut c2, json!({}), &long())
        .await;
    assert_eq!(
        (out.status, out.cache, out.attempts),
        (Status::CacheHit, CacheStatus::Hit, 0)
    );
    assert_eq!(
        v(&c2),
        Some(json!(1)),
        "a hit writes the values into this call's state"
    );
    assert_eq!(out.llm_result, json!({"c.v": 1}));
    assert_eq!(server.request_count(), 1);
    let (entries, bytes) = rt.cache_usage().await;
    assert_eq!(entries, 1);
    assert!(bytes > 0);
}

#[tokio::test]
async fn ttl_expiry_on_the_paused_clock() {
    let server = counting(Duration::ZERO).await;
    let set = set(&server.origin(), "{ ttl_s = 300, scope = \"tenant\" }");
    let rt = runtime();
    let mut c = call_in("acme", "call_1");
    rt.execute(set.action("lookup").unwrap(), &mut c, json!({}), &long())
        .await;
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(299)).await;
    let out = rt
        .execute(set.action("lookup").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.cache, CacheStatus::Hit, "fresh at 299 s");
    tokio::time::advance(Duration::from_secs(2)).await;
    tokio::time::resume(); // the next request needs real sockets
    let out = rt
        .execute(set.action("lookup").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(
        (out.status, out.cache),
        (Status::Ok, CacheStatus::Miss),
        "expired at 301 s"
    );
    assert_eq!(server.request_count(), 2);
    assert_eq!(v(&c), Some(json!(2)));
}

#[tokio::test]
async fn entries_never_cross_tenants_and_scopes_are_kept() {
    let server = counting(Duration::ZERO).await;
    let rt = runtime();
    for scope in ["tenant", "global"] {
        let set = set(
            &server.origin(),
            &format!("{{ ttl_s = 300, scope = \"{scope}\" }}"),
        );
        let before = server.request_count();
        let a = rt
            .execute(
                set.action("lookup").unwrap(),
                &mut call_in("acme", "c1"),
                json!({}),
                &long(),
            )
            .await;
        let b = rt
            .execute(
                set.action("lookup").unwrap(),
                &mut call_in("globex", "c2"),
                json!({}),
                &long(),
            )
            .await;
        assert_eq!(
            (a.cache, b.cache),
            (CacheStatus::Miss, CacheStatus::Miss),
            "{scope}"
        );
        assert_eq!(
            server.request_count(),
            before + 2,
            "{scope}: no sharing across tenants"
        );
        rt.invalidate(set.action("lookup").unwrap(), &call_in("acme", "c1").info);
        rt.invalidate(set.action("lookup").unwrap(), &call_in("globex", "c2").info);
    }
    // scope = "call": another call misses, the same call hits.
    let set = set(&server.origin(), "{ ttl_s = 300, scope = \"call\" }");
    let mut c1 = call_in("acme", "call_a");
    let before = server.request_count();
    rt.execute(set.action("lookup").unwrap(), &mut c1, json!({}), &long())
        .await;
    let other = rt
        .execute(
            set.action("lookup").unwrap(),
            &mut call_in("acme", "call_b"),
            json!({}),
            &long(),
        )
        .await;
    let same = rt
        .execute(set.action("lookup").unwrap(), &mut c1, json!({}), &long())
        .await;
    assert_eq!(
        (other.cache, same.cache),
        (CacheStatus::Miss, CacheStatus::Hit)
    );
    assert_eq!(server.request_count(), before + 2);
}

#[tokio::test]
async fn a_hundred_concurrent_identical_lookups_make_one_upstream_request() {
    let server = counting(Duration::from_millis(150)).await;
    let set = Arc::new(set(&server.origin(), "{ ttl_s = 300, scope = \"tenant\" }"));
    let rt = runtime();
    let outs = futures_util::future::join_all((0..100).map(|i| {
        let (rt, set) = (rt.clone(), set.clone());
        async move {
            let mut c = call_in("acme", &format!("call_{i}"));
            let o = rt
                .execute(set.action("lookup").unwrap(), &mut c, json!({}), &long())
                .await;
            (o, v(&c))
        }
    }))
    .await;
    assert_eq!(server.request_count(), 1);
    assert!(outs
        .iter()
        .all(|(o, v)| o.status == Status::Ok && *v == Some(json!(1))));
    assert_eq!(
        outs.iter()
            .filter(|(o, _)| o.cache == CacheStatus::Miss)
            .count(),
        1
    );
    assert_eq!(
        outs.iter()
            .filter(|(o, _)| o.cache == CacheStatus::Coalesced)
            .count(),
        99
    );
    assert_eq!(
        outs.iter().filter(|(o, _)| o.attempts == 1).count(),
        1,
        "only the leader sent"
    );
}

#[tokio::test]
async fn an_impatient_waiter_does_not_cancel_the_shared_fetch() {
    let server = counting(Duration::from_millis(300)).await;
    let set = Arc::new(set(&server.origin(), "{ ttl_s = 300, scope = \"tenant\" }"));
    let rt = runtime();
    let impatient = {
        let (rt, set) = (rt.clone(), set.clone());
        async move {
            let mut c = call_in("acme", "impatient");
            rt.execute(
                set.action("lookup").unwrap(),
                &mut c,
                json!({}),
                &Budget::new(Duration::from_millis(50)),
            )
            .await
        }
    };
    let patient = {
        let (rt, set, server) = (rt.clone(), set.clone(), &server);
        async move {
            // Wait for the event: the impatient call leads, its request is at the upstream.
            wait_until("the leader's request", WAIT, || {
                ready(server.request_count() == 1)
            })
            .await;
            let mut c = call_in("acme", "patient");
            let o = rt
                .execute(set.action("lookup").unwrap(), &mut c, json!({}), &long())
                .await;
            (o, v(&c))
        }
    };
    let (a, (b, bv)) = tokio::join!(impatient, patient);
    assert_eq!(
        (a.status, a.cache),
        (Status::TimedOut, CacheStatus::Miss),
        "the leader gave up"
    );
    assert_eq!(a.say.as_deref(), Some("fallback"));
    assert_eq!((b.status, b.cache), (Status::Ok, CacheStatus::Coalesced));
    assert_eq!(bv, Some(json!(1)));
    assert_eq!(server.request_count(), 1);
    // And the shared fetch filled the cache.
    let c = rt
        .execute(
            set.action("lookup").unwrap(),
            &mut call_in("acme", "later"),
            json!({}),
            &long(),
        )
        .await;
    assert_eq!(c.cache, CacheStatus::Hit);
}

#[tokio::test]
async fn stale_is_served_at_once_while_one_refresh_runs() {
    let server = counting(Duration::from_millis(100)).await;
    let set = Arc::new(set(
        &server.origin(),
        "{ ttl_s = 1, scope = \"tenant\", stale_s = 30 }",
    ));
    let rt = runtime();
    rt.execute(
        set.action("lookup").unwrap(),
        &mut call_in("acme", "c0"),
        json!({}),
        &long(),
    )
    .await;
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(2)).await;
    tokio::time::resume();
    let outs = futures_util::future::join_all((0..5).map(|i| {
        let (rt, set) = (rt.clone(), set.clone());
        async move {
            let mut c = call_in("acme", &format!("c{i}"));
            let o = rt
                .execute(set.action("lookup").unwrap(), &mut c, json!({}), &long())
                .await;
            (o, v(&c))
        }
    }))
    .await;
    for (o, val) in &outs {
        assert_eq!((o.status, o.cache), (Status::CacheHit, CacheStatus::Stale));
        assert_eq!(*val, Some(json!(1)), "the stale value");
        assert_eq!(
            o.attempts, 0,
            "served from the entry, nothing sent by this call"
        );
    }
    // Wait for the event: the refreshed value is in the cache.
    let mut i = 0;
    let o = wait_for("the refresh to land in the cache", WAIT, || {
        i += 1;
        let (rt, set) = (rt.clone(), set.clone());
        let mut c = call_in("acme", &format!("after{i}"));
        async move {
            let o = rt
                .execute(set.action("lookup").unwrap(), &mut c, json!({}), &long())
                .await;
            (v(&c) == Some(json!(2))).then_some(o)
        }
    })
    .await;
    assert_eq!(o.cache, CacheStatus::Hit);
    assert_eq!(
        server.request_count(),
        2,
        "exactly one refresh for five stale hits"
    );
}

#[tokio::test]
async fn stale_if_error_serves_the_stale_value_instead_of_the_fallback() {
    let failing = Arc::new(AtomicUsize::new(0));
    let f = failing.clone();
    let server = TestServer::http(move |_, _| {
        if f.load(Ordering::SeqCst) == 1 {
            Reply::Json(500, json!({}))
        } else {
            Reply::ok(json!({"v": "good"}))
        }
    })
    .await;
    let rt = runtime();
    for (stale, want_stale) in [("30", true), ("0", false)] {
        failing.store(0, Ordering::SeqCst);
        let set = set(
            &server.origin(),
            &format!("{{ ttl_s = 1, scope = \"call\", stale_s = {stale} }}"),
        );
        let mut c = call_in("acme", &format!("call_stale_{stale}"));
        rt.execute(set.action("lookup").unwrap(), &mut c, json!({}), &long())
            .await;
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(2)).await;
        tokio::time::resume();
        failing.store(1, Ordering::SeqCst);
        c.state = Default::default();
        for round in 0..2 {
            let before = server.request_count();
            let o = rt
                .execute(set.action("lookup").unwrap(), &mut c, json!({}), &long())
                .await;
            if want_stale {
                assert_eq!(
                    (o.status, o.cache),
                    (Status::CacheHit, CacheStatus::Stale),
                    "round {round}"
                );
                assert_eq!(o.say, None, "no fallback");
                assert_eq!(v(&c), Some(json!("good")));
                if round == 0 {
                    // Wait for the event: the refresh reached the (failing) upstream.
                    wait_until("the refresh", WAIT, || {
                        ready(server.request_count() > before)
                    })
                    .await;
                }
            } else {
                assert_eq!(o.status, Status::HttpError);
                assert_eq!(o.say.as_deref(), Some("fallback"));
            }
        }
    }
}

const FRONT_DESK: &str = r#"
[[actions]]
name = "lookup_customer"
description = "d"
url = "ORIGIN/customers?phone={{call.from_number}}"
cache = { ttl_s = 300, scope = "tenant" }
prefetch = "call_start"
extract = { "customer.name" = "$.name" }

[[actions]]
name = "check_slots"
description = "d"
url = "ORIGIN/slots?date={{args.date}}"
parameters = { type = "object", required = ["date"], properties = { date = { type = "string" } } }
cache = { ttl_s = 60, scope = "tenant" }
extract = { "slots" = { path = "$.slots", all = false } }

[[actions]]
name = "book_appointment"
description = "d"
method = "POST"
url = "ORIGIN/appointments"
parameters = { type = "object", required = ["slot"], properties = { slot = { type = "string" } } }
body = { slot = "{{args.slot}}" }
invalidates = ["check_slots"]
extract = { "appointment.id" = "$.id" }
"#;

async fn front_desk() -> (TestServer, ActionSet) {
    let server = TestServer::http(|r, n| {
        if r.uri.starts_with("/customers") {
            Reply::ok(json!({"name": "Ada"}))
        } else if r.uri.starts_with("/slots") {
            Reply::ok(json!({"slots": ["9:00", "10:00"], "n": n}))
        } else {
            Reply::Json(201, json!({"id": format!("apt_{n}")}))
        }
    })
    .await;
    let set = load_toml(&format!(
        "{AGENT}{}",
        FRONT_DESK.replace("ORIGIN", &server.origin())
    ))
    .unwrap();
    (server, set)
}

fn count(server: &TestServer, prefix: &str) -> usize {
    server
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.uri.starts_with(prefix))
        .count()
}

async fn session(rt: &Runtime, set: &Arc<ActionSet>, tenant: &str, id: &str) -> CallSession {
    rt.start_call(
        set.clone(),
        call_in(tenant, id).info,
        Duration::from_secs(2),
    )
    .await
}

#[tokio::test]
async fn prefetch_fills_state_and_primes_the_cache() {
    let (server, set) = front_desk().await;
    let set = Arc::new(set);
    let rt = runtime();
    let c = session(&rt, &set, "acme", "call_1").await;
    let report = c.start_report();
    assert_eq!(report.prefetched.len(), 1);
    assert_eq!(report.prefetched[0].status, Status::Ok);
    assert_eq!(
        c.state().get(&StatePath::parse("customer.name").unwrap()),
        Some(&json!("Ada"))
    );
    let o = c
        .tool("lookup_customer", ToolCall::new("tc_1", json!({})), long())
        .await;
    // The model's own call is answered from the cache the prefetch primed (it is not a
    // duplicate: the model never made the prefetch).
    assert_eq!(o.status, Status::CacheHit, "{o:?}");
    assert!(!o.deduplicated);
    let o = rt
        .execute(
            set.action("lookup_customer").unwrap(),
            &mut call_in("acme", "call_2"),
            json!({}),
            &long(),
        )
        .await;
    assert_eq!(o.cache, CacheStatus::Hit);
    assert_eq!(count(&server, "/customers"), 1);
    assert!(report.warm.failed.is_empty());
}

#[tokio::test]
async fn a_reissued_booking_reaches_the_upstream_exactly_once() {
    let (server, set) = front_desk().await;
    let set = Arc::new(set);
    let rt = runtime();
    let c = session(&rt, &set, "acme", "call_1").await;
    let base = count(&server, "/appointments");
    let book = |id: &str, slot: &str| {
        c.tool(
            "book_appointment",
            ToolCall::new(id, json!({ "slot": slot })),
            long(),
        )
    };
    let first = book("tc_1", "15:00").await;
    assert_eq!(first.status, Status::Ok);
    assert!(!first.deduplicated);
    // The caller barged in; the model issues the same booking again with a new id.
    let again = book("tc_2", "15:00").await;
    assert!(again.deduplicated);
    assert_eq!(again.status, Status::Ok);
    assert_eq!(again.attempts, 0);
    assert_eq!(again.values, first.values);
    assert_eq!(again.tool_call_id.as_deref(), Some("tc_2"));
    assert_eq!(count(&server, "/appointments"), base + 1);
    // Another slot is another booking.
    let other = book("tc_3", "16:00").await;
    assert!(!other.deduplicated);
    assert_eq!(count(&server, "/appointments"), base + 2);
    // Another call is never deduplicated against this one.
    let c2 = session(&rt, &set, "acme", "call_2").await;
    let o = c2
        .tool("book_appointment", json!({"slot": "15:00"}).into(), long())
        .await;
    assert!(!o.deduplicated);
    assert_eq!(count(&server, "/appointments"), base + 3);
}

#[tokio::test]
async fn the_dedupe_window_ends_and_dedupe_false_turns_it_off() {
    let (server, set) = front_desk().await;
    let set = Arc::new(set);
    let window = Duration::from_secs(30);
    let rt = Runtime::builder()
        .egress(crate::support::loopback_policy())
        .dedupe_window(window)
        .build()
        .unwrap();
    let c = session(&rt, &set, "acme", "call_1").await;
    let base = count(&server, "/appointments");
    let book = || c.tool("book_appointment", json!({"slot": "15:00"}).into(), long());
    assert!(!book().await.deduplicated);
    // The window is a pure timer: it passes on the paused clock (nothing is in flight while
    // it is paused). One second short of its end, the booking is still answered from the first.
    tokio::time::pause();
    tokio::time::advance(window - Duration::from_secs(1)).await;
    tokio::time::resume();
    assert!(book().await.deduplicated, "inside the window");
    assert_eq!(count(&server, "/appointments"), base + 1);
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(1)).await;
    tokio::time::resume();
    let o = book().await;
    assert!(!o.deduplicated, "outside the window");
    assert_eq!(count(&server, "/appointments"), base + 2);
}

#[tokio::test]
async fn a_booking_invalidates_the_slots_it_changed() {
    let (server, set) = front_desk().await;
    let rt = runtime();
    let mut c = call_in("acme", "call_1");
    let slots = set.action("check_slots").unwrap();
    let a = rt
        .execute(
            slots,
            &mut c,
            ToolCall::new("t1", json!({"date": "2025-11-04"})),
            &long(),
        )
        .await;
    let mut c2 = call_in("acme", "call_2");
    let b = rt
        .execute(slots, &mut c2, json!({"date": "2025-11-04"}), &long())
        .await;
    assert_eq!((a.cache, b.cache), (CacheStatus::Miss, CacheStatus::Hit));
    let booked = rt
        .execute(
            set.action("book_appointment").unwrap(),
            &mut c,
            json!({"slot": "9:00"}),
            &long(),
        )
        .await;
    assert_eq!(booked.status, Status::Ok);
    let mut c3 = call_in("acme", "call_3");
    let after = rt
        .execute(slots, &mut c3, json!({"date": "2025-11-04"}), &long())
        .await;
    assert_eq!(
        after.cache,
        CacheStatus::Miss,
        "the next check_slots goes upstream"
    );
    assert_eq!(count(&server, "/slots"), 2);
}

#[tokio::test]
async fn negative_ttl_remembers_a_404_and_only_successes_are_cached_otherwise() {
    let server = TestServer::http(|r, _| {
        if r.uri.contains("missing") {
            Reply::Json(404, json!({}))
        } else {
            Reply::Json(500, json!({}))
        }
    })
    .await;
    let rt = runtime();
    let text = format!(
        "{AGENT}[[actions]]\nname = \"a\"\ndescription = \"d\"\nurl = \"{o}/missing\"\ncache = {{ ttl_s = 60, negative_ttl_s = 30, scope = \"tenant\" }}\ndedupe = false\n[[actions]]\nname = \"b\"\ndescription = \"d\"\nurl = \"{o}/broken\"\ncache = {{ ttl_s = 60, scope = \"tenant\" }}\ndedupe = false\n",
        o = server.origin()
    );
    let set = load_toml(&text).unwrap();
    let mut c = call_in("acme", "c1");
    let first = rt
        .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
        .await;
    let second = rt
        .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(
        (first.status, first.cache),
        (Status::HttpError, CacheStatus::Miss)
    );
    assert_eq!(
        (second.status, second.cache, second.http_status),
        (Status::HttpError, CacheStatus::Hit, Some(404))
    );
    for _ in 0..2 {
        let o = rt
            .execute(set.action("b").unwrap(), &mut c, json!({}), &long())
            .await;
        assert_eq!(
            (o.status, o.cache),
            (Status::HttpError, CacheStatus::Miss),
            "a 500 is never cached"
        );
    }
    assert_eq!(server.request_count(), 3);
}

#[tokio::test]
async fn key_headers_and_bodies_are_part_of_the_key() {
    let server = counting(Duration::ZERO).await;
    let rt = runtime();
    let text = format!(
        "{AGENT}[[actions]]\nname = \"q\"\ndescription = \"d\"\nmethod = \"POST\"\nidempotent = true\nurl = \"{o}/q\"\nheaders = {{ X-Region = \"{{{{args.region}}}}\" }}\nbody = {{ q = \"{{{{args.q}}}}\" }}\ncache = {{ ttl_s = 60, scope = \"tenant\", key_headers = [\"X-Region\"] }}\nextract = {{ v = \"$.v\" }}\ndedupe = false\n",
        o = server.origin()
    );
    let set = load_toml(&text).unwrap();
    let q = set.action("q").unwrap();
    let mut c = call_in("acme", "c1");
    let mut statuses = Vec::new();
    for args in [
        json!({"region": "eu", "q": "a"}),
        json!({"region": "eu", "q": "a"}),
        json!({"region": "us", "q": "a"}),
        json!({"region": "eu", "q": "b"}),
    ] {
        statuses.push(rt.execute(q, &mut c, args, &long()).await.cache);
    }
    assert_eq!(
        statuses,
        [
            CacheStatus::Miss,
            CacheStatus::Hit,
            CacheStatus::Miss,
            CacheStatus::Miss
        ]
    );
    assert_eq!(server.request_count(), 3);
}

#[tokio::test]
async fn uncacheable_actions_bypass_the_cache() {
    let server = counting(Duration::ZERO).await;
    let text = format!(
        "{AGENT}[[actions]]\nname = \"a\"\ndescription = \"d\"\nurl = \"{}/x\"\ndedupe = false\n",
        server.origin()
    );
    let set = load_toml(&text).unwrap();
    let rt = runtime();
    for _ in 0..2 {
        let o = rt
            .execute(
                set.action("a").unwrap(),
                &mut call_in("acme", "c"),
                json!({}),
                &long(),
            )
            .await;
        assert_eq!(o.cache, CacheStatus::Bypass);
    }
    assert_eq!(server.request_count(), 2);
}
