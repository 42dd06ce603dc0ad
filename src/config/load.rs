//! Reading a config file (TOML or JSON) and placing every error at its line and column.

use std::path::Path;

use super::compile::compile;
use super::error::{ConfigError, LoadError, Problem, Seg};
use super::model::ActionSet;
use super::raw::AgentFile;

/// The syntax of a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// TOML (`.toml`).
    Toml,
    /// JSON (`.json`).
    Json,
}

/// Largest config file accepted: 4 MiB.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

impl ActionSet {
    /// Loads and compiles an agent file; `.json` files are JSON, anything else TOML.
    pub fn load(path: impl AsRef<Path>) -> Result<ActionSet, LoadError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let meta = std::fs::metadata(path)
            .map_err(|e| LoadError::one(&name, None, format!("cannot read: {e}")))?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(LoadError::one(
                &name,
                None,
                format!(
                    "{} bytes is over the {MAX_CONFIG_BYTES}-byte limit for a config file",
                    meta.len()
                ),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| LoadError::one(&name, None, format!("cannot read: {e}")))?;
        let syntax = if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        {
            Syntax::Json
        } else {
            Syntax::Toml
        };
        let file_name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or(name);
        Self::from_str(&file_name, &text, syntax)
    }

    /// Loads and compiles an agent file held in memory. `name` is used in error messages.
    pub fn from_str(name: &str, text: &str, syntax: Syntax) -> Result<ActionSet, LoadError> {
        match syntax {
            Syntax::Toml => load_toml(name, text),
            Syntax::Json => load_json(name, text),
        }
    }
}

fn load_toml(name: &str, text: &str) -> Result<ActionSet, LoadError> {
    let file: AgentFile = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let location = e.span().map(|s| line_col(text, s.start));
            let context = e.span().and_then(|s| context_at(text, s.start));
            return Err(LoadError {
                errors: vec![ConfigError {
                    file: name.to_string(),
                    location,
                    context,
                    field: None,
                    message: e.message().trim().to_string(),
                }],
            });
        }
    };
    compile(file, name).map_err(|problems| {
        let doc = toml_edit::ImDocument::parse(text).ok();
        let mut errors: Vec<ConfigError> = problems
            .into_iter()
            .map(|p| {
                let location = doc
                    .as_ref()
                    .and_then(|d| span_of(d.as_item(), &p.path))
                    .map(|start| line_col(text, start));
                to_error(name, location, p)
            })
            .collect();
        errors.sort_by_key(|e| e.location.unwrap_or((usize::MAX, 0)));
        LoadError { errors }
    })
}

fn load_json(name: &str, text: &str) -> Result<ActionSet, LoadError> {
    let file: AgentFile = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let msg = e.to_string();
            let msg = match msg.rfind(" at line ") {
                Some(i) => msg[..i].to_string(),
                None => msg,
            };
            return Err(LoadError::one(name, Some((e.line(), e.column())), msg));
        }
    };
    compile(file, name).map_err(|problems| LoadError {
        errors: problems
            .into_iter()
            .map(|p| to_error(name, None, p))
            .collect(),
    })
}

fn to_error(name: &str, location: Option<(usize, usize)>, p: Problem) -> ConfigError {
    ConfigError {
        file: name.to_string(),
        location,
        context: p.context,
        field: p.field,
        message: p.message,
    }
}

/// The start of the value at `path`, or of its nearest ancestor that has a span.
fn span_of(root: &toml_edit::Item, path: &[Seg]) -> Option<usize> {
    let mut best = None;
    let mut item = Some(root);
    let mut value: Option<&toml_edit::Value> = None;
    for seg in path {
        if let Some(it) = item {
            let next = match seg {
                Seg::Key(k) => it.get(k.as_str()),
                Seg::Index(i) => it.get(*i),
            };
            match next {
                Some(toml_edit::Item::Value(v)) => {
                    item = None;
                    value = Some(v);
                    best = v.span().map(|s| s.start).or(best);
                }
                Some(n) => {
                    best = n.span().map(|s| s.start).or(best);
                    item = Some(n);
                }
                None => return best,
            }
        } else if let Some(v) = value {
            let next = match (seg, v) {
                (Seg::Key(k), toml_edit::Value::InlineTable(t)) => t.get(k),
                (Seg::Index(i), toml_edit::Value::Array(a)) => a.get(*i),
                _ => None,
            };
            match next {
                Some(n) => {
                    best = n.span().map(|s| s.start).or(best);
                    value = Some(n);
                }
                None => return best,
            }
        }
    }
    best
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..offset].chars().count() + 1)
}

/// Names the `[[actions]]`, `[[webhooks]]` or `[[automations]]` entry a serde error falls in.
fn context_at(text: &str, offset: usize) -> Option<String> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut found: Option<(usize, String)> = None;
    for (key, label, id_key) in [
        ("actions", "action", "name"),
        ("webhooks", "webhook", "label"),
        ("automations", "automation", "id"),
    ] {
        let Some(toml_edit::Item::ArrayOfTables(tables)) = doc.get(key) else {
            continue;
        };
        for (i, t) in tables.iter().enumerate() {
            let Some(start) = t.span().map(|s| s.start) else {
                continue;
            };
            if start <= offset && found.as_ref().is_none_or(|(s, _)| start > *s) {
                let name = t
                    .get(id_key)
                    .and_then(|v| v.as_str())
                    .map(|n| format!("{label} \"{n}\""))
                    .unwrap_or_else(|| format!("{label} {}", i + 1));
                found = Some((start, name));
            }
        }
    }
    found.map(|(_, n)| n)
}
