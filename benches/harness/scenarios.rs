//! The scenarios of `midcall bench`: the action path (exec and session, miss and hit, h1 and
//! h2, TLS) against raw hyper and reqwest-free baselines on the same upstreams, measured in one
//! run; deadline precision; memory per live call; event publishing; the report.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

use midcall::exec::Budget;
use midcall::transport::EgressPolicy;
use midcall::{ActionSet, ActionSpec, Call, Runtime, Syntax, ToolCall, Transcript, Turn};

use crate::args::BenchArgs;
use crate::data::crm_response;
use crate::measure::{batch, call_info, machine, percentile, Series};

pub(crate) fn run(a: BenchArgs) -> Result<ExitCode, String> {
    if a.hog {
        return Ok(hog());
    }
    if let Some(n) = a.memory_only {
        let per = memory_per_call(n as usize);
        println!("{per:.0} bytes per live call (RSS delta over {n} calls)");
        return Ok(ExitCode::SUCCESS);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    if let Some(nice) = a.worker_nice {
        // A better-than-default value needs the privilege: fail loudly once, here, rather
        // than silently on every worker (this thread goes back to 0 after the probe).
        if nice < 0 {
            midcall::exec::set_thread_nice(nice)
                .and_then(|_| midcall::exec::set_thread_nice(0))
                .map_err(|e| format!("--worker-nice {nice}: {e}"))?;
        }
        builder.on_thread_start(move || {
            let _ = midcall::exec::set_thread_nice(nice);
        });
    }
    let rt = builder.build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        if a.serve_upstreams {
            return serve_upstreams(a.body_bytes).await;
        }
        if let (Some(what), Some(db)) = (&a.fleet_child, &a.db) {
            let what = match what.as_str() {
                "publish" => crate::fleet::Child::Publish(a.fleet_events),
                _ => crate::fleet::Child::Deliver,
            };
            return crate::fleet::child(what, db, &a.fleet_sink).await;
        }
        if a.fleet {
            let db = a.db.as_deref().unwrap_or_default();
            return crate::fleet::run(db, a.cache_url.as_deref(), a.quick, a.json.as_deref()).await;
        }
        if a.actions.is_some() {
            return Err("bench --actions runs in `midcall bench`, not in the harness".into());
        }
        if let Some(n) = a.hit_profile {
            return hit_profile(n as usize).await;
        }
        if a.soak {
            return crate::soak::run(crate::soak::Soak {
                calls: a.calls.unwrap_or(2000) as usize,
                duration: Duration::from_secs(if a.quick { 15 } else { 60 }),
                json: a.json.clone(),
                cpu_hogs: a.cpu_hogs as usize,
            })
            .await;
        }
        builtin(&a).await
    })
}

/// How an upstream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// At once.
    Now,
    /// Never.
    Hang,
    /// 50 ms late for a random 5 % of requests, at once otherwise: a tail to hedge against.
    Tail,
}

/// A minimal HTTP/1.1 keep-alive upstream (TCP_NODELAY) answering every request with `body`;
/// with `tls`, behind rustls.
pub(crate) async fn upstream(
    body: Arc<Vec<u8>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    answer: Answer,
) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    resp.extend_from_slice(&body);
    let resp = Arc::new(resp);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            let (resp, tls) = (resp.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    Some(a) => {
                        if let Ok(t) = a.accept(s).await {
                            serve(t, &resp, answer).await
                        }
                    }
                    None => serve(s, &resp, answer).await,
                }
            });
        }
    });
    port
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    resp: &[u8],
    answer: Answer,
) {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let mut buf = Vec::with_capacity(4096);
    while next_request(&mut s, &mut buf).await {
        match answer {
            Answer::Hang => continue,
            Answer::Tail => {
                // 5 % late, spread evenly over the requests.
                if crate::soak::splitmix(SEQ.fetch_add(1, Ordering::Relaxed) as u64) % 100 < 5 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Answer::Now => {}
        }
        if s.write_all(resp).await.is_err() {
            return;
        }
    }
}

/// Waits until `buf` holds a whole request head (to the blank line) and removes it; false at
/// the end of the stream or on an error. Bodies are not read (the bench sends none).
pub(crate) async fn next_request<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            return true;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn tls_pair() -> Result<(tokio_rustls::TlsAcceptor, Vec<u8>), String> {
    Ok(midcall::demo::self_signed_tls(vec![
        "localhost".into(),
        "*.bench.test".into(),
    ])?)
}

/// One benchmark action: no duplicate protection (every request is a distinct tool call).
fn bench_action(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[actions]]\nname = \"{name}\"\ndescription = \"{name}\"\nurl = \"{url}\"\ntimeout_ms = 10000\ndedupe = false\n{extra}\n"
    )
}

