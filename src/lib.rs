//! midcall lets a voice AI agent act on the world during a live phone call.
//!
//! The agent runtime hands a tool call to midcall in-process; midcall renders the HTTP request
//! from the conversation, sends it within a hard latency budget, extracts the values that matter
//! with JSONPath (RFC 9535), writes them into the conversation state and gives the agent a
//! compact result or a fallback line to say.
//!
//! # Layout
//! - [`config`]: the agent config (actions, webhooks, automations, egress) and the event-type
//!   vocabulary; load TOML/JSON, validate with errors that name file, line, action and field;
//!   compile once into an [`ActionSet`]; tool definitions for the model and argument
//!   validation.
//! - [`template`]: `{{…}}` templates, compiled once, rendered into a URL (percent-encoded per
//!   component), a header (CR/LF/NUL refused) or a JSON body (types kept); secrets and their
//!   redaction.
//! - [`jsonpath`]: RFC 9535 queries behind a small API, and extraction rules that turn a
//!   response into typed values for state paths.
//! - [`state`]: `CallInfo`, `ConversationState` (dotted paths, size cap), `Transcript` and
//!   `CallEnd`.
//! - [`exec`]: the executor. `builder.rs` configures a [`Runtime`] once (network, secrets,
//!   event bus); `session.rs` drives a live call ([`CallSession`]: tool handles, duplicate
//!   protection over done and running calls, cancellation policies, held side effects, the
//!   call's end; `task.rs` runs one tool call, `handle.rs` is its future); the path of one
//!   action is `plan.rs` → `obtain.rs` (cache, shared fetch) and `send.rs` (retries, host cap,
//!   hedge, response checks) → `apply.rs`; beside them `Budget`, `Outcome`, errors with fault
//!   and retry, the circuit breaker, the per-host gate (`gate.rs`), idempotency keys.
//! - [`transport`]: hyper-util's pooled client over our connector (egress policy checked on
//!   every resolved address, `TCP_NODELAY`, rustls with ring, warm-up), one deadline over the
//!   whole exchange, the body cap, `Retry-After` parsing.
//! - [`cache`]: the response cache (extraction results, scoped, weighed in bytes, freshness on
//!   tokio's clock), request coalescing, and the shared tier on Redis (`cache::shared`: HMAC
//!   keys under the fleet's secret, a deadline on every operation, invalidation by pub/sub).
//! - [`events`]: event webhooks: envelope and payloads (the post-call payload among them),
//!   Standard Webhooks signing (HMAC `v1`, ed25519 `v1a`), the durable outbox, delivery with
//!   retries, ordering and a per-endpoint throttle, the delivery log and replay. Deliveries of other modules' targets are resolved through
//!   an interface they register.
//! - [`automation`]: automations (call completed, inbound webhook), their durable run log
//!   and worker, and the inbound webhook server, for one agent or many (`Agents`: names
//!   prefixed by agent, replaced whole on a reload); the operator API (`/v1/admin/`) and the
//!   console (`/console`) on the same server; registers itself with the runtime (call
//!   completion) and the bus (delivery targets).
//! - `store` (internal): the durable state the outbox, the delivery log, the run log and
//!   inbound replay protection share, on one of two engines behind one interface (`Db`): the
//!   SQLite file (schema and opening in `store`, queries beside their modules) or PostgreSQL
//!   (`store::pg`: leases with `SKIP LOCKED`, `NOTIFY`, advisory-locked migrations);
//!   `store::query` is what the operator API reads and changes.
//! - `cli` (binary only): one file per command.
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
