//! `midcall bench --fleet`: the figures of a fleet, beside SQLite's measured in the same run.
//! Durable publishing (every event waits for its commit) from 1 and 3 processes; delivering a
//! backlog to a local sink (in this process; the workers are separate processes) with 1 and 3
//! worker processes; and the action latency of a shared-tier (Redis) hit against an in-process
//! hit and a miss to a local upstream.

use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use midcall::events::{DeliveryLog, Event, EventBus, EventType};
use midcall::{ActionSet, CallInfo, Syntax};

use crate::measure::{call_info as call, percentile};
use crate::scenarios::{upstream, Answer, EXTRACT_NAME};

/// What the parent asked a child process to do.
pub(crate) enum Child {
    /// Publish this many events durably, then print the seconds it took.
    Publish(usize),
    /// Deliver until nothing is pending, then exit.
    Deliver,
}

fn set(sink: &str) -> Result<ActionSet, String> {
    ActionSet::from_str(
        "bench.toml",
        &format!("[agent]\nid = \"bench\"\ntenant = \"bench\"\n[[webhooks]]\nlabel = \"sink\"\nurl = \"{sink}\"\nsubscriptions = [\"message\"]\n"),
        Syntax::Toml,
    )
    .map_err(|e| e.to_string())
}

fn event(i: usize) -> Event {
    Event::new(
        EventType::Message,
        json!({"text": "Thanks for calling Acme Dental, how can I help?", "n": i}),
    )
}

fn policy() -> midcall::EgressPolicy {
    midcall::EgressPolicy::new()
        .allow_http(true)
        .allow_network("127.0.0.0/8".parse().expect("a network"))
}

/// A child process's work.
pub(crate) async fn child(what: Child, db: &str, sink: &str) -> Result<ExitCode, String> {
    let set = set(sink)?;
    match what {
        Child::Publish(n) => {
            let bus = EventBus::builder(db)
                .webhooks(&set)
                .deliver(false)
                .build()?;
            let pid = std::process::id() as usize;
            let start = Instant::now();
            let results = futures_util::future::join_all((0..n).map(|i| {
                let bus = bus.clone();
                async move {
                    bus.publish_durable(&event(i), &call(pid * 1000 + i % 64))
                        .await
                }
            }))
            .await;
            let secs = start.elapsed().as_secs_f64();
            bus.close().await;
            if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                return Err(e.to_string());
            }
            println!("{secs}");
        }
        Child::Deliver => {
            let bus = EventBus::builder(db)
                .webhooks(&set)
                .egress(policy())
                .build()?;
            let log = DeliveryLog::open(db)?;
            // Bounded: a sink that never accepts leaves deliveries pending for hours of
            // retries; the bench says so instead of waiting for them.
            let until = Instant::now() + Duration::from_secs(120);
            while !log.deliveries(None, Some("pending"), 1)?.is_empty() {
                if Instant::now() >= until {
                    bus.close().await;
                    return Err("deliveries still pending after 120 s".into());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            bus.close().await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn spawn(args: &[&str]) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // This harness again (`midcall-bench`, which takes the flags with no subcommand).
    Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())
}

/// Durable events per second from `procs` processes publishing `per` each at once.
async fn publish(db: &str, procs: usize, per: usize) -> Result<f64, String> {
    let n = per.to_string();
    let mut children = Vec::new();
    let start = Instant::now();
    for _ in 0..procs {
        children.push(spawn(&[
            "--fleet-child",
            "publish",
            "--fleet-events",
            &n,
            "--db",
            db,
        ])?);
    }
    for c in children {
        let out = tokio::task::spawn_blocking(move || c.wait_with_output())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("a publishing process failed ({})", out.status));
        }
    }
    // Wall time over all processes (their start-up included is small beside the work, and
    // the same for both engines).
    Ok((procs * per) as f64 / start.elapsed().as_secs_f64())
}

/// A sink answering 204 at once, counting requests.
async fn sink() -> Result<(String, Arc<AtomicUsize>), String> {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let c = c.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    c.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let mut r =
                            http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                        *r.status_mut() = http::StatusCode::NO_CONTENT;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((format!("http://{addr}/sink"), count))
}

