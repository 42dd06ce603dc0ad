//! `midcall exec`: run one action for real and show its outcome.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::json;

use midcall::exec::Budget;
use midcall::{ActionSet, Call, ConversationState, Outcome, ToolCall};

/// Run an action against its real endpoint and print the outcome.
///
/// Execute an action against its real endpoint and print the outcome: status, latency,
/// values written to state, the result for the model, the fallback line. Exit 0 whenever an
/// outcome was produced, whatever its status; 2 for bad config or flags.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  midcall exec examples/front-desk/agent.toml --action check_slots --args '{\"date\": \"2025-11-04\"}'\n  midcall exec agent.toml --action lookup --allow-http --allow-network 127.0.0.0/8 --repeat 5 --json"
)]
pub(crate) struct ExecArgs {
    /// The agent file.
    file: String,
    /// The action to run.
    #[arg(long)]
    action: String,
    /// The tool call's arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    args: String,
    /// Conversation variables before the action, a JSON object.
    #[arg(long, default_value = "{}")]
    state: String,
    /// Call fields over a sample call, e.g. '{"from_number": "+15551234567"}'.
    #[arg(long, default_value = "{}")]
    call: String,
    /// The turn's budget in milliseconds (the action's own timeout_ms still applies).
    #[arg(long, default_value_t = 5000)]
    budget_ms: u64,
    #[command(flatten)]
    net: super::NetworkArgs,
    /// Run the action this many times in the same call (1 to 100000), each as a distinct tool
    /// call: the cache applies, duplicate-call protection does not.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    repeat: u32,
    /// Print one JSON object per execution, one per line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: ExecArgs) -> Result<ExitCode, String> {
    let set = super::load(&a.file)?;
    let action = set
        .action(&a.action)
        .ok_or_else(|| missing_action(&set, &a.action, &a.file))?
        .clone();
    let args = super::parse_json("--args", &a.args)?;
    let state = ConversationState::from_value(super::parse_json("--state", &a.state)?)
        .map_err(|e| format!("--state: {e}"))?;
    let info = super::render::call_from_flag(&a.call, &set.agent().id, &set.agent().tenant)?;
    // Each --repeat run is a distinct tool call: duplicate protection would turn runs 2..N
    // into replays of the first, so it is off here.
    let stack = a
        .net
        .stack(midcall::config::Agents::one(std::sync::Arc::new(
            set.clone(),
        )))?
        .runtime(|r| r.dedupe_window(Duration::ZERO));
    // One sequential call: a single-threaded runtime keeps each action and its connection's
    // task on one thread, so the connection is back in the pool before the next run.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let runtime = rt
        .block_on(stack.build())
        .map_err(|e| e.to_string())?
        .runtime;
    rt.block_on(async move {
        let mut call = Call::new(info);
        call.state = state;
        let mut elapsed = Vec::with_capacity(a.repeat as usize);
        for i in 0..a.repeat {
            let budget = Budget::new(Duration::from_millis(a.budget_ms));
            let tool = ToolCall::new(format!("cli_{i}"), args.clone());
            let outcome = runtime.execute(&action, &mut call, tool, &budget).await;
            elapsed.push(outcome.timings.total);
            if a.json {
                let mut v = outcome.to_json();
                v["state"] = call.state.to_value();
                println!("{v}");
            } else {
                print_human(i, &outcome, &call);
            }
        }
        if !a.json && a.repeat > 1 {
            elapsed.sort();
            let pct = |p: f64| elapsed[((elapsed.len() - 1) as f64 * p).round() as usize];
            println!(
                "{} runs: min {:.2} ms, p50 {:.2} ms, p90 {:.2} ms, max {:.2} ms; connections opened: {}",
                elapsed.len(),
                ms(elapsed[0]),
                ms(pct(0.5)),
                ms(pct(0.9)),
                ms(elapsed[elapsed.len() - 1]),
                runtime.connections_opened()
            );
        }
    });
    Ok(ExitCode::SUCCESS)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn missing_action(set: &ActionSet, name: &str, file: &str) -> String {
    let names: Vec<&str> = set.actions().iter().map(|x| x.name()).collect();
    format!(
        "no action \"{name}\" in {file} (it has: {})",
        names.join(", ")
    )
}

fn print_human(i: u32, o: &Outcome, call: &Call) {
    let http = o
        .http_status
        .map(|s| format!(" HTTP {s}"))
        .unwrap_or_default();
    let mut marks = Vec::new();
    if o.filler_fired {
        marks.push("filler".to_string());
    }
    if o.cache != midcall::exec::CacheStatus::Bypass {
        marks.push(format!("cache {}", o.cache.as_str()));
    }
    if o.deduplicated {
        marks.push("deduplicated".into());
    }
    if o.attempts > 1 {
        marks.push(format!("{} attempts", o.attempts));
    }
    if o.timings.connect.is_some() {
        marks.push("new connection".into());
    }
    println!(
        "#{:<3} {:<16} {:>9.2} ms{http}{}",
        i + 1,
        o.status.as_str(),
        ms(o.timings.total),
        if marks.is_empty() {
            String::new()
        } else {
            format!("  [{}]", marks.join(", "))
        }
    );
    for (path, value) in &o.values {
        println!("      state.{path} = {value}");
    }
    if let Some(e) = &o.error {
        println!("      error: {e}");
        if e.is_egress() {
            println!(
                "      hint: to reach a local test server, pass --allow-http --allow-network 127.0.0.0/8"
            );
        }
    }
    if let Some(say) = &o.say {
        println!("      say: \"{say}\"");
    }
    if i == 0 {
        println!("      llm_result: {}", json!(o.llm_result));
        if !o.status.is_success() && !call.state.variables().is_empty() {
            println!("      state: {}", call.state.to_value());
        }
    }
}
