//! Rendering an action into the exact request that would be sent.

use std::fmt;

use serde_json::{json, Value};

use super::model::{ActionSpec, Method};
use super::tools::ArgsError;
use crate::template::{Redactor, RenderContext, RenderError};

/// A rendered request. Its `Debug` and the `redacted_*` views replace secrets with `***`.
#[derive(Clone)]
pub struct RenderedRequest {
    /// The method.
    pub method: Method,
    /// The full URL, values percent-encoded.
    pub url: String,
    /// Header names (lowercase) and values, including `content-type` when there is a body.
    pub headers: Vec<(String, String)>,
    /// The JSON body, if any.
    pub body: Option<Vec<u8>>,
    /// The secrets that went into it.
    pub redactor: Redactor,
}

impl fmt::Debug for RenderedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_text())
    }
}

impl RenderedRequest {
    /// The URL with secrets replaced by `***`.
    pub fn redacted_url(&self) -> String {
        self.redactor.redact(&self.url)
    }

    /// Method, URL, headers and body as text, the way an HTTP/1.1 request reads, secrets `***`.
    pub fn redacted_text(&self) -> String {
        let mut out = format!("{} {}\n", self.method, self.redacted_url());
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {}\n", self.redactor.redact(v)));
        }
        if let Some(b) = &self.body {
            out.push('\n');
            out.push_str(&self.redactor.redact(&String::from_utf8_lossy(b)));
            out.push('\n');
        }
        out
    }

    /// The request as JSON, secrets `***`.
    pub fn redacted_json(&self) -> Value {
        let headers: serde_json::Map<String, Value> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(self.redactor.redact(v))))
            .collect();
        let body = self.body.as_ref().map(|b| {
            let text = self.redactor.redact(&String::from_utf8_lossy(b));
            serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text))
        });
        json!({
            "method": self.method.as_str(),
            "url": self.redacted_url(),
            "headers": headers,
            "body": body,
        })
    }
}

/// Why an action could not be turned into a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The model's arguments do not match the schema.
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// A template could not be rendered.
    #[error("action \"{action}\": {source}")]
    Render {
        /// The action.
        action: String,
        /// What failed.
        source: RenderError,
    },
}

impl ActionSpec {
    /// Checks the model's arguments: they must be a JSON object (or null when the action
    /// takes none) that matches `parameters`.
    pub fn validate_args(&self, args: &Value) -> Result<(), ArgsError> {
        match args {
            Value::Object(_) => {}
            Value::Null
                if self
                    .parameters
                    .as_ref()
                    .is_none_or(|p| p.required().is_empty()) =>
            {
                return Ok(())
            }
            other => {
                return Err(ArgsError {
                    action: self.name.clone(),
                    problems: vec![format!(
                        "arguments: expected a JSON object, got {}",
                        crate::state::kind_of(other)
                    )],
                })
            }
        }
        match &self.parameters {
            Some(p) => p.validate(&self.name, args),
            None => Ok(()),
        }
    }

    /// Validates `ctx.args` and renders URL, headers and body.
    pub fn render(&self, ctx: &RenderContext<'_>) -> Result<RenderedRequest, RequestError> {
        self.validate_args(ctx.args)?;
        let fail = |field: String, kind| RequestError::Render {
            action: self.name.clone(),
            source: RenderError::new(field, kind),
        };
        let mut redactor = Redactor::default();
        let url = self
            .url
            .render(ctx, &mut redactor)
            .map_err(|k| fail("url".into(), k))?;
        let mut headers = Vec::with_capacity(self.headers.len() + 1);
        for (name, t) in &self.headers {
            let v = t
                .render_header(ctx, &mut redactor)
                .map_err(|k| fail(format!("header \"{name}\""), k))?;
            headers.push((name.clone(), v));
        }
        let body = match &self.body {
            Some(b) => {
                let mut out = Vec::with_capacity(256);
                b.render(ctx, &mut redactor, &mut out)
                    .map_err(|k| fail("body".into(), k))?;
                if !headers.iter().any(|(n, _)| n == "content-type") {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                Some(out)
            }
            None => None,
        };
        Ok(RenderedRequest {
            method: self.method,
            url,
            headers,
            body,
            redactor,
        })
    }
}
