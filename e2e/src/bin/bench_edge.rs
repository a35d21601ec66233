//! Benchmarks of the control plane on loopback (issue 2's targets), printed as a table:
//! - `GET /jobs/:id` latency at 32 concurrent clients;
//! - where a short request's time goes: the same load on requests that do less and less (no
//!   credential and no I/O, a credential check alone, a JWT with a one-row D1 read);
//! - fan-out latency from one event appended (a chat message) to its arrival at each of 100
//!   WebSocket subscribers of the same job.
//!
//! `cargo run --release -p kiln-e2e --bin bench_edge` starts its own edges (the `wrangler dev`
//! command, then wrangler's dev server without the DevTools inspector); set
//! `KILN_BENCH_URL=http://127.0.0.1:8787` to measure an edge that is already running.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kiln_e2e::bench::{percentile, print_table, Row};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const GET_CLIENTS: usize = 32;
const GET_REQUESTS: usize = 4000;
const SUBSCRIBERS: usize = 100;
const FANOUT_EVENTS: usize = 50;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut rows = vec![];
    for (label, edge, base) in kiln_e2e::bench::edges_for_bench(&[]).await? {
        rows.extend(measure(&label, &base).await?);
        drop(edge);
    }
    print_table("Kiln edge on a local workerd (loopback, 2 cores)", &rows);
    Ok(())
}

