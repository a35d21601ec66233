//! Round-table benchmark (seed 002, issue 10): six providers on the scripted model server, each
//! answering after a fixed 200 ms, through the whole stack (`POST /api/v1/round-table/compete` on
//! a fresh `wrangler dev`, the real runner, the `round_table` channel). Per competition:
//! - wall: from the compete request to `completed` on the channel (judge and A/B included);
//! - answers: from `generating` to `scoring` on the channel (the step the providers share);
//! - slowest: the slowest provider's own latency (the entries' `latency_ms`);
//! - sum: the six latencies added up (what answering one after another would take).
//!
//! Providers answer at once, so answers ≈ slowest, far under sum. Needs `target/<profile>/runner`
//! (`cargo build -p kiln-runner`) and `edge/build` (`scripts/build-edge`).
//! `cargo run -p kiln-e2e --bin bench_round_table [-- ROUNDS]` (default 10).

use std::time::{Duration, Instant};

use kiln_e2e::bench::{percentile, print_table, Row};
use kiln_e2e::dashboard::DashboardClient;
use kiln_e2e::model::{ModelServer, Script};
use kiln_e2e::{TestEdge, TestRunner};
use serde_json::{json, Value};

const ANSWER_MS: u64 = 200;
const PROVIDERS: [&str; 6] = ["kiln-rt-alpha", "kiln-rt-beta", "kiln-rt-gamma", "kiln-rt-delta", "kiln-rt-epsilon", "kiln-rt-zeta"];

/// The demo script, each provider's answer held `ANSWER_MS` before its first byte.
fn script() -> anyhow::Result<Script> {
    let mut rules: Vec<Value> = PROVIDERS
        .iter()
        .map(|m| json!({"name": m, "when": {"model": m}, "stall_before_ms": ANSWER_MS, "chunk_delay_ms": 0, "text": format!("{m}: a one-sentence pitch for {{{{prompt_line}}}}.")}))
        .collect();
    rules.extend(Script::demo().rules.iter().map(|r| serde_json::to_value(r).unwrap()));
    Script::from_value(json!({"model": "kiln-demo", "rules": rules}))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(10);
    let model = ModelServer::start(script()?);
    let edge = TestEdge::start(&[]).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("runner.toml");
    let providers: Vec<String> = PROVIDERS.iter().map(|m| format!("\"scripted/{m}\"")).collect();
    std::fs::write(
        &config,
        format!(
            "[llm]\nmax_attempts = 1\n\n[llm.providers.scripted]\napi = \"anthropic\"\nbase_url = \"{}\"\n\n[llm.roles]\ndefault = \"scripted/kiln-demo\"\n\n[llm.round_table]\nproviders = [{}]\ntimeout_secs = 10\n",
            model.url(),
            providers.join(", ")
        ),
    )?;
    let config = config.display().to_string();
    let _runner = TestRunner::start(&edge, &[("RUNNER_EXECUTOR", "process"), ("RUNNER_CONFIG", config.as_str())]).await?;
    let user = DashboardClient::register(&edge, "bench-rt").await;
    let mut channel = user.channel("round_table", "").await;

    println!("| round | wall ms | answers ms | slowest ms | sum ms | winner");
    println!("|------:|--------:|-----------:|-----------:|-------:|-------");
    let (mut walls, mut answers, mut slowests, mut sums) = (vec![], vec![], vec![], vec![]);
    for round in 0..=rounds {
        let t0 = Instant::now();
        let comp = user.compete(&format!("a handmade mug, round {round}")).await;
        let id = comp["id"].as_str().unwrap_or_default().to_string();
        let (mut generating, mut scoring) = (None, None);
        let end = loop {
            let m = channel.next(Duration::from_secs(60)).await.ok_or_else(|| anyhow::anyhow!("round {round}: the channel went quiet"))?;
            if m["competition_id"] != id.as_str() {
                continue;
            }
            match m["stage"].as_str() {
                Some("generating") => {
                    generating.get_or_insert(Instant::now());
                }
                Some("scoring") => {
                    scoring.get_or_insert(Instant::now());
                }
                Some("completed") => break Instant::now(),
                Some("failed") => anyhow::bail!("round {round} failed: {m}"),
                _ => {}
            }
        };
        let view = user.wait_for(&format!("/api/v1/round-table/{id}"), Duration::from_secs(30), |v| v["stage"] == "completed").await;
        let lat: Vec<f64> = view["entries"].as_array().into_iter().flatten().filter_map(|e| e["latency_ms"].as_f64()).collect();
        let slowest = lat.iter().copied().fold(0.0, f64::max);
        let sum: f64 = lat.iter().sum();
        let (Some(g), Some(s)) = (generating, scoring) else { anyhow::bail!("round {round}: no generating/scoring on the channel") };
        let wall = end - t0;
        let answer = s - g;
        println!(
            "| {round:>5}{} | {:>7.0} | {:>10.0} | {slowest:>10.0} | {sum:>6.0} | {}",
            if round == 0 { "*" } else { " " },
            ms(wall),
            ms(answer),
            view["winner"]["provider"].as_str().unwrap_or("-")
        );
        if round == 0 {
            continue; // a warm-up: the runner's first connections
        }
        walls.push(wall);
        answers.push(answer);
        slowests.push(Duration::from_secs_f64(slowest / 1000.0));
        sums.push(Duration::from_secs_f64(sum / 1000.0));
    }
    println!("(* warm-up, left out of the summary)");
    let row = |name: &str, mut xs: Vec<Duration>, extra: &str| {
        xs.sort();
        Row { name: name.into(), samples: xs.len(), p50: percentile(&xs, 50.0), p99: percentile(&xs, 99.0), extra: extra.into() }
    };
    print_table(
        &format!("Round table of {} providers at {ANSWER_MS} ms each, {rounds} rounds", PROVIDERS.len()),
        &[
            row("wall: compete -> completed", walls, "judge and A/B included"),
            row("answers: generating -> scoring", answers, "on the channel"),
            row("slowest provider's latency", slowests, "runner-measured"),
            row("six latencies summed", sums, "what one-by-one would take"),
        ],
    );
    Ok(())
}
