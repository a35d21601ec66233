//! The app builder's requirements gatherer against the real scripted model server
//! (`kiln_e2e::model`): a question, a summary, the summary demanded when the rounds are used up,
//! 429 then success, a provider that keeps refusing, no provider, the concurrency limit, the
//! time limit and the cancellation at shutdown; and a turn asked over the runner's socket.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_e2e::model::{ModelServer, Script};
use kiln_runner::gather::{Gatherer, SENDER};
use kiln_runner::llm::{Api, ApiKey, LlmClient, LlmConfig, ModelRef, Provider, RetryPolicy};
use kiln_schemas::app::split_summary;
use kiln_schemas::runner::{ChatTurn, EdgeMessage, GatherReply, GatherRequest, RunnerRequest};
use serde_json::{json, Value};

const KEY: &str = "sk-ant-gather-test-0123456789";

fn server(rules: Value) -> ModelServer {
    ModelServer::start(
        Script::from_value(json!({ "model": "kiln-test", "rules": rules }))
            .expect("a valid script"),
    )
}

fn quick() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(40),
        max_backoff: Duration::from_millis(160),
        max_retry_wait: Duration::from_secs(5),
        request_timeout: Duration::from_secs(20),
        stall_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
    }
}

/// The role `gatherer` on the scripted server's Anthropic face.
fn config(s: &ModelServer) -> LlmConfig {
    let mut c = LlmConfig {
        policy: quick(),
        ..Default::default()
    };
    c.providers.insert(
        "anthropic".into(),
        Provider::new(
            "anthropic",
            Api::Anthropic,
            &s.url(),
            Some(ApiKey::new(KEY)),
        ),
    );
    c.roles.insert(
        "gatherer".into(),
        ModelRef {
            provider: "anthropic".into(),
            model: "claude-test".into(),
        },
    );
    c
}

/// The runner's one LLM client over `c`.
fn client(c: LlmConfig) -> LlmClient {
    LlmClient::new(c).expect("an LLM client")
}

fn request(turns: &[(&str, &str)], must_summarise: bool) -> GatherRequest {
    GatherRequest {
        job_id: uuid::Uuid::new_v4().to_string(),
        initial_prompt: "A recipe box for my family".into(),
        transcript: turns
            .iter()
            .map(|(role, content)| ChatTurn {
                role: role.to_string(),
                content: content.to_string(),
            })
            .collect(),
        must_summarise,
    }
}

/// A gatherer's script: a question to the first message, a summary once it has asked, and the
/// summary when the last message demands it.
fn gatherer_rules() -> Value {
    json!([
        {"name": "must", "when": {"system": "Kiln role: gatherer", "prompt": "REQUIREMENTS_SUMMARY"},
         "text": "Here is what I have.\nREQUIREMENTS_SUMMARY: {{prompt_count}} messages about recipes."},
        {"name": "summary", "when": {"system": "Kiln role: gatherer", "min_turn": 1},
         "text": "Great, thanks.\nREQUIREMENTS_SUMMARY: A shared recipe box with tags."},
        {"name": "question", "when": {"system": "Kiln role: gatherer", "turn": 0},
         "text": "Who will add recipes, and do you need tags?", "chunks": 4},
        {"text": "not a gatherer request"}
    ])
}

#[tokio::test]
async fn the_first_turn_asks_a_question() {
    let s = server(gatherer_rules());
    let g = Gatherer::new(client(config(&s)), 4);
    let reply = g.answer(&request(&[], false)).await.unwrap();
    assert_eq!(reply.reply, "Who will add recipes, and do you need tags?");
    assert_eq!(reply.sender, SENDER);
    assert_eq!(split_summary(&reply.reply).1, None);
    let usage = reply.usage.expect("usage is reported");
    assert_eq!(
        (usage.source.as_str(), usage.model.as_deref()),
        ("gatherer", Some("kiln-test"))
    );
    assert!(
        usage.input_tokens > 0 && usage.output_tokens > 0,
        "{usage:?}"
    );

    let seen = s.requests();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].system.starts_with("Kiln role: gatherer\n"),
        "{}",
        seen[0].system
    );
    assert!(seen[0].system.contains("REQUIREMENTS_SUMMARY"));
    assert_eq!(seen[0].messages.len(), 1);
    assert_eq!(
        (
            seen[0].messages[0].role.as_str(),
            seen[0].messages[0].text.as_str()
        ),
        ("user", "A recipe box for my family")
    );
    assert_eq!(seen[0].api_key.as_deref(), Some(KEY));
}

