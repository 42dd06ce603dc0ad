//! What an action produced: status, values, the result for the model, the line to say.

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use super::error::{Error, Failure, Kind};
pub use super::timings::Timings;
use crate::state::StatePath;

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// The upstream answered 2xx and the values were extracted and applied.
    Ok,
    /// Served from the cache.
    CacheHit,
    /// A background (`async = true`) action was started; it reports through tracing and metrics.
    Accepted,
    /// The deadline passed.
    TimedOut,
    /// The upstream answered 3xx, 4xx or 5xx (redirects are never followed).
    HttpError,
    /// No connection, or the connection failed (DNS, TCP, TLS, reset).
    TransportError,
    /// The response could not be used: too big, not JSON, compressed, or extraction failed.
    InvalidResponse,
    /// 429, and no retry fitted the budget.
    RateLimited,
    /// The host's circuit breaker is open.
    CircuitOpen,
    /// Refused before sending: arguments, rendering, egress policy, an unknown tool, or
    /// overload.
    Rejected,
    /// The tool call was cancelled (barge-in, `cancel()`, a dropped handle) before it ended.
    Cancelled,
}

impl Status {
    /// The name used in JSON, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::CacheHit => "cache_hit",
            Status::Accepted => "accepted",
            Status::TimedOut => "timed_out",
            Status::HttpError => "http_error",
            Status::TransportError => "transport_error",
            Status::InvalidResponse => "invalid_response",
            Status::RateLimited => "rate_limited",
            Status::CircuitOpen => "circuit_open",
            Status::Rejected => "rejected",
            Status::Cancelled => "cancelled",
        }
    }

    /// Ok, cache hit or accepted: no fallback applies.
    pub fn is_success(self) -> bool {
        matches!(self, Status::Ok | Status::CacheHit | Status::Accepted)
    }
}

/// The result of one tool call.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Outcome {
    /// The action (the tool name as the model sent it, for an unknown tool).
    pub action: String,
    /// The model's id for the tool call, if it gave one.
    pub tool_call_id: Option<String>,
    /// How it ended.
    pub status: Status,
    /// The upstream's HTTP status, if one answered.
    pub http_status: Option<u16>,
    /// Requests sent (0 when refused before sending, 2 after one retry).
    pub attempts: u32,
    /// Extracted values, already written to the call's state.
    pub values: Vec<(StatePath, Value)>,
    /// The compact JSON to give the model (bounded; default 2 KiB).
    pub llm_result: Value,
    /// The line for the agent to say: the fallback's, on failure.
    pub say: Option<String>,
    /// Whether the filler line was signalled.
    pub filler_fired: bool,
    /// How the cache was involved.
    pub cache: crate::cache::CacheStatus,
    /// The earlier outcome of an identical tool call, returned without sending anything.
    pub deduplicated: bool,
    /// Finished after its handle was cancelled (`on_interrupt = "finish"`): this is the
    /// real end state recorded in the session; the cancelled handle itself got `cancelled`.
    pub detached: bool,
    /// Where the time went.
    pub timings: Timings,
    /// Why it did not succeed.
    pub error: Option<Error>,
}

impl Outcome {
    pub(crate) fn new(action: &str, tool_call_id: Option<String>) -> Outcome {
        Outcome {
            action: action.to_string(),
            tool_call_id,
            status: Status::Ok,
            http_status: None,
            attempts: 0,
            values: Vec::new(),
            llm_result: Value::Null,
            say: None,
            filler_fired: false,
            cache: crate::cache::CacheStatus::Bypass,
            deduplicated: false,
            detached: false,
            timings: Timings::default(),
            error: None,
        }
    }

