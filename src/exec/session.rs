//! A live call as one handle: tool calls by the name the model sent, each ending in exactly
//! one recorded end state; duplicate protection over calls done and still running;
//! cancellation by policy; side effects held to the end of the turn; the call's end.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::apply::Applied;
use super::budget::Budget;
use super::dedupe::dedupe_key;
use super::error::{Failure, Fault, Kind, Retry};
use super::handle::ToolHandle;
use super::live::{interrupt, Interrupt, Live, Session, StartReport};
use super::outcome::{Outcome, Status};
use super::parts::action_span;
use super::plan::Prepared;
use super::plan::ToolCall;
use super::runtime::Runtime;
use super::task::Task;
use crate::cache::CacheStatus;
use crate::config::{ActionSet, ActionSpec, Hold};
use crate::events::{post_call_payload, Event};
use crate::state::{
    Call, CallEnd, CallInfo, ConversationState, StateError, StatePath, Transcript, Turn,
};

/// Why a call's end could not be recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndError {
    /// The call was ended before.
    #[error("the call has already ended")]
    AlreadyEnded,
    /// The end events or the automation runs could not be stored.
    #[error("the call's end could not be stored: {0}")]
    Storage(String),
}

/// One live call. Cheap to clone, `Send + Sync`: every clone is the same call, so the agent
/// runtime can append the caller's words and read state while tool calls run, and run several
/// tool calls at once.
///
/// Every tool call ends in exactly one end state, recorded in [`CallSession::records`] (and
/// published as an `action` event when the runtime has a bus) even when its handle is
/// cancelled or dropped. Tool calls run on the runtime's tasks; a handle is only the way to
/// their outcome.
#[derive(Clone)]
pub struct CallSession {
    pub(super) inner: Arc<Session>,
}

impl std::fmt::Debug for CallSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSession")
            .field("call_id", &self.info().id)
            .field("running", &*self.inner.running.borrow())
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// When the call connects: starts its session, publishes `phone_call_connected` (with a
    /// bus attached), warms a connection to every action host and runs every action with
    /// `prefetch = "call_start"` concurrently, all within `within`. Prefetched values land in
    /// state before the first turn and prime the cache, so the model's later identical tool
    /// call is a hit (prefetches stay out of duplicate protection: the model did not make
    /// them). What was done is in [`CallSession::start_report`].
    pub async fn start_call(
        &self,
        agent: Arc<ActionSet>,
        info: CallInfo,
        within: Duration,
    ) -> CallSession {
        if let Some(bus) = self.event_bus() {
            if let Err(e) = bus.publish(&Event::phone_call_connected(), &info) {
                tracing::warn!(call_id = %info.id, error = %e, "phone_call_connected not queued");
            }
        }
        let session = CallSession {
            inner: Arc::new(Session {
                runtime: self.clone(),
                agent: agent.clone(),
                live: Mutex::new(Live {
                    call: Some(Call::new(info)),
                    ..Live::default()
                }),
                running: watch::channel(0).0,
                report: OnceLock::new(),
            }),
        };
        let budget = Budget::new(within);
        let prefetch: Vec<&Arc<ActionSpec>> = agent
            .actions()
            .iter()
            .filter(|a| a.prefetch().is_some())
            .collect();
        let prefetch_origins: Vec<&str> = prefetch.iter().map(|a| a.url().origin()).collect();
        let mut origins: Vec<&str> = agent
            .actions()
            .iter()
            .map(|a| a.url().origin())
            .filter(|o| !prefetch_origins.contains(o))
            .collect();
        origins.sort_unstable();
        origins.dedup();
        let handles: Vec<ToolHandle> = prefetch
            .iter()
            .map(|a| {
                let empty = ToolCall::from(Value::Object(Default::default()));
                session.spawn((*a).clone(), empty, budget, false)
            })
            .collect();
        let (mut warm, prefetched) = tokio::join!(
            self.warm_origins(&origins, within),
            futures_util::future::join_all(handles)
        );
        for (a, o) in prefetch.iter().zip(&prefetched) {
            if o.http_status.is_some() || o.status.is_success() {
                warm.warmed.push(a.url().origin().to_string());
            }
        }
        warm.warmed.sort();
        warm.warmed.dedup();
        let _ = session.inner.report.set(StartReport { warm, prefetched });
        session
    }
}

