//! The operator API's deliveries: filtered and paged lists, one with its attempts, replays,
//! endpoints (their state, recovery, disabling).

use crate::automation::Automations;
use crate::config::Step;
use crate::store::query::{DeliveryFilter, EndpointState};
use crate::store::Db;
use crate::store::{AttemptRecord, DeliveryRecord};
use crate::time;
use http::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeSet;

use super::*;

/// Parsed delivery filters (shared with the console).
pub(crate) fn delivery_filter(
    automations: &Automations,
    query: &str,
) -> Result<DeliveryFilter, ApiError> {
    let q = query_pairs(query, DELIVERY_PARAMS)?;
    let status = one_of("status", get(&q, "status"), STATUSES)?;
    let event = get(&q, "event").map(|e| {
        if e.starts_with("event_") || e.starts_with("automation:") {
            e.to_string()
        } else {
            format!("event_{e}")
        }
    });
    let before_id = match get(&q, "cursor") {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| bad("cursor: not a cursor this API gave"))?,
        ),
    };
    let (since_ms, until_ms) = time_range(&q)?;
    Ok(DeliveryFilter {
        prefixes: prefixes(automations, get(&q, "agent"), get(&q, "tenant")),
        endpoint: get(&q, "endpoint").map(str::to_string),
        event,
        status: status.map(str::to_string),
        call_id: get(&q, "call_id").map(str::to_string),
        since_ms,
        until_ms,
        before_id,
        limit: limit_of(&q)?,
    })
}

pub(super) fn snippet(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

pub(crate) fn attempt_json(a: &AttemptRecord, max: usize) -> Value {
    json!({
        "at": time::rfc3339_ms(a.at_ms),
        "at_ms": a.at_ms,
        "duration_ms": a.duration_ms,
        "status_code": a.status_code,
        "error": a.error,
        "response_snippet": snippet(&a.response_prefix, max),
    })
}

pub(crate) fn delivery_json(
    automations: &Automations,
    d: &DeliveryRecord,
    attempts: &[AttemptRecord],
    max: usize,
) -> Value {
    json!({
        "id": d.id,
        "agent": agent_of(automations, &d.endpoint),
        "endpoint": d.endpoint,
        "event": d.event_type,
        "call_id": d.call_id,
        "status": d.status,
        "attempts_made": d.attempts,
        "created": time::rfc3339_ms(d.created_ms),
        "created_ms": d.created_ms,
        "next_attempt_ms": d.next_attempt_ms,
        "next_attempt": d.next_attempt_ms.map(time::rfc3339_ms),
        "last_error": d.last_error,
        "webhook_id": d.webhook_id,
        "attempts": attempts.iter().map(|a| attempt_json(a, max)).collect::<Vec<_>>(),
    })
}

/// Deliveries with their attempts, and the next page's cursor.
pub(crate) async fn find_deliveries(
    db: &Db,
    f: DeliveryFilter,
) -> Result<(Vec<(DeliveryRecord, Vec<AttemptRecord>)>, Option<String>), ApiError> {
    let limit = f.limit;
    let rows = db.find_deliveries(f).await.map_err(storage)?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|d| d.id.to_string()))
        .flatten();
    let mut out = Vec::with_capacity(rows.len());
    for d in rows {
        let a = db.delivery_attempts(d.id).await.map_err(storage)?;
        out.push((d, a));
    }
    Ok((out, next))
}

pub(super) async fn list_deliveries(
    automations: &Automations,
    db: &Db,
    query: &str,
) -> Result<Value, ApiError> {
    let f = delivery_filter(automations, query)?;
    let (rows, next) = find_deliveries(db, f).await?;
    Ok(json!({
        "deliveries": rows.iter().map(|(d, a)| delivery_json(automations, d, a, 256)).collect::<Vec<_>>(),
        "next_cursor": next,
    }))
}

pub(super) fn id_of(id: &str) -> Result<i64, ApiError> {
    id.parse::<i64>().map_err(|_| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no delivery \"{}\"",
                id.chars().take(40).collect::<String>()
            ),
        )
    })
}

pub(crate) async fn delivery_with_attempts(
    db: &Db,
    id: &str,
) -> Result<(DeliveryRecord, Vec<AttemptRecord>), ApiError> {
    let n = id_of(id)?;
    let d = db
        .delivery(n)
        .await
        .map_err(storage)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no delivery {n}")))?;
    let a = db.delivery_attempts(n).await.map_err(storage)?;
    Ok((d, a))
}

pub(super) async fn one_delivery(
    automations: &Automations,
    db: &Db,
    id: &str,
) -> Result<Value, ApiError> {
    let (d, a) = delivery_with_attempts(db, id).await?;
    Ok(delivery_json(automations, &d, &a, 2048))
}

