//! `midcall tools`: the tool definitions a model is given.

use std::process::ExitCode;

use clap::{Args, ValueEnum};

use midcall::Format;

/// Print the agent's tool definitions as JSON, for OpenAI or Anthropic.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  midcall tools examples/front-desk/agent.toml --format anthropic"
)]
pub(crate) struct ToolsArgs {
    /// The agent file.
    file: String,
    /// The provider's format.
    #[arg(long, value_enum, default_value_t = ToolFormat::Openai)]
    format: ToolFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ToolFormat {
    Openai,
    Anthropic,
}

pub(crate) fn run(args: ToolsArgs) -> Result<ExitCode, String> {
    let set = super::load(&args.file)?;
    let format = match args.format {
        ToolFormat::Openai => Format::OpenAi,
        ToolFormat::Anthropic => Format::Anthropic,
    };
    let out =
        serde_json::to_string_pretty(&set.tool_definitions(format)).map_err(|e| e.to_string())?;
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}
