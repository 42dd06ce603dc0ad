//! Inbound webhooks: `POST /v1/automations/{id}/webhook` (or
//! `/v1/agents/{agent}/automations/{id}/webhook`) starts a webhook automation.
//!
//! Checks, in order: the automation exists (404) and is started by webhooks (409); the key's
//! rate (429); the bearer key when one is configured (401); `Content-Type` is JSON (415);
//! `Content-Length` within the limit (413), then the body while it is read (413); the Standard
//! Webhooks signature when a signing secret is configured (401: bad or stale); the body parses
//! (400, with line and column) and fits the steps (400, naming step and field); the
//! webhook-id was not used in the last 10 minutes (401 replay: checked in the same database
//! transaction that stores the run, so it holds across restarts and concurrent requests).
//! Then the answer is 202 `{"run_id": ...}`. Bad input never gets a 500.

// A check's `Err` is the response to send, on the cold path: boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use std::net::IpAddr;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{error, reply, RateLimiter, Server, SIGNATURE_TOLERANCE_S};
use crate::automation::StartError;
use crate::events::signing;
use crate::template::{Redactor, Template};
use crate::time;

/// Answers one inbound webhook request on `path`.
pub(super) async fn webhook(
    s: &Server,
    peer: IpAddr,
    req: Request<Incoming>,
    path: &str,
) -> Response<Full<Bytes>> {
    let Some((agent, id)) = webhook_route(path) else {
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
    let Some(auth) = automation.auth.as_ref().or(set.inbound().auth.as_ref()) else {
        // The config loader refuses webhook automations without credentials.
        return error(StatusCode::UNAUTHORIZED, "no credentials are configured");
    };
    let caller = Caller {
        s,
        agent_id: set.agent().id.as_str(),
        ip_key: format!("ip:{peer}"),
    };
    if let Some(r) = caller.rate(set, id, req.headers()) {
        return r;
    }
    if let Err(r) = caller.check_bearer(auth, req.headers()) {
        return r;
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let signature = [
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    ];
    let body = match read_body(s, req, set.inbound().max_body_bytes).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let signed_id = match caller.check_signed(auth, &signature, &body) {
        Ok(id) => id,
        Err(r) => return r,
    };
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
            caller.unauthorized("this webhook-id was already used (replay refused)")
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

/// Who is asking, for the rate limits: the agent's bucket and the address's failures.
struct Caller<'a> {
    s: &'a Server,
    agent_id: &'a str,
    ip_key: String,
}

impl Caller<'_> {
    /// A 429 when the key presented (a bearer key, or the signed automation) is over the
    /// agent's rate, or the address has failed too often; `None` otherwise.
    fn rate(
        &self,
        set: &crate::config::ActionSet,
        id: &str,
        headers: &http::HeaderMap,
    ) -> Option<Response<Full<Bytes>>> {
        let agent_id = self.agent_id;
        let key = match bearer(headers) {
            Some(token) => {
                let h = crate::cache::keyed_hash128(|h| h.write(token.trim().as_bytes()));
                format!("bearer:{h:032x}")
            }
            None if headers.contains_key("webhook-signature") => {
                format!("signed:{agent_id}/{id}")
            }
            None => self.ip_key.clone(),
        };
        let (rate, burst) = (set.inbound().rate_per_second, set.inbound().burst);
        let mut limiters = self.s.limiters.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up by &str: no String per request once the agent's bucket exists.
        if !limiters.contains_key(agent_id) {
            limiters.insert(agent_id.to_string(), RateLimiter::new(rate, burst));
        }
        let Some(limiter) = limiters.get_mut(agent_id) else {
            return Some(error(StatusCode::SERVICE_UNAVAILABLE, "try again")); // inserted above
        };
        // A reload may have changed the agent's rate.
        limiter.configure(rate, burst);
        let now = Instant::now();
        let wait = limiter
            .exhausted(&self.ip_key, now)
            .or_else(|| limiter.take(&key, now).err())?;
        let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = http::HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        Some(r)
    }

    /// A 401, counted against the address.
    fn unauthorized(&self, message: &str) -> Response<Full<Bytes>> {
        let mut limiters = self.s.limiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(limiter) = limiters.get_mut(self.agent_id) {
            let _ = limiter.take(&self.ip_key, Instant::now());
        }
        let mut r = error(StatusCode::UNAUTHORIZED, message);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        r
    }

    /// The bearer key, when one is configured: every configured key (several during a
    /// rotation) compared in constant time.
    fn check_bearer(
        &self,
        auth: &crate::config::InboundAuth,
        headers: &http::HeaderMap,
    ) -> Result<(), Response<Full<Bytes>>> {
        let Some(configured) = &auth.bearer else {
            return Ok(());
        };
        let Some(expected) = secret(self.s, configured) else {
            return Err(unavailable());
        };
        let Some(presented) = bearer(headers).map(str::trim) else {
            return Err(self.unauthorized("missing Authorization: Bearer <key>"));
        };
        let mac = &self.s.mac;
        let tag = ring::hmac::sign(mac, presented.as_bytes());
        let ok = expected.split_whitespace().fold(false, |ok, k| {
            ring::hmac::verify(mac, k.as_bytes(), tag.as_ref()).is_ok() | ok
        });
        if ok {
            Ok(())
        } else {
            Err(self.unauthorized("invalid bearer key"))
        }
    }

    /// The Standard Webhooks signature, when a signing secret is configured: the verified
    /// webhook-id, or a 401.
    fn check_signed(
        &self,
        auth: &crate::config::InboundAuth,
        [id, ts, sig]: &[Option<String>; 3],
        body: &[u8],
    ) -> Result<Option<String>, Response<Full<Bytes>>> {
        let Some(signing_secret) = &auth.signing_secret else {
            return Ok(None);
        };
        let Some(secrets) = secret(self.s, signing_secret) else {
            return Err(unavailable());
        };
        let now = time::now_ms() / 1000;
        match check_signature(
            &secrets,
            id.as_deref(),
            ts.as_deref(),
            sig.as_deref(),
            body,
            now,
        ) {
            Ok(wid) => Ok(Some(wid.to_string())),
            Err(why) => Err(self.unauthorized(&why)),
        }
    }
}

fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

fn unavailable() -> Response<Full<Bytes>> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the inbound credentials are not available on this server",
    )
}

