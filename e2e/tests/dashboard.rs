//! Seed 002's dashboard REST face (`/api/v1/*`) against a real `wrangler dev`, with a hand-written
//! runner socket answering the assignments: agents (seeded defaults, status and stats from real
//! tasks, stop → 409, learning changing the instructions), tasks (submit, list filters, get,
//! cancel), round tables (pending then completed, stats and Elo from two competitions, providers
//! from the runners' hello), 3D pipelines (rows through their stages, the asset from R2), bad
//! input and other owners' 404s.

use std::time::{Duration, Instant};

use kiln_e2e::{Api, HandRunner, Method, StatusCode, TestEdge};
use kiln_schemas::dashboard::{elo, ProviderView};
use kiln_schemas::runner::{Assignment, DashboardParams, RunnerTools};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn tools(providers: &[(&str, &str)]) -> RunnerTools {
    RunnerTools {
        profile: "text".into(),
        agent_version: None,
        agent_authenticated: false,
        demo_model: false,
        git_version: None,
        forge_token: false,
        round_table: providers
            .iter()
            .map(|(name, model)| ProviderView { name: name.to_string(), display_name: name.to_uppercase(), model: model.to_string(), enabled: true })
            .collect(),
    }
}

/// Posts a `progress` event.
async fn progress(runner: &mut HandRunner, api: &Api, a: &Assignment, percent: f64, stage: &str) {
    runner.post(api, a, vec![json!({"type": "progress", "percent": percent, "stage": stage, "data": {"step": stage}})]).await;
}

/// GET as `token`, asserting 200.
async fn get(api: &Api, token: &str, path: &str) -> Value {
    let (status, body) = api.get(path, token).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    body
}

/// Polls `path` until `pred`.
async fn wait(api: &Api, token: &str, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = get(api, token, path).await;
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {path} is still {v:#}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Asserts an error answer: the status, and `error` and `detail` with the same text.
fn refused(got: (StatusCode, Value), want: StatusCode, what: &str) -> String {
    let (status, body) = got;
    assert_eq!(status, want, "{what}: {body}");
    let e = body["error"].as_str().unwrap_or_else(|| panic!("{what}: no error in {body}"));
    assert_eq!(body["detail"], e, "{what}: detail beside error: {body}");
    e.to_string()
}

fn agent<'a>(list: &'a Value, kind: &str) -> &'a Value {
    list.as_array().unwrap().iter().find(|a| a["type"] == kind).unwrap_or_else(|| panic!("no {kind} in {list}"))
}

