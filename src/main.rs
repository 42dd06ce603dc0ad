//! The `midcall` command: thin entry that parses arguments, installs the TLS provider and
//! dispatches to one file per command under `src/cli/`.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// midcall: the runtime that lets voice AI agents act on the world during a live phone call.
#[derive(Debug, Parser)]
#[command(name = "midcall", version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Simulate(cli::simulate::SimulateArgs),
    Check(cli::check::CheckArgs),
    Tools(cli::tools::ToolsArgs),
    Jsonpath(cli::jsonpath::JsonpathArgs),
    Render(cli::render::RenderArgs),
    Exec(cli::exec::ExecArgs),
    Bench(cli::bench::BenchArgs),
    Deliveries(cli::deliveries::DeliveriesArgs),
    Serve(cli::serve::ServeArgs),
    Runs(cli::runs::RunsArgs),
    Webhooks(cli::webhooks::WebhooksArgs),
}

fn main() -> ExitCode {
    // ring is the only rustls crypto provider midcall uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let result = match args.command {
        Command::Simulate(a) => cli::simulate::run(a),
        Command::Check(a) => cli::check::run(a),
        Command::Tools(a) => cli::tools::run(a),
        Command::Jsonpath(a) => cli::jsonpath::run(a),
        Command::Render(a) => cli::render::run(a),
        Command::Exec(a) => cli::exec::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Deliveries(a) => cli::deliveries::run(a),
        Command::Serve(a) => {
            // The exporter is the binary's: the library only records metrics.
            let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .ok()
                .map(|h| std::sync::Arc::new(move || h.render()) as midcall::server::MetricsRender);
            cli::serve::run(a, metrics)
        }
        Command::Runs(a) => cli::runs::run(a),
        Command::Webhooks(a) => cli::webhooks::run(a),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            // Every line of it, so several problems read as several errors.
            for line in message.lines() {
                eprintln!("error: {line}");
            }
            ExitCode::from(2)
        }
    }
}
