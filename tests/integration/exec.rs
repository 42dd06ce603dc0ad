//! The executor against real local servers: pooling, deadlines, faults, retries, breaker,
//! egress, filler and fallbacks.

use std::future::ready;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use midcall::exec::{Budget, Status};
use midcall::transport::EgressPolicy;
use midcall::{ActionSet, Call, MapSecrets, Runtime, StatePath, ToolCall};

use crate::support::servers::{
    json_response, read_request, wait_closed, write_all, RawServer, Reply, TestServer,
};
use crate::support::{call_info, load_toml, wait_until, AGENT, WAIT};

const SECRET: &str = "tok_EXEC_s3cr3t";

fn local_policy() -> EgressPolicy {
    crate::support::loopback_policy().allow_network("::1/128".parse().unwrap())
}

fn runtime() -> Runtime {
    builder().build().unwrap()
}

/// A runtime that trusts the HTTPS test server's certificate.
fn trusting(server: &TestServer) -> Runtime {
    builder()
        .add_root_certificate(server.ca_der.clone().unwrap())
        .build()
        .unwrap()
}

fn builder() -> midcall::RuntimeBuilder {
    Runtime::builder()
        .egress(local_policy())
        .secrets(Arc::new(MapSecrets::new().with("TOKEN", SECRET)))
}

/// An agent with one action `a` whose URL starts with `origin`; `rest` adds fields.
fn one_action(origin: &str, path: &str, rest: &str) -> ActionSet {
    let text = format!(
        "{AGENT}[[actions]]\nname = \"a\"\ndescription = \"test action\"\nurl = \"{origin}{path}\"\n{rest}\n"
    );
    load_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Runs action "a" once in a fresh call with no arguments and a long budget.
async fn run_a(rt: &Runtime, set: &ActionSet) -> midcall::Outcome {
    rt.execute(set.action("a").unwrap(), &mut call(), json!({}), &long())
        .await
}

fn call() -> Call {
    Call::new(call_info())
}

fn long() -> Budget {
    Budget::new(Duration::from_secs(10))
}

#[tokio::test]
async fn get_and_post_send_exactly_the_rendered_request() {
    let server = TestServer::http(|r, _| {
        if r.method == "GET" {
            Reply::ok(json!({"data": {"customer": {"name": "Ada", "tier": "gold"}}}))
        } else {
            Reply::Json(201, json!({"id": "apt_1", "status": "booked"}))
        }
    })
    .await;
    let text = format!(
        r#"{AGENT}
[[actions]]
name = "lookup"
description = "d"
url = "{o}/v1/customers?phone={{{{call.from_number}}}}"
headers = {{ Authorization = "Bearer {{{{secrets.TOKEN}}}}", X-Tier = "{{{{state.tier | default: \"none\"}}}}" }}
extract = {{ "customer.name" = "$.data.customer.name", "customer.tier" = "$.data.customer.tier" }}

[[actions]]
name = "book"
description = "d"
method = "POST"
url = "{o}/appointments"
parameters = {{ type = "object", required = ["slot"], properties = {{ slot = {{ type = "string" }}, n = {{ type = "integer" }} }} }}
body = {{ phone = "{{{{call.from_number}}}}", slot = "{{{{args.slot}}}}", n = "{{{{args.n | default: 1}}}}", note = "for {{{{state.customer.name}}}}" }}
extract = {{ "appointment.id" = "$.id" }}
"#,
        o = server.origin()
    );
    let set = load_toml(&text).unwrap();
    let rt = runtime();
    let mut c = call();
    let out = rt
        .execute(set.action("lookup").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.status, Status::Ok, "{:?}", out.error);
    assert_eq!(out.http_status, Some(200));
    assert_eq!(out.attempts, 1);
    let r = server.last();
    assert_eq!(r.method, "GET");
    assert_eq!(r.uri, "/v1/customers?phone=%2B15551234567");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_eq!(r.header("x-tier"), Some("none"));
    assert_eq!(r.header("accept"), Some("application/json"));
    assert!(r.header("user-agent").unwrap().starts_with("midcall/"));
    assert!(
        r.header("accept-encoding").is_none(),
        "no compression is asked for"
    );
    assert_eq!(r.header("idempotency-key").map(str::len), Some(32));
    assert_eq!(
        c.state.get(&StatePath::parse("customer.name").unwrap()),
        Some(&json!("Ada"))
    );
    assert_eq!(
        out.llm_result,
        json!({"customer.name": "Ada", "customer.tier": "gold"})
    );

    let out = rt
        .execute(
            set.action("book").unwrap(),
            &mut c,
            json!({"slot": "2025-11-04T15:00", "n": 2}),
            &long(),
        )
        .await;
    assert_eq!(out.status, Status::Ok, "{:?}", out.error);
    assert_eq!(out.http_status, Some(201));
    let r = server.last();
    assert_eq!(r.method, "POST");
    assert_eq!(r.uri, "/appointments");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        json!({"phone": "+15551234567", "slot": "2025-11-04T15:00", "n": 2, "note": "for Ada"})
    );
    assert_eq!(
        out.values,
        vec![(StatePath::parse("appointment.id").unwrap(), json!("apt_1"))]
    );
}

