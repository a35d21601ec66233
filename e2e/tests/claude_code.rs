//! The real Claude Code CLI end to end: a real `wrangler dev`, a real runner with the Docker
//! executor and the agent image (`kiln-agent:latest`, from `scripts/agent-image`), the scripted
//! model server standing in for Anthropic, local bare git remotes and the fake GitHub. Each test
//! scripts what the model answers; everything between it and the edge is the real thing: the
//! CLI's tool calls write files in the job's container, its stream-json becomes job events, a
//! task's follow-ups resume its session.

use std::time::Duration;

use kiln_e2e::model::{ModelServer, Script};
use kiln_e2e::{Api, FakeGitHub, GitRemotes, Method, StatusCode, TestEdge, TestRunner, WsAuth, WsClient};
use serde_json::{json, Value};

const GITHUB_TOKEN: &str = "ghp_kiln_claude_test";
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

struct World {
    edge: TestEdge,
    remotes: GitRemotes,
    github: FakeGitHub,
    model: ModelServer,
    token: String,
    _runner: TestRunner,
    _states: tempfile::TempDir,
}

impl World {
    async fn start(rules: Value) -> World {
        let model = ModelServer::start(Script::from_value(json!({"rules": rules})).expect("a valid script"));
        let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
        edge.api().grant("*", "acme/*").await;
        let remotes = GitRemotes::new();
        remotes.create_with_files("acme", "shop", &[("README.md", "# shop\n")]);
        let github = FakeGitHub::start(GITHUB_TOKEN);
        let token = edge.api().new_user("claude-code").await;
        let states = tempfile::Builder::new().prefix("kiln-claude-states-").tempdir().unwrap();
        let (base, api_url, model_url) = (remotes.base_url(), github.api_url(), model.url());
        let state = states.path().display().to_string();
        let runner = TestRunner::start(
            &edge,
            &[
                ("RUNNER_STATE_DIR", state.as_str()),
                ("RUNNER_EXECUTOR", "docker"),
                ("RUNNER_IMAGE", "kiln-agent:latest"),
                // The private engine has no bridge: the container reaches the model on loopback.
                ("RUNNER_NETWORK", "host"),
                ("RUNNER_AGENT", "claude"),
                ("RUNNER_AGENT_ENV", "ANTHROPIC_BASE_URL,ANTHROPIC_API_KEY,DISABLE_AUTOUPDATER,CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"),
                ("ANTHROPIC_BASE_URL", model_url.as_str()),
                ("ANTHROPIC_API_KEY", "sk-ant-kiln-test"),
                ("DISABLE_AUTOUPDATER", "1"),
                ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
                ("RUNNER_GIT_BASE_URL", base.as_str()),
                ("GITHUB_API_URL", api_url.as_str()),
                ("GITHUB_TOKEN", GITHUB_TOKEN),
            ],
        )
        .await
        .expect("starting a runner");
        World { edge, remotes, github, model, token, _runner: runner, _states: states }
    }

    fn api(&self) -> Api {
        self.edge.api()
    }

    async fn submit(&self, body: Value) -> String {
        let created = self.api().create_job(&self.token, body).await;
        created["id"].as_str().expect("a job id").to_string()
    }

    async fn messages(&self, id: &str) -> Vec<Value> {
        let (status, job) = self.api().get(&format!("/jobs/{id}?includeMessages=true"), &self.token).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        job["messages"].as_array().cloned().unwrap_or_default()
    }

    /// The `result` texts of the agent's stream-json, in order.
    async fn results(&self, id: &str) -> Vec<String> {
        self.messages(id)
            .await
            .iter()
            .filter(|m| m["type"] == "stdout")
            .filter_map(|m| serde_json::from_str::<Value>(m["content"].as_str()?).ok())
            .filter(|e| e["type"] == "result")
            .filter_map(|e| e["result"].as_str().map(str::to_string))
            .collect()
    }

