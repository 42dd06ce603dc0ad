//! Call scripts: a TOML file that says which agent to load, how the bundled mock CRM should
//! misbehave, what is said and which tools the model calls, and what to expect.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use midcall::demo::{parse_route, MockRule};
use midcall::ActionSet;

/// A call script as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Script {
    /// One line describing the call.
    #[serde(default)]
    pub(crate) title: Option<String>,
    /// The agent file, relative to the script.
    pub(crate) agent: String,
    #[serde(default)]
    pub(crate) call: CallDef,
    #[serde(default)]
    pub(crate) runtime: RuntimeDef,
    #[serde(default)]
    pub(crate) mock: Vec<MockRule>,
    pub(crate) turns: Vec<TurnDef>,
    #[serde(default)]
    pub(crate) end: EndDef,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CallDef {
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default = "default_from")]
    pub(crate) from_number: String,
    #[serde(default)]
    pub(crate) to_number: Option<String>,
}

impl Default for CallDef {
    fn default() -> Self {
        CallDef {
            id: None,
            from_number: default_from(),
            to_number: None,
        }
    }
}

fn default_from() -> String {
    "+15551234567".into()
}

/// Runtime settings for this call.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuntimeDef {
    /// Consecutive failures that open a host's breaker (default 5).
    #[serde(default)]
    pub(crate) breaker_threshold: Option<u32>,
    /// Each tool call's turn budget (default 2000 ms; the action's timeout_ms still applies).
    #[serde(default)]
    pub(crate) turn_budget_ms: Option<u64>,
}

/// One turn: exactly one of `user`, `ai`, `tool`, `pause_ms`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TurnDef {
    #[serde(default)]
    pub(crate) user: Option<String>,
    /// The caller talks over the agent (shown as a barge-in).
    #[serde(default)]
    pub(crate) barge_in: bool,
    #[serde(default)]
    pub(crate) ai: Option<String>,
    /// A tool call the model makes.
    #[serde(default)]
    pub(crate) tool: Option<String>,
    /// The model's tool-call id (default `tc_<turn>`); a re-issued call usually has a new one.
    #[serde(default)]
    pub(crate) id: Option<String>,
    /// The model's arguments (default `{}`).
    #[serde(default)]
    pub(crate) args: Option<Value>,
    #[serde(default)]
    pub(crate) pause_ms: Option<u64>,
    #[serde(default)]
    pub(crate) expect: Option<Expect>,
}

/// What a tool turn should produce; a miss is reported and makes the exit code 1.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Expect {
    #[serde(default)]
    pub(crate) status: Option<String>,
    #[serde(default)]
    pub(crate) filler: Option<bool>,
    #[serde(default)]
    pub(crate) fallback: Option<bool>,
    #[serde(default)]
    pub(crate) deduplicated: Option<bool>,
    #[serde(default)]
    pub(crate) cache: Option<String>,
    #[serde(default)]
    pub(crate) attempts: Option<u32>,
    /// State values after the turn, by dotted path.
    #[serde(default)]
    pub(crate) state: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EndDef {
    #[serde(default = "default_reason")]
    pub(crate) reason: String,
    #[serde(default)]
    pub(crate) outcome: Option<String>,
}

impl Default for EndDef {
    fn default() -> Self {
        EndDef {
            reason: default_reason(),
            outcome: None,
        }
    }
}

fn default_reason() -> String {
    "user_hangup".into()
}

/// A turn, checked.
#[derive(Debug)]
pub(crate) enum Turn<'a> {
    User {
        text: &'a str,
        barge_in: bool,
    },
    Ai(&'a str),
    Tool {
        name: &'a str,
        id: String,
        args: Value,
        expect: Option<&'a Expect>,
    },
    Pause(u64),
}

/// Reads a script and the agent it names; every problem names the file and the turn.
pub(crate) fn load(path: &Path) -> Result<(Script, ActionSet, PathBuf), String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
    if let Ok(v) = toml::from_str::<Value>(&text) {
        if v.get("agent").is_some_and(Value::is_object) || v.get("actions").is_some() {
            return Err(format!(
                "{shown} is an agent file, not a call script; a script names its agent \
                 (agent = \"agent.toml\") and lists [[turns]]: try examples/front-desk/call.toml"
            ));
        }
    }
    let name = shown.to_string();
    let script: Script = midcall::config::from_str_all(
        &name,
        &text,
        midcall::Syntax::Toml,
        &[("turns", "turn"), ("mock", "mock")],
    )
    .map_err(|e| e.to_string())?;
    let agent_path = path.parent().unwrap_or(Path::new(".")).join(&script.agent);
    if !agent_path.exists() {
        return Err(format!(
            "{shown}: agent = \"{}\" (relative to the script) is {}, which does not exist",
            script.agent,
            agent_path.display()
        ));
    }
    let set = ActionSet::load(&agent_path).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    for (i, t) in script.turns.iter().enumerate() {
        let kinds = [
            t.user.is_some(),
            t.ai.is_some(),
            t.tool.is_some(),
            t.pause_ms.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if kinds != 1 {
            problems.push(format!(
                "{shown}: turn {}: give exactly one of user, ai, tool, pause_ms",
                i + 1
            ));
        }
        if let Some(name) = &t.tool {
            if set.action(name).is_none() {
                problems.push(format!(
                    "{shown}: turn {}: agent \"{}\" has no action \"{name}\"",
                    i + 1,
                    set.agent().id
                ));
            }
        } else if t.args.is_some() || t.expect.is_some() || t.id.is_some() {
            problems.push(format!(
                "{shown}: turn {}: args, id and expect belong to tool turns",
                i + 1
            ));
        }
        if t.barge_in && t.user.is_none() {
            problems.push(format!(
                "{shown}: turn {}: barge_in belongs to user turns",
                i + 1
            ));
        }
        if let Some(e) = &t.expect {
            for p in e.state.keys() {
                if let Err(why) = midcall::StatePath::parse(p) {
                    problems.push(format!(
                        "{shown}: turn {}: expect.state.\"{p}\": {why}",
                        i + 1
                    ));
                }
            }
        }
    }
    for (i, r) in script.mock.iter().enumerate() {
        if parse_route(&r.route).is_none() {
            problems.push(format!(
                "{shown}: mock {}: route \"{}\" is not \"METHOD host/path\"",
                i + 1,
                r.route
            ));
        }
    }
    if script.turns.is_empty() {
        problems.push(format!("{shown}: a script needs at least one turn"));
    }
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    Ok((script, set, agent_path))
}

impl Script {
    /// The turns, checked by [`load`].
    pub(crate) fn turns(&self) -> Vec<Turn<'_>> {
        self.turns
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if let Some(text) = &t.user {
                    Turn::User {
                        text,
                        barge_in: t.barge_in,
                    }
                } else if let Some(text) = &t.ai {
                    Turn::Ai(text)
                } else if let Some(name) = &t.tool {
                    Turn::Tool {
                        name,
                        id: t.id.clone().unwrap_or_else(|| format!("tc_{}", i + 1)),
                        args: t
                            .args
                            .clone()
                            .unwrap_or_else(|| Value::Object(Default::default())),
                        expect: t.expect.as_ref(),
                    }
                } else {
                    Turn::Pause(t.pause_ms.unwrap_or(0))
                }
            })
            .collect()
    }
}