#[tokio::test]
async fn ten_sequential_actions_use_one_connection() {
    let server = TestServer::http(|_, _| Reply::ok(json!({"v": 1}))).await;
    let set = one_action(
        &server.origin(),
        "/x",
        "extract = { v = \"$.v\" }\ndedupe = false",
    );
    let rt = runtime();
    let mut c = call();
    for i in 0..10 {
        let out = rt
            .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
            .await;
        assert_eq!(out.status, Status::Ok);
        assert_eq!(
            out.timings.connect.is_some(),
            i == 0,
            "only the first pays for connecting"
        );
    }
    assert_eq!(server.request_count(), 10);
    assert_eq!(server.accepted(), 1);
    assert_eq!(rt.connections_opened(), 1);
}

#[tokio::test]
async fn warming_again_keeps_at_most_one_spare_connection_per_host() {
    // Every call start warms its hosts. With a busy pool the connector is rarely asked for a
    // new connection, so each warm-up used to leave one more idle socket behind.
    let server = TestServer::https(|_, _| Reply::ok(json!({"v": 1}))).await;
    let set = one_action(&server.origin(), "/x", "extract = { v = \"$.v\" }");
    let rt = trusting(&server);
    for _ in 0..20 {
        let report = rt.warm(&set, Duration::from_secs(2)).await;
        assert_eq!(report.warmed, vec![server.origin()]);
    }
    assert_eq!(rt.connections_opened(), 1, "one spare, not twenty");
    // Twenty warm-ups at once open one connection too.
    let rt = trusting(&server);
    futures_util::future::join_all((0..20).map(|_| rt.warm(&set, Duration::from_secs(2)))).await;
    assert_eq!(rt.connections_opened(), 1);
    let mut c = call();
    let out = rt
        .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.status, Status::Ok, "{:?}", out.error);
    assert_eq!(rt.connections_opened(), 1, "the spare was used");
}

#[tokio::test]
async fn warm_up_opens_the_connection_the_first_action_uses() {
    let server = TestServer::https(|_, _| Reply::ok(json!({"v": 1}))).await;
    let set = one_action(&server.origin(), "/x", "extract = { v = \"$.v\" }");
    let rt = trusting(&server);
    let report = rt.warm(&set, Duration::from_secs(2)).await;
    assert_eq!(report.warmed, vec![server.origin()]);
    assert!(report.failed.is_empty());
    assert_eq!(rt.connections_opened(), 1);
    assert_eq!(server.request_count(), 0, "warm-up sends no request");
    let mut c = call();
    let out = rt
        .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.status, Status::Ok, "{:?}", out.error);
    assert_eq!(
        rt.connections_opened(),
        1,
        "the first action opened no connection"
    );
    assert_eq!(server.accepted(), 1);
    assert!(
        out.timings.tls.is_some(),
        "the handshake time is reported on first use"
    );
    assert_eq!(server.last().version, http::Version::HTTP_2, "h2 by ALPN");
}

#[tokio::test]
async fn https_with_http1_only_server() {
    // A TLS server offering only http/1.1 still works.
    let server = TestServer::https(|_, _| Reply::ok(json!({"v": 2}))).await;
    let set = one_action(&server.origin(), "/x", "extract = { v = \"$.v\" }");
    let rt = builder()
        .http2(false)
        .add_root_certificate(server.ca_der.clone().unwrap())
        .build()
        .unwrap();
    let out = run_a(&rt, &set).await;
    assert_eq!(out.status, Status::Ok, "{:?}", out.error);
    assert_eq!(server.last().version, http::Version::HTTP_11);
}

#[tokio::test]
async fn a_ca_given_as_pem_is_trusted_and_a_bundle_without_one_is_refused() {
    use base64::Engine;
    let server = TestServer::https(|_, _| Reply::ok(json!({"v": 3}))).await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(server.ca_der.clone().unwrap());
    let pem = format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n");
    let set = one_action(&server.origin(), "/x", "extract = { v = \"$.v\" }");
    let rt = builder()
        .add_root_certificates_pem(pem.as_bytes())
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(run_a(&rt, &set).await.status, Status::Ok);
    for bad in ["", "not a certificate"] {
        let e = builder().add_root_certificates_pem(bad.as_bytes()).err();
        assert!(
            matches!(e, Some(midcall::exec::BuildError::Roots(_))),
            "{e:?}"
        );
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some("no PEM certificate found")
        );
        let dir = tempfile::tempdir().unwrap();
        let e = midcall::EventBus::builder(dir.path().join("o.db"))
            .add_root_certificates_pem(bad.as_bytes())
            .err();
        assert!(
            matches!(e, Some(midcall::events::BusError::Roots(_))),
            "{e:?}"
        );
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some("no PEM certificate found")
        );
    }
}

