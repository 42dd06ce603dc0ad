use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

fn p(s: &str) -> StatePath {
    StatePath::parse(s).unwrap()
}

#[test]
fn transcript_round_trip_is_exact() {
    let text = r#"[{"transcript":"Hi, I'd like to book a cleaning.","speaker":"user","createdAt":"2025-11-03T19:33:18.330Z"},{"transcript":"Sure, which day works?","speaker":"ai","createdAt":"2025-11-03T19:33:19.010Z","step":1,"node_id":"node_abc123"},{"transcript":"ok","speaker":"ai","createdAt":"2025-11-03T19:33:20.000Z"}]"#;
    let t: Transcript = serde_json::from_str(text).unwrap();
    assert_eq!(t.turns().len(), 3);
    assert_eq!(t.turns()[1].step(), Some(1));
    assert_eq!(t.turns()[1].node_id(), Some("node_abc123"));
    assert_eq!(serde_json::to_string(&t).unwrap(), text);
}

#[test]
fn user_turns_cannot_carry_step_or_node_id() {
    let bad =
        r#"[{"transcript":"x","speaker":"user","createdAt":"2025-11-03T19:33:18.330Z","step":2}]"#;
    let e = serde_json::from_str::<Transcript>(bad).unwrap_err();
    assert!(
        e.to_string()
            .contains("\"step\" is only allowed on ai turns"),
        "{e}"
    );
    let bad = r#"[{"transcript":"x","speaker":"user","createdAt":"2025-11-03T19:33:18.330Z","node_id":"n"}]"#;
    assert!(serde_json::from_str::<Transcript>(bad).is_err());
    let unknown = r#"[{"transcript":"x","speaker":"bot","createdAt":"t"}]"#;
    assert!(serde_json::from_str::<Transcript>(unknown).is_err());
}

#[test]
fn built_turns_serialize_in_the_wire_shape() {
    let mut t = Transcript::default();
    t.push(Turn::user("hello", "2025-11-03T19:33:18.330Z"));
    t.push(Turn::ai(
        "hi",
        "2025-11-03T19:33:18.900Z",
        Some(3),
        Some("node_x".into()),
    ));
    assert_eq!(
        t.to_value(),
        json!([
            {"transcript": "hello", "speaker": "user", "createdAt": "2025-11-03T19:33:18.330Z"},
            {"transcript": "hi", "speaker": "ai", "createdAt": "2025-11-03T19:33:18.900Z", "step": 3, "node_id": "node_x"}
        ])
    );
}

#[test]
fn nested_set_and_get() {
    let mut s = ConversationState::new();
    s.set(&p("customer.name"), json!("Ada")).unwrap();
    s.set(&p("customer.tier"), json!("gold")).unwrap();
    s.set(&p("slots"), json!(["9:00", "10:00"])).unwrap();
    assert_eq!(s.get(&p("customer.name")), Some(&json!("Ada")));
    assert_eq!(s.get(&p("slots.1")), Some(&json!("10:00")));
    assert_eq!(s.get(&p("customer.missing")), None);
    assert_eq!(
        s.to_value(),
        json!({"customer": {"name": "Ada", "tier": "gold"}, "slots": ["9:00", "10:00"]})
    );
    s.set(&p("customer"), json!("replaced")).unwrap();
    assert_eq!(s.get(&p("customer")), Some(&json!("replaced")));
}

#[test]
fn writing_through_a_non_object_is_refused_and_changes_nothing() {
    let mut s = ConversationState::new();
    s.set(&p("customer"), json!("Ada")).unwrap();
    let before = s.clone();
    let e = s.set(&p("customer.name"), json!("x")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "state write to \"customer.name\" refused: \"customer\" holds a string, not an object"
    );
    assert_eq!(s, before);
}

#[test]
fn size_cap_refuses_writes_beyond_it() {
    assert_eq!(ConversationState::new().cap_bytes(), 256 * 1024);
    let mut s = ConversationState::with_cap(100);
    s.set(&p("a"), json!("x".repeat(50))).unwrap();
    let before = s.clone();
    let e = s.set(&p("b"), json!("y".repeat(50))).unwrap_err();
    assert!(matches!(e, StateError::TooLarge { cap: 100, .. }), "{e}");
    assert_eq!(s, before, "a refused write changes nothing");
    // Replacing a value with a smaller one frees room.
    s.set(&p("a"), json!("x")).unwrap();
    s.set(&p("b"), json!("y".repeat(50))).unwrap();
    assert_eq!(
        s.used_bytes(),
        serde_json::to_vec(&s.to_value()).unwrap().len()
    );
}

#[test]
fn default_cap_holds_256_kib() {
    let mut s = ConversationState::new();
    let big = "z".repeat(250 * 1024);
    s.set(&p("notes"), json!(big)).unwrap();
    assert!(s.set(&p("more"), json!("z".repeat(10 * 1024))).is_err());
}

#[test]
fn initial_state_must_be_an_object_within_the_cap() {
    assert!(ConversationState::from_value(json!([1])).is_err());
    let s = ConversationState::from_value(json!({"a": {"b": 1}})).unwrap();
    assert_eq!(s.used_bytes(), r#"{"a":{"b":1}}"#.len());
}

#[test]
fn state_paths_are_validated() {
    assert!(StatePath::parse("").is_err());
    assert!(StatePath::parse("a..b").is_err());
    assert!(StatePath::parse("a.b c").is_err());
    assert!(StatePath::parse("customer.lookup_failed").is_ok());
    assert!(p("a").overlaps(&p("a.b")));
    assert!(!p("a").overlaps(&p("ab")));
}

#[test]
fn call_info_round_trips() {
    let text = r#"{"id":"c1","agent_id":"a","tenant":"t","from_number":"+1","to_number":"+2","is_outgoing":true,"started_at":"2025-11-03T19:33:18.330Z"}"#;
    let c: CallInfo = serde_json::from_str(text).unwrap();
    assert_eq!(serde_json::to_string(&c).unwrap(), text);
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(Value::from),
        "[a-z\"\\\\\u{1}é]{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-c\"]{1,2}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// The tracked size always equals the real serialized size, whatever the writes.
    #[test]
    fn tracked_size_equals_serialized_size(
        writes in prop::collection::vec(("[a-c]{1,2}(\\.[a-c]{1,2}){0,2}", arb_value()), 1..20)
    ) {
        let mut s = ConversationState::new();
        for (path, v) in writes {
            let _ = s.set(&p(&path), v);
            prop_assert_eq!(s.used_bytes(), serde_json::to_vec(&s.to_value()).unwrap().len());
        }
    }
}