#[tokio::test]
async fn agents_tasks_stop_and_learning() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    let alice = api.new_user("drest-a").await;
    let bob = api.new_user("drest-b").await;
    let mut runner = HandRunner::connect_with(&edge, "hand", 1, None).await;

    // No credentials: 401.
    refused(api.send(Method::GET, "/api/v1/agents", None, None).await, StatusCode::UNAUTHORIZED, "no token");

    // Seeded defaults, idle, with their definition.
    let agents = get(&api, &alice, "/api/v1/agents").await;
    let kinds: Vec<&str> = agents.as_array().unwrap().iter().map(|a| a["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["analytics", "commerce", "content", "marketing", "support"]);
    let commerce = agent(&agents, "commerce");
    assert_eq!((commerce["id"].as_str(), commerce["status"].as_str()), (Some("commerce-001"), Some("idle")));
    assert_eq!(commerce["stats"], json!({"tasksCompleted": 0, "successRate": 0.0, "avgLatencyMs": 0.0, "totalCostUsd": 0.0, "learningCycles": 0}));
    assert!(!commerce["capabilities"].as_array().unwrap().is_empty() && !commerce["tools"].as_array().unwrap().is_empty());
    let original = commerce["instructions"].as_str().unwrap().to_string();
    assert_eq!(get(&api, &alice, "/api/v1/agents/commerce").await["technique"], commerce["technique"]);
    refused(api.get("/api/v1/agents/nope", &alice).await, StatusCode::NOT_FOUND, "unknown agent");
    refused(api.get("/api/v1/agents/No%20Such", &alice).await, StatusCode::NOT_FOUND, "bad agent type");

    // Bad execute bodies.
    let exec = "/api/v1/agents/commerce/execute";
    refused(api.post(exec, &alice, json!({"task": "  "})).await, StatusCode::BAD_REQUEST, "blank task");
    refused(api.post(exec, &alice, json!({"prompt": "x"})).await, StatusCode::BAD_REQUEST, "no task");
    refused(api.post(exec, &alice, json!({"task": "x".repeat(20_001)})).await, StatusCode::BAD_REQUEST, "long task");
    refused(api.post(exec, &alice, json!({"task": "x", "parameters": [1]})).await, StatusCode::BAD_REQUEST, "parameters not an object");
    refused(api.post("/api/v1/agents/nope/execute", &alice, json!({"task": "x"})).await, StatusCode::NOT_FOUND, "unknown agent");

    // The room's messages on the owner's tasks and agents channels.
    let bearer = format!("Bearer {alice}");
    let mut tasks_ch = kiln_e2e::WsClient::connect_path(&edge.ws_url(), "/api/ws/tasks", Some(&bearer)).await.expect("tasks channel");
    let mut agents_ch = kiln_e2e::WsClient::connect_path(&edge.ws_url(), "/api/ws/agents", Some(&bearer)).await.expect("agents channel");

    // Execute: started; the runner gets the agent's definition; progress then completed.
    let (status, answer) = api.post(exec, &alice, json!({"task": "Price the BLACK ROSE ring", "parameters": {"currency": "EUR"}})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!((answer["status"].as_str(), answer["technique_used"].as_str()), (Some("started"), commerce["technique"].as_str()));
    assert!(answer["latency_ms"].as_f64().unwrap() >= 0.0 && answer["result"].is_null());
    let t1 = answer["task_id"].as_str().unwrap().to_string();
    let a = runner.assignment().await;
    assert_eq!(a.job_id, t1);
    match a.dashboard.clone().expect("Assignment.dashboard") {
        DashboardParams::AgentTask { agent_type, model_role, technique, instructions, parameters, use_round_table } => {
            assert_eq!((agent_type.as_str(), model_role.as_str(), use_round_table), ("commerce", "agent.commerce", false));
            assert_eq!((technique.as_str(), instructions.as_str()), (commerce["technique"].as_str().unwrap(), original.as_str()));
            assert_eq!(parameters, json!({"currency": "EUR"}));
        }
        other => panic!("an agent task's params: {other:?}"),
    }
    let path1 = format!("/api/v1/tasks/{t1}");
    progress(&mut runner, &api, &a, 10.0, "answering").await;
    let running = wait(&api, &alice, &path1, "running at 10", |t| t["status"] == "running" && t["progress"] == 10.0).await;
    assert_eq!((running["agentType"].as_str(), running["prompt"].as_str()), (Some("commerce"), Some("Price the BLACK ROSE ring")));
    wait(&api, &alice, "/api/v1/agents/commerce", "agent running", |a| a["status"] == "running").await;
    progress(&mut runner, &api, &a, 90.0, "answering").await;
    assert_eq!(get(&api, &alice, &path1).await["progress"], 90.0);
    runner
        .post(&api, &a, vec![json!({"type": "usage", "usage": {"source": "agent.commerce", "input_tokens": 100, "output_tokens": 50, "cost_usd": 0.25}})])
        .await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    let result = json!({"answer": "EUR 249", "technique": "chain_of_thought", "model": "demo"});
    runner.finish(&api, &a, json!({"outcome": "completed", "result": result})).await;
    let done = wait(&api, &alice, &path1, "completed", |t| t["status"] == "completed").await;
    assert_eq!((done["result"].clone(), done["progress"].as_f64()), (result.clone(), Some(100.0)));
    assert_eq!(done["metrics"]["costUsd"], 0.25);
    assert_eq!((done["metrics"]["inputTokens"].as_u64(), done["metrics"]["outputTokens"].as_u64()), (Some(100), Some(50)));
    let latency1 = done["metrics"]["latencyMs"].as_f64().expect("latency of an ended task");
    assert!(latency1 >= 100.0, "the task ran at least the 120 ms slept: {done}");
    assert!(done["metrics"]["endTime"].is_string());
    let seen = tasks_ch
        .until(WAIT, "task_update completed", |m| m["type"] == "task_update" && m["task_id"] == t1.as_str() && m["status"] == "completed")
        .await;
    let updates: Vec<(String, f64)> = seen
        .iter()
        .filter(|m| m["type"] == "task_update" && m["task_id"] == t1.as_str())
        .map(|m| (m["status"].as_str().unwrap().to_string(), m["progress"].as_f64().unwrap()))
        .collect();
    assert!(updates.iter().any(|u| u == &("running".to_string(), 10.0)), "{updates:?}");
    assert!(updates.iter().any(|u| u == &("running".to_string(), 90.0)), "{updates:?}");
    assert_eq!(updates.last(), Some(&("completed".to_string(), 100.0)), "{updates:?}");
    assert_eq!(seen.last().unwrap()["data"]["agent_id"], "commerce-001");
    assert_eq!(seen.last().unwrap()["data"]["result"], result);
    agents_ch
        .until(WAIT, "agent completed", |m| m["type"] == "agent_status_update" && m["agent_id"] == "commerce-001" && m["status"] == "completed")
        .await;
    let c = wait(&api, &alice, "/api/v1/agents/commerce", "agent completed", |a| a["status"] == "completed").await;
    assert_eq!((c["stats"]["tasksCompleted"].as_u64(), c["stats"]["successRate"].as_f64()), (Some(1), Some(1.0)));
    assert!((c["stats"]["avgLatencyMs"].as_f64().unwrap() - latency1).abs() < 5.0, "{c}");
    assert_eq!(c["stats"]["totalCostUsd"], 0.25);

    // Submit (camelCase): pending; the runner fails it.
    refused(api.post("/api/v1/tasks", &alice, json!({"agentType": "commerce"})).await, StatusCode::BAD_REQUEST, "no prompt");
    refused(api.post("/api/v1/tasks", &alice, json!({"agentType": "nope", "prompt": "x"})).await, StatusCode::NOT_FOUND, "unknown agent");
    let (status, t2) = api.post("/api/v1/tasks", &alice, json!({"agentType": "commerce", "prompt": "Restock the shop", "useRoundTable": false})).await;
    assert_eq!(status, StatusCode::OK, "{t2}");
    assert_eq!((t2["status"].as_str(), t2["agentType"].as_str(), t2["result"].is_null()), (Some("pending"), Some("commerce"), true));
    assert!(t2["metrics"]["startTime"].is_string() && t2["createdAt"].is_string());
    let t2 = t2["taskId"].as_str().unwrap().to_string();
    let a2 = runner.assignment().await;
    assert_eq!(a2.job_id, t2);
    runner.finish(&api, &a2, json!({"outcome": "failed", "error_message": "the model timed out"})).await;
    let failed = wait(&api, &alice, &format!("/api/v1/tasks/{t2}"), "failed", |t| t["status"] == "failed").await;
    assert_eq!(failed["error"], "the model timed out");
    let c = wait(&api, &alice, "/api/v1/agents/commerce", "agent error", |a| a["status"] == "error").await;
    assert_eq!((c["stats"]["tasksCompleted"].as_u64(), c["stats"]["successRate"].as_f64()), (Some(1), Some(0.5)));

    // Lists and their filters.
    let all = get(&api, &alice, "/api/v1/tasks").await;
    assert_eq!(all.as_array().unwrap().iter().map(|t| t["taskId"].as_str().unwrap()).collect::<Vec<_>>(), [t2.as_str(), t1.as_str()]);
    assert_eq!(get(&api, &alice, "/api/v1/tasks?limit=1").await.as_array().unwrap().len(), 1);
    let f = get(&api, &alice, "/api/v1/tasks?agent_type=commerce&status=failed").await;
    assert_eq!(f.as_array().unwrap().len(), 1);
    assert_eq!(f[0]["taskId"], t2.as_str());
    assert!(get(&api, &alice, "/api/v1/tasks?agent_type=support").await.as_array().unwrap().is_empty());
    for bad in ["limit=0", "limit=101", "limit=x", "status=done", "agent_type=A%20B"] {
        refused(api.get(&format!("/api/v1/tasks?{bad}"), &alice).await, StatusCode::BAD_REQUEST, bad);
    }
    refused(api.get("/api/v1/tasks/not-a-uuid", &alice).await, StatusCode::NOT_FOUND, "bad task id");

    // Another owner: 404s, and agents of its own.
    refused(api.get(&path1, &bob).await, StatusCode::NOT_FOUND, "bob reads alice's task");
    refused(api.post(&format!("{path1}/cancel"), &bob, json!({})).await, StatusCode::NOT_FOUND, "bob cancels alice's task");
    assert!(get(&api, &bob, "/api/v1/tasks").await.as_array().unwrap().is_empty());
    let bobs = get(&api, &bob, "/api/v1/agents").await;
    assert_eq!((agent(&bobs, "commerce")["status"].as_str(), agent(&bobs, "commerce")["stats"]["tasksCompleted"].as_u64()), (Some("idle"), Some(0)));

    // Cancel: a running task, then again (409).
    let (_, t3) = api.post(exec, &alice, json!({"task": "A long one"})).await;
    let t3 = t3["task_id"].as_str().unwrap().to_string();
    let a3 = runner.assignment().await;
    assert_eq!(a3.job_id, t3);
    let (status, c3) = api.post(&format!("/api/v1/tasks/{t3}/cancel"), &alice, json!({})).await;
    assert_eq!((status, c3["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{c3}");
    refused(api.post(&format!("/api/v1/tasks/{t3}/cancel"), &alice, json!({})).await, StatusCode::CONFLICT, "cancel twice");
    runner.held.retain(|h| h.job_id != t3);
    wait(&api, &alice, "/api/v1/agents/commerce", "idle after a cancel", |a| a["status"] == "idle").await;

    // Stop: execute, submit and learn refused with 409; start again.
    let (status, stopped) = api.post("/api/v1/agents/commerce/stop", &alice, json!({})).await;
    assert_eq!((status, stopped["status"].as_str()), (StatusCode::OK, Some("stopped")), "{stopped}");
    refused(api.post(exec, &alice, json!({"task": "x"})).await, StatusCode::CONFLICT, "execute while stopped");
    refused(api.post("/api/v1/tasks", &alice, json!({"agentType": "commerce", "prompt": "x"})).await, StatusCode::CONFLICT, "submit while stopped");
    refused(api.post("/api/v1/agents/commerce/learn", &alice, json!({})).await, StatusCode::CONFLICT, "learn while stopped");
    assert_eq!(get(&api, &bob, "/api/v1/agents/commerce").await["status"], "idle", "bob's commerce agent is his own");
    let (status, started) = api.post("/api/v1/agents/commerce/start", &alice, json!({})).await;
    assert_eq!((status, started["status"].as_str()), (StatusCode::OK, Some("idle")), "{started}");

    // Learn: the failed task reviewed; learning while it runs; new instructions when it completes.
    let (status, l) = api.post("/api/v1/agents/commerce/learn", &alice, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{l}");
    assert_eq!((l["status"].as_str(), l["reviewed"].as_u64()), (Some("learning"), Some(1)));
    assert_eq!(get(&api, &alice, "/api/v1/agents/commerce").await["status"], "learning");
    refused(api.post("/api/v1/agents/commerce/learn", &alice, json!({})).await, StatusCode::CONFLICT, "learn twice");
    let al = runner.assignment().await;
    assert_eq!(al.job_id, l["task_id"].as_str().unwrap());
    match al.dashboard.clone().expect("Assignment.dashboard") {
        DashboardParams::AgentLearn { agent_type, instructions, recent } => {
            assert_eq!((agent_type.as_str(), instructions.as_str()), ("commerce", original.as_str()));
            assert_eq!(recent.len(), 1);
            assert_eq!((recent[0]["task_id"].as_str(), recent[0]["error"].as_str()), (Some(t2.as_str()), Some("the model timed out")));
        }
        other => panic!("a learning cycle's params: {other:?}"),
    }
    progress(&mut runner, &api, &al, 10.0, "learning").await;
    assert_eq!(get(&api, &alice, "/api/v1/agents/commerce").await["status"], "learning");
    let learned = json!({"instructions": "Quote prices in the customer's currency; answer within 5 s.", "changes": ["currency", "latency"], "reviewed": 1});
    runner.finish(&api, &al, json!({"outcome": "completed", "result": learned})).await;
    let c = wait(&api, &alice, "/api/v1/agents/commerce", "new instructions", |a| a["stats"]["learningCycles"] == 1).await;
    assert_eq!((c["instructions"].as_str(), c["status"].as_str()), (learned["instructions"].as_str(), Some("idle")));
    assert_eq!(get(&api, &bob, "/api/v1/agents/commerce").await["instructions"], original.as_str(), "bob's agent unchanged");

    // What the face costs a reader on this machine: the agents list (agents and one grouped
    // query over their jobs) and a task, 20 times each; printed, not asserted.
    for path in ["/api/v1/agents".to_string(), path1.clone()] {
        let mut ms = vec![];
        for _ in 0..20 {
            let t = Instant::now();
            get(&api, &alice, &path).await;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        println!("GET {path}: p50 {:.1} ms, max {:.1} ms over 20", ms[9], ms[19]);
    }

    // The next task runs with the new instructions.
    let (_, t4) = api.post(exec, &alice, json!({"task": "Price the rose pendant"})).await;
    let a4 = runner.assignment().await;
    assert_eq!(a4.job_id, t4["task_id"].as_str().unwrap());
    assert!(matches!(a4.dashboard, Some(DashboardParams::AgentTask { ref instructions, .. }) if instructions == learned["instructions"].as_str().unwrap()));
}

/// A round table's finished result: a `CompetitionView` plus `pairs`, `winner` beating `loser`.
fn competition_result(id: &str, prompt: &str, winner: &str, loser: &str) -> Value {
    let entry = |p: &str, score: f64, rank: u32, latency: f64| {
        json!({"provider": p, "model": format!("{p}-model"), "status": "ok", "answer": format!("{p} says"), "scores": {"relevance": score / 5.0},
               "total_score": score, "rank": rank, "latency_ms": latency, "cost_usd": 0.01})
    };
    let w = entry(winner, 45.0, 1, 100.0);
    json!({
        "id": id, "prompt": prompt, "task_id": null, "stage": "completed", "winner": w,
        "entries": [w, entry(loser, 30.0, 2, 300.0)],
        "ab_test": {"a": winner, "b": loser, "winner": winner, "reasoning": "clearer"},
        "total_cost_usd": 0.02, "duration_ms": 400.0, "error": null, "created_at": "2026-01-01T00:00:00Z", "completed_at": "2026-01-01T00:00:01Z",
        "pairs": [{"a": winner, "b": loser, "score_a": 1.0, "source": "scores"}, {"a": loser, "b": winner, "score_a": 0.0, "source": "ab_test"}]
    })
}

#[tokio::test]
async fn round_tables_stats_elo_and_providers() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    let alice = api.new_user("drest-rt-a").await;
    let bob = api.new_user("drest-rt-b").await;
    let mut runner = HandRunner::connect_with(&edge, "rt-1", 1, Some(tools(&[("openai/gpt", "gpt"), ("anthropic/claude", "claude")]))).await;
    let _other = HandRunner::connect_with(&edge, "rt-2", 0, Some(tools(&[("anthropic/claude", "claude"), ("google/gemini", "gemini")]))).await;

    // Providers from both runners' hello, once each.
    let providers = wait(&api, &alice, "/api/v1/round-table/providers", "both runners", |p| p.as_array().is_some_and(|a| a.len() == 3)).await;
    let names: Vec<&str> = providers.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["anthropic/claude", "google/gemini", "openai/gpt"]);
    assert_eq!(providers[0], json!({"name": "anthropic/claude", "display_name": "ANTHROPIC/CLAUDE", "model": "claude", "enabled": true}));

    // Bad input.
    let compete = "/api/v1/round-table/compete";
    refused(api.post(compete, &alice, json!({"prompt": ""})).await, StatusCode::BAD_REQUEST, "blank prompt");
    refused(api.post(compete, &alice, json!({"prompt": "x", "providers": []})).await, StatusCode::BAD_REQUEST, "no providers");
    refused(api.post(compete, &alice, json!({"prompt": "x", "providers": ["a", "a"]})).await, StatusCode::BAD_REQUEST, "twice");
    refused(api.post(compete, &alice, json!({"prompt": "x", "providers": "a"})).await, StatusCode::BAD_REQUEST, "not a list");
    refused(
        api.post(compete, &alice, json!({"prompt": "x", "task_id": "00000000-0000-4000-8000-000000000000"})).await,
        StatusCode::NOT_FOUND,
        "no such task",
    );

    // Two competitions, the first won by openai, the second by anthropic.
    let mut ids = vec![];
    for (i, (winner, loser)) in [("openai/gpt", "anthropic/claude"), ("anthropic/claude", "openai/gpt")].into_iter().enumerate() {
        let prompt = format!("Campaign {i} for BLACK ROSE");
        let (status, c) = api.post(compete, &alice, json!({"prompt": prompt, "providers": ["openai/gpt", "anthropic/claude"]})).await;
        assert_eq!(status, StatusCode::OK, "{c}");
        assert_eq!((c["stage"].as_str(), c["prompt"].as_str(), c["winner"].is_null()), (Some("pending"), Some(prompt.as_str()), true));
        let id = c["id"].as_str().unwrap().to_string();
        let a = runner.assignment().await;
        assert_eq!(a.job_id, id);
        assert_eq!(a.dashboard, Some(DashboardParams::RoundTable { providers: Some(vec!["openai/gpt".into(), "anthropic/claude".into()]) }));
        let path = format!("/api/v1/round-table/{id}");
        progress(&mut runner, &api, &a, 10.0, "generating").await;
        wait(&api, &alice, &path, "generating", |c| c["stage"] == "generating").await;
        progress(&mut runner, &api, &a, 40.0, "scoring").await;
        wait(&api, &alice, &path, "scoring", |c| c["stage"] == "scoring").await;
        progress(&mut runner, &api, &a, 70.0, "ab_testing").await;
        wait(&api, &alice, &path, "ab_testing", |c| c["stage"] == "ab_testing").await;
        runner.finish(&api, &a, json!({"outcome": "completed", "result": competition_result(&id, &prompt, winner, loser)})).await;
        let done = wait(&api, &alice, &path, "completed", |c| c["stage"] == "completed").await;
        assert_eq!((done["winner"]["provider"].as_str(), done["entries"].as_array().unwrap().len()), (Some(winner), 2));
        assert_eq!((done["id"].as_str(), done["prompt"].as_str()), (Some(id.as_str()), Some(prompt.as_str())));
        assert_eq!(done["ab_test"]["winner"], winner);
        assert!(done["completed_at"].is_string() && done.get("pairs").is_none(), "{done}");
        ids.push(id);
    }

    // Stats: Elo over the four pairs in time order.
    let mut r = std::collections::HashMap::from([("openai/gpt", 1500.0), ("anthropic/claude", 1500.0)]);
    for (a, b, s) in [
        ("openai/gpt", "anthropic/claude", 1.0),
        ("anthropic/claude", "openai/gpt", 0.0),
        ("anthropic/claude", "openai/gpt", 1.0),
        ("openai/gpt", "anthropic/claude", 0.0),
    ] {
        let (na, nb) = elo(r[a], r[b], s, 32.0);
        r.insert(a, na);
        r.insert(b, nb);
    }
    let stats = get(&api, &alice, "/api/v1/round-table/stats").await;
    let stats = stats.as_array().unwrap();
    assert_eq!(stats.len(), 2, "{stats:?}");
    for s in stats {
        let p = s["provider"].as_str().unwrap();
        assert!((s["rating"].as_f64().unwrap() - r[p]).abs() < 1e-6, "{p}: {s} vs {}", r[p]);
        assert_eq!((s["participations"].as_u64(), s["wins"].as_u64(), s["win_rate"].as_f64()), (Some(2), Some(1), Some(0.5)));
        assert_eq!((s["mean_score"].as_f64(), s["p50_latency_ms"].as_f64()), (Some(37.5), Some(100.0)));
        assert!((s["total_cost_usd"].as_f64().unwrap() - 0.02).abs() < 1e-9);
    }
    assert!(r["anthropic/claude"] > r["openai/gpt"], "the later win counts more");
    assert_eq!(stats[0]["provider"], "anthropic/claude", "best rating first");

    // A failed round table: stage failed with the error; not in the stats.
    let (_, c) = api.post(compete, &alice, json!({"prompt": "Doomed"})).await;
    let id3 = c["id"].as_str().unwrap().to_string();
    let a = runner.assignment().await;
    assert_eq!(a.dashboard, Some(DashboardParams::RoundTable { providers: None }));
    runner.finish(&api, &a, json!({"outcome": "failed", "error_message": "no provider answered"})).await;
    let failed = wait(&api, &alice, &format!("/api/v1/round-table/{id3}"), "failed", |c| c["stage"] == "failed").await;
    assert_eq!(failed["error"], "no provider answered");
    assert_eq!(get(&api, &alice, "/api/v1/round-table/stats").await.as_array().unwrap().len(), 2);

    // List, newest first, paged.
    let list = get(&api, &alice, "/api/v1/round-table").await;
    let listed: Vec<&str> = list.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [id3.as_str(), ids[1].as_str(), ids[0].as_str()]);
    let page = get(&api, &alice, "/api/v1/round-table?limit=1&offset=1").await;
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(page[0]["id"], ids[1].as_str());
    for bad in ["limit=0", "limit=101", "offset=-1", "offset=x"] {
        refused(api.get(&format!("/api/v1/round-table?{bad}"), &alice).await, StatusCode::BAD_REQUEST, bad);
    }

    // Another owner: 404, an empty list, no stats.
    refused(api.get(&format!("/api/v1/round-table/{}", ids[0]), &bob).await, StatusCode::NOT_FOUND, "bob reads alice's competition");
    assert!(get(&api, &bob, "/api/v1/round-table").await.as_array().unwrap().is_empty());
    assert!(get(&api, &bob, "/api/v1/round-table/stats").await.as_array().unwrap().is_empty());

    // A task answered through a round table: its result is the winner's answer, and its
    // competition is listed with the task's id.
    let (_, t) = api.post("/api/v1/agents/marketing/execute", &alice, json!({"task": "Plan the launch", "use_round_table": true})).await;
    let tid = t["task_id"].as_str().unwrap().to_string();
    let a = runner.assignment().await;
    assert!(matches!(a.dashboard, Some(DashboardParams::AgentTask { use_round_table: true, .. })), "{:?}", a.dashboard);
    let result = json!({"answer": "openai/gpt says", "technique": "few_shot", "model": "openai/gpt-model", "competition_id": tid,
                        "competition": competition_result(&tid, "Plan the launch", "openai/gpt", "anthropic/claude")});
    runner.finish(&api, &a, json!({"outcome": "completed", "result": result})).await;
    let task = wait(&api, &alice, &format!("/api/v1/tasks/{tid}"), "completed", |t| t["status"] == "completed").await;
    assert_eq!((task["result"]["answer"].as_str(), task["competitionId"].as_str(), task["useRoundTable"].as_bool()), (Some("openai/gpt says"), Some(tid.as_str()), Some(true)));
    let comp = get(&api, &alice, &format!("/api/v1/round-table/{tid}")).await;
    assert_eq!((comp["stage"].as_str(), comp["task_id"].as_str(), comp["winner"]["provider"].as_str()), (Some("completed"), Some(tid.as_str()), Some("openai/gpt")));
    let stats = get(&api, &alice, "/api/v1/round-table/stats").await;
    let gpt = stats.as_array().unwrap().iter().find(|s| s["provider"] == "openai/gpt").unwrap();
    assert_eq!((gpt["participations"].as_u64(), gpt["wins"].as_u64()), (Some(3), Some(2)));
}

#[tokio::test]
async fn three_d_pipelines_through_their_stages() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let api = edge.api();
    let alice = api.new_user("drest-3d-a").await;
    let bob = api.new_user("drest-3d-b").await;
    let mut runner = HandRunner::connect_with(&edge, "3d", 1, None).await;

    // Bad input.
    for (body, what) in [
        (json!({"prompt": ""}), "blank prompt"),
        (json!({"prompt": "ring", "format": "obj"}), "format"),
        (json!({"prompt": "ring", "max_faces": 0}), "no faces"),
        (json!({"prompt": "ring", "max_texture_size": 1000}), "texture not a power of two"),
        (json!({"prompt": "ring", "max_texture_size": 16384}), "texture too large"),
        (json!({"prompt": "ring", "max_faces": "many"}), "faces not a number"),
    ] {
        refused(api.post("/api/v1/3d", &alice, body).await, StatusCode::BAD_REQUEST, what);
    }

    // Created pending with its limits; the runner gets them.
    let (status, p) = api.post("/api/v1/3d", &alice, json!({"prompt": "Victorian rose ring", "max_faces": 20000, "max_texture_size": 1024})).await;
    assert_eq!(status, StatusCode::OK, "{p}");
    assert_eq!((p["stage"].as_str(), p["format"].as_str(), p["progress"].as_f64()), (Some("pending"), Some("glb"), Some(0.0)));
    let id = p["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/3d/{id}");
    let a = runner.assignment().await;
    assert_eq!(a.job_id, id);
    assert_eq!(a.dashboard, Some(DashboardParams::Pipeline3d { format: "glb".into(), max_faces: 20000, max_texture_size: 1024 }));
    refused(api.get(&format!("{path}/asset"), &alice).await, StatusCode::NOT_FOUND, "no asset yet");

    // Stages and progress as the runner reports them.
    for (pct, stage) in [(30.0, "generating"), (70.0, "validating"), (85.0, "uploading")] {
        progress(&mut runner, &api, &a, pct, stage).await;
        let v = wait(&api, &alice, &path, stage, |v| v["stage"] == stage).await;
        assert_eq!(v["progress"], pct);
    }
    // The model stored under the lease, then completed.
    let glb = b"glTF\x02\x00\x00\x00fake model bytes for the asset route".to_vec();
    let url = format!("{}/runner/v1/jobs/{id}/artifact?lease_id={}&name=model.glb", edge.url(), a.lease_id);
    let resp = reqwest::Client::new().put(&url).bearer_auth(&runner.token).body(glb.clone()).send().await.unwrap();
    assert!(resp.status().is_success(), "artifact upload: {} {}", resp.status(), resp.text().await.unwrap_or_default());
    let report = json!({"valid": true, "triangles": 1200, "max_faces": 20000, "meshes": 1, "textures": 1, "images": [[512, 512]], "problems": []});
    let result = json!({"report": report, "asset_url": format!("/api/v1/3d/{id}/asset"), "wordpress_media_id": 42, "wordpress_url": "http://wp.test/rose.glb"});
    runner.finish(&api, &a, json!({"outcome": "completed", "result": result})).await;
    let done = wait(&api, &alice, &path, "completed", |v| v["stage"] == "completed").await;
    assert_eq!((done["progress"].as_f64(), done["report"].clone()), (Some(100.0), report));
    assert_eq!((done["asset_url"].as_str(), done["wordpress_media_id"].as_u64()), (Some(format!("/api/v1/3d/{id}/asset").as_str()), Some(42)));
    assert_eq!(done["wordpress_url"], "http://wp.test/rose.glb");
    let resp = reqwest::Client::new().get(format!("{}{path}/asset", edge.url())).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "model/gltf-binary");
    assert_eq!(resp.bytes().await.unwrap().to_vec(), glb);
    refused(api.get(&format!("{path}/asset"), &bob).await, StatusCode::NOT_FOUND, "bob reads alice's asset");
    refused(api.get(&path, &bob).await, StatusCode::NOT_FOUND, "bob reads alice's pipeline");
    refused(api.post(&format!("{path}/cancel"), &alice, json!({})).await, StatusCode::CONFLICT, "cancel a completed pipeline");

    // Failed at validation: the report and the error kept.
    let (_, p2) = api.post("/api/v1/3d", &alice, json!({"prompt": "Too detailed"})).await;
    let id2 = p2["id"].as_str().unwrap().to_string();
    let a2 = runner.assignment().await;
    progress(&mut runner, &api, &a2, 70.0, "validating").await;
    let bad = json!({"valid": false, "triangles": 90000, "max_faces": 50000, "meshes": 1, "textures": 0, "images": [], "problems": ["90000 triangles over 50000"]});
    runner.finish(&api, &a2, json!({"outcome": "failed", "error_message": "validation failed: 90000 triangles over 50000", "result": {"report": bad}})).await;
    let f = wait(&api, &alice, &format!("/api/v1/3d/{id2}"), "failed", |v| v["stage"] == "failed").await;
    assert_eq!((f["error"].as_str(), f["progress"].as_f64()), (Some("validation failed: 90000 triangles over 50000"), Some(70.0)));
    assert_eq!((f["report"].clone(), f["asset_url"].is_null()), (bad, true));

    // Cancelled while generating.
    let (_, p3) = api.post("/api/v1/3d", &alice, json!({"prompt": "Cancelled ring"})).await;
    let id3 = p3["id"].as_str().unwrap().to_string();
    let a3 = runner.assignment().await;
    progress(&mut runner, &api, &a3, 12.0, "generating").await;
    let (status, c) = api.post(&format!("/api/v1/3d/{id3}/cancel"), &alice, json!({})).await;
    assert_eq!((status, c["stage"].as_str(), c["error"].as_str()), (StatusCode::OK, Some("failed"), Some("cancelled by user")), "{c}");
    refused(api.post(&format!("/api/v1/3d/{id3}/cancel"), &bob, json!({})).await, StatusCode::NOT_FOUND, "bob cancels");

    // Lists.
    let list = get(&api, &alice, "/api/v1/3d").await;
    let listed: Vec<&str> = list.as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [id3.as_str(), id2.as_str(), id.as_str()]);
    assert_eq!(get(&api, &alice, "/api/v1/3d?limit=2&offset=2").await.as_array().unwrap().len(), 1);
    assert!(get(&api, &bob, "/api/v1/3d").await.as_array().unwrap().is_empty());
    refused(api.get("/api/v1/3d?limit=0", &alice).await, StatusCode::BAD_REQUEST, "limit 0");
    refused(api.get("/api/v1/3d/nope", &alice).await, StatusCode::NOT_FOUND, "bad id");
}

