//! The inbound webhook endpoint: `POST /v1/automations/{id}/webhook` starts a webhook
//! automation; `GET /healthz`; `GET /metrics`.
//!
//! Checks, in order: the automation exists (404) and is started by webhooks (409); the key's
//! rate (429); the bearer key when one is configured (401); `Content-Type` is JSON (415);
//! `Content-Length` within the limit (413), then the body while it is read (413); the Standard
//! Webhooks signature when a signing secret is configured (401: bad or stale); the body parses
//! (400, with line and column) and fits the steps (400, naming step and field); the
//! webhook-id was not used in the last 10 minutes (401 replay: checked in the same database
//! transaction that stores the run, so it holds across restarts and concurrent requests).
//! Then the answer is 202 `{"run_id": ...}`. Bad input never gets a 500.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::{Automations, StartError};
use crate::events::{signing, time};
use crate::template::{Redactor, Template};

/// How far a `webhook-timestamp` may be from the server's clock: 300 s either way.
pub const SIGNATURE_TOLERANCE_S: i64 = 300;
/// How long a `webhook-id` is remembered to refuse replays: 10 minutes (longer than the
/// whole window a timestamp is accepted in).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(600);
/// Default longest a request may take to send its headers, and then its body: 10 s each.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Renders the process's metrics in the Prometheus text format (the binary installs the
/// exporter and passes its handle's `render`).
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// The inbound HTTP server of one [`Automations`].
#[derive(Clone)]
pub struct InboundServer {
    automations: Automations,
    admin_key: Option<crate::template::Secret>,
    https_proxy: bool,
    metrics: Option<MetricsRender>,
    drain: Duration,
    header_timeout: Duration,
    body_timeout: Duration,
}

/// What the request handler shares: built once by [`InboundServer::serve`].
struct Server {
    automations: Automations,
    admin: super::admin::Admin,
    metrics: Option<MetricsRender>,
    /// Token buckets per agent (each with its `[inbound] rate_limit`).
    limiters: Mutex<HashMap<String, RateLimiter>>,
    body_timeout: Duration,
    /// Keys the constant-time comparison of bearer keys (both sides are MACed and the tags
    /// compared by ring).
    mac: ring::hmac::Key,
}

impl std::fmt::Debug for InboundServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundServer")
            .field("automations", &self.automations)
            .field("drain", &self.drain)
            .finish_non_exhaustive()
    }
}

impl InboundServer {
    /// A server for `automations`, with the `[inbound]` settings of their config.
    pub fn new(automations: Automations) -> InboundServer {
        InboundServer {
            automations,
            admin_key: None,
            https_proxy: false,
            metrics: None,
            drain: Duration::from_secs(10),
            header_timeout: DEFAULT_READ_TIMEOUT,
            body_timeout: DEFAULT_READ_TIMEOUT,
        }
    }

    /// How long a client may take to send its request headers before the connection is
    /// closed. Default 10 s.
    pub fn header_read_timeout(mut self, d: Duration) -> InboundServer {
        self.header_timeout = d;
        self
    }

    /// How long a client may take to send the body after its headers before it gets 408.
    /// Default 10 s.
    pub fn body_read_timeout(mut self, d: Duration) -> InboundServer {
        self.body_timeout = d;
        self
    }

    /// Turns on the operator API (`/v1/admin/`) and the console (`/console`), both behind
    /// `key` (the API as `Authorization: Bearer`, the console through its login form). Off by
    /// default: they answer 404.
    pub fn admin_key(mut self, key: crate::template::Secret) -> InboundServer {
        self.admin_key = Some(key);
        self
    }

    /// Says the server sits behind an HTTPS proxy: the console's cookie is `Secure` and the
    /// admin surface answers peers beyond loopback. Default false: over plain HTTP they answer
    /// loopback peers only.
    pub fn behind_https_proxy(mut self, yes: bool) -> InboundServer {
        self.https_proxy = yes;
        self
    }

    /// Serves `GET /metrics` with `render` (otherwise it answers 404).
    pub fn metrics(mut self, render: MetricsRender) -> InboundServer {
        self.metrics = Some(render);
        self
    }

    /// How long shutdown waits for requests in flight. Default 10 s.
    pub fn drain_timeout(mut self, d: Duration) -> InboundServer {
        self.drain = d;
        self
    }

