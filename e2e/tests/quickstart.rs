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

use kiln_e2e::dev::{readme_block, DevKiln};

#[tokio::test]
async fn the_readme_example_completes_on_scripts_dev_with_no_configuration() {
    let example = readme_block("## Using it");
    assert!(
        example.contains(r#"'{"githubOrg":"acme","githubRepo":"shop","prompt":"Add a logout button","branchName":"feature/logout"}'"#),
        "the README's example job changed; this test checks what it promises:\n{example}"
    );

    let (dev, body) = DevKiln::start("quickstart").await;
    assert_eq!(body["agent"]["profile"], "claude", "{body}");
    assert_eq!(body["agent"]["demoModel"], true, "{body}");
    assert_eq!(body["executor"], "docker", "{body}");
    let (http, port) = (dev.http.clone(), dev.port);

    // The edge's /health tells the truth about the runner: Claude Code on the demo model, no
    // forge token.
    let edge_health: serde_json::Value =
        http.get(format!("http://127.0.0.1:{port}/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(edge_health["claude"]["authenticated"], true, "{edge_health}");
    assert_eq!(edge_health["claude"]["demoModel"], true, "{edge_health}");
    assert!(edge_health["claude"]["version"].as_str().is_some_and(|v| v.contains("Claude Code")), "{edge_health}");
    assert_eq!(edge_health["git"]["authenticated"], false, "{edge_health}");

    let stdout = dev.run_block(&example, Duration::from_secs(180), "the README's example").await;
    let context = || dev.context(&stdout, "");

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
    let remote = dev.dev_dir.join("remotes/acme/shop.git");
    let git = |args: &[&str]| {
        let o = Command::new("git").arg("--git-dir").arg(&remote).args(args).output().unwrap();
        assert!(o.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(git(&["log", "--format=%s", "main..feature/logout"]), "Add a logout button\n");
    let demo = git(&["show", "feature/logout:KILN_DEMO.md"]);
    assert!(demo.contains("Add a logout button"), "{demo}");

    // Stopped as a user stops it: everything it started goes.
    dev.stop().await;
    assert!(http.get(format!("http://127.0.0.1:{port}/health")).send().await.is_err(), "the edge stopped with scripts/dev");
}
