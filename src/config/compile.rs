//! Validation and compilation of a parsed config into an [`ActionSet`]: every template,
//! JSONPath, schema and header name is built here, once. Every problem is collected, so one
//! `midcall check` run shows them all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::error::{Problem, Seg};
use super::model::*;
use super::raw::{self, AgentFile, ExtractDef};
use super::tools::ArgSchema;
use super::EventType;
use crate::jsonpath::{Conversion, ExtractRule, Extractor, Query};
use crate::state::StatePath;
use crate::template::{
    check_header_value, BodyTemplate, Part, Root, Template, TemplateError, UrlTemplate,
    ACTION_ROOTS,
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

/// Headers midcall writes itself.
const MANAGED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "accept-encoding",
];

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn field_name(path: &[Seg]) -> Option<String> {
    if path.is_empty() {
        return None;
    }
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                if k.is_empty() || k.contains(['.', ' ', '"']) {
                    out.push_str(&format!("{k:?}"));
                } else {
                    out.push_str(k);
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    Some(out)
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
    let agent = {
        let mut s = Scope {
            problems: &mut problems,
            base: at!["agent"],
            prefix: Vec::new(),
            context: None,
        };
        if !valid_name(&file.agent.id) {
            s.err(
                at!["id"],
                "agent id must be 1-64 letters, digits, '_' or '-'",
            );
        }
        if file.agent.tenant.trim().is_empty() {
            s.err(at!["tenant"], "tenant must not be empty");
        }
        Agent {
            id: file.agent.id,
            tenant: file.agent.tenant,
            name: file.agent.name,
            phone_number: file.agent.phone_number,
        }
    };

    // Names first, so later checks can refer to any action.
    let mut first_index: HashMap<&str, usize> = HashMap::new();
    for (i, a) in file.actions.iter().enumerate() {
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
    let names: Vec<String> = file.actions.iter().map(|a| a.name.clone()).collect();

    let mut actions = Vec::with_capacity(file.actions.len());
    for (i, def) in file.actions.into_iter().enumerate() {
        let mut s = Scope {
            problems: &mut problems,
            base: at!["actions", i],
            prefix: Vec::new(),
            context: Some(format!("action \"{}\"", def.name)),
        };
        if let Some(a) = compile_action(&mut s, def, &names) {
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
    // The cap is the host's: every action to an origin shares the one `[[origins]]` or an
    // action sets there.
    let mut caps: HashMap<String, (u32, String)> = HashMap::new();
    for (i, o) in file.origins.iter().enumerate() {
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
    for a in &mut actions {
        if let Some((n, _)) = caps.get(a.url.origin()) {
            a.max_in_flight = Some(*n);
        }
    }
    let actions: Vec<Arc<ActionSpec>> = actions.into_iter().map(Arc::new).collect();

    let mut webhooks = Vec::new();
    let mut labels: HashMap<String, usize> = HashMap::new();
    for (i, def) in file.webhooks.into_iter().enumerate() {
        let context = match &def.label {
            Some(l) => format!("webhook \"{l}\""),
            None => format!("webhook {}", i + 1),
        };
        let mut s = Scope {
            problems: &mut problems,
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

    let mut inbound = InboundConfig::default();
    {
        let mut s = Scope {
            problems: &mut problems,
            base: at!["inbound"],
            prefix: Vec::new(),
            context: Some("inbound".into()),
        };
        let def = &file.inbound;
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
    let global_auth = inbound.auth.is_some();
    // A webhook-started run has no call, so the actions it runs may not read `call.*`.
    let call_uses: HashMap<String, (String, String)> = actions
        .iter()
        .filter_map(|a| first_call_use(a).map(|u| (a.name.clone(), u)))
        .collect();

    let mut automations = Vec::new();
    let mut automation_ids: HashMap<String, usize> = HashMap::new();
    for (i, def) in file.automations.into_iter().enumerate() {
        let mut s = Scope {
            problems: &mut problems,
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
        if let Some(a) = compile_automation(&mut s, def, &names, &call_uses, global_auth) {
            automations.push(a);
        }
    }

    let mut egress = EgressConfig {
        allow_http: file.egress.allow_http,
        allow_networks: Vec::new(),
    };
    for (i, net) in file.egress.allow_networks.iter().enumerate() {
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

/// 64 bits of SHA-256 over the action's name and extraction rules.
fn fingerprint(name: &str, rules: &[ExtractRule]) -> u64 {
    let text = format!("{name}\0{rules:?}");
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_le_bytes(b)
}

/// Parses a CIDR, or a bare address as a single-host network.
fn compile_action(s: &mut Scope<'_>, def: raw::ActionDef, names: &[String]) -> Option<ActionSpec> {
    let before = s.problems.len();
    if !valid_name(&def.name) {
        s.err(
            at!["name"],
            "a tool name must be 1-64 letters, digits, '_' or '-' (models reject other names)",
        );
    }
    if def.description.trim().is_empty() {
        s.err(
            at!["description"],
            "must not be empty: the model reads it to decide when to call the tool",
        );
    }
    let method = Method::parse(&def.method);
    if method.is_none() {
        s.err(
            at!["method"],
            format!(
                "bad method \"{}\" (expected GET, HEAD, POST, PUT, PATCH or DELETE)",
                def.method
            ),
        );
    }
    let url = s.url(at!["url"], &def.url, ACTION_ROOTS);
    let headers = s.headers(&def.headers, ACTION_ROOTS);
    let body = match &def.body {
        Some(b) => {
            if method.is_some_and(Method::is_safe) {
                s.err(
                    at!["body"],
                    format!(
                        "a {} request carries no body; remove it or use POST",
                        def.method
                    ),
                );
            }
            s.body(at!["body"], b, ACTION_ROOTS)
        }
        None => None,
    };
    let parameters = match &def.parameters {
        Some(p) => match ArgSchema::compile(p) {
            Ok(schema) => Some(schema),
            Err(e) => {
                s.err(at!["parameters"], e);
                None
            }
        },
        None => None,
    };
    let timeout_ms = def.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS as i64);
    if !(1..=MAX_TIMEOUT_MS as i64).contains(&timeout_ms) {
        s.err(
            at!["timeout_ms"],
            format!("{timeout_ms} is out of range (1 to {MAX_TIMEOUT_MS} ms)"),
        );
    }
    let filler = def.filler.as_ref().map(|f| {
        if !(1..timeout_ms).contains(&f.after_ms) {
            s.err(
                at!["filler", "after_ms"],
                format!(
                    "{} must be at least 1 and below timeout_ms ({timeout_ms}), or the filler never plays",
                    f.after_ms
                ),
            );
        }
        if f.say.trim().is_empty() {
            s.err(at!["filler", "say"], "must not be empty");
        }
        Filler {
            after: ms(f.after_ms),
            say: f.say.clone(),
        }
    });
    let idempotent = def.idempotent.unwrap_or(false);
    let cache = def.cache.as_ref().and_then(|c| {
        let before = s.problems.len();
        if !(1..=7 * 86_400).contains(&c.ttl_s) {
            s.err(
                at!["cache", "ttl_s"],
                format!("{} is out of range (1 to 604800 seconds)", c.ttl_s),
            );
        }
        let scope = match &c.scope {
            None => CacheScope::Call,
            Some(name) => CacheScope::parse(name).unwrap_or_else(|| {
                s.err(
                    at!["cache", "scope"],
                    format!("unknown scope \"{name}\" (expected call, agent, tenant or global)"),
                );
                CacheScope::Call
            }),
        };
        let stale = c.stale_s.unwrap_or(0);
        if !(0..=7 * 86_400).contains(&stale) {
            s.err(
                at!["cache", "stale_s"],
                format!("{stale} is out of range (0 to 604800 seconds)"),
            );
        }
        if let Some(n) = c.negative_ttl_s {
            if !(1..=7 * 86_400).contains(&n) {
                s.err(
                    at!["cache", "negative_ttl_s"],
                    format!("{n} is out of range (1 to 604800 seconds)"),
                );
            }
        }
        let mut key_headers = Vec::new();
        for (i, h) in c.key_headers.iter().enumerate() {
            let lower = h.to_ascii_lowercase();
            if !headers.iter().any(|(n, _)| *n == lower) {
                s.err(
                    at!["cache", "key_headers", i],
                    format!("\"{h}\" is not one of the action's headers"),
                );
            }
            key_headers.push(lower);
        }
        if let Some(m) = method {
            if !m.is_safe() && !idempotent {
                s.err(
                    at!["cache"],
                    format!("{m} responses are cached only when the action sets idempotent = true"),
                );
            }
        }
        (s.problems.len() == before).then(|| CachePolicy {
            ttl: secs(c.ttl_s),
            scope,
            stale: secs(stale),
            key_headers,
            negative_ttl: c.negative_ttl_s.map(secs),
        })
    });
    let prefetch = match def.prefetch.as_deref() {
        None => None,
        Some("call_start") => Some(Prefetch::CallStart),
        Some(other) => {
            s.err(
                at!["prefetch"],
                format!("unknown prefetch \"{other}\" (expected \"call_start\")"),
            );
            None
        }
    };
    if prefetch.is_some() {
        if let Some(p) = &parameters {
            if !p.required().is_empty() {
                s.err(
                    at!["prefetch"],
                    format!(
                        "a prefetched action runs before the model gives arguments, but parameters require {}",
                        p.required().join(", ")
                    ),
                );
            }
        }
        let mut templates: Vec<&Template> = headers.iter().map(|(_, t)| t).collect();
        if let Some(b) = &body {
            templates.extend(b.templates());
        }
        let needs_args = templates
            .iter()
            .flat_map(|t| t.placeholders())
            .chain(url.iter().flat_map(|u| u.placeholders()))
            .find(|p| p.root == Root::Args && p.default.is_none());
        if let Some(p) = needs_args {
            s.err(
                at!["prefetch"],
                format!(
                    "a prefetched action runs before the model gives arguments, but it uses {{{{{}}}}} with no default",
                    p.name
                ),
            );
        }
    }
    let mut rules: Vec<ExtractRule> = Vec::new();
    for (key, e) in &def.extract.0 {
        let path = at!["extract", key];
        let target = match StatePath::parse(key) {
            Ok(t) => t,
            Err(m) => {
                s.err(path, m);
                continue;
            }
        };
        let (query_text, required, default, conversion, all) = match e {
            ExtractDef::Short(q) => (q.as_str(), false, None, None, false),
            ExtractDef::Long(l) => (
                l.path.as_str(),
                l.required,
                l.default.clone(),
                l.conversion.as_deref(),
                l.all,
            ),
        };
        let conversion = match conversion {
            None => Conversion::Json,
            Some(c) => match Conversion::parse(c) {
                Some(c) => c,
                None => {
                    s.err(
                        path,
                        format!("unknown conversion as = \"{c}\" (expected string, number, bool or json)"),
                    );
                    continue;
                }
            },
        };
        let query = match Query::compile(query_text) {
            Ok(q) => q,
            Err(e) => {
                s.err(
                    path,
                    format!(
                        "invalid JSONPath {query_text:?} at character {}: {}",
                        e.position, e.message
                    ),
                );
                continue;
            }
        };
        if let Some(other) = rules.iter().find(|r| r.target.overlaps(&target)) {
            s.err(
                path,
                format!(
                    "two extractions write the same state path (\"{}\" and \"{}\")",
                    other.target, target
                ),
            );
            continue;
        }
        rules.push(ExtractRule {
            target,
            query,
            required,
            default,
            conversion,
            all,
        });
    }
    if def.is_async && !rules.is_empty() {
        s.err(
            at!["extract"],
            "an async action runs in the background and never writes state; remove extract or async",
        );
    }
    let mut on_failure = Fallback::default();
    if let Some(f) = &def.on_failure {
        if let Some(say) = &f.say {
            if say.trim().is_empty() {
                s.err(at!["on_failure", "say"], "must not be empty");
            }
        }
        on_failure.say = f.say.clone();
        for (key, v) in &f.set.0 {
            match StatePath::parse(key) {
                Ok(p) => on_failure.set.push((p, v.clone())),
                Err(m) => s.err(at!["on_failure", "set", key], m),
            }
        }
    }
    for (i, name) in def.invalidates.iter().enumerate() {
        if !names.contains(name) {
            s.err(at!["invalidates", i], format!("unknown action \"{name}\""));
        }
    }
    let max = def
        .max_response_bytes
        .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES as i64);
    if !(1..=MAX_RESPONSE_BYTES_LIMIT as i64).contains(&max) {
        s.err(
            at!["max_response_bytes"],
            format!("{max} is out of range (1 to {MAX_RESPONSE_BYTES_LIMIT})"),
        );
    }
    let safe = idempotent || method.as_ref().is_some_and(|m| m.is_safe());
    let on_interrupt = match def.on_interrupt.as_deref() {
        None if safe => OnInterrupt::Cancel,
        None => OnInterrupt::Finish,
        Some("cancel") => OnInterrupt::Cancel,
        Some("finish") => OnInterrupt::Finish,
        Some(other) => {
            s.err(
                at!["on_interrupt"],
                format!("unknown value \"{other}\" (expected \"cancel\" or \"finish\")"),
            );
            OnInterrupt::Cancel
        }
    };
    let hold = match def.hold.as_deref() {
        None => Hold::No,
        Some("end_of_turn") if safe => {
            s.err(
                at!["hold"],
                "reads are never held: a GET/HEAD or idempotent action has no side effect to hold back",
            );
            Hold::No
        }
        Some("end_of_turn") if def.is_async => {
            s.err(
                at!["hold"],
                "an async action is not waited for; hold applies to actions whose outcome the model gets",
            );
            Hold::No
        }
        Some("end_of_turn") if prefetch.is_some() => {
            s.err(
                at!["hold"],
                "a prefetched action runs when the call connects, before any turn; it cannot be held",
            );
            Hold::No
        }
        Some("end_of_turn") => Hold::EndOfTurn,
        Some(other) => {
            s.err(
                at!["hold"],
                format!("unknown value \"{other}\" (expected \"end_of_turn\")"),
            );
            Hold::No
        }
    };
    let max_in_flight = match def.max_in_flight {
        None => None,
        Some(n) if (1..=100_000).contains(&n) => Some(n as u32),
        Some(n) => {
            s.err(
                at!["max_in_flight"],
                format!("{n} is out of range (1 to 100000 requests at once)"),
            );
            None
        }
    };
    let hedge = match &def.hedge_after_ms {
        None => None,
        Some(_) if !safe => {
            s.err(
                at!["hedge_after_ms"],
                "only reads are hedged: a second request of a non-idempotent action could do it twice",
            );
            None
        }
        Some(Value::String(a)) if a == "auto" => Some(Hedge::Auto),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(v) if v >= 1 && v < timeout_ms => Some(Hedge::After(ms(v))),
            _ => {
                s.err(
                    at!["hedge_after_ms"],
                    format!("{n} must be a whole number of milliseconds from 1 to below timeout_ms ({timeout_ms})"),
                );
                None
            }
        },
        Some(other) => {
            s.err(
                at!["hedge_after_ms"],
                format!("expected a whole number of milliseconds or \"auto\", got {other}"),
            );
            None
        }
    };
    if s.problems.len() != before {
        return None;
    }
    Some(ActionSpec {
        fingerprint: fingerprint(&def.name, &rules),
        name: def.name,
        description: def.description,
        method: method?,
        url: url?,
        headers,
        body,
        parameters,
        timeout: ms(timeout_ms),
        filler,
        cache,
        prefetch,
        extract: Arc::new(Extractor::new(rules)),
        invalidates_resolved: Vec::new(),
        on_failure,
        idempotent,
        is_async: def.is_async,
        dedupe: def.dedupe.unwrap_or(true),
        on_interrupt,
        hold,
        max_in_flight,
        hedge,
        invalidates: def.invalidates,
        max_response_bytes: max as u64,
    })
}

fn compile_webhook(s: &mut Scope<'_>, def: raw::WebhookDef) -> Option<WebhookSpec> {
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
fn compile_auth(s: &mut Scope<'_>, a: &raw::AuthDef, path: Vec<Seg>) -> Option<InboundAuth> {
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

/// Where an action first reads `call.*`: the field and the placeholder.
fn first_call_use(a: &ActionSpec) -> Option<(String, String)> {
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

fn compile_automation(
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
    let trigger = match def.trigger.on.as_str() {
        "call_completed" => match &def.trigger.agents {
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
            if def.trigger.agents.is_some() {
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
    };
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
    let mut steps = Vec::new();
    for (i, step) in def.steps.iter().enumerate() {
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
                    (&trigger, call_uses.get(&r.action))
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
