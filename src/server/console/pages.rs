//! The console's pages: agents, deliveries (a list with filters and one with its attempts),
//! runs (a list and one with its steps), one call's events and runs.

use crate::automation::Automations;
use crate::server::admin::{self, ApiError};
use crate::store::Db;
use serde_json::Value;
use std::fmt::Write as _;

use super::*;

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or_default()
}

pub(super) async fn agents_page(
    automations: &Automations,
    db: &Db,
    csrf: &str,
) -> Result<String, ApiError> {
    let data = admin::agents_json(automations);
    let states = admin::endpoint_states(db).await?;
    let agents = data["agents"].as_array().cloned().unwrap_or_default();
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Agents</h1><div class=\"scroll\"><table id=\"agents\"><thead><tr><th>Agent</th><th>Tenant</th><th class=\"num\">Actions</th><th class=\"num\">Webhooks</th><th class=\"num\">Automations</th></tr></thead><tbody>"
    );
    for ag in &agents {
        let id = s(ag, "id");
        let _ = write!(
            b,
            "<tr class=\"agent\"><td><a href=\"#agent-{}\">{}</a></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(id),
            esc(id),
            esc(s(ag, "tenant")),
            ag["actions"].as_array().map_or(0, Vec::len),
            ag["webhooks"].as_array().map_or(0, Vec::len),
            ag["automations"].as_array().map_or(0, Vec::len),
        );
    }
    b.push_str("</tbody></table></div>");
    for ag in &agents {
        let id = s(ag, "id");
        let _ = write!(
            b,
            "<section class=\"card\" id=\"agent-{}\"><h2>{} <span class=\"muted\">· tenant {}</span></h2>",
            esc(id),
            esc(id),
            esc(s(ag, "tenant"))
        );
        b.push_str("<h3>Actions</h3><div class=\"scroll\"><table class=\"actions\"><thead><tr><th>Name</th><th>Method</th><th>URL</th><th>Description</th></tr></thead><tbody>");
        for x in ag["actions"].as_array().into_iter().flatten() {
            let _ = write!(
                b,
                "<tr><td><code>{}</code></td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                esc(s(x, "name")),
                esc(s(x, "method")),
                esc(s(x, "url")),
                esc(s(x, "description"))
            );
        }
        if ag["actions"].as_array().is_none_or(Vec::is_empty) {
            b.push_str("<tr><td colspan=\"4\" class=\"muted\">None.</td></tr>");
        }
        b.push_str("</tbody></table></div><h3>Webhooks</h3><div class=\"scroll\"><table class=\"webhooks\"><thead><tr><th>Label</th><th>Method</th><th>URL</th><th>Subscriptions</th><th>State</th><th>Throttle</th><th>Public key (v1a)</th><th></th></tr></thead><tbody>");
        for w in ag["webhooks"].as_array().into_iter().flatten() {
            let ep = s(w, "endpoint");
            let st = states.iter().find(|x| x.endpoint == ep);
            let disabled = st.is_some_and(|x| x.disabled) || w["enabled"] == Value::Bool(false);
            let subs: Vec<&str> = w["subscriptions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let (act, label) = if disabled {
                ("enable", "Enable")
            } else {
                ("disable", "Disable")
            };
            let _ = write!(
                b,
                "<tr class=\"webhook\" data-endpoint=\"{}\"><td>{}</td><td>POST</td><td><code>{}</code></td><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td><td><a href=\"/console/deliveries?endpoint={}\">Deliveries</a> <form method=\"post\" action=\"/console/endpoints/{}/{act}\" style=\"display:inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\" class=\"{}\">{label}</button></form></td></tr>",
                esc(ep),
                esc(w["label"].as_str().unwrap_or(ep)),
                esc(s(w, "url")),
                esc(&subs.join(", ")),
                badge(if disabled { "disabled" } else { "enabled" }),
                st.and_then(|x| x.disabled_reason.as_deref())
                    .map(|r| format!(" <span class=\"muted\">{}</span>", esc(r)))
                    .unwrap_or_default(),
                w["max_per_second"]
                    .as_f64()
                    .map(|r| format!("{r}/s"))
                    .unwrap_or_else(|| "—".into()),
                w["public_key"]
                    .as_str()
                    .map(|k| format!("<code>{}</code>", esc(k)))
                    .unwrap_or_else(|| "—".into()),
                enc(ep),
                enc(ep),
                esc(csrf),
                if disabled { "plain" } else { "danger" },
            );
        }
        if ag["webhooks"].as_array().is_none_or(Vec::is_empty) {
            b.push_str("<tr><td colspan=\"8\" class=\"muted\">None.</td></tr>");
        }
        b.push_str("</tbody></table></div><h3>Automations</h3><div class=\"scroll\"><table class=\"automations\"><thead><tr><th>Id</th><th>Trigger</th><th>Steps</th><th>Route</th><th></th></tr></thead><tbody>");
        for x in ag["automations"].as_array().into_iter().flatten() {
            let steps: Vec<String> = x["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|st| match (st.get("send_webhook"), st.get("run_action")) {
                    (Some(u), _) => format!(
                        "send_webhook <code>{}</code>",
                        esc(u.as_str().unwrap_or_default())
                    ),
                    (_, Some(a)) => format!(
                        "run_action <code>{}</code>",
                        esc(a.as_str().unwrap_or_default())
                    ),
                    _ => String::new(),
                })
                .collect();
            let _ = write!(
                b,
                "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/console/runs?automation={}\">Runs</a></td></tr>",
                esc(s(x, "id")),
                if x["enabled"] == Value::Bool(false) { " <span class=\"badge s-disabled\">disabled</span>" } else { "" },
                esc(s(x, "trigger")),
                steps.join("<br>"),
                x["route"].as_str().map(|r| format!("<code>POST {}</code>", esc(r))).unwrap_or_else(|| "—".into()),
                enc(s(x, "stored_as")),
            );
        }
        if ag["automations"].as_array().is_none_or(Vec::is_empty) {
            b.push_str("<tr><td colspan=\"5\" class=\"muted\">None.</td></tr>");
        }
        b.push_str("</tbody></table></div></section>");
    }
    Ok(page("Agents", "agents", Some(csrf), &b))
}

