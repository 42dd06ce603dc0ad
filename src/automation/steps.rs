//! How a run executes: the worker claims queued runs, runs their steps in order from the first
//! unfinished one (a webhook becomes an outbox delivery, an action goes through the executor),
//! and records each step and the run's end.

use super::RunContext;
use crate::config::Agents;
use crate::config::{ActionSet, AutomationSpec, Step};
use crate::exec::{Budget, ToolCall};
use crate::state::Call;
use crate::store::{ClaimedRun, NewEvent, StepRecord, TargetRef};
use crate::template::{BodyTemplate, Redactor, RenderErrorKind, SecretSource};
use crate::time;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

use super::runner::*;

pub(crate) fn run_id(now: i64) -> String {
    format!("run_{}", crate::events::event_id(now))
}

pub(crate) fn render_body(
    body: &BodyTemplate,
    context: &RunContext,
    secrets: &dyn SecretSource,
) -> Result<Value, String> {
    render_body_kind(body, context, secrets).map_err(|e| e.to_string())
}

/// Checks a body against a payload before the run: only what the payload decides can fail
/// (`state.*` is written by earlier steps of the run).
pub(crate) fn check_body(
    body: &BodyTemplate,
    context: &RunContext,
    secrets: &dyn SecretSource,
) -> Result<Option<Value>, String> {
    match render_body_kind(body, context, secrets) {
        Ok(v) => Ok(Some(v)),
        Err(RenderErrorKind::Missing { variable }) if variable.starts_with("state.") => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

pub(crate) fn render_body_kind(
    body: &BodyTemplate,
    context: &RunContext,
    secrets: &dyn SecretSource,
) -> Result<Value, RenderErrorKind> {
    let mut out = Vec::new();
    body.render(
        &context.render_context(secrets),
        &mut Redactor::default(),
        &mut out,
    )?;
    // The renderer writes valid JSON; Null only if that ever broke.
    Ok(serde_json::from_slice(&out).unwrap_or(Value::Null))
}

/// The worker: claims a queued run whenever a permit is free and runs it on its own task.
pub(crate) async fn work(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    let wakes = inner.db.pg().map(|p| p.wakes());
    loop {
        if *stop.borrow() != Stop::Run {
            return;
        }
        let permit = tokio::select! {
            p = inner.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => continue,
        };
        let claimed = inner
            .db
            .claim_runs(time::now_ms(), 1, RUN_LEASE.as_millis() as i64)
            .await;
        let run = match claimed {
            Ok(mut runs) if !runs.is_empty() => runs.remove(0),
            Ok(_) => {
                drop(permit);
                match &wakes {
                    Some(w) => tokio::select! {
                        _ = inner.notify.notified() => {}
                        _ = w.runs.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                    },
                    None => tokio::select! {
                        _ = inner.notify.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                    },
                }
                continue;
            }
            Err(e) => {
                drop(permit);
                tracing::warn!(error = %e, "run log");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let inner2 = inner.clone();
        let mut abort = inner.stop.subscribe();
        tokio::spawn(async move {
            let id = run.id.clone();
            let renew = async {
                // Keep the run's lease while it runs (PostgreSQL: another process takes over a
                // run whose lease ran out, as when its process died).
                loop {
                    tokio::time::sleep(RUN_LEASE / 3).await;
                    let until = time::now_ms() + RUN_LEASE.as_millis() as i64;
                    if let Err(e) = inner2.db.renew_run(id.clone(), until).await {
                        tracing::warn!(error = %e, "run log: renewing a run's lease");
                    }
                }
            };
            tokio::select! {
                _ = execute(&inner2, run) => {}
                _ = renew => {}
                _ = abort.wait_for(|s| *s == Stop::Abort) => {}
            }
            drop(permit);
        });
    }
}

/// Runs one claimed run from its first unfinished step.
pub(crate) async fn execute(inner: &Inner, run: ClaimedRun) {
    let finish = |error: Option<String>| {
        let id = run.id.clone();
        async move {
            let now = time::now_ms();
            if let Some(e) = &error {
                tracing::warn!(target: "midcall::automation", run = %id, error = %e, "automation run failed");
                metrics::counter!("midcall_automation_runs_total", "status" => "failed")
                    .increment(1);
            } else {
                tracing::info!(target: "midcall::automation", run = %id, "automation run succeeded");
                metrics::counter!("midcall_automation_runs_total", "status" => "succeeded")
                    .increment(1);
            }
            if let Err(e) = inner.db.finish_run(id, error, now).await {
                tracing::warn!(error = %e, "run log");
            }
        }
    };
    tracing::info!(
        target: "midcall::automation",
        run = %run.id,
        automation = %run.automation,
        "automation run started"
    );
    let agents = current(&inner.agents);
    let Some((set, a)) = agents.automation(&run.automation) else {
        return finish(Some(format!(
            "automation \"{}\" is no longer in the config",
            run.automation
        )))
        .await;
    };
    let Ok(mut context) = serde_json::from_slice::<RunContext>(&run.context) else {
        return finish(Some("the run's stored context is unreadable".into())).await;
    };
    for (i, step) in a.steps.iter().enumerate().skip(run.done_steps) {
        let started = tokio::time::Instant::now();
        let (kind, result) = match step {
            Step::SendWebhook {
                url, headers, body, ..
            } => (
                "send_webhook",
                send_step(
                    inner,
                    &agents,
                    set.agent().id.as_str(),
                    &run.automation,
                    a,
                    (&run.id, i),
                    (url, headers, body.as_ref()),
                    &context,
                ),
            ),
            Step::RunAction { action, args } => (
                "run_action",
                action_step(inner, set, &run.id, i, action, args.as_ref(), &mut context).await,
            ),
        };
        let duration_ms = started.elapsed().as_millis() as i64;
        let (status, detail, delivery, new_context) = match result {
            Ok(StepDone::Queued(event, target)) => (
                "ok",
                "queued as delivery".to_string(),
                Some((event, target)),
                None,
            ),
            Ok(StepDone::Ran(detail)) => ("ok", detail, None, serde_json::to_vec(&context).ok()),
            Err(e) => ("failed", e, None, None),
        };
        let record = StepRecord {
            index: i as i64,
            kind: kind.to_string(),
            status: status.to_string(),
            detail: detail.clone(),
            duration_ms,
        };
        let stored = inner
            .db
            .record_step(
                run.id.clone(),
                record,
                delivery,
                new_context,
                time::now_ms(),
            )
            .await
            .map_err(|e| e.to_string());
        match stored {
            Ok(Some(_)) => inner.bus.wake(),
            Ok(None) => {}
            Err(e) => {
                return finish(Some(format!(
                    "step {} ({kind}): the run log failed: {e}",
                    i + 1
                )))
                .await
            }
        }
        if status == "failed" {
            return finish(Some(format!("step {} ({kind}): {detail}", i + 1))).await;
        }
    }
    finish(None).await
}

pub(crate) enum StepDone {
    /// An outbox event and its target, to store with the step.
    Queued(NewEvent, String),
    /// An action ran; what it did.
    Ran(String),
}

/// Renders the body (the run's payload when the step has none) and checks the URL and headers
/// render now; the delivery renders them again, with secrets, at each attempt.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send_step(
    inner: &Inner,
    agents: &Agents,
    agent: &str,
    stored: &str,
    a: &AutomationSpec,
    (run, index): (&str, usize),
    (url, headers, body): (
        &crate::template::UrlTemplate,
        &[(String, crate::template::Template)],
        Option<&BodyTemplate>,
    ),
    context: &RunContext,
) -> Result<StepDone, String> {
    let ctx = context.render_context(&*inner.secrets);
    let mut redactor = Redactor::default();
    url.render(&ctx, &mut redactor)
        .map_err(|e| format!("url: {e}"))?;
    for (name, t) in headers {
        t.render_header(&ctx, &mut redactor)
            .map_err(|e| format!("header \"{name}\": {e}"))?;
    }
    let body = match body {
        Some(b) => {
            let mut out = Vec::new();
            b.render(&ctx, &mut redactor, &mut out)
                .map_err(|e| format!("body: {e}"))?;
            out
        }
        None => serde_json::to_vec(&context.payload).map_err(|e| e.to_string())?,
    };
    let now = time::now_ms();
    let target = serde_json::to_string(&TargetRef {
        run: run.to_string(),
        automation: stored.to_string(),
        step: index,
    })
    .map_err(|e| e.to_string())?;
    let call_id = if context.call.id.is_empty() {
        run.to_string()
    } else {
        context.call.id.clone()
    };
    Ok(StepDone::Queued(
        NewEvent {
            event_id: crate::events::event_id(now),
            kind: format!("automation:{}", a.id),
            call_id,
            body,
            endpoints: vec![agents.name(agent, &step_endpoint(&a.id, index))],
        },
        target,
    ))
}

/// The outbox endpoint name of an automation's send_webhook step.
pub(crate) fn step_endpoint(automation: &str, index: usize) -> String {
    format!("automation {automation} step {}", index + 1)
}

pub(crate) async fn action_step(
    inner: &Inner,
    set: &ActionSet,
    run: &str,
    index: usize,
    action: &str,
    args: Option<&BodyTemplate>,
    context: &mut RunContext,
) -> Result<StepDone, String> {
    let spec = set
        .action(action)
        .ok_or_else(|| format!("no action \"{action}\""))?
        .clone();
    let args = match args {
        Some(t) => render_body(t, context, &*inner.secrets).map_err(|e| format!("args: {e}"))?,
        None => json!({}),
    };
    let mut call = Call::new(context.call.clone());
    call.state = context.state.clone();
    call.transcript = context.transcript.clone();
    let budget = Budget::new(spec.timeout());
    let outcome = inner
        .runtime
        .execute(
            &spec,
            &mut call,
            ToolCall::new(format!("{run}:{index}"), args),
            &budget,
        )
        .await;
    context.state = call.state;
    let http = outcome
        .http_status
        .map(|s| format!(", HTTP {s}"))
        .unwrap_or_default();
    if outcome.status.is_success() {
        Ok(StepDone::Ran(format!(
            "{action}: {}{http}, values {}",
            outcome.status.as_str(),
            crate::exec::values_json(&outcome.values)
        )))
    } else {
        let why = outcome.error.map(|e| format!(": {e}")).unwrap_or_default();
        Err(format!("{action}: {}{http}{why}", outcome.status.as_str()))
    }
}
