//! Builds a [`Runtime`]: network (egress, roots, resolver), secrets, pool, breaker, cache,
//! duplicate protection and the event bus, configured once.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use rustls_pki_types::CertificateDer;
use tokio::sync::Semaphore;

use super::breaker::Breakers;
use super::dedupe::DEFAULT_DEDUPE_WINDOW;
use super::error::BuildError;
use super::parts::Parts;
use super::runtime::Runtime;
use crate::cache::{ResponseCache, DEFAULT_CACHE_CAPACITY_BYTES};
use crate::events::EventBusBuilder;
use crate::template::{EnvSecrets, SecretSource};
use crate::transport::{EgressPolicy, Resolve, SystemResolver, Transport, TransportConfig};

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
    shared_cache: Option<crate::cache::SharedCacheConfig>,
    dedupe_window: Duration,
    event_bus: Option<EventBusBuilder>,
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
    /// [`crate::config::EgressConfig::policy`]. One runtime enforces one policy: its connections are
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
    pub fn add_root_certificates_pem(mut self, pem: &[u8]) -> Result<Self, BuildError> {
        self.extra_roots
            .extend(crate::transport::pem_certificates(pem).map_err(BuildError::Roots)?);
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
    /// A shared cache tier on Redis (L2) beside the in-process cache (L1): entries one
    /// process of a fleet fills are hits in the others. Default none.
    pub fn shared_cache(mut self, cfg: crate::cache::SharedCacheConfig) -> Self {
        self.shared_cache = Some(cfg);
        self
    }
    /// The in-process cache's capacity.
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

    /// Attaches an event bus (the durable outbox of event webhooks), built with this runtime's
    /// network settings (egress policy, roots, resolver: it shares the runtime's connection
    /// pool) and secrets, whatever the bus builder was given for those. With a bus, every
    /// tool call's `action` event, `phone_call_connected` at [`Runtime::start_call`] and the
    /// call's end ([`CallSession::end`](super::CallSession::end)) are published. Default none.
    pub fn event_bus(mut self, bus: EventBusBuilder) -> Self {
        self.event_bus = Some(bus);
        self
    }

    /// The idempotency header's name, or `None` to send none. Default `Idempotency-Key`.
    pub fn idempotency_header(mut self, name: Option<&str>) -> Result<Self, BuildError> {
        self.idempotency_header = match name {
            None => None,
            Some(n) => Some(HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                BuildError::IdempotencyHeader(format!("\"{n}\" is not a valid header name"))
            })?),
        };
        Ok(self)
    }

    /// Builds the runtime (and its event bus, when one is attached). Fails on an unusable
    /// root certificate, or with a bus: an outbox that cannot be opened, or outside a tokio
    /// runtime (the bus starts its delivery task). Never panics.
    pub fn build(self) -> Result<Runtime, BuildError> {
        let transport = Transport::new(TransportConfig {
            policy: self.policy,
            extra_roots: self.extra_roots,
            resolver: self.resolver,
            pool_idle_timeout: self.pool_idle_timeout,
            pool_max_idle_per_host: self.pool_max_idle_per_host,
            http2: self.http2,
        })
        .map_err(BuildError::Roots)?;
        let event_bus = match self.event_bus {
            None => None,
            Some(b) => Some(
                b.secrets(self.secrets.clone())
                    .build_with(Some(transport.clone()))
                    .map_err(BuildError::Bus)?,
            ),
        };
        let cache = Arc::new(ResponseCache::new(self.cache_capacity_bytes));
        let shared = match &self.shared_cache {
            None => None,
            Some(cfg) => {
                let tier = Arc::new(
                    crate::cache::shared::SharedTier::new(cfg).map_err(BuildError::SharedCache)?,
                );
                let l1 = Arc::downgrade(&cache);
                tier.set_on_invalidate(Arc::new(move |fp, scope| {
                    if let Some(c) = l1.upgrade() {
                        c.invalidate(fp, &scope);
                    }
                }));
                Some(tier)
            }
        };
        Ok(Runtime::from_parts(Parts {
            transport,
            secrets: self.secrets,
            breakers: Arc::new(Breakers::new(self.breaker_threshold, self.breaker_cooldown)),
            background: Arc::new(Semaphore::new(self.max_async_in_flight)),
            max_async_in_flight: self.max_async_in_flight,
            llm_result_max_bytes: self.llm_result_max_bytes,
            idempotency_header: self.idempotency_header,
            cache,
            shared,
            dedupe_window: self.dedupe_window,
            event_bus,
            gates: Default::default(),
            user_agent: http::header::HeaderValue::from_static(concat!(
                "midcall/",
                env!("CARGO_PKG_VERSION")
            )),
        }))
    }
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
            shared_cache: None,
            dedupe_window: DEFAULT_DEDUPE_WINDOW,
            event_bus: None,
        }
    }
}
