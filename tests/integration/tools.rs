//! Tool definitions for the model, argument validation and extraction.

use serde_json::{json, Value};

use midcall::{Format, StatePath};

use crate::support::agent;

fn front_desk() -> midcall::ActionSet {
    midcall::ActionSet::load(crate::support::root().join("examples/front-desk/agent.toml")).unwrap()
}

#[test]
fn openai_and_anthropic_tool_lists() {
    let set = front_desk();
    let openai = set.tool_definitions(Format::OpenAi);
    let tools = openai.as_array().unwrap();
    assert_eq!(tools.len(), set.actions().len());
    assert_eq!(tools[0]["type"], "function");
    assert_eq!(tools[0]["function"]["name"], "lookup_customer");
    assert_eq!(
        tools[0]["function"]["parameters"],
        json!({"type": "object", "properties": {}})
    );
    assert_eq!(tools[2]["function"]["name"], "book_appointment");
    assert_eq!(
        tools[2]["function"]["parameters"]["required"],
        json!(["slot"])
    );

    let anthropic = set.tool_definitions(Format::Anthropic);
    let t = &anthropic[2];
    assert_eq!(t["name"], "book_appointment");
    assert_eq!(t["description"], "Book an appointment slot for the caller");
    assert_eq!(t["input_schema"]["properties"]["slot"]["type"], "string");
    assert!(t.get("type").is_none());
}

#[test]
fn argument_errors_list_each_offending_field_in_plain_words() {
    let set = front_desk();
    let check = set.action("check_slots").unwrap();
    assert!(check.validate_args(&json!({"date": "2025-11-04"})).is_ok());
    let e = check
        .validate_args(&json!({"date": "tomorrow", "kind": "surgery"}))
        .unwrap_err();
    assert_eq!(e.problems.len(), 2, "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("invalid arguments for check_slots: "),
        "{msg}"
    );
    assert!(msg.contains("date: \"tomorrow\" does not match"), "{msg}");
    assert!(msg.contains("kind: \"surgery\" is not one of"), "{msg}");

    let book = set.action("book_appointment").unwrap();
    let e = book.validate_args(&json!({"reason": 5})).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("arguments: \"slot\" is a required property"),
        "{msg}"
    );
    assert!(msg.contains("reason: 5 is not of type \"string\""), "{msg}");
    let e = book.validate_args(&json!("slot=3pm")).unwrap_err();
    assert!(
        e.to_string().contains("expected a JSON object, got string"),
        "{e}"
    );
    let e = book.validate_args(&Value::Null).unwrap_err();
    assert!(e.to_string().contains("expected a JSON object, got null"));
    // An action without parameters takes none or an object.
    let lookup = set.action("lookup_customer").unwrap();
    assert!(lookup.validate_args(&Value::Null).is_ok());
    assert!(lookup.validate_args(&json!({})).is_ok());
}

#[test]
fn extraction_short_and_long_forms() {
    let set = agent(
        r#"
[[actions]]
name = "x"
description = "d"
url = "https://e.example.com/"
extract = { "c.name" = "$.data.customer.name", "c.id" = { path = "$.data.customer.id", as = "string", required = true }, "c.visits" = { path = "$.data.visits", as = "number" }, "c.vip" = { path = "$.data.vip", as = "bool" }, "c.tags" = { path = "$.data.tags[*].name", all = true }, "c.none" = "$.nothing", "c.dflt" = { path = "$.nothing", default = "n/a" } }
"#,
    );
    let ex = set.action("x").unwrap().extractor();
    let doc = json!({"data": {"customer": {"name": "Ada", "id": 42}, "visits": "7", "vip": "true",
        "tags": [{"name": "a"}, {"name": "b"}]}});
    let out = ex.extract(&doc).unwrap();
    let got: Vec<(String, Value)> = out.into_iter().map(|(p, v)| (p.to_string(), v)).collect();
    assert_eq!(
        got,
        vec![
            ("c.name".into(), json!("Ada")),
            ("c.id".into(), json!("42")),
            ("c.visits".into(), json!(7)),
            ("c.vip".into(), json!(true)),
            ("c.tags".into(), json!(["a", "b"])),
            ("c.dflt".into(), json!("n/a")),
        ]
    );
    let e = ex.extract(&json!({"data": {}})).unwrap_err();
    assert_eq!(
        e.to_string(),
        "extract \"c.id\": $.data.customer.id selected nothing and the value is required"
    );
    let e = ex
        .extract(&json!({"data": {"customer": {"id": 1}, "visits": {"n": 1}}}))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("selected a object, which cannot be read as number")
            || e.to_string().contains("cannot be read as number"),
        "{e}"
    );
}

#[test]
fn fallback_and_prefetch_are_compiled() {
    let set = front_desk();
    let a = set.action("lookup_customer").unwrap();
    assert_eq!(
        a.on_failure().say.as_deref(),
        Some("I can't reach your account right now.")
    );
    assert_eq!(
        a.on_failure().set,
        vec![(
            StatePath::parse("customer.lookup_failed").unwrap(),
            json!(true)
        )]
    );
    assert!(a.prefetch().is_some());
    assert_eq!(a.timeout().as_millis(), 800);
    assert_eq!(a.filler().unwrap().after.as_millis(), 400);
    assert!(a.is_idempotent());
    let book = set.action("book_appointment").unwrap();
    assert!(!book.is_idempotent());
    assert_eq!(book.invalidates(), ["check_slots"]);
    assert_eq!(book.max_response_bytes(), 1024 * 1024);
    assert!(set.action("log_call_note").unwrap().is_async());
}