#[tokio::test]
async fn untrusted_certificate_is_a_tls_transport_error() {
    let server = TestServer::https_untrusted(|_, _| Reply::ok(json!({}))).await;
    let set = one_action(&server.origin(), "/x", "");
    // Trusts a different CA than the one that signed the server's certificate.
    let rt = trusting(&server);
    let out = run_a(&rt, &set).await;
    assert_eq!(out.status, Status::TransportError);
    let e = out.error.unwrap();
    assert!(e.is_tls(), "{e:?}");
    assert!(e.to_string().contains("TLS handshake failed"), "{e}");
    assert_eq!(server.request_count(), 0);
}

#[tokio::test]
async fn hang_before_headers_times_out_no_later_than_the_budget() {
    let server = TestServer::http(|_, _| Reply::Hang).await;
    let set = one_action(&server.origin(), "/x", "timeout_ms = 5000");
    let rt = runtime();
    let start = Instant::now();
    let out = rt
        .execute(
            set.action("a").unwrap(),
            &mut call(),
            json!({}),
            &Budget::new(Duration::from_millis(200)),
        )
        .await;
    let took = start.elapsed();
    assert_eq!(out.status, Status::TimedOut);
    assert!(out.error.as_ref().unwrap().is_timeout());
    assert!(took >= Duration::from_millis(195), "{took:?}");
    // A generous bound: only a deadline that is not held exceeds it.
    assert!(
        took < Duration::from_millis(200 + 1000),
        "timed_out arrived late: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn filler_fires_once_and_the_deadline_still_holds_on_the_paused_clock() {
    let server = TestServer::http(|_, _| Reply::Hang).await;
    let set = one_action(
        &server.origin(),
        "/x",
        "timeout_ms = 800\nfiller = { after_ms = 400, say = \"One moment.\" }\non_failure = { say = \"Sorry.\", set = { \"x.failed\" = true } }",
    );
    let rt = runtime();
    let mut c = call();
    let start = Instant::now();
    let mut fired = Vec::new();
    let out = rt
        .execute_with_filler(
            set.action("a").unwrap(),
            &mut c,
            json!({}),
            &long(),
            |say| fired.push((say.to_string(), start.elapsed())),
        )
        .await;
    assert_eq!(out.status, Status::TimedOut);
    assert_eq!(
        fired,
        vec![("One moment.".to_string(), Duration::from_millis(400))]
    );
    assert!(out.filler_fired);
    // The timer is armed one tick (1 ms) early so the outcome arrives at, never after, the
    // deadline.
    let took = start.elapsed();
    assert!(
        (Duration::from_millis(799)..=Duration::from_millis(800)).contains(&took),
        "{took:?}"
    );
    assert_eq!(out.say.as_deref(), Some("Sorry."));
    assert_eq!(
        c.state.get(&StatePath::parse("x.failed").unwrap()),
        Some(&json!(true))
    );
}

#[tokio::test]
async fn filler_fires_while_a_slow_action_goes_on_to_succeed() {
    let server = TestServer::http(|_, _| {
        Reply::After(
            Duration::from_millis(250),
            Box::new(Reply::ok(json!({"v": 1}))),
        )
    })
    .await;
    let set = one_action(
        &server.origin(),
        "/x",
        "timeout_ms = 2000\nfiller = { after_ms = 50, say = \"Let me check.\" }\nextract = { v = \"$.v\" }",
    );
    let rt = runtime();
    let mut count = 0;
    let out = rt
        .execute_with_filler(
            set.action("a").unwrap(),
            &mut call(),
            json!({}),
            &long(),
            |_| count += 1,
        )
        .await;
    assert_eq!(out.status, Status::Ok);
    assert_eq!(count, 1);
    assert!(out.filler_fired);
    // A fast action never fires it.
    let fast = TestServer::http(|_, _| Reply::ok(json!({"v": 1}))).await;
    let set = one_action(
        &fast.origin(),
        "/x",
        "timeout_ms = 2000\nfiller = { after_ms = 1500, say = \"x\" }",
    );
    let out = rt
        .execute_with_filler(
            set.action("a").unwrap(),
            &mut call(),
            json!({}),
            &long(),
            |_| panic!("no filler"),
        )
        .await;
    assert!(!out.filler_fired);
}

#[tokio::test]
async fn trickling_body_cannot_outlive_the_deadline() {
    let server = RawServer::start(Arc::new(|mut s, _, _, _| {
        Box::pin(async move {
            read_request(&mut s).await;
            write_all(&mut s, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n[").await;
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if !write_all(&mut s, "1,").await {
                    return;
                }
            }
        })
    }))
    .await;
    let set = one_action(
        &server.origin(),
        "/x",
        "timeout_ms = 300\nextract = { v = \"$[0]\" }",
    );
    let rt = runtime();
    let start = Instant::now();
    let out = run_a(&rt, &set).await;
    let took = start.elapsed();
    assert_eq!(out.status, Status::TimedOut);
    assert!(out
        .error
        .unwrap()
        .to_string()
        .contains("reading the response body"));
    assert!(took < Duration::from_millis(300 + 1000), "{took:?}");
    // The half-read connection was dropped, not returned to the pool: the next action opens a
    // new one.
    run_a(&rt, &set).await;
    assert_eq!(server.accepted(), 2);
}

#[test]
fn the_runtime_is_cheap_to_share_across_tasks() {
    fn send_sync_clone<T: Send + Sync + Clone + 'static>() {}
    send_sync_clone::<Runtime>();
    send_sync_clone::<midcall::Outcome>();
    send_sync_clone::<midcall::ActionSet>();
}

#[tokio::test]
async fn reset_and_refused_are_transport_errors() {
    let reset = RawServer::start(Arc::new(|mut s, _, _, _| {
        Box::pin(async move {
            read_request(&mut s).await;
            #[allow(deprecated)] // a zero linger does not block; it makes the close a reset
            s.set_linger(Some(Duration::ZERO)).unwrap();
            drop(s);
        })
    }))
    .await;
    let set = one_action(&reset.origin(), "/x", "");
    let rt = runtime();
    let out = run_a(&rt, &set).await;
    assert_eq!(out.status, Status::TransportError, "{:?}", out.error);
    assert_eq!(out.attempts, 1, "a fresh connection is not retried");
    // The model gets a short reason it can act on; nobody gets a library's wrapper or URLs.
    assert_eq!(
        out.llm_result["message"],
        "the service closed the connection without answering"
    );
    let detail = out.error.as_ref().unwrap().to_string();
    assert!(
        !detail.contains("client error") && !detail.contains("://"),
        "{detail}"
    );

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let set = one_action(&format!("http://127.0.0.1:{port}"), "/x", "");
    let out = run_a(&rt, &set).await;
    assert_eq!(out.status, Status::TransportError);
    let e = out.error.unwrap();
    assert!(e.is_connect(), "{e:?}");
    assert!(e.to_string().contains("connect failed"), "{e}");
}

#[tokio::test]
async fn http_errors_apply_the_fallback() {
    let server = TestServer::http(|r, _| {
        if r.uri.starts_with("/500") {
            Reply::Json(500, json!({"error": "boom"}))
        } else {
            Reply::Json(404, json!({"error": "no such customer"}))
        }
    })
    .await;
    let rt = runtime();
    for (path, code) in [("/500", 500), ("/404", 404)] {
        let set = one_action(
            &server.origin(),
            path,
            "extract = { \"customer.name\" = \"$.name\" }\non_failure = { say = \"I can't reach your account right now.\", set = { \"customer.lookup_failed\" = true } }",
        );
        let mut c = call();
        let out = rt
            .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
            .await;
        assert_eq!(out.status, Status::HttpError);
        assert_eq!(out.http_status, Some(code));
        assert_eq!(out.error.as_ref().unwrap().http_status(), Some(code));
        assert_eq!(
            out.say.as_deref(),
            Some("I can't reach your account right now.")
        );
        assert_eq!(
            c.state.to_value(),
            json!({"customer": {"lookup_failed": true}})
        );
        assert_eq!(out.llm_result["error"], "http_error");
        assert!(out.values.is_empty());
    }
}

#[tokio::test]
async fn a_429_with_a_short_retry_after_is_retried_once() {
    let server = TestServer::http(|_, n| {
        if n == 1 {
            Reply::Raw {
                status: 429,
                headers: vec![("retry-after".into(), "1".into())],
                body: vec![],
            }
        } else {
            Reply::ok(json!({"v": 1}))
        }
    })
    .await;
    let set = one_action(
        &server.origin(),
        "/x",
        "timeout_ms = 3000\nextract = { v = \"$.v\" }",
    );
    let out = runtime()
        .execute(
            set.action("a").unwrap(),
            &mut call(),
            ToolCall::new("tc_1", json!({})),
            &long(),
        )
        .await;
    assert_eq!(out.status, Status::Ok, "{:?}", out.error);
    assert_eq!(out.attempts, 2);
    let reqs = server.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[0].header("idempotency-key"),
        reqs[1].header("idempotency-key"),
        "the idempotency key is stable across the retry"
    );
}

#[tokio::test]
async fn a_429_beyond_the_budget_is_rate_limited_at_once() {
    let server = TestServer::http(|_, _| Reply::Raw {
        status: 429,
        headers: vec![("retry-after".into(), "120".into())],
        body: vec![],
    })
    .await;
    let set = one_action(&server.origin(), "/x", "timeout_ms = 10000");
    let start = Instant::now();
    let out = run_a(&runtime(), &set).await;
    assert_eq!(out.status, Status::RateLimited);
    assert_eq!(out.attempts, 1);
    // A generous bound: the answer takes milliseconds, and sleeping toward the Retry-After
    // runs into the 10 s timeout.
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "no sleeping: {:?}",
        start.elapsed()
    );
    assert!(out.error.unwrap().is_rate_limited());
    assert_eq!(server.request_count(), 1);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let server = TestServer::http(|_, _| Reply::Raw {
        status: 302,
        headers: vec![("location".into(), "http://127.0.0.1:1/elsewhere".into())],
        body: vec![],
    })
    .await;
    let set = one_action(&server.origin(), "/x", "");
    let out = run_a(&runtime(), &set).await;
    assert_eq!(out.status, Status::HttpError);
    assert_eq!(out.http_status, Some(302));
    assert!(out
        .error
        .unwrap()
        .to_string()
        .contains("redirects are not followed"));
    assert_eq!(server.request_count(), 1);
}

