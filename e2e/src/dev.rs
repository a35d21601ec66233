//! [`DevKiln`]: the real `scripts/dev` as a newcomer starts it (no configuration), on its own
//! ports and state directories so a test never meets a developer's running Kiln, and the README's
//! shell blocks run against it as written.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::{free_port, repo_root, tail, GroupChild};

/// The first ```sh block after the README's heading `heading` (e.g. `## Using it`).
pub fn readme_block(heading: &str) -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("reading README.md");
    let section = &readme[readme.find(heading).unwrap_or_else(|| panic!("README.md has a {heading:?} section"))..];
    let start = section.find("```sh\n").unwrap_or_else(|| panic!("{heading:?} has a ```sh block")) + "```sh\n".len();
    let end = start + section[start..].find("```").expect("the block ends");
    section[start..end].to_string()
}

/// `scripts/dev`, started and ready (its runner connected to its edge).
pub struct DevKiln {
    pub dir: TempDir,
    /// The edge's port.
    pub port: u16,
    /// `KILN_DEV_DIR`: the demo remote (`remotes/`), runner state and logs.
    pub dev_dir: PathBuf,
    /// The runner's `/health`.
    pub runner_health: String,
    /// Its output.
    pub log: PathBuf,
    pub child: GroupChild,
    pub http: reqwest::Client,
}

impl DevKiln {
    /// Starts `scripts/dev` (builds included: a cold machine takes minutes) and waits until its
    /// runner, named `name`, is connected; answers it with the runner's `/health`.
    pub async fn start(name: &str) -> (DevKiln, Value) {
        let dir = tempfile::Builder::new().prefix(&format!("kiln-{name}-")).tempdir().unwrap();
        let dev_dir = dir.path().join("dev");
        let (port, model_port, fake3d_port, runner_port) = (free_port(), free_port(), free_port(), free_port());
        let mut cmd = Command::new(repo_root().join("scripts/dev"));
        cmd.current_dir(repo_root())
            .env("KILN_PORT", port.to_string())
            .env("KILN_MODEL_PORT", model_port.to_string())
            .env("KILN_FAKE3D_PORT", fake3d_port.to_string())
            .env("KILN_STATE", dir.path().join("state"))
            .env("KILN_DEV_DIR", &dev_dir)
            .env("RUNNER_LISTEN", format!("127.0.0.1:{runner_port}"))
            .env("RUNNER_NAME", name);
        // A newcomer has none of these; the test process may.
        for (key, _) in std::env::vars() {
            if key.starts_with("RUNNER_") && key != "RUNNER_LISTEN" && key != "RUNNER_NAME"
                || ["GITHUB_TOKEN", "ANTHROPIC_API_KEY", "OPENAI_API_KEY", "TRIPO_API_KEY", "MAX_CONCURRENT_JOBS", "REPOS_DIR", "WORKTREES_DIR"]
                    .contains(&key.as_str())
            {
                cmd.env_remove(&key);
            }
        }
        let log = dir.path().join("dev.log");
        let mut child = GroupChild::spawn("scripts/dev", cmd, &log, None).unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let runner_health = format!("http://127.0.0.1:{runner_port}/health");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1200);
        let health = loop {
            if let Some(status) = child.exited() {
                panic!("scripts/dev exited with {status}; its output:\n{}", tail(&log, 8000));
            }
            if let Ok(resp) = http.get(&runner_health).send().await {
                if let Ok(body) = resp.json::<Value>().await {
                    if body["edge"]["connected"] == true {
                        break body;
                    }
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "scripts/dev did not get ready; its output:\n{}", tail(&log, 8000));
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        (DevKiln { dir, port, dev_dir, runner_health, log, child, http }, health)
    }

    /// The edge's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs a README block with `bash -euo pipefail` from the repository's root, its edge address
    /// and demo remote pointed at this Kiln's (`what` names it in failures); answers its stdout, asserting success
    /// within `timeout`.
    pub async fn run_block(&self, block: &str, timeout: Duration, what: &str) -> String {
        self.run_block_in(block, &repo_root(), timeout, what).await
    }

    /// [`DevKiln::run_block`] from `cwd` (for a walk that writes files).
    pub async fn run_block_in(&self, block: &str, cwd: &std::path::Path, timeout: Duration, what: &str) -> String {
        let script = block
            .replace("127.0.0.1:8787", &format!("127.0.0.1:{}", self.port))
            .replace(".kiln/remotes", &self.dev_dir.join("remotes").display().to_string());
        let out = tokio::time::timeout(
            timeout,
            tokio::process::Command::new("bash").args(["-euo", "pipefail", "-c", &script]).current_dir(cwd).output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {timeout:?}; scripts/dev:\n{}", tail(&self.log, 4000)))
        .expect("running bash");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{what} failed ({}):\n{}", out.status, self.context(&stdout, &String::from_utf8_lossy(&out.stderr)));
        stdout
    }

    /// A failure's context: the block's output and the end of `scripts/dev`'s.
    pub fn context(&self, stdout: &str, stderr: &str) -> String {
        format!("stdout:\n{stdout}\nstderr:\n{stderr}\nscripts/dev:\n{}", tail(&self.log, 4000))
    }

    /// Stops it as a user does (Ctrl-C to the group); asserts that its runner went with it.
    pub async fn stop(mut self) {
        self.child.terminate(Duration::from_secs(30));
        assert!(self.http.get(&self.runner_health).send().await.is_err(), "the runner stopped with scripts/dev:\n{}", tail(&self.log, 4000));
    }
}