pub(super) fn select(name: &str, label: &str, options: &[String], current: Option<&str>) -> String {
    let mut out = format!("<label>{label}<select name=\"{name}\"><option value=\"\">any</option>");
    for o in options {
        let _ = write!(
            out,
            "<option{}>{}</option>",
            if Some(o.as_str()) == current {
                " selected"
            } else {
                ""
            },
            esc(o)
        );
    }
    out.push_str("</select></label>");
    out
}

pub(super) fn text_input(name: &str, label: &str, current: Option<&str>) -> String {
    format!(
        "<label>{label}<input name=\"{name}\" value=\"{}\" size=\"14\"></label>",
        esc(current.unwrap_or_default())
    )
}

pub(super) fn param<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

/// A list page's title and filter form: agent and status menus, then `texts` (name, label).
pub(super) fn filters(
    title: &str,
    action: &str,
    automations: &Automations,
    pairs: &[(String, String)],
    statuses: &[&str],
    texts: &[(&str, &str)],
) -> String {
    let ids: Vec<String> = automations
        .agents()
        .ids()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let statuses: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
    let mut b = format!(
        "<h1>{}</h1><form class=\"filters\" method=\"get\" action=\"{action}\">",
        esc(title)
    );
    b.push_str(&select("agent", "Agent", &ids, param(pairs, "agent")));
    b.push_str(&select(
        "status",
        "Status",
        &statuses,
        param(pairs, "status"),
    ));
    for (name, label) in texts {
        b.push_str(&text_input(name, label, param(pairs, name)));
    }
    b.push_str("<button type=\"submit\">Filter</button></form>");
    b
}

/// The "Older →" link to the next page, when there is one.
pub(super) fn pager(path: &str, pairs: &[(String, String)], next: Option<&str>) -> String {
    let Some(c) = next else {
        return String::new();
    };
    let q = without_cursor(pairs);
    format!(
        "<p class=\"pager\"><a href=\"{path}?{}{}cursor={}\">Older →</a></p>",
        esc(&q),
        if q.is_empty() { "" } else { "&amp;" },
        enc(c)
    )
}

