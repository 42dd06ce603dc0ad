//! The HTTP front of `midcall serve`: one hyper server whose router answers `GET /healthz`,
//! `GET /metrics`, inbound webhooks (`inbound.rs`), the operator API under `/v1/admin/`
//! (`admin/`) and the console under `/console` (`console/`, its CSS and script as files).
//!
//! May call: `automation` (to start runs and read agents), `store`, `events` and everything
//! below; nothing above it but `stack` and the binary calls it.

mod admin;
mod console;
mod inbound;
mod limit;

pub use crate::automation::REPLAY_WINDOW;
pub use admin::{ADMIN_BURST, ADMIN_MAX_LIMIT, ADMIN_RATE_PER_SECOND};
pub use console::{COOKIE as CONSOLE_COOKIE, SESSION_S as CONSOLE_SESSION_S};
// The fuzz bodies reach the inbound checks (they are not API).
#[cfg(feature = "testing")]
pub(crate) use inbound::{check_signature, is_json, parse_payload};
pub(crate) use limit::RateLimiter;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::automation::Automations;

/// How far a `webhook-timestamp` may be from the server's clock: 300 s either way.
pub const SIGNATURE_TOLERANCE_S: i64 = 300;
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
pub(crate) struct Server {
    automations: Automations,
    admin: admin::Admin,
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
        let admin = admin::Admin::new(self.admin_key.clone(), admin_db, self.https_proxy);
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

pub(crate) fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
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
        return admin::handle(&s.admin, &s.automations, peer, req).await;
    }
    if path == "/console" || path.starts_with("/console/") {
        return console::handle(&s.admin, &s.automations, peer, req).await;
    }
    inbound::webhook(s, peer, req, &path).await
}
