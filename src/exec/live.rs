//! The state of one live call that its session, its tool calls' tasks and their handles share:
//! the call, duplicate protection, the interrupts, the held side effects, the records. Its
//! own file so that a task and a handle reach it without importing the session that spawns
//! them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{oneshot, watch};

use super::dedupe::RecentToolCalls;
use super::outcome::Outcome;
use super::runtime::Runtime;
use super::runtime::WarmReport;
use crate::config::ActionSet;
use crate::state::Call;

/// What [`Runtime::start_call`](super::Runtime::start_call) did before the first turn.
#[derive(Debug, Clone, Default)]
pub struct StartReport {
    /// Connections opened ahead of the first turn (prefetched hosts count as warmed when they
    /// answered).
    pub warm: WarmReport,
    /// The prefetch actions' outcomes, in file order.
    pub prefetched: Vec<Outcome>,
}

/// One call's shared state (every clone of its [`CallSession`](super::CallSession) holds it).
pub(super) struct Session {
    pub(super) runtime: Runtime,
    pub(super) agent: Arc<ActionSet>,
    pub(super) live: Mutex<Live>,
    /// Tool calls not yet ended.
    pub(super) running: watch::Sender<usize>,
    pub(super) report: OnceLock<StartReport>,
}

#[derive(Default)]
pub(super) struct Live {
    pub(super) call: Option<Call>,
    pub(super) recent: RecentToolCalls,
    pub(super) inflight: HashMap<u128, watch::Receiver<Option<Outcome>>>,
    pub(super) interrupts: HashMap<u64, Arc<Interrupt>>,
    pub(super) held: Vec<oneshot::Sender<bool>>,
    pub(super) records: Vec<Outcome>,
    pub(super) next_id: u64,
    pub(super) ended: bool,
}

/// Set once, with why, when a tool call is to stop.
pub(super) type Interrupt = watch::Sender<Option<&'static str>>;

impl Session {
    /// The call's live state, locked (a poisoned lock is taken over: the state stays usable).
    pub(super) fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops a tool call with `why` (the first reason given wins).
pub(super) fn interrupt(i: &Interrupt, why: &'static str) {
    i.send_if_modified(|v| {
        if v.is_none() {
            *v = Some(why);
            true
        } else {
            false
        }
    });
}
