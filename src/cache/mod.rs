//! The response cache: extraction results (never raw bodies) keyed by scope and rendered
//! request, weighed in bytes, with freshness read from tokio's clock; request coalescing for
//! identical requests in flight.
//!
//! Knows budgets only as the deadlines it is handed; stores nothing durably. May call:
//! `config`, `template`, `jsonpath`, `transport`, `state`, `time`; never `store` or above.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

pub mod shared;

pub use shared::{SharedCacheConfig, SharedCacheError, DEFAULT_SHARED_OP_TIMEOUT};

use crate::config::{CachePolicy, CacheScope};
use crate::state::{CallInfo, StatePath};

/// Default cache capacity: 64 MiB of extracted values.
pub const DEFAULT_CACHE_CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

/// How an outcome related to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CacheStatus {
    /// Cacheable, not in the cache: fetched upstream.
    Miss,
    /// Served from a fresh entry.
    Hit,
    /// Served from an expired entry inside its `stale_s` window while one refresh runs.
    Stale,
    /// Shared the upstream request of an identical request already in flight.
    Coalesced,
    /// Not cacheable (no `cache` policy, or a background action).
    Bypass,
}

impl CacheStatus {
    /// The name used in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Miss => "miss",
            CacheStatus::Hit => "hit",
            CacheStatus::Stale => "stale",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Bypass => "bypass",
        }
    }
}

/// Who may see an entry: the scope's id, always within one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScopeId(pub(crate) String);

impl ScopeId {
    /// The scope id of a call for a policy. `global` is tenant-wide like `tenant`: an entry is
    /// never visible across tenants.
    pub fn of(scope: CacheScope, call: &CallInfo) -> ScopeId {
        let mut s = String::with_capacity(64);
        // Lengths first, so ("ab","c") and ("a","bc") cannot meet.
        let mut push = |part: &str| {
            s.push_str(&part.len().to_string());
            s.push(':');
            s.push_str(part);
        };
        push(&call.tenant);
        match scope {
            CacheScope::Call => {
                push("call");
                push(&call.id);
            }
            CacheScope::Agent => {
                push("agent");
                push(&call.agent_id);
            }
            CacheScope::Tenant | CacheScope::Global => push("tenant"),
        }
        ScopeId(s)
    }

    /// The tenant it belongs to (its first part).
    pub(crate) fn tenant(&self) -> &str {
        self.0
            .split_once(':')
            .and_then(|(len, rest)| rest.get(..len.parse::<usize>().ok()?))
            .unwrap_or_default()
    }
}

/// What a cache key is made of: scope, action fingerprint, method, URL, the headers named as
/// key headers, and the body. Both tiers hash the same parts, length-prefixed
/// ([`KeyParts::each`]).
pub(crate) struct KeyParts<'a> {
    pub(crate) scope: &'a ScopeId,
    pub(crate) fingerprint: u64,
    pub(crate) method: &'a str,
    pub(crate) url: &'a str,
    pub(crate) key_headers: &'a [(&'a str, &'a [u8])],
    pub(crate) body: &'a [u8],
}

impl KeyParts<'_> {
    /// Calls `part` with every part in order; the caller writes each one's length first, so
    /// adjacent parts cannot run into each other.
    pub(crate) fn each(&self, mut part: impl FnMut(&[u8])) {
        part(self.scope.0.as_bytes());
        part(&self.fingerprint.to_le_bytes());
        part(self.method.as_bytes());
        part(self.url.as_bytes());
        for (k, v) in self.key_headers {
            part(k.as_bytes());
            part(v);
        }
        part(self.body);
    }
}

/// The values of a policy's key headers in `headers` (empty for a missing one).
pub(crate) fn key_headers<'a>(
    policy: &'a CachePolicy,
    headers: &'a http::HeaderMap,
) -> Vec<(&'a str, &'a [u8])> {
    policy
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
        .collect()
}

/// A cache key: two keyed SipHash-1-3 hashes (128 bits, keys random per process) over scope,
/// action fingerprint, method, URL, key headers and body; every part is length-prefixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey(u128);