/// GET at 1 and 32 clients, fan-out to 100 sockets.
async fn measure(label: &str, base: &str) -> anyhow::Result<Vec<Row>> {
    let http = reqwest::Client::new();
    let email = format!("bench-{}@example.com", uuid::Uuid::new_v4());
    let token = kiln_e2e::bench::user_token(&http, base, &email).await?;
    let job: Value = http
        .post(format!("{base}/jobs"))
        .bearer_auth(&token)
        .json(&json!({"prompt": "benchmark", "githubOrg": "kiln", "githubRepo": "bench", "branchName": "bench/one"}))
        .send()
        .await?
        .json()
        .await?;
    let job_id = job["id"].as_str().ok_or_else(|| anyhow::anyhow!("no job id: {job}"))?.to_string();

    // --- GET /jobs/:id at 32 concurrent clients ---
    let url = format!("{base}/jobs/{job_id}");
    let mut single = vec![];
    for i in 0..550 {
        let t = std::time::Instant::now();
        http.get(&url).bearer_auth(&token).send().await?.error_for_status()?.bytes().await?;
        if i >= 50 {
            single.push(t.elapsed());
        }
    }
    single.sort();
    let started = Instant::now();
    let mut tasks = vec![];
    for _ in 0..GET_CLIENTS {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(GET_REQUESTS / GET_CLIENTS);
            for _ in 0..GET_REQUESTS / GET_CLIENTS {
                let t = Instant::now();
                let resp = http.get(&url).bearer_auth(&token).send().await?;
                anyhow::ensure!(resp.status() == 200, "GET answered {}", resp.status());
                resp.bytes().await?;
                samples.push(t.elapsed());
            }
            anyhow::Ok(samples)
        }));
    }
    let mut get_samples = vec![];
    for t in tasks {
        get_samples.extend(t.await??);
    }
    let get_elapsed = started.elapsed();

    // --- fan-out to 100 subscribers ---
    let ws_base = base.replacen("http", "ws", 1);
    let mut subscribers = vec![];
    for _ in 0..SUBSCRIBERS {
        let (ws, _) = tokio_tungstenite::connect_async(format!("{ws_base}/ws/jobs/{job_id}/?token={token}")).await?;
        subscribers.push(ws);
    }
    // Drain each subscriber's replay.
    let mut last_seq = 0;
    for ws in subscribers.iter_mut() {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await?.ok_or_else(|| anyhow::anyhow!("closed"))??;
        let v: Value = serde_json::from_str(msg.to_text()?)?;
        last_seq = last_seq.max(v["seq"].as_u64().unwrap_or(0));
    }
    let (mut sender, _) = tokio_tungstenite::connect_async(format!("{ws_base}/ws/jobs/{job_id}/?token={token}&after={last_seq}")).await?;
    let mut readers = vec![];
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    for mut ws in subscribers {
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(text) = msg {
                    let v: Value = serde_json::from_str(&text).unwrap_or_default();
                    if let Some(content) = v["content"].as_str() {
                        let _ = tx.send((content.to_string(), Instant::now()));
                    }
                }
            }
        }));
    }
    drop(tx);
    let mut fan_samples = vec![];
    let fan_started = Instant::now();
    for i in 0..FANOUT_EVENTS {
        let content = format!("fan-out {i}");
        let sent = Instant::now();
        sender.send(Message::Text(json!({"kind": "chat", "content": content}).to_string().into())).await?;
        let mut got = 0;
        while got < SUBSCRIBERS {
            let (c, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("subscribers closed"))?;
            if c == content {
                fan_samples.push(at - sent);
                got += 1;
            }
        }
    }
    let fan_elapsed = fan_started.elapsed();
    for r in readers {
        r.abort();
    }

    get_samples.sort();
    fan_samples.sort();
    // --- where the time goes: the same load on requests that do less ---
    let service = kiln_e2e::agent_api_secret();
    let me = format!("{base}/api/auth/me/");
    let mut breakdown = vec![];
    for (what, method, url, token) in [
        ("OPTIONS /jobs: no credential, no I/O", reqwest::Method::OPTIONS, format!("{base}/jobs"), None),
        ("GET /api/auth/me/, service credential: no I/O", reqwest::Method::GET, me.clone(), Some(service.as_str())),
        ("GET /api/auth/me/, user JWT: one D1 read", reqwest::Method::GET, me.clone(), Some(token.as_str())),
        ("GET /jobs/:id, user JWT", reqwest::Method::GET, url.clone(), Some(token.as_str())),
    ] {
        let (mut samples, elapsed) = load(&http, method, &url, token, GET_CLIENTS, GET_REQUESTS).await?;
        samples.sort();
        breakdown.push(Row {
            name: format!("{label}: {what}, {GET_CLIENTS} clients"),
            samples: samples.len(),
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
            extra: format!("{:.0} req/s", samples.len() as f64 / elapsed.as_secs_f64()),
        });
    }
    let mut rows = vec![
        Row {
            name: format!("{label}: GET /jobs/:id, 1 client"),
            samples: single.len(),
            p50: percentile(&single, 50.0),
            p99: percentile(&single, 99.0),
            extra: "sequential: the cost of one request".into(),
        },
        Row {
            name: format!("{label}: GET /jobs/:id, {GET_CLIENTS} clients"),
            samples: get_samples.len(),
            p50: percentile(&get_samples, 50.0),
            p99: percentile(&get_samples, 99.0),
            extra: format!("{:.0} req/s (target p50 ≤ 10 ms)", GET_REQUESTS as f64 / get_elapsed.as_secs_f64()),
        },
        Row {
            name: format!("{label}: fan-out to {SUBSCRIBERS} sockets"),
            samples: fan_samples.len(),
            p50: percentile(&fan_samples, 50.0),
            p99: percentile(&fan_samples, 99.0),
            extra: format!("{FANOUT_EVENTS} events in {:.2} s (target p99 ≤ 50 ms)", fan_elapsed.as_secs_f64()),
        },
    ];
    rows.extend(breakdown);
    Ok(rows)
}

/// `total` requests from `clients` concurrent clients (after one untimed request each): every
/// latency, and the wall time of the timed part.
async fn load(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    clients: usize,
    total: usize,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let request = |http: &reqwest::Client| {
        let req = http.request(method.clone(), url);
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    };
    for _ in 0..clients {
        request(http).send().await?.error_for_status()?;
    }
    let started = Instant::now();
    let mut tasks = vec![];
    for _ in 0..clients {
        let reqs: Vec<_> = (0..total / clients).map(|_| request(http)).collect();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(reqs.len());
            for req in reqs {
                let t = Instant::now();
                let resp = req.send().await?;
                anyhow::ensure!(resp.status().is_success(), "answered {}", resp.status());
                resp.bytes().await?;
                samples.push(t.elapsed());
            }
            anyhow::Ok(samples)
        }));
    }
    let mut samples = vec![];
    for t in tasks {
        samples.extend(t.await??);
    }
    Ok((samples, started.elapsed()))
}
