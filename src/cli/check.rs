//! `midcall check`: load and validate agent files.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use midcall::{ActionSet, ActionSpec};

/// Validate agent files and report every problem at once.
///
/// Validate agent config files, or directories of them (every *.toml and *.json): exit 0 with
/// one summary line per action, or exit 2 with every error (file:line:column: action: field:
/// message). Several files or a directory are also checked as `serve` would load them: agent
/// ids unique, one [egress], no secret name read by two tenants.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  midcall check examples/front-desk/agent.toml examples/outage-line/agent.toml\n  midcall check agents/"
)]
pub(crate) struct CheckArgs {
    /// Agent files (TOML, or JSON when the name ends in .json), or directories of them.
    #[arg(required = true)]
    files: Vec<String>,
    /// Print one JSON object per file instead of the summary.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: CheckArgs) -> Result<ExitCode, String> {
    let mut failed = false;
    let files = super::agents::expand(&args.files)?;
    let mut sets = Vec::new();
    for path in &files.paths {
        let file = &path.display().to_string();
        match ActionSet::load(path) {
            Ok(set) => {
                if args.json {
                    println!("{}", summary_json(file, &set));
                } else {
                    print_summary(file, &set);
                }
                sets.push(std::sync::Arc::new(set));
            }
            Err(e) => {
                failed = true;
                if args.json {
                    let errors: Vec<String> = e.errors.iter().map(|e| e.to_string()).collect();
                    println!("{}", json!({"file": file, "ok": false, "errors": errors}));
                } else {
                    for err in &e.errors {
                        eprintln!("error: {err}");
                    }
                }
            }
        }
    }
    // What serve would refuse when given the same arguments.
    if files.many && !failed {
        if let Err(e) = midcall::config::Agents::many(sets) {
            failed = true;
            if args.json {
                println!(
                    "{}",
                    json!({"files": args.files, "ok": false, "errors": [e.to_string()]})
                );
            } else {
                eprintln!("error: {}: {e}", args.files.join(", "));
            }
        }
    }
    Ok(if failed {
        ExitCode::from(super::EXIT_BAD_INPUT)
    } else {
        ExitCode::SUCCESS
    })
}

fn traits(a: &ActionSpec) -> Vec<String> {
    let mut t = vec![format!("timeout {}ms", a.timeout().as_millis())];
    if let Some(c) = a.cache() {
        t.push(format!("cache {}s/{}", c.ttl.as_secs(), c.scope.as_str()));
    }
    if a.prefetch().is_some() {
        t.push("prefetch".into());
    }
    if let Some(f) = a.filler() {
        t.push(format!("filler {}ms", f.after.as_millis()));
    }
    if !a.extractor().is_empty() {
        t.push(format!("extract {}", a.extractor().rules().len()));
    }
    if a.on_failure().say.is_some() || !a.on_failure().set.is_empty() {
        t.push("fallback".into());
    }
    if a.is_async() {
        t.push("async".into());
    }
    t
}

fn print_summary(file: &str, set: &ActionSet) {
    let agent = set.agent();
    println!(
        "{file}: ok, agent \"{}\" (tenant \"{}\"): {}, {}, {}",
        agent.id,
        agent.tenant,
        super::count(set.actions().len(), "action", "actions"),
        super::count(set.webhooks().len(), "webhook", "webhooks"),
        super::count(set.automations().len(), "automation", "automations")
    );
    let width = set
        .actions()
        .iter()
        .map(|a| a.name().len())
        .max()
        .unwrap_or(0);
    for a in set.actions() {
        println!(
            "  {:width$}  {:6} {:40}  {}",
            a.name(),
            a.method().as_str(),
            a.url().origin(),
            traits(a).join(", "),
        );
    }
}

fn summary_json(file: &str, set: &ActionSet) -> serde_json::Value {
    let actions: Vec<_> = set
        .actions()
        .iter()
        .map(|a| {
            json!({
                "name": a.name(),
                "method": a.method().as_str(),
                "origin": a.url().origin(),
                "timeout_ms": a.timeout().as_millis() as u64,
                "traits": traits(a),
            })
        })
        .collect();
    json!({
        "file": file,
        "ok": true,
        "agent": set.agent().id,
        "tenant": set.agent().tenant,
        "actions": actions,
        "webhooks": set.webhooks().len(),
        "automations": set.automations().len(),
    })
}
