//! Delivery: the worker task of an [`EventBus`](super::EventBus) claims due deliveries, POSTs
//! them signed within the attempt timeout, records every attempt in one batch, and schedules
//! the next try (backoff with jitter, 429 `Retry-After`, ordering per call and endpoint, a
//! throttle per endpoint, endpoints disabled after failing long enough).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::sync::Notify;

use super::bus::*;
use super::{signing, time};
use crate::store::{Attempt, Claimed, Db, Next, StoreError};
use crate::template::{Redactor, RenderInputs, SecretSource, Template, UrlTemplate};
use crate::transport::{Deadline, Transport, TransportError};

pub(super) struct Worker {
    pub(super) db: Db,
    pub(super) transport: Transport,
    pub(super) secrets: Arc<dyn SecretSource>,
    pub(super) webhooks: Hooks,
    pub(super) targets: Targets,
    pub(super) schedule: Vec<Duration>,
    pub(super) jitter: f64,
    pub(super) attempt_timeout: Duration,
    pub(super) hold: Duration,
    pub(super) disable_after: Duration,
    pub(super) retention: Duration,
    pub(super) retry_after_cap: Duration,
    pub(super) notify: Arc<Notify>,
    /// Per-endpoint token buckets of webhooks with `max_per_second`.
    pub(super) throttle: Mutex<std::collections::HashMap<String, Bucket>>,
}

impl Worker {
    /// Splits claimed deliveries into those sent now and those a throttled endpoint has no
    /// token for, each with the time it is due again (spread at the endpoint's rate).
    pub(super) fn throttled(&self, claimed: Vec<Claimed>) -> (Vec<Claimed>, Vec<(i64, i64)>) {
        let hooks = self
            .webhooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if hooks.iter().all(|h| h.spec.max_per_second.is_none()) {
            return (claimed, Vec::new());
        }
        let mut buckets = self.throttle.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let now_ms = time::now_ms();
        let (mut go, mut later) = (Vec::new(), Vec::new());
        for c in claimed {
            let rate = if c.target.is_none() {
                hooks
                    .iter()
                    .find(|h| h.name == c.endpoint)
                    .and_then(|h| h.spec.max_per_second)
            } else {
                None
            };
            let Some(rate) = rate else {
                go.push(c);
                continue;
            };
            let burst = rate.max(1.0);
            let b = buckets.entry(c.endpoint.clone()).or_insert(Bucket {
                tokens: burst,
                at: now,
                next_slot_ms: 0,
            });
            let level = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
            b.at = now;
            if level >= 1.0 {
                b.tokens = level - 1.0;
                go.push(c);
            } else {
                b.tokens = level;
                // Each deferred delivery takes the next free slot at the endpoint's rate,
                // across claims: a backlog is spread over its whole length, each delivery
                // handed back once, not stacked on the next second.
                let step = (1000.0 / rate).ceil() as i64;
                let slot = b.next_slot_ms.max(now_ms) + step;
                b.next_slot_ms = slot;
                later.push((c.id, slot));
            }
        }
        (go, later)
    }

