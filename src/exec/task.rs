//! One tool call's run on its own task, in path order: duplicate protection (an earlier
//! success, or an identical call still running), plan, the hold to the end of the turn,
//! obtain (with the filler and the interrupt policy), apply, record. Its guard records the
//! end state even when the task stops on a panic.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::apply::{cancelled, Applied};
use super::budget::Budget;
use super::error::{Failure, Fault, Kind, Retry};
use super::handle::FillerSlot;
use super::outcome::{Outcome, Status, Timings};
use super::plan::Prepared;
use super::runtime::{action_span, Runtime, ToolCall};
use super::session::CallSession;
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
    pub(super) session: CallSession,
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
    Result(super::obtain::FetchResult, CacheStatus, bool),
    /// An earlier or concurrent identical call's outcome.
    Deduplicated(Outcome),
}

impl Task {
    pub(super) async fn run(mut self) {
        let mut started = Instant::now();
        let runtime = self.session.inner.runtime.clone();
        let action = self.action.clone();
        let span = {
            let live = self.session.live();
            let call = live.call.as_ref().expect("a session always holds its call");
            action_span(action.name(), &call.info)
        };
        let key = self.key;
        // Whatever happens below (a panicking filler callback included), the call ends once.
        let mut guard = Guard {
            session: self.session.clone(),
            id: self.id,
            key,
            leader: false,
            action: action.clone(),
            tool_call_id: self.tool.id.clone(),
            armed: true,
        };
        let mut leader: Option<watch::Sender<Option<Outcome>>> = None;
        let mut detached = false;
        let wait_until = Runtime::deadline(&action, &self.budget, started);
        let ended = 'path: {
            // Duplicate protection: an earlier success, or an identical call still running.
            let planned = loop {
                let next = {
                    let mut live = self.session.live();
                    let running = match key {
                        Some(key) => {
                            if let Some(o) = live.recent.find(key, runtime.dedupe_window()) {
                                break 'path Ended::Deduplicated(o.clone());
                            }
                            let running = live.inflight.get(&key).cloned();
                            if running.is_none() {
                                let (tx, rx) = watch::channel(None);
                                live.inflight.insert(key, rx);
                                leader = Some(tx);
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
                                None => runtime.plan(&action, call, &self.tool),
                            };
                            Next::Planned(Box::new(planned))
                        }
                    }
                };
                match next {
                    Next::Planned(planned) => break *planned,
                    Next::Wait(mut rx) => {
                        let got = tokio::select! {
                            biased;
                            why = stopped(&mut self.stop) => {
                                break 'path Ended::Result(Err(cancelled(action.name(), why)), CacheStatus::Bypass, false);
                            }
                            // Waiting on another call never runs past this call's own budget.
                            _ = tokio::time::sleep_until(wait_until.deadline.timer_instant()) => {
                                let f = Failure::new(
                                    Kind::Timeout,
                                    Fault::Local,
                                    Retry::Yes,
                                    format!("action \"{}\": timed out waiting for the identical call already running", action.name()),
                                );
                                break 'path Ended::Result(Err(f), CacheStatus::Bypass, false);
                            }
                            got = rx.wait_for(|o| o.is_some()) => got.ok().and_then(|o| o.clone()),
                        };
                        if let Some(o) = got {
                            break 'path Ended::Deduplicated(o);
                        }
                        // The first call was cancelled (or its task is gone): this one goes
                        // itself, after clearing a dead entry so nobody waits on it again.
                        if let Some(key) = key {
                            let mut live = self.session.live();
                            if live.inflight.get(&key).is_some_and(|r| r.same_channel(&rx)) {
                                live.inflight.remove(&key);
                            }
                        }
                        continue;
                    }
                }
            };
            let p = match planned {
                Ok(p) => p,
                Err(f) => break 'path Ended::Result(Err(f), CacheStatus::Bypass, false),
            };
            // Held to the end of the turn: nothing is sent before it.
            if let Some(held) = self.held.take() {
                tokio::select! {
                    biased;
                    why = stopped(&mut self.stop) => {
                        break 'path Ended::Result(Err(cancelled(action.name(), why)), CacheStatus::Bypass, false);
                    }
                    go = held => {
                        if go != Ok(true) {
                            break 'path Ended::Result(Err(cancelled(action.name(), "barge-in before the end of the turn")), CacheStatus::Bypass, false);
                        }
                        started = Instant::now();
                    }
                }
            }
            // Stopped before anything was handed to the transport: nothing is sent at all.
            let stopped_already = *self.stop.borrow();
            if let Some(why) = stopped_already {
                break 'path Ended::Result(
                    Err(cancelled(action.name(), why)),
                    CacheStatus::Bypass,
                    false,
                );
            }
            let sent = p.sent.clone();
            let deadline = Runtime::deadline(&action, &self.budget, started);
            let filler = self.filler.clone();
            let obtain =
                runtime.obtain_with_filler(&action, p, deadline, started, &span, move |line| {
                    filler.fire(line)
                });
            tokio::pin!(obtain);
            tokio::select! {
                biased;
                (r, c, f) = &mut obtain => Ended::Result(r, c, f),
                why = stopped(&mut self.stop) => {
                    if action.on_interrupt() == OnInterrupt::Finish && sent.load(Ordering::Acquire) {
                        // The request is out: finish it detached; the handle hears `cancelled`
                        // and no filler line is spoken for it any more.
                        detached = true;
                        self.filler.disarm();
                        let mut o = Outcome::new(action.name(), self.tool.id.clone());
                        let f = cancelled(action.name(), why);
                        o.status = Status::Cancelled;
                        o.llm_result = super::outcome::llm_result(Status::Cancelled, &[], Some(&f.error), runtime.llm_result_max_bytes());
                        o.error = Some(f.error);
                        o.timings = Timings { total: started.elapsed(), ..Timings::default() };
                        if let Some(reply) = self.reply.take() {
                            let _ = reply.send(o);
                        }
                        let (r, c, f) = obtain.await;
                        Ended::Result(r, c, f)
                    } else {
                        Ended::Result(Err(cancelled(action.name(), why)), CacheStatus::Bypass, false)
                    }
                }
            }
        };
        self.filler.end();
        let outcome = {
            let mut live = self.session.live();
            let live = &mut *live;
            let call = live.call.as_mut().expect("a session always holds its call");
            let outcome = match ended {
                Ended::Deduplicated(earlier) => {
                    let mut o = earlier;
                    o.tool_call_id = self.tool.id.clone();
                    o.deduplicated = true;
                    o.detached = false;
                    o.attempts = 0;
                    o.filler_fired = false;
                    o.timings = Timings {
                        total: started.elapsed(),
                        ..Timings::default()
                    };
                    metrics::counter!("midcall_deduplicated_total", "action" => o.action.clone())
                        .increment(1);
                    runtime.report(&o, call, &span);
                    o
                }
                Ended::Result(result, cache, filler_fired) => {
                    let how = Applied {
                        tool_call_id: self.tool.id.clone(),
                        cache,
                        filler_fired,
                        detached,
                        started,
                        span: &span,
                    };
                    runtime.apply(&action, call, result, how)
                }
            };
            if let (Some(key), Some(tx)) = (key, leader.take()) {
                live.inflight.remove(&key);
                if matches!(outcome.status, Status::Ok | Status::CacheHit) {
                    live.recent.remember(key, &outcome, runtime.dedupe_window());
                }
                // Waiters get this outcome; a cancelled one sends nothing and they go
                // themselves.
                if outcome.status != Status::Cancelled {
                    let _ = tx.send(Some(outcome.clone()));
                }
            }
            live.interrupts.remove(&self.id);
            live.records.push(outcome.clone());
            guard.armed = false;
            outcome
        };
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(outcome);
        }
        self.session.inner.running.send_modify(|n| *n -= 1);
    }
}

/// Ends a tool call that stopped without reaching its end (a panic on its task): it leaves
/// the in-flight table and the running count and is recorded `cancelled`.
struct Guard {
    session: CallSession,
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
            let mut o = Outcome::new(self.action.name(), self.tool_call_id.take());
            o.status = Status::Cancelled;
            o.error = Some(cancelled(self.action.name(), "its task stopped").error);
            live.records.push(o);
        }
        self.session
            .inner
            .running
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}
