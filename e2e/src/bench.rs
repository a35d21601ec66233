//! Shared pieces of the benchmark commands: an edge to measure, a user token, percentiles and
//! the printed table.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kiln_schemas::runner::{EdgeMessage, HeldJob, RunnerMessage};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The edges to measure: `KILN_BENCH_URL` if set, else a fresh edge on each server in turn, with
/// `vars`. Each comes with a label for the table.
pub async fn edges_for_bench(vars: &[(&str, &str)]) -> anyhow::Result<Vec<(String, Option<crate::TestEdge>, String)>> {
    if let Ok(url) = std::env::var("KILN_BENCH_URL") {
        return Ok(vec![("given edge".into(), None, url.trim_end_matches('/').to_string())]);
    }
    let mut out = vec![];
    for (label, server) in [
        ("wrangler dev", crate::EdgeServer::WranglerDev),
        ("workerd direct (scripts/dev)", crate::EdgeServer::Direct),
    ] {
        let edge = crate::TestEdge::start_with(server, vars).await?;
        let url = edge.url();
        out.push((label.to_string(), Some(edge), url));
    }
    Ok(out)
}

/// The repository the benchmarks' jobs name.
pub const BENCH_REPOSITORY: &str = "kiln/bench";

/// Registers `email`, grants it [`BENCH_REPOSITORY`] (as the development service credential), and
/// answers an access token.
pub async fn user_token(http: &reqwest::Client, base: &str, email: &str) -> anyhow::Result<String> {
    let creds = json!({"email": email, "password": "bench-Password-1"});
    http.post(format!("{base}/api/auth/register/")).json(&creds).send().await?.error_for_status()?;
    http.post(format!("{base}/grants"))
        .bearer_auth(crate::agent_api_secret())
        .json(&json!({"owner": email, "repository": BENCH_REPOSITORY}))
        .send()
        .await?
        .error_for_status()?;
    let pair: Value = http.post(format!("{base}/api/auth/login/")).json(&creds).send().await?.error_for_status()?.json().await?;
    pair["access"].as_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("login answered {pair}"))
}

/// The `p`th percentile of sorted samples (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub struct Row {
    pub name: String,
    pub samples: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub extra: String,
}

pub fn print_table(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!("| {:<36} | {:>7} | {:>9} | {:>9} | notes", "measurement", "samples", "p50 ms", "p99 ms");
    println!("|{:-<38}|{:->9}|{:->11}|{:->11}|{:-<40}", "", "", "", "", "");
    for r in rows {
        println!(
            "| {:<36} | {:>7} | {:>9.2} | {:>9.2} | {}",
            r.name,
            r.samples,
            r.p50.as_secs_f64() * 1000.0,
            r.p99.as_secs_f64() * 1000.0,
            r.extra
        );
    }
}

/// A hand-written runner that holds one job through the runner protocol (register, connect,
/// `hello`, the assignment, heartbeats from a task of its own) and posts its event batches.
pub struct HandRunner {
    pub token: String,
    pub job_id: String,
    pub lease_id: String,
    pub next_index: u64,
    /// Batches the edge refused (each tried again).
    pub refused: usize,
    _beats: tokio::task::JoinHandle<()>,
}

impl HandRunner {
    /// Registers, connects and waits for the job's assignment.
    pub async fn hold(http: &reqwest::Client, base: &str, ws_base: &str, job_id: &str, name: &str) -> anyhow::Result<HandRunner> {
        let reg: Value = http
            .post(format!("{base}/runner/v1/register"))
            .bearer_auth(crate::runner_registration_token())
            .json(&json!({"name": format!("{name}-{}", uuid::Uuid::new_v4().simple())}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let token = reg["token"].as_str().ok_or_else(|| anyhow::anyhow!("register answered {reg}"))?.to_string();
        let mut request = format!("{ws_base}/runner/v1/connect").into_client_request()?;
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
        let hello = RunnerMessage::Hello { name: name.into(), capacity: 1, running: vec![], version: "bench".into(), tools: None };
        ws.send(Message::Text(serde_json::to_string(&hello)?.into())).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let lease_id = loop {
            anyhow::ensure!(Instant::now() < deadline, "no assignment within 30 s");
            match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if let Ok(EdgeMessage::Assign { assignment }) = serde_json::from_str(t.as_str()) {
                        anyhow::ensure!(assignment.job_id == job_id, "assigned another job: {}", assignment.job_id);
                        break assignment.lease_id;
                    }
                }
                Ok(Some(Ok(_))) | Err(_) => {}
                Ok(other) => anyhow::bail!("the runner socket ended: {other:?}"),
            }
        };
        let held = vec![HeldJob { job_id: job_id.to_string(), lease_id: lease_id.clone() }];
        let beats = tokio::spawn(async move {
            loop {
                let beat = RunnerMessage::Heartbeat { running: held.clone() };
                if ws.send(Message::Text(serde_json::to_string(&beat).unwrap().into())).await.is_err() {
                    return;
                }
                // Read (and drop) what the edge says until the next beat is due.
                let until = tokio::time::Instant::now() + Duration::from_secs(2);
                while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until, ws.next()).await {}
            }
        });
        Ok(HandRunner { token, job_id: job_id.to_string(), lease_id, next_index: 0, refused: 0, _beats: beats })
    }

    /// Posts a batch, tried again (the same indices: the room stores it once) after a refusal,
    /// as a runner does; the refusals are counted.
    pub async fn post(&mut self, http: &reqwest::Client, base: &str, events: Vec<Value>) -> anyhow::Result<()> {
        let mut last = None;
        for attempt in 0..10u64 {
            match self.try_post(http, base, &events).await {
                Ok(()) => {
                    self.next_index += events.len() as u64;
                    return Ok(());
                }
                Err(e) => {
                    self.refused += 1;
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
    }

    async fn try_post(&self, http: &reqwest::Client, base: &str, events: &[Value]) -> anyhow::Result<()> {
        let events = events.to_vec();
        let first = self.next_index;
        let events: Vec<Value> = events
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                e["index"] = json!(first + i as u64);
                e
            })
            .collect();
        let ack: Value = http
            .post(format!("{base}/runner/v1/jobs/{}/events", self.job_id))
            .bearer_auth(&self.token)
            .json(&json!({"lease_id": self.lease_id, "events": events}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        anyhow::ensure!(ack["lease_valid"] == true, "batch refused: {ack}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&s[..1], 99.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}

