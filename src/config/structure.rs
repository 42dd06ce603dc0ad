//! Structural problems, all at once: a file is read into a JSON value, deserialized into its
//! serde structs, and each unknown field or value of the wrong type is reported (with a "did
//! you mean" where a known name is close), removed, and deserializing tries again; every
//! problem is placed at its line and column, in TOML and JSON alike.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{ConfigError, LoadError, Seg};
use super::load::{line_col, Syntax};

/// Most problems repaired in one file before giving up on finding more.
const MAX_REPAIRS: usize = 64;

/// Where the values of one file are, for placing problems.
pub(crate) enum Locator {
    Toml(String, Option<Box<toml_edit::ImDocument<String>>>),
    Json(String),
}

impl Locator {
    /// Line and column of the value at `path` (or of its nearest ancestor that is found).
    pub(crate) fn locate(&self, path: &[Seg]) -> Option<(usize, usize)> {
        match self {
            Locator::Toml(text, doc) => {
                let start = super::load::span_of(doc.as_ref()?.as_item(), path)?;
                Some(line_col(text, start))
            }
            Locator::Json(text) => {
                let start = json_offset(text.as_bytes(), path, false)?;
                Some(line_col(text, start))
            }
        }
    }

    /// Line and column of the key that ends `path` (an unknown field), else of its value.
    fn locate_key(&self, path: &[Seg]) -> Option<(usize, usize)> {
        let key_start = match self {
            Locator::Toml(text, doc) => {
                let (Some(Seg::Key(last)), parent) =
                    (path.last(), &path[..path.len().saturating_sub(1)])
                else {
                    return self.locate(path);
                };
                let mut item = doc.as_ref()?.as_item();
                for seg in parent {
                    item = match seg {
                        Seg::Key(k) => item.get(k.as_str()),
                        Seg::Index(i) => item.get(*i),
                    }?;
                }
                let span = match item {
                    toml_edit::Item::Table(t) => t.key(last).and_then(|k| k.span()),
                    toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                        t.key(last).and_then(|k| k.span())
                    }
                    _ => None,
                };
                span.map(|s| line_col(text, s.start))
            }
            Locator::Json(text) => {
                json_offset(text.as_bytes(), path, true).map(|o| line_col(text, o))
            }
        };
        key_start.or_else(|| self.locate(path))
    }
}

/// Reads `text` into a value, or the one syntax error that stops reading.
pub(crate) fn read(name: &str, text: &str, syntax: Syntax) -> Result<(Value, Locator), LoadError> {
    match syntax {
        Syntax::Toml => match toml::from_str::<toml::Value>(text) {
            Ok(v) => {
                let doc = toml_edit::ImDocument::parse(text.to_string())
                    .ok()
                    .map(Box::new);
                Ok((toml_to_json(v), Locator::Toml(text.to_string(), doc)))
            }
            Err(e) => Err(LoadError::one(
                name,
                e.span().map(|s| line_col(text, s.start)),
                e.message().trim().to_string(),
            )),
        },
        Syntax::Json => match serde_json::from_str::<Value>(text) {
            Ok(v) => Ok((v, Locator::Json(text.to_string()))),
            Err(e) => {
                let msg = e.to_string();
                let msg = match msg.rfind(" at line ") {
                    Some(i) => msg[..i].to_string(),
                    None => msg,
                };
                Err(LoadError::one(
                    name,
                    Some(json_position(text, e.line(), e.column())),
                    msg,
                ))
            }
        },
    }
}

