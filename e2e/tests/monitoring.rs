//! Seed 002's monitoring and REST hygiene (issue 10 items 5 and 7) against a real `wrangler dev`
//! and a real runner: request metrics from real requests (counts rise, percentiles present), bad
//! parameters 400, `/health`'s services, a runner's CPU and memory from its heartbeats, and the
//! per-principal rate limit (429 with `Retry-After`; sockets, `/health`, other principals and the
//! service credential not limited).

use std::time::Duration;

use kiln_e2e::{eventually, Method, StatusCode, TestEdge, TestRunner, WsClient};
use serde_json::Value;
use tokio::sync::OnceCell;

/// Low enough for a test to reach in a second, high enough for the other tests' users.
const LIMIT: u32 = 40;

static EDGE: OnceCell<TestEdge> = OnceCell::const_new();

async fn edge() -> &'static TestEdge {
    EDGE.get_or_init(|| async {
        TestEdge::start(&[("RATE_LIMIT_PER_MINUTE", "40"), ("HEARTBEAT_SECS", "1")]).await.expect("starting wrangler dev")
    })
    .await
}

async fn metrics(edge: &TestEdge, token: &str, query: &str) -> Value {
    let (status, body) = edge.api().get(&format!("/api/v1/monitoring/metrics{query}"), token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn request_metrics_rise_with_real_requests_and_have_percentiles() {
    let edge = edge().await;
    let api = edge.api();
    let token = api.new_user("metrics").await;
    let before = metrics(edge, &token, "?metrics=performance&time_range=1h").await;
    let count = |v: &Value, class: &str| v["performance"]["by_endpoint"][class]["requests"].as_u64().unwrap_or(0);
    let before_jobs = count(&before, "GET /jobs");
    let before_404 = count(&before, "GET /jobs/:id");
    for _ in 0..10 {
        assert_eq!(api.get("/jobs", &token).await.0, StatusCode::OK);
    }
    for _ in 0..3 {
        let (status, _) = api.get("/jobs/3f2a9c1e-0000-4000-8000-000000000000", &token).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let after = metrics(edge, &token, "?metrics=performance&time_range=1h").await;
    let perf = &after["performance"];
    assert!(count(&after, "GET /jobs") >= before_jobs + 10, "{perf}");
    assert!(count(&after, "GET /jobs/:id") >= before_404 + 3, "{perf}");
    assert!(perf["requests"].as_u64().unwrap() >= before["performance"]["requests"].as_u64().unwrap() + 14, "{perf}");
    assert!(perf["by_endpoint"]["GET /jobs/:id"]["client_error_rate"].as_f64().unwrap() > 0.0, "{perf}");
    for p in ["p50", "p95", "p99"] {
        let ms = perf["latency_ms"][p].as_f64().unwrap_or_else(|| panic!("{p} missing: {perf}"));
        assert!((0.0..=30_000.0).contains(&ms), "{p}: {ms}");
    }
    assert!(perf["latency_ms"]["p50"].as_f64() <= perf["latency_ms"]["p99"].as_f64());
    assert!(perf["requests_per_second"].as_f64().unwrap() > 0.0);
    assert!(perf["error_rate"].is_number() && perf["avg_latency_ms"].is_number(), "{perf}");
    assert!(!perf["series"].as_array().unwrap().is_empty(), "{perf}");
    // Longer ranges read the hour buckets: they hold the same requests.
    for range in ["24h", "7d", "30d"] {
        let v = metrics(edge, &token, &format!("?metrics=performance&time_range={range}")).await;
        assert!(count(&v, "GET /jobs") >= before_jobs + 10, "{range}: {v}");
        assert_eq!(v["time_range"], range);
    }
    // Every section by default; ml and business from this user's rows (none yet).
    let all = metrics(edge, &token, "").await;
    for section in ["health", "performance", "ml", "business"] {
        assert!(all[section].is_object(), "{section}: {all}");
    }
    assert_eq!(all["business"]["jobs"], 0, "{all}");
    assert_eq!(all["ml"]["total_tokens"], 0, "{all}");
}

#[tokio::test]
async fn bad_parameters_and_no_token_are_refused() {
    let edge = edge().await;
    let api = edge.api();
    let token = api.new_user("metrics-bad").await;
    for (query, needle) in [
        ("?metrics=health,cpu", "unknown metrics \"cpu\""),
        ("?time_range=2h", "unknown time_range"),
        ("?range=1h", "unknown parameter"),
    ] {
        let (status, body) = api.get(&format!("/api/v1/monitoring/metrics{query}"), &token).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(body["error"].as_str().unwrap().contains(needle), "{body}");
        assert_eq!(body["detail"], body["error"], "the /api/ face carries detail");
    }
    let (status, body) = api.send(Method::GET, "/api/v1/monitoring/metrics", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

#[tokio::test]
async fn health_has_services_and_a_runner_reports_its_load() {
    let edge = edge().await;
    let api = edge.api();
    let (status, health) = api.send(Method::GET, "/health", None, None).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    let services = &health["services"];
    assert_eq!(services["edge"]["status"], "ok", "{health}");
    assert_eq!(services["database"]["status"], "ok", "{health}");
    assert!(services["database"]["latency_ms"].is_number(), "{health}");
    assert_eq!(services["queue"]["status"], "ok", "{health}");
    assert!(services["runners"]["status"] == "down" || services["runners"]["connected"].as_u64() > Some(0), "{health}");

    let state = tempfile::tempdir().unwrap();
    let mut runner = TestRunner::start(
        edge,
        &[
            ("RUNNER_STATE_DIR", state.path().to_str().unwrap()),
            ("RUNNER_EXECUTOR", "process"),
            ("RUNNER_AGENT", "text"),
            ("RUNNER_AGENT_CMD", "true"),
        ],
    )
    .await
    .expect("starting a runner");
    // Polled with the service credential (not rate limited).
    let token = kiln_e2e::agent_api_secret();
    let health_section = eventually(Duration::from_secs(20), "the runner's load in health", || {
        let token = token.clone();
        async move {
            let v = metrics(edge, &token, "?metrics=health").await;
            let h = v["health"].clone();
            let listed = h["runners"]["list"].as_array().cloned().unwrap_or_default();
            listed.iter().any(|r| r["cpu_percent"].is_number() && r["memory_percent"].as_f64() > Some(0.0)).then_some(h)
        }
    })
    .await;
    let r = &health_section["runners"];
    assert_eq!(r["status"], "ok", "{health_section}");
    let cpu = r["cpu_percent"].as_f64().expect("the runners' mean cpu");
    let mem = r["memory_percent"].as_f64().expect("the runners' mean memory");
    assert!((0.0..=100.0).contains(&cpu) && mem > 0.0 && mem <= 100.0, "{r}");
    let (_, health) = api.send(Method::GET, "/health", None, None).await;
    assert_eq!(health["services"]["runners"]["status"], "ok", "{health}");
    runner.stop();
}

#[tokio::test]
async fn a_principal_past_its_limit_gets_429_with_retry_after_and_sockets_and_health_are_not_limited() {
    let edge = edge().await;
    let api = edge.api();
    let ann = api.new_user("limit-ann").await;
    let bob = api.new_user("limit-bob").await;
    // A window may roll over during the loop: a 429 comes within two windows' worth.
    let mut ok = 0;
    let (headers, body) = loop {
        let (status, headers, body) = api.send_with(Method::GET, "/jobs", &[("Authorization", &format!("Bearer {ann}"))], None).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            break (headers, body);
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        ok += 1;
        assert!(ok <= 2 * LIMIT, "no 429 after {ok} requests");
    };
    assert!(ok >= LIMIT, "refused after {ok} of {LIMIT}");
    let retry: u64 = headers.get("retry-after").expect("Retry-After").to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(body["error"].as_str().unwrap().contains("rate limit"), "{body}");
    // Writes are refused too, before they run (unless the window ended meanwhile).
    if retry >= 2 {
        let (status, body) = api.post("/clients", &ann, serde_json::json!({"name": "x"})).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    }
    // Another principal, /health, the service credential and sockets are not limited.
    assert_eq!(api.get("/jobs", &bob).await.0, StatusCode::OK);
    for _ in 0..(LIMIT + 5) {
        assert_eq!(api.send(Method::GET, "/health", None, None).await.0, StatusCode::OK);
    }
    let service = kiln_e2e::agent_api_secret();
    for _ in 0..(LIMIT + 5) {
        assert_eq!(api.get("/queue", &service).await.0, StatusCode::OK);
    }
    let mut socket = WsClient::connect_path(&edge.ws_url(), "/api/ws/tasks", Some(&format!("Bearer {ann}")))
        .await
        .expect("a limited principal's socket opens");
    socket.send_json(&serde_json::json!({"type": "ping"})).await;
    let pong = socket.next_json(Duration::from_secs(5)).await.expect("an answer");
    assert_eq!(pong["type"], "pong", "{pong}");
    // Still limited over REST meanwhile (unless the window just ended).
    let (status, _) = api.get("/jobs", &ann).await;
    assert!(status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::OK);
}
