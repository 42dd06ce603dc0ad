//! Extraction: an action's `extract` rules turn a parsed response into typed values bound for
//! state paths.

use std::borrow::Cow;
use std::cell::RefCell;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::Query;
use crate::state::StatePath;

/// How an extracted node is converted before it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Conversion {
    /// Stored as it is (the default).
    #[default]
    Json,
    /// A string; numbers and booleans become their JSON text.
    String,
    /// A number; a string holding a number is parsed.
    Number,
    /// A boolean; the strings `"true"` and `"false"` are accepted.
    Bool,
}

impl Conversion {
    /// Parses `string`, `number`, `bool` or `json`.
    pub fn parse(s: &str) -> Option<Conversion> {
        Some(match s {
            "json" => Conversion::Json,
            "string" => Conversion::String,
            "number" => Conversion::Number,
            "bool" => Conversion::Bool,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Conversion::Json => "json",
            Conversion::String => "string",
            Conversion::Number => "number",
            Conversion::Bool => "bool",
        }
    }

    fn apply(self, v: &Value) -> Option<Value> {
        match (self, v) {
            (Conversion::Json, v) => Some(v.clone()),
            (Conversion::String, Value::String(_)) => Some(v.clone()),
            (Conversion::String, Value::Number(_) | Value::Bool(_)) => {
                Some(Value::String(v.to_string()))
            }
            (Conversion::Number, Value::Number(_)) => Some(v.clone()),
            (Conversion::Number, Value::String(s)) => {
                let s = s.trim();
                if let Ok(i) = s.parse::<i64>() {
                    Some(Value::from(i))
                } else {
                    s.parse::<f64>()
                        .ok()
                        .and_then(serde_json::Number::from_f64)
                        .map(Value::Number)
                }
            }
            (Conversion::Bool, Value::Bool(_)) => Some(v.clone()),
            (Conversion::Bool, Value::String(s)) => match s.as_str() {
                "true" => Some(Value::Bool(true)),
                "false" => Some(Value::Bool(false)),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Most nodes one rule may select: 1000. A response that selects more is refused rather than
/// copied whole into state.
pub const MAX_EXTRACTED_NODES: usize = 1000;

/// One extraction rule: where in state, from which query, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractRule {
    /// Where the value is written.
    pub target: StatePath,
    /// What selects it.
    pub query: Query,
    /// A missing value is an error (default false: nothing is written).
    pub required: bool,
    /// Written when the query selects nothing.
    pub default: Option<Value>,
    /// Conversion of each node.
    pub conversion: Conversion,
    /// Store every node as an array instead of the first node.
    pub all: bool,
}

/// A response value that could not be extracted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    /// A required query selected nothing.
    #[error("extract \"{target}\": {query} selected nothing and the value is required")]
    Missing {
        /// The state path.
        target: String,
        /// The query.
        query: String,
    },
    /// A query selected more nodes than [`MAX_EXTRACTED_NODES`].
    #[error("extract \"{target}\": {query} selected {count} nodes, more than the {MAX_EXTRACTED_NODES} allowed")]
    TooMany {
        /// The state path.
        target: String,
        /// The query.
        query: String,
        /// How many it selected.
        count: usize,
    },
    /// A node could not be converted.
    #[error("extract \"{target}\": {query} selected a {found}, which cannot be read as {wanted}")]
    Conversion {
        /// The state path.
        target: String,
        /// The query.
        query: String,
        /// The JSON type found.
        found: &'static str,
        /// The conversion asked for.
        wanted: &'static str,
    },
}

/// An action's compiled extraction rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extractor {
    rules: Vec<ExtractRule>,
    /// Every rule can run on the fast path.
    fast: bool,
}

/// Values extracted from a response body, and where the time went.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// `(state path, value)` pairs, in rule order.
    pub values: Vec<(StatePath, Value)>,
    /// Time spent parsing the body.
    pub parse: Duration,
    /// Time spent selecting and converting.
    pub extract: Duration,
}

/// A body that could not be read or extracted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not valid JSON, or nested deeper than 128.
    #[error("the response is not valid JSON: {0}")]
    Json(String),
    /// The extraction rules failed.
    #[error(transparent)]
    Extract(#[from] ExtractError),
}

thread_local! {
    static BUFFERS: RefCell<simd_json::Buffers> =
        RefCell::new(simd_json::Buffers::with_max_depth(0, super::fast::MAX_DEPTH));
}

impl Extractor {
    /// Rules, in the order written.
    pub fn new(rules: Vec<ExtractRule>) -> Self {
        let fast = !rules.is_empty() && rules.iter().all(|r| r.query.is_fast());
        Extractor { rules, fast }
    }

