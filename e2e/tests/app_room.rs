//! The edge core of seed 000's app builder, driven through the runner protocol by a hand-written
//! runner socket against a real `wrangler dev`: the requirements gatherer's turns (asked of any
//! runner, slot or not, retried while none answers), the summary that queues the job, the pipeline
//! events and the rows they write, pause and resume relayed to the runner, workspace snapshots in
//! R2 under the lease, a continuation run, deleted messages, and a deleted job.

use std::time::{Duration, Instant};

use kiln_e2e::{Api, HandRunner, Method, StatusCode, TestEdge, WsAuth, WsClient};
use kiln_schemas::runner::EdgeMessage;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

async fn create(api: &Api, token: &str, idea: &str) -> String {
    let (status, job) = api.post("/api/jobs/", token, json!({"prompt": idea})).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    assert_eq!(job["status"], "collecting", "{job}");
    job["id"].as_str().unwrap().to_string()
}

async fn socket(edge: &TestEdge, job_id: &str, token: &str) -> WsClient {
    WsClient::connect(&edge.ws_url(), job_id, WsAuth::Header(token), None).await.expect("job socket")
}

/// Reads the socket until an event matches, answering every event read.
async fn until(ws: &mut WsClient, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    ws.until(WAIT, what, pred).await
}

fn d1_one(edge: &TestEdge, sql: &str) -> Value {
    let rows = edge.d1(sql).expect("querying D1");
    rows.into_iter().next().unwrap_or(Value::Null)
}

