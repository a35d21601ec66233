//! The README's "Build an app (seed 000)" walkthrough, exactly as written, on `scripts/dev` with no
//! configuration (only its ports and state directories differ, so this test never meets a
//! developer's running Kiln): the demo model answers every LLM step, the real Claude Code CLI in
//! the agent image builds the two stories, and the output shows what the README promises.
//!
//! Like `quickstart.rs` this runs the real script, which builds what it needs in release mode.

use std::process::Command;
use std::time::Duration;

use kiln_e2e::{free_port, repo_root, tail, GroupChild};

/// The first ```sh block after `## Build an app`.
fn readme_walkthrough() -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("reading README.md");
    let section = &readme[readme.find("## Build an app").expect("README.md has a \"Build an app\" section")..];
    let start = section.find("```sh\n").expect("\"Build an app\" has a ```sh block") + "```sh\n".len();
    let end = start + section[start..].find("```").expect("the block ends");
    section[start..end].to_string()
}

#[tokio::test]
async fn the_readme_app_walkthrough_builds_an_app_on_scripts_dev_with_the_demo_model() {
    let walkthrough = readme_walkthrough();
    assert!(
        walkthrough.contains(r#"-d '{"prompt":"A reading list for people who read a lot"}'"#),
        "the README's idea changed; this test checks what it promises:\n{walkthrough}"
    );

    let dir = tempfile::Builder::new().prefix("kiln-app-quickstart-").tempdir().unwrap();
    let (port, model_port, runner_port) = (free_port(), free_port(), free_port());
    let mut cmd = Command::new(repo_root().join("scripts/dev"));
    cmd.current_dir(repo_root())
        .env("KILN_PORT", port.to_string())
        .env("KILN_MODEL_PORT", model_port.to_string())
        .env("KILN_STATE", dir.path().join("state"))
        .env("KILN_DEV_DIR", dir.path().join("dev"))
        .env("RUNNER_LISTEN", format!("127.0.0.1:{runner_port}"))
        .env("RUNNER_NAME", "app-quickstart");
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
                    assert_eq!(body["agent"]["demoModel"], true, "{body}");
                    break;
                }
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "scripts/dev did not get ready; its output:\n{}", tail(&log, 8000));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let script = walkthrough.replace("127.0.0.1:8787", &format!("127.0.0.1:{port}"));
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new("bash").args(["-euo", "pipefail", "-c", &script]).current_dir(repo_root()).output(),
    )
    .await
    .expect("the README's walkthrough finished within 4 minutes")
    .expect("running bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = || format!("stdout:\n{stdout}\nstderr:\n{stderr}\nscripts/dev:\n{}", tail(&log, 4000));
    assert!(out.status.success(), "the README's walkthrough failed ({}):\n{}", out.status, context());

    // What the README shows.
    for line in [
        "Client Relations: [demo model] Thanks for the idea: \"A reading list for people who read a lot\".",
        "{\"role\":\"user\",\"content\":\"Readers who want to remember what they read\"}",
        "Build \"A reading list for people who read a lot\" as a small single-page web app",
        "● queued requirements collected; job queued",
        "[CEO] [demo model] CEO: ",
        "[Secretary] [demo model] Secretary: Recorded: one page, localStorage, two stories in order. CONSENSUS",
        "● prd_ready The PRD is ready",
        "● tickets_ready 3 tickets, 2 to build",
        "→ Write /app/index.html",
        "→ Write /app/app.js",
        "● build_done Built 2 tickets",
        "story Page skeleton: done\nstory List behaviour: done",
        "{\"features\":[\"Add an item\",\"Mark an item done\",\"Keep the list in the browser\"],\"name\":\"Kiln demo app\",\"pages\":[\"Home\"]}",
        "{\"path\":\"/app/index.html\",\"type\":\"file\",",
        "// Written by Kiln's demo model (kiln-demo) for ticket S2: List behaviour",
    ] {
        assert!(stdout.contains(line), "the output lacks {line:?}:\n{}", context());
    }

    dev.terminate(Duration::from_secs(30));
    assert!(http.get(&health).send().await.is_err(), "the runner stopped with scripts/dev");
}
