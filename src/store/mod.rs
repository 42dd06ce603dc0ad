//! The durable schema shared by the event outbox, the delivery log, the automation run log and
//! inbound replay protection, on one of two engines chosen by the `--db` value: a SQLite file
//! (WAL, synchronous=FULL; the default, nothing to install) or a PostgreSQL database shared by
//! every process of a fleet ([`pg`]). The modules that use it own their SQLite queries; the
//! PostgreSQL ones are in [`pg`]; [`Db`] is the one interface the bus and the automations use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub(crate) mod pg;
pub(crate) mod query;

use crate::automation::runlog::{self, ClaimedRun, NewRun, RunRecord, StepRecord};
use crate::events::outbox::{
    self, Attempt, AttemptRecord, Claimed, DeliveryRecord, NewEvent, Next,
};

/// Where the durable state lives, read from a `--db` value: `postgres://...` (or
/// `postgresql://...`) is a PostgreSQL database; `sqlite:PATH` or any other value is a SQLite
/// file.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

impl Location {
    pub(crate) fn of(db: &Path) -> Location {
        let s = db.to_string_lossy();
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Location::Postgres(s.into_owned())
        } else if let Some(path) = s.strip_prefix("sqlite:") {
            Location::Sqlite(PathBuf::from(path.strip_prefix("//").unwrap_or(path)))
        } else {
            Location::Sqlite(db.to_path_buf())
        }
    }

    /// How messages name it (a password hidden).
    pub(crate) fn shown(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(u) => pg::redact_url(u),
        }
    }
}

/// Runs `f` on a scoped thread with a runtime of its own: for the synchronous entry points
/// (building a bus, opening a log) that must reach PostgreSQL inside or outside a runtime.
pub(crate) fn on_own_runtime<T: Send>(
    f: impl std::future::Future<Output = Result<T, OutboxError>> + Send,
) -> Result<T, OutboxError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| OutboxError(e.to_string()))?;
            let out = rt.block_on(f);
            rt.shutdown_background();
            out
        })
        .join()
        .unwrap_or_else(|_| Err(OutboxError("the database thread failed".into())))
    })
}

/// The durable store the bus and the automations use: one SQLite connection (each call on a
/// blocking thread) and the file's path, or a PostgreSQL pool. Cheap to clone.
#[derive(Clone)]
pub(crate) enum Db {
    Sqlite(Arc<Mutex<Connection>>, Arc<Path>),
    Postgres(pg::Pg),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::Sqlite(..) => f.write_str("Db::Sqlite"),
            Db::Postgres(p) => p.fmt(f),
        }
    }
}

async fn blocking<T: Send + 'static>(
    conn: &Arc<Mutex<Connection>>,
    f: impl FnOnce(&mut Connection) -> Result<T, OutboxError> + Send + 'static,
) -> Result<T, OutboxError> {
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut c)
    })
    .await
    .map_err(|e| OutboxError(e.to_string()))?
}

impl Db {
    /// Opens the store (SQLite: a new connection; PostgreSQL: a pool that connects on first
    /// use; both migrated first). Synchronous: PostgreSQL is reached on a thread of its own.
    pub(crate) fn open(loc: &Location) -> Result<Db, OutboxError> {
        match loc {
            Location::Sqlite(p) => Ok(Db::Sqlite(
                Arc::new(Mutex::new(open(p)?)),
                Arc::from(p.as_path()),
            )),
            Location::Postgres(url) => {
                let url2 = url.clone();
                on_own_runtime(async move {
                    let pg = pg::Pg::new(&url2)?;
                    pg.migrate_checked().await
                })?;
                Ok(Db::Postgres(pg::Pg::new(url)?))
            }
        }
    }

    /// Another handle on the same store (SQLite: its own connection, so the two never wait
    /// on one lock; PostgreSQL: the same pool).
    pub(crate) fn reopen(&self) -> Result<Db, OutboxError> {
        match self {
            Db::Postgres(p) => Ok(Db::Postgres(p.clone())),
            Db::Sqlite(_, path) => Db::open(&Location::Sqlite(path.to_path_buf())),
        }
    }

    pub(crate) fn pg(&self) -> Option<&pg::Pg> {
        match self {
            Db::Postgres(p) => Some(p),
            Db::Sqlite(..) => None,
        }
    }

    pub(crate) async fn claim(
        &self,
        now: i64,
        lease_ms: i64,
        hold_ms: i64,
        limit: i64,
    ) -> Result<Vec<Claimed>, OutboxError> {
        match self {
            Db::Sqlite(c, _) => {
                blocking(c, move |c| outbox::claim(c, now, lease_ms, hold_ms, limit)).await
            }
            Db::Postgres(p) => Ok(p.claim(now, lease_ms, hold_ms, limit).await?),
        }
    }

