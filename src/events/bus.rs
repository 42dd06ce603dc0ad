//! Publishing and delivery. `publish` only enqueues into a bounded channel; a writer (a thread
//! for SQLite, a task for PostgreSQL) group-commits batches to the outbox; a delivery task
//! claims due deliveries, POSTs them signed, records every attempt and schedules the next.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::sync::{mpsc, oneshot, Notify};

use super::{signing, time, Event};
use crate::config::Agents;
use crate::config::{ActionSet, WebhookSpec};
use crate::state::CallInfo;
use crate::store::sqlite::{self, outbox};
use crate::store::{Attempt, Claimed, Db, Location, LogConn, NewEvent, Next, StoreError};
use crate::template::{EnvSecrets, Redactor, RenderInputs, SecretSource, Template, UrlTemplate};
use crate::transport::{Deadline, EgressPolicy, Transport, TransportConfig, TransportError};

/// Default retry schedule after a failed attempt: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
pub const DEFAULT_RETRY_SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(300),
    Duration::from_secs(1800),
    Duration::from_secs(7200),
    Duration::from_secs(18_000),
    Duration::from_secs(36_000),
    Duration::from_secs(36_000),
];

/// Why publishing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The channel to the outbox writer is full: the event was not taken (and is counted).
    #[error("event bus overloaded: the outbox writer is behind; the event was not accepted")]
    Overloaded,
    /// The bus is closed.
    #[error("event bus closed")]
    Closed,
    /// The outbox could not commit the event.
    #[error("{0}")]
    Storage(String),
}

enum Msg {
    Event(NewEvent, Option<oneshot::Sender<Result<(), String>>>),
}

/// Builds an [`EventBus`]. Every setting has a default, given on its method.
#[derive(Clone)]
pub struct EventBusBuilder {
    db: PathBuf,
    webhooks: Vec<Hook>,
    secrets: Arc<dyn SecretSource>,
    policy: EgressPolicy,
    extra_roots: Vec<Vec<u8>>,
    resolver: Arc<dyn crate::transport::Resolve>,
    schedule: Vec<Duration>,
    jitter: f64,
    attempt_timeout: Duration,
    hold: Duration,
    disable_after: Duration,
    retention: Duration,
    capacity: usize,
    deliver: bool,
    retry_after_cap: Duration,
}

impl std::fmt::Debug for EventBusBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBusBuilder")
            .field("db", &self.db)
            .field("webhooks", &self.webhooks.len())
            .finish_non_exhaustive()
    }
}

