//! The PostgreSQL engine: the same tables as the SQLite file, shared by every process of a
//! fleet. Claims take rows with `FOR UPDATE SKIP LOCKED` and mark them with a lease and the
//! claiming process (so two workers never send one attempt, and a dead worker's claims are
//! taken over when its lease runs out); `NOTIFY` after every insert wakes idle workers of every
//! process. Migrations run under an advisory lock, so processes starting together on an empty
//! database migrate it once.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};

mod outbox;
mod query;
mod runs;

use super::StoreError;
use crate::template::redact_url;

/// The channel `NOTIFY` uses after events are stored.
const OUTBOX_CHANNEL: &str = "midcall_outbox";
/// The channel `NOTIFY` uses after runs are queued.
const RUNS_CHANNEL: &str = "midcall_runs";
/// The advisory lock migrations hold (any constant; "midcall" in ASCII).
const MIGRATION_LOCK: i64 = 0x006d_6964_6361_6c6c;

/// Schema version 1 of the PostgreSQL engine: the SQLite tables, with a lease owner on
/// deliveries and runs (many processes claim from one database) and an insertion order for runs.
const SCHEMA_V1: &str = r#"
CREATE TABLE IF NOT EXISTS events (
    seq BIGSERIAL PRIMARY KEY,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    call_id TEXT NOT NULL,
    body BYTEA NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id BIGSERIAL PRIMARY KEY,
    event_seq BIGINT NOT NULL REFERENCES events(seq),
    endpoint TEXT NOT NULL,
    call_id TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    due_ms BIGINT NOT NULL,
    lease_ms BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    created_ms BIGINT NOT NULL,
    done_ms BIGINT,
    last_error TEXT,
    target TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(status, due_ms);
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries(endpoint, call_id, status, event_seq);
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries(event_seq);
CREATE TABLE IF NOT EXISTS attempts (
    id BIGSERIAL PRIMARY KEY,
    delivery_id BIGINT NOT NULL REFERENCES deliveries(id),
    at_ms BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    status_code INTEGER,
    error TEXT,
    response_prefix BYTEA
);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts(delivery_id);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    ord BIGSERIAL,
    automation TEXT NOT NULL,
    trigger TEXT NOT NULL,
    call_id TEXT,
    status TEXT NOT NULL,
    context BYTEA NOT NULL,
    created_ms BIGINT NOT NULL,
    started_ms BIGINT,
    finished_ms BIGINT,
    error TEXT,
    lease_ms BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, created_ms);
CREATE TABLE IF NOT EXISTS run_steps (
    run_id TEXT NOT NULL REFERENCES runs(id),
    idx BIGINT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS inbound_seen (
    webhook_id TEXT PRIMARY KEY,
    at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoints (
    endpoint TEXT PRIMARY KEY,
    disabled INTEGER NOT NULL DEFAULT 0,
    disabled_reason TEXT,
    last_success_ms BIGINT,
    failing_since_ms BIGINT
);
"#;

/// Every schema version of this engine, oldest first. Add to the end; never edit one that
/// has shipped.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "the outbox, delivery log, run log and inbound replay tables",
    SCHEMA_V1,
)];

/// The schema version this build writes and reads.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// An error from PostgreSQL, and whether trying again later may succeed (the server is down,
/// restarting or unreachable) or not (the statement itself failed).
#[derive(Debug)]
pub(crate) struct PgError {
    pub(crate) message: String,
    pub(crate) transient: bool,
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        let transient = match e.code() {
            None => true,
            // Class 08 (connection exception), 57P (operator intervention: shutdown,
            // restart), 53 (insufficient resources), 40001/40P01 (retry the transaction).
            Some(c) => {
                let c = c.code();
                c.starts_with("08")
                    || c.starts_with("57P")
                    || c.starts_with("53")
                    || c == "40001"
                    || c == "40P01"
            }
        };
        let message = match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(inner) = src {
                    s.push_str(": ");
                    s.push_str(&inner.to_string());
                    src = inner.source();
                }
                s
            }
        };
        PgError { message, transient }
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            e => PgError {
                message: e.to_string(),
                transient: true,
            },
        }
    }
}

type R<T> = Result<T, PgError>;

/// Wakes for the two channels, fed by one listening connection per [`Pg`].
#[derive(Debug, Default)]
pub(crate) struct Wakes {
    pub(crate) outbox: Notify,
    pub(crate) runs: Notify,
}

/// A pool of connections to one PostgreSQL database. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Pg {
    pool: Pool,
    config: Arc<tokio_postgres::Config>,
    shown: Arc<str>,
    /// This process's claims are marked with it.
    owner: Arc<str>,
    wakes: Arc<Wakes>,
    listening: Arc<std::sync::Once>,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

impl Pg {
    /// A pool for `url` that connects on first use (each connection within 5 s). No I/O
    /// here; errors name the URL with its password hidden.
    pub(crate) fn new(url: &str) -> Result<Pg, StoreError> {
        let shown: Arc<str> = redact_url(url).into();
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::new(format!("{shown}: not a PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("midcall");
        }
        let mgr = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(8)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::new(format!("{shown}: {e}")))?;
        Ok(Pg {
            pool,
            config: Arc::new(config),
            owner: format!("{}-{:x}", std::process::id(), crate::time::now_ms()).into(),
            shown,
            wakes: Arc::new(Wakes::default()),
            listening: Arc::new(std::sync::Once::new()),
        })
    }

