//! Step 1 of the path (sync, reads the call): the model's arguments, the rendered request, the
//! egress scheme check and the cache key, all before anything is sent.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use serde_json::Value;

use super::error::{Failure, Fault, Kind, Retry};
use super::parts::Parts;
use crate::cache::{key_headers, CacheKey, KeyParts, ScopeId};
use crate::config::{ActionSpec, Method, RenderedRequest, RequestError};
use crate::state::Call;
use crate::template::RenderContext;

/// A rendered request ready to send, owning everything it needs.
pub(crate) struct Prepared {
    pub(crate) action: Arc<str>,
    pub(crate) method: Method,
    pub(crate) uri: http::Uri,
    pub(crate) host: String,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) idempotent: bool,
    pub(crate) timeout: Duration,
    pub(crate) max_bytes: u64,
    /// The host's cap on requests in flight, if any.
    pub(crate) max_in_flight: Option<u32>,
    /// When a second identical request goes out (reads only).
    pub(crate) hedge: Option<crate::config::Hedge>,
    /// The URL without query string, secrets redacted: safe for logs.
    pub(crate) log_url: String,
    /// The cache key and scope, for cacheable actions.
    pub(crate) cache: Option<(CacheKey, ScopeId)>,
    /// What the idempotency key is made from.
    pub(crate) idempotency: Option<Idempotency>,
    /// Set once the request has been handed to the transport: from then on a `finish`
    /// action completes even when its tool call is cancelled.
    pub(crate) sent: Arc<AtomicBool>,
    /// The secrets rendered into it, to redact them wherever it is shown.
    pub(crate) redactor: crate::template::Redactor,
}

pub(crate) struct Idempotency {
    pub(crate) call_id: String,
    pub(crate) tool_id: Option<String>,
    pub(crate) args: Value,
}

impl Parts {
    /// Validates the arguments, renders the request and checks it against the egress policy.
    pub(crate) fn plan(
        &self,
        action: &ActionSpec,
        call: &Call,
        tool: &ToolCall,
    ) -> Result<Prepared, Box<Failure>> {
        let name = action.name();
        let reject = |kind, fault, message: String| Failure::new(kind, fault, Retry::No, message);
        let ctx = RenderContext {
            call: &call.info,
            state: &call.state,
            args: &tool.args,
            transcript: &call.transcript,
            secrets: self.secrets(),
            payload: None,
        };
        let rendered: RenderedRequest = action.render(&ctx).map_err(|e| match e {
            RequestError::Args(a) => reject(Kind::InvalidArguments, Fault::Caller, a.to_string()),
            RequestError::Render { .. } => reject(Kind::Render, Fault::Config, e.to_string()),
        })?;
        let policy = self.transport().policy();
        if let Err(r) = policy.check_scheme(action.url().is_https()) {
            return Err(reject(Kind::Egress, Fault::Config, r.to_string()));
        }
        let uri: http::Uri = rendered.url.parse().map_err(|_| {
            reject(
                Kind::Render,
                Fault::Config,
                format!("action \"{name}\": the rendered URL is not valid"),
            )
        })?;
        let mut headers = http::HeaderMap::with_capacity(rendered.headers.len() + 4);
        for (header, value) in &rendered.headers {
            let (Ok(n), Ok(mut v)) = (
                HeaderName::from_bytes(header.as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) else {
                return Err(reject(
                    Kind::Render,
                    Fault::Config,
                    format!("action \"{name}\": header \"{header}\" is not a valid header"),
                ));
            };
            // Marked sensitive so hyper never logs it; checked without building a redacted copy.
            if rendered.redactor.appears_in(value) {
                v.set_sensitive(true);
            }
            headers.append(n, v);
        }
        headers.insert(http::header::USER_AGENT, self.user_agent().clone());
        if !headers.contains_key(http::header::ACCEPT) {
            headers.insert(
                http::header::ACCEPT,
                HeaderValue::from_static("application/json"),
            );
        }
        // The idempotency key is computed when a request is actually sent (a cache hit
        // never needs it).
        let idempotency = self.idempotency_header().map(|_| Idempotency {
            call_id: call.info.id.clone(),
            tool_id: tool.id.clone(),
            args: tool.args.clone(),
        });
        let path_only = rendered.url.split('?').next().unwrap_or_default();
        let body = rendered.body.map(Bytes::from).unwrap_or_default();
        let cache = action.cache().filter(|_| !action.is_async()).map(|policy| {
            let scope = ScopeId::of(policy.scope, &call.info);
            let key = CacheKey::new(&KeyParts {
                scope: &scope,
                fingerprint: action.fingerprint,
                method: action.method().as_str(),
                url: &rendered.url,
                key_headers: &key_headers(policy, &headers),
                body: &body,
            });
            (key, scope)
        });
        Ok(Prepared {
            action: name.into(),
            method: action.method(),
            uri,
            host: action.url().host().to_string(),
            headers,
            body,
            idempotent: action.is_idempotent(),
            timeout: action.timeout(),
            max_bytes: action.max_response_bytes(),
            max_in_flight: action.max_in_flight(),
            hedge: action.hedge(),
            log_url: rendered.redactor.redact(path_only),
            cache,
            idempotency,
            sent: Arc::new(AtomicBool::new(false)),
            redactor: rendered.redactor,
        })
    }

    /// See [`Runtime::render_request`](super::Runtime::render_request).
    pub(crate) fn render_request(
        &self,
        action: &ActionSpec,
        call: &Call,
        tool: &ToolCall,
    ) -> Result<RenderedRequest, crate::Error> {
        let p = self.plan(action, call, tool).map_err(|f| f.error)?;
        let mut headers: Vec<(String, String)> = Vec::with_capacity(p.headers.len() + 3);
        if let Some(host) = p.uri.authority() {
            headers.push(("host".into(), host.to_string()));
        }
        for (name, value) in &p.headers {
            headers.push((
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            ));
        }
        if !p.body.is_empty() {
            headers.push(("content-length".into(), p.body.len().to_string()));
        }
        if let (Some(name), Some(i)) = (self.idempotency_header(), &p.idempotency) {
            let key = super::idempotency::idempotency_key(
                &i.call_id,
                i.tool_id.as_deref(),
                &p.action,
                &i.args,
            );
            headers.push((name.as_str().to_string(), key));
        }
        Ok(RenderedRequest {
            method: p.method,
            url: p.uri.to_string(),
            headers,
            body: (!p.body.is_empty()).then(|| p.body.to_vec()),
            redactor: p.redactor,
        })
    }
}

/// One tool call from the model: its id (if the model gave one) and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The model's id for this tool call; keys idempotency when present.
    pub id: Option<String>,
    /// The arguments, a JSON object (or null for none).
    pub args: Value,
}

impl ToolCall {
    /// A tool call with an id.
    pub fn new(id: impl Into<String>, args: Value) -> ToolCall {
        ToolCall {
            id: Some(id.into()),
            args,
        }
    }
}

impl From<Value> for ToolCall {
    fn from(args: Value) -> ToolCall {
        ToolCall { id: None, args }
    }
}
