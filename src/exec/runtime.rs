//! The runtime: one per process, cheap to clone. The action path reads top to bottom in
//! [`Runtime::execute_with_filler`]: spec → args → render → egress → send → parse → extract →
//! apply → report.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::Full;
use rustls_pki_types::CertificateDer;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument;

use super::breaker::{Breakers, Permit};
use super::budget::Budget;
use super::dedupe::{dedupe_key, DEFAULT_DEDUPE_WINDOW};
use super::error::{Error, Fault, Kind, Retry};
use super::idempotency::idempotency_key;
use super::outcome::{llm_result, Outcome, Status, Timings};
use crate::cache::{
    CacheKey, CacheStatus, Entry, Join, Lookup, ResponseCache, ScopeId,
    DEFAULT_CACHE_CAPACITY_BYTES,
};
use crate::config::{ActionSet, ActionSpec, Method, RenderedRequest, RequestError};
use crate::jsonpath::Extractor;
use crate::state::{Call, CallInfo, StatePath};
use crate::template::{EnvSecrets, RenderContext, SecretSource};
use crate::transport::parse_retry_after;
use crate::transport::{
    ConnectError, Deadline, EgressPolicy, EgressRefusal, Exchange, Resolve, SystemResolver,
    Transport, TransportConfig, TransportError,
};

/// Default pool idle timeout: 90 s.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Default idle connections kept per host: 32.
pub const DEFAULT_POOL_MAX_IDLE_PER_HOST: usize = 32;
/// Default background (`async = true`) actions in flight: 64.
pub const DEFAULT_MAX_ASYNC_IN_FLIGHT: usize = 64;
/// Default consecutive failures that open a host's breaker: 5.
pub const DEFAULT_BREAKER_THRESHOLD: u32 = 5;
/// Default breaker cool-down before a probe: 5 s.
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(5);
/// Default cap on the model-facing result: 2 KiB of JSON.
pub const DEFAULT_LLM_RESULT_MAX_BYTES: usize = 2048;
/// Default idempotency header: `Idempotency-Key`.
pub const DEFAULT_IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// The least time a retried attempt is assumed to need, on top of the first attempt's own
/// duration, when deciding whether a 429's Retry-After fits the budget: 2 ms.
pub const MIN_RETRY_ATTEMPT: Duration = Duration::from_millis(2);

/// Builds a [`Runtime`]. Every setting has a default, given on its method.
#[derive(Clone)]
pub struct RuntimeBuilder {
    policy: EgressPolicy,
    extra_roots: Vec<CertificateDer<'static>>,
    resolver: Arc<dyn Resolve>,
    secrets: Arc<dyn SecretSource>,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
    http2: bool,
    max_async_in_flight: usize,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
    llm_result_max_bytes: usize,
    idempotency_header: Option<HeaderName>,
    cache_capacity_bytes: u64,
    dedupe_window: Duration,
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("policy", &self.policy)
            .field("extra_roots", &self.extra_roots.len())
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("max_async_in_flight", &self.max_async_in_flight)
            .finish_non_exhaustive()
    }
}

impl RuntimeBuilder {
    /// The egress policy. Default: HTTPS only, private and special ranges refused
    /// ([`EgressPolicy::new`]). Build it from an agent's `[egress]` with
    /// [`EgressPolicy::from_config`]. One runtime enforces one policy: its connections are
    /// pooled across actions, so the policy cannot vary per request.
    pub fn egress(mut self, policy: EgressPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Trusts an extra root certificate (DER), besides the bundled webpki roots. Default none.
    pub fn add_root_certificate(mut self, der: Vec<u8>) -> Self {
        self.extra_roots.push(CertificateDer::from(der));
        self
    }

    /// Trusts every certificate in a PEM bundle as an extra root. Default none.
    pub fn add_root_certificates_pem(mut self, pem: &[u8]) -> Result<Self, String> {
        self.extra_roots
            .extend(crate::transport::pem_certificates(pem)?);
        Ok(self)
    }

    /// The resolver for host names. Default: the system resolver.
    pub fn resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = resolver;
        self
    }

    /// Where `{{secrets.NAME}}` come from. Default: [`EnvSecrets`] (`MIDCALL_SECRET_<NAME>`).
    pub fn secrets(mut self, secrets: Arc<dyn SecretSource>) -> Self {
        self.secrets = secrets;
        self
    }

    /// How long an idle pooled connection is kept. Default 90 s.
    pub fn pool_idle_timeout(mut self, d: Duration) -> Self {
        self.pool_idle_timeout = d;
        self
    }

    /// Idle connections kept per host. Default 32.
    pub fn pool_max_idle_per_host(mut self, n: usize) -> Self {
        self.pool_max_idle_per_host = n;
        self
    }

    /// Offer HTTP/2 by ALPN on TLS connections. Default true.
    pub fn http2(mut self, yes: bool) -> Self {
        self.http2 = yes;
        self
    }

    /// Background actions in flight before new ones are refused. Default 64.
    pub fn max_async_in_flight(mut self, n: usize) -> Self {
        self.max_async_in_flight = n;
        self
    }

    /// Consecutive failures that open a host's breaker. Default 5.
    pub fn breaker_threshold(mut self, n: u32) -> Self {
        self.breaker_threshold = n;
        self
    }

    /// How long an open breaker waits before letting one probe through. Default 5 s.
    pub fn breaker_cooldown(mut self, d: Duration) -> Self {
        self.breaker_cooldown = d;
        self
    }

