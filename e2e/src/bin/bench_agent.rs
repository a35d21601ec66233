//! The first five minutes, timed (issue 7's target: p50 ≤ 1.5 s): from `POST /jobs` to the first
//! line the real Claude Code CLI prints, seen on the job's live channel, over 20 code jobs run one
//! at a time on the demo model. Container start is included; it is also shown alone (the runner's
//! "docker sandbox ready in N ms"), with the job's whole run to `completed`.
//!
//! The real path: an edge on workerd (wrangler's dev server without the inspector, as
//! `scripts/dev` serves it), a runner with the Docker executor and the agent image
//! (`kiln-agent:latest`), the scripted demo model, a local bare remote.
//!
//! `cargo build --release -p kiln-runner && cargo run --release -p kiln-e2e --bin bench_agent`
//! (after `scripts/setup`, `scripts/build-edge` and `scripts/dockerd`).

use std::time::{Duration, Instant};

use kiln_e2e::bench::{percentile, print_table, Row};
use kiln_e2e::model::ModelServer;
use kiln_e2e::{EdgeServer, GitRemotes, TestEdge, TestRunner, WsAuth, WsClient};
use serde_json::{json, Value};

const JOBS: usize = 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let model = ModelServer::demo();
    let edge = TestEdge::start_with(EdgeServer::Direct, &[]).await?;
    let api = edge.api();
    api.grant("*", "acme/*").await;
    let remotes = GitRemotes::new();
    remotes.create_with_files("acme", "shop", &[("README.md", "# shop\n")]);
    let token = api.new_user("bench-agent").await;
    let state = tempfile::tempdir()?;
    let (base, model_url, state_dir) = (remotes.base_url(), model.url(), state.path().display().to_string());
    let _runner = TestRunner::start(
        &edge,
        &[
            ("RUNNER_STATE_DIR", state_dir.as_str()),
            ("RUNNER_EXECUTOR", "docker"),
            ("RUNNER_IMAGE", "kiln-agent:latest"),
            ("RUNNER_NETWORK", "host"),
            ("RUNNER_AGENT", "claude"),
            ("RUNNER_AGENT_ENV", "ANTHROPIC_BASE_URL,ANTHROPIC_API_KEY,DISABLE_AUTOUPDATER,CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"),
            ("ANTHROPIC_BASE_URL", model_url.as_str()),
            ("ANTHROPIC_API_KEY", "kiln-demo"),
            ("DISABLE_AUTOUPDATER", "1"),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            ("RUNNER_DEMO_MODEL", "true"),
            ("RUNNER_GIT_BASE_URL", base.as_str()),
        ],
    )
    .await?;

    let (mut first_line, mut sandbox, mut whole) = (vec![], vec![], vec![]);
    // One unmeasured job first: the image's first container after an import is slower.
    for i in 0..=JOBS {
        let t0 = Instant::now();
        let created = api
            .create_job(&token, json!({"githubOrg": "acme", "githubRepo": "shop", "prompt": format!("Bench change {i}"), "branchName": format!("bench/{i}")}))
            .await;
        let id = created["id"].as_str().unwrap_or_default().to_string();
        let mut ws = WsClient::connect(&edge.ws_url(), &id, WsAuth::Header(&token), Some(0))
            .await
            .map_err(|e| anyhow::anyhow!("socket refused: {e:?}"))?;
        let (mut first, mut ready_ms) = (None, None);
        let end = loop {
            let Some(event) = ws.next_json(Duration::from_secs(60)).await else {
                anyhow::bail!("job {id}: no event within 60 s");
            };
            if first.is_none() && event["kind"] == "agentEvent" {
                first = Some(t0.elapsed());
            }
            if let Some(ms) = sandbox_ready_ms(&event) {
                ready_ms = Some(Duration::from_millis(ms));
            }
            if event["kind"] == "jobStatus" && matches!(event["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
                break (event["status"].as_str().unwrap_or_default().to_string(), t0.elapsed());
            }
        };
        ws.close().await;
        anyhow::ensure!(end.0 == "completed", "job {id} ended {}", end.0);
        if i == 0 {
            continue;
        }
        first_line.push(first.ok_or_else(|| anyhow::anyhow!("job {id}: the agent printed nothing"))?);
        sandbox.push(ready_ms.ok_or_else(|| anyhow::anyhow!("job {id}: no sandbox timing"))?);
        whole.push(end.1);
    }
    for v in [&mut first_line, &mut sandbox, &mut whole] {
        v.sort();
    }
    let row = |name: &str, v: &[Duration], extra: &str| Row {
        name: name.into(),
        samples: v.len(),
        p50: percentile(v, 50.0),
        p99: percentile(v, 99.0),
        extra: extra.into(),
    };
    print_table(
        "Real Claude Code CLI on the demo model, Docker executor (local workerd, 2 cores)",
        &[
            row("POST /jobs → agent's first output line", &first_line, "on the live channel, container start included (target p50 ≤ 1.5 s)"),
            row("container create + start alone", &sandbox, "the runner's \"docker sandbox ready in N ms\""),
            row("POST /jobs → completed", &whole, "agent run, commit and push included"),
        ],
    );
    Ok(())
}

/// N from a `docker sandbox ready in N ms` system message.
fn sandbox_ready_ms(event: &Value) -> Option<u64> {
    let text = event["content"].as_str().or_else(|| event["message"].as_str())?;
    text.strip_prefix("docker sandbox ready in ")?.strip_suffix(" ms")?.parse().ok()
}
