//! Fuzz target bodies, kept in the library so a normal test can replay the corpora on stable
//! Rust. Each function must never panic, whatever the input.
//!
//! Behind the cargo feature `testing` (which `fuzz/` and the tests enable); not API. May
//! call anything.

use serde_json::Value;

use crate::config::{ActionSet, Syntax};
use crate::state::{CallInfo, ConversationState, Transcript};
use crate::template::{MapSecrets, Redactor, RenderContext, Template, UrlTemplate, ACTION_ROOTS};

/// Arbitrary bytes as a config file, TOML and JSON.
pub fn config_load(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ActionSet::from_str("fuzz.toml", text, Syntax::Toml);
        let _ = ActionSet::from_str("fuzz.json", text, Syntax::Json);
    }
}

/// Arbitrary selector text: compile, and where it compiles, evaluate on a fixed document.
pub fn jsonpath_compile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(q) = crate::jsonpath::Query::compile(text) {
        let doc = serde_json::json!({
            "a": [1, 2, {"b": "c", "d": [true, null, 3.5]}],
            "e": {"f": "g", "h": {"i": [1, "x"], "a": {"a": -1}}},
            "": 0,
            "k'\"": [[], {}, "é"]
        });
        let full: Vec<Value> = q.select(&doc).into_iter().cloned().collect();
        let _ = q.select_paths(&doc);
        // Where the fast path takes the query, it agrees with the full engine.
        if let Some(fast) = q.select_fast(doc.to_string().as_bytes()) {
            assert_eq!(fast, full, "fast path disagrees on {text:?}");
        }
    }
}

/// The first line is a template; the rest, if JSON, is the state and the args. A rendered URL
/// or header never contains CR, LF or NUL.
pub fn template_render(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (template, rest) = text.split_once('\n').unwrap_or((text, ""));
    let value: Value = serde_json::from_str(rest).unwrap_or(Value::Null);
    let state = ConversationState::from_value(value.clone()).unwrap_or_default();
    let call = CallInfo {
        id: "call-1".into(),
        agent_id: "agent".into(),
        tenant: "tenant".into(),
        from_number: "+15550000000".into(),
        to_number: "+15550000001".into(),
        is_outgoing: false,
        started_at: "2025-11-03T19:33:18.330Z".into(),
    };
    let transcript = Transcript::default();
    let secrets = MapSecrets::new().with("TOKEN", "s3cr3t\r\nX: y");
    let ctx = RenderContext {
        call: &call,
        state: &state,
        args: &value,
        transcript: &transcript,
        secrets: &secrets,
        payload: Some(&value),
    };
    let mut redactor = Redactor::default();
    if let Ok(t) = Template::compile(template, ACTION_ROOTS) {
        if let Ok(h) = t.render_header(&ctx, &mut redactor) {
            assert!(!h.contains(['\r', '\n', '\0']), "header with CR/LF/NUL");
        }
        let _ = t.render_text(&ctx, &mut redactor);
    }
    if let Ok(u) = UrlTemplate::compile(template, ACTION_ROOTS) {
        if let Ok(url) = u.render(&ctx, &mut redactor) {
            assert!(
                !url.contains(['\r', '\n', '\0', ' ', '#']),
                "unsafe URL {url:?}"
            );
        }
    }
    if let Ok(body) =
        crate::template::BodyTemplate::compile(&Value::String(template.into()), ACTION_ROOTS)
    {
        let mut out = Vec::new();
        if body.render(&ctx, &mut redactor, &mut out).is_ok() {
            assert!(
                serde_json::from_slice::<Value>(&out).is_ok(),
                "body is not JSON"
            );
        }
    }
}

/// Arbitrary bytes as a response body through the real parse and extraction path, with a
/// fixed set of queries (names, indexes, wildcards, slices, descendants, filters).
pub fn response_extract(data: &[u8]) {
    use crate::jsonpath::{Conversion, ExtractRule, Extractor, Query};
    use crate::state::StatePath;
    thread_local! {
        static EXTRACTOR: Extractor = {
            let rules = [
                ("a", "$.data.customer.name", Conversion::Json, false),
                ("b", "$.items[0].id", Conversion::String, false),
                ("c", "$.items[*].price", Conversion::Number, true),
                ("d", "$..id", Conversion::Json, true),
                ("e", "$.items[1:3]", Conversion::Json, true),
                ("f", "$.items[?@.price > 10].name", Conversion::Json, true),
                ("g", "$.flag", Conversion::Bool, false),
            ];
            Extractor::new(
                rules
                    .iter()
                    .map(|(t, q, c, all)| ExtractRule {
                        target: StatePath::parse(t).expect("fixed path"),
                        query: Query::compile(q).expect("fixed query"),
                        required: false,
                        default: None,
                        conversion: *c,
                        all: *all,
                    })
                    .collect(),
            )
        };
    }
    EXTRACTOR.with(|e| {
        // The real path (fast when it can be) agrees with serde_json + the full engine.
        let real = e.extract_bytes(data);
        match crate::jsonpath::parse_response(data) {
            Ok(doc) => match (e.extract(&doc), real) {
                (Ok(a), Ok(b)) => assert_eq!(a, b.values, "fast and full extraction differ"),
                (Err(a), Err(crate::jsonpath::BodyError::Extract(b))) => assert_eq!(a, b),
                (a, b) => panic!("paths disagree: {a:?} vs {b:?}"),
            },
            Err(_) => assert!(real.is_err(), "accepted a body serde_json refuses"),
        }
    });
}