    async fn system_lines(&self, id: &str) -> Vec<String> {
        self.messages(id)
            .await
            .iter()
            .filter(|m| m["type"] == "system")
            .filter_map(|m| m["content"].as_str().map(str::to_string))
            .collect()
    }
}

#[tokio::test]
async fn a_code_job_runs_claude_code_which_writes_a_file_that_is_committed_into_a_pull_request() {
    let w = World::start(json!([
        {"when": {"offers_tool": "Write", "after_tool": false}, "text": "I will add the button.",
         "tool_calls": [{"name": "Write", "input": {"file_path": "{{cwd}}/src/logout.js", "content": "export const logout = () => fetch('/logout', {method: 'POST'});\n"}}]},
        {"when": {"after_tool": true}, "text": "Added src/logout.js.", "chunks": 3},
        {"text": "side answer"}
    ]))
    .await;
    let id = w
        .submit(json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "Add a logout button", "branchName": "feature/logout"}))
        .await;
    let job = w.api().wait_status(&w.token, &id, "completed", JOB_TIMEOUT).await;
    let prs = w.github.created();
    assert_eq!(prs.len(), 1, "{prs:?}");
    assert_eq!(prs[0].body["head"], "feature/logout");
    assert_eq!(job["pr_url"], format!("https://github.com/acme/shop/pull/{}", prs[0].number.unwrap()), "{job}");
    assert_eq!(
        w.remotes.file("acme", "shop", "feature/logout", "src/logout.js").as_deref(),
        Some("export const logout = () => fetch('/logout', {method: 'POST'});\n"),
        "Claude Code's Write landed in the worktree, was committed and pushed"
    );
    assert_eq!(w.results(&id).await, vec!["Added src/logout.js."]);
    let system = w.system_lines(&id).await;
    assert!(system.iter().any(|l| l.starts_with("Agent usage: ") && l.contains(" tokens in, ")), "{system:#?}");
    // The CLI's usage and cost: a job field, and a `usage` event on the live channel.
    let usage = &job["usage"];
    assert!(usage["input_tokens"].as_u64().is_some_and(|n| n > 0), "{job}");
    assert!(usage["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{job}");
    let mut ws = WsClient::connect(&w.edge.ws_url(), &id, WsAuth::Header(&w.token), None).await.expect("the job's channel");
    let events = ws.until(Duration::from_secs(10), "the usage event", |e| e["kind"] == "usage").await;
    let event = events.last().unwrap();
    assert_eq!(event["usage"]["source"], "claude", "{event}");
    assert_eq!(&event["totals"], usage, "one agent run: its usage is the job's");

    // The edge's /health tells what the runner found: seed 003's claude and git blocks.
    let (_, health) = w.api().send(Method::GET, "/health", None, None).await;
    assert_eq!(health["claude"]["authenticated"], true, "{health}");
    assert_eq!(health["claude"]["demoModel"], false, "{health}");
    assert!(health["claude"]["version"].as_str().is_some_and(|v| v.contains("Claude Code")), "{health}");
    assert_eq!(health["git"]["authenticated"], true, "GITHUB_TOKEN is set: {health}");
    assert_eq!(health["runners"]["tools"][0]["profile"], "claude", "{health}");
    // The CLI really talked to the model: its prompt and the tool result reached the server.
    let seen = w.model.requests();
    assert!(seen.iter().any(|r| format!("{r:?}").contains("Add a logout button")), "{seen:#?}");
}