pub(crate) const EXTRACT_NAME: &str = "extract = { \"customer.name\" = \"$.data.customer.name\" }";

const LOOKUP: &str = "/v1/customers?phone={{call.from_number}}";

fn agent(http: &str, https: &str, hang: &str, tail: &str) -> Result<ActionSet, String> {
    let text = [
        "[agent]\nid = \"bench\"\ntenant = \"bench\"\n".to_string(),
        bench_action("miss", &format!("{http}{LOOKUP}"), EXTRACT_NAME),
        bench_action(
            "hit",
            &format!("{http}{LOOKUP}&c=1"),
            &format!("cache = {{ ttl_s = 3600, scope = \"tenant\" }}\n{EXTRACT_NAME}"),
        ),
        bench_action("tls", &format!("{https}{LOOKUP}"), EXTRACT_NAME),
        bench_action("hang", &format!("{hang}/hang"), ""),
        bench_action(
            "hedged",
            &format!("{tail}{LOOKUP}"),
            &format!("hedge_after_ms = \"auto\"\n{EXTRACT_NAME}"),
        ),
    ]
    .concat();
    ActionSet::from_str("bench.toml", &text, Syntax::Toml).map_err(|e| e.to_string())
}

fn local_runtime(ca: Option<&[u8]>, max_idle: usize) -> Result<Runtime, String> {
    let mut b = Runtime::builder()
        .egress(
            EgressPolicy::new()
                .allow_http(true)
                .allow_network("127.0.0.0/8".parse().map_err(|_| "cidr")?),
        )
        .pool_max_idle_per_host(max_idle)
        .dedupe_window(Duration::ZERO);
    if let Some(ca) = ca {
        b = b.add_root_certificate(ca.to_vec());
    }
    Ok(b.build()?)
}

struct Progress {
    total: usize,
    done: usize,
    tty: bool,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        if self.tty {
            let width = 30;
            let filled = width * self.done / self.total.max(1);
            eprint!(
                "\r[{}{}] {:>3}% {:<40}",
                "#".repeat(filled),
                " ".repeat(width - filled),
                100 * self.done / self.total.max(1),
                what
            );
            if self.done == self.total {
                eprintln!();
            }
        }
    }
}

/// The ports of the plain, TLS, hanging and tail upstreams, and the TLS certificate (DER).
type Upstreams = (u16, u16, u16, u16, Vec<u8>);

/// The three bench upstreams (plain, TLS, hanging) in this process.
async fn start_upstreams(body_bytes: usize) -> Result<Upstreams, String> {
    let body = Arc::new(crm_response(body_bytes));
    let (acceptor, ca) = tls_pair()?;
    let http_port = upstream(body.clone(), None, Answer::Now).await;
    let https_port = upstream(body.clone(), Some(acceptor), Answer::Now).await;
    let hang_port = upstream(body.clone(), None, Answer::Hang).await;
    let tail_port = upstream(body, None, Answer::Tail).await;
    Ok((http_port, https_port, hang_port, tail_port, ca))
}

/// `--serve-upstreams`: one line `ports HTTP HTTPS HANG CERT_BASE64`, then serve until stdin
/// closes (the bench that started this process is gone).
async fn serve_upstreams(body_bytes: usize) -> Result<ExitCode, String> {
    use base64::Engine;
    let (h, s, g, t, ca) = start_upstreams(body_bytes).await?;
    println!(
        "ports {h} {s} {g} {t} {}",
        base64::engine::general_purpose::STANDARD.encode(&ca)
    );
    let _ = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
    })
    .await;
    Ok(ExitCode::SUCCESS)
}

