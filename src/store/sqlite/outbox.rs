//! The outbox on SQLite: events, their deliveries to each subscribed endpoint, every attempt,
//! and the state of each endpoint.

use rusqlite::{params, Connection, OptionalExtension};

use super::write_tx;
use crate::store::records::{step_webhook_id, Attempt, AttemptRecord, Claimed, NewEvent, Next};
use crate::store::StoreError;

/// Stores one event with one delivery to `endpoint` carrying `target`, inside `tx`. Returns
/// the delivery's id. A disabled endpoint gets it as skipped.
pub(crate) fn insert_targeted(
    tx: &rusqlite::Transaction<'_>,
    e: &NewEvent,
    target: &str,
    now: i64,
) -> Result<i64, StoreError> {
    tx.execute(
        "INSERT INTO events (event_id, type, call_id, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![e.event_id, e.kind, e.call_id, e.body, now],
    )?;
    let seq = tx.last_insert_rowid();
    let endpoint = e.endpoints.first().map(String::as_str).unwrap_or_default();
    tx.execute(
        "INSERT INTO deliveries (event_seq, endpoint, call_id, webhook_id, status, due_ms, created_ms, target)
         VALUES (?1, ?2, ?3, ?4, CASE WHEN EXISTS (SELECT 1 FROM endpoints WHERE endpoint = ?2 AND disabled = 1) THEN 'skipped' ELSE 'pending' END, ?5, ?5, ?6)",
        params![seq, endpoint, e.call_id, step_webhook_id(target, &e.event_id), now, target],
    )?;
    Ok(tx.last_insert_rowid())
}

