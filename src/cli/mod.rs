//! One module per command. Each returns `Ok(exit code)` or `Err(message)` (exit 2).

pub(crate) mod bench;
pub(crate) mod check;
pub(crate) mod deliveries;
pub(crate) mod exec;
pub(crate) mod jsonpath;
pub(crate) mod render;
pub(crate) mod runs;
pub(crate) mod serve;
pub(crate) mod simulate;
pub(crate) mod tools;

use std::io::Read;

use midcall::ActionSet;

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

/// The agent file's egress policy, extended by `--allow-http` and `--allow-network` flags.
pub(crate) fn egress_policy(
    set: &ActionSet,
    allow_http: bool,
    allow_networks: &[String],
) -> Result<midcall::EgressPolicy, String> {
    let mut policy = midcall::EgressPolicy::from_config(set.egress())
        .allow_http(set.egress().allow_http || allow_http);
    for cidr in allow_networks {
        let net = cidr
            .parse::<ipnet::IpNet>()
            .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| format!("--allow-network: \"{cidr}\" is not a CIDR such as 10.0.0.0/8"))?;
        policy = policy.allow_network(net);
    }
    Ok(policy)
}
