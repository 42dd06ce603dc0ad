//! One action compiled: every field checked, its templates, JSONPath queries and argument schema
//! compiled once, each problem named by field.

use crate::config::error::Seg;
use crate::config::model::*;
use crate::config::raw::{self, ExtractDef};
use crate::config::tools::ArgSchema;
use crate::jsonpath::{Conversion, ExtractRule, Extractor, Query};
use crate::state::StatePath;
use crate::template::{BodyTemplate, Root, Template, UrlTemplate, ACTION_ROOTS};
use serde_json::Value;
use std::sync::Arc;

use super::*;

/// Headers midcall writes itself.
pub(crate) const MANAGED_HEADERS: &[&str] = &[
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

pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub(crate) fn field_name(path: &[Seg]) -> Option<String> {
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

/// 64 bits of SHA-256 over the action's name and extraction rules.
pub(crate) fn fingerprint(name: &str, rules: &[ExtractRule]) -> u64 {
    let text = format!("{name}\0{rules:?}");
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_le_bytes(b)
}

/// One action: every field checked, templates, queries and schema compiled.
pub(crate) fn compile_action(
    s: &mut Scope<'_>,
    def: raw::ActionDef,
    names: &[String],
) -> Option<ActionSpec> {
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
    let filler = def
        .filler
        .as_ref()
        .map(|f| compile_filler(s, f, timeout_ms));
    let idempotent = def.idempotent.unwrap_or(false);
    let cache = def
        .cache
        .as_ref()
        .and_then(|c| compile_cache(s, c, &headers, method, idempotent));
    let prefetch = compile_prefetch(s, &def, &parameters, &url, &headers, &body);
    let rules = compile_extract(s, &def.extract);
    if def.is_async && !rules.is_empty() {
        s.err(
            at!["extract"],
            "an async action runs in the background and never writes state; remove extract or async",
        );
    }
    let on_failure = compile_on_failure(s, def.on_failure.as_ref());
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
    let on_interrupt = compile_on_interrupt(s, def.on_interrupt.as_deref(), safe);
    let hold = compile_hold(s, &def, safe, prefetch.is_some());
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
    let hedge = compile_hedge(s, def.hedge_after_ms.as_ref(), safe, timeout_ms);
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

pub(crate) fn compile_filler(s: &mut Scope<'_>, f: &raw::FillerDef, timeout_ms: i64) -> Filler {
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
}

pub(crate) fn compile_cache(
    s: &mut Scope<'_>,
    c: &raw::CacheDef,
    headers: &[(String, Template)],
    method: Option<Method>,
    idempotent: bool,
) -> Option<CachePolicy> {
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
}

pub(crate) fn compile_prefetch(
    s: &mut Scope<'_>,
    def: &raw::ActionDef,
    parameters: &Option<ArgSchema>,
    url: &Option<UrlTemplate>,
    headers: &[(String, Template)],
    body: &Option<BodyTemplate>,
) -> Option<Prefetch> {
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
    prefetch
}

pub(crate) fn compile_extract(
    s: &mut Scope<'_>,
    extract: &raw::Pairs<ExtractDef>,
) -> Vec<ExtractRule> {
    let mut rules: Vec<ExtractRule> = Vec::new();
    for (key, e) in &extract.0 {
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
    rules
}

pub(crate) fn compile_on_failure(s: &mut Scope<'_>, def: Option<&raw::OnFailureDef>) -> Fallback {
    let mut on_failure = Fallback::default();
    if let Some(f) = def {
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
    on_failure
}

pub(crate) fn compile_on_interrupt(
    s: &mut Scope<'_>,
    def: Option<&str>,
    safe: bool,
) -> OnInterrupt {
    match def {
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
    }
}

pub(crate) fn compile_hold(
    s: &mut Scope<'_>,
    def: &raw::ActionDef,
    safe: bool,
    prefetch: bool,
) -> Hold {
    match def.hold.as_deref() {
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
        Some("end_of_turn") if prefetch => {
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
    }
}

pub(crate) fn compile_hedge(
    s: &mut Scope<'_>,
    def: Option<&Value>,
    safe: bool,
    timeout_ms: i64,
) -> Option<Hedge> {
    match def {
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
    }
}
