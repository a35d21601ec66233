//! Issue 6's queue and fault items end to end, against a real `wrangler dev` and real runners:
//! owners served fairly (9); a queue that forgets no job when room calls fail, the object restarts
//! between a lease and its announcement, or an enqueue is lost (12); status changes whose D1 copy
//! fails (13); runner batches stored all or nothing (14); half-open and replaced runner sockets
//! (15). The fault tests run the Worker built with the test-only `faults` feature
//! (`TestEdge::start_with_faults`, `KILN_FAULTS`), which production builds never have.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kiln_e2e::{eventually, Api, GitRemotes, Method, StatusCode, TestEdge, TestRunner, WsAuth, WsClient};
use kiln_schemas::runner::{Assignment, EdgeMessage, RunnerMessage};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const JOB_TIMEOUT: Duration = Duration::from_secs(90);

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct World {
    edge: TestEdge,
    remotes: GitRemotes,
    states: tempfile::TempDir,
}

impl World {
    async fn start(vars: &[(&str, &str)]) -> World {
        Self::with(TestEdge::start(vars).await.expect("starting wrangler dev")).await
    }

    async fn with_faults(vars: &[(&str, &str)]) -> World {
        Self::with(TestEdge::start_with_faults(vars).await.expect("starting wrangler dev on the faults build")).await
    }

    async fn with(edge: TestEdge) -> World {
        edge.api().grant("*", "acme/*").await;
        let remotes = GitRemotes::new();
        remotes.create_with_files("acme", "shop", &[("README.md", "# shop\n")]);
        let states = tempfile::Builder::new().prefix("kiln-runner-states-").tempdir().unwrap();
        World { edge, remotes, states }
    }

    fn api(&self) -> Api {
        self.edge.api()
    }

    async fn runner(&self, agent_cmd: &str, extra: &[(&str, &str)]) -> TestRunner {
        let base = self.remotes.base_url();
        let state = self.states.path().join(uuid::Uuid::new_v4().to_string()).display().to_string();
        let mut env = vec![
            ("RUNNER_STATE_DIR", state.as_str()),
            ("RUNNER_EXECUTOR", "process"),
            ("RUNNER_AGENT", "text"),
            ("RUNNER_AGENT_CMD", agent_cmd),
            ("RUNNER_GIT_BASE_URL", base.as_str()),
        ];
        env.extend_from_slice(extra);
        TestRunner::start(&self.edge, &env).await.expect("starting a runner")
    }

    async fn health(&self) -> Value {
        self.api().send(Method::GET, "/health", None, None).await.1
    }

    async fn wait_health(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let h = self.health().await;
            if pred(&h) {
                return h;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}; last /health: {h}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn job(&self, token: &str, prompt: &str, branch: &str) -> String {
        let body = json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": prompt, "branchName": branch});
        self.api().create_job(token, body).await["id"].as_str().unwrap().to_string()
    }

    /// Registers a runner by hand and opens its socket (no hello yet).
    async fn runner_by_hand(&self, name: &str) -> (String, Socket) {
        let reg = kiln_e2e::runner_registration_token();
        let (_, body) = self.api().send(Method::POST, "/runner/v1/register", Some(&reg), Some(json!({"name": name}))).await;
        let token = body["token"].as_str().expect("a runner token").to_string();
        let ws = self.socket(&token).await;
        (token, ws)
    }

    async fn socket(&self, runner_token: &str) -> Socket {
        let mut request = format!("{}/runner/v1/connect", self.edge.ws_url()).into_client_request().unwrap();
        request.headers_mut().insert("authorization", format!("Bearer {runner_token}").parse().unwrap());
        tokio_tungstenite::connect_async(request).await.expect("runner socket").0
    }
}

async fn send(ws: &mut Socket, msg: &RunnerMessage) {
    ws.send(Message::Text(serde_json::to_string(msg).unwrap().into())).await.unwrap();
}

fn hello(capacity: u32) -> RunnerMessage {
    RunnerMessage::Hello { name: "by-hand".into(), capacity, running: vec![], version: "test".into(), tools: None }
}

/// The next edge message on a runner socket (panics on close or after `timeout`).
async fn next_message(ws: &mut Socket, timeout: Duration) -> EdgeMessage {
    loop {
        let msg = tokio::time::timeout(timeout, ws.next()).await.expect("a message from the edge").expect("socket open").unwrap();
        if let Message::Text(text) = msg {
            return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        }
    }
}

async fn next_assignment(ws: &mut Socket) -> Assignment {
    loop {
        if let EdgeMessage::Assign { assignment } = next_message(ws, Duration::from_secs(20)).await {
            return assignment;
        }
    }
}

/// Every event of a job with its seq, replayed over the live channel.
async fn replay(edge: &TestEdge, token: &str, id: &str) -> Vec<Value> {
    let mut ws = WsClient::connect(&edge.ws_url(), id, WsAuth::Header(token), None).await.expect("job socket");
    ws.drain(Duration::from_millis(700)).await
}

fn assert_dense(events: &[Value]) {
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().expect("a seq")).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "dense seqs from 1, no duplicate: {events:#?}");
}