#[tokio::test]
async fn responses_that_cannot_be_used_are_invalid() {
    let server = TestServer::http(|r, _| match r.uri.as_str() {
        "/html" => Reply::Raw {
            status: 200,
            headers: vec![("content-type".into(), "text/html".into())],
            body: b"<html>".to_vec(),
        },
        "/badjson" => Reply::Raw {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{\"a\": ".to_vec(),
        },
        "/gzip" => Reply::Raw {
            status: 200,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("content-encoding".into(), "gzip".into()),
            ],
            body: vec![0x1f, 0x8b, 0, 0],
        },
        "/problem" => Reply::Raw {
            status: 200,
            headers: vec![(
                "content-type".into(),
                "application/problem+json; charset=utf-8".into(),
            )],
            body: b"{\"v\": 3}".to_vec(),
        },
        "/big" => Reply::ok(json!({"v": "x".repeat(1000)})),
        "/deep" => Reply::Raw {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: format!("{}{}", "[".repeat(200), "]".repeat(200)).into_bytes(),
        },
        _ => Reply::ok(json!({})),
    })
    .await;
    let rt = runtime();
    let run = |path: &str, extra: &str| {
        let set = one_action(
            &server.origin(),
            path,
            &format!("extract = {{ v = \"$.v\" }}\n{extra}"),
        );
        let rt = rt.clone();
        async move { run_a(&rt, &set).await }
    };
    for (path, fragment) in [
        (
            "/html",
            "expected a JSON response, got content type \"text/html\"",
        ),
        (
            "/badjson",
            "the response is not valid JSON: EOF while parsing",
        ),
        ("/gzip", "the response is compressed (gzip)"),
        ("/deep", "recursion limit exceeded"),
    ] {
        let out = run(path, "").await;
        assert_eq!(out.status, Status::InvalidResponse, "{path}");
        let e = out.error.unwrap();
        assert!(e.is_invalid_response());
        assert!(e.to_string().contains(fragment), "{path}: {e}");
    }
    let out = run("/problem", "").await;
    assert_eq!(
        out.status,
        Status::Ok,
        "+json types are JSON: {:?}",
        out.error
    );
    let out = run("/big", "max_response_bytes = 100").await;
    assert_eq!(out.status, Status::InvalidResponse);
    assert!(out
        .error
        .unwrap()
        .to_string()
        .contains("over the 100-byte limit"));
}