    pub(crate) async fn renew(&self, ids: Vec<i64>, until: i64) -> Result<(), OutboxError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| outbox::renew(c, &ids, until)).await,
            Db::Postgres(p) => Ok(p.renew(&ids, until).await?),
        }
    }

    pub(crate) async fn next_due(&self) -> Result<Option<i64>, OutboxError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, |c| outbox::next_due(c)).await,
            Db::Postgres(p) => Ok(p.next_due().await?),
        }
    }

    pub(crate) async fn record_batch(
        &self,
        batch: Vec<(Claimed, Attempt, Next)>,
    ) -> Result<(), OutboxError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| outbox::record_batch(c, &batch)).await,
            Db::Postgres(p) => Ok(p.record_batch(&batch).await?),
        }
    }

    pub(crate) async fn failing_since(&self, endpoint: String) -> Result<Option<i64>, OutboxError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| outbox::failing_since(c, &endpoint)).await,
            Db::Postgres(p) => Ok(p.failing_since(&endpoint).await?),
        }
    }

    pub(crate) async fn purge(&self, before_ms: i64, batch: i64) -> Result<usize, OutboxError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| outbox::purge(c, before_ms, batch)).await,
            Db::Postgres(p) => Ok(p.purge(before_ms, batch).await?),
        }
    }

    pub(crate) async fn insert_runs(
        &self,
        runs: Vec<OwnedRun>,
        now: i64,
    ) -> Result<(), OutboxError> {
        match self {
            Db::Sqlite(c, _) => {
                blocking(c, move |c| {
                    let runs: Vec<NewRun<'_>> = runs.iter().map(OwnedRun::borrow).collect();
                    runlog::insert(c, &runs, now)
                })
                .await
            }
            Db::Postgres(p) => {
                let runs: Vec<NewRun<'_>> = runs.iter().map(OwnedRun::borrow).collect();
                Ok(p.insert_runs(&runs, now).await?)
            }
        }
    }

    pub(crate) async fn insert_run_once(
        &self,
        run: OwnedRun,
        webhook_id: Option<String>,
        window_ms: i64,
        now: i64,
    ) -> Result<bool, OutboxError> {
        match self {
            Db::Sqlite(c, _) => {
                blocking(c, move |c| {
                    runlog::insert_once(c, &run.borrow(), webhook_id.as_deref(), window_ms, now)
                })
                .await
            }
            Db::Postgres(p) => Ok(p
                .insert_run_once(&run.borrow(), webhook_id.as_deref(), window_ms, now)
                .await?),
        }
    }

    /// Takes up to `limit` runs. SQLite (one process) re-queues runs left running at start
    /// instead of leasing them, so `lease_ms` is PostgreSQL's.
    pub(crate) async fn claim_runs(
        &self,
        now: i64,
        limit: i64,
        lease_ms: i64,
    ) -> Result<Vec<ClaimedRun>, OutboxError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| runlog::claim(c, now, limit)).await,
            Db::Postgres(p) => Ok(p.claim_runs(now, limit, lease_ms).await?),
        }
    }

    pub(crate) async fn renew_run(&self, id: String, until: i64) -> Result<(), OutboxError> {
        match self {
            Db::Sqlite(..) => Ok(()),
            Db::Postgres(p) => Ok(p.renew_run(&id, until).await?),
        }
    }

    /// At start: SQLite queues again the runs a stopped process left running (it was the only
    /// process); PostgreSQL leaves them to their leases (another process may be running them).
    /// Synchronous: called once, when the automations start.
    pub(crate) fn requeue_running(&self) -> Result<usize, OutboxError> {
        match self {
            Db::Sqlite(c, _) => {
                runlog::requeue_running(&c.lock().unwrap_or_else(|e| e.into_inner()))
            }
            Db::Postgres(_) => Ok(0),
        }
    }

    pub(crate) async fn record_step(
        &self,
        run: String,
        step: StepRecord,
        delivery: Option<(NewEvent, String)>,
        new_context: Option<Vec<u8>>,
        now: i64,
    ) -> Result<Option<i64>, OutboxError> {
        match self {
            Db::Sqlite(c, _) => {
                blocking(c, move |c| {
                    let d = delivery.as_ref().map(|(e, t)| (e, t.as_str()));
                    runlog::record_step(c, &run, &step, d, new_context.as_deref(), now)
                })
                .await
            }
            Db::Postgres(p) => {
                let d = delivery.as_ref().map(|(e, t)| (e, t.as_str()));
                Ok(p.record_step(&run, &step, d, new_context.as_deref(), now)
                    .await?)
            }
        }
    }

    pub(crate) async fn finish_run(
        &self,
        run: String,
        error: Option<String>,
        now: i64,
    ) -> Result<(), OutboxError> {
        match self {
            Db::Sqlite(c, _) => {
                blocking(c, move |c| runlog::finish(c, &run, error.as_deref(), now)).await
            }
            Db::Postgres(p) => Ok(p.finish_run(&run, error.as_deref(), now).await?),
        }
    }

    pub(crate) async fn unfinished(&self) -> Result<i64, OutboxError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, |c| runlog::unfinished(c)).await,
            Db::Postgres(p) => Ok(p.unfinished().await?),
        }
    }
}