/// Stores a batch in one transaction. Deliveries to disabled endpoints are stored as skipped.
pub(crate) fn insert_batch(
    conn: &mut Connection,
    batch: &[NewEvent],
    now: i64,
) -> Result<(), StoreError> {
    let tx = write_tx(conn)?;
    {
        let mut ev = tx.prepare_cached(
            "INSERT INTO events (event_id, type, call_id, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut del = tx.prepare_cached(
            "INSERT INTO deliveries (event_seq, endpoint, call_id, webhook_id, status, due_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, CASE WHEN EXISTS (SELECT 1 FROM endpoints WHERE endpoint = ?2 AND disabled = 1) THEN 'skipped' ELSE 'pending' END, ?5, ?5)",
        )?;
        for e in batch {
            ev.execute(params![e.event_id, e.kind, e.call_id, e.body, now])?;
            let seq = tx.last_insert_rowid();
            for (i, ep) in e.endpoints.iter().enumerate() {
                // Stable for an event and endpoint across attempts.
                let webhook_id = format!("msg_{}_{i}", e.event_id);
                del.execute(params![seq, ep, e.call_id, webhook_id, now])?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Leases up to `limit` due deliveries. A delivery waits while an earlier one for the same
/// endpoint and call is still pending, unless it has waited longer than `hold_ms`.
pub(crate) fn claim(
    conn: &mut Connection,
    now: i64,
    lease_ms: i64,
    hold_ms: i64,
    limit: i64,
) -> Result<Vec<Claimed>, StoreError> {
    let tx = write_tx(conn)?;
    let rows: Vec<Claimed> = {
        let mut st = tx.prepare_cached(
            "SELECT d.id, d.endpoint, d.webhook_id, d.attempts, e.body, d.target, r.context FROM deliveries d JOIN events e ON e.seq = d.event_seq
             LEFT JOIN runs r ON d.target IS NOT NULL AND r.id = json_extract(d.target, '$.run')
             WHERE d.status = 'pending' AND d.due_ms <= ?1 AND d.lease_ms <= ?1
               AND (d.created_ms + ?2 <= ?1 OR NOT EXISTS (
                    SELECT 1 FROM deliveries p WHERE p.endpoint = d.endpoint AND p.call_id = d.call_id
                      AND p.status = 'pending' AND p.event_seq < d.event_seq))
             ORDER BY d.due_ms, d.event_seq LIMIT ?3",
        )?;
        let it = st.query_map(params![now, hold_ms, limit], |r| {
            Ok(Claimed {
                id: r.get(0)?,
                endpoint: r.get(1)?,
                webhook_id: r.get(2)?,
                attempts: r.get(3)?,
                body: r.get(4)?,
                target: r.get(5)?,
                context: r.get(6)?,
            })
        })?;
        it.collect::<Result<_, _>>()?
    };
    {
        let mut up = tx.prepare_cached("UPDATE deliveries SET lease_ms = ?2 WHERE id = ?1")?;
        for c in &rows {
            up.execute(params![c.id, now + lease_ms])?;
        }
    }
    tx.commit()?;
    Ok(rows)
}

/// Extends the leases of deliveries still in flight.
pub(crate) fn renew(conn: &mut Connection, ids: &[i64], until: i64) -> Result<(), StoreError> {
    let tx = write_tx(conn)?;
    {
        let mut up = tx.prepare_cached(
            "UPDATE deliveries SET lease_ms = ?2 WHERE id = ?1 AND status = 'pending' AND lease_ms > 0",
        )?;
        for id in ids {
            up.execute(params![id, until])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The earliest time a pending delivery is due, if any.
pub(crate) fn next_due(conn: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT MIN(MAX(due_ms, lease_ms)) FROM deliveries WHERE status = 'pending'",
            [],
            |r| r.get::<_, Option<i64>>(0),
        )
        .optional()?
        .flatten())
}

/// Records a batch of attempts in one transaction (one fsync for the batch).
pub(crate) fn record_batch(
    conn: &mut Connection,
    batch: &[(Claimed, Attempt, Next)],
) -> Result<(), StoreError> {
    let tx = write_tx(conn)?;
    for (c, a, next) in batch {
        record_in(&tx, c, a, next)?;
    }
    tx.commit()?;
    Ok(())
}

/// Records an attempt and moves the delivery (and its endpoint) on.
fn record_in(
    tx: &rusqlite::Transaction<'_>,
    c: &Claimed,
    a: &Attempt,
    next: &Next,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO attempts (delivery_id, at_ms, duration_ms, status_code, error, response_prefix) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![c.id, a.at_ms, a.duration_ms, a.status_code, a.error, a.response_prefix],
    )?;
    let now = a.at_ms + a.duration_ms;
    match next {
        Next::Delivered => {
            tx.execute(
                "UPDATE deliveries SET status = 'delivered', attempts = attempts + 1, done_ms = ?2, lease_ms = 0, last_error = NULL WHERE id = ?1",
                params![c.id, now],
            )?;
            tx.execute(
                "INSERT INTO endpoints (endpoint, last_success_ms) VALUES (?1, ?2)
                 ON CONFLICT(endpoint) DO UPDATE SET last_success_ms = ?2, failing_since_ms = NULL",
                params![c.endpoint, now],
            )?;
        }
        Next::Retry { due_ms } => {
            tx.execute(
                "UPDATE deliveries SET attempts = attempts + 1, due_ms = ?2, lease_ms = 0, last_error = ?3 WHERE id = ?1",
                params![c.id, due_ms, a.error.clone().or(a.status_code.map(|s| format!("HTTP {s}")))],
            )?;
            failing(tx, &c.endpoint, now)?;
        }
        Next::Failed => {
            tx.execute(
                "UPDATE deliveries SET status = 'failed', attempts = attempts + 1, done_ms = ?2, lease_ms = 0, last_error = ?3 WHERE id = ?1",
                params![c.id, now, a.error.clone().or(a.status_code.map(|s| format!("HTTP {s}")))],
            )?;
            failing(tx, &c.endpoint, now)?;
        }
        Next::Disable { reason } => {
            tx.execute(
                "UPDATE deliveries SET status = 'failed', attempts = attempts + 1, done_ms = ?2, lease_ms = 0, last_error = ?3 WHERE id = ?1",
                params![c.id, now, reason],
            )?;
            tx.execute(
                "INSERT INTO endpoints (endpoint, disabled, disabled_reason) VALUES (?1, 1, ?2)
                 ON CONFLICT(endpoint) DO UPDATE SET disabled = 1, disabled_reason = ?2",
                params![c.endpoint, reason],
            )?;
            // Later events for this endpoint are kept, as skipped.
            tx.execute(
                "UPDATE deliveries SET status = 'skipped', lease_ms = 0 WHERE endpoint = ?1 AND status = 'pending'",
                params![c.endpoint],
            )?;
        }
    }
    Ok(())
}

fn failing(tx: &rusqlite::Transaction<'_>, endpoint: &str, now: i64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO endpoints (endpoint, failing_since_ms) VALUES (?1, ?2)
         ON CONFLICT(endpoint) DO UPDATE SET failing_since_ms = COALESCE(failing_since_ms, ?2)",
        params![endpoint, now],
    )?;
    Ok(())
}

/// Since when an endpoint has failed without a success, if it is failing.
pub(crate) fn failing_since(conn: &Connection, endpoint: &str) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT failing_since_ms FROM endpoints WHERE endpoint = ?1",
            params![endpoint],
            |r| r.get::<_, Option<i64>>(0),
        )
        .optional()?
        .flatten())
}

