//! What the operator API reads and changes, on PostgreSQL: deliveries and runs filtered and
//! paged, one delivery, endpoints disabled and enabled, deliveries deferred.

use super::{Pg, R};
use crate::store::records::{DeliveryRecord, RunRecord, StepRecord};

/// Runs from `SELECT id, automation, trigger, call_id, status, created_ms, finished_ms, error`
/// rows, with their finished steps.
pub(super) async fn runs_with_steps(
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
        f: &crate::store::query::DeliveryFilter,
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

    pub(crate) async fn endpoints(&self) -> R<Vec<crate::store::query::EndpointState>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT endpoint, disabled, disabled_reason, last_success_ms, failing_since_ms FROM endpoints ORDER BY endpoint LIMIT 10000",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| crate::store::query::EndpointState {
                endpoint: r.get(0),
                disabled: r.get::<_, i32>(1) != 0,
                disabled_reason: r.get(2),
                last_success_ms: r.get(3),
                failing_since_ms: r.get(4),
            })
            .collect())
    }

    pub(crate) async fn find_runs(&self, f: &crate::store::query::RunFilter) -> R<Vec<RunRecord>> {
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
