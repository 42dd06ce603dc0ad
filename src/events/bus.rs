//! Publishing and delivery. `publish` only enqueues into a bounded channel; a writer (a thread
//! for SQLite, a task for PostgreSQL) group-commits batches to the outbox; a delivery task
//! claims due deliveries, POSTs them signed, records every attempt and schedules the next.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use super::{time, Event};
use crate::config::Agents;
use crate::config::{ActionSet, WebhookSpec};
use crate::state::CallInfo;
use crate::store::sqlite::{self, outbox};
use crate::store::{Db, Location, NewEvent, StoreError};
use crate::template::{EnvSecrets, RenderInputs, SecretSource, Template, UrlTemplate};
use crate::transport::{EgressPolicy, Transport, TransportConfig};

use super::deliver::Worker;
use super::DeliveryLog;

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

/// Why an event bus could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// An extra root certificate is unusable (the caller's configuration).
    #[error("{0}")]
    Roots(crate::transport::SetupError),
    /// The outbox could not be opened or migrated (see [`StoreError::is_transient`]).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Built outside a tokio runtime where one is needed (the caller's mistake).
    #[error("{0}")]
    NoRuntime(String),
    /// The writer thread could not be started (the machine's resources).
    #[error("the outbox writer thread: {0}")]
    Thread(String),
}

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

pub(super) enum Msg {
    Event(NewEvent, Option<oneshot::Sender<Result<(), String>>>),
}

/// Builds an [`EventBus`]. Every setting has a default, given on its method.
#[derive(Clone)]
pub struct EventBusBuilder {
    pub(super) db: PathBuf,
    pub(super) webhooks: Vec<Hook>,
    pub(super) secrets: Arc<dyn SecretSource>,
    pub(super) policy: EgressPolicy,
    pub(super) extra_roots: Vec<Vec<u8>>,
    pub(super) resolver: Arc<dyn crate::transport::Resolve>,
    pub(super) schedule: Vec<Duration>,
    pub(super) jitter: f64,
    pub(super) attempt_timeout: Duration,
    pub(super) hold: Duration,
    pub(super) disable_after: Duration,
    pub(super) retention: Duration,
    pub(super) capacity: usize,
    pub(super) deliver: bool,
    pub(super) retry_after_cap: Duration,
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
    pub fn add_root_certificates_pem(mut self, pem: &[u8]) -> Result<Self, BusError> {
        let certs = crate::transport::pem_certificates(pem).map_err(BusError::Roots)?;
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
    pub fn build(self) -> Result<EventBus, BusError> {
        self.build_with(None)
    }

    /// Builds on `transport` (the runtime's pool) when given.
    pub(crate) fn build_with(self, shared: Option<Transport>) -> Result<EventBus, BusError> {
        if self.deliver && tokio::runtime::Handle::try_current().is_err() {
            return Err(BusError::NoRuntime(
                "the event bus must be built inside a tokio runtime to deliver".into(),
            ));
        }
        let location = Location::of(&self.db);
        let db = Db::open(&location)?;
        let (tx, rx) = mpsc::channel::<Msg>(self.capacity);
        let notify = Arc::new(Notify::new());
        let writer = match &db {
            Db::Sqlite(_, path) => {
                let conn = sqlite::open(path)?;
                let n2 = notify.clone();
                Writer::Thread(
                    std::thread::Builder::new()
                        .name("midcall-outbox".into())
                        .spawn(move || write_sqlite(conn, rx, n2))
                        .map_err(|e| BusError::Thread(e.to_string()))?,
                )
            }
            Db::Postgres(pg) => {
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(BusError::NoRuntime(format!(
                        "{}: an event bus on PostgreSQL must be built inside a tokio runtime",
                        location.shown()
                    )));
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
            None => Transport::new(transport).map_err(BusError::Roots)?,
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

pub(super) type Hooks = Arc<std::sync::RwLock<Arc<Vec<Hook>>>>;

/// The webhooks of `agents`, named as [`Agents::name`] stores them.
pub(super) fn hooks_of(agents: &Agents) -> Vec<Hook> {
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

pub(super) struct Inner {
    pub(super) tx: Mutex<Option<mpsc::Sender<Msg>>>,
    pub(super) overloaded: AtomicU64,
    pub(super) webhooks: Hooks,
    pub(super) writer: Mutex<Option<Writer>>,
    pub(super) targets: Targets,
}

pub(super) enum Writer {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

/// Group commit: everything queued while the last commit ran goes in the next.
pub(super) fn next_batch(first: Msg, rx: &mut mpsc::Receiver<Msg>) -> Vec<Msg> {
    let mut batch = vec![first];
    while batch.len() < 4096 {
        match rx.try_recv() {
            Ok(m) => batch.push(m),
            Err(_) => break,
        }
    }
    batch
}

pub(super) fn answer(batch: Vec<Msg>, result: Result<(), String>) {
    if result.is_err() {
        metrics::counter!("midcall_events_write_errors_total").increment(batch.len() as u64);
    }
    for Msg::Event(_, done) in batch {
        if let Some(done) = done {
            let _ = done.send(result.clone());
        }
    }
}

pub(super) fn write_sqlite(
    mut conn: rusqlite::Connection,
    mut rx: mpsc::Receiver<Msg>,
    notify: Arc<Notify>,
) {
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
pub(super) async fn write_pg(
    pg: crate::store::pg::Pg,
    mut rx: mpsc::Receiver<Msg>,
    notify: Arc<Notify>,
) {
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

pub(super) type Targets = Arc<std::sync::RwLock<Option<Arc<dyn DeliveryTargets>>>>;

/// The event bus of one outbox database. Cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    pub(super) inner: Arc<Inner>,
    pub(super) notify: Arc<Notify>,
    pub(super) task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    pub(super) db: PathBuf,
    pub(super) store: Db,
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
    pub fn log(&self) -> Result<DeliveryLog, StoreError> {
        DeliveryLog::open(&self.db)
    }
}

pub(crate) fn event_id(now: i64) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{now:x}{:x}{n:x}", std::process::id())
}
