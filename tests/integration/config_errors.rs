//! Malformed configs: each error names the file, line:column, the item and the field.

use midcall::{ActionSet, Syntax};

use crate::support::{load_toml, AGENT};

/// A valid action to put before or after a broken one.
const GOOD: &str = "[[actions]]\nname = \"lookup\"\ndescription = \"Look up\"\nurl = \"https://crm.example.com/c?p={{call.from_number}}\"\n";

/// Loads `AGENT + body`, expects failure, and returns all error lines.
fn errors(body: &str) -> Vec<String> {
    let text = format!("{AGENT}{body}");
    match load_toml(&text) {
        Ok(_) => panic!("config should not load:\n{text}"),
        Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
    }
}

/// Asserts one of the errors starts with `test.toml:<loc>: ` and contains `fragment`.
fn expect(body: &str, loc: &str, fragment: &str) {
    let errs = errors(body);
    let prefix = format!("test.toml:{loc}: ");
    assert!(
        errs.iter()
            .any(|e| e.starts_with(&prefix) && e.contains(fragment)),
        "expected an error at {loc} containing {fragment:?}, got:\n{}",
        errs.join("\n")
    );
}

fn action(lines: &str) -> String {
    format!("[[actions]]\nname = \"book_appointment\"\ndescription = \"Book\"\n{lines}")
}

#[test]
fn unknown_template_root_names_file_line_column_action_and_field() {
    // Line 7: the url of the action that starts on line 4.
    let errs = errors(&action(
        "method = \"POST\"\nurl = \"https://s.example.com/{{arg.slot}}\"\n",
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(
            "test.toml:8:7: action \"book_appointment\": url: unknown template root \"arg\" (expected call, state, args, secrets, transcript)"
        ),
        "{}",
        errs[0]
    );
}

#[test]
fn duplicate_action_names() {
    expect(
        &format!("{GOOD}{GOOD}"),
        "9:8",
        "duplicate action name \"lookup\" (first defined as action 1)",
    );
}

#[test]
fn unknown_field_in_an_action() {
    expect(
        &format!("{GOOD}urll = \"x\"\n"),
        "8:1",
        "action \"lookup\": unknown field `urll`; did you mean `url`?",
    );
}

#[test]
fn unknown_top_level_section() {
    expect(
        "[egres]\nallow_http = true\n",
        "4:2",
        "unknown field `egres`",
    );
}

#[test]
fn bad_method() {
    expect(
        &action("method = \"FETCH\"\nurl = \"https://s.example.com/\"\n"),
        "7:10",
        "method: bad method \"FETCH\" (expected GET, HEAD, POST, PUT, PATCH or DELETE)",
    );
}

#[test]
fn timeout_out_of_range_both_ends() {
    expect(
        &action("url = \"https://s.example.com/\"\ntimeout_ms = 0\n"),
        "8:14",
        "timeout_ms: 0 is out of range (1 to 30000 ms)",
    );
    expect(
        &action("url = \"https://s.example.com/\"\ntimeout_ms = 30001\n"),
        "8:14",
        "timeout_ms: 30001 is out of range",
    );
}

#[test]
fn malformed_template_unclosed() {
    expect(
        &action("url = \"https://s.example.com/{{args.slot\"\n"),
        "7:7",
        "url: unclosed \"{{\" at character 23",
    );
}

#[test]
fn malformed_template_unknown_filter_in_a_header() {
    expect(
        &action(
            "url = \"https://s.example.com/\"\nheaders = { X-Slot = \"{{args.slot | upper}}\" }\n",
        ),
        "8:22",
        "headers.X-Slot: unknown filter \"upper\"",
    );
}

#[test]
fn unknown_template_root_in_a_body_names_the_body_field() {
    expect(
        &action("method = \"POST\"\nurl = \"https://s.example.com/\"\nbody = { slot = \"{{argz.slot}}\" }\n"),
        "9:17",
        "body.slot: unknown template root \"argz\"",
    );
}

#[test]
fn invalid_jsonpath_with_character_position() {
    expect(
        &action(
            "url = \"https://s.example.com/\"\nextract = { \"slot.id\" = \"$.data[?@.x ==]\" }\n",
        ),
        "8:25",
        "extract.\"slot.id\": invalid JSONPath \"$.data[?@.x ==]\" at character",
    );
}

#[test]
fn invalid_json_schema_in_parameters() {
    expect(
        &action("url = \"https://s.example.com/\"\nparameters = { type = \"object\", properties = { slot = { type = \"strng\" } } }\n"),
        "8:14",
        "parameters: invalid JSON Schema at properties.slot.type",
    );
}

#[test]
fn parameters_must_describe_an_object() {
    expect(
        &action("url = \"https://s.example.com/\"\nparameters = { type = \"string\" }\n"),
        "8:14",
        "parameters: the top-level schema must have type = \"object\"",
    );
}

#[test]
fn two_extractions_writing_the_same_state_path() {
    expect(
        &action("url = \"https://s.example.com/\"\nextract = { \"customer\" = \"$.c\", \"customer.name\" = \"$.c.name\" }\n"),
        "8:51",
        "two extractions write the same state path (\"customer\" and \"customer.name\")",
    );
}

#[test]
fn duplicate_extract_keys_in_json_are_refused() {
    let json = r#"{"agent": {"id": "a", "tenant": "t"}, "actions": [{"name": "x", "description": "d",
        "url": "https://e.example.com/", "extract": {"a": "$.a", "a": "$.b"}}]}"#;
    let err = ActionSet::from_str("agent.json", json, Syntax::Json).unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("agent.json:2:"), "{msg}");
    assert!(msg.contains("duplicate key \"a\""), "{msg}");
}

