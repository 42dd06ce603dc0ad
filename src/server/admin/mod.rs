//! The operator API under `/v1/admin/`: deliveries and runs listed, filtered and paged;
//! a delivery replayed; an endpoint's failures recovered; endpoints disabled and enabled.
//!
//! Off unless the server has an admin key ([`crate::server::InboundServer::admin_key`]); sent as
//! `Authorization: Bearer <key>`, compared in constant time, rate limited per key
//! ([`ADMIN_RATE_PER_SECOND`], [`ADMIN_BURST`]) and, for failures, per address (so others'
//! failures never lock the key out). Answers are JSON, errors
//! `{"error": "..."}` with the status that fits. Over plain HTTP it answers loopback peers
//! only, unless the server is told it sits behind an HTTPS proxy.

use std::net::IpAddr;
use std::sync::Mutex;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::automation::Automations;
use crate::config::Step;
use crate::server::{error, reply, RateLimiter};
use crate::store::Db;
use crate::template::Secret;
use crate::time;

mod deliveries;
mod runs;
pub(crate) use deliveries::*;
pub(crate) use runs::*;

/// Admin requests a key may make per second, sustained: 20.
pub const ADMIN_RATE_PER_SECOND: f64 = 20.0;
/// Admin requests a key may make at once: 100.
pub const ADMIN_BURST: u32 = 100;
/// The most rows one list answers: 500 (default 50).
pub const ADMIN_MAX_LIMIT: i64 = 500;

pub(crate) const STATUSES: &[&str] = &["pending", "delivered", "failed", "skipped"];
pub(crate) const RUN_STATUSES: &[&str] = &["queued", "running", "succeeded", "failed"];
/// The query parameters of `GET /v1/admin/deliveries`.
pub(crate) const DELIVERY_PARAMS: &[&str] = &[
    "agent", "tenant", "endpoint", "event", "status", "call_id", "since", "until", "limit",
    "cursor",
];
/// The query parameters of `GET /v1/admin/runs`.
pub(crate) const RUN_PARAMS: &[&str] = &[
    "agent",
    "tenant",
    "automation",
    "status",
    "call_id",
    "since",
    "until",
    "limit",
    "cursor",
];

/// What the operator API and the console share: the key, the store, the limiter.
pub(crate) struct Admin {
    key: Option<Secret>,
    mac: ring::hmac::Key,
    limiter: Mutex<RateLimiter>,
    pub(crate) db: Option<Db>,
    pub(crate) https: bool,
    pub(crate) sessions: crate::server::console::Sessions,
}

