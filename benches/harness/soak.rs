//! `midcall bench --soak`: no dead air under load. Thousands of simulated calls, each making
//! tool calls through its own session against an upstream that misbehaves on purpose, and
//! the questions a phone line asks: did every tool call end within its budget, did the filler
//! play on time, does memory stay flat, do the tasks go away.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use midcall::exec::Budget;
use midcall::{ActionSet, CallEnd, CallInfo, Syntax, ToolCall, Turn};

use crate::measure::percentile;
use crate::scenarios::{next_request, rss_bytes, Hogs};
use crate::table::Table;

/// The turn budget of every tool call.
const BUDGET_MS: u64 = 500;
/// When the filler line is due.
const FILLER_MS: u64 = 150;
/// How late a "slow" answer comes: past the filler point, inside the budget.
const SLOW_MS: u64 = 300;
/// Lines connect spread over this long (2,000 callers arriving within one second is a
/// thundering herd no phone system sends).
const RAMP: Duration = Duration::from_secs(3);
/// The slack an end state may take past its budget and still count as within it.
const SLACK_MS: u64 = 5;

/// What the soak is given.
#[derive(Debug)]
pub(crate) struct Soak {
    pub(crate) calls: usize,
    pub(crate) duration: Duration,
    pub(crate) json: Option<String>,
    pub(crate) cpu_hogs: usize,
}

/// Connections the upstream holds open.
static UPSTREAM_OPEN: AtomicUsize = AtomicUsize::new(0);

/// What the upstream does with request `n` (a hash of it, so the mix is spread evenly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Hang,
    Unavailable,
    Reset,
    Slow,
    Fast,
}

fn fault(n: u64) -> Fault {
    match splitmix(n) % 100 {
        0..=9 => Fault::Hang,
        10..=14 => Fault::Unavailable,
        15..=19 => Fault::Reset,
        20..=29 => Fault::Slow,
        _ => Fault::Fast,
    }
}

