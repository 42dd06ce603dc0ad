//! The time a turn may spend on actions ([`Budget`]), and one action's deadline under it
//! ([`ActionDeadline`]: the earlier of its own timeout and the budget, and which one it was).

use std::time::Duration;

use tokio::time::Instant;

use crate::config::ActionSpec;
use crate::transport::Deadline;

/// The time the agent runtime gives one turn's actions. Each action runs until the earlier of
/// its own `timeout_ms` and the budget's deadline. Copy it freely; it is one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    deadline: Instant,
}

impl Budget {
    /// A budget of `time` from now (tokio's clock).
    pub fn new(time: Duration) -> Budget {
        Budget {
            deadline: Instant::now() + time,
        }
    }

    /// A budget ending at `deadline`.
    pub fn until(deadline: Instant) -> Budget {
        Budget { deadline }
    }

    /// A budget with no limit of its own (actions keep their `timeout_ms`).
    pub fn unlimited() -> Budget {
        Budget::new(Duration::from_secs(86_400 * 365))
    }

    /// When it ends.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The deadline for an action with timeout `timeout` started at `start`.
    pub(crate) fn deadline_for(&self, start: Instant, timeout: Duration) -> Deadline {
        Deadline::at(start + timeout).min(Deadline::at(self.deadline))
    }
}

/// One action's deadline, and whether the turn's budget (not the action's own timeout) set it:
/// a time-out cut by the budget is the caller's doing (`Fault::Local`), not the upstream's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActionDeadline {
    pub(crate) deadline: Deadline,
    pub(crate) budget_cut: bool,
}

impl ActionDeadline {
    /// The deadline of `action` started at `started` under `budget`.
    pub(crate) fn new(action: &ActionSpec, budget: &Budget, started: Instant) -> ActionDeadline {
        ActionDeadline {
            deadline: budget.deadline_for(started, action.timeout()),
            budget_cut: budget.deadline() < started + action.timeout(),
        }
    }

    /// A request's own timeout from now, with no budget above it (background and shared
    /// fetches).
    pub(crate) fn own(timeout: Duration) -> ActionDeadline {
        ActionDeadline {
            deadline: Deadline::at(Instant::now() + timeout),
            budget_cut: false,
        }
    }

    /// Who is at fault when this deadline passes: the caller's budget, or the upstream.
    pub(crate) fn fault(&self) -> super::error::Fault {
        if self.budget_cut {
            super::error::Fault::Local
        } else {
            super::error::Fault::Upstream
        }
    }
}
