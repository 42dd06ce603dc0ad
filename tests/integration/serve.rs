//! `midcall serve` as an operator meets it: docs/serve.md's example works against the bundled
//! mock, it says which secrets are missing, it logs what happens, and it checks the port
//! before it makes a database.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::root;

/// Starts `midcall serve` with `args`; returns the child, its banner (stdout up to the outbox
/// line, its last) and its address.
fn serve(args: &[&str], env: &[(&str, &str)]) -> (Child, Vec<String>, std::net::SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_midcall"));
    cmd.arg("serve")
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    for name in [
        "CRM_TOKEN",
        "INBOUND_WHSEC",
        "INSURANCE_TOKEN",
        "SCHEDULING_TOKEN",
        "WEBHOOK_SECRET",
    ] {
        cmd.env_remove(format!("MIDCALL_SECRET_{name}"));
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut banner = Vec::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let done = line.starts_with("  outbox:");
        banner.push(line.trim_end().to_string());
        if done {
            break;
        }
    }
    let addr = banner[0].rsplit("http://").next().unwrap().parse().unwrap();
    (child, banner, addr)
}

fn post(addr: std::net::SocketAddr, path: &str, key: &str, body: &str) -> u16 {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn stop(mut child: Child) -> String {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

fn runs(db: &std::path::Path) -> Vec<Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_midcall"))
        .args(["runs", "--db", db.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_readme_example_works_against_the_bundled_mock_and_logs_what_happens() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let (child, banner, addr) = serve(
        &[
            "examples/front-desk/agent.toml",
            "--mock",
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
        ],
        &[("MIDCALL_SECRET_INBOUND_KEY", "k3y")],
    );
    let banner = banner.join("\n");
    assert!(
        banner.contains("mock CRM on https://127.0.0.1:"),
        "{banner}"
    );
    assert!(
        banner.contains("demo values for the secrets not set: CRM_TOKEN, INBOUND_WHSEC"),
        "{banner}"
    );
    let code = post(
        addr,
        "/v1/automations/callback-request/webhook",
        "k3y",
        r#"{"phone": "+15551234567", "slot": "2025-11-04T15:00"}"#,
    );
    assert_eq!(code, 202);
    let mut done = Vec::new();
    for _ in 0..500 {
        done = runs(&db);
        if done
            .first()
            .is_some_and(|r| r["status"] != "queued" && r["status"] != "running")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(done[0]["status"], "succeeded", "{done:?}");
    let log = stop(child);
    assert!(
        log.contains("inbound request")
            && log.contains("path=/v1/automations/callback-request/webhook")
            && log.contains("status=202"),
        "{log}"
    );
    assert!(log.contains("automation run started"), "{log}");
    assert!(log.contains("automation run succeeded"), "{log}");
    assert!(!log.contains("k3y"), "no secret in the log:\n{log}");
}

#[test]
fn missing_secrets_are_listed_at_start_and_the_log_can_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let (child, banner, addr) = serve(
        &[
            "examples/front-desk/agent.toml",
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        &[("MIDCALL_SECRET_INBOUND_KEY", "k3y")],
    );
    let banner = banner.join("\n");
    assert!(
        banner.contains("warning: 5 secrets are not set: CRM_TOKEN, INBOUND_WHSEC, INSURANCE_TOKEN, SCHEDULING_TOKEN, WEBHOOK_SECRET"),
        "{banner}"
    );
    assert_eq!(
        post(
            addr,
            "/v1/automations/callback-request/webhook",
            "nope",
            "{}"
        ),
        401
    );
    let log = stop(child);
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "inbound request" && l["fields"]["status"] == 401),
        "{log}"
    );
}

#[test]
fn a_port_in_use_is_an_error_before_any_database_is_made() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let o = Command::new(env!("CARGO_BIN_EXE_midcall"))
        .args([
            "serve",
            "examples/front-desk/agent.toml",
            "--listen",
            &addr,
            "--db",
            db.to_str().unwrap(),
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("error: --listen {addr}")), "{err}");
    assert!(
        !db.exists(),
        "no database made for a server that could not listen"
    );
}
