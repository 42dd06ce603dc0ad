//! Context-aware rendering with hostile values: URL, header and JSON body.

use proptest::prelude::*;
use serde_json::{json, Value};

use midcall::template::{Redactor, Root, Template, ACTION_ROOTS};
use midcall::{Call, ConversationState, MapSecrets, RenderContext, RequestError, StatePath};

use crate::support::{agent, call_info};

const HOSTILE: &[&str] = &[
    "\"}",
    "\r\nX-Injected: yes",
    "../../admin",
    "%00",
    "a\u{0}b",
    "emoji 📞☎️ and ünïcödé",
    "?x=1#frag",
    "back\\slash 'single' \"double\"",
    "\u{1}\u{1f}\u{7f}",
];

fn ctx<'a>(call: &'a Call, args: &'a Value, secrets: &'a MapSecrets) -> RenderContext<'a> {
    RenderContext {
        call: &call.info,
        state: &call.state,
        args,
        transcript: &call.transcript,
        secrets,
        payload: None,
    }
}

fn set() -> midcall::ActionSet {
    agent(
        r#"
[[actions]]
name = "act"
description = "d"
method = "POST"
url = "https://api.example.com/v1/items/{{args.v}}/sub?q={{args.v}}&n={{args.n | default: 7}}"
headers = { X-Value = "pre {{args.v}} post", Authorization = "Bearer {{secrets.TOKEN}}" }
body = { whole = "{{args.v}}", mixed = "v={{args.v}}!", n = "{{args.n | default: 7}}", obj = "{{args.o | default: {\"k\": [1, 2]}}}", lit = 3 }
"#,
    )
}

#[test]
fn url_values_are_percent_encoded_per_component() {
    let set = set();
    let a = set.action("act").unwrap();
    let call = Call::new(call_info());
    let secrets = MapSecrets::new().with("TOKEN", "t");
    for v in HOSTILE {
        if v.contains(['\r', '\n', '\0', '\u{1}']) {
            continue; // these fail in the header, tested below
        }
        let args = json!({ "v": v });
        let req = a.render(&ctx(&call, &args, &secrets)).unwrap();
        let (path, query) = req.url.split_once('?').unwrap();
        let segment = path
            .strip_prefix("https://api.example.com/v1/items/")
            .unwrap()
            .strip_suffix("/sub")
            .unwrap();
        assert!(!segment.contains(['/', '?', '#', ' ', '"']), "{segment}");
        assert_eq!(percent_decode(segment), *v, "path segment round trip");
        let q = query.strip_prefix("q=").unwrap().split('&').next().unwrap();
        assert!(!q.contains(['&', '=', '#', ' ', '+']), "{q}");
        assert_eq!(percent_decode(q), *v);
    }
}

#[test]
fn dot_segments_cannot_walk_up_the_path() {
    let set = set();
    let a = set.action("act").unwrap();
    let call = Call::new(call_info());
    let secrets = MapSecrets::new().with("TOKEN", "t");
    for (v, want) in [("..", "%2E%2E"), (".", "%2E")] {
        let args = json!({ "v": v });
        let req = a.render(&ctx(&call, &args, &secrets)).unwrap();
        assert!(
            req.url
                .starts_with(&format!("https://api.example.com/v1/items/{want}/sub?")),
            "{}",
            req.url
        );
    }
}

#[test]
fn header_values_with_cr_lf_nul_or_controls_are_refused() {
    let set = set();
    let a = set.action("act").unwrap();
    let call = Call::new(call_info());
    let secrets = MapSecrets::new().with("TOKEN", "t");
    for v in [
        "a\r\nX-Injected: yes",
        "a\nb",
        "a\rb",
        "a\u{0}b",
        "a\u{1}b",
        "a\u{7f}",
    ] {
        let args = json!({ "v": v });
        let err = a.render(&ctx(&call, &args, &secrets)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("action \"act\": header \"x-value\": rendered value contains"),
            "{msg}"
        );
        assert!(
            !msg.contains("Injected"),
            "the value is never echoed: {msg}"
        );
    }
}

