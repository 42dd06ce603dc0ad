//! Token buckets per key, with a separate count of failures per address (the inbound
//! endpoint's, the operator API's and the console's rate limits).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Token buckets per key: `burst` tokens, refilled at `rate` per second.
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, (f64, Instant)>,
}

impl RateLimiter {
    pub(crate) fn new(rate: f64, burst: u32) -> Self {
        RateLimiter {
            rate,
            burst: burst as f64,
            buckets: HashMap::new(),
        }
    }

    /// Uses `rate` and `burst` from now on (the agent being served; buckets are kept).
    pub(crate) fn configure(&mut self, rate: f64, burst: u32) {
        self.rate = rate;
        self.burst = burst as f64;
    }

    fn level(&mut self, key: &str, now: Instant) -> f64 {
        if self.buckets.len() > 100_000 {
            // Forget buckets that are full again: they hold nothing to remember.
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = self
            .buckets
            .entry(key.to_string())
            .or_insert((self.burst, now));
        let level = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *tokens = level;
        *at = now;
        level
    }

    /// Takes a token, or says how long until one is there.
    pub(crate) fn take(&mut self, key: &str, now: Instant) -> Result<(), Duration> {
        let level = self.level(key, now);
        if level >= 1.0 {
            if let Some((tokens, _)) = self.buckets.get_mut(key) {
                *tokens = level - 1.0;
            }
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - level) / self.rate))
        }
    }

    /// How long until `key` has a token again, if it has none now.
    pub(crate) fn exhausted(&mut self, key: &str, now: Instant) -> Option<Duration> {
        let level = self.level(key, now);
        (level < 1.0).then(|| Duration::from_secs_f64((1.0 - level) / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_the_rate() {
        let mut l = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        assert!(l.take("k", t0).is_ok());
        assert!(l.take("k", t0).is_ok());
        assert!(l.take("k", t0).is_ok());
        let wait = l.take("k", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        assert!(l.take("other", t0).is_ok(), "keys are independent");
        assert!(l.take("k", t0 + Duration::from_millis(500)).is_ok());
    }
}