#[tokio::test]
async fn a_later_turn_summarises_with_the_whole_transcript() {
    let s = server(gatherer_rules());
    let g = Gatherer::new(client(config(&s)), 4);
    // The edge's transcript may hold the idea as its first user turn: it is not sent twice.
    let req = request(
        &[
            ("user", "A recipe box for my family"),
            ("agent", "Who will add recipes, and do you need tags?"),
            ("user", "Everyone in the family; yes, tags."),
        ],
        false,
    );
    let reply: GatherReply = g.answer(&req).await.unwrap();
    let (before, summary) = split_summary(&reply.reply);
    assert_eq!(before, "Great, thanks.");
    assert_eq!(summary.as_deref(), Some("A shared recipe box with tags."));
    let seen = &s.requests()[0];
    let shape: Vec<(&str, &str)> = seen
        .messages
        .iter()
        .map(|m| (m.role.as_str(), m.text.as_str()))
        .collect();
    assert_eq!(
        shape,
        [
            ("user", "A recipe box for my family"),
            ("assistant", "Who will add recipes, and do you need tags?"),
            ("user", "Everyone in the family; yes, tags."),
        ]
    );
}

#[tokio::test]
async fn when_the_rounds_are_used_up_the_summary_is_demanded() {
    let s = server(gatherer_rules());
    let g = Gatherer::new(client(config(&s)), 4);
    let req = request(
        &[
            ("agent", "Who uses it?"),
            ("user", "Me"),
            ("agent", "Tags?"),
            ("user", "No"),
        ],
        true,
    );
    let reply = g.answer(&req).await.unwrap();
    assert_eq!(
        split_summary(&reply.reply).1.as_deref(),
        Some("3 messages about recipes.")
    );
    let seen = &s.requests()[0];
    assert_eq!(seen.rule.as_deref(), Some("must"));
    assert!(seen.system.contains("No more questions"), "{}", seen.system);
    assert!(
        seen.prompt.starts_with("No\n\n"),
        "the demand follows the client's last words: {}",
        seen.prompt
    );
}

#[tokio::test]
async fn a_rate_limited_turn_is_retried_and_succeeds() {
    let s = server(json!([
        {"error": {"status": 429, "retry_after": 1}, "fail_first": 1, "text": "What should it be called?"}
    ]));
    let g = Gatherer::new(client(config(&s)), 4);
    let t0 = Instant::now();
    let reply = g.answer(&request(&[], false)).await.unwrap();
    assert_eq!(reply.reply, "What should it be called?");
    let seen = s.requests();
    assert_eq!(
        seen.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 200]
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "the provider's Retry-After was waited"
    );
}

#[tokio::test]
async fn a_provider_that_keeps_refusing_gives_a_clear_error_without_internals() {
    let s = server(json!([{"error": {"status": 429, "message": format!("slow down, key {KEY}")}}]));
    let g = Gatherer::new(client(config(&s)), 4);
    let e = g.answer(&request(&[], false)).await.unwrap_err().0;
    assert_eq!(
        e,
        "the model provider anthropic is rate limiting this runner; try again shortly"
    );
    assert_eq!(
        s.requests().len(),
        3,
        "every attempt of the policy was made"
    );

    let s = server(json!([{"error": {"status": 400, "message": format!("bad request {KEY}")}}]));
    let e = Gatherer::new(client(config(&s)), 4)
        .answer(&request(&[], false))
        .await
        .unwrap_err()
        .0;
    assert_eq!(e, "the model provider anthropic answered HTTP 400");
    assert!(!e.contains(KEY) && !e.contains("127.0.0.1"));
}

#[tokio::test]
async fn without_a_provider_the_turn_is_refused() {
    let g = Gatherer::new(client(LlmConfig::default()), 4);
    assert!(!g.has_provider());
    let e = g.answer(&request(&[], false)).await.unwrap_err().0;
    assert!(e.starts_with("this runner has no LLM provider"), "{e}");
    // A provider but no model for the role.
    let s = server(gatherer_rules());
    let mut c = config(&s);
    c.roles.clear();
    let e = Gatherer::new(client(c), 4)
        .answer(&request(&[], false))
        .await
        .unwrap_err()
        .0;
    assert!(
        e.contains("no LLM model for the requirements gatherer"),
        "{e}"
    );
    assert!(s.requests().is_empty());
}

