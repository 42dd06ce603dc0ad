//! Helpers shared by the integration tests.

#![allow(dead_code)]

pub(crate) mod servers;
pub(crate) mod services;

/// The storage engine a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    /// A SQLite file in the test's directory.
    Sqlite,
    /// A new database on a throwaway PostgreSQL server.
    Postgres,
}

impl Engine {
    /// Where a test's outbox goes: `name` in `dir`, or a new database's URL.
    pub(crate) fn db(self, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        match self {
            Engine::Sqlite => dir.join(name),
            Engine::Postgres => services::shared_postgres().database().into(),
        }
    }
}

/// Runs the async test `$name(engine: Engine)` once per engine, as `$name::sqlite` and
/// `$name::postgres`.
macro_rules! both_engines {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(crate::support::Engine::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(crate::support::Engine::Postgres).await
            }
        }
    };
}

use midcall::{ActionSet, CallInfo, LoadError, Syntax};

/// The `[agent]` header every small test config starts with.
pub(crate) const AGENT: &str = "[agent]\nid = \"front-desk\"\ntenant = \"acme\"\n";

pub(crate) fn load_toml(text: &str) -> Result<ActionSet, LoadError> {
    ActionSet::from_str("test.toml", text, Syntax::Toml)
}

/// Loads `AGENT` followed by `rest`, panicking with the errors when it fails.
pub(crate) fn agent(rest: &str) -> ActionSet {
    let text = format!("{AGENT}{rest}");
    match load_toml(&text) {
        Ok(s) => s,
        Err(e) => panic!("config should load:\n{e}\n---\n{text}"),
    }
}

/// Plain HTTP and loopback allowed: what tests against local servers need.
pub(crate) fn loopback_policy() -> midcall::EgressPolicy {
    midcall::EgressPolicy::new()
        .allow_http(true)
        .allow_network("127.0.0.0/8".parse().unwrap())
}

/// The usual limit of [`wait_until`] and [`wait_for`]: the events waited for take
/// milliseconds, so only a hang reaches it.
pub(crate) const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How often [`wait_for`] checks again.
const POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Checks `cond` every 10 ms until it holds; panics naming `what` when `limit` passes first.
/// A synchronous condition is `|| std::future::ready(…)`.
pub(crate) async fn wait_until<F, Fut>(what: &str, limit: std::time::Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for(what, limit, || {
        let held = cond();
        async move { held.await.then_some(()) }
    })
    .await
}

/// Checks `check` every 10 ms until it gives `Some`, and returns that value; panics naming
/// `what` when `limit` passes first. Bounded in count as well as time (`limit` / 10 ms
/// checks at most), so a slow check cannot stretch it either.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, limit: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let checks = limit.as_millis() / POLL.as_millis() + 1;
    for _ in 0..checks {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

pub(crate) fn call_info() -> CallInfo {
    CallInfo {
        id: "call_123".into(),
        agent_id: "front-desk".into(),
        tenant: "acme".into(),
        from_number: "+15551234567".into(),
        to_number: "+15557654321".into(),
        is_outgoing: false,
        started_at: "2025-11-03T19:33:18.330Z".into(),
    }
}

/// The repository root.
pub(crate) fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Collects what a tracing subscriber writes, to search it afterwards.
#[derive(Clone, Default)]
pub(crate) struct Capture(pub(crate) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Capture {
    /// A subscriber writing every event and the given span events, without colour, here.
    pub(crate) fn subscriber(
        &self,
        spans: tracing_subscriber::fmt::format::FmtSpan,
    ) -> impl tracing::Subscriber {
        tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(spans)
            .with_ansi(false)
            .finish()
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// The rest of a child's stdout, line by line.
pub(crate) type StdoutLines = std::io::Lines<std::io::BufReader<std::process::ChildStdout>>;

/// Starts `midcall serve FILE --listen 127.0.0.1:0 --allow-http --allow-network 127.0.0.0/8`
/// with `args` after them and `env` set; returns the child, the address of its first line,
/// and the rest of its stdout.
pub(crate) async fn spawn_serve(
    file: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, std::net::SocketAddr, StdoutLines) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_midcall"))
        .args(["serve", file.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .args(["--allow-http", "--allow-network", "127.0.0.0/8"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (first, rest) = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().unwrap().unwrap();
        (first, lines)
    })
    .await
    .unwrap();
    let addr = first.rsplit("http://").next().unwrap().parse().unwrap();
    (child, addr, rest)
}
