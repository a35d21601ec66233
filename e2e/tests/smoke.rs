//! Smoke test: the Worker starts on a local workerd and `GET /health` answers seed 003's shape.

use kiln_e2e::{StatusCode, TestEdge};

#[tokio::test]
async fn health_answers_with_queue_counts() {
    let edge = TestEdge::start(&[]).await.expect("starting wrangler dev");
    let (status, body) = edge.api().send(kiln_e2e::Method::GET, "/health", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["queue"]["running"], 0, "{body}");
    assert_eq!(body["queue"]["queued"], 0, "{body}");
    assert_eq!(body["queue"]["maxConcurrent"], 2, "wrangler.toml's MAX_CONCURRENT_JOBS: {body}");
}

#[tokio::test]
async fn vars_override_wrangler_toml() {
    let edge = TestEdge::start(&[("MAX_CONCURRENT_JOBS", "5")]).await.expect("starting wrangler dev");
    let (status, body) = edge.api().send(kiln_e2e::Method::GET, "/health", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["queue"]["maxConcurrent"], 5, "{body}");
}
