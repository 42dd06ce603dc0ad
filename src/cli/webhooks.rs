//! `midcall webhooks`: the ed25519 keys of event webhooks.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::json;

/// Ed25519 keys for event webhooks' `v1a` signatures.
///
/// `public-key` prints the public key of every webhook with a `signing_key` (its secret read
/// from MIDCALL_SECRET_<NAME>), for receivers that verify `v1a` signatures; `generate-key`
/// makes a new key pair.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  midcall webhooks generate-key\n  MIDCALL_SECRET_WEBHOOK_KEY=whsk_... midcall webhooks public-key agents/"
)]
pub(crate) struct WebhooksArgs {
    #[command(subcommand)]
    command: WebhooksCommand,
}

#[derive(Debug, Subcommand)]
enum WebhooksCommand {
    /// Print each signing webhook's public key (whpk_...).
    PublicKey {
        /// Agent files or directories of them.
        #[arg(required = true)]
        files: Vec<String>,
        /// One JSON object per webhook.
        #[arg(long)]
        json: bool,
    },
    /// Make a new ed25519 key pair: put the whsk_ secret in a secret, give receivers the whpk_.
    GenerateKey {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(a: WebhooksArgs) -> Result<ExitCode, String> {
    match a.command {
        WebhooksCommand::GenerateKey { json } => {
            let (secret, public) =
                midcall::events::signing::generate_key().map_err(|e| e.to_string())?;
            if json {
                println!("{}", json!({"secret_key": secret, "public_key": public}));
            } else {
                println!(
                    "secret key (keep it in a secret, e.g. MIDCALL_SECRET_WEBHOOK_KEY): {secret}"
                );
                println!("public key (give it to receivers):                            {public}");
            }
            Ok(ExitCode::SUCCESS)
        }
        WebhooksCommand::PublicKey { files, json } => {
            let files = super::agents::expand(&files)?;
            let mut table =
                super::Table::new(&[("AGENT", false), ("WEBHOOK", false), ("PUBLIC KEY", false)]);
            let mut failed = false;
            let mut any = false;
            for path in &files.paths {
                let set = midcall::ActionSet::load(path).map_err(|e| e.to_string())?;
                for (i, w) in set.webhooks().iter().enumerate() {
                    let Some(key) = &w.signing_key else { continue };
                    any = true;
                    let label = w
                        .label
                        .clone()
                        .unwrap_or_else(|| format!("webhook {}", i + 1));
                    let public =
                        midcall::events::signing::public_key_from(key, &midcall::EnvSecrets);
                    if json {
                        match &public {
                            Ok(k) => println!(
                                "{}",
                                json!({"agent": set.agent().id, "webhook": label, "public_key": k})
                            ),
                            Err(e) => println!(
                                "{}",
                                json!({"agent": set.agent().id, "webhook": label, "error": e.to_string()})
                            ),
                        }
                    } else {
                        table.row(vec![
                            set.agent().id.clone(),
                            label,
                            public.clone().unwrap_or_else(|e| format!("error: {e}")),
                        ]);
                    }
                    failed |= public.is_err();
                }
            }
            if !json {
                if any {
                    print!("{}", table.render());
                } else {
                    println!("no webhook has a signing_key (add signing_key = \"{{{{secrets.NAME}}}}\" to a [[webhooks]] entry)");
                }
            }
            Ok(if failed {
                ExitCode::from(super::EXIT_BAD_INPUT)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
