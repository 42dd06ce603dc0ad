//! One tool call's run on its own task, in path order: duplicate protection (an earlier
//! success, or an identical call still running), plan, the hold to the end of the turn,
//! obtain (with the filler and the interrupt policy), apply, record. Its guard records the
//! end state even when the task stops on a panic.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::apply::{cancelled, deduplicated, ended, Applied};
use super::budget::{ActionDeadline, Budget};
use super::error::{Failure, Kind, Retry};
use super::handle::FillerSlot;
use super::live::Session;
use super::outcome::{Outcome, Status};
use super::parts::action_span;
use super::plan::Prepared;
use super::plan::ToolCall;
use crate::cache::CacheStatus;
use crate::config::{ActionSpec, OnInterrupt};

/// Resolves with why once the tool call is to stop.
async fn stopped(rx: &mut watch::Receiver<Option<&'static str>>) -> &'static str {
    let why = rx
        .wait_for(|v| v.is_some())
        .await
        .map(|v| v.unwrap_or("cancelled"));
    match why {
        Ok(why) => why,
        // Every sender gone: nobody can cancel any more.
        Err(_) => std::future::pending().await,
    }
}

/// One tool call's run, on its own task.
pub(super) struct Task {
    pub(super) session: Arc<Session>,
    pub(super) id: u64,
    pub(super) action: Arc<ActionSpec>,
    pub(super) tool: ToolCall,
    pub(super) budget: Budget,
    /// The duplicate-protection key (model calls of actions that dedupe).
    pub(super) key: Option<u128>,
    /// The request, when `tool()` already planned it.
    pub(super) planned: Option<Box<Prepared>>,
    pub(super) stop: watch::Receiver<Option<&'static str>>,
    pub(super) held: Option<oneshot::Receiver<bool>>,
    pub(super) filler: Arc<FillerSlot>,
    pub(super) reply: Option<oneshot::Sender<Outcome>>,
}

/// After the duplicate check: wait for an identical call running, or go with this plan.
enum Next {
    Wait(watch::Receiver<Option<Outcome>>),
    Planned(Box<Result<super::plan::Prepared, Box<Failure>>>),
}

/// How a task's path ended, before it is applied.
enum Ended {
    /// A result to apply (values or a failure).
    Result(super::outcome::FetchResult, CacheStatus, bool),
    /// An earlier or concurrent identical call's outcome.
    Deduplicated(Outcome),
}

/// What a task's path carries from step to step.
struct Path {
    span: tracing::Span,
    /// When it started; reset when a held call is let go at the end of the turn.
    started: Instant,
    /// Leading an identical call's waiters: they get this call's outcome.
    leader: Option<watch::Sender<Option<Outcome>>>,
    /// Finishing detached after its handle was cancelled.
    detached: bool,
}

fn cancelled_end(action: &ActionSpec, why: &str) -> Ended {
    Ended::Result(
        Err(cancelled(action.name(), why)),
        CacheStatus::Bypass,
        false,
    )
}

impl Task {
    pub(super) async fn run(mut self) {
        let span = {
            let live = self.session.live();
            let call = live.call.as_ref().expect("a session always holds its call");
            action_span(self.action.name(), &call.info)
        };
        // Whatever happens below (a panicking filler callback included), the call ends once.
        let mut guard = Guard {
            session: self.session.clone(),
            id: self.id,
            key: self.key,
            leader: false,
            action: self.action.clone(),
            tool_call_id: self.tool.id.clone(),
            armed: true,
        };
        let mut path = Path {
            span,
            started: Instant::now(),
            leader: None,
            detached: false,
        };
        let ended = self.path(&mut path, &mut guard).await;
        self.filler.end();
        let outcome = self.record(&mut path, ended);
        guard.armed = false;
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(outcome);
        }
        self.session.running.send_modify(|n| *n -= 1);
    }

    /// Duplicate protection, plan, the hold, obtain: how the call ended, before it is applied.
    async fn path(&mut self, path: &mut Path, guard: &mut Guard) -> Ended {
        let p = match self.dedupe_or_plan(path, guard).await {
            Ok(p) => p,
            Err(ended) => return ended,
        };
        let action = &self.action;
        // Held to the end of the turn: nothing is sent before it.
        if let Some(held) = self.held.take() {
            tokio::select! {
                biased;
                why = stopped(&mut self.stop) => return cancelled_end(action, why),
                go = held => {
                    if go != Ok(true) {
                        return cancelled_end(action, "barge-in before the end of the turn");
                    }
                    path.started = Instant::now();
                }
            }
        }
        // Stopped before anything was handed to the transport: nothing is sent at all.
        let stopped_already = *self.stop.borrow();
        if let Some(why) = stopped_already {
            return cancelled_end(action, why);
        }
        let (ended, detached) = self.obtain(path, p).await;
        path.detached = detached;
        ended
    }

    /// An earlier success or an identical call running (waited for) answers this one; else
    /// this call's plan (it leads any identical call that comes while it runs).
    async fn dedupe_or_plan(
        &mut self,
        path: &mut Path,
        guard: &mut Guard,
    ) -> Result<Prepared, Ended> {
        let action = &self.action;
        let runtime = self.session.runtime.parts();
        let wait_until = ActionDeadline::new(action, &self.budget, path.started);
        loop {
            let next = {
                let mut live = self.session.live();
                let running = match self.key {
                    Some(key) => {
                        if let Some(o) = live.recent.find(key, runtime.dedupe_window()) {
                            return Err(Ended::Deduplicated(o.clone()));
                        }
                        let running = live.inflight.get(&key).cloned();
                        if running.is_none() {
                            let (tx, rx) = watch::channel(None);
                            live.inflight.insert(key, rx);
                            path.leader = Some(tx);
                            guard.leader = true;
                        }
                        running
                    }
                    None => None,
                };
                match running {
                    Some(rx) => Next::Wait(rx),
                    None => {
                        let call = live.call.as_ref().expect("a session always holds its call");
                        let planned = match self.planned.take() {
                            Some(p) => Ok(*p),
                            None => runtime.plan(action, call, &self.tool),
                        };
                        Next::Planned(Box::new(planned))
                    }
                }
            };
            let mut rx = match next {
                Next::Planned(planned) => {
                    return (*planned)
                        .map_err(|f| Ended::Result(Err(f), CacheStatus::Bypass, false))
                }
                Next::Wait(rx) => rx,
            };
            let got = tokio::select! {
                biased;
                why = stopped(&mut self.stop) => return Err(cancelled_end(action, why)),
                // Waiting on another call never runs past this call's own budget.
                _ = tokio::time::sleep_until(wait_until.deadline.timer_instant()) => {
                    // As obtain decides: the caller's fault only when the turn's budget, not
                    // the action's own timeout, cut it.
                    let f = Failure::new(
                        Kind::Timeout,
                        wait_until.fault(),
                        Retry::Yes,
                        format!("action \"{}\": timed out waiting for the identical call already running", action.name()),
                    );
                    return Err(Ended::Result(Err(f), CacheStatus::Bypass, false));
                }
                got = rx.wait_for(|o| o.is_some()) => got.ok().and_then(|o| o.clone()),
            };
            if let Some(o) = got {
                return Err(Ended::Deduplicated(o));
            }
            // The first call was cancelled (or its task is gone): this one goes itself, after
            // clearing a dead entry so nobody waits on it again.
            if let Some(key) = self.key {
                let mut live = self.session.live();
                if live.inflight.get(&key).is_some_and(|r| r.same_channel(&rx)) {
                    live.inflight.remove(&key);
                }
            }
        }
    }

    /// Obtain, with the filler and the interrupt policy: a call stopped after its request
    /// went out finishes detached when the action says so (its handle hears `cancelled`; the
    /// flag says so).
    async fn obtain(&mut self, path: &Path, p: Prepared) -> (Ended, bool) {
        let (runtime, action) = (self.session.runtime.parts(), &self.action);
        let sent = p.sent.clone();
        let deadline = ActionDeadline::new(action, &self.budget, path.started);
        let filler = self.filler.clone();
        let started = path.started;
        let obtain =
            runtime.obtain_with_filler(action, p, deadline, started, &path.span, move |line| {
                filler.fire(line)
            });
        tokio::pin!(obtain);
        tokio::select! {
            biased;
            (r, c, f) = &mut obtain => (Ended::Result(r, c, f), false),
            why = stopped(&mut self.stop) => {
                if action.on_interrupt() == OnInterrupt::Finish && sent.load(Ordering::Acquire) {
                    // The request is out: finish it detached; the handle hears `cancelled`
                    // and no filler line is spoken for it any more.
                    self.filler.disarm();
                    let f = cancelled(action.name(), why);
                    let o = ended(action.name(), self.tool.id.clone(), *f, Some(started), Some(runtime.llm_result_max_bytes()));
                    if let Some(reply) = self.reply.take() {
                        let _ = reply.send(o);
                    }
                    let (r, c, f) = obtain.await;
                    (Ended::Result(r, c, f), true)
                } else {
                    (cancelled_end(action, why), false)
                }
            }
        }
    }

    /// The outcome applied to the call and recorded; waiters of an identical call get it.
    fn record(&mut self, path: &mut Path, end: Ended) -> Outcome {
        let runtime = self.session.runtime.parts();
        let mut live = self.session.live();
        let live = &mut *live;
        let call = live.call.as_mut().expect("a session always holds its call");
        let outcome = match end {
            Ended::Deduplicated(earlier) => {
                let o = deduplicated(earlier, self.tool.id.clone(), path.started);
                runtime.report(&o, call, &path.span);
                o
            }
            Ended::Result(result, cache, filler_fired) => {
                let how = Applied {
                    tool_call_id: self.tool.id.clone(),
                    cache,
                    filler_fired,
                    detached: path.detached,
                    started: path.started,
                    span: &path.span,
                };
                runtime.apply(&self.action, call, result, how)
            }
        };
        if let (Some(key), Some(tx)) = (self.key, path.leader.take()) {
            live.inflight.remove(&key);
            if matches!(outcome.status, Status::Ok | Status::CacheHit) {
                live.recent.remember(key, &outcome, runtime.dedupe_window());
            }
            // Waiters get this outcome; a cancelled one sends nothing and they go themselves.
            if outcome.status != Status::Cancelled {
                let _ = tx.send(Some(outcome.clone()));
            }
        }
        live.interrupts.remove(&self.id);
        live.records.push(outcome.clone());
        outcome
    }
}

/// Ends a tool call that stopped without reaching its end (a panic on its task): it leaves
/// the in-flight table and the running count and is recorded `cancelled`.
struct Guard {
    session: Arc<Session>,
    id: u64,
    key: Option<u128>,
    leader: bool,
    action: Arc<ActionSpec>,
    tool_call_id: Option<String>,
    armed: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        {
            let mut live = self.session.live();
            if let (true, Some(key)) = (self.leader, self.key) {
                live.inflight.remove(&key);
            }
            live.interrupts.remove(&self.id);
            let f = cancelled(self.action.name(), "its task stopped");
            let o = ended(self.action.name(), self.tool_call_id.take(), *f, None, None);
            live.records.push(o);
        }
        self.session
            .running
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}
