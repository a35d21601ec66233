//! Seed 002's agent dashboard as a user sees it, end to end: the REST face and the five channels
//! of a real `wrangler dev`, the real runner binary (process executor) answering from the
//! scripted model server's demo rules (agents, round-table providers, judge, A/B judge) and
//! `kiln_e2e::fake3d`'s Tripo3D-style vendor and WordPress.
//!
//! Checked: the demo rules answer every dashboard role in the shapes the runner reads; a task
//! streamed on `tasks` from pending to completed with rising progress (10/90/100), its agent on
//! `agents` running then completed, a socket filtered to another agent type and another owner's
//! socket seeing none of it; a round table of six providers where one fails, its stages in order
//! on `round_table`, a winner among the five that answered and the stats updated; a 3D pipeline
//! through generating/validating/uploading/completed on `3d_pipeline` and one rejected at
//! validation; a learning cycle (learning, then idle with new instructions); ping/pong, 4004, a
//! CORS preflight from the dashboard's origins, a 429 from a login; on the production build,
//! anonymous sockets refused and the REST face's per-user limit (429, sockets unlimited).

use std::time::Duration;

use kiln_e2e::dashboard::{open_channel, DashboardClient};
use kiln_e2e::fake3d::{FakeVendor, FakeWordPress};
use kiln_e2e::model::{ModelServer, Script};
use kiln_e2e::{Method, StatusCode, TestEdge, TestRunner};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const QUIET: Duration = Duration::from_millis(1500);
const PROVIDERS: [&str; 6] = ["kiln-rt-alpha", "kiln-rt-beta", "kiln-rt-gamma", "kiln-rt-delta", "kiln-rt-epsilon", "kiln-rt-broken"];
const KEY: &str = "tripo-flow-key";
const WP_USER: &str = "kiln";
const WP_PASSWORD: &str = "abcd 1234 EFGH 5678";

/// The demo script with one test rule before it: the sixth provider's model is not available.
fn script() -> Script {
    let mut rules = vec![json!({"name": "broken-provider", "when": {"model": "kiln-rt-broken"}, "error": {"status": 400, "message": "this model is not available"}})];
    rules.extend(Script::demo().rules.iter().map(|r| serde_json::to_value(r).unwrap()));
    Script::from_value(json!({"model": "kiln-demo", "rules": rules})).unwrap()
}

/// The runner's config: every role and the six providers on the scripted server, `[three_d]` on
/// the fakes.
fn runner_config(model: &ModelServer, vendor: &FakeVendor, wp: &FakeWordPress) -> String {
    let providers: Vec<String> = PROVIDERS.iter().map(|m| format!("\"scripted/{m}\"")).collect();
    format!(
        "[llm]\nmax_attempts = 1\n\n[llm.providers.scripted]\napi = \"anthropic\"\nbase_url = \"{}\"\n\n[llm.roles]\ndefault = \"scripted/kiln-demo\"\n\n[llm.round_table]\nproviders = [{}]\ntimeout_secs = 10\n\n[three_d]\nvendor_url = \"{}\"\npoll_ms = 100\npoll_max_ms = 300\ngenerate_timeout_secs = 60\nwordpress_url = \"{}\"\nwordpress_user = \"{WP_USER}\"\n",
        model.url(),
        providers.join(", "),
        vendor.url(),
        wp.url()
    )
}

async fn anthropic(model: &ModelServer, requested: &str, system: &str, prompt: &str) -> String {
    let body = json!({"model": requested, "max_tokens": 500, "system": system, "messages": [{"role": "user", "content": prompt}]});
    let res = reqwest::Client::new().post(format!("{}/v1/messages", model.url())).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200, "{requested}: {}", res.text().await.unwrap());
    let v: Value = res.json().await.unwrap();
    v["content"][0]["text"].as_str().unwrap().to_string()
}

fn fenced_json(text: &str) -> Value {
    let start = text.find("```json").unwrap_or_else(|| panic!("no ```json block in {text}")) + 7;
    let end = text[start..].find("```").unwrap() + start;
    serde_json::from_str(text[start..end].trim()).unwrap()
}