    /// Parses a response body and extracts every rule. When every query is made of name,
    /// index, wildcard, slice and descendant selectors, the body is parsed by simd-json into a
    /// tape and the queries walk the tape; otherwise (filters), or when simd-json refuses the
    /// body, serde_json and the full RFC 9535 engine do the work, so acceptance and errors are
    /// always serde_json's.
    pub fn extract_bytes(&self, body: &[u8]) -> Result<Extracted, BodyError> {
        let start = Instant::now();
        if self.fast {
            let mut bytes = body.to_vec();
            let fast = BUFFERS.with(|b| {
                let mut buffers = b.borrow_mut();
                let tape = super::fast::parse_tape(&mut bytes, &mut buffers)?;
                let parsed = Instant::now();
                let values = self.run(|rule| {
                    rule.query
                        .fast
                        .as_ref()
                        .map(|p| p.select(&tape.0))
                        .unwrap_or_default()
                        .into_iter()
                        .map(Cow::Owned)
                        .collect()
                });
                Some((values, parsed))
            });
            if let Some((values, parsed)) = fast {
                return Ok(Extracted {
                    values: values?,
                    parse: parsed - start,
                    extract: parsed.elapsed(),
                });
            }
        }
        let doc = super::parse_response(body).map_err(|e| BodyError::Json(e.to_string()))?;
        let parsed = Instant::now();
        let values = self.extract(&doc)?;
        Ok(Extracted {
            values,
            parse: parsed - start,
            extract: parsed.elapsed(),
        })
    }

    /// The rules.
    pub fn rules(&self) -> &[ExtractRule] {
        &self.rules
    }

    /// True when there is nothing to extract.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Runs every rule on a parsed document: `(state path, value)` pairs, in rule order.
    /// Rules that select nothing and are neither required nor defaulted give no pair.
    pub fn extract(&self, doc: &Value) -> Result<Vec<(StatePath, Value)>, ExtractError> {
        self.run(|rule| {
            rule.query
                .select(doc)
                .into_iter()
                .map(Cow::Borrowed)
                .collect()
        })
    }

    fn run<'v>(
        &self,
        mut nodes_of: impl FnMut(&ExtractRule) -> Vec<Cow<'v, Value>>,
    ) -> Result<Vec<(StatePath, Value)>, ExtractError> {
        let mut out = Vec::with_capacity(self.rules.len());
        for rule in &self.rules {
            let nodes = nodes_of(rule);
            if nodes.len() > MAX_EXTRACTED_NODES {
                return Err(ExtractError::TooMany {
                    target: rule.target.to_string(),
                    query: rule.query.as_str().to_string(),
                    count: nodes.len(),
                });
            }
            let convert = |v: &Value| {
                rule.conversion
                    .apply(v)
                    .ok_or_else(|| ExtractError::Conversion {
                        target: rule.target.to_string(),
                        query: rule.query.as_str().to_string(),
                        found: crate::state::kind_of(v),
                        wanted: rule.conversion.name(),
                    })
            };
            let value = if rule.all {
                if nodes.is_empty() && rule.default.is_some() {
                    rule.default.clone()
                } else if nodes.is_empty() && rule.required {
                    None
                } else {
                    Some(Value::Array(
                        nodes.iter().map(|n| convert(n)).collect::<Result<_, _>>()?,
                    ))
                }
            } else {
                match nodes.first() {
                    Some(v) => Some(convert(v)?),
                    None => rule.default.clone(),
                }
            };
            match value {
                Some(v) => out.push((rule.target.clone(), v)),
                None if rule.required => {
                    return Err(ExtractError::Missing {
                        target: rule.target.to_string(),
                        query: rule.query.as_str().to_string(),
                    })
                }
                None => {}
            }
        }
        Ok(out)
    }
}