#[test]
fn a_secret_with_a_line_break_is_refused_in_a_header_too() {
    let set = set();
    let a = set.action("act").unwrap();
    let call = Call::new(call_info());
    let secrets = MapSecrets::new().with("TOKEN", "t\r\nX-Evil: 1");
    let args = json!({ "v": "ok" });
    let err = a.render(&ctx(&call, &args, &secrets)).unwrap_err();
    assert!(
        err.to_string().contains("header \"authorization\""),
        "{err}"
    );
    assert!(!err.to_string().contains("Evil"));
}

#[test]
fn body_keeps_json_shape_and_types_with_hostile_strings() {
    let set = set();
    let a = set.action("act").unwrap();
    let call = Call::new(call_info());
    let secrets = MapSecrets::new().with("TOKEN", "t");
    let long = "x\"".repeat(50_000);
    let mut values: Vec<String> = HOSTILE.iter().map(|s| s.to_string()).collect();
    values.push(long);
    for v in values {
        if v.contains(['\r', '\n', '\0', '\u{1}', '\u{7f}']) {
            // Refused by the header; render the body alone below.
            continue;
        }
        let args = json!({ "v": v, "n": 12.5 });
        let req = a.render(&ctx(&call, &args, &secrets)).unwrap();
        let body: Value = serde_json::from_slice(req.body.as_ref().unwrap()).unwrap();
        assert_eq!(body["whole"], json!(v));
        assert_eq!(body["mixed"], json!(format!("v={v}!")));
        assert_eq!(body["n"], json!(12.5), "a number stays a number");
        assert_eq!(
            body["obj"],
            json!({"k": [1, 2]}),
            "a default object stays an object"
        );
        assert_eq!(body["lit"], json!(3));
        assert_eq!(body.as_object().unwrap().len(), 5, "no injected keys");
    }
}

#[test]
fn body_template_alone_escapes_control_characters() {
    let t = midcall::template::BodyTemplate::compile(
        &json!({"a": "{{args.v}}", "b": "<{{args.v}}>"}),
        ACTION_ROOTS,
    )
    .unwrap();
    let call = Call::new(call_info());
    let secrets = MapSecrets::new();
    for v in HOSTILE {
        let args = json!({ "v": v });
        let mut out = Vec::new();
        t.render(
            &ctx(&call, &args, &secrets),
            &mut Redactor::default(),
            &mut out,
        )
        .unwrap();
        let body: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(body, json!({"a": v, "b": format!("<{v}>")}));
    }
}

#[test]
fn missing_value_without_default_is_an_error_naming_the_variable() {
    let set = set();
    let a = set.action("act").unwrap();
    let call = Call::new(call_info());
    let secrets = MapSecrets::new().with("TOKEN", "t");
    let args = json!({});
    let err = a.render(&ctx(&call, &args, &secrets)).unwrap_err();
    assert!(matches!(err, RequestError::Render { .. }));
    assert!(
        err.to_string()
            .starts_with("action \"act\": url: no value for args.v and no default"),
        "{err}"
    );
    // Null counts as missing.
    let args = json!({"v": null});
    assert!(a.render(&ctx(&call, &args, &secrets)).is_err());
}

#[test]
fn objects_cannot_go_into_a_url() {
    let set = set();
    let a = set.action("act").unwrap();
    let call = Call::new(call_info());
    let secrets = MapSecrets::new().with("TOKEN", "t");
    let args = json!({"v": {"a": 1}});
    let err = a.render(&ctx(&call, &args, &secrets)).unwrap_err();
    assert!(err.to_string().contains("args.v is an object"), "{err}");
}

#[test]
fn call_state_and_transcript_roots_render() {
    let t = Template::compile(
        "{{call.id}}|{{call.is_outgoing}}|{{state.customer.name}}|{{transcript}}",
        ACTION_ROOTS,
    )
    .unwrap();
    let mut call = Call::new(call_info());
    call.state
        .set(&StatePath::parse("customer.name").unwrap(), json!("Ada"))
        .unwrap();
    call.transcript
        .push(midcall::Turn::user("hi", "2025-11-03T19:33:18.330Z"));
    let secrets = MapSecrets::new();
    let out = t
        .render_text(
            &ctx(&call, &Value::Null, &secrets),
            &mut Redactor::default(),
        )
        .unwrap();
    assert_eq!(
        out,
        r#"call_123|false|Ada|[{"transcript":"hi","speaker":"user","createdAt":"2025-11-03T19:33:18.330Z"}]"#
    );
}

