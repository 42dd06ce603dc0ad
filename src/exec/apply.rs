//! Step 3 of the path (sync, writes the call): values into state, or the fallback; the
//! outcome and the model-facing result; cache invalidation; metrics and the `action` event.
//! Every [`Outcome`] a tool call ends with is made here: applied, deduplicated, or ended
//! before it could be applied.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::error::{Error, Failure, Fault, Kind, Retry};
use super::outcome::FetchResult;
use super::outcome::{llm_result, values_object, Outcome, Status, Timings};
use super::parts::Parts;
use crate::cache::{CacheStatus, ScopeId};
use crate::config::ActionSpec;
use crate::events::{Event, EventType};
use crate::state::Call;

/// What the apply step needs to know besides the result.
pub(crate) struct Applied<'a> {
    pub(crate) tool_call_id: Option<String>,
    pub(crate) cache: CacheStatus,
    pub(crate) filler_fired: bool,
    /// It finished after its handle was cancelled (`on_interrupt = "finish"`).
    pub(crate) detached: bool,
    pub(crate) started: Instant,
    pub(crate) span: &'a tracing::Span,
}

impl Parts {
    /// Applies the result to state (values, or the fallback) and builds the outcome.
    pub(crate) fn apply(
        &self,
        action: &ActionSpec,
        call: &mut Call,
        result: FetchResult,
        how: Applied<'_>,
    ) -> Outcome {
        let limit = self.llm_result_max_bytes();
        let mut outcome = Outcome::new(action.name(), how.tool_call_id.clone());
        outcome.filler_fired = how.filler_fired;
        outcome.cache = how.cache;
        match result {
            Ok(f) => {
                outcome.status = if action.is_async() {
                    Status::Accepted
                } else if matches!(how.cache, CacheStatus::Hit | CacheStatus::Stale) {
                    Status::CacheHit
                } else {
                    Status::Ok
                };
                outcome.http_status = (f.http_status != 0).then_some(f.http_status);
                outcome.attempts = f.attempts;
                outcome.timings = f.timings;
                let refused = f
                    .values
                    .iter()
                    .find_map(|(path, value)| call.state.set(path, value.clone()).err());
                match refused {
                    None => {
                        outcome.llm_result = if outcome.status == Status::Accepted {
                            json!({"accepted": true})
                        } else {
                            llm_result(outcome.status, &f.values, None, limit)
                        };
                        outcome.values = f.values;
                    }
                    Some(e) => {
                        outcome.status = Status::InvalidResponse;
                        outcome.error = Some(Error::new(
                            Kind::State,
                            Fault::Local,
                            Retry::No,
                            format!("action \"{}\": {e}", action.name()),
                        ));
                    }
                }
            }
            Err(f) => {
                outcome.status = f.status();
                outcome.http_status = f.http_status;
                outcome.attempts = f.attempts;
                outcome.timings = f.timings;
                outcome.error = Some(f.error);
            }
        }
        if outcome.status == Status::Cancelled {
            // The caller moved on: no fallback line, no fallback writes.
            outcome.llm_result = llm_result(outcome.status, &[], outcome.error.as_ref(), limit);
        } else if !outcome.status.is_success() {
            let fallback = action.on_failure();
            for (path, value) in &fallback.set {
                if let Err(e) = call.state.set(path, value.clone()) {
                    tracing::warn!(parent: how.span, error = %e, "fallback state write refused");
                }
            }
            outcome.say = fallback.say.clone();
            outcome.llm_result = llm_result(outcome.status, &[], outcome.error.as_ref(), limit);
        }
        if outcome.status == Status::Ok {
            for (fingerprint, scope) in &action.invalidates_resolved {
                self.invalidate_scope(*fingerprint, &ScopeId::of(*scope, &call.info));
            }
        }
        outcome.timings.total = how.started.elapsed();
        outcome.detached = how.detached;
        self.report(&outcome, call, how.span);
        outcome
    }

    /// Span fields, metrics and the `action` event (when a bus is attached) of an ended tool
    /// call. Never waits: publishing only queues.
    pub(crate) fn report(&self, outcome: &Outcome, call: &Call, span: &tracing::Span) {
        span.record("status", outcome.status.as_str());
        span.record("attempts", outcome.attempts);
        span.record("cache", outcome.cache.as_str());
        report_metrics(&outcome.action, outcome.status, outcome.timings.total);
        if let Some(bus) = self.event_bus() {
            if let Err(e) = bus.publish(&action_event(outcome), &call.info) {
                tracing::debug!(parent: span, error = %e, "action event not queued");
            }
        }
    }
}

/// An action's outcome as an event: name, tool call id, status, timings and extracted values
/// (never secrets: the rendered request is not part of it).
pub fn action_event(outcome: &Outcome) -> Event {
    Event::new(
        EventType::Action,
        json!({
            "action": outcome.action,
            "tool_call_id": outcome.tool_call_id,
            "status": outcome.status.as_str(),
            "http_status": outcome.http_status,
            "timings": outcome.timings,
            "values": values_object(&outcome.values),
            "cache": outcome.cache.as_str(),
            "deduplicated": outcome.deduplicated,
            "detached": outcome.detached,
        }),
    )
}

/// The outcome of a tool call that ended with `failure` without reaching the apply step
/// (refused before it started, cancelled while detached, stopped with its task): no state is
/// written and no fallback spoken. `limit` bounds the model-facing result (none: left empty);
/// `started` gives the total time.
pub(crate) fn ended(
    action: &str,
    tool_call_id: Option<String>,
    failure: Failure,
    started: Option<Instant>,
    limit: Option<usize>,
) -> Outcome {
    let mut o = Outcome::new(action, tool_call_id);
    o.status = failure.status();
    if let Some(limit) = limit {
        o.llm_result = llm_result(o.status, &[], Some(&failure.error), limit);
    }
    if let Some(started) = started {
        o.timings.total = started.elapsed();
    }
    o.error = Some(failure.error);
    o
}

/// The outcome of a tool call answered by an earlier or concurrent identical one: its values
/// and status, marked deduplicated, with nothing sent.
pub(crate) fn deduplicated(
    earlier: Outcome,
    tool_call_id: Option<String>,
    started: Instant,
) -> Outcome {
    let mut o = earlier;
    o.tool_call_id = tool_call_id;
    o.deduplicated = true;
    o.detached = false;
    o.attempts = 0;
    o.filler_fired = false;
    o.timings = Timings {
        total: started.elapsed(),
        ..Timings::default()
    };
    metrics::counter!("midcall_deduplicated_total", "action" => o.action.clone()).increment(1);
    o
}

/// The failure of a cancelled tool call.
pub(crate) fn cancelled(action: &str, why: &str) -> Box<Failure> {
    Failure::new(
        Kind::Cancelled,
        Fault::Caller,
        Retry::Yes,
        format!("action \"{action}\": cancelled ({why})"),
    )
}

pub(crate) fn report_metrics(action: &str, status: Status, elapsed: Duration) {
    metrics::histogram!("midcall_action_duration_seconds", "action" => action.to_string(), "status" => status.as_str())
        .record(elapsed.as_secs_f64());
    metrics::counter!("midcall_actions_total", "action" => action.to_string(), "status" => status.as_str())
        .increment(1);
}
