//! The shared cache tier (L2) on Redis or Valkey: extraction results, never raw bodies, under
//! keys every process of a fleet computes alike and outsiders can neither forge nor enumerate
//! (HMAC-SHA256 under the fleet's secret over scope, action fingerprint, method, URL, key
//! headers and body), namespaced by tenant. Every operation has a deadline (default 5 ms, never
//! more than what the action's budget has left); Redis down, slow or full is a miss, counted,
//! and never fails an action. Invalidation deletes the entries an action wrote for a scope and
//! tells every process to drop them from its own cache (pub/sub).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use serde_json::Value;

use super::{Entry, KeyParts, ScopeId};
use crate::state::StatePath;
use crate::template::Secret;

/// Default deadline of one shared-tier operation.
pub const DEFAULT_SHARED_OP_TIMEOUT: Duration = Duration::from_millis(5);

/// The pub/sub channel invalidations travel on.
const CHANNEL: &str = "midcall:invalidate";

/// How to reach the shared tier. Debug never shows the secret or the URL's password.
#[derive(Clone)]
pub struct SharedCacheConfig {
    pub(crate) url: String,
    pub(crate) secret: Secret,
    pub(crate) op_timeout: Duration,
}

impl std::fmt::Debug for SharedCacheConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCacheConfig")
            .field("url", &redact(&self.url))
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

impl SharedCacheConfig {
    /// `url` (`redis://host:port[/db]`) and the fleet's secret (the same in every process: it
    /// keys the HMAC of every cache key). Checked here: a URL that is not a Redis URL, or a
    /// secret shorter than 16 bytes, is an error naming the URL with its password hidden.
    pub fn new(url: &str, secret: Secret) -> Result<SharedCacheConfig, SharedCacheError> {
        redis::Client::open(url).map_err(|e| {
            SharedCacheError::Config(format!("{}: not a Redis URL: {e}", redact(url)))
        })?;
        if secret.expose().len() < 16 {
            return Err(SharedCacheError::Config(format!(
                "{}: the fleet's cache secret must be at least 16 bytes",
                redact(url)
            )));
        }
        Ok(SharedCacheConfig {
            url: url.to_string(),
            secret,
            op_timeout: DEFAULT_SHARED_OP_TIMEOUT,
        })
    }

    /// The deadline of one operation. Default [`DEFAULT_SHARED_OP_TIMEOUT`].
    pub fn op_timeout(mut self, d: Duration) -> Self {
        self.op_timeout = d.max(Duration::from_micros(100));
        self
    }
}

/// Why the shared cache tier cannot be used; the message names its URL (password hidden).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SharedCacheError {
    /// The configuration is wrong (not a Redis URL, a secret under 16 bytes): the
    /// operator's to fix.
    #[error("{0}")]
    Config(String),
    /// The server did not answer: it may later.
    #[error("{0}")]
    Unreachable(String),
}

impl SharedCacheError {
    /// Whether trying again later may succeed (the server was unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, SharedCacheError::Unreachable(_))
    }
}

/// A `redis://` URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    crate::template::redact_url(url)
}

/// An L2 key: `midcall:c:<tenant, hex>:<HMAC, hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SharedKey(pub(crate) String);

/// The tier: a connection made in the background (an action never waits for it) and the
/// fleet's HMAC key.
pub(crate) struct SharedTier {
    client: redis::Client,
    conn: Arc<OnceLock<ConnectionManager>>,
    connecting: std::sync::Once,
    hmac: ring::hmac::Key,
    op_timeout: Duration,
    shown: String,
    /// Called with (fingerprint, scope) when another process invalidates.
    on_invalidate: OnceLock<Arc<dyn Fn(u64, ScopeId) + Send + Sync>>,
}

impl std::fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTier")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    /// Values by state path.
    v: Vec<(String, Value)>,
    /// HTTP status.
    s: u16,
    /// A remembered 404.
    n: bool,
    /// Fresh until, ms since the epoch.
    f: u64,
    /// Servable stale until, ms since the epoch.
    x: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn count(op: &'static str, what: &'static str) {
    metrics::counter!("midcall_cache_shared_total", "op" => op, "result" => what).increment(1);
}