/// The query without `cursor`, to build the next page's link.
pub(super) fn without_cursor(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .filter(|(k, _)| k != "cursor" && k != "replayed")
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub(super) async fn deliveries_page(
    automations: &Automations,
    db: &Db,
    csrf: &str,
    query: &str,
) -> Result<String, ApiError> {
    let filter = admin::delivery_filter(automations, query)?;
    let pairs = admin::query_pairs(query, admin::DELIVERY_PARAMS)?;
    let (rows, next) = admin::find_deliveries(db, filter).await?;
    let mut b = filters(
        "Deliveries",
        "/console/deliveries",
        automations,
        &pairs,
        admin::STATUSES,
        &[
            ("event", "Event"),
            ("call_id", "Call"),
            ("endpoint", "Endpoint"),
        ],
    );
    b.push_str("<div class=\"scroll\"><table id=\"deliveries\"><thead><tr><th>#</th><th>Created</th><th>Status</th><th>Endpoint</th><th>Event</th><th>Call</th><th class=\"num\">Attempts</th><th>Last answer</th></tr></thead><tbody>");
    for (d, attempts) in &rows {
        let last = attempts
            .last()
            .map(|a| match (a.status_code, &a.error) {
                (Some(c), _) => format!("HTTP {c} · {} ms", a.duration_ms),
                (None, Some(e)) => esc(&e.chars().take(80).collect::<String>()),
                _ => String::new(),
            })
            .unwrap_or_else(|| "—".into());
        let _ = write!(
            b,
            "<tr class=\"delivery\" data-id=\"{}\" data-status=\"{}\"><td><a class=\"delivery-link\" href=\"/console/deliveries/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td><a href=\"/console/calls/{}\"><code>{}</code></a></td><td class=\"num\">{}</td><td>{}</td></tr>",
            d.id,
            esc(&d.status),
            d.id,
            d.id,
            when(d.created_ms),
            badge(&d.status),
            esc(&d.endpoint),
            esc(&d.event_type),
            enc(&d.call_id),
            esc(&d.call_id),
            d.attempts,
            last
        );
    }
    if rows.is_empty() {
        b.push_str("<tr><td colspan=\"8\" class=\"muted\">No deliveries match.</td></tr>");
    }
    b.push_str("</tbody></table></div>");
    b.push_str(&pager("/console/deliveries", &pairs, next.as_deref()));
    Ok(page("Deliveries", "deliveries", Some(csrf), &b))
}

pub(super) async fn delivery_page(
    automations: &Automations,
    db: &Db,
    csrf: &str,
    id: &str,
    query: &str,
) -> Result<String, ApiError> {
    let (d, attempts) = admin::delivery_with_attempts(db, id).await?;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Delivery {} <span id=\"status\" class=\"badge s-{}\">{}</span></h1>",
        d.id,
        esc(&d.status),
        esc(&d.status)
    );
    if query.contains("replayed=1") {
        b.push_str("<p class=\"note\">Replay queued: the delivery is sent again now.</p>");
    }
    let _ = write!(
        b,
        "<div class=\"card\"><dl class=\"facts\"><dt>Agent</dt><dd>{}</dd><dt>Endpoint</dt><dd>{}</dd><dt>Event</dt><dd><code>{}</code></dd><dt>Call</dt><dd><a id=\"call-id\" href=\"/console/calls/{}\">{}</a></dd><dt>webhook-id</dt><dd><code>{}</code></dd><dt>Created</dt><dd>{}</dd><dt>Next attempt</dt><dd>{}</dd><dt>Last error</dt><dd>{}</dd></dl>",
        esc(&admin::agent_of(automations, &d.endpoint).unwrap_or_default()),
        esc(&d.endpoint),
        esc(&d.event_type),
        enc(&d.call_id),
        esc(&d.call_id),
        esc(&d.webhook_id),
        when(d.created_ms),
        d.next_attempt_ms.map(when).unwrap_or_else(|| "—".into()),
        esc(d.last_error.as_deref().unwrap_or("—")),
    );
    if d.status != "pending" {
        let _ = write!(
            b,
            "<form id=\"replay\" method=\"post\" action=\"/console/deliveries/{}/replay\" style=\"margin-top:.8rem\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button id=\"replay-button\" class=\"primary\" type=\"submit\">Replay</button></form>",
            d.id,
            esc(csrf)
        );
    }
    b.push_str("</div><h2>Attempts</h2><div class=\"scroll\"><table id=\"attempts\"><thead><tr><th>#</th><th>At</th><th>Answer</th><th class=\"num\">Latency</th><th>Response</th></tr></thead><tbody>");
    for (i, a) in attempts.iter().enumerate() {
        let answer = match (a.status_code, &a.error) {
            (Some(c), _) => format!(
                "<span class=\"badge {}\">{c}</span>",
                if (200..300).contains(&c) {
                    "s-ok"
                } else {
                    "s-failed"
                }
            ),
            (None, Some(e)) => format!("<span class=\"badge s-failed\">{}</span>", esc(e)),
            _ => String::new(),
        };
        let _ = write!(
            b,
            "<tr class=\"attempt\"><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"num\">{} ms</td><td><pre>{}</pre></td></tr>",
            i + 1,
            when(a.at_ms),
            answer,
            a.duration_ms,
            esc(&a.response_prefix.chars().take(2048).collect::<String>())
        );
    }
    if attempts.is_empty() {
        b.push_str("<tr><td colspan=\"5\" class=\"muted\">No attempt yet.</td></tr>");
    }
    b.push_str("</tbody></table></div>");
    Ok(page(
        &format!("Delivery {}", d.id),
        "deliveries",
        Some(csrf),
        &b,
    ))
}