    /// Cap on the model-facing result, in bytes of JSON. Default 2048.
    pub fn llm_result_max_bytes(mut self, n: usize) -> Self {
        self.llm_result_max_bytes = n;
        self
    }

    /// Capacity of the response cache, in bytes of extracted values. Default 64 MiB.
    pub fn cache_capacity_bytes(mut self, n: u64) -> Self {
        self.cache_capacity_bytes = n;
        self
    }

    /// How long a successful tool call is remembered: the same action with the same canonical
    /// arguments in the same call within this window returns the earlier outcome
    /// (`deduplicated: true`) and sends nothing. Default 30 s; per action `dedupe = false`
    /// turns it off, and so does a zero window.
    pub fn dedupe_window(mut self, d: Duration) -> Self {
        self.dedupe_window = d;
        self
    }

    /// The idempotency header's name, or `None` to send none. Default `Idempotency-Key`.
    pub fn idempotency_header(mut self, name: Option<&str>) -> Result<Self, String> {
        self.idempotency_header = match name {
            None => None,
            Some(n) => Some(
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("\"{n}\" is not a valid header name"))?,
            ),
        };
        Ok(self)
    }

    /// Builds the runtime. Fails only on an unusable root certificate.
    pub fn build(self) -> Result<Runtime, String> {
        let transport = Transport::new(TransportConfig {
            policy: self.policy,
            extra_roots: self.extra_roots,
            resolver: self.resolver,
            pool_idle_timeout: self.pool_idle_timeout,
            pool_max_idle_per_host: self.pool_max_idle_per_host,
            http2: self.http2,
        })?;
        Ok(Runtime {
            inner: Arc::new(Inner {
                transport,
                secrets: self.secrets,
                breakers: Arc::new(Breakers::new(self.breaker_threshold, self.breaker_cooldown)),
                background: Arc::new(Semaphore::new(self.max_async_in_flight)),
                max_async_in_flight: self.max_async_in_flight,
                llm_result_max_bytes: self.llm_result_max_bytes,
                idempotency_header: self.idempotency_header,
                cache: Arc::new(ResponseCache::new(self.cache_capacity_bytes)),
                dedupe_window: self.dedupe_window,
                user_agent: HeaderValue::from_static(concat!(
                    "midcall/",
                    env!("CARGO_PKG_VERSION")
                )),
            }),
        })
    }
}

/// The mid-call action runtime. Cheap to clone, `Send + Sync`; make one per process.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    secrets: Arc<dyn SecretSource>,
    breakers: Arc<Breakers>,
    background: Arc<Semaphore>,
    max_async_in_flight: usize,
    llm_result_max_bytes: usize,
    idempotency_header: Option<HeaderName>,
    cache: Arc<ResponseCache<FetchResult>>,
    dedupe_window: Duration,
    user_agent: HeaderValue,
}

type FetchResult = Result<Fetched, Box<Failure>>;

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("transport", &self.inner.transport)
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

/// What [`Runtime::start_call`] did.
#[derive(Debug, Clone)]
pub struct StartReport {
    /// Connections opened ahead of the first turn (prefetched hosts count as warmed when they
    /// answered).
    pub warm: WarmReport,
    /// The prefetch actions' outcomes, in file order.
    pub prefetched: Vec<Outcome>,
}

fn action_span(action: &ActionSpec, call: &CallInfo) -> tracing::Span {
    tracing::info_span!(
        "action",
        action = action.name(),
        call_id = %call.id,
        status = tracing::field::Empty,
        attempts = tracing::field::Empty,
        cache = tracing::field::Empty,
        url = tracing::field::Empty,
    )
}

/// A cached entry as a fetch result: values, or the remembered 404.
fn from_entry(e: &Entry, action: &str) -> FetchResult {
    if e.negative {
        return Err(Box::new(Failure {
            status: Status::HttpError,
            error: Error::new(
                Kind::HttpStatus(404),
                Fault::Upstream,
                Retry::No,
                format!("action \"{action}\": upstream answered 404 Not Found (cached)"),
            ),
            http_status: Some(404),
            attempts: 0,
            timings: Timings::default(),
        }));
    }
    Ok(Fetched {
        values: e.values.clone(),
        http_status: e.http_status,
        attempts: 0,
        timings: Timings::default(),
    })
}

/// Waits, until this caller's own deadline, for a shared fetch's result.
async fn wait_shared(
    mut rx: tokio::sync::watch::Receiver<Option<Arc<FetchResult>>>,
    deadline: Deadline,
    action: &str,
) -> FetchResult {
    let failure = |status, kind, message: String| {
        Err(Box::new(Failure {
            status,
            error: Error::new(kind, Fault::Upstream, Retry::Yes, message),
            http_status: None,
            attempts: 0,
            timings: Timings::default(),
        }))
    };
    match tokio::time::timeout_at(deadline.timer_instant(), rx.wait_for(|v| v.is_some())).await {
        Ok(Ok(v)) => match v.as_ref() {
            Some(r) => (**r).clone(),
            None => failure(
                Status::TransportError,
                Kind::Transport,
                format!("action \"{action}\": the shared request ended without a result"),
            ),
        },
        Ok(Err(_)) => failure(
            Status::TransportError,
            Kind::Transport,
            format!("action \"{action}\": the shared request was abandoned"),
        ),
        Err(_) => failure(
            Status::TimedOut,
            Kind::Timeout,
            format!("action \"{action}\": timed out waiting for the response"),
        ),
    }
}