impl EventBusBuilder {
    /// The agent's `[[webhooks]]`. Default none. (Its automations' `send_webhook` steps are
    /// resolved by the [`crate::Automations`] that queue them, which register with the bus.)
    pub fn webhooks(mut self, set: &ActionSet) -> Self {
        self.webhooks = hooks_of(&Agents::one(Arc::new(set.clone())));
        self
    }
    /// The `[[webhooks]]` of every agent (see [`Agents`]): with many, each receives only its own
    /// agent's events and is named `<agent>/<label>` in the outbox. Replaced on a reload by
    /// [`EventBus::set_agents`].
    pub fn agents(mut self, agents: &Agents) -> Self {
        self.webhooks = hooks_of(agents);
        self
    }
    /// Where signing secrets and URL secrets come from. Default [`EnvSecrets`].
    pub fn secrets(mut self, s: Arc<dyn SecretSource>) -> Self {
        self.secrets = s;
        self
    }
    /// The egress policy webhook URLs must pass (the executor's). Default strict.
    pub fn egress(mut self, p: EgressPolicy) -> Self {
        self.policy = p;
        self
    }
    /// Trusts an extra root certificate (DER). Default none.
    pub fn add_root_certificate(mut self, der: Vec<u8>) -> Self {
        self.extra_roots.push(der);
        self
    }
    /// The resolver for webhook host names (the egress policy applies to what it returns).
    /// Default: the system resolver.
    pub fn resolver(mut self, r: Arc<dyn crate::transport::Resolve>) -> Self {
        self.resolver = r;
        self
    }
    /// Trusts every certificate in a PEM bundle as an extra root. Default none.
    pub fn add_root_certificates_pem(mut self, pem: &[u8]) -> Result<Self, String> {
        let certs = crate::transport::pem_certificates(pem)?;
        self.extra_roots.extend(certs.iter().map(|c| c.to_vec()));
        Ok(self)
    }
    /// Delays before each retry. Default [`DEFAULT_RETRY_SCHEDULE`]; after the last, the
    /// delivery is failed.
    pub fn retry_schedule(mut self, s: Vec<Duration>) -> Self {
        self.schedule = s;
        self
    }
    /// Random spread of each delay, as a fraction. Default 0.2 (±20 %).
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = j.clamp(0.0, 1.0);
        self
    }
    /// Time limit of one attempt. Default 15 s.
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = d;
        self
    }
    /// How long a later event for the same endpoint and call waits while an earlier one is
    /// still being retried. Default 60 s.
    pub fn ordering_hold(mut self, d: Duration) -> Self {
        self.hold = d;
        self
    }
    /// An endpoint failing without a success for this long is disabled. Default 5 days.
    pub fn disable_after(mut self, d: Duration) -> Self {
        self.disable_after = d;
        self
    }
    /// Delivered events older than this are purged. Default 30 days.
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }
    /// Events the publish channel holds before `publish` returns `Overloaded`. Default 65 536.
    pub fn channel_capacity(mut self, n: usize) -> Self {
        self.capacity = n.max(1);
        self
    }
    /// The longest delay a `Retry-After` may impose. Default 10 h.
    pub fn retry_after_cap(mut self, d: Duration) -> Self {
        self.retry_after_cap = d;
        self
    }
    /// Run the delivery task. Default true; false only stores (tests, benchmarks).
    pub fn deliver(mut self, yes: bool) -> Self {
        self.deliver = yes;
        self
    }

    /// Opens the outbox, starts the writer thread and the delivery task. Fails on an outbox
    /// that cannot be opened, or outside a tokio runtime when it is to deliver.
    pub fn build(self) -> Result<EventBus, String> {
        self.build_with(None)
    }

    /// Builds on `transport` (the runtime's pool) when given.
    pub(crate) fn build_with(self, shared: Option<Transport>) -> Result<EventBus, String> {
        if self.deliver && tokio::runtime::Handle::try_current().is_err() {
            return Err("the event bus must be built inside a tokio runtime to deliver".into());
        }
        let location = Location::of(&self.db);
        let db = Db::open(&location).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<Msg>(self.capacity);
        let notify = Arc::new(Notify::new());
        let writer = match &db {
            Db::Sqlite(_, path) => {
                let conn = sqlite::open(path).map_err(|e| e.to_string())?;
                let n2 = notify.clone();
                Writer::Thread(
                    std::thread::Builder::new()
                        .name("midcall-outbox".into())
                        .spawn(move || write_sqlite(conn, rx, n2))
                        .map_err(|e| e.to_string())?,
                )
            }
            Db::Postgres(pg) => {
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(format!(
                        "{}: an event bus on PostgreSQL must be built inside a tokio runtime",
                        location.shown()
                    ));
                }
                Writer::Task(tokio::spawn(write_pg(pg.clone(), rx, notify.clone())))
            }
        };
        let mut transport = TransportConfig {
            policy: self.policy.clone(),
            extra_roots: Vec::new(),
            resolver: self.resolver.clone(),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 8,
            http2: true,
        };
        for der in &self.extra_roots {
            transport
                .extra_roots
                .push(rustls_pki_types::CertificateDer::from(der.clone()));
        }
        let transport = match shared {
            Some(t) => t,
            None => Transport::new(transport)?,
        };
        let targets: Targets = Arc::new(std::sync::RwLock::new(None));
        let inner = Arc::new(Inner {
            tx: Mutex::new(Some(tx)),
            overloaded: AtomicU64::new(0),
            webhooks: Arc::new(std::sync::RwLock::new(Arc::new(self.webhooks.clone()))),
            writer: Mutex::new(Some(writer)),
            targets: targets.clone(),
        });
        let worker = Worker {
            db: db.clone(),
            transport,
            secrets: self.secrets.clone(),
            webhooks: inner.webhooks.clone(),
            targets,
            schedule: self.schedule.clone(),
            jitter: self.jitter,
            attempt_timeout: self.attempt_timeout,
            hold: self.hold,
            disable_after: self.disable_after,
            retention: self.retention,
            retry_after_cap: self.retry_after_cap,
            notify: notify.clone(),
            throttle: Mutex::default(),
        };
        let task = if self.deliver {
            Some(tokio::spawn(worker.run()))
        } else {
            None
        };
        Ok(EventBus {
            inner,
            notify,
            task: Arc::new(Mutex::new(task)),
            db: self.db,
            store: db,
        })
    }
}