    pub(super) fn ok<T>(r: Result<T, StoreError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "outbox");
                None
            }
        }
    }

    /// The lease of a claim: always longer than an attempt may take (the attempt timeout plus
    /// as much again, 1 to 10 s), and renewed every third of it while the attempt runs; a
    /// worker that dies has its claims taken over when the lease runs out (25 s with the
    /// default 15 s timeout).
    pub(super) fn lease(&self) -> Duration {
        self.attempt_timeout
            + self
                .attempt_timeout
                .clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    pub(super) async fn run(self) {
        let lease = self.lease();
        let lease_ms = lease.as_millis() as i64;
        let hold = self.hold.as_millis() as i64;
        let wakes = self.db.pg().map(|p| p.wakes());
        let mut rounds: u64 = 0;
        loop {
            rounds += 1;
            if rounds % 1000 == 1 {
                let before = time::now_ms() - self.retention.as_millis() as i64;
                Self::ok(self.db.purge(before, 500).await);
            }
            let now = time::now_ms();
            let claimed = Self::ok(self.db.claim(now, lease_ms, hold, 64).await);
            let Some(claimed) = claimed else {
                // The database is unreachable: try again shortly (a new event also wakes us).
                tokio::select! {
                    _ = self.notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            };
            if claimed.is_empty() {
                let next = Self::ok(self.db.next_due().await).flatten();
                let wait = next
                    .map(|due| Duration::from_millis((due - time::now_ms()).clamp(10, 1000) as u64))
                    .unwrap_or(Duration::from_secs(1));
                match &wakes {
                    Some(w) => tokio::select! {
                        _ = self.notify.notified() => {}
                        _ = w.outbox.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                    },
                    None => tokio::select! {
                        _ = self.notify.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                    },
                }
                continue;
            }
            let (claimed, later) = self.throttled(claimed);
            if !later.is_empty() {
                metrics::counter!("midcall_webhook_throttled_total").increment(later.len() as u64);
                Self::ok(self.db.defer(later).await);
            }
            if claimed.is_empty() {
                let next = Self::ok(self.db.next_due().await).flatten();
                let wait = next
                    .map(|due| Duration::from_millis((due - time::now_ms()).clamp(10, 1000) as u64))
                    .unwrap_or(Duration::from_millis(100));
                tokio::select! {
                    _ = self.notify.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
            let work = futures_util::future::join_all(claimed.into_iter().map(|c| self.deliver(c)));
            tokio::pin!(work);
            let done: Vec<(Claimed, Attempt, Next)> = loop {
                tokio::select! {
                    d = &mut work => break d,
                    _ = tokio::time::sleep(lease / 3) => {
                        let until = time::now_ms() + lease_ms;
                        Self::ok(self.db.renew(ids.clone(), until).await);
                    }
                }
            };
            metrics::counter!("midcall_webhook_attempts_total").increment(done.len() as u64);
            // Recording must not be lost to a database restart: the attempt happened.
            let mut backoff = Duration::from_millis(50);
            for _ in 0..40 {
                match self.db.record_batch(done.clone()).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox: recording attempts; trying again");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    pub(super) async fn deliver(&self, c: Claimed) -> (Claimed, Attempt, Next) {
        let failed = |c: Claimed, why: &str| {
            tracing::warn!(
                target: "midcall::delivery",
                delivery = c.id,
                endpoint = %c.endpoint,
                error = %why,
                "delivery failed"
            );
            let a = Attempt {
                at_ms: time::now_ms(),
                duration_ms: 0,
                status_code: None,
                error: Some(why.to_string()),
                response_prefix: Vec::new(),
            };
            (c, a, Next::Failed)
        };
        let resolved = match &c.target {
            None => None,
            Some(t) => {
                let targets = self
                    .targets
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let Some(targets) = targets else {
                    return failed(
                        c,
                        "no automations are running in this process to resolve the target",
                    );
                };
                match targets.resolve(t, c.context.as_deref()) {
                    Ok(r) => Some(r),
                    Err(why) => return failed(c, &why),
                }
            }
        };
        let empty = RenderInputs::default();
        let hooks = self
            .webhooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (target, context) = match &resolved {
            None => match hooks.iter().find(|h| h.name == c.endpoint) {
                Some(Hook { spec: hook, .. }) => (
                    Target {
                        url: &hook.url,
                        headers: &hook.headers,
                        signing_secret: hook.signing_secret.as_ref(),
                        signing_key: hook.signing_key.as_ref(),
                    },
                    &empty,
                ),
                None => return failed(c, "no such webhook in the config"),
            },
            Some(r) => (
                Target {
                    url: &r.url,
                    headers: &r.headers,
                    signing_secret: r.signing_secret.as_ref(),
                    signing_key: None,
                },
                &r.inputs,
            ),
        };
        let at = time::now_ms();
        let started = tokio::time::Instant::now();
        let result = self.attempt(&target, context, &c).await;
        let duration_ms = started.elapsed().as_millis() as i64;
        let (code, error) = match &result {
            Ok((status, _, _)) => (Some(status.as_u16()), ""),
            Err(e) => (None, e.as_str()),
        };
        if code.is_some_and(|c| (200..300).contains(&c)) {
            tracing::info!(target: "midcall::delivery", delivery = c.id, endpoint = %c.endpoint,
                attempt = c.attempts + 1, status = code, ms = duration_ms, "delivered");
        } else {
            tracing::warn!(target: "midcall::delivery", delivery = c.id, endpoint = %c.endpoint,
                attempt = c.attempts + 1, status = code, ms = duration_ms, error,
                "delivery attempt failed");
        }
        let (attempt, next) = match result {
            Ok((status, headers, body)) => {
                let code = status.as_u16();
                let attempt = Attempt {
                    at_ms: at,
                    duration_ms,
                    status_code: Some(code),
                    error: None,
                    response_prefix: body[..body.len().min(8192)].to_vec(),
                };
                let next = if status.is_success() {
                    Next::Delivered
                } else if code == 410 {
                    Next::Disable {
                        reason: "410 Gone".into(),
                    }
                } else {
                    let retry_after = if code == 429 || code == 503 {
                        headers
                            .get(http::header::RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| {
                                crate::transport::parse_retry_after(v, std::time::SystemTime::now())
                            })
                    } else {
                        None
                    };
                    self.retry(&c, retry_after).await
                };
                (attempt, next)
            }
            Err(error) => {
                let attempt = Attempt {
                    at_ms: at,
                    duration_ms,
                    status_code: None,
                    error: Some(error),
                    response_prefix: Vec::new(),
                };
                let next = self.retry(&c, None).await;
                (attempt, next)
            }
        };
        (c, attempt, next)
    }

    /// The next step after a failed attempt: a retry per the schedule (never sooner than it,
    /// later when Retry-After asks, up to `retry_after_cap`), or failure.
    pub(super) async fn retry(&self, c: &Claimed, retry_after: Option<Duration>) -> Next {
        let since = Self::ok(self.db.failing_since(c.endpoint.clone()).await).flatten();
        let now = time::now_ms();
        if since.is_some_and(|s| now - s >= self.disable_after.as_millis() as i64) {
            return Next::Disable {
                reason: "failing without a success past the disable window".into(),
            };
        }
        let made = c.attempts as usize + 1;
        let Some(base) = self.schedule.get(made - 1) else {
            return Next::Failed;
        };
        let spread = 1.0 + self.jitter * (2.0 * unit_random(c.id as u64 ^ now as u64) - 1.0);
        let mut delay = base.mul_f64(spread.max(0.0));
        if let Some(ra) = retry_after {
            delay = delay.max(ra.min(self.retry_after_cap));
        }
        Next::Retry {
            due_ms: now + delay.as_millis() as i64,
        }
    }

    pub(super) async fn attempt(
        &self,
        hook: &Target<'_>,
        context: &RenderInputs,
        c: &Claimed,
    ) -> Result<(http::StatusCode, http::HeaderMap, Bytes), String> {
        let ctx = context.render_context(&*self.secrets);
        let mut redactor = Redactor::default();
        let url = hook
            .url
            .render(&ctx, &mut redactor)
            .map_err(|e| format!("url: {e}"))?;
        let mut req = http::Request::new(Full::new(Bytes::from(c.body.clone())));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = url
            .parse()
            .map_err(|_| "the rendered URL is not valid".to_string())?;
        let h = req.headers_mut();
        for (name, t) in hook.headers {
            let v = t
                .render_header(&ctx, &mut redactor)
                .map_err(|e| format!("header \"{name}\": {e}"))?;
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(&v),
            ) {
                h.insert(n, v);
            }
        }
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        h.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static(concat!("midcall/", env!("CARGO_PKG_VERSION"))),
        );
        let ts = time::now_ms() / 1000;
        let set = |h: &mut http::HeaderMap, k: &'static str, v: &str| {
            if let Ok(v) = http::HeaderValue::from_str(v) {
                h.insert(k, v);
            }
        };
        set(h, "webhook-id", &c.webhook_id);
        set(h, "webhook-timestamp", &ts.to_string());
        let mut signatures = Vec::new();
        if let Some(secret) = hook.signing_secret {
            let s = secret
                .render_text(&ctx, &mut redactor)
                .map_err(|e| format!("signing_secret: {e}"))?;
            signatures.push(
                signing::signature_header(&s, &c.webhook_id, ts, &c.body)
                    .map_err(|e| e.to_string())?,
            );
        }
        if let Some(key) = hook.signing_key {
            let k = key
                .render_text(&ctx, &mut redactor)
                .map_err(|e| format!("signing_key: {e}"))?;
            signatures.push(
                signing::sign_ed25519(&k, &c.webhook_id, ts, &c.body)
                    .map_err(|e| format!("signing_key: {e}"))?,
            );
        }
        if !signatures.is_empty() {
            set(h, "webhook-signature", &signatures.join(" "));
        }
        let deadline = Deadline::at(tokio::time::Instant::now() + self.attempt_timeout);
        match self
            .transport
            .exchange(req, deadline, 16 * 1024 * 1024)
            .await
        {
            Ok(ex) => {
                // Only the log's first 8 KiB is kept, with any secret the request carried
                // (a receiver that echoes its request) shown as ***.
                let kept = &ex.body[..ex.body.len().min(8192)];
                let shown = redactor.redact(&String::from_utf8_lossy(kept));
                Ok((ex.status, ex.headers, Bytes::from(shown)))
            }
            Err(TransportError::Timeout { .. }) => Err("timeout".into()),
            Err(TransportError::Connect(e)) => Err(redactor.redact(&e.to_string())),
            Err(TransportError::Io { message, .. }) => Err(redactor.redact(&message)),
            Err(TransportError::TooLarge { .. }) => Err("response too large".into()),
        }
    }
}

/// A throttled endpoint's token bucket, and the next free slot for a delivery it had no token
/// for (ms since the epoch).
pub(super) struct Bucket {
    pub(super) tokens: f64,
    pub(super) at: tokio::time::Instant,
    pub(super) next_slot_ms: i64,
}

/// Where a delivery goes: a webhook's or an automation step's templates.
pub(super) struct Target<'a> {
    pub(super) url: &'a UrlTemplate,
    pub(super) headers: &'a [(String, Template)],
    pub(super) signing_secret: Option<&'a Template>,
    pub(super) signing_key: Option<&'a Template>,
}

/// A number in [0, 1) from a seed (splitmix64): enough to spread retries.
pub(super) fn unit_random(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}
