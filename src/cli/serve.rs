//! `midcall serve`: the inbound webhook endpoint, the automation runner and event delivery.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use midcall::server::MetricsRender;
use midcall::{Automations, InboundServer, SecretSource, Stack};

use super::agents::Loaded;

use midcall::demo::{hosts, DemoSecrets};

/// Serve agents' automations: inbound webhooks, runs, event delivery, the operator API.
///
/// Serve one agent file, several, or a directory of them:
/// `POST /v1/agents/{agent}/automations/{id}/webhook` (and `/v1/automations/{id}/webhook` while
/// the id is unique) starts a webhook automation (202 with its run id), `GET /healthz`,
/// `GET /metrics` (Prometheus). With an admin key, the operator API under `/v1/admin/` and the
/// console at `/console`. Runs and webhook deliveries are stored in the outbox database and
/// survive restarts. The files are reloaded on SIGHUP and when one changes: a file with errors
/// is refused (logged with file and line) and its agent's old version stays in service.
/// SIGTERM or Ctrl-C: stop accepting, finish requests in flight, leave queued work in the
/// outbox.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  MIDCALL_SECRET_INBOUND_KEY=k3y midcall serve examples/front-desk/agent.toml --listen 127.0.0.1:8080 --db outbox.db\n  curl -X POST http://127.0.0.1:8080/v1/automations/callback-request/webhook \\\n       -H 'Authorization: Bearer k3y' -H 'Content-Type: application/json' -d '{\"slot\": \"2025-11-04T15:00\"}'\n  MIDCALL_SECRET_ADMIN_KEY=$(openssl rand -hex 16) midcall serve agents/ --db outbox.db\n  kill -HUP $(pidof midcall)   # reload the agent files now"
)]
pub(crate) struct ServeArgs {
    /// Agent files, or directories of them (every *.toml and *.json in it). One file keeps
    /// its names as written; several agents get theirs prefixed with the agent id in the
    /// outbox (`front-desk/notify`).
    #[arg(required = true)]
    files: Vec<String>,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// The outbox database (runs, deliveries): a SQLite file, created if missing, or a
    /// PostgreSQL database shared by every process of a fleet (`postgres://user@host:port/db`).
    #[arg(long, default_value = "midcall-outbox.db")]
    db: String,
    /// The shared cache tier (`redis://host:port`): cache entries filled by one process are
    /// hits in the others. Its keys are HMACs under the fleet's secret, read from
    /// MIDCALL_SECRET_CACHE_KEY (the same in every process, 16 bytes or more). Without it each
    /// process caches alone.
    #[arg(long)]
    cache_url: Option<String>,
    /// The deadline of one shared cache operation, in milliseconds (never more than the
    /// action's budget has left); past it the entry counts as missing.
    #[arg(long, default_value_t = 5)]
    cache_op_timeout_ms: u64,
    /// Time limit of one webhook delivery attempt, in milliseconds. A claimed delivery's lease
    /// is this plus as much again (1 to 10 s): another process takes over the deliveries of a
    /// process that died once it runs out.
    #[arg(long, default_value_t = 15_000)]
    attempt_timeout_ms: u64,
    /// The delay before each retry of a failed delivery, in milliseconds, comma-separated
    /// (its length is the number of retries). Default 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
    #[arg(long, value_name = "MS,MS,...")]
    retry_schedule_ms: Option<String>,
    /// Turns on the operator API (/v1/admin/) and the console (/console), behind the secret of
    /// this name (read from MIDCALL_SECRET_<NAME>, 16 characters or more). Without the flag
    /// they are on only when MIDCALL_SECRET_ADMIN_KEY is set.
    #[arg(long, value_name = "NAME")]
    admin_secret: Option<String>,
    /// The server sits behind an HTTPS proxy: the console's cookie is Secure and the admin
    /// API and console answer beyond loopback (without it they answer loopback peers only).
    #[arg(long)]
    behind_https_proxy: bool,
    /// How often the agent files are checked for changes, in milliseconds (0: only SIGHUP
    /// reloads).
    #[arg(long, default_value_t = 1000)]
    watch_ms: u64,
    /// How long shutdown waits for requests and runs in progress, in seconds.
    #[arg(long, default_value_t = 10)]
    grace_s: u64,
    /// Route every host the agent calls to the bundled mock CRM on 127.0.0.1 (the one
    /// `simulate` uses, HTTPS with a certificate made at start), to try an agent with no
    /// outside service; secrets not set in the environment get demo values.
    #[arg(long)]
    mock: bool,
    /// How the log on stderr is written: one readable line per event, or one JSON object.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    #[command(flatten)]
    net: super::NetworkArgs,
}

/// Prints a line; a closed stdout (a reader that went away) must not stop the server.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