async fn wait_d1(edge: &TestEdge, sql: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let row = d1_one(edge, sql);
        if pred(&row) {
            return row;
        }
        assert!(Instant::now() < deadline, "{what}: D1 still answers {row}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ticket(id: &str, kind: &str, parent: Option<&str>, deps: &[&str]) -> Value {
    json!({"id": id, "type": kind, "parent_id": parent, "title": format!("Ticket {id}"), "description": "d",
           "status": "todo", "assigned_to": "", "dependencies": deps})
}

#[tokio::test]
async fn an_app_build_collects_its_requirements_runs_its_pipeline_and_continues() {
    let edge = TestEdge::start(&[("LEASE_SECS", "20"), ("HEARTBEAT_SECS", "2")]).await.expect("starting wrangler dev");
    let api = edge.api();
    let ann = api.new_user("ann").await;
    let mut runner = HandRunner::connect(&edge, "hand", 1).await;

    // Collecting: the gatherer's first turn answers the idea, asked of the runner.
    let idea = "A todo app for my family";
    let job_id = create(&api, &ann, idea).await;
    let mut ws = socket(&edge, &job_id, &ann).await;
    let (rid, g) = runner.gather().await;
    assert_eq!((g.job_id.as_str(), g.initial_prompt.as_str(), g.transcript.len(), g.must_summarise), (job_id.as_str(), idea, 0, false));
    let usage = json!({"source": "gatherer", "model": "m", "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.01});
    runner.reply(&rid, json!({"reply": "Which colours do you like?", "sender": "Client Relations", "usage": usage})).await;
    let seen = until(&mut ws, "the gatherer's question", |e| e["kind"] == "stageUpdate" && e["role"] == "agent").await;
    let question = seen.last().unwrap();
    assert_eq!((question["sender"].clone(), question["content"].clone()), (json!("Client Relations"), json!("Which colours do you like?")));
    until(&mut ws, "the turn's usage", |e| e["kind"] == "usage" && e["totals"]["input_tokens"] == 10).await;

    // A user's chat owes a turn, which carries the conversation; the summary queues the job.
    ws.send_json(&json!({"kind": "chat", "content": "Blue, please"})).await;
    let (rid, g) = runner.gather().await;
    let turns: Vec<(String, String)> = g.transcript.iter().map(|t| (t.role.clone(), t.content.clone())).collect();
    assert_eq!(turns, [("agent".to_string(), "Which colours do you like?".to_string()), ("user".into(), "Blue, please".into())]);
    runner.reply(&rid, json!({"reply": "Great.\nREQUIREMENTS_SUMMARY: A blue todo app.", "sender": "Client Relations"})).await;
    let seen = until(&mut ws, "queued", |e| e["kind"] == "jobStatus" && e["status"] == "queued").await;
    let said: Vec<&str> = seen.iter().filter(|e| e["kind"] == "stageUpdate" && e["role"] == "agent").map(|e| e["content"].as_str().unwrap()).collect();
    assert_eq!(said[0], "Great.");
    assert!(said[1].contains("A blue todo app."), "{said:?}");

    // Dispatched with the room's app parameters; seed 000's statuses on the socket.
    let a = runner.assignment().await;
    let app = a.app.clone().expect("an app build's assignment carries its app parameters");
    assert_eq!((app.initial_prompt.as_str(), app.requirements_summary.as_str(), app.continuation.clone(), app.paused), (idea, "A blue todo app.", None, false));
    until(&mut ws, "planning", |e| e["kind"] == "jobStatus" && e["status"] == "planning").await;
    let row = wait_d1(&edge, &format!("SELECT status, requirements_summary FROM jobs WHERE id = '{job_id}'"), "running", |r| r["status"] == "running").await;
    assert_eq!(row["requirements_summary"], "A blue todo app.");

    // Chat after collecting is refused on the socket and stored nowhere.
    ws.send_json(&json!({"kind": "chat", "content": "and green?"})).await;
    let refused = until(&mut ws, "the refusal", |e| e["kind"] == "error").await;
    assert!(refused.last().unwrap()["message"].as_str().unwrap().contains("chat is closed"), "{refused:?}");

    // The pipeline's events, and the rows they write.
    let lease = a.lease_id.clone();
    runner
        .post(&api, &a, vec![
            json!({"type": "started", "message": "started"}),
            json!({"type": "stage", "role": "agent", "sender": "Narrator", "content": "Planning begins", "metadata": {"type": "description"}}),
            json!({"type": "dialogue", "agent": "CEO", "message": "Ship it blue.", "order": 1}),
            json!({"type": "dialogue", "agent": "CTO", "message": "CONSENSUS", "order": 2}),
            json!({"type": "prd", "spec": {"name": "todo"}, "prd_markdown": "# PRD"}),
            json!({"type": "phase", "phase": "prd_ready", "message": "PRD ready"}),
            json!({"type": "phase", "phase": "planning", "message": "back?"}),
            json!({"type": "phase", "phase": "ticketing", "message": "writing tickets"}),
            json!({"type": "backlog", "tickets": [ticket("a", "story", None, &["b"]), ticket("b", "story", None, &["a"])]}),
            json!({"type": "backlog", "tickets": [ticket("e1", "epic", None, &[]), ticket("s1", "story", Some("e1"), &[]), ticket("s2", "story", Some("e1"), &["s1"])]}),
            json!({"type": "phase", "phase": "building", "message": "building"}),
            json!({"type": "ticket", "ticket_id": "s1", "status": "in_progress", "message": "building s1"}),
            json!({"type": "ticket", "ticket_id": "s1", "status": "done", "message": "built", "metadata": {"log": "ok"}}),
            json!({"type": "ticket", "ticket_id": "zz", "status": "done", "message": "?"}),
        ])
        .await;
    let seen = until(&mut ws, "the last ticket note", |e| e["kind"] == "log" && e["content"].as_str().is_some_and(|c| c.contains("no ticket zz"))).await;
    let kinds = |k: &str| seen.iter().filter(|e| e["kind"] == k).cloned().collect::<Vec<_>>();
    let statuses: Vec<String> = kinds("jobStatus").iter().map(|e| e["status"].as_str().unwrap().to_string()).collect();
    assert_eq!(statuses, ["prd_ready", "ticketing", "building"], "phases forward only");
    let logs: Vec<String> = kinds("log").iter().map(|e| e["content"].as_str().unwrap().to_string()).collect();
    assert!(logs.iter().any(|l| l.contains("phase planning refused")), "{logs:?}");
    assert!(logs.iter().any(|l| l.contains("backlog refused") && l.contains("cycle")), "{logs:?}");
    let dialogue = kinds("agentDialogue");
    assert_eq!((dialogue.len(), dialogue[0]["jobId"].clone(), dialogue[1]["agent"].clone()), (2, json!(job_id), json!("CTO")));
    assert_eq!(kinds("prdReady")[0]["prdMarkdown"], "# PRD");
    assert_eq!(kinds("ticketReset").len(), 1, "the refused backlog announced nothing");
    let updates: Vec<(String, String)> = kinds("ticketUpdate")
        .iter()
        .map(|e| (e["ticketId"].as_str().unwrap().to_string(), e["status"].as_str().unwrap().to_string()))
        .collect();
    let pairs = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
    assert_eq!(updates, pairs(&[("e1", "todo"), ("s1", "todo"), ("s2", "todo"), ("s1", "in_progress"), ("s1", "done")]));
    let done = kinds("ticketUpdate").into_iter().last().unwrap();
    assert_eq!((done["title"].clone(), done["metadata"]["log"].clone()), (json!("Ticket s1"), json!("ok")));
    wait_d1(&edge, &format!("SELECT phase FROM jobs WHERE id = '{job_id}'"), "the phase copy", |r| r["phase"] == "building").await;
    let app_row = d1_one(&edge, &format!("SELECT spec, prd_markdown FROM apps WHERE job_id = '{job_id}'"));
    assert_eq!((app_row["spec"].clone(), app_row["prd_markdown"].clone()), (json!("{\"name\":\"todo\"}"), json!("# PRD")));
    let tickets = edge.d1(&format!("SELECT id, status, dependencies FROM tickets WHERE job_id = '{job_id}' ORDER BY ordinal")).unwrap();
    let rows: Vec<(String, String)> = tickets.iter().map(|t| (t["id"].as_str().unwrap().into(), t["status"].as_str().unwrap().into())).collect();
    assert_eq!(rows, pairs(&[("e1", "todo"), ("s1", "done"), ("s2", "todo")]));
    assert_eq!(tickets[2]["dependencies"], "[\"s1\"]");

    // Steps and messages through the face (views of the room's log).
    let (status, detail) = api.get(&format!("/api/jobs/{job_id}/"), &ann).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["status"], "building", "{detail}");
    let steps: Vec<&str> = detail["steps"].as_array().unwrap().iter().map(|s| s["agent_name"].as_str().unwrap()).collect();
    assert_eq!(steps, ["CEO", "CTO"]);

    // Pause and resume reach the runner of a running job.
    let (status, paused) = api.post(&format!("/api/jobs/{job_id}/pause/"), &ann, json!({})).await;
    assert_eq!((status, paused["is_paused"].clone(), paused["status"].clone()), (StatusCode::OK, json!(true), json!("building")), "{paused}");
    assert!(matches!(runner.expect("pause").await, EdgeMessage::Pause { job_id: j } if j == job_id));
    wait_d1(&edge, &format!("SELECT is_paused FROM jobs WHERE id = '{job_id}'"), "is_paused", |r| r["is_paused"] == 1).await;
    let (_, resumed) = api.post(&format!("/api/jobs/{job_id}/resume/"), &ann, json!({})).await;
    assert_eq!(resumed["is_paused"], false, "{resumed}");
    assert!(matches!(runner.expect("resume").await, EdgeMessage::Resume { job_id: j } if j == job_id));

    // Snapshots: under the lease, from its runner only, into R2 and back.
    let snap = json!({"files": [{"path": "src/App.tsx", "content": "export {}", "size": 9}], "omitted": []});
    let put = |token: String, lease: String, body: Value| {
        let api = api.clone();
        let job_id = job_id.clone();
        async move { api.send(Method::PUT, &format!("/runner/v1/jobs/{job_id}/snapshot?lease_id={lease}"), Some(&token), Some(body)).await }
    };
    let (status, body) = put(runner.token.clone(), lease.clone(), snap.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let other = HandRunner::connect(&edge, "other", 0).await;
    let (status, body) = put(other.token.clone(), lease.clone(), snap.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "another runner naming the lease: {body}");
    let (status, _) = put(runner.token.clone(), "not-the-lease".into(), snap.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = put(runner.token.clone(), lease.clone(), json!({"nope": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let get_path = format!("/runner/v1/jobs/{job_id}/snapshot?lease_id={lease}");
    let (status, got) = api.send(Method::GET, &get_path, Some(&runner.token), None).await;
    assert_eq!((status, got), (StatusCode::OK, snap.clone()));
    let (status, _) = api.send(Method::GET, &format!("/runner/v1/jobs/{job_id}/snapshot"), Some(&runner.token), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no lease id");

    // The run ends: build_done; its runner may still leave its final snapshot.
    runner.post(&api, &a, vec![json!({"type": "finished", "outcome": "completed", "message": "built"})]).await;
    until(&mut ws, "build_done", |e| e["kind"] == "jobStatus" && e["status"] == "build_done").await;
    let (status, body) = put(runner.token.clone(), lease.clone(), snap.clone()).await;
    assert_eq!(status, StatusCode::OK, "the ended run's final snapshot: {body}");
    runner.held.clear();

    // A continuation: queued again, dispatched with the new requirements, from planning.
    let (status, cont) = api.post(&format!("/api/jobs/{job_id}/continue/"), &ann, json!({"requirements": "Add dark mode"})).await;
    assert_eq!(status, StatusCode::OK, "{cont}");
    let a2 = runner.assignment().await;
    assert_ne!(a2.lease_id, lease);
    assert_eq!(a2.app.as_ref().and_then(|p| p.continuation.clone()).as_deref(), Some("Add dark mode"));
    until(&mut ws, "planning again", |e| e["kind"] == "jobStatus" && e["status"] == "planning").await;
    let (status, body) = put(runner.token.clone(), lease.clone(), snap.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "the old lease is no longer the job's: {body}");
    let (status, body) = api.post(&format!("/api/jobs/{job_id}/continue/"), &ann, json!({"requirements": "more"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "only a finished build continues: {body}");

    // A deleted message leaves REST and replay alike; its seq is not reused.
    let (status, msgs) = api.get(&format!("/api/job-messages/?job_id={job_id}"), &ann).await;
    assert_eq!(status, StatusCode::OK, "{msgs}");
    let blue = msgs.as_array().unwrap().iter().find(|m| m["content"] == "Blue, please").expect("the user's message").clone();
    let (status, body) = api.send(Method::DELETE, &format!("/api/job-messages/{}/", blue["id"].as_str().unwrap()), Some(&ann), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, msgs) = api.get(&format!("/api/job-messages/?job_id={job_id}"), &ann).await;
    assert!(msgs.as_array().unwrap().iter().all(|m| m["content"] != "Blue, please"), "{msgs}");
    let mut replay = socket(&edge, &job_id, &ann).await;
    let all = replay.drain(Duration::from_millis(800)).await;
    assert!(all.iter().all(|e| e["content"] != "Blue, please"), "replay skips the deleted message");
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // Deleting the job stops it on its runner and closes its sockets.
    let (status, body) = api.send(Method::DELETE, &format!("/api/jobs/{job_id}/"), Some(&ann), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(matches!(runner.expect("cancel").await, EdgeMessage::Cancel { job_id: j } if j == job_id));
    let (status, _) = api.get(&format!("/api/jobs/{job_id}/"), &ann).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    drop(other);
}

#[tokio::test]
async fn the_gatherer_needs_no_slot_and_is_retried_until_a_runner_answers() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    let ann = api.new_user("ann").await;

    // No runner at all: the user is told once, and the turn stays owed.
    let job_id = create(&api, &ann, "A recipe book").await;
    let mut ws = socket(&edge, &job_id, &ann).await;
    let seen = until(&mut ws, "the unavailable note", |e| e["kind"] == "stageUpdate" && e["role"] == "system").await;
    assert!(seen.last().unwrap()["content"].as_str().unwrap().contains("unavailable"));

    // A runner with no free slot (capacity 0) still answers the gatherer; its hello ends the
    // backoff (2 s after the first failure, then 4 s: the turn would otherwise come ~6 s in).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let started = Instant::now();
    let mut runner = HandRunner::connect(&edge, "no-slots", 0).await;
    let (rid, g) = runner.gather().await;
    assert_eq!(g.initial_prompt, "A recipe book");
    let waited = started.elapsed();
    eprintln!("gather turn {waited:?} after a runner connected");
    assert!(waited < Duration::from_millis(1500), "a runner's hello runs the owed turn at once, not after the backoff: {waited:?}");
    runner.reply(&rid, json!({"error": "the model is overloaded"})).await;
    let (rid, _) = runner.gather().await;
    runner.reply(&rid, json!({"reply": "Who is it for?", "sender": "Client Relations"})).await;
    let seen = until(&mut ws, "the answer", |e| e["kind"] == "stageUpdate" && e["role"] == "agent").await;
    let notes = seen.iter().filter(|e| e["role"] == "system").count();
    assert_eq!(notes, 0, "later failures in a row are not told again: {seen:?}");

    // Messages posted over REST owe a turn too; the REST transcript matches the socket's.
    let (status, posted) = api.post("/api/job-messages/", &ann, json!({"job_id": job_id, "role": "user", "content": "My kids"})).await;
    assert_eq!(status, StatusCode::CREATED, "{posted}");
    let (rid, g) = runner.gather().await;
    assert_eq!(g.transcript.last().map(|t| t.content.as_str()), Some("My kids"));
    runner.reply(&rid, json!({"reply": "Thanks!", "sender": "Client Relations"})).await;
    until(&mut ws, "thanks", |e| e["kind"] == "stageUpdate" && e["content"] == "Thanks!").await;
    let (_, msgs) = api.get(&format!("/api/job-messages/?job_id={job_id}"), &ann).await;
    let contents: Vec<&str> = msgs.as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(contents[1..], ["Who is it for?", "My kids", "Thanks!"], "{contents:?}");
    assert!(contents[0].contains("unavailable"));

    // What a turn costs the edge (the runner here answers at once): chat sent → request at the
    // runner, and reply sent → the answer on the socket.
    let (mut ask, mut answer) = (vec![], vec![]);
    for i in 0..7 {
        let t = Instant::now();
        ws.send_json(&json!({"kind": "chat", "content": format!("detail {i}")})).await;
        let (rid, g) = runner.gather().await;
        ask.push(t.elapsed());
        assert_eq!(g.must_summarise, i >= 6, "the rounds run out at the 8th user message");
        let t = Instant::now();
        runner.reply(&rid, json!({"reply": format!("noted {i}"), "sender": "Client Relations"})).await;
        until(&mut ws, "the answer", |e| e["kind"] == "stageUpdate" && e["content"] == format!("noted {i}")).await;
        answer.push(t.elapsed());
    }
    ask.sort();
    answer.sort();
    eprintln!("gather turn through the edge: chat to request p50 {:?} max {:?}; reply to socket p50 {:?} max {:?}", ask[3], ask[6], answer[3], answer[6]);

    // Pausing a collecting job is carried to its dispatch.
    let (status, paused) = api.post(&format!("/api/jobs/{job_id}/pause/"), &ann, json!({})).await;
    assert_eq!((status, paused["status"].clone()), (StatusCode::OK, json!("collecting")), "{paused}");
    ws.send_json(&json!({"kind": "chat", "content": "That's all"})).await;
    let (rid, _) = runner.gather().await;
    runner.reply(&rid, json!({"reply": "REQUIREMENTS_SUMMARY: recipes for kids", "sender": "Client Relations"})).await;
    until(&mut ws, "queued", |e| e["kind"] == "jobStatus" && e["status"] == "queued").await;
    let mut worker = HandRunner::connect(&edge, "slots", 1).await;
    let a = worker.assignment().await;
    let app = a.app.expect("app parameters");
    assert!(app.paused, "paused before dispatch: the run waits for resume");
    assert_eq!(app.requirements_summary, "recipes for kids");
}
