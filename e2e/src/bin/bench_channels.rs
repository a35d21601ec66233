//! Dashboard channel benchmark (issue 10): fan-out of `task_update` to 200 subscribers of one
//! owner's tasks channel, p50/p99 from the event to its arrival, printed as a table.
//!
//! Each event is published as a job room publishes it (`channels::publish`: the Worker calls the
//! owner's Dashboard object, which stores it with its seq and sends it to every socket), through
//! the faults build's publish route. The time runs from the moment that request is sent to each
//! subscriber's socket reading the message; events go one at a time (the next after all 200 have
//! it), then as a burst of events sent 10 at once.
//!
//! `cargo run --release -p kiln-e2e --bin bench_channels`; `KILN_BENCH_URL` measures a running
//! edge built with the faults feature. `BENCH_SUBSCRIBERS`, `BENCH_EVENTS` change the counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_e2e::bench::{percentile, print_table, Row};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const BURST_PARALLELISM: usize = 10;

/// Set once measured: the edge stopping then resets every socket, which is no error.
static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Default)]
struct Arrivals {
    /// seq → when each subscriber read it.
    at: Mutex<HashMap<u64, Vec<Instant>>>,
    notify: Notify,
}

fn count_from_env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn subscriber(ws_url: String, token: String, arrivals: Arc<Arrivals>, ready: Arc<tokio::sync::Barrier>) -> anyhow::Result<()> {
    let mut req = ws_url.as_str().into_client_request()?;
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}"))?);
    let (mut stream, _) = tokio_tungstenite::connect_async(req).await?;
    ready.wait().await;
    while let Some(msg) = stream.next().await {
        let now = Instant::now();
        if let Message::Text(t) = msg? {
            let v: Value = serde_json::from_str(t.as_str())?;
            if v["type"] == "task_update" {
                if let Some(seq) = v["seq"].as_u64() {
                    arrivals.at.lock().unwrap().entry(seq).or_default().push(now);
                    arrivals.notify.notify_waiters();
                }
            }
        }
    }
    Ok(())
}

async fn publish(http: &reqwest::Client, base: &str, owner: &str, i: usize) -> anyhow::Result<(u64, Instant, Duration)> {
    let message = json!({"type": "task_update", "task_id": format!("bench-{i}"), "status": "running", "progress": 45.0,
        "data": {"agent_id": "commerce-001", "agent_type": "commerce"}});
    let sent = Instant::now();
    let out: Value = http
        .post(format!("{base}/__faults/dashboard/publish"))
        .bearer_auth(kiln_e2e::agent_api_secret())
        .json(&json!({"owner": owner, "channel": "tasks", "message": message}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let seq = out["seq"].as_u64().ok_or_else(|| anyhow::anyhow!("publish answered {out}"))?;
    Ok((seq, sent, sent.elapsed()))
}

/// Waits until `n` subscribers have `seq`.
async fn all_arrived(arrivals: &Arrivals, seq: u64, n: usize, timeout: Duration) -> anyhow::Result<Vec<Instant>> {
    let deadline = Instant::now() + timeout;
    loop {
        let notified = arrivals.notify.notified();
        if let Some(at) = arrivals.at.lock().unwrap().get(&seq).filter(|a| a.len() >= n) {
            return Ok(at.clone());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let got = arrivals.at.lock().unwrap().get(&seq).map_or(0, Vec::len);
            anyhow::bail!("seq {seq}: {got} of {n} subscribers had it after {timeout:?}");
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
    let events = count_from_env("BENCH_EVENTS", 100);
    let (_edge, base) = match std::env::var("KILN_BENCH_URL") {
        Ok(url) => (None, url.trim_end_matches('/').to_string()),
        Err(_) => {
            let edge = kiln_e2e::TestEdge::start_with_faults(&[]).await?;
            let url = edge.url();
            (Some(edge), url)
        }
    };
    let http = reqwest::Client::new();
    let email = kiln_e2e::unique_email("bench-channels");
    let creds = json!({"email": email, "password": "bench-Password-1"});
    let user: Value = http.post(format!("{base}/api/auth/register/")).json(&creds).send().await?.error_for_status()?.json().await?;
    let owner = user["id"].as_str().ok_or_else(|| anyhow::anyhow!("register answered {user}"))?.to_string();
    let pair: Value = http.post(format!("{base}/api/auth/login/")).json(&creds).send().await?.error_for_status()?.json().await?;
    let token = pair["access"].as_str().unwrap_or_default().to_string();

    let arrivals = Arc::new(Arrivals::default());
    let ready = Arc::new(tokio::sync::Barrier::new(subscribers + 1));
    let ws_url = format!("{}/api/ws/tasks", base.replacen("http", "ws", 1));
    let opened = Instant::now();
    for _ in 0..subscribers {
        let (url, token, arrivals, ready) = (ws_url.clone(), token.clone(), arrivals.clone(), ready.clone());
        tokio::spawn(async move {
            if let Err(e) = subscriber(url, token, arrivals, ready).await {
                if !DONE.load(std::sync::atomic::Ordering::Relaxed) {
                    eprintln!("subscriber: {e}");
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(60), ready.wait()).await?;
    let open_time = opened.elapsed();
    // Warm the Worker and the object.
    for i in 0..5 {
        let (seq, _, _) = publish(&http, &base, &owner, i).await?;
        all_arrived(&arrivals, seq, subscribers, Duration::from_secs(20)).await?;
    }

    // One at a time.
    let (mut each, mut last, mut calls) = (vec![], vec![], vec![]);
    for i in 0..events {
        let (seq, sent, call) = publish(&http, &base, &owner, i).await?;
        let at = all_arrived(&arrivals, seq, subscribers, Duration::from_secs(20)).await?;
        each.extend(at.iter().map(|a| a.saturating_duration_since(sent)));
        last.push(at.iter().max().unwrap().saturating_duration_since(sent));
        calls.push(call);
    }

    // A burst: events sent BURST_PARALLELISM at a time.
    let mut burst_each = vec![];
    let started = Instant::now();
    let mut sent_at = vec![];
    for chunk in (0..events).collect::<Vec<_>>().chunks(BURST_PARALLELISM) {
        let calls = chunk.iter().map(|i| publish(&http, &base, &owner, events + i));
        for r in futures::future::join_all(calls).await {
            let (seq, sent, _) = r?;
            sent_at.push((seq, sent));
        }
    }
    for (seq, sent) in &sent_at {
        let at = all_arrived(&arrivals, *seq, subscribers, Duration::from_secs(30)).await?;
        burst_each.extend(at.iter().map(|a| a.saturating_duration_since(*sent)));
    }
    let burst_secs = started.elapsed().as_secs_f64();
    DONE.store(true, std::sync::atomic::Ordering::Relaxed);

    let title = format!(
        "task_update fan-out to {subscribers} subscribers of one tasks channel (wrangler dev, faults build; {subscribers} sockets opened in {:.0} ms)",
        open_time.as_secs_f64() * 1000.0
    );
    print_table(
        &title,
        &[
            row("event → arrival, each subscriber", each, format!("{events} events one at a time")),
            row("event → last of the subscribers", last, "the whole fan-out of one event".into()),
            row("publish call (Worker → object → answer)", calls, "answered after the sends".into()),
            row(
                "burst: event → arrival, each",
                burst_each,
                format!("{events} events {BURST_PARALLELISM} at once, {:.0} deliveries/s", (events * subscribers) as f64 / burst_secs),
            ),
        ],
    );
    Ok(())
}
