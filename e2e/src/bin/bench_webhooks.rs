//! Outbound webhook benchmark (issue 12 §2): from a job event to the delivery's arrival at a local
//! receiver, p50/p99 over 200 events, printed as a table:
//! - one at a time: `POST /jobs` (its room's `job.created`) and wait for the delivery before the
//!   next;
//! - a burst: 200 jobs submitted 20 at a time, each measured from its own submit.
//!
//! The time runs from the moment `POST /jobs` is sent (the event is committed inside that call, so
//! this is an upper bound of event → arrival) to the receiver's handler seeing the POST. The
//! receiver is an HTTP server in this process answering 200 at once.
//!
//! `cargo run --release -p kiln-e2e --bin bench_webhooks`; `KILN_BENCH_URL` measures a running edge
//! (which must allow private http targets: development settings).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use axum::Router;
use kiln_e2e::bench::{percentile, print_table, Row};
use serde_json::{json, Value};
use tokio::sync::Notify;

const EVENTS: usize = 200;
const BURST_PARALLELISM: usize = 20;

#[derive(Default)]
struct Arrivals {
    /// job id → when its `job.created` arrived.
    at: Mutex<HashMap<String, Instant>>,
    notify: Notify,
}

async fn receiver(arrivals: Arc<Arrivals>) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = Router::new().route(
        "/hook",
        post(move |body: Bytes| {
            let arrivals = arrivals.clone();
            async move {
                let now = Instant::now();
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    if let Some(id) = v["job"]["id"].as_str() {
                        arrivals.at.lock().unwrap().entry(id.to_string()).or_insert(now);
                        arrivals.notify.notify_waiters();
                    }
                }
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

async fn arrival(arrivals: &Arrivals, job_id: &str, timeout: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let notified = arrivals.notify.notified();
        if let Some(at) = arrivals.at.lock().unwrap().get(job_id) {
            return Ok(*at);
        }
        anyhow::ensure!(Instant::now() < deadline, "job {job_id}'s delivery did not arrive within {timeout:?}");
        let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut rows = vec![];
    for (label, edge, base) in kiln_e2e::bench::edges_for_bench(&[]).await? {
        rows.extend(measure(&label, &base).await?);
        drop(edge);
    }
    print_table("Kiln outbound webhooks: job event -> arrival at a local receiver (local workerd, loopback, 2 cores)", &rows);
    Ok(())
}

async fn measure(label: &str, base: &str) -> anyhow::Result<Vec<Row>> {
    let http = reqwest::Client::new();
    let token = kiln_e2e::bench::user_token(&http, base, &format!("bench-hooks-{}@example.com", uuid::Uuid::new_v4())).await?;
    let arrivals = Arc::new(Arrivals::default());
    let url = receiver(arrivals.clone()).await?;
    http.post(format!("{base}/webhook-subscriptions"))
        .bearer_auth(&token)
        .json(&json!({"url": url, "events": ["job.created"]}))
        .send()
        .await?
        .error_for_status()?;
    let (org, repo) = kiln_e2e::bench::BENCH_REPOSITORY.split_once('/').unwrap();
    let create = |i: usize| {
        let (http, base, token) = (http.clone(), base.to_string(), token.clone());
        async move {
            let sent = Instant::now();
            let resp: Value = http
                .post(format!("{base}/jobs"))
                .bearer_auth(&token)
                .json(&json!({"prompt": "noop", "githubOrg": org, "githubRepo": repo, "branchName": format!("bench/hooks-{i}")}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let answered = Instant::now();
            anyhow::Ok((resp["id"].as_str().unwrap_or_default().to_string(), sent, answered))
        }
    };

    // One at a time.
    let (mut latency, mut create_ms) = (vec![], vec![]);
    for i in 0..EVENTS {
        let (id, sent, answered) = create(i).await?;
        let at = arrival(&arrivals, &id, Duration::from_secs(30)).await?;
        latency.push(at.saturating_duration_since(sent));
        create_ms.push(answered - sent);
    }
    latency.sort();
    create_ms.sort();
    let mut rows = vec![Row {
        name: format!("{label}: one at a time"),
        samples: latency.len(),
        p50: percentile(&latency, 50.0),
        p99: percentile(&latency, 99.0),
        extra: format!(
            "POST /jobs itself p50 {:.1} ms, p99 {:.1} ms; max {:.1} ms",
            percentile(&create_ms, 50.0).as_secs_f64() * 1000.0,
            percentile(&create_ms, 99.0).as_secs_f64() * 1000.0,
            latency.last().unwrap().as_secs_f64() * 1000.0
        ),
    }];

    // A burst, BURST_PARALLELISM submits in flight.
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(BURST_PARALLELISM));
    let mut tasks = vec![];
    for i in 0..EVENTS {
        let permit = sem.clone().acquire_owned().await?;
        let (fut, arrivals) = (create(EVENTS + i), arrivals.clone());
        tasks.push(tokio::spawn(async move {
            let r = fut.await;
            drop(permit);
            let (id, sent, answered) = r?;
            let at = arrival(&arrivals, &id, Duration::from_secs(60)).await?;
            anyhow::Ok((at.saturating_duration_since(sent), at.saturating_duration_since(answered), answered))
        }));
    }
    let (mut burst, mut after_answer, mut last_answer) = (vec![], vec![], started);
    for t in tasks {
        let (from_sent, from_answer, answered) = t.await??;
        burst.push(from_sent);
        after_answer.push(from_answer);
        last_answer = last_answer.max(answered);
    }
    let elapsed = started.elapsed();
    burst.sort();
    after_answer.sort();
    rows.push(Row {
        name: format!("{label}: burst of {EVENTS}, {BURST_PARALLELISM} in flight"),
        samples: burst.len(),
        p50: percentile(&burst, 50.0),
        p99: percentile(&burst, 99.0),
        extra: format!(
            "{:.0} jobs/s submitted, {:.0} deliveries/s; POST /jobs answered -> arrival p50 {:.1} ms, p99 {:.1} ms",
            EVENTS as f64 / (last_answer - started).as_secs_f64(),
            EVENTS as f64 / elapsed.as_secs_f64(),
            percentile(&after_answer, 50.0).as_secs_f64() * 1000.0,
            percentile(&after_answer, 99.0).as_secs_f64() * 1000.0
        ),
    });
    Ok(rows)
}
