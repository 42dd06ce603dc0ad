//! `{{…}}` templates: compiled once at load, rendered into a URL, a header or a JSON body.
//!
//! A placeholder is `{{root.path}}` or `{{root.path | default: <JSON literal>}}`. Roots are
//! `call`, `state`, `args`, `secrets` and `transcript` in actions (`payload` instead of `args`
//! in webhook-started automations). The default applies when the value is missing or null; with
//! no default, a missing value is an error naming the variable, never an empty string.
//!
//! Also secrets and their redaction (`Secret`, `Redactor`, URLs with passwords hidden). May
//! call: `state`; nothing else.

mod body;
mod secrets;
mod url;

pub use body::BodyTemplate;
pub(crate) use secrets::redact_url;
pub use secrets::{EnvSecrets, MapSecrets, Redactor, Secret, SecretSource};
pub use url::UrlTemplate;

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

use crate::state::{CallInfo, ConversationState, Transcript};

/// A template root: the first name inside `{{…}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// `call.*`: the call's facts.
    Call,
    /// `state.*`: the conversation variables.
    State,
    /// `args.*`: the arguments the model gave the tool call.
    Args,
    /// `secrets.NAME`: a secret from the [`SecretSource`].
    Secrets,
    /// `transcript`: the turns so far, as a JSON array.
    Transcript,
    /// `payload.*`: the body of the inbound webhook that started an automation.
    Payload,
}

impl Root {
    /// The name as written in templates.
    pub fn name(self) -> &'static str {
        match self {
            Root::Call => "call",
            Root::State => "state",
            Root::Args => "args",
            Root::Secrets => "secrets",
            Root::Transcript => "transcript",
            Root::Payload => "payload",
        }
    }

    fn from_name(name: &str) -> Option<Root> {
        Some(match name {
            "call" => Root::Call,
            "state" => Root::State,
            "args" => Root::Args,
            "secrets" => Root::Secrets,
            "transcript" => Root::Transcript,
            "payload" => Root::Payload,
            _ => return None,
        })
    }
}

/// The roots an action's templates may use.
pub const ACTION_ROOTS: &[Root] = &[
    Root::Call,
    Root::State,
    Root::Args,
    Root::Secrets,
    Root::Transcript,
];

/// A template that failed to compile. `position` counts characters from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// Character position (1-based) of the placeholder or character at fault.
    pub position: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for TemplateError {}

/// One `{{…}}` placeholder.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Placeholder {
    pub(crate) root: Root,
    pub(crate) path: Vec<Box<str>>,
    pub(crate) default: Option<Value>,
    /// `root.path` as written, for error messages.
    pub(crate) name: Box<str>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Part {
    Lit(Box<str>),
    Var(Placeholder),
}

/// A compiled text template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    source: Box<str>,
    parts: Vec<Part>,
}

impl Template {
    /// Compiles `text`, allowing only `roots`.
    pub fn compile(text: &str, roots: &[Root]) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut offset = 0; // byte offset of `rest` in `text`
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].into()));
            }
            let start = offset + open;
            let after = &rest[open + 2..];
            // The closing braces are the last two of a run, so a default such as
            // `{"k": 1}` can end right before them: `{{args.o | default: {"k": 1}}}`.
            let close = after.find("}}").map(|i| {
                let run = after[i..].bytes().take_while(|b| *b == b'}').count();
                i + run - 2
            });
            let Some(close) = close else {
                return Err(TemplateError {
                    position: char_pos(text, start),
                    message: format!("unclosed \"{{{{\" at character {}", char_pos(text, start)),
                });
            };
            let inner = &after[..close];
            if inner.contains("{{") {
                return Err(TemplateError {
                    position: char_pos(text, start),
                    message: format!(
                        "unclosed \"{{{{\" at character {} (placeholders cannot nest)",
                        char_pos(text, start)
                    ),
                });
            }
            parts.push(Part::Var(parse_placeholder(inner, roots).map_err(
                |message| TemplateError {
                    position: char_pos(text, start),
                    message: format!(
                        "{message} (placeholder at character {})",
                        char_pos(text, start)
                    ),
                },
            )?));
            let consumed = open + 2 + close + 2;
            rest = &rest[consumed..];
            offset += consumed;
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.into()));
        }
        Ok(Template {
            source: text.into(),
            parts,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when the template has no placeholder.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// The one placeholder when the template is exactly `{{…}}` and nothing else.
    pub(crate) fn single(&self) -> Option<&Placeholder> {
        match self.parts.as_slice() {
            [Part::Var(p)] => Some(p),
            _ => None,
        }
    }

    pub(crate) fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The placeholders, in order.
    pub(crate) fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v),
            Part::Lit(_) => None,
        })
    }

    /// Renders as plain text: strings as they are, numbers and booleans as JSON text, objects
    /// and arrays as compact JSON.
    pub fn render_text(
        &self,
        ctx: &RenderContext<'_>,
        redactor: &mut Redactor,
    ) -> Result<String, RenderErrorKind> {
        let mut out = String::with_capacity(self.source.len());
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Var(p) => {
                    let v = ctx.resolve(p, redactor)?;
                    push_text(&mut out, &v);
                }
            }
        }
        Ok(out)
    }

    /// Renders a header value: like [`Template::render_text`], but CR, LF, NUL and other
    /// control characters (tab excepted) are refused.
    pub fn render_header(
        &self,
        ctx: &RenderContext<'_>,
        redactor: &mut Redactor,
    ) -> Result<String, RenderErrorKind> {
        let out = self.render_text(ctx, redactor)?;
        check_header_value(&out)?;
        Ok(out)
    }
}

