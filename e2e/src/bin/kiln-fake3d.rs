//! `kiln-fake3d`: Kiln's demo text-to-3D vendor and WordPress site on one address, the fakes of
//! `kiln_e2e::fake3d` that `scripts/dev` runs when no vendor key is set, so that a 3D pipeline
//! runs offline. Not a model generator: it answers every prompt with one of three fixed GLB files
//! (a valid one; `[faces]` in the prompt serves one over the face limit, `[texture]` one with a
//! broken texture; `[fail]`, `[slow]` and `[vendor-error]` act out the vendor's failures).
//!
//! Prints `kiln-fake3d listening on http://ADDR` on stdout once it accepts connections, then a
//! line per request on stderr (unless `--quiet`); runs until killed.

use clap::Parser;
use kiln_e2e::fake3d::Demo3d;

/// The demo text-to-3D vendor (Tripo3D's task API: POST /v2/openapi/task, GET
/// /v2/openapi/task/ID) and WordPress media endpoint (POST /wp-json/wp/v2/media) on one address.
#[derive(Parser)]
#[command(name = "kiln-fake3d", version)]
struct Args {
    /// The address to listen on (port 0: any free port; the line printed says which).
    #[arg(long, env = "KILN_FAKE3D_LISTEN", default_value = "127.0.0.1:0")]
    listen: String,
    /// The vendor API key callers must send (Bearer).
    #[arg(long, env = "KILN_FAKE3D_KEY", default_value = "kiln-demo")]
    key: String,
    /// The WordPress user uploads must authenticate as.
    #[arg(long, env = "KILN_FAKE3D_WP_USER", default_value = "kiln")]
    wordpress_user: String,
    /// That user's application password.
    #[arg(long, env = "KILN_FAKE3D_WP_PASSWORD", default_value = "kiln-demo")]
    wordpress_password: String,
    /// No line per request on stderr.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = std::net::TcpListener::bind(&args.listen)
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?;
    let demo = Demo3d::start(
        listener,
        &args.key,
        &args.wordpress_user,
        &args.wordpress_password,
        args.quiet,
    )?;
    println!(
        "kiln-fake3d listening on {} (the demo 3D vendor and WordPress)",
        demo.url()
    );
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let _ = tokio::signal::ctrl_c().await;
    drop(demo);
    Ok(())
}
