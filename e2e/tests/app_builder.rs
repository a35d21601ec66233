//! Seed 000's app builder end to end: a real `wrangler dev`, a real runner with the Docker
//! executor and the agent image running the real Claude Code CLI, and the scripted model server
//! answering every LLM step (chosen by the system prompt's `Kiln role:` line) and every ticket
//! build (chosen by the prompt's `Ticket id:` line). Claude Code rather than the `text` profile:
//! a ticket's files must be written by the agent's own tool calls inside the job's container, at
//! `/app`, as they are under `scripts/dev`; a text agent would only echo its prompt.
//!
//! The tests share one edge, one model server and one runner (three slots), each test on its own
//! user and its own marker in the idea (`kiln-flow`, `kiln-pause`, ...), which every step's prompt
//! carries (it starts with `The idea: …`, and a ticket's prompt holds the PRD, which quotes it), so
//! a test's scripted rules answer only its own job. Rules not specific to a test are the demo
//! script's, so the demo model is exercised through the real pipeline too. The budget test has
//! an edge and a runner of its own (a runner's budget is its whole configuration).

use std::time::Duration;

use kiln_e2e::app::{chat, entries, AppClient};
use kiln_e2e::model::{ModelServer, Script};
use kiln_e2e::{StatusCode, TestEdge, TestRunner, WsClient};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

/// Long enough for a whole job on a loaded 2-core machine (each ticket starts a container and
/// Claude Code).
const JOB_TIMEOUT: Duration = Duration::from_secs(400);
const WAIT: Duration = Duration::from_secs(60);

struct World {
    edge: TestEdge,
    model: ModelServer,
    _runner: TestRunner,
}

static SHARED: OnceCell<World> = OnceCell::const_new();

async fn shared() -> &'static World {
    SHARED.get_or_init(|| World::start(test_rules(), &[], None)).await
}

impl World {
    /// An edge, a model server answering `rules` then the demo script's, and a Claude Code runner
    /// with `extra` settings (and `config` as its TOML file, when given).
    async fn start(rules: Vec<Value>, extra: &[(&str, &str)], config: Option<&str>) -> World {
        let mut all = rules;
        all.extend(Script::demo().rules.iter().map(|r| serde_json::to_value(r).unwrap()));
        let model = ModelServer::start(Script::from_value(json!({"model": "kiln-test", "rules": all})).expect("a valid script"));
        let edge = TestEdge::start(&[("MAX_CONCURRENT_JOBS", "4")]).await.expect("starting wrangler dev");
        let url = model.url();
        let mut env: Vec<(&str, &str)> = vec![
            ("RUNNER_EXECUTOR", "docker"),
            ("RUNNER_IMAGE", "kiln-agent:latest"),
            // The private engine has no bridge: the container reaches the model on loopback.
            ("RUNNER_NETWORK", "host"),
            ("RUNNER_AGENT", "claude"),
            ("RUNNER_AGENT_ENV", "ANTHROPIC_BASE_URL,ANTHROPIC_API_KEY,DISABLE_AUTOUPDATER,CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"),
            ("ANTHROPIC_BASE_URL", url.as_str()),
            ("ANTHROPIC_API_KEY", "sk-ant-kiln-test"),
            ("DISABLE_AUTOUPDATER", "1"),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            // Every LLM step (gatherer, executives, PRD, tickets) on the scripted model.
            ("RUNNER_LLM_MODEL", "anthropic/kiln-test"),
            ("MAX_CONCURRENT_JOBS", "3"),
        ];
        env.extend_from_slice(extra);
        let config_file = tempfile::NamedTempFile::new().unwrap();
        let config_path = config_file.path().display().to_string();
        if let Some(c) = config {
            std::fs::write(config_file.path(), c).unwrap();
            env.push(("RUNNER_CONFIG", config_path.as_str()));
        }
        let runner = TestRunner::start(&edge, &env).await.expect("starting a runner");
        drop(config_file);
        World { edge, model, _runner: runner }
    }

    async fn user(&self, prefix: &str) -> AppClient {
        AppClient::register(&self.edge, prefix).await
    }
}

fn when(marker: &str, role: &str) -> Value {
    json!({"role": role, "conversation": marker})
}