#[test]
fn unknown_webhook_subscription_type() {
    expect(
        "[[webhooks]]\nlabel = \"warehouse\"\nurl = \"https://hooks.example.com/x\"\nsubscriptions = [\"transcript\", \"call_ended\"]\n",
        "7:32",
        "webhook \"warehouse\": subscriptions[1]: unknown event type \"call_ended\" (expected message, action",
    );
}

#[test]
fn automation_step_naming_an_unknown_action() {
    expect(
        &format!("{GOOD}[[automations]]\nid = \"cb\"\ntrigger = {{ on = \"webhook\" }}\nsteps = [ {{ run_action = {{ action = \"book\" }} }} ]\n"),
        "11:37",
        "automation \"cb\": steps[0].run_action.action: unknown action \"book\"",
    );
}

#[test]
fn call_completed_trigger_needs_agents() {
    expect(
        "[[automations]]\nid = \"sync\"\ntrigger = { on = \"call_completed\" }\nsteps = [ { send_webhook = { url = \"https://x.example.com/\" } } ]\n",
        "6:11",
        "automation \"sync\": trigger.agents: call_completed needs agents",
    );
}

#[test]
fn webhook_automation_cannot_read_call_state() {
    expect(
        "[[automations]]\nid = \"cb\"\ntrigger = { on = \"webhook\" }\nsteps = [ { send_webhook = { url = \"https://x.example.com/\", body = { id = \"{{call.id}}\" } } } ]\n",
        "7:76",
        "automation \"cb\": steps[0].send_webhook.body.id: unknown template root \"call\" (expected state, payload)",
    );
}

#[test]
fn webhook_automation_needs_credentials_here_or_in_inbound() {
    let body = "[[automations]]\nid = \"cb\"\ntrigger = { on = \"webhook\" }\nsteps = [ { send_webhook = { url = \"https://x.example.com/\" } } ]\n";
    expect(
        body,
        "4:1",
        "automation \"cb\": auth: a webhook automation needs credentials",
    );
    // Global credentials in [inbound] are enough.
    let text = format!("{AGENT}{body}[inbound]\nauth = {{ bearer = \"{{{{secrets.KEY}}}}\" }}\n");
    assert!(load_toml(&text).is_ok());
}

#[test]
fn automation_body_may_not_hold_secrets() {
    expect(
        "[[automations]]\nid = \"sync\"\ntrigger = { on = \"call_completed\", agents = \"all\" }\nsteps = [ { send_webhook = { url = \"https://x.example.com/\", body = { key = \"{{secrets.K}}\" } } } ]\n",
        "7:69",
        "automation \"sync\": steps[0].send_webhook.body: secrets cannot go in an automation's body or args",
    );
}

#[test]
fn inbound_limits_are_checked() {
    expect(
        "[inbound]\nmax_body_bytes = 1\n",
        "5:18",
        "inbound: max_body_bytes: 1 is out of range",
    );
    expect(
        "[inbound]\nrate_limit = { per_second = 0.0, burst = 5 }\n",
        "5:29",
        "inbound: rate_limit.per_second: 0 is out of range",
    );
    expect(
        "[inbound]\nauth = { bearer = \"literal-key\" }\n",
        "5:19",
        "inbound: auth.bearer: expected {{secrets.NAME}}",
    );
}

#[test]
fn host_must_be_literal() {
    expect(
        &action("url = \"https://{{args.host}}/x\"\n"),
        "7:7",
        "url: the host must be literal text",
    );
}

