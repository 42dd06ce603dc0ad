//! What `midcall bench --actions` and the measurement harness (`benches/harness`) both use:
//! a series of latencies and its percentiles, a batch of operations at a concurrency, the
//! machine's description for a JSON report.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use midcall::CallInfo;

#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) concurrency: usize,
    pub(crate) lat_ns: Vec<u64>,
    pub(crate) busy: Duration,
}

impl Series {
    /// The table columns up to req/s.
    pub(crate) fn row(&self) -> String {
        format!(
            "{:<18} {:>5} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.0}",
            self.name,
            self.concurrency,
            self.lat_ns.len(),
            self.pct(0.5),
            self.pct(0.9),
            self.pct(0.99),
            self.pct(0.999),
            self.rps()
        )
    }

    /// The JSON report row, with its ratios to raw hyper.
    pub(crate) fn to_json(&self, r50: Option<f64>, r99: Option<f64>) -> Value {
        json!({
            "name": self.name, "concurrency": self.concurrency, "requests": self.lat_ns.len(),
            "p50_us": self.pct(0.5), "p90_us": self.pct(0.9), "p99_us": self.pct(0.99),
            "p999_us": self.pct(0.999), "rps": self.rps(), "ratio_p50": r50, "ratio_p99": r99,
        })
    }

    /// Latency percentile in µs; `lat_ns` is sorted once before reporting.
    pub(crate) fn pct(&self, p: f64) -> f64 {
        percentile(&self.lat_ns, p) / 1000.0
    }
    pub(crate) fn rps(&self) -> f64 {
        self.lat_ns.len() as f64 / self.busy.as_secs_f64().max(1e-9)
    }
}

/// The `p` percentile of sorted values (nearest rank), 0 for none.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => sorted[((n - 1) as f64 * p).round() as usize] as f64,
    }
}

pub(crate) fn call_info(i: usize) -> CallInfo {
    CallInfo {
        id: format!("call_bench_{i}"),
        agent_id: "bench".into(),
        tenant: "bench".into(),
        from_number: "+15551234567".into(),
        to_number: "+15557654321".into(),
        is_outgoing: false,
        started_at: "2025-11-03T19:33:18.330Z".into(),
    }
}

/// Runs `n` operations at `concurrency`, returning each operation's latency and the wall time.
pub(crate) async fn batch<F, Fut>(concurrency: usize, n: usize, op: F) -> (Vec<u64>, Duration)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (next, op) = (next.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return lat;
                }
                let t = Instant::now();
                if op(i).await {
                    lat.push(t.elapsed().as_nanos() as u64);
                }
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        if let Ok(l) = t.await {
            all.extend(l);
        }
    }
    (all, start.elapsed())
}

pub(crate) fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "midcall": env!("CARGO_PKG_VERSION"),
    })
}
