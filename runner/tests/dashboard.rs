//! Seed 002's LLM kinds (`agent_task`, `agent_learn`, `round_table`) through a whole runner: the
//! fake edge assigns the jobs, every LLM call goes to the real scripted model server
//! (`kiln_e2e::model`) with test-local rules. Checked: each technique's prompt shape and answer,
//! progress events, a task answered through a round table, a learning cycle that rewrites the
//! instructions (an unreadable answer asked for again), and a round table of six providers where
//! one fails and one times out: the judge's request anonymised and in random order, the A/B
//! comparison, ranks, pairs; and a round table's wall time against its slowest provider.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{assert_started_and_finished, assignment, finished, RunnerOptions, TestRunner};
use kiln_e2e::model::{ModelServer, RecordedRequest, Script};
use kiln_runner::llm::config::RoundTable;
use kiln_runner::llm::{Api, ApiKey, LlmConfig, ModelRef, Price, Prices, Provider, RetryPolicy};
use kiln_schemas::runner::{Assignment, DashboardParams, Outcome, RunnerEvent, RunnerMessage};
use kiln_schemas::status::JobType;
use serde_json::{json, Value};

/// The answers of the round-table models; none names its model.
const ANSWERS: [(&str, &str); 6] = [
    (
        "rt-alpha",
        "Lisbon: trams, tiles and custard tarts (voice one).",
    ),
    ("rt-beta", "Porto: port cellars by the river (voice two)."),
    (
        "rt-gamma",
        "Coimbra: the old university library (voice three).",
    ),
    ("rt-delta", "Sintra: palaces in the forest (voice four)."),
    ("rt-fail", "never sent"),
    ("rt-slow", "too late to count (voice six)."),
];

fn model(m: &str) -> ModelRef {
    ModelRef {
        provider: "scripted".into(),
        model: m.into(),
    }
}

/// One provider on the scripted server; the round table lists `models`; each answer within
/// `timeout`.
fn llm(server: &ModelServer, models: &[&str], timeout: Duration) -> LlmConfig {
    let mut c = LlmConfig {
        policy: RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(40),
            max_retry_wait: Duration::from_secs(2),
            request_timeout: Duration::from_secs(20),
            stall_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
        },
        round_table: RoundTable {
            providers: models.iter().map(|m| model(m)).collect(),
            timeout,
        },
        prices: Prices::new(
            ANSWERS
                .iter()
                .map(|(m, _)| {
                    (
                        m.to_string(),
                        Price {
                            input_per_mtok: 1.0,
                            output_per_mtok: 2.0,
                        },
                    )
                })
                .collect(),
        ),
        ..Default::default()
    };
    c.providers.insert(
        "scripted".into(),
        Provider::new(
            "scripted",
            Api::Anthropic,
            &server.url(),
            Some(ApiKey::new("sk-test")),
        ),
    );
    c.roles.insert("default".into(), model("task-model"));
    c
}

fn fenced(v: Value) -> String {
    format!("Here it is.\n```json\n{v}\n```")
}

/// Scores A best, then B, C, D … (labels the runner chose; the test reads its mapping back).
fn judge_text(labels: usize) -> String {
    let mut scores = serde_json::Map::new();
    for i in 0..labels {
        let n = 9 - i as i64;
        scores.insert(
            ((b'A' + i as u8) as char).to_string(),
            json!({"relevance": n, "accuracy": n, "clarity": n, "completeness": n, "creativity": n}),
        );
    }
    fenced(json!({"scores": scores, "reasoning": "Answer A is the most vivid and complete."}))
}

