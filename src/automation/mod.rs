//! Automations: what runs when a call completes or an authenticated webhook arrives.
//!
//! A run is stored in the outbox database (`runs`, `run_steps`) before anyone is told it was
//! queued, then executed by a worker task: `send_webhook` steps become outbox deliveries
//! (signed, retried, logged like event webhooks; URL, headers and secret rendered at each
//! attempt, so no secret is stored), `run_action` steps go through the executor. A failing
//! step stops its run and the run log says why. Runs interrupted by a shutdown resume at their
//! first unfinished step on the next start.

mod admin;
mod agents;
mod console;
mod inbound;
pub(crate) mod runlog;
mod runner;

pub use crate::state::CallEnd;
pub use admin::{ADMIN_BURST, ADMIN_MAX_LIMIT, ADMIN_RATE_PER_SECOND};
pub use agents::Agents;
pub use console::{COOKIE as CONSOLE_COOKIE, SESSION_S as CONSOLE_SESSION_S};
pub use inbound::{
    check_signature, is_json, parse_payload, InboundServer, MetricsRender, DEFAULT_READ_TIMEOUT,
    REPLAY_WINDOW, SIGNATURE_TOLERANCE_S,
};
pub use runlog::{RunLog, RunRecord, StepRecord};
pub use runner::{Automations, AutomationsBuilder, StartError, WebhookTarget};

/// The `target` of an automation delivery: which run and step it belongs to.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct TargetRef {
    pub(crate) run: String,
    pub(crate) automation: String,
    pub(crate) step: usize,
}

/// What an automation run's templates read: call facts, state, transcript and payload.
pub(crate) use crate::template::RenderInputs as RunContext;

pub use crate::events::post_call_payload;
