//! `midcall runs`: the automation run log.

use std::process::ExitCode;

use clap::Args;

use midcall::time;
use midcall::RunLog;

/// List automation runs and what each step did.
///
/// List automation runs from an outbox database (newest first), each with its steps: what
/// each did, or why the run failed.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  midcall runs --db outbox.db\n  midcall runs --db outbox.db --automation crm-sync --status failed\n  midcall runs --db outbox.db --json\n  midcall runs --db postgres://midcall@db.internal:5432/midcall --status failed"
)]
pub(crate) struct RunsArgs {
    /// The outbox database: a SQLite file, or `postgres://user@host:port/db`.
    #[arg(long)]
    db: String,
    /// Only this automation's runs.
    #[arg(long)]
    automation: Option<String>,
    /// Only runs in this state.
    #[arg(long, value_parser = ["queued", "running", "succeeded", "failed"])]
    status: Option<String>,
    /// At most this many runs.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// One JSON object per run (with its steps), one per line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: RunsArgs) -> Result<ExitCode, String> {
    let log = RunLog::open(&a.db)?;
    let runs = log.runs(a.automation.as_deref(), a.status.as_deref(), a.limit)?;
    if a.json {
        for r in &runs {
            println!("{}", serde_json::to_string(r).map_err(|e| e.to_string())?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if runs.is_empty() {
        println!("(no runs)");
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = super::Table::new(&[
        ("run", false),
        ("queued", false),
        ("automation", false),
        ("trigger", false),
        ("status", false),
        ("detail", false),
    ]);
    for r in &runs {
        let detail = r
            .error
            .clone()
            .or_else(|| r.call_id.as_ref().map(|c| format!("call {c}")))
            .unwrap_or_default();
        t.row(vec![
            r.id.clone(),
            time::rfc3339_ms(r.created_ms),
            r.automation.clone(),
            r.trigger.clone(),
            r.status.clone(),
            detail,
        ]);
    }
    // Each run's row, then its steps indented under it.
    let rendered = t.render();
    let mut lines = rendered.lines();
    if let Some(head) = lines.next() {
        println!("{head}");
    }
    for (line, r) in lines.zip(&runs) {
        println!("{line}");
        let kind_w = r.steps.iter().map(|s| s.kind.len()).max().unwrap_or(0);
        let status_w = r.steps.iter().map(|s| s.status.len()).max().unwrap_or(0);
        for s in &r.steps {
            println!(
                "    step {} {:<kind_w$}  {:<status_w$}  {:>6} ms  {}",
                s.index + 1,
                s.kind,
                s.status,
                s.duration_ms,
                s.detail
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
