//! Seed 002's five dashboard channels (`/api/ws/<channel>`) against a real `wrangler dev`: ping and
//! pong, 4004 for an unknown channel, anonymous sockets (on in development, off in production),
//! filters that really filter, each owner seeing only its own messages, `?after=` resumes (replay
//! then follow, no gap, no duplicate; an `info` error when the buffer lost some), client messages
//! refused with `error`s, keepalive, and `metrics_update` every 5 s.
//!
//! The first test drives real job events: an agent task submitted over REST, a hand-written runner
//! posting its `started`, `progress` and `finished`, the room publishing `task_update` and
//! `agent_status_update`. The others publish as a job room publishes (`crate::channels::publish`),
//! through a route compiled only into the faults build; the last test shows that neither it nor
//! the Dashboard object's own routes can be reached on the build production deploys.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kiln_e2e::{agent_api_secret, unique_email, Api, Method, StatusCode, TestEdge, WsClient};
use kiln_schemas::runner::{Assignment, EdgeMessage, HeldJob, RunnerMessage};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(700);

async fn user(api: &Api) -> (String, String) {
    let email = unique_email("dash");
    let (status, user) = api.register(&email, kiln_e2e::PASSWORD).await;
    assert!(status.is_success(), "{user}");
    let (_, pair) = api.login(&email, kiln_e2e::PASSWORD).await;
    (user["id"].as_str().unwrap().to_string(), pair["access"].as_str().unwrap().to_string())
}

/// Publishes as a job room does (faults build only); answers the message's seq.
async fn publish(api: &Api, owner: &str, channel: &str, message: Value) -> u64 {
    let body = json!({"owner": owner, "channel": channel, "message": message});
    let (status, out) = api.send(Method::POST, "/__faults/dashboard/publish", Some(&agent_api_secret()), Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    out["seq"].as_u64().unwrap()
}

fn task_update(task_id: &str, agent_type: &str, status: &str, progress: f64) -> Value {
    json!({"type": "task_update", "task_id": task_id, "status": status, "progress": progress,
           "data": {"agent_id": format!("{agent_type}-001"), "agent_type": agent_type}})
}

async fn socket(edge: &TestEdge, path: &str, token: Option<&str>) -> WsClient {
    let auth = token.map(|t| format!("Bearer {t}"));
    WsClient::connect_path(&edge.ws_url(), path, auth.as_deref())
        .await
        .unwrap_or_else(|e| panic!("{path}: refused {} {}", e.status, e.body))
}

/// Subscribes and waits for the acknowledgement (so what is published next is filtered).
async fn subscribe(ws: &mut WsClient, filters: Value) -> Value {
    ws.send_json(&json!({"type": "subscribe", "filters": filters})).await;
    let ack = expect(ws, "subscribed").await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    ack
}

/// What arrives until the socket is quiet, keepalives left out.
async fn drain(ws: &mut WsClient) -> Vec<Value> {
    ws.drain(QUIET).await.into_iter().filter(|m| m["type"] != "keepalive").collect()
}

/// The next message that is not a keepalive.
async fn expect(ws: &mut WsClient, what: &str) -> Value {
    loop {
        let m = ws.expect_json(WAIT, what).await;
        if m["type"] != "keepalive" {
            return m;
        }
    }
}

fn rfc3339(v: &Value) {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))).expect("RFC 3339");
}

/// The close code of a socket the server closes right after the upgrade.
async fn close_code(edge: &TestEdge, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = format!("{}{path}", edge.ws_url()).into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
    }
    let (mut stream, _) = tokio_tungstenite::connect_async(req).await.expect("the upgrade is accepted");
    match tokio::time::timeout(WAIT, stream.next()).await.expect("closed in time") {
        Some(Ok(Message::Close(Some(frame)))) => (u16::from(frame.code), frame.reason.to_string()),
        Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
        Some(Ok(other)) => panic!("expected a close, got {other:?}"),
        Some(Err(e)) => panic!("socket error: {e}"),
    }
}

/// A runner socket driven by hand (hello, heartbeats, the assignment, event batches).
struct HandRunner {
    token: String,
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    index: u64,
}

