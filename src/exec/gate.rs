//! A cap on requests in flight per host (`max_in_flight`): further requests queue within
//! their own budget, and one whose wait cannot leave time for the request itself is refused
//! (`rejected`, `host_busy`) instead of being left to time out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::transport::Deadline;

/// The gates of every capped host, and the recent latencies of hosts whose reads hedge.
#[derive(Debug, Default)]
pub(crate) struct HostGates {
    hosts: Mutex<HashMap<String, Arc<Gate>>>,
    latencies: Mutex<HashMap<String, Latencies>>,
}

/// One host's recent latencies (µs) and their p95 (0 until enough were seen).
#[derive(Debug, Default)]
struct Latencies {
    ring: std::collections::VecDeque<u32>,
    seen: u64,
    p95_us: u64,
}

/// Latencies kept per host for the running p95 of `hedge_after_ms = "auto"`.
const LATENCY_SAMPLES: usize = 128;
/// Samples before an automatic hedge is used at all.
const LATENCY_MIN_SAMPLES: usize = 20;

#[derive(Debug)]
struct Gate {
    slots: Arc<Semaphore>,
    cap: u32,
    waiting: AtomicUsize,
    /// A running mean of how long a request to the host takes, in µs (0: none seen yet).
    typical_us: AtomicU64,
}

/// A slot at a capped host; report how long the request took with [`Slot::done`].
#[derive(Debug)]
pub(crate) struct Slot {
    gate: Arc<Gate>,
    _permit: OwnedSemaphorePermit,
    since: Instant,
}

/// Why no slot was had.
#[derive(Debug)]
pub(crate) struct Busy {
    pub(crate) cap: u32,
    pub(crate) waited: Duration,
}

impl HostGates {
    /// A request to `host` took `d` (hosts whose reads hedge automatically). The p95 is
    /// computed again every 16 requests, not on every read of it.
    pub(crate) fn observe(&self, host: &str, d: Duration) {
        let mut all = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if !all.contains_key(host) {
            all.insert(host.to_string(), Latencies::default());
        }
        let Some(l) = all.get_mut(host) else { return };
        if l.ring.len() == LATENCY_SAMPLES {
            l.ring.pop_front();
        }
        l.ring.push_back(d.as_micros().min(u32::MAX as u128) as u32);
        l.seen += 1;
        if l.ring.len() >= LATENCY_MIN_SAMPLES && (l.p95_us == 0 || l.seen % 16 == 0) {
            let mut v: Vec<u32> = l.ring.iter().copied().collect();
            v.sort_unstable();
            l.p95_us = u64::from(v[(v.len() - 1) * 95 / 100]).max(1);
        }
    }

    /// The running p95 of `host`'s latency, once enough requests were seen.
    pub(crate) fn p95(&self, host: &str) -> Option<Duration> {
        let all = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        let p95 = all.get(host)?.p95_us;
        (p95 > 0).then(|| Duration::from_micros(p95))
    }

    /// A slot at `host` (capped at `cap`), waiting no later than leaves the host's typical
    /// request time before `deadline`.
    pub(crate) async fn enter(
        &self,
        host: &str,
        cap: u32,
        deadline: Deadline,
    ) -> Result<Slot, Busy> {
        let gate = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            // The host's name is copied once, when its gate is made, not per request.
            match hosts.get(host) {
                Some(g) => g.clone(),
                None => {
                    let g = Arc::new(Gate {
                        slots: Arc::new(Semaphore::new(cap as usize)),
                        cap,
                        waiting: AtomicUsize::new(0),
                        typical_us: AtomicU64::new(0),
                    });
                    hosts.insert(host.to_string(), g.clone());
                    g
                }
            }
        };
        let started = Instant::now();
        if let Ok(permit) = gate.slots.clone().try_acquire_owned() {
            return Ok(Slot {
                gate,
                _permit: permit,
                since: Instant::now(),
            });
        }
        let typical = Duration::from_micros(gate.typical_us.load(Ordering::Relaxed));
        let wait_until = deadline
            .timer_instant()
            .checked_sub(typical)
            .unwrap_or(started);
        let busy = |started: Instant| Busy {
            cap: gate.cap,
            waited: started.elapsed(),
        };
        if wait_until <= started {
            return Err(busy(started));
        }
        let queued = gate.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("midcall_host_queue_length", "host" => host.to_string()).set(queued as f64);
        let got = tokio::time::timeout_at(wait_until, gate.slots.clone().acquire_owned()).await;
        let left = gate.waiting.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("midcall_host_queue_length", "host" => host.to_string()).set(left as f64);
        metrics::histogram!("midcall_host_wait_seconds").record(started.elapsed().as_secs_f64());
        match got {
            Ok(Ok(permit)) => Ok(Slot {
                gate: gate.clone(),
                _permit: permit,
                since: Instant::now(),
            }),
            _ => Err(busy(started)),
        }
    }
}

impl Slot {
    /// The request is over: its duration feeds the host's typical time (a mean over the last
    /// few, weight 1/8).
    pub(crate) fn done(self) {
        let us = self.since.elapsed().as_micros().min(u64::MAX as u128) as u64;
        let old = self.gate.typical_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { old - old / 8 + us / 8 };
        self.gate.typical_us.store(new, Ordering::Relaxed);
    }
}
