//! Reading what the user types: prompts on stderr, passwords without echo, text from stdin or files.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::Path;

use anyhow::{bail, Context};
use nix::sys::termios::{self, LocalFlags, SetArg};

/// Asks `question` on stderr and reads one line from the terminal.
pub fn ask(question: &str) -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!("{} is needed and stdin is not a terminal to ask on", question.trim_end_matches(": "));
    }
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading stdin")?;
    Ok(line.trim().to_string())
}

/// Asks for a password on stderr and reads it from the terminal without echo.
pub fn ask_password(question: &str) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("a password is needed: pass --password-stdin (or --password), or run in a terminal");
    }
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let saved = termios::tcgetattr(&stdin).context("reading the terminal's settings")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    termios::tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("turning echo off")?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = termios::tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    eprintln!();
    read.context("reading the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// The first line of stdin (for `--password-stdin`), without its line ending.
pub fn first_line_of_stdin() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading stdin")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// All of stdin as text.
pub fn all_of_stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).context("reading stdin")?;
    Ok(s)
}

/// A file's text, or stdin's for `-`.
pub fn text_of(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        return all_of_stdin();
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
