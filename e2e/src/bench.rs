//! Shared pieces of the benchmark commands: an edge to measure, a user token, percentiles and
//! the printed table.

use std::time::Duration;

use serde_json::{json, Value};

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

