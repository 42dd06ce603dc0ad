//! Automations: what runs when a call completes or an authenticated webhook arrives.
//!
//! A run is stored in the outbox database (`runs`, `run_steps`) before anyone is told it was
//! queued, then executed by a worker task: `send_webhook` steps become outbox deliveries
//! (signed, retried, logged like event webhooks; URL, headers and secret rendered at each
//! attempt, so no secret is stored), `run_action` steps go through the executor. A failing
//! step stops its run and the run log says why. Runs interrupted by a shutdown resume at their
//! first unfinished step on the next start.

mod inbound;
pub(crate) mod runlog;
mod runner;

pub use inbound::{
    check_signature, is_json, parse_payload, InboundServer, MetricsRender, REPLAY_WINDOW,
    SIGNATURE_TOLERANCE_S,
};
pub use runlog::{RunLog, RunRecord, StepRecord};
pub use runner::{Automations, AutomationsBuilder, CallEnd, StartError};

use serde_json::{json, Value};

use crate::config::ActionSet;
use crate::state::{CallInfo, ConversationState, Transcript};
use crate::template::{RenderContext, SecretSource};

/// The `target` of an automation delivery: which run and step it belongs to.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct TargetRef {
    pub(crate) run: String,
    pub(crate) automation: String,
    pub(crate) step: usize,
}

/// What an automation run's templates read: call facts, state, transcript and payload.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct RunContext {
    pub(crate) call: CallInfo,
    pub(crate) state: ConversationState,
    #[serde(default)]
    pub(crate) transcript: Transcript,
    #[serde(default)]
    pub(crate) payload: Value,
}

impl RunContext {
    /// What a run's templates read: its call, state, transcript and payload (no `args`).
    pub(crate) fn render_context<'a>(&'a self, secrets: &'a dyn SecretSource) -> RenderContext<'a> {
        RenderContext {
            call: &self.call,
            state: &self.state,
            args: &Value::Null,
            transcript: &self.transcript,
            secrets,
            payload: Some(&self.payload),
        }
    }
}

impl Default for RunContext {
    fn default() -> Self {
        RunContext {
            call: CallInfo {
                id: String::new(),
                agent_id: String::new(),
                tenant: String::new(),
                from_number: String::new(),
                to_number: String::new(),
                is_outgoing: false,
                started_at: String::new(),
            },
            state: ConversationState::new(),
            transcript: Transcript::default(),
            payload: Value::Null,
        }
    }
}

/// The post-call payload (`event_post_call_processing_completed`'s, and `payload.*` of
/// call_completed automations): call id, numbers, duration, outcome, agent id, name and phone
/// number, the full transcript, and the call's state variables as `custom_fields`.
pub fn post_call_payload(set: &ActionSet, call: &crate::state::Call, end: &CallEnd) -> Value {
    let agent = set.agent();
    json!({
        "call_id": call.info.id,
        "from_number": call.info.from_number,
        "to_number": call.info.to_number,
        "is_outgoing": call.info.is_outgoing,
        "started_at": call.info.started_at,
        "duration_seconds": (end.duration.as_millis() as f64) / 1000.0,
        "end_reason": end.end_reason,
        "outcome": end.outcome,
        "agent": {
            "id": agent.id,
            "name": agent.name.as_deref().unwrap_or(&agent.id),
            "phone_number": agent.phone_number,
        },
        "transcript": call.transcript.to_value(),
        "custom_fields": call.state.to_value(),
    })
}