/// A rendered request ready to send, owning everything it needs.
struct Prepared {
    action: Arc<str>,
    method: Method,
    uri: http::Uri,
    host: String,
    headers: http::HeaderMap,
    body: Bytes,
    idempotent: bool,
    timeout: Duration,
    max_bytes: u64,
    /// The URL without query string, secrets redacted: safe for logs.
    log_url: String,
    /// The cache key and scope, for cacheable actions.
    cache: Option<(CacheKey, ScopeId)>,
    /// What the idempotency key is made from.
    idempotency: Option<Idempotency>,
}

struct Idempotency {
    call_id: String,
    tool_id: Option<String>,
    args: Value,
}

/// A failed attempt to get values.
#[derive(Clone)]
struct Failure {
    status: Status,
    error: Error,
    http_status: Option<u16>,
    attempts: u32,
    timings: Timings,
}

/// Values fetched and extracted, not yet applied.
#[derive(Clone)]
struct Fetched {
    values: Vec<(StatePath, Value)>,
    http_status: u16,
    attempts: u32,
    timings: Timings,
}

impl Runtime {
    /// A builder with every default.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            policy: EgressPolicy::new(),
            extra_roots: Vec::new(),
            resolver: Arc::new(SystemResolver),
            secrets: Arc::new(EnvSecrets),
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            pool_max_idle_per_host: DEFAULT_POOL_MAX_IDLE_PER_HOST,
            http2: true,
            max_async_in_flight: DEFAULT_MAX_ASYNC_IN_FLIGHT,
            breaker_threshold: DEFAULT_BREAKER_THRESHOLD,
            breaker_cooldown: DEFAULT_BREAKER_COOLDOWN,
            llm_result_max_bytes: DEFAULT_LLM_RESULT_MAX_BYTES,
            idempotency_header: Some(HeaderName::from_static(DEFAULT_IDEMPOTENCY_HEADER)),
            cache_capacity_bytes: DEFAULT_CACHE_CAPACITY_BYTES,
            dedupe_window: DEFAULT_DEDUPE_WINDOW,
        }
    }

    /// Connections opened since the runtime was built (warm-up included).
    pub fn connections_opened(&self) -> usize {
        self.inner.transport.connections_opened()
    }

    /// Where this runtime's `{{secrets.NAME}}` come from.
    pub(crate) fn secret_source(&self) -> Arc<dyn SecretSource> {
        self.inner.secrets.clone()
    }

    /// The egress policy in force.
    pub fn egress(&self) -> &EgressPolicy {
        self.inner.transport.policy()
    }

    /// Opens and TLS-handshakes one connection to every distinct action host, concurrently,
    /// within `within`, without sending a request; the first action to each host uses it.
    pub async fn warm(&self, set: &ActionSet, within: Duration) -> WarmReport {
        let mut origins: Vec<&str> = set.actions().iter().map(|a| a.url().origin()).collect();
        origins.sort_unstable();
        origins.dedup();
        self.warm_origins(&origins, within).await
    }

    async fn warm_origins(&self, origins: &[&str], within: Duration) -> WarmReport {
        let deadline = Deadline::at(Instant::now() + within);
        let results =
            futures_util::future::join_all(origins.iter().map(|o| async move {
                (o.to_string(), self.inner.transport.warm(o, deadline).await)
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

    /// Runs one tool call within `budget`; see [`Runtime::execute_with_filler`].
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

    /// Runs one tool call within `budget` and applies its outcome to `call`'s state.
    ///
    /// If the action is still running `filler.after_ms` after it started, `on_filler` is called
    /// once with the line to say, while the action goes on. On any status but ok, cache hit or
    /// accepted, the action's `on_failure` is applied (its variables set, its line in
    /// `Outcome::say`). The future is cancel-safe: dropping it (the caller barged in) drops the
    /// request and its connection; nothing of it keeps running. Actions with `async = true` are
    /// started in the background (bounded by `max_async_in_flight`) and return `accepted` at
    /// once; they never write state.
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
        let span = action_span(action, &call.info);
        // A re-issued identical tool call gets the earlier outcome; nothing is sent again.
        let dkey =
            (action.dedupe() && !action.is_async()).then(|| dedupe_key(action.name(), &tool.args));
        if let Some(o) = dkey.and_then(|k| self.deduplicated(call, k, started)) {
            return o;
        }
        // spec → args → render → egress
        let prepared = match self.prepare(action, call, &tool) {
            Ok(p) => p,
            Err(f) => {
                return self.finish(
                    action,
                    call,
                    Err(f),
                    CacheStatus::Bypass,
                    false,
                    dkey,
                    started,
                    &span,
                )
            }
        };
        span.record("url", prepared.log_url.as_str());
        if action.is_async() {
            let result = self.spawn_background(prepared, &span);
            return self.finish(
                action,
                call,
                result,
                CacheStatus::Bypass,
                false,
                None,
                started,
                &span,
            );
        }
        let deadline = budget.deadline_for(started, action.timeout());
        // cache → send → parse → extract, with the filler alongside
        let obtain = self
            .obtain(action, prepared, deadline)
            .instrument(span.clone());
        let mut filler_fired = false;
        let (result, cache) = match action.filler() {
            Some(filler) => {
                tokio::pin!(obtain);
                tokio::select! {
                    biased;
                    r = &mut obtain => r,
                    _ = tokio::time::sleep_until(started + filler.after) => {
                        filler_fired = true;
                        on_filler(&filler.say);
                        obtain.await
                    }
                }
            }
            None => obtain.await,
        };
        // apply → report
        self.finish(
            action,
            call,
            result,
            cache,
            filler_fired,
            dkey,
            started,
            &span,
        )
    }

    /// Runs several tool calls concurrently under one budget (the model's parallel tool calls).
    /// Outcomes come back in the order given, each applied to state in that order.
    pub async fn execute_all(
        &self,
        calls: &[(&ActionSpec, ToolCall)],
        call: &mut Call,
        budget: &Budget,
    ) -> Vec<Outcome> {
        self.execute_many(calls, call, budget, true).await
    }

    /// [`Runtime::execute_all`]; `from_model` false (prefetches) keeps these runs out of
    /// duplicate protection: the model did not make them, so its own later call of the same
    /// action goes through the cache instead.
    async fn execute_many(
        &self,
        calls: &[(&ActionSpec, ToolCall)],
        call: &mut Call,
        budget: &Budget,
        from_model: bool,
    ) -> Vec<Outcome> {
        let started = Instant::now();
        let spans: Vec<tracing::Span> = calls
            .iter()
            .map(|(a, _)| action_span(a, &call.info))
            .collect();
        let dkeys: Vec<Option<u128>> = calls
            .iter()
            .map(|(a, t)| {
                (from_model && a.dedupe() && !a.is_async()).then(|| dedupe_key(a.name(), &t.args))
            })
            .collect();
        let earlier: Vec<Option<Outcome>> = dkeys
            .iter()
            .map(|k| k.and_then(|k| self.deduplicated(call, k, started)))
            .collect();
        let prepared: Vec<Option<Result<Prepared, Box<Failure>>>> = calls
            .iter()
            .zip(&earlier)
            .map(|((a, t), e)| e.is_none().then(|| self.prepare(a, call, t)))
            .collect();
        let results =
            futures_util::future::join_all(prepared.into_iter().zip(calls).zip(&spans).map(
                |((p, (action, _)), span)| async move {
                    let p = match p? {
                        Ok(p) => p,
                        Err(f) => return Some((Err(f), CacheStatus::Bypass)),
                    };
                    span.record("url", p.log_url.as_str());
                    if action.is_async() {
                        return Some((self.spawn_background(p, span), CacheStatus::Bypass));
                    }
                    let deadline = budget.deadline_for(started, action.timeout());
                    Some(
                        self.obtain(action, p, deadline)
                            .instrument(span.clone())
                            .await,
                    )
                },
            ))
            .await;
        results
            .into_iter()
            .zip(earlier)
            .zip(calls)
            .zip(spans.iter().zip(dkeys))
            .map(|(((r, e), (action, _)), (span, dkey))| match (r, e) {
                (Some((r, cache)), _) => {
                    self.finish(action, call, r, cache, false, dkey, started, span)
                }
                (None, Some(o)) => o,
                // Every call was either answered from its earlier outcome or prepared.
                (None, None) => self.finish(
                    action,
                    call,
                    Err(Box::new(Failure {
                        status: Status::Rejected,
                        error: Error::new(
                            Kind::Render,
                            Fault::Local,
                            Retry::Yes,
                            "internal: the tool call was not prepared",
                        ),
                        http_status: None,
                        attempts: 0,
                        timings: Timings::default(),
                    })),
                    CacheStatus::Bypass,
                    false,
                    None,
                    started,
                    span,
                ),
            })
            .collect()
    }

    /// Drops the cache entries `action` wrote for `call`'s scope (call, agent or tenant).
    pub fn invalidate(&self, action: &ActionSpec, call: &CallInfo) {
        if let Some(policy) = action.cache() {
            self.inner
                .cache
                .invalidate(action.fingerprint, &ScopeId::of(policy.scope, call));
        }
    }

    /// Entries and bytes held by the response cache.
    pub async fn cache_usage(&self) -> (u64, u64) {
        self.inner.cache.usage().await
    }

    /// When the call connects: warms a connection to every action host and runs every action
    /// with `prefetch = "call_start"` concurrently, all within `within`. Prefetched values land
    /// in state before the first turn and prime the cache, so the later identical tool call is
    /// a hit.
    pub async fn start_call(
        &self,
        set: &ActionSet,
        call: &mut Call,
        within: Duration,
    ) -> StartReport {
        let budget = Budget::new(within);
        let prefetch: Vec<(&ActionSpec, ToolCall)> = set
            .actions()
            .iter()
            .filter(|a| a.prefetch().is_some())
            .map(|a| (&**a, ToolCall::from(Value::Object(Default::default()))))
            .collect();
        let prefetch_origins: Vec<&str> = prefetch.iter().map(|(a, _)| a.url().origin()).collect();
        let mut origins: Vec<&str> = set
            .actions()
            .iter()
            .map(|a| a.url().origin())
            .filter(|o| !prefetch_origins.contains(o))
            .collect();
        origins.sort_unstable();
        origins.dedup();
        let warm = self.warm_origins(&origins, within);
        let run = self.execute_many(&prefetch, call, &budget, false);
        let (mut warm, prefetched) = tokio::join!(warm, run);
        for ((a, _), o) in prefetch.iter().zip(&prefetched) {
            if o.http_status.is_some() || o.status.is_success() {
                warm.warmed.push(a.url().origin().to_string());
            }
        }
        warm.warmed.sort();
        warm.warmed.dedup();
        StartReport { warm, prefetched }
    }

    /// The call ended: publishes `phone_call_ended` and `post_call_processing_completed` and
    /// queues the call_completed automations whose agents include the call's agent; see
    /// [`crate::Automations::complete_call`]. Returns the queued runs' ids.
    pub async fn complete_call(
        &self,
        automations: &crate::Automations,
        call: &Call,
        end: &crate::CallEnd,
    ) -> Result<Vec<String>, crate::StartError> {
        automations.complete_call(call, end).await
    }

    /// The earlier outcome of an identical tool call, marked as such.
    fn deduplicated(&self, call: &Call, key: u128, started: Instant) -> Option<Outcome> {
        let earlier = call.recent.find(key, self.inner.dedupe_window)?;
        let mut o = earlier.clone();
        o.deduplicated = true;
        o.attempts = 0;
        o.filler_fired = false;
        o.timings = Timings {
            total: started.elapsed(),
            ..Timings::default()
        };
        metrics::counter!("midcall_deduplicated_total", "action" => o.action.clone()).increment(1);
        Some(o)
    }

    /// The cache step: a fresh entry, a stale one (with one refresh), a fetch shared with
    /// identical requests in flight, or a plain fetch for actions that are not cacheable.
    async fn obtain(
        &self,
        action: &ActionSpec,
        p: Prepared,
        deadline: Deadline,
    ) -> (FetchResult, CacheStatus) {
        let (Some((key, scope)), Some(policy)) = (p.cache.clone(), action.cache()) else {
            return (
                self.fetch(&p, action.extractor(), deadline).await,
                CacheStatus::Bypass,
            );
        };
        let cache = &self.inner.cache;
        match cache.lookup(&key).await {
            Lookup::Fresh(e) => {
                metrics::counter!("midcall_cache_hits_total").increment(1);
                (from_entry(&e, &p.action), CacheStatus::Hit)
            }
            Lookup::Stale(e) => {
                metrics::counter!("midcall_cache_stale_total").increment(1);
                let r = from_entry(&e, &p.action);
                // One refresh at a time: a refresh already in flight is left alone.
                if let Join::Lead(flight, _) = cache.join(key) {
                    self.spawn_shared(flight, p, action, policy.clone(), scope);
                }
                (r, CacheStatus::Stale)
            }
            Lookup::Missing => match cache.join(key) {
                Join::Lead(flight, rx) => {
                    metrics::counter!("midcall_cache_misses_total").increment(1);
                    let name = p.action.clone();
                    self.spawn_shared(flight, p, action, policy.clone(), scope);
                    (wait_shared(rx, deadline, &name).await, CacheStatus::Miss)
                }
                Join::Wait(rx) => {
                    metrics::counter!("midcall_cache_coalesced_total").increment(1);
                    let r = wait_shared(rx, deadline, &p.action).await.map(|mut f| {
                        f.attempts = 0;
                        f
                    });
                    (r, CacheStatus::Coalesced)
                }
            },
        }
    }

    /// Runs a cacheable fetch on its own task, bounded by the action's timeout, fills the cache
    /// and hands the result to every waiter. A waiter that gives up does not cancel it.
    fn spawn_shared(
        &self,
        flight: crate::cache::Flight<FetchResult>,
        p: Prepared,
        action: &ActionSpec,
        policy: crate::config::CachePolicy,
        scope: ScopeId,
    ) {
        let this = self.clone();
        let extractor = action.extractor_arc();
        let fingerprint = action.fingerprint;
        let key = p.cache.as_ref().map(|(k, _)| *k);
        tokio::spawn(
            async move {
                let deadline = Deadline::at(Instant::now() + p.timeout);
                let r = this.fetch(&p, &extractor, deadline).await;
                let entry = match &r {
                    Ok(f) => Some(Entry::new(
                        f.values.clone(),
                        f.http_status,
                        false,
                        &policy,
                        fingerprint,
                        scope,
                    )),
                    Err(f) if f.http_status == Some(404) && policy.negative_ttl.is_some() => Some(
                        Entry::new(Vec::new(), 404, true, &policy, fingerprint, scope),
                    ),
                    // A failed refresh keeps the stale entry: stale-if-error.
                    Err(_) => None,
                };
                if let (Some(e), Some(k)) = (entry, key) {
                    flight.cache().insert(k, e).await;
                }
                flight.finish(Arc::new(r));
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// Validates the arguments, renders the request and checks it against the egress policy.
    fn prepare(
        &self,
        action: &ActionSpec,
        call: &Call,
        tool: &ToolCall,
    ) -> Result<Prepared, Box<Failure>> {
        let reject = |kind: Kind, fault: Fault, message: String| {
            Box::new(Failure {
                status: Status::Rejected,
                error: Error::new(kind, fault, Retry::No, message),
                http_status: None,
                attempts: 0,
                timings: Timings::default(),
            })
        };
        let ctx = RenderContext {
            call: &call.info,
            state: &call.state,
            args: &tool.args,
            transcript: &call.transcript,
            secrets: &*self.inner.secrets,
            payload: None,
        };
        let rendered: RenderedRequest = action.render(&ctx).map_err(|e| match e {
            RequestError::Args(a) => reject(Kind::InvalidArguments, Fault::Config, a.to_string()),
            RequestError::Render { .. } => reject(Kind::Render, Fault::Config, e.to_string()),
        })?;
        let policy = self.inner.transport.policy();
        if let Err(r) = policy.check_scheme(action.url().is_https()) {
            return Err(reject(Kind::Egress, Fault::Config, r.to_string()));
        }
        let host = action.url().host().to_string();
        let uri: http::Uri = rendered.url.parse().map_err(|_| {
            reject(
                Kind::Render,
                Fault::Config,
                format!(
                    "action \"{}\": the rendered URL is not valid",
                    action.name()
                ),
            )
        })?;
        let mut headers = http::HeaderMap::with_capacity(rendered.headers.len() + 4);
        for (name, value) in &rendered.headers {
            let (Ok(n), Ok(mut v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) else {
                return Err(reject(
                    Kind::Render,
                    Fault::Config,
                    format!(
                        "action \"{}\": header \"{name}\" is not a valid header",
                        action.name()
                    ),
                ));
            };
            // Marked sensitive so hyper never logs it; checked without building a redacted copy.
            if rendered.redactor.appears_in(value) {
                v.set_sensitive(true);
            }
            headers.append(n, v);
        }
        headers.insert(http::header::USER_AGENT, self.inner.user_agent.clone());
        if !headers.contains_key(http::header::ACCEPT) {
            headers.insert(
                http::header::ACCEPT,
                HeaderValue::from_static("application/json"),
            );
        }
        // The idempotency key is computed when a request is actually sent (a cache hit
        // never needs it).
        let idempotency = self.inner.idempotency_header.as_ref().map(|_| Idempotency {
            call_id: call.info.id.clone(),
            tool_id: tool.id.clone(),
            args: tool.args.clone(),
        });
        let path_only = rendered.url.split('?').next().unwrap_or_default();
        let body = rendered.body.map(Bytes::from).unwrap_or_default();
        let cache = action.cache().filter(|_| !action.is_async()).map(|policy| {
            let scope = ScopeId::of(policy.scope, &call.info);
            let key_headers: Vec<(&str, &[u8])> = policy
                .key_headers
                .iter()
                .map(|h| {
                    (
                        h.as_str(),
                        headers
                            .get(h.as_str())
                            .map(|v| v.as_bytes())
                            .unwrap_or_default(),
                    )
                })
                .collect();
            let key = CacheKey::new(
                &scope,
                action.fingerprint,
                action.method().as_str(),
                &rendered.url,
                &key_headers,
                &body,
            );
            (key, scope)
        });
        Ok(Prepared {
            action: action.name().into(),
            method: action.method(),
            uri,
            host,
            headers,
            body,
            idempotent: action.is_idempotent(),
            timeout: action.timeout(),
            max_bytes: action.max_response_bytes(),
            log_url: rendered.redactor.redact(path_only),
            cache,
            idempotency,
        })
    }

    fn request(
        &self,
        p: &Prepared,
        idempotency: Option<&HeaderValue>,
    ) -> http::Request<Full<Bytes>> {
        let method = match p.method {
            Method::Get => http::Method::GET,
            Method::Head => http::Method::HEAD,
            Method::Post => http::Method::POST,
            Method::Put => http::Method::PUT,
            Method::Patch => http::Method::PATCH,
            Method::Delete => http::Method::DELETE,
        };
        let mut req = http::Request::new(Full::new(p.body.clone()));
        *req.method_mut() = method;
        *req.uri_mut() = p.uri.clone();
        *req.headers_mut() = p.headers.clone();
        if let (Some(name), Some(v)) = (&self.inner.idempotency_header, idempotency) {
            req.headers_mut().insert(name.clone(), v.clone());
        }
        req
    }

    /// Sends (with the two allowed retries), reads, parses and extracts. Touches no call state.
    async fn fetch(
        &self,
        p: &Prepared,
        extractor: &Extractor,
        deadline: Deadline,
    ) -> Result<Fetched, Box<Failure>> {
        let mut timings = Timings::default();
        let fail = |status, kind, fault, retry, message: String, http_status, attempts, timings| {
            Box::new(Failure {
                status,
                error: Error::new(kind, fault, retry, message),
                http_status,
                attempts,
                timings,
            })
        };
        if deadline.remaining().is_zero() {
            return Err(fail(
                Status::TimedOut,
                Kind::Timeout,
                Fault::Local,
                Retry::Yes,
                format!("action \"{}\": no time left in the budget", p.action),
                None,
                0,
                timings,
            ));
        }
        let Some(permit) = self.inner.breakers.check(&p.host) else {
            return Err(fail(
                Status::CircuitOpen,
                Kind::CircuitOpen,
                Fault::Upstream,
                Retry::Yes,
                format!(
                    "action \"{}\": circuit open for {} after repeated failures",
                    p.action, p.host
                ),
                None,
                0,
                timings,
            ));
        };
        let idempotency = p.idempotency.as_ref().and_then(|i| {
            HeaderValue::from_str(&idempotency_key(
                &i.call_id,
                i.tool_id.as_deref(),
                &p.action,
                &i.args,
            ))
            .ok()
        });
        let mut attempts = 0;
        let exchange: Exchange = loop {
            attempts += 1;
            let attempt_start = Instant::now();
            match self
                .inner
                .transport
                .exchange(self.request(p, idempotency.as_ref()), deadline, p.max_bytes)
                .await
            {
                Ok(ex) if ex.status == http::StatusCode::TOO_MANY_REQUESTS && attempts == 1 => {
                    let delay = ex
                        .headers
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    let needed = delay.map(|d| d + attempt_start.elapsed() + MIN_RETRY_ATTEMPT);
                    match needed {
                        Some(n) if n <= deadline.remaining() => {
                            tokio::time::sleep(delay.unwrap_or_default()).await;
                            continue;
                        }
                        _ => {
                            record(permit, true);
                            return Err(fail(
                                Status::RateLimited,
                                Kind::RateLimited,
                                Fault::Upstream,
                                Retry::Yes,
                                match delay {
                                    Some(d) => format!(
                                        "action \"{}\": rate limited (429); Retry-After {} ms does not fit the {} ms left",
                                        p.action,
                                        d.as_millis(),
                                        deadline.remaining().as_millis()
                                    ),
                                    None => format!("action \"{}\": rate limited (429) with no usable Retry-After", p.action),
                                },
                                Some(429),
                                attempts,
                                timings,
                            ));
                        }
                    }
                }
                Ok(ex) => break ex,
                Err(TransportError::Io { stale: true, .. })
                    if attempts == 1 && p.idempotent && !deadline.remaining().is_zero() =>
                {
                    continue;
                }
                Err(e) => {
                    let (status, kind, fault, retry) = match &e {
                        TransportError::Timeout { .. } => {
                            (Status::TimedOut, Kind::Timeout, Fault::Upstream, Retry::Yes)
                        }
                        TransportError::Connect(ConnectError::Egress(_)) => {
                            (Status::Rejected, Kind::Egress, Fault::Config, Retry::No)
                        }
                        TransportError::Connect(ConnectError::Tls(_)) => (
                            Status::TransportError,
                            Kind::Tls,
                            Fault::Upstream,
                            Retry::No,
                        ),
                        TransportError::Connect(_) => (
                            Status::TransportError,
                            Kind::Connect,
                            Fault::Upstream,
                            Retry::Yes,
                        ),
                        TransportError::Io { .. } => (
                            Status::TransportError,
                            Kind::Transport,
                            Fault::Upstream,
                            Retry::IfIdempotent,
                        ),
                        TransportError::TooLarge { .. } => (
                            Status::InvalidResponse,
                            Kind::InvalidResponse,
                            Fault::Upstream,
                            Retry::No,
                        ),
                    };
                    // An egress refusal or an oversized body says nothing about the host's health.
                    let healthy = matches!(status, Status::Rejected | Status::InvalidResponse);
                    record(permit, healthy);
                    let attempts_made =
                        if matches!(e, TransportError::Connect(ConnectError::Egress(_))) {
                            attempts - 1
                        } else {
                            attempts
                        };
                    return Err(fail(
                        status,
                        kind,
                        fault,
                        retry,
                        format!("action \"{}\": {}", p.action, describe_transport(&e)),
                        None,
                        attempts_made,
                        timings,
                    ));
                }
            }
        };
        timings.connect = exchange.connect;
        timings.tls = exchange.tls;
        timings.ttfb = Some(exchange.ttfb);
        timings.body = Some(exchange.body_time);
        let code = exchange.status.as_u16();
        if !exchange.status.is_success() {
            record(permit, code < 500);
            let what = if exchange.status.is_redirection() {
                " (redirects are not followed)"
            } else {
                ""
            };
            return Err(fail(
                if code == 429 {
                    Status::RateLimited
                } else {
                    Status::HttpError
                },
                if code == 429 {
                    Kind::RateLimited
                } else {
                    Kind::HttpStatus(code)
                },
                Fault::Upstream,
                if code >= 500 || code == 429 {
                    Retry::Yes
                } else {
                    Retry::No
                },
                format!(
                    "action \"{}\": upstream answered {}{what}",
                    p.action, exchange.status
                ),
                Some(code),
                attempts,
                timings,
            ));
        }
        record(permit, true);
        let invalid = |message: String, timings| {
            fail(
                Status::InvalidResponse,
                Kind::InvalidResponse,
                Fault::Upstream,
                Retry::No,
                format!("action \"{}\": {message}", p.action),
                Some(code),
                attempts,
                timings,
            )
        };
        if extractor.is_empty() {
            return Ok(Fetched {
                values: Vec::new(),
                http_status: code,
                attempts,
                timings,
            });
        }
        if let Some(enc) = exchange.headers.get(http::header::CONTENT_ENCODING) {
            if !enc.as_bytes().eq_ignore_ascii_case(b"identity") {
                return Err(invalid(
                    format!(
                        "the response is compressed ({}); none was asked for",
                        String::from_utf8_lossy(enc.as_bytes())
                    ),
                    timings,
                ));
            }
        }
        let ctype = exchange
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_json_content_type(ctype) {
            return Err(invalid(
                format!(
                    "expected a JSON response, got content type \"{}\"",
                    ctype.chars().take(64).collect::<String>()
                ),
                timings,
            ));
        }
        let extracted = match extractor.extract_bytes(&exchange.body) {
            Ok(x) => x,
            Err(e) => return Err(invalid(e.to_string(), timings)),
        };
        timings.parse = Some(extracted.parse);
        timings.extract = Some(extracted.extract);
        let values = extracted.values;
        Ok(Fetched {
            values,
            http_status: code,
            attempts,
            timings,
        })
    }

    /// Starts a background action; the caller gets `accepted` or, when full, `rejected`.
    fn spawn_background(&self, p: Prepared, span: &tracing::Span) -> Result<Fetched, Box<Failure>> {
        let Ok(permit) = self.inner.background.clone().try_acquire_owned() else {
            return Err(Box::new(Failure {
                status: Status::Rejected,
                error: Error::new(
                    Kind::Overloaded,
                    Fault::Local,
                    Retry::Yes,
                    format!(
                        "action \"{}\": {} background actions already in flight",
                        p.action, self.inner.max_async_in_flight
                    ),
                ),
                http_status: None,
                attempts: 0,
                timings: Timings::default(),
            }));
        };
        let this = self.clone();
        let span = tracing::info_span!(parent: span, "background");
        tokio::spawn(
            async move {
                let _permit = permit;
                let started = Instant::now();
                let deadline = Deadline::at(started + p.timeout);
                let result = this.fetch(&p, &Extractor::default(), deadline).await;
                let status = match &result {
                    Ok(_) => Status::Ok,
                    Err(f) => f.status,
                };
                report_metrics(&p.action, status, started.elapsed());
                match result {
                    Ok(f) => tracing::info!(status = "ok", http_status = f.http_status, "background action done"),
                    Err(f) => tracing::warn!(status = f.status.as_str(), error = %f.error, "background action failed"),
                }
            }
            .instrument(span),
        );
        Ok(Fetched {
            values: Vec::new(),
            http_status: 0,
            attempts: 0,
            timings: Timings::default(),
        })
    }

    /// Applies the result to state (values, or the fallback) and builds the outcome.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        action: &ActionSpec,
        call: &mut Call,
        result: FetchResult,
        cache: CacheStatus,
        filler_fired: bool,
        dedupe: Option<u128>,
        started: Instant,
        span: &tracing::Span,
    ) -> Outcome {
        let limit = self.inner.llm_result_max_bytes;
        let mut outcome = Outcome {
            action: action.name().to_string(),
            status: Status::Ok,
            http_status: None,
            attempts: 0,
            values: Vec::new(),
            llm_result: Value::Null,
            say: None,
            filler_fired,
            cache,
            deduplicated: false,
            timings: Timings::default(),
            error: None,
        };
        match result {
            Ok(f) => {
                outcome.status = if action.is_async() {
                    Status::Accepted
                } else if matches!(cache, CacheStatus::Hit | CacheStatus::Stale) {
                    Status::CacheHit
                } else {
                    Status::Ok
                };
                outcome.http_status = (f.http_status != 0).then_some(f.http_status);
                outcome.attempts = f.attempts;
                outcome.timings = f.timings;
                let mut refused = None;
                for (path, value) in &f.values {
                    if let Err(e) = call.state.set(path, value.clone()) {
                        refused = Some(e);
                        break;
                    }
                }
                match refused {
                    None => {
                        outcome.llm_result = if outcome.status == Status::Accepted {
                            serde_json::json!({"accepted": true})
                        } else {
                            llm_result(outcome.status, &f.values, None, limit)
                        };
                        outcome.values = f.values;
                    }
                    Some(e) => {
                        outcome.status = Status::InvalidResponse;
                        outcome.error = Some(Error::new(
                            Kind::State,
                            Fault::Local,
                            Retry::No,
                            format!("action \"{}\": {e}", action.name()),
                        ));
                    }
                }
            }
            Err(f) => {
                outcome.status = f.status;
                outcome.http_status = f.http_status;
                outcome.attempts = f.attempts;
                outcome.timings = f.timings;
                outcome.error = Some(f.error);
            }
        }
        if !outcome.status.is_success() {
            let fallback = action.on_failure();
            for (path, value) in &fallback.set {
                if let Err(e) = call.state.set(path, value.clone()) {
                    tracing::warn!(parent: span, error = %e, "fallback state write refused");
                }
            }
            outcome.say = fallback.say.clone();
            outcome.llm_result = llm_result(outcome.status, &[], outcome.error.as_ref(), limit);
        }
        if outcome.status == Status::Ok {
            for (fingerprint, scope) in &action.invalidates_resolved {
                self.inner
                    .cache
                    .invalidate(*fingerprint, &ScopeId::of(*scope, &call.info));
            }
        }
        outcome.timings.total = started.elapsed();
        if let (Some(key), true) = (
            dedupe,
            matches!(outcome.status, Status::Ok | Status::CacheHit),
        ) {
            call.recent
                .remember(key, &outcome, self.inner.dedupe_window);
        }
        span.record("status", outcome.status.as_str());
        span.record("attempts", outcome.attempts);
        span.record("cache", outcome.cache.as_str());
        report_metrics(action.name(), outcome.status, outcome.timings.total);
        outcome
    }
}

fn record(permit: Permit, success: bool) {
    permit.record(success);
}

fn report_metrics(action: &str, status: Status, elapsed: Duration) {
    metrics::histogram!("midcall_action_duration_seconds", "action" => action.to_string(), "status" => status.as_str())
        .record(elapsed.as_secs_f64());
    metrics::counter!("midcall_actions_total", "action" => action.to_string(), "status" => status.as_str())
        .increment(1);
}

fn is_json_content_type(ct: &str) -> bool {
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

fn describe_transport(e: &TransportError) -> String {
    match e {
        TransportError::Timeout { got_headers: false } => {
            "timed out waiting for the response".into()
        }
        TransportError::Timeout { got_headers: true } => {
            "timed out reading the response body".into()
        }
        TransportError::Connect(ConnectError::Egress(EgressRefusal::Address(ip))) => {
            format!("destination {ip} is not allowed by the egress policy")
        }
        TransportError::Connect(c) => c.to_string(),
        TransportError::Io { message, .. } => message.clone(),
        TransportError::TooLarge { limit } => {
            format!("the response body is over the {limit}-byte limit")
        }
    }
}
