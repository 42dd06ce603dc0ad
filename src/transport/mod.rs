//! HTTP transport: hyper-util's pooled client over our own connector (egress checks on every
//! resolved address, `TCP_NODELAY`, rustls with ring, per-phase timings), one deadline over the
//! whole exchange, and a response body capped while it streams.
//!
//! It is given an [`EgressPolicy`] value and a [`Deadline`]; it reads no config (`config`
//! builds the policy from an agent's `[egress]`). May call: `state`, `time`; nothing else.

mod connect;
mod egress;
mod retry_after;

pub use connect::{BoxFuture, Resolve, SystemResolver};
pub use egress::{EgressPolicy, EgressRefusal};

/// Whether an address is in a range the egress policy blocks (for the tests and fuzz bodies,
/// feature `testing`; not API).
#[cfg(feature = "testing")]
#[doc(hidden)]
pub fn is_blocked(ip: std::net::IpAddr) -> bool {
    egress::is_blocked(ip)
}

/// An IP literal in any form a URL parser accepts (for the tests and fuzz bodies, feature
/// `testing`; not API).
#[cfg(feature = "testing")]
#[doc(hidden)]
pub fn parse_ip_literal(host: &str) -> Option<std::net::IpAddr> {
    egress::parse_ip_literal(host)
}
pub use retry_after::parse_retry_after;

pub(crate) use connect::{ConnInfo, ConnectError, Connector};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::CertificateDer;
use tokio::time::Instant;

/// Transport settings. Every default is given where the field is set in
/// `RuntimeBuilder` (`src/exec/runtime.rs`).
#[derive(Clone)]
pub(crate) struct TransportConfig {
    pub(crate) policy: EgressPolicy,
    pub(crate) extra_roots: Vec<CertificateDer<'static>>,
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) pool_idle_timeout: Duration,
    pub(crate) pool_max_idle_per_host: usize,
    pub(crate) http2: bool,
}

/// The pooled client.
#[derive(Clone)]
pub(crate) struct Transport {
    client: Client<Connector, Full<Bytes>>,
    connector: Connector,
    policy: Arc<EgressPolicy>,
    opened: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("policy", &self.policy)
            .field("connections_opened", &self.opened.load(Ordering::Relaxed))
            .finish()
    }
}

/// A complete response.
#[derive(Debug)]
pub(crate) struct Exchange {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) connect: Option<Duration>,
    pub(crate) tls: Option<Duration>,
    pub(crate) ttfb: Duration,
    pub(crate) body_time: Duration,
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum TransportError {
    /// The deadline passed; `got_headers` says how far it got.
    Timeout { got_headers: bool },
    /// No connection: egress refusal, DNS, TCP or TLS.
    Connect(ConnectError),
    /// Sending or reading failed; `stale` when it happened on a reused HTTP/1 connection before
    /// any response byte.
    Io { stale: bool, message: String },
    /// The body grew past the cap.
    TooLarge { limit: u64 },
}

impl Transport {
    pub(crate) fn new(config: TransportConfig) -> Result<Transport, SetupError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for (i, cert) in config.extra_roots.iter().enumerate() {
            roots
                .add(cert.clone())
                .map_err(|e| format!("extra root certificate {}: {e}", i + 1))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = if config.http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let policy = Arc::new(config.policy);
        let opened = Arc::new(AtomicUsize::new(0));
        let connector = Connector {
            policy: policy.clone(),
            resolver: config.resolver,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            opened: opened.clone(),
            stash: Default::default(),
            stash_ttl: config.pool_idle_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .build(connector.clone());
        Ok(Transport {
            client,
            connector,
            policy,
            opened,
        })
    }

    pub(crate) fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// Connections opened since the runtime was built.
    pub(crate) fn connections_opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    /// Sends `req` and reads the whole body, all before `deadline`. On expiry the request and
    /// its connection are dropped, never returned half-read to the pool.
    pub(crate) async fn exchange(
        &self,
        req: Request<Full<Bytes>>,
        deadline: Deadline,
        max_body: u64,
    ) -> Result<Exchange, TransportError> {
        let mut got_headers = false;
        let work = async {
            let start = Instant::now();
            let resp = self.client.request(req).await.map_err(classify)?;
            let ttfb = start.elapsed();
            got_headers = true;
            let (parts, mut body) = resp.into_parts();
            let (connect, tls) = match parts.extensions.get::<ConnInfo>() {
                // Only the first response on a connection paid for connecting.
                Some(ConnInfo(stats)) if stats.responses.fetch_add(1, Ordering::Relaxed) == 0 => {
                    (Some(stats.connect), stats.tls)
                }
                _ => (None, None),
            };
            if let Some(len) = parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
            {
                if len > max_body {
                    return Err(TransportError::TooLarge { limit: max_body });
                }
            }
            let body_start = Instant::now();
            let mut buf = BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| TransportError::Io {
                    stale: false,
                    message: plain(&format!("reading the response body failed: {e}")),
                })?;
                if let Ok(data) = frame.into_data() {
                    if buf.len() as u64 + data.len() as u64 > max_body {
                        return Err(TransportError::TooLarge { limit: max_body });
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Ok(Exchange {
                status: parts.status,
                headers: parts.headers,
                body: buf.freeze(),
                connect,
                tls,
                ttfb,
                body_time: body_start.elapsed(),
            })
        };
        match tokio::time::timeout_at(deadline.timer_instant(), work).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout { got_headers }),
        }
    }

