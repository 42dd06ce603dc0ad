//! `midcall simulate`: plays a scripted call end to end against the bundled mock CRM.

mod script;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};
use tokio::time::Instant;

use midcall::events::{DeliveryLog, Event};
use midcall::exec::Budget;
use midcall::time;
use midcall::{
    ActionSet, Automations, Call, CallEnd, CallInfo, CallSession, Outcome, Stack, StatePath,
    ToolCall, Turn,
};

use midcall::demo::{hosts, DemoSecrets, Received};
use script::{Expect, Script};

mod report;
pub(crate) use report::*;

/// The script `simulate` plays when none is given.
const DEFAULT_SCRIPT: &str = "examples/front-desk/call.toml";

/// Play a scripted phone call against the bundled mock CRM and print its timeline.
///
/// Play a scripted phone call end to end: the bundled mock CRM starts on 127.0.0.1 (HTTPS,
/// every host the agent calls routed to it), the call connects (warm-up, prefetch,
/// phone_call_connected), the script's turns play (utterances, tool calls as the model emits
/// them, a re-issued call after a barge-in), and the call completes (phone_call_ended,
/// post-call results, call_completed automations). Prints a timeline and a summary; exit 1 if
/// an expectation of the script or a webhook signature failed.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  midcall simulate\n  midcall simulate examples/outage-line/call.toml --json\n  midcall simulate --db outbox.db && midcall deliveries --db outbox.db"
)]
pub(crate) struct SimulateArgs {
    /// The call script.
    #[arg(default_value = DEFAULT_SCRIPT)]
    script: String,
    /// Keep the outbox (events, deliveries, runs) in this file instead of a temporary one
    /// (or in a PostgreSQL database: `postgres://user@host:port/db`).
    #[arg(long)]
    db: Option<String>,
    /// Use a shared cache tier (`redis://host:port`; the fleet's secret from
    /// MIDCALL_SECRET_CACHE_KEY): what the call caches is there for the next process.
    #[arg(long)]
    cache_url: Option<String>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: SimulateArgs) -> Result<ExitCode, String> {
    let path = PathBuf::from(&a.script);
    if !path.exists() && a.script == DEFAULT_SCRIPT {
        return Err(format!(
            "{DEFAULT_SCRIPT} not found: run midcall simulate from the repository root, or give a script"
        ));
    }
    let (script, set, agent_path) = script::load(&path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let progress = !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let report = rt.block_on(play(
        &a.script,
        &script,
        Arc::new(set),
        &agent_path,
        a.db.as_deref(),
        super::shared_cache(a.cache_url.as_deref(), None)?,
        progress,
    ))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_report(&report);
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Leaf values of a state object by dotted path.
fn flatten(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(v, &p, out);
            }
        }
        _ if !prefix.is_empty() => {
            out.insert(prefix.to_string(), v.clone());
        }
        _ => {}
    }
}

fn state_changes(before: &Value, after: &Value) -> BTreeMap<String, Value> {
    let (mut b, mut a) = (BTreeMap::new(), BTreeMap::new());
    flatten(before, "", &mut b);
    flatten(after, "", &mut a);
    a.into_iter().filter(|(k, v)| b.get(k) != Some(v)).collect()
}

fn check(expect: Option<&Expect>, o: &Outcome, call: &Call) -> (usize, Vec<String>) {
    let Some(e) = expect else {
        return (0, Vec::new());
    };
    let mut checked = 0;
    let mut failed = Vec::new();
    let mut cmp = |what: &str, want: String, got: String| {
        checked += 1;
        if want != got {
            failed.push(format!("{what}: expected {want}, got {got}"));
        }
    };
    if let Some(s) = &e.status {
        cmp("status", s.clone(), o.status.as_str().to_string());
    }
    if let Some(f) = e.filler {
        cmp("filler", f.to_string(), o.filler_fired.to_string());
    }
    if let Some(f) = e.fallback {
        cmp(
            "fallback",
            f.to_string(),
            (!o.status.is_success()).to_string(),
        );
    }
    if let Some(d) = e.deduplicated {
        cmp("deduplicated", d.to_string(), o.deduplicated.to_string());
    }
    if let Some(c) = &e.cache {
        cmp("cache", c.clone(), o.cache.as_str().to_string());
    }
    if let Some(n) = e.attempts {
        cmp("attempts", n.to_string(), o.attempts.to_string());
    }
    for (path, want) in &e.state {
        let got = StatePath::parse(path)
            .ok()
            .and_then(|p| call.state.get(&p).cloned())
            .unwrap_or(Value::Null);
        cmp(&format!("state.{path}"), want.to_string(), got.to_string());
    }
    (checked, failed)
}

