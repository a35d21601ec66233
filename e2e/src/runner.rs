//! [`TestRunner`]: the real `runner` binary (target/debug/runner) connected to a [`TestEdge`],
//! with its own repositories and worktrees directories.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;

use crate::procs::{tail, GroupChild};
use crate::{free_port, repo_root, runner_registration_token, TestEdge};

/// Inherited variables that would change how a runner behaves; tests set what they need.
const SCRUBBED_PREFIXES: &[&str] = &["RUNNER_", "GITHUB_"];
const SCRUBBED: &[&str] = &["MAX_CONCURRENT_JOBS", "REPOS_DIR", "WORKTREES_DIR"];

pub struct TestRunner {
    proc: Option<GroupChild>,
    dir: TempDir,
    listen_port: u16,
}

impl TestRunner {
    /// The runner binary next to this test binary (`<target>/debug/runner`), or `$KILN_RUNNER_BIN`.
    pub fn binary() -> anyhow::Result<PathBuf> {
        if let Some(p) = std::env::var_os("KILN_RUNNER_BIN") {
            return Ok(PathBuf::from(p));
        }
        // Test binaries live in <target>/<profile>/deps/, benchmark binaries in <target>/<profile>/.
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("locating the target directory")?;
        let profile_dir = if dir.ends_with("deps") { dir.parent().context("locating the target directory")? } else { dir };
        let bin = profile_dir.join("runner");
        if !bin.exists() {
            bail!("{} is missing: build it with `cargo build -p kiln-runner` (scripts/test does)", bin.display());
        }
        Ok(bin)
    }

    /// Starts a runner against `edge` with the registration token from `.dev.vars`, its health API
    /// on a free port, `REPOS_DIR`/`WORKTREES_DIR` in a temporary directory and `DOCKER_HOST`
    /// passed through (the repository's private dockerd when unset); `env` adds or overrides
    /// variables (name `RUNNER_EXECUTOR`: the runner refuses to start without Docker unless it is
    /// `process`, and process-executor commands see only what `RUNNER_AGENT_ENV` passes of its
    /// environment). Waits until the runner's own `/health` answers.
    pub async fn start(edge: &TestEdge, env: &[(&str, &str)]) -> anyhow::Result<TestRunner> {
        let bin = Self::binary()?;
        let dir = tempfile::Builder::new().prefix("kiln-runner-").tempdir()?;
        let listen_port = free_port();
        let repos = dir.path().join("repos");
        let worktrees = dir.path().join("worktrees");
        std::fs::create_dir_all(&repos)?;
        std::fs::create_dir_all(&worktrees)?;

        let mut cmd = Command::new(&bin);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if SCRUBBED_PREFIXES.iter().any(|p| k.starts_with(p)) || SCRUBBED.contains(&k.as_ref()) {
                cmd.env_remove(k.as_ref());
            }
        }
        cmd.current_dir(dir.path())
            .env("RUNNER_EDGE_URL", edge.url())
            .env("RUNNER_REGISTRATION_TOKEN", runner_registration_token())
            .env("RUNNER_LISTEN", format!("127.0.0.1:{listen_port}"))
            .env("REPOS_DIR", &repos)
            .env("WORKTREES_DIR", &worktrees)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        if std::env::var_os("DOCKER_HOST").is_none() {
            let sock = repo_root().join(".kiln/docker/docker.sock");
            if sock.exists() {
                cmd.env("DOCKER_HOST", format!("unix://{}", sock.display()));
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }

        let log = dir.path().join("runner.log");
        let mut proc = GroupChild::spawn("runner", cmd, &log, Some(dir.path()))?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let health = format!("http://127.0.0.1:{listen_port}/health");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.exited() {
                bail!("the runner exited with {status}; its log:\n{}", tail(&log, 8000));
            }
            if http.get(&health).send().await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                proc.terminate(Duration::from_secs(5));
                bail!("the runner's {health} did not answer within 30 s; its log:\n{}", tail(&log, 8000));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(TestRunner { proc: Some(proc), dir, listen_port })
    }

    /// The runner process's id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(GroupChild::pid)
    }

    /// The runner's own health API.
    pub fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/health", self.listen_port)
    }

    pub fn repos_dir(&self) -> PathBuf {
        self.dir.path().join("repos")
    }

    pub fn worktrees_dir(&self) -> PathBuf {
        self.dir.path().join("worktrees")
    }

    /// The runner's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("runner.log")).unwrap_or_default()
    }

    /// SIGKILL to the runner and everything it spawned: a runner that vanishes mid-job.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// A graceful stop: SIGTERM, SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
    }
}

impl Drop for TestRunner {
    fn drop(&mut self) {
        self.stop();
    }
}