#[test]
fn credentials_in_url_refused() {
    expect(
        &action("url = \"https://user:pw@s.example.com/x\"\n"),
        "7:7",
        "url: credentials in the URL are refused",
    );
}

#[test]
fn get_with_body_refused() {
    expect(
        &action("url = \"https://s.example.com/\"\nbody = { a = 1 }\n"),
        "8:8",
        "body: a GET request carries no body",
    );
}

#[test]
fn caching_a_post_needs_idempotent() {
    expect(
        &action("method = \"POST\"\nurl = \"https://s.example.com/\"\ncache = { ttl_s = 30 }\n"),
        "9:9",
        "cache: POST responses are cached only when the action sets idempotent = true",
    );
}

#[test]
fn cache_scope_unknown() {
    expect(
        &action("url = \"https://s.example.com/\"\ncache = { ttl_s = 30, scope = \"planet\" }\n"),
        "8:31",
        "cache.scope: unknown scope \"planet\"",
    );
}

#[test]
fn filler_after_timeout_never_plays() {
    expect(
        &action("url = \"https://s.example.com/\"\ntimeout_ms = 500\nfiller = { after_ms = 800, say = \"hm\" }\n"),
        "9:23",
        "filler.after_ms: 800 must be at least 1 and below timeout_ms (500)",
    );
}

#[test]
fn prefetch_with_required_arguments() {
    expect(
        &action("url = \"https://s.example.com/{{args.slot}}\"\nprefetch = \"call_start\"\n"),
        "8:12",
        "prefetch: a prefetched action runs before the model gives arguments, but it uses {{args.slot}}",
    );
}

#[test]
fn header_injection_in_literal_header_refused() {
    expect(
        &action("url = \"https://s.example.com/\"\nheaders = { X-A = \"a\\r\\nX-B: b\" }\n"),
        "8:19",
        "headers.X-A: rendered value contains a carriage return",
    );
}

#[test]
fn managed_header_refused() {
    expect(
        &action("url = \"https://s.example.com/\"\nheaders = { Host = \"evil.example.com\" }\n"),
        "8:20",
        "headers.Host: \"Host\" is set by midcall",
    );
}

#[test]
fn bad_cidr_in_egress() {
    expect(
        "[egress]\nallow_networks = [\"10.0.0.0/33\"]\n",
        "5:19",
        "egress: allow_networks[0]: \"10.0.0.0/33\" is not a CIDR",
    );
}

#[test]
fn toml_syntax_error_has_a_location() {
    expect("[[actions]\nname = 1\n", "4:10", "");
}

#[test]
fn wrong_type_names_the_action() {
    expect(
        &format!("{GOOD}timeout_ms = \"fast\"\n"),
        "8:14",
        "action \"lookup\": timeout_ms: expected a whole number, got string \"fast\"",
    );
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let errs = errors(&action(
        "method = \"FETCH\"\nurl = \"ftp://s.example.com/\"\ntimeout_ms = 99999\n",
    ));
    assert_eq!(errs.len(), 3, "{errs:#?}");
    // Sorted by position in the file.
    assert!(errs[0].contains("method"));
    assert!(errs[1].contains("url: the URL must start with http:// or https://"));
    assert!(errs[2].contains("timeout_ms"));
}

#[test]
fn json_config_errors_name_action_and_field() {
    let json = r#"{"agent": {"id": "a", "tenant": "t"},
      "actions": [{"name": "x", "description": "d", "url": "https://e.example.com/{{nope.v}}"}]}"#;
    let err = ActionSet::from_str("agent.json", json, Syntax::Json).unwrap_err();
    // Semantic errors in JSON files are placed too: line 2, the url's value.
    assert_eq!(
        err.errors[0].to_string(),
        "agent.json:2:60: action \"x\": url: unknown template root \"nope\" (expected call, state, args, secrets, transcript) (placeholder at character 23)"
    );
}

#[test]
fn duplicate_webhook_labels_are_refused() {
    let hook = "[[webhooks]]\nlabel = \"crm\"\nurl = \"https://hooks.example.com/x\"\nsubscriptions = [\"transcript\"]\n";
    expect(
        &format!("{hook}{hook}"),
        "9:9",
        "webhook \"crm\": label: duplicate webhook label \"crm\" (first used by webhook 1)",
    );
}

#[test]
fn a_config_over_four_mib_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.toml");
    std::fs::write(&path, format!("{AGENT}# {}\n", "x".repeat(4 * 1024 * 1024))).unwrap();
    let e = ActionSet::load(&path).unwrap_err().to_string();
    assert!(
        e.contains("over the 4194304-byte limit for a config file"),
        "{e}"
    );
}