pub(super) async fn runs_page(
    automations: &Automations,
    db: &Db,
    csrf: &str,
    query: &str,
) -> Result<String, ApiError> {
    let filter = admin::run_filter(automations, query)?;
    let pairs = admin::query_pairs(query, admin::RUN_PARAMS)?;
    let (rows, next) = admin::find_runs(db, filter).await?;
    let mut b = filters(
        "Automation runs",
        "/console/runs",
        automations,
        &pairs,
        admin::RUN_STATUSES,
        &[("automation", "Automation"), ("call_id", "Call")],
    );
    b.push_str("<div class=\"scroll\"><table id=\"runs\"><thead><tr><th>Run</th><th>Created</th><th>Status</th><th>Automation</th><th>Trigger</th><th class=\"num\">Steps</th><th>Error</th></tr></thead><tbody>");
    for r in &rows {
        let _ = write!(
            b,
            "<tr class=\"run\" data-status=\"{}\"><td><a class=\"run-link\" href=\"/console/runs/{}\"><code>{}</code></a></td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&r.status),
            enc(&r.id),
            esc(&r.id),
            when(r.created_ms),
            badge(&r.status),
            esc(&r.automation),
            esc(&r.trigger),
            r.steps.len(),
            esc(r.error.as_deref().unwrap_or(""))
        );
    }
    if rows.is_empty() {
        b.push_str("<tr><td colspan=\"7\" class=\"muted\">No runs match.</td></tr>");
    }
    b.push_str("</tbody></table></div>");
    b.push_str(&pager("/console/runs", &pairs, next.as_deref()));
    Ok(page("Runs", "runs", Some(csrf), &b))
}

pub(super) async fn run_page(
    automations: &Automations,
    db: &Db,
    csrf: &str,
    id: &str,
) -> Result<String, ApiError> {
    let r = admin::run_by_id(db, id).await?;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Run <code>{}</code> <span id=\"status\" class=\"badge s-{}\">{}</span></h1><div class=\"card\"><dl class=\"facts\"><dt>Agent</dt><dd>{}</dd><dt>Automation</dt><dd><code>{}</code></dd><dt>Trigger</dt><dd>{}</dd><dt>Call</dt><dd>{}</dd><dt>Created</dt><dd>{}</dd><dt>Finished</dt><dd>{}</dd><dt>Error</dt><dd>{}</dd></dl></div>",
        esc(&r.id),
        esc(&r.status),
        esc(&r.status),
        esc(&admin::agent_of(automations, &r.automation).unwrap_or_default()),
        esc(&r.automation),
        esc(&r.trigger),
        r.call_id
            .as_deref()
            .map(|c| format!("<a href=\"/console/calls/{}\">{}</a>", enc(c), esc(c)))
            .unwrap_or_else(|| format!("<a href=\"/console/calls/{}\">{}</a>", enc(&r.id), esc(&r.id))),
        when(r.created_ms),
        r.finished_ms.map(when).unwrap_or_else(|| "—".into()),
        esc(r.error.as_deref().unwrap_or("—")),
    );
    b.push_str("<h2>Steps</h2><div class=\"scroll\"><table id=\"steps\"><thead><tr><th>#</th><th>Kind</th><th>Status</th><th class=\"num\">Took</th><th>Detail</th></tr></thead><tbody>");
    for st in &r.steps {
        let _ = write!(
            b,
            "<tr class=\"step\"><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"num\">{} ms</td><td>{}</td></tr>",
            st.index + 1,
            esc(&st.kind),
            badge(&st.status),
            st.duration_ms,
            esc(&st.detail)
        );
    }
    if r.steps.is_empty() {
        b.push_str("<tr><td colspan=\"5\" class=\"muted\">No step finished yet.</td></tr>");
    }
    b.push_str("</tbody></table></div>");
    let (deliveries, _) = admin::find_deliveries(
        db,
        crate::store::query::DeliveryFilter {
            call_id: Some(r.call_id.clone().unwrap_or_else(|| r.id.clone())),
            limit: 50,
            ..Default::default()
        },
    )
    .await?;
    let own: Vec<_> = deliveries
        .iter()
        .filter(|(d, _)| d.webhook_id.starts_with(&format!("msg_{}_step", r.id)))
        .collect();
    if !own.is_empty() {
        b.push_str("<h2>Its deliveries</h2><ul>");
        for (d, _) in own {
            let _ = write!(
                b,
                "<li><a href=\"/console/deliveries/{}\">Delivery {}</a> {} <code>{}</code></li>",
                d.id,
                d.id,
                badge(&d.status),
                esc(&d.endpoint)
            );
        }
        b.push_str("</ul>");
    }
    Ok(page(&format!("Run {}", r.id), "runs", Some(csrf), &b))
}

