//! The runtime: one per process, cheap to clone. It owns the pool, the breakers, the cache and
//! the event bus; a call is driven through a [`CallSession`](super::CallSession) from
//! [`Runtime::start_call`], or one tool call at a time on a bare [`Call`] with
//! [`Runtime::execute`]. Either way one action goes plan → obtain → apply (`plan.rs`,
//! `obtain.rs`, `apply.rs`).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::apply::Applied;
use super::budget::ActionDeadline;
use super::budget::Budget;
use super::error::describe_transport;
use super::outcome::Outcome;
use super::parts::{action_span, Parts};
use super::plan::ToolCall;
use crate::cache::{CacheStatus, ScopeId};
use crate::config::{ActionSet, ActionSpec};
use crate::events::EventBus;
use crate::state::{Call, CallEnd, CallInfo};
use crate::transport::{Deadline, EgressPolicy};

/// What happens when a call ends, registered with the runtime by whoever runs the
/// call_completed automations ([`crate::Automations`] registers itself when it starts).
pub trait CallCompletion: Send + Sync + 'static {
    /// Publishes the call's end (`phone_call_ended`, the post-call results) and queues what
    /// runs after it. Returns the ids of the runs queued.
    fn complete<'a>(
        &'a self,
        agent: &'a ActionSet,
        call: &'a Call,
        end: &'a CallEnd,
    ) -> BoxFuture<'a, Result<Vec<String>, String>>;
}

/// The mid-call action runtime. Cheap to clone, `Send + Sync`; make one per process.
#[derive(Clone)]
pub struct Runtime {
    /// What the path reads: one hop from the handle.
    parts: Arc<Parts>,
    /// What runs when a call ends (registered by the automations).
    completion: Arc<RwLock<Option<Arc<dyn CallCompletion>>>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("transport", &self.parts.transport)
            .field("event_bus", &self.parts.event_bus.is_some())
            .finish_non_exhaustive()
    }
}

/// What a warm-up did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarmReport {
    /// Origins connected and handshaken.
    pub warmed: Vec<String>,
    /// Origins that failed, with why.
    pub failed: Vec<(String, String)>,
}

impl Runtime {
    /// With a shared cache tier: connects to it now and fails, naming its URL (password
    /// hidden), when it does not answer within `within`. Without one: Ok. Actions never wait
    /// for this (until the tier is reached they treat it as missing); a server calls it at
    /// start so a wrong `--cache-url` is a clear error.
    pub async fn check_shared_cache(
        &self,
        within: Duration,
    ) -> Result<(), crate::cache::SharedCacheError> {
        match self.parts.shared_cache() {
            Some(t) => t.connect_now(within).await,
            None => Ok(()),
        }
    }

    /// The request `action` would send for `tool` in `call`, exactly, with every header
    /// midcall adds (`host`, `user-agent`, `accept`, `content-length`, the idempotency key)
    /// and secrets redacted by the returned request's `redacted_*` methods. Sends nothing.
    pub fn render_request(
        &self,
        action: &ActionSpec,
        call: &Call,
        tool: &ToolCall,
    ) -> Result<crate::config::RenderedRequest, crate::Error> {
        self.parts.render_request(action, call, tool)
    }

    /// The parts the path's steps are functions over.
    pub(crate) fn parts(&self) -> &Arc<Parts> {
        &self.parts
    }

    pub(crate) fn from_parts(parts: Parts) -> Runtime {
        Runtime {
            parts: Arc::new(parts),
            completion: Arc::new(RwLock::new(None)),
        }
    }

    /// The event bus attached with [`RuntimeBuilder::event_bus`](super::RuntimeBuilder::event_bus).
    pub fn event_bus(&self) -> Option<&EventBus> {
        self.parts.event_bus()
    }

    /// Registers what runs when a call ends (replacing any earlier registration).
    pub fn register_call_completion(&self, completion: Arc<dyn CallCompletion>) {
        let mut slot = self.completion.write().unwrap_or_else(|e| e.into_inner());
        *slot = Some(completion);
    }

