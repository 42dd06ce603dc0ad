//! Secrets: where they come from, and how they are kept out of everything that is shown.

use std::collections::HashMap;
use std::fmt;

/// A secret value. Its `Debug` and `Display` print `***`; only [`Secret::expose`] reveals it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<Box<str>>) -> Secret {
        Secret(value.into())
    }

    /// The value itself. Only for putting it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where `{{secrets.NAME}}` values come from. The embedding program may pass its own (a vault
/// client, say); the default is [`EnvSecrets`].
pub trait SecretSource: Send + Sync {
    /// The secret called `name`, if there is one.
    fn secret(&self, name: &str) -> Option<Secret>;

    /// Where a missing secret was looked for, for error messages (never the value).
    fn describe(&self, name: &str) -> String {
        format!("secret \"{name}\" is not set")
    }
}

/// Reads `{{secrets.NAME}}` from the environment variable `MIDCALL_SECRET_<NAME>`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvSecrets;

impl EnvSecrets {
    /// The environment variable that holds secret `name`.
    pub fn variable(name: &str) -> String {
        format!("MIDCALL_SECRET_{name}")
    }
}

impl SecretSource for EnvSecrets {
    fn secret(&self, name: &str) -> Option<Secret> {
        std::env::var(Self::variable(name)).ok().map(Secret::new)
    }

    fn describe(&self, name: &str) -> String {
        format!(
            "secret \"{name}\" is not set (set the environment variable {})",
            Self::variable(name)
        )
    }
}

/// Secrets held in memory, for tests and programs that load them themselves.
#[derive(Clone, Default)]
pub struct MapSecrets(HashMap<String, Secret>);

impl MapSecrets {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret.
    pub fn with(mut self, name: impl Into<String>, value: impl Into<Box<str>>) -> Self {
        self.0.insert(name.into(), Secret::new(value));
        self
    }
}

impl fmt::Debug for MapSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.0.keys().collect();
        names.sort();
        f.debug_struct("MapSecrets").field("names", &names).finish()
    }
}

impl SecretSource for MapSecrets {
    fn secret(&self, name: &str) -> Option<Secret> {
        self.0.get(name).cloned()
    }
}

/// The secrets a rendering used, in every form they may take in rendered text (raw,
/// JSON-escaped, percent-encoded), so anything shown can be redacted to `***`.
#[derive(Clone, Default)]
pub struct Redactor {
    forms: Vec<String>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} forms)", self.forms.len())
    }
}

impl Redactor {
    /// Remembers a secret that went into rendered text.
    pub fn add(&mut self, secret: &Secret) {
        let raw = secret.expose();
        if raw.is_empty() {
            return;
        }
        let mut forms = vec![raw.to_string()];
        if let Ok(json) = serde_json::to_string(raw) {
            forms.push(json[1..json.len() - 1].to_string());
        }
        forms.push(super::url::encode_component(raw));
        for form in forms {
            if !form.is_empty() && !self.forms.contains(&form) {
                self.forms.push(form);
            }
        }
        // Longest first, so a secret containing another is replaced whole.
        self.forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    }

    /// True when no secret was used.
    pub fn is_empty(&self) -> bool {
        self.forms.is_empty()
    }

    /// True when any form of any secret occurs in `text`.
    pub fn appears_in(&self, text: &str) -> bool {
        self.forms.iter().any(|f| text.contains(f.as_str()))
    }

    /// `text` with every form of every secret replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for form in &self.forms {
            if out.contains(form.as_str()) {
                out = out.replace(form.as_str(), "***");
            }
        }
        out
    }
}

/// A database or cache URL (`postgres://`, `redis://`) with its password replaced by `***` (for every message that names it).
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let Some(at) = authority.rfind('@') else {
        return redact_query(url);
    };
    let (user_pass, host) = authority.split_at(at);
    let user = match user_pass.split_once(':') {
        Some((u, _)) => format!("{u}:***"),
        None => user_pass.to_string(),
    };
    redact_query(&format!("{scheme}://{user}{host}{tail}"))
}

fn redact_query(url: &str) -> String {
    // `?password=...` is also accepted by libpq-style URLs.
    let Some((base, q)) = url.split_once('?') else {
        return url.to_string();
    };
    let q: Vec<String> = q
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{base}?{}", q.join("&"))
}
