//! What the operator API reads and changes: deliveries and runs filtered and paged, an
//! endpoint's failures replayed, endpoints disabled and enabled. SQLite here, PostgreSQL in
//! [`super::pg`], both behind [`Db`].

use rusqlite::{params, Connection, OptionalExtension};

use super::sqlite::runs::{load_steps, run_row};
use super::sqlite::{outbox, write_tx};
use super::{blocking, AttemptRecord, Db, DeliveryRecord, RunRecord, StoreError};

/// Which deliveries, newest first. `None` means any.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeliveryFilter {
    /// The endpoint name starts with one of these (an agent's or a tenant's: `agent/`);
    /// `Some(empty)` matches nothing.
    pub(crate) prefixes: Option<Vec<String>>,
    pub(crate) endpoint: Option<String>,
    pub(crate) event: Option<String>,
    pub(crate) status: Option<String>,
    pub(crate) call_id: Option<String>,
    pub(crate) since_ms: Option<i64>,
    pub(crate) until_ms: Option<i64>,
    /// The cursor: ids below this one.
    pub(crate) before_id: Option<i64>,
    pub(crate) limit: i64,
}

/// Which runs, newest first. `None` means any.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunFilter {
    pub(crate) id: Option<String>,
    /// The stored automation name starts with one of these (`agent/`).
    pub(crate) prefixes: Option<Vec<String>>,
    pub(crate) automation: Option<String>,
    pub(crate) status: Option<String>,
    /// The run's call, or the run itself (a webhook run has no call: its deliveries carry
    /// the run's id as their call id, and the call view shows it under that id).
    pub(crate) call_id: Option<String>,
    pub(crate) since_ms: Option<i64>,
    pub(crate) until_ms: Option<i64>,
    /// The cursor: runs before this (created_ms, id).
    pub(crate) before: Option<(i64, String)>,
    pub(crate) limit: i64,
}

/// An endpoint's state as the outbox keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct EndpointState {
    pub(crate) endpoint: String,
    pub(crate) disabled: bool,
    pub(crate) disabled_reason: Option<String>,
    pub(crate) last_success_ms: Option<i64>,
    pub(crate) failing_since_ms: Option<i64>,
}

fn json_list(p: &Option<Vec<String>>) -> Option<String> {
    p.as_ref()
        .map(|v| serde_json::to_string(v).unwrap_or_else(|_| "[]".into()))
}

const DELIVERY_COLUMNS: &str = "d.id, e.type, d.call_id, d.endpoint, d.status, d.attempts, d.created_ms, d.last_error, d.webhook_id, d.due_ms";

fn delivery_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    let status: String = r.get(4)?;
    let due: i64 = r.get(9)?;
    Ok(DeliveryRecord {
        id: r.get(0)?,
        event_type: r.get(1)?,
        call_id: r.get(2)?,
        endpoint: r.get(3)?,
        next_attempt_ms: (status == "pending").then_some(due),
        status,
        attempts: r.get(5)?,
        created_ms: r.get(6)?,
        last_error: r.get(7)?,
        webhook_id: r.get(8)?,
    })
}

pub(crate) fn deliveries(
    conn: &Connection,
    f: &DeliveryFilter,
) -> Result<Vec<DeliveryRecord>, StoreError> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
         WHERE (?1 IS NULL OR EXISTS (SELECT 1 FROM json_each(?1) j WHERE substr(d.endpoint, 1, length(j.value)) = j.value))
           AND (?2 IS NULL OR d.endpoint = ?2) AND (?3 IS NULL OR e.type = ?3) AND (?4 IS NULL OR d.status = ?4)
           AND (?5 IS NULL OR d.call_id = ?5) AND (?6 IS NULL OR d.created_ms >= ?6) AND (?7 IS NULL OR d.created_ms < ?7)
           AND (?8 IS NULL OR d.id < ?8)
         ORDER BY d.id DESC LIMIT ?9"
    );
    let mut st = conn.prepare_cached(&sql)?;
    let rows = st.query_map(
        params![
            json_list(&f.prefixes),
            f.endpoint,
            f.event,
            f.status,
            f.call_id,
            f.since_ms,
            f.until_ms,
            f.before_id,
            f.limit
        ],
        delivery_row,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn delivery(conn: &Connection, id: i64) -> Result<Option<DeliveryRecord>, StoreError> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.id = ?1"
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row(params![id], delivery_row)
        .optional()?)
}

fn runs(conn: &Connection, f: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
    let (before_ms, before_id) = match &f.before {
        Some((ms, id)) => (Some(*ms), Some(id.as_str())),
        None => (None, None),
    };
    let mut st = conn.prepare_cached(
        "SELECT id, automation, trigger, call_id, status, created_ms, finished_ms, error FROM runs
         WHERE (?1 IS NULL OR EXISTS (SELECT 1 FROM json_each(?1) j WHERE substr(automation, 1, length(j.value)) = j.value))
           AND (?2 IS NULL OR automation = ?2) AND (?3 IS NULL OR status = ?3) AND (?4 IS NULL OR call_id = ?4 OR id = ?4)
           AND (?5 IS NULL OR created_ms >= ?5) AND (?6 IS NULL OR created_ms < ?6)
           AND (?7 IS NULL OR created_ms < ?7 OR (created_ms = ?7 AND id < ?8))
           AND (?10 IS NULL OR id = ?10)
         ORDER BY created_ms DESC, id DESC LIMIT ?9",
    )?;
    let rows = st.query_map(
        params![
            json_list(&f.prefixes),
            f.automation,
            f.status,
            f.call_id,
            f.since_ms,
            f.until_ms,
            before_ms,
            before_id,
            f.limit,
            f.id
        ],
        run_row,
    )?;
    let mut runs: Vec<RunRecord> = rows.collect::<Result<_, _>>()?;
    load_steps(conn, &mut runs)?;
    Ok(runs)
}