    pub(crate) fn call_completion(&self) -> Option<Arc<dyn CallCompletion>> {
        self.completion
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connections opened since the runtime was built (warm-up included).
    pub fn connections_opened(&self) -> usize {
        self.parts().transport().connections_opened()
    }

    /// The egress policy in force.
    pub fn egress(&self) -> &EgressPolicy {
        self.parts().transport().policy()
    }

    /// Opens and TLS-handshakes one connection to every distinct action host, concurrently,
    /// within `within`, without sending a request; the first action to each host uses it.
    pub async fn warm(&self, set: &ActionSet, within: Duration) -> WarmReport {
        let mut origins: Vec<&str> = set.actions().iter().map(|a| a.url().origin()).collect();
        origins.sort_unstable();
        origins.dedup();
        self.warm_origins(&origins, within).await
    }

    pub(crate) async fn warm_origins(&self, origins: &[&str], within: Duration) -> WarmReport {
        let deadline = Deadline::at(Instant::now() + within);
        let results = futures_util::future::join_all(origins.iter().map(|o| async move {
            (
                o.to_string(),
                self.parts().transport().warm(o, deadline).await,
            )
        }))
        .await;
        let mut report = WarmReport::default();
        for (origin, r) in results {
            match r {
                Ok(()) => report.warmed.push(origin),
                Err(e) => report.failed.push((origin, describe_transport(&e))),
            }
        }
        report
    }

    /// Runs one tool call within `budget` on a bare [`Call`]; see
    /// [`Runtime::execute_with_filler`].
    pub async fn execute(
        &self,
        action: &ActionSpec,
        call: &mut Call,
        tool: impl Into<ToolCall>,
        budget: &Budget,
    ) -> Outcome {
        self.execute_with_filler(action, call, tool, budget, |_| {})
            .await
    }

    /// Runs one tool call within `budget` and applies its outcome to `call`'s state: the
    /// one-shot path for programs that hold the call themselves (the automation runner, the
    /// CLI). A live call is better driven through a [`CallSession`](super::CallSession),
    /// which adds duplicate protection, cancellation policies and held side effects.
    ///
    /// If the action is still running `filler.after_ms` after it started, `on_filler` is called
    /// once with the line to say, while the action goes on. On any status but ok, cache hit or
    /// accepted, the action's `on_failure` is applied (its variables set, its line in
    /// `Outcome::say`). Dropping the future drops the request and its connection (a shared
    /// cache fetch goes on only while another tool call waits for it). Actions with
    /// `async = true` are started in the background (bounded by `max_async_in_flight`) and
    /// return `accepted` at once; they never write state.
    pub async fn execute_with_filler(
        &self,
        action: &ActionSpec,
        call: &mut Call,
        tool: impl Into<ToolCall>,
        budget: &Budget,
        on_filler: impl FnOnce(&str),
    ) -> Outcome {
        let started = Instant::now();
        let tool = tool.into();
        let span = action_span(action.name(), &call.info);
        let planned = self.parts().plan(action, call, &tool);
        let (result, cache, filler_fired) = match planned {
            Err(f) => (Err(f), CacheStatus::Bypass, false),
            Ok(p) => {
                let deadline = ActionDeadline::new(action, budget, started);
                self.parts()
                    .obtain_with_filler(action, p, deadline, started, &span, on_filler)
                    .await
            }
        };
        let how = Applied {
            tool_call_id: tool.id,
            cache,
            filler_fired,
            detached: false,
            started,
            span: &span,
        };
        self.parts().apply(action, call, result, how)
    }

    /// Runs several tool calls concurrently under one budget (the model's parallel tool calls)
    /// on a bare [`Call`]. Each action's filler fires as it would alone: `on_filler` gets the
    /// action's name and the line. Outcomes come back in the order given, each applied to
    /// state in that order.
    pub async fn execute_all(
        &self,
        calls: &[(&ActionSpec, ToolCall)],
        call: &mut Call,
        budget: &Budget,
        on_filler: impl Fn(&str, &str),
    ) -> Vec<Outcome> {
        let started = Instant::now();
        let spans: Vec<tracing::Span> = calls
            .iter()
            .map(|(a, _)| action_span(a.name(), &call.info))
            .collect();
        let planned: Vec<_> = calls
            .iter()
            .map(|(a, t)| self.parts().plan(a, call, t))
            .collect();
        let on_filler = &on_filler;
        let results =
            futures_util::future::join_all(planned.into_iter().zip(calls).zip(&spans).map(
                |((p, (action, _)), span)| async move {
                    match p {
                        Err(f) => (Err(f), CacheStatus::Bypass, false),
                        Ok(p) => {
                            let deadline = ActionDeadline::new(action, budget, started);
                            self.parts()
                                .obtain_with_filler(action, p, deadline, started, span, |line| {
                                    on_filler(action.name(), line)
                                })
                                .await
                        }
                    }
                },
            ))
            .await;
        results
            .into_iter()
            .zip(calls)
            .zip(&spans)
            .map(|(((result, cache, filler_fired), (action, tool)), span)| {
                let how = Applied {
                    tool_call_id: tool.id.clone(),
                    cache,
                    filler_fired,
                    detached: false,
                    started,
                    span,
                };
                self.parts().apply(action, call, result, how)
            })
            .collect()
    }

    /// Drops the cache entries `action` wrote for `call`'s scope (call, agent or tenant).
    pub fn invalidate(&self, action: &ActionSpec, call: &CallInfo) {
        if let Some(policy) = action.cache() {
            self.parts()
                .invalidate_scope(action.fingerprint, &ScopeId::of(policy.scope, call));
        }
    }

    /// Entries and bytes held by the response cache.
    pub async fn cache_usage(&self) -> (u64, u64) {
        self.parts().cache().usage().await
    }
}
