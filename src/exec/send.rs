//! The send part of step 2: one request with its two allowed retries (a 429 whose
//! Retry-After fits, a stale keep-alive connection), the host's cap, the hedge of a slow read,
//! the response checks, parse and extraction; and background (`async = true`) actions.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::HeaderValue;
use http_body_util::Full;
use tokio::time::Instant;
use tracing::Instrument;

use super::breaker::Permit;
use super::budget::ActionDeadline;
use super::error::{classify, describe_transport, Failure, Fault, Kind, Retry};
use super::gate::Slot;
use super::idempotency::idempotency_key;
use super::outcome::Timings;
use super::outcome::{FetchResult, Fetched};
use super::parts::Parts;
use super::plan::Prepared;
use crate::config::Method;
use crate::jsonpath::Extractor;
use crate::transport::{parse_retry_after, ConnectError, Deadline, Exchange, TransportError};

/// The least time a retried attempt is assumed to need, on top of the first attempt's own
/// duration, when deciding whether a 429's Retry-After fits the budget: 2 ms.
pub const MIN_RETRY_ATTEMPT: std::time::Duration = std::time::Duration::from_millis(2);

impl Parts {
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
        if let (Some(name), Some(v)) = (self.idempotency_header(), idempotency) {
            req.headers_mut().insert(name.clone(), v.clone());
        }
        req
    }

    /// Sends (with the two allowed retries), reads, parses and extracts. Touches no call state.
    pub(crate) async fn fetch(
        &self,
        p: &Prepared,
        extractor: &Extractor,
        deadline: ActionDeadline,
    ) -> FetchResult {
        let (permit, slot) = self.admit(p, deadline.deadline).await?;
        let action = &p.action;
        let idempotency = p.idempotency.as_ref().and_then(|i| {
            HeaderValue::from_str(&idempotency_key(
                &i.call_id,
                i.tool_id.as_deref(),
                action,
                &i.args,
            ))
            .ok()
        });
        let (exchange, attempts, permit) = self
            .exchange(p, idempotency.as_ref(), deadline, permit)
            .await?;
        if let Some(s) = slot {
            s.done();
        }
        checked(&p.action, exchange, attempts, permit, extractor)
    }

    /// Time left, the host's breaker closed, a slot under the host's cap: the permit and the
    /// slot, or why the request is not sent.
    async fn admit(
        &self,
        p: &Prepared,
        deadline: Deadline,
    ) -> Result<(Permit, Option<Slot>), Box<Failure>> {
        let action = &p.action;
        if deadline.remaining().is_zero() {
            return Err(Failure::new(
                Kind::Timeout,
                Fault::Local,
                Retry::Yes,
                format!("action \"{action}\": no time left in the budget"),
            )
            .with_reason("the turn's time ran out before the request could be sent"));
        }
        let Some(permit) = self.breakers().check(&p.host) else {
            return Err(Failure::new(
                Kind::CircuitOpen,
                Fault::Upstream,
                Retry::Yes,
                format!(
                    "action \"{action}\": circuit open for {} after repeated failures",
                    p.host
                ),
            )
            .with_reason("the service is failing; not trying again for a few seconds"));
        };
        // The host's cap: wait for a slot within the budget, or be refused, never time out.
        let slot = match p.max_in_flight {
            None => None,
            Some(cap) => match self.gates().enter(&p.host, cap, deadline).await {
                Ok(s) => Some(s),
                Err(busy) => {
                    drop(permit);
                    return Err(Failure::new(
                        Kind::HostBusy,
                        Fault::Local,
                        Retry::Yes,
                        format!(
                            "action \"{action}\": host_busy: {} already has its {} requests in flight (max_in_flight) and no slot opened in time (waited {} ms)",
                            p.host,
                            busy.cap,
                            busy.waited.as_millis()
                        ),
                    )
                    .with_reason("the service is busy right now"));
                }
            },
        };
        Ok((permit, slot))
    }

    /// The exchange, with the two retries allowed (a 429 whose Retry-After fits the budget, a
    /// stale pooled connection of an idempotent request) and the hedge: the response, the
    /// attempts made and the breaker's permit, or the failure (recorded on the breaker).
    async fn exchange(
        &self,
        p: &Prepared,
        idempotency: Option<&HeaderValue>,
        deadline: ActionDeadline,
        permit: Permit,
    ) -> Result<(Exchange, u32, Permit), Box<Failure>> {
        let ActionDeadline {
            deadline,
            budget_cut,
        } = deadline;
        let action = &p.action;
        let timings = Timings::default();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let attempt_start = Instant::now();
            p.sent.store(true, Ordering::Release);
            let sent = match self.hedge_delay(p) {
                Some(delay) if attempts == 1 => {
                    let (r, hedged) = self.hedged(p, idempotency, deadline, delay).await;
                    attempts += u32::from(hedged);
                    r
                }
                _ => {
                    self.transport()
                        .exchange(self.request(p, idempotency), deadline, p.max_bytes)
                        .await
                }
            };
            if let (Some(crate::config::Hedge::Auto), Ok(_)) = (p.hedge, &sent) {
                self.gates().observe(&p.host, attempt_start.elapsed());
            }
            match sent {
                Ok(ex) if ex.status == http::StatusCode::TOO_MANY_REQUESTS && attempts == 1 => {
                    let delay = ex
                        .headers
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    let needed = delay.map(|d| d + attempt_start.elapsed() + MIN_RETRY_ATTEMPT);
                    if needed.is_some_and(|n| n <= deadline.remaining()) {
                        // Nothing is out while it waits: a barge-in now cancels the retry.
                        p.sent.store(false, Ordering::Release);
                        tokio::time::sleep(delay.unwrap_or_default()).await;
                        continue;
                    }
                    permit.record(true);
                    let message = match delay {
                        Some(d) => format!(
                            "action \"{action}\": rate limited (429); Retry-After {} ms does not fit the {} ms left",
                            d.as_millis(),
                            deadline.remaining().as_millis()
                        ),
                        None => format!(
                            "action \"{action}\": rate limited (429) with no usable Retry-After"
                        ),
                    };
                    return Err(Failure::new(
                        Kind::RateLimited,
                        Fault::Upstream,
                        Retry::Yes,
                        message,
                    )
                    .with_reason("the service is busy right now")
                    .http(429)
                    .after(attempts, timings));
                }
                Ok(ex) => return Ok((ex, attempts, permit)),
                Err(TransportError::Io { stale: true, .. })
                    if attempts == 1 && p.idempotent && !deadline.remaining().is_zero() =>
                {
                    continue;
                }
                Err(e) => {
                    let c = classify(&e, budget_cut);
                    if (budget_cut && matches!(e, TransportError::Timeout { .. }))
                        || c.fault == Fault::Config
                    {
                        // The turn was too short, or the request never reached the host
                        // (egress, a bad URL): no verdict on the host.
                        drop(permit);
                    } else {
                        permit.record(!c.host_failure);
                    }
                    let attempts_made =
                        if matches!(e, TransportError::Connect(ConnectError::Egress(_))) {
                            attempts - 1
                        } else {
                            attempts
                        };
                    return Err(Failure::new(
                        c.kind,
                        c.fault,
                        c.retry,
                        format!("action \"{action}\": {}", describe_transport(&e)),
                    )
                    .with_reason(c.reason)
                    .after(attempts_made, timings));
                }
            }
        }
    }
}

