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

use super::records::{
    step_webhook_id, Attempt, AttemptRecord, Claimed, ClaimedRun, DeliveryRecord, NewEvent, NewRun,
    Next, RunRecord, StepRecord,
};
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
        self.migrate()
            .await
            .map_err(|e| StoreError::new(format!("{}: {}", self.shown, e.message)))
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

    /// Stores a batch of events with their deliveries in one transaction (one statement) and
    /// notifies the workers of every process.
    pub(crate) async fn insert_batch(&self, batch: &[NewEvent], now: i64) -> R<()> {
        let mut ids = Vec::with_capacity(batch.len());
        let mut kinds = Vec::with_capacity(batch.len());
        let mut calls = Vec::with_capacity(batch.len());
        let mut bodies: Vec<&[u8]> = Vec::with_capacity(batch.len());
        let (mut d_ids, mut d_eps, mut d_wids) = (Vec::new(), Vec::new(), Vec::new());
        for e in batch {
            ids.push(e.event_id.as_str());
            kinds.push(e.kind.as_str());
            calls.push(e.call_id.as_str());
            bodies.push(&e.body);
            for (i, ep) in e.endpoints.iter().enumerate() {
                d_ids.push(e.event_id.as_str());
                d_eps.push(ep.as_str());
                d_wids.push(format!("msg_{}_{i}", e.event_id));
            }
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "WITH ev AS (
                INSERT INTO events (event_id, type, call_id, body, created_ms)
                SELECT u.eid, u.kind, u.call, u.body, $8
                FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) WITH ORDINALITY AS u(eid, kind, call, body, n)
                ORDER BY u.n
                RETURNING seq, event_id, call_id)
             INSERT INTO deliveries (event_seq, endpoint, call_id, webhook_id, status, due_ms, created_ms)
             SELECT ev.seq, d.ep, ev.call_id, d.wid,
                    CASE WHEN EXISTS (SELECT 1 FROM endpoints x WHERE x.endpoint = d.ep AND x.disabled = 1) THEN 'skipped' ELSE 'pending' END,
                    $8, $8
             FROM unnest($5::text[], $6::text[], $7::text[]) WITH ORDINALITY AS d(eid, ep, wid, n)
             JOIN ev ON ev.event_id = d.eid
             ORDER BY ev.seq, d.n",
            &[&ids, &kinds, &calls, &bodies, &d_ids, &d_eps, &d_wids, &now],
        )
        .await?;
        tx.execute("SELECT pg_notify($1, '')", &[&OUTBOX_CHANNEL])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Leases up to `limit` due deliveries to this process (see the SQLite `claim`; the
    /// per-call ordering holds across processes because a delivery in flight stays pending).
    pub(crate) async fn claim(
        &self,
        now: i64,
        lease_ms: i64,
        hold_ms: i64,
        limit: i64,
    ) -> R<Vec<Claimed>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "WITH c AS (
                    SELECT d.id FROM deliveries d
                    WHERE d.status = 'pending' AND d.due_ms <= $1 AND d.lease_ms <= $1
                      AND (d.created_ms + $2 <= $1 OR NOT EXISTS (
                           SELECT 1 FROM deliveries p WHERE p.endpoint = d.endpoint AND p.call_id = d.call_id
                             AND p.status = 'pending' AND p.event_seq < d.event_seq))
                    ORDER BY d.due_ms, d.event_seq LIMIT $3
                    FOR UPDATE OF d SKIP LOCKED)
                 UPDATE deliveries d SET lease_ms = $4, lease_owner = $5
                 FROM c, events e WHERE d.id = c.id AND e.seq = d.event_seq
                 RETURNING d.id, d.endpoint, d.webhook_id, d.attempts, e.body, d.target,
                   (SELECT r.context FROM runs r WHERE d.target IS NOT NULL AND r.id = (d.target::jsonb ->> 'run')),
                   d.event_seq",
                &[&now, &hold_ms, &limit, &(now + lease_ms), &&*self.owner],
            )
            .await?;
        let mut out: Vec<(i64, Claimed)> = rows
            .iter()
            .map(|r| {
                (
                    r.get(7),
                    Claimed {
                        id: r.get(0),
                        endpoint: r.get(1),
                        webhook_id: r.get(2),
                        attempts: r.get(3),
                        body: r.get(4),
                        target: r.get(5),
                        context: r.get(6),
                    },
                )
            })
            .collect();
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }

    /// Extends this process's leases on deliveries still in flight.
    pub(crate) async fn renew(&self, ids: &[i64], until: i64) -> R<()> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE deliveries SET lease_ms = $2 WHERE id = ANY($1) AND lease_owner = $3 AND status = 'pending'",
                &[&ids, &until, &&*self.owner],
            )
            .await?;
        Ok(())
    }

    /// The earliest time a pending delivery is due, if any.
    pub(crate) async fn next_due(&self) -> R<Option<i64>> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT MIN(GREATEST(due_ms, lease_ms)) FROM deliveries WHERE status = 'pending'",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Records a batch of attempts in one transaction. A delivery whose lease this process no
    /// longer holds keeps its attempt row but is not moved on (its new holder decides). The
    /// common case is set-based (one statement for every attempt row, one for every delivered
    /// delivery), and the endpoint's row is touched once per batch and only when its state
    /// changes, last in the transaction: workers of several processes delivering to one
    /// endpoint would otherwise queue on that row's lock.
    pub(crate) async fn record_batch(&self, batch: &[(Claimed, Attempt, Next)]) -> R<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let owner = &*self.owner;
        let ids: Vec<i64> = batch.iter().map(|(c, _, _)| c.id).collect();
        let at: Vec<i64> = batch.iter().map(|(_, a, _)| a.at_ms).collect();
        let dur: Vec<i64> = batch.iter().map(|(_, a, _)| a.duration_ms).collect();
        let codes: Vec<Option<i32>> = batch
            .iter()
            .map(|(_, a, _)| a.status_code.map(i32::from))
            .collect();
        let errors: Vec<Option<&str>> = batch.iter().map(|(_, a, _)| a.error.as_deref()).collect();
        let prefixes: Vec<&[u8]> = batch
            .iter()
            .map(|(_, a, _)| a.response_prefix.as_slice())
            .collect();
        tx.execute(
            "INSERT INTO attempts (delivery_id, at_ms, duration_ms, status_code, error, response_prefix)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::int[], $5::text[], $6::bytea[])",
            &[&ids, &at, &dur, &codes, &errors, &prefixes],
        )
        .await?;
        let delivered: Vec<&(Claimed, Attempt, Next)> = batch
            .iter()
            .filter(|(_, _, n)| *n == Next::Delivered)
            .collect();
        let mut succeeded: Vec<(&str, i64)> = Vec::new();
        if !delivered.is_empty() {
            let d_ids: Vec<i64> = delivered.iter().map(|(c, _, _)| c.id).collect();
            let d_done: Vec<i64> = delivered
                .iter()
                .map(|(_, a, _)| a.at_ms + a.duration_ms)
                .collect();
            let moved = tx
                .query(
                    "UPDATE deliveries d SET status = 'delivered', attempts = d.attempts + 1, done_ms = u.done, lease_ms = 0, lease_owner = NULL, last_error = NULL
                     FROM unnest($1::bigint[], $2::bigint[]) AS u(id, done)
                     WHERE d.id = u.id AND d.lease_owner = $3
                     RETURNING d.id",
                    &[&d_ids, &d_done, &owner],
                )
                .await?;
            if moved.len() < delivered.len() {
                tracing::warn!(
                    lost = delivered.len() - moved.len(),
                    "deliveries' leases passed to another worker before their attempts were recorded"
                );
            }
            for (c, a, _) in &delivered {
                let done = a.at_ms + a.duration_ms;
                match succeeded.iter_mut().find(|(e, _)| *e == c.endpoint) {
                    Some((_, t)) => *t = (*t).max(done),
                    None => succeeded.push((&c.endpoint, done)),
                }
            }
        }
        for (c, a, next) in batch {
            let now = a.at_ms + a.duration_ms;
            let err = a
                .error
                .clone()
                .or(a.status_code.map(|s| format!("HTTP {s}")));
            let moved = match next {
                Next::Delivered => continue,
                Next::Retry { due_ms } => {
                    let n = tx.execute(
                        "UPDATE deliveries SET attempts = attempts + 1, due_ms = $2, lease_ms = 0, lease_owner = NULL, last_error = $3 WHERE id = $1 AND lease_owner = $4",
                        &[&c.id, due_ms, &err, &owner],
                    ).await?;
                    if n > 0 {
                        self.failing(&tx, &c.endpoint, now).await?;
                    }
                    n
                }
                Next::Failed | Next::Disable { .. } => {
                    let reason = match next {
                        Next::Disable { reason } => Some(reason.as_str()),
                        _ => None,
                    };
                    let n = tx.execute(
                        "UPDATE deliveries SET status = 'failed', attempts = attempts + 1, done_ms = $2, lease_ms = 0, lease_owner = NULL, last_error = $3 WHERE id = $1 AND lease_owner = $4",
                        &[&c.id, &now, &reason.or(err.as_deref()), &owner],
                    ).await?;
                    match (n > 0, reason) {
                        (false, _) => {}
                        (true, None) => self.failing(&tx, &c.endpoint, now).await?,
                        (true, Some(reason)) => {
                            tx.execute(
                                "INSERT INTO endpoints (endpoint, disabled, disabled_reason) VALUES ($1, 1, $2)
                                 ON CONFLICT (endpoint) DO UPDATE SET disabled = 1, disabled_reason = $2",
                                &[&c.endpoint, &reason],
                            ).await?;
                            // Later events for this endpoint are kept, as skipped.
                            tx.execute(
                                "UPDATE deliveries SET status = 'skipped', lease_ms = 0, lease_owner = NULL WHERE endpoint = $1 AND status = 'pending'",
                                &[&c.endpoint],
                            ).await?;
                        }
                    }
                    n
                }
            };
            if moved == 0 {
                tracing::warn!(
                    delivery = c.id,
                    "the delivery's lease passed to another worker before its attempt was recorded"
                );
            }
        }
        // A success clears the failing state; last_success_ms is kept to the second (a row
        // every worker would otherwise rewrite on every batch).
        for (endpoint, done) in succeeded {
            tx.execute(
                "INSERT INTO endpoints (endpoint, last_success_ms) VALUES ($1, $2) ON CONFLICT (endpoint) DO NOTHING",
                &[&endpoint, &done],
            )
            .await?;
            tx.execute(
                "UPDATE endpoints SET last_success_ms = $2::bigint, failing_since_ms = NULL
                 WHERE endpoint = $1 AND (failing_since_ms IS NOT NULL OR last_success_ms IS NULL OR last_success_ms < $2::bigint - 1000)",
                &[&endpoint, &done],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn failing(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        endpoint: &str,
        now: i64,
    ) -> R<()> {
        tx.execute(
            "INSERT INTO endpoints (endpoint, failing_since_ms) VALUES ($1, $2)
             ON CONFLICT (endpoint) DO UPDATE SET failing_since_ms = COALESCE(endpoints.failing_since_ms, $2)",
            &[&endpoint, &now],
        )
        .await?;
        Ok(())
    }

    /// Since when an endpoint has failed without a success, if it is failing.
    pub(crate) async fn failing_since(&self, endpoint: &str) -> R<Option<i64>> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt(
                "SELECT failing_since_ms FROM endpoints WHERE endpoint = $1",
                &[&endpoint],
            )
            .await?
            .and_then(|r| r.get(0)))
    }

    /// Deliveries, newest first.
    /// The attempts of one delivery, oldest first.
    pub(crate) async fn attempts(&self, delivery: i64) -> R<Vec<AttemptRecord>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT at_ms, duration_ms, status_code, error, response_prefix FROM attempts WHERE delivery_id = $1 ORDER BY id",
                &[&delivery],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let code: Option<i32> = r.get(2);
                let prefix: Option<Vec<u8>> = r.get(4);
                AttemptRecord {
                    at_ms: r.get(0),
                    duration_ms: r.get(1),
                    status_code: code.and_then(|c| u16::try_from(c).ok()),
                    error: r.get(3),
                    response_prefix: String::from_utf8_lossy(&prefix.unwrap_or_default())
                        .into_owned(),
                }
            })
            .collect())
    }

    /// Whether a delivery with this id exists.
    pub(crate) async fn contains(&self, id: i64) -> R<bool> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt("SELECT 1 FROM deliveries WHERE id = $1", &[&id])
            .await?
            .is_some())
    }

    /// Makes deliveries due again (see the SQLite `replay`).
    pub(crate) async fn replay(
        &self,
        id: Option<i64>,
        since_ms: Option<i64>,
        status: Option<&str>,
        endpoint: Option<&str>,
        now: i64,
    ) -> R<usize> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "UPDATE deliveries SET status = 'pending', due_ms = $4, lease_ms = 0, lease_owner = NULL
                 WHERE ($1::bigint IS NULL OR id = $1) AND ($2::bigint IS NULL OR created_ms >= $2) AND ($3::text IS NULL OR status = $3)
                   AND ($5::text IS NULL OR endpoint = $5) AND status != 'pending'
                 RETURNING endpoint",
                &[&id, &since_ms, &status, &now, &endpoint],
            )
            .await?;
        let mut endpoints: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        endpoints.sort();
        endpoints.dedup();
        tx.execute(
            "UPDATE endpoints SET disabled = 0, disabled_reason = NULL, failing_since_ms = NULL WHERE endpoint = ANY($1)",
            &[&endpoints],
        )
        .await?;
        tx.execute("SELECT pg_notify($1, '')", &[&OUTBOX_CHANNEL])
            .await?;
        tx.commit().await?;
        Ok(rows.len())
    }

    /// Deletes delivered deliveries older than `before_ms` with their attempts and events, and
    /// finished runs no delivery refers to, at most `batch` of each.
    pub(crate) async fn purge(&self, before_ms: i64, batch: i64) -> R<usize> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT id, event_seq FROM deliveries WHERE status = 'delivered' AND done_ms < $1 LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&before_ms, &batch],
            )
            .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let seqs: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
        tx.execute("DELETE FROM attempts WHERE delivery_id = ANY($1)", &[&ids])
            .await?;
        let n = tx
            .execute("DELETE FROM deliveries WHERE id = ANY($1)", &[&ids])
            .await?;
        tx.execute(
            "DELETE FROM events e WHERE e.seq = ANY($1) AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq)",
            &[&seqs],
        )
        .await?;
        let runs = tx
            .query(
                "SELECT r.id FROM runs r
                 WHERE r.status IN ('succeeded', 'failed') AND r.finished_ms < $1
                   AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.target IS NOT NULL AND (d.target::jsonb ->> 'run') = r.id)
                 LIMIT $2 FOR UPDATE OF r SKIP LOCKED",
                &[&before_ms, &batch],
            )
            .await?;
        let runs: Vec<String> = runs.iter().map(|r| r.get(0)).collect();
        tx.execute("DELETE FROM run_steps WHERE run_id = ANY($1)", &[&runs])
            .await?;
        tx.execute("DELETE FROM runs WHERE id = ANY($1)", &[&runs])
            .await?;
        tx.commit().await?;
        Ok(n as usize)
    }

    // ---- the run log ----

    async fn insert_run(
        tx: &deadpool_postgres::Transaction<'_>,
        r: &NewRun<'_>,
        now: i64,
    ) -> R<()> {
        tx.execute(
            "INSERT INTO runs (id, automation, trigger, call_id, status, context, created_ms) VALUES ($1, $2, $3, $4, 'queued', $5, $6)",
            &[&r.id, &r.automation, &r.trigger, &r.call_id, &r.context, &now],
        )
        .await?;
        Ok(())
    }

    /// Stores queued runs in one transaction and wakes the automation workers.
    pub(crate) async fn insert_runs(&self, runs: &[NewRun<'_>], now: i64) -> R<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        for r in runs {
            Self::insert_run(&tx, r, now).await?;
        }
        tx.execute("SELECT pg_notify($1, '')", &[&RUNS_CHANNEL])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores one queued run unless its `webhook_id` was seen within `window_ms` by any
    /// process (two processes inserting one id at once: the second waits on the first's row
    /// and then sees it). False for a replay.
    pub(crate) async fn insert_run_once(
        &self,
        run: &NewRun<'_>,
        webhook_id: Option<&str>,
        window_ms: i64,
        now: i64,
    ) -> R<bool> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if let Some(wid) = webhook_id {
            tx.execute(
                "DELETE FROM inbound_seen WHERE at_ms < $1",
                &[&(now - window_ms)],
            )
            .await?;
            let added = tx
                .execute(
                    "INSERT INTO inbound_seen (webhook_id, at_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&wid, &now],
                )
                .await?;
            if added == 0 {
                return Ok(false);
            }
        }
        Self::insert_run(&tx, run, now).await?;
        tx.execute("SELECT pg_notify($1, '')", &[&RUNS_CHANNEL])
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Takes up to `limit` runs for this process: queued ones, and running ones whose lease
    /// ran out (their process died; they resume after their last finished step).
    pub(crate) async fn claim_runs(
        &self,
        now: i64,
        limit: i64,
        lease_ms: i64,
    ) -> R<Vec<ClaimedRun>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "WITH c AS (
                    SELECT id FROM runs WHERE status = 'queued' OR (status = 'running' AND lease_ms <= $1)
                    ORDER BY created_ms, ord LIMIT $2 FOR UPDATE SKIP LOCKED)
                 UPDATE runs r SET status = 'running', started_ms = COALESCE(r.started_ms, $1), lease_ms = $3, lease_owner = $4
                 FROM c WHERE r.id = c.id
                 RETURNING r.id, r.automation, r.context,
                   (SELECT COUNT(*) FROM run_steps s WHERE s.run_id = r.id AND s.status = 'ok'), r.ord",
                &[&now, &limit, &(now + lease_ms), &&*self.owner],
            )
            .await?;
        let mut out: Vec<(i64, ClaimedRun)> = rows
            .iter()
            .map(|r| {
                (
                    r.get(4),
                    ClaimedRun {
                        id: r.get(0),
                        automation: r.get(1),
                        context: r.get(2),
                        done_steps: r.get::<_, i64>(3) as usize,
                    },
                )
            })
            .collect();
        out.sort_by_key(|(o, _)| *o);
        Ok(out.into_iter().map(|(_, r)| r).collect())
    }

    /// Extends this process's lease on a running run.
    pub(crate) async fn renew_run(&self, id: &str, until: i64) -> R<()> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE runs SET lease_ms = $2 WHERE id = $1 AND status = 'running' AND lease_owner = $3",
                &[&id, &until, &&*self.owner],
            )
            .await?;
        Ok(())
    }

    /// Records a finished step with its delivery (and the run's new context) in one transaction.
    pub(crate) async fn record_step(
        &self,
        run: &str,
        step: &StepRecord,
        delivery: Option<(&NewEvent, &str)>,
        new_context: Option<&[u8]>,
        now: i64,
    ) -> R<Option<i64>> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let id = match delivery {
            Some((e, target)) => {
                let seq: i64 = tx
                    .query_one(
                        "INSERT INTO events (event_id, type, call_id, body, created_ms) VALUES ($1, $2, $3, $4, $5) RETURNING seq",
                        &[&e.event_id, &e.kind, &e.call_id, &e.body, &now],
                    )
                    .await?
                    .get(0);
                let endpoint = e.endpoints.first().map(String::as_str).unwrap_or_default();
                let id: i64 = tx
                    .query_one(
                        "INSERT INTO deliveries (event_seq, endpoint, call_id, webhook_id, status, due_ms, created_ms, target)
                         VALUES ($1, $2, $3, $4, CASE WHEN EXISTS (SELECT 1 FROM endpoints WHERE endpoint = $2 AND disabled = 1) THEN 'skipped' ELSE 'pending' END, $5, $5, $6)
                         RETURNING id",
                        &[&seq, &endpoint, &e.call_id, &step_webhook_id(target, &e.event_id), &now, &target],
                    )
                    .await?
                    .get(0);
                tx.execute("SELECT pg_notify($1, '')", &[&OUTBOX_CHANNEL])
                    .await?;
                Some(id)
            }
            None => None,
        };
        let detail = match id {
            Some(id) => format!("{} {id}", step.detail),
            None => step.detail.clone(),
        };
        tx.execute(
            "INSERT INTO run_steps (run_id, idx, kind, status, detail, at_ms, duration_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (run_id, idx) DO UPDATE SET kind = excluded.kind, status = excluded.status, detail = excluded.detail, at_ms = excluded.at_ms, duration_ms = excluded.duration_ms",
            &[&run, &step.index, &step.kind, &step.status, &detail, &now, &step.duration_ms],
        )
        .await?;
        if let Some(ctx) = new_context {
            tx.execute("UPDATE runs SET context = $2 WHERE id = $1", &[&run, &ctx])
                .await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    /// Marks a run finished.
    pub(crate) async fn finish_run(&self, run: &str, error: Option<&str>, now: i64) -> R<()> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE runs SET status = CASE WHEN $2::text IS NULL THEN 'succeeded' ELSE 'failed' END, error = $2, finished_ms = $3, lease_ms = 0, lease_owner = NULL WHERE id = $1",
                &[&run, &error, &now],
            )
            .await?;
        Ok(())
    }

    /// How many runs are queued or running.
    pub(crate) async fn unfinished(&self) -> R<i64> {
        let client = self.pool.get().await?;
        Ok(client
            .query_one(
                "SELECT COUNT(*) FROM runs WHERE status IN ('queued', 'running')",
                &[],
            )
            .await?
            .get(0))
    }

    /// Runs with their steps, newest first.
    pub(crate) async fn runs(
        &self,
        id: Option<&str>,
        automation: Option<&str>,
        status: Option<&str>,
        limit: i64,
    ) -> R<Vec<RunRecord>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, automation, trigger, call_id, status, created_ms, finished_ms, error FROM runs
                 WHERE ($1::text IS NULL OR id = $1) AND ($2::text IS NULL OR automation = $2) AND ($3::text IS NULL OR status = $3)
                 ORDER BY created_ms DESC, ord DESC LIMIT $4",
                &[&id, &automation, &status, &limit],
            )
            .await?;
        runs_with_steps(&client, &rows).await
    }
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
    pub(crate) fn connect(url: &str) -> Result<PgBlocking, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
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
                return Err(e.to_string());
            }
        };
        Ok(PgBlocking { rt: Some(rt), pg })
    }

    pub(crate) fn block<'a, T: Send, F>(
        &'a self,
        f: impl Fn(&'a Pg) -> F + Send + Sync,
    ) -> Result<T, String>
    where
        F: std::future::Future<Output = R<T>> + Send + 'a,
    {
        let Some(rt) = &self.rt else {
            return Err("postgres: closed".into());
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
        .map_err(|e| StoreError::from(e).to_string())
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

/// Runs from `SELECT id, automation, trigger, call_id, status, created_ms, finished_ms, error`
/// rows, with their finished steps.
async fn runs_with_steps(
    client: &tokio_postgres::Client,
    rows: &[tokio_postgres::Row],
) -> R<Vec<RunRecord>> {
    let mut runs: Vec<RunRecord> = rows
        .iter()
        .map(|r| RunRecord {
            id: r.get(0),
            automation: r.get(1),
            trigger: r.get(2),
            call_id: r.get(3),
            status: r.get(4),
            created_ms: r.get(5),
            finished_ms: r.get(6),
            error: r.get(7),
            steps: Vec::new(),
        })
        .collect();
    let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
    let steps = client
        .query(
            "SELECT run_id, idx, kind, status, detail, duration_ms FROM run_steps WHERE run_id = ANY($1) ORDER BY run_id, idx",
            &[&ids],
        )
        .await?;
    for s in &steps {
        let run: String = s.get(0);
        if let Some(r) = runs.iter_mut().find(|r| r.id == run) {
            r.steps.push(StepRecord {
                index: s.get(1),
                kind: s.get(2),
                status: s.get(3),
                detail: s.get(4),
                duration_ms: s.get(5),
            });
        }
    }
    Ok(runs)
}

const PG_DELIVERY_COLUMNS: &str = "d.id, e.type, d.call_id, d.endpoint, d.status, d.attempts, d.created_ms, d.last_error, d.webhook_id, d.due_ms";

fn pg_delivery(r: &tokio_postgres::Row) -> DeliveryRecord {
    let status: String = r.get(4);
    let due: i64 = r.get(9);
    DeliveryRecord {
        id: r.get(0),
        event_type: r.get(1),
        call_id: r.get(2),
        endpoint: r.get(3),
        next_attempt_ms: (status == "pending").then_some(due),
        status,
        attempts: r.get(5),
        created_ms: r.get(6),
        last_error: r.get(7),
        webhook_id: r.get(8),
    }
}

/// The operator API's queries (see `super::query`).
impl Pg {
    pub(crate) async fn defer(&self, due: &[(i64, i64)]) -> R<()> {
        let ids: Vec<i64> = due.iter().map(|d| d.0).collect();
        let at: Vec<i64> = due.iter().map(|d| d.1).collect();
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE deliveries d SET due_ms = x.at, lease_ms = 0, lease_owner = NULL
                 FROM unnest($1::bigint[], $2::bigint[]) AS x(id, at)
                 WHERE d.id = x.id AND d.lease_owner = $3 AND d.status = 'pending'",
                &[&ids, &at, &&*self.owner],
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn find_deliveries(
        &self,
        f: &super::query::DeliveryFilter,
    ) -> R<Vec<DeliveryRecord>> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT {PG_DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
             WHERE ($1::text[] IS NULL OR EXISTS (SELECT 1 FROM unnest($1::text[]) p WHERE left(d.endpoint, length(p)) = p))
               AND ($2::text IS NULL OR d.endpoint = $2) AND ($3::text IS NULL OR e.type = $3) AND ($4::text IS NULL OR d.status = $4)
               AND ($5::text IS NULL OR d.call_id = $5) AND ($6::bigint IS NULL OR d.created_ms >= $6) AND ($7::bigint IS NULL OR d.created_ms < $7)
               AND ($8::bigint IS NULL OR d.id < $8)
             ORDER BY d.id DESC LIMIT $9"
        );
        let rows = client
            .query(
                &sql,
                &[
                    &f.prefixes,
                    &f.endpoint,
                    &f.event,
                    &f.status,
                    &f.call_id,
                    &f.since_ms,
                    &f.until_ms,
                    &f.before_id,
                    &f.limit,
                ],
            )
            .await?;
        Ok(rows.iter().map(pg_delivery).collect())
    }

    pub(crate) async fn delivery(&self, id: i64) -> R<Option<DeliveryRecord>> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT {PG_DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.id = $1"
        );
        Ok(client
            .query_opt(&sql, &[&id])
            .await?
            .as_ref()
            .map(pg_delivery))
    }

    pub(crate) async fn set_endpoint_disabled(
        &self,
        endpoint: &str,
        disabled: bool,
        reason: Option<&str>,
    ) -> R<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let flag: i32 = disabled as i32;
        tx.execute(
            "INSERT INTO endpoints (endpoint, disabled, disabled_reason) VALUES ($1, $2, $3)
             ON CONFLICT (endpoint) DO UPDATE SET disabled = $2, disabled_reason = $3,
               failing_since_ms = CASE WHEN $2 = 0 THEN NULL ELSE endpoints.failing_since_ms END",
            &[&endpoint, &flag, &reason],
        )
        .await?;
        if disabled {
            tx.execute(
                "UPDATE deliveries SET status = 'skipped', last_error = 'endpoint disabled by an operator'
                 WHERE endpoint = $1 AND status = 'pending'",
                &[&endpoint],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn endpoints(&self) -> R<Vec<super::query::EndpointState>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT endpoint, disabled, disabled_reason, last_success_ms, failing_since_ms FROM endpoints ORDER BY endpoint LIMIT 10000",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| super::query::EndpointState {
                endpoint: r.get(0),
                disabled: r.get::<_, i32>(1) != 0,
                disabled_reason: r.get(2),
                last_success_ms: r.get(3),
                failing_since_ms: r.get(4),
            })
            .collect())
    }

    pub(crate) async fn find_runs(&self, f: &super::query::RunFilter) -> R<Vec<RunRecord>> {
        let client = self.pool.get().await?;
        let (before_ms, before_id) = match &f.before {
            Some((ms, id)) => (Some(*ms), Some(id.clone())),
            None => (None, None),
        };
        let rows = client
            .query(
                "SELECT id, automation, trigger, call_id, status, created_ms, finished_ms, error FROM runs
                 WHERE ($1::text[] IS NULL OR EXISTS (SELECT 1 FROM unnest($1::text[]) p WHERE left(automation, length(p)) = p))
                   AND ($2::text IS NULL OR automation = $2) AND ($3::text IS NULL OR status = $3) AND ($4::text IS NULL OR call_id = $4 OR id = $4)
                   AND ($5::bigint IS NULL OR created_ms >= $5) AND ($6::bigint IS NULL OR created_ms < $6)
                   AND ($7::bigint IS NULL OR created_ms < $7 OR (created_ms = $7 AND id < $8::text))
                   AND ($10::text IS NULL OR id = $10)
                 ORDER BY created_ms DESC, id DESC LIMIT $9",
                &[
                    &f.prefixes,
                    &f.automation,
                    &f.status,
                    &f.call_id,
                    &f.since_ms,
                    &f.until_ms,
                    &before_ms,
                    &before_id,
                    &f.limit,
                    &f.id,
                ],
            )
            .await?;
        runs_with_steps(&client, &rows).await
    }
}