    /// Accepts connections on `listener` until `shutdown` completes; then stops accepting,
    /// lets requests in flight finish (up to the drain timeout) and returns. Runs already
    /// queued stay queued: shut the [`Automations`] down after this.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout);
        tokio::pin!(shutdown);
        let admin_db = match &self.admin_key {
            Some(_) => Some(
                self.automations
                    .bus()
                    .store()
                    .reopen()
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            ),
            None => None,
        };
        let admin = super::admin::Admin::new(self.admin_key.clone(), admin_db, self.https_proxy);
        let mut seed = [0u8; 32];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        let server = Arc::new(Server {
            automations: self.automations,
            admin,
            metrics: self.metrics,
            limiters: Mutex::new(HashMap::new()),
            body_timeout: self.body_timeout,
            mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed),
        });
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "inbound accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let inner = server.clone();
            let ip = peer.ip();
            let svc = hyper::service::service_fn(move |req| {
                let inner = inner.clone();
                async move {
                    let started = tokio::time::Instant::now();
                    let (method, path) = (req.method().clone(), req.uri().path().to_string());
                    let resp = handle(&inner, ip, req).await;
                    // One line per request for the operator; the path holds no secret (the
                    // query string is not logged).
                    tracing::info!(
                        target: "midcall::inbound",
                        %method,
                        path = %path.chars().take(200).collect::<String>(),
                        status = resp.status().as_u16(),
                        ms = started.elapsed().as_millis() as u64,
                        peer = %ip,
                        "inbound request"
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            let watched = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = watched.await;
            });
        }
        drop(listener);
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(self.drain) => {
                tracing::warn!("inbound: requests still in flight after the drain timeout");
            }
        }
        Ok(())
    }
}

pub(super) fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": message.into() }))
}

async fn handle(s: &Server, peer: IpAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let r = route(s, peer, req).await;
    metrics::counter!("midcall_inbound_requests_total", "status" => r.status().as_str().to_string())
        .increment(1);
    r
}