#[tokio::test]
async fn a_streamed_body_is_capped_while_it_streams() {
    // No content-length: the cap must trip while reading, not after.
    let server = RawServer::start(Arc::new(|mut s, _, _, _| {
        Box::pin(async move {
            read_request(&mut s).await;
            write_all(
                &mut s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n[",
            )
            .await;
            for _ in 0..1000 {
                if !write_all(&mut s, &"1,".repeat(512)).await {
                    return;
                }
            }
        })
    }))
    .await;
    let set = one_action(
        &server.origin(),
        "/x",
        "max_response_bytes = 4096\nextract = { v = \"$[0]\" }",
    );
    let out = run_a(&runtime(), &set).await;
    assert_eq!(out.status, Status::InvalidResponse);
    assert!(out
        .error
        .unwrap()
        .to_string()
        .contains("over the 4096-byte limit"));
}

/// A server whose first connection answers one request, then reads the next and closes
/// without answering: a stale keep-alive connection. Later connections answer normally.
async fn stale_keepalive_server() -> RawServer {
    RawServer::start(Arc::new(|mut s, n, _, _| {
        Box::pin(async move {
            if n == 1 {
                read_request(&mut s).await;
                write_all(&mut s, &json_response("{\"v\": 1}")).await;
                read_request(&mut s).await;
                drop(s);
            } else {
                while read_request(&mut s).await.is_some() {
                    write_all(&mut s, &json_response("{\"v\": 2}")).await;
                }
            }
        })
    }))
    .await
}

#[tokio::test]
async fn a_stale_keep_alive_is_retried_once_for_get_and_not_for_post() {
    let server = stale_keepalive_server().await;
    let set = one_action(
        &server.origin(),
        "/x",
        "extract = { v = \"$.v\" }\ndedupe = false",
    );
    let rt = runtime();
    let mut c = call();
    assert_eq!(
        rt.execute(set.action("a").unwrap(), &mut c, json!({}), &long())
            .await
            .status,
        Status::Ok
    );
    let out = rt
        .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.status, Status::Ok, "{:?}", out.error);
    assert_eq!(out.attempts, 2);
    assert_eq!(out.values[0].1, json!(2));
    assert_eq!(server.accepted(), 2);

    let server = stale_keepalive_server().await;
    let set = one_action(
        &server.origin(),
        "/x",
        "method = \"POST\"\nbody = { a = 1 }\ndedupe = false",
    );
    let rt = runtime();
    assert_eq!(
        rt.execute(set.action("a").unwrap(), &mut c, json!({}), &long())
            .await
            .status,
        Status::Ok
    );
    let out = rt
        .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.status, Status::TransportError);
    assert_eq!(out.attempts, 1, "a POST is never sent twice");
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn breaker_opens_fails_fast_then_probes_and_closes() {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    let server = TestServer::http(move |_, _| {
        if h.load(Ordering::SeqCst) {
            Reply::ok(json!({"v": 1}))
        } else {
            Reply::Json(503, json!({}))
        }
    })
    .await;
    let set = one_action(
        &server.origin(),
        "/x",
        "on_failure = { say = \"Sorry.\" }\ndedupe = false",
    );
    let cooldown = Duration::from_secs(30);
    let rt = builder()
        .breaker_threshold(3)
        .breaker_cooldown(cooldown)
        .build()
        .unwrap();
    let mut c = call();
    for _ in 0..3 {
        assert_eq!(
            rt.execute(set.action("a").unwrap(), &mut c, json!({}), &long())
                .await
                .status,
            Status::HttpError
        );
    }
    let before = server.request_count();
    let out = rt
        .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.status, Status::CircuitOpen);
    assert_eq!(out.attempts, 0);
    assert_eq!(out.say.as_deref(), Some("Sorry."));
    // Nothing was sent (below); the generous bound catches a wait, e.g. for the 30 s cool-down.
    assert!(
        out.timings.total < Duration::from_secs(2),
        "fails fast: {:?}",
        out.timings.total
    );
    assert_eq!(server.request_count(), before, "nothing sent while open");
    // The cool-down is a pure timer: it passes on the paused clock (no request is in flight
    // while it is paused). One second short of it, the breaker is still open.
    tokio::time::pause();
    tokio::time::advance(cooldown - Duration::from_secs(1)).await;
    tokio::time::resume();
    let out = rt
        .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(
        out.status,
        Status::CircuitOpen,
        "open until the cool-down ends"
    );
    assert_eq!(server.request_count(), before);
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(1)).await;
    tokio::time::resume();
    healthy.store(true, Ordering::SeqCst);
    let out = rt
        .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.status, Status::Ok, "the half-open probe goes through");
    let out = rt
        .execute(set.action("a").unwrap(), &mut c, json!({}), &long())
        .await;
    assert_eq!(out.status, Status::Ok, "and the breaker is closed again");
}

