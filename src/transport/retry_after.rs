//! `Retry-After` header values: delta-seconds or an HTTP-date.

use std::time::{Duration, SystemTime};

/// Longest delay taken from a header: one day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// The delay a `Retry-After` value asks for, measured from `now` for an HTTP-date (a date in
/// the past means no delay). `None` for a value that is neither form.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        let secs = v.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}
