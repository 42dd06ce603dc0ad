//! `midcall simulate` plays every call script in examples/ end to end, as a user runs it.

use std::process::{Command, Output};

use serde_json::Value;

use crate::support::root;

fn simulate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_midcall"))
        .arg("simulate")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

fn report(script: &str) -> Value {
    let out = simulate(&[script, "--json"]);
    assert!(
        out.status.success(),
        "{script}: exit {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The action entries of the timeline, in call order.
fn actions(r: &Value) -> Vec<&Value> {
    r["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("action"))
        .collect()
}

fn scripts() -> Vec<String> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(root().join("examples")).unwrap() {
        let dir = dir.unwrap().path();
        if dir.is_dir() {
            for f in std::fs::read_dir(&dir).unwrap() {
                let f = f.unwrap().path();
                let name = f.file_name().unwrap().to_string_lossy().to_string();
                if name.ends_with(".toml") && name != "agent.toml" {
                    out.push(f.strip_prefix(root()).unwrap().display().to_string());
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_example_script_plays_clean_with_verified_deliveries() {
    let all = scripts();
    assert!(all.len() >= 2, "{all:?}");
    for script in &all {
        let r = report(script);
        assert_eq!(r["problems"], serde_json::json!([]), "{script}");
        let s = &r["summary"];
        assert_eq!(s["expectations_failed"], 0, "{script}");
        assert!(s["expectations_passed"].as_u64().unwrap() > 0, "{script}");
        let deliveries = r["deliveries"].as_array().unwrap();
        assert!(!deliveries.is_empty(), "{script}: no webhook deliveries");
        for d in deliveries {
            assert_eq!(d["status"], "delivered", "{script}: {d}");
            assert_eq!(d["signature"], "verified", "{script}: {d}");
        }
        // Every tool turn of the script became an action in the timeline.
        let text = std::fs::read_to_string(root().join(script)).unwrap();
        let tools = text.lines().filter(|l| l.starts_with("tool = ")).count();
        let prefetches = actions(&r)
            .iter()
            .filter(|a| a["tool_call_id"].is_null())
            .count();
        assert_eq!(actions(&r).len(), tools + prefetches, "{script}");
        assert!(
            r["runs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|x| x["status"] == "succeeded"),
            "{script}"
        );
    }
}

#[test]
fn front_desk_call_shows_prefetch_filler_fallback_and_a_deduplicated_booking() {
    let r = report("examples/front-desk/call.toml");
    let a = actions(&r);
    let statuses: Vec<&str> = a.iter().map(|x| x["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        [
            "ok",
            "cache_hit",
            "ok",
            "http_error",
            "ok",
            "ok",
            "accepted"
        ],
        "prefetch, lookup (primed cache), slots, insurance, booking, re-issued booking, note"
    );
    assert_eq!(a[0]["action"], "lookup_customer");
    assert_eq!(a[0]["state_changes"]["customer.name"], "Dana Reyes");
    // The slow calendar: the filler played and the action still succeeded.
    assert_eq!(a[2]["filler"], "Let me check the calendar.");
    assert!(a[2]["latency_ms"].as_f64().unwrap() >= 500.0);
    assert_eq!(a[2]["state_changes"]["slots.count"], 3);
    // The insurance service is down: its fallback line and variable.
    assert_eq!(a[3]["http_status"], 503);
    assert!(a[3]["fallback"]
        .as_str()
        .unwrap()
        .starts_with("I can't reach the insurance system"));
    assert_eq!(a[3]["state_changes"]["insurance.verified"], false);
    // The booking once, then the re-issued call after the barge-in: deduplicated.
    assert_eq!(a[4]["state_changes"]["appointment.status"], "booked");
    assert_eq!(a[5]["deduplicated"], true);
    assert_eq!(a[5]["tool_call_id"], "call_9Xk4");
    let bookings = r["mock_requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["method"] == "POST" && h["path"] == "/appointments")
        .count();
    assert_eq!(bookings, 1, "the re-issued booking sent nothing");
    assert!(r["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "barge"));
    // The warehouse webhook and the crm-sync automation, all signed and verified.
    let events: Vec<&str> = r["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["event"].as_str().unwrap())
        .collect();
    for e in [
        "event_transcript",
        "event_phone_call_ended",
        "event_post_call_processing_completed",
        "automation:crm-sync",
    ] {
        assert!(events.contains(&e), "{e} missing from {events:?}");
    }
    assert_eq!(r["summary"]["fillers"], 1);
    assert_eq!(r["summary"]["fallbacks"], 1);
    assert_eq!(r["summary"]["deduplicated"], 1);
    assert_eq!(r["summary"]["cache_hits"], 1);
}

#[test]
fn outage_script_shows_rate_limit_retry_failures_breaker_and_webhook_retry() {
    let r = report("examples/outage-line/call.toml");
    let a = actions(&r);
    let statuses: Vec<&str> = a.iter().map(|x| x["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        [
            "ok",
            "ok",
            "transport_error",
            "transport_error",
            "circuit_open"
        ]
    );
    assert_eq!(a[1]["attempts"], 2, "the 429 was retried after Retry-After");
    assert_eq!(a[1]["state_changes"]["outage.crew_status"], "en_route");
    assert_eq!(a[2]["state_changes"]["ticket.manual_followup"], true);
    // The reset connection reads plainly: no library wrapper, no documentation URL.
    let why = a[2]["error"].as_str().unwrap();
    assert!(why.contains("peer closed connection"), "{why}");
    assert!(
        !why.contains("client error") && !why.contains("://"),
        "{why}"
    );
    assert!(a[4]["fallback"]
        .as_str()
        .unwrap()
        .starts_with("Our outage map"));
    // The breaker failed fast: the neighbour's ZIP never reached the mock.
    let to_97202 = r["mock_requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["path"] == "/v2/outages")
        .count();
    assert_eq!(to_97202, 2, "the 429 and its retry only");
    let first = &r["deliveries"].as_array().unwrap()[0];
    assert_eq!(first["event"], "event_phone_call_connected");
    assert_eq!(
        first["attempts"], 2,
        "the dispatch board failed once, the retry was delivered"
    );
}

#[test]
fn a_missed_expectation_exits_1_and_a_bad_script_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let agent = root().join("examples/front-desk/agent.toml");
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        format!(
            "agent = \"{}\"\n[[turns]]\ntool = \"check_slots\"\nargs = {{ date = \"2025-11-04\" }}\nexpect = {{ status = \"timed_out\" }}\n",
            agent.display()
        ),
    )
    .unwrap();
    let out = simulate(&[wrong.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("turn 1 (check_slots): status: expected timed_out, got ok"),
        "{text}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!("agent = \"{}\"\n[[turns]]\ntool = \"no_such_tool\"\n[[turns]]\nuser = \"hi\"\nai = \"both\"\n", agent.display()),
    )
    .unwrap();
    let out = simulate(&[bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("turn 1: agent \"front-desk\" has no action \"no_such_tool\""),
        "{err}"
    );
    assert!(
        err.contains("turn 2: give exactly one of user, ai, tool, pause_ms"),
        "{err}"
    );
}

#[test]
fn the_default_script_prints_a_timeline_and_a_summary() {
    let out = simulate(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "midcall simulate: examples/front-desk/call.toml",
        "(filler) Let me check the calendar.",
        "[deduplicated: nothing sent]",
        "[barge-in]",
        "action latency",
        "Webhook deliveries (4 delivered of 4, 4 signatures verified)",
        "All expectations met; every signed delivery verified.",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn a_kept_outbox_reports_only_this_simulation() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let db = db.to_str().unwrap();
    for round in 1..=2 {
        let out = simulate(&["examples/front-desk/call.toml", "--db", db, "--json"]);
        assert!(out.status.success(), "round {round}");
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            r["deliveries"].as_array().unwrap().len(),
            4,
            "round {round}"
        );
        assert_eq!(r["runs"].as_array().unwrap().len(), 1, "round {round}");
    }
    // Both simulations' deliveries are kept in the file.
    let out = Command::new(env!("CARGO_BIN_EXE_midcall"))
        .args(["deliveries", "--db", db, "--json"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 8);
}

#[test]
fn script_problems_are_said_plainly() {
    // An agent file where a script belongs.
    let out = simulate(&["examples/front-desk/agent.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("examples/front-desk/agent.toml is an agent file, not a call script"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    // A script whose agent path is wrong: the resolved path, and that it came from the script.
    let lost = dir.path().join("lost.toml");
    std::fs::write(&lost, "agent = \"agnt.toml\"\n[[turns]]\nuser = \"hi\"\n").unwrap();
    let out = simulate(&[lost.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let resolved = dir.path().join("agnt.toml");
    assert!(
        err.contains(&format!(
            "agent = \"agnt.toml\" (relative to the script) is {}, which does not exist",
            resolved.display()
        )),
        "{err}"
    );
    // Typos in a script: every one, placed, with a suggestion.
    let typo = dir.path().join("typo.toml");
    let agent = root().join("examples/front-desk/agent.toml");
    std::fs::write(
        &typo,
        format!(
            "agent = \"{}\"\n[[turns]]\nusr = \"hi\"\n[[turns]]\ntool = \"check_slots\"\nexpct = {{ status = \"ok\" }}\n",
            agent.display()
        ),
    )
    .unwrap();
    let out = simulate(&[typo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":3:1: turn 1: unknown field `usr`; did you mean `user`?"),
        "{err}"
    );
    assert!(
        err.contains(":6:1: turn 2: unknown field `expct`; did you mean `expect`?"),
        "{err}"
    );
}