#[tokio::test]
async fn dropping_the_future_mid_request_closes_the_connection() {
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r2 = requests.clone();
    let server = RawServer::start(Arc::new(move |mut s, _, closed, count| {
        let requests = r2.clone();
        Box::pin(async move {
            read_request(&mut s).await;
            requests.fetch_add(1, Ordering::SeqCst);
            wait_closed(s, closed, count).await;
        })
    }))
    .await;
    let set = Arc::new(one_action(&server.origin(), "/x", "timeout_ms = 10000"));
    let rt = runtime();
    let (set2, rt2) = (set.clone(), rt.clone());
    let task = tokio::spawn(async move {
        let mut c = call();
        rt2.execute(set2.action("a").unwrap(), &mut c, json!({}), &long())
            .await
    });
    // Wait for the event: the request is at the upstream.
    wait_until("the request", WAIT, || {
        ready(requests.load(Ordering::SeqCst) == 1)
    })
    .await;
    task.abort(); // the caller barged in
    tokio::time::timeout(Duration::from_secs(2), server.closed.notified())
        .await
        .expect("the server saw the connection close");
    assert_eq!(server.closed_count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn idempotency_keys_follow_the_tool_call() {
    let server = TestServer::http(|_, _| Reply::ok(json!({}))).await;
    let set = one_action(
        &server.origin(),
        "/x",
        "method = \"POST\"\nbody = { s = \"{{args.s}}\" }\ndedupe = false",
    );
    let rt = runtime();
    let mut c = call();
    let mut keys = Vec::new();
    for tool in [
        ToolCall::new("tc_1", json!({"s": "a"})),
        ToolCall::new("tc_1", json!({"s": "a"})),
        ToolCall::new("tc_2", json!({"s": "a"})),
        ToolCall::from(json!({"s": "a", "t": 1})),
        ToolCall::from(json!({"t": 1, "s": "a"})),
        ToolCall::from(json!({"s": "b"})),
    ] {
        rt.execute(set.action("a").unwrap(), &mut c, tool, &long())
            .await;
        keys.push(server.last().header("idempotency-key").unwrap().to_string());
    }
    assert_eq!(keys[0], keys[1], "same tool call id, same key");
    assert_ne!(keys[0], keys[2]);
    assert_eq!(keys[3], keys[4], "same canonical args, same key");
    assert_ne!(keys[3], keys[5]);
    // It can be turned off.
    let rt = builder().idempotency_header(None).unwrap().build().unwrap();
    rt.execute(set.action("a").unwrap(), &mut c, json!({"s": "a"}), &long())
        .await;
    assert!(server.last().header("idempotency-key").is_none());
}

#[tokio::test]
async fn execute_all_runs_in_parallel_and_applies_in_order() {
    // Each request is held until both are at the upstream (for at most 5 s), then answered,
    // the slow one last. Only one sent after the other waits the 5 s out (the actions'
    // timeouts are longer, so neither gives up first).
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let apart = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (b2, a2) = (barrier.clone(), apart.clone());
    let server = RawServer::start(Arc::new(move |mut s, _, _, _| {
        let (barrier, apart) = (b2.clone(), a2.clone());
        Box::pin(async move {
            while let Some(head) = read_request(&mut s).await {
                let slow = head.starts_with("GET /slow ");
                if tokio::time::timeout(Duration::from_secs(5), barrier.wait())
                    .await
                    .is_err()
                {
                    apart.store(true, Ordering::SeqCst);
                }
                let (delay, v) = if slow { (200, 1) } else { (150, 2) };
                tokio::time::sleep(Duration::from_millis(delay)).await;
                if !write_all(&mut s, &json_response(&format!("{{\"v\": {v}}}"))).await {
                    return;
                }
            }
        })
    }))
    .await;
    let text = format!(
        "{AGENT}[[actions]]\nname = \"slow\"\ndescription = \"d\"\nurl = \"{o}/slow\"\ntimeout_ms = 10000\nextract = {{ \"r.v\" = \"$.v\" }}\n[[actions]]\nname = \"fast\"\ndescription = \"d\"\nurl = \"{o}/fast\"\ntimeout_ms = 10000\nextract = {{ \"r.v\" = \"$.v\" }}\n",
        o = server.origin()
    );
    let set = load_toml(&text).unwrap();
    let rt = runtime();
    let mut c = call();
    let start = Instant::now();
    let outs = rt
        .execute_all(
            &[
                (set.action("slow").unwrap(), ToolCall::from(json!({}))),
                (set.action("fast").unwrap(), ToolCall::from(json!({}))),
            ],
            &mut c,
            &long(),
            |_, _| {},
        )
        .await;
    assert!(
        !apart.load(Ordering::SeqCst),
        "both requests were out at once"
    );
    // A generous bound: the answers take 200 ms in parallel; one after the other, 5 s or more.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "in parallel: {:?}",
        start.elapsed()
    );
    assert_eq!(
        outs.iter().map(|o| o.action.as_str()).collect::<Vec<_>>(),
        ["slow", "fast"]
    );
    assert!(outs.iter().all(|o| o.status == Status::Ok));
    // Applied in the order given: the second write wins.
    assert_eq!(c.state.to_value(), json!({"r": {"v": 2}}));
}

#[tokio::test]
async fn async_actions_start_in_the_background_and_are_bounded() {
    let server = TestServer::http(|_, _| {
        Reply::After(Duration::from_millis(3000), Box::new(Reply::ok(json!({}))))
    })
    .await;
    let set = one_action(
        &server.origin(),
        "/x",
        "method = \"POST\"\nbody = { n = \"{{args.n}}\" }\nasync = true\ntimeout_ms = 5000",
    );
    let rt = builder().max_async_in_flight(1).build().unwrap();
    let mut c = call();
    let start = Instant::now();
    let out = rt
        .execute(set.action("a").unwrap(), &mut c, json!({"n": 1}), &long())
        .await;
    assert_eq!(out.status, Status::Accepted);
    // The upstream takes 3 s; returning long before that shows nobody waited for it.
    assert!(start.elapsed() < Duration::from_millis(1500));
    let out = rt
        .execute(set.action("a").unwrap(), &mut c, json!({"n": 2}), &long())
        .await;
    assert_eq!(out.status, Status::Rejected, "beyond the limit");
    assert!(out.error.unwrap().is_overloaded());
    wait_until("the background request", WAIT, || {
        ready(server.request_count() == 1)
    })
    .await;
    assert_eq!(server.last().json(), json!({"n": 1}));
    assert!(
        c.state.variables().is_empty(),
        "background actions never write state"
    );
}

#[tokio::test]
async fn invalid_arguments_are_rejected_before_sending() {
    let server = TestServer::http(|_, _| Reply::ok(json!({}))).await;
    let set = one_action(
        &server.origin(),
        "/x",
        "method = \"POST\"\nparameters = { type = \"object\", required = [\"slot\"], properties = { slot = { type = \"string\" } } }\nbody = { s = \"{{args.slot}}\" }\non_failure = { say = \"Which time?\" }",
    );
    let out = runtime()
        .execute(
            set.action("a").unwrap(),
            &mut call(),
            json!({"slot": 3}),
            &long(),
        )
        .await;
    assert_eq!(out.status, Status::Rejected);
    assert_eq!(out.attempts, 0);
    assert!(out.error.as_ref().unwrap().is_invalid_arguments());
    assert_eq!(
        out.llm_result["message"],
        json!("invalid arguments for a: slot: 3 is not of type \"string\"")
    );
    assert_eq!(out.say.as_deref(), Some("Which time?"));
    assert_eq!(server.request_count(), 0);
}

#[tokio::test]
async fn llm_result_is_bounded() {
    let server =
        TestServer::http(|_, _| Reply::ok(json!({"a": "x".repeat(3000), "b": "short"}))).await;
    let set = one_action(
        &server.origin(),
        "/x",
        "extract = { a = \"$.a\", b = \"$.b\" }",
    );
    let out = run_a(&runtime(), &set).await;
    assert_eq!(out.status, Status::Ok);
    assert!(out.llm_result.to_string().len() <= 2048);
    assert_eq!(out.llm_result, json!({"b": "short", "truncated": true}));
    assert_eq!(out.values.len(), 2, "state still gets every value");
}

#[tokio::test]
async fn outcome_json_has_the_documented_keys() {
    let server = TestServer::http(|_, _| Reply::ok(json!({"v": 1}))).await;
    let set = one_action(&server.origin(), "/x", "extract = { v = \"$.v\" }");
    let out = run_a(&runtime(), &set).await;
    let v = out.to_json();
    for k in [
        "status",
        "http_status",
        "attempts",
        "elapsed_ms",
        "values",
        "llm_result",
        "say",
        "error",
        "timings",
    ] {
        assert!(v.get(k).is_some(), "{k} in {v}");
    }
    assert_eq!(v["status"], "ok");
    assert_eq!(v["values"], json!({"v": 1}));
    assert!(v["timings"]["total_us"].as_u64().is_some(), "{v}");
}

#[tokio::test]
async fn a_warmed_connection_that_went_stale_is_retried_for_get() {
    // The first connection (opened by warm-up) reads the request and closes without answering.
    let server = RawServer::start(Arc::new(|mut s, n, _, _| {
        Box::pin(async move {
            if n == 1 {
                read_request(&mut s).await;
                drop(s);
            } else {
                while read_request(&mut s).await.is_some() {
                    write_all(&mut s, &json_response("{\"v\": 3}")).await;
                }
            }
        })
    }))
    .await;
    let set = one_action(&server.origin(), "/x", "extract = { v = \"$.v\" }");
    let rt = runtime();
    assert_eq!(rt.warm(&set, Duration::from_secs(1)).await.warmed.len(), 1);
    let out = run_a(&rt, &set).await;
    assert_eq!(out.status, Status::Ok, "{:?}", out.error);
    assert_eq!(out.attempts, 2);
    assert_eq!(server.accepted(), 2);
}

#[cfg(target_os = "linux")]
#[test]
fn set_thread_nice_changes_the_calling_thread_only_and_checks_its_range() {
    let e = midcall::exec::set_thread_nice(20).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("-20 to 19"), "{e}");
    let before = rustix::process::getpriority_process(None).unwrap();
    let (mine, process) = std::thread::spawn(|| {
        midcall::exec::set_thread_nice(7).unwrap();
        let tid = rustix::thread::gettid();
        (
            rustix::process::getpriority_process(Some(tid)).unwrap(),
            rustix::process::getpriority_process(None).unwrap(),
        )
    })
    .join()
    .unwrap();
    assert_eq!(mine, 7);
    // getpriority(PRIO_PROCESS, 0) is the calling thread's on Linux: the spawned thread sees
    // its own 7; this thread kept its value.
    assert_eq!(process, 7);
    assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
}
