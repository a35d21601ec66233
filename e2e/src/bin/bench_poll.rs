//! Benchmark of seed 001's polling (`GET /v1/jobs/{id}`, issue 9): a landing job with 500 node
//! events (posted through the runner protocol by a hand-written runner), then 32 concurrent
//! pollers for a fixed time, closed loop (each polls again as soon as its answer is read): p50/p99
//! latency and requests/s, and freshness (a new node event appended → the first poller that sees
//! it), first with full polls (every event each time), then with `?after=<next_after>` (only new
//! events); then full polls paced as seed 001 recommends (every 1.5 s per poller, spread); then
//! the same events pushed to 32 SSE streams (`/stream`), each event's delay to each stream. Meanwhile the runner appends one event every 200 ms; freshness is measured from the
//! start of its POST (an upper bound: the room stores the event before the POST is answered).
//!
//! `cargo run --release -p kiln-e2e --bin bench_poll` starts its own edges (the `wrangler dev`
//! command, then wrangler's dev server without the DevTools inspector); `KILN_BENCH_URL` measures
//! an edge already running (its runner registration token must be the development one);
//! `BENCH_POLL_SECS` sets each phase's length (default 15).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_e2e::bench::{percentile, print_table, HandRunner, Row};
use serde_json::{json, Value};

const POLLERS: usize = 32;
const EVENTS: usize = 500;
const APPEND_EVERY: Duration = Duration::from_millis(200);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("BENCH_POLL_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    let mut rows = vec![];
    for (label, edge, base) in kiln_e2e::bench::edges_for_bench(&[]).await? {
        rows.extend(measure(&label, &base, Duration::from_secs(secs)).await?);
        drop(edge);
    }
    print_table(&format!("GET /v1/jobs/{{id}}: {EVENTS} node events, {POLLERS} pollers, {secs} s per phase (loopback, 2 cores)"), &rows);
    Ok(())
}

/// A node event like the graph's (a tool event's data names files, never their contents).
fn node_event(i: usize) -> Value {
    let nodes = ["router", "design_planner", "designer", "coder", "coder_tools", "build_check", "deployment_fixer"];
    let node = nodes[i % nodes.len()];
    let (event_type, data) = if node == "coder_tools" {
        ("tool", json!({"files": ["index.html", "styles.css", "script.js"]}))
    } else {
        ("node_completed", json!({"usage": {"input_tokens": 1200, "output_tokens": 340, "cost_usd": 0.0042, "model": "claude-sonnet"}}))
    };
    json!({"type": "node", "node": node, "event_type": event_type, "message": format!("{node} step {i} done"), "data": data})
}

/// One phase: pollers for `length` while the runner appends `fresh-<k>` events.
struct Phase {
    latencies: Vec<Duration>,
    requests: usize,
    elapsed: Duration,
    freshness: Vec<Duration>,
    appended: usize,
    bytes: u64,
    errors: usize,
}