impl CallSession {
    pub(super) fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.inner.live()
    }

    fn with_call<T>(&self, f: impl FnOnce(&mut Call) -> T) -> T {
        let mut live = self.live();
        f(live.call.as_mut().expect("a session always holds its call"))
    }

    /// What [`Runtime::start_call`] did: warm-up and prefetches.
    pub fn start_report(&self) -> StartReport {
        self.inner.report.get().cloned().unwrap_or_default()
    }

    /// The call's facts.
    pub fn info(&self) -> CallInfo {
        self.with_call(|c| c.info.clone())
    }

    /// A copy of the conversation variables now.
    pub fn state(&self) -> ConversationState {
        self.with_call(|c| c.state.clone())
    }

    /// The conversation variables now, as one nested JSON object.
    pub fn state_value(&self) -> Value {
        self.with_call(|c| c.state.to_value())
    }

    /// Sets one variable (the embedder's own, such as `call_outcome`).
    pub fn set(&self, path: &StatePath, value: Value) -> Result<(), StateError> {
        self.with_call(|c| c.state.set(path, value))
    }

    /// A copy of the transcript now.
    pub fn transcript(&self) -> Transcript {
        self.with_call(|c| c.transcript.clone())
    }

    /// Appends a turn (the caller's words, the agent's line); allowed while tool calls run.
    pub fn add_turn(&self, turn: Turn) {
        self.with_call(|c| c.transcript.push(turn));
    }

    /// A copy of the whole call: facts, variables, transcript.
    pub fn snapshot(&self) -> Call {
        self.with_call(|c| c.clone())
    }

    /// The end state of every tool call that has ended, in the order they ended (a detached
    /// call's real end state, marked `detached`, where it went on after a barge-in).
    pub fn records(&self) -> Vec<Outcome> {
        self.live().records.clone()
    }

    /// Tool calls started and not yet ended (held, running or finishing detached).
    pub fn running(&self) -> usize {
        *self.inner.running.borrow()
    }

    /// Starts the tool call the model made, by the name it sent, within `budget`.
    ///
    /// The returned handle is a future of the [`Outcome`]; it also gives the filler line when
    /// it fires ([`ToolHandle::on_filler`], [`ToolHandle::filler`]) and cancels
    /// ([`ToolHandle::cancel`], or dropping it). An unknown name ends at once as `rejected`
    /// (fault `caller`) with the known tool names in its message. An identical call (same
    /// action, same canonical arguments, any tool-call id) made while an earlier one runs
    /// waits for it and returns its outcome with `deduplicated: true`, and one made within
    /// the dedupe window after an earlier success gets that success: nothing is sent twice.
    /// An action with `hold = "end_of_turn"` is not sent before [`CallSession::end_turn`].
    pub fn tool(&self, name: &str, tool: ToolCall, budget: Budget) -> ToolHandle {
        match self.inner.agent.actions().iter().find(|a| a.name() == name) {
            Some(action) => self.spawn(action.clone(), tool, budget, true),
            None => {
                let mut names: Vec<&str> = self
                    .inner
                    .agent
                    .actions()
                    .iter()
                    .map(|a| a.name())
                    .collect();
                names.sort_unstable();
                let message = format!(
                    "unknown tool \"{}\"; the tools are: {}",
                    name.chars().take(64).collect::<String>(),
                    names.join(", ")
                );
                let f = Failure::new(Kind::UnknownTool, Fault::Caller, Retry::No, message);
                self.refuse(name, tool.id, *f)
            }
        }
    }

    /// Runs the model's parallel tool calls under one budget. Each action's filler fires as it
    /// would alone: `on_filler` is called with the action's name and the line. Outcomes come
    /// back in the order given.
    pub async fn tools_parallel(
        &self,
        calls: Vec<(String, ToolCall)>,
        budget: Budget,
        on_filler: impl Fn(&str, &str) + Send + Sync + 'static,
    ) -> Vec<Outcome> {
        let on_filler = Arc::new(on_filler);
        let handles = calls.into_iter().map(|(name, tool)| {
            let f = on_filler.clone();
            let action = name.clone();
            self.tool(&name, tool, budget)
                .on_filler(move |line| f(&action, line))
        });
        futures_util::future::join_all(handles).await
    }

    /// The agent finished speaking its turn: held side effects (`hold = "end_of_turn"`) are
    /// sent now.
    pub fn end_turn(&self) {
        let held = std::mem::take(&mut self.live().held);
        for h in held {
            let _ = h.send(true);
        }
    }

    /// The caller spoke over the agent: held side effects are discarded (`cancelled`, nothing
    /// sent) and every running tool call gets its `on_interrupt` policy: `cancel` drops the
    /// request at once, `finish` lets a request already sent complete detached (its values
    /// are applied and the model's re-issued identical call gets its outcome).
    pub fn barge_in(&self) {
        let (held, interrupts) = {
            let mut live = self.live();
            let held = std::mem::take(&mut live.held);
            let interrupts: Vec<Arc<Interrupt>> = live.interrupts.values().cloned().collect();
            (held, interrupts)
        };
        for h in held {
            let _ = h.send(false);
        }
        for i in interrupts {
            interrupt(&i, "barge-in");
        }
    }

    /// The call ended: held side effects are discarded and running tool calls get their
    /// `on_interrupt` policy (as for a barge-in); once the detached ones have finished (each
    /// within its own timeout), `phone_call_ended` and the post-call results are published
    /// and the call_completed automations registered with the runtime are queued. Returns the
    /// queued runs' ids. Tool calls after this are `rejected`.
    pub async fn end(&self, end: CallEnd) -> Result<Vec<String>, EndError> {
        {
            let mut live = self.live();
            if live.ended {
                return Err(EndError::AlreadyEnded);
            }
            live.ended = true;
        }
        self.barge_in();
        let mut running = self.inner.running.subscribe();
        let _ = running.wait_for(|n| *n == 0).await;
        let call = self.snapshot();
        let runtime = &self.inner.runtime;
        if let Some(completion) = runtime.call_completion() {
            return completion
                .complete(&self.inner.agent, &call, &end)
                .await
                .map_err(EndError::Storage);
        }
        if let Some(bus) = runtime.event_bus() {
            let ended = Event::phone_call_ended(
                end.duration.as_millis() as f64 / 1000.0,
                &end.end_reason,
                &call.transcript,
            );
            let results = Event::post_call_processing_completed(post_call_payload(
                &self.inner.agent,
                &call,
                &end,
            ));
            for e in [ended, results] {
                bus.publish_durable(&e, &call.info)
                    .await
                    .map_err(|e| EndError::Storage(e.to_string()))?;
            }
        }
        Ok(Vec::new())
    }

    /// A tool call that ends before it starts.
    fn refuse(&self, name: &str, tool_call_id: Option<String>, f: Failure) -> ToolHandle {
        let (tx, rx) = oneshot::channel();
        let span = action_span(name, &self.info());
        let limit = self.inner.runtime.parts().llm_result_max_bytes();
        let o = super::apply::ended(name, tool_call_id, f, None, Some(limit));
        {
            let mut live = self.live();
            live.records.push(o.clone());
            let call = live.call.as_ref().expect("a session always holds its call");
            self.inner.runtime.parts().report(&o, call, &span);
        }
        let _ = tx.send(o);
        ToolHandle::new(name, rx, Arc::new(watch::channel(None).0), true)
    }

    /// A fresh cache hit, answered on the caller's own task when the cache answers without
    /// waiting: no task of its own, no wake-up. Anything else (a duplicate to check, a held or
    /// async action, a miss, a stale entry) takes the task path, with the request already
    /// planned here when it was (`Err(Some(plan))`), so nothing is rendered twice.
    fn try_hit(
        &self,
        action: &ActionSpec,
        tool: &ToolCall,
        key: Option<u128>,
    ) -> Result<ToolHandle, Option<Box<Prepared>>> {
        use futures_util::FutureExt;
        if action.cache().is_none() || action.is_async() || action.hold() == Hold::EndOfTurn {
            return Err(None);
        }
        let started = Instant::now();
        let runtime = &self.inner.runtime;
        let mut live = self.live();
        let live = &mut *live;
        let Some(call) = live.call.as_mut().filter(|_| !live.ended) else {
            return Err(None);
        };
        if let Some(k) = key {
            if live.inflight.contains_key(&k)
                || live
                    .recent
                    .find(k, runtime.parts().dedupe_window())
                    .is_some()
            {
                return Err(None);
            }
        }
        let p = runtime.parts().plan(action, call, tool).map_err(|_| None)?;
        let fresh = p.cache.as_ref().and_then(|(cache_key, _)| {
            match runtime.parts().cache().lookup(cache_key).now_or_never()? {
                crate::cache::Lookup::Fresh(e) => Some(e),
                _ => None,
            }
        });
        let Some(entry) = fresh else {
            return Err(Some(Box::new(p)));
        };
        metrics::counter!("midcall_cache_hits_total").increment(1);
        let result = super::obtain::from_entry(&entry, &p.action);
        let span = action_span(action.name(), &call.info);
        let how = Applied {
            tool_call_id: tool.id.clone(),
            cache: CacheStatus::Hit,
            filler_fired: false,
            detached: false,
            started,
            span: &span,
        };
        let outcome = runtime.parts().apply(action, call, result, how);
        if let Some(k) = key {
            if matches!(outcome.status, Status::Ok | Status::CacheHit) {
                live.recent
                    .remember(k, &outcome, runtime.parts().dedupe_window());
            }
        }
        live.records.push(outcome.clone());
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(outcome);
        Ok(ToolHandle::new(
            action.name(),
            rx,
            Arc::new(watch::channel(None).0),
            true,
        ))
    }

    fn spawn(
        &self,
        action: Arc<ActionSpec>,
        tool: ToolCall,
        budget: Budget,
        from_model: bool,
    ) -> ToolHandle {
        let key = (from_model && action.dedupe() && !action.is_async())
            .then(|| dedupe_key(action.name(), &tool.args));
        let planned = match self.try_hit(&action, &tool, key) {
            Ok(h) => return h,
            Err(planned) => planned,
        };
        let (tx, rx) = oneshot::channel();
        let stop: Arc<Interrupt> = Arc::new(watch::channel(None).0);
        let (id, held) = {
            let mut live = self.live();
            if live.ended {
                drop(live);
                let f = Failure::new(
                    Kind::CallEnded,
                    Fault::Caller,
                    Retry::No,
                    format!("action \"{}\": the call has ended", action.name()),
                );
                return self.refuse(action.name(), tool.id, *f);
            }
            live.next_id += 1;
            let id = live.next_id;
            live.interrupts.insert(id, stop.clone());
            // Prefetches are never held: nobody could end a turn before the call starts.
            let held = (from_model && action.hold() == Hold::EndOfTurn).then(|| {
                let (htx, hrx) = oneshot::channel();
                live.held.push(htx);
                hrx
            });
            // Counted under the same lock `end()` takes to mark the call ended, so an end
            // never misses a call that was registered before it.
            self.inner.running.send_modify(|n| *n += 1);
            (id, held)
        };
        let handle = ToolHandle::new(action.name(), rx, stop.clone(), false);
        let filler = handle.filler.clone();
        let task = Task {
            session: self.inner.clone(),
            id,
            action,
            tool,
            budget,
            key,
            planned,
            stop: stop.subscribe(),
            held,
            filler,
            reply: Some(tx),
        };
        tokio::spawn(task.run());
        handle
    }
}