/// The upstreams in a child process; the child lives as long as the returned handle.
fn spawn_upstreams(body_bytes: usize) -> Result<(std::process::Child, Upstreams), String> {
    use base64::Engine;
    use std::io::BufRead;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .args(["--serve-upstreams", "--body-bytes", &body_bytes.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the upstream process: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let parts: Vec<&str> = line.split_whitespace().collect();
    let port = |i: usize| -> Result<u16, String> {
        parts
            .get(i)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("the upstream process said {line:?}"))
    };
    let ca = base64::engine::general_purpose::STANDARD
        .decode(parts.get(5).copied().unwrap_or_default())
        .map_err(|_| "the upstream process sent no certificate")?;
    Ok((child, (port(1)?, port(2)?, port(3)?, port(4)?, ca)))
}

async fn builtin(a: &BenchArgs) -> Result<ExitCode, String> {
    // Memory first, while the heap holds nothing freed that new calls could reuse unseen.
    let memory = memory_per_call(if a.quick { 2000 } else { 10_000 });
    let (_upstream_child, (http_port, https_port, hang_port, tail_port, ca)) = if a.upstream_process
    {
        let (c, u) = spawn_upstreams(a.body_bytes)?;
        (Some(c), u)
    } else {
        (None, start_upstreams(a.body_bytes).await?)
    };
    let http = format!("http://127.0.0.1:{http_port}");
    let https = format!("https://localhost:{https_port}");
    let tail = format!("http://127.0.0.1:{tail_port}");
    let set = Arc::new(agent(
        &http,
        &https,
        &format!("http://127.0.0.1:{hang_port}"),
        &tail,
    )?);
    let tail_uri: http::Uri = format!("{tail}/v1/customers?phone=%2B15551234567")
        .parse()
        .map_err(|_| "uri")?;
    let hedged = set.action("hedged").cloned().ok_or("no hedged action")?;
    let extra_requests = Arc::new(AtomicUsize::new(0));
    let concurrencies: &[usize] = &[1, 64, 512];
    let (rounds, per_batch) = if a.quick { (2, 200) } else { (5, 2000) };

    // One runtime for steady-state scenarios; the pool holds as many idle connections as the
    // highest concurrency, like the raw client.
    let runtime = local_runtime(Some(&ca), 1024)?;
    // The fair baseline: hyper-util's client with TCP_NODELAY, as midcall's connector sets it,
    // and a pool as large as midcall's.
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let raw = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_max_idle_per_host(1024)
        .build::<_, Empty<Bytes>>(connector);
    // Warm everything: pools, cache, TLS.
    runtime.warm(&set, Duration::from_secs(5)).await;
    let miss = set.action("miss").cloned().ok_or("no miss action")?;
    let hit = set.action("hit").cloned().ok_or("no hit action")?;
    let tls = set.action("tls").cloned().ok_or("no tls action")?;
    let budget = Budget::new(Duration::from_secs(3600));
    let mut c = Call::new(call_info(0));
    runtime.execute(&hit, &mut c, json!({}), &budget).await;

    // One session per concurrent caller, as an agent runtime holds them. The pool is warm
    // already: no warm-up per session (it would open connections to the hanging upstream).
    let mut sessions = Vec::new();
    for i in 0..*concurrencies.iter().max().unwrap_or(&1) {
        sessions.push(
            runtime
                .start_call(set.clone(), call_info(i), Duration::ZERO)
                .await,
        );
    }
    let sessions = Arc::new(sessions);
    sessions[0]
        .tool("hit", ToolCall::new("warm", json!({})), budget)
        .await;

    let scenarios = [
        "raw_serde",
        "raw_simd",
        "exec_miss",
        "exec_hit",
        "session_miss",
        "session_hit",
        "raw_tail",
        "exec_hedged",
        "exec_miss_tls",
        "first_action_cold",
        "first_action_warm",
    ];
    let mut series: Vec<Series> = Vec::new();
    for s in scenarios {
        for &conc in concurrencies {
            series.push(Series {
                name: s.into(),
                concurrency: conc,
                lat_ns: Vec::new(),
                busy: Duration::ZERO,
            });
        }
    }
    let steady = series
        .iter()
        .filter(|s| !s.name.starts_with("first_action"))
        .count();
    let mut progress = Progress {
        total: rounds * steady + 2,
        done: 0,
        tty: std::io::stderr().is_terminal(),
    };
    let raw_uri: http::Uri = format!("{http}/v1/customers?phone=%2B15551234567")
        .parse()
        .map_err(|_| "uri")?;
    for round in 0..rounds {
        // Interleaved: every scenario and concurrency once per round, so drift hits all alike.
        for s in series.iter_mut() {
            let conc = s.concurrency;
            let (lat, busy) = match s.name.as_str() {
                "raw_serde" | "raw_simd" | "raw_tail" => {
                    let uri = if s.name == "raw_tail" {
                        &tail_uri
                    } else {
                        &raw_uri
                    };
                    let (raw, uri) = (raw.clone(), uri.clone());
                    let simd = s.name != "raw_serde";
                    batch(conc, per_batch.max(conc), move |_| {
                        let (raw, uri) = (raw.clone(), uri.clone());
                        async move {
                            let Ok(resp) = raw.get(uri).await else {
                                return false;
                            };
                            let Ok(body) = resp.into_body().collect().await else {
                                return false;
                            };
                            let body = body.to_bytes();
                            if simd {
                                // The parser midcall uses, over an owned copy as midcall's is.
                                use simd_json::prelude::*;
                                let mut owned = body.to_vec();
                                let Ok(doc) = simd_json::to_borrowed_value(&mut owned) else {
                                    return false;
                                };
                                doc.get("data")
                                    .and_then(|d| d.get("customer"))
                                    .and_then(|c| c.get("name"))
                                    .is_some()
                            } else {
                                let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
                                    return false;
                                };
                                doc.pointer("/data/customer/name").is_some()
                            }
                        }
                    })
                    .await
                }
                "session_miss" | "session_hit" => {
                    let (name, want) = if s.name == "session_hit" {
                        ("hit", "cache_hit")
                    } else {
                        ("miss", "ok")
                    };
                    let sessions = sessions.clone();
                    batch(conc, per_batch.max(conc), move |i| {
                        let sessions = sessions.clone();
                        async move {
                            let o = sessions[i % conc]
                                .tool(
                                    name,
                                    ToolCall::new(format!("s{i}"), json!({})),
                                    Budget::new(Duration::from_secs(60)),
                                )
                                .await;
                            o.status.as_str() == want
                        }
                    })
                    .await
                }
                "exec_miss" | "exec_hit" | "exec_miss_tls" | "exec_hedged" => {
                    let action = match s.name.as_str() {
                        "exec_miss" => miss.clone(),
                        "exec_hit" => hit.clone(),
                        "exec_hedged" => hedged.clone(),
                        _ => tls.clone(),
                    };
                    // Hedges sent: requests beyond one per tool call.
                    let extra = (s.name == "exec_hedged").then(|| extra_requests.clone());
                    let want = if s.name == "exec_hit" {
                        "cache_hit"
                    } else {
                        "ok"
                    };
                    let runtime = runtime.clone();
                    batch(conc, per_batch.max(conc), move |i| {
                        let (runtime, action, extra) =
                            (runtime.clone(), action.clone(), extra.clone());
                        async move {
                            let mut call = Call::new(call_info(i));
                            let o = runtime
                                .execute(
                                    &action,
                                    &mut call,
                                    ToolCall::new(format!("t{i}"), json!({})),
                                    &Budget::new(Duration::from_secs(60)),
                                )
                                .await;
                            if let Some(extra) = extra {
                                extra.fetch_add(
                                    o.attempts.saturating_sub(1) as usize,
                                    Ordering::Relaxed,
                                );
                            }
                            o.status.as_str() == want
                        }
                    })
                    .await
                }
                // First actions need fresh runtimes; they are measured after the rounds.
                _ => continue,
            };
            s.lat_ns.extend(lat);
            s.busy += busy;
            progress.step(&format!("round {}/{rounds} {} c={conc}", round + 1, s.name));
        }
    }
    // First-action series: the measured part excludes building the runtime and the warm-up.
    progress.step("first actions (fresh runtimes)");
    let first = first_action_series(&ca, &tls, concurrencies, if a.quick { 16 } else { 100 }).await;
    for (name, conc, lat, busy) in first {
        if let Some(s) = series
            .iter_mut()
            .find(|s| s.name == name && s.concurrency == conc)
        {
            s.lat_ns = lat;
            s.busy = busy;
        }
    }
    progress.step("deadline precision");
    let hang = set.action("hang").cloned().ok_or("no hang action")?;
    let overshoot = deadline_precision(&hang, if a.quick { 200 } else { 1000 }).await?;
    // The same under CPU-bound neighbours: an agent process is never idle.
    let overshoot_hogs = if a.cpu_hogs > 0 {
        let _hogs = Hogs::start(a.cpu_hogs as usize)?;
        // Let them reach full speed first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((
            a.cpu_hogs,
            deadline_precision(&hang, if a.quick { 200 } else { 1000 }).await?,
        ))
    } else {
        None
    };
    progress.step("event publishing");
    let events = event_bench(if a.quick { 2000 } else { 20_000 }).await?;
    for s in series.iter_mut() {
        s.lat_ns.sort_unstable();
    }
    let hedged_requests: usize = series
        .iter()
        .filter(|s| s.name == "exec_hedged")
        .map(|s| s.lat_ns.len())
        .sum();
    let hedge_extra = extra_requests.load(Ordering::Relaxed) as f64 / hedged_requests.max(1) as f64;
    report(
        &series,
        &overshoot,
        overshoot_hogs.as_ref(),
        memory,
        &events,
        hedge_extra,
        a.json.as_deref(),
        a.body_bytes,
    )?;
    Ok(ExitCode::SUCCESS)
}