pub(crate) fn run(a: ServeArgs, metrics: Option<MetricsRender>) -> Result<ExitCode, String> {
    let files = super::agents::expand(&a.files)?;
    let (loaded, problems) = Loaded::load(&files, None);
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    let admin = admin_key(a.admin_secret.as_deref())?;
    let mut rules = Rules {
        admin_name: admin.as_ref().map(|(n, _)| n.clone()),
        egress: None,
    };
    let agents = rules.servable(&loaded)?;
    // Egress is fixed from now on: one process has one policy.
    rules.egress = Some(agents.first().egress().clone());
    init_log(&a.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        // SIGHUP means reload from now on (its default would end the process).
        #[cfg(unix)]
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        #[cfg(not(unix))]
        let hup = None::<()>;
        // The port first: a server that cannot listen creates no database.
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .map_err(|e| format!("--listen {}: {e}", a.listen))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let stack = stack(&a, &agents).await?;
        let automations = stack.automations.clone().ok_or("no automations")?;
        let bus = stack.bus().cloned().ok_or("no event bus")?;
        let grace = Duration::from_secs(a.grace_s);
        let mut server = InboundServer::new(automations.clone())
            .drain_timeout(grace)
            .behind_https_proxy(a.behind_https_proxy);
        if let Some(m) = metrics {
            server = server.metrics(m);
        }
        let admin_key = admin.map(|(_, k)| k);
        if let Some(k) = admin_key.clone() {
            server = server.admin_key(k);
        }
        banner(
            &a,
            &agents,
            &local,
            admin_key.is_some(),
            stack.mock.as_ref(),
        );
        let watcher = tokio::spawn(watch(
            loaded,
            files,
            automations.clone(),
            rules,
            Duration::from_millis(a.watch_ms),
            hup,
        ));
        let served = server.serve(listener, shutdown_signal()).await;
        watcher.abort();
        served.map_err(|e| e.to_string())?;
        say!(
            "midcall serve: stopping; runs in progress get {}s",
            a.grace_s
        );
        automations.shutdown(grace).await;
        bus.close().await;
        say!(
            "midcall serve: stopped; queued work stays in {}",
            midcall::events::display_db(&a.db)
        );
        Ok::<_, String>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The log: inbound requests, runs, delivery attempts, one line each on stderr. It is written
/// by the subscriber, never waited for by a request.
fn init_log(format: &str) {
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .with_target(false);
    if format == "json" {
        let _ = tracing::subscriber::set_global_default(subscriber.json().finish());
    } else {
        let _ = tracing::subscriber::set_global_default(subscriber.compact().finish());
    }
}

/// The runtime, the outbox and the automations of `agents`, as the flags say.
async fn stack(a: &ServeArgs, agents: &midcall::config::Agents) -> Result<Stack, String> {
    let schedule = a
        .retry_schedule_ms
        .as_deref()
        .map(retry_schedule)
        .transpose()?;
    let attempt = Duration::from_millis(a.attempt_timeout_ms.max(1));
    let mut builder = a.net.stack(agents.clone())?.outbox(&a.db, move |bus| {
        let bus = bus.attempt_timeout(attempt);
        match schedule {
            Some(s) => bus.retry_schedule(s),
            None => bus,
        }
    });
    if let Some(cfg) = super::shared_cache(
        a.cache_url.as_deref(),
        Some(Duration::from_millis(a.cache_op_timeout_ms)),
    )? {
        builder = builder.shared_cache(cfg);
    }
    if a.mock {
        builder = builder.mock(Vec::new(), Arc::new(DemoSecrets::env_first()));
    }
    builder.build().await.map_err(super::stack_error)
}

/// What is served, where: the first lines a `serve` prints.
fn banner(
    a: &ServeArgs,
    agents: &midcall::config::Agents,
    local: &std::net::SocketAddr,
    admin: bool,
    mock: Option<&midcall::demo::Mock>,
) {
    if agents.sets().len() == 1 {
        say!(
            "midcall serve: agent \"{}\" on http://{local}",
            agents.first().agent().id
        );
    } else {
        say!(
            "midcall serve: {} ({}) on http://{local}",
            super::count(agents.sets().len(), "agent", "agents"),
            agents.ids().join(", ")
        );
    }
    for s in agents.sets() {
        for x in s
            .automations()
            .iter()
            .filter(|x| x.trigger.name() == "webhook")
        {
            say!(
                "  POST http://{local}/v1/agents/{}/automations/{}/webhook",
                s.agent().id,
                x.id
            );
        }
    }
    say!("  GET  http://{local}/healthz");
    say!("  GET  http://{local}/metrics");
    if admin {
        say!("  GET  http://{local}/v1/admin/deliveries (Authorization: Bearer <admin key>)");
        say!("  GET  http://{local}/console");
    }
    // Tell the operator now which secrets are missing (a run that needs one fails naming it).
    let mut missing: Vec<String> = agents
        .sets()
        .iter()
        .flat_map(|s| s.secret_names().iter().cloned())
        .filter(|n| midcall::EnvSecrets.secret(n).is_none())
        .collect();
    missing.sort();
    missing.dedup();
    if let Some(m) = mock {
        let hosts: Vec<String> = agents.sets().iter().flat_map(|s| hosts(s)).collect();
        say!(
            "  mock CRM on https://{} answering for {}",
            m.addr,
            hosts.join(", ")
        );
        if !missing.is_empty() {
            say!(
                "  demo values for the secrets not set: {}",
                missing.join(", ")
            );
        }
    } else if !missing.is_empty() {
        say!(
            "  warning: {} not set: {} (set MIDCALL_SECRET_<NAME>; what needs one fails naming it)",
            super::count(missing.len(), "secret is", "secrets are"),
            missing.join(", ")
        );
    }
    // Last line of the banner: what comes after it is the server at work.
    if let Some(u) = &a.cache_url {
        say!("  shared cache: {}", midcall::cache::shared::redact(u));
    }
    say!("  outbox: {}", midcall::events::display_db(&a.db));
}

/// `--retry-schedule-ms 100,1000,60000`.
fn retry_schedule(s: &str) -> Result<Vec<Duration>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| {
                    format!(
                        "--retry-schedule-ms: \"{}\" is not a number of milliseconds",
                        p.trim()
                    )
                })
        })
        .collect()
}

