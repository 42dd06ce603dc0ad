//! Step 2 of the path (async, never touches the call): a cached answer, a fetch shared with
//! identical requests in flight, or a fetch of its own (`send.rs`).

use std::sync::Arc;

use tokio::time::Instant;
use tracing::Instrument;

use super::budget::ActionDeadline;
use super::error::{Failure, Fault, Kind, Retry};
use super::outcome::Timings;
use super::outcome::{FetchResult, Fetched};
use super::parts::Parts;
use super::plan::Prepared;
use crate::cache::shared::{SharedKey, SharedTier};
use crate::cache::{key_headers, CacheStatus, Entry, Join, KeyParts, Lookup, ScopeId};
use crate::config::{ActionSpec, CachePolicy};

/// A cached entry as a fetch result: values, or the remembered 404.
pub(crate) fn from_entry(e: &Entry, action: &str) -> FetchResult {
    if e.negative {
        return Err(Failure::new(
            Kind::HttpStatus(404),
            Fault::Upstream,
            Retry::No,
            format!("action \"{action}\": upstream answered 404 Not Found (cached)"),
        )
        .http(404));
    }
    Ok(Fetched {
        values: e.values.clone(),
        http_status: e.http_status,
        attempts: 0,
        timings: Timings::default(),
    })
}

/// What waiting for a shared fetch gave: its result, or nothing because it was abandoned
/// (its last waiter left just before this one joined).
enum Shared {
    Done(FetchResult),
    Abandoned,
}

/// Waits, until this caller's own deadline, for a shared fetch's result.
async fn wait_shared(
    mut rx: tokio::sync::watch::Receiver<Option<Arc<FetchResult>>>,
    deadline: ActionDeadline,
    action: &str,
) -> Shared {
    let waited = tokio::time::timeout_at(
        deadline.deadline.timer_instant(),
        rx.wait_for(|v| v.is_some()),
    )
    .await;
    match waited {
        Ok(Ok(v)) => match v.as_ref() {
            Some(r) => Shared::Done((**r).clone()),
            None => Shared::Abandoned,
        },
        Ok(Err(_)) => Shared::Abandoned,
        Err(_) => Shared::Done(Err(Failure::new(
            Kind::Timeout,
            deadline.fault(),
            Retry::Yes,
            format!("action \"{action}\": timed out waiting for the response"),
        )
        .with_reason("the service did not answer in time"))),
    }
}

/// A request's key in the shared tier (the URL as sent, the policy's key headers as sent).
fn shared_key_of(
    tier: &SharedTier,
    p: &Prepared,
    policy: &CachePolicy,
    scope: &ScopeId,
    fingerprint: u64,
) -> SharedKey {
    tier.key(&KeyParts {
        scope,
        fingerprint,
        method: p.method.as_str(),
        url: &p.uri.to_string(),
        key_headers: &key_headers(policy, &p.headers),
        body: &p.body,
    })
}

