//! The runtime's parts: the pool, the breakers, the caches, the host gates, the event bus and
//! the settings, built once by the builder. The path's steps are functions over them
//! (`impl Parts` in `plan.rs`, `obtain.rs`, `send.rs`, `apply.rs`), so no step imports the
//! [`Runtime`](super::Runtime) handle and the handle imports the steps, not the other way round.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::breaker::Breakers;
use super::outcome::FetchResult;
use crate::cache::{ResponseCache, ScopeId};
use crate::events::EventBus;
use crate::state::CallInfo;
use crate::template::SecretSource;
use crate::transport::Transport;

/// Everything one action's path reads, shared by every clone of a runtime.
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
    pub(crate) user_agent: HeaderValue,
}

impl Parts {
    pub(crate) fn transport(&self) -> &Transport {
        &self.transport
    }
    pub(crate) fn secrets(&self) -> &dyn SecretSource {
        &*self.secrets
    }
    pub(crate) fn breakers(&self) -> &Arc<Breakers> {
        &self.breakers
    }
    pub(crate) fn cache(&self) -> &Arc<ResponseCache<FetchResult>> {
        &self.cache
    }
    pub(crate) fn shared_cache(&self) -> Option<&Arc<crate::cache::shared::SharedTier>> {
        self.shared.as_ref()
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
        &self.user_agent
    }
    pub(crate) fn idempotency_header(&self) -> Option<&HeaderName> {
        self.idempotency_header.as_ref()
    }
    pub(crate) fn llm_result_max_bytes(&self) -> usize {
        self.llm_result_max_bytes
    }
    pub(crate) fn dedupe_window(&self) -> Duration {
        self.dedupe_window
    }
    pub(crate) fn max_async_in_flight(&self) -> usize {
        self.max_async_in_flight
    }
    pub(crate) fn gates(&self) -> &super::gate::HostGates {
        &self.gates
    }
    pub(crate) fn background_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.background.clone().try_acquire_owned().ok()
    }

    /// Where this runtime's `{{secrets.NAME}}` come from.
    pub(crate) fn secret_source(&self) -> Arc<dyn SecretSource> {
        self.secrets.clone()
    }

    /// The event bus, when one is attached.
    pub(crate) fn event_bus(&self) -> Option<&EventBus> {
        self.event_bus.as_ref()
    }
}

/// The `action` span of one tool call (its URL, status, attempts and cache filled in as they
/// are known).
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