/// Refuses characters that would break or inject HTTP header lines.
pub(crate) fn check_header_value(s: &str) -> Result<(), RenderErrorKind> {
    if let Some(c) = s
        .chars()
        .find(|c| (c.is_control() && *c != '\t') || *c == '\u{7f}')
    {
        let what = match c {
            '\r' => "a carriage return (CR)".to_string(),
            '\n' => "a line feed (LF)".to_string(),
            '\0' => "a NUL byte".to_string(),
            c => format!("the control character U+{:04X}", c as u32),
        };
        return Err(RenderErrorKind::HeaderInjection { what });
    }
    Ok(())
}

fn push_text(out: &mut String, v: &Value) {
    match v {
        Value::String(s) => out.push_str(s),
        other => out.push_str(&other.to_string()),
    }
}

fn char_pos(text: &str, byte: usize) -> usize {
    text[..byte].chars().count() + 1
}

fn parse_placeholder(inner: &str, roots: &[Root]) -> Result<Placeholder, String> {
    let (expr, filter) = match inner.find('|') {
        Some(i) => (&inner[..i], Some(&inner[i + 1..])),
        None => (inner, None),
    };
    let expr = expr.trim();
    if expr.is_empty() {
        return Err("empty placeholder \"{{}}\"".into());
    }
    let expected = roots
        .iter()
        .map(|r| r.name())
        .collect::<Vec<_>>()
        .join(", ");
    let mut segs = expr.split('.');
    let root_name = segs.next().unwrap_or_default();
    let root = Root::from_name(root_name)
        .filter(|r| roots.contains(r))
        .ok_or_else(|| format!("unknown template root \"{root_name}\" (expected {expected})"))?;
    let path: Vec<Box<str>> = segs.map(Into::into).collect();
    for seg in &path {
        if seg.is_empty()
            || !seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "\"{expr}\" is not a valid variable (use names of letters, digits, '_' and '-' separated by '.')"
            ));
        }
    }
    match root {
        Root::Call => match path.as_slice() {
            [field] if CallInfo::FIELDS.contains(&&**field) => {}
            _ => {
                return Err(format!(
                    "\"{expr}\": unknown call field (expected call.{})",
                    CallInfo::FIELDS.join(", call.")
                ))
            }
        },
        Root::Secrets => {
            if path.len() != 1 {
                return Err(format!(
                    "\"{expr}\": a secret is named by one word, as in secrets.CRM_TOKEN"
                ));
            }
        }
        Root::Transcript => {
            if !path.is_empty() {
                return Err(format!(
                    "\"{expr}\": transcript has no fields; use {{{{transcript}}}}"
                ));
            }
        }
        Root::State | Root::Args | Root::Payload => {}
    }
    let default = match filter {
        None => None,
        Some(f) => {
            let f = f.trim();
            let Some(lit) = f.strip_prefix("default:") else {
                let name = f.split(':').next().unwrap_or(f).trim();
                return Err(format!(
                    "unknown filter \"{name}\" (expected default: <JSON value>)"
                ));
            };
            if root == Root::Secrets {
                return Err("a secret cannot have a default".into());
            }
            Some(serde_json::from_str::<Value>(lit.trim()).map_err(|e| {
                format!(
                    "default for \"{expr}\" is not a JSON literal ({e}); quote strings: default: \"checkup\""
                )
            })?)
        }
    };
    Ok(Placeholder {
        root,
        path,
        default,
        name: expr.into(),
    })
}

/// What a template reads when it renders.
#[derive(Clone, Copy)]
pub struct RenderContext<'a> {
    /// `call.*`.
    pub call: &'a CallInfo,
    /// `state.*`.
    pub state: &'a ConversationState,
    /// `args.*`: the tool call's arguments (a JSON object), or `Null` when there are none.
    pub args: &'a Value,
    /// `transcript`.
    pub transcript: &'a Transcript,
    /// `secrets.*`.
    pub secrets: &'a dyn SecretSource,
    /// `payload.*`, for webhook-started automations.
    pub payload: Option<&'a Value>,
}