    /// Connects and brings the schema up to date; the error names the database.
    pub(crate) async fn migrate_checked(&self) -> Result<(), StoreError> {
        self.migrate().await.map_err(|e| StoreError {
            message: format!("outbox: {}: {}", self.shown, e.message),
            transient: e.transient,
        })
    }

    /// The wakes of this database, with a task listening for them (started on first use, in
    /// the current runtime; it reconnects with backoff and wakes every waiter after it does,
    /// since a notification may have been missed meanwhile).
    pub(crate) fn wakes(&self) -> Arc<Wakes> {
        self.listening.call_once(|| {
            tokio::spawn(listen((*self.config).clone(), self.wakes.clone()));
        });
        self.wakes.clone()
    }

    async fn migrate(&self) -> R<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL, migrated_ms BIGINT NOT NULL)",
        )
        .await?;
        let current: i64 = tx
            .query_opt("SELECT version FROM schema_version WHERE id = 1", &[])
            .await?
            .map(|r| r.get(0))
            .unwrap_or(0);
        if current > SCHEMA_VERSION {
            return Err(PgError {
                message: format!("schema version {current} was written by a newer midcall; this one knows up to {SCHEMA_VERSION}: upgrade midcall, or point it at another database"),
                transient: false,
            });
        }
        for (version, what, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql).await.map_err(|e| {
                let e = PgError::from(e);
                PgError {
                    message: format!(
                        "migrating to schema version {version} ({what}): {}",
                        e.message
                    ),
                    transient: false,
                }
            })?;
        }
        if current < SCHEMA_VERSION {
            tx.execute(
                "INSERT INTO schema_version (id, version, migrated_ms) VALUES (1, $1, $2) ON CONFLICT (id) DO UPDATE SET version = excluded.version, migrated_ms = excluded.migrated_ms",
                &[&SCHEMA_VERSION, &crate::time::now_ms()],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // ---- the outbox ----
}

/// Listens on both channels on a connection of its own; reconnects with backoff.
async fn listen(config: tokio_postgres::Config, wakes: Arc<Wakes>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Ok((client, mut conn)) = config.connect(NoTls).await {
            let w = wakes.clone();
            let driver = tokio::spawn(async move {
                while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    match m {
                        Ok(AsyncMessage::Notification(n)) => {
                            if n.channel() == RUNS_CHANNEL {
                                w.runs.notify_one();
                            } else {
                                w.outbox.notify_one();
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            if client
                .batch_execute(&format!("LISTEN {OUTBOX_CHANNEL}; LISTEN {RUNS_CHANNEL}"))
                .await
                .is_ok()
            {
                backoff = Duration::from_millis(100);
                // Anything stored while no one listened is found now.
                wakes.outbox.notify_one();
                wakes.runs.notify_one();
            }
            let _ = driver.await;
            drop(client);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// A [`Pg`] with a runtime of its own, for the synchronous logs ([`crate::events::DeliveryLog`],
/// [`crate::RunLog`]): each call runs on a scoped thread, so it works inside or outside a tokio
/// runtime alike.
pub(crate) struct PgBlocking {
    rt: Option<tokio::runtime::Runtime>,
    pg: Pg,
}

impl std::fmt::Debug for PgBlocking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.pg.fmt(f)
    }
}

impl PgBlocking {
    pub(crate) fn connect(url: &str) -> Result<PgBlocking, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StoreError::new)?;
        let pg = match std::thread::scope(|s| {
            s.spawn(|| {
                rt.block_on(async {
                    let pg = Pg::new(url)?;
                    pg.migrate_checked().await?;
                    Ok(pg)
                })
            })
            .join()
            .unwrap_or_else(|_| Err(StoreError::new("postgres: the connecting thread failed")))
        }) {
            Ok(pg) => pg,
            Err(e) => {
                // Dropping a runtime inside another's context panics; this does not.
                rt.shutdown_background();
                return Err(e);
            }
        };
        Ok(PgBlocking { rt: Some(rt), pg })
    }

    pub(crate) fn block<'a, T: Send, F>(
        &'a self,
        f: impl Fn(&'a Pg) -> F + Send + Sync,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = R<T>> + Send + 'a,
    {
        let Some(rt) = &self.rt else {
            return Err(StoreError::new("postgres: closed"));
        };
        let pg = &self.pg;
        std::thread::scope(|s| {
            s.spawn(|| {
                rt.block_on(async {
                    // A pooled connection the server closed (a restart) is found dead only
                    // when used: once more, on a new one.
                    match f(pg).await {
                        Err(e) if e.transient => f(pg).await,
                        r => r,
                    }
                })
            })
            .join()
            .unwrap_or_else(|_| {
                Err(PgError {
                    message: "the query thread failed".into(),
                    transient: false,
                })
            })
        })
        .map_err(StoreError::from)
    }
}

impl Drop for PgBlocking {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Dropping a runtime inside another's context panics; this does not.
            rt.shutdown_background();
        }
    }
}
