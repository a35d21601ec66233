//! What a login costs in workerd at several PBKDF2-HMAC-SHA256 iteration counts (ARCHITECTURE.md,
//! "Password hashing"), printed as a table per server:
//! - a refused login of a user whose stored hash carries N iterations (inserted into D1 directly:
//!   verification runs at the stored count, so one build measures every count), with N = 1,000 as
//!   the baseline of everything but the hash;
//! - a refused login of an unknown email (the dummy hash) and a successful login, at production's
//!   `PASSWORD_ITERATIONS` (600,000).
//!
//! `cargo run --release -p kiln-e2e --bin bench_password`. The native cost of the same hashes:
//! `cargo run --release -p kiln-edge --example hash_cost`.

use std::time::{Duration, Instant};

use kiln_e2e::bench::{percentile, print_table, Row};
use kiln_e2e::{unique_email, EdgeServer, TestEdge, PASSWORD};
use serde_json::json;

const COUNTS: [u32; 6] = [1_000, 100_000, 210_000, 310_000, 600_000, 1_000_000];
const SAMPLES: usize = 15;

async fn time_logins(http: &reqwest::Client, base: &str, email: &str, password: &str, want: u16) -> anyhow::Result<Vec<Duration>> {
    let mut samples = vec![];
    for i in 0..SAMPLES + 2 {
        let start = Instant::now();
        let resp = http.post(format!("{base}/api/auth/login/")).json(&json!({"email": email, "password": password})).send().await?;
        let status = resp.status().as_u16();
        resp.bytes().await?;
        let took = start.elapsed();
        anyhow::ensure!(status == want, "login of {email} answered {status}, expected {want}");
        if i >= 2 {
            samples.push(took); // the first two warm the isolate
        }
    }
    samples.sort();
    Ok(samples)
}

fn tail_of(log: &str, max: usize) -> &str {
    let start = log.len().saturating_sub(max);
    let start = (start..log.len()).find(|i| log.is_char_boundary(*i)).unwrap_or(log.len());
    &log[start..]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    for (label, server) in [("wrangler dev", EdgeServer::WranglerDev), ("workerd direct (scripts/dev)", EdgeServer::Direct)] {
        // No rate limit (every sample is a refused login) and production's count for new hashes.
        let vars = [("AUTH_FAILURES_PER_EMAIL", "0"), ("AUTH_FAILURES_PER_ADDRESS", "0"), ("PASSWORD_ITERATIONS", "600000")];
        let mut edge = TestEdge::start_with(server, &vars).await?;
        let base = edge.url();
        let registered = unique_email("bench-ok");
        let resp = http.post(format!("{base}/api/auth/register/")).json(&json!({"email": registered, "password": PASSWORD})).send().await?;
        anyhow::ensure!(resp.status().is_success(), "register answered {}", resp.status());
        edge.stop();
        // Well-formed hashes no password matches: each costs exactly its n iterations.
        let rows: Vec<String> = COUNTS
            .iter()
            .map(|n| {
                format!(
                    "('bench-{n}', 'bench-{n}@example.com', \
                     'pbkdf2-sha256${n}$WlpaWlpaWlpaWlpaWlpaWg$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', '2026-01-01T00:00:00Z')"
                )
            })
            .collect();
        edge.d1(&format!("INSERT INTO users (id, email, password_hash, created_at) VALUES {}", rows.join(", ")))?;
        edge.restart().await?;
        let mut rows = vec![];
        let mut baseline = Duration::ZERO;
        for n in COUNTS {
            let s = match time_logins(&http, &base, &format!("bench-{n}@example.com"), "Wrong-Horse-1", 401).await {
                Ok(s) => s,
                Err(e) => anyhow::bail!("{e}; the edge's log ends:\n{}", tail_of(&edge.log(), 3000)),
            };
            let p50 = percentile(&s, 50.0);
            if n == COUNTS[0] {
                baseline = p50;
            }
            let extra = if n == COUNTS[0] {
                "baseline: everything but the hash".to_string()
            } else {
                format!("hash ≈ {:.0} ms (p50 − baseline)", (p50.saturating_sub(baseline)).as_secs_f64() * 1000.0)
            };
            rows.push(Row { name: format!("refused login, {n} iterations"), samples: s.len(), p50, p99: percentile(&s, 99.0), extra });
        }
        let s = time_logins(&http, &base, &unique_email("nobody"), "Wrong-Horse-1", 401).await?;
        rows.push(Row { name: "refused login, unknown email".into(), samples: s.len(), p50: percentile(&s, 50.0), p99: percentile(&s, 99.0), extra: "the dummy hash".into() });
        let s = time_logins(&http, &base, &registered, PASSWORD, 200).await?;
        rows.push(Row { name: "successful login".into(), samples: s.len(), p50: percentile(&s, 50.0), p99: percentile(&s, 99.0), extra: "hash + token writes".into() });
        print_table(&format!("Login wall time, {label}"), &rows);
    }
    Ok(())
}