// --- 9. fairness ---------------------------------------------------------------------------------

/// Alice queues ten jobs, then Bob one: Bob's job runs on the next free slot, long before Alice's
/// backlog drains (FIFO would run it eleventh).
#[tokio::test]
async fn one_owner_cannot_starve_another() {
    let w = World::start(&[("MAX_CONCURRENT_JOBS", "2")]).await;
    let api = w.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let _runner = w.runner("sleep 1; echo done", &[("MAX_CONCURRENT_JOBS", "2")]).await;
    w.wait_health("two free slots", |h| h["runners"]["free_slots"] == 2).await;
    let mut backlog = vec![];
    for i in 0..10 {
        backlog.push(w.job(&alice, "work", &format!("b/alice-{i}")).await);
    }
    let (_, q) = api.get("/queue", &alice).await;
    let queued = q["queued"].as_array().unwrap().len();
    let bobs = w.job(&bob, "mine", "b/bob").await;
    let created = api.job(&bob, &bobs).await;
    assert_eq!(created["status"], "queued", "{created}");
    api.wait_status(&bob, &bobs, "completed", JOB_TIMEOUT).await;
    let mut done = 0;
    for id in &backlog {
        if api.job(&alice, id).await["status"] == "completed" {
            done += 1;
        }
    }
    eprintln!("alice: {queued} queued when bob submitted; {done} of 10 completed when bob's job did");
    assert!(done <= 4, "bob waited for {done} of alice's jobs");
    for id in &backlog {
        api.wait_status(&alice, id, "completed", JOB_TIMEOUT).await;
    }
}

/// With `MAX_CONCURRENT_JOBS_PER_OWNER=1`, one owner never holds both slots, however much it queues.
#[tokio::test]
async fn max_concurrent_jobs_per_owner_caps_one_owner_inside_the_global_limit() {
    let w = World::start(&[("MAX_CONCURRENT_JOBS", "2"), ("MAX_CONCURRENT_JOBS_PER_OWNER", "1")]).await;
    let api = w.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let _runner = w.runner("sleep 2; echo done", &[("MAX_CONCURRENT_JOBS", "2")]).await;
    w.wait_health("two free slots", |h| h["runners"]["free_slots"] == 2).await;
    let a1 = w.job(&alice, "a", "b/a1").await;
    let a2 = w.job(&alice, "a", "b/a2").await;
    api.wait_status(&alice, &a1, "running", JOB_TIMEOUT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.job(&alice, &a2).await["status"], "queued", "alice's second job waits with a slot free");
    let h = w.health().await;
    assert_eq!((h["queue"]["running"].clone(), h["runners"]["free_slots"].clone()), (json!(1), json!(1)), "{h}");
    let b1 = w.job(&bob, "b", "b/b1").await;
    let job = api.wait_status(&bob, &b1, "running", Duration::from_secs(10)).await;
    assert_eq!(api.job(&alice, &a1).await["status"], "running", "bob took the free slot at once: {job}");
    api.wait_status(&alice, &a2, "completed", JOB_TIMEOUT).await;
}

// --- 12. the queue never forgets a job -------------------------------------------------------------

/// Room calls from the queue fail, and the queue "restarts" between persisting leases and telling
/// the rooms: every job still ends, each on its first attempt.
#[tokio::test]
async fn jobs_end_when_room_calls_fail_and_the_queue_restarts_mid_dispatch() {
    let w = World::with_faults(&[("KILN_FAULTS", "queue_room_calls=5,queue_restart_after_lease=2"), ("MAX_CONCURRENT_JOBS", "2")]).await;
    let api = w.api();
    let token = api.new_user("faults").await;
    let _runner = w.runner("echo done", &[("MAX_CONCURRENT_JOBS", "2")]).await;
    w.wait_health("two free slots", |h| h["runners"]["free_slots"] == 2).await;
    let mut ids = vec![];
    for i in 0..6 {
        ids.push(w.job(&token, "p", &format!("b/fault-{i}")).await);
    }
    for id in &ids {
        let job = api.wait_status(&token, id, "completed", JOB_TIMEOUT).await;
        assert_eq!(job["attempts"], 1, "a lease the room missed is announced again, not spent: {job:#}");
        assert_dense(&replay(&w.edge, &token, id).await);
    }
    let h = w.wait_health("an empty queue", |h| h["queue"]["running"] == 0 && h["queue"]["queued"] == 0).await;
    assert_eq!(h["runners"]["free_slots"], 2, "{h}");
    let log = w.edge.log();
    assert!(log.contains("injected fault: queue_room_calls"), "the faults fired");
    assert!(log.contains("injected fault: queue_restart_after_lease"), "the faults fired");
}

