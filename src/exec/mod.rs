//! The executor: the path of one mid-call action, its budget, outcome, fallback, breaker and
//! filler.

mod breaker;
mod budget;
mod dedupe;
mod error;
mod idempotency;
mod outcome;
mod runtime;

pub use crate::cache::CacheStatus;
pub use crate::transport::parse_retry_after;
pub use budget::Budget;
pub(crate) use dedupe::RecentToolCalls;
pub use dedupe::DEFAULT_DEDUPE_WINDOW;
pub use error::{Error, Fault, Retry};
pub use outcome::{values_json, Outcome, Status, Timings};
pub use runtime::*;