/// A webhook endpoint: its outbox name, the agent whose calls it receives (`None`: every
/// call's), its spec.
#[derive(Clone)]
pub(crate) struct Hook {
    pub(crate) name: String,
    pub(crate) agent: Option<String>,
    pub(crate) spec: WebhookSpec,
}

type Hooks = Arc<std::sync::RwLock<Arc<Vec<Hook>>>>;

/// The webhooks of `agents`, named as [`Agents::name`] stores them.
fn hooks_of(agents: &Agents) -> Vec<Hook> {
    agents
        .sets()
        .iter()
        .flat_map(|s| {
            let id = &s.agent().id;
            s.webhooks().iter().enumerate().map(move |(i, w)| Hook {
                name: agents.name(id, &endpoint_name(i, w)),
                agent: agents.qualified().then(|| id.clone()),
                spec: w.clone(),
            })
        })
        .collect()
}

/// The outbox name of an agent's `i`th webhook (without the agent): its label, or its place
/// and URL.
pub(crate) fn endpoint_name(i: usize, w: &WebhookSpec) -> String {
    match &w.label {
        Some(l) => l.clone(),
        None => format!(
            "webhook {}: {}",
            i + 1,
            w.url.source().split('?').next().unwrap_or_default()
        ),
    }
}

struct Inner {
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    overloaded: AtomicU64,
    webhooks: Hooks,
    writer: Mutex<Option<Writer>>,
    targets: Targets,
}

