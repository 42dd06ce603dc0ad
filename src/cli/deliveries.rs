//! `midcall deliveries`: the webhook delivery log, and replay.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::json;

use midcall::events::DeliveryLog;
use midcall::time;

/// List webhook deliveries (newest first), or replay them.
///
/// List webhook deliveries from an outbox database (newest first), or replay them.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  midcall deliveries --db outbox.db --status failed\n  midcall deliveries --db outbox.db --call call_123 --json\n  midcall deliveries replay --db outbox.db --id 42\n  midcall deliveries replay --db outbox.db --since 2h --status failed"
)]
pub(crate) struct DeliveriesArgs {
    #[command(subcommand)]
    command: Option<ReplayCommand>,
    /// The outbox database: a SQLite file, or `postgres://user@host:port/db`.
    #[arg(long)]
    db: Option<String>,
    /// Only this call's deliveries.
    #[arg(long)]
    call: Option<String>,
    /// Only deliveries in this state.
    #[arg(long, value_parser = ["pending", "delivered", "failed", "skipped"])]
    status: Option<String>,
    /// At most this many rows.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// One JSON object per delivery (with its attempts), one per line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum ReplayCommand {
    /// Send deliveries again: one by id, or every one of a status since a time.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  midcall deliveries replay --db outbox.db --id 42\n  midcall deliveries replay --db outbox.db --since 1700000000 --status failed"
)]
struct ReplayArgs {
    /// The outbox database: a SQLite file, or `postgres://user@host:port/db`.
    #[arg(long)]
    db: String,
    /// The delivery to replay.
    #[arg(long, conflicts_with_all = ["since", "status"], required_unless_present = "since")]
    id: Option<i64>,
    /// Replay deliveries published since: seconds since the epoch, or an age like 30m, 2h, 1d.
    #[arg(long, requires = "status")]
    since: Option<String>,
    /// The state to replay (with --since).
    #[arg(long, value_parser = ["failed", "skipped", "delivered"])]
    status: Option<String>,
}

fn since_ms(s: &str) -> Result<i64, String> {
    if let Ok(secs) = s.parse::<i64>() {
        return Ok(secs * 1000);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("--since: \"{s}\" is neither epoch seconds nor an age like 2h"))?;
    let ms = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "--since: unknown unit in \"{s}\" (use s, m, h or d)"
            ))
        }
    };
    Ok(time::now_ms() - n * ms)
}

pub(crate) fn run(a: DeliveriesArgs) -> Result<ExitCode, String> {
    if let Some(ReplayCommand::Replay(r)) = a.command {
        let mut log = DeliveryLog::open(&r.db)?;
        let n = match (r.id, r.since, r.status) {
            (Some(id), _, _) => {
                if !log.contains(id)? {
                    return Err(format!(
                        "{}: no delivery {id}",
                        midcall::events::display_db(&r.db)
                    ));
                }
                log.replay_id(id)?
            }
            (None, Some(since), Some(status)) => log.replay_since(since_ms(&since)?, &status)?,
            _ => return Err("give --id, or --since with --status".into()),
        };
        println!(
            "{} scheduled again; a running midcall delivers them now, or at its next start",
            super::count(n, "delivery", "deliveries")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let db = a.db.ok_or("--db FILE (or postgres://...) is required")?;
    let log = DeliveryLog::open(&db)?;
    let rows = log.deliveries(a.call.as_deref(), a.status.as_deref(), a.limit)?;
    if a.json {
        for r in &rows {
            let attempts = log.attempts(r.id)?;
            println!("{}", json!({"delivery": r, "attempts": attempts}));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("(no deliveries)");
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = super::Table::new(&[
        ("id", true),
        ("published", false),
        ("endpoint", false),
        ("event", false),
        ("call", false),
        ("status", false),
        ("attempts", true),
        ("last error", false),
    ]);
    for r in &rows {
        t.row(vec![
            r.id.to_string(),
            time::rfc3339_ms(r.created_ms),
            r.endpoint.clone(),
            r.event_type.clone(),
            r.call_id.clone(),
            r.status.clone(),
            r.attempts.to_string(),
            r.last_error.clone().unwrap_or_default(),
        ]);
    }
    println!("{}", t.render());
    Ok(ExitCode::SUCCESS)
}