impl Admin {
    pub(crate) fn new(key: Option<Secret>, db: Option<Db>, https: bool) -> Admin {
        // Keyed by the admin key, so every process of a fleet signs console sessions and CSRF
        // tokens alike; random when there is no key (nothing is signed then).
        let mut seed = [0u8; 32];
        match &key {
            Some(k) => {
                let d = ring::digest::digest(
                    &ring::digest::SHA256,
                    format!("midcall console mac v1\0{}", k.expose()).as_bytes(),
                );
                seed.copy_from_slice(d.as_ref());
            }
            None => {
                let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
            }
        }
        Admin {
            key,
            mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed),
            limiter: Mutex::new(RateLimiter::new(ADMIN_RATE_PER_SECOND, ADMIN_BURST)),
            db,
            https,
            sessions: Default::default(),
        }
    }

    /// Whether `presented` is the admin key (constant time: both sides MACed, tags compared).
    pub(crate) fn is_key(&self, presented: &str) -> bool {
        let Some(key) = &self.key else { return false };
        let tag = ring::hmac::sign(&self.mac, presented.as_bytes());
        ring::hmac::verify(&self.mac, key.expose().as_bytes(), tag.as_ref()).is_ok()
    }

    /// A MAC under this process's key (cookies and CSRF tokens), hex.
    pub(crate) fn sign(&self, what: &str) -> String {
        let tag = ring::hmac::sign(&self.mac, what.as_bytes());
        tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Whether `tag` is [`Admin::sign`] of `what` (constant time).
    pub(crate) fn verify(&self, what: &str, tag: &str) -> bool {
        let want = self.sign(what);
        want.len() == tag.len()
            && want
                .bytes()
                .zip(tag.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// A refusal when this peer may not reach the admin surface over plain HTTP.
    pub(crate) fn transport_refusal(&self, peer: IpAddr) -> Option<&'static str> {
        (!self.https && !peer.is_loopback()).then_some(
            "the admin API and console answer over plain HTTP on loopback only; serve them behind an HTTPS proxy (--behind-https-proxy)",
        )
    }

    /// Takes a token of an authenticated caller's bucket (`key`); `Some(wait)` when it is
    /// out of them. Failures of others never drain it.
    pub(crate) fn limited(&self, key: &str) -> Option<std::time::Duration> {
        let mut l = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        l.take(key, Instant::now()).err()
    }

    /// A failed authentication from `peer`: `Some(wait)` when its failures are over the rate
    /// (then the answer is 429), otherwise the failure is counted and the answer is 401.
    pub(crate) fn failed(&self, peer: IpAddr) -> Option<std::time::Duration> {
        let mut l = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        let ip = format!("ip:{peer}");
        let now = Instant::now();
        l.exhausted(&ip, now).or_else(|| l.take(&ip, now).err())
    }
}

pub(crate) fn too_many(wait: std::time::Duration) -> Response<Full<Bytes>> {
    let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    if let Ok(v) = http::HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// `/v1/admin/...`.
pub(crate) async fn handle(
    admin: &Admin,
    automations: &Automations,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let Some(db) = admin.db.as_ref() else {
        return error(
            StatusCode::NOT_FOUND,
            "the admin API is off: start the server with an admin key (--admin-secret)",
        );
    };
    if let Some(why) = admin.transport_refusal(peer) {
        return error(StatusCode::FORBIDDEN, why);
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !presented.is_some_and(|p| admin.is_key(p)) {
        if let Some(wait) = admin.failed(peer) {
            return too_many(wait);
        }
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            if presented.is_some() {
                "invalid admin key"
            } else {
                "missing Authorization: Bearer <admin key>"
            },
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    if let Some(wait) = admin.limited("admin") {
        return too_many(wait);
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let segments = segments(&path, "/v1/admin");
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let result = match (&method, segs.as_slice()) {
        (&Method::GET, ["agents"]) => Ok(agents_json(automations)),
        (&Method::GET, ["deliveries"]) => list_deliveries(automations, db, &query).await,
        (&Method::GET, ["deliveries", id]) => one_delivery(automations, db, id).await,
        (&Method::POST, ["deliveries", id, "replay"]) => replay(automations, db, id)
            .await
            .map(|n| json!({ "replayed": n })),
        (&Method::GET, ["endpoints"]) => endpoints_json(automations, db).await,
        (&Method::POST, ["endpoints", ep, "recover"]) => recover(automations, db, ep, &query).await,
        (&Method::POST, ["endpoints", ep, "disable"]) => {
            set_disabled(automations, db, ep, true).await
        }
        (&Method::POST, ["endpoints", ep, "enable"]) => {
            set_disabled(automations, db, ep, false).await
        }
        (&Method::GET, ["runs"]) => list_runs(automations, db, &query).await,
        (&Method::GET, ["runs", id]) => one_run(automations, db, id).await,
        (
            _,
            ["deliveries"]
            | ["deliveries", _]
            | ["runs"]
            | ["runs", _]
            | ["agents"]
            | ["endpoints"],
        ) => Err(ApiError(StatusCode::METHOD_NOT_ALLOWED, "use GET".into())),
        (_, ["deliveries", _, "replay"] | ["endpoints", _, _]) => {
            Err(ApiError(StatusCode::METHOD_NOT_ALLOWED, "use POST".into()))
        }
        _ => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no admin route {}",
                path.chars().take(200).collect::<String>()
            ),
        )),
    };
    match result {
        Ok(v) => reply(StatusCode::OK, v),
        Err(ApiError(status, message)) => error(status, message),
    }
}

/// The percent-decoded segments of `path` after `prefix` (empty ones dropped): an endpoint
/// name with `/` or spaces arrives as one segment.
pub(crate) fn segments(path: &str, prefix: &str) -> Vec<String> {
    path.strip_prefix(prefix)
        .unwrap_or(path)
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect()
}

/// The `since` and `until` parameters, in ms.
fn time_range(q: &[(String, String)]) -> Result<(Option<i64>, Option<i64>), ApiError> {
    let t = |name: &str| get(q, name).map(|v| parse_time(name, v)).transpose();
    Ok((t("since")?, t("until")?))
}

/// An answer other than 200: its status and message.
#[derive(Debug)]
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

fn storage(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "admin: the outbox database");
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "the outbox database is not answering; try again".into(),
    )
}

/// The pairs of an `application/x-www-form-urlencoded` text (a query string or a form).
pub(crate) fn urlencoded(text: &str) -> impl Iterator<Item = (String, String)> + '_ {
    let dec = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    text.split('&').filter(|p| !p.is_empty()).map(move |part| {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        (dec(k), dec(v))
    })
}

