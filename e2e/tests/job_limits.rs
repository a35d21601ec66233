//! Issue 6, item 8 end to end: a job's `timeoutSeconds` goes from `POST /jobs` through the edge's
//! job row and assignment to a real runner, which ends the job `failed` naming the limit; a retry
//! keeps the limit; a value out of range is refused at create.

use std::time::{Duration, Instant};

use kiln_e2e::{agents, FakeGitHub, GitRemotes, StatusCode, TestEdge, TestRunner};
use serde_json::json;

#[tokio::test]
async fn a_jobs_timeout_seconds_ends_it_on_the_runner_and_survives_a_retry() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    edge.api().grant("*", "acme/*").await;
    let remotes = GitRemotes::new();
    remotes.create_with_files("acme", "shop", &[("README.md", "# shop\n")]);
    let github = FakeGitHub::start("ghp_kiln_test_token");
    let token = edge.api().new_user("job-limits").await;
    let states = tempfile::tempdir().unwrap();
    let state = states.path().join("runner").display().to_string();
    let (base, api_url) = (remotes.base_url(), github.api_url());
    let hang = agents::process_cmd(agents::HANGING);
    let _runner = TestRunner::start(
        &edge,
        &[
            ("RUNNER_STATE_DIR", state.as_str()),
            ("RUNNER_EXECUTOR", "process"),
            ("RUNNER_AGENT", "text"),
            ("RUNNER_AGENT_CMD", hang.as_str()),
            ("RUNNER_GIT_BASE_URL", base.as_str()),
            ("GITHUB_API_URL", api_url.as_str()),
            ("GITHUB_TOKEN", "ghp_kiln_test_token"),
        ],
    )
    .await
    .expect("starting a runner");
    let api = edge.api();

    let (status, body) = api
        .post("/jobs", &token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "x", "branchName": "b/t0", "timeoutSeconds": 0}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body["error"],
        "timeoutSeconds must be an integer from 1 to 86400"
    );

    let t = Instant::now();
    let created = api
        .create_job(&token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": "hang", "branchName": "b/t", "timeoutSeconds": 3}))
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    let job = api
        .wait_status(&token, &id, "failed", Duration::from_secs(60))
        .await;
    eprintln!(
        "job limits: POST /jobs to failed by timeoutSeconds=3 in {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(
        job["error_message"], "The job exceeded its time limit of 3 s (timeoutSeconds)",
        "{job}"
    );

    let (status, retried) = api
        .post(&format!("/jobs/{id}/retry"), &token, json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{retried}");
    let retry = retried["id"].as_str().unwrap();
    let job = api
        .wait_status(&token, retry, "failed", Duration::from_secs(60))
        .await;
    assert_eq!(
        job["error_message"], "The job exceeded its time limit of 3 s (timeoutSeconds)",
        "the retry keeps the limit: {job}"
    );
}
