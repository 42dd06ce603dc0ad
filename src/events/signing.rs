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
    if !fresh(timestamp, now, tolerance_s) {
        return false;
    }
    let Ok(key) = key(secret) else { return false };
    let msg = signed_content(id, timestamp, body);
    signatures(header, "v1,").any(|sig| ring::hmac::verify(&key, &msg, &sig).is_ok())
}

/// An ed25519 signing key that is not `whsk_<base64 of a 32-byte seed, or 64 bytes: the seed
/// and its public key>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an ed25519 signing key must be whsk_ followed by the base64 of its 32-byte seed (or of 64 bytes: seed and public key)")]
pub struct BadKey;

fn key_pair(key: &str) -> Result<ring::signature::Ed25519KeyPair, BadKey> {
    let b64 = key.trim().strip_prefix("whsk_").ok_or(BadKey)?;
    let raw = STANDARD.decode(b64).map_err(|_| BadKey)?;
    match raw.len() {
        32 => ring::signature::Ed25519KeyPair::from_seed_unchecked(&raw).map_err(|_| BadKey),
        64 => ring::signature::Ed25519KeyPair::from_seed_and_public_key(&raw[..32], &raw[32..])
            .map_err(|_| BadKey),
        _ => Err(BadKey),
    }
}

/// The decoded signatures of one scheme (`v1,` or `v1a,`) in a `webhook-signature` header.
fn signatures<'a>(header: &'a str, scheme: &'a str) -> impl Iterator<Item = Vec<u8>> + 'a {
    header
        .split_whitespace()
        .filter_map(move |entry| entry.strip_prefix(scheme))
        .filter_map(|sig| STANDARD.decode(sig).ok())
}

/// Whether `timestamp` is within `tolerance_s` of `now` (seconds).
fn fresh(timestamp: i64, now: i64, tolerance_s: i64) -> bool {
    now.checked_sub(timestamp)
        .is_some_and(|d| d.checked_abs().is_some_and(|d| d <= tolerance_s))
}

/// What both schemes sign: `id.timestamp.body`.
fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(id.len() + body.len() + 24);
    msg.extend_from_slice(id.as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(timestamp.to_string().as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(body);
    msg
}

/// `v1a,<base64 ed25519 signature of "id.timestamp.body">` (Standard Webhooks asymmetric).
pub fn sign_ed25519(key: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, BadKey> {
    let pair = key_pair(key)?;
    let sig = pair.sign(&signed_content(id, timestamp, body));
    Ok(format!("v1a,{}", STANDARD.encode(sig.as_ref())))
}

/// The public key of a `whsk_` key: `whpk_<base64 of 32 bytes>`, what receivers verify with.
pub fn public_key(key: &str) -> Result<String, BadKey> {
    use ring::signature::KeyPair;
    let pair = key_pair(key)?;
    Ok(format!(
        "whpk_{}",
        STANDARD.encode(pair.public_key().as_ref())
    ))
}

/// A new random key: (`whsk_...`, `whpk_...`).
pub fn generate_key() -> Result<(String, String), BadKey> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| BadKey)?;
    let secret = format!("whsk_{}", STANDARD.encode(seed));
    let public = public_key(&secret)?;
    Ok((secret, public))
}

/// Checks the `v1a` entries of a `webhook-signature` header with a `whpk_` public key, and the
/// timestamp within `tolerance_s` of `now`.
pub fn verify_ed25519(
    public: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
    now: i64,
    tolerance_s: i64,
) -> bool {
    if !fresh(timestamp, now, tolerance_s) {
        return false;
    }
    let Some(raw) = public
        .trim()
        .strip_prefix("whpk_")
        .and_then(|b| STANDARD.decode(b).ok())
    else {
        return false;
    };
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, raw);
    let msg = signed_content(id, timestamp, body);
    signatures(header, "v1a,").any(|sig| key.verify(&msg, &sig).is_ok())
}

/// The public key of a webhook's `signing_key` template, its secret read from `secrets`; the
/// error names what is missing or malformed, never the key.
pub fn public_key_from(
    key: &crate::template::Template,
    secrets: &dyn crate::template::SecretSource,
) -> Result<String, KeyError> {
    public_key_from_inner(key, secrets).map_err(KeyError)
}

/// See [`public_key_from`].
fn public_key_from_inner(
    key: &crate::template::Template,
    secrets: &dyn crate::template::SecretSource,
) -> Result<String, String> {
    let inputs = crate::template::RenderInputs::default();
    let ctx = inputs.render_context(secrets);
    let mut redactor = crate::template::Redactor::default();
    let text = key
        .render_text(&ctx, &mut redactor)
        .map_err(|e| format!("signing_key: {e}"))?;
    public_key(&text).map_err(|e| format!("signing_key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_signatures_verify_with_the_public_key_only() {
        let (secret, public) = generate_key().unwrap();
        let sig = sign_ed25519(&secret, "msg_1", 1_700_000_000, b"{}").unwrap();
        assert!(sig.starts_with("v1a,"));
        assert!(verify_ed25519(
            &public,
            "msg_1",
            1_700_000_000,
            b"{}",
            &sig,
            1_700_000_010,
            300
        ));
        assert!(!verify_ed25519(
            &public,
            "msg_1",
            1_700_000_000,
            b"{ }",
            &sig,
            1_700_000_010,
            300
        ));
        assert!(!verify_ed25519(
            &public,
            "msg_1",
            1_700_000_000,
            b"{}",
            &sig,
            1_700_009_000,
            300
        ));
        let (_, other) = generate_key().unwrap();
        assert!(!verify_ed25519(
            &other,
            "msg_1",
            1_700_000_000,
            b"{}",
            &sig,
            1_700_000_010,
            300
        ));
        assert_eq!(public_key("whsk_bm90IGEga2V5"), Err(BadKey));
        assert_eq!(public_key("whsec_AAAA"), Err(BadKey));
    }
}

crate::text_error! {
    /// A signing key that is missing or malformed; the message never holds the key.
    KeyError
}