impl HandRunner {
    async fn connect(edge: &TestEdge) -> HandRunner {
        let reg = kiln_e2e::runner_registration_token();
        let (status, body) = edge.api().send(Method::POST, "/runner/v1/register", Some(&reg), Some(json!({"name": "by-hand"}))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let token = body["token"].as_str().unwrap().to_string();
        let mut req = format!("{}/runner/v1/connect", edge.ws_url()).into_client_request().unwrap();
        req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("runner socket");
        let mut runner = HandRunner { token, ws, index: 0 };
        let hello = RunnerMessage::Hello { name: "by-hand".into(), capacity: 1, running: vec![], version: "test".into(), tools: None };
        runner.send(&hello).await;
        runner
    }

    async fn send(&mut self, msg: &RunnerMessage) {
        self.ws.send(Message::Text(serde_json::to_string(msg).unwrap().into())).await.expect("sending to the edge");
    }

    async fn assignment(&mut self) -> Assignment {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next()).await.expect("an assignment in time");
            if let Some(Ok(Message::Text(t))) = msg {
                if let Ok(EdgeMessage::Assign { assignment }) = serde_json::from_str(t.as_str()) {
                    let held = vec![HeldJob { job_id: assignment.job_id.clone(), lease_id: assignment.lease_id.clone() }];
                    self.send(&RunnerMessage::Heartbeat { running: held }).await;
                    return assignment;
                }
            }
        }
    }

    async fn post(&mut self, api: &Api, a: &Assignment, mut event: Value) {
        event["index"] = json!(self.index);
        self.index += 1;
        let batch = json!({"lease_id": a.lease_id, "events": [event]});
        let (status, ack) = api.send(Method::POST, &format!("/runner/v1/jobs/{}/events", a.job_id), Some(&self.token), Some(batch)).await;
        assert_eq!((status, ack["lease_valid"].as_bool()), (StatusCode::OK, Some(true)), "{ack}");
    }
}

