//! The one error type of an action, with predicates and the two answers that decide what
//! happens next: who is at fault, and may it be retried.

use std::fmt;

use super::timings::Timings;
use crate::transport::{ConnectError, EgressRefusal, TransportError};

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Fault {
    /// The remote server or the network to it.
    Upstream,
    /// midcall or its host (overload, state cap, a turn budget shorter than the action's
    /// own timeout).
    Local,
    /// The agent config or the egress policy.
    Config,
    /// Whoever called the tool: arguments that fail the schema, an unknown tool name, a
    /// cancelled tool call.
    Caller,
}

/// Whether trying again could help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Retry {
    /// Yes (later, or with more time).
    Yes,
    /// No: the same request will fail the same way.
    No,
    /// Only for an idempotent request.
    IfIdempotent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Timeout,
    Connect,
    Tls,
    Egress,
    HttpStatus(u16),
    RateLimited,
    CircuitOpen,
    InvalidResponse,
    InvalidArguments,
    Render,
    State,
    Overloaded,
    Transport,
    UnknownTool,
    /// A tool call after the call ended.
    CallEnded,
    Cancelled,
    HostBusy,
}

/// A failed attempt to get values: the error and what is known of the exchange. Its status
/// is always `error.kind.status()`.
#[derive(Clone)]
pub(crate) struct Failure {
    pub(crate) error: Error,
    pub(crate) http_status: Option<u16>,
    pub(crate) attempts: u32,
    pub(crate) timings: Timings,
}

impl Failure {
    pub(crate) fn new(
        kind: Kind,
        fault: Fault,
        retry: Retry,
        message: impl Into<String>,
    ) -> Box<Failure> {
        Box::new(Failure {
            error: Error::new(kind, fault, retry, message),
            http_status: None,
            attempts: 0,
            timings: Timings::default(),
        })
    }

    pub(crate) fn http(mut self: Box<Self>, code: u16) -> Box<Self> {
        self.http_status = Some(code);
        self
    }

    /// With the short, stable text the model is shown instead of the message.
    pub(crate) fn with_reason(mut self: Box<Self>, reason: &'static str) -> Box<Self> {
        self.error = self.error.with_reason(reason);
        self
    }

    pub(crate) fn after(mut self: Box<Self>, attempts: u32, timings: Timings) -> Box<Self> {
        self.attempts = attempts;
        self.timings = timings;
        self
    }
}

/// How a transport error is classified: its kind, who is at fault, whether a retry could
/// help, whether it says the host is unhealthy (counts against its breaker), and the short
/// stable text the model may see. The one table for every transport error.
pub(crate) struct Classified {
    pub(crate) kind: Kind,
    pub(crate) fault: Fault,
    pub(crate) retry: Retry,
    pub(crate) host_failure: bool,
    pub(crate) reason: &'static str,
}

/// `budget_cut`: the deadline was the turn's budget, not the action's own timeout, so a
/// time-out is midcall's (local) and says nothing about the host.
pub(crate) fn classify(e: &TransportError, budget_cut: bool) -> Classified {
    let c = |kind, fault, retry, host_failure, reason| Classified {
        kind,
        fault,
        retry,
        host_failure,
        reason,
    };
    match e {
        TransportError::Timeout { .. } if budget_cut => c(
            Kind::Timeout,
            Fault::Local,
            Retry::Yes,
            false,
            "the turn's time ran out before the service answered",
        ),
        TransportError::Timeout { got_headers: false } => c(
            Kind::Timeout,
            Fault::Upstream,
            Retry::Yes,
            true,
            "the service did not answer in time",
        ),
        TransportError::Timeout { got_headers: true } => c(
            Kind::Timeout,
            Fault::Upstream,
            Retry::Yes,
            true,
            "the service's answer did not arrive in time",
        ),
        TransportError::Connect(ConnectError::Egress(_)) => c(
            Kind::Egress,
            Fault::Config,
            Retry::No,
            false,
            "the destination is not allowed",
        ),
        TransportError::Connect(ConnectError::Tls(_)) => c(
            Kind::Tls,
            Fault::Upstream,
            Retry::No,
            true,
            "a secure connection to the service could not be made",
        ),
        TransportError::Connect(ConnectError::Dns(_) | ConnectError::NoAddress) => c(
            Kind::Connect,
            Fault::Upstream,
            Retry::Yes,
            true,
            "the service's address could not be found",
        ),
        TransportError::Connect(ConnectError::Tcp(_)) => c(
            Kind::Connect,
            Fault::Upstream,
            Retry::Yes,
            true,
            "the service could not be reached",
        ),
        TransportError::Connect(ConnectError::BadUri) => c(
            Kind::Render,
            Fault::Config,
            Retry::No,
            false,
            "the request could not be made",
        ),
        TransportError::Io { .. } => c(
            Kind::Transport,
            Fault::Upstream,
            Retry::IfIdempotent,
            true,
            "the service closed the connection without answering",
        ),
        TransportError::TooLarge { .. } => c(
            Kind::InvalidResponse,
            Fault::Upstream,
            Retry::No,
            false,
            "the service's answer was too large",
        ),
    }
}

