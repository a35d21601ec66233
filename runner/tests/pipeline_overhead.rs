//! The pipeline engine's own time per LLM step, measured through a whole runner against the real
//! scripted model server: step start → first text delta (less the server's time to its first
//! byte) and last text delta → the step's event handed to the reporter (less the server's time
//! from its last text to its stream's end), as each step's log line reports them
//! (`pipeline::Overhead`). Prints p50/p99; asserts only that every step was measured (the
//! numbers depend on the machine).
//!
//! `cargo test -p kiln-runner --test pipeline_overhead -- --nocapture` (add `--release` for an
//! optimised build).

mod common;

use std::time::Duration;

use common::{assignment, finished, percentile, RunnerOptions, TestRunner, BUILD};
use kiln_e2e::model::{ModelServer, Script};
use kiln_runner::llm::{Api, ApiKey, LlmConfig, ModelRef, Provider};
use kiln_runner::pipeline::Overhead;
use kiln_schemas::events::LogStream;
use kiln_schemas::runner::{AppBuildParams, Outcome, RunnerEvent};
use kiln_schemas::status::JobType;
use serde_json::json;

const JOBS: usize = 6;
/// Nine dialogue turns (no consensus), the PRD and the backlog.
const STEPS_PER_JOB: usize = 11;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_overhead_per_llm_step() {
    let turn =
        "We keep the first version small and plain; storage comes later, after the list works.";
    let backlog =
        json!({"tickets": [{"id": "S1", "type": "story", "title": "Page", "dependencies": []}]});
    let server = ModelServer::start(
        Script::from_value(json!({"rules": [
            {"when": {"role": "prd"}, "text": "# PRD\n\nA list.\n\n```json\n{\"name\": \"list\"}\n```", "chunks": 6, "chunk_delay_ms": 2},
            {"when": {"role": "tickets"}, "text": format!("```json\n{backlog}\n```"), "chunks": 6, "chunk_delay_ms": 2},
            {"text": turn, "chunks": 6, "chunk_delay_ms": 2}
        ]}))
        .unwrap(),
    );
    let mut llm = LlmConfig::default();
    llm.providers.insert(
        "anthropic".into(),
        Provider::new(
            "anthropic",
            Api::Anthropic,
            &server.url(),
            Some(ApiKey::new("sk-ant-test")),
        ),
    );
    llm.roles.insert(
        "default".into(),
        ModelRef {
            provider: "anthropic".into(),
            model: "bench-model".into(),
        },
    );
    let runner = TestRunner::start(RunnerOptions {
        llm,
        ..Default::default()
    })
    .await;

    let unix_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    let mut samples: Vec<Overhead> = Vec::new();
    for _ in 0..JOBS {
        let t0 = unix_us();
        let mut a = assignment(JobType::AppBuild, "a list");
        a.app = Some(AppBuildParams {
            initial_prompt: "a list".into(),
            requirements_summary: "A plain list of things.".into(),
            continuation: None,
            paused: false,
        });
        let events = runner.run(a, 60).await;
        assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
        let measured: Vec<Overhead> = events
            .iter()
            .filter_map(|e| match e {
                RunnerEvent::Log {
                    stream: LogStream::System,
                    content,
                } if content.starts_with("LLM ") => Some(
                    Overhead::parse(content)
                        .unwrap_or_else(|| panic!("no overhead in {content:?}")),
                ),
                _ => None,
            })
            .collect();
        assert_eq!(measured.len(), STEPS_PER_JOB, "every LLM step is measured");
        // The marks are on the wall clock, in order, within the job's run.
        let t1 = unix_us();
        for o in &measured {
            let marks = [
                t0,
                o.started_at_us,
                o.first_token_at_us,
                o.last_token_at_us,
                o.handed_at_us,
                t1,
            ];
            assert!(
                marks.windows(2).all(|w| w[0] <= w[1]),
                "{o:?} within {t0}..{t1}"
            );
            // The same instants as the overheads (each mark rounded to a microsecond apart).
            let before =
                (o.first_token_at_us - o.started_at_us) as i64 - o.server_first_byte_us as i64;
            let after = (o.handed_at_us - o.last_token_at_us) as i64 - o.server_tail_us as i64;
            assert!(
                (before - o.before_first_token_us as i64).abs() <= 2
                    && (after - o.after_last_token_us as i64).abs() <= 2,
                "{o:?}"
            );
        }
        samples.extend(measured);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut before: Vec<u64> = samples.iter().map(|o| o.before_first_token_us).collect();
    let mut after: Vec<u64> = samples.iter().map(|o| o.after_last_token_us).collect();
    let mut total: Vec<u64> = samples
        .iter()
        .map(|o| o.before_first_token_us + o.after_last_token_us)
        .collect();
    for v in [&mut before, &mut after, &mut total] {
        v.sort_unstable();
    }
    println!(
        "\nPipeline engine overhead per LLM step ({} steps, {BUILD} build), microseconds:",
        samples.len()
    );
    println!("| measure | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (name, v) in [
        (
            "step start → first token, less the server's first byte",
            &before,
        ),
        (
            "last token → event handed to the reporter, less the server's stream end",
            &after,
        ),
        ("both", &total),
    ] {
        println!(
            "| {name} | {} | {} | {} |",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        );
    }
    runner.stop().await;
}