/// Deliveries per second of a backlog of `n` events by `procs` worker processes.
async fn deliver(db: &str, procs: usize, n: usize) -> Result<f64, String> {
    let (url, count) = sink().await?;
    let set = set(&url)?;
    {
        let bus = EventBus::builder(db)
            .webhooks(&set)
            .deliver(false)
            .build()?;
        let results = futures_util::future::join_all((0..n).map(|i| {
            let bus = bus.clone();
            // 256 calls: per-call order still lets many deliveries run side by side.
            async move { bus.publish_durable(&event(i), &call(i % 256)).await }
        }))
        .await;
        bus.close().await;
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            return Err(e.to_string());
        }
    }
    let start = Instant::now();
    let mut children = Vec::new();
    for _ in 0..procs {
        children.push(spawn(&[
            "--fleet-child",
            "deliver",
            "--db",
            db,
            "--fleet-sink",
            &url,
        ])?);
    }
    for c in children {
        let st = tokio::task::spawn_blocking(move || c.wait_with_output())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if !st.status.success() {
            return Err(format!("a delivering process failed ({})", st.status));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let got = count.load(Ordering::Relaxed);
    if got < n {
        return Err(format!("the sink got {got} of {n} deliveries"));
    }
    Ok(got as f64 / secs)
}

/// Latencies (µs, p50 and p99) of an action answered by the in-process cache, by the shared
/// tier, and fetched from a local upstream.
async fn cache_latency(redis: &str, samples: usize) -> Result<Value, String> {
    use midcall::exec::{Budget, CacheStatus};
    // The main bench's upstream and response (1 KiB of CRM JSON), in this process.
    let port = upstream(Arc::new(crate::data::crm_response(1024)), None, Answer::Now).await;
    let set = ActionSet::from_str(
        "bench.toml",
        &format!("[agent]\nid = \"bench\"\ntenant = \"bench\"\n[[actions]]\nname = \"lookup\"\ndescription = \"d\"\nurl = \"http://127.0.0.1:{port}/c?p={{{{call.from_number}}}}\"\ncache = {{ ttl_s = 300, scope = \"tenant\" }}\n{EXTRACT_NAME}\ndedupe = false\n"),
        Syntax::Toml,
    )
    .map_err(|e| e.to_string())?;
    let secret = midcall::Secret::new("bench-fleet-secret-0123456789");
    let rt = |shared: bool| -> Result<midcall::Runtime, String> {
        let mut b = midcall::Runtime::builder().egress(policy());
        if shared {
            b = b.shared_cache(midcall::cache::SharedCacheConfig::new(
                redis,
                secret.clone(),
            )?);
        }
        Ok(b.build()?)
    };
    let (filler, reader) = (rt(true)?, rt(true)?);
    filler.check_shared_cache(Duration::from_secs(2)).await?;
    reader.check_shared_cache(Duration::from_secs(2)).await?;
    let action = set.action("lookup").ok_or("no action")?;
    let budget = Budget::new(Duration::from_secs(5));
    let caller = |i: usize| {
        midcall::Call::new(CallInfo {
            from_number: format!("+1555{i:07}"),
            ..call(0)
        })
    };
    let mut miss = Vec::with_capacity(samples);
    for i in 0..samples {
        let mut c = caller(i);
        let t = Instant::now();
        let out = filler.execute(action, &mut c, json!({}), &budget).await;
        miss.push(t.elapsed().as_nanos() as u64);
        if out.cache != CacheStatus::Miss {
            return Err(format!("expected a miss, got {:?}", out.cache));
        }
    }
    // Let the writes to Redis land (they run on their own tasks).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut l2 = Vec::with_capacity(samples);
    let mut l1 = Vec::with_capacity(samples);
    for i in 0..samples {
        let mut c = caller(i);
        let t = Instant::now();
        let out = reader.execute(action, &mut c, json!({}), &budget).await;
        l2.push(t.elapsed().as_nanos() as u64);
        if out.cache != CacheStatus::Hit {
            return Err(format!(
                "sample {i}: expected a shared-tier hit, got {:?}",
                out.cache
            ));
        }
        let mut c = caller(i);
        let t = Instant::now();
        reader.execute(action, &mut c, json!({}), &budget).await;
        l1.push(t.elapsed().as_nanos() as u64);
    }
    let stats = |mut v: Vec<u64>| {
        v.sort_unstable();
        json!({"p50_us": percentile(&v, 0.5) / 1000.0, "p99_us": percentile(&v, 0.99) / 1000.0})
    };
    Ok(json!({
        "samples": samples,
        "in_process_hit": stats(l1),
        "shared_tier_hit": stats(l2),
        "miss_to_local_upstream": stats(miss),
    }))
}

/// The report: SQLite and PostgreSQL side by side, and the shared tier when given.
pub(crate) async fn run(
    db: &str,
    cache_url: Option<&str>,
    quick: bool,
    json_file: Option<&str>,
) -> Result<ExitCode, String> {
    if !db.starts_with("postgres://") && !db.starts_with("postgresql://") {
        return Err("--fleet needs --db postgres://... (the SQLite figures are measured beside it in a temporary file)".into());
    }
    let (per, backlog, samples) = if quick {
        (500, 2000, 200)
    } else {
        (3000, 10_000, 1000)
    };
    let dir = std::env::temp_dir().join(format!("midcall-fleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sqlite = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let shown = midcall::events::display_db(db);
    // Delivery first, on an outbox with nothing pending (publishing leaves its events pending).
    if !DeliveryLog::open(db)?
        .deliveries(None, Some("pending"), 1)?
        .is_empty()
    {
        return Err(format!("--db {shown}: has pending deliveries; the fleet bench needs an empty database (it writes to it)"));
    }
    eprintln!(
        "fleet bench: delivering a backlog of {backlog} events (1 and 3 worker processes) ..."
    );
    let sq_del1 = deliver(&sqlite("d1.db"), 1, backlog).await?;
    let pg_del1 = deliver(db, 1, backlog).await?;
    let pg_del3 = deliver(db, 3, backlog).await?;
    eprintln!("fleet bench: durable publishing ({per} events per process, 1 and 3 processes) ...");
    let sq_pub1 = publish(&sqlite("p1.db"), 1, per).await?;
    let pg_pub1 = publish(db, 1, per).await?;
    let sq_pub3 = publish(&sqlite("p3.db"), 3, per).await?;
    let pg_pub3 = publish(db, 3, per).await?;
    let cache = match cache_url {
        Some(u) => {
            eprintln!("fleet bench: cache latency ({samples} samples) ...");
            Some(cache_latency(u, samples).await?)
        }
        None => None,
    };
    let _ = std::fs::remove_dir_all(&dir);
    println!("{:<44} {:>12} {:>12}", "", "SQLite", "PostgreSQL");
    println!(
        "{:<44} {:>12.0} {:>12.0}",
        "durable publish, 1 process (events/s)", sq_pub1, pg_pub1
    );
    println!(
        "{:<44} {:>12.0} {:>12.0}",
        "durable publish, 3 processes (events/s)", sq_pub3, pg_pub3
    );
    println!(
        "{:<44} {:>12.0} {:>12.0}",
        "delivery, 1 worker process (events/s)", sq_del1, pg_del1
    );
    println!(
        "{:<44} {:>12} {:>12.0}",
        "delivery, 3 worker processes (events/s)", "-", pg_del3
    );
    if let Some(c) = &cache {
        println!();
        println!("{:<44} {:>12} {:>12}", "action latency", "p50 µs", "p99 µs");
        for (k, label) in [
            ("in_process_hit", "in-process hit (L1)"),
            ("shared_tier_hit", "shared-tier hit (Redis, L2)"),
            (
                "miss_to_local_upstream",
                "miss, fetched from a local upstream",
            ),
        ] {
            println!(
                "{:<44} {:>12.1} {:>12.1}",
                label,
                c[k]["p50_us"].as_f64().unwrap_or(0.0),
                c[k]["p99_us"].as_f64().unwrap_or(0.0)
            );
        }
    }
    println!(
        "(PostgreSQL: {shown}; SQLite: a file in {})",
        std::env::temp_dir().display()
    );
    if let Some(f) = json_file {
        let v = json!({
            "durable_publish_events_per_s": {
                "sqlite": {"1": sq_pub1, "3": sq_pub3},
                "postgres": {"1": pg_pub1, "3": pg_pub3},
            },
            "delivery_events_per_s": {
                "sqlite": {"1": sq_del1},
                "postgres": {"1": pg_del1, "3": pg_del3},
            },
            "events_per_process": per,
            "backlog": backlog,
            "cache": cache,
        });
        std::fs::write(f, serde_json::to_string_pretty(&v).unwrap_or_default())
            .map_err(|e| format!("{f}: {e}"))?;
    }
    Ok(ExitCode::SUCCESS)
}
