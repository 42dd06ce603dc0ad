//! Every SQL statement and record type of midcall, on one of two engines chosen by the `--db`
//! value: a SQLite file ([`sqlite`]: WAL, synchronous=FULL; the default, nothing to install) or
//! a PostgreSQL database shared by every process of a fleet ([`pg`]). It holds the event
//! outbox, the delivery log, the automation run log and inbound replay protection; [`Db`] is
//! the one interface the bus and the automations use, [`LogConn`] the synchronous one of the
//! logs and the CLI, [`query`] what the operator API reads and changes, [`records`] the rows.
//!
//! May call: `config`, `template`, `time` and the leaves below them; never `events`,
//! `automation` or anything above (they call it).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub(crate) mod pg;
pub(crate) mod query;
pub(crate) mod records;
pub(crate) mod sqlite;

pub(crate) use records::{
    Attempt, Claimed, ClaimedRun, NewEvent, NewRun, Next, OwnedRun, TargetRef,
};
pub use records::{AttemptRecord, DeliveryRecord, RunRecord, StepRecord};
use sqlite::{open, open_existing, outbox, runs as runlog};

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
            Location::Postgres(u) => crate::template::redact_url(u),
        }
    }
}

/// Runs `f` on a scoped thread with a runtime of its own: for the synchronous entry points
/// (building a bus, opening a log) that must reach PostgreSQL inside or outside a runtime.
pub(crate) fn on_own_runtime<T: Send>(
    f: impl std::future::Future<Output = Result<T, StoreError>> + Send,
) -> Result<T, StoreError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError::new(e.to_string()))?;
            let out = rt.block_on(f);
            rt.shutdown_background();
            out
        })
        .join()
        .unwrap_or_else(|_| Err(StoreError::new("the database thread failed")))
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
    f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut c)
    })
    .await
    .map_err(|e| StoreError::new(e.to_string()))?
}