pub(crate) fn splitmix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The fault-mix upstream on its own thread and runtime (so it never shares the runtime
/// under test): HTTP/1.1 keep-alive on 127.0.0.1. Returns its port.
fn start_upstream() -> Result<u16, String> {
    // Thousands of callers connect within a second: a listen backlog to match (std's is 128).
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("soak-upstream".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let listener = tokio::net::TcpSocket::new_v4().and_then(|s| {
                    s.bind("127.0.0.1:0".parse().expect("an address"))?;
                    s.listen(8192)
                });
                let listener = match listener {
                    Ok(l) => {
                        let _ = port_tx
                            .send(l.local_addr().map(|a| a.port()).map_err(|e| e.to_string()));
                        l
                    }
                    Err(e) => {
                        let _ = port_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let seq = Arc::new(AtomicU64::new(0));
                while let Ok((s, _)) = listener.accept().await {
                    let _ = s.set_nodelay(true);
                    let seq = seq.clone();
                    UPSTREAM_OPEN.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        serve(s, seq).await;
                        UPSTREAM_OPEN.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            });
        })
        .map_err(|e| e.to_string())?;
    port_rx
        .recv()
        .map_err(|_| "the soak upstream did not start".to_string())?
}

async fn serve(mut s: tokio::net::TcpStream, seq: Arc<AtomicU64>) {
    fn response(status: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
    let ok = response("200 OK", r#"{"data":{"customer":{"name":"Dana R"}}}"#);
    let unavailable = response("503 Service Unavailable", "{}");
    let mut buf = Vec::with_capacity(2048);
    while next_request(&mut s, &mut buf).await {
        let answer = match fault(seq.fetch_add(1, Ordering::Relaxed)) {
            Fault::Hang => {
                // Never answer; wait for the client to give up and close.
                let mut chunk = [0u8; 512];
                while matches!(s.read(&mut chunk).await, Ok(n) if n > 0) {}
                return;
            }
            Fault::Reset => return,
            Fault::Unavailable => &unavailable,
            Fault::Slow => {
                tokio::time::sleep(Duration::from_millis(SLOW_MS)).await;
                &ok
            }
            Fault::Fast => &ok,
        };
        if s.write_all(answer).await.is_err() {
            return;
        }
    }
}

fn agent(port: u16) -> Result<ActionSet, String> {
    let text = format!(
        r#"[agent]
id = "soak"
tenant = "soak"

[[actions]]
name = "lookup"
description = "Look up the caller"
url = "http://127.0.0.1:{port}/v1/customers?phone={{{{call.from_number}}}}&n={{{{args.n}}}}"
parameters = {{ type = "object", required = ["n"], properties = {{ n = {{ type = "integer" }} }} }}
timeout_ms = 1000
filler = {{ after_ms = {FILLER_MS}, say = "One moment." }}
extract = {{ "customer.name" = "$.data.customer.name" }}
on_failure = {{ say = "I can't look that up right now." }}
"#
    );
    ActionSet::from_str("soak.toml", &text, Syntax::Toml).map_err(|e| e.to_string())
}

/// What every call task reports.
#[derive(Default)]
struct Tally {
    calls: usize,
    over_budget_in_ramp: usize,
    latency_us: Vec<u64>,
    over_budget: usize,
    filler_late_us: Vec<u64>,
    statuses: std::collections::BTreeMap<&'static str, usize>,
    late_statuses: std::collections::BTreeMap<&'static str, usize>,
}

/// What the sampler thread saw, once a second.
#[derive(Default)]
struct Samples {
    rss_mb: Vec<usize>,
    tasks: Vec<usize>,
    upstream_connections: Vec<usize>,
    fds: Vec<usize>,
    rss_warm: usize,
    rss_end: usize,
}

fn live_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

pub(crate) async fn run(s: Soak) -> Result<ExitCode, String> {
    let _hogs = Hogs::start(s.cpu_hogs)?;
    let port = start_upstream()?;
    let set = Arc::new(agent(port)?);
    let calls = s.calls;
    let runtime = midcall::Stack::for_agent(set.clone())
        .egress(
            set.egress()
                .policy()
                .allow_http(true)
                .allow_network("127.0.0.0/8".parse().map_err(|_| "cidr")?),
        )
        .runtime(move |r| r.pool_max_idle_per_host(calls))
        .build()
        .await
        .map_err(|e| e.to_string())?
        .runtime;
    let tasks_start = live_tasks();
    let rss_start = rss_bytes();
    let started = Instant::now();
    let end_at = started + s.duration;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let tool_calls = Arc::new(AtomicUsize::new(0));
    let tty = std::io::stderr().is_terminal();
    eprintln!(
        "midcall bench --soak: {} lines of calls for {} s against a fault mix (10 % hang, 5 % 503, 5 % reset, 10 % slow, 70 % fast){}",
        s.calls,
        s.duration.as_secs(),
        if s.cpu_hogs > 0 {
            format!(", {} busy processes beside it", s.cpu_hogs)
        } else {
            String::new()
        }
    );
    let mut tasks = Vec::with_capacity(s.calls);
    for i in 0..s.calls {
        let (runtime, set, tally, tool_calls) = (
            runtime.clone(),
            set.clone(),
            tally.clone(),
            tool_calls.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Lines connect over the first second, not all at once.
            let stagger = Duration::from_micros(splitmix(i as u64) % RAMP.as_micros() as u64);
            tokio::time::sleep(stagger).await;
            let mut local = Tally::default();
            let mut n = 0u64;
            // One line: call after call, each a few tool calls long, until the time is up.
            let mut call_no = 0u64;
            while Instant::now() < end_at {
                let info = CallInfo {
                    id: format!("soak_{i}_{call_no}"),
                    agent_id: "soak".into(),
                    tenant: "soak".into(),
                    from_number: format!("+1555{i:07}"),
                    to_number: "+15557654321".into(),
                    is_outgoing: false,
                    started_at: "2026-12-02T00:00:00.000Z".into(),
                };
                let call_started = Instant::now();
                let session = runtime
                    .start_call(set.clone(), info, Duration::from_millis(500))
                    .await;
                let tools = 3 + splitmix((i as u64) << 40 | call_no) % 6;
                for _ in 0..tools {
                    if Instant::now() >= end_at {
                        break;
                    }
                    session.add_turn(Turn::user(
                        "Can you look me up?",
                        "2026-12-02T00:00:00.000Z",
                    ));
                    let fired = Arc::new(OnceLock::<Instant>::new());
                    let f = fired.clone();
                    let t0 = Instant::now();
                    let handle = session
                        .tool(
                            "lookup",
                            ToolCall::new(format!("s{i}_{n}"), json!({"n": (i as u64) << 24 | n})),
                            Budget::new(Duration::from_millis(BUDGET_MS)),
                        )
                        .on_filler(move |_| {
                            let _ = f.set(Instant::now());
                        });
                    let o = handle.await;
                    let took = t0.elapsed();
                    tool_calls.fetch_add(1, Ordering::Relaxed);
                    local.latency_us.push(took.as_micros() as u64);
                    if took > Duration::from_millis(BUDGET_MS + SLACK_MS) {
                        local.over_budget += 1;
                        if t0.saturating_duration_since(started) < RAMP {
                            local.over_budget_in_ramp += 1;
                        }
                        *local.late_statuses.entry(o.status.as_str()).or_default() += 1;
                    }
                    if let Some(at) = fired.get() {
                        let due = t0 + Duration::from_millis(FILLER_MS);
                        local
                            .filler_late_us
                            .push(at.saturating_duration_since(due).as_micros() as u64);
                    }
                    *local.statuses.entry(o.status.as_str()).or_default() += 1;
                    n += 1;
                    // The caller and the agent talk between tool calls.
                    let think = 100 + splitmix((i as u64) << 32 | n) % 300;
                    tokio::time::sleep(Duration::from_millis(think)).await;
                }
                let _ = session
                    .end(CallEnd::new(call_started.elapsed(), "user_hangup"))
                    .await;
                call_no += 1;
            }
            local.calls = call_no as usize;
            if let Ok(mut t) = tally.lock() {
                t.calls += local.calls;
                t.latency_us.extend(local.latency_us);
                t.over_budget += local.over_budget;
                t.over_budget_in_ramp += local.over_budget_in_ramp;
                t.filler_late_us.extend(local.filler_late_us);
                for (k, v) in local.statuses {
                    *t.statuses.entry(k).or_default() += v;
                }
                for (k, v) in local.late_statuses {
                    *t.late_statuses.entry(k).or_default() += v;
                }
            }
        }));
    }
    // Progress and samples, on a thread of their own (reading /proc on a worker would add
    // to the lateness being measured).
    let handle = tokio::runtime::Handle::current();
    let duration = s.duration;
    let counter = tool_calls.clone();
    let sampler = std::thread::spawn(move || {
        let mut out = Samples::default();
        let mut next = started;
        loop {
            next += Duration::from_secs(1);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let el = started.elapsed();
            let rss = rss_bytes();
            out.rss_mb.push(rss / 1_000_000);
            out.tasks.push(handle.metrics().num_alive_tasks());
            out.upstream_connections
                .push(UPSTREAM_OPEN.load(Ordering::Relaxed));
            out.fds.push(
                std::fs::read_dir("/proc/self/fd")
                    .map(|d| d.count())
                    .unwrap_or(0),
            );
            // Warm: once every line is up and has made its first tool calls.
            if el >= duration / 4 && out.rss_warm == 0 {
                out.rss_warm = rss;
            }
            if tty {
                let width = 30;
                let filled =
                    (width as f64 * (el.as_secs_f64() / duration.as_secs_f64()).min(1.0)) as usize;
                eprint!(
                    "\r[{}{}] {:>3}/{} s, {} tool calls",
                    "#".repeat(filled),
                    " ".repeat(width - filled),
                    el.as_secs().min(duration.as_secs()),
                    duration.as_secs(),
                    counter.load(Ordering::Relaxed)
                );
            }
            if el + Duration::from_millis(1100) >= duration {
                // The last full second: every line is still live.
                out.rss_end = rss;
            }
            if el >= duration {
                if tty {
                    eprintln!();
                }
                return out;
            }
        }
    });
    for t in tasks {
        let _ = t.await;
    }
    let samples = tokio::task::spawn_blocking(move || sampler.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the sampler thread panicked")?;
    let (rss_end, rss_warm) = (samples.rss_end, samples.rss_warm);
    // The runtime goes too (its pool's idle connections are tasks): what is left is a leak.
    drop(runtime);
    // Let hung requests' connections close and their tasks go (bounded).
    let settle = Instant::now();
    while live_tasks() > tasks_start && settle.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tasks_end = live_tasks();
    let mut t = std::mem::take(&mut *tally.lock().map_err(|_| "tally")?);
    t.latency_us.sort_unstable();
    t.filler_late_us.sort_unstable();
    let total = t.latency_us.len();
    let within = 1.0 - t.over_budget as f64 / total.max(1) as f64;
    let filler_p99_ms = percentile(&t.filler_late_us, 0.99) / 1000.0;
    let growth = (rss_end as f64 - rss_warm as f64) / rss_warm.max(1) as f64;
    let breaker = t.statuses.get("circuit_open").copied().unwrap_or(0);
    let report = json!({
        "soak": {
            "calls": s.calls,
            "duration_s": s.duration.as_secs(),
            "cpu_hogs": s.cpu_hogs,
            "budget_ms": BUDGET_MS,
            "filler_after_ms": FILLER_MS,
            "tool_calls": total,
            "phone_calls": t.calls,
            "within_budget_share": within,
            "over_budget": t.over_budget,
            "over_budget_statuses": t.late_statuses,
            "over_budget_during_ramp": t.over_budget_in_ramp,
            "ramp_s": RAMP.as_secs(),
            "filler_fired": t.filler_late_us.len(),
            "filler_late_p50_ms": percentile(&t.filler_late_us, 0.5) / 1000.0,
            "filler_late_p99_ms": filler_p99_ms,
            "action_p50_ms": percentile(&t.latency_us, 0.5) / 1000.0,
            "action_p99_ms": percentile(&t.latency_us, 0.99) / 1000.0,
            "action_max_ms": t.latency_us.last().copied().unwrap_or(0) as f64 / 1000.0,
            "rss_start_bytes": rss_start,
            "rss_warm_bytes": rss_warm,
            "rss_end_bytes": rss_end,
            "rss_growth_after_warm": growth,
            "rss_mb_each_second": samples.rss_mb,
            "live_tasks_each_second": samples.tasks,
            "upstream_connections_each_second": samples.upstream_connections,
            "open_fds_each_second": samples.fds,
            "tasks_start": tasks_start,
            "tasks_end": tasks_end,
            "circuit_open_outcomes": breaker,
            "statuses": t.statuses,
        }
    });
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut table = Table::new(&[("measure", false), ("value", true), ("goal", false)]);
    table.row(vec![
        "tool calls (phone calls)".into(),
        format!("{total} ({})", t.calls),
        String::new(),
    ]);
    table.row(vec![
        format!("ended within budget + {SLACK_MS} ms"),
        format!("{:.3} %", within * 100.0),
        format!("100 %: {}", verdict(t.over_budget == 0)),
    ]);
    table.row(vec![
        format!("  late during the {} s ramp / after it", RAMP.as_secs()),
        format!(
            "{} / {}",
            t.over_budget_in_ramp,
            t.over_budget - t.over_budget_in_ramp
        ),
        format!(
            "max {:.1} ms",
            t.latency_us.last().copied().unwrap_or(0) as f64 / 1000.0
        ),
    ]);
    table.row(vec![
        format!("filler lateness p99 (after {FILLER_MS} ms)"),
        format!("{filler_p99_ms:.2} ms"),
        format!("<= 5 ms: {}", verdict(filler_p99_ms <= 5.0)),
    ]);
    table.row(vec![
        "action p50 / p99".into(),
        format!(
            "{:.1} / {:.1} ms",
            percentile(&t.latency_us, 0.5) / 1000.0,
            percentile(&t.latency_us, 0.99) / 1000.0
        ),
        format!("budget {BUDGET_MS} ms"),
    ]);
    table.row(vec![
        "RSS start / warm / end".into(),
        format!(
            "{:.1} / {:.1} / {:.1} MB",
            rss_start as f64 / 1e6,
            rss_warm as f64 / 1e6,
            rss_end as f64 / 1e6
        ),
        format!(
            "growth after warm {:+.1} % (<= 5 %): {}",
            growth * 100.0,
            verdict(growth <= 0.05)
        ),
    ]);
    table.row(vec![
        "live tasks start / end".into(),
        format!("{tasks_start} / {tasks_end}"),
        format!("back to start: {}", verdict(tasks_end <= tasks_start)),
    ]);
    table.row(vec![
        "breaker (circuit_open outcomes)".into(),
        breaker.to_string(),
        String::new(),
    ]);
    let statuses: Vec<String> = t.statuses.iter().map(|(k, v)| format!("{k} {v}")).collect();
    table.row(vec!["statuses".into(), String::new(), statuses.join(", ")]);
    println!("{}", table.render());
    if let Some(path) = &s.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("--json {path}: {e}"))?;
    }
    Ok(ExitCode::SUCCESS)
}
