//! `EdgeClient::put_snapshot` / `get_snapshot` over HTTP: the path, the lease and the token they
//! send, a snapshot of a real worktree carried there and back, 404 as "none", transient failures
//! retried and refusals not, and a snapshot over the limit never sent.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::any;
use axum::Router;
use kiln_runner::edge::{http_client, EdgeClient};
use kiln_runner::files;
use kiln_schemas::app::{SnapshotFile, WorkspaceSnapshot};
use kiln_schemas::runner::MAX_SNAPSHOT_BYTES;

const TOKEN: &str = "runner-token-snap";

#[derive(Default)]
struct Edge {
    stored: Mutex<Option<Vec<u8>>>,
    /// Answer this status to the next N requests.
    fail_with: Mutex<Option<(u16, u32)>>,
    /// (method, path, query, bearer)
    seen: Mutex<Vec<(String, String, String, String)>>,
    attempts: AtomicU32,
}

async fn snapshot(
    State(e): State<Arc<Edge>>,
    method: Method,
    Path(job): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    e.attempts.fetch_add(1, Ordering::SeqCst);
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    e.seen
        .lock()
        .unwrap()
        .push((method.to_string(), job, q.unwrap_or_default(), bearer));
    {
        let mut f = e.fail_with.lock().unwrap();
        if let Some((status, n)) = *f {
            *f = (n > 1).then_some((status, n - 1));
            return (
                StatusCode::from_u16(status).unwrap(),
                r#"{"error": "injected"}"#.into(),
            );
        }
    }
    match method {
        Method::PUT => {
            *e.stored.lock().unwrap() = Some(body.to_vec());
            (StatusCode::OK, r#"{"stored": true}"#.into())
        }
        _ => match e.stored.lock().unwrap().clone() {
            Some(b) => (StatusCode::OK, String::from_utf8(b).unwrap()),
            None => (
                StatusCode::NOT_FOUND,
                r#"{"error": "no snapshot of this job"}"#.into(),
            ),
        },
    }
}

async fn start() -> (Arc<Edge>, EdgeClient) {
    let edge = Arc::new(Edge::default());
    let app = Router::new()
        .route("/prefix/runner/v1/jobs/{job}/snapshot", any(snapshot))
        .with_state(edge.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let base = format!("http://{addr}/prefix/").parse().unwrap();
    (edge, EdgeClient::new(http_client(), base, TOKEN.into()))
}

fn worktree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("src")).unwrap();
    std::fs::write(
        dir.path().join("index.html"),
        "<h1>\"quoted\" & ünïcode</h1>\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("src/app.js"), "console.log('hi')\n").unwrap();
    dir
}

#[tokio::test]
async fn a_snapshot_goes_to_the_edge_and_comes_back() {
    let (edge, client) = start().await;
    assert_eq!(
        client.get_snapshot("job-1", "lease-1").await.unwrap(),
        None,
        "404 is none"
    );

    let from = worktree();
    let snap = files::snapshot(from.path()).unwrap();
    client
        .put_snapshot("job-1", "lease-1", &snap)
        .await
        .unwrap();
    let back = client
        .get_snapshot("job-1", "lease-2")
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(back, snap);
    let into = tempfile::tempdir().unwrap();
    files::restore(into.path(), &back).unwrap();
    assert_eq!(
        std::fs::read_to_string(into.path().join("index.html")).unwrap(),
        "<h1>\"quoted\" & ünïcode</h1>\n"
    );

    let seen = edge.seen.lock().unwrap().clone();
    let methods: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(methods, ["GET", "PUT", "GET"]);
    assert!(seen
        .iter()
        .all(|s| s.1 == "job-1" && s.3 == format!("Bearer {TOKEN}")));
    assert_eq!(seen[1].2, "lease_id=lease-1");
    assert_eq!(seen[2].2, "lease_id=lease-2");
}

#[tokio::test]
async fn transient_failures_are_retried_and_refusals_are_not() {
    let (edge, client) = start().await;
    let snap = files::snapshot(worktree().path()).unwrap();

    *edge.fail_with.lock().unwrap() = Some((503, 2));
    client.put_snapshot("job-2", "lease", &snap).await.unwrap();
    assert_eq!(
        edge.attempts.swap(0, Ordering::SeqCst),
        3,
        "two 503s, then stored"
    );
    *edge.fail_with.lock().unwrap() = Some((502, 1));
    assert_eq!(
        client.get_snapshot("job-2", "lease").await.unwrap(),
        Some(snap.clone())
    );
    assert_eq!(edge.attempts.swap(0, Ordering::SeqCst), 2);

    // A lease the edge no longer knows: refused at once, the error says so.
    *edge.fail_with.lock().unwrap() = Some((409, 5));
    let e = client
        .put_snapshot("job-2", "old-lease", &snap)
        .await
        .unwrap_err();
    assert!(!e.is_transient() && e.to_string().contains("409"), "{e}");
    assert_eq!(edge.attempts.swap(0, Ordering::SeqCst), 1);
    *edge.fail_with.lock().unwrap() = None;

    // An edge that stays down: given up after a bounded number of attempts.
    *edge.fail_with.lock().unwrap() = Some((500, 100));
    let t0 = std::time::Instant::now();
    let e = client.get_snapshot("job-2", "lease").await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(edge.attempts.load(Ordering::SeqCst), 6);
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn a_snapshot_over_the_limit_is_not_sent() {
    let (edge, client) = start().await;
    let big = WorkspaceSnapshot {
        files: vec![SnapshotFile {
            path: "big.txt".into(),
            content: "x".repeat(MAX_SNAPSHOT_BYTES),
            size: MAX_SNAPSHOT_BYTES as u64,
        }],
        omitted: vec![],
    };
    let e = client
        .put_snapshot("job-3", "lease", &big)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("at most 16777216"), "{e}");
    assert_eq!(edge.attempts.load(Ordering::SeqCst), 0);
}
