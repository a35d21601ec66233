//! `scripts/dev` as a newcomer runs it, for the tests that walk the README on it: no
//! configuration but its ports and state directories (so a test never meets a developer's
//! running Kiln), none of the test process's RUNNER_* or vendor variables, and ready once its
//! runner is connected to its edge.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{free_port, repo_root, tail, GroupChild};

pub struct DevScript {
    /// The edge's port.
    pub port: u16,
    /// The runner's health API.
    pub health: String,
    pub log: PathBuf,
    child: GroupChild,
    dir: tempfile::TempDir,
}

impl DevScript {
    /// Starts `scripts/dev` (it builds what it needs in release mode) and waits until its runner is
    /// connected, asserting the runner talks to the demo model.
    pub async fn start(name: &str) -> DevScript {
        let dir = tempfile::Builder::new().prefix(&format!("kiln-{name}-")).tempdir().unwrap();
        let (port, model_port, fake3d_port, runner_port) = (free_port(), free_port(), free_port(), free_port());
        let mut cmd = Command::new(repo_root().join("scripts/dev"));
        cmd.current_dir(repo_root())
            .env("KILN_PORT", port.to_string())
            .env("KILN_MODEL_PORT", model_port.to_string())
            .env("KILN_FAKE3D_PORT", fake3d_port.to_string())
            .env("KILN_STATE", dir.path().join("state"))
            .env("KILN_DEV_DIR", dir.path().join("dev"))
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
        let health = format!("http://127.0.0.1:{runner_port}/health");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1200);
        loop {
            if let Some(status) = child.exited() {
                panic!("scripts/dev exited with {status}; its output:\n{}", tail(&log, 8000));
            }
            if let Ok(resp) = http.get(&health).send().await {
                if let Ok(body) = resp.json::<serde_json::Value>().await {
                    if body["edge"]["connected"] == true {
                        assert_eq!(body["agent"]["demoModel"], true, "{body}");
                        break;
                    }
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "scripts/dev did not get ready; its output:\n{}", tail(&log, 8000));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        DevScript { port, health, log, child, dir }
    }

    /// A directory of its own for files a walk writes.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Runs `script` (a README block, its `127.0.0.1:8787` turned into this edge's address) with
    /// `bash -euo pipefail` in `cwd`, within `timeout`; asserts it succeeded and answers its
    /// stdout, and a context for messages (its stderr and the script's log).
    pub async fn run(&self, script: &str, cwd: &std::path::Path, timeout: Duration) -> (String, impl Fn() -> String) {
        let script = script.replace("127.0.0.1:8787", &format!("127.0.0.1:{}", self.port));
        let out = tokio::time::timeout(
            timeout,
            tokio::process::Command::new("bash").args(["-euo", "pipefail", "-c", &script]).current_dir(cwd).output(),
        )
        .await
        .unwrap_or_else(|_| panic!("the README's commands did not finish within {timeout:?}"))
        .expect("running bash");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let log = self.log.clone();
        let out_copy = stdout.clone();
        let context = move || format!("stdout:\n{out_copy}\nstderr:\n{stderr}\nscripts/dev:\n{}", tail(&log, 4000));
        assert!(out.status.success(), "the README's commands failed ({}):\n{}", out.status, context());
        (stdout, context)
    }

    /// Stops it (Ctrl-C's way) and asserts the runner stopped with it.
    pub async fn stop(mut self) {
        self.child.terminate(Duration::from_secs(30));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        assert!(http.get(&self.health).send().await.is_err(), "the runner stopped with scripts/dev");
    }
}
