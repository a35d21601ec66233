//! Landing pages (seed 001) through a whole runner: the fake edge assigns `landing_init` and
//! `landing_chat` jobs and keeps the session's bundle and the page's preview, the LLM nodes
//! (router, design_planner, designer) talk to the real scripted model server
//! (`kiln_e2e::model`), and the coder and deployment_fixer are agent runs of the `text` profile
//! under the process executor: a test-local sh script that writes the page as a coding agent
//! would (the prompt's `Landing node:` line picks its part; `BREAK_BUILD` in the request makes the
//! coder leave out styles.css, which the fixer then writes, unless the request also says
//! `ALWAYS_BROKEN`). The text profile is used because what is under test is the runner's graph,
//! git and the real build check in the sandbox, not an agent CLI's tool loop (the e2e tests drive
//! Claude Code against the demo script for that). Checked: the node events in order with their
//! data, the files written, the preview published, the bundle kept with one commit per job and a
//! chat job refining the page init made; a broken build repaired; a build never repaired failing
//! after MAX_FIX_ATTEMPTS with nothing published; clarify; deploy; cancel; pause and resume; a
//! spent LLM budget.

mod common;

use std::time::Duration;

use common::landing::*;
use common::{assert_started_and_finished, finished, searchable, RunnerOptions, TestRunner};
use kiln_e2e::model::{ModelServer, Script};
use kiln_schemas::landing::MAX_FIX_ATTEMPTS;
use kiln_schemas::runner::{EdgeMessage, Outcome, RunnerEvent};
use serde_json::{json, Value};
use tempfile::TempDir;

