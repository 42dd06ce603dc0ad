//! The bundled mock CRM, for demos and examples (`midcall simulate`, `serve --mock`, the
//! Python package's `mock=True`): one local HTTPS server (a certificate made at start for every host the
//! agent calls) answering the example agents' endpoints with realistic latencies and a fault on
//! purpose, plus webhook receivers that verify Standard Webhooks signatures.
//!
//! Behind the default-on cargo feature `demo`. May call: `events` (signing), `config`,
//! `transport`, `template`, `time`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::config::ActionSet;
use crate::events::signing;
use crate::transport::{BoxFuture, Resolve};
use crate::{Secret, SecretSource};

/// Secrets for the demo: a `whsec_` secret for names that sign (`*WHSEC*`, `*SECRET*`), a
/// `demo-…` token for the rest. Remembers what it handed out, so receivers can verify.
#[derive(Debug, Default)]
pub struct DemoSecrets {
    issued: Mutex<BTreeMap<String, String>>,
    /// Take a secret from the environment (`MIDCALL_SECRET_<NAME>`) when it is set.
    prefer_env: bool,
}

impl DemoSecrets {
    /// Secrets from the environment where set, demo values for the rest (`serve --mock`).
    pub fn env_first() -> DemoSecrets {
        DemoSecrets {
            prefer_env: true,
            ..DemoSecrets::default()
        }
    }

    fn value(name: &str) -> String {
        if name.contains("WHSEC") || name.contains("SECRET") {
            let key = format!("midcall-demo-signing-key-{name}");
            format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(key)
            )
        } else {
            format!("demo-{}", name.to_ascii_lowercase())
        }
    }

    /// The signing secrets handed out so far.
    fn signing_secrets(&self) -> Vec<String> {
        self.issued
            .lock()
            .map(|m| {
                m.values()
                    .filter(|v| v.starts_with("whsec_"))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl SecretSource for DemoSecrets {
    fn secret(&self, name: &str) -> Option<Secret> {
        let from_env = self
            .prefer_env
            .then(|| std::env::var(format!("MIDCALL_SECRET_{name}")).ok())
            .flatten();
        let v = from_env.unwrap_or_else(|| Self::value(name));
        if let Ok(mut m) = self.issued.lock() {
            m.insert(name.to_string(), v.clone());
        }
        Some(Secret::new(v))
    }
}

/// Sends every host name to the mock.
#[derive(Debug, Clone, Copy)]
pub struct MockResolver(pub SocketAddr);

impl Resolve for MockResolver {
    fn resolve(&self, _host: &str, _port: u16) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> {
        let addr = self.0;
        Box::pin(async move { Ok(vec![addr]) })
    }
}

/// A webhook the mock received.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Received {
    /// The receiver's host.
    pub host: String,
    /// The path it was posted to.
    pub path: String,
    /// Its `webhook-id` header.
    pub webhook_id: Option<String>,
    /// `verified`, `invalid` or `unsigned`.
    pub signature: &'static str,
}

/// One request the mock answered.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Hit {
    /// The request's method.
    pub method: String,
    /// The host it named.
    pub host: String,
    /// Its path.
    pub path: String,
    /// The status answered (0: the connection was reset).
    pub status: u16,
}

struct Rule {
    method: String,
    host: String,
    path: String,
    def: MockRule,
    left: Option<u32>,
}

struct State {
    rules: Mutex<Vec<Rule>>,
    hits: Mutex<Vec<Hit>>,
    received: Mutex<Vec<Received>>,
    secrets: Arc<DemoSecrets>,
    counter: Mutex<u64>,
}

/// The running mock; dropping it stops it.
pub struct Mock {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    /// Its certificate (DER), to trust.
    pub cert_der: Vec<u8>,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Mock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mock")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mock {
    /// Starts on 127.0.0.1 with a certificate for `hosts`.
    pub async fn start(
        hosts: &[String],
        rules: &[MockRule],
        secrets: Arc<DemoSecrets>,
    ) -> Result<Mock, MockError> {
        let mut names = hosts.to_vec();
        names.push("localhost".into());
        let (acceptor, cert_der) = self_signed_tls(names)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("mock CRM: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let state = Arc::new(State {
            rules: Mutex::new(
                rules
                    .iter()
                    .filter_map(|r| {
                        let (method, host, path) = parse_route(&r.route)?;
                        Some(Rule {
                            method,
                            host,
                            path,
                            left: r.times,
                            def: r.clone(),
                        })
                    })
                    .collect(),
            ),
            hits: Mutex::new(Vec::new()),
            received: Mutex::new(Vec::new()),
            secrets,
            counter: Mutex::new(0),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { answer(&st, req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(Mock {
            addr,
            cert_der,
            state,
            task,
        })
    }

    /// Every request answered so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.state
            .hits
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }

    /// Every webhook received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }
}

fn matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => path == pattern,
    }
}

fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// An error makes hyper drop the connection without an answer (a `reset` rule).
#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset on purpose")
    }
}

