//! Protection against duplicate tool calls: a model that re-issues the same tool call after a
//! barge-in gets the earlier outcome back, and nothing is sent again.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::idempotency::canonical_json;
use super::outcome::Outcome;

/// Default window in which an identical tool call is answered from the earlier outcome: 30 s.
pub const DEFAULT_DEDUPE_WINDOW: Duration = Duration::from_secs(30);

/// Most successes remembered per call.
const MAX_REMEMBERED: usize = 64;

/// The successes of one call's recent tool calls, by action and canonical arguments.
#[derive(Debug, Clone, Default)]
pub(crate) struct RecentToolCalls {
    entries: Vec<(u128, Instant, Outcome)>,
}

pub(crate) fn dedupe_key(action: &str, args: &Value) -> u128 {
    let mut text = String::with_capacity(64);
    text.push_str(action);
    text.push('\0');
    canonical_json(args, &mut text);
    crate::cache::keyed_hash128(|h| h.write(text.as_bytes()))
}

impl RecentToolCalls {
    /// The earlier outcome of an identical successful tool call within `window`.
    pub(crate) fn find(&self, key: u128, window: Duration) -> Option<&Outcome> {
        let now = Instant::now();
        self.entries
            .iter()
            .rev()
            .find(|(k, at, _)| *k == key && now.saturating_duration_since(*at) < window)
            .map(|(_, _, o)| o)
    }

    pub(crate) fn remember(&mut self, key: u128, outcome: &Outcome, window: Duration) {
        let now = Instant::now();
        self.entries
            .retain(|(k, at, _)| *k != key && now.saturating_duration_since(*at) <= window);
        if self.entries.len() >= MAX_REMEMBERED {
            self.entries.remove(0);
        }
        self.entries.push((key, now, outcome.clone()));
    }
}
