//! Dispatch benchmark (issue 3's targets), printed as a table:
//! - latency from `POST /jobs` to the runner holding the assignment, over 200 jobs submitted one
//!   at a time to an idle queue;
//! - jobs per second through one queue with 4 runner slots, 200 jobs submitted at once.
//!
//! The runner side is an in-process client of the runner protocol (register, socket, `hello`,
//! event batches) that finishes each job as soon as it is assigned: a no-op agent with no git and
//! no container, so the numbers are the control plane's own.
//!
//! `cargo run --release -p kiln-e2e --bin bench_dispatch`; `KILN_BENCH_URL` measures a running
//! edge (which must then have `MAX_CONCURRENT_JOBS=4`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kiln_e2e::bench::{percentile, print_table, Row};
use kiln_schemas::runner::{
    EdgeMessage, EventBatch, IndexedEvent, Outcome, RegisterRunnerResponse, RunnerEvent, RunnerMessage,
};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const JOBS: usize = 200;
const SLOTS: u32 = 4;

type Assigned = Arc<Mutex<HashMap<String, Instant>>>;

/// A protocol-level runner: answers every assignment with `started` + `finished`.
async fn run_noop_runner(base: String, token: String, assigned: Assigned, done: tokio::sync::mpsc::UnboundedSender<String>) -> anyhow::Result<()> {
    let ws_url = format!("{}/runner/v1/connect", base.replacen("http", "ws", 1));
    let mut request = ws_url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(request).await?;
    let (mut sink, mut stream) = ws.split();
    let hello = RunnerMessage::Hello { name: "bench".into(), capacity: SLOTS, running: vec![], version: "bench".into(), tools: None };
    sink.send(Message::Text(serde_json::to_string(&hello)?.into())).await?;
    let http = reqwest::Client::new();
    while let Some(msg) = stream.next().await {
        let Message::Text(text) = msg? else { continue };
        let Ok(EdgeMessage::Assign { assignment }) = serde_json::from_str::<EdgeMessage>(&text) else { continue };
        assigned.lock().unwrap().insert(assignment.job_id.clone(), Instant::now());
        let (http, base, token, done) = (http.clone(), base.clone(), token.clone(), done.clone());
        tokio::spawn(async move {
            let batch = EventBatch {
                lease_id: assignment.lease_id.clone(),
                events: vec![
                    IndexedEvent { index: 0, event: RunnerEvent::Started { message: "started".into() } },
                    IndexedEvent {
                        index: 1,
                        event: RunnerEvent::Finished {
                            outcome: Outcome::Completed,
                            message: "done".into(),
                            pr_url: None,
                            completion_reason: None,
                            total_iterations: None,
                            error_message: None,
                            result: None,
                        },
                    },
                ],
            };
            let resp = http
                .post(format!("{base}/runner/v1/jobs/{}/events", assignment.job_id))
                .bearer_auth(&token)
                .json(&batch)
                .send()
                .await;
            if let Ok(r) = resp {
                if r.status().is_success() {
                    let _ = done.send(assignment.job_id);
                }
            }
        });
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut rows = vec![];
    for (label, edge, base) in kiln_e2e::bench::edges_for_bench(&[("MAX_CONCURRENT_JOBS", "4")]).await? {
        rows.extend(measure(&label, base).await?);
        drop(edge);
    }
    print_table("Kiln dispatch through one queue (local workerd, loopback, 2 cores)", &rows);
    Ok(())
}

async fn measure(label: &str, base: String) -> anyhow::Result<Vec<Row>> {
    let http = reqwest::Client::new();
    let user = kiln_e2e::bench::user_token(&http, &base, &format!("bench-{}@example.com", uuid::Uuid::new_v4())).await?;
    let registration = kiln_e2e::runner_registration_token();
    let reg: RegisterRunnerResponse = http
        .post(format!("{base}/runner/v1/register"))
        .bearer_auth(&registration)
        .json(&json!({"name": "bench"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let assigned: Assigned = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = tokio::spawn(run_noop_runner(base.clone(), reg.token.clone(), assigned.clone(), done_tx));
    // Wait until the runner's slots show up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health: serde_json::Value = http.get(format!("{base}/health")).send().await?.json().await?;
        if health["runners"]["free_slots"].as_u64().unwrap_or(0) >= SLOTS as u64 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "runner never connected: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let create = {
        let (http, base, user) = (http.clone(), base.clone(), user.clone());
        move |i: usize| {
        let (http, base, user) = (http.clone(), base.clone(), user.clone());
        async move {
            let resp: serde_json::Value = http
                .post(format!("{base}/jobs"))
                .bearer_auth(&user)
                .json(&json!({"prompt": "noop", "githubOrg": "kiln", "githubRepo": "bench", "branchName": format!("bench/{i}")}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            anyhow::Ok(resp["id"].as_str().unwrap_or_default().to_string())
        }
        }
    };

    // Latency: one job at a time on an idle queue.
    let mut latency = vec![];
    for i in 0..JOBS {
        let t0 = Instant::now();
        let id = create(i).await?;
        loop {
            let finished = tokio::time::timeout(Duration::from_secs(10), done_rx.recv()).await?.unwrap_or_default();
            if finished == id {
                break;
            }
        }
        let at = assigned.lock().unwrap().get(&id).copied().ok_or_else(|| anyhow::anyhow!("job {id} never assigned"))?;
        latency.push(at - t0);
    }

    // Throughput: all at once through 4 slots.
    let started = Instant::now();
    let mut submitters = vec![];
    for chunk in 0..8 {
        let create = create.clone();
        submitters.push(tokio::spawn(async move {
            for i in 0..JOBS / 8 {
                create(JOBS + chunk * 1000 + i).await?;
            }
            anyhow::Ok(())
        }));
    }
    for s in submitters {
        s.await??;
    }
    for _ in 0..JOBS {
        tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await?;
    }
    let elapsed = started.elapsed();
    runner.abort();

    latency.sort();
    Ok(vec![
        Row {
            name: format!("{label}: POST /jobs → runner holds it"),
            samples: latency.len(),
            p50: percentile(&latency, 50.0),
            p99: percentile(&latency, 99.0),
            extra: "idle queue, one job at a time (target p50 ≤ 25 ms, p99 ≤ 100 ms)".into(),
        },
        Row {
            name: format!("{label}: {JOBS} jobs, {SLOTS} slots"),
            samples: JOBS,
            p50: elapsed / JOBS as u32,
            p99: elapsed / JOBS as u32,
            extra: format!(
                "{:.1} jobs/s, {:.2} s in all (both time columns: mean time per job)",
                JOBS as f64 / elapsed.as_secs_f64(),
                elapsed.as_secs_f64()
            ),
        },
    ])
}