/// The round-table rules (`answer_ms` before each answer), the judge (A > B > …), the A/B judge
/// (always B), the tasks' techniques and the learner.
fn script(answer_ms: u64, judged: usize) -> Script {
    let mut rules = vec![];
    for (m, text) in ANSWERS {
        let mut r = json!({"name": m, "when": {"model": m}, "text": text, "stall_before_ms": answer_ms, "chunk_delay_ms": 0});
        if m == "rt-fail" {
            r = json!({"name": m, "when": {"model": m}, "error": {"status": 400, "message": "this model is not available"}});
        }
        if m == "rt-slow" {
            r["stall_before_ms"] = json!(5_000);
        }
        rules.push(r);
    }
    rules.extend([
        json!({"name": "judge", "when": {"role": "judge"}, "text": judge_text(judged)}),
        json!({"name": "ab", "when": {"role": "ab_judge"}, "text": fenced(json!({"winner": "B", "reasoning": "B answers the question more directly."}))}),
        json!({"name": "cot", "when": {"system": "Technique: chain of thought"}, "text": "1. The shop sells mugs.\n2. Cost is $6, so four times is $24.\nAnswer: $24"}),
        json!({"name": "react", "when": {"system": "Technique: ReAct"}, "text": "Thought: I need the cost.\nAction: read the parameters\nObservation: cost is 6\nFinal Answer: $24"}),
        json!({"name": "sc-odd", "when": {"system": "Technique: self-consistency"}, "times": 1, "text": "Reasoning one.\nAnswer: $30"}),
        json!({"name": "sc", "when": {"system": "Technique: self-consistency"}, "text": "Reasoning.\nAnswer: $24"}),
        json!({"name": "few", "when": {"system": "Technique: few-shot"}, "text": "$24: four times the cost."}),
        json!({"name": "zero", "when": {"system": "Technique: zero-shot"}, "text": "  $24  "}),
        json!({"name": "learn-bad", "when": {"role": "agent_learn"}, "times": 1, "text": "I would make it better."}),
        json!({"name": "learn", "when": {"role": "agent_learn"}, "text": fenced(json!({"instructions": "Price from the cost and answer within 5 seconds; quote the currency.", "changes": ["Answer faster: tasks timed out", "Quote the currency: a task failed without it"]}))}),
        json!({"text": "no rule for this request"}),
    ]);
    Script::from_value(json!({ "rules": rules })).unwrap()
}

fn task(technique: &str, prompt: &str, parameters: Value, round_table: bool) -> Assignment {
    let mut a = assignment(JobType::AgentTask, prompt);
    a.dashboard = Some(DashboardParams::AgentTask {
        agent_type: "commerce".into(),
        model_role: "agent.commerce".into(),
        technique: technique.into(),
        instructions: "You price handmade goods for a small shop.".into(),
        parameters,
        use_round_table: round_table,
    });
    a
}

fn round(prompt: &str, providers: Option<Vec<String>>) -> Assignment {
    let mut a = assignment(JobType::RoundTable, prompt);
    a.dashboard = Some(DashboardParams::RoundTable { providers });
    a
}

fn result(events: &[RunnerEvent]) -> Value {
    match events.last() {
        Some(RunnerEvent::Finished {
            result: Some(r), ..
        }) => r.clone(),
        other => panic!("no result: {other:?}"),
    }
}

fn progress(events: &[RunnerEvent]) -> Vec<(f64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Progress { percent, stage, .. } => {
                Some((*percent, stage.clone().unwrap_or_default()))
            }
            _ => None,
        })
        .collect()
}

fn role_of(r: &RecordedRequest) -> String {
    r.system
        .lines()
        .find_map(|l| l.strip_prefix("Kiln role: "))
        .unwrap_or("")
        .to_string()
}

fn requests(server: &ModelServer, role: &str) -> Vec<RecordedRequest> {
    server
        .chat_requests()
        .into_iter()
        .filter(|r| role_of(r) == role)
        .collect()
}

/// The labels of a judge's (or A/B judge's) request: label → the answer text under it.
fn labelled(prompt: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut parts = prompt.split("--- Answer ").skip(1);
    for part in parts.by_ref() {
        let (label, rest) = part.split_once(" ---\n").unwrap();
        out.insert(label.to_string(), rest.trim().to_string());
    }
    out
}