impl std::error::Error for Reset {}

async fn answer(st: &State, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Reset> {
    let method = req.method().as_str().to_string();
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(req.uri().host())
        .unwrap_or_default()
        .split(':')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let headers = req.headers().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let rule = st.rules.lock().ok().and_then(|mut rules| {
        let r = rules.iter_mut().find(|r| {
            r.method == method
                && r.host == host
                && matches(&r.path, &path)
                && r.left.is_none_or(|n| n > 0)
        })?;
        if let Some(n) = &mut r.left {
            *n -= 1;
        }
        Some(r.def.clone())
    });
    let (default_latency, default_status, default_body) =
        route(st, &method, &host, &path, &query, &headers, &body);
    let latency = rule
        .as_ref()
        .and_then(|r| r.latency_ms)
        .unwrap_or(default_latency);
    tokio::time::sleep(Duration::from_millis(latency)).await;
    let record = |status: u16| {
        if let Ok(mut h) = st.hits.lock() {
            h.push(Hit {
                method: method.clone(),
                host: host.clone(),
                path: path.clone(),
                status,
            });
        }
    };
    if let Some(r) = &rule {
        if r.reset {
            record(0);
            return Err(Reset);
        }
        if let Some(status) = r.status {
            record(status);
            let body = r.body.clone().unwrap_or_else(
                || json!({"error": format!("the mock answers {status} on purpose")}),
            );
            let mut resp = json_response(status, &body);
            if let Some(s) = r.retry_after_s {
                if let Ok(v) = http::HeaderValue::from_str(&s.to_string()) {
                    resp.headers_mut().insert(http::header::RETRY_AFTER, v);
                }
            }
            return Ok(resp);
        }
    }
    record(default_status);
    Ok(json_response(default_status, &default_body))
}

fn next(st: &State) -> u64 {
    st.counter
        .lock()
        .map(|mut c| {
            *c += 1;
            *c
        })
        .unwrap_or(0)
}

/// The built-in endpoints: (latency ms, status, body).
fn route(
    st: &State,
    method: &str,
    host: &str,
    path: &str,
    query: &str,
    headers: &http::HeaderMap,
    body: &Bytes,
) -> (u64, u16, Value) {
    let is_hook =
        path.starts_with("/hooks/") || host.starts_with("hooks.") || host.starts_with("dispatch.");
    if method == "POST" && is_hook {
        receive(st, host, path, headers, body);
        return (3, 200, json!({"received": true}));
    }
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer demo-"))
        || headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("demo-"));
    if !authorized {
        return (2, 401, json!({"error": "missing or wrong API token"}));
    }
    let n = next(st);
    match (method, host, path) {
        ("GET", "crm.example.com", "/v1/customers") => (
            35,
            200,
            json!({"data": {"customer": {"id": "cus_8812", "name": "Dana Reyes", "tier": "gold",
                "phone": query.split("phone=").nth(1).unwrap_or_default()}}}),
        ),
        ("POST", "crm.example.com", p)
            if p.starts_with("/v1/customers/") && p.ends_with("/notes") =>
        {
            (40, 201, json!({"id": format!("note_{n}")}))
        }
        // Slow on purpose: the filler plays.
        ("GET", "scheduling.example.com", "/v1/slots") => (
            650,
            200,
            json!({"date": query, "slots": [
                {"start": "2025-11-04T09:00", "available": true},
                {"start": "2025-11-04T11:30", "available": false},
                {"start": "2025-11-04T15:00", "available": true},
                {"start": "2025-11-04T16:30", "available": true}
            ], "total": 3}),
        ),
        ("POST", "scheduling.example.com", "/appointments") => {
            let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            (
                60,
                201,
                json!({"id": format!("apt_{}", 1000 + n), "status": "booked", "slot": req["slot"]}),
            )
        }
        ("POST", "scheduling.example.com", "/callbacks") => (
            40,
            201,
            json!({"id": format!("cb_{}", 500 + n), "status": "scheduled"}),
        ),
        // Failing on purpose: the fallback plays.
        ("GET", "insurance.example.com", _) => (
            120,
            503,
            json!({"error": "eligibility service unavailable"}),
        ),
        ("GET", "api.riverside-power.example", p) if p.starts_with("/v2/accounts/by-phone/") => (
            30,
            200,
            json!({"account": {"id": "acc_5521", "service_address": {"line1": "12 Elm St", "zip": "97201"},
                "flags": {"medical": true}}}),
        ),
        ("GET", "api.riverside-power.example", "/v2/outages") => (
            55,
            200,
            json!({"outages": [{"active": true, "estimated_restoration": "2025-11-03T23:30:00Z",
                "crew": {"status": "en_route"}, "affected_customers": 412}]}),
        ),
        ("POST", "api.riverside-power.example", "/v2/tickets") => (
            70,
            201,
            json!({"ticket": {"id": format!("tkt_{}", 7000 + n), "priority": "high"}}),
        ),
        _ => (
            2,
            404,
            json!({"error": format!("the mock CRM has no route {method} {host}{path}")}),
        ),
    }
}