/// Milliseconds, to the microsecond.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

pub(crate) struct Timeline {
    pub(crate) started: Instant,
    pub(crate) entries: Vec<Entry>,
    pub(crate) progress: bool,
}

impl Timeline {
    fn push(&mut self, kind: &'static str, text: String, action: Option<ActionReport>) {
        let at_ms = self.started.elapsed().as_millis() as u64;
        self.push_at(at_ms, kind, text, action);
    }

    fn push_at(
        &mut self,
        at_ms: u64,
        kind: &'static str,
        text: String,
        action: Option<ActionReport>,
    ) {
        if self.progress {
            eprint!(
                "\r\x1b[2K  {at_ms:>6} ms  {kind:<5} {}",
                truncate(&text, 70)
            );
        }
        self.entries.push(Entry {
            at_ms,
            kind,
            text,
            action,
        });
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

fn action_report(
    o: &Outcome,
    tool_id: Option<String>,
    args: Value,
    changes: BTreeMap<String, Value>,
    filler: Option<String>,
    failed: Vec<String>,
) -> ActionReport {
    ActionReport {
        action: o.action.clone(),
        tool_call_id: tool_id,
        args,
        status: o.status.as_str().to_string(),
        http_status: o.http_status,
        latency_ms: ms(o.timings.total),
        attempts: o.attempts,
        cache: o.cache.as_str().to_string(),
        filler,
        fallback: if o.status.is_success() {
            None
        } else {
            o.say.clone()
        },
        deduplicated: o.deduplicated,
        values: midcall::exec::values_json(&o.values),
        state_changes: changes,
        expectations_failed: failed,
        error: o.error.as_ref().map(|e| e.to_string()),
    }
}

async fn play(
    script_path: &str,
    script: &Script,
    set: Arc<ActionSet>,
    agent_path: &Path,
    db: Option<&str>,
    shared: Option<midcall::cache::SharedCacheConfig>,
    progress: bool,
) -> Result<Report, String> {
    let tmp = tempfile_dir()?;
    let db_path = match db {
        Some(p) => PathBuf::from(p),
        None => tmp.join("outbox.db"),
    };
    let stack = build_stack(script, &set, &db_path, shared).await?;
    let (runtime, mock) = (stack.runtime.clone(), stack.mock.as_ref().ok_or("no mock")?);
    let bus = runtime
        .event_bus()
        .cloned()
        .ok_or("the runtime has no event bus")?;
    let automations = stack.automations.clone().ok_or("no automations")?;

    let started_at = time::now_ms();
    let info = call_info(script, &set, started_at);
    let mut tl = Timeline {
        started: Instant::now(),
        entries: Vec::new(),
        progress,
    };
    // The call connects: phone_call_connected, warm-up, prefetches.
    let before = json!({});
    let mut call = runtime
        .start_call(set.clone(), info.clone(), Duration::from_millis(1500))
        .await;
    connected(&call, &info, &before, &mut tl);
    let mut turns = Turns::default();
    for (i, turn) in script.turns().into_iter().enumerate() {
        turns.play(&mut call, script, i, turn, &mut tl).await;
    }

    // The call ends.
    let duration = tl.started.elapsed();
    let _ = bus.publish(&Event::transcript(&call.transcript()), &info);
    let mut end = CallEnd::new(duration, script.end.reason.clone());
    if let Some(o) = &script.end.outcome {
        end = end.outcome(o.clone());
    }
    let runs = call.end(end).await.map_err(|e| e.to_string())?;
    tl.push(
        "call",
        format!(
            "ended ({}); phone_call_ended and post-call results published; {} queued",
            script.end.reason,
            super::count(runs.len(), "automation run", "automation runs")
        ),
        None,
    );
    automations.wait_idle(Duration::from_secs(5)).await;
    bus.wake();
    // Wait for the outbox to settle (failing deliveries exhaust their short demo schedule).
    let log = DeliveryLog::open(&db_path)?;
    settle(&log, &automations, &info).await?;
    automations.shutdown(Duration::from_secs(2)).await;
    bus.close().await;
    if progress {
        eprint!("\r\x1b[2K");
    }

    let received = mock.received();
    let deliveries = deliveries(&log, &received, started_at, &mut turns.problems)?;
    let run_reports = run_reports(&db_path, &runs)?;
    let mock_addr = mock.addr;
    let mock_requests = mock.hits();
    drop(stack);

    let summary = summary(&tl, &deliveries, &run_reports, &turns, duration);
    let mut entries = tl.entries;
    entries.sort_by_key(|e| e.at_ms);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(Report {
        script: script_path.to_string(),
        title: script.title.clone(),
        agent: set.agent().id.clone(),
        agent_file: agent_path.display().to_string(),
        call_id: info.id.clone(),
        from_number: info.from_number.clone(),
        mock_addr: mock_addr.to_string(),
        mock_hosts: hosts(&set),
        timeline: entries,
        mock_requests,
        webhooks_received: received,
        deliveries,
        runs: run_reports,
        summary,
        problems: turns.problems,
    })
}

/// The stack a simulation plays against: the mock CRM in front of every host, an outbox with
/// a short retry schedule.
async fn build_stack(
    script: &Script,
    set: &Arc<ActionSet>,
    db_path: &Path,
    shared: Option<midcall::cache::SharedCacheConfig>,
) -> Result<Stack, String> {
    let breaker = script.runtime.breaker_threshold;
    let mut builder = Stack::for_agent(set.clone())
        .mock(script.mock.clone(), Arc::new(DemoSecrets::default()))
        .outbox(db_path, |bus| {
            bus.retry_schedule(vec![Duration::from_millis(200), Duration::from_millis(400)])
                .jitter(0.0)
                .attempt_timeout(Duration::from_secs(3))
        })
        .runtime(move |r| match breaker {
            Some(n) => r.breaker_threshold(n),
            None => r,
        });
    if let Some(cfg) = shared {
        builder = builder.shared_cache(cfg);
    }
    builder.build().await.map_err(crate::cli::stack_error)
}

/// The simulated call's facts.
fn call_info(script: &Script, set: &ActionSet, started_at: i64) -> CallInfo {
    CallInfo {
        id: script
            .call
            .id
            .clone()
            .unwrap_or_else(|| format!("call_sim_{started_at:x}")),
        agent_id: set.agent().id.clone(),
        tenant: set.agent().tenant.clone(),
        from_number: script.call.from_number.clone(),
        to_number: script
            .call
            .to_number
            .clone()
            .or_else(|| set.agent().phone_number.clone())
            .unwrap_or_else(|| "+15550000000".into()),
        is_outgoing: false,
        started_at: time::rfc3339_ms(started_at),
    }
}

/// The timeline's first entries: the call connected, the hosts warmed, the prefetches.
fn connected(call: &CallSession, info: &CallInfo, before: &Value, tl: &mut Timeline) {
    let start = call.start_report();
    let mut text = format!(
        "{} from {} connected; warmed {}",
        info.id,
        info.from_number,
        if start.warm.warmed.is_empty() {
            "no hosts".to_string()
        } else {
            start.warm.warmed.join(", ")
        }
    );
    for (host, why) in &start.warm.failed {
        text.push_str(&format!("; warm-up of {host} failed: {why}"));
    }
    tl.push_at(0, "call", text, None);
    for o in &start.prefetched {
        let changes = state_changes(before, &call.state_value());
        tl.push_at(
            0,
            "fetch",
            format!("prefetch {}", o.action),
            Some(action_report(o, None, json!({}), changes, None, Vec::new())),
        );
    }
}

/// What the turns so far have counted: the transcript's step, expectations met and missed.
#[derive(Default)]
pub(crate) struct Turns {
    pub(crate) step: u64,
    pub(crate) passed: usize,
    pub(crate) problems: Vec<String>,
}

impl Turns {
    /// Plays turn `i` of the script.
    async fn play(
        &mut self,
        call: &mut CallSession,
        script: &Script,
        i: usize,
        turn: script::Turn<'_>,
        tl: &mut Timeline,
    ) {
        let budget_ms = script.runtime.turn_budget_ms.unwrap_or(2000);
        match turn {
            script::Turn::User { text, barge_in } => {
                if barge_in {
                    call.barge_in();
                }
                call.add_turn(Turn::user(text, time::rfc3339_ms(time::now_ms())));
                let kind = if barge_in { "barge" } else { "user" };
                tl.push(kind, text.to_string(), None);
            }
            script::Turn::Ai(text) => {
                call.end_turn();
                call.add_turn(Turn::ai(
                    text,
                    time::rfc3339_ms(time::now_ms()),
                    Some(self.step),
                    None,
                ));
                self.step += 1;
                tl.push("ai", text.to_string(), None);
            }
            script::Turn::Pause(n) => {
                tokio::time::sleep(Duration::from_millis(n)).await;
            }
            script::Turn::Tool {
                name,
                id,
                args,
                expect,
            } => {
                let before = call.state_value();
                let called_at = tl.started.elapsed().as_millis() as u64;
                let filler = Arc::new(Mutex::new(None::<(u64, String)>));
                let f2 = filler.clone();
                let t0 = tl.started;
                let outcome = call
                    .tool(
                        name,
                        ToolCall::new(id.clone(), args.clone()),
                        Budget::new(Duration::from_millis(budget_ms)),
                    )
                    .on_filler(move |line| {
                        if let Ok(mut f) = f2.lock() {
                            *f = Some((t0.elapsed().as_millis() as u64, line.to_string()));
                        }
                    })
                    .await;
                let filler = filler.lock().ok().and_then(|f| f.clone());
                if let Some((at, line)) = &filler {
                    call.add_turn(Turn::ai(
                        line.clone(),
                        time::rfc3339_ms(time::now_ms()),
                        Some(self.step),
                        Some("filler".into()),
                    ));
                    self.step += 1;
                    tl.entries.push(Entry {
                        at_ms: *at,
                        kind: "ai",
                        text: format!("(filler) {line}"),
                        action: None,
                    });
                }
                let changes = state_changes(&before, &call.state_value());
                let (n, failed) = check(expect, &outcome, &call.snapshot());
                self.passed += n - failed.len();
                for f in &failed {
                    self.problems.push(format!("turn {} ({name}): {f}", i + 1));
                }
                let text = format!("{name} {}", args);
                let report = action_report(
                    &outcome,
                    Some(id),
                    args.clone(),
                    changes,
                    filler.map(|f| f.1),
                    failed,
                );
                let say = report.fallback.clone();
                tl.push_at(called_at, "tool", text, Some(report));
                if let Some(line) = say {
                    call.add_turn(Turn::ai(
                        line.clone(),
                        time::rfc3339_ms(time::now_ms()),
                        Some(self.step),
                        Some("fallback".into()),
                    ));
                    self.step += 1;
                    tl.push("ai", format!("(fallback) {line}"), None);
                }
            }
        }
    }
}

/// Waits (at most 8 s) until no delivery of the call is pending and no run queued.
async fn settle(
    log: &DeliveryLog,
    automations: &Automations,
    info: &CallInfo,
) -> Result<(), String> {
    let settle = Instant::now();
    loop {
        let pending = log.deliveries(Some(&info.id), Some("pending"), 1000)?;
        let runs_pending = automations.log()?.runs(None, Some("queued"), 10)?.len();
        if (pending.is_empty() && runs_pending == 0) || settle.elapsed() > Duration::from_secs(8) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    Ok(())
}

/// This simulation's deliveries (a kept --db may hold earlier ones), each with what the mock
/// made of its signature; a signature that did not verify is a problem.
fn deliveries(
    log: &DeliveryLog,
    received: &[Received],
    started_at: i64,
    problems: &mut Vec<String>,
) -> Result<Vec<DeliveryReport>, String> {
    let mut deliveries = Vec::new();
    let mut rows: Vec<_> = log
        .deliveries(None, None, 10_000)?
        .into_iter()
        .filter(|d| d.created_ms >= started_at)
        .collect();
    rows.reverse();
    for d in rows {
        let signature = received
            .iter()
            .rev()
            .find(|r| r.webhook_id.as_deref() == Some(d.webhook_id.as_str()))
            .map(|r| r.signature.to_string())
            .unwrap_or_else(|| "not received".into());
        if signature == "invalid" {
            problems.push(format!(
                "delivery {} to \"{}\": the signature did not verify",
                d.id, d.endpoint
            ));
        }
        deliveries.push(DeliveryReport {
            id: d.id,
            endpoint: d.endpoint,
            event: d.event_type,
            status: d.status,
            attempts: d.attempts,
            signature,
            last_error: d.last_error,
        });
    }
    Ok(deliveries)
}

/// The runs the call's end queued, oldest first.
fn run_reports(db_path: &Path, runs: &[String]) -> Result<Vec<RunReport>, String> {
    let run_log = midcall::RunLog::open(db_path)?;
    let mut run_reports: Vec<RunReport> = run_log
        .runs(None, None, 1000)?
        .into_iter()
        .filter(|r| runs.contains(&r.id))
        .map(|r| RunReport {
            id: r.id,
            automation: r.automation,
            status: r.status,
            error: r.error,
        })
        .collect();
    run_reports.reverse();
    Ok(run_reports)
}

/// A private temporary directory for the default outbox.
fn tempfile_dir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "midcall-simulate-{}-{:x}",
        std::process::id(),
        time::now_ms()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}
