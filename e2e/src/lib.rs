//! Kiln's end-to-end test harness: a real `wrangler dev` ([`TestEdge`]), real runner processes
//! ([`TestRunner`]), local bare git repositories as remotes ([`GitRemotes`]), a local fake of
//! GitHub's pulls endpoint ([`FakeGitHub`]), HTTP and WebSocket clients ([`Api`], [`WsClient`]) and
//! the stand-in agents the tests ship (`e2e/agents/`, see [`agents`]).
//!
//! Every process the harness starts runs in a process group of its own, which is killed when its
//! handle drops, and also by a watchdog when the test process dies without dropping it.
//!
//! ## The scripted model server
//!
//! [`model::ModelServer`] is the one local model of the project: the demo model `scripts/dev`
//! runs (binary `kiln-model-server`, `--listen ADDR --script FILE`, the demo script by default)
//! and the model every test points agent CLIs and LLM steps at. It speaks Anthropic Messages and
//! OpenAI chat completions (streamed or not, with usage and the vendors' error shapes) and answers
//! from a script: rules tried in order, the first whose `when` holds answers. A test writes
//! its own:
//!
//! ```no_run
//! let server = kiln_e2e::model::ModelServer::start(kiln_e2e::model::Script::from_value(serde_json::json!({
//!     "rules": [
//!         {"when": {"system": "requirements gatherer"}, "text": "What should it do?", "chunks": 4},
//!         {"when": {"prompt": "flaky"}, "error": {"status": 429, "retry_after": 1}, "fail_first": 2, "text": "ok"},
//!         {"when": {"iteration": 3}, "text": "<promise>DONE</promise>"},
//!         {"when": {"turn": 0}, "tool_calls": [{"name": "Write", "input": {"file_path": "{{cwd}}/a.txt", "content": "hi"}}]},
//!         {"text": "done"}
//!     ]
//! })).unwrap());
//! // ANTHROPIC_BASE_URL = server.url(), OPENAI_BASE_URL = server.openai_base_url();
//! // server.requests() is every request received, in order.
//! ```
//!
//! The whole format (conditions, replies, errors, stalls, templates) is in [`model`]'s docs.

pub mod agents;
pub mod app;
pub mod bench;
pub mod dashboard;
pub mod dev;
pub mod fake3d;
pub mod landing;
mod edge;
mod git;
mod github;
mod http;
pub mod model;
mod procs;
mod proxy;
mod runner;
mod ws;

pub use edge::{EdgeServer, TestEdge};
pub use git::GitRemotes;
pub use github::{CommentCall, FakeGitHub, PullRequestCall};
pub use http::{unique_email, Api, PASSWORD};
pub use procs::{tail, GroupChild};
pub use proxy::CutProxy;
pub use reqwest::{Method, StatusCode};
pub use runner::{runner_socket, HandRunner, RunnerSocket, TestRunner, HAND_WAIT};
pub use ws::{WsAuth, WsClient, WsRefused};

use std::path::PathBuf;

/// The repository root: `$KILN_ROOT` when set (scripts/lib.sh exports it), else this crate's parent.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("KILN_ROOT") {
        Some(root) if !root.is_empty() => PathBuf::from(root),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e/ has a parent").to_path_buf(),
    }
}

/// A value of the repository's `.dev.vars` (the development secrets `wrangler dev` loads).
pub fn dev_var(name: &str) -> String {
    let path = repo_root().join(".dev.vars");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    parse_dev_vars(&text)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("{name} is not set in {}", path.display()))
}

/// The service credential of seed 003, as configured for development.
pub fn agent_api_secret() -> String {
    dev_var("AGENT_API_SECRET")
}

/// The operator's token that buys runner tokens, as configured for development.
pub fn runner_registration_token() -> String {
    dev_var("RUNNER_REGISTRATION_TOKEN")
}

/// Parses dotenv-style `KEY=value` / `KEY="value"` lines; comments and blank lines are skipped.
pub fn parse_dev_vars(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let unquoted = v
                .strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), unquoted.to_string())
        })
        .collect()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// Polls `check` every 100 ms until it answers `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_vars_are_parsed_like_dotenv() {
        let vars = parse_dev_vars("# comment\nA=\"x y\"\n\nB=plain\nC='q'\n  D = spaced \n");
        let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("x y"));
        assert_eq!(get("B"), Some("plain"));
        assert_eq!(get("C"), Some("q"));
        assert_eq!(get("D"), Some("spaced"));
        assert_eq!(vars.len(), 4);
    }

    #[test]
    fn the_repository_dev_vars_hold_the_secrets_the_tests_use() {
        assert!(!agent_api_secret().is_empty());
        assert!(!runner_registration_token().is_empty());
    }
}