/// A queued run that owns its fields (to cross onto a blocking thread).
pub(crate) struct OwnedRun {
    pub(crate) id: String,
    pub(crate) automation: String,
    pub(crate) trigger: &'static str,
    pub(crate) call_id: Option<String>,
    pub(crate) context: Vec<u8>,
}

impl OwnedRun {
    fn borrow(&self) -> NewRun<'_> {
        NewRun {
            id: &self.id,
            automation: &self.automation,
            trigger: self.trigger,
            call_id: self.call_id.as_deref(),
            context: &self.context,
        }
    }
}

/// A synchronous handle for the logs and the CLI: a SQLite connection or a PostgreSQL pool
/// with a runtime of its own.
#[derive(Debug)]
pub(crate) enum LogConn {
    Sqlite(Connection),
    Postgres(Box<pg::PgBlocking>),
}

impl LogConn {
    /// Opens an existing store (a SQLite file must exist; the logs never create one).
    pub(crate) fn open(db: &Path) -> Result<LogConn, String> {
        match Location::of(db) {
            Location::Sqlite(p) => Ok(LogConn::Sqlite(open_existing(&p)?)),
            Location::Postgres(url) => {
                Ok(LogConn::Postgres(Box::new(pg::PgBlocking::connect(&url)?)))
            }
        }
    }

    pub(crate) fn deliveries(
        &self,
        call: Option<&str>,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>, String> {
        let filter = query::DeliveryFilter {
            call_id: call.map(str::to_string),
            status: status.map(str::to_string),
            limit,
            ..Default::default()
        };
        match self {
            LogConn::Sqlite(c) => query::deliveries(c, &filter).map_err(|e| e.to_string()),
            LogConn::Postgres(p) => p.block(|pg| pg.find_deliveries(&filter)),
        }
    }

    pub(crate) fn attempts(&self, delivery: i64) -> Result<Vec<AttemptRecord>, String> {
        match self {
            LogConn::Sqlite(c) => outbox::attempts(c, delivery).map_err(|e| e.to_string()),
            LogConn::Postgres(p) => p.block(|pg| pg.attempts(delivery)),
        }
    }

    pub(crate) fn replay(
        &mut self,
        id: Option<i64>,
        since_ms: Option<i64>,
        status: Option<&str>,
        now: i64,
    ) -> Result<usize, String> {
        match self {
            LogConn::Sqlite(c) => {
                outbox::replay(c, id, since_ms, status, None, now).map_err(|e| e.to_string())
            }
            LogConn::Postgres(p) => p.block(|pg| pg.replay(id, since_ms, status, None, now)),
        }
    }

    pub(crate) fn contains(&self, id: i64) -> Result<bool, String> {
        match self {
            LogConn::Sqlite(c) => c
                .prepare_cached("SELECT 1 FROM deliveries WHERE id = ?1")
                .and_then(|mut s| s.exists([id]))
                .map_err(|e| e.to_string()),
            LogConn::Postgres(p) => p.block(|pg| pg.contains(id)),
        }
    }

    pub(crate) fn purge(&mut self, before_ms: i64, batch: i64) -> Result<usize, String> {
        match self {
            LogConn::Sqlite(c) => outbox::purge(c, before_ms, batch).map_err(|e| e.to_string()),
            LogConn::Postgres(p) => p.block(|pg| pg.purge(before_ms, batch)),
        }
    }

    pub(crate) fn runs(
        &self,
        id: Option<&str>,
        automation: Option<&str>,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunRecord>, String> {
        match self {
            LogConn::Sqlite(c) => {
                runlog::query(c, id, automation, status, limit).map_err(|e| e.to_string())
            }
            LogConn::Postgres(p) => p.block(|pg| pg.runs(id, automation, status, limit)),
        }
    }
}

/// An error from the outbox database.
#[derive(Debug, thiserror::Error)]
#[error("outbox: {0}")]
pub struct OutboxError(pub(crate) String);

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        OutboxError(e.to_string())
    }
}

