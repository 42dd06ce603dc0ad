//! Fuzz target bodies, kept in the library so a normal test can replay the corpora on stable
//! Rust. Each function must never panic, whatever the input.

use serde_json::Value;

use crate::spec::{ActionSet, Syntax};
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
            "e": {"f": "g", "h": {"i": [1, "x"]}},
            "": 0
        });
        let _ = q.select(&doc);
        let _ = q.select_paths(&doc);
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
