//! Webhooks, inbound credentials and automations compiled: their URLs, secrets, triggers and
//! steps checked against the actions they run.

use crate::config::error::Seg;
use crate::config::raw::{self};
use crate::config::EventType;
use crate::template::Root;
use serde_json::Value;
use std::collections::HashMap;

use super::*;

pub(crate) fn compile_webhook(s: &mut Scope<'_>, def: raw::WebhookDef) -> Option<WebhookSpec> {
    let before = s.problems.len();
    let url = s.url(at!["url"], &def.url, &[Root::Secrets]);
    let mut subscriptions = Vec::new();
    if def.subscriptions.is_empty() {
        s.err(at!["subscriptions"], "subscribe to at least one event type");
    }
    for (i, name) in def.subscriptions.iter().enumerate() {
        match EventType::parse(name) {
            Some(t) if subscriptions.contains(&t) => {
                s.err(
                    at!["subscriptions", i],
                    format!("\"{name}\" is listed twice"),
                );
            }
            Some(t) => subscriptions.push(t),
            None => s.err(
                at!["subscriptions", i],
                format!(
                    "unknown event type \"{name}\" (expected {})",
                    EventType::ALL.map(|t| t.name()).join(", ")
                ),
            ),
        }
    }
    let headers = s.headers(&def.headers, &[Root::Secrets]);
    let signing_secret = def
        .signing_secret
        .as_deref()
        .and_then(|t| s.secret_template(at!["signing_secret"], t));
    let signing_key = def.signing_key.as_deref().and_then(|text| {
        let t = s.template(at!["signing_key"], text, &[Root::Secrets])?;
        if t.is_literal() {
            s.err(
                at!["signing_key"],
                "expected {{secrets.NAME}} holding a whsk_ ed25519 key (a private key never goes in a config file)",
            );
            return None;
        }
        Some(t)
    });
    if let Some(r) = def.max_per_second {
        if !(r.is_finite() && (0.01..=100_000.0).contains(&r)) {
            s.err(
                at!["max_per_second"],
                format!("{r} is out of range (0.01 to 100000 deliveries per second)"),
            );
        }
    }
    if s.problems.len() != before {
        return None;
    }
    Some(WebhookSpec {
        label: def.label,
        url: url?,
        subscriptions,
        headers,
        signing_secret,
        signing_key,
        max_per_second: def.max_per_second,
        enabled: def.enabled,
    })
}

/// Inbound credentials: a bearer key from secrets and/or a signing secret.
pub(crate) fn compile_auth(
    s: &mut Scope<'_>,
    a: &raw::AuthDef,
    path: Vec<Seg>,
) -> Option<InboundAuth> {
    if a.bearer.is_none() && a.signing_secret.is_none() {
        s.err(path, "give bearer, signing_secret or both");
        return None;
    }
    let before = s.problems.len();
    let sub = |last: &str| {
        let mut p = path.clone();
        p.push(Seg::from(last));
        p
    };
    let bearer = a.bearer.as_deref().and_then(|b| {
        let t = s.template(sub("bearer"), b, &[Root::Secrets])?;
        if t.is_literal() {
            s.err(
                sub("bearer"),
                "expected {{secrets.NAME}}: a literal key in a config file is a leaked key",
            );
            return None;
        }
        Some(t)
    });
    let signing_secret = a
        .signing_secret
        .as_deref()
        .and_then(|t| s.secret_template(sub("signing_secret"), t));
    if s.problems.len() != before {
        return None;
    }
    Some(InboundAuth {
        bearer,
        signing_secret,
    })
}

/// Where an action first reads `call.*`: the field and the placeholder.
pub(crate) fn first_call_use(a: &ActionSpec) -> Option<(String, String)> {
    let is_call = |p: &&crate::template::Placeholder| p.root == Root::Call;
    if let Some(p) = a.url.placeholders().find(is_call) {
        return Some(("url".into(), p.name.to_string()));
    }
    for (h, t) in &a.headers {
        if let Some(p) = t.placeholders().find(is_call) {
            return Some((format!("headers.{h}"), p.name.to_string()));
        }
    }
    let body = a.body.as_ref()?.templates();
    body.iter()
        .find_map(|t| t.placeholders().find(is_call))
        .map(|p| ("body".to_string(), p.name.to_string()))
}