/// The demo rules answer each dashboard role in the shape the runner reads.
#[tokio::test]
async fn the_demo_model_answers_every_dashboard_role() {
    let model = ModelServer::demo();
    let role = |r: &str| format!("You are Kiln.\nKiln role: {r}\n");
    for (technique, line) in [
        ("Technique: chain of thought.", "Answer:"),
        ("Technique: ReAct.", "Final Answer:"),
        ("Technique: self-consistency.", "Answer:"),
    ] {
        let text = anthropic(&model, "kiln-demo", &format!("{}You are Kiln's marketing agent.\n{technique}", role("agent.marketing")), "Name a tagline").await;
        let last = text.lines().last().unwrap();
        assert!(last.starts_with(line) && last.contains("Name a tagline"), "{technique}: {text}");
    }
    for technique in ["Technique: few-shot.", "Technique: zero-shot."] {
        let text = anthropic(&model, "kiln-demo", &format!("{}{technique}", role("agent.pricing")), "Price a mug").await;
        assert!(text.contains("Price a mug"), "{technique}: {text}");
    }
    // Six providers, six different answers.
    let mut answers = vec![];
    for p in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"] {
        answers.push(anthropic(&model, &format!("kiln-rt-{p}"), "Technique: zero-shot.", "Pitch a mug").await);
    }
    answers.sort();
    answers.dedup();
    assert_eq!(answers.len(), 6, "{answers:#?}");
    assert!(answers.iter().all(|a| a.contains("Pitch a mug")));
    // The judge scores up to twelve labels on the whole rubric, best first.
    let judge = fenced_json(&anthropic(&model, "kiln-demo", &role("judge"), "Prompt:\nx\nAnswer A:\na\nAnswer B:\nb").await);
    for (i, l) in ["A", "B", "F", "L"].iter().enumerate() {
        let s = &judge["scores"][l];
        for c in ["relevance", "accuracy", "clarity", "completeness", "creativity"] {
            let n = s[c].as_f64().unwrap_or_else(|| panic!("{l} {c}: {judge}"));
            assert!((0.0..=10.0).contains(&n));
        }
        if i > 0 {
            assert!(judge["scores"]["A"]["accuracy"].as_f64() > s["accuracy"].as_f64() || *l == "A");
        }
    }
    let ab = fenced_json(&anthropic(&model, "kiln-demo", &role("ab_judge"), "Answer A:\na\nAnswer B:\nb").await);
    assert!(["A", "B", "tie"].contains(&ab["winner"].as_str().unwrap()), "{ab}");
    let learn = fenced_json(&anthropic(&model, "kiln-demo", &role("agent_learn"), "Recent tasks").await);
    assert!(!learn["instructions"].as_str().unwrap().trim().is_empty() && !learn["changes"].as_array().unwrap().is_empty(), "{learn}");
}

/// The close code of a socket the server closes right after the upgrade.
async fn close_code(edge: &TestEdge, path: &str, token: &str) -> u16 {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let mut req = format!("{}{path}", edge.ws_url()).into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut stream, _) = tokio_tungstenite::connect_async(req).await.expect("the upgrade is accepted");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error: {e}"),
        }
    }
}

