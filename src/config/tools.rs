//! Tool definitions for the model, and validation of the arguments it sends.

use std::fmt;

use serde_json::{json, Value};

use super::model::ActionSet;

/// The tool-list format a model provider expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
    OpenAi,
    /// `[{"name", "description", "input_schema"}]`.
    Anthropic,
}

/// An action's argument schema (JSON Schema), compiled once at load.
pub struct ArgSchema {
    schema: Value,
    required: Vec<String>,
    validator: jsonschema::Validator,
}

impl fmt::Debug for ArgSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArgSchema")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// Arguments that do not match the action's schema: one line per offending field, in words a
/// model can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgsError {
    /// The action.
    pub action: String,
    /// Each problem, `field: what is wrong`.
    pub problems: Vec<String>,
}

impl fmt::Display for ArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid arguments for {}: {}",
            self.action,
            self.problems.join("; ")
        )
    }
}

impl std::error::Error for ArgsError {}

/// Most problems listed for one call; a model needs the first few, not hundreds.
const MAX_ARG_PROBLEMS: usize = 8;

impl ArgSchema {
    /// Compiles a schema; it must be a valid JSON Schema describing an object.
    pub fn compile(schema: &Value) -> Result<ArgSchema, SchemaError> {
        Self::compile_inner(schema).map_err(SchemaError)
    }

    /// See [`Self::compile`].
    fn compile_inner(schema: &Value) -> Result<ArgSchema, String> {
        let Value::Object(map) = schema else {
            return Err(
                "must be a JSON Schema object such as { type = \"object\", properties = { ... } }"
                    .into(),
            );
        };
        match map.get("type") {
            Some(Value::String(t)) if t == "object" => {}
            _ => return Err(
                "the top-level schema must have type = \"object\" (tool arguments are an object)"
                    .into(),
            ),
        }
        let validator = jsonschema::validator_for(schema).map_err(|e| {
            format!(
                "invalid JSON Schema at {}: {e}",
                pointer(e.instance_path.as_str())
            )
        })?;
        let required = match map.get("required") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        if let (Some(Value::Object(props)), false) = (map.get("properties"), required.is_empty()) {
            if let Some(missing) = required.iter().find(|r| !props.contains_key(*r)) {
                return Err(format!(
                    "required lists \"{missing}\", which is not among the properties"
                ));
            }
        }
        Ok(ArgSchema {
            schema: schema.clone(),
            required,
            validator,
        })
    }

    /// The schema as written.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// The required top-level properties.
    pub fn required(&self) -> &[String] {
        &self.required
    }

    /// Checks arguments against the schema.
    pub fn validate(&self, action: &str, args: &Value) -> Result<(), ArgsError> {
        if self.validator.is_valid(args) {
            return Ok(());
        }
        let problems = self
            .validator
            .iter_errors(args)
            .take(MAX_ARG_PROBLEMS)
            .map(|e| {
                let at = pointer(e.instance_path.as_str());
                let mut msg = e.to_string();
                if msg.len() > 200 {
                    let mut cut = 200;
                    while !msg.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    msg.truncate(cut);
                    msg.push('…');
                }
                format!("{at}: {msg}")
            })
            .collect();
        Err(ArgsError {
            action: action.to_string(),
            problems,
        })
    }
}

/// `/a/0/b` → `a[0].b`; the root is `arguments`.
fn pointer(p: &str) -> String {
    if p.is_empty() {
        return "arguments".into();
    }
    let mut out = String::new();
    for seg in p.trim_start_matches('/').split('/') {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.parse::<usize>().is_ok() && !out.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

impl ActionSet {
    /// The tools list for a model provider: one entry per action, in file order. An action
    /// without `parameters` takes an empty object.
    pub fn tool_definitions(&self, format: Format) -> Value {
        let tools: Vec<Value> = self
            .actions
            .iter()
            .map(|a| {
                let params = a
                    .parameters
                    .as_ref()
                    .map(|p| p.schema.clone())
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                match format {
                    Format::OpenAi => json!({
                        "type": "function",
                        "function": {"name": a.name, "description": a.description, "parameters": params}
                    }),
                    Format::Anthropic => json!({
                        "name": a.name, "description": a.description, "input_schema": params
                    }),
                }
            })
            .collect();
        Value::Array(tools)
    }
}

crate::text_error! {
    /// An argument schema that is not a JSON Schema of an object (the agent file's fault).
    SchemaError
}