/// Replays one delivery: 404 when there is none, 409 while it is pending.
pub(crate) async fn replay(automations: &Automations, db: &Db, id: &str) -> Result<i64, ApiError> {
    let (d, _) = delivery_with_attempts(db, id).await?;
    if d.status == "pending" {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("delivery {} is pending already", d.id),
        ));
    }
    let n = db.replay_one(d.id, time::now_ms()).await.map_err(storage)?;
    automations.bus().wake();
    tracing::info!(target: "midcall::admin", delivery = d.id, endpoint = %d.endpoint, "delivery replayed by an operator");
    Ok(if n > 0 { d.id } else { 0 })
}

/// Every endpoint the config names, with the agent it belongs to.
pub(crate) fn configured_endpoints(automations: &Automations) -> Vec<(String, String)> {
    let agents = automations.agents();
    let mut out: Vec<(String, String)> = automations
        .bus()
        .hooks()
        .iter()
        .map(|h| {
            (
                h.name.clone(),
                h.agent
                    .clone()
                    .unwrap_or_else(|| agents.first().agent().id.clone()),
            )
        })
        .collect();
    for s in agents.sets() {
        for a in s.automations() {
            for (i, step) in a.steps.iter().enumerate() {
                if matches!(step, Step::SendWebhook { .. }) {
                    out.push((
                        agents.name(&s.agent().id, &crate::automation::step_endpoint(&a.id, i)),
                        s.agent().id.clone(),
                    ));
                }
            }
        }
    }
    out
}

pub(super) async fn known_endpoint(
    automations: &Automations,
    db: &Db,
    ep: &str,
) -> Result<(), ApiError> {
    if configured_endpoints(automations)
        .iter()
        .any(|(n, _)| n == ep)
    {
        return Ok(());
    }
    let states = db.endpoints().await.map_err(storage)?;
    if states.iter().any(|s| s.endpoint == ep) {
        return Ok(());
    }
    Err(ApiError(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint \"{}\" (GET /v1/admin/endpoints lists them)",
            ep.chars().take(200).collect::<String>()
        ),
    ))
}

pub(crate) async fn endpoint_states(db: &Db) -> Result<Vec<EndpointState>, ApiError> {
    db.endpoints().await.map_err(storage)
}

pub(super) async fn endpoints_json(automations: &Automations, db: &Db) -> Result<Value, ApiError> {
    let states = endpoint_states(db).await?;
    let mut names: BTreeSet<(String, String)> =
        configured_endpoints(automations).into_iter().collect();
    for s in &states {
        if !names.iter().any(|(n, _)| *n == s.endpoint) {
            names.insert((
                s.endpoint.clone(),
                agent_of(automations, &s.endpoint).unwrap_or_default(),
            ));
        }
    }
    let list: Vec<Value> = names
        .iter()
        .map(|(n, agent)| {
            let st = states.iter().find(|s| s.endpoint == *n);
            json!({
                "endpoint": n,
                "agent": agent,
                "disabled": st.is_some_and(|s| s.disabled),
                "disabled_reason": st.and_then(|s| s.disabled_reason.clone()),
                "last_success_ms": st.and_then(|s| s.last_success_ms),
                "failing_since_ms": st.and_then(|s| s.failing_since_ms),
            })
        })
        .collect();
    Ok(json!({ "endpoints": list }))
}

pub(crate) async fn recover(
    automations: &Automations,
    db: &Db,
    ep: &str,
    query: &str,
) -> Result<Value, ApiError> {
    let q = query_pairs(query, &["since"])?;
    let since = get(&q, "since")
        .ok_or_else(|| bad("since: required (the time to replay failures from)"))?;
    let since = parse_time("since", since)?;
    known_endpoint(automations, db, ep).await?;
    let n = db
        .recover(ep.to_string(), since, time::now_ms())
        .await
        .map_err(storage)?;
    automations.bus().wake();
    tracing::info!(target: "midcall::admin", endpoint = %ep, replayed = n, "endpoint recovered by an operator");
    Ok(json!({ "endpoint": ep, "replayed": n }))
}

pub(crate) async fn set_disabled(
    automations: &Automations,
    db: &Db,
    ep: &str,
    disabled: bool,
) -> Result<Value, ApiError> {
    known_endpoint(automations, db, ep).await?;
    db.set_endpoint_disabled(
        ep.to_string(),
        disabled,
        disabled.then(|| "disabled by an operator".to_string()),
    )
    .await
    .map_err(storage)?;
    if !disabled {
        automations.bus().wake();
    }
    tracing::info!(target: "midcall::admin", endpoint = %ep, disabled, "endpoint changed by an operator");
    Ok(json!({ "endpoint": ep, "disabled": disabled }))
}
