//! `midcall serve`: the inbound webhook endpoint, the automation runner and event delivery.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use midcall::automation::MetricsRender;
use midcall::{Automations, EventBus, InboundServer, Runtime, SecretSource};

use midcall::demo::{hosts, DemoSecrets, Mock, MockResolver};

/// Serve an agent's automations: inbound webhooks, runs and event delivery.
///
/// Serve an agent's automations: `POST /v1/automations/{id}/webhook` starts a webhook
/// automation (202 with its run id), `GET /healthz`, `GET /metrics` (Prometheus). Runs and
/// webhook deliveries are stored in the outbox database and survive restarts. SIGTERM or
/// Ctrl-C: stop accepting, finish requests in flight, leave queued work in the outbox.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  MIDCALL_SECRET_INBOUND_KEY=k3y midcall serve examples/front-desk/agent.toml --listen 127.0.0.1:8080 --db outbox.db\n  curl -X POST http://127.0.0.1:8080/v1/automations/callback-request/webhook \\\n       -H 'Authorization: Bearer k3y' -H 'Content-Type: application/json' -d '{\"slot\": \"2025-11-04T15:00\"}'"
)]
pub(crate) struct ServeArgs {
    /// The agent file.
    file: String,
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
    let set = Arc::new(super::load(&a.file)?);
    let policy = a.net.policy(&set)?;
    // The log: inbound requests, runs, delivery attempts, one line each on stderr. It is
    // written by the subscriber, never waited for by a request.
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .with_target(false);
    if a.log_format == "json" {
        let _ = tracing::subscriber::set_global_default(subscriber.json().finish());
    } else {
        let _ = tracing::subscriber::set_global_default(subscriber.compact().finish());
    }
    // Tell the operator now which secrets are missing (a run that needs one fails naming it).
    let missing: Vec<String> = set
        .secret_names()
        .iter()
        .filter(|n| midcall::EnvSecrets.secret(n).is_none())
        .cloned()
        .collect();
    let mut policy = policy;
    if a.mock {
        policy = policy.allow_network("127.0.0.0/8".parse().map_err(|_| "loopback")?);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        // The port first: a server that cannot listen creates no database.
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .map_err(|e| format!("--listen {}: {e}", a.listen))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let shown_db = midcall::events::display_db(&a.db);
        let bus = a.net.with_ca(
            EventBus::builder(&a.db)
                .webhooks(&set)
                .attempt_timeout(Duration::from_millis(a.attempt_timeout_ms.max(1))),
            |b, pem| b.add_root_certificates_pem(pem),
        )?;
        let mut builder = Runtime::builder().egress(policy).event_bus(bus);
        if let Some(cfg) = super::shared_cache(
            a.cache_url.as_deref(),
            Some(Duration::from_millis(a.cache_op_timeout_ms)),
        )? {
            builder = builder.shared_cache(cfg);
        }
        // Kept for the server's life: the stand-in for every host the agent calls.
        let mut _mock = None;
        if a.mock {
            let secrets = Arc::new(DemoSecrets::env_first());
            let mock = Mock::start(&hosts(&set), &[], secrets.clone()).await?;
            builder = builder
                .resolver(Arc::new(MockResolver(mock.addr)))
                .add_root_certificate(mock.cert_der.clone())
                .secrets(secrets);
            _mock = Some(mock);
        }
        let runtime = a
            .net
            .with_ca(builder, |b, pem| b.add_root_certificates_pem(pem))?
            .build()
            .map_err(|e| format!("--db: {e}"))?;
        runtime
            .check_shared_cache(Duration::from_secs(2))
            .await
            .map_err(|e| format!("--cache-url: {e}"))?;
        let bus = runtime.event_bus().cloned().ok_or("no event bus")?;
        let automations = Automations::builder(set.clone(), runtime, bus.clone()).start()?;
        let grace = Duration::from_secs(a.grace_s);
        let mut server = InboundServer::new(automations.clone()).drain_timeout(grace);
        if let Some(m) = metrics {
            server = server.metrics(m);
        }
        let webhook_ids: Vec<&str> = set
            .automations()
            .iter()
            .filter(|x| x.trigger.name() == "webhook")
            .map(|x| x.id.as_str())
            .collect();
        say!(
            "midcall serve: agent \"{}\" on http://{local}",
            set.agent().id
        );
        for id in &webhook_ids {
            say!("  POST http://{local}/v1/automations/{id}/webhook");
        }
        say!("  GET  http://{local}/healthz");
        say!("  GET  http://{local}/metrics");
        if let Some(m) = &_mock {
            say!(
                "  mock CRM on https://{} answering for {}",
                m.addr,
                hosts(&set).join(", ")
            );
            if !missing.is_empty() {
                say!("  demo values for the secrets not set: {}", missing.join(", "));
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
        say!("  outbox: {shown_db}");
        server
            .serve(listener, shutdown_signal())
            .await
            .map_err(|e| e.to_string())?;
        say!(
            "midcall serve: stopping; runs in progress get {}s",
            a.grace_s
        );
        automations.shutdown(grace).await;
        bus.close().await;
        say!("midcall serve: stopped; queued work stays in {shown_db}");
        Ok::<_, String>(())
    })?;
    Ok(ExitCode::SUCCESS)
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
