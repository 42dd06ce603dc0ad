//! Idempotency keys: the same for a retry and for a re-issued identical tool call.

use std::fmt::Write;

use serde_json::Value;

/// Writes `v` as JSON with object keys sorted, recursively: equal values, equal text.
pub(crate) fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `call id` + `tool call id`, or `call id` + action + canonical arguments when the model gave
/// no id, hashed (SHA-256, first 128 bits, hex).
pub(crate) fn idempotency_key(
    call_id: &str,
    tool_call_id: Option<&str>,
    action: &str,
    args: &Value,
) -> String {
    let mut material = String::with_capacity(64);
    material.push_str(call_id);
    material.push('\0');
    match tool_call_id {
        Some(id) => {
            material.push_str("tool\0");
            material.push_str(id);
        }
        None => {
            material.push_str("args\0");
            material.push_str(action);
            material.push('\0');
            canonical_json(args, &mut material);
        }
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, material.as_bytes());
    let mut out = String::with_capacity(32);
    for b in &digest.as_ref()[..16] {
        let _ = write!(out, "{b:02x}");
    }
    out
}
