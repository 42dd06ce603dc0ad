//! `midcall bench`: with `--actions`, your own action against its real endpoint, run here; every
//! other mode (the action path against raw hyper, the soak, the fleet) is the measurement
//! harness, a binary of its own (`midcall-bench`, built from `benches/harness`), which this
//! command runs with the same flags.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use midcall::exec::Budget;
use midcall::{Call, Runtime, ToolCall};

pub(crate) use super::bench_args::BenchArgs;
use super::measure::{batch, call_info, machine, Series};

pub(crate) fn run(a: BenchArgs) -> Result<ExitCode, String> {
    let Some(file) = a.actions.clone() else {
        return harness();
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(user_action(&a, &file))
}

/// Runs `midcall-bench` (beside this binary) with this command's flags, and exits as it does.
fn harness() -> Result<ExitCode, String> {
    let me = std::env::current_exe().map_err(|e| format!("bench: {e}"))?;
    let exe = me.with_file_name(format!("midcall-bench{}", std::env::consts::EXE_SUFFIX));
    if !exe.is_file() {
        return Err(format!(
            "bench: the measurement harness {} is not built; build it with `cargo build --release --bin midcall-bench` (or bench your own action with --actions)",
            exe.display()
        ));
    }
    // `midcall bench FLAGS…`: the subcommand is the first argument (there are no global flags).
    let flags: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
    let status = std::process::Command::new(&exe)
        .args(flags)
        .status()
        .map_err(|e| format!("bench: {}: {e}", exe.display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

async fn user_action(a: &BenchArgs, file: &str) -> Result<ExitCode, String> {
    let set = super::load(file)?;
    let name = a.action.as_deref().unwrap_or_default();
    let action = set
        .action(name)
        .cloned()
        .ok_or_else(|| format!("no action \"{name}\" in {file}"))?;
    let args = super::parse_json("--args", &a.args)?;
    let policy = super::egress_policy(&set, a.allow_http, &a.allow_network)?;
    let runtime = Runtime::builder()
        .egress(policy)
        .pool_max_idle_per_host((a.concurrency as usize).max(32))
        .dedupe_window(Duration::ZERO)
        .build()?;
    runtime.warm(&set, Duration::from_secs(5)).await;
    let statuses = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        usize,
    >::new()));
    let (st, rt2) = (statuses.clone(), runtime.clone());
    let conc = a.concurrency as usize;
    let (lat, busy) = batch(conc, a.requests as usize, move |i| {
        let (rt, action, args, st) = (rt2.clone(), action.clone(), args.clone(), st.clone());
        async move {
            // One call, many distinct tool calls: the cache applies, replays do not.
            let mut call = Call::new(call_info(i % conc));
            let o = rt
                .execute(
                    &action,
                    &mut call,
                    ToolCall::new(format!("b{i}"), args),
                    &Budget::new(Duration::from_secs(60)),
                )
                .await;
            let key = format!("{}/{}", o.status.as_str(), o.cache.as_str());
            if let Ok(mut m) = st.lock() {
                *m.entry(key).or_default() += 1;
            }
            true
        }
    })
    .await;
    let mut lat = lat;
    lat.sort_unstable();
    let s = Series {
        name: name.to_string(),
        concurrency: conc,
        lat_ns: lat,
        busy,
    };
    println!(
        "{:<18} {:>5} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "action", "conc", "requests", "p50 µs", "p90 µs", "p99 µs", "p999 µs", "req/s"
    );
    println!("{}", s.row());
    let m = statuses.lock().map(|m| m.clone()).unwrap_or_default();
    println!("outcomes (status/cache): {m:?}");
    if let Some(f) = &a.json {
        let doc =
            json!({"scenarios": [s.to_json(None, None)], "outcomes": m, "machine": machine()});
        std::fs::write(
            f,
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("{f}: {e}"))?;
    }
    Ok(ExitCode::SUCCESS)
}