fn model_of_answer(text: &str) -> String {
    ANSWERS
        .iter()
        .find(|(_, a)| *a == text)
        .unwrap()
        .0
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_technique_shapes_the_prompt_and_its_answer_is_read() {
    let server = ModelServer::start(script(0, 2));
    let runner = TestRunner::start(RunnerOptions {
        llm: llm(&server, &[], Duration::from_secs(5)),
        ..Default::default()
    })
    .await;
    let params = json!({"cost_usd": 6, "samples": 3});
    for (technique, answer, calls) in [
        ("chain_of_thought", "$24", 1),
        ("react", "$24", 1),
        ("few_shot", "$24: four times the cost.", 1),
        ("zero_shot", "$24", 1),
        ("self_consistency", "$24", 3),
    ] {
        server.clear_requests();
        let events = runner
            .run(
                task(technique, "Price a handmade mug", params.clone(), false),
                30,
            )
            .await;
        assert_started_and_finished(&events);
        assert_eq!(
            finished(&events).0,
            Outcome::Completed,
            "{technique}: {events:#?}"
        );
        let r = result(&events);
        assert_eq!(r["answer"], answer, "{technique}: {r}");
        assert_eq!(r["technique"], technique);
        assert_eq!(r["model"], "task-model");
        let p: Vec<f64> = progress(&events).iter().map(|(p, _)| *p).collect();
        assert_eq!(p, [10.0, 90.0, 100.0], "{technique}");
        assert!(events
            .iter()
            .any(|e| matches!(e, RunnerEvent::Usage { .. })));

        let reqs = requests(&server, "agent.commerce");
        assert_eq!(reqs.len(), calls, "{technique}");
        let req = &reqs[0];
        assert!(
            req.system.contains("You price handmade goods"),
            "{}",
            req.system
        );
        assert!(
            req.prompt.starts_with("Price a handmade mug"),
            "{}",
            req.prompt
        );
        assert!(
            req.prompt.contains(r#"Parameters: {"cost_usd":6}"#),
            "{}",
            req.prompt
        );
        match technique {
            "chain_of_thought" => {
                assert!(req.system.contains("step by step") && req.system.contains("Answer:"))
            }
            "react" => {
                assert!(req.system.contains("Thought:") && req.system.contains("Final Answer:"))
            }
            "self_consistency" => {
                assert!(reqs.iter().all(|r| r.prompt == req.prompt));
                let votes = events.iter().any(|e| matches!(e, RunnerEvent::Log { content, .. } if content.contains("Self-consistency: 2 of 3 samples agree")));
                assert!(votes, "the majority is told");
                assert_eq!(r["votes"], 2);
            }
            "few_shot" => {
                // Two worked examples as earlier turns, then the task.
                let roles: Vec<&str> = req.messages.iter().map(|m| m.role.as_str()).collect();
                assert_eq!(roles, ["user", "assistant", "user", "assistant", "user"]);
                assert!(
                    req.messages[1].text.contains("$24") || req.messages[3].text.contains("$24")
                );
            }
            _ => assert!(req.system.contains("zero-shot") && req.messages.len() == 1),
        }
    }
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learning_rewrites_the_instructions_after_asking_once_more() {
    let server = ModelServer::start(script(0, 2));
    let runner = TestRunner::start(RunnerOptions {
        llm: llm(&server, &[], Duration::from_secs(5)),
        ..Default::default()
    })
    .await;
    let mut a = assignment(JobType::AgentLearn, "learn");
    let recent = vec![
        json!({"prompt": "Price a vase", "status": "failed", "error": "no currency in the answer", "latency_ms": 800}),
        json!({"prompt": "Price a bowl", "status": "completed", "latency_ms": 31_000}),
    ];
    a.dashboard = Some(DashboardParams::AgentLearn {
        agent_type: "commerce".into(),
        instructions: "You price handmade goods.".into(),
        recent,
    });
    let events = runner.run(a, 30).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    let r = result(&events);
    assert_eq!(
        r["instructions"],
        "Price from the cost and answer within 5 seconds; quote the currency."
    );
    assert_eq!(r["changes"].as_array().unwrap().len(), 2);
    assert_eq!(r["reviewed"], 2);
    let reqs = requests(&server, "agent_learn");
    assert_eq!(reqs.len(), 2, "an unreadable answer is asked for once more");
    assert!(
        reqs[0].prompt.contains("no currency in the answer") && reqs[0].prompt.contains("31000")
    );
    assert!(reqs[0].prompt.contains("You price handmade goods."));
    assert!(
        reqs[1].prompt.contains("could not be used"),
        "{}",
        reqs[1].prompt
    );

    // Unreadable twice: the job fails.
    server.set_script(
        Script::from_value(
            json!({"rules": [{"when": {"role": "agent_learn"}, "text": "no json here"}]}),
        )
        .unwrap(),
    );
    let mut a = assignment(JobType::AgentLearn, "learn");
    a.dashboard = Some(DashboardParams::AgentLearn {
        agent_type: "commerce".into(),
        instructions: "x".into(),
        recent: vec![],
    });
    let events = runner.run(a, 30).await;
    let (outcome, message, ..) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert!(message.contains("after 2 tries"), "{message}");
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_table_of_six_with_a_failure_and_a_timeout_is_judged_anonymously_and_ranked() {
    let server = ModelServer::start(script(200, 4));
    let all: Vec<&str> = ANSWERS.iter().map(|(m, _)| *m).collect();
    let runner = TestRunner::start(RunnerOptions {
        llm: llm(&server, &all, Duration::from_millis(1500)),
        ..Default::default()
    })
    .await;
    // hello reports the providers.
    let hellos = runner.edge.wait_hellos(1).await;
    let RunnerMessage::Hello {
        tools: Some(tools), ..
    } = &hellos[0]
    else {
        panic!("{hellos:?}")
    };
    let names: Vec<&str> = tools.round_table.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), 6);
    assert_eq!(names[0], "scripted/rt-alpha");

    let a = round("Which Portuguese city should I visit?", None);
    let id = a.job_id.clone();
    let events = runner.run(a, 60).await;
    assert_started_and_finished(&events);
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    let stages: Vec<(f64, String)> = progress(&events);
    assert_eq!(
        stages,
        [
            (10.0, "generating".into()),
            (40.0, "scoring".into()),
            (70.0, "ab_testing".into()),
            (100.0, "completed".into())
        ]
    );
    let r = result(&events);
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["stage"], "completed");
    let entries = r["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 6);
    let by: BTreeMap<String, &Value> = entries
        .iter()
        .map(|e| (e["provider"].as_str().unwrap().to_string(), e))
        .collect();
    assert_eq!(by["scripted/rt-fail"]["status"], "failed");
    assert!(by["scripted/rt-fail"]["error"]
        .as_str()
        .unwrap()
        .contains("not available"));
    assert_eq!(by["scripted/rt-slow"]["status"], "timeout");
    assert!(by["scripted/rt-slow"]["error"]
        .as_str()
        .unwrap()
        .contains("1500 ms"));
    let slow_ms = by["scripted/rt-slow"]["latency_ms"].as_f64().unwrap();
    assert!((1400.0..4000.0).contains(&slow_ms), "{slow_ms}");

    // The judge saw four answers, anonymised, and the runner kept the mapping.
    let judge = requests(&server, "judge");
    assert_eq!(judge.len(), 1);
    let labels = labelled(&judge[0].prompt);
    assert_eq!(labels.keys().collect::<Vec<_>>(), ["A", "B", "C", "D"]);
    for (m, _) in ANSWERS {
        assert!(
            !judge[0].prompt.contains(m) && !judge[0].system.contains(m),
            "{m} named to the judge"
        );
    }
    for l in [
        "relevance",
        "accuracy",
        "clarity",
        "completeness",
        "creativity",
    ] {
        assert!(judge[0].system.contains(l));
    }
    let label_model: BTreeMap<String, String> = labels
        .iter()
        .map(|(l, t)| (l.clone(), model_of_answer(t)))
        .collect();
    // Scores: A 45, B 40, C 35, D 30.
    for (l, total) in [("A", 45.0), ("B", 40.0), ("C", 35.0), ("D", 30.0)] {
        let e = by[&format!("scripted/{}", label_model[l])];
        assert_eq!(e["total_score"], total, "{l}");
        assert_eq!(e["scores"]["clarity"], total / 5.0);
        assert_eq!(e["status"], "ok");
    }
    // A/B of the top two (A and B of the judge's labels), in some order; B of the A/B wins.
    let ab = requests(&server, "ab_judge");
    assert_eq!(ab.len(), 1);
    let ab_labels = labelled(&ab[0].prompt);
    let ab_models: Vec<String> = ab_labels.values().map(|t| model_of_answer(t)).collect();
    let mut top2 = vec![label_model["A"].clone(), label_model["B"].clone()];
    let mut seen = ab_models.clone();
    top2.sort();
    seen.sort();
    assert_eq!(seen, top2, "the top two are compared");
    let ab_winner = format!("scripted/{}", model_of_answer(&ab_labels["B"]));
    assert_eq!(r["winner"]["provider"], ab_winner.as_str());
    assert_eq!(r["ab_test"]["winner"], ab_winner.as_str());
    assert_eq!(
        r["ab_test"]["reasoning"],
        "B answers the question more directly."
    );
    assert_eq!(r["winner"]["rank"], 1);
    // Ranks: the A/B winner first, the other of the top two second, then C, D, then failures.
    let ranks: Vec<(String, u64)> = entries
        .iter()
        .map(|e| {
            (
                e["provider"].as_str().unwrap().to_string(),
                e["rank"].as_u64().unwrap(),
            )
        })
        .collect();
    let other = if ab_winner.ends_with(&label_model["A"]) {
        &label_model["B"]
    } else {
        &label_model["A"]
    };
    assert_eq!(ranks[0], (ab_winner.clone(), 1));
    assert_eq!(ranks[1], (format!("scripted/{other}"), 2));
    assert_eq!(ranks[2], (format!("scripted/{}", label_model["C"]), 3));
    assert_eq!(ranks[3], (format!("scripted/{}", label_model["D"]), 4));
    assert_eq!(ranks[4].1, 5);
    assert_eq!(ranks[5].1, 6);
    // Pairs: the six implied by four scores, then the A/B.
    let pairs = r["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 7);
    for p in &pairs[..6] {
        let (a, b) = (p["a"].as_str().unwrap(), p["b"].as_str().unwrap());
        let (sa, sb) = (
            by[a]["total_score"].as_f64().unwrap(),
            by[b]["total_score"].as_f64().unwrap(),
        );
        assert_eq!(p["score_a"], if sa > sb { 1.0 } else { 0.0 }, "{p}");
    }
    let last = &pairs[6];
    assert_eq!(last["source"], "ab_test");
    let won_a = last["a"] == ab_winner.as_str();
    assert_eq!(last["score_a"], if won_a { 1.0 } else { 0.0 });
    assert!(r["total_cost_usd"].as_f64().unwrap() > 0.0);
    assert!(
        r["duration_ms"].as_f64().unwrap() >= 1400.0,
        "the round waited for the timeout"
    );
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judges_order_is_random_and_a_task_can_answer_through_a_round_table() {
    let server = ModelServer::start(script(0, 4));
    let four = ["rt-alpha", "rt-beta", "rt-gamma", "rt-delta"];
    let runner = TestRunner::start(RunnerOptions {
        llm: llm(&server, &four, Duration::from_secs(5)),
        ..Default::default()
    })
    .await;
    let mut orders = vec![];
    for _ in 0..4 {
        server.clear_requests();
        let events = runner.run(round("Which city?", None), 30).await;
        assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
        let judge = requests(&server, "judge");
        let order: Vec<String> = labelled(&judge[0].prompt)
            .values()
            .map(|t| model_of_answer(t))
            .collect();
        orders.push(order);
    }
    assert!(
        orders.iter().any(|o| *o != orders[0]),
        "the judge saw the same order four times: {orders:?}"
    );

    // Named providers, one unknown: recorded as failed, the round goes on.
    server.clear_requests();
    let events = runner
        .run(
            round(
                "Which city?",
                Some(vec!["scripted/rt-beta".into(), "nowhere/x".into()]),
            ),
            30,
        )
        .await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    let r = result(&events);
    assert_eq!(r["winner"]["provider"], "scripted/rt-beta");
    assert_eq!(r["entries"][1]["status"], "failed");
    assert!(r["ab_test"].is_null(), "one answer: no comparison");
    assert!(requests(&server, "judge").is_empty());
    let stages: Vec<String> = progress(&events).into_iter().map(|(_, s)| s).collect();
    assert_eq!(stages, ["generating", "completed"]);

    // No answer at all: the job fails.
    let events = runner
        .run(round("Which city?", Some(vec!["nowhere/x".into()])), 30)
        .await;
    let (outcome, message, ..) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert!(
        message.contains("No round-table provider answered"),
        "{message}"
    );
    let stages: Vec<String> = progress(&events).into_iter().map(|(_, s)| s).collect();
    assert_eq!(stages, ["generating", "failed"]);

    // A task through the round table: the winner's answer is the result, the job is the
    // competition.
    server.clear_requests();
    let a = task("zero_shot", "Which city should I visit?", json!({}), true);
    let id = a.job_id.clone();
    let events = runner.run(a, 30).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    let r = result(&events);
    assert_eq!(r["competition_id"], id.as_str());
    assert_eq!(r["competition"]["id"], id.as_str());
    assert_eq!(r["competition"]["task_id"], id.as_str());
    assert_eq!(r["competition"]["entries"].as_array().unwrap().len(), 4);
    let winner = r["competition"]["winner"]["provider"].as_str().unwrap();
    let winner_answer = ANSWERS.iter().find(|(m, _)| winner.ends_with(m)).unwrap().1;
    assert_eq!(r["answer"], winner_answer);
    assert_eq!(r["technique"], "zero_shot");
    let answers = requests(&server, "agent.commerce");
    assert_eq!(
        answers.len(),
        4,
        "every provider answered the agent's prompt"
    );
    assert!(answers
        .iter()
        .all(|q| q.system.contains("You price handmade goods") && q.system.contains("zero-shot")));
    runner.stop().await;
}

/// Six providers at a fixed 200 ms per answer: the round table's answers take about as long as
/// the slowest one, not their sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_answers_take_as_long_as_the_slowest() {
    let server = ModelServer::start(script(200, 6));
    let six = ["rt-alpha", "rt-beta", "rt-gamma", "rt-delta"];
    // Six answering providers: four of the script's plus two more models served by the same rules.
    let mut config = llm(&server, &six, Duration::from_secs(5));
    config.round_table.providers.push(model("rt-alpha-2"));
    config.round_table.providers.push(model("rt-beta-2"));
    let runner = TestRunner::start(RunnerOptions {
        llm: config,
        ..Default::default()
    })
    .await;
    let mut walls = vec![];
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let events = runner.run(round("Which city?", None), 30).await;
        let job_ms = t.elapsed().as_millis();
        assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
        let r = result(&events);
        let slowest = r["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["latency_ms"].as_f64().unwrap())
            .fold(0.0, f64::max);
        let generating: u64 = events
            .iter()
            .find_map(|e| match e {
                RunnerEvent::Log { content, .. }
                    if content.contains("ms: round table: answers:") =>
                {
                    content
                        .split(" ended in ")
                        .nth(1)?
                        .split(" ms")
                        .next()?
                        .parse()
                        .ok()
                }
                _ => None,
            })
            .unwrap();
        eprintln!("round table of six at 200 ms each: answers step {generating} ms, slowest provider {slowest:.0} ms, whole job {job_ms} ms (judge, A/B included)");
        assert!(slowest >= 200.0, "{slowest}");
        walls.push((generating as f64, slowest));
    }
    // Run in parallel: the step is the slowest answer plus little, far under the sum (1200 ms).
    for (step, slowest) in walls {
        assert!(
            step < slowest + 150.0,
            "answers step {step} ms vs slowest {slowest} ms"
        );
        assert!(step < 600.0, "{step}");
    }
    runner.stop().await;
}