/// Arbitrary `Retry-After` values: never a panic, never more than a day.
pub fn retry_after(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        if let Some(d) = crate::exec::parse_retry_after(text, now) {
            assert!(
                d <= std::time::Duration::from_secs(86_400),
                "delay over a day"
            );
        }
    }
}

/// Arbitrary host strings and IP literals: whatever reads as a blocked address is refused by
/// the default policy, and std's own parse never disagrees with ours.
pub fn egress_host(data: &[u8]) {
    use crate::transport::{is_blocked, parse_ip_literal, EgressPolicy};
    let Ok(host) = std::str::from_utf8(data) else {
        return;
    };
    let policy = EgressPolicy::new();
    if let Ok(std_ip) = host.parse::<std::net::IpAddr>() {
        assert_eq!(parse_ip_literal(host), Some(std_ip), "disagrees with std");
    }
    if let Some(ip) = parse_ip_literal(host) {
        if is_blocked(ip) {
            assert!(policy.check_ip(ip).is_err(), "blocked address allowed");
        }
        if let std::net::IpAddr::V6(v6) = ip {
            if let Some(v4) = v6.to_ipv4_mapped() {
                assert_eq!(is_blocked(ip), is_blocked(v4.into()), "mapped form differs");
            }
        }
    }
}

/// An inbound webhook's checks on arbitrary input. Lines: webhook-id, webhook-timestamp
/// (seconds, or `now+N`/`now-N`), webhook-signature, Content-Type; the rest is the body.
/// Never panics; a signature is accepted only if it is the true one; a payload error names a
/// line and column.
pub fn inbound_verify(data: &[u8]) {
    use crate::events::signing;
    use crate::server::{check_signature, is_json, parse_payload};
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const NOW: i64 = 1_700_000_000;
    let mut parts = data.splitn(5, |b| *b == b'\n');
    let mut line = || parts.next().and_then(|l| std::str::from_utf8(l).ok());
    let (id, ts, sig, ctype) = (line(), line(), line(), line());
    let body = parts.next().unwrap_or_default();
    let ts = ts.map(|t| match (t.strip_prefix("now+"), t.strip_prefix("now-")) {
        (Some(n), _) => n
            .parse::<i64>()
            .ok()
            .and_then(|n| NOW.checked_add(n))
            .map(|t| t.to_string())
            .unwrap_or_default(),
        (_, Some(n)) => n
            .parse::<i64>()
            .ok()
            .and_then(|n| NOW.checked_sub(n))
            .map(|t| t.to_string())
            .unwrap_or_default(),
        _ => t.to_string(),
    });
    // A signature line of "sign" is replaced by the true signature, to reach acceptance.
    let true_sig = match (id, ts.as_deref().and_then(|t| t.trim().parse::<i64>().ok())) {
        (Some(id), Some(t)) => signing::sign(SECRET, id, t, body).ok(),
        _ => None,
    };
    let sig = match sig {
        Some("sign") => true_sig.clone(),
        other => other.map(str::to_string),
    };
    if let Ok(accepted) = check_signature(SECRET, id, ts.as_deref(), sig.as_deref(), body, NOW) {
        assert_eq!(Some(accepted), id);
        let t: i64 = ts
            .as_deref()
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or_default();
        assert!((NOW - t).abs() <= crate::server::SIGNATURE_TOLERANCE_S);
        let true_sig = true_sig.unwrap_or_default();
        assert!(
            sig.unwrap_or_default()
                .split_whitespace()
                .any(|e| e == true_sig),
            "accepted a signature that is not the true one"
        );
    }
    let _ = is_json(ctype.unwrap_or_default());
    if let Err(e) = parse_payload(body) {
        assert!(e.starts_with("invalid JSON at line "), "{e}");
    }
}