/// The queue answers two enqueues and forgets them (as if it restarted before persisting): the
/// reconciliation finds their D1 rows `queued` in no queue and queues them again.
#[tokio::test]
async fn reconciliation_queues_jobs_the_queue_lost() {
    let w = World::with_faults(&[("KILN_FAULTS", "queue_drop_enqueue=2"), ("RECONCILE_SECS", "2")]).await;
    let api = w.api();
    let token = api.new_user("lost").await;
    let _runner = w.runner("echo done", &[]).await;
    w.wait_health("a free slot", |h| h["runners"]["free_slots"].as_u64() >= Some(1)).await;
    let lost: Vec<String> = vec![w.job(&token, "p", "b/lost-1").await, w.job(&token, "p", "b/lost-2").await];
    let kept = w.job(&token, "p", "b/kept").await;
    api.wait_status(&token, &kept, "completed", JOB_TIMEOUT).await;
    assert_eq!(api.job(&token, &lost[0]).await["status"], "queued", "forgotten by the queue");
    for id in &lost {
        api.wait_status(&token, id, "completed", JOB_TIMEOUT).await;
    }
    assert!(w.edge.log().contains("was in no queue; enqueued again"), "{}", w.edge.log());
}

// --- 13. status changes whose D1 copy fails --------------------------------------------------------

/// Each room's first two D1 status copies fail. A cancel still answers `cancelled` and frees the
/// queue; a job that finishes still frees its slot for the next one; every D1 row is repaired.
#[tokio::test]
async fn a_failed_d1_copy_neither_hides_the_status_nor_holds_the_queue() {
    let w = World::with_faults(&[("KILN_FAULTS", "room_d1_copies=2")]).await;
    let api = w.api();
    let token = api.new_user("d1").await;
    let doomed = w.job(&token, "p", "b/cancel-me").await;
    let (status, body) = api.post(&format!("/jobs/{doomed}/cancel"), &token, json!({})).await;
    assert_eq!(status, StatusCode::OK, "the room's state is the answer: {body}");
    assert_eq!(body["status"], "cancelled", "{body}");
    let h = w.health().await;
    assert_eq!(h["queue"]["queued"], 0, "released although D1 failed: {h}");
    api.wait_status(&token, &doomed, "cancelled", Duration::from_secs(20)).await;

    // One slot, two jobs: the second runs only if the first's end released the queue.
    let _runner = w.runner("echo done", &[]).await;
    let first = w.job(&token, "p", "b/d1-1").await;
    let second = w.job(&token, "p", "b/d1-2").await;
    for id in [&first, &second] {
        let job = api.wait_status(&token, id, "completed", JOB_TIMEOUT).await;
        assert!(job["completed_at"].is_string(), "the repaired row is whole: {job}");
    }
    assert!(w.edge.log().contains("injected fault: room_d1_copies"));
}

// --- 14. batches stored all or nothing -------------------------------------------------------------

/// A batch that fails half-way stores none of its events and marks none seen; its retry stores
/// all of them once, and the log stays dense (no wedged `next_seq`).
#[tokio::test]
async fn a_batch_that_fails_half_way_is_stored_whole_by_its_retry() {
    let w = World::with_faults(&[("KILN_FAULTS", "room_batch_partial=1")]).await;
    let api = w.api();
    let token = api.new_user("batch").await;
    let (runner_token, mut ws) = w.runner_by_hand("by-hand").await;
    send(&mut ws, &hello(1)).await;
    let id = w.job(&token, "p", "b/batch").await;
    let assignment = next_assignment(&mut ws).await;
    assert_eq!(assignment.job_id, id);
    let path = format!("/runner/v1/jobs/{id}/events");
    let events: Vec<Value> = (0..4).map(|i| json!({"index": i, "type": "log", "stream": "stdout", "content": format!("line {i}")})).collect();
    let batch = json!({"lease_id": assignment.lease_id, "events": events});
    let (status, _) = api.send(Method::POST, &path, Some(&runner_token), Some(batch.clone())).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "the injected failure");
    let (status, ack) = api.send(Method::POST, &path, Some(&runner_token), Some(batch)).await;
    assert_eq!((status, ack.clone()), (StatusCode::OK, json!({"stored": 4, "duplicates": 0, "lease_valid": true})), "{ack}");
    let finish = json!({"lease_id": assignment.lease_id, "events": [
        {"index": 4, "type": "log", "stream": "stdout", "content": "line 4"},
        {"index": 5, "type": "finished", "outcome": "completed", "message": "done"},
    ]});
    let (status, ack) = api.send(Method::POST, &path, Some(&runner_token), Some(finish)).await;
    assert_eq!((status, ack["stored"].clone()), (StatusCode::OK, json!(2)), "{ack}");
    api.wait_status(&token, &id, "completed", Duration::from_secs(10)).await;
    let log = replay(&w.edge, &token, &id).await;
    assert_dense(&log);
    for i in 0..5 {
        let n = log.iter().filter(|e| e["content"] == format!("line {i}")).count();
        assert_eq!(n, 1, "line {i} stored once: {log:#?}");
    }
}

