//! The fast extraction path (simd-json tape + selector walk) agrees with the full RFC 9535
//! engine: on the compliance suite, on random documents and queries, on duplicate keys, and at
//! the nesting limit.

use proptest::prelude::*;
use serde_json::{json, Value};

use midcall::jsonpath::{Conversion, ExtractRule, Extractor};
use midcall::{Query, StatePath};

fn agree(q: &Query, doc_text: &str, doc: &Value) -> Result<(), String> {
    let full: Vec<Value> = q.select(doc).into_iter().cloned().collect();
    match q.select_fast(doc_text.as_bytes()) {
        Some(fast) if fast != full => Err(format!(
            "{} on {doc_text}: fast {fast:?} full {full:?}",
            q.as_str()
        )),
        _ => Ok(()),
    }
}

#[test]
fn the_fast_path_agrees_on_every_compliance_case_it_accepts() {
    let path = crate::support::root().join("tests/data/jsonpath-cts.json");
    let suite: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut fast = 0;
    let mut failures = Vec::new();
    for t in suite["tests"].as_array().unwrap() {
        let Ok(q) = Query::compile(t["selector"].as_str().unwrap()) else {
            continue;
        };
        if !q.is_fast() {
            continue;
        }
        fast += 1;
        let doc_text = t["document"].to_string();
        let got = q
            .select_fast(doc_text.as_bytes())
            .expect("the fast path parses the document");
        let got = Value::Array(got);
        let ok = match t.get("result") {
            Some(r) => got == *r,
            None => t["results"].as_array().unwrap().contains(&got),
        };
        if !ok {
            failures.push(format!("{}: {} gave {got}", t["name"], t["selector"]));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        fast > 150,
        "the non-filter cases run on the fast path, got {fast}"
    );
}

#[test]
fn duplicate_keys_read_as_serde_json_reads_them() {
    let text = r#"{"a": 1, "b": {"a": 2}, "a": 3, "c": [{"a": 4, "a": 5}]}"#;
    let doc: Value = serde_json::from_str(text).unwrap();
    for q in [
        "$.a",
        "$.*",
        "$..a",
        "$..*",
        "$.c[0].a",
        "$.c[*].*",
        "$['a','a']",
    ] {
        agree(&Query::compile(q).unwrap(), text, &doc).unwrap();
    }
}

#[test]
fn nesting_at_the_limit_is_decided_as_serde_json_decides() {
    let rule = ExtractRule {
        target: StatePath::parse("x").unwrap(),
        query: Query::compile("$[0]").unwrap(),
        required: false,
        default: None,
        conversion: Conversion::Json,
        all: false,
    };
    let ex = Extractor::new(vec![rule]);
    for depth in 120..140 {
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let serde = serde_json::from_str::<Value>(&text).map(|d| ex.extract(&d).unwrap());
        let bytes = ex.extract_bytes(text.as_bytes()).map(|x| x.values);
        assert_eq!(serde.is_ok(), bytes.is_ok(), "depth {depth}");
        if let (Ok(a), Ok(b)) = (serde, &bytes) {
            assert_eq!(&a, b, "depth {depth}");
        } else {
            let e = bytes.unwrap_err().to_string();
            assert!(e.contains("recursion limit exceeded"), "{e}");
        }
    }
}

#[test]
fn numbers_and_strings_round_trip_like_serde_json() {
    let text = r#"[0, 1.5, -0.0, 1e10, 1E-7, 123456789012345678, -9223372036854775808, 18446744073709551615, 3.141592653589793, 5e-324, 1.7976931348623157e308, "\u00e9\ud83d\ude00", "a\"b\\c\n"]"#;
    let doc: Value = serde_json::from_str(text).unwrap();
    let q = Query::compile("$[*]").unwrap();
    assert!(
        q.select_fast(text.as_bytes()).is_some(),
        "this document is on the fast path"
    );
    agree(&q, text, &doc).unwrap();
    // Numbers simd-json cannot hold fall back to serde_json.
    for text in ["[18446744073709551616]", "[1e400]", "[-0]", "{\"a\": -0}"] {
        let q = Query::compile("$[0]").unwrap();
        assert!(q.select_fast(text.as_bytes()).is_none(), "{text}");
    }
}

fn arb_doc() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-c'\"\\\\é ]{0,4}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 80, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("[a-c'\"é]{1,2}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn arb_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-c]{1,2}".prop_map(|n| format!(".{n}")),
        "[a-c'é]{1,2}".prop_map(|n| format!("[\"{}\"]", n.replace('"', "\\\""))),
        "[a-c\"é]{1,2}".prop_map(|n| format!("['{}']", n.replace('\'', "\\'"))),
    ]
}

