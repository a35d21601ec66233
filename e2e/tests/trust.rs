//! Issue 6's trust boundaries on the edge, end to end against a real `wrangler dev`:
//! repositories are granted, not named (`/grants`); protected branches are refused at create; a
//! job's event posts and heartbeats belong to the runner that holds its lease; production settings
//! refuse tokens in URLs, `?token=` never takes the service secret, and a socket ends with its JWT.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kiln_e2e::{agent_api_secret, unique_email, Api, Method, StatusCode, TestEdge, WsAuth, WsClient};
use kiln_schemas::runner::{Assignment, EdgeMessage, HeldJob, RunnerMessage};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WAIT: Duration = Duration::from_secs(10);

fn job(org: &str, repo: &str, branch: &str) -> Value {
    json!({"prompt": "Add a logout button", "githubOrg": org, "githubRepo": repo, "branchName": branch})
}

fn not_granted(org_repo: &str) -> Value {
    json!({"error": format!("repository {org_repo} is not granted to this account; an operator grants it with POST /grants")})
}

async fn total_jobs(api: &Api, token: &str) -> u64 {
    let (status, list) = api.get("/jobs", token).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list["total"].as_u64().unwrap()
}

async fn user_id(api: &Api, email: &str) -> (String, String) {
    let (status, user) = api.register(email, kiln_e2e::PASSWORD).await;
    assert!(status.is_success(), "{user}");
    let (_, pair) = api.login(email, kiln_e2e::PASSWORD).await;
    (user["id"].as_str().unwrap().to_string(), pair["access"].as_str().unwrap().to_string())
}

// --- 1. repositories are granted, not named ------------------------------------------------------

