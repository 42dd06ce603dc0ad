//! The records the store reads and writes: what is stored (events, deliveries, attempts, runs,
//! steps) and what is read back for the logs. Both engines use these types, so a new column is
//! one field here and one statement per engine.

use serde::Serialize;

/// The `target` of an automation delivery: which run and step it belongs to.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct TargetRef {
    pub(crate) run: String,
    pub(crate) automation: String,
    pub(crate) step: usize,
}

/// One event to store with the endpoints it goes to.
#[derive(Debug, Clone)]
pub(crate) struct NewEvent {
    pub(crate) event_id: String,
    pub(crate) kind: String,
    pub(crate) call_id: String,
    pub(crate) body: Vec<u8>,
    pub(crate) endpoints: Vec<String>,
}

/// The `webhook-id` of an automation step's delivery: derived from its run and step, so a step
/// executed again (its process died before recording it) carries the same id and a receiver
/// can drop the duplicate.
pub(crate) fn step_webhook_id(target: &str, event_id: &str) -> String {
    match serde_json::from_str::<TargetRef>(target) {
        Ok(t) => format!("msg_{}_step{}", t.run, t.step),
        Err(_) => format!("msg_{event_id}_0"),
    }
}

/// A delivery taken for an attempt.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) endpoint: String,
    pub(crate) webhook_id: String,
    pub(crate) attempts: i64,
    pub(crate) body: Vec<u8>,
    /// For an automation's `send_webhook` step: which run and step (JSON), so the URL,
    /// headers and signing secret are rendered at delivery time and never stored.
    pub(crate) target: Option<String>,
    /// For such a delivery: its run's stored context (what the templates read).
    pub(crate) context: Option<Vec<u8>>,
}

/// What an attempt decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    Delivered,
    Retry {
        due_ms: i64,
    },
    Failed,
    /// 410 Gone, or failing past the disable window: the endpoint is disabled.
    Disable {
        reason: String,
    },
}

/// One attempt's facts.
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    pub(crate) at_ms: i64,
    pub(crate) duration_ms: i64,
    pub(crate) status_code: Option<u16>,
    pub(crate) error: Option<String>,
    pub(crate) response_prefix: Vec<u8>,
}

/// A delivery as the log shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryRecord {
    /// The delivery's id (for replay).
    pub id: i64,
    /// The event type (`event_...`).
    pub event_type: String,
    /// The call.
    pub call_id: String,
    /// The endpoint (its label, or its URL without query).
    pub endpoint: String,
    /// `pending`, `delivered`, `failed` or `skipped`.
    pub status: String,
    /// Attempts made.
    pub attempts: i64,
    /// When it was published (ms since the epoch).
    pub created_ms: i64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// The `webhook-id` header it carries.
    pub webhook_id: String,
    /// When the next attempt is due (ms since the epoch), while it is pending.
    pub next_attempt_ms: Option<i64>,
}

/// One attempt as the log shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptRecord {
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// How long it took.
    pub duration_ms: i64,
    /// The HTTP status, if the endpoint answered.
    pub status_code: Option<u16>,
    /// The error kind, if it did not.
    pub error: Option<String>,
    /// The first 8 KiB of the response body.
    pub response_prefix: String,
}

/// A run as the log shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunRecord {
    /// The run's id (`run_...`).
    pub id: String,
    /// The automation's id.
    pub automation: String,
    /// `call_completed` or `webhook`.
    pub trigger: String,
    /// The call, for call_completed runs.
    pub call_id: Option<String>,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub status: String,
    /// When it was queued (ms since the epoch).
    pub created_ms: i64,
    /// When it finished, if it has.
    pub finished_ms: Option<i64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Its finished steps, in order.
    pub steps: Vec<StepRecord>,
}

/// One finished step of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    /// Its position in the automation (0-based).
    pub index: i64,
    /// `send_webhook` or `run_action`.
    pub kind: String,
    /// `ok` or `failed`.
    pub status: String,
    /// What it did (`queued as delivery 12`, `ok: HTTP 201, ...`) or why it failed.
    pub detail: String,
    /// How long it took.
    pub duration_ms: i64,
}

/// A queued run.
pub(crate) struct NewRun<'a> {
    pub(crate) id: &'a str,
    pub(crate) automation: &'a str,
    pub(crate) trigger: &'a str,
    pub(crate) call_id: Option<&'a str>,
    pub(crate) context: &'a [u8],
}

/// A run taken for execution.
pub(crate) struct ClaimedRun {
    pub(crate) id: String,
    pub(crate) automation: String,
    pub(crate) context: Vec<u8>,
    /// Steps already finished (a resumed run starts after them).
    pub(crate) done_steps: usize,
}

/// A queued run that owns its fields (to cross onto a blocking thread).
pub(crate) struct OwnedRun {
    pub(crate) id: String,
    pub(crate) automation: String,
    pub(crate) trigger: &'static str,
    pub(crate) call_id: Option<String>,
    pub(crate) context: Vec<u8>,
}

impl OwnedRun {
    pub(crate) fn borrow(&self) -> NewRun<'_> {
        NewRun {
            id: &self.id,
            automation: &self.automation,
            trigger: self.trigger,
            call_id: self.call_id.as_deref(),
            context: &self.context,
        }
    }
}