#[tokio::test]
async fn turns_beyond_the_concurrency_wait_for_a_free_one() {
    let s = server(json!([{"stall_before_ms": 600, "text": "A question?"}]));
    let run = |n: usize| {
        let g = Gatherer::new(client(config(&s)), n);
        async move {
            let t0 = Instant::now();
            let turns = (0..4).map(|_| {
                let g = g.clone();
                async move { g.answer(&request(&[], false)).await }
            });
            for r in futures::future::join_all(turns).await {
                assert_eq!(r.unwrap().reply, "A question?");
            }
            t0.elapsed()
        }
    };
    let one = run(1).await;
    let four = run(4).await;
    assert!(
        one >= Duration::from_millis(2400),
        "4 turns one at a time: {one:?}"
    );
    assert!(
        four < Duration::from_millis(1500),
        "4 turns at once: {four:?}"
    );
    println!(
        "4 turns of 600 ms: {} ms one at a time, {} ms four at a time",
        one.as_millis(),
        four.as_millis()
    );
}

#[tokio::test]
async fn a_turn_is_bounded_in_time_and_cancelled_at_shutdown() {
    let s = server(json!([{"stall_before_ms": 5000, "text": "late"}]));
    let g = Gatherer::new(client(config(&s)), 4).with_time_limit(Duration::from_millis(400));
    let t0 = Instant::now();
    let e = g.answer(&request(&[], false)).await.unwrap_err().0;
    assert!(e.contains("took longer than"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));

    let g = Gatherer::new(client(config(&s)), 4);
    let stopper = g.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stopper.shutdown();
    });
    let t0 = Instant::now();
    let e = g.answer(&request(&[], false)).await.unwrap_err().0;
    assert!(e.contains("the runner is stopping"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "cancelled at once: {:?}",
        t0.elapsed()
    );
    let e = g.answer(&request(&[], false)).await.unwrap_err().0;
    assert!(e.contains("stopping"), "no new turns after shutdown: {e}");
}

#[tokio::test]
async fn a_runner_without_a_provider_answers_a_gather_request_with_an_error() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let request_id = uuid::Uuid::new_v4().to_string();
    runner
        .edge
        .send(EdgeMessage::Request {
            request_id: request_id.clone(),
            request: RunnerRequest::Gather(request(&[], false)),
        })
        .await;
    let reply = runner.edge.wait_reply(&request_id).await;
    let error = reply["error"]
        .as_str()
        .unwrap_or_else(|| panic!("an error: {reply}"));
    assert!(
        error.starts_with("this runner has no LLM provider"),
        "{error}"
    );
    runner.stop().await;
}

/// A runner whose role `gatherer` is the scripted server.
async fn runner_with_model(s: &ModelServer) -> TestRunner {
    TestRunner::start(RunnerOptions {
        llm: config(s),
        ..RunnerOptions::default()
    })
    .await
}

async fn send_request(runner: &TestRunner, request: RunnerRequest) -> String {
    let request_id = uuid::Uuid::new_v4().to_string();
    runner
        .edge
        .send(EdgeMessage::Request {
            request_id: request_id.clone(),
            request,
        })
        .await;
    request_id
}

fn heartbeats(runner: &TestRunner) -> usize {
    runner
        .edge
        .received()
        .iter()
        .filter(|m| matches!(m, kiln_schemas::runner::RunnerMessage::Heartbeat { .. }))
        .count()
}

#[tokio::test]
async fn a_slow_turn_over_the_socket_holds_up_neither_heartbeats_nor_other_requests() {
    let s = server(
        json!([{"when": {"system": "Kiln role: gatherer"}, "stall_before_ms": 3000, "text": "Which colours?"}]),
    );
    let runner = runner_with_model(&s).await;
    let health = runner.health().await;
    assert_eq!(health["llm"]["configured"], true, "{health}");
    assert_eq!(health["llm"]["roles"]["gatherer"], "anthropic/claude-test");
    assert!(!health.to_string().contains(KEY), "no key in /health");

    let t0 = Instant::now();
    let gather = send_request(&runner, RunnerRequest::Gather(request(&[], false))).await;
    let beats = heartbeats(&runner);
    // Another request while the model has not answered yet: answered at once.
    let sync = send_request(&runner, RunnerRequest::Sync { repos: vec![] }).await;
    assert_eq!(runner.edge.wait_reply(&sync).await, json!([]));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    let reply = runner.edge.wait_reply(&gather).await;
    let took = t0.elapsed();
    assert_eq!(reply["reply"], "Which colours?", "{reply}");
    assert_eq!(reply["sender"], "Client Relations");
    assert_eq!(reply["usage"]["source"], "gatherer");
    assert!(took >= Duration::from_secs(3), "{took:?}");
    assert!(
        heartbeats(&runner) >= beats + 2,
        "heartbeats went on during the turn (1 s apart)"
    );
    runner.stop().await;
}
