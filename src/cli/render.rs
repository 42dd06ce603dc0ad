//! `midcall render`: show the exact request an action would send.

use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use midcall::{CallInfo, ConversationState, EnvSecrets, Secret, SecretSource, Transcript};

/// Print the exact request an action would send, secrets as ***.
///
/// Print the exact request an action would send (method, URL, headers, body), secrets as ***.
/// Secrets come from MIDCALL_SECRET_<NAME> environment variables.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  midcall render examples/front-desk/agent.toml --action book_appointment \\\n      --args '{\"slot\": \"2025-11-04T15:00\"}' --fake-secrets"
)]
pub(crate) struct RenderArgs {
    /// The agent file.
    file: String,
    /// The action to render.
    #[arg(long)]
    action: String,
    /// The tool call's arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    args: String,
    /// Conversation variables, a JSON object.
    #[arg(long, default_value = "{}")]
    state: String,
    /// Call fields over a sample call, e.g. '{"from_number": "+15551234567"}'.
    #[arg(long, default_value = "{}")]
    call: String,
    /// Use a stand-in for secrets that are not set, instead of failing.
    #[arg(long)]
    fake_secrets: bool,
    /// Print the request as JSON.
    #[arg(long)]
    json: bool,
}

/// A sample call, for rendering without a live one.
pub(crate) fn sample_call(agent_id: &str, tenant: &str) -> CallInfo {
    CallInfo {
        id: "call_demo_0001".into(),
        agent_id: agent_id.into(),
        tenant: tenant.into(),
        from_number: "+15551234567".into(),
        to_number: "+15557654321".into(),
        is_outgoing: false,
        started_at: "2025-11-03T19:33:18.330Z".into(),
    }
}

/// Call fields from `--call` laid over the sample call.
pub(crate) fn call_from_flag(text: &str, agent_id: &str, tenant: &str) -> Result<CallInfo, String> {
    let over = super::parse_json("--call", text)?;
    let Value::Object(over) = over else {
        return Err("--call: expected a JSON object".into());
    };
    let mut base =
        serde_json::to_value(sample_call(agent_id, tenant)).map_err(|e| e.to_string())?;
    if let Value::Object(m) = &mut base {
        m.extend(over);
    }
    serde_json::from_value(base).map_err(|e| format!("--call: {e}"))
}

struct FakeMissing;

impl SecretSource for FakeMissing {
    fn secret(&self, name: &str) -> Option<Secret> {
        Some(
            EnvSecrets
                .secret(name)
                .unwrap_or_else(|| Secret::new(format!("fake-{name}"))),
        )
    }
}

pub(crate) fn run(a: RenderArgs) -> Result<ExitCode, String> {
    let set = super::load(&a.file)?;
    let action = set.action(&a.action).ok_or_else(|| {
        let names: Vec<&str> = set.actions().iter().map(|x| x.name()).collect();
        format!(
            "no action \"{}\" in {} (it has: {})",
            a.action,
            a.file,
            names.join(", ")
        )
    })?;
    let args = super::parse_json("--args", &a.args)?;
    let state = ConversationState::from_value(super::parse_json("--state", &a.state)?)
        .map_err(|e| format!("--state: {e}"))?;
    let call = call_from_flag(&a.call, &set.agent().id, &set.agent().tenant)?;
    let transcript = Transcript::default();
    let secrets: std::sync::Arc<dyn SecretSource> = if a.fake_secrets {
        std::sync::Arc::new(FakeMissing)
    } else {
        std::sync::Arc::new(EnvSecrets)
    };
    // Through the executor's own planning, so the headers it adds are shown too; the
    // default egress policy would refuse http:// or loopback URLs that `exec` may reach with
    // flags, and rendering sends nothing, so the file's scheme is taken as it is.
    let policy = set.egress().policy().allow_http(true);
    let runtime = midcall::Runtime::builder()
        .egress(policy)
        .secrets(secrets)
        .build()?;
    let mut live = midcall::Call::new(call);
    live.state = state;
    live.transcript = transcript;
    let req = runtime
        .render_request(action, &live, &midcall::ToolCall::from(args))
        .map_err(|e| e.to_string())?;
    if a.json {
        println!("{}", req.redacted_json());
    } else {
        print!("{}", req.redacted_text());
    }
    Ok(ExitCode::SUCCESS)
}
