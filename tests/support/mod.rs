//! Helpers shared by the integration tests.

#![allow(dead_code)]

pub(crate) mod servers;

use midcall::{ActionSet, CallInfo, LoadError, Syntax};

/// The `[agent]` header every small test config starts with.
pub(crate) const AGENT: &str = "[agent]\nid = \"front-desk\"\ntenant = \"acme\"\n";

pub(crate) fn load_toml(text: &str) -> Result<ActionSet, LoadError> {
    ActionSet::from_str("test.toml", text, Syntax::Toml)
}

/// Loads `AGENT` followed by `rest`, panicking with the errors when it fails.
pub(crate) fn agent(rest: &str) -> ActionSet {
    let text = format!("{AGENT}{rest}");
    match load_toml(&text) {
        Ok(s) => s,
        Err(e) => panic!("config should load:\n{e}\n---\n{text}"),
    }
}

pub(crate) fn call_info() -> CallInfo {
    CallInfo {
        id: "call_123".into(),
        agent_id: "front-desk".into(),
        tenant: "acme".into(),
        from_number: "+15551234567".into(),
        to_number: "+15557654321".into(),
        is_outgoing: false,
        started_at: "2025-11-03T19:33:18.330Z".into(),
    }
}

/// The repository root.
pub(crate) fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
