//! One module per command. Each returns `Ok(exit code)` or `Err(message)` (exit 2).

pub(crate) mod agents;
pub(crate) mod bench;
pub(crate) mod bench_args;
pub(crate) mod check;
pub(crate) mod deliveries;
pub(crate) mod exec;
pub(crate) mod jsonpath;
pub(crate) mod measure;
pub(crate) mod render;
pub(crate) mod runs;
pub(crate) mod serve;
pub(crate) mod simulate;
pub(crate) mod table;
pub(crate) mod tools;
pub(crate) mod webhooks;

use std::io::Read;

use midcall::ActionSet;

pub(crate) use table::Table;

/// Exit code for bad config, arguments or input.
pub(crate) const EXIT_BAD_INPUT: u8 = 2;

pub(crate) fn load(file: &str) -> Result<ActionSet, String> {
    ActionSet::load(file).map_err(|e| e.to_string())
}

/// Parses a JSON command-line value, naming the flag on error.
pub(crate) fn parse_json(flag: &str, text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("{flag}: not valid JSON: {e}"))
}

/// Reads a file, or stdin when `path` is `None` or `-`.
pub(crate) fn read_input(path: Option<&str>) -> Result<String, String> {
    match path {
        Some(p) if p != "-" => std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}")),
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("stdin: {e}"))?;
            Ok(s)
        }
    }
}

/// Where a command may connect: flags that extend the agent file's `[egress]`, and extra roots.
#[derive(Debug, clap::Args)]
pub(crate) struct NetworkArgs {
    /// Allow plain http:// (extends the file's [egress]).
    #[arg(long)]
    allow_http: bool,
    /// Exempt a network from the private-address block, e.g. 127.0.0.0/8 (repeatable).
    #[arg(long = "allow-network", value_name = "CIDR")]
    allow_network: Vec<String>,
    /// Trust the certificates in this PEM file as extra roots (private CAs).
    #[arg(long, value_name = "PEM")]
    ca_cert: Option<String>,
}

impl NetworkArgs {
    /// The file's egress policy with these flags.
    pub(crate) fn policy(&self, set: &ActionSet) -> Result<midcall::EgressPolicy, String> {
        egress_policy(set, self.allow_http, &self.allow_network)
    }

    /// A stack for `agents` with this policy and the `--ca-cert` roots.
    pub(crate) fn stack(
        &self,
        agents: midcall::config::Agents,
    ) -> Result<midcall::StackBuilder, String> {
        let policy = self.policy(agents.first())?;
        let mut builder = midcall::Stack::builder(agents).egress(policy);
        if let Some(path) = &self.ca_cert {
            let pem = std::fs::read(path).map_err(|e| format!("--ca-cert {path}: {e}"))?;
            builder = builder.add_roots_pem(format!("--ca-cert {path}"), pem);
        }
        Ok(builder)
    }
}

/// The agent file's egress policy, extended by `--allow-http` and `--allow-network` flags.
pub(crate) fn egress_policy(
    set: &ActionSet,
    allow_http: bool,
    allow_networks: &[String],
) -> Result<midcall::EgressPolicy, String> {
    let mut policy = set
        .egress()
        .policy()
        .allow_http(set.egress().allow_http || allow_http);
    for cidr in allow_networks {
        let net = midcall::config::parse_network(cidr).ok_or_else(|| {
            format!("--allow-network: \"{cidr}\" is not a CIDR such as 10.0.0.0/8")
        })?;
        policy = policy.allow_network(net);
    }
    Ok(policy)
}

/// A stack that could not be built, named by the flag at fault (`--db`, `--cache-url`).
pub(crate) fn stack_error(e: midcall::StackError) -> String {
    match e {
        midcall::StackError::Runtime(e) => format!("--db: {e}"),
        midcall::StackError::SharedCache(e) => format!("--cache-url: {e}"),
        e => e.to_string(),
    }
}

/// "1 delivery", "2 deliveries".
pub(crate) fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The shared cache tier for `--cache-url`, with the fleet's secret from
/// MIDCALL_SECRET_CACHE_KEY; an error names what is wrong.
pub(crate) fn shared_cache(
    url: Option<&str>,
    op_timeout: Option<std::time::Duration>,
) -> Result<Option<midcall::cache::SharedCacheConfig>, String> {
    let Some(url) = url else { return Ok(None) };
    use midcall::SecretSource;
    let secret = midcall::EnvSecrets.secret("CACHE_KEY").ok_or_else(|| {
        format!(
            "--cache-url {}: set MIDCALL_SECRET_CACHE_KEY to the fleet's cache secret (the same in every process, 16 bytes or more): it keys every shared cache key",
            midcall::cache::shared::redact(url)
        )
    })?;
    midcall::cache::SharedCacheConfig::new(url, secret)
        .map(|c| match op_timeout {
            Some(d) => Some(c.op_timeout(d)),
            None => Some(c),
        })
        .map_err(|e| format!("--cache-url {e}"))
}