    /// Opens and handshakes one connection to `origin` (`https://host:port`) without sending
    /// a request; the first request to that host takes it.
    pub(crate) async fn warm(
        &self,
        origin: &str,
        deadline: Deadline,
    ) -> Result<(), TransportError> {
        let uri: http::Uri = origin
            .parse()
            .map_err(|_| TransportError::Connect(ConnectError::BadUri))?;
        match tokio::time::timeout_at(deadline.timer_instant(), self.connector.prewarm(&uri)).await
        {
            Ok(r) => r.map_err(TransportError::Connect),
            Err(_) => Err(TransportError::Timeout { got_headers: false }),
        }
    }
}

fn classify(e: hyper_util::client::legacy::Error) -> TransportError {
    // A connector error carries our own ConnectError in its source chain.
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(c) = s.downcast_ref::<ConnectError>() {
            return TransportError::Connect(c.clone_kind());
        }
        source = s.source();
    }
    let stale = e
        .connect_info()
        .map(|c| {
            let mut ext = http::Extensions::new();
            c.get_extras(&mut ext);
            ext.get::<ConnInfo>().is_some_and(|i| i.0.stale_reuse())
        })
        .unwrap_or(false);
    // hyper-util's own "client error (SendRequest)" says nothing an operator can use; the
    // causes under it do.
    let mut parts = Vec::new();
    let top = e.to_string();
    if !top.starts_with("client error") {
        parts.push(top);
    }
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    let message = plain(&parts.join(": "));
    TransportError::Io {
        stale,
        message: if message.is_empty() {
            "the connection failed".into()
        } else {
            message
        },
    }
}

/// A library's error text without the documentation links some of them carry.
pub(crate) fn plain(text: &str) -> String {
    let kept: Vec<&str> = text
        .split(' ')
        .filter(|w| !w.starts_with("http://") && !w.starts_with("https://"))
        .collect();
    let mut out = kept.join(" ");
    while out.ends_with(':') || out.ends_with(' ') || out.ends_with(';') {
        out.pop();
    }
    out.replace(": :", ":").replace(":  ", ": ")
}

/// How much earlier than the deadline the outer timer is armed: 1 ms, tokio's timer tick.
pub const TIMER_SLACK: Duration = Duration::from_millis(1);

/// The instant an exchange must be finished by, handed down from the executor. Nothing below
/// the executor invents a longer timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline at `at` (tokio's clock).
    pub fn at(at: Instant) -> Deadline {
        Deadline(at)
    }

    /// The instant.
    pub fn instant(self) -> Instant {
        self.0
    }

    /// The instant to arm a tokio timer for. tokio's timer fires on 1 ms ticks, rounding the
    /// instant asked for up to the next tick, so a timer armed for the deadline itself fires up
    /// to 1 ms late; armed [`TIMER_SLACK`] early it fires at or before the deadline.
    pub fn timer_instant(self) -> Instant {
        self.0.checked_sub(TIMER_SLACK).unwrap_or(self.0)
    }

    /// Time left, zero once passed.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: Deadline) -> Deadline {
        if other.0 < self.0 {
            other
        } else {
            self
        }
    }
}

/// Every certificate in a PEM bundle (extra roots for private CAs); an error if there is none
/// or one does not parse.
pub(crate) fn pem_certificates(
    pem: &[u8],
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, SetupError> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err(SetupError("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// The TLS setup could not be made: a root certificate (PEM or DER) that does not parse or is
/// refused. Always the caller's configuration; the message names the certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SetupError(pub(crate) String);

impl From<String> for SetupError {
    fn from(message: String) -> Self {
        SetupError(message)
    }
}