/// Deserializes `value`, collecting every structural problem. Returns the value when, after
/// the repairs, it could be read (so later checks can report their problems too), and the
/// problems found.
pub(crate) fn deserialize_all<T: DeserializeOwned>(
    name: &str,
    mut value: Value,
    locator: &Locator,
    context: impl Fn(&Value, &[Seg]) -> (Option<String>, usize),
) -> (Option<T>, Vec<ConfigError>) {
    let original = value.clone();
    let mut errors = Vec::new();
    // A missing field is reported and stood in for, to read on; the read value is then not
    // used (a stand-in is no value of the user's).
    let mut stand_in: Option<(Vec<Seg>, usize)> = None;
    let mut stood_in = false;
    // The last key removed for a wrong type: if it was required, its "missing field" is no
    // news (it was just reported), so it is stood in for silently.
    let mut removed: Option<Vec<Seg>> = None;
    for _ in 0..MAX_REPAIRS {
        let result: Result<T, _> = serde_path_to_error::deserialize(value.clone());
        let e = match result {
            Ok(t) => return ((!stood_in).then_some(t), errors),
            Err(e) => e,
        };
        let mut path = to_segs(e.path());
        let inner = e.into_inner().to_string();
        // Our own stand-in has the wrong type: try the next kind of value, silently; a table
        // stand-in that misses a field of its own gets one for it.
        if let Some((at, tried)) = &stand_in {
            if *at == path {
                if let Some(inner_missing) = missing_field(&inner) {
                    let mut deeper = path.clone();
                    deeper.push(Seg::Key(inner_missing));
                    if set(&mut value, &deeper, STAND_INS[0]()) {
                        stand_in = Some((deeper, 0));
                        continue;
                    }
                }
                let Some(next) = STAND_INS.get(tried + 1) else {
                    break;
                };
                set(&mut value, &path, next());
                stand_in = Some((path, tried + 1));
                continue;
            }
        }
        if let (Some(gone), Some(missing)) = (&removed, missing_field(&inner)) {
            let mut at = path.clone();
            at.push(Seg::Key(missing));
            if *gone == at && set(&mut value, &at, STAND_INS[0]()) {
                stand_in = Some((at, 0));
                stood_in = true;
                removed = None;
                continue;
            }
        }
        let (message, unknown) = explain(&inner);
        // serde names an unknown field's container; the field itself is in the message.
        if let Some(field) = &unknown {
            if path.last() != Some(&Seg::Key(field.clone())) {
                path.push(Seg::Key(field.clone()));
            }
        }
        let (ctx, skip) = context(&original, &path);
        // An unknown field is named in the message; the field shown is where it stands.
        let shown = if unknown.is_some() {
            &path[..path.len() - 1]
        } else {
            &path[..]
        };
        let field = path_text(&shown[skip.min(shown.len())..]);
        let location = if unknown.is_some() {
            locator.locate_key(&path)
        } else {
            locator.locate(&path)
        };
        errors.push(ConfigError {
            file: name.to_string(),
            location,
            context: ctx,
            field: (!field.is_empty()).then_some(field),
            message,
        });
        // Remove what was wrong (or stand in for what is missing) and read again.
        if let Some(missing) = missing_field(&inner) {
            let mut at = path.clone();
            at.push(Seg::Key(missing));
            if !set(&mut value, &at, STAND_INS[0]()) {
                break;
            }
            stand_in = Some((at, 0));
            stood_in = true;
        } else if remove(&mut value, &path) {
            removed = Some(path);
        } else {
            break;
        }
    }
    (None, errors)
}

/// A TOML value as JSON; a non-finite float becomes its text, so a field that wants a number
/// reports it instead of reading it as absent.
fn toml_to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string())),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

/// Values tried in turn in place of a missing field.
const STAND_INS: [fn() -> Value; 5] = [
    || Value::String(String::new()),
    || Value::from(0),
    || Value::Bool(false),
    || Value::Object(Default::default()),
    || Value::Array(Vec::new()),
];

fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// The map holding the entry at `path`, and the entry's key; `None` when the path does not
/// end in a map key.
fn parent_map<'a>(
    value: &'a mut Value,
    path: &'a [Seg],
) -> Option<(&'a mut serde_json::Map<String, Value>, &'a String)> {
    let (Seg::Key(last), parent) = path.split_last()? else {
        return None;
    };
    let mut v = value;
    for seg in parent {
        v = match (seg, v) {
            (Seg::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Seg::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    match v {
        Value::Object(m) => Some((m, last)),
        _ => None,
    }
}

/// Sets the map entry at `path`; false when the path does not lead to a map.
fn set(value: &mut Value, path: &[Seg], new: Value) -> bool {
    match parent_map(value, path) {
        Some((m, key)) => {
            m.insert(key.clone(), new);
            true
        }
        None => false,
    }
}

/// The friendlier message for a serde error, and the unknown field's name if that is what it is.
fn explain(message: &str) -> (String, Option<String>) {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // The name may itself hold a backtick or the word "expected": split at the last one.
        let (field, list) = match rest.rfind("`, expected ") {
            Some(i) => (&rest[..i], &rest[i + "`, expected ".len()..]),
            None => (rest.strip_suffix('`').unwrap_or(rest), ""),
        };
        let field = field.to_string();
        let expected: Vec<&str> = list
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s)
            .collect();
        let text = match closest(&field, &expected) {
            Some(near) => format!("unknown field `{field}`; did you mean `{near}`?"),
            None if expected.is_empty() => format!("unknown field `{field}`"),
            None => format!(
                "unknown field `{field}` (the fields here are: {})",
                expected.join(", ")
            ),
        };
        return (text, Some(field));
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((got, want)) = rest.rsplit_once(", expected ") {
                // The value is the user's own text: shown short (it may be a pasted secret).
                let mut short: String = got.chars().take(40).collect();
                if got.chars().count() > 40 {
                    short.push('…');
                }
                let got = short;
                return (format!("expected {}, got {got}", kind_name(want)), None);
            }
        }
    }
    (message.to_string(), None)
}

/// What serde calls a type, as a person would.
fn kind_name(serde_name: &str) -> String {
    match serde_name.trim() {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" | "isize" => {
            "a whole number".into()
        }
        "f32" | "f64" => "a number".into(),
        "a boolean" | "bool" => "true or false".into(),
        "a string" => "a string".into(),
        "a sequence" => "a list".into(),
        "a map" => "a table".into(),
        other if other.starts_with("struct ") => "a table".into(),
        other => other.to_string(),
    }
}