pub(super) async fn call_page(db: &Db, csrf: &str, id: &str) -> Result<String, ApiError> {
    let (deliveries, _) = admin::find_deliveries(
        db,
        crate::store::query::DeliveryFilter {
            call_id: Some(id.to_string()),
            limit: admin::ADMIN_MAX_LIMIT,
            ..Default::default()
        },
    )
    .await?;
    let (runs, _) = admin::find_runs(
        db,
        crate::store::query::RunFilter {
            call_id: Some(id.to_string()),
            limit: admin::ADMIN_MAX_LIMIT,
            ..Default::default()
        },
    )
    .await?;
    // (time, html) of every event delivery, attempt and run, oldest first.
    let mut items: Vec<(i64, String)> = Vec::new();
    for (d, attempts) in &deliveries {
        items.push((
            d.created_ms,
            format!(
                "{} <strong><code>{}</code></strong> published for <code>{}</code> {} <a href=\"/console/deliveries/{}\">delivery {}</a>",
                when(d.created_ms),
                esc(&d.event_type),
                esc(&d.endpoint),
                badge(&d.status),
                d.id,
                d.id
            ),
        ));
        for a in attempts {
            let what = match (a.status_code, &a.error) {
                (Some(c), _) => format!("HTTP {c}"),
                (None, Some(e)) => esc(e),
                _ => String::new(),
            };
            items.push((
                a.at_ms,
                format!(
                    "{} attempt to <code>{}</code>: {} in {} ms",
                    when(a.at_ms),
                    esc(&d.endpoint),
                    what,
                    a.duration_ms
                ),
            ));
        }
    }
    for r in &runs {
        items.push((
            r.created_ms,
            format!(
                "{} run <a href=\"/console/runs/{}\"><code>{}</code></a> of <code>{}</code> ({}) {}",
                when(r.created_ms),
                enc(&r.id),
                esc(&r.id),
                esc(&r.automation),
                esc(&r.trigger),
                badge(&r.status)
            ),
        ));
        for st in &r.steps {
            items.push((
                r.created_ms,
                format!(
                    "&nbsp;&nbsp;step {} <code>{}</code> {} {}",
                    st.index + 1,
                    esc(&st.kind),
                    badge(&st.status),
                    esc(&st.detail.chars().take(300).collect::<String>())
                ),
            ));
        }
    }
    items.sort_by_key(|(t, _)| *t);
    let mut b = format!("<h1>Call <code>{}</code></h1>", esc(id));
    if items.is_empty() {
        b.push_str("<p class=\"muted\">Nothing recorded for this call.</p>");
    }
    b.push_str("<div class=\"card\"><ol id=\"timeline\" class=\"timeline\">");
    for (_, h) in &items {
        let _ = write!(b, "<li>{h}</li>");
    }
    b.push_str("</ol></div><p class=\"muted\">What a call's outbox holds: every event its webhooks subscribe to (actions appear when a webhook subscribes to <code>action</code>), every attempt, and every automation run of the call.</p>");
    Ok(page(&format!("Call {id}"), "", Some(csrf), &b))
}
