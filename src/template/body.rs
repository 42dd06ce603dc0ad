//! JSON body templates: a leaf string that is exactly one placeholder keeps the value's JSON
//! type; any other string with placeholders becomes an escaped JSON string.

use serde_json::Value;

use super::{Redactor, RenderContext, RenderErrorKind, Root, Template, TemplateError};

/// A compiled JSON body.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyTemplate {
    /// A value with no placeholder, written as is.
    Literal(Value),
    /// `"{{args.slot}}"`: the value keeps its JSON type.
    Single(Template),
    /// `"Dr. {{state.doctor}} at {{args.slot}}"`: rendered as text into a JSON string.
    Text(Template),
    /// An object; keys are literal.
    Object(Vec<(String, BodyTemplate)>),
    /// An array.
    Array(Vec<BodyTemplate>),
}

impl BodyTemplate {
    /// Compiles a JSON value. On error, also returns the JSON path of the failing leaf
    /// (`reason` or `items[2]`).
    pub fn compile(value: &Value, roots: &[Root]) -> Result<BodyTemplate, (String, TemplateError)> {
        Self::compile_at(value, roots, &mut String::new())
    }

    fn compile_at(
        value: &Value,
        roots: &[Root],
        at: &mut String,
    ) -> Result<BodyTemplate, (String, TemplateError)> {
        Ok(match value {
            Value::String(s) if s.contains("{{") => {
                let t = Template::compile(s, roots).map_err(|e| (at.clone(), e))?;
                if t.single().is_some() {
                    BodyTemplate::Single(t)
                } else if t.is_literal() {
                    BodyTemplate::Literal(value.clone())
                } else {
                    BodyTemplate::Text(t)
                }
            }
            Value::Object(m) if m.values().any(has_placeholder) => {
                let mut fields = Vec::with_capacity(m.len());
                for (k, v) in m {
                    let len = at.len();
                    if !at.is_empty() {
                        at.push('.');
                    }
                    at.push_str(k);
                    fields.push((k.clone(), Self::compile_at(v, roots, at)?));
                    at.truncate(len);
                }
                BodyTemplate::Object(fields)
            }
            Value::Array(a) if a.iter().any(has_placeholder) => {
                let mut items = Vec::with_capacity(a.len());
                for (i, v) in a.iter().enumerate() {
                    let len = at.len();
                    at.push_str(&format!("[{i}]"));
                    items.push(Self::compile_at(v, roots, at)?);
                    at.truncate(len);
                }
                BodyTemplate::Array(items)
            }
            other => BodyTemplate::Literal(other.clone()),
        })
    }

    /// Every template in the body.
    pub(crate) fn templates(&self) -> Vec<&Template> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a Template>) {
        match self {
            BodyTemplate::Literal(_) => {}
            BodyTemplate::Single(t) | BodyTemplate::Text(t) => out.push(t),
            BodyTemplate::Object(f) => f.iter().for_each(|(_, v)| v.collect(out)),
            BodyTemplate::Array(a) => a.iter().for_each(|v| v.collect(out)),
        }
    }

    /// Renders compact JSON into `out`.
    pub fn render(
        &self,
        ctx: &RenderContext<'_>,
        redactor: &mut Redactor,
        out: &mut Vec<u8>,
    ) -> Result<(), RenderErrorKind> {
        match self {
            BodyTemplate::Literal(v) => write_json(out, v),
            BodyTemplate::Single(t) => {
                let p = t.single().ok_or_else(|| RenderErrorKind::Missing {
                    variable: t.source().to_string(),
                })?;
                let v = ctx.resolve(p, redactor)?;
                write_json(out, &v);
            }
            BodyTemplate::Text(t) => {
                let s = t.render_text(ctx, redactor)?;
                write_json(out, &s);
            }
            BodyTemplate::Object(fields) => {
                out.push(b'{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_json(out, k);
                    out.push(b':');
                    v.render(ctx, redactor, out)?;
                }
                out.push(b'}');
            }
            BodyTemplate::Array(items) => {
                out.push(b'[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    v.render(ctx, redactor, out)?;
                }
                out.push(b']');
            }
        }
        Ok(())
    }
}

fn has_placeholder(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("{{"),
        Value::Array(a) => a.iter().any(has_placeholder),
        Value::Object(m) => m.values().any(has_placeholder),
        _ => false,
    }
}

fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // Serializing a JSON value or a string into a Vec cannot fail.
    let _ = serde_json::to_writer(out, v);
}
