//! The runtime: one per process, cheap to clone. It owns the pool, the breakers, the cache and
//! the event bus; a call is driven through a [`CallSession`](super::CallSession) from
//! [`Runtime::start_call`], or one tool call at a time on a bare [`Call`] with
//! [`Runtime::execute`]. Either way one action goes plan → obtain → apply (`plan.rs`,
//! `obtain.rs`, `apply.rs`).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::header::{HeaderName, HeaderValue};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

use super::apply::Applied;
use super::breaker::Breakers;
use super::budget::ActionDeadline;
use super::budget::Budget;
use super::error::describe_transport;
use super::obtain::FetchResult;
use super::outcome::Outcome;
use super::plan::Prepared;
use crate::cache::{CacheStatus, ResponseCache, ScopeId};
use crate::config::{ActionSet, ActionSpec};
use crate::events::EventBus;
use crate::state::{Call, CallEnd, CallInfo};
use crate::template::SecretSource;
use crate::transport::{Deadline, EgressPolicy, Transport};

/// The least time a retried attempt is assumed to need, on top of the first attempt's own
/// duration, when deciding whether a 429's Retry-After fits the budget: 2 ms.
pub const MIN_RETRY_ATTEMPT: Duration = Duration::from_millis(2);

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
    inner: Arc<Inner>,
}

pub(crate) struct Parts {
    pub(crate) transport: Transport,
    pub(crate) secrets: Arc<dyn SecretSource>,
    pub(crate) breakers: Arc<Breakers>,
    pub(crate) background: Arc<Semaphore>,
    pub(crate) max_async_in_flight: usize,
    pub(crate) llm_result_max_bytes: usize,
    pub(crate) idempotency_header: Option<HeaderName>,
    pub(crate) cache: Arc<ResponseCache<FetchResult>>,
    pub(crate) shared: Option<Arc<crate::cache::shared::SharedTier>>,
    pub(crate) dedupe_window: Duration,
    pub(crate) event_bus: Option<EventBus>,
    pub(crate) gates: super::gate::HostGates,
}

struct Inner {
    parts: Parts,
    user_agent: HeaderValue,
    completion: RwLock<Option<Arc<dyn CallCompletion>>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("transport", &self.inner.parts.transport)
            .field("event_bus", &self.inner.parts.event_bus.is_some())
            .finish_non_exhaustive()
    }
}

/// One tool call from the model: its id (if the model gave one) and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The model's id for this tool call; keys idempotency when present.
    pub id: Option<String>,
    /// The arguments, a JSON object (or null for none).
    pub args: Value,
}

impl ToolCall {
    /// A tool call with an id.
    pub fn new(id: impl Into<String>, args: Value) -> ToolCall {
        ToolCall {
            id: Some(id.into()),
            args,
        }
    }
}

