//! What a simulation reports: the timeline, the actions, the deliveries and runs, the summary;
//! as JSON (the structs) and as text for people.

use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) script: String,
    pub(crate) title: Option<String>,
    pub(crate) agent: String,
    pub(crate) agent_file: String,
    pub(crate) call_id: String,
    pub(crate) from_number: String,
    pub(crate) mock_addr: String,
    pub(crate) mock_hosts: Vec<String>,
    pub(crate) timeline: Vec<Entry>,
    pub(crate) deliveries: Vec<DeliveryReport>,
    pub(crate) runs: Vec<RunReport>,
    /// Every request the mock CRM answered (status 0: reset on purpose).
    pub(crate) mock_requests: Vec<midcall::demo::Hit>,
    /// Every webhook the mock received, with its signature check.
    pub(crate) webhooks_received: Vec<midcall::demo::Received>,
    pub(crate) summary: Summary,
    pub(crate) problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Entry {
    pub(crate) at_ms: u64,
    pub(crate) kind: &'static str,
    pub(crate) text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) action: Option<ActionReport>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ActionReport {
    pub(crate) action: String,
    pub(crate) tool_call_id: Option<String>,
    pub(crate) args: Value,
    pub(crate) status: String,
    pub(crate) http_status: Option<u16>,
    pub(crate) latency_ms: f64,
    pub(crate) attempts: u32,
    pub(crate) cache: String,
    pub(crate) filler: Option<String>,
    pub(crate) fallback: Option<String>,
    pub(crate) deduplicated: bool,
    pub(crate) values: Value,
    pub(crate) state_changes: BTreeMap<String, Value>,
    pub(crate) expectations_failed: Vec<String>,
    pub(crate) error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct DeliveryReport {
    pub(crate) id: i64,
    pub(crate) endpoint: String,
    pub(crate) event: String,
    pub(crate) status: String,
    pub(crate) attempts: i64,
    pub(crate) signature: String,
    pub(crate) last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct RunReport {
    pub(crate) id: String,
    pub(crate) automation: String,
    pub(crate) status: String,
    pub(crate) error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    pub(crate) actions: usize,
    pub(crate) latency_p50_ms: f64,
    pub(crate) latency_p99_ms: f64,
    pub(crate) cache_hits: usize,
    pub(crate) deduplicated: usize,
    pub(crate) fillers: usize,
    pub(crate) fallbacks: usize,
    pub(crate) expectations_passed: usize,
    pub(crate) expectations_failed: usize,
    pub(crate) deliveries: usize,
    pub(crate) delivered: usize,
    pub(crate) signatures_verified: usize,
    pub(crate) signatures_invalid: usize,
    pub(crate) runs_succeeded: usize,
    pub(crate) runs_failed: usize,
    pub(crate) duration_ms: u64,
}

/// A latency for people: 0.042 ms, 12.3 ms.
pub(crate) fn show_ms(v: f64) -> String {
    if v < 1.0 {
        format!("{v:.3} ms")
    } else {
        format!("{v:.1} ms")
    }
}

pub(crate) fn summary(
    tl: &Timeline,
    deliveries: &[DeliveryReport],
    run_reports: &[RunReport],
    turns: &Turns,
    duration: Duration,
) -> Summary {
    let actions: Vec<&ActionReport> = tl
        .entries
        .iter()
        .filter_map(|e| e.action.as_ref())
        .collect();
    // Latencies in whole microseconds, for the bench's percentile.
    let mut latencies: Vec<u64> = actions
        .iter()
        .map(|a| (a.latency_ms * 1000.0).round() as u64)
        .collect();
    latencies.sort_unstable();
    let percentile = |p| crate::cli::measure::percentile(&latencies, p) / 1000.0;
    Summary {
        actions: actions.len(),
        latency_p50_ms: percentile(0.5),
        latency_p99_ms: percentile(0.99),
        cache_hits: actions
            .iter()
            .filter(|a| a.cache == "hit" || a.cache == "stale")
            .count(),
        deduplicated: actions.iter().filter(|a| a.deduplicated).count(),
        fillers: actions.iter().filter(|a| a.filler.is_some()).count(),
        fallbacks: actions.iter().filter(|a| a.fallback.is_some()).count(),
        expectations_passed: turns.passed,
        expectations_failed: turns.problems.len(),
        deliveries: deliveries.len(),
        delivered: deliveries
            .iter()
            .filter(|d| d.status == "delivered")
            .count(),
        signatures_verified: deliveries
            .iter()
            .filter(|d| d.signature == "verified")
            .count(),
        signatures_invalid: deliveries
            .iter()
            .filter(|d| d.signature == "invalid")
            .count(),
        runs_succeeded: run_reports
            .iter()
            .filter(|r| r.status == "succeeded")
            .count(),
        runs_failed: run_reports.iter().filter(|r| r.status == "failed").count(),
        duration_ms: duration.as_millis() as u64,
    }
}

pub(crate) fn print_report(r: &Report) {
    println!(
        "midcall simulate: {}{}",
        r.script,
        r.title
            .as_ref()
            .map(|t| format!(" — {t}"))
            .unwrap_or_default()
    );
    println!(
        "agent \"{}\" ({}); mock CRM on https://{} answering for {}",
        r.agent,
        r.agent_file,
        r.mock_addr,
        r.mock_hosts.join(", ")
    );
    println!();
    println!("{:>7}  {:<5}  what", "t (ms)", "who");
    for e in &r.timeline {
        match &e.action {
            None => {
                let text = match e.kind {
                    "user" | "barge" | "ai" => format!("\"{}\"", e.text),
                    _ => e.text.clone(),
                };
                let who = if e.kind == "barge" { "user" } else { e.kind };
                let mark = if e.kind == "barge" {
                    "  [barge-in]"
                } else {
                    ""
                };
                println!("{:>7}  {:<5}  {text}{mark}", e.at_ms, who);
            }
            Some(a) => print_action(e, a),
        }
    }
    print_summary(r);
}

/// One action of the timeline, with its state changes, error and failed expectations.
pub(crate) fn print_action(e: &Entry, a: &ActionReport) {
    let mut marks = Vec::new();
    if e.kind == "fetch" {
        marks.push("prefetch".to_string());
    }
    let fetched = a.http_status.is_some() || a.status == "cache_hit";
    if a.cache != "bypass" && fetched && !a.deduplicated {
        marks.push(format!("cache {}", a.cache));
    }
    if a.filler.is_some() {
        marks.push("filler".into());
    }
    if a.fallback.is_some() {
        marks.push("fallback".into());
    }
    if a.deduplicated {
        marks.push("deduplicated: nothing sent".into());
    }
    if a.attempts > 1 {
        marks.push(format!("{} attempts", a.attempts));
    }
    let http = a
        .http_status
        .map(|s| format!(" HTTP {s}"))
        .unwrap_or_default();
    let args = if a.args == json!({}) {
        String::new()
    } else {
        format!(" {}", a.args)
    };
    println!(
        "{:>7}  {:<5}  {}{args} → {}{http} in {}{}",
        e.at_ms,
        e.kind,
        a.action,
        a.status,
        show_ms(a.latency_ms),
        if marks.is_empty() {
            String::new()
        } else {
            format!("  [{}]", marks.join(", "))
        }
    );
    if !a.state_changes.is_empty() {
        let changes: Vec<String> = a
            .state_changes
            .iter()
            .map(|(k, v)| format!("{k} = {}", truncate(&v.to_string(), 60)))
            .collect();
        println!("{:>7}  {:<5}    state: {}", "", "", changes.join(", "));
    }
    if let Some(err) = &a.error {
        println!("{:>7}  {:<5}    why: {}", "", "", truncate(err, 110));
    }
    for f in &a.expectations_failed {
        println!("{:>7}  {:<5}    EXPECTATION FAILED: {f}", "", "");
    }
}

/// The summary, the deliveries table and the problems.
pub(crate) fn print_summary(r: &Report) {
    let s = &r.summary;
    println!();
    println!("Summary");
    println!(
        "  {:<22} {} ({:.1} s)",
        "call",
        r.call_id,
        s.duration_ms as f64 / 1000.0
    );
    println!("  {:<22} {}", "actions", s.actions);
    println!(
        "  {:<22} p50 {}, p99 {}",
        "action latency",
        show_ms(s.latency_p50_ms),
        show_ms(s.latency_p99_ms)
    );
    println!("  {:<22} {}", "cache hits", s.cache_hits);
    println!("  {:<22} {}", "deduplicated calls", s.deduplicated);
    println!("  {:<22} {}", "fillers spoken", s.fillers);
    println!("  {:<22} {}", "fallbacks spoken", s.fallbacks);
    println!(
        "  {:<22} {} passed, {} failed",
        "expectations", s.expectations_passed, s.expectations_failed
    );
    println!(
        "  {:<22} {} succeeded, {} failed",
        "automation runs", s.runs_succeeded, s.runs_failed
    );
    println!();
    println!(
        "Webhook deliveries ({} delivered of {}, {} verified)",
        s.delivered,
        s.deliveries,
        crate::cli::count(s.signatures_verified, "signature", "signatures")
    );
    let mut t = crate::cli::Table::new(&[
        ("endpoint", false),
        ("event", false),
        ("status", false),
        ("attempts", true),
        ("signature", false),
    ]);
    for d in &r.deliveries {
        t.row(vec![
            d.endpoint.clone(),
            d.event.clone(),
            d.status.clone(),
            d.attempts.to_string(),
            d.signature.clone(),
        ]);
    }
    for line in t.render().lines() {
        println!("  {line}");
    }
    for run in &r.runs {
        if let Some(e) = &run.error {
            println!("  automation {} failed: {e}", run.automation);
        }
    }
    println!();
    if r.problems.is_empty() {
        println!("All expectations met; every signed delivery verified.");
    } else {
        println!("Problems:");
        for p in &r.problems {
            println!("  {p}");
        }
    }
}