impl CacheKey {
    pub(crate) fn new(parts: &KeyParts<'_>) -> CacheKey {
        CacheKey(keyed_hash128(|h| {
            parts.each(|b| {
                h.write_usize(b.len());
                h.write(b);
            })
        }))
    }
}

/// 128 bits of two SipHash passes keyed randomly per process: fast, and no one outside the
/// process can craft a collision (cache keys and duplicate-call keys never leave the process).
pub(crate) fn keyed_hash128(write: impl Fn(&mut dyn std::hash::Hasher)) -> u128 {
    use std::hash::{BuildHasher, Hasher};
    static KEYS: std::sync::OnceLock<(
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    )> = std::sync::OnceLock::new();
    let (a, b) = KEYS.get_or_init(|| (Default::default(), Default::default()));
    let mut ha = a.build_hasher();
    write(&mut ha);
    let mut hb = b.build_hasher();
    write(&mut hb);
    (u128::from(ha.finish()) << 64) | u128::from(hb.finish())
}

/// What is cached: the extracted values of a success, or a remembered 404.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) values: Vec<(StatePath, Value)>,
    pub(crate) http_status: u16,
    /// A remembered 404 (`negative_ttl_s`).
    pub(crate) negative: bool,
    pub(crate) fresh_until: Instant,
    pub(crate) stale_until: Instant,
    /// For invalidation: which action and scope wrote it.
    pub(crate) fingerprint: u64,
    pub(crate) scope: ScopeId,
    bytes: u32,
}

impl Entry {
    pub(crate) fn new(
        values: Vec<(StatePath, Value)>,
        http_status: u16,
        negative: bool,
        policy: &CachePolicy,
        fingerprint: u64,
        scope: ScopeId,
    ) -> Entry {
        let now = Instant::now();
        let ttl = if negative {
            policy.negative_ttl.unwrap_or_default()
        } else {
            policy.ttl
        };
        let stale = if negative {
            Duration::ZERO
        } else {
            policy.stale
        };
        Entry::with_deadlines(
            values,
            http_status,
            negative,
            now + ttl,
            now + ttl + stale,
            fingerprint,
            scope,
        )
    }

    /// An entry with its deadlines given (one read from the shared tier).
    pub(crate) fn with_deadlines(
        values: Vec<(StatePath, Value)>,
        http_status: u16,
        negative: bool,
        fresh_until: Instant,
        stale_until: Instant,
        fingerprint: u64,
        scope: ScopeId,
    ) -> Entry {
        let bytes = 96
            + scope.0.len()
            + values
                .iter()
                .map(|(k, v)| 48 + k.as_str().len() + crate::state::json_len(v))
                .sum::<usize>();
        Entry {
            values,
            http_status,
            negative,
            fresh_until,
            stale_until,
            fingerprint,
            scope,
            bytes: bytes.min(u32::MAX as usize) as u32,
        }
    }
}

/// What a lookup found.
pub(crate) enum Lookup {
    Fresh(Arc<Entry>),
    Stale(Arc<Entry>),
    Missing,
}

/// The result a shared fetch hands its waiters.
pub(crate) type Shared<T> = Arc<T>;

type FlightSender<T> = Arc<watch::Sender<Option<Shared<T>>>>;

/// The cache and the table of fetches in flight.
pub(crate) struct ResponseCache<T: Send + Sync + 'static> {
    entries: moka::future::Cache<CacheKey, Arc<Entry>>,
    inflight: Mutex<HashMap<CacheKey, FlightSender<T>>>,
}

impl<T: Send + Sync + 'static> fmt::Debug for ResponseCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseCache")
            .field("entries", &self.entries.entry_count())
            .field("bytes", &self.entries.weighted_size())
            .finish()
    }
}

/// Lets moka drop an entry some time after its stale window ends (wall-clock, approximate);
/// freshness itself is always judged on tokio's clock from the entry's own deadlines.
struct AfterStale;

#[allow(clippy::disallowed_types)] // moka's trait names std's Instant; it is not used here
impl moka::Expiry<CacheKey, Arc<Entry>> for AfterStale {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(
            value
                .stale_until
                .saturating_duration_since(Instant::now())
                .saturating_add(Duration::from_secs(1)),
        )
    }
}

