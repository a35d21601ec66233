//! The real Codex CLI end to end, as `claude_code.rs` does for Claude Code: a real `wrangler dev`,
//! a runner with the Docker executor, the agent image and the `codex` profile, and the scripted
//! model server's demo script speaking OpenAI's Responses API. The runner turns `OPENAI_BASE_URL`
//! into a model provider on Codex's command line; the CLI's shell tool writes a file in the job's
//! container; a task's follow-up resumes Codex's thread.

use std::time::Duration;

use kiln_e2e::model::ModelServer;
use kiln_e2e::{GitRemotes, Method, StatusCode, TestEdge, TestRunner};
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn codex_edits_the_repository_in_its_container_and_answers_a_follow_up_in_its_thread() {
    let model = ModelServer::demo();
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    api.grant("*", "acme/*").await;
    let remotes = GitRemotes::new();
    remotes.create_with_files("acme", "shop", &[("README.md", "# shop\n")]);
    let token = api.new_user("codex").await;
    let state = tempfile::tempdir().unwrap();
    let (base, openai_url, state_dir) = (remotes.base_url(), model.openai_base_url(), state.path().display().to_string());
    let _runner = TestRunner::start(
        &edge,
        &[
            ("RUNNER_STATE_DIR", state_dir.as_str()),
            ("RUNNER_EXECUTOR", "docker"),
            ("RUNNER_IMAGE", "kiln-agent:latest"),
            ("RUNNER_NETWORK", "host"),
            ("RUNNER_AGENT", "codex"),
            // Codex offers its tools only for a model it can name.
            ("RUNNER_AGENT_MODEL", "kiln-demo"),
            ("RUNNER_AGENT_ENV", "OPENAI_BASE_URL,OPENAI_API_KEY"),
            ("OPENAI_BASE_URL", openai_url.as_str()),
            ("OPENAI_API_KEY", "kiln-demo"),
            ("RUNNER_DEMO_MODEL", "true"),
            ("RUNNER_GIT_BASE_URL", base.as_str()),
        ],
    )
    .await
    .expect("starting a runner");

    // A code job: Codex runs the demo's shell command, which writes KILN_DEMO.md in /app.
    let created = api
        .create_job(&token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "Add a logout button", "branchName": "feature/codex"}))
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let job = api.wait_status(&token, &id, "completed", JOB_TIMEOUT).await;
    assert!(job["pr_url"].is_null(), "no GITHUB_TOKEN, no pull request: {job}");
    let Some(demo) = remotes.file("acme", "shop", "feature/codex", "KILN_DEMO.md") else {
        panic!("KILN_DEMO.md was not committed; messages: {}", messages(&api, &token, &id).await);
    };
    assert!(demo.contains("Add a logout button"), "{demo}");
    let (_, health) = api.send(Method::GET, "/health", None, None).await;
    assert_eq!(health["runners"]["tools"][0]["profile"], "codex", "{health}");
    assert!(health["runners"]["tools"][0]["agent_version"].as_str().is_some_and(|v| v.contains("codex")), "{health}");

    // A task: the follow-up is answered in the same thread while the job runs.
    let created = api
        .create_job(&token, json!({"githubOrg": "acme", "githubRepo": "shop", "jobType": "task", "prompt": "Hello there", "branchName": "task/codex"}))
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    wait_text(&api, &token, &id, "(request 1 of this conversation)").await;
    let (status, body) = api.post(&format!("/jobs/{id}/message"), &token, json!({"message": "And a follow-up"})).await;
    assert!(status.is_success(), "{status} {body}");
    wait_text(&api, &token, &id, "for: And a follow-up (request 2 of this conversation)").await;
    assert_eq!(api.job(&token, &id).await["status"], "running");
    let (status, body) = api.send(Method::POST, &format!("/jobs/{id}/complete"), Some(&token), None).await;
    assert!(status.is_success(), "{status} {body}");
    api.wait_status(&token, &id, "completed", JOB_TIMEOUT).await;
}

async fn messages(api: &kiln_e2e::Api, token: &str, id: &str) -> Value {
    let (status, job) = api.get(&format!("/jobs/{id}?includeMessages=true"), token).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    job["messages"].clone()
}

/// Waits until a Codex agent message containing `needle` is in the job's log.
async fn wait_text(api: &kiln_e2e::Api, token: &str, id: &str, needle: &str) {
    let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
    loop {
        let all = messages(api, token, id).await;
        let found = all.as_array().into_iter().flatten().filter_map(|m| serde_json::from_str::<Value>(m["content"].as_str()?).ok()).any(|e| {
            e["type"] == "item.completed" && e["item"]["type"] == "agent_message" && e["item"]["text"].as_str().is_some_and(|t| t.contains(needle))
        });
        if found {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no agent message with {needle:?}; messages: {all}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
