//! RFC 9535 JSONPath queries, compiled once, and the extraction of values from responses.
//!
//! The engine sits behind [`Query`] so a faster evaluator can replace it without touching
//! callers; today it is `serde_json_path`, which passes the whole compliance test suite.
//!
//! May call: `state` (extracted values are written at state paths); nothing else.

mod extract;
mod fast;

pub use extract::{
    BodyError, Conversion, ExtractError, ExtractRule, Extracted, Extractor, MAX_EXTRACTED_NODES,
};

use std::fmt;

use serde_json::Value;

/// Parses a response body as JSON. Nesting deeper than 128 is refused (serde_json's limit),
/// so a hostile body cannot exhaust the stack.
pub fn parse_response(body: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice(body)
}

/// A compiled JSONPath query.
#[derive(Clone)]
pub struct Query {
    text: Box<str>,
    inner: serde_json_path::JsonPath,
    fast: Option<fast::FastPlan>,
}

impl fmt::Debug for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Query({})", self.text)
    }
}

impl PartialEq for Query {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

/// A query that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSONPath at character {position}: {message}")]
pub struct QueryError {
    /// Character position (1-based) where parsing failed.
    pub position: usize,
    /// What the parser expected.
    pub message: String,
}

impl Query {
    /// Compiles an RFC 9535 query such as `$.data.customer.name`.
    pub fn compile(text: &str) -> Result<Query, QueryError> {
        check_unicode_escapes(text)?;
        check_nesting(text)?;
        // serde_json_path 0.7 panics on some truncated input (an `unreachable!` on nom's
        // Incomplete); the escape check above rules out the known case, this catches the rest.
        let parsed =
            std::panic::catch_unwind(|| serde_json_path::JsonPath::parse(text)).map_err(|_| {
                QueryError {
                    position: text.chars().count(),
                    message: "the query ends in the middle of an expression".into(),
                }
            })?;
        match parsed {
            Ok(inner) => Ok(Query {
                text: text.into(),
                inner,
                fast: fast::FastPlan::parse(text),
            }),
            Err(e) => {
                let byte = e.position().min(text.len());
                let byte = (0..=byte)
                    .rev()
                    .find(|b| text.is_char_boundary(*b))
                    .unwrap_or(0);
                let message = match e.message() {
                    // The parser's catch-all says nothing of what it wanted: say what may
                    // stand at that point.
                    "parser error" => match text[byte..].chars().next() {
                        None => "the query ends too early: expected a name, an index, a \
                                 slice, '*' or a filter, and then ']' to close a bracket"
                            .to_string(),
                        Some('[') => "expected a selector after '[' (a quoted name, an \
                                      index, a slice, '*' or a '?' filter) and a closing ']'"
                            .to_string(),
                        Some(c) => format!(
                            "unexpected '{c}': expected '.name', '..name', '[...]' (a quoted \
                             name, an index, a slice, '*' or a '?' filter) or the end"
                        ),
                    },
                    other => other.to_string(),
                };
                Err(QueryError {
                    position: text[..byte].chars().count() + 1,
                    message,
                })
            }
        }
    }

    /// The query as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the query runs on the fast path (no filter selectors).
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// The nodes the fast path selects from a JSON body, or `None` when the query or the body
    /// is not for the fast path (the full engine then decides). Exposed for differential tests.
    #[doc(hidden)]
    #[doc(hidden)]
    pub fn select_fast(&self, body: &[u8]) -> Option<Vec<Value>> {
        let plan = self.fast.as_ref()?;
        let mut bytes = body.to_vec();
        let mut buffers = simd_json::Buffers::with_max_depth(bytes.len(), fast::MAX_DEPTH);
        let tape = fast::parse_tape(&mut bytes, &mut buffers)?;
        Some(plan.select(&tape.0))
    }

    /// The nodes the query selects, in document order.
    pub fn select<'v>(&self, doc: &'v Value) -> Vec<&'v Value> {
        self.inner.query(doc).all()
    }

    /// The normalized paths (`$['a'][0]`) of the selected nodes, in document order.
    pub fn select_paths(&self, doc: &Value) -> Vec<String> {
        self.inner
            .query_located(doc)
            .iter()
            .map(|n| normalized_path(n.location()))
            .collect()
    }
}

/// Longest query accepted: 4096 characters.
pub const MAX_QUERY_CHARS: usize = 4096;
/// Deepest nesting of brackets and parentheses inside each other: 10. serde_json_path's parse
/// time grows about 2x per nested filter (found by the `jsonpath_compile` fuzz target: 20
/// levels took 4 s), and real queries nest two or three deep.
pub const MAX_QUERY_NESTING: usize = 10;

fn check_nesting(text: &str) -> Result<(), QueryError> {
    if text.chars().count() > MAX_QUERY_CHARS {
        return Err(QueryError {
            position: MAX_QUERY_CHARS + 1,
            message: format!("the query is longer than {MAX_QUERY_CHARS} characters"),
        });
    }
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in text.chars().enumerate() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => quote = Some(c),
            '[' | '(' => {
                depth += 1;
                if depth > MAX_QUERY_NESTING {
                    return Err(QueryError {
                        position: i + 1,
                        message: format!(
                            "brackets and parentheses nest more than {MAX_QUERY_NESTING} deep"
                        ),
                    });
                }
            }
            ']' | ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Every `\\u` escape needs four hex digits. serde_json_path panics when the query ends inside
/// one (found by the `jsonpath_compile` fuzz target), so this is checked first. Backslashes
/// are only valid as escapes in string literals, so the scan cannot refuse a valid query.
fn check_unicode_escapes(text: &str) -> Result<(), QueryError> {
    let mut chars = text.chars().enumerate();
    while let Some((_, c)) = chars.next() {
        if c != '\\' {
            continue;
        }
        if let Some((i, 'u')) = chars.next() {
            let hex: String = text.chars().skip(i + 1).take(4).collect();
            if hex.len() < 4 || !hex.chars().all(|h| h.is_ascii_hexdigit()) {
                return Err(QueryError {
                    position: i,
                    message: "a \\u escape needs four hex digits".into(),
                });
            }
        }
    }
    Ok(())
}

/// RFC 9535 section 2.7 normalized path: names in single quotes with the escapes it requires.
fn normalized_path(path: &serde_json_path::NormalizedPath<'_>) -> String {
    use serde_json_path_core::path::PathElement;
    use std::fmt::Write;
    let mut out = String::from("$");
    for el in path.iter() {
        match el {
            PathElement::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
            PathElement::Name(name) => {
                out.push_str("['");
                for c in name.chars() {
                    match c {
                        '\'' => out.push_str("\\'"),
                        '\\' => out.push_str("\\\\"),
                        '\u{8}' => out.push_str("\\b"),
                        '\u{c}' => out.push_str("\\f"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        '\t' => out.push_str("\\t"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push_str("']");
            }
        }
    }
    out
}