impl Parts {
    /// The cache step: a fresh entry, a stale one (with one refresh), a fetch shared with
    /// identical requests in flight, or a plain fetch for actions that are not cacheable.
    ///
    /// A shared fetch runs on its own task for as long as anyone waits for it: when its last
    /// waiter leaves (every tool call waiting on it was cancelled), it is dropped with its
    /// request and connection. A stale entry's refresh has no waiter and runs to the end
    /// within the action's timeout.
    pub(crate) async fn obtain(
        self: &Arc<Self>,
        action: &ActionSpec,
        p: Prepared,
        deadline: ActionDeadline,
    ) -> (FetchResult, CacheStatus) {
        let (Some((key, scope)), Some(policy)) = (p.cache.clone(), action.cache()) else {
            return (
                self.fetch(&p, action.extractor(), deadline).await,
                CacheStatus::Bypass,
            );
        };
        let cache = self.cache();
        let mut found = cache.lookup(&key).await;
        // The shared tier's key is made only past a miss here (a hit never needs it).
        let mut shared_key = None;
        if let (Lookup::Missing, Some(tier)) = (&found, self.shared_cache()) {
            let sk = shared_key.insert(shared_key_of(tier, &p, policy, &scope, action.fingerprint));
            // The shared tier, within what the budget has left (never more than its own
            // deadline); a hit there fills this process's cache.
            let left = deadline
                .deadline
                .timer_instant()
                .saturating_duration_since(Instant::now());
            if let Some(e) = tier.get(sk, action.fingerprint, &scope, Some(left)).await {
                let e = Arc::new(e);
                cache.insert_arc(key, e.clone()).await;
                let now = Instant::now();
                found = if now < e.fresh_until {
                    Lookup::Fresh(e)
                } else {
                    Lookup::Stale(e)
                };
            }
        }
        match found {
            Lookup::Fresh(e) => {
                metrics::counter!("midcall_cache_hits_total").increment(1);
                (from_entry(&e, &p.action), CacheStatus::Hit)
            }
            Lookup::Stale(e) => {
                metrics::counter!("midcall_cache_stale_total").increment(1);
                let r = from_entry(&e, &p.action);
                // One refresh at a time: a refresh already in flight is left alone.
                if let Join::Lead(flight, _) = cache.join(key) {
                    self.spawn_shared(flight, p, action, policy.clone(), scope, None, false);
                }
                (r, CacheStatus::Stale)
            }
            Lookup::Missing => {
                let name = p.action.clone();
                let mut p = Some(p);
                // A flight abandoned just as this call joined it is joined again once.
                for _ in 0..2 {
                    let (rx, status) = match cache.join(key) {
                        Join::Lead(flight, rx) => {
                            metrics::counter!("midcall_cache_misses_total").increment(1);
                            let Some(p) = p.take() else { break };
                            self.spawn_shared(
                                flight,
                                p,
                                action,
                                policy.clone(),
                                scope.clone(),
                                shared_key.take(),
                                true,
                            );
                            (rx, CacheStatus::Miss)
                        }
                        Join::Wait(rx) => {
                            metrics::counter!("midcall_cache_coalesced_total").increment(1);
                            (rx, CacheStatus::Coalesced)
                        }
                    };
                    if let Shared::Done(r) = wait_shared(rx, deadline, &name).await {
                        let r = match status {
                            CacheStatus::Coalesced => r.map(|mut f| {
                                f.attempts = 0;
                                f
                            }),
                            _ => r,
                        };
                        return (r, status);
                    }
                }
                (
                    Err(Failure::new(
                        Kind::Transport,
                        Fault::Upstream,
                        Retry::Yes,
                        format!("action \"{name}\": the shared request was abandoned"),
                    )),
                    CacheStatus::Miss,
                )
            }
        }
    }

    /// Runs a cacheable fetch on its own task, bounded by the action's timeout, fills the cache
    /// and hands the result to every waiter. With `while_waited`, the fetch is dropped as soon
    /// as no waiter is left. With a shared tier the entry goes there too, under `shared_key`
    /// (made here when the caller has not made it).
    #[allow(clippy::too_many_arguments)]
    fn spawn_shared(
        self: &Arc<Self>,
        flight: crate::cache::Flight<FetchResult>,
        p: Prepared,
        action: &ActionSpec,
        policy: CachePolicy,
        scope: ScopeId,
        shared_key: Option<SharedKey>,
        while_waited: bool,
    ) {
        let this = self.clone();
        let extractor = action.extractor_arc();
        let fingerprint = action.fingerprint;
        let key = p.cache.as_ref().map(|(k, _)| *k);
        let shared = this.shared_cache().cloned().map(|t| {
            let sk = shared_key
                .unwrap_or_else(|| shared_key_of(&t, &p, &policy, &scope, action.fingerprint));
            (t, sk)
        });
        tokio::spawn(
            async move {
                let fetch = this.fetch(&p, &extractor, ActionDeadline::own(p.timeout));
                let r = if while_waited {
                    tokio::select! {
                        r = fetch => r,
                        // Nobody wants it: drop the request and its connection; the flight
                        // leaves the in-flight table as it drops.
                        _ = flight.abandoned() => {
                            metrics::counter!("midcall_cache_abandoned_total").increment(1);
                            return;
                        }
                    }
                } else {
                    fetch.await
                };
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
                    if let Some((tier, sk)) = &shared {
                        tier.put(sk.clone(), &e);
                    }
                    flight.cache().insert(k, e).await;
                }
                flight.finish(Arc::new(r));
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// The obtain step with the filler alongside: background actions start and return at
    /// once; others run until their deadline, and `on_filler` is called when the action is
    /// still running `filler.after_ms` after `started`.
    pub(crate) async fn obtain_with_filler(
        self: &Arc<Self>,
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
}