#[test]
fn every_structural_and_semantic_problem_at_once_with_suggestions() {
    let text = "[agent]\nid = \"front-desk\"\ntenent = \"acme\"\n\
        [[actions]]\nname = \"a\"\ndescription = \"d\"\nurl = \"https://s.example.com/\"\ntimout_ms = 5\n\
        [[actions]]\nname = \"b\"\ndescription = \"d\"\nurl = \"ftp://s.example.com/\"\ntimeot_ms = \"fast\"\nmethod = \"FETCH\"\n";
    let errs: Vec<String> = load_toml(text)
        .unwrap_err()
        .errors
        .iter()
        .map(|e| e.to_string())
        .collect();
    let want = [
        "test.toml:3:1: [agent]: unknown field `tenent`; did you mean `tenant`?",
        "test.toml:8:1: action \"a\": unknown field `timout_ms`; did you mean `timeout_ms`?",
        "test.toml:13:1: action \"b\": unknown field `timeot_ms`; did you mean `timeout_ms`?",
    ];
    for w in want {
        assert!(
            errs.iter().any(|e| e == w),
            "missing {w:?} in:\n{}",
            errs.join("\n")
        );
    }
    // The missing tenant cannot be repaired, so the file stops there: no semantic pass over
    // a half-read file. Without it, the semantic problems come in the same report.
    let text = text.replace("tenent", "tenant");
    let errs = load_toml(&text).unwrap_err().to_string();
    for w in [
        "unknown field `timout_ms`; did you mean `timeout_ms`?",
        "unknown field `timeot_ms`; did you mean `timeout_ms`?",
        "action \"b\": url: the URL must start with http:// or https://",
        "action \"b\": method: bad method \"FETCH\"",
    ] {
        assert!(errs.contains(w), "missing {w:?} in:\n{errs}");
    }
}

#[test]
fn json_unknown_fields_name_the_action_and_the_place() {
    let json = "{\"agent\": {\"id\": \"a\", \"tenant\": \"t\"},\n \"actions\": [{\"name\": \"x\", \"description\": \"d\",\n  \"url\": \"https://e.example.com/\", \"timout_ms\": 5}]}";
    let err = ActionSet::from_str("agent.json", json, Syntax::Json).unwrap_err();
    assert_eq!(
        err.errors[0].to_string(),
        "agent.json:3:36: action \"x\": unknown field `timout_ms`; did you mean `timeout_ms`?"
    );
}

#[test]
fn a_far_off_unknown_field_lists_the_fields_instead() {
    let errs = errors(&format!("{GOOD}zzzzzz = 1\n"));
    assert!(
        errs.iter().any(|e| e
            .contains("unknown field `zzzzzz` (the fields here are: name, description, method")),
        "{errs:?}"
    );
}

#[test]
fn second_reading_fixes_hold() {
    // A field given twice in JSON is an error, not "the last one wins".
    let json = r#"{"agent":{"id":"a","tenant":"t"},"actions":[{"name":"x","description":"d","url":"https://a.example/","url":"https://b.example/"}]}"#;
    let e = ActionSet::from_str("agent.json", json, Syntax::Json)
        .unwrap_err()
        .to_string();
    assert!(e.contains("duplicate field"), "{e}");
    // TOML's inf and nan are not numbers midcall takes, and are not read as "not set".
    let errs = errors(&format!("{GOOD}timeout_ms = inf\n"));
    assert!(
        errs.iter()
            .any(|e| e.contains("timeout_ms: expected a whole number, got string \"inf\"")),
        "{errs:?}"
    );
    // A wrongly typed required field is one error, not two.
    let errs = errors("[[actions]]\nname = \"x\"\ndescription = \"d\"\nurl = 5\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("url: expected a string, got integer `5`"),
        "{errs:?}"
    );
    // A missing table does not hide what comes after it.
    let errs = errors(
        "[[automations]]\nid = \"a\"\ntriger = { on = \"webhook\" }\nsteps = []\n[[automations]]\nid = \"b\"\ntrigger = { on = \"webhook\" }\nstepz = []\n",
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("unknown field `triger`; did you mean `trigger`?")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("unknown field `stepz`; did you mean `steps`?")),
        "{errs:?}"
    );
    // JSON columns count characters, not bytes.
    let e = ActionSet::from_str("a.json", "{\"agent\": {\"id\": \"café\" x}}", Syntax::Json)
        .unwrap_err();
    assert_eq!(e.errors[0].location, Some((1, 25)), "{e}");
}
