//! Dashboard channel benchmark (issue 10): fan-out of `task_update` to 200 subscribers of one
//! owner's tasks channel, p50/p99 from the event to its arrival, printed as a table.
//!
//! The events take the real path: a task (`POST /api/v1/tasks`) is held by a hand-written runner
//! (`kiln_e2e::bench::HandRunner`, the runner protocol), which posts the task's `progress` events
//! to `/runner/v1/jobs/<id>/events`; the job's room stores them and publishes each as a
//! `task_update` (`channels::publish`: the owner's Dashboard object stores it with its seq and
//! sends it to every socket). The time runs from the start of the runner's POST to each
//! subscriber's socket reading the message. Events go one at a time (the next after all 200 have
//! it), then in batches of 10 events per POST, as a busy runner sends them.
//!
//! `cargo run --release -p kiln-e2e --bin bench_channels`; `KILN_BENCH_URL` measures a running
//! edge (its runner registration token must be the development one). `BENCH_SUBSCRIBERS`,
//! `BENCH_EVENTS` change the counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_e2e::bench::{percentile, print_table, HandRunner, Row};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const BATCH: usize = 10;

/// Set once measured: the edge stopping then resets every socket, which is no error.
static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Default)]
struct Arrivals {
    /// The event's mark (its `data.bench`) → when each subscriber read it.
    at: Mutex<HashMap<u64, Vec<Instant>>>,
    notify: Notify,
}

fn count_from_env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn subscriber(ws_url: String, token: String, task: String, arrivals: Arc<Arrivals>, ready: Arc<tokio::sync::Barrier>) -> anyhow::Result<()> {
    let mut req = ws_url.as_str().into_client_request()?;
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}"))?);
    let (mut stream, _) = tokio_tungstenite::connect_async(req).await?;
    ready.wait().await;
    while let Some(msg) = stream.next().await {
        let now = Instant::now();
        if let Message::Text(t) = msg? {
            let v: Value = serde_json::from_str(t.as_str())?;
            if v["type"] == "task_update" && v["task_id"] == task.as_str() {
                if let Some(mark) = v["data"]["bench"].as_u64() {
                    arrivals.at.lock().unwrap().entry(mark).or_default().push(now);
                    arrivals.notify.notify_waiters();
                }
            }
        }
    }
    Ok(())
}

/// The task's progress event marked `mark`, as the runner's LLM step reports it.
fn progress(mark: u64) -> Value {
    json!({"type": "progress", "percent": 10 + mark % 80, "stage": "answering", "data": {"bench": mark}})
}

/// Posts the events marked `marks` in one batch; answers when the POST started and how long its
/// answer took.
async fn post(runner: &mut HandRunner, http: &reqwest::Client, base: &str, marks: &[u64]) -> anyhow::Result<(Instant, Duration)> {
    let sent = Instant::now();
    runner.post(http, base, marks.iter().map(|m| progress(*m)).collect()).await?;
    Ok((sent, sent.elapsed()))
}

/// Waits until `n` subscribers have the event marked `mark`.
async fn all_arrived(arrivals: &Arrivals, mark: u64, n: usize, timeout: Duration) -> anyhow::Result<Vec<Instant>> {
    let deadline = Instant::now() + timeout;
    loop {
        let notified = arrivals.notify.notified();
        if let Some(at) = arrivals.at.lock().unwrap().get(&mark).filter(|a| a.len() >= n) {
            return Ok(at.clone());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let got = arrivals.at.lock().unwrap().get(&mark).map_or(0, Vec::len);
            anyhow::bail!("event {mark}: {got} of {n} subscribers had it after {timeout:?}");
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(100)), notified).await;
    }
}

