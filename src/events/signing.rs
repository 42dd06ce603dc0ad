//! Standard Webhooks signatures: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed with
//! the base64-decoded part of a `whsec_` secret.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// A signing secret that is not `whsec_<base64>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a signing secret must be whsec_ followed by base64")]
pub struct BadSecret;

fn key(secret: &str) -> Result<ring::hmac::Key, BadSecret> {
    let b64 = secret.trim().strip_prefix("whsec_").ok_or(BadSecret)?;
    let raw = STANDARD.decode(b64).map_err(|_| BadSecret)?;
    if raw.is_empty() {
        return Err(BadSecret);
    }
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw))
}

/// `v1,<signature>` for one secret.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, BadSecret> {
    let key = key(secret)?;
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    Ok(format!("v1,{}", STANDARD.encode(ctx.sign().as_ref())))
}

/// The `webhook-signature` header value: one `v1,` entry per secret, space-separated. During a
/// key rotation the secret value holds several `whsec_` secrets separated by spaces.
pub fn signature_header(
    secrets: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, BadSecret> {
    let mut out = Vec::new();
    for s in secrets.split_whitespace() {
        out.push(sign(s, id, timestamp, body)?);
    }
    if out.is_empty() {
        return Err(BadSecret);
    }
    Ok(out.join(" "))
}

/// Checks a `webhook-signature` header against one secret: every `v1` entry is considered,
/// compared in constant time, and the timestamp must be within `tolerance_s` of `now`.
pub fn verify(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
    now: i64,
    tolerance_s: i64,
) -> bool {
    if now
        .checked_sub(timestamp)
        .is_none_or(|d| d.checked_abs().is_none_or(|d| d > tolerance_s))
    {
        return false;
    }
    let Ok(key) = key(secret) else { return false };
    let mut msg = Vec::with_capacity(id.len() + body.len() + 24);
    msg.extend_from_slice(id.as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(timestamp.to_string().as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(body);
    header.split_whitespace().any(|entry| {
        entry
            .strip_prefix("v1,")
            .and_then(|sig| STANDARD.decode(sig).ok())
            .is_some_and(|sig| ring::hmac::verify(&key, &msg, &sig).is_ok())
    })
}