#[allow(clippy::too_many_arguments)]
async fn phase(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    runner: &mut HandRunner,
    incremental: bool,
    pace: Option<Duration>,
    tag: &str,
    length: Duration,
) -> anyhow::Result<Phase> {
    let url = format!("{base}/v1/jobs/{}", runner.job_id);
    // k → when its POST started; k → when a poller first saw it.
    let posted: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let prefix = format!("fresh-{tag}-");
    let start_after = {
        let job: Value = http.get(&url).bearer_auth(token).send().await?.error_for_status()?.json().await?;
        job["job"]["events"].as_array().map_or(0, Vec::len) as u64
    };
    let started = Instant::now();
    let stop = started + length;
    let mut tasks = vec![];
    for n in 0..POLLERS {
        let (http, url, token, seen, prefix) = (http.clone(), url.clone(), token.to_string(), seen.clone(), prefix.clone());
        let pace = pace;
        tasks.push(tokio::spawn(async move {
            // Paced pollers start spread over one interval, as many users' would.
            if let Some(p) = pace {
                tokio::time::sleep(p * n as u32 / POLLERS as u32).await;
            }
            let mut samples = vec![];
            let mut bytes = 0u64;
            let mut errors = 0usize;
            let mut after = start_after;
            while Instant::now() < stop {
                let began = Instant::now();
                let target = if incremental { format!("{url}?after={after}") } else { url.clone() };
                let t = Instant::now();
                // A failed poll is counted and the poller goes on (the table says how many).
                let body = match http.get(&target).bearer_auth(&token).send().await {
                    Ok(resp) if resp.status() == 200 => match resp.bytes().await {
                        Ok(b) => b,
                        Err(_) => {
                            errors += 1;
                            continue;
                        }
                    },
                    _ => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let at = Instant::now();
                samples.push(at - t);
                bytes += body.len() as u64;
                let v: Value = serde_json::from_slice(&body)?;
                if incremental {
                    after = v["job"]["next_after"].as_u64().unwrap_or(after);
                }
                // The newest fresh event in the answer (they are appended in order).
                let newest = v["job"]["events"].as_array().and_then(|evs| {
                    evs.iter().rev().find_map(|e| e["message"].as_str().and_then(|m| m.strip_prefix(prefix.as_str())).and_then(|k| k.parse::<u64>().ok()))
                });
                if let Some(k) = newest {
                    let mut seen = seen.lock().unwrap();
                    for j in 0..=k {
                        seen.entry(j).or_insert(at);
                    }
                }
                if let Some(p) = pace {
                    tokio::time::sleep((began + p).saturating_duration_since(Instant::now())).await;
                }
            }
            anyhow::Ok((samples, bytes, errors))
        }));
    }
    // The runner appends while they poll.
    let mut k = 0u64;
    while Instant::now() + APPEND_EVERY < stop {
        tokio::time::sleep(APPEND_EVERY).await;
        posted.lock().unwrap().insert(k, Instant::now());
        let ev = json!({"type": "node", "node": "coder", "event_type": "node", "message": format!("{prefix}{k}"), "data": {}});
        runner.post(http, base, vec![ev]).await?;
        k += 1;
    }
    let mut latencies = vec![];
    let mut bytes = 0;
    let mut errors = 0;
    for t in tasks {
        let (s, b, e) = t.await??;
        latencies.extend(s);
        bytes += b;
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let posted = posted.lock().unwrap();
    let seen = seen.lock().unwrap();
    let mut freshness: Vec<Duration> = posted.iter().filter_map(|(k, p)| seen.get(k).map(|s| s.saturating_duration_since(*p))).collect();
    freshness.sort();
    Ok(Phase { requests: latencies.len(), latencies, elapsed, freshness, appended: posted.len(), bytes, errors })
}

/// The same events pushed: `POLLERS` streams (`GET /v1/jobs/{id}/stream` from the current end)
/// while the runner appends; each event's delay to each stream.
async fn sse_phase(http: &reqwest::Client, base: &str, token: &str, runner: &mut HandRunner, length: Duration) -> anyhow::Result<(Vec<Duration>, usize)> {
    let url = format!("{base}/v1/jobs/{}", runner.job_id);
    let job: Value = http.get(&url).bearer_auth(token).send().await?.error_for_status()?.json().await?;
    let count = job["job"]["events"].as_array().map_or(0, Vec::len);
    let prefix = "fresh-s-".to_string();
    let stop = Instant::now() + length;
    let mut tasks = vec![];
    for _ in 0..POLLERS {
        let resp = http
            .get(format!("{url}/stream"))
            .bearer_auth(token)
            .header("last-event-id", (count - 1).to_string())
            .send()
            .await?
            .error_for_status()?;
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            let mut resp = resp;
            let mut buf = String::new();
            let mut arrivals: HashMap<u64, Instant> = HashMap::new();
            let end = stop + Duration::from_secs(5);
            while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(end.into(), resp.chunk()).await {
                let at = Instant::now();
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(i) = buf.find("\n\n") {
                    let frame: String = buf.drain(..i + 2).collect();
                    if let Some(k) = frame.split(prefix.as_str()).nth(1).and_then(|r| r.split('"').next()).and_then(|k| k.parse::<u64>().ok()) {
                        arrivals.entry(k).or_insert(at);
                    }
                }
                if Instant::now() > stop + Duration::from_secs(2) {
                    break;
                }
            }
            arrivals
        }));
    }
    let mut posted = HashMap::new();
    let mut k = 0u64;
    while Instant::now() + APPEND_EVERY < stop {
        tokio::time::sleep(APPEND_EVERY).await;
        posted.insert(k, Instant::now());
        let ev = json!({"type": "node", "node": "coder", "event_type": "node", "message": format!("{prefix}{k}"), "data": {}});
        runner.post(http, base, vec![ev]).await?;
        k += 1;
    }
    let mut delays = vec![];
    for t in tasks {
        for (k, at) in t.await? {
            if let Some(p) = posted.get(&k) {
                delays.push(at.saturating_duration_since(*p));
            }
        }
    }
    delays.sort();
    Ok((delays, posted.len() * POLLERS))
}

