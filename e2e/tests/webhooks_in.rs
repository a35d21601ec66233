//! Inbound webhooks (issue 12 §1, §3) against a real `wrangler dev`: a signed GitHub
//! `issues.labeled` delivery starts a job that a real runner takes to a pull request (the fake
//! GitHub) and that comments back on the issue; the same delivery twice starts one job; bad
//! signatures, stale or future timestamps and unknown hooks are refused, unmapped events and
//! repositories not granted answer 202 with the reason, and none of them stores anything;
//! secrets are shown once and never listed; management refuses bad input.

use std::time::Duration;

use kiln_e2e::{agents, eventually, Api, FakeGitHub, GitRemotes, StatusCode, TestEdge, TestRunner};
use kiln_schemas::webhooks::{github_signature, signature_header};
use serde_json::{json, Value};

const GITHUB_TOKEN: &str = "ghp_kiln_webhook_token";
const JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// Posts a raw body to a receiver with the given headers.
async fn deliver(api: &Api, path: &str, headers: &[(&str, String)], body: &[u8]) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", api.base()))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.expect("posting a delivery");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A GitHub delivery signed with `secret`.
async fn github(api: &Api, hook: &str, secret: &str, event: &str, delivery: &str, payload: &Value) -> (StatusCode, Value) {
    let body = serde_json::to_vec(payload).unwrap();
    let headers = [
        ("X-GitHub-Event", event.to_string()),
        ("X-GitHub-Delivery", delivery.to_string()),
        ("X-Hub-Signature-256", github_signature(secret.as_bytes(), &body)),
    ];
    deliver(api, &format!("/webhooks/github/{hook}"), &headers, &body).await
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A generic delivery signed with `secret` at `t`.
async fn generic(api: &Api, hook: &str, secret: &str, t: i64, delivery: Option<&str>, payload: &Value) -> (StatusCode, Value) {
    let body = serde_json::to_vec(payload).unwrap();
    let mut headers = vec![("Kiln-Signature", signature_header(secret.as_bytes(), t, &body))];
    if let Some(d) = delivery {
        headers.push(("Kiln-Delivery", d.to_string()));
    }
    deliver(api, &format!("/webhooks/generic/{hook}"), &headers, &body).await
}

fn labeled(org: &str, repo: &str, number: u64, label: &str) -> Value {
    json!({
        "action": "labeled",
        "label": {"name": label},
        "issue": {"number": number, "title": "Add a logout button", "body": "Users cannot sign out."},
        "repository": {"name": repo, "full_name": format!("{org}/{repo}"), "owner": {"login": org}},
        "sender": {"login": "octocat"},
    })
}

async fn job_count(api: &Api, token: &str) -> u64 {
    let (status, list) = api.get("/jobs", token).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list["total"].as_u64().unwrap()
}

fn deliveries_stored(edge: &TestEdge) -> u64 {
    let rows = edge.d1("SELECT count(*) AS n FROM inbound_deliveries").expect("reading D1");
    rows[0]["n"].as_u64().unwrap()
}

#[tokio::test]
async fn a_labeled_issue_runs_a_job_to_a_pull_request_that_comments_back_once_per_delivery() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    api.grant("*", "acme/*").await;
    let remotes = GitRemotes::new();
    remotes.create_with_files("acme", "shop", &[("README.md", "# shop\n")]);
    let gh = FakeGitHub::start(GITHUB_TOKEN);
    let token = api.new_user("hooks").await;

    let (status, hook) = api
        .post(
            "/webhooks",
            &token,
            json!({"kind": "github", "name": "acme issues", "rules": [
                {"event": "issues", "action": "labeled", "label": "kiln", "job": {"jobType": "code"}},
                {"event": "issue_comment", "command": "/kiln", "job": {"jobType": "code"}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{hook}");
    let id = hook["id"].as_str().unwrap().to_string();
    let secret = hook["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{hook}");
    assert_eq!(hook["path"], format!("/webhooks/github/{id}"));

    // GitHub's ping when the hook is added.
    let (status, pong) = github(&api, &id, &secret, "ping", "d-ping", &json!({"zen": "Keep it simple."})).await;
    assert_eq!(status, StatusCode::OK, "{pong}");

    let state = tempfile::tempdir().unwrap();
    let base = remotes.base_url();
    let api_url = gh.api_url();
    let agent = agents::process_cmd(agents::EDITOR);
    let _runner = TestRunner::start(
        &edge,
        &[
            ("RUNNER_STATE_DIR", state.path().to_str().unwrap()),
            ("RUNNER_EXECUTOR", "process"),
            ("RUNNER_AGENT", "text"),
            ("RUNNER_AGENT_CMD", agent.as_str()),
            ("RUNNER_GIT_BASE_URL", base.as_str()),
            ("GITHUB_API_URL", api_url.as_str()),
            ("GITHUB_TOKEN", GITHUB_TOKEN),
        ],
    )
    .await
    .expect("starting a runner");

    let delivery = uuid::Uuid::new_v4().to_string();
    let t0 = std::time::Instant::now();
    let (status, first) = github(&api, &id, &secret, "issues", &delivery, &labeled("acme", "shop", 42, "kiln")).await;
    let answered = t0.elapsed();
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["accepted"], true);
    let job_id = first["job_id"].as_str().unwrap().to_string();
    // GitHub redelivers (or the sender retries): the same answer, no second job.
    let (status, again) = github(&api, &id, &secret, "issues", &delivery, &labeled("acme", "shop", 42, "kiln")).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(again["job_id"], job_id.as_str());

    let job = api.wait_status(&token, &job_id, "completed", JOB_TIMEOUT).await;
    let pr_url = job["pr_url"].as_str().unwrap_or_else(|| panic!("no pull request: {job:#}")).to_string();
    assert_eq!(job["branch_name"], "kiln/issue-42");
    assert!(job["prompt"].as_str().unwrap().starts_with("Add a logout button\n\nUsers cannot sign out."), "{job}");
    assert_eq!(job["repository"]["owner_name"], "acme");
    let prs = gh.created();
    assert_eq!(prs.len(), 1, "{prs:?}");
    assert_eq!(prs[0].body["head"], "kiln/issue-42");

    // §3: the job answered on its issue with the pull request's link.
    let comments = eventually(Duration::from_secs(10), "the issue comment", || {
        let c = gh.comments();
        async move { (!c.is_empty()).then_some(c) }
    })
    .await;
    assert_eq!(comments.len(), 1, "{comments:?}");
    let c = &comments[0];
    assert_eq!((c.owner.as_str(), c.repo.as_str(), c.number, c.status), ("acme", "shop", 42, 201), "{c:?}");
    assert_eq!(c.token.as_deref(), Some(GITHUB_TOKEN));
    let text = c.body["body"].as_str().unwrap();
    assert!(text.contains(&pr_url) && text.contains(&job_id), "{text}");

    // A later delivery for the same issue (labelled again) is a new job on a branch of its own.
    let second = uuid::Uuid::new_v4().to_string();
    let (status, other) = github(&api, &id, &secret, "issues", &second, &labeled("acme", "shop", 42, "kiln")).await;
    assert_eq!(status, StatusCode::CREATED, "{other}");
    assert_ne!(other["job_id"], job_id.as_str());
    let job2 = api.job(&token, other["job_id"].as_str().unwrap()).await;
    let branch2 = job2["branch_name"].as_str().unwrap();
    assert!(branch2.starts_with("kiln/issue-42-") && branch2 != "kiln/issue-42", "{job2}");
    api.wait_status(&token, other["job_id"].as_str().unwrap(), "completed", JOB_TIMEOUT).await;

    // Comments: a writer's command starts a job; anyone else's does not.
    let comment = |assoc: &str, text: &str| {
        json!({"action": "created", "comment": {"body": text, "author_association": assoc},
               "issue": {"number": 7, "title": "Flaky test", "body": ""},
               "repository": {"name": "shop", "owner": {"login": "acme"}}})
    };
    let (status, refused) = github(&api, &id, &secret, "issue_comment", "d-c1", &comment("NONE", "/kiln rm -rf /")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{refused}");
    assert_eq!(refused["accepted"], false);
    let (status, by_member) =
        github(&api, &id, &secret, "issue_comment", "d-c2", &comment("MEMBER", "/kiln fix the failing test")).await;
    assert_eq!(status, StatusCode::CREATED, "{by_member}");
    let job3 = api.job(&token, by_member["job_id"].as_str().unwrap()).await;
    assert!(job3["prompt"].as_str().unwrap().starts_with("fix the failing test"), "{job3}");
    assert_eq!(job_count(&api, &token).await, 3);
    println!("webhook delivery answered (job created) in {} ms", answered.as_millis());
}

#[tokio::test]
async fn webhooks_refuse_bad_deliveries_and_bad_input_and_store_nothing() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    api.grant("*", "acme/*").await;
    let token = api.new_user("hooks").await;
    let stranger = api.new_user("stranger").await;

    // Management: authentication and bad input.
    let (status, _) = api.send(reqwest::Method::GET, "/webhooks", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for (body, want) in [
        (json!({"kind": "gitlab", "name": "x", "rules": []}), "kind"),
        (json!({"kind": "github", "name": "x"}), "at least one rule"),
        (json!({"kind": "github", "name": "x", "rules": [{"event": "issues", "action": "labeled"}]}), "label"),
        (json!({"kind": "github", "name": "x", "rules": [{"event": "issues", "action": "labeled", "label": "k", "job": {"githubRepo": "x"}}]}), "comes from the event"),
        (json!({"kind": "generic", "name": "x"}), "template"),
        (json!({"kind": "generic", "name": "x", "template": {"prompt": "{{ process.env }}"}}), "path"),
        (json!({"kind": "generic", "name": "x", "template": {"p": "x"}, "secret": "mine"}), "unknown field"),
        (json!("hook"), "JSON object"),
    ] {
        let (status, err) = api.post("/webhooks", &token, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert!(err["error"].as_str().unwrap().contains(want), "{body}: {err}");
    }
    let (status, err) = api
        .send_raw(reqwest::Method::POST, "/webhooks", Some(&format!("Bearer {token}")), Some("application/json"), "{nope")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");

    let (status, gh_hook) = api
        .post("/webhooks", &token, json!({"kind": "github", "name": "gh", "rules": [
            {"event": "issues", "action": "labeled", "label": "kiln", "job": {"jobType": "task"}}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{gh_hook}");
    let gh_id = gh_hook["id"].as_str().unwrap().to_string();
    let gh_secret = gh_hook["secret"].as_str().unwrap().to_string();
    let (status, gen_hook) = api
        .post("/webhooks", &token, json!({"kind": "generic", "name": "alerts", "template": {
            "prompt": "{{ body.title }}: {{ body.text }}", "githubOrg": "acme", "githubRepo": "{{ body.repo }}", "jobType": "task",
            "priority": "{{ body.priority }}"}}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{gen_hook}");
    let gen_id = gen_hook["id"].as_str().unwrap().to_string();
    let gen_secret = gen_hook["secret"].as_str().unwrap().to_string();

    // Secrets are shown once: never listed, never in a get, never stored in the clear.
    let (status, list) = api.get("/webhooks", &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 2, "{list}");
    let (_, one) = api.get(&format!("/webhooks/{gh_id}"), &token).await;
    for shown in [list.to_string(), one.to_string()] {
        assert!(!shown.contains(&gh_secret) && !shown.contains(&gen_secret) && !shown.contains("\"secret\""), "{shown}");
    }
    assert_eq!(one["rules"][0]["label"], "kiln");
    let stored = edge.d1("SELECT secret FROM webhooks").unwrap();
    for row in &stored {
        let s = row["secret"].as_str().unwrap();
        assert!(s.starts_with("v1:") && !s.contains(&gh_secret[6..]) && !s.contains(&gen_secret[6..]), "{s}");
    }
    // Owner scoping.
    let (status, _) = api.get(&format!("/webhooks/{gh_id}"), &stranger).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api.post(&format!("/webhooks/{gh_id}/rotate-secret"), &stranger, json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api.send(reqwest::Method::DELETE, &format!("/webhooks/{gh_id}"), Some(&stranger), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, theirs) = api.get("/webhooks", &stranger).await;
    assert_eq!(theirs["webhooks"], json!([]));
    let (status, _) = api.get("/webhooks/not-an-id", &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Refused deliveries: nothing stored, no job.
    let payload = labeled("acme", "shop", 5, "kiln");
    let body = serde_json::to_vec(&payload).unwrap();
    let bad_sig = [
        ("X-GitHub-Event", "issues".to_string()),
        ("X-GitHub-Delivery", "d-bad".to_string()),
        ("X-Hub-Signature-256", github_signature(b"not the secret", &body)),
    ];
    let (status, err) = deliver(&api, &format!("/webhooks/github/{gh_id}"), &bad_sig, &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
    let unsigned = [("X-GitHub-Event", "issues".to_string()), ("X-GitHub-Delivery", "d-none".to_string())];
    let (status, _) = deliver(&api, &format!("/webhooks/github/{gh_id}"), &unsigned, &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, err) = github(&api, &uuid::Uuid::new_v4().to_string(), &gh_secret, "issues", "d-x", &payload).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    // A generic hook's id on the GitHub receiver is unknown there too.
    let (status, _) = github(&api, &gen_id, &gen_secret, "issues", "d-y", &payload).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Unmapped: another label, another event, an action the rules do not name.
    for (event, p, why) in [
        ("issues", labeled("acme", "shop", 5, "bug"), "label"),
        ("push", json!({"ref": "refs/heads/main", "repository": {"name": "shop", "owner": {"login": "acme"}}}), "no rule"),
        ("issues", json!({"action": "opened", "issue": {"number": 5, "title": "t"}, "repository": {"name": "shop", "owner": {"login": "acme"}}}), "opened"),
    ] {
        let (status, a) = github(&api, &gh_id, &gh_secret, event, "d-unmapped", &p).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{a}");
        assert_eq!(a["accepted"], false);
        assert!(a["reason"].as_str().unwrap().contains(why), "{a}");
    }
    // A repository not granted to the hook's owner.
    let (status, a) = github(&api, &gh_id, &gh_secret, "issues", "d-other", &labeled("other", "repo", 1, "kiln")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{a}");
    assert!(a["reason"].as_str().unwrap().contains("other/repo"), "{a}");

    // Generic: a stale, a future and a forged signature are refused; the template maps a body.
    let alert = json!({"title": "Disk full", "text": "on db-1", "repo": "shop", "priority": 5});
    let now = unix_now();
    for (t, secret, why) in [(now - 301, gen_secret.as_str(), "older"), (now + 400, gen_secret.as_str(), "future"), (now, "forged", "match")] {
        let (status, err) = generic(&api, &gen_id, secret, t, None, &alert).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{t}: {err}");
        assert!(err["error"].as_str().unwrap().contains(why), "{err}");
    }
    let (status, err) = deliver(&api, &format!("/webhooks/generic/{gen_id}"), &[], b"{}").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
    let (status, a) = generic(&api, &gen_id, &gen_secret, now, None, &json!({"title": "no text", "repo": "shop", "priority": 1})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{a}");
    assert!(a["reason"].as_str().unwrap().contains("body.text"), "{a}");
    let (status, a) = generic(&api, &gen_id, &gen_secret, now, None, &json!({"title": "x", "text": "y", "repo": "shop", "priority": 500})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{a}");
    assert!(a["reason"].as_str().unwrap().contains("priority"), "{a}");
    assert_eq!(job_count(&api, &token).await, 0, "refused deliveries start nothing");
    assert_eq!(deliveries_stored(&edge), 0, "and store nothing");

    let (status, a) = generic(&api, &gen_id, &gen_secret, now, Some("alert-1"), &alert).await;
    assert_eq!(status, StatusCode::CREATED, "{a}");
    let job_id = a["job_id"].as_str().unwrap().to_string();
    let job = api.job(&token, &job_id).await;
    assert_eq!(job["prompt"], "Disk full: on db-1");
    assert_eq!(job["priority"], 5);
    assert_eq!(job["job_type"], "task");
    // The same delivery id, signed again later: the same job.
    let (status, again) = generic(&api, &gen_id, &gen_secret, now + 2, Some("alert-1"), &alert).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(again["job_id"], job_id.as_str());
    // Without an id, a replay of the same signed request is the same delivery.
    let replayed = json!({"title": "CPU", "text": "hot", "repo": "shop", "priority": 1});
    let (_, r1) = generic(&api, &gen_id, &gen_secret, now, None, &replayed).await;
    let (_, r2) = generic(&api, &gen_id, &gen_secret, now, None, &replayed).await;
    assert_eq!(r1["job_id"], r2["job_id"], "{r1} {r2}");
    assert_eq!(job_count(&api, &token).await, 2);
    assert_eq!(deliveries_stored(&edge), 2);
    // The same delivery sent five times at once: one job; the others answer it or 409 (retry).
    let burst = json!({"title": "burst", "text": "x", "repo": "shop", "priority": 0});
    let answers = futures::future::join_all(
        (0..5).map(|_| generic(&api, &gen_id, &gen_secret, unix_now(), Some("burst-1"), &burst)),
    )
    .await;
    let ids: std::collections::HashSet<String> =
        answers.iter().filter_map(|(_, a)| a["job_id"].as_str().map(str::to_string)).collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    for (status, a) in &answers {
        assert!(*status == StatusCode::CREATED || *status == StatusCode::CONFLICT, "{status} {a}");
    }
    assert_eq!(job_count(&api, &token).await, 3);

    // What a sender waits for: signature, mapping, grants, claim, room, row and queue.
    let mut took = vec![];
    for i in 0..20 {
        let body = json!({"title": format!("timed {i}"), "text": "x", "repo": "shop", "priority": 0});
        let t = std::time::Instant::now();
        let (status, a) = generic(&api, &gen_id, &gen_secret, unix_now(), Some(&format!("timed-{i}")), &body).await;
        took.push(t.elapsed().as_millis());
        assert_eq!(status, StatusCode::CREATED, "{a}");
    }
    took.sort();
    println!("generic delivery -> 201 with a queued job, 20 deliveries: p50 {} ms, max {} ms", took[10], took[19]);
    assert_eq!(job_count(&api, &token).await, 23);

    // Rotation: the old secret stops verifying at once, the new one works.
    let (status, rotated) = api.post(&format!("/webhooks/{gen_id}/rotate-secret"), &token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, gen_secret);
    assert!(rotated["secret_rotated_at"].is_string());
    let fresh = json!({"title": "x", "text": "y", "repo": "shop", "priority": 0});
    let (status, _) = generic(&api, &gen_id, &gen_secret, unix_now(), Some("alert-2"), &fresh).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, ok) = generic(&api, &gen_id, &new_secret, unix_now(), Some("alert-2"), &fresh).await;
    assert_eq!(status, StatusCode::CREATED, "{ok}");

    // Deleted: unknown from then on.
    let (status, _) = api.send(reqwest::Method::DELETE, &format!("/webhooks/{gen_id}"), Some(&token), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = generic(&api, &gen_id, &new_secret, unix_now(), Some("alert-3"), &fresh).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api.get(&format!("/webhooks/{gen_id}"), &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
