//! `kiln`: Kiln's command line. Parses the command line, runs the command, and turns the outcome
//! into an exit status: a followed job's end state (0 completed, 1 failed, 2 cancelled), 3 for any
//! other error (`kiln: error: ...` on stderr), 64 for bad usage and 130 when following is
//! interrupted with Ctrl-C (the job goes on).

mod args;
mod client;
mod commands;
mod config;
mod follow;
mod input;
mod render;
mod submit;

use clap::error::ErrorKind;
use clap::Parser;

/// Any failure other than a followed job's end state.
pub const EXIT_ERROR: i32 = 3;
/// Bad usage: unknown flags, missing arguments (sysexits' EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

fn main() {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                print!("{e}");
                std::process::exit(0);
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                eprint!("{e}");
                std::process::exit(EXIT_USAGE);
            }
            _ => {
                eprint!("kiln: {e}");
                std::process::exit(EXIT_USAGE);
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: error: starting the async runtime: {e}");
            std::process::exit(EXIT_ERROR);
        }
    };
    let code = match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            EXIT_ERROR
        }
    };
    std::process::exit(code);
}
