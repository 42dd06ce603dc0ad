//! The `midcall` binary as a user runs it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

use crate::support::root;

fn midcall(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_midcall"))
        .args(args)
        .current_dir(root())
        .env_remove("MIDCALL_SECRET_CRM_TOKEN")
        .env_remove("MIDCALL_SECRET_SCHEDULING_TOKEN")
        .output()
        .unwrap()
}

/// Writes `text` to a file called `name` in a new temporary directory (kept alive by the
/// returned handle).
fn temp_file(name: &str, text: impl AsRef<[u8]>) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_accepts_the_examples_with_one_line_per_action() {
    let o = midcall(&[
        "check",
        "examples/front-desk/agent.toml",
        "examples/outage-line/agent.toml",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("examples/front-desk/agent.toml: ok, agent \"front-desk\""),
        "{out}"
    );
    for name in [
        "lookup_customer",
        "check_slots",
        "book_appointment",
        "find_account",
        "report_outage",
    ] {
        assert_eq!(
            out.lines()
                .filter(|l| l.trim_start().starts_with(name))
                .count(),
            1,
            "{name} in {out}"
        );
    }
}

#[test]
fn check_exits_2_with_located_errors() {
    let (_dir, bad) = temp_file("front-desk.toml", "[agent]\nid = \"a\"\ntenant = \"t\"\n[[actions]]\nname = \"x\"\ndescription = \"d\"\nurl = \"https://e.example.com/{{arg.v}}\"\n");
    let o = midcall(&["check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o)
            .contains("front-desk.toml:7:7: action \"x\": url: unknown template root \"arg\""),
        "{}",
        stderr(&o)
    );
    let o = midcall(&["check", "--json", bad.to_str().unwrap()]);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["ok"], false);
}

#[test]
fn tools_prints_json_in_both_formats() {
    let o = midcall(&["tools", "examples/front-desk/agent.toml"]);
    assert_eq!(o.status.code(), Some(0));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["function"]["name"], "lookup_customer");
    let o = midcall(&[
        "tools",
        "examples/front-desk/agent.toml",
        "--format",
        "anthropic",
    ]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[2]["input_schema"]["required"], json!(["slot"]));
}

#[test]
fn jsonpath_reads_stdin_and_prints_nodes_or_paths() {
    let run = |args: &[&str], input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_midcall"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // midcall may exit before reading (a bad query), closing the pipe.
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
        child.wait_with_output().unwrap()
    };
    let doc = r#"{"slots": [{"start": "9:00", "available": true}, {"start": "10:00", "available": false}]}"#;
    let o = run(&["jsonpath", "$.slots[?@.available == true].start"], doc);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap(),
        json!(["9:00"])
    );
    let o = run(&["jsonpath", "--paths", "$..start"], doc);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap(),
        json!(["$['slots'][0]['start']", "$['slots'][1]['start']"])
    );
    let o = run(&["jsonpath", "$.slots[?@.x ==]"], doc);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("invalid JSONPath at character"),
        "{}",
        stderr(&o)
    );
    let o = run(&["jsonpath", "$.a"], "{not json");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("stdin: not valid JSON"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn render_prints_the_exact_request_with_secrets_hidden() {
    let secret = "sk_test_RENDER_4242";
    let o = Command::new(env!("CARGO_BIN_EXE_midcall"))
        .args([
            "render",
            "examples/front-desk/agent.toml",
            "--action",
            "book_appointment",
            "--args",
            r#"{"slot": "2025-11-04T15:00", "reason": "a \"quoted\" reason"}"#,
            "--state",
            r#"{"customer": {"id": "cus_9"}}"#,
            "--call",
            r#"{"id": "call_777"}"#,
        ])
        .current_dir(root())
        .env("MIDCALL_SECRET_SCHEDULING_TOKEN", secret)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("POST https://scheduling.example.com/appointments\n"),
        "{out}"
    );
    assert!(out.contains("authorization: Bearer ***\n"), "{out}");
    assert!(out.contains("content-type: application/json\n"));
    assert!(!out.contains(secret));
    let body = out.split("\n\n").nth(1).unwrap().trim();
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap(),
        json!({"phone": "+15551234567", "customer_id": "cus_9", "slot": "2025-11-04T15:00",
               "reason": "a \"quoted\" reason", "call_id": "call_777"})
    );
}