    /// The outcome as one JSON object (`error` as its message).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("action", &self.action)?;
        m.serialize_entry("tool_call_id", &self.tool_call_id)?;
        m.serialize_entry("status", &self.status)?;
        m.serialize_entry("http_status", &self.http_status)?;
        m.serialize_entry("attempts", &self.attempts)?;
        // Microsecond precision: 5.457, not 5.4564699999999995.
        let ms = (self.timings.total.as_micros() as f64) / 1000.0;
        m.serialize_entry("elapsed_ms", &ms)?;
        m.serialize_entry("values", &values_object(&self.values))?;
        m.serialize_entry("llm_result", &self.llm_result)?;
        m.serialize_entry("say", &self.say)?;
        m.serialize_entry("filler_fired", &self.filler_fired)?;
        m.serialize_entry("cache", &self.cache)?;
        m.serialize_entry("deduplicated", &self.deduplicated)?;
        m.serialize_entry("detached", &self.detached)?;
        m.serialize_entry("timings", &self.timings)?;
        m.serialize_entry("error", &self.error.as_ref().map(|e| e.to_string()))?;
        if let Some(e) = &self.error {
            m.serialize_entry("fault", &e.fault())?;
            m.serialize_entry("retry", &e.retry())?;
        }
        m.end()
    }
}

/// Extracted values as one JSON object keyed by state path.
pub fn values_json(values: &[(StatePath, Value)]) -> Value {
    values_object(values)
}

pub(crate) fn values_object(values: &[(StatePath, Value)]) -> Value {
    Value::Object(
        values
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<Map<String, Value>>(),
    )
}

/// The model-facing result: the values, or `{"ok": true}`; on failure a short error. Never
/// longer than `limit` bytes of JSON: values that do not fit are left out and
/// `"truncated": true` says so.
pub(crate) fn llm_result(
    status: Status,
    values: &[(StatePath, Value)],
    error: Option<&Error>,
    limit: usize,
) -> Value {
    if !status.is_success() {
        let mut msg = error
            .map(|e| e.model_text().to_string())
            .unwrap_or_default();
        truncate(&mut msg, limit.saturating_sub(64).max(16));
        return serde_json::json!({"error": status.as_str(), "message": msg});
    }
    if values.is_empty() {
        return serde_json::json!({"ok": true});
    }
    let full = values_object(values);
    if crate::state::json_len(&full) <= limit {
        return full;
    }
    let mut out = Map::new();
    let mut used = 2 + r#","truncated":true"#.len();
    for (k, v) in values {
        let entry = k.as_str().len() + 4 + crate::state::json_len(v);
        if used + entry <= limit {
            used += entry;
            out.insert(k.to_string(), v.clone());
        }
    }
    out.insert("truncated".into(), Value::Bool(true));
    Value::Object(out)
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
}

/// Values fetched and extracted, not yet applied.
#[derive(Clone)]
pub(crate) struct Fetched {
    pub(crate) values: Vec<(crate::state::StatePath, serde_json::Value)>,
    pub(crate) http_status: u16,
    pub(crate) attempts: u32,
    pub(crate) timings: Timings,
}

/// What the fetch step gives the apply step: values, or the failure.
pub(crate) type FetchResult = Result<Fetched, Box<Failure>>;

impl Kind {
    /// The one place an end state is derived from what went wrong.
    pub(crate) fn status(self) -> Status {
        match self {
            Kind::Timeout => Status::TimedOut,
            Kind::Connect | Kind::Tls | Kind::Transport => Status::TransportError,
            Kind::HttpStatus(_) => Status::HttpError,
            Kind::RateLimited => Status::RateLimited,
            Kind::CircuitOpen => Status::CircuitOpen,
            Kind::InvalidResponse | Kind::State => Status::InvalidResponse,
            Kind::Egress
            | Kind::InvalidArguments
            | Kind::Render
            | Kind::Overloaded
            | Kind::HostBusy
            | Kind::UnknownTool
            | Kind::CallEnded => Status::Rejected,
            Kind::Cancelled => Status::Cancelled,
        }
    }
}

impl Failure {
    /// The end state this failure gives its tool call.
    pub(crate) fn status(&self) -> Status {
        self.error.kind().status()
    }
}
