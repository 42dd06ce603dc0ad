//! The agent config: actions, webhooks, automations and egress; loaded from TOML or JSON,
//! validated, and compiled once into an [`ActionSet`].
//!
//! Owns the agent files and the compiled set of agents ([`Agents`]: one file or many, named
//! by agent), and builds the egress policy the transport enforces. May call: `template`,
//! `jsonpath`, `transport` (its policy type), `state`, `time`.

mod agents;
mod compile;
mod error;
mod event_type;
mod load;
mod model;
mod raw;
mod render;
mod structure;
mod tools;

pub use agents::{Agents, AgentsError};
pub use error::{ConfigError, LoadError};
pub use event_type::EventType;
pub use load::{Syntax, MAX_CONFIG_BYTES};
pub use model::*;
pub use render::{RenderedRequest, RequestError};
pub use structure::from_str_all;
pub use tools::{ArgSchema, ArgsError, Format, SchemaError};
