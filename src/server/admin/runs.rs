//! The operator API's runs: filtered and paged lists, one by id with its steps.

use crate::automation::Automations;
use crate::store::query::RunFilter;
use crate::store::Db;
use crate::store::RunRecord;
use crate::time;
use http::StatusCode;
use serde_json::{json, Value};

use super::*;

/// Parsed run filters (shared with the console).
pub(crate) fn run_filter(automations: &Automations, query: &str) -> Result<RunFilter, ApiError> {
    let q = query_pairs(query, RUN_PARAMS)?;
    let status = one_of("status", get(&q, "status"), RUN_STATUSES)?;
    let before = match get(&q, "cursor") {
        None => None,
        Some(c) => {
            let (ms, id) = c
                .split_once('.')
                .ok_or_else(|| bad("cursor: not a cursor this API gave"))?;
            let ms = ms
                .parse::<i64>()
                .map_err(|_| bad("cursor: not a cursor this API gave"))?;
            Some((ms, id.to_string()))
        }
    };
    let automation = get(&q, "automation").map(|a| {
        let agents = automations.agents();
        match get(&q, "agent") {
            Some(agent) if agents.qualified() && !a.contains('/') => agents.name(agent, a),
            _ => a.to_string(),
        }
    });
    let (since_ms, until_ms) = time_range(&q)?;
    Ok(RunFilter {
        id: None,
        prefixes: prefixes(automations, get(&q, "agent"), get(&q, "tenant")),
        automation,
        status: status.map(str::to_string),
        call_id: get(&q, "call_id").map(str::to_string),
        since_ms,
        until_ms,
        before,
        limit: limit_of(&q)?,
    })
}

pub(crate) fn run_json(automations: &Automations, r: &RunRecord) -> Value {
    json!({
        "id": r.id,
        "agent": agent_of(automations, &r.automation),
        "automation": r.automation,
        "trigger": r.trigger,
        "call_id": r.call_id,
        "status": r.status,
        "created": time::rfc3339_ms(r.created_ms),
        "created_ms": r.created_ms,
        "finished_ms": r.finished_ms,
        "error": r.error,
        "steps": r.steps.iter().map(|s| json!({
            "index": s.index,
            "kind": s.kind,
            "status": s.status,
            "detail": s.detail,
            "duration_ms": s.duration_ms,
        })).collect::<Vec<_>>(),
    })
}

pub(crate) async fn find_runs(
    db: &Db,
    f: RunFilter,
) -> Result<(Vec<RunRecord>, Option<String>), ApiError> {
    let limit = f.limit;
    let rows = db.find_runs(f).await.map_err(storage)?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| format!("{}.{}", r.created_ms, r.id)))
        .flatten();
    Ok((rows, next))
}

pub(super) async fn list_runs(
    automations: &Automations,
    db: &Db,
    query: &str,
) -> Result<Value, ApiError> {
    let f = run_filter(automations, query)?;
    let (rows, next) = find_runs(db, f).await?;
    Ok(json!({
        "runs": rows.iter().map(|r| run_json(automations, r)).collect::<Vec<_>>(),
        "next_cursor": next,
    }))
}

pub(crate) async fn run_by_id(db: &Db, id: &str) -> Result<RunRecord, ApiError> {
    let found = db
        .find_runs(RunFilter {
            id: Some(id.to_string()),
            limit: 1,
            ..RunFilter::default()
        })
        .await
        .map_err(storage)?;
    found.into_iter().next().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no run \"{}\"", id.chars().take(60).collect::<String>()),
        )
    })
}

pub(super) async fn one_run(
    automations: &Automations,
    db: &Db,
    id: &str,
) -> Result<Value, ApiError> {
    let r = run_by_id(db, id).await?;
    Ok(run_json(automations, &r))
}