/// The known name closest to `word`, when it is close enough to be a typo.
pub(crate) fn closest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    known
        .iter()
        .map(|k| (edit_distance(word, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Optimal string alignment distance: insertions, deletions, substitutions, transpositions.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

fn to_segs(path: &serde_path_to_error::Path) -> Vec<Seg> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            Segment::Unknown => None,
        })
        .collect()
}

/// `cache.ttl_s`, `steps[0].send_webhook.url`.
pub(crate) fn path_text(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Removes the map entry at `path`; false when the path does not end in a map key.
fn remove(value: &mut Value, path: &[Seg]) -> bool {
    parent_map(value, path).is_some_and(|(m, key)| m.shift_remove(key).is_some())
}

/// serde_json's line and (byte) column as line and character column, like every other place.
pub(crate) fn json_position(text: &str, line: usize, byte_col: usize) -> (usize, usize) {
    let start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    let mut offset = (start + byte_col.saturating_sub(1)).min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    line_col(text, offset)
}

/// The byte offset of the JSON value at `path` in `text` (or of its nearest ancestor found);
/// with `key`, of the key that ends the path.
fn json_offset(text: &[u8], path: &[Seg], key: bool) -> Option<usize> {
    let mut pos = skip_ws(text, 0);
    let mut found = pos;
    for (n, seg) in path.iter().enumerate() {
        let last = n + 1 == path.len();
        match (seg, text.get(pos)?) {
            (Seg::Key(want), b'{') => {
                pos = skip_ws(text, pos + 1);
                let mut hit = None;
                while text.get(pos)? == &b'"' {
                    let (name, after) = json_string(text, pos)?;
                    let colon = skip_ws(text, after);
                    if text.get(colon)? != &b':' {
                        return Some(found);
                    }
                    let value = skip_ws(text, colon + 1);
                    if name == *want {
                        if key && last {
                            return Some(pos);
                        }
                        hit = Some(value);
                        break;
                    }
                    pos = skip_ws(text, skip_value(text, value)?);
                    if text.get(pos)? == &b',' {
                        pos = skip_ws(text, pos + 1);
                    }
                }
                match hit {
                    Some(h) => pos = h,
                    None => return Some(found),
                }
            }
            (Seg::Index(want), b'[') => {
                pos = skip_ws(text, pos + 1);
                for _ in 0..*want {
                    pos = skip_ws(text, skip_value(text, pos)?);
                    if text.get(pos)? != &b',' {
                        return Some(found);
                    }
                    pos = skip_ws(text, pos + 1);
                }
            }
            _ => return Some(found),
        }
        found = pos;
    }
    Some(found)
}

fn skip_ws(text: &[u8], mut pos: usize) -> usize {
    while text.get(pos).is_some_and(|b| b.is_ascii_whitespace()) {
        pos += 1;
    }
    pos
}

/// A string's unescaped text (escapes other than `\"` and `\\` kept as written) and the
/// offset after its closing quote.
fn json_string(text: &[u8], pos: usize) -> Option<(String, usize)> {
    let mut out = Vec::new();
    let mut i = pos + 1;
    loop {
        match *text.get(i)? {
            b'"' => return Some((String::from_utf8_lossy(&out).into_owned(), i + 1)),
            b'\\' => {
                let next = *text.get(i + 1)?;
                if next != b'"' && next != b'\\' {
                    out.push(b'\\');
                }
                out.push(next);
                i += 2;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
}

/// The offset after the JSON value starting at `pos`.
fn skip_value(text: &[u8], pos: usize) -> Option<usize> {
    match *text.get(pos)? {
        b'"' => json_string(text, pos).map(|(_, end)| end),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = pos;
            loop {
                match *text.get(i)? {
                    b'"' => {
                        i = json_string(text, i)?.1;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let mut i = pos;
            while text
                .get(i)
                .is_some_and(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
            {
                i += 1;
            }
            Some(i)
        }
    }
}

/// Reads any config-shaped file (serde structs with `deny_unknown_fields`) reporting every
/// structural problem at once, each at its line and column: call scripts use it. `entries`
/// names the top-level lists of tables and what one of them is called in messages
/// (`("turns", "turn")` says `turn 2: …`, counting from 1).
pub fn from_str_all<T: DeserializeOwned>(
    name: &str,
    text: &str,
    syntax: Syntax,
    entries: &[(&str, &str)],
) -> Result<T, LoadError> {
    let (value, locator) = read(name, text, syntax)?;
    let context = |_: &Value, path: &[Seg]| match (path.first(), path.get(1)) {
        (Some(Seg::Key(k)), Some(Seg::Index(i))) => entries
            .iter()
            .find(|(key, _)| key == k)
            .map_or((None, 0), |(_, label)| {
                (Some(format!("{label} {}", i + 1)), 2)
            }),
        _ => (None, 0),
    };
    let (t, errors) = deserialize_all(name, value, &locator, context);
    match t {
        Some(t) if errors.is_empty() => Ok(t),
        _ => Err(LoadError { errors }),
    }
}