#[tokio::test]
async fn a_task_streams_from_its_job_events() {
    // Access tokens last 20 s here: the last check waits for Ann's sockets to be closed.
    let edge = TestEdge::start(&[("ACCESS_TOKEN_TTL_SECS", "20")]).await.expect("starting wrangler dev");
    let api = edge.api();
    let (_, ann) = user(&api).await;
    let logged_in = std::time::Instant::now();
    let (_, bob) = user(&api).await;
    let mut expiring = {
        let mut req = format!("{}/api/ws/metrics", edge.ws_url()).into_client_request().unwrap();
        req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {ann}")).unwrap());
        tokio_tungstenite::connect_async(req).await.expect("a metrics socket").0
    };
    let mut tasks = socket(&edge, "/api/ws/tasks", Some(&ann)).await;
    let mut support = socket(&edge, "/api/ws/tasks?agent_type=support", Some(&ann)).await;
    let mut agents = socket(&edge, "/api/ws/agents", Some(&ann)).await;
    let mut bobs = socket(&edge, "/api/ws/tasks", Some(&bob)).await;
    let mut runner = HandRunner::connect(&edge).await;

    let (status, task) = api.post("/api/v1/tasks", &ann, json!({"agentType": "commerce", "prompt": "Price the BLACK ROSE ring"})).await;
    assert!(status.is_success(), "{task}");
    let id = task["taskId"].as_str().unwrap().to_string();
    let a = runner.assignment().await;
    assert_eq!(a.job_id, id);
    runner.post(&api, &a, json!({"type": "started", "message": "started"})).await;
    runner.post(&api, &a, json!({"type": "progress", "percent": 10.0, "stage": "answering", "data": {}})).await;
    runner.post(&api, &a, json!({"type": "progress", "percent": 90.0, "stage": "answering", "data": {}})).await;
    let result = json!({"answer": "$240", "technique": "chain_of_thought", "model": "demo"});
    runner.post(&api, &a, json!({"type": "finished", "outcome": "completed", "message": "done", "result": result})).await;

    // pending → running with rising progress → completed at 100, every one the task's.
    let got = tasks.until(WAIT, "the completed task_update", |m| m["status"] == "completed").await;
    let updates: Vec<&Value> = got.iter().filter(|m| m["type"] == "task_update").collect();
    assert!(updates.iter().all(|m| m["task_id"] == id.as_str() && m["data"]["agent_type"] == "commerce"), "{got:#?}");
    assert!(updates.iter().all(|m| m["data"]["agent_id"] == "commerce-001"), "{got:#?}");
    let progress: Vec<f64> = updates.iter().map(|m| m["progress"].as_f64().unwrap()).collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "progress rises: {progress:?}");
    for want in [10.0, 90.0, 100.0] {
        assert!(progress.contains(&want), "{want} in {progress:?}");
    }
    let order = |s: &str| ["pending", "running", "completed"].iter().position(|x| *x == s).unwrap_or_else(|| panic!("status {s}"));
    let statuses: Vec<usize> = updates.iter().map(|m| order(m["status"].as_str().unwrap())).collect();
    assert!(statuses.windows(2).all(|w| w[0] <= w[1]) && statuses.contains(&1), "{got:#?}");
    assert_eq!(updates.last().unwrap()["data"]["result"]["answer"], "$240", "{got:#?}");
    let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "dense seqs: {seqs:?}");
    got.iter().for_each(|m| rfc3339(&m["timestamp"]));

    // The agent ran, then completed.
    let got = agents.until(WAIT, "the agent completed", |m| m["status"] == "completed").await;
    let statuses: Vec<&str> = got.iter().filter(|m| m["type"] == "agent_status_update").map(|m| m["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["running", "completed"], "{got:#?}");
    assert_eq!((got[0]["agent_id"].as_str(), got[0]["data"]["task_id"].as_str()), (Some("commerce-001"), Some(id.as_str())));

    // A filter for another agent, another owner: nothing.
    assert!(drain(&mut support).await.is_empty(), "agent_type=support sees no commerce task");
    assert!(drain(&mut bobs).await.is_empty(), "Bob sees none of Ann's tasks");

    // A resume after the first update replays the rest, exactly.
    let mut resumed = socket(&edge, &format!("/api/ws/tasks?after={}", seqs[0]), Some(&ann)).await;
    let again: Vec<u64> = drain(&mut resumed).await.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(again, seqs[1..].to_vec());

    // A socket lives no longer than its token: an `error`, then close code 4001, at its expiry.
    let mut told = false;
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(30), expiring.next()).await.expect("closed by the token's expiry") {
            Some(Ok(Message::Text(t))) => {
                let m: Value = serde_json::from_str(t.as_str()).unwrap();
                told |= m["type"] == "error" && m["message"].as_str().unwrap().contains("expired");
            }
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            Some(Ok(_)) => {}
            other => panic!("expected a close, got {other:?}"),
        }
    };
    let after = logged_in.elapsed();
    assert!(told && closed == 4001, "told {told}, code {closed}");
    assert!(after > Duration::from_secs(18) && after < Duration::from_secs(26), "closed at the token's expiry: {after:?}");
}