/// The attempts of one delivery, oldest first.
pub(crate) fn attempts(conn: &Connection, delivery: i64) -> Result<Vec<AttemptRecord>, StoreError> {
    let mut st = conn.prepare(
        "SELECT at_ms, duration_ms, status_code, error, response_prefix FROM attempts WHERE delivery_id = ?1 ORDER BY id",
    )?;
    let rows = st.query_map(params![delivery], |r| {
        let prefix: Option<Vec<u8>> = r.get(4)?;
        Ok(AttemptRecord {
            at_ms: r.get(0)?,
            duration_ms: r.get(1)?,
            status_code: r.get(2)?,
            error: r.get(3)?,
            response_prefix: String::from_utf8_lossy(&prefix.unwrap_or_default()).into_owned(),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Makes deliveries due again: one by id, or every one with `status` published since `since_ms`.
/// Their endpoints are enabled again (replaying is an operator's decision). Returns how many.
pub(crate) fn replay(
    conn: &mut Connection,
    id: Option<i64>,
    since_ms: Option<i64>,
    status: Option<&str>,
    endpoint: Option<&str>,
    now: i64,
) -> Result<usize, StoreError> {
    let tx = write_tx(conn)?;
    let n = tx.execute(
        "UPDATE deliveries SET status = 'pending', due_ms = ?4, lease_ms = 0
         WHERE (?1 IS NULL OR id = ?1) AND (?2 IS NULL OR created_ms >= ?2) AND (?3 IS NULL OR status = ?3)
           AND (?5 IS NULL OR endpoint = ?5) AND status != 'pending'",
        params![id, since_ms, status, now, endpoint],
    )?;
    tx.execute(
        "UPDATE endpoints SET disabled = 0, disabled_reason = NULL, failing_since_ms = NULL
         WHERE endpoint IN (SELECT endpoint FROM deliveries WHERE status = 'pending' AND due_ms = ?1)",
        params![now],
    )?;
    tx.commit()?;
    Ok(n)
}

/// Deletes delivered deliveries older than `before_ms` (and their attempts and events), and
/// automation runs finished before it that no delivery refers to, at most `batch` of each at a
/// time. Returns how many deliveries went.
pub(crate) fn purge(
    conn: &mut Connection,
    before_ms: i64,
    batch: i64,
) -> Result<usize, StoreError> {
    let tx = write_tx(conn)?;
    tx.execute(
        "CREATE TEMP TABLE IF NOT EXISTS purge_ids (id INTEGER PRIMARY KEY)",
        [],
    )?;
    tx.execute("DELETE FROM purge_ids", [])?;
    tx.execute(
        "INSERT INTO purge_ids SELECT id FROM deliveries WHERE status = 'delivered' AND done_ms < ?1 LIMIT ?2",
        params![before_ms, batch],
    )?;
    tx.execute(
        "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM purge_ids)",
        [],
    )?;
    let n = tx.execute(
        "DELETE FROM deliveries WHERE id IN (SELECT id FROM purge_ids)",
        [],
    )?;
    tx.execute(
        "DELETE FROM events WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq)",
        [],
    )?;
    // Finished automation runs go too, once no delivery needs their context any more (a
    // delivery renders its URL and headers from the run's context at each attempt).
    tx.execute(
        "CREATE TEMP TABLE IF NOT EXISTS purge_runs (id TEXT PRIMARY KEY)",
        [],
    )?;
    tx.execute("DELETE FROM purge_runs", [])?;
    tx.execute(
        "INSERT INTO purge_runs SELECT r.id FROM runs r
         WHERE r.status IN ('succeeded', 'failed') AND r.finished_ms < ?1
           AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.target IS NOT NULL
                           AND json_extract(d.target, '$.run') = r.id)
         LIMIT ?2",
        params![before_ms, batch],
    )?;
    tx.execute(
        "DELETE FROM run_steps WHERE run_id IN (SELECT id FROM purge_runs)",
        [],
    )?;
    tx.execute(
        "DELETE FROM runs WHERE id IN (SELECT id FROM purge_runs)",
        [],
    )?;
    tx.commit()?;
    Ok(n)
}
