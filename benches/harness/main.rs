//! `midcall-bench`, the measurement harness behind `midcall bench` (which runs it with its own
//! flags): the action path against raw hyper, the soak, the fleet. Its own binary, so the
//! operator's binary carries no CPU hogs, copies of itself or bench data. Results are recorded
//! in `benches/results/`.

// The flags' doc comments are clap's help text: `[egress]` there is the agent file's table,
// not a link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::process::ExitCode;

use clap::Parser;

#[path = "../../src/cli/bench_args.rs"]
mod args;
// The queries in it are the micro-benchmarks'.
#[allow(dead_code)]
#[path = "../data.rs"]
mod data;
mod fleet;
#[path = "../../src/cli/measure.rs"]
mod measure;
mod scenarios;
mod soak;
#[path = "../../src/cli/table.rs"]
mod table;

/// The measurement harness of `midcall bench` (run `midcall bench --help` for the flags).
#[derive(Debug, Parser)]
#[command(name = "midcall bench", version)]
struct Harness {
    #[command(flatten)]
    args: args::BenchArgs,
}

fn main() -> ExitCode {
    // ring is the only rustls crypto provider midcall uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match scenarios::run(Harness::parse().args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