#[test]
fn secrets_are_redacted_in_every_view() {
    let set = set();
    let a = set.action("act").unwrap();
    let call = Call::new(call_info());
    let secret = "sk_live_\"quoted\"/slash";
    let secrets = MapSecrets::new().with("TOKEN", secret);
    let args = json!({"v": secret});
    let req = a.render(&ctx(&call, &args, &secrets)).unwrap();
    // The real request carries it...
    assert!(req.headers.iter().any(|(_, v)| v.contains(secret)));
    // ...no view for people does, in any encoding.
    let text = req.redacted_text();
    let debug = format!("{req:?}");
    let json = req.redacted_json().to_string();
    let encoded = "sk_live_%22quoted%22%2Fslash";
    for view in [&text, &debug, &json] {
        assert!(!view.contains("sk_live"), "{view}");
        assert!(view.contains("***"));
    }
    assert!(req.url.contains(encoded));
    assert!(!req.redacted_url().contains(encoded));
    assert_eq!(
        format!("{:?}", secrets),
        "MapSecrets { names: [\"TOKEN\"] }"
    );
}

#[test]
fn compile_errors_give_character_positions() {
    let e = Template::compile("héllo {{args.x", ACTION_ROOTS).unwrap_err();
    assert_eq!(e.position, 7);
    let e = Template::compile("{{ payload.x }}", ACTION_ROOTS).unwrap_err();
    assert!(
        e.message.starts_with("unknown template root \"payload\""),
        "{}",
        e.message
    );
    let e = Template::compile("{{call.nope}}", ACTION_ROOTS).unwrap_err();
    assert!(e.message.contains("unknown call field"), "{}", e.message);
    let e = Template::compile("{{args.x | default: checkup}}", ACTION_ROOTS).unwrap_err();
    assert!(e.message.contains("not a JSON literal"), "{}", e.message);
    let e = Template::compile("{{secrets.A | default: \"x\"}}", &[Root::Secrets]).unwrap_err();
    assert!(e.message.contains("a secret cannot have a default"));
    assert!(Template::compile("{{}}", ACTION_ROOTS).is_err());
    assert!(Template::compile("plain }} text", ACTION_ROOTS)
        .unwrap()
        .is_literal());
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any JSON value rendered through a single-placeholder body template parses back equal.
    #[test]
    fn single_placeholder_body_round_trips_any_json(v in arb_json()) {
        prop_assume!(!v.is_null()); // null is "missing" and takes the default
        let t = midcall::template::BodyTemplate::compile(&json!({"x": "{{args.v}}"}), ACTION_ROOTS).unwrap();
        let call = Call::new(call_info());
        let secrets = MapSecrets::new();
        let args = json!({"v": v.clone()});
        let mut out = Vec::new();
        t.render(&ctx(&call, &args, &secrets), &mut Redactor::default(), &mut out).unwrap();
        let back: Value = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(&back["x"], &v);
    }

    /// Any string rendered into a URL path or query decodes back to itself and never
    /// contains a character that would change the URL's structure.
    #[test]
    fn url_components_round_trip_any_string(s in any::<String>()) {
        let set = set();
        let a = set.action("act").unwrap();
        let call = Call::new(call_info());
        let secrets = MapSecrets::new().with("TOKEN", "t");
        let u = a.url();
        let args = json!({"v": s.clone()});
        let url = u.render(&ctx(&call, &args, &secrets), &mut Redactor::default()).unwrap();
        prop_assert!(!url.contains(['\r', '\n', '\0', ' ', '#']));
        let rest = url.strip_prefix("https://api.example.com/v1/items/").unwrap();
        let (seg, query) = rest.split_once("/sub?q=").unwrap();
        prop_assert!(!seg.contains('/'));
        let q = query.split("&n=").next().unwrap();
        if s != "." && s != ".." {
            prop_assert_eq!(percent_decode(seg), s.clone());
        }
        prop_assert_eq!(percent_decode(q), s);
    }
}

#[test]
fn state_used_by_templates_is_the_capped_state() {
    let mut s = ConversationState::with_cap(64);
    let p = StatePath::parse("a").unwrap();
    assert!(s.set(&p, json!("x".repeat(100))).is_err());
}