/// Disables `endpoint` (its new deliveries are stored as skipped; the worker sends nothing
/// to it) or enables it again.
fn set_disabled(
    conn: &mut Connection,
    endpoint: &str,
    disabled: bool,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    let tx = write_tx(conn)?;
    tx.execute(
        "INSERT INTO endpoints (endpoint, disabled, disabled_reason) VALUES (?1, ?2, ?3)
         ON CONFLICT(endpoint) DO UPDATE SET disabled = ?2, disabled_reason = ?3,
           failing_since_ms = CASE WHEN ?2 = 0 THEN NULL ELSE failing_since_ms END",
        params![endpoint, disabled as i64, reason],
    )?;
    if disabled {
        // What is queued for it now would otherwise still go out.
        tx.execute(
            "UPDATE deliveries SET status = 'skipped', last_error = 'endpoint disabled by an operator'
             WHERE endpoint = ?1 AND status = 'pending'",
            params![endpoint],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn endpoints(conn: &Connection) -> Result<Vec<EndpointState>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT endpoint, disabled, disabled_reason, last_success_ms, failing_since_ms FROM endpoints ORDER BY endpoint LIMIT 10000",
    )?;
    let rows = st.query_map([], |r| {
        Ok(EndpointState {
            endpoint: r.get(0)?,
            disabled: r.get::<_, i64>(1)? != 0,
            disabled_reason: r.get(2)?,
            last_success_ms: r.get(3)?,
            failing_since_ms: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Hands claimed deliveries back unattempted, each due again at its time (a throttled
/// endpoint's).
fn defer(conn: &mut Connection, due: &[(i64, i64)]) -> Result<(), StoreError> {
    let tx = write_tx(conn)?;
    {
        let mut up = tx.prepare_cached(
            "UPDATE deliveries SET due_ms = ?2, lease_ms = 0 WHERE id = ?1 AND status = 'pending'",
        )?;
        for (id, at) in due {
            up.execute(params![id, at])?;
        }
    }
    tx.commit()?;
    Ok(())
}

impl Db {
    pub(crate) async fn defer(&self, due: Vec<(i64, i64)>) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| defer(c, &due)).await,
            Db::Postgres(p) => Ok(p.defer(&due).await?),
        }
    }

    pub(crate) async fn find_deliveries(
        &self,
        f: DeliveryFilter,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| deliveries(c, &f)).await,
            Db::Postgres(p) => Ok(p.find_deliveries(&f).await?),
        }
    }

    pub(crate) async fn delivery(&self, id: i64) -> Result<Option<DeliveryRecord>, StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| delivery(c, id)).await,
            Db::Postgres(p) => Ok(p.delivery(id).await?),
        }
    }

    pub(crate) async fn delivery_attempts(
        &self,
        id: i64,
    ) -> Result<Vec<AttemptRecord>, StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| outbox::attempts(c, id)).await,
            Db::Postgres(p) => Ok(p.attempts(id).await?),
        }
    }

    /// Replays one delivery (whatever its status but pending); how many were replayed.
    pub(crate) async fn replay_one(&self, id: i64, now: i64) -> Result<usize, StoreError> {
        match self {
            Db::Sqlite(c, _) => {
                blocking(c, move |c| {
                    outbox::replay(c, Some(id), None, None, None, now)
                })
                .await
            }
            Db::Postgres(p) => Ok(p.replay(Some(id), None, None, None, now).await?),
        }
    }

    /// Makes `endpoint`'s failed and skipped deliveries since `since_ms` due now (the replay
    /// the delivery log's other replays use), and enables the endpoint.
    pub(crate) async fn recover(
        &self,
        endpoint: String,
        since_ms: i64,
        now: i64,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for status in ["failed", "skipped"] {
            n += match self {
                Db::Sqlite(c, _) => {
                    let ep = endpoint.clone();
                    blocking(c, move |c| {
                        outbox::replay(c, None, Some(since_ms), Some(status), Some(&ep), now)
                    })
                    .await?
                }
                Db::Postgres(p) => {
                    p.replay(None, Some(since_ms), Some(status), Some(&endpoint), now)
                        .await?
                }
            };
        }
        self.set_endpoint_disabled(endpoint, false, None).await?;
        Ok(n)
    }

    pub(crate) async fn set_endpoint_disabled(
        &self,
        endpoint: String,
        disabled: bool,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(c, _) => {
                blocking(c, move |c| {
                    set_disabled(c, &endpoint, disabled, reason.as_deref())
                })
                .await
            }
            Db::Postgres(p) => Ok(p
                .set_endpoint_disabled(&endpoint, disabled, reason.as_deref())
                .await?),
        }
    }

    pub(crate) async fn endpoints(&self) -> Result<Vec<EndpointState>, StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, |c| endpoints(c)).await,
            Db::Postgres(p) => Ok(p.endpoints().await?),
        }
    }

    pub(crate) async fn find_runs(&self, f: RunFilter) -> Result<Vec<RunRecord>, StoreError> {
        match self {
            Db::Sqlite(c, _) => blocking(c, move |c| runs(c, &f)).await,
            Db::Postgres(p) => Ok(p.find_runs(&f).await?),
        }
    }
}
