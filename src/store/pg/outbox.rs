//! The outbox on PostgreSQL: events stored with their deliveries, claims with `FOR UPDATE
//! SKIP LOCKED` and leases, attempts recorded, endpoints disabled, replays and purges.

use super::{Pg, OUTBOX_CHANNEL, R};
use crate::store::records::{Attempt, AttemptRecord, Claimed, NewEvent, Next};

impl Pg {
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
}
