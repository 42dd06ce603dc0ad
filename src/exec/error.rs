//! The one error type of an action, with predicates and the two answers that decide what
//! happens next: who is at fault, and may it be retried.

use std::fmt;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The remote server or the network to it.
    Upstream,
    /// midcall or its host (overload, state cap).
    Local,
    /// The agent config, the egress policy, or the arguments the model gave.
    Config,
}

/// Whether trying again could help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
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
}

impl Error {
    pub(crate) fn new(kind: Kind, fault: Fault, retry: Retry, message: impl Into<String>) -> Error {
        Error {
            inner: Box::new(Inner {
                kind,
                fault,
                retry,
                message: message.into(),
            }),
        }
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
