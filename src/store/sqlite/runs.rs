//! The run log on SQLite: one row per automation run and one per finished step.

use rusqlite::{params, Connection};

use super::{outbox, write_tx};
use crate::store::records::{ClaimedRun, NewRun, RunRecord, StepRecord};
use crate::store::StoreError;

/// Stores queued runs in one transaction.
pub(crate) fn insert(
    conn: &mut Connection,
    runs: &[NewRun<'_>],
    now: i64,
) -> Result<(), StoreError> {
    let tx = write_tx(conn)?;
    for r in runs {
        insert_in(&tx, r, now)?;
    }
    tx.commit()?;
    Ok(())
}

/// Stores one queued run; with `webhook_id`, only if that id was not seen within `window_ms`
/// (remembered in the same transaction). Returns false for a replay (nothing stored).
pub(crate) fn insert_once(
    conn: &mut Connection,
    run: &NewRun<'_>,
    webhook_id: Option<&str>,
    window_ms: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let tx = write_tx(conn)?;
    if let Some(wid) = webhook_id {
        tx.execute(
            "DELETE FROM inbound_seen WHERE at_ms < ?1",
            params![now - window_ms],
        )?;
        let added = tx.execute(
            "INSERT OR IGNORE INTO inbound_seen (webhook_id, at_ms) VALUES (?1, ?2)",
            params![wid, now],
        )?;
        if added == 0 {
            return Ok(false);
        }
    }
    insert_in(&tx, run, now)?;
    tx.commit()?;
    Ok(true)
}

fn insert_in(tx: &rusqlite::Transaction<'_>, r: &NewRun<'_>, now: i64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO runs (id, automation, trigger, call_id, status, context, created_ms) VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6)",
        params![r.id, r.automation, r.trigger, r.call_id, r.context, now],
    )?;
    Ok(())
}

/// Marks up to `limit` queued runs running, oldest first, and returns them.
pub(crate) fn claim(
    conn: &mut Connection,
    now: i64,
    limit: i64,
) -> Result<Vec<ClaimedRun>, StoreError> {
    let tx = write_tx(conn)?;
    let rows: Vec<ClaimedRun> = {
        let mut st = tx.prepare_cached(
            "SELECT r.id, r.automation, r.context, (SELECT COUNT(*) FROM run_steps s WHERE s.run_id = r.id AND s.status = 'ok')
             FROM runs r WHERE r.status = 'queued' ORDER BY r.created_ms, r.rowid LIMIT ?1",
        )?;
        let it = st.query_map(params![limit], |r| {
            Ok(ClaimedRun {
                id: r.get(0)?,
                automation: r.get(1)?,
                context: r.get(2)?,
                done_steps: r.get::<_, i64>(3)? as usize,
            })
        })?;
        it.collect::<Result<_, _>>()?
    };
    for r in &rows {
        tx.execute(
            "UPDATE runs SET status = 'running', started_ms = COALESCE(started_ms, ?2) WHERE id = ?1",
            params![r.id, now],
        )?;
    }
    tx.commit()?;
    Ok(rows)
}

/// Runs left running by a stopped process are queued again (they resume after their last
/// finished step). Returns how many.
pub(crate) fn requeue_running(conn: &Connection) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "UPDATE runs SET status = 'queued' WHERE status = 'running'",
        [],
    )?)
}

/// Records a finished step; `delivery` (an outbox event and its delivery) is stored in the same
/// transaction, so a step is never recorded without its delivery or the other way round.
pub(crate) fn record_step(
    conn: &mut Connection,
    run: &str,
    step: &StepRecord,
    delivery: Option<(&crate::store::NewEvent, &str)>,
    new_context: Option<&[u8]>,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    let tx = write_tx(conn)?;
    let id = match delivery {
        Some((event, target)) => Some(outbox::insert_targeted(&tx, event, target, now)?),
        None => None,
    };
    let detail = match id {
        Some(id) => format!("{} {id}", step.detail),
        None => step.detail.clone(),
    };
    tx.execute(
        "INSERT OR REPLACE INTO run_steps (run_id, idx, kind, status, detail, at_ms, duration_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![run, step.index, step.kind, step.status, detail, now, step.duration_ms],
    )?;
    if let Some(ctx) = new_context {
        tx.execute(
            "UPDATE runs SET context = ?2 WHERE id = ?1",
            params![run, ctx],
        )?;
    }
    tx.commit()?;
    Ok(id)
}

/// Marks a run finished: `succeeded`, or `failed` with why.
pub(crate) fn finish(
    conn: &Connection,
    run: &str,
    error: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE runs SET status = CASE WHEN ?2 IS NULL THEN 'succeeded' ELSE 'failed' END, error = ?2, finished_ms = ?3 WHERE id = ?1",
        params![run, error, now],
    )?;
    Ok(())
}

/// How many runs are queued or running.
pub(crate) fn unfinished(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM runs WHERE status IN ('queued', 'running')",
        [],
        |r| r.get(0),
    )?)
}

/// A run from `SELECT id, automation, trigger, call_id, status, created_ms, finished_ms, error`
/// (its steps loaded by [`load_steps`]).
pub(crate) fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: r.get(0)?,
        automation: r.get(1)?,
        trigger: r.get(2)?,
        call_id: r.get(3)?,
        status: r.get(4)?,
        created_ms: r.get(5)?,
        finished_ms: r.get(6)?,
        error: r.get(7)?,
        steps: Vec::new(),
    })
}

/// Fills each run's finished steps, in order.
pub(crate) fn load_steps(conn: &Connection, runs: &mut [RunRecord]) -> Result<(), StoreError> {
    let mut steps = conn.prepare_cached(
        "SELECT idx, kind, status, detail, duration_ms FROM run_steps WHERE run_id = ?1 ORDER BY idx",
    )?;
    for run in runs {
        let it = steps.query_map(params![run.id], |r| {
            Ok(StepRecord {
                index: r.get(0)?,
                kind: r.get(1)?,
                status: r.get(2)?,
                detail: r.get(3)?,
                duration_ms: r.get(4)?,
            })
        })?;
        run.steps = it.collect::<Result<_, _>>()?;
    }
    Ok(())
}

/// Runs with their steps, newest first (SQLite).
pub(crate) fn query(
    conn: &Connection,
    id: Option<&str>,
    automation: Option<&str>,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<RunRecord>, StoreError> {
    let mut st = conn.prepare(
        "SELECT id, automation, trigger, call_id, status, created_ms, finished_ms, error FROM runs
         WHERE (?1 IS NULL OR id = ?1) AND (?2 IS NULL OR automation = ?2) AND (?3 IS NULL OR status = ?3)
         ORDER BY created_ms DESC, rowid DESC LIMIT ?4",
    )?;
    let rows = st.query_map(params![id, automation, status, limit], run_row)?;
    let mut runs: Vec<RunRecord> = rows.collect::<Result<_, _>>()?;
    load_steps(conn, &mut runs)?;
    Ok(runs)
}
