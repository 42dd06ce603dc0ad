//! The run log on PostgreSQL: runs queued (once per webhook-id within the replay window),
//! claimed with leases, their steps recorded and their ends.

use super::query::runs_with_steps;
use super::{Pg, OUTBOX_CHANNEL, R, RUNS_CHANNEL};
use crate::store::records::{step_webhook_id, ClaimedRun, NewEvent, NewRun, RunRecord, StepRecord};

impl Pg {
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