async fn route(s: &Server, peer: IpAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&http::Method::GET, "/healthz") => return reply(StatusCode::OK, json!({"status": "ok"})),
        (&http::Method::GET, "/metrics") => {
            return match &s.metrics {
                Some(render) => {
                    let mut r = Response::new(Full::new(Bytes::from(render())));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    r
                }
                None => error(StatusCode::NOT_FOUND, "metrics are not enabled"),
            }
        }
        _ => {}
    }
    if path.starts_with("/v1/admin/") || path == "/v1/admin" {
        return super::admin::handle(&s.admin, &s.automations, peer, req).await;
    }
    if path == "/console" || path.starts_with("/console/") {
        return super::console::handle(&s.admin, &s.automations, peer, req).await;
    }
    let Some((agent, id)) = webhook_route(&path) else {
        return error(StatusCode::NOT_FOUND, format!("no route {path}"));
    };
    if req.method() != http::Method::POST {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST to start an automation",
        );
        r.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return r;
    }
    let target = match s.automations.webhook_automation(agent, id) {
        Ok(t) => t,
        Err(e @ StartError::NotFound(_)) => return error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => return error(StatusCode::CONFLICT, e.to_string()),
    };
    let (set, automation) = (target.set(), target.automation());
    let agent_id = set.agent().id.as_str();
    let Some(auth) = automation.auth.as_ref().or(set.inbound().auth.as_ref()) else {
        // The config loader refuses webhook automations without credentials.
        return error(StatusCode::UNAUTHORIZED, "no credentials are configured");
    };
    let headers = req.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());

    // Rate: per key presented (a bearer key, or the signed automation), and per address for
    // requests that fail authentication.
    let ip_key = format!("ip:{peer}");
    let key = match text("authorization").and_then(|v| v.strip_prefix("Bearer ")) {
        Some(token) => {
            let h = crate::cache::keyed_hash128(|h| h.write(token.trim().as_bytes()));
            format!("bearer:{h:032x}")
        }
        None if headers.contains_key("webhook-signature") => format!("signed:{agent_id}/{id}"),
        None => ip_key.clone(),
    };
    let (rate, burst) = (set.inbound().rate_per_second, set.inbound().burst);
    {
        let mut limiters = s.limiters.lock().unwrap_or_else(|e| e.into_inner());
        if !limiters.contains_key(agent_id) {
            limiters.insert(agent_id.to_string(), RateLimiter::new(rate, burst));
        }
        let Some(limiter) = limiters.get_mut(agent_id) else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "try again"); // inserted just above
        };
        // A reload may have changed the agent's rate.
        limiter.configure(rate, burst);
        let now = Instant::now();
        let wait = limiter
            .exhausted(&ip_key, now)
            .or_else(|| limiter.take(&key, now).err());
        if let Some(wait) = wait {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = http::HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
    }
    let unauthorized = |message: &str| {
        let mut limiters = s.limiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(limiter) = limiters.get_mut(agent_id) {
            let _ = limiter.take(&ip_key, Instant::now());
        }
        let mut r = error(StatusCode::UNAUTHORIZED, message);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        r
    };

    if let Some(bearer) = &auth.bearer {
        let Some(expected) = secret(s, bearer) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the inbound credentials are not available on this server",
            );
        };
        let presented = text("authorization").and_then(|v| v.strip_prefix("Bearer "));
        let Some(presented) = presented.map(str::trim) else {
            return unauthorized("missing Authorization: Bearer <key>");
        };
        let tag = ring::hmac::sign(&s.mac, presented.as_bytes());
        // Every configured key (several during a rotation) is compared, in constant time.
        let ok = expected.split_whitespace().fold(false, |ok, k| {
            ring::hmac::verify(&s.mac, k.as_bytes(), tag.as_ref()).is_ok() | ok
        });
        if !ok {
            return unauthorized("invalid bearer key");
        }
    }

    let content_type = text("content-type").unwrap_or_default();
    if !is_json(content_type) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON (Content-Type: application/json)",
        );
    }
    let limit = set.inbound().max_body_bytes;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over the limit of {limit} bytes"),
        )
    };
    if let Some(len) = text("content-length") {
        match len.parse::<u64>() {
            Ok(n) if n > limit as u64 => return too_large(),
            Ok(_) => {}
            Err(_) => return error(StatusCode::BAD_REQUEST, "Content-Length is not a number"),
        }
    }
    let (id_h, ts_h, sig_h) = (
        text("webhook-id").map(str::to_string),
        text("webhook-timestamp").map(str::to_string),
        text("webhook-signature").map(str::to_string),
    );
    let body = match tokio::time::timeout(
        s.body_timeout,
        Limited::new(req.into_body(), limit).collect(),
    )
    .await
    {
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "the body took too long to arrive",
            )
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(_)) => return error(StatusCode::BAD_REQUEST, "the body could not be read"),
        Ok(Ok(b)) => b.to_bytes(),
    };

    let mut signed_id = None;
    if let Some(signing_secret) = &auth.signing_secret {
        let Some(secrets) = secret(s, signing_secret) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the inbound credentials are not available on this server",
            );
        };
        let now = time::now_ms() / 1000;
        let wid = match check_signature(
            &secrets,
            id_h.as_deref(),
            ts_h.as_deref(),
            sig_h.as_deref(),
            &body,
            now,
        ) {
            Ok(wid) => wid,
            Err(why) => return unauthorized(&why),
        };
        signed_id = Some(wid.to_string());
    }

    let payload = match parse_payload(&body) {
        Ok(v) => v,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    match s
        .automations
        .start_target(&target, payload, signed_id.as_deref())
        .await
    {
        Ok(run) => reply(StatusCode::ACCEPTED, json!({ "run_id": run })),
        Err(StartError::Replayed(_)) => {
            unauthorized("this webhook-id was already used (replay refused)")
        }
        Err(e @ StartError::InvalidPayload(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ StartError::Storage(_)) => {
            tracing::warn!(error = %e, "inbound: could not queue a run");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "could not queue the run; try again",
            )
        }
        Err(e @ StartError::NotFound(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

/// The agent (when the route names one) and automation of an inbound webhook path:
/// `/v1/agents/<agent>/automations/<id>/webhook` or `/v1/automations/<id>/webhook`.
fn webhook_route(path: &str) -> Option<(Option<&str>, &str)> {
    let plain = |p: &str| p.len() <= 200 && !p.is_empty() && !p.contains('/');
    if let Some(rest) = path.strip_prefix("/v1/agents/") {
        let (agent, rest) = rest.split_once('/')?;
        let id = rest
            .strip_prefix("automations/")?
            .strip_suffix("/webhook")?;
        return (plain(agent) && plain(id)).then_some((Some(agent), id));
    }
    let id = path
        .strip_prefix("/v1/automations/")?
        .strip_suffix("/webhook")?;
    plain(id).then_some((None, id))
}

/// Checks Standard Webhooks headers against `secrets` (one or more `whsec_` secrets separated
/// by spaces): all three headers present, the timestamp within [`SIGNATURE_TOLERANCE_S`] of
/// `now`, and some `v1` entry a valid signature of `id.timestamp.body` for some secret
/// (compared in constant time). Returns the webhook-id, to refuse its replay.
pub fn check_signature<'a>(
    secrets: &str,
    id: Option<&'a str>,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<&'a str, String> {
    let (Some(id), Some(ts), Some(sig)) = (id, timestamp, signature) else {
        return Err(
            "missing webhook-id, webhook-timestamp or webhook-signature (Standard Webhooks)".into(),
        );
    };
    let Ok(ts) = ts.trim().parse::<i64>() else {
        return Err("webhook-timestamp is not a number of seconds".into());
    };
    if now
        .checked_sub(ts)
        .is_none_or(|d| d.abs() > SIGNATURE_TOLERANCE_S)
    {
        return Err(format!(
            "webhook-timestamp is more than {SIGNATURE_TOLERANCE_S} s from the server's clock"
        ));
    }
    let valid = secrets.split_whitespace().fold(false, |ok, secret| {
        signing::verify(secret, id, ts, body, sig, now, SIGNATURE_TOLERANCE_S) | ok
    });
    if !valid {
        return Err("invalid webhook-signature".into());
    }
    Ok(id)
}

/// Parses an inbound body; the error names line and column.
pub fn parse_payload(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| {
        format!(
            "invalid JSON at line {} column {}: {}",
            e.line(),
            e.column(),
            strip_position(&e.to_string())
        )
    })
}

/// serde_json's message without its " at line L column C" suffix.
fn strip_position(m: &str) -> &str {
    m.rfind(" at line ").map(|i| &m[..i]).unwrap_or(m)
}

/// Whether a `Content-Type` is JSON (`application/json` or `application/*+json`).
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A secret-only template's value, or `None` when the secret is missing.
fn secret(s: &Server, t: &Template) -> Option<String> {
    let secrets = s.automations.secret_source();
    let empty = super::RunContext::default();
    match t.render_text(&empty.render_context(&*secrets), &mut Redactor::default()) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            tracing::warn!("inbound: a configured credential's secret is missing");
            None
        }
    }
}

/// Token buckets per key: `burst` tokens, refilled at `rate` per second.
pub(super) struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, (f64, Instant)>,
}

