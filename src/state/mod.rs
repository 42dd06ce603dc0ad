//! Call facts, conversation variables and the transcript: everything an action may read or write.
//!
//! A leaf: imports nothing of the crate.

mod transcript;
mod variables;

#[cfg(test)]
mod tests;

pub use transcript::{Speaker, Transcript, TranscriptError, Turn};
pub(crate) use variables::{json_len, kind as kind_of};
pub use variables::{ConversationState, PathError, StateError, StatePath, DEFAULT_STATE_CAP_BYTES};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What is known about the phone call itself. Read by templates as `call.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallInfo {
    /// The call's id, unique per call.
    pub id: String,
    /// The agent handling the call.
    pub agent_id: String,
    /// The tenant (customer account) the agent belongs to; the cache and events never cross it.
    pub tenant: String,
    /// The caller's number (E.164) on an inbound call, the agent's on an outbound one.
    pub from_number: String,
    /// The number that was dialled.
    pub to_number: String,
    /// True when the agent placed the call.
    #[serde(default)]
    pub is_outgoing: bool,
    /// When the call connected, RFC 3339 (`2025-11-03T19:33:18.330Z`).
    pub started_at: String,
}

impl CallInfo {
    /// The names templates may use after `call.`.
    pub const FIELDS: &'static [&'static str] = &[
        "id",
        "agent_id",
        "tenant",
        "from_number",
        "to_number",
        "is_outgoing",
        "started_at",
    ];

    /// The value of one `call.*` field, or `None` for an unknown name.
    pub fn field(&self, name: &str) -> Option<Value> {
        Some(match name {
            "id" => Value::String(self.id.clone()),
            "agent_id" => Value::String(self.agent_id.clone()),
            "tenant" => Value::String(self.tenant.clone()),
            "from_number" => Value::String(self.from_number.clone()),
            "to_number" => Value::String(self.to_number.clone()),
            "is_outgoing" => Value::Bool(self.is_outgoing),
            "started_at" => Value::String(self.started_at.clone()),
            _ => return None,
        })
    }
}

/// One call as midcall sees it: its facts, its variables, and what has been said.
#[derive(Debug, Clone)]
pub struct Call {
    /// The call's facts (`call.*` in templates).
    pub info: CallInfo,
    /// The conversation variables (`state.*` in templates), written by extractions and fallbacks.
    pub state: ConversationState,
    /// The turns so far (`transcript` in templates).
    pub transcript: Transcript,
}

impl Call {
    /// A call with empty state (default size cap) and an empty transcript.
    pub fn new(info: CallInfo) -> Self {
        Call {
            info,
            state: ConversationState::new(),
            transcript: Transcript::default(),
        }
    }
}

/// How a call ended: what `CallSession::end` publishes and the call_completed automations
/// read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallEnd {
    /// How long the call lasted.
    pub duration: std::time::Duration,
    /// Why it ended (`user_hangup`, `agent_hangup`, `transfer`, ...).
    pub end_reason: String,
    /// The call's outcome as the agent judged it (`appointment_booked`), if any.
    pub outcome: Option<String>,
}

impl CallEnd {
    /// A call that lasted `duration` and ended for `end_reason`, with no outcome.
    pub fn new(duration: std::time::Duration, end_reason: impl Into<String>) -> CallEnd {
        CallEnd {
            duration,
            end_reason: end_reason.into(),
            outcome: None,
        }
    }

    /// With an outcome.
    pub fn outcome(mut self, outcome: impl Into<String>) -> CallEnd {
        self.outcome = Some(outcome.into());
        self
    }
}