type SeriesData = (String, usize, Vec<u64>, Duration);

/// Answers every `*.bench.test` name with 127.0.0.1, so each first action can go to a host the
/// runtime has never connected to (the pool is keyed by host).
struct BenchResolver;

impl midcall::transport::Resolve for BenchResolver {
    fn resolve(
        &self,
        _host: &str,
        port: u16,
    ) -> midcall::transport::BoxFuture<std::io::Result<Vec<std::net::SocketAddr>>> {
        Box::pin(async move { Ok(vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))]) })
    }
}

/// The first action of a call to a host the process has not connected to yet, over TLS, on a
/// runtime that is already running (as in production): with warm-up (not timed) and cold.
async fn first_action_series(
    ca: &[u8],
    tls: &ActionSpec,
    concs: &[usize],
    n: usize,
) -> Vec<SeriesData> {
    let port = tls.url().port();
    let Ok(rt) = Runtime::builder()
        .egress(
            EgressPolicy::new()
                .allow_network(ipnet::IpNet::from(std::net::IpAddr::from([127, 0, 0, 1]))),
        )
        .resolver(Arc::new(BenchResolver))
        .add_root_certificate(ca.to_vec())
        .dedupe_window(Duration::ZERO)
        .build()
    else {
        return Vec::new();
    };
    let mut host = 0usize;
    let mut out = Vec::new();
    for &conc in concs {
        for warm in [false, true] {
            let mut lat = Vec::new();
            let mut busy = Duration::ZERO;
            for _ in 0..n.max(conc).div_ceil(conc) {
                let mut sets = Vec::with_capacity(conc);
                for _ in 0..conc {
                    host += 1;
                    let text = format!(
                        "[agent]\nid = \"bench\"\ntenant = \"bench\"\n{}",
                        bench_action(
                            "tls",
                            &format!("https://h{host}.bench.test:{port}{LOOKUP}"),
                            EXTRACT_NAME
                        )
                    );
                    let Ok(set) = ActionSet::from_str("bench.toml", &text, Syntax::Toml) else {
                        continue;
                    };
                    sets.push(set);
                }
                if warm {
                    futures_util::future::join_all(
                        sets.iter().map(|s| rt.warm(s, Duration::from_secs(10))),
                    )
                    .await;
                }
                let start = Instant::now();
                let results =
                    futures_util::future::join_all(sets.iter().enumerate().map(|(i, set)| {
                        let rt = &rt;
                        async move {
                            let action = set.action("tls")?;
                            let mut call = Call::new(call_info(i));
                            let t = Instant::now();
                            let o = rt
                                .execute(
                                    action,
                                    &mut call,
                                    json!({}),
                                    &Budget::new(Duration::from_secs(30)),
                                )
                                .await;
                            (o.status.as_str() == "ok").then(|| t.elapsed().as_nanos() as u64)
                        }
                    }))
                    .await;
                busy += start.elapsed();
                lat.extend(results.into_iter().flatten());
            }
            let name = if warm {
                "first_action_warm"
            } else {
                "first_action_cold"
            };
            out.push((name.to_string(), conc, lat, busy));
        }
    }
    out
}

