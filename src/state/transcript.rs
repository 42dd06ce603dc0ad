//! The transcript: the turns of the conversation, in the wire shape webhooks carry.

use serde::{Deserialize, Serialize};

/// Who spoke a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    /// The voice agent.
    Ai,
    /// The caller.
    User,
}

/// One turn: `{"transcript", "speaker", "createdAt", "step"?, "node_id"?}`.
///
/// `step` and `node_id` exist on AI turns only; deserializing a user turn that carries them is
/// an error, so a round trip is exact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTurn", into = "RawTurn")]
pub struct Turn {
    text: String,
    speaker: Speaker,
    created_at: String,
    step: Option<u64>,
    node_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTurn {
    transcript: String,
    speaker: Speaker,
    #[serde(rename = "createdAt")]
    created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_id: Option<String>,
}

/// A transcript turn that breaks the shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranscriptError {
    /// `step` or `node_id` on a user turn.
    #[error("transcript turn: \"{0}\" is only allowed on ai turns")]
    AiOnlyField(&'static str),
}

impl TryFrom<RawTurn> for Turn {
    type Error = TranscriptError;
    fn try_from(raw: RawTurn) -> Result<Self, Self::Error> {
        if raw.speaker == Speaker::User {
            if raw.step.is_some() {
                return Err(TranscriptError::AiOnlyField("step"));
            }
            if raw.node_id.is_some() {
                return Err(TranscriptError::AiOnlyField("node_id"));
            }
        }
        Ok(Turn {
            text: raw.transcript,
            speaker: raw.speaker,
            created_at: raw.created_at,
            step: raw.step,
            node_id: raw.node_id,
        })
    }
}

impl From<Turn> for RawTurn {
    fn from(t: Turn) -> Self {
        RawTurn {
            transcript: t.text,
            speaker: t.speaker,
            created_at: t.created_at,
            step: t.step,
            node_id: t.node_id,
        }
    }
}

impl Turn {
    /// A caller's turn. `created_at` is RFC 3339, e.g. `2025-11-03T19:33:18.330Z`.
    pub fn user(text: impl Into<String>, created_at: impl Into<String>) -> Turn {
        Turn {
            text: text.into(),
            speaker: Speaker::User,
            created_at: created_at.into(),
            step: None,
            node_id: None,
        }
    }

    /// An agent's turn, with the optional step number and flow node it was spoken from.
    pub fn ai(
        text: impl Into<String>,
        created_at: impl Into<String>,
        step: Option<u64>,
        node_id: Option<String>,
    ) -> Turn {
        Turn {
            text: text.into(),
            speaker: Speaker::Ai,
            created_at: created_at.into(),
            step,
            node_id,
        }
    }

    /// What was said.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Who said it.
    pub fn speaker(&self) -> Speaker {
        self.speaker
    }

    /// When, RFC 3339.
    pub fn created_at(&self) -> &str {
        &self.created_at
    }

    /// The agent's step number (AI turns only).
    pub fn step(&self) -> Option<u64> {
        self.step
    }

    /// The agent's flow node (AI turns only).
    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }
}

/// The turns of a call, oldest first. Serializes as a JSON array of [`Turn`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Transcript {
    turns: Vec<Turn>,
}

impl Transcript {
    /// Appends a turn.
    pub fn push(&mut self, turn: Turn) {
        self.turns.push(turn);
    }

    /// The turns, oldest first.
    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }

    /// The transcript as a JSON array.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}