#[tokio::test]
async fn a_ralph_loop_of_claude_code_iterates_with_feedback_until_the_promise_on_iteration_3() {
    let w = World::start(json!([
        {"when": {"iteration": 3, "after_tool": false}, "text": "All steps are done. <promise>SHIPPED</promise>"},
        {"when": {"offers_tool": "Write", "after_tool": false},
         "tool_calls": [{"name": "Write", "input": {"file_path": "{{cwd}}/steps/{{iteration}}.md", "content": "step {{iteration}}\n"}}]},
        {"when": {"after_tool": true}, "text": "Wrote step {{iteration}}; more to do."},
        {"text": "side answer"}
    ]))
    .await;
    let id = w
        .submit(json!({
            "githubOrg": "acme", "githubRepo": "shop", "jobType": "ralph", "prompt": "Write the steps",
            "branchName": "feature/steps", "maxIterations": 5, "completionPromise": "SHIPPED",
            "feedbackCommands": ["test -f steps/1.md", "ls steps"]
        }))
        .await;
    let job = w.api().wait_status(&w.token, &id, "completed", JOB_TIMEOUT).await;
    assert_eq!(job["completion_reason"], "promise_detected", "{job}");
    assert_eq!(job["total_iterations"], 3, "{job}");
    let (status, its) = w.api().get(&format!("/jobs/{id}/iterations"), &w.token).await;
    assert_eq!(status, StatusCode::OK, "{its}");
    let its = its["iterations"].as_array().cloned().unwrap_or_default();
    assert_eq!(its.len(), 3, "{its:#?}");
    for (i, it) in its.iter().enumerate() {
        assert_eq!(it["exitCode"], 0, "{it}");
        assert_eq!(it["promiseDetected"], i == 2, "{it}");
        let feedback = it["feedbackResults"].as_array().unwrap();
        assert_eq!(feedback.len(), 2, "{it}");
        assert!(feedback.iter().all(|f| f["passed"] == true), "both feedback commands pass from iteration 1 on: {it}");
    }
    let files = w.remotes.files("acme", "shop", "feature/steps");
    assert_eq!(files.get("steps/1.md").map(String::as_str), Some("step 1\n"), "{files:?}");
    assert_eq!(files.get("steps/2.md").map(String::as_str), Some("step 2\n"), "{files:?}");
    assert!(!files.contains_key("steps/3.md"), "iteration 3 only answered the promise: {files:?}");
    assert_eq!(w.github.created().len(), 1, "one pull request at the end");
}

#[tokio::test]
async fn a_claude_code_task_answers_two_follow_ups_while_running_then_completes() {
    let w = World::start(json!([
        {"when": {"prompt": "What files"}, "text": "There is a README.md."},
        {"when": {"prompt": "first follow-up"}, "text": "Answer one; this conversation has {{prompt_count}} prompts."},
        {"when": {"prompt": "second follow-up"}, "text": "Answer two; this conversation has {{prompt_count}} prompts."},
        {"text": "side answer"}
    ]))
    .await;
    let id = w
        .submit(json!({"githubOrg": "acme", "githubRepo": "shop", "jobType": "task", "prompt": "What files are here?", "branchName": "task/files"}))
        .await;
    let api = w.api();
    let wait_results = |n: usize| {
        let w = &w;
        let id = id.clone();
        async move {
            let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
            loop {
                let r = w.results(&id).await;
                if r.len() >= n {
                    return r;
                }
                assert!(tokio::time::Instant::now() < deadline, "waiting for {n} answers, have {r:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(wait_results(1).await, vec!["There is a README.md."]);
    for (n, message) in [(2, "A first follow-up, please"), (3, "And a second follow-up")] {
        let (status, body) = api.post(&format!("/jobs/{id}/message"), &w.token, json!({"message": message})).await;
        assert!(status.is_success(), "{status} {body}");
        let results = wait_results(n).await;
        // The answer streams back while the job still runs, from a session that remembers.
        assert_eq!(api.job(&w.token, &id).await["status"], "running");
        assert_eq!(
            results[n - 1],
            format!("Answer {}; this conversation has {n} prompts.", if n == 2 { "one" } else { "two" })
        );
    }
    let (status, body) = api.send(Method::POST, &format!("/jobs/{id}/complete"), Some(&w.token), None).await;
    assert!(status.is_success(), "{status} {body}");
    api.wait_status(&w.token, &id, "completed", JOB_TIMEOUT).await;
    let system = w.system_lines(&id).await;
    assert!(system.iter().any(|l| l == "Session completed after 3 turn(s)"), "{system:#?}");
    assert!(w.github.created().is_empty(), "tasks open no pull request");
}