pub(crate) fn compile_automation(
    s: &mut Scope<'_>,
    def: raw::AutomationDef,
    names: &[String],
    call_uses: &HashMap<String, (String, String)>,
    global_auth: bool,
) -> Option<AutomationSpec> {
    let before = s.problems.len();
    if !valid_name(&def.id) {
        s.err(
            at!["id"],
            "an automation id must be 1-64 letters, digits, '_' or '-' (it appears in URLs)",
        );
    }
    let trigger = compile_trigger(s, &def.trigger);
    // URL and headers are rendered again at each delivery attempt, so they may use secrets
    // (never stored); bodies and arguments are stored in the outbox, so they may not.
    let (roots, stored): (&[Root], &[Root]) = match trigger {
        // A webhook run has no call; its state starts empty and run_action steps write it.
        Some(Trigger::Webhook) => (
            &[Root::State, Root::Payload, Root::Secrets],
            &[Root::State, Root::Payload],
        ),
        _ => (
            &[Root::Call, Root::State, Root::Payload, Root::Secrets],
            &[Root::Call, Root::State, Root::Payload, Root::Transcript],
        ),
    };
    let auth = def.auth.as_ref().and_then(|a| {
        if !matches!(trigger, Some(Trigger::Webhook)) {
            s.err(
                at!["auth"],
                "only automations triggered by a webhook take inbound credentials",
            );
            return None;
        }
        compile_auth(s, a, at!["auth"])
    });
    if matches!(trigger, Some(Trigger::Webhook)) && def.auth.is_none() && !global_auth {
        s.err(
            at!["auth"],
            "a webhook automation needs credentials: give auth = { bearer = \"{{secrets.NAME}}\" } (and/or signing_secret) here or in [inbound]",
        );
    }
    if def.steps.is_empty() {
        s.err(at!["steps"], "an automation needs at least one step");
    }
    let steps = compile_steps(
        s,
        &def.steps,
        trigger.as_ref(),
        names,
        call_uses,
        (roots, stored),
    );
    if s.problems.len() != before {
        return None;
    }
    Some(AutomationSpec {
        id: def.id,
        enabled: def.enabled,
        trigger: trigger?,
        auth,
        steps,
    })
}

fn compile_trigger(s: &mut Scope<'_>, def: &raw::TriggerDef) -> Option<Trigger> {
    match def.on.as_str() {
        "call_completed" => match &def.agents {
            Some(raw::AgentsDef::All) => Some(Trigger::CallCompleted {
                agents: AgentScope::All,
            }),
            Some(raw::AgentsDef::List(list)) if !list.is_empty() => Some(Trigger::CallCompleted {
                agents: AgentScope::Only(list.clone()),
            }),
            _ => {
                s.err(
                    at!["trigger", "agents"],
                    "call_completed needs agents = \"all\" or a non-empty list of agent ids",
                );
                None
            }
        },
        "webhook" => {
            if def.agents.is_some() {
                s.err(
                    at!["trigger", "agents"],
                    "a webhook trigger has no agents; remove it",
                );
            }
            Some(Trigger::Webhook)
        }
        other => {
            s.err(
                at!["trigger", "on"],
                format!("unknown trigger \"{other}\" (expected call_completed or webhook)"),
            );
            None
        }
    }
}

/// The steps; `roots` are what their URL and headers may read, `stored` what their bodies
/// and arguments (kept in the outbox) may.
fn compile_steps(
    s: &mut Scope<'_>,
    defs: &[raw::StepDef],
    trigger: Option<&Trigger>,
    names: &[String],
    call_uses: &HashMap<String, (String, String)>,
    (roots, stored): (&[Root], &[Root]),
) -> Vec<Step> {
    let mut steps = Vec::new();
    for (i, step) in defs.iter().enumerate() {
        match step {
            raw::StepDef::SendWebhook(w) => {
                let base = || at!["steps", i, "send_webhook"];
                let mut p = base();
                p.push(Seg::from("url"));
                let url = s.url(p, &w.url, roots);
                let mut headers = Vec::new();
                let mut sub = Scope {
                    problems: &mut *s.problems,
                    base: s.base.clone(),
                    prefix: base(),
                    context: s.context.clone(),
                };
                headers.extend(sub.headers(&w.headers, roots));
                let body = w
                    .body
                    .as_ref()
                    .and_then(|b| sub.stored_body(at!["body"], b, stored));
                let signing_secret = w
                    .signing_secret
                    .as_deref()
                    .and_then(|t| sub.secret_template(at!["signing_secret"], t));
                if let Some(url) = url {
                    steps.push(Step::SendWebhook {
                        url,
                        headers,
                        body,
                        signing_secret,
                    });
                }
            }
            raw::StepDef::RunAction(r) => {
                if !names.contains(&r.action) {
                    s.err(
                        at!["steps", i, "run_action", "action"],
                        format!("unknown action \"{}\"", r.action),
                    );
                    continue;
                }
                if let (Some(Trigger::Webhook), Some((field, var))) =
                    (trigger, call_uses.get(&r.action))
                {
                    s.err(
                        at!["steps", i, "run_action", "action"],
                        format!(
                            "action \"{}\" reads {{{{{var}}}}} in its {field}, but a run started by a webhook has no call; pass the value from the payload as an argument instead (args = {{ name = \"{{{{payload.name}}}}\" }}, read as {{{{args.name}}}})",
                            r.action
                        ),
                    );
                }
                let args = match &r.args {
                    None => None,
                    Some(v @ Value::Object(_)) => {
                        s.stored_body(at!["steps", i, "run_action", "args"], v, stored)
                    }
                    Some(_) => {
                        s.err(
                            at!["steps", i, "run_action", "args"],
                            "args must be a table",
                        );
                        None
                    }
                };
                steps.push(Step::RunAction {
                    action: r.action.clone(),
                    args,
                });
            }
        }
    }
    steps
}