impl RateLimiter {
    pub(super) fn new(rate: f64, burst: u32) -> Self {
        RateLimiter {
            rate,
            burst: burst as f64,
            buckets: HashMap::new(),
        }
    }

    /// Uses `rate` and `burst` from now on (the agent being served; buckets are kept).
    fn configure(&mut self, rate: f64, burst: u32) {
        self.rate = rate;
        self.burst = burst as f64;
    }

    fn level(&mut self, key: &str, now: Instant) -> f64 {
        if self.buckets.len() > 100_000 {
            // Forget buckets that are full again: they hold nothing to remember.
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = self
            .buckets
            .entry(key.to_string())
            .or_insert((self.burst, now));
        let level = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *tokens = level;
        *at = now;
        level
    }

    /// Takes a token, or says how long until one is there.
    pub(super) fn take(&mut self, key: &str, now: Instant) -> Result<(), Duration> {
        let level = self.level(key, now);
        if level >= 1.0 {
            if let Some((tokens, _)) = self.buckets.get_mut(key) {
                *tokens = level - 1.0;
            }
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - level) / self.rate))
        }
    }

    /// How long until `key` has a token again, if it has none now.
    pub(super) fn exhausted(&mut self, key: &str, now: Instant) -> Option<Duration> {
        let level = self.level(key, now);
        (level < 1.0).then(|| Duration::from_secs_f64((1.0 - level) / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_the_rate() {
        let mut l = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        assert!(l.take("k", t0).is_ok());
        assert!(l.take("k", t0).is_ok());
        assert!(l.take("k", t0).is_ok());
        let wait = l.take("k", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        assert!(l.take("other", t0).is_ok(), "keys are independent");
        assert!(l.take("k", t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn json_media_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/cloudevents+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
    }
}