/// Schema version 1, every table: events, deliveries, attempts and endpoints (the outbox);
/// runs and run_steps (the run log); inbound_seen (replay protection). `IF NOT EXISTS`, so it
/// also adopts a database made before versions were kept.
const SCHEMA_V1: &str = r#"
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    call_id TEXT NOT NULL,
    body BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_seq INTEGER NOT NULL REFERENCES events(seq),
    endpoint TEXT NOT NULL,
    call_id TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_ms INTEGER NOT NULL,
    lease_ms INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    done_ms INTEGER,
    last_error TEXT,
    target TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(status, due_ms);
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries(endpoint, call_id, status, event_seq);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id INTEGER NOT NULL REFERENCES deliveries(id),
    at_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    status_code INTEGER,
    error TEXT,
    response_prefix BLOB
);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts(delivery_id);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    automation TEXT NOT NULL,
    trigger TEXT NOT NULL,
    call_id TEXT,
    status TEXT NOT NULL,
    context BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, created_ms);
CREATE TABLE IF NOT EXISTS run_steps (
    run_id TEXT NOT NULL REFERENCES runs(id),
    idx INTEGER NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS inbound_seen (
    webhook_id TEXT PRIMARY KEY,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoints (
    endpoint TEXT PRIMARY KEY,
    disabled INTEGER NOT NULL DEFAULT 0,
    disabled_reason TEXT,
    last_success_ms INTEGER,
    failing_since_ms INTEGER
);
"#;

/// Opens (and creates) an outbox database with WAL and synchronous=FULL.
pub(crate) fn open(path: &Path) -> Result<Connection, OutboxError> {
    open_at(path).map_err(|e| {
        let why = e.0.strip_prefix("outbox: ").unwrap_or(&e.0).to_string();
        if why.contains("not a database") {
            OutboxError(format!(
                "{} is not an outbox database (a SQLite file midcall made): {why}",
                path.display()
            ))
        } else {
            OutboxError(format!("{}: {why}", path.display()))
        }
    })
}

/// One step of the schema, applied once, in order, inside the migrating transaction.
struct Migration {
    version: i64,
    what: &'static str,
    apply: fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
}

/// Every schema version this build knows, oldest first. Add to the end; never edit one that
/// has shipped.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        what: "the outbox, delivery log, run log and inbound replay tables",
        apply: |tx| tx.execute_batch(SCHEMA_V1),
    },
    Migration {
        version: 2,
        what: "deliveries.target (automation steps' deliveries)",
        apply: |tx| {
            // Version 1 as written already has it; a database from before automations
            // (adopted as version 1) does not.
            let has: bool = tx
                .prepare("SELECT 1 FROM pragma_table_info('deliveries') WHERE name = 'target'")?
                .exists([])?;
            if !has {
                tx.execute_batch("ALTER TABLE deliveries ADD COLUMN target TEXT")?;
            }
            Ok(())
        },
    },
];

/// The schema version this build writes and reads.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

fn open_at(path: &Path) -> Result<Connection, OutboxError> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Brings the database to [`SCHEMA_VERSION`] in one write transaction (`BEGIN IMMEDIATE`: of
/// several processes opening an empty file at once, one migrates and the others wait for it,
/// then find nothing to do); refuses a database a newer midcall wrote.
fn migrate(conn: &mut Connection) -> Result<(), OutboxError> {
    let tx = write_tx(conn)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, migrated_ms INTEGER NOT NULL)",
    )?;
    let current: i64 = tx
        .query_row("SELECT version FROM schema_version WHERE id = 1", [], |r| {
            r.get(0)
        })
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(0),
            e => Err(e),
        })?;
    if current > SCHEMA_VERSION {
        return Err(OutboxError(format!(
            "schema version {current} was written by a newer midcall; this one knows up to {SCHEMA_VERSION}: upgrade midcall, or point it at another database"
        )));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        (m.apply)(&tx).map_err(|e| {
            OutboxError(format!(
                "migrating to schema version {} ({}): {e}",
                m.version, m.what
            ))
        })?;
    }
    if current < SCHEMA_VERSION {
        tx.execute(
            "INSERT INTO schema_version (id, version, migrated_ms) VALUES (1, ?1, ?2) ON CONFLICT(id) DO UPDATE SET version = excluded.version, migrated_ms = excluded.migrated_ms",
            rusqlite::params![SCHEMA_VERSION, crate::events::time::now_ms()],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// Opens an outbox database that must already exist (the logs read one; they never create it).
pub(crate) fn open_existing(path: &Path) -> Result<Connection, String> {
    if !path.exists() {
        return Err(format!("{}: no such outbox database", path.display()));
    }
    open(path).map_err(|e| e.to_string())
}

/// A write transaction that takes the write lock when it begins (SQLite `BEGIN IMMEDIATE`), so
/// the busy timeout applies: a deferred one that reads first can fail at once with "database
/// is locked" when another connection committed in between.
pub(crate) fn write_tx(conn: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}
