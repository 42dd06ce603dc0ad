//! The connector under hyper-util's pool: resolve, check every address against the egress
//! policy, connect TCP with `TCP_NODELAY`, handshake TLS (rustls, ring), and time each phase.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::egress::{parse_ip_literal, EgressPolicy, EgressRefusal};

/// A boxed future, as resolvers return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Turns a host name into addresses. The default uses the system resolver; tests and embedding
/// programs may pass their own (the egress policy is applied to whatever it returns).
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host` (never an IP literal: those are parsed, not resolved).
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (`getaddrinfo`, through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<io::Result<Vec<SocketAddr>>> {
        let host = host.to_string();
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// Why a connection could not be made.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Egress(EgressRefusal),
    Dns(io::Error),
    NoAddress,
    Tcp(io::Error),
    Tls(io::Error),
    BadUri,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Egress(r) => write!(f, "{r}"),
            ConnectError::Dns(e) => write!(f, "DNS lookup failed: {e}"),
            ConnectError::NoAddress => f.write_str("DNS lookup returned no address"),
            ConnectError::Tcp(e) => write!(f, "connect failed: {e}"),
            ConnectError::Tls(e) => {
                write!(f, "TLS handshake failed: {}", super::plain(&e.to_string()))
            }
            ConnectError::BadUri => f.write_str("the URL has no host"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Per-connection facts shared with the executor through hyper-util's connection extras.
#[derive(Debug, Default)]
pub(crate) struct ConnStats {
    pub(crate) connect: Duration,
    pub(crate) tls: Option<Duration>,
    /// Responses started on this connection (set by the transport).
    pub(crate) responses: AtomicUsize,
    /// Times writing started after reading: the number of HTTP/1 requests written.
    write_phases: AtomicU64,
    /// Bytes read since the last write phase began.
    read_in_phase: AtomicU64,
    reading: AtomicBool,
    /// Opened by warm-up before any request asked for it.
    prewarmed: bool,
}

impl ConnStats {
    /// True when this connection carried an earlier exchange and the current request got no
    /// response byte: the signature of a stale keep-alive connection (HTTP/1).
    pub(crate) fn stale_reuse(&self) -> bool {
        (self.write_phases.load(Ordering::Relaxed) >= 2 || self.prewarmed)
            && self.read_in_phase.load(Ordering::Relaxed) == 0
    }
}

/// The handle to [`ConnStats`] stored in hyper-util's extras.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo(pub(crate) Arc<ConnStats>);

type StashKey = (bool, String, u16);

/// Warmed connections by scheme, host and port, with when they were opened, and the hosts a
/// warm-up is connecting to now.
#[derive(Default)]
pub(crate) struct Stash {
    ready: Mutex<HashMap<StashKey, Vec<(Conn, Instant)>>>,
    warming: Mutex<std::collections::HashSet<StashKey>>,
}

/// The connector service.
#[derive(Clone)]
pub(crate) struct Connector {
    pub(crate) policy: Arc<EgressPolicy>,
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) tls: TlsConnector,
    pub(crate) opened: Arc<AtomicUsize>,
    /// Connections opened by warm-up, handed out on the pool's first request to their host.
    pub(crate) stash: Arc<Stash>,
    /// How long a warmed connection is kept unused (the pool's idle timeout).
    pub(crate) stash_ttl: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = BoxFuture<Result<Conn, ConnectError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        if let Some(conn) = self.take_warm(&uri) {
            return Box::pin(async move { Ok(conn) });
        }
        let this = self.clone();
        Box::pin(async move { this.connect(&uri, false).await })
    }
}

fn stash_key(uri: &Uri) -> Option<StashKey> {
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    Some((https, uri.host()?.to_ascii_lowercase(), port))
}

impl Connector {
    fn take_warm(&self, uri: &Uri) -> Option<Conn> {
        let key = stash_key(uri)?;
        let mut stash = self.stash.ready.lock().ok()?;
        let list = stash.get_mut(&key)?;
        while let Some((conn, at)) = list.pop() {
            if at.elapsed() < self.stash_ttl {
                return Some(conn);
            }
        }
        None
    }

    /// Opens a connection (TCP and TLS) and keeps it for the first request to its host.
    ///
    /// At most one warmed connection per host waits unused: a warm-up finds a fresh one there
    /// (or one being opened) and opens nothing. Every call start warms its hosts, and a busy
    /// pool rarely asks the connector for a new connection, so without this bound each call
    /// would leave one more idle socket behind until its TTL (found by `bench --soak`: +120
    /// sockets a second).
    pub(crate) async fn prewarm(&self, uri: &Uri) -> Result<(), ConnectError> {
        let key = stash_key(uri).ok_or(ConnectError::BadUri)?;
        {
            let mut ready = self.stash.ready.lock().unwrap_or_else(|e| e.into_inner());
            let list = ready.entry(key.clone()).or_default();
            let ttl = self.stash_ttl;
            list.retain(|(_, at)| at.elapsed() < ttl);
            if !list.is_empty() {
                return Ok(());
            }
            let mut warming = self.stash.warming.lock().unwrap_or_else(|e| e.into_inner());
            if !warming.insert(key.clone()) {
                return Ok(());
            }
        }
        let conn = self.connect(uri, true).await;
        self.stash
            .warming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        let conn = conn?;
        self.stash
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .push((conn, Instant::now()));
        Ok(())
    }

    async fn connect(&self, uri: &Uri, prewarmed: bool) -> Result<Conn, ConnectError> {
        let https = uri.scheme_str() == Some("https");
        self.policy
            .check_scheme(https)
            .map_err(ConnectError::Egress)?;
        let host = uri.host().ok_or(ConnectError::BadUri)?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addrs = resolve_checked(&self.policy, &*self.resolver, host, port).await?;
        let started = Instant::now();
        let mut last_err = None;
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let tcp = match tcp {
            Some(t) => t,
            None => {
                return Err(ConnectError::Tcp(
                    last_err.unwrap_or_else(|| io::Error::other("no address to connect to")),
                ))
            }
        };
        tcp.set_nodelay(true).map_err(ConnectError::Tcp)?;
        let connect = started.elapsed();
        self.opened.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("midcall_connections_opened_total").increment(1);
        if !https {
            return Ok(Conn::new(
                Stream::Plain(tcp),
                false,
                connect,
                None,
                prewarmed,
            ));
        }
        let tls_started = Instant::now();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = match parse_ip_literal(bare) {
            Some(ip) => ServerName::IpAddress(ip.into()),
            None => ServerName::try_from(bare.to_string())
                .map_err(|e| ConnectError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?,
        };
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(ConnectError::Tls)?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(Conn::new(
            Stream::Tls(Box::new(tls)),
            h2,
            connect,
            Some(tls_started.elapsed()),
            prewarmed,
        ))
    }
}

/// Resolves `host` (or parses it as an IP literal in any notation) and checks every address.
pub(crate) async fn resolve_checked(
    policy: &EgressPolicy,
    resolver: &dyn Resolve,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, ConnectError> {
    let addrs: Vec<SocketAddr> = match parse_ip_literal(host) {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => resolver
            .resolve(host, port)
            .await
            .map_err(ConnectError::Dns)?,
    };
    if addrs.is_empty() {
        return Err(ConnectError::NoAddress);
    }
    for a in &addrs {
        let ip = match a.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        policy.check_ip(a.ip()).map_err(ConnectError::Egress)?;
        policy.check_ip(ip).map_err(ConnectError::Egress)?;
    }
    Ok(addrs)
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A stream that records, for stale keep-alive detection, when HTTP/1 request writes begin
/// and how many response bytes followed.
struct Counted {
    inner: Stream,
    stats: Arc<ConnStats>,
}

impl Counted {
    fn begin_write(&self) {
        let s = &self.stats;
        if s.reading.swap(false, Ordering::Relaxed) || s.write_phases.load(Ordering::Relaxed) == 0 {
            s.write_phases.fetch_add(1, Ordering::Relaxed);
            s.read_in_phase.store(0, Ordering::Relaxed);
        }
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.stats
                .read_in_phase
                .fetch_add(n as u64, Ordering::Relaxed);
            this.stats.reading.store(true, Ordering::Relaxed);
        }
        res
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.begin_write();
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.begin_write();
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One connection, as the pool holds it.
pub(crate) struct Conn {
    io: TokioIo<Counted>,
    h2: bool,
    stats: Arc<ConnStats>,
}

impl Conn {
    fn new(
        stream: Stream,
        h2: bool,
        connect: Duration,
        tls: Option<Duration>,
        prewarmed: bool,
    ) -> Conn {
        let stats = Arc::new(ConnStats {
            connect,
            tls,
            prewarmed,
            ..ConnStats::default()
        });
        Conn {
            io: TokioIo::new(Counted {
                inner: stream,
                stats: stats.clone(),
            }),
            h2,
            stats,
        }
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let c = Connected::new().extra(ConnInfo(self.stats.clone()));
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

impl ConnectError {
    /// A copy for reporting (io errors are not `Clone`).
    pub(crate) fn clone_kind(&self) -> ConnectError {
        let copy = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            ConnectError::Egress(r) => ConnectError::Egress(r.clone()),
            ConnectError::Dns(e) => ConnectError::Dns(copy(e)),
            ConnectError::NoAddress => ConnectError::NoAddress,
            ConnectError::Tcp(e) => ConnectError::Tcp(copy(e)),
            ConnectError::Tls(e) => ConnectError::Tls(copy(e)),
            ConnectError::BadUri => ConnectError::BadUri,
        }
    }
}