impl SharedTier {
    pub(crate) fn new(cfg: &SharedCacheConfig) -> Result<SharedTier, SharedCacheError> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| {
            SharedCacheError::Config(format!("{}: not a Redis URL: {e}", redact(&cfg.url)))
        })?;
        Ok(SharedTier {
            client,
            conn: Arc::new(OnceLock::new()),
            connecting: std::sync::Once::new(),
            hmac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, cfg.secret.expose().as_bytes()),
            op_timeout: cfg.op_timeout,
            shown: redact(&cfg.url),
            on_invalidate: OnceLock::new(),
        })
    }

    /// Where invalidations from other processes go (the process's own cache).
    pub(crate) fn set_on_invalidate(&self, f: Arc<dyn Fn(u64, ScopeId) + Send + Sync>) {
        let _ = self.on_invalidate.set(f);
    }

    fn manager_config() -> redis::aio::ConnectionManagerConfig {
        redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500))
    }

    /// Connects now (the CLI does at start, so an unreachable URL is a clear error) and
    /// starts listening for invalidations.
    pub(crate) async fn connect_now(
        self: &Arc<Self>,
        within: Duration,
    ) -> Result<(), SharedCacheError> {
        let down = SharedCacheError::Unreachable;
        let mgr = tokio::time::timeout(
            within,
            ConnectionManager::new_with_config(self.client.clone(), Self::manager_config()),
        )
        .await
        .map_err(|_| down(format!("{}: no answer within {within:?}", self.shown)))?
        .map_err(|e| down(format!("{}: {e}", self.shown)))?;
        let mut probe = mgr.clone();
        tokio::time::timeout(within, redis::cmd("PING").query_async::<String>(&mut probe))
            .await
            .map_err(|_| {
                down(format!(
                    "{}: no answer to PING within {within:?}",
                    self.shown
                ))
            })?
            .map_err(|e| down(format!("{}: {e}", self.shown)))?;
        let _ = self.conn.set(mgr);
        self.start(true);
        Ok(())
    }

    /// Starts connecting in the background (once) and the invalidation listener.
    fn start(self: &Arc<Self>, connected: bool) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.connecting.call_once(|| {
            if !connected {
                let client = self.client.clone();
                let slot = self.conn.clone();
                tokio::spawn(async move {
                    let mut backoff = Duration::from_millis(100);
                    loop {
                        match ConnectionManager::new_with_config(client.clone(), Self::manager_config()).await {
                            Ok(m) => {
                                let _ = slot.set(m);
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "shared cache: cannot connect; trying again");
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(5));
                            }
                        }
                    }
                });
            }
            tokio::spawn(listen(Arc::downgrade(self), self.client.clone()));
        });
    }

    fn conn(self: &Arc<Self>) -> Option<ConnectionManager> {
        match self.conn.get() {
            Some(c) => Some(c.clone()),
            None => {
                self.start(false);
                None
            }
        }
    }

    /// The key of a request: the same in every process that shares the secret, under its
    /// scope's tenant.
    pub(crate) fn key(&self, parts: &KeyParts<'_>) -> SharedKey {
        let mut ctx = ring::hmac::Context::with_key(&self.hmac);
        parts.each(|b| {
            ctx.update(&(b.len() as u64).to_le_bytes());
            ctx.update(b);
        });
        let tag = ctx.sign();
        SharedKey(format!(
            "midcall:c:{}:{}",
            hex(parts.scope.tenant().as_bytes()),
            hex(&tag.as_ref()[..20])
        ))
    }

    /// The index of the keys an action wrote for a scope (for invalidation).
    fn index(&self, fingerprint: u64, scope: &ScopeId) -> String {
        let tag = ring::hmac::sign(
            &self.hmac,
            format!("{fingerprint:x}\0{}", scope.0).as_bytes(),
        );
        format!("midcall:i:{}", hex(&tag.as_ref()[..20]))
    }

    fn deadline(&self, left: Option<Duration>) -> Duration {
        match left {
            Some(l) => self.op_timeout.min(l),
            None => self.op_timeout,
        }
    }

    /// A fresh or stale entry, or None (missing, expired, unreadable, or Redis unavailable).
    pub(crate) async fn get(
        self: &Arc<Self>,
        key: &SharedKey,
        fingerprint: u64,
        scope: &ScopeId,
        left: Option<Duration>,
    ) -> Option<Entry> {
        let Some(mut conn) = self.conn() else {
            count("get", "unavailable");
            return None;
        };
        let got = tokio::time::timeout(
            self.deadline(left),
            redis::cmd("GET")
                .arg(&key.0)
                .query_async::<Option<Vec<u8>>>(&mut conn),
        )
        .await;
        let bytes = match got {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => {
                count("get", "miss");
                return None;
            }
            Ok(Err(e)) => {
                count("get", "error");
                tracing::debug!(error = %e, "shared cache get");
                return None;
            }
            Err(_) => {
                count("get", "timeout");
                return None;
            }
        };
        let Ok(w) = serde_json::from_slice::<Wire>(&bytes) else {
            count("get", "unreadable");
            return None;
        };
        let now = unix_ms();
        if now >= w.x {
            count("get", "miss");
            return None;
        }
        let mut values = Vec::with_capacity(w.v.len());
        for (p, v) in w.v {
            values.push((StatePath::parse(&p).ok()?, v));
        }
        count("get", "hit");
        let inst = tokio::time::Instant::now();
        Some(Entry::with_deadlines(
            values,
            w.s,
            w.n,
            inst + Duration::from_millis(w.f.saturating_sub(now)),
            inst + Duration::from_millis(w.x.saturating_sub(now)),
            fingerprint,
            scope.clone(),
        ))
    }

    /// Stores an entry for its stale window (and indexes it for invalidation). Runs on its own
    /// task: never waited for by an action.
    pub(crate) fn put(self: &Arc<Self>, key: SharedKey, entry: &Entry) {
        let now_i = tokio::time::Instant::now();
        let fresh = entry.fresh_until.saturating_duration_since(now_i);
        let stale = entry.stale_until.saturating_duration_since(now_i);
        if stale.is_zero() {
            return;
        }
        let now = unix_ms();
        let w = Wire {
            v: entry
                .values
                .iter()
                .map(|(p, v)| (p.as_str().to_string(), v.clone()))
                .collect(),
            s: entry.http_status,
            n: entry.negative,
            f: now + fresh.as_millis() as u64,
            x: now + stale.as_millis() as u64,
        };
        let Ok(bytes) = serde_json::to_vec(&w) else {
            return;
        };
        let index = self.index(entry.fingerprint, &entry.scope);
        let Some(mut conn) = self.conn() else {
            count("put", "unavailable");
            return;
        };
        let timeout = self.op_timeout.max(Duration::from_millis(50));
        tokio::spawn(async move {
            let ms = stale.as_millis().max(1) as u64;
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(&key.0)
                .arg(bytes)
                .arg("PX")
                .arg(ms)
                .ignore();
            pipe.cmd("SADD").arg(&index).arg(&key.0).ignore();
            pipe.cmd("PEXPIRE").arg(&index).arg(ms).arg("GT").ignore();
            pipe.cmd("PEXPIRE").arg(&index).arg(ms).arg("NX").ignore();
            match tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await {
                Ok(Ok(())) => count("put", "ok"),
                Ok(Err(e)) => {
                    count("put", "error");
                    tracing::debug!(error = %e, "shared cache put");
                }
                Err(_) => count("put", "timeout"),
            }
        });
    }

    /// Deletes what an action wrote for a scope, in Redis and (through pub/sub) in every
    /// process's own cache. Runs on its own task.
    pub(crate) fn invalidate(self: &Arc<Self>, fingerprint: u64, scope: &ScopeId) {
        let index = self.index(fingerprint, scope);
        let msg = format!("{fingerprint:x}\0{}", scope.0);
        let Some(mut conn) = self.conn() else {
            count("invalidate", "unavailable");
            return;
        };
        tokio::spawn(async move {
            const SCRIPT: &str = "local k = redis.call('SMEMBERS', KEYS[1]) for i = 1, #k do redis.call('DEL', k[i]) end redis.call('DEL', KEYS[1]) redis.call('PUBLISH', ARGV[1], ARGV[2]) return #k";
            let r = tokio::time::timeout(
                Duration::from_millis(500),
                redis::cmd("EVAL")
                    .arg(SCRIPT)
                    .arg(1)
                    .arg(&index)
                    .arg(CHANNEL)
                    .arg(msg)
                    .query_async::<i64>(&mut conn),
            )
            .await;
            match r {
                Ok(Ok(_)) => count("invalidate", "ok"),
                Ok(Err(e)) => {
                    count("invalidate", "error");
                    tracing::warn!(error = %e, "shared cache invalidate");
                }
                Err(_) => count("invalidate", "timeout"),
            }
        });
    }
}

/// Listens for invalidations from every process; reconnects with backoff. Ends when the tier
/// is dropped.
async fn listen(tier: std::sync::Weak<SharedTier>, client: redis::Client) {
    use futures_util::StreamExt;
    let mut backoff = Duration::from_millis(100);
    loop {
        if tier.upgrade().is_none() {
            return;
        }
        if let Ok(mut ps) = client.get_async_pubsub().await {
            if ps.subscribe(CHANNEL).await.is_ok() {
                backoff = Duration::from_millis(100);
                let mut stream = ps.into_on_message();
                while let Some(m) = stream.next().await {
                    let Some(t) = tier.upgrade() else { return };
                    let Ok(payload) = m.get_payload::<String>() else {
                        continue;
                    };
                    let Some((fp, scope)) = payload.split_once('\0') else {
                        continue;
                    };
                    let Ok(fp) = u64::from_str_radix(fp, 16) else {
                        continue;
                    };
                    if let Some(f) = t.on_invalidate.get() {
                        f(fp, ScopeId(scope.to_string()));
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