struct Overshoot {
    actions: usize,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    timed_out: usize,
}

/// `n` concurrent actions against an upstream that never answers, budget 100 ms: how far past
/// the deadline each outcome arrived.
async fn deadline_precision(hang: &ActionSpec, n: usize) -> Result<Overshoot, String> {
    let rt = local_runtime(None, n)?;
    let budget_ms = 100;
    let results = futures_util::future::join_all((0..n).map(|i| {
        let rt = rt.clone();
        async move {
            let mut call = Call::new(call_info(i));
            let budget = Budget::new(Duration::from_millis(budget_ms));
            let deadline = budget.deadline();
            let o = rt
                .execute(
                    hang,
                    &mut call,
                    ToolCall::new(format!("h{i}"), json!({})),
                    &budget,
                )
                .await;
            (
                o.status.as_str() == "timed_out",
                Instant::now().saturating_duration_since(deadline),
            )
        }
    }))
    .await;
    let mut over: Vec<u64> = results.iter().map(|(_, d)| d.as_micros() as u64).collect();
    over.sort_unstable();
    let pct = |p: f64| percentile(&over, p);
    Ok(Overshoot {
        actions: n,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        max_us: *over.last().unwrap_or(&0) as f64,
        timed_out: results.iter().filter(|(t, _)| *t).count(),
    })
}