/// A runner on the scripted model whose agent is [`AGENT`] (kept in a directory every user
/// can read: a root runner runs it as another user).
async fn runner(server: &ModelServer) -> (TestRunner, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    searchable(dir.path());
    let agent = dir.path().join("landing-agent.sh");
    std::fs::write(&agent, AGENT).unwrap();
    let runner = TestRunner::start(RunnerOptions {
        llm: llm(server),
        agent_command: Some(format!("sh {}", agent.display())),
        ..Default::default()
    })
    .await;
    (runner, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_designs_codes_checks_and_publishes_then_chat_and_deploy_work_on_the_same_workspace() {
    let server = model_server();
    let (runner, _agent) = runner(&server).await;
    let page = new_page();

    // init
    let a = landing_job(&page, payload("Generate signups for the beta"), None);
    let init_id = a.job_id.clone();
    let t = std::time::Instant::now();
    let events = runner.run(a, 60).await;
    let init_ms = t.elapsed().as_millis();
    assert_started_and_finished(&events);
    assert_completed(&events);
    assert_eq!(path(&events)[..6], DESIGNED);
    assert_eq!(path(&events)[6..], CODED_AND_PUBLISHED);
    let router = node_data(&events, "router", "node_completed");
    assert_eq!(router["route"], "design");
    let planner = node_data(&events, "design_planner", "node_completed");
    for (k, v) in [
        ("theme", json!("dark")),
        ("color_count", json!(3)),
        ("typography_count", json!(2)),
        ("section_count", json!(4)),
        ("animation_count", json!(2)),
    ] {
        assert_eq!(planner[k], v, "{k} in {planner}");
    }
    for n in ["router", "design_planner", "designer"] {
        let usage = &node_data(&events, n, "node_completed")["usage"];
        assert!(usage["input_tokens"].as_u64().unwrap() > 0, "{n}: {usage}");
        assert!(usage["output_tokens"].as_u64().unwrap() > 0, "{n}: {usage}");
        assert_eq!(usage["model"], "landing-test-model", "{n}: {usage}");
        assert!(usage.get("cost_usd").is_some(), "{n}: {usage}");
    }
    let (_, _, message, tools) = nodes(&events)
        .into_iter()
        .find(|(n, ..)| n == "coder_tools")
        .unwrap();
    assert_eq!(message, "Created 3 file(s)");
    assert_eq!(
        tools["files"],
        json!(["index.html", "script.js", "styles.css"])
    );
    assert!(
        !tools.to_string().contains("<html"),
        "tool events carry names, never contents"
    );
    assert_eq!(
        node_data(&events, "build_check", "node_completed")["passed"],
        true
    );
    let preview_url = format!("{}/preview/{page}/", runner.edge.url);
    assert_eq!(
        node_data(&events, "deployer", "node_completed")["preview_url"],
        preview_url
    );
    let r = result(&events);
    assert_eq!(r["preview_url"], preview_url);
    assert_eq!(r["landing_page_id"], page);
    assert_eq!(r["sections"].as_array().map(Vec::len), Some(4));
    assert!(r.get("reply").is_none());

    // What the LLM nodes were asked: their roles, the brief, the session's state.
    let roles: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.system.lines().next().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        roles,
        [
            "Kiln role: router",
            "Kiln role: design_planner",
            "Kiln role: designer"
        ]
    );
    let asked = &server.requests()[0];
    assert!(
        asked.prompt.contains("campaign.productName: Aurora"),
        "{}",
        asked.prompt
    );
    assert!(
        asked.prompt.contains("index.html: absent"),
        "{}",
        asked.prompt
    );

    let preview = runner.edge.preview(&page).expect("a preview");
    let paths: Vec<&str> = preview.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["index.html", "script.js", "styles.css"],
        "design/ is not published"
    );
    assert!(preview_file(&preview, "index.html")
        .unwrap()
        .contains("Build a new landing page"));
    assert!(lines(&events)
        .iter()
        .any(|l| l == "landing agent: the design spec is in the prompt"));

    let (clone, log) = clone_bundle(&runner.edge.bundle(&page).expect("the session's bundle"));
    assert_eq!(log, ["landing_init: Aurora"]);
    assert!(read(&clone, "design/guidelines.json").contains("scroll-reveal"));
    assert!(read(&clone, "design/spec.md").starts_with("# Design spec"));
    assert_eq!(runner.edge.bundle_puts(&init_id).len(), 1);
    released_and_gone(&runner, &init_id).await;

    // chat: routed to code, over the stored design and the page init made
    server.clear_requests();
    let a = landing_job(
        &page,
        payload("Generate signups for the beta"),
        Some("Make the hero blue"),
    );
    let chat_id = a.job_id.clone();
    let t = std::time::Instant::now();
    let events = runner.run(a, 60).await;
    let chat_ms = t.elapsed().as_millis();
    assert_completed(&events);
    assert_eq!(path(&events)[..2], ["router node", "router node_completed"]);
    assert_eq!(path(&events)[2..], CODED_AND_PUBLISHED);
    assert_eq!(
        node_data(&events, "router", "node_completed")["route"],
        "code"
    );
    let (_, _, message, tools) = nodes(&events)
        .into_iter()
        .find(|(n, ..)| n == "coder_tools")
        .unwrap();
    assert_eq!(
        (message.as_str(), &tools["files"]),
        ("Updated 1 file(s)", &json!(["index.html"]))
    );
    assert!(
        lines(&events).iter().any(
            |l| l.starts_with("Session workspace restored from its bundle")
                && l.contains("1 commit(s)")
        ),
        "{:#?}",
        lines(&events)
    );
    assert!(
        lines(&events)
            .iter()
            .any(|l| l == "landing agent: the design spec is in the prompt"),
        "the stored spec reaches the coder"
    );
    let asked = &server.requests()[0];
    assert!(
        asked.prompt.contains("index.html: present") && asked.prompt.contains("Make the hero blue"),
        "{}",
        asked.prompt
    );
    assert_eq!(server.requests().len(), 1, "only the router is asked");
    let preview = runner.edge.preview(&page).unwrap();
    assert!(preview_file(&preview, "index.html")
        .unwrap()
        .contains("The user's request: Make the hero blue"));
    assert_eq!(
        result(&events)["sections"].as_array().map(Vec::len),
        Some(4),
        "the stored design's sections"
    );
    let (clone, log) = clone_bundle(&runner.edge.bundle(&page).unwrap());
    assert_eq!(
        log,
        ["landing_chat: Make the hero blue", "landing_init: Aurora"]
    );
    assert!(read(&clone, "index.html").contains("Make the hero blue"));
    released_and_gone(&runner, &chat_id).await;

    // deploy: straight to the check and the deployer; nothing changes, so no new bundle
    let a = landing_job(&page, payload("x"), Some("Publish it DEPLOY_ONLY"));
    let deploy_id = a.job_id.clone();
    let events = runner.run(a, 60).await;
    assert_completed(&events);
    assert_eq!(
        path(&events),
        [
            "router node",
            "router node_completed",
            "build_check node",
            "build_check node_completed",
            "deployer node",
            "deployer node_completed"
        ]
    );
    assert!(
        runner.edge.bundle_puts(&deploy_id).is_empty(),
        "nothing to keep"
    );
    assert_eq!(clone_bundle(&runner.edge.bundle(&page).unwrap()).1.len(), 2);
    assert_eq!(runner.edge.preview_puts(&deploy_id).len(), 1);
    println!("landing init job: {init_ms} ms; chat job: {chat_ms} ms (assign → finished, process executor, scripted model)");
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_build_is_repaired_by_the_fixer() {
    let server = model_server();
    let (runner, _agent) = runner(&server).await;
    let page = new_page();
    let events = runner
        .run(landing_job(&page, payload("signups BREAK_BUILD"), None), 60)
        .await;
    assert_completed(&events);
    assert_eq!(path(&events)[6..], REPAIRED_AND_PUBLISHED);
    let check = node_data(&events, "build_check", "error");
    assert_eq!(check["passed"], false);
    assert_eq!(
        check["errors"],
        json!(["index.html references styles.css, which does not exist"])
    );
    let fixer = node_data(&events, "deployment_fixer", "node");
    assert_eq!(
        (fixer["attempt"].clone(), fixer["max_attempts"].clone()),
        (json!(1), json!(MAX_FIX_ATTEMPTS))
    );
    assert_eq!(
        node_data(&events, "deployment_fixer_tools", "tool")["files"],
        json!(["styles.css"])
    );
    assert!(lines(&events)
        .iter()
        .any(|l| l == "landing agent: fix attempt 1"));
    let preview = runner.edge.preview(&page).unwrap();
    assert_eq!(
        preview_file(&preview, "styles.css"),
        Some("body { color: black; }\n")
    );
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_the_fixer_cannot_repair_fails_after_its_attempts_and_publishes_nothing() {
    let server = model_server();
    let (runner, _agent) = runner(&server).await;
    let page = new_page();
    let a = landing_job(&page, payload("signups BREAK_BUILD ALWAYS_BROKEN"), None);
    let id = a.job_id.clone();
    let events = runner.run(a, 60).await;
    let (outcome, message, _, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(
        message,
        format!("the page does not build after {MAX_FIX_ATTEMPTS} fix attempts: index.html references styles.css, which does not exist")
    );
    assert_eq!(error.as_deref(), Some(message.as_str()));
    let mut want = vec![
        "build_check node".to_string(),
        "build_check error".to_string(),
    ];
    for _ in 1..=MAX_FIX_ATTEMPTS {
        for s in [
            "deployment_fixer node",
            "deployment_fixer node_completed",
            "build_check node",
            "build_check error",
        ] {
            want.push(s.to_string());
        }
    }
    assert_eq!(path(&events)[9..], want[..], "{:#?}", path(&events));
    let attempts: Vec<Value> = nodes(&events)
        .into_iter()
        .filter(|(n, t, ..)| n == "deployment_fixer" && t == "node")
        .map(|(_, _, _, d)| d["attempt"].clone())
        .collect();
    assert_eq!(
        attempts,
        (1..=MAX_FIX_ATTEMPTS).map(|n| json!(n)).collect::<Vec<_>>()
    );
    assert!(!path(&events).iter().any(|p| p.starts_with("deployer")));
    assert!(
        runner.edge.preview_puts(&id).is_empty(),
        "nothing is published"
    );
    assert!(runner.edge.preview(&page).is_none());
    assert_eq!(result(&events)["preview_url"], Value::Null);
    // The work is kept: the next chat job starts from it.
    let (_, log) = clone_bundle(
        &runner
            .edge
            .bundle(&page)
            .expect("the failed job's work is kept"),
    );
    assert_eq!(log, ["landing_init: Aurora"]);
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_router_cannot_act_on_ends_with_its_question() {
    let server = model_server();
    let (runner, _agent) = runner(&server).await;
    let page = new_page();
    let a = landing_job(&page, payload("x"), Some("Change which one?"));
    let id = a.job_id.clone();
    let events = runner.run(a, 60).await;
    assert_completed(&events);
    assert_eq!(
        path(&events),
        ["router node", "router node_completed", "router clarify"]
    );
    let question = "Which section should change: the hero or the pricing?";
    assert_eq!(node_data(&events, "router", "clarify")["reply"], question);
    let r = result(&events);
    assert_eq!(
        (
            r["reply"].as_str(),
            &r["preview_url"],
            &r["landing_page_id"]
        ),
        (Some(question), &Value::Null, &json!(page))
    );
    assert!(runner.edge.bundle_puts(&id).is_empty() && runner.edge.preview_puts(&id).is_empty());
    assert_eq!(server.requests().len(), 1);
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_landing_job_stops_at_once_and_keeps_nothing() {
    let mut s = script();
    // The designer takes its time: the job is cancelled while it speaks.
    s["rules"].as_array_mut().unwrap().insert(0, json!({"when": {"role": "designer"}, "text": "# Design spec\n\nslow", "stall_before_ms": 5000}));
    let server = ModelServer::start(Script::from_value(s).unwrap());
    let (runner, _agent) = runner(&server).await;
    let page = new_page();
    let a = landing_job(&page, payload("x"), None);
    let id = a.job_id.clone();
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(&id, "the designer's start", 30, |e| matches!(e, RunnerEvent::Node { node, event_type, .. } if node == "designer" && event_type == "node"))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    runner
        .edge
        .send(EdgeMessage::Cancel { job_id: id.clone() })
        .await;
    runner.wait_released(&id).await;
    let released_ms = t.elapsed().as_millis();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = runner.edge.events(&id);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, RunnerEvent::Finished { .. })),
        "a cancelled job sends no finished"
    );
    assert!(
        !path(&events).iter().any(|p| p.starts_with("coder")),
        "{:#?}",
        path(&events)
    );
    assert!(runner.edge.bundle_puts(&id).is_empty() && runner.edge.preview_puts(&id).is_empty());
    assert!(!runner.worktrees_dir().join(&id).exists());
    assert!(
        released_ms < 3000,
        "released {released_ms} ms after the cancel"
    );
    println!("landing job cancelled during an LLM call: released in {released_ms} ms");
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_landing_job_waits_between_nodes_until_resumed() {
    let mut s = script();
    s["rules"].as_array_mut().unwrap().insert(0, json!({"when": {"role": "router"}, "text": route("design", "new"), "stall_before_ms": 1500}));
    let server = ModelServer::start(Script::from_value(s).unwrap());
    let (runner, _agent) = runner(&server).await;
    let page = new_page();
    let a = landing_job(&page, payload("x"), None);
    let id = a.job_id.clone();
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(
            &id,
            "the router's start",
            30,
            |e| matches!(e, RunnerEvent::Node { node, .. } if node == "router"),
        )
        .await;
    runner
        .edge
        .send(EdgeMessage::Pause { job_id: id.clone() })
        .await;
    runner
        .edge
        .wait_event(&id, "the pause", 30, |e| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("Paused: the job waits for resume before design_planner")))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        server.requests().len(),
        1,
        "the planner is not asked while paused"
    );
    runner
        .edge
        .send(EdgeMessage::Resume { job_id: id.clone() })
        .await;
    let events = runner.edge.wait_finished(&id, 60).await;
    assert_completed(&events);
    assert!(runner.edge.preview(&page).is_some());
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_llm_budget_fails_the_job_at_its_node() {
    let server = model_server();
    let mut llm = llm(&server);
    llm.budget = kiln_runner::llm::Budget {
        max_tokens: Some(400),
        max_usd: None,
    };
    let runner = TestRunner::start(RunnerOptions {
        llm,
        ..Default::default()
    })
    .await;
    let page = new_page();
    let a = landing_job(&page, payload("x"), None);
    let id = a.job_id.clone();
    let events = runner.run(a, 60).await;
    let (outcome, message, ..) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert!(message.starts_with("LLM budget exceeded"), "{message}");
    let last = nodes(&events).pop().expect("node events");
    assert_eq!(last.1, "error", "{:#?}", path(&events));
    assert!(
        ["router", "design_planner", "designer"].contains(&last.0.as_str()),
        "{last:?}"
    );
    assert_eq!(last.2, message);
    assert!(
        last.3["usage"]["input_tokens"].as_u64().unwrap() > 0,
        "what the node spent: {:?}",
        last.3
    );
    assert!(!path(&events).iter().any(|p| p.starts_with("coder")));
    assert!(runner.edge.preview_puts(&id).is_empty());
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_answer_that_cannot_be_read_designs_an_init_and_fails_a_chat() {
    let mut s = script();
    s["rules"].as_array_mut().unwrap().insert(
        0,
        json!({"when": {"role": "router", "conversation": "PROSE_ROUTER"}, "text": "I would design it."}),
    );
    let server = ModelServer::start(Script::from_value(s).unwrap());
    let (runner, _agent) = runner(&server).await;
    let page = new_page();
    let events = runner
        .run(
            landing_job(&page, payload("signups PROSE_ROUTER"), None),
            60,
        )
        .await;
    assert_completed(&events);
    let router = node_data(&events, "router", "node_completed");
    assert_eq!(router["route"], "design");
    assert!(
        router["reason"]
            .as_str()
            .unwrap()
            .contains("could not be read"),
        "{router}"
    );
    assert_eq!(
        server.requests().len(),
        3,
        "one router answer, then the planner and the designer"
    );

    server.clear_requests();
    let events = runner
        .run(
            landing_job(&page, payload("x"), Some("PROSE_ROUTER please")),
            60,
        )
        .await;
    let (outcome, message, ..) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert!(
        message.starts_with(
            "the router node failed: the router step's answer could not be used after 2 tries"
        ),
        "{message}"
    );
    assert_eq!(path(&events), ["router node", "router error"]);
    assert_eq!(
        server.requests().len(),
        2,
        "asked once more with the reason"
    );
    runner.stop().await;
}
