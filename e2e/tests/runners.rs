//! Issue 3 end to end: a real `wrangler dev`, real runner processes, a real Docker engine (the
//! repository's private dockerd), local bare git remotes and a fake of GitHub's pulls endpoint.
//! Every job type to its end state, cancel, stop, a runner lost mid-job, two runners sharing one
//! queue, repository work, and bad input to the runner endpoints.

use std::time::Duration;

use kiln_e2e::{agents, eventually, Api, FakeGitHub, GitRemotes, Method, StatusCode, TestEdge, TestRunner, WsAuth, WsClient};
use serde_json::{json, Value};

const GITHUB_TOKEN: &str = "ghp_kiln_test_token";
const JOB_TIMEOUT: Duration = Duration::from_secs(90);

struct World {
    edge: TestEdge,
    remotes: GitRemotes,
    github: FakeGitHub,
    token: String,
    /// Each runner's own RUNNER_STATE_DIR, so none reuses another's saved token (nor the host's).
    states: tempfile::TempDir,
}

impl World {
    async fn start(vars: &[(&str, &str)]) -> World {
        let edge = TestEdge::start(vars).await.expect("starting wrangler dev");
        // Every user may name the repositories of the `acme` org (grants: e2e/tests/trust.rs).
        edge.api().grant("*", "acme/*").await;
        let remotes = GitRemotes::new();
        remotes.create_with_files("acme", "shop", &[("README.md", "# shop\n")]);
        let github = FakeGitHub::start(GITHUB_TOKEN);
        let token = edge.api().new_user("runner-tests").await;
        let states = tempfile::Builder::new().prefix("kiln-runner-states-").tempdir().unwrap();
        World { edge, remotes, github, token, states }
    }

    fn api(&self) -> Api {
        self.edge.api()
    }

    /// The settings every runner in these tests shares, plus `extra`.
    async fn runner(&self, agent_cmd: &str, executor: &str, extra: &[(&str, &str)]) -> TestRunner {
        let base = self.remotes.base_url();
        let api_url = self.github.api_url();
        let mounts = agents::docker_mount();
        let state = self.states.path().join(uuid::Uuid::new_v4().to_string()).display().to_string();
        let mut env = vec![
            ("RUNNER_STATE_DIR", state.as_str()),
            ("RUNNER_EXECUTOR", executor),
            // The stand-in agents speak plain text (prompt and follow-ups on stdin).
            ("RUNNER_AGENT", "text"),
            ("RUNNER_AGENT_CMD", agent_cmd),
            ("RUNNER_GIT_BASE_URL", base.as_str()),
            ("GITHUB_API_URL", api_url.as_str()),
            ("GITHUB_TOKEN", GITHUB_TOKEN),
            ("RUNNER_MOUNTS", mounts.as_str()),
        ];
        env.extend_from_slice(extra);
        TestRunner::start(&self.edge, &env).await.expect("starting a runner")
    }

    async fn wait_runners(&self, slots: u64) {
        let api = self.api();
        eventually(Duration::from_secs(20), "runner slots on /health", || {
            let api = api.clone();
            async move {
                let (_, h) = api.send(Method::GET, "/health", None, None).await;
                (h["runners"]["free_slots"].as_u64().unwrap_or(0) >= slots).then_some(())
            }
        })
        .await
    }

    async fn job_messages(&self, id: &str) -> Vec<Value> {
        let job = self.api().job_with_messages(&self.token, id).await;
        job["messages"].as_array().cloned().unwrap_or_default()
    }
}

trait ApiExt {
    async fn job_with_messages(&self, token: &str, id: &str) -> Value;
}

impl ApiExt for Api {
    async fn job_with_messages(&self, token: &str, id: &str) -> Value {
        let (status, job) = self.get(&format!("/jobs/{id}?includeMessages=true"), token).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        job
    }
}

fn has_message(messages: &[Value], kind: &str, needle: &str) -> bool {
    messages.iter().any(|m| m["type"] == kind && m["content"].as_str().is_some_and(|c| c.contains(needle)))
}

fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker").args(args).output().expect("running the docker CLI");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_code_job_runs_in_a_container_commits_pushes_and_opens_a_pull_request() {
    let w = World::start(&[]).await;
    let api = w.api();
    // A client with a repository (seed 003's clients API).
    let (status, client) = api.post("/clients", &w.token, json!({"name": "Acme"})).await;
    assert_eq!(status, StatusCode::CREATED, "{client}");
    let client_id = client["id"].as_str().unwrap().to_string();
    let (status, added) = api
        .post(&format!("/clients/{client_id}/repository"), &w.token, json!({"githubOrg": "acme", "githubRepo": "shop", "defaultBranch": "main"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{added}");
    assert_eq!(added["repository"]["owner_name"], "acme");
    let (_, one) = api.get(&format!("/clients/{client_id}"), &w.token).await;
    assert_eq!(one["repository"]["repo_name"], "shop", "{one}");
    let (_, all) = api.get("/clients", &w.token).await;
    assert_eq!(all["clients"][0]["repositories"][0]["default_branch"], "main", "{all}");

    let _runner = w.runner(&agents::docker_cmd(agents::EDITOR), "docker", &[]).await;
    w.wait_runners(1).await;
    let created = api
        .create_job(&w.token, json!({"clientId": client_id, "prompt": "Add a logout button", "branchName": "feature/logout", "title": "Logout"}))
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let job = api.wait_status(&w.token, &id, "completed", JOB_TIMEOUT).await;

    // The pull request, through the fake GitHub API.
    let prs = w.github.created();
    assert_eq!(prs.len(), 1, "one pull request: {prs:?}");
    assert_eq!(prs[0].body["head"], "feature/logout");
    assert_eq!(prs[0].body["base"], "main");
    assert_eq!(prs[0].token.as_deref(), Some(GITHUB_TOKEN));
    assert!(job["pr_url"].as_str().is_some_and(|u| u.contains("/acme/shop/pull/")), "{job}");
    assert_eq!(job["client"]["name"], "Acme");

    // The pushed branch: the agent's work in one commit on top of main.
    let written = w.remotes.file("acme", "shop", "feature/logout", "kiln-agent/iteration-1.txt").expect("the agent's file was pushed");
    assert!(written.contains("Add a logout button"), "the prompt reached the agent on stdin: {written}");
    assert!(written.contains(&id), "JOB_ID was set: {written}");
    let commits = w.remotes.commits("acme", "shop", "feature/logout");
    assert_eq!(commits.len(), w.remotes.commits("acme", "shop", "main").len() + 1, "{commits:?}");

    // Output became messages; the container is gone.
    let messages = job["messages"].as_array().unwrap();
    assert!(has_message(messages, "stdout", "editor agent: iteration 1"), "{messages:#?}");
    let containers = docker(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(!containers.contains(&format!("project_engine_{id}_container")), "container left behind: {containers}");
}

#[tokio::test]
async fn a_task_job_relays_messages_to_the_agent_until_completed() {
    let w = World::start(&[]).await;
    let api = w.api();
    let _runner = w.runner(&agents::process_cmd(agents::ECHO), "process", &[]).await;
    w.wait_runners(1).await;
    let id = api
        .create_job(&w.token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "spec me a feature", "jobType": "task"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.wait_status(&w.token, &id, "running", JOB_TIMEOUT).await;
    let mut ws = WsClient::connect(&w.edge.ws_url(), &id, WsAuth::Header(&w.token), None).await.expect("socket");

    // Bad input first: empty, wrong type, and messages to the wrong kind of job.
    let (status, body) = api.post(&format!("/jobs/{id}/message"), &w.token, json!({"message": ""})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = api.post(&format!("/jobs/{id}/message"), &w.token, json!({"message": 5})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api.post(&format!("/jobs/{}/message", uuid::Uuid::new_v4()), &w.token, json!({"message": "hi"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, sent) = api.post(&format!("/jobs/{id}/message"), &w.token, json!({"message": "an analytics dashboard"})).await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    assert_eq!(sent, json!({"id": id, "messageSent": true}));
    ws.until(Duration::from_secs(20), "the agent's answer on the socket", |v| {
        v["kind"] == "log" && v["content"].as_str().is_some_and(|c| c.contains("echo: an analytics dashboard"))
    })
    .await;

    let (status, body) = api.post(&format!("/jobs/{id}/complete"), &w.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "completing");
    let job = api.wait_status(&w.token, &id, "completed", JOB_TIMEOUT).await;
    let messages = job["messages"].as_array().unwrap();
    assert!(has_message(messages, "user_input", "an analytics dashboard"), "{messages:#?}");
    assert!(has_message(messages, "stdout", "echo: spec me a feature"), "the prompt went first: {messages:#?}");
    assert!(w.github.created().is_empty(), "task jobs open no pull request");

    // Once completed it takes no more messages.
    let (status, _) = api.post(&format!("/jobs/{id}/message"), &w.token, json!({"message": "late"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api.post(&format!("/jobs/{id}/complete"), &w.token, json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_ralph_job_iterates_in_a_container_until_the_promise_and_opens_one_pull_request() {
    let w = World::start(&[]).await;
    let api = w.api();
    let _runner = w.runner(&agents::docker_cmd(agents::EDITOR), "docker", &[]).await;
    w.wait_runners(1).await;
    let created = api
        .create_job(
            &w.token,
            json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "build it", "jobType": "ralph", "branchName": "feature/ralph",
                   "maxIterations": 6, "feedbackCommands": ["test -f kiln-agent/progress.txt", "false"]}),
        )
        .await;
    assert_eq!(created["maxIterations"], 6);
    assert_eq!(created["completionPromise"], "RALPH_COMPLETE");
    let id = created["id"].as_str().unwrap().to_string();
    let job = api.wait_status(&w.token, &id, "completed", JOB_TIMEOUT).await;
    assert_eq!(job["completion_reason"], "promise_detected", "{job}");
    assert_eq!(job["total_iterations"], 3, "{job}");
    assert!(job["pr_url"].as_str().is_some(), "{job}");

    let (status, its) = api.get(&format!("/jobs/{id}/iterations"), &w.token).await;
    assert_eq!(status, StatusCode::OK, "{its}");
    assert_eq!(its["jobId"], id.as_str());
    assert_eq!(its["currentIteration"], 3);
    assert_eq!(its["maxIterations"], 6);
    assert_eq!(its["completionReason"], "promise_detected");
    let list = its["iterations"].as_array().unwrap();
    assert_eq!(list.len(), 3, "{its:#}");
    for (i, it) in list.iter().enumerate() {
        assert_eq!(it["iterationNumber"], i as u64 + 1);
        assert_eq!(it["exitCode"], 0);
        assert_eq!(it["promiseDetected"], i == 2, "{it}");
        let fb = it["feedbackResults"].as_array().unwrap();
        assert_eq!(fb.len(), 2, "{it}");
        assert_eq!((fb[0]["passed"].clone(), fb[1]["passed"].clone()), (json!(true), json!(false)), "{it}");
        assert_eq!(fb[1]["command"], "false");
        assert_ne!(fb[1]["exitCode"], 0);
        assert!(it["startedAt"].is_string() && it["completedAt"].is_string());
    }
    // One commit with all three iterations' work, one pull request.
    let progress = w.remotes.file("acme", "shop", "feature/ralph", "kiln-agent/progress.txt").expect("progress pushed");
    assert_eq!(progress.lines().count(), 3, "{progress}");
    let commits = w.remotes.commits("acme", "shop", "feature/ralph");
    assert_eq!(commits.len(), w.remotes.commits("acme", "shop", "main").len() + 1, "{commits:?}");
    assert_eq!(w.github.created().len(), 1);

    // Iterations of other job types are a 400.
    let code = api.create_job(&w.token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "x", "branchName": "b/x"})).await;
    let (status, _) = api.get(&format!("/jobs/{}/iterations", code["id"].as_str().unwrap()), &w.token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn ralph_loops_end_at_max_iterations_on_stop_and_on_repeated_failure() {
    let w = World::start(&[("MAX_CONCURRENT_JOBS", "3")]).await;
    let api = w.api();
    // An agent that takes a moment per iteration, writes a file, never prints the promise, and
    // fails for good when the prompt asks it to.
    let agent = "read -r line; sleep 1; echo \"$ITERATION\" >> work.txt; case \"$line\" in *fail*) echo broken >&2; exit 3;; esac; echo \"iteration $ITERATION done\"";
    let _runner = w.runner(agent, "process", &[("MAX_CONCURRENT_JOBS", "3")]).await;
    w.wait_runners(3).await;
    let ralph = |prompt: &str, branch: &str, max: u32| {
        json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": prompt, "jobType": "ralph", "branchName": branch, "maxIterations": max})
    };
    let capped = api.create_job(&w.token, ralph("count", "r/capped", 2)).await["id"].as_str().unwrap().to_string();
    let stopped = api.create_job(&w.token, ralph("count", "r/stopped", 50)).await["id"].as_str().unwrap().to_string();
    let failing = api.create_job(&w.token, ralph("please fail", "r/failing", 5)).await["id"].as_str().unwrap().to_string();

    // Stop after the first iteration is recorded.
    let api2 = api.clone();
    let token = w.token.clone();
    eventually(Duration::from_secs(60), "the first iteration", || {
        let (api, token, id) = (api2.clone(), token.clone(), stopped.clone());
        async move {
            let (_, its) = api.get(&format!("/jobs/{id}/iterations"), &token).await;
            (its["iterations"].as_array().map_or(0, Vec::len) >= 1).then_some(())
        }
    })
    .await;
    let (status, body) = api.post(&format!("/jobs/{stopped}/stop"), &w.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["message"].as_str().unwrap().contains("Stop requested"), "{body}");

    let job = api.wait_status(&w.token, &capped, "completed", JOB_TIMEOUT).await;
    assert_eq!((job["completion_reason"].clone(), job["total_iterations"].clone()), (json!("max_iterations"), json!(2)), "{job}");
    assert_eq!(w.remotes.file("acme", "shop", "r/capped", "work.txt").as_deref(), Some("1\n2\n"));

    let job = api.wait_status(&w.token, &stopped, "completed", JOB_TIMEOUT).await;
    assert_eq!(job["completion_reason"], "manual_stop", "{job}");
    let n = job["total_iterations"].as_u64().unwrap();
    assert!((1..50).contains(&n), "{job}");
    assert!(job["pr_url"].is_string(), "partial work gets a pull request: {job}");
    assert!(w.remotes.file("acme", "shop", "r/stopped", "work.txt").is_some());

    let job = api.wait_status(&w.token, &failing, "failed", JOB_TIMEOUT).await;
    assert_eq!(job["completion_reason"], "iteration_error", "{job}");
    let (_, its) = api.get(&format!("/jobs/{failing}/iterations"), &w.token).await;
    let list = its["iterations"].as_array().unwrap();
    assert!(list.iter().all(|i| i["iterationNumber"] == 1 && i["exitCode"] == 3), "one iteration, retried once: {its:#}");
    assert_eq!(list.len(), 2, "{its:#}");

    // Stop is for running ralph jobs only.
    let (status, _) = api.post(&format!("/jobs/{capped}/stop"), &w.token, json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn cancel_kills_a_running_container_within_seconds() {
    let w = World::start(&[]).await;
    let api = w.api();
    let runner = w.runner(&agents::docker_cmd(agents::HANGING), "docker", &[]).await;
    w.wait_runners(1).await;
    let id = api
        .create_job(&w.token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "hang", "branchName": "b/hang"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.wait_status(&w.token, &id, "running", JOB_TIMEOUT).await;
    let name = format!("project_engine_{id}_container");
    eventually(Duration::from_secs(30), "the job's container", || {
        let name = name.clone();
        async move { docker(&["ps", "--format", "{{.Names}}"]).contains(&name).then_some(()) }
    })
    .await;
    let started = std::time::Instant::now();
    let (status, body) = api.post(&format!("/jobs/{id}/cancel"), &w.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"id": id, "status": "cancelled", "wasRunning": true}));
    eventually(Duration::from_secs(10), "the container to be removed", || {
        let name = name.clone();
        async move { (!docker(&["ps", "-a", "--format", "{{.Names}}"]).contains(&name)).then_some(()) }
    })
    .await;
    let worktree = runner.worktrees_dir().join(&id);
    eventually(Duration::from_secs(10), "the worktree to be removed", || {
        let worktree = worktree.clone();
        async move { (!worktree.exists()).then_some(()) }
    })
    .await;
    eprintln!("cancel → container and worktree gone in {:?}", started.elapsed());
    assert_eq!(api.job(&w.token, &id).await["status"], "cancelled");
    assert!(w.github.created().is_empty());
}

#[tokio::test]
async fn a_job_of_a_killed_runner_is_requeued_and_finished_by_another() {
    let w = World::start(&[("LEASE_SECS", "3"), ("HEARTBEAT_SECS", "1")]).await;
    let api = w.api();
    let mut first = w.runner(&agents::process_cmd(agents::HANGING), "process", &[("RUNNER_NAME", "first")]).await;
    w.wait_runners(1).await;
    let id = api
        .create_job(&w.token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "work", "branchName": "b/requeue"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.wait_status(&w.token, &id, "running", JOB_TIMEOUT).await;
    first.kill();
    let job = api.wait_status(&w.token, &id, "queued", Duration::from_secs(20)).await;
    assert!(has_message(job["messages"].as_array().unwrap(), "system", "runner lost"), "{job:#}");

    let _second = w.runner(&agents::process_cmd(agents::EDITOR), "process", &[("RUNNER_NAME", "second")]).await;
    let job = api.wait_status(&w.token, &id, "completed", JOB_TIMEOUT).await;
    assert_eq!(job["attempts"], 2, "{job}");
    assert!(w.remotes.file("acme", "shop", "b/requeue", "kiln-agent/iteration-1.txt").is_some());
    assert_eq!(w.github.created().len(), 1);
}

#[tokio::test]
async fn a_job_fails_for_good_when_its_runners_keep_vanishing() {
    let w = World::start(&[("LEASE_SECS", "2"), ("HEARTBEAT_SECS", "1"), ("MAX_ATTEMPTS", "2")]).await;
    let api = w.api();
    let id = api
        .create_job(&w.token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "work", "branchName": "b/doomed"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    for attempt in 1..=2 {
        let mut runner = w.runner(&agents::process_cmd(agents::HANGING), "process", &[]).await;
        let job = api.wait_status(&w.token, &id, "running", JOB_TIMEOUT).await;
        assert_eq!(job["attempts"], attempt);
        runner.kill();
        if attempt == 1 {
            let job = api.wait_status(&w.token, &id, "queued", Duration::from_secs(20)).await;
            assert!(has_message(job["messages"].as_array().unwrap(), "system", "requeued after attempt 1 of 2"), "{job:#}");
        }
    }
    let job = api.wait_status(&w.token, &id, "failed", Duration::from_secs(20)).await;
    assert!(job["error_message"].as_str().unwrap().contains("runner lost"), "{job}");
}

#[tokio::test]
async fn two_runners_share_one_queue_under_max_concurrent_jobs() {
    let w = World::start(&[("MAX_CONCURRENT_JOBS", "2")]).await;
    let api = w.api();
    let agent = "sleep 2; echo \"ran on $RUNNER_NAME_FOR_TEST\"";
    // Commands get nothing of the runner's environment but what RUNNER_AGENT_ENV names.
    let pass = ("RUNNER_AGENT_ENV", "RUNNER_NAME_FOR_TEST");
    let _a = w.runner(agent, "process", &[("MAX_CONCURRENT_JOBS", "2"), ("RUNNER_NAME_FOR_TEST", "a"), pass]).await;
    let _b = w.runner(agent, "process", &[("MAX_CONCURRENT_JOBS", "2"), ("RUNNER_NAME_FOR_TEST", "b"), pass]).await;
    w.wait_runners(4).await;
    let mut ids = vec![];
    for i in 0..5 {
        let created = api
            .create_job(&w.token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "p", "branchName": format!("b/share-{i}")}))
            .await;
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    let mut max_running = 0;
    let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
    loop {
        let (_, h) = api.send(Method::GET, "/health", None, None).await;
        let running = h["queue"]["running"].as_u64().unwrap();
        max_running = max_running.max(running);
        assert!(running <= 2, "at most MAX_CONCURRENT_JOBS run at once: {h}");
        let (_, q) = api.get("/queue", &w.token).await;
        assert!(q["running"].as_array().unwrap().len() <= 2, "{q}");
        let (_, list) = api.get("/jobs?status=completed", &w.token).await;
        if list["total"] == 5 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not all jobs completed: {list:#}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(max_running, 2, "both slots were used");
    let mut seen = std::collections::BTreeSet::new();
    for id in &ids {
        let messages = w.job_messages(id).await;
        for who in ["a", "b"] {
            if has_message(&messages, "stdout", &format!("ran on {who}")) {
                seen.insert(who);
            }
        }
    }
    assert_eq!(seen.len(), 2, "both runners took jobs: {seen:?}");
}

#[tokio::test]
async fn repository_work_is_carried_out_by_a_connected_runner() {
    let w = World::start(&[]).await;
    let api = w.api();
    w.remotes.create("acme", "api");
    let (_, client) = api.post("/clients", &w.token, json!({"name": "Acme"})).await;
    let client_id = client["id"].as_str().unwrap().to_string();
    let mut repo_ids = vec![];
    for (repo, branch) in [("shop", "main"), ("api", "main"), ("missing", "main")] {
        let (status, added) = api
            .post(&format!("/clients/{client_id}/repository"), &w.token, json!({"githubOrg": "acme", "githubRepo": repo, "defaultBranch": branch}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{added}");
        repo_ids.push(added["repository"]["id"].as_str().unwrap().to_string());
    }
    // No runner yet: a clear 503.
    let (status, body) = api.post("/sync", &w.token, json!({})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"].is_string());

    let runner = w.runner(&agents::process_cmd(agents::NOOP), "process", &[]).await;
    w.wait_runners(1).await;
    let (status, body) = api.post("/repos/clone", &w.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let cloned = body["cloned"].as_array().unwrap();
    assert_eq!(cloned.len(), 3, "{body}");
    let by_repo = |name: &str| cloned.iter().find(|r| r["repo"] == name).cloned().unwrap_or_else(|| panic!("{name} in {body}"));
    assert_eq!(by_repo("acme/shop")["success"], true);
    assert_eq!(by_repo("acme/missing")["success"], false);
    let shop_path = by_repo("acme/shop")["path"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(&shop_path).starts_with(runner.repos_dir()), "{shop_path}");

    let (status, body) = api.post("/sync", &w.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let synced = body["synced"].as_array().unwrap();
    assert!(synced.iter().any(|r| r["repo"] == "acme/api" && r["success"] == true), "{body}");

    let (status, body) = api.post(&format!("/repos/{}/clone", repo_ids[0]), &w.token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["success"].clone(), body["repo"].clone()), (json!(true), json!("acme/shop")));
    let (status, _) = api.post(&format!("/repos/{}/clone", uuid::Uuid::new_v4()), &w.token, json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Another user's repository is not theirs to clone.
    let other = api.new_user("other").await;
    let (status, _) = api.post(&format!("/repos/{}/clone", repo_ids[0]), &other, json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, theirs) = api.get("/clients", &other).await;
    assert_eq!(theirs["clients"], json!([]));
}

#[tokio::test]
async fn runner_endpoints_refuse_bad_credentials_and_bad_input() {
    let w = World::start(&[]).await;
    let api = w.api();
    let reg = kiln_e2e::runner_registration_token();
    // Registration: only with the operator's token, with a name.
    let (status, _) = api.send(Method::POST, "/runner/v1/register", None, Some(json!({"name": "r"}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api.send(Method::POST, "/runner/v1/register", Some("wrong"), Some(json!({"name": "r"}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api.send(Method::POST, "/runner/v1/register", Some(&w.token), Some(json!({"name": "r"}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a user token is not a registration token");
    let (status, _) = api.send(Method::POST, "/runner/v1/register", Some(&reg), Some(json!({"name": ""}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api.send(Method::POST, "/runner/v1/register", Some(&reg), Some(json!({"nope": 1}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = api.send(Method::POST, "/runner/v1/register", Some(&reg), Some(json!({"name": "ok"}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let runner_token = body["token"].as_str().unwrap().to_string();

    // Runner tokens open only the runner endpoints; other tokens never open them.
    let (status, _) = api.get("/jobs", &runner_token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let job = api.create_job(&w.token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "p", "branchName": "b/p"})).await;
    let id = job["id"].as_str().unwrap();
    let batch = json!({"lease_id": "not-a-lease", "events": [{"index": 0, "type": "log", "stream": "stdout", "content": "forged"}]});
    for token in [w.token.as_str(), kiln_e2e::agent_api_secret().as_str(), "garbage"] {
        let (status, _) = api.send(Method::POST, &format!("/runner/v1/jobs/{id}/events"), Some(token), Some(batch.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let refused = WsClient::connect_path(&w.edge.ws_url(), "/runner/v1/connect", Some(&format!("Bearer {}", w.token))).await;
    assert_eq!(refused.err().map(|r| r.status), Some(StatusCode::UNAUTHORIZED));

    // A runner's batch for a job it holds no lease on stores nothing.
    let (status, ack) = api.send(Method::POST, &format!("/runner/v1/jobs/{id}/events"), Some(&runner_token), Some(batch.clone())).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack, json!({"stored": 0, "duplicates": 0, "lease_valid": false}));
    let messages = w.job_messages(id).await;
    assert!(!has_message(&messages, "stdout", "forged"), "{messages:?}");
    let (status, _) = api
        .send(Method::POST, &format!("/runner/v1/jobs/{}/events", uuid::Uuid::new_v4()), Some(&runner_token), Some(batch.clone()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .send(Method::POST, &format!("/runner/v1/jobs/{id}/events"), Some(&runner_token), Some(json!({"events": "nope"})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api
        .send_raw(Method::POST, &format!("/runner/v1/jobs/{id}/events"), Some(&format!("Bearer {runner_token}")), Some("application/json"), "{not json")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// A runner speaking the protocol by hand: holds an assignment, posts the same batch twice.
#[tokio::test]
async fn a_retried_event_batch_is_stored_once() {
    use futures::{SinkExt, StreamExt};
    use kiln_schemas::runner::{EdgeMessage, RunnerMessage};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

    let w = World::start(&[]).await;
    let api = w.api();
    let reg = kiln_e2e::runner_registration_token();
    let (_, body) = api.send(Method::POST, "/runner/v1/register", Some(&reg), Some(json!({"name": "by-hand"}))).await;
    let runner_token = body["token"].as_str().unwrap().to_string();
    let mut request = format!("{}/runner/v1/connect", w.edge.ws_url()).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {runner_token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect("runner socket");
    let hello = RunnerMessage::Hello { name: "by-hand".into(), capacity: 1, running: vec![], version: "test".into(), tools: None };
    ws.send(Message::Text(serde_json::to_string(&hello).unwrap().into())).await.unwrap();
    let id = api
        .create_job(&w.token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "p", "branchName": "b/dup"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let assignment = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("an assignment").unwrap().unwrap();
        if let Ok(EdgeMessage::Assign { assignment }) = serde_json::from_str::<EdgeMessage>(msg.to_text().unwrap()) {
            break assignment;
        }
    };
    assert_eq!(assignment.job_id, id);
    assert_eq!((assignment.attempt, assignment.branch_name.as_str()), (1, "b/dup"));
    let batch = json!({"lease_id": assignment.lease_id, "events": [
        {"index": 0, "type": "started", "message": "started by hand"},
        {"index": 1, "type": "log", "stream": "stdout", "content": "only once"},
    ]});
    let path = format!("/runner/v1/jobs/{id}/events");
    let (status, ack) = api.send(Method::POST, &path, Some(&runner_token), Some(batch.clone())).await;
    assert_eq!((status, ack.clone()), (StatusCode::OK, json!({"stored": 2, "duplicates": 0, "lease_valid": true})));
    let (_, ack) = api.send(Method::POST, &path, Some(&runner_token), Some(batch)).await;
    assert_eq!(ack, json!({"stored": 0, "duplicates": 2, "lease_valid": true}));
    let finish = json!({"lease_id": assignment.lease_id, "events": [
        {"index": 1, "type": "log", "stream": "stdout", "content": "only once"},
        {"index": 2, "type": "finished", "outcome": "completed", "message": "done", "pr_url": "https://github.com/acme/shop/pull/9"},
    ]});
    let (_, ack) = api.send(Method::POST, &path, Some(&runner_token), Some(finish)).await;
    assert_eq!(ack, json!({"stored": 1, "duplicates": 1, "lease_valid": true}));
    let job = api.wait_status(&w.token, &id, "completed", Duration::from_secs(10)).await;
    assert_eq!(job["pr_url"], "https://github.com/acme/shop/pull/9");
    let messages = job["messages"].as_array().unwrap();
    assert_eq!(messages.iter().filter(|m| m["content"] == "only once").count(), 1, "{messages:#?}");
    // The lease ended with the job: later batches are refused.
    let late = json!({"lease_id": assignment.lease_id, "events": [{"index": 3, "type": "log", "stream": "stdout", "content": "late"}]});
    let (_, ack) = api.send(Method::POST, &path, Some(&runner_token), Some(late)).await;
    assert_eq!(ack["lease_valid"], false);
}

/// The edge restarts under a running job: the runner reconnects with backoff, re-announces the
/// job under its lease, and the job finishes on its first attempt with nothing lost.
#[tokio::test]
async fn a_runner_reconnects_after_an_edge_restart_and_finishes_its_job() {
    let mut w = World::start(&[]).await;
    let api = w.api();
    let agent = "echo before restart; sleep 6; echo after restart";
    let runner = w.runner(agent, "process", &[]).await;
    w.wait_runners(1).await;
    let id = api
        .create_job(&w.token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "p", "branchName": "b/restart"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.wait_status(&w.token, &id, "running", JOB_TIMEOUT).await;
    w.edge.restart().await.expect("restarting wrangler dev");
    let api = w.api();
    let job = api.wait_status(&w.token, &id, "completed", JOB_TIMEOUT).await;
    assert_eq!(job["attempts"], 1, "the lease survived the restart: {job:#}");
    let messages = job["messages"].as_array().unwrap();
    assert!(has_message(messages, "stdout", "before restart"), "{messages:#?}");
    assert!(has_message(messages, "stdout", "after restart"), "{messages:#?}");
    let url = runner.health_url();
    eventually(Duration::from_secs(15), "the runner's health to show the edge connected", || {
        let url = url.clone();
        async move {
            let health: Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
            (health["edge"]["connected"] == true).then_some(())
        }
    })
    .await;
}

/// The operator features of a runner against the real edge: the token saved at registration
/// (`RUNNER_STATE_DIR/runner.json`, 0600) takes a restarted runner back in without a registration
/// token; a saved token the edge refuses (401) is replaced by a new registration; the agent gets
/// `RUNNER_AGENT_ENV` but not the runner's secrets; `/metrics` counts the jobs.
#[tokio::test]
async fn a_restarted_runner_reuses_its_saved_token_and_registers_again_when_the_edge_refuses_it() {
    use std::os::unix::fs::PermissionsExt;

    let w = World::start(&[]).await;
    let api = w.api();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().display().to_string();
    let file = state.path().join("runner.json");
    let read = || serde_json::from_str::<Value>(&std::fs::read_to_string(&file).expect("runner.json")).unwrap();
    let agent = "echo \"key=$KILN_E2E_AGENT_KEY gh=${GITHUB_TOKEN:-none} reg=${RUNNER_REGISTRATION_TOKEN:-none}\"";
    let env = [("RUNNER_STATE_DIR", state_dir.as_str()), ("RUNNER_AGENT_ENV", "KILN_E2E_AGENT_KEY"), ("KILN_E2E_AGENT_KEY", "sk-e2e-value")];
    let run_job = |branch: &'static str| {
        let api = api.clone();
        let token = w.token.clone();
        async move {
            let id = api
                .create_job(&token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "p", "branchName": branch}))
                .await["id"]
                .as_str()
                .unwrap()
                .to_string();
            let job = api.wait_status(&token, &id, "completed", JOB_TIMEOUT).await;
            job["messages"].as_array().cloned().unwrap_or_default()
        }
    };

    let mut first = w.runner(agent, "process", &env).await;
    let saved = read();
    let first_token = saved["token"].as_str().unwrap().to_string();
    assert!(!first_token.is_empty() && saved["runner_id"].is_string(), "{saved}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let messages = run_job("b/state-1").await;
    assert!(has_message(&messages, "stdout", "key=sk-e2e-value gh=none reg=none"), "{messages:#?}");
    first.stop();

    // Without a registration token: only the saved token can take it in, and a job completes.
    let mut second = w.runner(agent, "process", &[env[0], env[1], env[2], ("RUNNER_REGISTRATION_TOKEN", "")]).await;
    run_job("b/state-2").await;
    assert_eq!(read()["token"], first_token.as_str(), "no new registration");
    let metrics = reqwest::get(second.health_url().replace("/health", "/metrics")).await.unwrap().text().await.unwrap();
    for line in ["kiln_runner_jobs_ended_total{outcome=\"completed\"} 1", "kiln_runner_edge_connected 1", "kiln_runner_worktrees 0"] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing from\n{metrics}");
    }
    second.stop();

    // A saved token the edge does not know: refused with 401, so the runner registers again.
    let mut forged = read();
    forged["token"] = json!("kiln-e2e-unknown-runner-token");
    std::fs::write(&file, forged.to_string()).unwrap();
    let third = w.runner(agent, "process", &env).await;
    run_job("b/state-3").await;
    let renewed = read()["token"].as_str().unwrap().to_string();
    assert!(renewed != "kiln-e2e-unknown-runner-token" && renewed != first_token, "{renewed}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(third.log().contains("registering again"), "{}", third.log());
}