/// A failed D1 write of a dashboard row is repaired: the room marks its rows stale and its alarm
/// writes them again from its own state (the last progress event, the job's end). Faults make
/// each room's first two row writes fail: a task's progress and end, a pipeline's progress and
/// stage, another pipeline's end (result and pipeline row). Without the repair each row stays
/// where the failed write left it.
#[tokio::test]
async fn dashboard_rows_are_written_again_after_a_failed_write() {
    let edge = TestEdge::start_with_faults(&[("KILN_FAULTS", "dashboard_rows=2")]).await.expect("starting wrangler dev");
    let api = edge.api();
    let alice = api.new_user("drest-repair").await;
    let mut runner = HandRunner::connect_with(&edge, "repair", 1, None).await;

    // A task: its progress write and its end's result write both fail.
    let (status, task) = api.post("/api/v1/tasks", &alice, json!({"agentType": "commerce", "prompt": "Price the ring"})).await;
    assert!(status.is_success(), "{task}");
    let t = task["taskId"].as_str().unwrap().to_string();
    let a = runner.assignment().await;
    assert_eq!(a.job_id, t);
    let path = format!("/api/v1/tasks/{t}");
    progress(&mut runner, &api, &a, 40.0, "answering").await;
    let stale = get(&api, &alice, &path).await;
    assert_eq!(stale["progress"], 0.0, "the write failed: {stale:#}");
    let result = json!({"answer": "EUR 249", "technique": "chain_of_thought", "model": "demo"});
    runner.finish(&api, &a, json!({"outcome": "completed", "result": result})).await;
    let stale = get(&api, &alice, &path).await;
    assert_eq!((stale["status"].as_str(), stale["result"].clone()), (Some("completed"), Value::Null), "the write failed: {stale:#}");
    let repaired = wait(&api, &alice, &path, "the task's row repaired", |v| v["result"] == result).await;
    assert_eq!(repaired["progress"], 100.0, "{repaired:#}");

    // A pipeline: its progress and stage writes fail.
    let (_, p) = api.post("/api/v1/3d", &alice, json!({"prompt": "Victorian rose ring"})).await;
    let id = p["id"].as_str().unwrap().to_string();
    let a = runner.assignment().await;
    let path = format!("/api/v1/3d/{id}");
    progress(&mut runner, &api, &a, 30.0, "generating").await;
    let stale = get(&api, &alice, &path).await;
    assert_eq!((stale["stage"].as_str(), stale["progress"].as_f64()), (Some("pending"), Some(0.0)), "{stale:#}");
    let repaired = wait(&api, &alice, &path, "the pipeline's stage repaired", |v| v["stage"] == "generating").await;
    assert_eq!(repaired["progress"], 30.0);
    runner.finish(&api, &a, json!({"outcome": "failed", "error_message": "the vendor failed"})).await;
    wait(&api, &alice, &path, "failed", |v| v["stage"] == "failed").await;

    // Another pipeline: its end's writes fail (the result and the pipeline row).
    let (_, p) = api.post("/api/v1/3d", &alice, json!({"prompt": "A teapot"})).await;
    let id = p["id"].as_str().unwrap().to_string();
    let a = runner.assignment().await;
    let path = format!("/api/v1/3d/{id}");
    let glb = b"glTF\x02\x00\x00\x00model bytes".to_vec();
    let url = format!("{}/runner/v1/jobs/{id}/artifact?lease_id={}&name=model.glb", edge.url(), a.lease_id);
    let resp = reqwest::Client::new().put(&url).bearer_auth(&runner.token).body(glb).send().await.unwrap();
    assert!(resp.status().is_success(), "artifact upload: {}", resp.status());
    let report = json!({"valid": true, "triangles": 1200, "max_faces": 50000, "meshes": 1, "textures": 1, "images": [[512, 512]], "problems": []});
    runner.finish(&api, &a, json!({"outcome": "completed", "result": {"report": report, "wordpress_media_id": 7}})).await;
    let stale = get(&api, &alice, &path).await;
    assert_eq!(stale["stage"], "pending", "{stale:#}");
    let done = wait(&api, &alice, &path, "the pipeline's end repaired", |v| v["stage"] == "completed").await;
    assert_eq!((done["progress"].as_f64(), done["report"].clone(), done["wordpress_media_id"].as_u64()), (Some(100.0), report, Some(7)));
    assert_eq!(done["asset_url"], format!("/api/v1/3d/{id}/asset"));
    assert!(edge.log().contains("injected fault: dashboard_rows"));
}
