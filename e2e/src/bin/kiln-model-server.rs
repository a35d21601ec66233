//! `kiln-model-server`: the scripted local model server (Anthropic Messages and OpenAI chat
//! completions), the demo model `scripts/dev` runs when no vendor key is set. The script format is
//! documented in `kiln_e2e::model`.
//!
//! Prints `kiln-model-server listening on http://ADDR (script: …)` on stdout once it accepts
//! connections, then a line per request on stderr (unless `--quiet`); runs until killed.
//! `GET /_kiln/requests` is the full request log.

use std::path::PathBuf;

use clap::Parser;
use kiln_e2e::model::{self, Script};

/// The scripted local model server: Anthropic Messages (`/v1/messages`) and OpenAI chat
/// completions (`/v1/chat/completions`) answered from a script; the demo model when no script is
/// given. Request log: GET /_kiln/requests.
#[derive(Parser)]
#[command(name = "kiln-model-server", version)]
struct Args {
    /// The address to listen on (port 0: any free port; the line printed says which).
    #[arg(long, env = "KILN_MODEL_LISTEN", default_value = "127.0.0.1:0")]
    listen: String,
    /// A script (JSON); the built-in demo script when absent.
    #[arg(long, env = "KILN_MODEL_SCRIPT")]
    script: Option<PathBuf>,
    /// Print the demo script and exit.
    #[arg(long)]
    print_demo: bool,
    /// No line per request on stderr.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_demo {
        print!("{}", model::DEMO_JSON);
        return Ok(());
    }
    let (script, label) = match &args.script {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading the script {}: {e}", path.display()))?;
            let script = Script::parse(&text)
                .map_err(|e| anyhow::anyhow!("the script {}: {e:#}", path.display()))?;
            (script, path.display().to_string())
        }
        None => (Script::demo(), "demo".to_string()),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("kiln-model-server listening on http://{addr} (script: {label})");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    model::serve(listener, script, !args.quiet, shutdown).await?;
    Ok(())
}
