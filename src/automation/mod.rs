//! Automations: what runs when a call completes or an authenticated webhook arrives.
//!
//! A run is stored in the outbox database (`runs`, `run_steps`) before anyone is told it was
//! queued, then executed by a worker task: `send_webhook` steps become outbox deliveries
//! (signed, retried, logged like event webhooks; URL, headers and secret rendered at each
//! attempt, so no secret is stored), `run_action` steps go through the executor. A failing
//! step stops its run and the run log says why. Runs interrupted by a shutdown resume at their
//! first unfinished step on the next start.
//!
//! Serves no HTTP (`server` does) and owns no SQL (`store` does). Hears of a call's end only
//! through [`CallCompletion`](crate::exec::CallCompletion), which it registers. May call:
//! `exec`, `events`, `store`, `cache`, `config` and the leaves.

pub(crate) mod runlog;
mod runner;
mod steps;

pub use crate::state::CallEnd;
pub use crate::store::{RunRecord, StepRecord};
pub use runlog::RunLog;
pub use runner::{
    Automations, AutomationsBuilder, StartError, StartupError, WebhookTarget, REPLAY_WINDOW,
};
pub(crate) use steps::step_endpoint;

/// What an automation run's templates read: call facts, state, transcript and payload.
pub(crate) use crate::template::RenderInputs as RunContext;

pub use crate::events::post_call_payload;