/// The rules of the shared world's tests, tried before the demo script's.
fn test_rules() -> Vec<Value> {
    vec![
        // kiln-flow: the gatherer asks twice before it summarises.
        json!({"name": "flow-second-question", "when": {"role": "gatherer", "conversation": "kiln-flow", "user_messages": 2},
               "text": "[demo model] Thanks. And how should they find a book again later?"}),
        // kiln-flow: the CTO's provider rate-limits once (the runner waits Retry-After and asks
        // again); the Secretary agrees only in round 2.
        json!({"name": "flow-cto", "when": when("kiln-flow", "cto"), "error": {"status": 429, "retry_after": 1}, "fail_first": 1,
               "text": "[demo model] CTO: Plain HTML and JavaScript, no build step."}),
        json!({"name": "flow-secretary-round-1", "when": {"role": "secretary", "conversation": "kiln-flow", "prompt": "Round 1 of"},
               "text": "[demo model] Secretary: Noted. One more round to settle the stack."}),
        // kiln-flow's continuation run (its requirements say kiln-more): one new story.
        json!({"name": "more-tickets", "when": when("kiln-more", "tickets"),
               "text": "```json\n{\"tickets\": [{\"id\": \"E2\", \"type\": \"epic\", \"title\": \"More\", \"description\": \"The new requirements.\", \"parent\": null, \"dependencies\": []}, {\"id\": \"S3\", \"type\": \"story\", \"title\": \"About page\", \"description\": \"Write S3.md.\", \"parent\": \"E2\", \"dependencies\": []}]}\n```"}),
        // kiln-pause: S1 makes a file and links that point out of the workspace, then takes its time.
        json!({"name": "pause-s1-links", "when": {"conversation": "kiln-pause", "prompt": "Ticket id: S1", "offers_tool": "Bash", "after_tool": false},
               "text": "[demo model] Making the workspace.",
               "tool_calls": [{"name": "Bash", "input": {"command": "mkdir -p src && printf 'hello from S1\\n' > src/hello.txt && ln -s /etc escape && ln -s /etc/hostname src/host && ls -la", "description": "Create files and links"}}]}),
        json!({"name": "pause-s1-done", "when": {"conversation": "kiln-pause", "prompt": "Ticket id: S1", "after_tool": true},
               "stall_before_ms": 4000, "text": "[demo model] Built ticket S1 with its links."}),
        // kiln-fail: S1's agent run always fails (a 400 Claude Code does not retry); S2 depends
        // on it, S3 does not.
        json!({"name": "fail-tickets", "when": when("kiln-fail", "tickets"),
               "text": "```json\n{\"tickets\": [{\"id\": \"E1\", \"type\": \"epic\", \"title\": \"App\", \"description\": \"d\", \"parent\": null, \"dependencies\": []}, {\"id\": \"S1\", \"type\": \"story\", \"title\": \"Broken\", \"description\": \"fails\", \"parent\": \"E1\", \"dependencies\": []}, {\"id\": \"S2\", \"type\": \"story\", \"title\": \"After broken\", \"description\": \"needs S1\", \"parent\": \"E1\", \"dependencies\": [\"S1\"]}, {\"id\": \"S3\", \"type\": \"story\", \"title\": \"Independent\", \"description\": \"Write S3.md.\", \"parent\": \"E1\", \"dependencies\": []}]}\n```"}),
        json!({"name": "fail-s1", "when": {"conversation": "kiln-fail", "prompt": "Ticket id: S1"},
               "error": {"status": 400, "type": "invalid_request_error", "message": "scripted failure of ticket S1"}}),
    ]
}

fn kinds<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// The statuses of the `jobStatus` events, in order.
fn statuses(events: &[Value]) -> Vec<String> {
    kinds(events, "jobStatus").iter().map(|e| e["status"].as_str().unwrap_or_default().to_string()).collect()
}

/// Reads the socket until a `jobStatus` of `status` (panicking on a `failed` one otherwise).
async fn until_status(ws: &mut WsClient, status: &str, timeout: Duration) -> Vec<Value> {
    let want = status.to_string();
    let events = ws
        .until(timeout, &format!("jobStatus {status}"), |e| {
            e["kind"] == "jobStatus" && (e["status"] == want.as_str() || e["status"] == "failed")
        })
        .await;
    let last = events.last().unwrap();
    assert_eq!(last["status"], status, "the job ended otherwise: {last}\n{events:#?}");
    events
}