#[tokio::test]
async fn channels_ping_filter_scope_resume_and_refuse() {
    let edge = TestEdge::start_with_faults(&[("DASHBOARD_KEEPALIVE_SECS", "2")]).await.expect("starting wrangler dev");
    let api = edge.api();
    let (ann_id, ann) = user(&api).await;
    let (bob_id, bob) = user(&api).await;

    // Not an upgrade: 400 in the /api/ envelope.
    let (status, body) = api.send(Method::GET, "/api/ws/tasks", Some(&ann), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], body["detail"], "{body}");

    // An unknown channel is accepted and closed with 4004, with or without credentials.
    for token in [Some(ann.as_str()), None] {
        let (code, reason) = close_code(&edge, "/api/ws/jobs", token).await;
        assert_eq!(code, 4004, "{reason}");
        assert!(reason.contains("tasks"), "the reason lists the channels: {reason}");
    }

    // Ping → pong with a timestamp, on every channel.
    for channel in ["agents", "round_table", "tasks", "3d_pipeline", "metrics"] {
        let mut ws = socket(&edge, &format!("/api/ws/{channel}"), Some(&ann)).await;
        ws.send_json(&json!({"type": "ping"})).await;
        let pong = expect(&mut ws, "pong").await;
        assert_eq!(pong["type"], "pong", "{channel}: {pong}");
        rfc3339(&pong["timestamp"]);
        ws.close().await;
    }

    // Filters really filter: a subscribe, a query filter, none.
    let mut all = socket(&edge, "/api/ws/tasks", Some(&ann)).await;
    let mut commerce = socket(&edge, "/api/ws/tasks", Some(&ann)).await;
    let ack = subscribe(&mut commerce, json!({"agent_type": "commerce"})).await;
    assert_eq!((ack["filters"]["agent_type"].as_str(), ack["read_only"].as_bool()), (Some("commerce"), Some(false)), "{ack}");
    let mut done = socket(&edge, "/api/ws/tasks?status=completed&status=failed", Some(&ann)).await;
    // Bob's socket and an anonymous one (the service principal's dashboard) see none of Ann's.
    let mut bobs = socket(&edge, "/api/ws/tasks", Some(&bob)).await;
    let mut anon = socket(&edge, "/api/ws/tasks", None).await;
    let ack = subscribe(&mut anon, json!({})).await;
    assert_eq!(ack["read_only"], true, "an anonymous socket is read-only: {ack}");

    let s1 = publish(&api, &ann_id, "tasks", task_update("t-1", "commerce", "running", 10.0)).await;
    let s2 = publish(&api, &ann_id, "tasks", task_update("t-2", "seo", "running", 10.0)).await;
    let s3 = publish(&api, &ann_id, "tasks", task_update("t-2", "seo", "completed", 100.0)).await;
    let s4 = publish(&api, &ann_id, "tasks", task_update("t-1", "commerce", "failed", 90.0)).await;
    assert_eq!((s2, s3, s4), (s1 + 1, s1 + 2, s1 + 3), "a channel's seqs are dense");
    let got = drain(&mut all).await;
    assert_eq!(got.iter().map(|m| m["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![s1, s2, s3, s4], "{got:#?}");
    assert_eq!(got[0]["data"]["agent_type"], "commerce");
    assert_eq!(got[0]["progress"], 10.0);
    rfc3339(&got[0]["timestamp"]);
    let got = drain(&mut commerce).await;
    assert_eq!(got.iter().map(|m| m["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![s1, s4], "{got:#?}");
    let got = drain(&mut done).await;
    assert_eq!(got.iter().map(|m| m["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![s3, s4], "{got:#?}");
    assert!(drain(&mut bobs).await.is_empty(), "another owner's messages never reach Bob");
    assert!(drain(&mut anon).await.is_empty(), "an anonymous socket sees only the service principal's");

    // Bob's own, the service principal's own; another channel of Ann's reaches no tasks socket.
    let b1 = publish(&api, &bob_id, "tasks", task_update("t-9", "commerce", "running", 10.0)).await;
    assert_eq!(b1, 1, "each owner's channel counts its own seqs");
    assert_eq!(expect(&mut bobs, "Bob's task").await["task_id"], "t-9");
    publish(&api, "service", "tasks", task_update("t-s", "ops", "running", 10.0)).await;
    assert_eq!(expect(&mut anon, "the service principal's task").await["task_id"], "t-s");
    publish(&api, &ann_id, "agents", json!({"type": "agent_status_update", "agent_id": "commerce-001", "status": "running",
        "data": {"agent_type": "commerce", "task_id": "t-1"}})).await;
    assert!(drain(&mut all).await.is_empty(), "an agents message is not on the tasks channel");
    assert!(drain(&mut bobs).await.is_empty() && drain(&mut anon).await.is_empty());

    // Subscribing again replaces the filters; {} clears them.
    subscribe(&mut commerce, json!({"task_id": ["t-2"], "status": "running"})).await;
    let s5 = publish(&api, &ann_id, "tasks", task_update("t-2", "seo", "running", 50.0)).await;
    publish(&api, &ann_id, "tasks", task_update("t-1", "commerce", "running", 50.0)).await;
    let got = drain(&mut commerce).await;
    assert_eq!(got.iter().map(|m| m["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![s5], "{got:#?}");
    subscribe(&mut commerce, json!({})).await;
    publish(&api, &ann_id, "tasks", task_update("t-3", "seo", "running", 10.0)).await;
    assert_eq!(drain(&mut commerce).await.len(), 1);

    // Resume: ?after=<seq> replays what followed, then follows, no gap and no duplicate.
    drain(&mut all).await;
    let last = publish(&api, &ann_id, "tasks", task_update("t-4", "seo", "running", 10.0)).await;
    let mut resumed = socket(&edge, &format!("/api/ws/tasks?after={s3}"), Some(&ann)).await;
    let next = publish(&api, &ann_id, "tasks", task_update("t-4", "seo", "completed", 100.0)).await;
    let got = drain(&mut resumed).await;
    assert_eq!(got.iter().map(|m| m["seq"].as_u64().unwrap()).collect::<Vec<_>>(), ((s3 + 1)..=next).collect::<Vec<_>>(), "{got:#?}");
    assert_eq!(next, last + 1);
    // A filtered resume replays only what passes.
    let mut resumed = socket(&edge, "/api/ws/tasks?after=0&agent_type=commerce", Some(&ann)).await;
    let got = drain(&mut resumed).await;
    assert!(!got.is_empty() && got.iter().all(|m| m["data"]["agent_type"] == "commerce"), "{got:#?}");
    // Caught up: nothing replayed. Past the end: told, then follows.
    let mut caught_up = socket(&edge, &format!("/api/ws/tasks?after={next}"), Some(&ann)).await;
    assert!(drain(&mut caught_up).await.is_empty());
    let mut ahead = socket(&edge, "/api/ws/tasks?after=999999", Some(&ann)).await;
    let told = expect(&mut ahead, "an info error").await;
    assert_eq!((told["type"].as_str(), told["error_type"].as_str()), (Some("error"), Some("info")), "{told}");
    let bad = WsClient::connect_path(&edge.ws_url(), "/api/ws/tasks?after=minus-one", Some(&format!("Bearer {ann}"))).await;
    assert_eq!(bad.err().map(|e| e.status), Some(StatusCode::BAD_REQUEST));

    // A resume older than the buffer (the last 1000 per channel) is told how many were missed.
    let mut seq = 0;
    for i in 0..1005 {
        let stage = if i % 2 == 0 { "generating" } else { "scoring" };
        seq = publish(&api, &ann_id, "round_table", json!({"type": "competition_update", "competition_id": "c-1", "stage": stage, "data": {"i": i}})).await;
    }
    assert_eq!(seq, 1005);
    let mut late = socket(&edge, "/api/ws/round_table?after=1", Some(&ann)).await;
    let told = expect(&mut late, "the missed events").await;
    assert_eq!((told["type"].as_str(), told["error_type"].as_str()), (Some("error"), Some("info")), "{told}");
    assert!(told["message"].as_str().unwrap().starts_with("4 round_table events after seq 1 were missed"), "{told}");
    let got: Vec<Value> = late.drain(Duration::from_secs(2)).await.into_iter().filter(|m| m["type"] != "keepalive").collect();
    assert_eq!(got.len(), 1000);
    assert_eq!((got[0]["seq"].as_u64(), got[999]["seq"].as_u64()), (Some(6), Some(1005)));

    // Client messages that are not ping or subscribe: an `error`, and the socket stays open.
    let mut ws = socket(&edge, "/api/ws/agents", Some(&ann)).await;
    for (text, kind, says) in [
        ("{not json".to_string(), "warning", "not valid JSON"),
        (r#"{"type":"dance"}"#.to_string(), "warning", "unknown message type"),
        (r#"{"type":"subscribe","filters":{"colour":"red"}}"#.to_string(), "warning", "unknown filter"),
        (format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(64 * 1024)), "error", "at most 65536 bytes"),
    ] {
        ws.send_text(&text).await;
        let err = expect(&mut ws, "an error").await;
        assert_eq!((err["type"].as_str(), err["error_type"].as_str()), (Some("error"), Some(kind)), "{err}");
        assert!(err["message"].as_str().unwrap().contains(says), "{err}");
        rfc3339(&err["timestamp"]);
    }
    ws.send_json(&json!({"type": "ping"})).await;
    assert_eq!(expect(&mut ws, "pong").await["type"], "pong");

    // Idle for DASHBOARD_KEEPALIVE_SECS (2 here): keepalive.
    let started = std::time::Instant::now();
    let keep = ws.expect_json(Duration::from_secs(6), "keepalive").await;
    assert_eq!(keep["type"], "keepalive", "{keep}");
    rfc3339(&keep["timestamp"]);
    assert!(started.elapsed() >= Duration::from_millis(1500), "keepalive only after the idle interval");
    let again = ws.expect_json(Duration::from_secs(6), "another keepalive").await;
    assert_eq!(again["type"], "keepalive");

    // The test route is the service principal's only.
    let (status, body) = api
        .send(Method::POST, "/__faults/dashboard/publish", Some(&ann), Some(json!({"owner": ann_id, "channel": "tasks", "message": {"type": "x"}})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // A message that is not one: 400; an unknown channel: 400.
    for (channel, message) in [("tasks", json!([1])), ("tasks", json!({"no": "type"})), ("jobs", json!({"type": "x"}))] {
        let body = json!({"owner": ann_id, "channel": channel, "message": message});
        let (status, out) = api.send(Method::POST, "/__faults/dashboard/publish", Some(&agent_api_secret()), Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{out}");
    }
}

#[tokio::test]
async fn production_refuses_anonymous_sockets_serves_metrics_and_exposes_no_publish_route() {
    let edge = TestEdge::start_env("production", &[]).await.expect("starting wrangler dev --env production");
    let api = edge.api();
    let (ann_id, ann) = user(&api).await;

    // No credentials: 401 (ALLOW_ANONYMOUS_DASHBOARD=false in production); a bad token: 401.
    let refused = WsClient::connect_path(&edge.ws_url(), "/api/ws/tasks", None).await.err().expect("refused");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.body);
    let body: Value = serde_json::from_str(&refused.body).unwrap();
    assert!(body["error"].as_str().unwrap().contains("anonymous dashboards are off"), "{body}");
    let refused = WsClient::connect_path(&edge.ws_url(), "/api/ws/tasks", Some("Bearer nope")).await.err().expect("refused");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    // `?token=` is off in production too.
    let refused = WsClient::connect_path(&edge.ws_url(), &format!("/api/ws/tasks?token={ann}"), None).await.err().expect("refused");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    // An unknown channel is still 4004.
    assert_eq!(close_code(&edge, "/api/ws/nope", None).await.0, 4004);

    // Nothing outside the Worker publishes: the faults build's route is not compiled in, and the
    // Dashboard object's own paths are no routes of the Worker.
    let service = agent_api_secret();
    let message = json!({"owner": ann_id, "channel": "tasks", "message": {"type": "task_update", "task_id": "forged"}});
    let mut tasks = socket(&edge, "/api/ws/tasks", Some(&ann)).await;
    for path in ["/__faults/dashboard/publish", "/publish?channel=tasks", "/api/ws/tasks/publish", "/api/publish"] {
        for token in [service.as_str(), ann.as_str()] {
            let (status, body) = api.send(Method::POST, path, Some(token), Some(message.clone())).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        }
    }
    let (status, _) = api.send(Method::POST, "/api/ws/tasks", Some(&ann), Some(message.clone())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(drain(&mut tasks).await.is_empty(), "nothing was published");

    // Metrics: a metrics_update every METRICS_INTERVAL_SECS (5) with the documented fields.
    let mut metrics = socket(&edge, "/api/ws/metrics", Some(&ann)).await;
    let first = metrics.until(Duration::from_secs(8), "metrics_update", |m| m["type"] == "metrics_update").await;
    let first = first.last().unwrap().clone();
    let at = std::time::Instant::now();
    let m = &first["metrics"];
    for key in ["timestamp", "cpu_percent", "memory_percent", "active_connections", "requests_per_second", "avg_latency_ms"] {
        assert!(m.get(key).is_some(), "{key} in {first}");
    }
    assert_eq!(m["active_connections"], 2, "Ann's tasks and metrics sockets: {first}");
    // The monitoring module's numbers beside them: jobs and runners from the queue.
    assert!(m["jobs_running"].is_number() && m["runners_connected"].is_number(), "{first}");
    assert_eq!((m["connections_by_channel"]["tasks"].as_u64(), m["connections_by_channel"]["metrics"].as_u64()), (Some(1), Some(1)));
    let second = metrics.until(Duration::from_secs(8), "metrics_update", |m| m["type"] == "metrics_update").await;
    let gap = at.elapsed();
    assert!(gap > Duration::from_secs(4) && gap < Duration::from_secs(7), "every 5 s: {gap:?}");
    assert_eq!(second.last().unwrap()["seq"].as_u64().unwrap(), first["seq"].as_u64().unwrap() + 1);
    tasks.close().await;
}