/// The admin key and its secret's name: the secret `--admin-secret` names, or
/// MIDCALL_SECRET_ADMIN_KEY when set.
fn admin_key(name: Option<&str>) -> Result<Option<(String, midcall::Secret)>, String> {
    let (name, required) = match name {
        Some(n) => (n, true),
        None => ("ADMIN_KEY", false),
    };
    let var = midcall::EnvSecrets::variable(name);
    match midcall::EnvSecrets.secret(name) {
        None if required => Err(format!(
            "--admin-secret {name}: set {var} to the admin key (16 characters or more)"
        )),
        None => Ok(None),
        Some(v) if v.expose().trim().len() < 16 => Err(format!(
            "{var}: the admin key must be 16 characters or more"
        )),
        Some(v) => Ok(Some((
            name.to_string(),
            midcall::Secret::new(v.expose().trim()),
        ))),
    }
}

/// Reloads the agent files on SIGHUP and when one changes (checked every `every`; never when
/// zero): what loads and checks replaces what is served; a file with errors is refused, logged
/// with file and line, and its agent's old version stays.
/// What a set of agent files must satisfy to be served, at start and on every reload.
struct Rules {
    /// The admin key's secret, which no agent file may read.
    admin_name: Option<String>,
    /// The egress in service (set once serving: a reload may not change it).
    egress: Option<midcall::config::EgressConfig>,
}

impl Rules {
    fn servable(&self, loaded: &Loaded) -> Result<midcall::config::Agents, String> {
        let agents = loaded.agents()?;
        if let Some(name) = &self.admin_name {
            agents.refuse_secret(name, "admin key")?;
        }
        if let Some(egress) = &self.egress {
            if agents.sets().iter().any(|s| s.egress() != egress) {
                return Err(
                    "an [egress] section changed: egress is fixed at start; restart to apply it"
                        .into(),
                );
            }
        }
        Ok(agents)
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

async fn watch(
    mut loaded: Loaded,
    files: super::agents::Files,
    automations: Automations,
    rules: Rules,
    every: Duration,
    #[allow(unused_mut)] mut hup: Hangup,
) {
    let mut last_gone = Vec::new();
    loop {
        let tick = async {
            if every.is_zero() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(every).await
            }
        };
        #[cfg(unix)]
        let forced = tokio::select! {
            _ = tick => false,
            _ = async {
                match hup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => true,
        };
        #[cfg(not(unix))]
        let forced = {
            tick.await;
            false
        };
        let (files, gone) = super::agents::expand_again(&files);
        if gone != last_gone {
            for g in &gone {
                tracing::warn!(target: "midcall::reload", problem = %g, "reload: gone; its agents are no longer served");
                say!("midcall serve: {g}: its agents are no longer served");
            }
            last_gone = gone;
        }
        if !forced && !loaded.changed(&files) {
            continue;
        }
        let (next, problems) = Loaded::load(&files, Some(&loaded));
        for p in &problems {
            tracing::error!(target: "midcall::reload", problem = %p, "reload: a file was refused; its agent's version in service stays");
            say!("midcall serve: reload refused: {p}");
        }
        let agents = match rules.servable(&next) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(target: "midcall::reload", error = %e, "reload refused; nothing changed");
                say!("midcall serve: reload refused: {e}");
                loaded.remember(&next);
                continue;
            }
        };
        let ids = agents.ids().join(", ");
        automations.replace_agents(agents);
        tracing::info!(target: "midcall::reload", agents = %ids, refused = problems.len(), "agent files reloaded");
        if problems.is_empty() {
            say!("midcall serve: reloaded: {ids}");
        } else {
            say!(
                "midcall serve: reloaded with {} refused (each keeps its version in service): {ids}",
                super::count(problems.len(), "file", "files")
            );
        }
        loaded = next;
    }
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