impl From<Value> for ToolCall {
    fn from(args: Value) -> ToolCall {
        ToolCall { id: None, args }
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

pub(crate) fn action_span(action: &str, call: &CallInfo) -> tracing::Span {
    tracing::info_span!(
        "action",
        action = action,
        call_id = %call.id,
        status = tracing::field::Empty,
        attempts = tracing::field::Empty,
        cache = tracing::field::Empty,
        url = tracing::field::Empty,
    )
}

impl Runtime {
    pub(crate) fn from_parts(parts: Parts) -> Runtime {
        Runtime {
            inner: Arc::new(Inner {
                parts,
                user_agent: HeaderValue::from_static(concat!(
                    "midcall/",
                    env!("CARGO_PKG_VERSION")
                )),
                completion: RwLock::new(None),
            }),
        }
    }

    pub(crate) fn transport(&self) -> &Transport {
        &self.inner.parts.transport
    }
    pub(crate) fn secrets(&self) -> &dyn SecretSource {
        &*self.inner.parts.secrets
    }
    pub(crate) fn breakers(&self) -> &Arc<Breakers> {
        &self.inner.parts.breakers
    }
    pub(crate) fn cache(&self) -> &Arc<ResponseCache<FetchResult>> {
        &self.inner.parts.cache
    }
    pub(crate) fn shared_cache(&self) -> Option<&Arc<crate::cache::shared::SharedTier>> {
        self.inner.parts.shared.as_ref()
    }

    /// With a shared cache tier: connects to it now and fails, naming its URL (password
    /// hidden), when it does not answer within `within`. Without one: Ok. Actions never wait
    /// for this (until the tier is reached they treat it as missing); a server calls it at
    /// start so a wrong `--cache-url` is a clear error.
    pub async fn check_shared_cache(
        &self,
        within: Duration,
    ) -> Result<(), crate::cache::SharedCacheError> {
        match self.shared_cache() {
            Some(t) => t.connect_now(within).await,
            None => Ok(()),
        }
    }

    /// Drops what an action wrote for a scope, here and (with a shared tier) in Redis and in
    /// every other process.
    pub(crate) fn invalidate_scope(&self, fingerprint: u64, scope: &ScopeId) {
        self.cache().invalidate(fingerprint, scope);
        if let Some(t) = self.shared_cache() {
            t.invalidate(fingerprint, scope);
        }
    }
    pub(crate) fn user_agent(&self) -> &HeaderValue {
        &self.inner.user_agent
    }
    pub(crate) fn idempotency_header(&self) -> Option<&HeaderName> {
        self.inner.parts.idempotency_header.as_ref()
    }
    pub(crate) fn llm_result_max_bytes(&self) -> usize {
        self.inner.parts.llm_result_max_bytes
    }
    pub(crate) fn dedupe_window(&self) -> Duration {
        self.inner.parts.dedupe_window
    }
    pub(crate) fn max_async_in_flight(&self) -> usize {
        self.inner.parts.max_async_in_flight
    }
    pub(crate) fn gates(&self) -> &super::gate::HostGates {
        &self.inner.parts.gates
    }
    pub(crate) fn background_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.inner.parts.background.clone().try_acquire_owned().ok()
    }

    /// The event bus attached with [`RuntimeBuilder::event_bus`](super::RuntimeBuilder::event_bus).
    pub fn event_bus(&self) -> Option<&EventBus> {
        self.inner.parts.event_bus.as_ref()
    }

    /// Registers what runs when a call ends (replacing any earlier registration).
    pub fn register_call_completion(&self, completion: Arc<dyn CallCompletion>) {
        let mut slot = self
            .inner
            .completion
            .write()
            .unwrap_or_else(|e| e.into_inner());
        *slot = Some(completion);
    }

    pub(crate) fn call_completion(&self) -> Option<Arc<dyn CallCompletion>> {
        self.inner
            .completion
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connections opened since the runtime was built (warm-up included).
    pub fn connections_opened(&self) -> usize {
        self.transport().connections_opened()
    }

    /// Where this runtime's `{{secrets.NAME}}` come from.
    pub(crate) fn secret_source(&self) -> Arc<dyn SecretSource> {
        self.inner.parts.secrets.clone()
    }

    /// The egress policy in force.
    pub fn egress(&self) -> &EgressPolicy {
        self.transport().policy()
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
        let results = futures_util::future::join_all(
            origins
                .iter()
                .map(|o| async move { (o.to_string(), self.transport().warm(o, deadline).await) }),
        )
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
        let planned = self.plan(action, call, &tool);
        let (result, cache, filler_fired) = match planned {
            Err(f) => (Err(f), CacheStatus::Bypass, false),
            Ok(p) => {
                let deadline = ActionDeadline::new(action, budget, started);
                self.obtain_with_filler(action, p, deadline, started, &span, on_filler)
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
        self.apply(action, call, result, how)
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
        let planned: Vec<_> = calls.iter().map(|(a, t)| self.plan(a, call, t)).collect();
        let on_filler = &on_filler;
        let results =
            futures_util::future::join_all(planned.into_iter().zip(calls).zip(&spans).map(
                |((p, (action, _)), span)| async move {
                    match p {
                        Err(f) => (Err(f), CacheStatus::Bypass, false),
                        Ok(p) => {
                            let deadline = ActionDeadline::new(action, budget, started);
                            self.obtain_with_filler(action, p, deadline, started, span, |line| {
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
                self.apply(action, call, result, how)
            })
            .collect()
    }

    /// The obtain step with the filler alongside: background actions start and return at
    /// once; others run until their deadline, and `on_filler` is called when the action is
    /// still running `filler.after_ms` after `started`.
    pub(crate) async fn obtain_with_filler(
        &self,
        action: &ActionSpec,
        p: Prepared,
        deadline: ActionDeadline,
        started: Instant,
        span: &tracing::Span,
        on_filler: impl FnOnce(&str),
    ) -> (FetchResult, CacheStatus, bool) {
        span.record("url", p.log_url.as_str());
        if action.is_async() {
            return (self.spawn_background(p, span), CacheStatus::Bypass, false);
        }
        let obtain = self.obtain(action, p, deadline).instrument(span.clone());
        match action.filler() {
            Some(filler) => {
                tokio::pin!(obtain);
                tokio::select! {
                    biased;
                    (r, c) = &mut obtain => (r, c, false),
                    _ = tokio::time::sleep_until(started + filler.after) => {
                        on_filler(&filler.say);
                        let (r, c) = obtain.await;
                        (r, c, true)
                    }
                }
            }
            None => {
                let (r, c) = obtain.await;
                (r, c, false)
            }
        }
    }

    /// Drops the cache entries `action` wrote for `call`'s scope (call, agent or tenant).
    pub fn invalidate(&self, action: &ActionSpec, call: &CallInfo) {
        if let Some(policy) = action.cache() {
            self.invalidate_scope(action.fingerprint, &ScopeId::of(policy.scope, call));
        }
    }

    /// Entries and bytes held by the response cache.
    pub async fn cache_usage(&self) -> (u64, u64) {
        self.cache().usage().await
    }
}
