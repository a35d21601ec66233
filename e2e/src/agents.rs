//! The stand-in agents the tests ship (`e2e/agents/*.sh`, plain POSIX sh that busybox runs): how to
//! mount them into job containers and the command lines that run them.

use std::path::PathBuf;

/// Edits files in the workspace each run; prints the completion promise (`$COMPLETION_PROMISE`,
/// default `RALPH_COMPLETE`) from its third iteration (`$ITERATION`) on.
pub const EDITOR: &str = "editor.sh";
/// Prints to stdout and stderr, then exits 1.
pub const FAILING: &str = "fail.sh";
/// Prints one line, then sleeps forever.
pub const HANGING: &str = "hang.sh";
/// Prints one line and exits 0 without reading its input.
pub const NOOP: &str = "noop.sh";
/// Interactive: answers every line of stdin with `echo: <line>` until stdin closes.
pub const ECHO: &str = "echo.sh";

/// Where the agents are inside job containers.
pub const CONTAINER_DIR: &str = "/kiln/agents";

/// `e2e/agents` on the host.
pub fn dir() -> PathBuf {
    crate::repo_root().join("e2e/agents")
}

/// The `RUNNER_MOUNTS` entry that makes the agents visible in job containers (read-only).
pub fn docker_mount() -> String {
    format!("{}:{CONTAINER_DIR}:ro", dir().display())
}

/// `RUNNER_AGENT_CMD` for the Docker executor.
pub fn docker_cmd(agent: &str) -> String {
    format!("sh {CONTAINER_DIR}/{agent}")
}

/// `RUNNER_AGENT_CMD` for the process executor.
pub fn process_cmd(agent: &str) -> String {
    format!("sh {}/{agent}", dir().display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_agent_exists_and_is_executable() {
        use std::os::unix::fs::PermissionsExt;
        for agent in [EDITOR, FAILING, HANGING, NOOP, ECHO] {
            let meta = std::fs::metadata(dir().join(agent)).unwrap_or_else(|e| panic!("{agent}: {e}"));
            assert!(meta.permissions().mode() & 0o111 != 0, "{agent} is not executable");
        }
    }
}