fn row(name: &str, mut samples: Vec<Duration>, extra: String) -> Row {
    samples.sort();
    Row { name: name.into(), samples: samples.len(), p50: percentile(&samples, 50.0), p99: percentile(&samples, 99.0), extra }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let subscribers = count_from_env("BENCH_SUBSCRIBERS", 200);
    let events = count_from_env("BENCH_EVENTS", 100) as u64;
    let (_edge, base) = match std::env::var("KILN_BENCH_URL") {
        Ok(url) => (None, url.trim_end_matches('/').to_string()),
        Err(_) => {
            let edge = kiln_e2e::TestEdge::start(&[]).await?;
            let url = edge.url();
            (Some(edge), url)
        }
    };
    let ws_base = base.replacen("http", "ws", 1);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let token = kiln_e2e::bench::user_token(&http, &base, &kiln_e2e::unique_email("bench-channels")).await?;

    // The task, and the runner that holds it.
    let task: Value = http
        .post(format!("{base}/api/v1/tasks"))
        .bearer_auth(&token)
        .json(&json!({"agentType": "marketing", "prompt": "A tagline for a mug shop"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let task_id = task["taskId"].as_str().ok_or_else(|| anyhow::anyhow!("the task answered {task}"))?.to_string();
    let mut runner = HandRunner::hold(&http, &base, &ws_base, &task_id, "bench-channels").await?;
    runner.post(&http, &base, vec![json!({"type": "started", "message": "started"})]).await?;

    let arrivals = Arc::new(Arrivals::default());
    let ready = Arc::new(tokio::sync::Barrier::new(subscribers + 1));
    let ws_url = format!("{ws_base}/api/ws/tasks");
    let opened = Instant::now();
    for _ in 0..subscribers {
        let (url, token, task, arrivals, ready) = (ws_url.clone(), token.clone(), task_id.clone(), arrivals.clone(), ready.clone());
        tokio::spawn(async move {
            if let Err(e) = subscriber(url, token, task, arrivals, ready).await {
                if !DONE.load(std::sync::atomic::Ordering::Relaxed) {
                    eprintln!("subscriber: {e}");
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(60), ready.wait()).await?;
    let open_time = opened.elapsed();
    let mut mark = 0u64;
    // Warm the Worker, the room and the object.
    for _ in 0..5 {
        post(&mut runner, &http, &base, &[mark]).await?;
        all_arrived(&arrivals, mark, subscribers, Duration::from_secs(20)).await?;
        mark += 1;
    }

    // One at a time.
    let (mut each, mut last, mut calls) = (vec![], vec![], vec![]);
    for _ in 0..events {
        let (sent, call) = post(&mut runner, &http, &base, &[mark]).await?;
        let at = all_arrived(&arrivals, mark, subscribers, Duration::from_secs(20)).await?;
        each.extend(at.iter().map(|a| a.saturating_duration_since(sent)));
        last.push(at.iter().max().unwrap().saturating_duration_since(sent));
        calls.push(call);
        mark += 1;
    }

    // Batches: BATCH events per POST, posted back to back.
    let mut batch_each = vec![];
    let started = Instant::now();
    let mut sent_at = vec![];
    for _ in 0..events.div_ceil(BATCH as u64) {
        let marks: Vec<u64> = (mark..mark + BATCH as u64).collect();
        mark += BATCH as u64;
        let (sent, _) = post(&mut runner, &http, &base, &marks).await?;
        sent_at.extend(marks.into_iter().map(|m| (m, sent)));
    }
    for (m, sent) in &sent_at {
        let at = all_arrived(&arrivals, *m, subscribers, Duration::from_secs(30)).await?;
        batch_each.extend(at.iter().map(|a| a.saturating_duration_since(*sent)));
    }
    let batch_secs = started.elapsed().as_secs_f64();
    DONE.store(true, std::sync::atomic::Ordering::Relaxed);

    let title = format!(
        "task_update fan-out to {subscribers} subscribers of one tasks channel: a runner's POST of the task's progress -> each socket (wrangler dev; {subscribers} sockets opened in {:.0} ms)",
        open_time.as_secs_f64() * 1000.0
    );
    print_table(
        &title,
        &[
            row("POST -> arrival, each subscriber", each, format!("{events} events one at a time")),
            row("POST -> last of the subscribers", last, "the whole fan-out of one event".into()),
            row("POST answered (room stored it)", calls, format!("{} batches refused, retried", runner.refused)),
            row(
                "batches: POST -> arrival, each",
                batch_each,
                format!("{} events in POSTs of {BATCH}, {:.0} deliveries/s", sent_at.len(), (sent_at.len() * subscribers) as f64 / batch_secs),
            ),
        ],
    );
    Ok(())
}
