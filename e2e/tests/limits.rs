//! Issue 6 items 10 and 11 on the edge, end to end against a real `wrangler dev` (and a real
//! runner process for a long log): request bodies over 1 MiB answer 413; the event log is read a
//! page at a time (a socket's replay, and `includeMessages` with `messagesLimit` /
//! `messagesAfter`); an account holds at most `MAX_REPOSITORIES_PER_OWNER` repositories.

use std::time::{Duration, Instant};

use kiln_e2e::{GitRemotes, Method, StatusCode, TestEdge, TestRunner, WsAuth, WsClient};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

/// Lines the long job's agent prints: with the runner's own lines, more than two replay pages
/// (500 events) and more than the default page of messages (1000).
const LINES: u64 = 1300;

static EDGE: OnceCell<TestEdge> = OnceCell::const_new();

async fn edge() -> &'static TestEdge {
    EDGE.get_or_init(|| async {
        let edge = TestEdge::start(&[("MAX_REPOSITORIES_PER_OWNER", "3")]).await.expect("starting wrangler dev");
        edge.api().grant("*", "acme/*").await;
        edge
    })
    .await
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, needle: &str) {
    assert_eq!(status, want, "{body}");
    let error = body["error"].as_str().unwrap_or_else(|| panic!("errors are {{\"error\"}}: {body}"));
    assert!(error.contains(needle), "{error:?} should say {needle:?}");
}

#[tokio::test]
async fn a_request_body_over_one_mib_is_refused_with_413() {
    let edge = edge().await;
    let api = edge.api();
    let token = api.new_user("limits-413").await;
    let big = "x".repeat(1024 * 1024 + 1);
    let body = json!({"prompt": big, "githubOrg": "acme", "githubRepo": "shop", "branchName": "kiln/too-big"});
    let (status, answer) = api.post("/jobs", &token, body).await;
    assert_error(status, &answer, StatusCode::PAYLOAD_TOO_LARGE, "request body over 1048576 bytes");
    assert_eq!(answer["error"], "request body over 1048576 bytes");
    // Nothing was stored.
    let (_, list) = api.get("/jobs", &token).await;
    assert_eq!(list["total"], 0, "{list}");

    // Any endpoint that reads a body: a client's name, a runner's event batch.
    let (status, answer) = api.post("/clients", &token, json!({"name": "x".repeat(2 * 1024 * 1024)})).await;
    assert_error(status, &answer, StatusCode::PAYLOAD_TOO_LARGE, "request body over");
    let (status, answer) = api
        .send(Method::POST, "/runner/v1/register", Some(&kiln_e2e::runner_registration_token()), Some(json!({"name": big})))
        .await;
    assert_error(status, &answer, StatusCode::PAYLOAD_TOO_LARGE, "request body over");

    // Under the limit, the body is read and validated as before.
    let body = json!({"prompt": "x".repeat(1000 * 1024), "githubOrg": "acme", "githubRepo": "shop", "branchName": "kiln/big"});
    let (status, answer) = api.post("/jobs", &token, body).await;
    assert_ne!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
}

