//! The fast extraction path: queries made only of name, index, wildcard, slice and descendant
//! selectors are evaluated directly on simd-json's tape, and only the selected nodes are turned
//! into `serde_json::Value`s. Anything else (filters) uses the full RFC 9535 engine. Agreement
//! with the full engine is tested on the compliance suite and on random documents and queries.

use serde_json::{Map, Number, Value};
use simd_json::{Node, StaticNode};

/// Deepest nesting the fast parser accepts: 127, the most serde_json's recursion limit (128)
/// lets through. Deeper documents fall back to serde_json, which refuses them with a clear
/// error.
pub(crate) const MAX_DEPTH: usize = 127;

#[derive(Debug, Clone, PartialEq)]
enum Sel {
    Name(Box<str>),
    Index(i64),
    Wild,
    Slice(Option<i64>, Option<i64>, Option<i64>),
}

#[derive(Debug, Clone, PartialEq)]
struct Seg {
    descendant: bool,
    sels: Vec<Sel>,
}

/// A query the fast path can run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FastPlan {
    segs: Vec<Seg>,
}

struct P<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
}

fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl P<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn blank(&mut self) {
        while self.peek().is_some_and(is_blank) {
            self.i += 1;
        }
    }
    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn shorthand(&mut self) -> Option<Box<str>> {
        let start = self.i;
        let mut chars = self.text[start..].char_indices();
        let (_, first) = chars.next()?;
        if !(first.is_ascii_alphabetic() || first == '_' || !first.is_ascii()) {
            return None;
        }
        let mut end = self.text.len();
        for (off, c) in chars {
            if !(c.is_ascii_alphanumeric() || c == '_' || !c.is_ascii()) {
                end = start + off;
                break;
            }
        }
        self.i = end;
        Some(self.text[start..end].into())
    }
    fn int(&mut self) -> Option<i64> {
        let start = self.i;
        self.eat(b'-');
        let digits = self.i;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
        let t = &self.text[digits..self.i];
        if t.is_empty() || (t.len() > 1 && t.starts_with('0')) || t.len() > 16 {
            return None;
        }
        let v: i64 = self.text[start..self.i].parse().ok()?;
        if (start != digits && v == 0) || v.abs() > (1i64 << 53) - 1 {
            return None;
        }
        Some(v)
    }
    fn string(&mut self) -> Option<Box<str>> {
        let q = self.peek()?;
        self.i += 1;
        let mut out = String::new();
        loop {
            let c = self.text[self.i..].chars().next()?;
            self.i += c.len_utf8();
            match c {
                c if c == q as char => return Some(out.into()),
                '\\' => {
                    let e = self.text[self.i..].chars().next()?;
                    self.i += e.len_utf8();
                    match e {
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        '/' => out.push('/'),
                        '\\' => out.push('\\'),
                        c if c == q as char => out.push(c),
                        'u' => {
                            let hi = self.hex4()?;
                            if (0xD800..0xDC00).contains(&hi) {
                                if !(self.eat(b'\\') && self.eat(b'u')) {
                                    return None;
                                }
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return None;
                                }
                                out.push(char::from_u32(
                                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00),
                                )?);
                            } else {
                                out.push(char::from_u32(hi)?);
                            }
                        }
                        _ => return None,
                    }
                }
                c if (c as u32) < 0x20 => return None,
                c => out.push(c),
            }
        }
    }
    fn hex4(&mut self) -> Option<u32> {
        let h = self.text.get(self.i..self.i + 4)?;
        if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.i += 4;
        u32::from_str_radix(h, 16).ok()
    }
    fn selector(&mut self) -> Option<Sel> {
        match self.peek()? {
            b'*' => {
                self.i += 1;
                Some(Sel::Wild)
            }
            b'\'' | b'"' => self.string().map(Sel::Name),
            b'-' | b'0'..=b'9' | b':' => {
                let start = if self.peek() == Some(b':') {
                    None
                } else {
                    Some(self.int()?)
                };
                self.blank();
                if !self.eat(b':') {
                    return start.map(Sel::Index);
                }
                self.blank();
                let end = if matches!(self.peek(), Some(b'-' | b'0'..=b'9')) {
                    Some(self.int()?)
                } else {
                    None
                };
                self.blank();
                let step = if self.eat(b':') {
                    self.blank();
                    if matches!(self.peek(), Some(b'-' | b'0'..=b'9')) {
                        Some(self.int()?)
                    } else {
                        None
                    }
                } else {
                    None
                };
                Some(Sel::Slice(start, end, step))
            }
            _ => None,
        }
    }
    fn bracket(&mut self) -> Option<Vec<Sel>> {
        let mut sels = Vec::new();
        loop {
            self.blank();
            sels.push(self.selector()?);
            self.blank();
            if self.eat(b']') {
                return Some(sels);
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }
}

impl FastPlan {
    /// The plan for `q`, or `None` when it uses anything but name, index, wildcard, slice and
    /// descendant selectors. Only called on queries the full engine already accepted.
    pub(crate) fn parse(q: &str) -> Option<FastPlan> {
        let mut p = P {
            s: q.as_bytes(),
            text: q,
            i: 0,
        };
        if !p.eat(b'$') {
            return None;
        }
        let mut segs = Vec::new();
        loop {
            p.blank();
            let Some(b) = p.peek() else { break };
            let seg = match b {
                b'.' => {
                    p.i += 1;
                    let descendant = p.eat(b'.');
                    let sels = if p.eat(b'*') {
                        vec![Sel::Wild]
                    } else if descendant && p.eat(b'[') {
                        p.bracket()?
                    } else {
                        vec![Sel::Name(p.shorthand()?)]
                    };
                    Seg { descendant, sels }
                }
                b'[' => {
                    p.i += 1;
                    Seg {
                        descendant: false,
                        sels: p.bracket()?,
                    }
                }
                _ => return None,
            };
            segs.push(seg);
        }
        Some(FastPlan { segs })
    }

    /// The selected nodes of a tape, in the full engine's order, as values.
    pub(crate) fn select(&self, tape: &[Node<'_>]) -> Vec<Value> {
        let mut current = vec![0usize];
        for seg in &self.segs {
            let mut next = Vec::new();
            for &n in &current {
                if seg.descendant {
                    descend(tape, n, &seg.sels, &mut next);
                } else {
                    for s in &seg.sels {
                        apply(tape, n, s, &mut next);
                    }
                }
            }
            current = next;
        }
        current.into_iter().map(|i| to_value(tape, i)).collect()
    }
}

fn size(tape: &[Node<'_>], i: usize) -> usize {
    match tape[i] {
        Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
        _ => 1,
    }
}

/// An object's members as the full engine sees them: unique keys in first-seen order, each
/// with its last value (how serde_json reads duplicate keys).
fn members<'t>(tape: &[Node<'t>], i: usize) -> Vec<(&'t str, usize)> {
    let Node::Object { len, .. } = tape[i] else {
        return Vec::new();
    };
    let mut out: Vec<(&'t str, usize)> = Vec::with_capacity(len);
    let mut j = i + 1;
    for _ in 0..len {
        let key = match tape[j] {
            Node::String(k) => k,
            _ => "",
        };
        let v = j + 1;
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = v,
            None => out.push((key, v)),
        }
        j = v + size(tape, v);
    }
    out
}

fn elements(tape: &[Node<'_>], i: usize) -> Vec<usize> {
    let Node::Array { len, .. } = tape[i] else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(len);
    let mut j = i + 1;
    for _ in 0..len {
        out.push(j);
        j += size(tape, j);
    }
    out
}

fn apply(tape: &[Node<'_>], n: usize, sel: &Sel, out: &mut Vec<usize>) {
    match (sel, &tape[n]) {
        (Sel::Name(name), Node::Object { len, .. }) => {
            // The last member with this key, as serde_json keeps it.
            let mut j = n + 1;
            let mut found = None;
            for _ in 0..*len {
                let v = j + 1;
                if matches!(tape[j], Node::String(k) if k == &**name) {
                    found = Some(v);
                }
                j = v + size(tape, v);
            }
            out.extend(found);
        }
        (Sel::Wild, Node::Object { .. }) => {
            out.extend(members(tape, n).into_iter().map(|(_, v)| v))
        }
        (Sel::Wild, Node::Array { .. }) => out.extend(elements(tape, n)),
        (Sel::Index(i), Node::Array { len, .. }) => {
            let len = *len as i64;
            let k = if *i < 0 { len + i } else { *i };
            if (0..len).contains(&k) {
                let mut j = n + 1;
                for _ in 0..k {
                    j += size(tape, j);
                }
                out.push(j);
            }
        }
        (Sel::Slice(start, end, step), Node::Array { len, .. }) => {
            let els = elements(tape, n);
            slice(&els, *len as i64, *start, *end, step.unwrap_or(1), out);
        }
        _ => {}
    }
}

/// RFC 9535 section 2.3.4.2.2.
fn slice(
    els: &[usize],
    len: i64,
    start: Option<i64>,
    end: Option<i64>,
    step: i64,
    out: &mut Vec<usize>,
) {
    if step == 0 {
        return;
    }
    let norm = |i: i64| if i >= 0 { i } else { len + i };
    let (lower, upper) = if step > 0 {
        let s = norm(start.unwrap_or(0));
        let e = norm(end.unwrap_or(len));
        (s.clamp(0, len), e.clamp(0, len))
    } else {
        let s = norm(start.unwrap_or(len - 1));
        let e = match end {
            Some(e) => norm(e),
            None => -len - 1,
        };
        (e.clamp(-1, len - 1), s.clamp(-1, len - 1))
    };
    if step > 0 {
        let mut i = lower;
        while i < upper {
            out.push(els[i as usize]);
            i += step;
        }
    } else {
        let mut i = upper;
        while lower < i {
            out.push(els[i as usize]);
            i += step;
        }
    }
}

fn descend(tape: &[Node<'_>], n: usize, sels: &[Sel], out: &mut Vec<usize>) {
    for s in sels {
        apply(tape, n, s, out);
    }
    match tape[n] {
        Node::Object { .. } => {
            for (_, v) in members(tape, n) {
                descend(tape, v, sels, out);
            }
        }
        Node::Array { .. } => {
            for e in elements(tape, n) {
                descend(tape, e, sels, out);
            }
        }
        _ => {}
    }
}

fn to_value(tape: &[Node<'_>], i: usize) -> Value {
    match tape[i] {
        Node::String(s) => Value::String(s.to_string()),
        Node::Static(StaticNode::Null) => Value::Null,
        Node::Static(StaticNode::Bool(b)) => Value::Bool(b),
        Node::Static(StaticNode::I64(n)) => Value::Number(n.into()),
        Node::Static(StaticNode::U64(n)) => Value::Number(n.into()),
        Node::Static(StaticNode::F64(f)) => Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Node::Object { len, .. } => {
            let mut m = Map::new();
            let mut j = i + 1;
            for _ in 0..len {
                let key = match tape[j] {
                    Node::String(k) => k.to_string(),
                    _ => String::new(),
                };
                m.insert(key, to_value(tape, j + 1));
                j = j + 1 + size(tape, j + 1);
            }
            Value::Object(m)
        }
        Node::Array { .. } => Value::Array(
            elements(tape, i)
                .into_iter()
                .map(|e| to_value(tape, e))
                .collect(),
        ),
    }
}

/// Parses `body` into a tape with the depth limit, or `None` (the caller falls back to
/// serde_json, which then decides acceptance and the error). Non-finite floats are left to
/// serde_json too.
pub(crate) fn parse_tape<'a>(
    body: &'a mut [u8],
    buffers: &mut simd_json::Buffers,
) -> Option<simd_json::Tape<'a>> {
    if has_negative_zero(body) {
        return None;
    }
    let tape = simd_json::to_tape_with_buffers(body, buffers).ok()?;
    if tape
        .0
        .iter()
        .any(|n| matches!(n, Node::Static(StaticNode::F64(f)) if !f.is_finite()))
    {
        return None;
    }
    Some(tape)
}

/// serde_json reads `-0` as the float -0.0, simd-json as the integer 0: such bodies (and, to
/// keep the scan simple, any string containing `-0` at the end of a token) go to serde_json.
fn has_negative_zero(body: &[u8]) -> bool {
    let mut i = 0;
    while let Some(p) = body[i..].iter().position(|b| *b == b'-') {
        let at = i + p;
        if body.get(at + 1) == Some(&b'0')
            && !matches!(body.get(at + 2), Some(b'0'..=b'9' | b'.' | b'e' | b'E'))
        {
            return true;
        }
        i = at + 1;
    }
    false
}