/// A ticket's model-local id (`S1`), from its title in a backlog of known titles.
fn by_title<'a>(tickets: &'a [Value], title: &str) -> &'a Value {
    tickets.iter().find(|t| t["title"] == title).unwrap_or_else(|| panic!("no ticket {title:?} in {tickets:#?}"))
}

#[tokio::test]
async fn an_idea_becomes_a_built_app_through_chat_planning_prd_and_tickets_and_a_continuation_adds_to_it() {
    let w = shared().await;
    let c = w.user("flow").await;
    let idea = "A reading list for people who read a lot (kiln-flow)";
    let started = std::time::Instant::now();
    let job = c.create_job(idea).await;
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["status"], "collecting", "{job}");
    assert_eq!(job["initial_prompt"], idea, "{job}");

    // The gatherer's first reply follows on the socket, then it asks until it has an answer.
    let mut ws = c.socket(&id).await;
    let first = ws
        .until(WAIT, "the gatherer's question", |e| e["kind"] == "stageUpdate" && e["role"] == "agent")
        .await;
    let question = first.last().unwrap();
    println!("idea to the gatherer's question: {:?}", started.elapsed());
    assert!(question["content"].as_str().unwrap().contains("who will use it"), "{question}");
    assert!(question["sender"].as_str().is_some_and(|s| !s.is_empty()), "{question}");
    assert!(question["content"].as_str().unwrap().contains(idea), "the gatherer was told the idea: {question}");
    assert_eq!(statuses(&first), ["collecting"]);

    ws.send_json(&chat("Readers who want to remember what they read")).await;
    let second = ws
        .until(WAIT, "the gatherer's second question", |e| e["kind"] == "stageUpdate" && e["role"] == "agent")
        .await;
    assert!(second.last().unwrap()["content"].as_str().unwrap().contains("find a book again"), "{second:#?}");
    assert!(kinds(&second, "stageUpdate").iter().any(|e| e["role"] == "user" && e["content"] == "Readers who want to remember what they read"));
    assert_eq!(c.job(&id).await["status"], "collecting");
    let answered = std::time::Instant::now();
    ws.send_json(&chat("By searching for a title")).await;
    let to_queue = until_status(&mut ws, "queued", WAIT).await;
    println!("answer to the summary and queued: {:?}", answered.elapsed());
    let queued_at = std::time::Instant::now();
    let agent_turns: Vec<&Value> = kinds(&to_queue, "stageUpdate").into_iter().filter(|e| e["role"] == "agent").collect();
    let summary_message = agent_turns.iter().find(|e| e["content"].as_str().unwrap().contains(&format!("\"{idea}\""))).copied();
    assert!(summary_message.is_some(), "the summary is posted as a message: {to_queue:#?}");
    let queued = c.job(&id).await;
    let summary = queued["requirements_summary"].as_str().unwrap_or_else(|| panic!("a summary: {queued}"));
    assert!(summary.contains(&format!("\"{idea}\"")) && summary.contains("By searching for a title"), "{summary}");
    assert_eq!(w.model.requests().iter().filter(|r| r.rule.as_deref() == Some("flow-second-question")).count(), 1);

    // Chat after collecting is refused on the socket, which stays open.
    ws.send_json(&chat("one more thing")).await;
    let refused = ws.until(WAIT, "an error event", |e| e["kind"] == "error").await;
    let error = refused.last().unwrap();
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");

    // Planning to build_done, every phase announced in order.
    let mut events = refused;
    events.extend(until_status(&mut ws, "build_done", JOB_TIMEOUT).await);
    println!("queued to build_done (6 dialogue turns, PRD, backlog, 2 tickets by Claude Code): {:?}", queued_at.elapsed());
    let s = statuses(&events);
    let order = ["planning", "prd_ready", "ticketing", "tickets_ready", "building", "build_done"];
    let positions: Vec<usize> = order.iter().map(|p| s.iter().position(|x| x == p).unwrap_or_else(|| panic!("no {p} in {s:?}"))).collect();
    assert!(positions.windows(2).all(|p| p[0] < p[1]), "{s:?}");

    // The dialogue: two rounds (the Secretary agreed in the second), the CTO's turn despite its
    // provider's 429.
    let dialogue = kinds(&events, "agentDialogue");
    let agents: Vec<&str> = dialogue.iter().map(|d| d["agent"].as_str().unwrap()).collect();
    assert_eq!(agents, ["CEO", "CTO", "Secretary", "CEO", "CTO", "Secretary"], "{dialogue:#?}");
    assert_eq!(dialogue.iter().map(|d| d["order"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    assert!(dialogue[5]["message"].as_str().unwrap().contains("CONSENSUS"));
    assert!(dialogue.iter().all(|d| d["jobId"] == id.as_str()));
    let cto_log: Vec<u16> = w.model.requests().iter().filter(|r| r.rule.as_deref() == Some("flow-cto")).map(|r| r.status).collect();
    assert_eq!(&cto_log[..2], [429, 200], "the first CTO call was rate limited, the retry answered: {cto_log:?}");
    let detail = c.job(&id).await;
    let steps = detail["steps"].as_array().unwrap_or_else(|| panic!("steps in the detail: {detail}"));
    assert_eq!(steps.len(), 6, "{steps:#?}");
    assert_eq!(steps[1]["agent_name"], "CTO");
    assert_eq!(steps[1]["id"].as_str().unwrap().split(':').next(), Some(id.as_str()));

    // The PRD and its spec, announced and saved as the job's App.
    let prd = kinds(&events, "prdReady");
    assert_eq!(prd.len(), 1, "{events:#?}");
    assert_eq!(prd[0]["spec"]["name"], "Kiln demo app");
    let (status, app) = c.app_by_job(&id).await;
    assert_eq!(status, StatusCode::OK, "{app}");
    assert_eq!(app["job_id"], id.as_str());
    assert_eq!(app["spec"], prd[0]["spec"]);
    assert!(app["prd_markdown"].as_str().unwrap().starts_with("# Product requirements (written by Kiln's demo model)"), "{app}");
    assert!(app["prd_generated_at"].is_string(), "{app}");
    let (status, same) = c.get(&format!("/api/apps/{}/", app["id"].as_str().unwrap())).await;
    assert_eq!((status, &same), (StatusCode::OK, &app));
    let (_, apps) = c.get("/api/apps/").await;
    assert_eq!(apps.as_array().map(Vec::len), Some(1), "{apps}");

    // The backlog: an epic and two stories, S2 after S1, both built.
    let tickets = c.tickets(&id).await;
    assert_eq!(tickets.len(), 3, "{tickets:#?}");
    let (epic, s1, s2) = (by_title(&tickets, "The demo app"), by_title(&tickets, "Page skeleton"), by_title(&tickets, "List behaviour"));
    assert_eq!(epic["type"], "epic");
    assert_eq!(s1["parent_id"], epic["id"]);
    assert_eq!(s2["dependencies"], json!([s1["id"]]));
    assert!(tickets.iter().filter(|t| t["type"] == "story").all(|t| t["status"] == "done"), "{tickets:#?}");
    let (status, one) = c.get(&format!("/api/tickets/{}/", s2["id"].as_str().unwrap())).await;
    assert_eq!((status, &one["title"]), (StatusCode::OK, &json!("List behaviour")), "{one}");
    let updates = kinds(&events, "ticketUpdate");
    let reset_at = events.iter().position(|e| e["kind"] == "ticketReset").expect("a ticketReset");
    let first_update = events.iter().position(|e| e["kind"] == "ticketUpdate").unwrap();
    assert!(reset_at < first_update, "ticketReset comes before the backlog's updates");
    let seen = |t: &Value, status: &str| {
        events.iter().position(|e| e["kind"] == "ticketUpdate" && e["ticketId"] == t["id"] && e["status"] == status)
    };
    let s1_done = seen(s1, "done").unwrap_or_else(|| panic!("S1 done: {updates:#?}"));
    let s2_started = seen(s2, "in_progress").unwrap_or_else(|| panic!("S2 in progress: {updates:#?}"));
    assert!(seen(s1, "in_progress").unwrap() < s1_done && s1_done < s2_started, "S2 is built after S1");

    // The files the tickets' agent runs wrote, listed and read through the files API.
    let (status, tree) = c.structure(&id, "/app").await;
    assert_eq!(status, StatusCode::OK, "{tree}");
    let listed = entries(&tree);
    for f in ["/app/index.html", "/app/app.js"] {
        assert!(listed.contains(&(f.to_string(), "file".to_string())), "{f} in {tree:#}");
    }
    assert!(c.file(&id, "/app/index.html").await.contains("ticket S1: Page skeleton"));
    assert!(c.file(&id, "/app/app.js").await.contains("localStorage"));

    // A reconnect: the socket's replay and the REST transcript agree message for message, and a
    // stageUpdate's timestamp is its stored message's created_at.
    ws.close().await;
    let mut again = c.socket(&id).await;
    let replay = again.drain(Duration::from_secs(2)).await;
    let live: Vec<&Value> = kinds(&replay, "stageUpdate");
    let stored = c.messages(&id).await;
    assert_eq!(live.len(), stored.len(), "socket {live:#?}\nREST {stored:#?}");
    for (e, m) in live.iter().zip(&stored) {
        assert_eq!((&e["role"], &e["sender"], &e["content"]), (&m["role"], &m["sender"], &m["content"]), "{e}\n{m}");
        assert_eq!(e["timestamp"], m["created_at"], "{e}\n{m}");
        assert_eq!(m["id"], format!("{id}:{}", e["seq"]), "{m}");
    }
    assert!(stored.iter().any(|m| m["metadata"]["type"] == "description"), "narrations are messages too: {stored:#?}");
    let (status, single) = c.get(&format!("/api/job-messages/{}/", stored[0]["id"].as_str().unwrap())).await;
    assert_eq!((status, &single), (StatusCode::OK, &stored[0]));
    again.close().await;

    // Another user sees none of it.
    let other = w.user("flow-other").await;
    for path in [
        format!("/api/jobs/{id}/"),
        format!("/api/apps/by-job/{id}/"),
        format!("/api/apps/{}/", app["id"].as_str().unwrap()),
        format!("/api/tickets/{}/", s1["id"].as_str().unwrap()),
        format!("/api/job-messages/{}/", stored[0]["id"].as_str().unwrap()),
        format!("/api/jobs/{id}/files/structure/?path=/app"),
        format!("/api/jobs/{id}/files/content/?path=/app/index.html"),
    ] {
        let (status, body) = other.get(&path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert!(body["detail"].is_string() && body["error"].is_string(), "{path}: {body}");
    }
    for path in [format!("/api/tickets/?job_id={id}"), format!("/api/job-messages/?job_id={id}")] {
        let (status, body) = other.get(&path).await;
        assert!(status == StatusCode::NOT_FOUND || body == json!([]), "{path}: {status} {body}");
    }

    // A continuation run builds only the new requirements, over the workspace the first run left.
    let continued = std::time::Instant::now();
    let (status, body) = c.post(&format!("/api/jobs/{id}/continue/"), json!({"requirements": "Add an about page (kiln-more)"})).await;
    assert!(status.is_success(), "{status} {body}");
    let mut ws = c.socket(&id).await;
    let cont = ws
        .until(JOB_TIMEOUT, "the continuation's build_done", |e| {
            e["kind"] == "jobStatus" && e["seq"].as_u64() > events.last().and_then(|l| l["seq"].as_u64()) && (e["status"] == "build_done" || e["status"] == "failed")
        })
        .await;
    let end = cont.last().unwrap();
    assert_eq!(end["status"], "build_done", "{cont:#?}");
    println!("continuation to build_done (1 ticket): {:?}", continued.elapsed());
    let tickets = c.tickets(&id).await;
    assert!(tickets.iter().any(|t| t["title"] == "About page" && t["status"] == "done"), "{tickets:#?}");
    assert!(c.file(&id, "/app/S3.md").await.contains("Ticket S3: About page"));
    assert!(c.file(&id, "/app/index.html").await.contains("ticket S1"), "the first run's files are still there");
}

#[tokio::test]
async fn a_paused_build_stops_between_tickets_and_its_live_files_refuse_traversal_and_symlink_escapes() {
    let w = shared().await;
    let c = w.user("pause").await;
    let id = c.create_job("A notes app (kiln-pause)").await["id"].as_str().unwrap().to_string();
    let mut ws = c.socket(&id).await;
    ws.until(WAIT, "the gatherer's question", |e| e["kind"] == "stageUpdate" && e["role"] == "agent").await;
    ws.send_json(&chat("Just me, quick notes")).await;
    until_status(&mut ws, "building", JOB_TIMEOUT).await;

    // Paused while S1 builds: S1 finishes, S2 does not start.
    ws.until(WAIT, "S1 in progress", |e| e["kind"] == "ticketUpdate" && e["status"] == "in_progress").await;
    let paused = c.action(&id, "pause").await;
    assert_eq!(paused["is_paused"], true, "{paused}");
    let s1_done = ws.until(JOB_TIMEOUT, "S1 done", |e| e["kind"] == "ticketUpdate" && (e["status"] == "done" || e["status"] == "failed")).await;
    assert_eq!(s1_done.last().unwrap()["status"], "done", "{s1_done:#?}");
    let quiet = ws.drain(Duration::from_secs(5)).await;
    // No agent runs for S2 while paused (the runner announces S2 before it checks the pause, so
    // its ticket may already read in_progress; its build has not begun).
    let s2_runs = || w.model.requests().iter().filter(|r| r.prompt.contains("Ticket id: S2") && r.prompt.contains("kiln-pause")).count();
    assert_eq!(s2_runs(), 0, "no agent run while paused: {quiet:#?}");
    assert!(!quiet.iter().any(|e| e["kind"] == "ticketUpdate" && e["status"] == "done"), "{quiet:#?}");
    let job = c.job(&id).await;
    assert_eq!((job["status"].as_str(), job["is_paused"].as_bool()), (Some("building"), Some(true)), "{job}");
    let tickets = c.tickets(&id).await;
    assert_ne!(by_title(&tickets, "List behaviour")["status"], "done", "{tickets:#?}");

    // The live workspace through the runner: files, links listed as links and never followed.
    let (status, tree) = c.structure(&id, "/app").await;
    assert_eq!(status, StatusCode::OK, "{tree}");
    assert_eq!(tree["source"], "runner", "{tree}");
    let listed = entries(&tree);
    assert!(listed.contains(&("/app/src/hello.txt".into(), "file".into())), "{tree:#}");
    assert!(listed.contains(&("/app/escape".into(), "symlink".into())), "{tree:#}");
    assert!(!listed.iter().any(|(p, _)| p.starts_with("/app/escape/")), "a link is never followed: {tree:#}");
    assert_eq!(c.file(&id, "/app/src/hello.txt").await, "hello from S1\n");
    for (path, why) in [
        ("/app/escape/hostname", "a path through a link out of the workspace"),
        ("/app/src/host", "a link to a file outside"),
        ("/app/../etc/hostname", "traversal"),
        ("/app/src/../../etc/hostname", "traversal inside"),
        ("/etc/hostname", "outside /app"),
        ("app/src/hello.txt", "relative"),
    ] {
        let (status, body) = c.content(&id, path).await;
        assert!(status.is_client_error(), "{why} ({path}) is refused: {status} {body}");
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{why}: a clear detail: {body}");
        assert!(body.get("content").is_none(), "{body}");
    }
    let (status, body) = c.structure(&id, "/app/escape").await;
    assert!(status.is_client_error(), "listing through a link is refused: {status} {body}");
    let (status, body) = c.structure(&id, "/app/../").await;
    assert!(status.is_client_error(), "{status} {body}");

    // Resumed, the build goes on and ends; the files still answer from the snapshot.
    let resumed = c.action(&id, "resume").await;
    assert_eq!(resumed["is_paused"], false, "{resumed}");
    until_status(&mut ws, "build_done", JOB_TIMEOUT).await;
    assert!(s2_runs() > 0, "S2 was built after the resume");
    let (status, tree) = c.structure(&id, "/app").await;
    assert_eq!(status, StatusCode::OK, "{tree}");
    assert_eq!(tree["source"], "snapshot", "{tree}");
    let listed = entries(&tree);
    assert!(listed.iter().any(|(p, _)| p == "/app/app.js"), "{tree:#}");
    assert!(!listed.iter().any(|(p, _)| p.starts_with("/app/escape")), "the snapshot keeps no link: {tree:#}");
    assert_eq!(c.file(&id, "/app/src/hello.txt").await, "hello from S1\n");
    let (status, body) = c.content(&id, "/app/../etc/hostname").await;
    assert!(status.is_client_error(), "{status} {body}");
    let (status, body) = c.content(&id, "/app/escape/hostname").await;
    assert!(status.is_client_error(), "{status} {body}");
}

#[tokio::test]
async fn a_ticket_failing_twice_fails_the_job_and_leaves_its_dependent_unbuilt() {
    let w = shared().await;
    let c = w.user("fail").await;
    let id = c.create_job("A counter (kiln-fail)").await["id"].as_str().unwrap().to_string();
    let mut ws = c.socket(&id).await;
    ws.until(WAIT, "the gatherer's question", |e| e["kind"] == "stageUpdate" && e["role"] == "agent").await;
    ws.send_json(&chat("Count clicks")).await;
    let events = until_status(&mut ws, "failed", JOB_TIMEOUT).await;
    let job = c.job(&id).await;
    assert_eq!(job["status"], "failed");
    let error = job["error_message"].as_str().unwrap_or_else(|| panic!("an error message: {job}"));
    assert!(error.contains("S1") && error.contains("S2"), "{error}");
    println!("the failed job says: {error}");

    let tickets = c.tickets(&id).await;
    assert_eq!(by_title(&tickets, "Broken")["status"], "failed", "{tickets:#?}");
    assert_eq!(by_title(&tickets, "Independent")["status"], "done", "tickets not depending on it are built: {tickets:#?}");
    let dependent = by_title(&tickets, "After broken");
    assert_ne!(dependent["status"], "done", "{tickets:#?}");
    assert!(
        !events.iter().any(|e| e["kind"] == "ticketUpdate" && e["ticketId"] == dependent["id"] && e["status"] == "in_progress"),
        "the dependent ticket is never started: {events:#?}"
    );
    let broken = by_title(&tickets, "Broken")["id"].clone();
    let attempts = events.iter().filter(|e| e["kind"] == "ticketUpdate" && e["ticketId"] == broken && e["status"] == "in_progress").count();
    assert_eq!(attempts, 2, "tried, then once more");
    assert!(w.model.requests().iter().filter(|r| r.rule.as_deref() == Some("fail-s1")).count() >= 2);
    assert!(c.file(&id, "/app/S3.md").await.contains("Ticket S3: Independent"));
}

#[tokio::test]
async fn a_job_over_its_token_budget_fails_with_a_clear_reason() {
    let huge = "A very long PRD line for the budget test. ".repeat(1500);
    let w = World::start(
        vec![json!({"name": "budget-prd", "when": when("kiln-budget", "prd"), "text": format!("# PRD\n{huge}\n```json\n{{\"name\": \"x\"}}\n```")})],
        &[],
        Some("[llm]\nbudget_tokens = 12000\n"),
    )
    .await;
    let c = w.user("budget").await;
    let id = c.create_job("A big plan (kiln-budget)").await["id"].as_str().unwrap().to_string();
    let mut ws = c.socket(&id).await;
    ws.until(WAIT, "the gatherer's question", |e| e["kind"] == "stageUpdate" && e["role"] == "agent").await;
    ws.send_json(&chat("Everything")).await;
    until_status(&mut ws, "failed", JOB_TIMEOUT).await;
    let job = c.job(&id).await;
    let error = job["error_message"].as_str().unwrap_or_else(|| panic!("an error message: {job}"));
    assert!(error.contains("budget"), "the reason names the budget: {error}");
    println!("the job over budget says: {error}");
    let (status, app) = c.app_by_job(&id).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "no PRD was saved: {app}");
    assert!(c.tickets(&id).await.is_empty());
}
