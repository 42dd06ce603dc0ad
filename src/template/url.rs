//! URL templates: scheme and host are literal, placeholders in the path and query are
//! percent-encoded for the component they sit in.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::{Part, Redactor, RenderContext, RenderErrorKind, Root, Template, TemplateError};
use serde_json::Value;

/// Everything but RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`) is encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a value for a URL path segment or query component.
pub(crate) fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Component {
    Path,
    Query,
}

/// A compiled URL template, e.g. `https://crm.example.com/v1/customers?phone={{call.from_number}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct UrlTemplate {
    https: bool,
    host: Box<str>,
    port: u16,
    /// `scheme://authority`, literal.
    base: Box<str>,
    rest: Vec<(Part, Component)>,
    source: Box<str>,
}

impl UrlTemplate {
    /// Compiles a URL template. Scheme (`http` or `https`) and authority must be literal;
    /// credentials in the URL and fragments are refused.
    pub fn compile(text: &str, roots: &[Root]) -> Result<UrlTemplate, TemplateError> {
        let err = |position: usize, message: String| TemplateError { position, message };
        let template = Template::compile(text, roots)?;
        let mut parts = template.parts.into_iter();
        let first = match parts.next() {
            Some(Part::Lit(s)) => s,
            _ => {
                return Err(err(
                    1,
                    "the URL must start with literal http:// or https:// and a host".into(),
                ))
            }
        };
        let (https, after_scheme) = if let Some(r) = first.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = first.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(err(1, "the URL must start with http:// or https://".into()));
        };
        let scheme_len = if https { 8 } else { 7 };
        let auth_end = after_scheme
            .find(['/', '?', '#'])
            .unwrap_or(after_scheme.len());
        let authority = &after_scheme[..auth_end];
        if auth_end == after_scheme.len() && parts.len() > 0 {
            return Err(err(
                scheme_len + 1,
                "the host must be literal text; placeholders may appear in the path and query only"
                    .into(),
            ));
        }
        if authority.contains('@') {
            return Err(err(
                scheme_len + 1,
                "credentials in the URL are refused (they leak into logs); send them in a header from a secret".into(),
            ));
        }
        let (host, port) = split_authority(authority, https).map_err(|m| err(scheme_len + 1, m))?;
        let mut rest = Vec::new();
        let mut component = Component::Path;
        let mut pos = scheme_len + authority.chars().count();
        let push_lit = |s: &str,
                        rest: &mut Vec<(Part, Component)>,
                        component: &mut Component,
                        pos: &mut usize|
         -> Result<(), TemplateError> {
            for c in s.chars() {
                *pos += 1;
                if c == '#' {
                    return Err(err(
                        *pos,
                        "URL fragments ('#') are never sent to servers; remove it".into(),
                    ));
                }
                if c == '?' {
                    *component = Component::Query;
                }
                if !(c.is_ascii_alphanumeric() || "-._~:/?[]@!$&'()*+,;=%".contains(c)) {
                    return Err(err(
                        *pos,
                        format!("character {c:?} is not allowed in a URL; percent-encode it"),
                    ));
                }
            }
            if !s.is_empty() {
                rest.push((Part::Lit(s.into()), *component));
            }
            Ok(())
        };
        push_lit(
            &after_scheme[auth_end..],
            &mut rest,
            &mut component,
            &mut pos,
        )?;
        for part in parts {
            match part {
                Part::Lit(s) => push_lit(&s, &mut rest, &mut component, &mut pos)?,
                Part::Var(p) => {
                    pos += p.name.chars().count() + 4;
                    rest.push((Part::Var(p), component));
                }
            }
        }
        let base = format!("{}://{}", if https { "https" } else { "http" }, authority);
        Ok(UrlTemplate {
            https,
            host: host.into(),
            port,
            base: base.into(),
            rest,
            source: text.into(),
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True for `https://`.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// The host (an IPv6 literal keeps its brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, explicit or the scheme's default.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `scheme://authority`.
    pub fn origin(&self) -> &str {
        &self.base
    }

    /// Whether the template is its origin alone (`https://host[:port]`, a `/` at most).
    pub(crate) fn source_is_origin(&self) -> bool {
        self.rest.is_empty()
            || (self.rest.len() == 1 && matches!(&self.rest[0].0, Part::Lit(s) if &**s == "/"))
    }

    pub(crate) fn placeholders(&self) -> impl Iterator<Item = &super::Placeholder> {
        self.rest.iter().filter_map(|(p, _)| match p {
            Part::Var(v) => Some(v),
            Part::Lit(_) => None,
        })
    }

    /// Renders the URL, percent-encoding every inserted value for its component.
    pub fn render(
        &self,
        ctx: &RenderContext<'_>,
        redactor: &mut Redactor,
    ) -> Result<String, RenderErrorKind> {
        let mut out = String::with_capacity(self.source.len() + 16);
        out.push_str(&self.base);
        for (part, component) in &self.rest {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Var(p) => {
                    let v = ctx.resolve(p, redactor)?;
                    let text: std::borrow::Cow<'_, str> = match &*v {
                        Value::String(s) => s.as_str().into(),
                        Value::Number(n) => n.to_string().into(),
                        Value::Bool(b) => b.to_string().into(),
                        Value::Object(_) => {
                            return Err(RenderErrorKind::NotScalar {
                                variable: p.name.to_string(),
                                kind: "an object",
                            })
                        }
                        Value::Array(_) => {
                            return Err(RenderErrorKind::NotScalar {
                                variable: p.name.to_string(),
                                kind: "an array",
                            })
                        }
                        Value::Null => {
                            return Err(RenderErrorKind::Missing {
                                variable: p.name.to_string(),
                            })
                        }
                    };
                    match (component, &*text) {
                        // A whole segment of dots would walk up the path on the server.
                        (Component::Path, ".") => out.push_str("%2E"),
                        (Component::Path, "..") => out.push_str("%2E%2E"),
                        _ => out.extend(utf8_percent_encode(&text, COMPONENT)),
                    }
                }
            }
        }
        Ok(out)
    }
}

fn split_authority(authority: &str, https: bool) -> Result<(&str, u16), String> {
    let default_port = if https { 443 } else { 80 };
    if authority.is_empty() {
        return Err("the URL has no host".into());
    }
    let (host, port) = if authority.starts_with('[') {
        let end = authority
            .find(']')
            .ok_or_else(|| "unclosed '[' in an IPv6 host".to_string())?;
        let host = &authority[..=end];
        if authority[1..end].parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{host:?} is not a valid IPv6 address"));
        }
        match &authority[end + 1..] {
            "" => (host, None),
            p => (
                host,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("unexpected {p:?} after the IPv6 host"))?,
                ),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("the URL has no host".into());
    }
    if !host.starts_with('[')
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return Err(format!(
            "host {host:?} has characters a hostname cannot have"
        ));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))?,
    };
    Ok((host, port))
}