#[tokio::test]
async fn an_account_holds_at_most_max_repositories_per_owner() {
    let edge = edge().await;
    let api = edge.api();
    let token = api.new_user("limits-repos").await;
    let (status, client) = api.post("/clients", &token, json!({"name": "Acme"})).await;
    assert_eq!(status, StatusCode::CREATED, "{client}");
    let id = client["id"].as_str().unwrap();
    let (status, other) = api.post("/clients", &token, json!({"name": "Acme too"})).await;
    assert_eq!(status, StatusCode::CREATED, "{other}");
    let other = other["id"].as_str().unwrap();
    let add = |client: &str, repo: &str| {
        let (api, token, path) = (api.clone(), token.clone(), format!("/clients/{client}/repository"));
        let body = json!({"githubOrg": "acme", "githubRepo": repo});
        async move { api.post(&path, &token, body).await }
    };
    for repo in ["one", "two"] {
        let (status, body) = add(id, repo).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, body) = add(other, "three").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The fourth, on either client, is refused and not stored.
    let (status, body) = add(id, "four").await;
    assert_error(status, &body, StatusCode::CONFLICT, "MAX_REPOSITORIES_PER_OWNER = 3");
    let (status, body) = add(other, "five").await;
    assert_error(status, &body, StatusCode::CONFLICT, "already has 3 repositories");
    let (_, clients) = api.get("/clients", &token).await;
    let held: usize = clients
        .as_array()
        .or_else(|| clients["clients"].as_array())
        .unwrap_or_else(|| panic!("{clients}"))
        .iter()
        .map(|c| c["repositories"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(held, 3, "{clients}");
    // Adding one a client already has only updates it.
    let (status, body) = api
        .post(&format!("/clients/{id}/repository"), &token, json!({"githubOrg": "acme", "githubRepo": "one", "defaultBranch": "trunk"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["repository"]["default_branch"], "trunk");
    // The cap is per account: another user starts from nothing.
    let bob = api.new_user("limits-repos-bob").await;
    let (_, c) = api.post("/clients", &bob, json!({"name": "Bob's"})).await;
    let (status, body) = api
        .post(&format!("/clients/{}/repository", c["id"].as_str().unwrap()), &bob, json!({"githubOrg": "acme", "githubRepo": "four"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Every `seq` of `events`, in order.
fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().filter_map(|e| e["seq"].as_u64()).collect()
}

#[tokio::test]
async fn a_long_log_is_replayed_and_read_a_page_at_a_time() {
    let edge = edge().await;
    let api = edge.api();
    let token = api.new_user("limits-pages").await;
    let remotes = GitRemotes::new();
    remotes.create_with_files("acme", "shop", &[("README.md", "# shop\n")]);
    let base = remotes.base_url();
    let state = tempfile::tempdir().unwrap();
    let agent = format!("head -n 1 >/dev/null; seq -f 'line %g' 1 {LINES}");
    let _runner = TestRunner::start(
        edge,
        &[
            ("RUNNER_STATE_DIR", state.path().to_str().unwrap()),
            ("RUNNER_EXECUTOR", "process"),
            ("RUNNER_AGENT", "text"),
            ("RUNNER_AGENT_CMD", agent.as_str()),
            ("RUNNER_GIT_BASE_URL", base.as_str()),
        ],
    )
    .await
    .expect("starting a runner");
    let created = api
        .create_job(&token, json!({"prompt": "print a long log", "githubOrg": "acme", "githubRepo": "shop", "branchName": "kiln/long-log"}))
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    api.wait_status(&token, &id, "completed", Duration::from_secs(120)).await;

    // The whole log, replayed to a new socket: dense from 1, every line once.
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), None).await.expect("socket");
    let replay = ws.drain(Duration::from_millis(1500)).await;
    let last = *seqs(&replay).last().expect("a replay");
    assert!(last > 2 * 500 + 200, "{last} events: more than two pages");
    assert_eq!(seqs(&replay), (1..=last).collect::<Vec<_>>(), "dense, in order, no duplicate");
    let lines: Vec<&str> = replay
        .iter()
        .filter(|e| e["kind"] == "log" && e["stream"] == "stdout")
        .filter_map(|e| e["content"].as_str())
        .collect();
    assert_eq!(lines.len() as u64, LINES);
    assert_eq!(lines[0], "line 1");
    assert_eq!(lines[LINES as usize - 1], format!("line {LINES}"));
    ws.close().await;

    // Timed: connect to the last event of the replay, whole and from a cursor across a page
    // boundary.
    let is_last = |e: &Value| e["seq"].as_u64() == Some(last);
    let t = Instant::now();
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), None).await.expect("socket");
    let again = ws.until(Duration::from_secs(10), "the last event", is_last).await;
    let replay_ms = t.elapsed().as_millis();
    assert_eq!(seqs(&again), (1..=last).collect::<Vec<_>>());
    ws.close().await;
    let t = Instant::now();
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), Some(499)).await.expect("socket");
    let tail = ws.until(Duration::from_secs(10), "the last event", is_last).await;
    let tail_ms = t.elapsed().as_millis();
    assert_eq!(seqs(&tail), (500..=last).collect::<Vec<_>>());
    assert!(ws.drain(Duration::from_millis(300)).await.is_empty(), "nothing after the last");
    ws.close().await;
    println!("replay of {last} events (pages of 500), connect to last event: {replay_ms} ms; after seq 499: {tail_ms} ms");

    // includeMessages: the first 1000 by default, and where the next page starts.
    let t = Instant::now();
    let (status, job) = api.get(&format!("/jobs/{id}?includeMessages=true"), &token).await;
    let first_ms = t.elapsed().as_millis();
    assert_eq!(status, StatusCode::OK, "{job}");
    let messages = job["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1000);
    assert_eq!(messages[0]["type"], "system", "seed 003's shape: {}", messages[0]);
    assert!(messages[0]["content"].is_string() && messages[0]["created_at"].is_string(), "{}", messages[0]);
    assert_eq!(job["messages_next_after"], 1000);
    let (status, rest) = api.get(&format!("/jobs/{id}?includeMessages=true&messagesAfter=1000"), &token).await;
    assert_eq!(status, StatusCode::OK, "{rest}");
    assert_eq!(rest["messages"].as_array().unwrap().len() as u64, last - 1000);
    assert!(rest.get("messages_next_after").is_none(), "the last page says no more: {rest}");
    let all: Vec<&Value> = messages.iter().chain(rest["messages"].as_array().unwrap()).collect();
    let stdout: Vec<&str> = all.iter().filter(|m| m["type"] == "stdout").filter_map(|m| m["content"].as_str()).collect();
    assert_eq!(stdout.len() as u64, LINES, "the two pages hold every line once");

    // Smaller pages, and bad cursors.
    let (_, page) = api.get(&format!("/jobs/{id}?includeMessages=true&messagesLimit=10&messagesAfter=5"), &token).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 10);
    assert_eq!(page["messages_next_after"], 15);
    for bad in ["messagesLimit=0", "messagesLimit=5000", "messagesLimit=x", "messagesAfter=-1"] {
        let (status, body) = api.get(&format!("/jobs/{id}?includeMessages=true&{bad}"), &token).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, if bad.starts_with("messagesLimit") { "messagesLimit" } else { "messagesAfter" });
    }
    // Without includeMessages, no messages and no cursor.
    let (_, plain) = api.get(&format!("/jobs/{id}"), &token).await;
    assert!(plain.get("messages").is_none() && plain.get("messages_next_after").is_none(), "{plain}");
    println!("GET /jobs/:id?includeMessages=true (1000 of {last} messages): {first_ms} ms");
}
