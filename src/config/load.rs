//! Reading a config file (TOML or JSON) and placing every error at its line and column.

use std::path::Path;

use super::compile::compile;
use super::error::{ConfigError, LoadError, Problem, Seg};
use super::model::ActionSet;
use super::raw::AgentFile;
use super::structure::{deserialize_all, read};

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
        load_any(name, text, syntax)
    }
}

/// Every problem of the file in one report: structural ones (unknown fields, wrong types),
/// then, when the file could still be read, the semantic ones; each at its line and column.
fn load_any(name: &str, text: &str, syntax: Syntax) -> Result<ActionSet, LoadError> {
    if syntax == Syntax::Json {
        // A JSON value keeps the last of duplicate keys; only the typed reader sees them.
        if let Err(e) = serde_json::from_str::<AgentFile>(text) {
            let m = e.to_string();
            if m.starts_with("duplicate key") || m.starts_with("duplicate field") {
                let msg = e.to_string();
                let msg = msg
                    .rfind(" at line ")
                    .map_or(msg.clone(), |i| msg[..i].to_string());
                let at = super::structure::json_position(text, e.line(), e.column());
                return Err(LoadError::one(name, Some(at), msg));
            }
        }
    }
    let (value, locator) = read(name, text, syntax)?;
    let (file, mut errors) = deserialize_all::<AgentFile>(name, value, &locator, entry_context);
    if let Some(file) = file {
        match compile(file, name) {
            Ok(set) if errors.is_empty() => return Ok(set),
            Ok(_) => {}
            Err(problems) => errors.extend(
                problems
                    .into_iter()
                    .map(|p| to_error(name, locator.locate(&p.path), p)),
            ),
        }
    }
    errors.sort_by_key(|e| e.location.unwrap_or((usize::MAX, 0)));
    Err(LoadError { errors })
}

/// What a path is in: `action "book"`, `webhook 1`, `automation "crm-sync"`, `[agent]`; and
/// how many path steps that takes.
fn entry_context(file: &serde_json::Value, path: &[Seg]) -> (Option<String>, usize) {
    let (Some(Seg::Key(top)), rest) = (path.first(), path.get(1)) else {
        return (None, 0);
    };
    let entry = |label: &str, id_key: &str| match rest {
        Some(Seg::Index(i)) => {
            let id = file[top.as_str()][*i][id_key].as_str();
            (
                Some(match id {
                    Some(id) => format!("{label} \"{id}\""),
                    None => format!("{label} {}", i + 1),
                }),
                2,
            )
        }
        _ => (None, 0),
    };
    match top.as_str() {
        "actions" => entry("action", "name"),
        "webhooks" => entry("webhook", "label"),
        "automations" => entry("automation", "id"),
        "agent" | "egress" | "inbound" if path.len() > 1 => (Some(format!("[{top}]")), 1),
        _ => (None, 0),
    }
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
pub(crate) fn span_of(root: &toml_edit::Item, path: &[Seg]) -> Option<usize> {
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
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..offset].chars().count() + 1)
}