fn receive(st: &State, host: &str, path: &str, headers: &http::HeaderMap, body: &Bytes) {
    let text = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let webhook_id = text("webhook-id").map(str::to_string);
    let signature = match (
        webhook_id.as_deref(),
        text("webhook-timestamp"),
        text("webhook-signature"),
    ) {
        (Some(id), Some(ts), Some(sig)) => {
            let ts: i64 = ts.parse().unwrap_or_default();
            let now = crate::time::now_ms() / 1000;
            let ok = st
                .secrets
                .signing_secrets()
                .iter()
                .any(|s| signing::verify(s, id, ts, body, sig, now, 300));
            if ok {
                "verified"
            } else {
                "invalid"
            }
        }
        _ => "unsigned",
    };
    if let Ok(mut r) = st.received.lock() {
        r.push(Received {
            host: host.to_string(),
            path: path.to_string(),
            webhook_id,
            signature,
        });
    }
}

/// An override of the mock CRM for requests matching `route` (`"METHOD host/path"`, a path
/// ending in `*` matches by prefix).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockRule {
    /// `"METHOD host/path"`.
    pub route: String,
    /// Answer after this long.
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// Answer with this status (and `body`, default `{"error": ...}`).
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    /// The body to answer with.
    pub body: Option<Value>,
    /// Send `Retry-After` with this many seconds.
    #[serde(default)]
    pub retry_after_s: Option<u64>,
    /// Close the connection without answering: the endpoint is down.
    #[serde(default)]
    pub reset: bool,
    /// Apply to this many requests, then answer normally (default: all).
    #[serde(default)]
    pub times: Option<u32>,
}

/// `"GET host/path"` → (method, host, path).
pub fn parse_route(route: &str) -> Option<(String, String, String)> {
    let (method, rest) = route.trim().split_once(' ')?;
    let rest = rest.trim();
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/*"),
    };
    if method.is_empty() || host.is_empty() {
        return None;
    }
    Some((
        method.to_ascii_uppercase(),
        host.to_ascii_lowercase(),
        path.to_string(),
    ))
}

/// A TLS acceptor (HTTP/1.1) with a self-signed certificate for `names`, made now, and the
/// certificate (DER) for clients to trust: the local servers of `bench`, `simulate` and the mock CRM.
pub fn self_signed_tls(
    names: Vec<String>,
) -> Result<(tokio_rustls::TlsAcceptor, Vec<u8>), MockError> {
    self_signed_tls_inner(names).map_err(MockError)
}

/// See [`self_signed_tls`].
fn self_signed_tls_inner(
    names: Vec<String>,
) -> Result<(tokio_rustls::TlsAcceptor, Vec<u8>), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = rcgen::CertificateParams::new(names)
        .and_then(|p| p.self_signed(&key))
        .map_err(|e| e.to_string())?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg)),
        cert.der().to_vec(),
    ))
}

/// Every host the agent sends to: actions, webhooks, automation steps.
pub fn hosts(set: &ActionSet) -> Vec<String> {
    let mut out: Vec<String> = set
        .actions()
        .iter()
        .map(|a| a.url().host().to_string())
        .collect();
    out.extend(set.webhooks().iter().map(|w| w.url.host().to_string()));
    for a in set.automations() {
        for s in &a.steps {
            if let crate::config::Step::SendWebhook { url, .. } = s {
                out.push(url.host().to_string());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

crate::text_error! {
    /// The mock CRM could not start (its certificate, its port).
    MockError
}
