//! The executor: the path of one mid-call action, its budget, outcome, fallback, breaker and
//! filler, and the call session that drives a live call.
//!
//! The path, one file per step in path order, each a set of functions over the runtime's
//! parts (`parts.rs`: the pool, breakers, caches, gates, bus, settings):
//! - `plan.rs` (sync, reads the call): arguments, rendered request, egress scheme, cache key;
//! - `obtain.rs` (async, never touches the call): cache or shared fetch; `send.rs`: the send
//!   with its retry loop, the host's cap and the hedge, response checks, parse, extraction;
//! - `apply.rs` (sync, writes the call): state or fallback, outcome, metrics, `action` event.
//!
//! Around it: `builder.rs` (configuration, once), `runtime.rs` (the process-wide runtime and
//! the one-shot path), `session.rs` (a live call: duplicate protection, cancellation, held
//! side effects, the call's end), `task.rs` (one tool call's run on its own task) and
//! `handle.rs` (one tool call's future, filler and cancel), and `live.rs` (the state a call's
//! session, tasks and handles share). `budget.rs` holds the turn's budget and each action's
//! deadline under it; `apply.rs` makes every [`Outcome`]. The files import each other without
//! a circle: the steps never import the runtime handle, and a task or a handle never the
//! session that spawns it.
//!
//! Nothing below exec knows about budgets except through the deadline it is handed. Tells
//! automation of a call's end only through [`CallCompletion`], which automation registers.
//! May call: `events`, `store`, `cache`, `config`, `transport`, `template`, `jsonpath`,
//! `state`, `time`.

mod apply;
mod breaker;
mod budget;
mod builder;
mod dedupe;
mod error;
mod gate;
mod handle;
mod idempotency;
mod live;
mod obtain;
mod outcome;
mod parts;
mod plan;
mod priority;
mod runtime;
mod send;
mod session;
mod task;
mod timings;

#[cfg(test)]
mod tests;

pub use crate::cache::CacheStatus;
pub use crate::transport::parse_retry_after;
pub use apply::action_event;
pub use budget::Budget;
pub use builder::*;
pub use dedupe::DEFAULT_DEDUPE_WINDOW;
pub use error::{BuildError, Error, Fault, Retry};
pub use handle::ToolHandle;
pub use live::StartReport;
pub use outcome::{values_json, Outcome, Status, Timings};
pub use plan::ToolCall;
pub use priority::set_thread_nice;
pub use runtime::{CallCompletion, Runtime, WarmReport};
pub use send::MIN_RETRY_ATTEMPT;
pub use session::{CallSession, EndError};