/// `--hit-profile N`: N sequential session cache hits, nothing else (a profiler's view of the
/// hit path); prints the mean.
async fn hit_profile(n: usize) -> Result<ExitCode, String> {
    let (http, _, hang, tail, _) = start_upstreams(1024).await?;
    let base = |p: u16| format!("http://127.0.0.1:{p}");
    let set = Arc::new(agent(&base(http), &base(http), &base(hang), &base(tail))?);
    let rt = local_runtime(None, 4)?;
    let session = rt
        .start_call(set, call_info(0), Duration::from_secs(1))
        .await;
    let budget = || Budget::new(Duration::from_secs(60));
    let first = session
        .tool("hit", ToolCall::new("fill", json!({})), budget())
        .await;
    if first.status.as_str() != "ok" {
        return Err(format!("filling the cache: {}", first.to_json()));
    }
    let t = Instant::now();
    for i in 0..n {
        let o = session
            .tool("hit", ToolCall::new(format!("h{i}"), json!({})), budget())
            .await;
        if o.status.as_str() != "cache_hit" {
            return Err(format!("not a hit: {}", o.to_json()));
        }
    }
    println!(
        "{n} session cache hits: {:.2} µs each",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    Ok(ExitCode::SUCCESS)
}

/// Busy processes (this harness again, with `--hog`), stopped when dropped.
pub(crate) struct Hogs(Vec<std::process::Child>);

impl Hogs {
    pub(crate) fn start(n: usize) -> Result<Hogs, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut out = Hogs(Vec::with_capacity(n));
        for _ in 0..n {
            let child = std::process::Command::new(&exe)
                .args(["--hog"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("starting a --cpu-hogs process: {e}"))?;
            out.0.push(child);
        }
        Ok(out)
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `--hog`: spin until stdin closes (the bench that started it is gone or done).
fn hog() -> ExitCode {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        s.store(true, Ordering::Relaxed);
    });
    let mut x = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for i in 0..100_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
    ExitCode::SUCCESS
}

pub(crate) fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<usize>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Resident memory per live call with 20 state variables and a 20-turn transcript.
fn memory_per_call(n: usize) -> f64 {
    let before = rss_bytes();
    let mut calls = Vec::with_capacity(n);
    for i in 0..n {
        let mut call = Call::new(call_info(i));
        for v in 0..20 {
            if let Ok(path) = midcall::StatePath::parse(&format!("vars.v{v}")) {
                let _ = call
                    .state
                    .set(&path, json!(format!("value number {v} for call {i}")));
            }
        }
        let mut t = Transcript::default();
        for turn in 0..20 {
            if turn % 2 == 0 {
                t.push(Turn::user(
                    "I'd like to book a cleaning next Tuesday, please.",
                    "2025-11-03T19:33:18.330Z",
                ));
            } else {
                t.push(Turn::ai(
                    "Sure, I have 9 and 10 in the morning.",
                    "2025-11-03T19:33:19.010Z",
                    Some(turn),
                    Some("node_book".into()),
                ));
            }
        }
        call.transcript = t;
        calls.push(call);
    }
    let after = rss_bytes();
    let per = after.saturating_sub(before) as f64 / n as f64;
    drop(calls);
    per
}

struct EventNumbers {
    publish_p50_us: f64,
    publish_p99_us: f64,
    durable_events_per_s: f64,
    events: usize,
}

/// `publish` latency on the call path, and sustained durable throughput into the outbox.
async fn event_bench(n: usize) -> Result<EventNumbers, String> {
    use midcall::events::{Event, EventBus, EventType};
    let dir = std::env::temp_dir().join(format!("midcall-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let set = ActionSet::from_str(
        "bench.toml",
        "[agent]\nid = \"bench\"\ntenant = \"bench\"\n[[webhooks]]\nlabel = \"sink\"\nurl = \"https://hooks.example.com/x\"\nsubscriptions = [\"message\"]\n",
        Syntax::Toml,
    )
    .map_err(|e| e.to_string())?;
    let call = call_info(0);
    let event = Event::new(
        EventType::Message,
        json!({"text": "Thanks for calling Acme Dental, how can I help?"}),
    );
    // publish: enqueue only.
    let db = dir.join("publish.db");
    let bus = EventBus::builder(&db)
        .webhooks(&set)
        .deliver(false)
        .channel_capacity(n + 16)
        .build()?;
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        bus.publish(&event, &call).map_err(|e| e.to_string())?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    bus.close().await;
    lat.sort_unstable();
    let pct = |p: f64| percentile(&lat, p) / 1000.0;
    // durable: many publishers at once, each waiting for its commit.
    let db2 = dir.join("durable.db");
    let bus = EventBus::builder(&db2)
        .webhooks(&set)
        .deliver(false)
        .build()?;
    let start = Instant::now();
    let results = futures_util::future::join_all((0..n).map(|_| {
        let (bus, event, call) = (bus.clone(), event.clone(), call.clone());
        async move { bus.publish_durable(&event, &call).await }
    }))
    .await;
    let secs = start.elapsed().as_secs_f64();
    bus.close().await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(EventNumbers {
        publish_p50_us: pct(0.5),
        publish_p99_us: pct(0.99),
        durable_events_per_s: ok as f64 / secs,
        events: n,
    })
}

#[allow(clippy::too_many_arguments)]
fn report(
    series: &[Series],
    over: &Overshoot,
    over_hogs: Option<&(u32, Overshoot)>,
    memory: f64,
    events: &EventNumbers,
    hedge_extra: f64,
    json_file: Option<&str>,
    body_bytes: usize,
) -> Result<(), String> {
    let base = |name: &str, conc: usize| {
        series
            .iter()
            .find(|s| s.name == name && s.concurrency == conc)
    };
    // Two ratios: against raw hyper parsing with serde_json (what a hand-written tool does) and
    // with simd-json (the parser midcall uses: what is left is midcall's own cost).
    println!(
        "{:<18} {:>5} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}",
        "scenario",
        "conc",
        "requests",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p999 µs",
        "req/s",
        "xserde50",
        "xserde99",
        "xsimd50",
        "xsimd99"
    );
    let mut rows = Vec::new();
    for s in series {
        let ratio = |b: &str| match (s.name.starts_with("raw_"), base(b, s.concurrency)) {
            (true, _) | (_, None) => (None, None),
            (false, Some(r)) => (
                Some(s.pct(0.5) / r.pct(0.5).max(1e-9)),
                Some(s.pct(0.99) / r.pct(0.99).max(1e-9)),
            ),
        };
        let (r50, r99) = ratio("raw_serde");
        let (q50, q99) = ratio("raw_simd");
        let f = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "{} {:>8} {:>8} {:>8} {:>8}",
            s.row(),
            f(r50),
            f(r99),
            f(q50),
            f(q99)
        );
        let mut row = s.to_json(r50, r99);
        row["ratio_simd_p50"] = json!(q50);
        row["ratio_simd_p99"] = json!(q99);
        rows.push(row);
    }
    let steady = series
        .iter()
        .find(|s| s.name == "exec_miss_tls" && s.concurrency == 1);
    let warm = series
        .iter()
        .find(|s| s.name == "first_action_warm" && s.concurrency == 1);
    let warm_ratio = match (warm, steady) {
        (Some(w), Some(s)) => w.pct(0.5) / s.pct(0.5).max(1e-9),
        _ => 0.0,
    };
    println!();
    println!("first_action_warm vs steady state over TLS (p50, concurrency 1): {warm_ratio:.2}x");
    println!(
        "deadline precision: {} hung actions, budget 100 ms: overshoot p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs ({} timed_out)",
        over.actions, over.p50_us, over.p99_us, over.max_us, over.timed_out
    );
    if let Some((n, h)) = over_hogs {
        println!(
            "deadline precision beside {n} busy processes: overshoot p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs ({} timed_out)",
            h.p50_us, h.p99_us, h.max_us, h.timed_out
        );
    }
    println!("memory: {memory:.0} bytes per live call (20 state variables, 20-turn transcript; RSS delta)");
    let mut hedge_rows = Vec::new();
    for conc in [1usize, 64] {
        if let (Some(h), Some(t)) = (base("exec_hedged", conc), base("raw_tail", conc)) {
            let ratio = h.pct(0.99) / t.pct(0.99).max(1e-9);
            println!(
                "hedging (5 % of answers 50 ms late), concurrency {conc}: exec_hedged p99 {:.0} µs vs raw_tail p99 {:.0} µs: {ratio:.2}x",
                h.pct(0.99),
                t.pct(0.99)
            );
            hedge_rows.push(json!({"concurrency": conc, "hedged_p99_us": h.pct(0.99), "raw_tail_p99_us": t.pct(0.99), "ratio_p99": ratio}));
        }
    }
    println!(
        "hedging: {:.1} % extra upstream requests",
        hedge_extra * 100.0
    );
    println!(
        "events: publish p50 {:.1} µs, p99 {:.1} µs; durable throughput {:.0} events/s ({} events)",
        events.publish_p50_us, events.publish_p99_us, events.durable_events_per_s, events.events
    );
    if let Some(file) = json_file {
        let doc = json!({
            "scenarios": rows,
            "first_action_warm_vs_steady_p50": warm_ratio,
            "deadline": {"actions": over.actions, "budget_ms": 100, "overshoot_p50_us": over.p50_us, "overshoot_p99_us": over.p99_us, "overshoot_max_us": over.max_us, "timed_out": over.timed_out},
            "deadline_cpu_hogs": over_hogs.map(|(n, h)| json!({"cpu_hogs": n, "actions": h.actions, "budget_ms": 100, "overshoot_p50_us": h.p50_us, "overshoot_p99_us": h.p99_us, "overshoot_max_us": h.max_us, "timed_out": h.timed_out})),
            "memory": {"bytes_per_call": memory},
            "hedge": {"extra_requests_share": hedge_extra, "rows": hedge_rows},
            "events": {"publish_p50_us": events.publish_p50_us, "publish_p99_us": events.publish_p99_us, "durable_events_per_s": events.durable_events_per_s, "events": events.events},
            "body_bytes": body_bytes,
            "machine": machine(),
        });
        std::fs::write(
            file,
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("{file}: {e}"))?;
        println!("wrote {file}");
    }
    Ok(())
}