fn arb_int() -> impl Strategy<Value = String> {
    (-6i64..6).prop_map(|i| i.to_string())
}

fn arb_selector() -> impl Strategy<Value = String> {
    let opt = || prop::option::of(arb_int()).prop_map(|o| o.unwrap_or_default());
    prop_oneof![
        arb_int(),
        Just("*".to_string()),
        (opt(), opt()).prop_map(|(a, b)| format!("{a}:{b}")),
        (
            opt(),
            opt(),
            prop::option::of(prop_oneof![
                Just("0"),
                Just("1"),
                Just("2"),
                Just("-1"),
                Just("-2"),
                Just("3")
            ])
        )
            .prop_map(|(a, b, c)| format!("{a}:{b}:{}", c.unwrap_or(""))),
        "[a-c]{1,2}".prop_map(|n| format!("'{n}'")),
    ]
}

fn arb_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        arb_name(),
        Just(".*".to_string()),
        Just("..*".to_string()),
        "[a-c]{1,2}".prop_map(|n| format!("..{n}")),
        prop::collection::vec(arb_selector(), 1..3).prop_map(|s| format!("[{}]", s.join(", "))),
        prop::collection::vec(arb_selector(), 1..3).prop_map(|s| format!("..[{}]", s.join(","))),
    ]
}

/// Whether the fast path answered and agreed (`Ok(true)`), declined (`Ok(false)`), or
/// disagreed.
fn compared(q: &Query, doc_text: &str, doc: &Value) -> Result<bool, String> {
    agree(q, doc_text, doc)?;
    Ok(q.select_fast(doc_text.as_bytes()).is_some())
}

#[test]
fn the_fast_path_agrees_on_random_documents_and_queries() {
    use proptest::test_runner::{Config, TestRunner};
    let cases = 2000;
    let mut runner = TestRunner::new(Config::with_cases(cases));
    let compared_count = std::cell::Cell::new(0u32);
    let declined = std::cell::Cell::new(0u32);
    let strategy = (arb_doc(), prop::collection::vec(arb_segment(), 0..4));
    runner
        .run(&strategy, |(doc, segs)| {
            let q = format!("${}", segs.join(""));
            let Ok(query) = Query::compile(&q) else {
                return Ok(());
            };
            prop_assert!(query.is_fast(), "{q} should be on the fast path");
            let text = doc.to_string();
            match compared(&query, &text, &doc) {
                Ok(true) => compared_count.set(compared_count.get() + 1),
                Ok(false) => declined.set(declined.get() + 1),
                Err(e) => prop_assert!(false, "{}", e),
            }
            Ok(())
        })
        .unwrap();
    // The fast path may decline a document; a test that only ever saw it decline would prove
    // nothing. Most generated cases must really have been compared.
    let (c, d) = (compared_count.get(), declined.get());
    assert!(
        c >= cases * 3 / 4,
        "only {c} of {cases} cases compared ({d} declined)"
    );
}

#[test]
fn filters_use_the_full_engine() {
    let q = Query::compile("$.items[?@.price > 10].name").unwrap();
    assert!(!q.is_fast());
    let rule = ExtractRule {
        target: StatePath::parse("names").unwrap(),
        query: q,
        required: false,
        default: None,
        conversion: Conversion::Json,
        all: true,
    };
    let out = Extractor::new(vec![rule])
        .extract_bytes(br#"{"items": [{"price": 5, "name": "a"}, {"price": 15, "name": "b"}]}"#)
        .unwrap();
    assert_eq!(out.values[0].1, json!(["b"]));
}
