//! The time a turn may spend on actions.

use std::time::Duration;

use tokio::time::Instant;

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