/// Progress values never fall.
fn rising(xs: &[f64]) -> bool {
    xs.windows(2).all(|w| w[0] <= w[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_round_tables_and_3d_pipelines_stream_on_the_dashboard_channels() {
    let model = ModelServer::start(script());
    let vendor = FakeVendor::start(KEY);
    let wp = FakeWordPress::start(WP_USER, WP_PASSWORD);
    let edge = TestEdge::start(&[("CORS_ORIGINS", "http://localhost:3000,https://*.vercel.app"), ("AUTH_FAILURES_PER_EMAIL", "3")])
        .await
        .expect("starting wrangler dev");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runner.toml");
    std::fs::write(&config, runner_config(&model, &vendor, &wp)).unwrap();
    let config = config.display().to_string();
    let runner = TestRunner::start(
        &edge,
        &[("RUNNER_EXECUTOR", "process"), ("RUNNER_CONFIG", config.as_str()), ("TRIPO_API_KEY", KEY), ("WORDPRESS_APP_PASSWORD", WP_PASSWORD)],
    )
    .await
    .expect("starting a runner");

    let ann = DashboardClient::register(&edge, "flow-ann").await;
    let bob = DashboardClient::register(&edge, "flow-bob").await;

    // Sockets first, so that every message of the jobs below is seen.
    let mut tasks = ann.channel("tasks", "").await;
    let pong = tasks.ping().await;
    assert_eq!(pong["type"], "pong", "{pong}");
    let mut agents = ann.channel("agents", "").await;
    let mut rounds = ann.channel("round_table", "").await;
    let mut pipelines = ann.channel("3d_pipeline", "").await;
    let mut pricing_only = ann.channel("tasks", "").await;
    pricing_only.subscribe(json!({"agent_type": "pricing"})).await;
    let mut bobs = bob.channel("tasks", "").await;

    // A task, pending to completed on the tasks channel.
    let t = std::time::Instant::now();
    let task = ann.submit_task("marketing", "Write a tagline for a handmade mug shop", json!({})).await;
    let id = task["taskId"].as_str().unwrap_or_else(|| panic!("{task}")).to_string();
    let seen = tasks
        .until(WAIT, "the task completed", |m| m["type"] == "task_update" && m["task_id"] == id.as_str() && m["status"] == "completed")
        .await;
    println!("task submitted to completed on the channel: {} ms", t.elapsed().as_millis());
    let mine: Vec<&Value> = seen.iter().filter(|m| m["task_id"] == id.as_str()).collect();
    let progress: Vec<f64> = mine.iter().map(|m| m["progress"].as_f64().unwrap()).collect();
    assert!(rising(&progress), "progress fell: {progress:?}");
    for p in [10.0, 90.0, 100.0] {
        assert!(progress.contains(&p), "no progress {p}: {progress:?}");
    }
    let statuses: Vec<&str> = mine.iter().map(|m| m["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.last(), Some(&"completed"));
    assert!(statuses.contains(&"running"), "{statuses:?}");
    assert!(mine.iter().all(|m| m["data"]["agent_type"] == "marketing"), "{mine:#?}");
    let last = mine.last().unwrap();
    let answer = last["data"]["result"]["answer"].as_str().unwrap_or_else(|| panic!("{last:#}"));
    assert!(answer.contains("Write a tagline for a handmade mug shop"), "{answer}");
    let view = ann.wait_for(&format!("/api/v1/tasks/{id}"), WAIT, |v| v["status"] == "completed").await;
    assert_eq!(view["progress"], 100.0, "{view:#}");
    assert_eq!(view["result"]["answer"], answer, "{view:#}");
    // The agent: running, then completed.
    let agent_msgs = agents
        .until(WAIT, "the agent completed", |m| m["agent_id"] == "marketing-001" && m["status"] == "completed")
        .await;
    let agent_statuses: Vec<&str> = agent_msgs.iter().filter(|m| m["agent_id"] == "marketing-001").map(|m| m["status"].as_str().unwrap()).collect();
    assert!(agent_statuses.contains(&"running"), "{agent_statuses:?}");
    assert!(pricing_only.drain(QUIET).await.iter().all(|m| m["task_id"] != id.as_str()), "a socket filtered to pricing saw a marketing task");
    assert!(bobs.drain(QUIET).await.is_empty(), "Bob saw Ann's task");
    let (status, _) = bob.get(&format!("/api/v1/tasks/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another owner's task is not found");

    // A learning cycle: learning, then idle with the demo learner's instructions.
    let (status, learn) = ann.post("/api/v1/agents/marketing/learn", json!({})).await;
    assert!(status.is_success(), "{status} {learn}");
    let seen = agents
        .until(WAIT, "the agent idle after learning", |m| m["agent_id"] == "marketing-001" && m["status"] == "idle")
        .await;
    assert!(seen.iter().any(|m| m["agent_id"] == "marketing-001" && m["status"] == "learning"), "{seen:#?}");
    let agent = ann.wait_for("/api/v1/agents/marketing", WAIT, |a| a["status"] == "idle").await;
    assert!(agent["instructions"].as_str().unwrap_or("").starts_with("Answer the task directly, state your assumptions"), "{agent:#}");

    // A round table of six, one failing.
    let t = std::time::Instant::now();
    let comp = ann.compete("Pitch a handmade mug in one sentence").await;
    let cid = comp["id"].as_str().unwrap_or_else(|| panic!("{comp}")).to_string();
    let seen = rounds
        .until(WAIT, "the round table completed", |m| m["competition_id"] == cid.as_str() && matches!(m["stage"].as_str(), Some("completed" | "failed")))
        .await;
    println!("round table of six to completed on the channel: {} ms", t.elapsed().as_millis());
    let mut stages: Vec<&str> = seen.iter().filter(|m| m["competition_id"] == cid.as_str()).map(|m| m["stage"].as_str().unwrap()).collect();
    stages.dedup();
    let order = ["pending", "generating", "scoring", "ab_testing", "completed"];
    let pos: Vec<usize> = stages.iter().map(|s| order.iter().position(|o| o == s).unwrap_or_else(|| panic!("stage {s}: {stages:?}"))).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "stages out of order: {stages:?}");
    for s in ["generating", "scoring", "ab_testing", "completed"] {
        assert!(stages.contains(&s), "no {s}: {stages:?}");
    }
    let c = ann.wait_for(&format!("/api/v1/round-table/{cid}"), WAIT, |v| v["stage"] == "completed").await;
    let entries = c["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 6, "{c:#}");
    let failed: Vec<&Value> = entries.iter().filter(|e| e["status"] != "ok").collect();
    assert_eq!(failed.len(), 1, "{c:#}");
    assert_eq!(failed[0]["status"], "failed", "{c:#}");
    assert!(failed[0]["model"].as_str().unwrap_or("").contains("kiln-rt-broken"), "{c:#}");
    assert!(entries.iter().filter(|e| e["status"] == "ok").all(|e| e["answer"].as_str().is_some_and(|a| a.contains("Pitch a handmade mug"))), "{c:#}");
    let winner = &c["winner"];
    let winner_provider = winner["provider"].as_str().unwrap_or_else(|| panic!("no winner: {c:#}")).to_string();
    assert!(!winner_provider.contains("broken"), "{c:#}");
    assert!(c["ab_test"]["winner"].is_string(), "{c:#}");
    let stats = ann.wait_for("/api/v1/round-table/stats", WAIT, |v| v.as_array().is_some_and(|a| !a.is_empty())).await;
    let stats = stats.as_array().unwrap();
    let wins: u64 = stats.iter().map(|s| s["wins"].as_u64().unwrap()).sum();
    assert_eq!(wins, 1, "{stats:#?}");
    let w = stats.iter().find(|s| s["provider"] == winner_provider.as_str()).unwrap_or_else(|| panic!("{winner_provider} not in {stats:#?}"));
    assert_eq!(w["wins"], 1);
    assert!(w["rating"].as_f64().unwrap() > 1500.0 - 1e-9, "{w}");
    let (_, bob_stats) = bob.get("/api/v1/round-table/stats").await;
    assert!(bob_stats.as_array().is_none_or(|a| a.iter().all(|s| s["participations"] == 0)), "Bob's stats hold Ann's round: {bob_stats}");
    let (status, _) = bob.get(&format!("/api/v1/round-table/{cid}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // 3D: one valid model through every stage, one rejected at validation.
    let t = std::time::Instant::now();
    let good = ann.create_3d("a low-poly teapot").await["id"].as_str().unwrap().to_string();
    let seen = pipelines
        .until(WAIT, "the pipeline completed", |m| m["pipeline_id"] == good.as_str() && matches!(m["stage"].as_str(), Some("completed" | "failed")))
        .await;
    println!("3D pipeline to completed on the channel: {} ms", t.elapsed().as_millis());
    let mine: Vec<&Value> = seen.iter().filter(|m| m["pipeline_id"] == good.as_str()).collect();
    let mut stages: Vec<&str> = mine.iter().map(|m| m["stage"].as_str().unwrap()).collect();
    stages.dedup();
    assert_eq!(stages.iter().filter(|s| **s != "pending").copied().collect::<Vec<_>>(), ["generating", "validating", "uploading", "completed"], "{mine:#?}");
    let progress: Vec<f64> = mine.iter().map(|m| m["progress"].as_f64().unwrap()).collect();
    assert!(rising(&progress), "{progress:?}");
    assert_eq!(progress.last(), Some(&100.0));
    let bad = ann.create_3d("a dense castle [faces]").await["id"].as_str().unwrap().to_string();
    let seen = pipelines
        .until(WAIT, "the pipeline failed", |m| m["pipeline_id"] == bad.as_str() && matches!(m["stage"].as_str(), Some("completed" | "failed")))
        .await;
    let stages: Vec<&str> = seen.iter().filter(|m| m["pipeline_id"] == bad.as_str()).map(|m| m["stage"].as_str().unwrap()).collect();
    assert_eq!(stages.last(), Some(&"failed"), "{seen:#?}");
    assert!(stages.contains(&"validating") && !stages.contains(&"uploading"), "{stages:?}");
    let p = ann.wait_for(&format!("/api/v1/3d/{bad}"), WAIT, |v| v["stage"] == "failed").await;
    assert_eq!(p["report"]["valid"], false, "{p:#}");
    assert_eq!(wp.uploads().len(), 1, "only the valid model reached WordPress");

    // Channel edges: 4004 for an unknown channel.
    assert_eq!(close_code(&edge, "/api/ws/nope", &ann.token).await, 4004);

    // CORS preflight from the dashboard's origins.
    let http = reqwest::Client::new();
    for origin in ["http://localhost:3000", "https://kiln-dash-preview.vercel.app"] {
        let res = http
            .request(Method::OPTIONS, format!("{}/api/v1/tasks", edge.url()))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization, content-type")
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{origin}: {}", res.status());
        assert_eq!(res.headers()["access-control-allow-origin"], origin);
        assert!(res.headers()["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    }
    let res = http
        .request(Method::OPTIONS, format!("{}/api/v1/tasks", edge.url()))
        .header("Origin", "https://evil.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none(), "an unlisted origin is not allowed");

    // 429: the REST face's login refuses a fourth failure in the window.
    let api = edge.api();
    let email = kiln_e2e::unique_email("flow-429");
    api.register(&email, kiln_e2e::PASSWORD).await;
    let mut last = StatusCode::OK;
    for _ in 0..4 {
        last = api.login(&email, "wrong password").await.0;
    }
    assert_eq!(last, StatusCode::TOO_MANY_REQUESTS);
    let (status, body) = api.send(Method::POST, "/api/v1/tasks", Some(&ann.token), Some(json!({"agentType": "marketing", "prompt": " "}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].is_string() && body["detail"].is_string(), "{body}");
    drop(runner);
}

/// The production build refuses anonymous sockets (the setting is off there); the REST face's
/// per-user limit answers 429 with Retry-After, while sockets are not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_refuses_anonymous_dashboard_sockets_and_limits_rest() {
    let edge = TestEdge::start_env("production", &[("RATE_LIMIT_PER_MINUTE", "5")]).await.expect("starting wrangler dev");
    for ch in ["agents", "tasks", "round_table", "3d_pipeline", "metrics"] {
        match open_channel(&edge, &format!("/api/ws/{ch}"), None).await {
            Ok(_) => panic!("an anonymous {ch} socket was accepted"),
            Err(e) => assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{ch}: {}", e.body),
        }
    }
    let ann = DashboardClient::register(&edge, "flow-prod").await;
    let mut ch = ann.channel("tasks", "").await;
    assert_eq!(ch.ping().await["type"], "pong");
    let http = reqwest::Client::new();
    let mut refused = None;
    for _ in 0..8 {
        let res = http.get(format!("{}/api/v1/agents", edge.url())).bearer_auth(&ann.token).send().await.unwrap();
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            refused = Some((retry, res.json::<Value>().await.unwrap()));
            break;
        }
        assert_eq!(res.status(), StatusCode::OK);
    }
    let (retry, body) = refused.expect("no 429 within 8 requests at 5 a minute");
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(body["error"].is_string() && body["detail"].is_string(), "{body}");
    assert_eq!(ch.ping().await["type"], "pong", "sockets are not rate limited");
}