enum Writer {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

/// Group commit: everything queued while the last commit ran goes in the next.
fn next_batch(first: Msg, rx: &mut mpsc::Receiver<Msg>) -> Vec<Msg> {
    let mut batch = vec![first];
    while batch.len() < 4096 {
        match rx.try_recv() {
            Ok(m) => batch.push(m),
            Err(_) => break,
        }
    }
    batch
}

fn answer(batch: Vec<Msg>, result: Result<(), String>) {
    if result.is_err() {
        metrics::counter!("midcall_events_write_errors_total").increment(batch.len() as u64);
    }
    for Msg::Event(_, done) in batch {
        if let Some(done) = done {
            let _ = done.send(result.clone());
        }
    }
}

fn write_sqlite(mut conn: rusqlite::Connection, mut rx: mpsc::Receiver<Msg>, notify: Arc<Notify>) {
    while let Some(first) = rx.blocking_recv() {
        let batch = next_batch(first, &mut rx);
        let events: Vec<NewEvent> = batch.iter().map(|Msg::Event(e, _)| e.clone()).collect();
        let result =
            outbox::insert_batch(&mut conn, &events, time::now_ms()).map_err(|e| e.to_string());
        answer(batch, result);
        notify.notify_one();
    }
}

/// The PostgreSQL writer. A batch that fails because the server is down or restarting is kept
/// and tried again with backoff (up to 2 s apart) until it commits, so nothing published is lost
/// while the database restarts; publishers meanwhile fill the channel and, once it is full, get
/// `Overloaded` (counted). After the bus is closed, a batch is tried for at most 10 s more.
async fn write_pg(pg: crate::store::pg::Pg, mut rx: mpsc::Receiver<Msg>, notify: Arc<Notify>) {
    while let Some(first) = rx.recv().await {
        let batch = next_batch(first, &mut rx);
        let events: Vec<NewEvent> = batch.iter().map(|Msg::Event(e, _)| e.clone()).collect();
        let mut backoff = Duration::from_millis(50);
        let mut closed_since: Option<tokio::time::Instant> = None;
        let result = loop {
            match pg
                .insert_batch(&events, time::now_ms())
                .await
                .map_err(StoreError::from)
            {
                Ok(()) => break Ok(()),
                Err(e) if e.is_transient() => {
                    if rx.is_closed() {
                        let since = *closed_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() > Duration::from_secs(10) {
                            break Err(e.to_string());
                        }
                    }
                    metrics::counter!("midcall_outbox_write_retries_total").increment(1);
                    tracing::warn!(error = %e, events = events.len(), "outbox: postgres unavailable; keeping the batch and trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        answer(batch, result);
        notify.notify_one();
    }
}

/// Resolves the `target` of a delivery that is not an event webhook (an automation step's):
/// its templates and the render inputs stored with it. Registered by whoever queues such
/// deliveries ([`crate::Automations`]); the bus never reads their config itself.
pub(crate) trait DeliveryTargets: Send + Sync + 'static {
    /// The target, with its run's stored context (read with the claim), or why it cannot be.
    fn resolve(&self, target: &str, context: Option<&[u8]>) -> Result<ResolvedTarget, String>;
}

/// Where a delivery goes and what its templates read.
pub(crate) struct ResolvedTarget {
    pub(crate) url: UrlTemplate,
    pub(crate) headers: Vec<(String, Template)>,
    pub(crate) signing_secret: Option<Template>,
    pub(crate) inputs: RenderInputs,
}

type Targets = Arc<std::sync::RwLock<Option<Arc<dyn DeliveryTargets>>>>;

/// The event bus of one outbox database. Cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
    notify: Arc<Notify>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    db: PathBuf,
    store: Db,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("db", &Location::of(&self.db))
            .finish_non_exhaustive()
    }
}

impl EventBus {
    /// A builder for an outbox at `db`: a SQLite file (created if missing; `sqlite:PATH` also
    /// names one) or a PostgreSQL database (`postgres://user@host:port/db`, migrated on start).
    pub fn builder(db: impl AsRef<Path>) -> EventBusBuilder {
        EventBusBuilder {
            db: db.as_ref().to_path_buf(),
            webhooks: Vec::new(),
            secrets: Arc::new(EnvSecrets),
            policy: EgressPolicy::new(),
            extra_roots: Vec::new(),
            resolver: Arc::new(crate::transport::SystemResolver),
            schedule: DEFAULT_RETRY_SCHEDULE.to_vec(),
            jitter: 0.2,
            attempt_timeout: Duration::from_secs(15),
            hold: Duration::from_secs(60),
            disable_after: Duration::from_secs(5 * 86_400),
            retention: Duration::from_secs(30 * 86_400),
            capacity: 65_536,
            deliver: true,
            retry_after_cap: Duration::from_secs(36_000),
        }
    }

    fn prepare(&self, event: &Event, call: &CallInfo) -> Option<NewEvent> {
        let hooks = self.hooks();
        let endpoints: Vec<String> = hooks
            .iter()
            .filter(|h| {
                h.spec.enabled
                    && h.spec.subscriptions.contains(&event.kind)
                    && h.agent.as_ref().is_none_or(|a| *a == call.agent_id)
            })
            .map(|h| h.name.clone())
            .collect();
        if endpoints.is_empty() {
            return None;
        }
        let now = time::now_ms();
        let body = serde_json::to_vec(&event.envelope(call, now)).unwrap_or_default();
        Some(NewEvent {
            event_id: event_id(now),
            kind: event.kind.to_string(),
            call_id: call.id.clone(),
            body,
            endpoints,
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<Msg>, PublishError> {
        let tx = self.inner.tx.lock().map_err(|_| PublishError::Closed)?;
        tx.clone().ok_or(PublishError::Closed)
    }

    /// The webhook endpoints, as of now.
    pub(crate) fn hooks(&self) -> Arc<Vec<Hook>> {
        self.inner
            .webhooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the webhooks with those of `agents` (a reload): events published from now on
    /// go to the new set; a queued delivery whose webhook is gone fails naming it.
    pub fn set_agents(&self, agents: &Agents) {
        *self
            .inner
            .webhooks
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(hooks_of(agents));
        self.notify.notify_one();
    }

    /// Registers the resolver of delivery targets (replacing any earlier one).
    pub(crate) fn register_targets(&self, targets: Arc<dyn DeliveryTargets>) {
        *self
            .inner
            .targets
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(targets);
        self.notify.notify_one();
    }

    /// Enqueues an event for every webhook subscribed to its type and returns at once; it is
    /// committed to the outbox within a few milliseconds. When the channel is full the event is
    /// refused with [`PublishError::Overloaded`] and counted, never dropped silently.
    pub fn publish(&self, event: &Event, call: &CallInfo) -> Result<(), PublishError> {
        let Some(e) = self.prepare(event, call) else {
            return Ok(());
        };
        let tx = self.sender()?;
        match tx.try_send(Msg::Event(e, None)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.inner.overloaded.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("midcall_events_overloaded_total").increment(1);
                Err(PublishError::Overloaded)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PublishError::Closed),
        }
    }

    /// Publishes and returns once the event is committed to the outbox.
    pub async fn publish_durable(
        &self,
        event: &Event,
        call: &CallInfo,
    ) -> Result<(), PublishError> {
        let Some(e) = self.prepare(event, call) else {
            return Ok(());
        };
        let tx = self.sender()?;
        let (done, wait) = oneshot::channel();
        tx.send(Msg::Event(e, Some(done)))
            .await
            .map_err(|_| PublishError::Closed)?;
        wait.await
            .map_err(|_| PublishError::Closed)?
            .map_err(PublishError::Storage)
    }

    /// Events refused because the channel was full, since the bus started.
    pub fn overloaded_count(&self) -> u64 {
        self.inner.overloaded.load(Ordering::Relaxed)
    }

    /// Wakes the delivery task (after a replay, say).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Stops accepting events, commits everything queued and stops delivering. Pending
    /// deliveries stay in the outbox for the next start.
    pub async fn close(&self) {
        let tx = self.inner.tx.lock().ok().and_then(|mut t| t.take());
        drop(tx);
        let writer = self.inner.writer.lock().ok().and_then(|mut w| w.take());
        match writer {
            Some(Writer::Thread(w)) => {
                let _ = tokio::task::spawn_blocking(move || w.join()).await;
            }
            Some(Writer::Task(t)) => {
                let _ = t.await;
            }
            None => {}
        }
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }

    /// The outbox database's path (or `postgres://` URL) as given.
    pub fn db_path(&self) -> &Path {
        &self.db
    }

    /// The store the bus writes (the automations share a PostgreSQL pool with it).
    pub(crate) fn store(&self) -> &Db {
        &self.store
    }

    /// The delivery log of this bus's outbox.
    pub fn log(&self) -> Result<DeliveryLog, String> {
        DeliveryLog::open(&self.db)
    }
}

pub(crate) fn event_id(now: i64) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{now:x}{:x}{n:x}", std::process::id())
}

/// Reads and replays the delivery log of an outbox database (a SQLite file or a
/// `postgres://` URL).
#[derive(Debug)]
pub struct DeliveryLog {
    conn: LogConn,
}

impl DeliveryLog {
    /// Opens an outbox database (a SQLite file must exist).
    pub fn open(db: impl AsRef<Path>) -> Result<DeliveryLog, String> {
        Ok(DeliveryLog {
            conn: LogConn::open(db.as_ref())?,
        })
    }

    /// Deliveries, newest first; optionally one call's, optionally of one status
    /// (`pending`, `delivered`, `failed`, `skipped`).
    pub fn deliveries(
        &self,
        call: Option<&str>,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<super::DeliveryRecord>, String> {
        self.conn.deliveries(call, status, limit as i64)
    }

    /// The attempts of one delivery, oldest first.
    pub fn attempts(&self, delivery: i64) -> Result<Vec<super::AttemptRecord>, String> {
        self.conn.attempts(delivery)
    }

    /// Makes one delivery due again. Returns how many (0 or 1).
    pub fn replay_id(&mut self, id: i64) -> Result<usize, String> {
        self.conn.replay(Some(id), None, None, time::now_ms())
    }

    /// Whether a delivery with this id is in the log.
    pub fn contains(&self, id: i64) -> Result<bool, String> {
        self.conn.contains(id)
    }

    /// Deletes delivered deliveries finished before `before_ms` (with their attempts and
    /// events), and automation runs finished before it that no delivery refers to, at most
    /// `batch` of each. The delivery task does this for the retention window.
    pub fn purge_delivered(&mut self, before_ms: i64, batch: usize) -> Result<usize, String> {
        self.conn.purge(before_ms, batch as i64)
    }

    /// Makes every delivery of `status` published since `since_ms` due again.
    pub fn replay_since(&mut self, since_ms: i64, status: &str) -> Result<usize, String> {
        self.conn
            .replay(None, Some(since_ms), Some(status), time::now_ms())
    }
}

struct Worker {
    db: Db,
    transport: Transport,
    secrets: Arc<dyn SecretSource>,
    webhooks: Hooks,
    targets: Targets,
    schedule: Vec<Duration>,
    jitter: f64,
    attempt_timeout: Duration,
    hold: Duration,
    disable_after: Duration,
    retention: Duration,
    retry_after_cap: Duration,
    notify: Arc<Notify>,
    /// Per-endpoint token buckets of webhooks with `max_per_second`.
    throttle: Mutex<std::collections::HashMap<String, Bucket>>,
}

impl Worker {
    /// Splits claimed deliveries into those sent now and those a throttled endpoint has no
    /// token for, each with the time it is due again (spread at the endpoint's rate).
    fn throttled(&self, claimed: Vec<Claimed>) -> (Vec<Claimed>, Vec<(i64, i64)>) {
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

    fn ok<T>(r: Result<T, StoreError>) -> Option<T> {
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
    fn lease(&self) -> Duration {
        self.attempt_timeout
            + self
                .attempt_timeout
                .clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    async fn run(self) {
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

    async fn deliver(&self, c: Claimed) -> (Claimed, Attempt, Next) {
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
    async fn retry(&self, c: &Claimed, retry_after: Option<Duration>) -> Next {
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

    async fn attempt(
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
struct Bucket {
    tokens: f64,
    at: tokio::time::Instant,
    next_slot_ms: i64,
}

/// Where a delivery goes: a webhook's or an automation step's templates.
struct Target<'a> {
    url: &'a UrlTemplate,
    headers: &'a [(String, Template)],
    signing_secret: Option<&'a Template>,
    signing_key: Option<&'a Template>,
}

/// A number in [0, 1) from a seed (splitmix64): enough to spread retries.
fn unit_random(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}