/// The response checked (status, encoding, content type) and its values extracted.
fn checked(
    action: &str,
    exchange: Exchange,
    attempts: u32,
    permit: Permit,
    extractor: &Extractor,
) -> FetchResult {
    let mut timings = Timings {
        connect: exchange.connect,
        tls: exchange.tls,
        ttfb: Some(exchange.ttfb),
        body: Some(exchange.body_time),
        ..Timings::default()
    };
    let code = exchange.status.as_u16();
    if !exchange.status.is_success() {
        permit.record(code < 500);
        let what = if exchange.status.is_redirection() {
            " (redirects are not followed)"
        } else {
            ""
        };
        let (kind, retry) = match code {
            429 => (Kind::RateLimited, Retry::Yes),
            500.. => (Kind::HttpStatus(code), Retry::Yes),
            _ => (Kind::HttpStatus(code), Retry::No),
        };
        return Err(Failure::new(
            kind,
            Fault::Upstream,
            retry,
            format!(
                "action \"{action}\": upstream answered {}{what}",
                exchange.status
            ),
        )
        .http(code)
        .after(attempts, timings));
    }
    permit.record(true);
    let invalid = |message: String, timings| {
        Failure::new(
            Kind::InvalidResponse,
            Fault::Upstream,
            Retry::No,
            format!("action \"{action}\": {message}"),
        )
        .http(code)
        .after(attempts, timings)
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
    Ok(Fetched {
        values: extracted.values,
        http_status: code,
        attempts,
        timings,
    })
}

impl Parts {
    /// How long a read waits before its hedge, if it is hedged now.
    fn hedge_delay(&self, p: &Prepared) -> Option<std::time::Duration> {
        match p.hedge? {
            crate::config::Hedge::After(d) => Some(d),
            crate::config::Hedge::Auto => self.gates().p95(&p.host).map(|d| {
                d.clamp(
                    std::time::Duration::from_millis(5),
                    (p.timeout / 2).max(std::time::Duration::from_millis(5)),
                )
            }),
        }
    }

    /// Sends the request and, if it has not answered after `delay` and the budget leaves room
    /// for another, an identical second one (another connection: the first is busy); the
    /// first complete answer wins and the other is dropped with its connection. An error waits
    /// for the other request. Returns whether the hedge was sent.
    async fn hedged(
        &self,
        p: &Prepared,
        idempotency: Option<&HeaderValue>,
        deadline: Deadline,
        delay: std::time::Duration,
    ) -> (Result<Exchange, TransportError>, bool) {
        let first = self
            .transport()
            .exchange(self.request(p, idempotency), deadline, p.max_bytes);
        tokio::pin!(first);
        tokio::select! {
            biased;
            r = &mut first => return (r, false),
            _ = tokio::time::sleep(delay) => {}
        }
        // No hedge that could not finish: it needs about as long as the first has waited.
        if deadline.remaining() < delay {
            return (first.await, false);
        }
        metrics::counter!("midcall_hedges_total").increment(1);
        let second = self
            .transport()
            .exchange(self.request(p, idempotency), deadline, p.max_bytes);
        tokio::pin!(second);
        let (mut first_err, mut second_err) = (None, None);
        loop {
            tokio::select! {
                r = &mut first, if first_err.is_none() => match r {
                    Ok(ex) => return (Ok(ex), true),
                    Err(e) => match second_err.take() {
                        Some(_) => return (Err(e), true),
                        None => first_err = Some(e),
                    },
                },
                r = &mut second, if second_err.is_none() => match r {
                    Ok(ex) => {
                        metrics::counter!("midcall_hedge_wins_total").increment(1);
                        return (Ok(ex), true);
                    }
                    Err(e) => match first_err.take() {
                        Some(first) => return (Err(first), true),
                        None => second_err = Some(e),
                    },
                },
            }
        }
    }

    /// Starts a background action; the caller gets `accepted` or, when full, `rejected`.
    pub(crate) fn spawn_background(
        self: &Arc<Self>,
        p: Prepared,
        span: &tracing::Span,
    ) -> FetchResult {
        let Some(permit) = self.background_permit() else {
            return Err(Failure::new(
                Kind::Overloaded,
                Fault::Local,
                Retry::Yes,
                format!(
                    "action \"{}\": {} background actions already in flight",
                    p.action,
                    self.max_async_in_flight()
                ),
            ));
        };
        let this = self.clone();
        let span = tracing::info_span!(parent: span, "background");
        tokio::spawn(
            async move {
                let _permit = permit;
                let started = Instant::now();
                let result = this
                    .fetch(&p, &Extractor::default(), ActionDeadline::own(p.timeout))
                    .await;
                let status = match &result {
                    Ok(_) => super::Status::Ok,
                    Err(f) => f.status(),
                };
                super::apply::report_metrics(&p.action, status, started.elapsed());
                match result {
                    Ok(f) => tracing::info!(
                        status = "ok",
                        http_status = f.http_status,
                        "background action done"
                    ),
                    Err(f) => tracing::warn!(
                        status = f.status().as_str(),
                        error = %f.error,
                        "background action failed"
                    ),
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
