//! Validation and compilation of a parsed config into an [`ActionSet`]: every template,
//! JSONPath, schema and header name is built here, once. Every problem is collected, so one
//! `midcall check` run shows them all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::error::{Problem, Seg};
use super::model::*;
use super::raw::{self, AgentFile};
use crate::template::{
    check_header_value, BodyTemplate, Part, Root, Template, TemplateError, UrlTemplate,
};

impl From<&str> for Seg {
    fn from(s: &str) -> Seg {
        Seg::Key(s.to_string())
    }
}

impl From<&String> for Seg {
    fn from(s: &String) -> Seg {
        Seg::Key(s.clone())
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Seg {
        Seg::Index(i)
    }
}

macro_rules! at {
    ($($s:expr),* $(,)?) => { vec![$(Seg::from($s)),*] };
}

mod action;
mod automation;

use action::*;
use automation::*;

/// Collects problems for one item (an action, a webhook...).
struct Scope<'a> {
    problems: &'a mut Vec<Problem>,
    base: Vec<Seg>,
    /// Part of both the location and the field name (`steps[0].send_webhook`).
    prefix: Vec<Seg>,
    context: Option<String>,
}

impl Scope<'_> {
    fn err(&mut self, path: Vec<Seg>, message: impl Into<String>) {
        let mut rel = self.prefix.clone();
        rel.extend(path);
        let field = field_name(&rel);
        let mut full = self.base.clone();
        full.extend(rel);
        self.problems.push(Problem {
            path: full,
            context: self.context.clone(),
            field,
            message: message.into(),
        });
    }

    fn template(&mut self, path: Vec<Seg>, text: &str, roots: &[Root]) -> Option<Template> {
        match Template::compile(text, roots) {
            Ok(t) => Some(t),
            Err(e) => {
                self.err(path, e.message);
                None
            }
        }
    }

    fn url(&mut self, path: Vec<Seg>, text: &str, roots: &[Root]) -> Option<UrlTemplate> {
        match UrlTemplate::compile(text, roots) {
            Ok(t) => Some(t),
            Err(e) => {
                self.err(path, e.message);
                None
            }
        }
    }

    fn body(&mut self, path: Vec<Seg>, value: &Value, roots: &[Root]) -> Option<BodyTemplate> {
        match BodyTemplate::compile(value, roots) {
            Ok(b) => Some(b),
            Err((at, TemplateError { message, .. })) => {
                let mut p = path;
                if !at.is_empty() {
                    p.push(Seg::Key(at));
                }
                self.err(p, message);
                None
            }
        }
    }

    /// A body that is stored (outbox, run log): secrets are refused with a message saying why.
    fn stored_body(
        &mut self,
        path: Vec<Seg>,
        value: &Value,
        roots: &[Root],
    ) -> Option<BodyTemplate> {
        if BodyTemplate::compile(value, roots).is_err() {
            let mut with_secrets = roots.to_vec();
            with_secrets.push(Root::Secrets);
            if BodyTemplate::compile(value, &with_secrets).is_ok() {
                self.err(
                    path,
                    "secrets cannot go in an automation's body or args: they are stored in the outbox and shown in logs; put the secret in a header or signing_secret",
                );
                return None;
            }
        }
        self.body(path, value, roots)
    }

    fn headers(&mut self, defs: &raw::Pairs<String>, roots: &[Root]) -> Vec<(String, Template)> {
        let mut out: Vec<(String, Template)> = Vec::new();
        for (name, value) in &defs.0 {
            let path = at!["headers", name];
            let lower = name.to_ascii_lowercase();
            if lower.is_empty() || !lower.bytes().all(is_tchar) {
                self.err(path, format!("\"{name}\" is not a valid header name"));
                continue;
            }
            if MANAGED_HEADERS.contains(&lower.as_str()) {
                self.err(
                    path,
                    format!("\"{name}\" is set by midcall and cannot be configured"),
                );
                continue;
            }
            if out.iter().any(|(n, _)| *n == lower) {
                self.err(
                    path,
                    format!("header \"{name}\" is given twice (names are case-insensitive)"),
                );
                continue;
            }
            let Some(t) = self.template(path.clone(), value, roots) else {
                continue;
            };
            let literal_bad = t.parts().iter().find_map(|p| match p {
                Part::Lit(s) => check_header_value(s).err(),
                Part::Var(_) => None,
            });
            if let Some(e) = literal_bad {
                self.err(path, e.to_string());
                continue;
            }
            out.push((lower, t));
        }
        out
    }

    fn secret_template(&mut self, path: Vec<Seg>, text: &str) -> Option<Template> {
        let t = self.template(path.clone(), text, &[Root::Secrets])?;
        if t.is_literal() && !text.starts_with("whsec_") {
            self.err(
                path,
                "expected {{secrets.NAME}} or a literal whsec_ secret (prefer the secret: config files get shared)",
            );
            return None;
        }
        Some(t)
    }
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(v.max(0) as u64)
}