// --- 15. half-open and replaced runner sockets ------------------------------------------------------

/// A runner that reconnects says hello on its new socket while its old connection lingers: work
/// goes to the new socket (not to one picked by the runner's tag), and the old one's end does not
/// make the live runner invisible (the queue forgets a runner only when its current socket closes).
#[tokio::test]
async fn a_reconnect_never_makes_a_live_runner_invisible() {
    let w = World::start(&[]).await;
    let api = w.api();
    let (runner_token, mut old) = w.runner_by_hand("twice").await;
    send(&mut old, &hello(1)).await;
    w.wait_health("the first socket", |h| h["runners"]["free_slots"] == 1).await;
    let mut new = w.socket(&runner_token).await;
    send(&mut new, &hello(1)).await;
    assert!(matches!(next_message(&mut new, Duration::from_secs(10)).await, EdgeMessage::Welcome { .. }));
    // The old connection lingers, unanswered: work goes to the socket the runner said hello on.
    let token = api.new_user("visible").await;
    let id = w.job(&token, "p", "b/visible").await;
    assert_eq!(next_assignment(&mut new).await.job_id, id, "the live socket gets the work");
    // Then the old connection ends without answering the edge's close (as a dead one does).
    drop(old);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let h = w.health().await;
    assert_eq!((h["runners"]["connected"].clone(), h["queue"]["running"].clone()), (json!(1), json!(1)), "still connected: {h}");
}

/// A runner socket that goes silent (a half-open connection) is dropped after a lease, with close
/// code 4002; a runner that keeps heartbeating hears the edge answer each heartbeat.
#[tokio::test]
async fn a_silent_runner_socket_is_dropped_after_a_lease_and_heartbeats_are_answered() {
    let w = World::start(&[("LEASE_SECS", "3"), ("HEARTBEAT_SECS", "1")]).await;
    let (_, mut silent) = w.runner_by_hand("silent").await;
    send(&mut silent, &hello(1)).await;
    let (_, mut alive) = w.runner_by_hand("alive").await;
    send(&mut alive, &hello(1)).await;
    assert!(matches!(next_message(&mut alive, Duration::from_secs(10)).await, EdgeMessage::Welcome { .. }));
    w.wait_health("both runners", |h| h["runners"]["free_slots"] == 2).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        send(&mut alive, &RunnerMessage::Heartbeat { running: vec![] }).await;
        let answer = next_message(&mut alive, Duration::from_secs(5)).await;
        assert!(matches!(answer, EdgeMessage::Welcome { lease_secs: 3, .. }), "a heartbeat's answer: {answer:?}");
    }
    let h = w.wait_health("the silent runner to be dropped", |h| h["runners"]["free_slots"] == 1).await;
    assert_eq!(h["runners"]["connected"], 1, "{h}");
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), silent.next()).await.expect("the silent socket is closed") {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, Some(4002));
}

/// The chaos of `tests/chaos.rs` in miniature is there; here: a lease held by a runner whose
/// socket was dropped as silent runs out and the job finishes elsewhere.
#[tokio::test]
async fn a_job_held_by_a_silent_runner_is_requeued_and_finished_by_another() {
    let w = World::start(&[("LEASE_SECS", "3"), ("HEARTBEAT_SECS", "1")]).await;
    let api = w.api();
    let token = api.new_user("silent").await;
    let (_, mut silent) = w.runner_by_hand("silent").await;
    send(&mut silent, &hello(1)).await;
    w.wait_health("the silent runner", |h| h["runners"]["free_slots"] == 1).await;
    let id = w.job(&token, "p", "b/silent").await;
    assert_eq!(next_assignment(&mut silent).await.job_id, id);
    let _runner = w.runner("echo done", &[]).await;
    let job = api.wait_status(&token, &id, "completed", JOB_TIMEOUT).await;
    assert_eq!(job["attempts"], 2, "{job:#}");
    eventually(Duration::from_secs(10), "the silent socket to be gone", || {
        let api = api.clone();
        async move {
            let (_, h) = api.send(Method::GET, "/health", None, None).await;
            (h["runners"]["connected"] == 1).then_some(())
        }
    })
    .await;
}