/// The query string as pairs; a key outside `allowed` is an error naming it.
pub(crate) fn query_pairs(
    query: &str,
    allowed: &[&str],
) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for (k, v) in urlencoded(query) {
        if !allowed.contains(&k.as_str()) {
            return Err(bad(format!(
                "unknown query parameter \"{}\" (allowed: {})",
                k.chars().take(40).collect::<String>(),
                allowed.join(", ")
            )));
        }
        if !v.is_empty() {
            out.push((k, v));
        }
    }
    Ok(out)
}

fn get<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

/// A time given as RFC 3339 (`2026-12-01T10:00:00Z`) or milliseconds since the epoch.
pub(crate) fn parse_time(name: &str, v: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    time::parse_rfc3339(v).ok_or_else(|| {
        bad(format!(
            "{name}: \"{}\" is not a time (RFC 3339 such as 2026-12-01T10:00:00Z, or milliseconds since the epoch)",
            v.chars().take(60).collect::<String>()
        ))
    })
}

/// `v` when it is one of `allowed`; an error naming the parameter otherwise.
fn one_of<'a>(
    name: &str,
    v: Option<&'a str>,
    allowed: &[&str],
) -> Result<Option<&'a str>, ApiError> {
    match v {
        Some(s) if !allowed.contains(&s) => Err(bad(format!(
            "{name}: \"{}\" is not one of {}",
            s.chars().take(20).collect::<String>(),
            allowed.join(", ")
        ))),
        v => Ok(v),
    }
}

fn limit_of(pairs: &[(String, String)]) -> Result<i64, ApiError> {
    match get(pairs, "limit") {
        None => Ok(50),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (1..=ADMIN_MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(bad(format!(
                "limit: \"{}\" is not a number from 1 to {ADMIN_MAX_LIMIT}",
                v.chars().take(20).collect::<String>()
            ))),
        },
    }
}

/// The name prefixes for `agent` and `tenant` filters (`None`: no filter).
fn prefixes(
    automations: &Automations,
    agent: Option<&str>,
    tenant: Option<&str>,
) -> Option<Vec<String>> {
    if agent.is_none() && tenant.is_none() {
        return None;
    }
    let agents = automations.agents();
    let ids: Vec<&str> = agents
        .sets()
        .iter()
        .filter(|s| agent.is_none_or(|a| s.agent().id == a))
        .filter(|s| tenant.is_none_or(|t| s.agent().tenant == t))
        .map(|s| s.agent().id.as_str())
        .collect();
    agents.name_prefixes(&ids)
}

/// The agent a stored endpoint or run name belongs to.
pub(crate) fn agent_of(automations: &Automations, stored: &str) -> Option<String> {
    automations.agents().owner(stored).map(str::to_string)
}

/// Every agent with its actions, webhooks and automations (no secret: templates as written,
/// so a `{{secrets.NAME}}` shows its name, never its value), and its webhooks' public keys.
pub(crate) fn agents_json(automations: &Automations) -> Value {
    let agents = automations.agents();
    let hooks = automations.bus().hooks();
    let secrets = automations.secret_source();
    let list: Vec<Value> = agents
        .sets()
        .iter()
        .map(|s| {
            let id = &s.agent().id;
            json!({
                "id": id,
                "tenant": s.agent().tenant,
                "name": s.agent().name,
                "actions": s.actions().iter().map(|a| json!({
                    "name": a.name(),
                    "description": a.description(),
                    "method": a.method().as_str(),
                    "url": a.url().source(),
                })).collect::<Vec<_>>(),
                "webhooks": hooks.iter().filter(|h| h.agent.as_deref().is_none_or(|a| a == id)).map(|h| json!({
                    "endpoint": h.name,
                    "label": h.spec.label,
                    "url": h.spec.url.source(),
                    "method": "POST",
                    "subscriptions": h.spec.subscriptions.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                    "enabled": h.spec.enabled,
                    "max_per_second": h.spec.max_per_second,
                    "public_key": h.spec.signing_key.as_ref().and_then(|k| crate::events::signing::public_key_from(k, &*secrets).ok()),
                })).collect::<Vec<_>>(),
                "automations": s.automations().iter().map(|a| json!({
                    "id": a.id,
                    "stored_as": agents.name(id, &a.id),
                    "trigger": a.trigger.name(),
                    "enabled": a.enabled,
                    "steps": a.steps.iter().map(|st| match st {
                        Step::SendWebhook { url, .. } => json!({"send_webhook": url.source()}),
                        Step::RunAction { action, .. } => json!({"run_action": action}),
                    }).collect::<Vec<_>>(),
                    "route": (a.trigger.name() == "webhook").then(|| format!("/v1/agents/{id}/automations/{}/webhook", a.id)),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "agents": list })
}

#[cfg(test)]
mod tests;