impl fmt::Debug for RenderContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenderContext")
            .field("call", &self.call.id)
            .finish_non_exhaustive()
    }
}

impl<'a> RenderContext<'a> {
    /// Looks a placeholder up, applying its default when the value is missing or null.
    pub(crate) fn resolve(
        &self,
        p: &Placeholder,
        redactor: &mut Redactor,
    ) -> Result<Cow<'a, Value>, RenderErrorKind> {
        let found: Option<Cow<'a, Value>> = match p.root {
            Root::Call => p
                .path
                .first()
                .and_then(|f| self.call.field(f))
                .map(Cow::Owned),
            Root::State => {
                if p.path.is_empty() {
                    Some(Cow::Owned(self.state.to_value()))
                } else {
                    self.state
                        .get_segments(p.path.iter().map(|s| &**s))
                        .map(Cow::Borrowed)
                }
            }
            Root::Args => walk(self.args, &p.path).map(Cow::Borrowed),
            Root::Payload => self
                .payload
                .and_then(|v| walk(v, &p.path))
                .map(Cow::Borrowed),
            Root::Transcript => Some(Cow::Owned(self.transcript.to_value())),
            Root::Secrets => {
                let name = p.path.first().map(|s| &**s).unwrap_or_default();
                return match self.secrets.secret(name) {
                    Some(secret) => {
                        redactor.add(&secret);
                        Ok(Cow::Owned(Value::String(secret.expose().to_string())))
                    }
                    None => Err(RenderErrorKind::MissingSecret {
                        message: self.secrets.describe(name),
                    }),
                };
            }
        };
        match found {
            Some(v) if !v.is_null() => Ok(v),
            _ => match &p.default {
                Some(d) => Ok(Cow::Owned(d.clone())),
                None => Err(RenderErrorKind::Missing {
                    variable: p.name.to_string(),
                }),
            },
        }
    }
}

fn walk<'v>(mut v: &'v Value, path: &[Box<str>]) -> Option<&'v Value> {
    for seg in path {
        v = match v {
            Value::Object(m) => m.get(&**seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// Why rendering failed. Never carries a rendered value (it could hold a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderErrorKind {
    /// A variable has no value and no default.
    #[error("no value for {variable} and no default (write {{{{{variable} | default: ...}}}} to allow it to be missing)")]
    Missing {
        /// `root.path` as written.
        variable: String,
    },
    /// A secret is not available.
    #[error("{message}")]
    MissingSecret {
        /// Where it was looked for.
        message: String,
    },
    /// An object or array was put where only text fits.
    #[error("{variable} is {kind}; only strings, numbers and booleans can go into a URL")]
    NotScalar {
        /// `root.path` as written.
        variable: String,
        /// "an object" or "an array".
        kind: &'static str,
    },
    /// A rendered header value contains a character that could inject header lines.
    #[error("rendered value contains {what}, which could inject headers; refused")]
    HeaderInjection {
        /// The character, in words.
        what: String,
    },
}

/// A rendering failure, naming the field (`url`, `header "authorization"`, `body`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {kind}")]
pub struct RenderError {
    /// The part of the request that failed.
    pub field: String,
    /// Why.
    pub kind: RenderErrorKind,
}

impl RenderError {
    pub(crate) fn new(field: impl Into<String>, kind: RenderErrorKind) -> Self {
        RenderError {
            field: field.into(),
            kind,
        }
    }
}

/// The owned inputs of a rendering: call facts, state, transcript and payload (what an
/// automation run's templates read, stored with the run).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct RenderInputs {
    pub(crate) call: CallInfo,
    pub(crate) state: ConversationState,
    #[serde(default)]
    pub(crate) transcript: Transcript,
    #[serde(default)]
    pub(crate) payload: Value,
}

impl RenderInputs {
    /// What a run's templates read: its call, state, transcript and payload (no `args`).
    pub(crate) fn render_context<'a>(&'a self, secrets: &'a dyn SecretSource) -> RenderContext<'a> {
        RenderContext {
            call: &self.call,
            state: &self.state,
            args: &Value::Null,
            transcript: &self.transcript,
            secrets,
            payload: Some(&self.payload),
        }
    }
}

impl Default for RenderInputs {
    fn default() -> Self {
        RenderInputs {
            call: CallInfo {
                id: String::new(),
                agent_id: String::new(),
                tenant: String::new(),
                from_number: String::new(),
                to_number: String::new(),
                is_outgoing: false,
                started_at: String::new(),
            },
            state: ConversationState::new(),
            transcript: Transcript::default(),
            payload: Value::Null,
        }
    }
}