/// The operator's description of a transport error (logs and `Outcome::error`).
pub(crate) fn describe_transport(e: &TransportError) -> String {
    match e {
        TransportError::Timeout { got_headers: false } => {
            "timed out waiting for the response".into()
        }
        TransportError::Timeout { got_headers: true } => {
            "timed out reading the response body".into()
        }
        TransportError::Connect(ConnectError::Egress(EgressRefusal::Address(ip))) => {
            format!("destination {ip} is not allowed by the egress policy")
        }
        TransportError::Connect(c) => c.to_string(),
        TransportError::Io { message, .. } => message.clone(),
        TransportError::TooLarge { limit } => {
            format!("the response body is over the {limit}-byte limit")
        }
    }
}

/// Why an action did not succeed. The message never contains a secret or a query string.
#[derive(Clone)]
pub struct Error {
    inner: Box<Inner>,
}

#[derive(Clone)]
struct Inner {
    kind: Kind,
    fault: Fault,
    retry: Retry,
    message: String,
    /// The short, stable text the model may see instead of `message`.
    reason: Option<&'static str>,
}

impl Error {
    pub(crate) fn new(kind: Kind, fault: Fault, retry: Retry, message: impl Into<String>) -> Error {
        Error {
            inner: Box::new(Inner {
                kind,
                fault,
                retry,
                message: message.into(),
                reason: None,
            }),
        }
    }

    pub(crate) fn with_reason(mut self, reason: &'static str) -> Error {
        self.inner.reason = Some(reason);
        self
    }

    /// What the model is told: a short, stable reason where the detail is an operator's
    /// (transport errors), else the message (which never holds a secret or a query string).
    pub fn model_text(&self) -> &str {
        self.inner.reason.unwrap_or(&self.inner.message)
    }

    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        self.inner.fault
    }

    /// Whether a retry could help.
    pub fn retry(&self) -> Retry {
        self.inner.retry
    }

    /// The deadline passed.
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == Kind::Timeout
    }

    /// No connection could be made (DNS, TCP).
    pub fn is_connect(&self) -> bool {
        self.inner.kind == Kind::Connect
    }

    /// The TLS handshake failed (untrusted certificate, wrong name...).
    pub fn is_tls(&self) -> bool {
        self.inner.kind == Kind::Tls
    }

    /// The egress policy refused the destination.
    pub fn is_egress(&self) -> bool {
        self.inner.kind == Kind::Egress
    }

    /// The server answered with a non-success status; which one.
    pub fn http_status(&self) -> Option<u16> {
        match self.inner.kind {
            Kind::HttpStatus(s) => Some(s),
            _ => None,
        }
    }

    /// 429 with no retry that fitted the budget.
    pub fn is_rate_limited(&self) -> bool {
        self.inner.kind == Kind::RateLimited
    }

    /// The host's circuit breaker is open.
    pub fn is_circuit_open(&self) -> bool {
        self.inner.kind == Kind::CircuitOpen
    }

    /// The response could not be used (size, type, JSON, extraction).
    pub fn is_invalid_response(&self) -> bool {
        self.inner.kind == Kind::InvalidResponse
    }

    /// The model's arguments did not match the schema.
    pub fn is_invalid_arguments(&self) -> bool {
        self.inner.kind == Kind::InvalidArguments
    }

    /// A template could not be rendered.
    pub fn is_render(&self) -> bool {
        self.inner.kind == Kind::Render
    }

    /// Too many background actions in flight.
    pub fn is_overloaded(&self) -> bool {
        self.inner.kind == Kind::Overloaded
    }

    /// A state write was refused (size cap, path conflict).
    pub fn is_state(&self) -> bool {
        self.inner.kind == Kind::State
    }

    /// The host already had its `max_in_flight` requests and no slot opened within the budget.
    pub fn is_host_busy(&self) -> bool {
        self.inner.kind == Kind::HostBusy
    }

    /// The model called a tool the agent does not have.
    pub fn is_unknown_tool(&self) -> bool {
        self.inner.kind == Kind::UnknownTool
    }

    /// The tool was called after the call ended.
    pub fn is_call_ended(&self) -> bool {
        self.inner.kind == Kind::CallEnded
    }

    /// The tool call was cancelled (barge-in, a cancelled or dropped handle).
    pub fn is_cancelled(&self) -> bool {
        self.inner.kind == Kind::Cancelled
    }
}

impl Error {
    pub(crate) fn kind(&self) -> Kind {
        self.inner.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("fault", &self.inner.fault)
            .field("retry", &self.inner.retry)
            .field("message", &self.inner.message)
            .finish()
    }
}

impl std::error::Error for Error {}

/// Why a [`Runtime`](super::Runtime) could not be built, naming the setting at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// An extra root certificate is unusable (the caller's configuration).
    #[error("{0}")]
    Roots(crate::transport::SetupError),
    /// The idempotency header's name is not a header name (the caller's configuration).
    #[error("idempotency header: {0}")]
    IdempotencyHeader(String),
    /// The event bus could not be built (see [`crate::events::BusError`]).
    #[error("{0}")]
    Bus(crate::events::BusError),
    /// The shared cache tier is misconfigured.
    #[error("{0}")]
    SharedCache(crate::cache::SharedCacheError),
}
