//! The JSONPath Compliance Test Suite (RFC 9535), all 703 cases.

use serde_json::Value;

use midcall::Query;

#[test]
fn jsonpath_compliance_suite_passes_in_full() {
    let path = crate::support::root().join("tests/data/jsonpath-cts.json");
    let suite: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tests = suite["tests"].as_array().unwrap();
    assert_eq!(tests.len(), 703, "the suite has 703 cases");
    let mut failures = Vec::new();
    let mut passed = 0;
    for t in tests {
        let name = t["name"].as_str().unwrap();
        let selector = t["selector"].as_str().unwrap();
        let compiled = Query::compile(selector);
        if t["invalid_selector"].as_bool() == Some(true) {
            match compiled {
                Err(e) => {
                    assert!(e.position >= 1, "{name}: position is 1-based");
                    passed += 1;
                }
                Ok(_) => failures.push(format!("{name}: {selector:?} should be rejected")),
            }
            continue;
        }
        let q = match compiled {
            Ok(q) => q,
            Err(e) => {
                failures.push(format!("{name}: {selector:?} rejected: {e}"));
                continue;
            }
        };
        let doc = &t["document"];
        let got = Value::Array(q.select(doc).into_iter().cloned().collect());
        let got_paths: Vec<Value> = q.select_paths(doc).into_iter().map(Value::String).collect();
        let ok = if let Some(expected) = t.get("result") {
            got == *expected && Value::Array(got_paths.clone()) == t["result_paths"]
        } else {
            let results = t["results"].as_array().unwrap();
            let paths = t["results_paths"].as_array().unwrap();
            results
                .iter()
                .zip(paths)
                .any(|(r, p)| got == *r && Value::Array(got_paths.clone()) == *p)
        };
        if ok {
            passed += 1;
        } else {
            failures.push(format!("{name}: {selector:?} gave {got} at {got_paths:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(passed, 703);
}