#[test]
fn render_exits_2_with_a_clear_message() {
    let o = midcall(&[
        "render",
        "examples/front-desk/agent.toml",
        "--action",
        "lookup_customer",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("secret \"CRM_TOKEN\" is not set (set the environment variable MIDCALL_SECRET_CRM_TOKEN)"), "{}", stderr(&o));
    let o = midcall(&[
        "render",
        "examples/front-desk/agent.toml",
        "--action",
        "book_appointment",
        "--fake-secrets",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains(
            "invalid arguments for book_appointment: arguments: \"slot\" is a required property"
        ),
        "{}",
        stderr(&o)
    );
    let o = midcall(&[
        "render",
        "examples/front-desk/agent.toml",
        "--action",
        "nope",
    ]);
    assert!(stderr(&o).contains("no action \"nope\""), "{}", stderr(&o));
    let o = midcall(&[
        "render",
        "examples/front-desk/agent.toml",
        "--action",
        "check_slots",
        "--fake-secrets",
        "--args",
        "{bad",
    ]);
    assert!(
        stderr(&o).contains("--args: not valid JSON"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn render_refuses_a_line_break_from_the_model_in_a_header() {
    let (_dir, f) = temp_file("a.toml", "[agent]\nid = \"a\"\ntenant = \"t\"\n[[actions]]\nname = \"x\"\ndescription = \"d\"\nurl = \"https://e.example.com/\"\nheaders = { X-Note = \"{{args.note}}\" }\n");
    let o = midcall(&[
        "render",
        f.to_str().unwrap(),
        "--action",
        "x",
        "--args",
        r#"{"note": "hi\r\nX-Admin: 1"}"#,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("header \"x-note\": rendered value contains a carriage return (CR)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn every_command_has_help_with_an_example() {
    for cmd in [
        "check",
        "tools",
        "jsonpath",
        "render",
        "exec",
        "bench",
        "deliveries",
    ] {
        let o = midcall(&[cmd, "--help"]);
        assert_eq!(o.status.code(), Some(0));
        assert!(
            stdout(&o).contains("Example"),
            "{cmd} --help has an example"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_an_action_against_a_local_server() {
    use crate::support::servers::{Reply, TestServer};
    let server =
        TestServer::http(|_, _| Reply::ok(json!({"data": {"customer": {"name": "Ada"}}}))).await;
    let (_dir, f) = temp_file("agent.toml", format!(
            "[agent]\nid = \"a\"\ntenant = \"t\"\n[[actions]]\nname = \"lookup\"\ndescription = \"d\"\nurl = \"{}/c?p={{{{call.from_number}}}}\"\nheaders = {{ Authorization = \"Bearer {{{{secrets.EXEC_TOKEN}}}}\" }}\nextract = {{ \"customer.name\" = \"$.data.customer.name\" }}\n",
            server.origin()
        ));
    let path = f.to_str().unwrap().to_string();
    let run = move |extra: Vec<&'static str>| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut args = vec!["exec", path.as_str(), "--action", "lookup"];
            args.extend(extra);
            Command::new(env!("CARGO_BIN_EXE_midcall"))
                .args(&args)
                .env("MIDCALL_SECRET_EXEC_TOKEN", "sk_exec_cli_77")
                .output()
                .unwrap()
        })
    };
    // Refused by the default egress policy: still an outcome, exit 0.
    let o = run(vec!["--json"]).await.unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["status"], "rejected");
    assert_eq!(server.accepted(), 0);
    // Times are rounded to the microsecond: 5.457, not 5.4564699999999995.
    let ms = v["elapsed_ms"].to_string();
    assert!(ms.split('.').nth(1).is_none_or(|f| f.len() <= 3), "{ms}");

    let o = run(vec![
        "--allow-http",
        "--allow-network",
        "127.0.0.0/8",
        "--repeat",
        "3",
        "--json",
    ])
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        !out.contains("sk_exec_cli_77"),
        "no secret in --json output"
    );
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for l in &lines {
        for k in [
            "status",
            "http_status",
            "attempts",
            "elapsed_ms",
            "values",
            "llm_result",
            "say",
            "error",
            "state",
        ] {
            assert!(l.get(k).is_some(), "{k} in {l}");
        }
        assert_eq!(l["status"], "ok");
        assert_eq!(l["state"], json!({"customer": {"name": "Ada"}}));
    }
    assert_eq!(
        server.accepted(),
        1,
        "one pooled connection for the three runs"
    );

    let o = run(vec!["--allow-http", "--allow-network", "127.0.0.0/8"])
        .await
        .unwrap();
    let out = stdout(&o);
    assert!(
        out.contains("ok") && out.contains("state.customer.name = \"Ada\""),
        "{out}"
    );

    let o = run(vec!["--allow-network", "not-a-cidr"]).await.unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--allow-network: \"not-a-cidr\" is not a CIDR"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_repeat_on_a_cacheable_action_shows_a_miss_then_hits() {
    use crate::support::servers::{Reply, TestServer};
    let server = TestServer::http(|_, _| Reply::ok(json!({"slots": ["9:00"]}))).await;
    let (_dir, f) = temp_file("agent.toml", format!(
            "[agent]\nid = \"a\"\ntenant = \"t\"\n[[actions]]\nname = \"check_slots\"\ndescription = \"d\"\nurl = \"{}/slots?date={{{{args.date}}}}\"\ncache = {{ ttl_s = 30, scope = \"tenant\" }}\nextract = {{ slots = \"$.slots\" }}\n",
            server.origin()
        ));
    let path = f.to_str().unwrap().to_string();
    let o = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_midcall"))
            .args([
                "exec",
                &path,
                "--action",
                "check_slots",
                "--args",
                r#"{"date": "2025-11-04"}"#,
            ])
            .args([
                "--allow-http",
                "--allow-network",
                "127.0.0.0/8",
                "--repeat",
                "3",
                "--json",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["status"].as_str().unwrap(), l["cache"].as_str().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [("ok", "miss"), ("cache_hit", "hit"), ("cache_hit", "hit")]
    );
    assert!(lines.iter().all(|l| l["deduplicated"] == false));
    assert_eq!(server.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_a_users_own_action() {
    use crate::support::servers::{Reply, TestServer};
    let server = TestServer::http(|_, _| Reply::ok(json!({"v": 1}))).await;
    let (dir, f) = temp_file("agent.toml", format!(
            "[agent]\nid = \"a\"\ntenant = \"t\"\n[[actions]]\nname = \"lookup\"\ndescription = \"d\"\nurl = \"{}/x\"\nextract = {{ v = \"$.v\" }}\n",
            server.origin()
        ));
    let out = dir.path().join("bench.json");
    let (fs, os) = (
        f.to_str().unwrap().to_string(),
        out.to_str().unwrap().to_string(),
    );
    let o = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_midcall"))
            .args([
                "bench",
                "--actions",
                &fs,
                "--action",
                "lookup",
                "--concurrency",
                "4",
                "--requests",
                "50",
            ])
            .args([
                "--allow-http",
                "--allow-network",
                "127.0.0.0/8",
                "--json",
                &os,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("lookup"), "{}", stdout(&o));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let s = &v["scenarios"][0];
    assert_eq!(
        (
            s["name"].as_str(),
            s["concurrency"].as_u64(),
            s["requests"].as_u64()
        ),
        (Some("lookup"), Some(4), Some(50))
    );
    for k in ["p50_us", "p90_us", "p99_us", "p999_us", "rps"] {
        assert!(s[k].as_f64().unwrap() > 0.0, "{k}");
    }
    assert_eq!(
        v["outcomes"]["ok/bypass"], 50,
        "every request was a real, distinct tool call"
    );
    assert_eq!(server.request_count(), 50);
}

#[test]
fn render_shows_every_header_midcall_sends() {
    let o = midcall(&[
        "render",
        "examples/front-desk/agent.toml",
        "--action",
        "book_appointment",
        "--args",
        r#"{"slot": "2025-11-04T15:00"}"#,
        "--fake-secrets",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for h in [
        "host: scheduling.example.com\n",
        "content-type: application/json\n",
        "user-agent: midcall/",
        "accept: application/json\n",
        "content-length: ",
        "idempotency-key: ",
    ] {
        assert!(text.contains(h), "{h:?} missing:\n{text}");
    }
    assert!(!text.contains("fake-"), "secrets are redacted:\n{text}");
}

#[test]
fn bad_flags_and_inputs_are_refused_with_exit_2_and_one_error_prefix() {
    // An id that is not in the outbox.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let made = midcall(&["deliveries", "--db", db.to_str().unwrap()]);
    assert!(!made.status.success(), "the logs never create a database");
    // A real (empty) outbox, made by the library.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = midcall::EventBus::builder(&db)
            .deliver(false)
            .build()
            .unwrap();
        b.close().await;
    });
    let o = midcall(&[
        "deliveries",
        "replay",
        "--db",
        db.to_str().unwrap(),
        "--id",
        "999",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("error: ") && stderr(&o).contains("no delivery 999"),
        "{}",
        stderr(&o)
    );
    // Not a SQLite file: named.
    let o = midcall(&["deliveries", "--db", "README.md"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("README.md is not an outbox database"),
        "{}",
        stderr(&o)
    );
    // bench: --action needs --actions; --concurrency 0 is refused, not changed.
    let o = midcall(&["bench", "--action", "lookup_customer"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--actions"), "{}", stderr(&o));
    let o = midcall(&[
        "bench",
        "--actions",
        "examples/front-desk/agent.toml",
        "--action",
        "lookup_customer",
        "--concurrency",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("0 is not in 1..=4096"),
        "{}",
        stderr(&o)
    );
    // check: every problem line has the prefix.
    let (_d, bad) = temp_file(
        "bad.toml",
        "[agent]\nid = \"a\"\ntenant = \"t\"\ntypo = 1\n[egres]\n",
    );
    let o = midcall(&["check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 2, "{err}");
    assert!(err.lines().all(|l| l.starts_with("error: ")), "{err}");
}

#[test]
fn a_bad_jsonpath_says_what_was_expected() {
    let run = |q: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_midcall"))
            .args(["jsonpath", q])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"{\"a\": 1}")
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        stderr(&o)
    };
    let e = run("$.a[");
    assert!(!e.contains("parser error"), "{e}");
    assert!(e.contains("expected a selector after '['"), "{e}");
    let e = run("$.a]");
    assert!(e.contains("unexpected ']'"), "{e}");
}

#[test]
fn exec_refused_for_a_loopback_url_hints_at_the_flags() {
    let (_d, file) = temp_file(
        "lo.toml",
        "[agent]\nid = \"a\"\ntenant = \"t\"\n[[actions]]\nname = \"x\"\ndescription = \"d\"\nurl = \"http://127.0.0.1:9/x\"\n",
    );
    let o = midcall(&["exec", file.to_str().unwrap(), "--action", "x"]);
    let out = stdout(&o);
    assert!(
        out.contains(
            "hint: to reach a local test server, pass --allow-http --allow-network 127.0.0.0/8"
        ),
        "{out}"
    );
}

#[test]
fn the_top_level_help_is_one_short_line_per_command() {
    let o = midcall(&["--help"]);
    assert!(o.status.success());
    let text = stdout(&o);
    let commands: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(commands.len() >= 10, "{text}");
    for l in commands {
        assert!(l.chars().count() <= 100, "too long for a summary: {l}");
    }
}

#[test]
fn counts_read_as_english_and_tables_stay_aligned() {
    let (_d, file) = temp_file(
        "one.toml",
        "[agent]\nid = \"a\"\ntenant = \"t\"\n[[actions]]\nname = \"x\"\ndescription = \"d\"\nurl = \"https://s.example.com/x\"\n",
    );
    let o = midcall(&["check", file.to_str().unwrap()]);
    assert!(
        stdout(&o).contains("1 action, 0 webhooks, 0 automations"),
        "{}",
        stdout(&o)
    );
    // A long endpoint label does not push its row out of line with the header.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let label = "A very long webhook label that is wider than any fixed column would be";
    let set = midcall::ActionSet::from_str(
        "t.toml",
        &format!("[agent]\nid = \"a\"\ntenant = \"t\"\n[[webhooks]]\nlabel = \"{label}\"\nurl = \"https://hooks.example.com/x\"\nsubscriptions = [\"error\"]\n"),
        midcall::Syntax::Toml,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bus = midcall::EventBus::builder(&db)
            .webhooks(&set)
            .deliver(false)
            .build()
            .unwrap();
        bus.publish_durable(
            &midcall::Event::error("E1", "m"),
            &crate::support::call_info(),
        )
        .await
        .unwrap();
        bus.close().await;
    });
    let o = midcall(&["deliveries", "--db", db.to_str().unwrap()]);
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let col = |l: &str, word: &str| l.find(word).unwrap();
    assert_eq!(
        col(lines[0], "event"),
        col(lines[1], "event_error"),
        "{text}"
    );
    assert_eq!(col(lines[0], "status"), col(lines[1], "pending"), "{text}");
}

/// `midcall bench` runs the measurement harness (`midcall-bench`, its own binary) with its
/// flags, and the harness's own children (the upstream process, the CPU hogs) start: a quick
/// run completes and reports every scenario with its ratio to raw hyper.
#[test]
fn bench_runs_the_harness_with_its_upstream_process_and_hogs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let o = midcall(&[
        "bench",
        "--quick",
        "--upstream-process",
        "--cpu-hogs",
        "1",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let names: Vec<&str> = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    for want in [
        "raw_serde",
        "exec_miss",
        "exec_hit",
        "session_miss",
        "session_hit",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    let exec_miss = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "exec_miss")
        .unwrap();
    assert!(
        exec_miss["ratio_p50"].as_f64().is_some_and(|r| r > 0.0),
        "{exec_miss}"
    );
    assert_eq!(
        report["deadline_cpu_hogs"]["cpu_hogs"], 1,
        "the deadline measured beside a hog process: {}",
        report["deadline_cpu_hogs"]
    );
}
