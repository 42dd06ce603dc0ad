//! The flags of `midcall bench`, shared by the command (which runs `--actions` itself) and the
//! measurement harness in `benches/harness` (which runs every other mode).

use clap::Args;

/// Measure the action path against raw hyper on this machine.
///
/// Measure the action path against raw hyper in one run: p50/p90/p99/p999 latency, throughput
/// and ratios, plus deadline precision and memory per live call. With --actions, bench your own
/// action against its real endpoint instead.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  midcall bench --quick\n  midcall bench --json benches/results/bench.json\n  midcall bench --soak --quick --cpu-hogs 2 --worker-nice -10\n  midcall bench --fleet --db postgres://postgres@127.0.0.1:5432/bench --cache-url redis://127.0.0.1:6379\n  midcall bench --actions agent.toml --action lookup --concurrency 16 --requests 2000 --allow-http --allow-network 127.0.0.0/8"
)]
pub(crate) struct BenchArgs {
    /// A small run that finishes in seconds.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<String>,
    /// Size of the upstream's JSON response in bytes.
    #[arg(long, default_value_t = 1024)]
    pub(crate) body_bytes: usize,
    /// Bench an action from this agent file against its real endpoint.
    #[arg(long, value_name = "FILE", requires = "action")]
    pub(crate) actions: Option<String>,
    /// The action to bench (with --actions).
    #[arg(long, requires = "actions")]
    pub(crate) action: Option<String>,
    /// Concurrent tool calls (with --actions), at least 1.
    #[arg(long, default_value_t = 1, requires = "actions", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) concurrency: u32,
    /// Total tool calls (with --actions), at least 1.
    #[arg(long, default_value_t = 1000, requires = "actions", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) requests: u32,
    /// Arguments for every tool call (with --actions).
    #[arg(long, default_value = "{}", requires = "actions")]
    pub(crate) args: String,
    /// Allow plain http:// (with --actions; extends the file's [egress]).
    #[arg(long, requires = "actions")]
    pub(crate) allow_http: bool,
    /// Exempt a network from the private-address block (with --actions; repeatable).
    #[arg(long = "allow-network", value_name = "CIDR", requires = "actions")]
    pub(crate) allow_network: Vec<String>,
    /// Run the local upstreams in a separate process (the harness again), so the upstream's
    /// work does not share the bench's runtime and threads.
    #[arg(long, conflicts_with = "actions")]
    pub(crate) upstream_process: bool,
    /// Internal: serve the bench upstreams and print their ports; stop when stdin closes.
    #[arg(long, hide = true)]
    pub(crate) serve_upstreams: bool,
    /// Soak: thousands of simulated calls making tool calls through their sessions for 60 s
    /// against a misbehaving upstream (--quick: 15 s); reports dead air, filler lateness,
    /// memory growth and leftover tasks.
    #[arg(long, conflicts_with_all = ["actions", "upstream_process"])]
    pub(crate) soak: bool,
    /// Concurrent calls in the soak (default 2000).
    #[arg(long, requires = "soak", value_parser = clap::value_parser!(u32).range(1..=20_000))]
    pub(crate) calls: Option<u32>,
    /// Start this many CPU-bound processes beside the bench (and stop them after): the
    /// deadline precision and the soak are measured under them too.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=16))]
    pub(crate) cpu_hogs: u32,
    /// Give the bench runtime's threads this nice value (-20 to 19; below 0 needs root or
    /// CAP_SYS_NICE), as an embedder may with `midcall::exec::set_thread_nice`.
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub(crate) worker_nice: Option<i32>,
    /// Internal: only the memory-per-call step, for this many calls (run it under a heap
    /// profiler: peak heap / calls is the heap's view of the same figure).
    #[arg(long, hide = true, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) memory_only: Option<u32>,
    /// Internal: only N sequential cache hits through one session (to run under callgrind).
    #[arg(long, hide = true, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) hit_profile: Option<u32>,
    /// Internal: spin one core until stdin closes (a --cpu-hogs process).
    #[arg(long, hide = true)]
    pub(crate) hog: bool,
    /// The fleet's figures beside SQLite's, measured in the same run: durable publishing from
    /// 1 and 3 processes, delivery with 1 and 3 worker processes, and (with --cache-url) the
    /// latency of a shared-tier hit. Needs --db postgres://... naming an empty database.
    #[arg(long, requires = "db", conflicts_with_all = ["actions", "soak"])]
    pub(crate) fleet: bool,
    /// The PostgreSQL database for --fleet.
    #[arg(long, value_name = "URL")]
    pub(crate) db: Option<String>,
    /// The shared cache tier for --fleet (`redis://host:port`).
    #[arg(long, value_name = "URL", requires = "fleet")]
    pub(crate) cache_url: Option<String>,
    /// Internal: a --fleet child process (`publish` or `deliver`).
    #[arg(long, hide = true, value_parser = ["publish", "deliver"], requires = "db")]
    pub(crate) fleet_child: Option<String>,
    /// Internal: events a `publish` child publishes.
    #[arg(long, hide = true, default_value_t = 1000)]
    pub(crate) fleet_events: usize,
    /// Internal: the sink a `deliver` child delivers to.
    #[arg(long, hide = true, default_value = "http://127.0.0.1:9/sink")]
    pub(crate) fleet_sink: String,
}
