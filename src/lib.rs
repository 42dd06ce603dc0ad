//! midcall lets a voice AI agent act on the world during a live phone call.
//!
//! The agent runtime hands a tool call to midcall in-process; midcall renders the HTTP request
//! from the conversation, sends it within a hard latency budget, extracts the values that matter
//! with JSONPath (RFC 9535), writes them into the conversation state and gives the agent a
//! compact result or a fallback line to say.
//!
//! # Layout
//! One room per concern; dependencies point down only, and `tests/layout.rs` checks it (a
//! module imports only modules of a lower rank, and no file is over 800 lines):
//! `stack` → `server` → `automation` → `exec` → `events` → `store`, `cache` → `config` →
//! `transport`, `template`, `jsonpath` → `state`, `time`. A lower room reaches a higher one
//! only through a trait it owns (`exec::CallCompletion`, `events::DeliveryTargets`).
//! - [`state`], [`time`]: leaves. Call facts, conversation state (dotted paths, size cap), the
//!   transcript, the call's end; wall-clock time as text.
//! - [`template`]: `{{…}}` templates compiled once, rendered into a URL (percent-encoded), a
//!   header (CR/LF/NUL refused) or a JSON body (types kept); secrets and their redaction.
//! - [`jsonpath`]: RFC 9535 queries and the extraction rules that turn a response into typed
//!   values at state paths.
//! - [`transport`]: hyper-util's pooled client over our connector (the [`EgressPolicy`] it is
//!   given checked on every resolved address, `TCP_NODELAY`, rustls with ring, warm-up), one
//!   [`Deadline`] over the whole exchange, the body cap, `Retry-After`.
//! - [`config`]: the agent files (actions, webhooks, automations, egress): load TOML/JSON,
//!   validate with errors naming file, line and field, compile once into an [`ActionSet`];
//!   [`config::Agents`], the compiled set one process serves; tool definitions for the model.
//! - `store` (internal): every SQL statement and record, on SQLite (`store::sqlite`) or
//!   PostgreSQL (`store::pg`: `SKIP LOCKED` leases, `NOTIFY`, advisory-locked migrations);
//!   `store::query`, what the operator API reads; errors with `is_transient()`.
//! - [`cache`]: the response cache (scoped, weighed in bytes, freshness on tokio's clock),
//!   coalescing, and the shared tier on Redis (`cache::shared`).
//! - [`events`]: event webhooks: envelope and payloads, Standard Webhooks signing (HMAC `v1`,
//!   ed25519 `v1a`), publishing through the durable outbox, delivery with retries, ordering and
//!   a per-endpoint throttle, the delivery log and replay.
//! - [`exec`]: the executor. A [`Runtime`] (built once), a [`CallSession`] per live call, and
//!   the path of one action as steps in order: `plan.rs` → `obtain.rs` → `send.rs` →
//!   `apply.rs` (the one place an [`Outcome`] is made); budgets and deadlines, errors with
//!   fault and retry, the breaker, the host gate.
//! - [`automation`]: automations (call completed, inbound webhook), their run worker and log.
//! - [`server`]: the HTTP front of `midcall serve`: router (healthz, metrics), inbound webhooks,
//!   the operator API (`/v1/admin/`) and the console (`/console`).
//! - [`stack`]: one builder from agent files to a [`Runtime`], its [`EventBus`], the
//!   [`Automations`] and (feature `demo`) the mock: what `serve`, `simulate`, `exec` and the
//!   Python package build through.
//! - `demo` (feature `demo`, on by default): the bundled mock CRM.
//! - `testing` (feature `testing`): fuzz bodies; not API.
//! - `cli` (binary only): the operator's commands, one file each; the measurement harness
//!   behind `midcall bench` is its own binary (`benches/harness`).
//!
//! # Example
//! ```
//! use midcall::{ActionSet, Syntax, Call, CallInfo, RenderContext, MapSecrets};
//! let set = ActionSet::from_str("demo.toml", r#"
//! [agent]
//! id = "front-desk"
//! tenant = "acme"
//! [[actions]]
//! name = "lookup_customer"
//! description = "Look up the caller"
//! url = "https://crm.example.com/v1/customers?phone={{call.from_number}}"
//! headers = { Authorization = "Bearer {{secrets.CRM_TOKEN}}" }
//! "#, Syntax::Toml).unwrap();
//! let call = Call::new(CallInfo {
//!     id: "c1".into(), agent_id: "front-desk".into(), tenant: "acme".into(),
//!     from_number: "+15551234567".into(), to_number: "+15557654321".into(),
//!     is_outgoing: false, started_at: "2025-11-03T19:33:18.330Z".into(),
//! });
//! let secrets = MapSecrets::new().with("CRM_TOKEN", "tok-123");
//! let ctx = RenderContext { call: &call.info, state: &call.state, args: &serde_json::Value::Null,
//!     transcript: &call.transcript, secrets: &secrets, payload: None };
//! let req = set.action("lookup_customer").unwrap().render(&ctx).unwrap();
//! assert_eq!(req.url, "https://crm.example.com/v1/customers?phone=%2B15551234567");
//! assert!(req.redacted_text().contains("Bearer ***"));
//! ```

/// An error whose one cause is named by its message (the layer's fault is in its doc): a
/// `String` newtype with `Display`, `Error`, and conversions to and from `String`.
macro_rules! text_error {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        #[error("{0}")]
        pub struct $name(pub(crate) String);

        impl From<String> for $name {
            fn from(message: String) -> Self {
                $name(message)
            }
        }

        impl From<$name> for String {
            fn from(e: $name) -> Self {
                e.0
            }
        }
    };
}
pub(crate) use text_error;

/// The layers' errors as text, for callers that report them so (the command line), so `?`
/// works in a function that returns `Result<_, String>`.
macro_rules! into_text {
    ($($error:ty),* $(,)?) => {
        $(impl From<$error> for String {
            fn from(e: $error) -> Self {
                e.to_string()
            }
        })*
    };
}
into_text!(
    transport::SetupError,
    cache::SharedCacheError,
    store::StoreError,
    events::BusError,
    exec::BuildError,
    automation::StartupError,
    stack::StackError,
);

pub mod automation;
pub mod cache;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod events;
pub mod exec;
pub mod jsonpath;
pub mod server;
pub mod stack;
pub mod state;
mod store;
pub mod template;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
pub mod time;
pub mod transport;

pub use automation::{Automations, RunLog, StartError};
pub use config::{
    ActionSet, ActionSpec, ArgsError, ConfigError, Format, LoadError, RenderedRequest,
    RequestError, Syntax,
};
pub use events::{Event, EventBus, EventType};
pub use exec::{
    Budget, CallSession, Error, Outcome, Runtime, RuntimeBuilder, Status, ToolCall, ToolHandle,
};
pub use jsonpath::{ExtractError, Extractor, Query, QueryError};
pub use server::InboundServer;
pub use stack::{Stack, StackBuilder, StackError};
pub use state::{Call, CallEnd, CallInfo, ConversationState, Speaker, StatePath, Transcript, Turn};
pub use template::{EnvSecrets, MapSecrets, RenderContext, Secret, SecretSource};
pub use transport::{Deadline, EgressPolicy};
