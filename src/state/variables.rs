//! Conversation variables: a JSON object addressed by dotted paths, with a size cap.

use std::fmt;
use std::io;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Default cap on the serialized size of one call's variables: 256 KiB.
pub const DEFAULT_STATE_CAP_BYTES: usize = 256 * 1024;

/// A validated dotted path into the conversation variables, e.g. `customer.name`.
///
/// Segments are non-empty and made of ASCII letters, digits, `_` and `-`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatePath {
    text: Box<str>,
}

impl StatePath {
    /// Parses `a.b.c`. The error says which segment is wrong and why.
    pub fn parse(text: &str) -> Result<StatePath, PathError> {
        Self::parse_inner(text).map_err(PathError)
    }

    /// See [`Self::parse`].
    fn parse_inner(text: &str) -> Result<StatePath, String> {
        if text.is_empty() {
            return Err("state path is empty".into());
        }
        for (i, seg) in text.split('.').enumerate() {
            if seg.is_empty() {
                return Err(format!("state path \"{text}\": segment {} is empty", i + 1));
            }
            if let Some(c) = seg
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
            {
                return Err(format!(
                    "state path \"{text}\": character {c:?} is not allowed (use letters, digits, '_' and '-', separated by '.')"
                ));
            }
        }
        Ok(StatePath { text: text.into() })
    }

    /// The segments, outermost first.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.text.split('.')
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when `self` equals `other` or one contains the other (`a` and `a.b`).
    pub fn overlaps(&self, other: &StatePath) -> bool {
        let (a, b) = (self.as_str(), other.as_str());
        let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
        long == short || (long.starts_with(short) && long.as_bytes()[short.len()] == b'.')
    }
}

impl fmt::Display for StatePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for StatePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StatePath({})", self.text)
    }
}

/// Why a state write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The write would take the variables past their size cap.
    #[error("state write to \"{path}\" refused: it would grow the call's variables to {would_be} bytes, over the cap of {cap} bytes")]
    TooLarge {
        /// Where the write was aimed.
        path: String,
        /// Size the variables would have had.
        would_be: usize,
        /// The cap.
        cap: usize,
    },
    /// A segment on the way is a value that is not an object.
    #[error("state write to \"{path}\" refused: \"{at}\" holds a {kind}, not an object")]
    NotAnObject {
        /// Where the write was aimed.
        path: String,
        /// The prefix that holds a non-object.
        at: String,
        /// The JSON type found there.
        kind: &'static str,
    },
    /// The initial variables were not a JSON object.
    #[error("conversation state must be a JSON object, got {0}")]
    NotObject(&'static str),
}

/// The conversation's variables (`state.*` in templates): nested JSON values addressed by
/// dotted paths, capped in serialized size (default [`DEFAULT_STATE_CAP_BYTES`]).
///
/// The size is tracked incrementally as the exact length of the variables serialized as
/// compact JSON, so a write costs the size of the value written, not of the whole state.
#[derive(Clone, PartialEq)]
pub struct ConversationState {
    root: Map<String, Value>,
    used: usize,
    cap: usize,
}

impl Default for ConversationState {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ConversationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConversationState")
            .field("variables", &self.root)
            .field("used_bytes", &self.used)
            .field("cap_bytes", &self.cap)
            .finish()
    }
}

impl ConversationState {
    /// Empty variables with the default cap.
    pub fn new() -> Self {
        Self::with_cap(DEFAULT_STATE_CAP_BYTES)
    }

    /// Empty variables with a cap in bytes.
    pub fn with_cap(cap: usize) -> Self {
        ConversationState {
            root: Map::new(),
            used: 2,
            cap,
        }
    }

    /// Variables from a JSON object, with the default cap.
    pub fn from_value(value: Value) -> Result<Self, StateError> {
        let mut state = Self::new();
        match value {
            Value::Object(map) => {
                let used = json_len(&Value::Object(map.clone()));
                if used > state.cap {
                    return Err(StateError::TooLarge {
                        path: "(initial state)".into(),
                        would_be: used,
                        cap: state.cap,
                    });
                }
                state.root = map;
                state.used = used;
                Ok(state)
            }
            other => Err(StateError::NotObject(kind(&other))),
        }
    }

    /// The serialized size of the variables, in bytes.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// The size cap, in bytes.
    pub fn cap_bytes(&self) -> usize {
        self.cap
    }

    /// All variables.
    pub fn variables(&self) -> &Map<String, Value> {
        &self.root
    }

    /// The variables as one JSON object.
    pub fn to_value(&self) -> Value {
        Value::Object(self.root.clone())
    }

    /// The value at a path, if any.
    pub fn get(&self, path: &StatePath) -> Option<&Value> {
        self.get_segments(path.segments())
    }

    /// The value at a path given as segments, if any.
    pub fn get_segments<'a>(&self, mut segments: impl Iterator<Item = &'a str>) -> Option<&Value> {
        let first = segments.next()?;
        let mut cur = self.root.get(first)?;
        for seg in segments {
            cur = match cur {
                Value::Object(m) => m.get(seg)?,
                Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// Writes `value` at `path`, creating objects on the way. Refused (and nothing changes)
    /// when a prefix holds a non-object or the variables would exceed the cap.
    pub fn set(&mut self, path: &StatePath, value: Value) -> Result<(), StateError> {
        let segs: Vec<&str> = path.segments().collect();
        // Find how deep the existing objects go, refusing a non-object on the way.
        let mut depth = 0;
        let mut probe = &self.root;
        while depth + 1 < segs.len() {
            match probe.get(segs[depth]) {
                None => break,
                Some(Value::Object(m)) => probe = m,
                Some(other) => {
                    return Err(StateError::NotAnObject {
                        path: path.to_string(),
                        at: segs[..=depth].join("."),
                        kind: kind(other),
                    })
                }
            }
            depth += 1;
        }
        let mut map = &mut self.root;
        for (i, seg) in segs[..depth].iter().enumerate() {
            map = match map.get_mut(*seg) {
                Some(Value::Object(m)) => m,
                _ => {
                    return Err(StateError::NotAnObject {
                        path: path.to_string(),
                        at: segs[..=i].join("."),
                        kind: "value",
                    })
                }
            };
        }
        // Build the part of the path that does not exist yet around the value.
        let mut new_value = value;
        for seg in segs[depth + 1..].iter().rev() {
            let mut m = Map::new();
            m.insert((*seg).to_string(), new_value);
            new_value = Value::Object(m);
        }
        let key = segs[depth];
        let new_len = json_len(&new_value);
        let would_be = match map.get(key) {
            Some(old) => self.used - json_len(old) + new_len,
            None => self.used + str_json_len(key) + 1 + new_len + usize::from(!map.is_empty()),
        };
        if would_be > self.cap {
            return Err(StateError::TooLarge {
                path: path.to_string(),
                would_be,
                cap: self.cap,
            });
        }
        map.insert(key.to_string(), new_value);
        self.used = would_be;
        Ok(())
    }
}

impl Serialize for ConversationState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.root.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ConversationState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        ConversationState::from_value(value).map_err(serde::de::Error::custom)
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

struct Counter(usize);

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Length of a value serialized as compact JSON.
pub(crate) fn json_len(v: &Value) -> usize {
    let mut c = Counter(0);
    // Writing a Value into an infallible writer cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

fn str_json_len(s: &str) -> usize {
    let mut c = Counter(0);
    let _ = serde_json::to_writer(&mut c, s);
    c.0
}

crate::text_error! {
    /// A state path that does not parse; the message names the segment and why.
    PathError
}
