//! `midcall jsonpath`: run an RFC 9535 query on a JSON document.

use std::process::ExitCode;

use clap::Args;

use midcall::Query;

/// Run a JSONPath (RFC 9535) query on a JSON document.
///
/// Run a JSONPath (RFC 9535) query on a JSON document from FILE or stdin and print the node
/// list as a JSON array (or the normalized paths with --paths).
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  echo '{\"data\":{\"customer\":{\"name\":\"Ada\"}}}' | midcall jsonpath '$.data.customer.name'\n  midcall jsonpath --paths '$..price' store.json"
)]
pub(crate) struct JsonpathArgs {
    /// The query, e.g. `$.data.items[?@.price < 10].name`.
    query: String,
    /// The JSON document; stdin when absent or `-`.
    file: Option<String>,
    /// Print normalized paths (`$['data']['items'][0]`) instead of values.
    #[arg(long)]
    paths: bool,
}

pub(crate) fn run(args: JsonpathArgs) -> Result<ExitCode, String> {
    let query = Query::compile(&args.query).map_err(|e| format!("{:?}: {e}", args.query))?;
    let text = super::read_input(args.file.as_deref())?;
    let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: not valid JSON: {e}",
            args.file.as_deref().unwrap_or("stdin")
        )
    })?;
    let out = if args.paths {
        serde_json::to_string_pretty(&query.select_paths(&doc))
    } else {
        serde_json::to_string_pretty(&query.select(&doc))
    }
    .map_err(|e| e.to_string())?;
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}