fn secs(v: i64) -> Duration {
    Duration::from_secs(v.max(0) as u64)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Validates and compiles a parsed file. `Err` holds every problem found.
pub(crate) fn compile(file: AgentFile, source: &str) -> Result<ActionSet, Vec<Problem>> {
    let mut problems = Vec::new();
    let agent = compile_agent(&mut problems, file.agent);
    // Names first, so later checks can refer to any action.
    let names = action_names(&mut problems, &file.actions);
    let mut actions = compile_actions(&mut problems, file.actions, &names);
    apply_origin_caps(&mut problems, &file.origins, &mut actions);
    let actions: Vec<Arc<ActionSpec>> = actions.into_iter().map(Arc::new).collect();
    let webhooks = compile_webhooks(&mut problems, file.webhooks);
    let inbound = compile_inbound(&mut problems, &file.inbound);
    let automations = compile_automations(
        &mut problems,
        file.automations,
        &names,
        &actions,
        inbound.auth.is_some(),
    );
    let egress = compile_egress(&mut problems, &file.egress);
    if !problems.is_empty() {
        return Err(problems);
    }
    let by_name = actions
        .iter()
        .enumerate()
        .map(|(i, a)| (a.name.clone(), i))
        .collect();
    let secret_names = secret_names(&actions, &webhooks, &automations, &inbound);
    Ok(ActionSet {
        source: source.to_string(),
        agent,
        actions,
        by_name,
        webhooks,
        automations,
        egress,
        inbound,
        secret_names,
    })
}

fn compile_agent(problems: &mut Vec<Problem>, def: raw::AgentDef) -> Agent {
    let mut s = Scope {
        problems,
        base: at!["agent"],
        prefix: Vec::new(),
        context: None,
    };
    if !valid_name(&def.id) {
        s.err(
            at!["id"],
            "agent id must be 1-64 letters, digits, '_' or '-'",
        );
    }
    if def.tenant.trim().is_empty() {
        s.err(at!["tenant"], "tenant must not be empty");
    }
    Agent {
        id: def.id,
        tenant: def.tenant,
        name: def.name,
        phone_number: def.phone_number,
    }
}

fn action_names(problems: &mut Vec<Problem>, actions: &[raw::ActionDef]) -> Vec<String> {
    let mut first_index: HashMap<&str, usize> = HashMap::new();
    for (i, a) in actions.iter().enumerate() {
        if let Some(first) = first_index.get(a.name.as_str()) {
            problems.push(Problem {
                path: at!["actions", i, "name"],
                context: Some(format!("action \"{}\"", a.name)),
                field: Some("name".into()),
                message: format!(
                    "duplicate action name \"{}\" (first defined as action {})",
                    a.name,
                    first + 1
                ),
            });
        } else {
            first_index.insert(&a.name, i);
        }
    }
    actions.iter().map(|a| a.name.clone()).collect()
}

/// Every action compiled, with `invalidates` resolved once all are.
fn compile_actions(
    problems: &mut Vec<Problem>,
    defs: Vec<raw::ActionDef>,
    names: &[String],
) -> Vec<ActionSpec> {
    let mut actions = Vec::with_capacity(defs.len());
    for (i, def) in defs.into_iter().enumerate() {
        let mut s = Scope {
            problems,
            base: at!["actions", i],
            prefix: Vec::new(),
            context: Some(format!("action \"{}\"", def.name)),
        };
        if let Some(a) = compile_action(&mut s, def, names) {
            actions.push(a);
        }
    }
    // Resolve `invalidates` now that every action is compiled.
    let targets: HashMap<String, (u64, Option<CacheScope>)> = actions
        .iter()
        .map(|a| {
            (
                a.name.clone(),
                (a.fingerprint, a.cache.as_ref().map(|c| c.scope)),
            )
        })
        .collect();
    for a in &mut actions {
        a.invalidates_resolved = a
            .invalidates
            .iter()
            .filter_map(|n| match targets.get(n) {
                Some((fp, Some(scope))) => Some((*fp, *scope)),
                _ => None,
            })
            .collect();
    }
    actions
}

/// The in-flight cap of each origin: one `[[origins]]` entry or action sets it for every
/// action sent there.
fn apply_origin_caps(
    problems: &mut Vec<Problem>,
    origins: &[raw::OriginDef],
    actions: &mut [ActionSpec],
) {
    // The cap is the host's: every action to an origin shares the one `[[origins]]` or an
    // action sets there.
    let mut caps: HashMap<String, (u32, String)> = HashMap::new();
    for (i, o) in origins.iter().enumerate() {
        let mut problem = |field: &str, message: String| {
            problems.push(Problem {
                path: at!["origins", i, field],
                context: Some(format!("origin {}", i + 1)),
                field: Some(field.into()),
                message,
            })
        };
        let origin = match crate::template::UrlTemplate::compile(&o.url, &[]) {
            Ok(u) if u.source_is_origin() => u.origin().to_string(),
            Ok(_) => {
                problem("url", format!("\"{}\" is not just scheme and host (no path or query), e.g. \"https://crm.example.com\"", o.url));
                continue;
            }
            Err(e) => {
                problem("url", e.message);
                continue;
            }
        };
        if !actions.iter().any(|a| a.url.origin() == origin) {
            let known: Vec<&str> = {
                let mut v: Vec<&str> = actions.iter().map(|a| a.url.origin()).collect();
                v.sort_unstable();
                v.dedup();
                v
            };
            problem(
                "url",
                format!(
                    "no action is sent to {origin} (the actions' origins: {})",
                    known.join(", ")
                ),
            );
            continue;
        }
        if caps.contains_key(&origin) {
            problem("url", format!("{origin} is listed twice"));
            continue;
        }
        match o.max_in_flight {
            None => {}
            Some(n) if (1..=100_000).contains(&n) => {
                caps.insert(origin, (n as u32, format!("[[origins]] {}", i + 1)));
            }
            Some(n) => problem(
                "max_in_flight",
                format!("{n} is out of range (1 to 100000 requests at once)"),
            ),
        }
    }
    for (i, a) in actions.iter().enumerate() {
        let Some(n) = a.max_in_flight else { continue };
        match caps.get(a.url.origin()) {
            Some((m, first)) if *m != n => problems.push(Problem {
                path: at!["actions", i, "max_in_flight"],
                context: Some(format!("action \"{}\"", a.name)),
                field: Some("max_in_flight".into()),
                message: format!(
                    "{n} differs from the {m} that {first} sets for {}; the cap is the host's, give one value",
                    a.url.origin()
                ),
            }),
            Some(_) => {}
            None => {
                caps.insert(
                    a.url.origin().to_string(),
                    (n, format!("action \"{}\"", a.name)),
                );
            }
        }
    }
    for a in actions.iter_mut() {
        if let Some((n, _)) = caps.get(a.url.origin()) {
            a.max_in_flight = Some(*n);
        }
    }
}

fn compile_webhooks(problems: &mut Vec<Problem>, defs: Vec<raw::WebhookDef>) -> Vec<WebhookSpec> {
    let mut webhooks = Vec::new();
    let mut labels: HashMap<String, usize> = HashMap::new();
    for (i, def) in defs.into_iter().enumerate() {
        let context = match &def.label {
            Some(l) => format!("webhook \"{l}\""),
            None => format!("webhook {}", i + 1),
        };
        let mut s = Scope {
            problems,
            base: at!["webhooks", i],
            prefix: Vec::new(),
            context: Some(context),
        };
        // The label names the endpoint in the outbox and the delivery log.
        if let Some(label) = &def.label {
            if let Some(first) = labels.get(label) {
                s.err(
                    at!["label"],
                    format!(
                        "duplicate webhook label \"{label}\" (first used by webhook {})",
                        first + 1
                    ),
                );
            } else {
                labels.insert(label.clone(), i);
            }
        }
        if let Some(w) = compile_webhook(&mut s, def) {
            webhooks.push(w);
        }
    }
    webhooks
}

fn compile_inbound(problems: &mut Vec<Problem>, def: &raw::InboundDef) -> InboundConfig {
    let mut inbound = InboundConfig::default();
    {
        let mut s = Scope {
            problems,
            base: at!["inbound"],
            prefix: Vec::new(),
            context: Some("inbound".into()),
        };
        inbound.auth = def
            .auth
            .as_ref()
            .and_then(|a| compile_auth(&mut s, a, at!["auth"]));
        if let Some(n) = def.max_body_bytes {
            if n < 2 || n as u64 > MAX_INBOUND_BODY_BYTES as u64 {
                s.err(
                    at!["max_body_bytes"],
                    format!("{n} is out of range (2 to {MAX_INBOUND_BODY_BYTES})"),
                );
            } else {
                inbound.max_body_bytes = n as usize;
            }
        }
        if let Some(r) = &def.rate_limit {
            if !(r.per_second.is_finite() && r.per_second > 0.0 && r.per_second <= 1e6) {
                s.err(
                    at!["rate_limit", "per_second"],
                    format!(
                        "{} is out of range (above 0, at most 1000000)",
                        r.per_second
                    ),
                );
            } else {
                inbound.rate_per_second = r.per_second;
            }
            if !(1..=1_000_000).contains(&r.burst) {
                s.err(
                    at!["rate_limit", "burst"],
                    format!("{} is out of range (1 to 1000000)", r.burst),
                );
            } else {
                inbound.burst = r.burst as u32;
            }
        }
    }
    inbound
}

fn compile_automations(
    problems: &mut Vec<Problem>,
    defs: Vec<raw::AutomationDef>,
    names: &[String],
    actions: &[Arc<ActionSpec>],
    global_auth: bool,
) -> Vec<AutomationSpec> {
    // A webhook-started run has no call, so the actions it runs may not read `call.*`.
    let call_uses: HashMap<String, (String, String)> = actions
        .iter()
        .filter_map(|a| first_call_use(a).map(|u| (a.name.clone(), u)))
        .collect();

    let mut automations = Vec::new();
    let mut automation_ids: HashMap<String, usize> = HashMap::new();
    for (i, def) in defs.into_iter().enumerate() {
        let mut s = Scope {
            problems,
            base: at!["automations", i],
            prefix: Vec::new(),
            context: Some(format!("automation \"{}\"", def.id)),
        };
        if let Some(first) = automation_ids.get(&def.id) {
            s.err(
                at!["id"],
                format!(
                    "duplicate automation id \"{}\" (first defined as automation {})",
                    def.id,
                    first + 1
                ),
            );
        } else {
            automation_ids.insert(def.id.clone(), i);
        }
        if let Some(a) = compile_automation(&mut s, def, names, &call_uses, global_auth) {
            automations.push(a);
        }
    }
    automations
}

fn compile_egress(problems: &mut Vec<Problem>, def: &raw::EgressDef) -> EgressConfig {
    let mut egress = EgressConfig {
        allow_http: def.allow_http,
        allow_networks: Vec::new(),
    };
    for (i, net) in def.allow_networks.iter().enumerate() {
        match crate::config::parse_network(net) {
            Some(n) => egress.allow_networks.push(n),
            None => problems.push(Problem {
                path: at!["egress", "allow_networks", i],
                context: Some("egress".into()),
                field: Some(format!("allow_networks[{i}]")),
                message: format!("\"{net}\" is not a CIDR such as 10.0.0.0/8 or fd00::/8"),
            }),
        }
    }
    egress
}

/// Every secret the compiled templates name, sorted, once each.
fn secret_names(
    actions: &[Arc<ActionSpec>],
    webhooks: &[WebhookSpec],
    automations: &[AutomationSpec],
    inbound: &InboundConfig,
) -> Vec<String> {
    let mut templates: Vec<&Template> = Vec::new();
    let mut urls: Vec<&UrlTemplate> = Vec::new();
    let auths = automations
        .iter()
        .filter_map(|a| a.auth.as_ref())
        .chain(inbound.auth.as_ref());
    for auth in auths {
        templates.extend(auth.bearer.iter().chain(&auth.signing_secret));
    }
    for a in actions {
        urls.push(&a.url);
        templates.extend(a.headers.iter().map(|(_, t)| t));
        templates.extend(a.body.iter().flat_map(|b| b.templates()));
    }
    for w in webhooks {
        urls.push(&w.url);
        templates.extend(w.headers.iter().map(|(_, t)| t));
        templates.extend(&w.signing_secret);
    }
    for step in automations.iter().flat_map(|a| &a.steps) {
        match step {
            Step::SendWebhook {
                url,
                headers,
                body,
                signing_secret,
            } => {
                urls.push(url);
                templates.extend(headers.iter().map(|(_, t)| t));
                templates.extend(body.iter().flat_map(|b| b.templates()));
                templates.extend(signing_secret);
            }
            Step::RunAction { args, .. } => {
                templates.extend(args.iter().flat_map(|b| b.templates()));
            }
        }
    }
    let names: std::collections::BTreeSet<String> = templates
        .iter()
        .flat_map(|t| t.placeholders())
        .chain(urls.iter().flat_map(|u| u.placeholders()))
        .filter(|p| p.root == Root::Secrets)
        .filter_map(|p| p.path.first().map(|n| n.to_string()))
        .collect();
    names.into_iter().collect()
}
