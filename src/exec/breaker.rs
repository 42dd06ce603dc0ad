//! A circuit breaker per host: after consecutive failures actions fail in microseconds, then
//! one probe is let through after a cool-down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// The breakers of every host.
#[derive(Debug)]
pub(crate) struct Breakers {
    hosts: Mutex<HashMap<String, State>>,
    threshold: u32,
    cooldown: Duration,
}

/// Leave to send one request; report how it went with [`Permit::record`].
#[derive(Debug)]
pub(crate) struct Permit {
    breakers: Arc<Breakers>,
    host: String,
    probe: bool,
    recorded: bool,
}

impl Breakers {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Breakers {
        Breakers {
            hosts: Mutex::new(HashMap::new()),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// A permit, or `None` while the host's breaker is open (or its probe is in flight).
    pub(crate) fn check(self: &Arc<Self>, host: &str) -> Option<Permit> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let probe = match hosts.get(host).copied() {
            None | Some(State::Closed { .. }) => false,
            Some(State::Open { until }) if Instant::now() < until => return None,
            Some(State::Open { .. }) => {
                hosts.insert(host.to_string(), State::HalfOpen);
                true
            }
            Some(State::HalfOpen) => return None,
        };
        Some(Permit {
            breakers: self.clone(),
            host: host.to_string(),
            probe,
            recorded: false,
        })
    }

    fn record(&self, host: &str, success: bool) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let next = if success {
            State::Closed { failures: 0 }
        } else {
            match hosts.get(host).copied() {
                None => State::Closed { failures: 1 },
                Some(State::Closed { failures }) if failures + 1 < self.threshold => {
                    State::Closed {
                        failures: failures + 1,
                    }
                }
                _ => State::Open {
                    until: Instant::now() + self.cooldown,
                },
            }
        };
        let open = matches!(next, State::Open { .. });
        let was_open = matches!(hosts.get(host), Some(State::Open { .. } | State::HalfOpen));
        if open != was_open {
            metrics::gauge!("midcall_breaker_open", "host" => host.to_string()).set(if open {
                1.0
            } else {
                0.0
            });
        }
        hosts.insert(host.to_string(), next);
    }
}

impl Permit {
    /// Reports the result: a success closes the breaker; a failure counts toward opening it.
    pub(crate) fn record(mut self, success: bool) {
        self.recorded = true;
        self.breakers.record(&self.host, success);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // A probe dropped before it finished (the caller barged in) must not leave the breaker
        // half-open forever: the next request probes instead.
        if self.probe && !self.recorded {
            let mut hosts = self
                .breakers
                .hosts
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            hosts.insert(
                self.host.clone(),
                State::Open {
                    until: Instant::now(),
                },
            );
        }
    }
}