impl Db {
    /// Opens the store (SQLite: a new connection; PostgreSQL: a pool that connects on first
    /// use; both migrated first). Synchronous: PostgreSQL is reached on a thread of its own.
    pub(crate) fn open(loc: &Location) -> Result<Db, StoreError> {
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
    pub(crate) fn reopen(&self) -> Result<Db, StoreError> {
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
    ) -> Result<Vec<Claimed>, StoreError> {
        match self {
            Db::Sqlite(c, _) => {
                blocking(c, move |c| outbox::claim(c, now, lease_ms, hold_ms, limit)).await
            }
            Db::Postgres(p) => Ok(p.claim(now, lease_ms, hold_ms, limit).await?),
        }
    }

    pub(crate) async fn renew(&self, ids: Vec<i64>, until: i64) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| outbox::renew(c, &ids, until)).await,
            Db::Postgres(p) => Ok(p.renew(&ids, until).await?),
        }
    }

    pub(crate) async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, |c| outbox::next_due(c)).await,
            Db::Postgres(p) => Ok(p.next_due().await?),
        }
    }

    pub(crate) async fn record_batch(
        &self,
        batch: Vec<(Claimed, Attempt, Next)>,
    ) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| outbox::record_batch(c, &batch)).await,
            Db::Postgres(p) => Ok(p.record_batch(&batch).await?),
        }
    }

    pub(crate) async fn failing_since(&self, endpoint: String) -> Result<Option<i64>, StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| outbox::failing_since(c, &endpoint)).await,
            Db::Postgres(p) => Ok(p.failing_since(&endpoint).await?),
        }
    }

    pub(crate) async fn purge(&self, before_ms: i64, batch: i64) -> Result<usize, StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| outbox::purge(c, before_ms, batch)).await,
            Db::Postgres(p) => Ok(p.purge(before_ms, batch).await?),
        }
    }

    pub(crate) async fn insert_runs(
        &self,
        runs: Vec<OwnedRun>,
        now: i64,
    ) -> Result<(), StoreError> {
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
    ) -> Result<bool, StoreError> {
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
    ) -> Result<Vec<ClaimedRun>, StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| runlog::claim(c, now, limit)).await,
            Db::Postgres(p) => Ok(p.claim_runs(now, limit, lease_ms).await?),
        }
    }

    pub(crate) async fn renew_run(&self, id: String, until: i64) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(..) => Ok(()),
            Db::Postgres(p) => Ok(p.renew_run(&id, until).await?),
        }
    }

    /// At start: SQLite queues again the runs a stopped process left running (it was the only
    /// process); PostgreSQL leaves them to their leases (another process may be running them).
    /// Synchronous: called once, when the automations start.
    pub(crate) fn requeue_running(&self) -> Result<usize, StoreError> {
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
    ) -> Result<Option<i64>, StoreError> {
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
    ) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(c, _) => {
                blocking(c, move |c| runlog::finish(c, &run, error.as_deref(), now)).await
            }
            Db::Postgres(p) => Ok(p.finish_run(&run, error.as_deref(), now).await?),
        }
    }

    pub(crate) async fn unfinished(&self) -> Result<i64, StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, |c| runlog::unfinished(c)).await,
            Db::Postgres(p) => Ok(p.unfinished().await?),
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
    pub(crate) fn open(db: &Path) -> Result<LogConn, StoreError> {
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
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let filter = query::DeliveryFilter {
            call_id: call.map(str::to_string),
            status: status.map(str::to_string),
            limit,
            ..Default::default()
        };
        match self {
            LogConn::Sqlite(c) => query::deliveries(c, &filter),
            LogConn::Postgres(p) => p.block(|pg| pg.find_deliveries(&filter)),
        }
    }

    pub(crate) fn attempts(&self, delivery: i64) -> Result<Vec<AttemptRecord>, StoreError> {
        match self {
            LogConn::Sqlite(c) => outbox::attempts(c, delivery),
            LogConn::Postgres(p) => p.block(|pg| pg.attempts(delivery)),
        }
    }

    pub(crate) fn replay(
        &mut self,
        id: Option<i64>,
        since_ms: Option<i64>,
        status: Option<&str>,
        now: i64,
    ) -> Result<usize, StoreError> {
        match self {
            LogConn::Sqlite(c) => outbox::replay(c, id, since_ms, status, None, now),
            LogConn::Postgres(p) => p.block(|pg| pg.replay(id, since_ms, status, None, now)),
        }
    }

    pub(crate) fn contains(&self, id: i64) -> Result<bool, StoreError> {
        match self {
            LogConn::Sqlite(c) => c
                .prepare_cached("SELECT 1 FROM deliveries WHERE id = ?1")
                .and_then(|mut s| s.exists([id]))
                .map_err(StoreError::from),
            LogConn::Postgres(p) => p.block(|pg| pg.contains(id)),
        }
    }

    pub(crate) fn purge(&mut self, before_ms: i64, batch: i64) -> Result<usize, StoreError> {
        match self {
            LogConn::Sqlite(c) => outbox::purge(c, before_ms, batch),
            LogConn::Postgres(p) => p.block(|pg| pg.purge(before_ms, batch)),
        }
    }

    pub(crate) fn runs(
        &self,
        id: Option<&str>,
        automation: Option<&str>,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunRecord>, StoreError> {
        match self {
            LogConn::Sqlite(c) => runlog::query(c, id, automation, status, limit),
            LogConn::Postgres(p) => p.block(|pg| pg.runs(id, automation, status, limit)),
        }
    }
}

/// An error from the store (either engine): what failed, and whether trying again later may
/// succeed (the server is down, restarting or unreachable; the file is locked) or not (the
/// statement itself failed, the file is not a database, the database does not exist).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    message: String,
    transient: bool,
}

impl StoreError {
    /// A failure that trying again will not mend, shown as `outbox: <message>`.
    pub(crate) fn new(message: impl std::fmt::Display) -> StoreError {
        StoreError::plain(format!("outbox: {message}"))
    }

    /// A failure that trying again will not mend, shown as it is (it names its database).
    pub(crate) fn plain(message: impl Into<String>) -> StoreError {
        StoreError {
            message: message.into(),
            transient: false,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// What failed, without the `outbox: ` prefix.
    pub(crate) fn message(&self) -> &str {
        self.message
            .strip_prefix("outbox: ")
            .unwrap_or(&self.message)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let transient = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        StoreError {
            message: format!("outbox: {e}"),
            transient,
        }
    }
}

impl From<pg::PgError> for StoreError {
    fn from(e: pg::PgError) -> Self {
        StoreError {
            message: format!("outbox: postgres: {}", e.message),
            transient: e.transient,
        }
    }
}