#[tokio::test]
async fn the_grants_api_is_the_operators_and_users_see_what_applies_to_them() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    let service = agent_api_secret();
    let ann_email = unique_email("ann");
    let (ann_id, ann) = user_id(&api, &ann_email).await;
    let (bob_id, bob) = user_id(&api, &unique_email("bob")).await;

    // Only the service principal manages grants.
    let (status, body) = api.post("/grants", &ann, json!({"owner": ann_id, "repository": "acme/shop"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"].is_string(), "{body}");
    let (status, _) = api.send(Method::POST, "/grants", None, Some(json!({"owner": "*", "repository": "acme/shop"}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for (bad, what) in [
        (json!({}), "empty body"),
        (json!({"owner": "*"}), "no repository"),
        (json!({"repository": "acme/shop"}), "no owner"),
        (json!({"owner": "*", "repository": "acme"}), "no repository name"),
        (json!({"owner": "*", "repository": "*/*"}), "every org"),
        (json!({"owner": "*", "repository": "acme/sh*"}), "a partial wildcard"),
        (json!({"owner": "*", "repository": "../etc/x"}), "a path"),
        (json!({"owner": "somebody", "repository": "acme/shop"}), "an owner that is no id, email or *"),
        (json!({"owner": 5, "repository": "acme/shop"}), "owner not a string"),
    ] {
        let (status, body) = api.post("/grants", &service, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert!(body["error"].is_string(), "{what}: {body}");
    }

    // By id, by email (in any case), to everyone; repositories are stored lowercase.
    let (status, by_id) = api.post("/grants", &service, json!({"owner": ann_id, "repository": "Acme/Shop"})).await;
    assert_eq!(status, StatusCode::CREATED, "{by_id}");
    assert_eq!((by_id["owner"].clone(), by_id["repository"].clone()), (json!(ann_id), json!("acme/shop")), "{by_id}");
    uuid::Uuid::parse_str(by_id["id"].as_str().unwrap()).expect("grant ids are UUIDs");
    chrono::DateTime::parse_from_rfc3339(by_id["created_at"].as_str().unwrap()).expect("created_at is RFC 3339");
    let (status, again) = api.post("/grants", &service, json!({"owner": ann_id, "repository": "acme/shop"})).await;
    assert_eq!((status, again["id"].clone()), (StatusCode::OK, by_id["id"].clone()), "the same grant twice is one grant");
    let by_email = api.grant(&ann_email.to_uppercase(), "acme/web").await;
    assert_eq!(by_email["owner"], ann_email.as_str(), "{by_email}");
    let everyone = api.grant("*", "public/*").await;
    let bobs = api.grant(&bob_id, "bob/*").await;

    let ids = |list: &Value| -> Vec<Value> { list["grants"].as_array().unwrap().iter().map(|g| g["id"].clone()).collect() };
    let (status, all) = api.get("/grants", &service).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(ids(&all), vec![by_id["id"].clone(), by_email["id"].clone(), everyone["id"].clone(), bobs["id"].clone()], "{all}");
    let (_, only_bob) = api.get(&format!("/grants?owner={bob_id}"), &service).await;
    assert_eq!(ids(&only_bob), vec![bobs["id"].clone()], "{only_bob}");
    let (_, only_everyone) = api.get("/grants?owner=*", &service).await;
    assert_eq!(ids(&only_everyone), vec![everyone["id"].clone()], "{only_everyone}");
    let (status, _) = api.get("/grants?owner=nobody", &service).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A user sees what applies to them: theirs by id and email, and everyone's; never another's.
    let (status, anns) = api.get("/grants", &ann).await;
    assert_eq!(status, StatusCode::OK, "{anns}");
    assert_eq!(ids(&anns), vec![by_id["id"].clone(), by_email["id"].clone(), everyone["id"].clone()], "{anns}");
    let (_, bobs_view) = api.get("/grants?owner=*", &bob).await;
    assert_eq!(ids(&bobs_view), vec![everyone["id"].clone(), bobs["id"].clone()], "{bobs_view}");

    // Revoking: the operator's only; an unknown id is a 404.
    let path = format!("/grants/{}", bobs["id"].as_str().unwrap());
    let (status, body) = api.send(Method::DELETE, &path, Some(&bob), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = api.send(Method::DELETE, &path, Some(&service), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = api.send(Method::DELETE, &path, Some(&service), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    for missing in [uuid::Uuid::new_v4().to_string(), "not-a-uuid".to_string()] {
        let (status, body) = api.send(Method::DELETE, &format!("/grants/{missing}"), Some(&service), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    let (_, after) = api.get("/grants", &bob).await;
    assert_eq!(ids(&after), vec![everyone["id"].clone()], "{after}");
}

#[tokio::test]
async fn a_user_names_only_granted_repositories_and_nothing_else_is_stored() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    let service = agent_api_secret();
    let ann_email = unique_email("ann");
    let (ann_id, ann) = user_id(&api, &ann_email).await;
    let bob = api.new_user("bob").await;

    // Nothing is granted by default: no job, no client repository.
    let (status, body) = api.post("/jobs", &ann, job("acme", "shop", "feature/a")).await;
    assert_eq!((status, body.clone()), (StatusCode::FORBIDDEN, not_granted("acme/shop")), "{body}");
    let (status, body) = api
        .post("/jobs", &ann, json!({"prompt": "p", "githubOrg": "acme", "githubRepo": "shop", "jobType": "ralph", "feedbackCommands": ["cat .env"]}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (_, client) = api.post("/clients", &ann, json!({"name": "Acme"})).await;
    let client_id = client["id"].as_str().unwrap().to_string();
    let add = |org: &str, repo: &str| json!({"githubOrg": org, "githubRepo": repo, "defaultBranch": "main"});
    let (status, body) = api.post(&format!("/clients/{client_id}/repository"), &ann, add("acme", "shop")).await;
    assert_eq!((status, body.clone()), (StatusCode::FORBIDDEN, not_granted("acme/shop")), "{body}");
    let (_, stored) = api.get(&format!("/clients/{client_id}"), &ann).await;
    assert_eq!(stored["repository"], Value::Null, "{stored}");
    assert_eq!(total_jobs(&api, &ann).await, 0);

    // The service principal names any repository, as seed 003 documents.
    let (status, body) = api.post("/jobs", &service, job("anything", "at-all", "feature/service")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // An org grant by email covers the org's repositories, in any case, and nothing else.
    let grant = api.grant(&ann_email, "acme/*").await;
    let (status, body) = api.post("/jobs", &ann, job("Acme", "SHOP", "feature/a")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let first = body["id"].as_str().unwrap().to_string();
    for (org, repo) in [("acmecorp", "shop"), ("acm", "shop"), ("other", "shop")] {
        let (status, body) = api.post("/jobs", &ann, job(org, repo, "feature/a")).await;
        assert_eq!((status, body.clone()), (StatusCode::FORBIDDEN, not_granted(&format!("{org}/{repo}"))), "{body}");
    }
    // Another user is not covered by Ann's grant.
    let (status, body) = api.post("/jobs", &bob, job("acme", "shop", "feature/b")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = api.post(&format!("/clients/{client_id}/repository"), &ann, add("acme", "shop")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let repo_id = body["repository"]["id"].as_str().unwrap().to_string();
    let (status, body) = api.post("/jobs", &ann, json!({"prompt": "p", "clientId": client_id, "branchName": "feature/c"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // An exact grant by id, and one to everyone.
    api.grant(&ann_id, "solo/one").await;
    let (status, _) = api.post("/jobs", &ann, job("solo", "one", "feature/s")).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = api.post("/jobs", &ann, job("solo", "two", "feature/s")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    api.grant("*", "public/shop").await;
    let (status, body) = api.post("/jobs", &bob, job("public", "shop", "feature/b")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(total_jobs(&api, &ann).await, 3);

    // Revoked: no new job, no retry, no repository work (refused before any runner is asked).
    let (status, _) = api.post(&format!("/jobs/{first}/cancel"), &ann, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api.send(Method::DELETE, &format!("/grants/{}", grant["id"].as_str().unwrap()), Some(&service), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = api.post(&format!("/jobs/{first}/retry"), &ann, json!({})).await;
    assert_eq!((status, body.clone()), (StatusCode::FORBIDDEN, not_granted("Acme/SHOP")), "a revoked grant stops retries: {body}");
    let (status, body) = api.post("/jobs", &ann, json!({"prompt": "p", "clientId": client_id, "branchName": "feature/d"})).await;
    assert_eq!((status, body.clone()), (StatusCode::FORBIDDEN, not_granted("acme/shop")), "{body}");
    for path in ["/sync".to_string(), "/repos/clone".to_string(), format!("/repos/{repo_id}/clone")] {
        let (status, body) = api.post(&path, &ann, json!({})).await;
        assert_eq!((status, body.clone()), (StatusCode::FORBIDDEN, not_granted("acme/shop")), "{path}: {body}");
    }
    assert_eq!(total_jobs(&api, &ann).await, 3, "nothing refused was stored");
    // Another owner's repository id stays a 404.
    let (status, _) = api.post(&format!("/repos/{repo_id}/clone"), &bob, json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

// --- 3. never push to a protected branch --------------------------------------------------------

#[tokio::test]
async fn protected_branches_and_the_default_branch_are_refused_at_create() {
    let edge = TestEdge::start(&[("PROTECTED_BRANCHES", "main,master,develop,release/*,hotfix/*")]).await.expect("starting wrangler dev");
    let api = edge.api();
    api.grant("*", "acme/*").await;
    let token = api.new_user("branches").await;
    let service = agent_api_secret();

    for branch in ["main", "master", "develop", "release/1.0", "release/a/b", "hotfix/urgent"] {
        for who in [&token, &service] {
            let (status, body) = api.post("/jobs", who, job("acme", "shop", branch)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{branch}: {body}");
            let error = body["error"].as_str().unwrap_or_default();
            assert!(error.starts_with(&format!("branchName {branch} is protected: ")), "{branch}: {body}");
        }
    }
    for branch in ["feature/main", "mainline", "releases/1", "Main"] {
        let (status, body) = api.post("/jobs", &token, job("acme", "shop", branch)).await;
        assert_eq!(status, StatusCode::CREATED, "{branch} is not protected: {body}");
    }

    // The repository's default branch, from the client's repository.
    let (_, client) = api.post("/clients", &token, json!({"name": "Trunk"})).await;
    let client_id = client["id"].as_str().unwrap().to_string();
    let (status, added) = api
        .post(&format!("/clients/{client_id}/repository"), &token, json!({"githubOrg": "acme", "githubRepo": "web", "defaultBranch": "trunk"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{added}");
    let repo_id = added["repository"]["id"].as_str().unwrap().to_string();
    let (status, body) = api.post("/jobs", &token, json!({"prompt": "p", "clientId": client_id, "branchName": "trunk"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().starts_with("branchName trunk is protected: "), "{body}");
    let (status, body) = api
        .post("/jobs", &token, json!({"prompt": "p", "githubOrg": "acme", "githubRepo": "web", "repositoryId": repo_id, "branchName": "trunk"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a named repository id gives the default branch: {body}");
    let (status, body) = api.post("/jobs", &token, json!({"prompt": "p", "clientId": client_id, "branchName": "feature/x"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(total_jobs(&api, &token).await, 5, "nothing refused was stored");
}

// --- 4. event posts and heartbeats belong to the lease holder ------------------------------------

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A runner socket driven by hand that says only what a test tells it (no heartbeats of its own).
struct HandRunner {
    token: String,
    ws: kiln_e2e::RunnerSocket,
}

impl HandRunner {
    async fn connect(edge: &TestEdge, name: &str, capacity: u32, running: Vec<HeldJob>) -> HandRunner {
        let (token, ws) = kiln_e2e::runner_socket(edge, name).await;
        let mut runner = HandRunner { token, ws };
        runner.send(&RunnerMessage::Hello { name: name.into(), capacity, running, version: "test".into(), tools: None }).await;
        runner
    }

    async fn send(&mut self, msg: &RunnerMessage) {
        self.ws.send(Message::Text(serde_json::to_string(msg).unwrap().into())).await.expect("sending to the edge");
    }

    /// The next edge message within `timeout`, if any.
    async fn next(&mut self, timeout: Duration) -> Option<EdgeMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(t.as_str()).expect("an edge message")),
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("the runner socket ended: {other:?}"),
            }
        }
    }

    async fn assignment(&mut self) -> Assignment {
        loop {
            match self.next(WAIT).await {
                Some(EdgeMessage::Assign { assignment }) => return assignment,
                Some(_) => continue,
                None => panic!("no assignment within {WAIT:?}"),
            }
        }
    }

    async fn post(&self, api: &Api, job_id: &str, lease_id: &str, index: u64, content: &str) -> (StatusCode, Value) {
        let batch = json!({"lease_id": lease_id, "events": [{"index": index, "type": "log", "stream": "stdout", "content": content}]});
        api.send(Method::POST, &format!("/runner/v1/jobs/{job_id}/events"), Some(&self.token), Some(batch)).await
    }
}

fn stdout_lines(job: &Value) -> Vec<String> {
    job["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["type"] == "stdout")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn event_posts_and_heartbeats_belong_to_the_runner_holding_the_lease() {
    let edge = TestEdge::start(&[("LEASE_SECS", "3"), ("HEARTBEAT_SECS", "1")]).await.expect("starting wrangler dev");
    let api = edge.api();
    api.grant("*", "acme/*").await;
    let user = api.new_user("lease").await;

    let mut a = HandRunner::connect(&edge, "holder", 1, vec![]).await;
    let id = api.create_job(&user, job("acme", "shop", "feature/lease")).await["id"].as_str().unwrap().to_string();
    let lease = a.assignment().await;
    assert_eq!((lease.job_id.as_str(), lease.attempt), (id.as_str(), 1));
    api.wait_status(&user, &id, "running", WAIT).await;

    // B announces A's job under A's lease: the edge tells B to drop it, and the lease stays A's.
    let held = vec![HeldJob { job_id: id.clone(), lease_id: lease.lease_id.clone() }];
    let mut b = HandRunner::connect(&edge, "intruder", 2, held.clone()).await;
    let mut cancelled = false;
    while let Some(msg) = b.next(Duration::from_secs(2)).await {
        if matches!(&msg, EdgeMessage::Cancel { job_id } if *job_id == id) {
            cancelled = true;
            break;
        }
    }
    assert!(cancelled, "B was not told to drop a job it holds no lease on");

    // B's batch under A's lease id is refused and stores nothing; A's is stored.
    let (status, ack) = b.post(&api, &id, &lease.lease_id, 0, "forged by B").await;
    assert_eq!(status, StatusCode::CONFLICT, "{ack}");
    assert_eq!((ack["lease_valid"].clone(), ack["stored"].clone()), (json!(false), json!(0)), "{ack}");
    assert!(ack["error"].is_string(), "{ack}");
    let (status, ack) = a.post(&api, &id, &lease.lease_id, 0, "from A").await;
    assert_eq!((status, ack.clone()), (StatusCode::OK, json!({"stored": 1, "duplicates": 0, "lease_valid": true})));
    assert_eq!(stdout_lines(&api.wait_status(&user, &id, "running", WAIT).await), vec!["from A".to_string()]);

    // A goes silent while B keeps naming A's lease in its heartbeats: the lease is not renewed,
    // expires after LEASE_SECS, and the job moves only by being requeued (to B, the freest runner).
    let started = Instant::now();
    let requeued = 'beat: loop {
        assert!(started.elapsed() < Duration::from_secs(15), "the lease was kept alive by another runner's heartbeats");
        b.send(&RunnerMessage::Heartbeat { running: held.clone() }).await;
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Some(msg) = b.next(until.saturating_duration_since(tokio::time::Instant::now())).await {
            if let EdgeMessage::Assign { assignment } = msg {
                break 'beat assignment;
            }
        }
    };
    assert!(started.elapsed() >= Duration::from_secs(1), "requeued only once the lease ran out: {:?}", started.elapsed());
    assert_eq!((requeued.job_id.as_str(), requeued.attempt), (id.as_str(), 2), "{requeued:?}");
    assert_ne!(requeued.lease_id, lease.lease_id);
    let job = api.wait_status(&user, &id, "running", WAIT).await;
    assert_eq!(job["attempts"], 2, "{job}");
    assert!(
        job["messages"].as_array().unwrap().iter().any(|m| m["content"].as_str().is_some_and(|c| c.contains("runner lost"))),
        "{job:#}"
    );
    // A's old lease is stale now; B's new one is B's alone.
    let (status, ack) = a.post(&api, &id, &lease.lease_id, 1, "late from A").await;
    assert_eq!((status, ack["lease_valid"].clone()), (StatusCode::OK, json!(false)), "{ack}");
    let (status, ack) = a.post(&api, &id, &requeued.lease_id, 0, "A under B's lease").await;
    assert_eq!((status, ack["lease_valid"].clone()), (StatusCode::CONFLICT, json!(false)), "{ack}");
    let (status, ack) = b.post(&api, &id, &requeued.lease_id, 0, "from B").await;
    assert_eq!((status, ack["stored"].clone()), (StatusCode::OK, json!(1)), "{ack}");
    let (_, job) = api.get(&format!("/jobs/{id}?includeMessages=true"), &user).await;
    assert_eq!(stdout_lines(&job), vec!["from A".to_string(), "from B".to_string()], "{job:#}");
}

// --- 6. production settings, query tokens, socket lifetime ---------------------------------------

#[tokio::test]
async fn the_service_secret_is_never_a_query_token() {
    let edge = TestEdge::start(&[("ALLOW_WS_TOKEN_QUERY", "true")]).await.expect("starting wrangler dev");
    let api = edge.api();
    let service = agent_api_secret();
    let id = api.create_job(&service, job("acme", "shop", "feature/service-socket")).await["id"].as_str().unwrap().to_string();
    let refused = WsClient::connect(&edge.ws_url(), &id, WsAuth::Query(&service), None).await.err().expect("refused");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    let mut by_header = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&service), None).await.expect("the header works");
    assert_eq!(by_header.expect_json(WAIT, "the creation event").await["kind"], "jobStatus");

    // A user's JWT in the query still works in development.
    api.grant("*", "acme/*").await;
    let user = api.new_user("query").await;
    let mine = api.create_job(&user, job("acme", "shop", "feature/query")).await["id"].as_str().unwrap().to_string();
    WsClient::connect(&edge.ws_url(), &mine, WsAuth::Query(&user), None).await.expect("a user's JWT in ?token=");
}

#[tokio::test]
async fn the_production_environment_refuses_tokens_in_urls() {
    let edge = TestEdge::start_env("production", &[]).await.expect("starting wrangler dev --env production");
    let api = edge.api();
    let (status, health) = api.send(Method::GET, "/health", None, None).await;
    assert_eq!((status, health["queue"]["maxConcurrent"].clone()), (StatusCode::OK, json!(2)), "{health}");
    api.grant("*", "acme/*").await;
    let user = api.new_user("prod").await;
    let id = api.create_job(&user, job("acme", "shop", "feature/prod")).await["id"].as_str().unwrap().to_string();
    let refused = WsClient::connect(&edge.ws_url(), &id, WsAuth::Query(&user), None).await.err().expect("refused");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    assert!(refused.body.contains("?token= is disabled"), "{refused:?}");
    let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&user), None).await.expect("the header works");
    assert_eq!(ws.expect_json(WAIT, "the creation event").await["kind"], "jobStatus");
    // The production settings keep the protected branches.
    let (status, body) = api.post("/jobs", &user, job("acme", "shop", "main")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

/// Reads a socket until the server closes it; answers the messages before the close and the close
/// frame's code and reason.
async fn until_closed(ws: &mut Socket, timeout: Duration) -> (Vec<Value>, Option<(CloseCode, String)>) {
    let mut seen = vec![];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("the socket stayed open {timeout:?}; got {seen:#?}"),
            Ok(Some(Ok(Message::Text(t)))) => seen.push(serde_json::from_str(t.as_str()).expect("JSON")),
            Ok(Some(Ok(Message::Close(frame)))) => return (seen, frame.map(|f| (f.code, f.reason.to_string()))),
            Ok(Some(Ok(_))) => continue,
            Ok(None) | Ok(Some(Err(_))) => return (seen, None),
        }
    }
}

#[tokio::test]
async fn a_socket_is_closed_when_its_access_token_expires() {
    const TTL: u64 = 3;
    let edge = TestEdge::start(&[("ACCESS_TOKEN_TTL_SECS", "3")]).await.expect("starting wrangler dev");
    let api = edge.api();
    api.grant("*", "acme/*").await;
    let email = unique_email("expiry");
    let (_, first) = user_id(&api, &email).await;
    let id = api.create_job(&first, job("acme", "shop", "feature/expiry")).await["id"].as_str().unwrap().to_string();

    // A fresh token for each socket: one by header, one by query; a service socket has no expiry.
    let connect = |auth: &'static str| {
        let (api, email, base, id) = (api.clone(), email.clone(), edge.ws_url(), id.clone());
        async move {
            let (_, pair) = api.login(&email, kiln_e2e::PASSWORD).await;
            let token = pair["access"].as_str().unwrap().to_string();
            let opened = Instant::now();
            let mut url = format!("{base}/ws/jobs/{id}/");
            if auth == "query" {
                url = format!("{url}?token={token}");
            }
            let mut request = url.into_client_request().unwrap();
            if auth == "header" {
                request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            let (ws, _) = tokio_tungstenite::connect_async(request).await.expect("socket");
            (ws, opened)
        }
    };
    let (mut by_header, opened) = connect("header").await;
    let (mut by_query, _) = connect("query").await;
    let secret = agent_api_secret();
    let services = api.create_job(&secret, job("acme", "shop", "feature/service-expiry")).await["id"].as_str().unwrap().to_string();
    let mut service = WsClient::connect(&edge.ws_url(), &services, WsAuth::Header(&secret), None).await.expect("socket");
    service.expect_json(WAIT, "the creation event").await;

    for ws in [&mut by_header, &mut by_query] {
        let (seen, close) = until_closed(ws, Duration::from_secs(TTL + 8)).await;
        let closed_after = opened.elapsed();
        assert_eq!(seen.first().map(|e| e["kind"].clone()), Some(json!("jobStatus")), "the replay came first: {seen:#?}");
        let last = seen.last().unwrap();
        assert_eq!(last["kind"], "error", "an error event before the close: {seen:#?}");
        assert!(last["message"].as_str().unwrap().contains("expired"), "{last}");
        let (code, reason) = close.expect("a close frame");
        assert_eq!(code, CloseCode::from(4001), "{reason}");
        assert!(reason.contains("expired"), "{reason}");
        assert!(closed_after >= Duration::from_millis(TTL * 1000 - 1500), "closed too early: {closed_after:?}");
    }
    // The service credential does not expire: its socket outlives them and still gets events.
    let (status, _) = api.post(&format!("/jobs/{services}/cancel"), &secret, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let cancelled = service.until(WAIT, "the cancel", |e| e["kind"] == "jobStatus").await.pop().unwrap();
    assert_eq!(cancelled["status"], "cancelled");
}