async fn measure(label: &str, base: &str, length: Duration) -> anyhow::Result<Vec<Row>> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let email = format!("bench-poll-{}@example.com", uuid::Uuid::new_v4());
    let token = kiln_e2e::bench::user_token(&http, base, &email).await?;
    let init: Value = http
        .post(format!("{base}/v1/agent/init"))
        .bearer_auth(&token)
        .header("x-session-id", format!("bench-{}", uuid::Uuid::new_v4().simple()))
        .json(&json!({"payload": {"campaign": {"productName": "Bench"}}}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let job_id = init["job_id"].as_str().ok_or_else(|| anyhow::anyhow!("init answered {init}"))?.to_string();
    let ws_base = base.replacen("http", "ws", 1);
    let mut runner = HandRunner::hold(&http, base, &ws_base, &job_id, "bench-poll").await?;
    runner.post(&http, base, vec![json!({"type": "started", "message": "started"})]).await?;
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(100) {
        runner.post(&http, base, chunk.iter().map(|i| node_event(*i)).collect()).await?;
    }
    let job: Value = http.get(format!("{base}/v1/jobs/{job_id}")).bearer_auth(&token).send().await?.json().await?;
    let n = job["job"]["events"].as_array().map_or(0, Vec::len);
    anyhow::ensure!(n == EVENTS, "the job holds {n} events, not {EVENTS}");

    eprintln!("{label}: {EVENTS} events stored");
    let mut rows = vec![];
    // One poller alone: the cost of an answer without queueing behind the others.
    for (query, name) in [("", "full"), ("?after=500", "?after (no new)")] {
        let url = format!("{base}/v1/jobs/{job_id}{query}");
        let mut samples = vec![];
        for i in 0..120 {
            let t = Instant::now();
            http.get(&url).bearer_auth(&token).send().await?.error_for_status()?.bytes().await?;
            if i >= 20 {
                samples.push(t.elapsed());
            }
        }
        samples.sort();
        rows.push(Row {
            name: format!("{label}: GET {name}, 1 poller"),
            samples: samples.len(),
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
            extra: "sequential".into(),
        });
    }
    let paced = Duration::from_millis(1500);
    for (incremental, pace, name, tag) in [
        (false, None, "full", "f"),
        (true, None, "?after=next_after", "a"),
        (false, Some(paced), "full, every 1.5 s", "p"),
    ] {
        eprintln!("{label}: phase {name}");
        let refused_before = runner.refused;
        let p = phase(&http, base, &token, &mut runner, incremental, pace, tag, length).await?;
        let refused = runner.refused - refused_before;
        let rps = p.requests as f64 / p.elapsed.as_secs_f64();
        rows.push(Row {
            name: format!("{label}: GET {name}"),
            samples: p.requests,
            p50: percentile(&p.latencies, 50.0),
            p99: percentile(&p.latencies, 99.0),
            extra: format!(
                "{rps:.0} req/s, {:.1} KB/answer, {} failed",
                p.bytes as f64 / p.requests.max(1) as f64 / 1024.0,
                p.errors
            ),
        });
        rows.push(Row {
            name: format!("{label}: freshness, {name}"),
            samples: p.freshness.len(),
            p50: percentile(&p.freshness, 50.0),
            p99: percentile(&p.freshness, 99.0),
            extra: format!(
                "{} appended ({refused} batches refused, retried), {} seen; POST start -> first poller",
                p.appended,
                p.freshness.len()
            ),
        });
    }
    eprintln!("{label}: SSE phase");
    let (delays, expected) = sse_phase(&http, base, &token, &mut runner, length).await?;
    rows.push(Row {
        name: format!("{label}: SSE, {POLLERS} streams"),
        samples: delays.len(),
        p50: percentile(&delays, 50.0),
        p99: percentile(&delays, 99.0),
        extra: format!("{} of {expected} deliveries; POST start -> each stream", delays.len()),
    });
    Ok(rows)
}