/// The leader's side of a fetch in flight: publish the result with [`Flight::finish`]. It owns
/// what it needs, so the fetch can run on its own task.
pub(crate) struct Flight<T: Send + Sync + 'static> {
    cache: Arc<ResponseCache<T>>,
    key: CacheKey,
    /// `None` once finished.
    tx: Option<FlightSender<T>>,
}

/// Whether this caller leads the fetch or waits for another's.
pub(crate) enum Join<T: Send + Sync + 'static> {
    Lead(Flight<T>, watch::Receiver<Option<Shared<T>>>),
    Wait(watch::Receiver<Option<Shared<T>>>),
}

impl<T: Send + Sync + 'static> ResponseCache<T> {
    pub(crate) fn new(capacity_bytes: u64) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_k: &CacheKey, v: &Arc<Entry>| v.bytes)
            .expire_after(AfterStale)
            .support_invalidation_closures()
            .eviction_listener(|_k, _v, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    metrics::counter!("midcall_cache_evictions_total").increment(1);
                }
            })
            .build();
        ResponseCache {
            entries,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) async fn lookup(&self, key: &CacheKey) -> Lookup {
        match self.entries.get(key).await {
            Some(e) => {
                let now = Instant::now();
                if now < e.fresh_until {
                    Lookup::Fresh(e)
                } else if now < e.stale_until {
                    Lookup::Stale(e)
                } else {
                    Lookup::Missing
                }
            }
            None => Lookup::Missing,
        }
    }

    pub(crate) async fn insert(&self, key: CacheKey, entry: Entry) {
        self.insert_arc(key, Arc::new(entry)).await
    }

    pub(crate) async fn insert_arc(&self, key: CacheKey, entry: Arc<Entry>) {
        self.entries.insert(key, entry).await;
        metrics::gauge!("midcall_cache_bytes").set(self.entries.weighted_size() as f64);
    }

    /// Joins the fetch in flight for `key`, or becomes its leader.
    pub(crate) fn join(self: &Arc<Self>, key: CacheKey) -> Join<T> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = inflight.get(&key) {
            return Join::Wait(tx.subscribe());
        }
        let (tx, rx) = watch::channel(None);
        let tx = Arc::new(tx);
        inflight.insert(key, tx.clone());
        Join::Lead(
            Flight {
                cache: self.clone(),
                key,
                tx: Some(tx),
            },
            rx,
        )
    }

    /// Drops every entry an action wrote for a scope.
    pub(crate) fn invalidate(&self, fingerprint: u64, scope: &ScopeId) {
        let scope = scope.clone();
        let _ = self
            .entries
            .invalidate_entries_if(move |_k, v| v.fingerprint == fingerprint && v.scope == scope);
    }

    /// Entries and bytes held (after pending maintenance).
    pub(crate) async fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks().await;
        (self.entries.entry_count(), self.entries.weighted_size())
    }
}

impl<T: Send + Sync + 'static> Flight<T> {
    /// The cache this flight fills.
    pub(crate) fn cache(&self) -> &ResponseCache<T> {
        &self.cache
    }

    /// Resolves once nobody waits for this flight's result any more (every waiter gave up).
    pub(crate) async fn abandoned(&self) {
        match &self.tx {
            Some(tx) => tx.closed().await,
            None => std::future::pending().await,
        }
    }

    /// Publishes the result to every waiter and leaves the in-flight table.
    pub(crate) fn finish(mut self, result: Shared<T>) {
        // Leave the table first, so a request after this point starts a new fetch (or hits).
        self.leave();
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(result));
        }
    }

    fn leave(&self) {
        let mut inflight = self
            .cache
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        inflight.remove(&self.key);
    }
}

impl<T: Send + Sync + 'static> Drop for Flight<T> {
    fn drop(&mut self) {
        // Abandoned without a result (the task was cancelled): leave the table so the next
        // request starts afresh; waiters see the channel close.
        if self.tx.is_some() {
            self.leave();
        }
    }
}
