//! Real local servers for the tests: an HTTP/HTTPS server (hyper, HTTP/1.1 and HTTP/2, TLS with
//! certificates made here by rcgen) that records requests and counts accepted connections, and a
//! raw TCP server that misbehaves on purpose. Every server sets TCP_NODELAY and listens on
//! 127.0.0.1 only.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub(crate) method: String,
    pub(crate) uri: String,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) version: http::Version,
}

impl Recorded {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// What the server answers.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    Json(u16, Value),
    Raw {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Never answer.
    Hang,
    /// Answer after a delay.
    After(Duration, Box<Reply>),
}

impl Reply {
    pub(crate) fn ok(v: Value) -> Reply {
        Reply::Json(200, v)
    }
}

type Handler = Arc<dyn Fn(&Recorded, usize) -> Reply + Send + Sync>;

/// A recording HTTP or HTTPS server.
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) accepted: Arc<AtomicUsize>,
    pub(crate) requests: Arc<Mutex<Vec<Recorded>>>,
    /// The CA certificate (DER) to trust, for HTTPS servers.
    pub(crate) ca_der: Option<Vec<u8>>,
    https: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub(crate) async fn http(
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> TestServer {
        Self::start(Arc::new(handler), None).await
    }

    pub(crate) async fn https(
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> TestServer {
        let tls = TestTls::new("localhost");
        Self::start(Arc::new(handler), Some(tls)).await
    }

    /// An HTTPS server whose certificate is signed by a CA the client does not trust.
    pub(crate) async fn https_untrusted(
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> TestServer {
        let tls = TestTls::new("localhost");
        let mut s = Self::start(Arc::new(handler), Some(tls)).await;
        s.ca_der = Some(TestTls::new("localhost").ca_der);
        s
    }

    async fn start(handler: Handler, tls: Option<TestTls>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let ca_der = tls.as_ref().map(|t| t.ca_der.clone());
        let https = tls.is_some();
        let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.server_config));
        let (acc, reqs) = (accepted.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                stream.set_nodelay(true).unwrap();
                acc.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let reqs = reqs.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let handler = handler.clone();
                            let reqs = reqs.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let rec = Recorded {
                                    method: parts.method.to_string(),
                                    uri: parts.uri.to_string(),
                                    headers: parts.headers,
                                    body,
                                    version: parts.version,
                                };
                                let n = {
                                    let mut r = reqs.lock().unwrap();
                                    r.push(rec.clone());
                                    r.len()
                                };
                                let reply = handler(&rec, n);
                                Ok::<_, Infallible>(respond(reply).await)
                            }
                        });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        TestServer {
            addr,
            accepted,
            requests,
            ca_der,
            https,
            task,
        }
    }

    /// `http://127.0.0.1:port` or `https://localhost:port`.
    pub(crate) fn origin(&self) -> String {
        if self.https {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://127.0.0.1:{}", self.addr.port())
        }
    }

    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub(crate) fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub(crate) fn last(&self) -> Recorded {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }
}

fn respond(reply: Reply) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>> {
    Box::pin(async move {
        match reply {
            Reply::Json(status, v) => Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(v.to_string())))
                .unwrap(),
            Reply::Raw {
                status,
                headers,
                body,
            } => {
                let mut b = Response::builder().status(status);
                for (k, v) in headers {
                    b = b.header(k, v);
                }
                b.body(Full::new(Bytes::from(body))).unwrap()
            }
            Reply::Hang => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            Reply::After(d, r) => {
                tokio::time::sleep(d).await;
                respond(*r).await
            }
        }
    })
}

/// A CA and a leaf certificate for `host` (and 127.0.0.1), made now.
pub(crate) struct TestTls {
    pub(crate) ca_der: Vec<u8>,
    pub(crate) ca_pem: String,
    pub(crate) server_config: Arc<rustls::ServerConfig>,
}

impl TestTls {
    pub(crate) fn new(host: &str) -> TestTls {
        Self::with_alpn(host, vec![b"h2".to_vec(), b"http/1.1".to_vec()])
    }

    pub(crate) fn with_alpn(host: &str, alpn: Vec<Vec<u8>>) -> TestTls {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "midcall test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_params =
            rcgen::CertificateParams::new(vec![host.to_string(), "127.0.0.1".to_string()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        cfg.alpn_protocols = alpn;
        TestTls {
            ca_der: ca.der().to_vec(),
            ca_pem: ca.pem(),
            server_config: Arc::new(cfg),
        }
    }
}

/// A raw TCP server: each accepted connection is handed to `behave` with its index (from 1).
pub(crate) struct RawServer {
    pub(crate) addr: SocketAddr,
    pub(crate) accepted: Arc<AtomicUsize>,
    /// Notified when a connection handler saw the client close the connection.
    pub(crate) closed: Arc<Notify>,
    pub(crate) closed_count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) type Behaviour = Arc<
    dyn Fn(
            TcpStream,
            usize,
            Arc<Notify>,
            Arc<AtomicUsize>,
        ) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

impl RawServer {
    pub(crate) async fn start(behave: Behaviour) -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(Notify::new());
        let closed_count = Arc::new(AtomicUsize::new(0));
        let (acc, cl, cc) = (accepted.clone(), closed.clone(), closed_count.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                stream.set_nodelay(true).unwrap();
                let n = acc.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(behave(stream, n, cl.clone(), cc.clone()));
            }
        });
        RawServer {
            addr,
            accepted,
            closed,
            closed_count,
            task,
        }
    }

    pub(crate) fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.addr.port())
    }

    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Reads one HTTP/1.1 request (head and Content-Length body). `None` when the peer closed.
pub(crate) async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(head);
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Waits until the peer closes (read returns 0 or fails), then reports it.
pub(crate) async fn wait_closed(
    mut stream: TcpStream,
    closed: Arc<Notify>,
    count: Arc<AtomicUsize>,
) {
    let mut b = [0u8; 1024];
    loop {
        match stream.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    count.fetch_add(1, Ordering::SeqCst);
    closed.notify_one();
}

/// A complete JSON response.
pub(crate) fn json_response(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

pub(crate) async fn write_all(stream: &mut TcpStream, s: &str) -> bool {
    stream.write_all(s.as_bytes()).await.is_ok()
}