/// The body: JSON (415 otherwise), within `limit` bytes (413, by Content-Length and while it
/// is read), within the body timeout (408).
async fn read_body(
    s: &Server,
    req: Request<Incoming>,
    limit: usize,
) -> Result<Bytes, Response<Full<Bytes>>> {
    let text = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if !is_json(text("content-type").unwrap_or_default()) {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over the limit of {limit} bytes"),
        )
    };
    if let Some(len) = text("content-length") {
        match len.parse::<u64>() {
            Ok(n) if n > limit as u64 => return Err(too_large()),
            Ok(_) => {}
            Err(_) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "Content-Length is not a number",
                ))
            }
        }
    }
    match tokio::time::timeout(
        s.body_timeout,
        Limited::new(req.into_body(), limit).collect(),
    )
    .await
    {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "the body took too long to arrive",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(error(StatusCode::BAD_REQUEST, "the body could not be read")),
        Ok(Ok(b)) => Ok(b.to_bytes()),
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
pub(crate) fn check_signature<'a>(
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
pub(crate) fn parse_payload(body: &[u8]) -> Result<Value, String> {
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
pub(crate) fn is_json(content_type: &str) -> bool {
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
    let empty = crate::template::RenderInputs::default();
    match t.render_text(&empty.render_context(&*secrets), &mut Redactor::default()) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            tracing::warn!("inbound: a configured credential's secret is missing");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/cloudevents+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
    }
}
