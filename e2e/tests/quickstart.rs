//! A newcomer's first five minutes, as the README tells them: `scripts/dev` with no configuration,
//! then the shell block of the README's "Using it" section exactly as written (only the port and
//! the directory `scripts/dev` keeps its state in differ, so this test never meets a developer's
//! running Kiln). The job must complete: the real Claude Code CLI in the agent image, on the demo
//! model, edits the demo repository, and the local remote holds the branch with its commit.
//!
//! This runs the real script: it builds what it needs in release mode (the first run on a machine
//! takes minutes), starts its own edge, demo model and runner, and is stopped like a user stops it.

use std::process::Command;
use std::time::Duration;

use kiln_e2e::{free_port, repo_root, tail, GroupChild};

/// The first ```sh block after `## Using it`.
fn readme_example() -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("reading README.md");
    let section = &readme[readme.find("## Using it").expect("README.md has a \"Using it\" section")..];
    let start = section.find("```sh\n").expect("\"Using it\" has a ```sh block") + "```sh\n".len();
    let end = start + section[start..].find("```").expect("the block ends");
    section[start..end].to_string()
}

#[tokio::test]
async fn the_readme_example_completes_on_scripts_dev_with_no_configuration() {
    let example = readme_example();
    assert!(
        example.contains(r#"'{"githubOrg":"acme","githubRepo":"shop","prompt":"Add a logout button","branchName":"feature/logout"}'"#),
        "the README's example job changed; this test checks what it promises:\n{example}"
    );

    let dir = tempfile::Builder::new().prefix("kiln-quickstart-").tempdir().unwrap();
    let dev_dir = dir.path().join("dev");
    let (port, model_port, runner_port) = (free_port(), free_port(), free_port());
    let mut cmd = Command::new(repo_root().join("scripts/dev"));
    cmd.current_dir(repo_root())
        .env("KILN_PORT", port.to_string())
        .env("KILN_MODEL_PORT", model_port.to_string())
        .env("KILN_FAKE3D_PORT", free_port().to_string())
        .env("KILN_STATE", dir.path().join("state"))
        .env("KILN_DEV_DIR", &dev_dir)
        .env("RUNNER_LISTEN", format!("127.0.0.1:{runner_port}"))
        .env("RUNNER_NAME", "quickstart");
    // A newcomer has none of these; the test process may.
    for (key, _) in std::env::vars() {
        if key.starts_with("RUNNER_") && key != "RUNNER_LISTEN" && key != "RUNNER_NAME"
            || ["GITHUB_TOKEN", "ANTHROPIC_API_KEY", "OPENAI_API_KEY", "MAX_CONCURRENT_JOBS", "REPOS_DIR", "WORKTREES_DIR"]
                .contains(&key.as_str())
        {
            cmd.env_remove(&key);
        }
    }
    let log = dir.path().join("dev.log");
    let mut dev = GroupChild::spawn("scripts/dev", cmd, &log, None).unwrap();

    // Ready when the runner it started is connected to the edge: builds included, a cold machine
    // takes minutes.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let health = format!("http://127.0.0.1:{runner_port}/health");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1200);
    loop {
        if let Some(status) = dev.exited() {
            panic!("scripts/dev exited with {status}; its output:\n{}", tail(&log, 8000));
        }
        if let Ok(resp) = http.get(&health).send().await {
            if let Ok(body) = resp.json::<serde_json::Value>().await {
                if body["edge"]["connected"] == true {
                    assert_eq!(body["agent"]["profile"], "claude", "{body}");
                    assert_eq!(body["agent"]["demoModel"], true, "{body}");
                    assert_eq!(body["executor"], "docker", "{body}");
                    break;
                }
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "scripts/dev did not get ready; its output:\n{}", tail(&log, 8000));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The edge's /health tells the truth about the runner: Claude Code on the demo model, no
    // forge token.
    let edge_health: serde_json::Value =
        http.get(format!("http://127.0.0.1:{port}/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(edge_health["claude"]["authenticated"], true, "{edge_health}");
    assert_eq!(edge_health["claude"]["demoModel"], true, "{edge_health}");
    assert!(edge_health["claude"]["version"].as_str().is_some_and(|v| v.contains("Claude Code")), "{edge_health}");
    assert_eq!(edge_health["git"]["authenticated"], false, "{edge_health}");

    let script = example
        .replace("127.0.0.1:8787", &format!("127.0.0.1:{port}"))
        .replace(".kiln/remotes", &dev_dir.join("remotes").display().to_string());
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new("bash").args(["-euo", "pipefail", "-c", &script]).current_dir(repo_root()).output(),
    )
    .await
    .expect("the README's example finished within 3 minutes")
    .expect("running bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = || format!("stdout:\n{stdout}\nstderr:\n{stderr}\nscripts/dev:\n{}", tail(&log, 4000));
    assert!(out.status.success(), "the README's example failed ({}):\n{}", out.status, context());

    // What the README shows a newcomer.
    for line in [
        "● running assigned to a runner (attempt 1)",
        "Agent claude on Kiln's demo model",
        "[demo model] Wrote KILN_DEMO.md for: Add a logout button",
        "→ Write /app/KILN_DEMO.md",
        "Pushed branch feature/logout to file://",
        "no pull request was opened: the runner has no GITHUB_TOKEN",
        " completed\n",
        "Add a logout button\n",
        " KILN_DEMO.md | ",
    ] {
        assert!(stdout.contains(line), "the output lacks {line:?}:\n{}", context());
    }

    // The local remote holds the agent's commit on the branch, on top of the demo's main.
    let remote = dev_dir.join("remotes/acme/shop.git");
    let git = |args: &[&str]| {
        let o = Command::new("git").arg("--git-dir").arg(&remote).args(args).output().unwrap();
        assert!(o.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(git(&["log", "--format=%s", "main..feature/logout"]), "Add a logout button\n");
    let demo = git(&["show", "feature/logout:KILN_DEMO.md"]);
    assert!(demo.contains("Add a logout button"), "{demo}");

    // Stopped as a user stops it: everything it started goes.
    dev.terminate(Duration::from_secs(30));
    assert!(
        http.get(&health).send().await.is_err(),
        "the runner stopped with scripts/dev:\n{}",
        tail(&log, 4000)
    );
    assert!(
        http.get(format!("http://127.0.0.1:{port}/health")).send().await.is_err(),
        "the edge stopped with scripts/dev"
    );
}
