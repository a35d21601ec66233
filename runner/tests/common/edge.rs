//! A fake edge speaking the runner protocol: registration, the WebSocket session (it records what
//! the runner says and lets the test push messages), and event batches (deduplicated by index,
//! with switches for failing posts and invalid leases).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::Query;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use kiln_schemas::app::WorkspaceSnapshot;
use kiln_schemas::landing::{PreviewBundle, Published};
use kiln_schemas::runner::{
    Assignment, BatchAck, EdgeMessage, EventBatch, RegisterRunnerRequest, RegisterRunnerResponse,
    RunnerEvent, RunnerMessage,
};
use tokio::sync::mpsc;

pub const REGISTRATION_TOKEN: &str = "test-registration-token";
pub const HEARTBEAT_SECS: u32 = 1;

enum Command {
    Send(Box<EdgeMessage>),
    Close,
    /// Stop reading and writing without closing (a half-open connection, a hung edge).
    Silence,
}

#[derive(Default)]
struct EdgeState {
    tokens: Mutex<Vec<String>>,
    names: Mutex<Vec<String>>,
    /// The token of every session accepted, in order.
    connected: Mutex<Vec<String>>,
    refused_connects: AtomicU32,
    received: Mutex<Vec<RunnerMessage>>,
    outbox: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    events: Mutex<HashMap<String, BTreeMap<u64, RunnerEvent>>>,
    batches: Mutex<Vec<(String, EventBatch)>>,
    invalid: Mutex<HashSet<String>>,
    fail_posts: AtomicU32,
    failed_posts: AtomicU32,
    duplicates: AtomicU32,
    /// `lease_secs` of the welcome (0: the default, 30).
    lease_secs: AtomicU32,
    /// Milliseconds each event post waits before it is answered (a slow edge).
    post_delay_ms: AtomicU32,
    /// App builds' workspace snapshots by job, and every PUT of one: (job, lease, files).
    snapshots: Mutex<HashMap<String, WorkspaceSnapshot>>,
    snapshot_puts: Mutex<Vec<(String, String, usize)>>,
    /// Landing jobs' pages (from their assignments), the sessions' bundles and the pages'
    /// previews by landing page, and every PUT of either: (job, lease).
    pages: Mutex<HashMap<String, String>>,
    bundles: Mutex<HashMap<String, Vec<u8>>>,
    bundle_puts: Mutex<Vec<(String, String)>>,
    previews: Mutex<HashMap<String, PreviewBundle>>,
    preview_puts: Mutex<Vec<(String, String)>>,
    /// The edge's own URL (previews are served under it).
    url: Mutex<String>,
    /// Jobs' artifacts by (job, name), with the lease each was put under.
    artifacts: Mutex<Artifacts>,
}

/// (job, name) → (lease, bytes).
type Artifacts = HashMap<(String, String), (String, Vec<u8>)>;

#[derive(Clone)]
pub struct FakeEdge {
    pub url: String,
    state: Arc<EdgeState>,
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_string)
}

async fn register(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Json(req): Json<RegisterRunnerRequest>,
) -> Response {
    if bearer(&headers).as_deref() != Some(REGISTRATION_TOKEN) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": "bad registration token"})),
        )
            .into_response();
    }
    let token = format!("runner-token-{}", uuid::Uuid::new_v4());
    s.tokens.lock().unwrap().push(token.clone());
    s.names.lock().unwrap().push(req.name);
    Json(RegisterRunnerResponse {
        runner_id: "runner-1".into(),
        token,
    })
    .into_response()
}

fn authorized(s: &EdgeState, headers: &HeaderMap) -> bool {
    bearer(headers).is_some_and(|t| s.tokens.lock().unwrap().contains(&t))
}

async fn connect(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !authorized(&s, &headers) {
        s.refused_connects.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    s.connected
        .lock()
        .unwrap()
        .push(bearer(&headers).unwrap_or_default());
    ws.on_upgrade(move |socket| session(s, socket))
}

async fn session(s: Arc<EdgeState>, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    // hello first, then welcome
    let Some(Ok(Message::Text(first))) = rx.next().await else {
        return;
    };
    let hello: RunnerMessage =
        serde_json::from_str(&first).expect("the first message is a runner message");
    assert!(
        matches!(hello, RunnerMessage::Hello { .. }),
        "first message must be hello: {first}"
    );
    s.received.lock().unwrap().push(hello);
    let welcome = EdgeMessage::Welcome {
        runner_id: "runner-1".into(),
        heartbeat_secs: HEARTBEAT_SECS,
        lease_secs: match s.lease_secs.load(Ordering::SeqCst) {
            0 => 30,
            n => n,
        },
    };
    if tx
        .send(Message::Text(
            serde_json::to_string(&welcome).unwrap().into(),
        ))
        .await
        .is_err()
    {
        return;
    }
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    *s.outbox.lock().unwrap() = Some(out_tx);
    loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let m: RunnerMessage = serde_json::from_str(&t).expect("runner messages parse");
                    s.received.lock().unwrap().push(m);
                }
                Some(Ok(_)) => {}
                _ => break,
            },
            cmd = out_rx.recv() => match cmd {
                Some(Command::Send(m)) => {
                    if tx.send(Message::Text(serde_json::to_string(&*m).unwrap().into())).await.is_err() { break; }
                }
                Some(Command::Close) | None => {
                    let _ = tx.close().await;
                    break;
                }
                Some(Command::Silence) => {
                    // Keep the connection open, read nothing (so no pong either), send nothing.
                    let _held = (tx, rx);
                    std::future::pending::<()>().await;
                    return;
                }
            },
        }
    }
}

async fn events(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
    Json(batch): Json<EventBatch>,
) -> Response {
    if !authorized(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let delay = s.post_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay.into())).await;
    }
    if s.fail_posts.load(Ordering::SeqCst) > 0 {
        s.fail_posts.fetch_sub(1, Ordering::SeqCst);
        s.failed_posts.fetch_add(1, Ordering::SeqCst);
        // Store the batch anyway: the runner cannot tell a lost answer from a lost request.
        store(&s, &job_id, &batch);
        return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
    }
    if s.invalid.lock().unwrap().contains(&job_id) {
        return Json(BatchAck {
            stored: 0,
            duplicates: 0,
            lease_valid: false,
        })
        .into_response();
    }
    let (stored, duplicates) = store(&s, &job_id, &batch);
    Json(BatchAck {
        stored,
        duplicates,
        lease_valid: true,
    })
    .into_response()
}

#[derive(serde::Deserialize)]
struct LeaseQuery {
    lease_id: Option<String>,
}

/// `PUT /runner/v1/jobs/{job_id}/snapshot?lease_id=`, refused like an event batch when the
/// job's lease was invalidated.
async fn put_snapshot(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
    Query(q): Query<LeaseQuery>,
    Json(snap): Json<WorkspaceSnapshot>,
) -> Response {
    if !authorized(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(lease) = q.lease_id else {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": "lease_id is required"})),
        )
            .into_response();
    };
    if s.invalid.lock().unwrap().contains(&job_id) {
        return (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": "lease no longer valid"})),
        )
            .into_response();
    }
    s.snapshot_puts
        .lock()
        .unwrap()
        .push((job_id.clone(), lease, snap.files.len()));
    s.snapshots.lock().unwrap().insert(job_id, snap);
    StatusCode::NO_CONTENT.into_response()
}

async fn get_snapshot(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
    Query(q): Query<LeaseQuery>,
) -> Response {
    if !authorized(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if q.lease_id.is_none() {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": "lease_id is required"})),
        )
            .into_response();
    }
    match s.snapshots.lock().unwrap().get(&job_id) {
        Some(snap) => Json(snap.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no snapshot"})),
        )
            .into_response(),
    }
}

/// The landing page of a job's assignment, or the answer refusing the request: 401, 400
/// without a lease, 409 for an invalidated lease, 404 for a job that is no landing job.
fn landing_page(
    s: &EdgeState,
    headers: &HeaderMap,
    job_id: &str,
    q: &LeaseQuery,
) -> Result<String, Response> {
    if !authorized(s, headers) {
        return Err(StatusCode::UNAUTHORIZED.into_response());
    }
    let refuse =
        |status, error: &str| (status, Json(serde_json::json!({ "error": error }))).into_response();
    if q.lease_id.is_none() {
        return Err(refuse(StatusCode::BAD_REQUEST, "lease_id is required"));
    }
    if s.invalid.lock().unwrap().contains(job_id) {
        return Err(refuse(StatusCode::CONFLICT, "lease no longer valid"));
    }
    s.pages
        .lock()
        .unwrap()
        .get(job_id)
        .cloned()
        .ok_or_else(|| refuse(StatusCode::NOT_FOUND, "not a landing job"))
}

/// `GET /runner/v1/jobs/{job_id}/bundle?lease_id=`: the session's bundle (404: none yet).
async fn get_bundle(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
    Query(q): Query<LeaseQuery>,
) -> Response {
    let page = match landing_page(&s, &headers, &job_id, &q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match s.bundles.lock().unwrap().get(&page) {
        Some(b) => b.clone().into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no bundle"})),
        )
            .into_response(),
    }
}

/// `PUT /runner/v1/jobs/{job_id}/bundle?lease_id=`: keeps the session's bundle.
async fn put_bundle(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
    Query(q): Query<LeaseQuery>,
    body: axum::body::Bytes,
) -> Response {
    let page = match landing_page(&s, &headers, &job_id, &q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    s.bundle_puts
        .lock()
        .unwrap()
        .push((job_id, q.lease_id.unwrap_or_default()));
    s.bundles.lock().unwrap().insert(page, body.to_vec());
    StatusCode::NO_CONTENT.into_response()
}

/// `PUT /runner/v1/jobs/{job_id}/preview?lease_id=`: replaces the page's preview.
async fn put_preview(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
    Query(q): Query<LeaseQuery>,
    Json(preview): Json<PreviewBundle>,
) -> Response {
    let page = match landing_page(&s, &headers, &job_id, &q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    s.preview_puts
        .lock()
        .unwrap()
        .push((job_id, q.lease_id.unwrap_or_default()));
    let published = Published {
        preview_url: format!("{}/preview/{page}/", s.url.lock().unwrap()),
        files: preview.files.len() as u32,
        bytes: preview.files.iter().map(|f| f.content.len() as u64).sum(),
    };
    s.previews.lock().unwrap().insert(page, preview);
    Json(published).into_response()
}

#[derive(serde::Deserialize)]
struct ArtifactQuery {
    lease_id: Option<String>,
    name: Option<String>,
}

/// `PUT /runner/v1/jobs/{job_id}/artifact?lease_id=&name=`: keeps a job's file; answers its URL.
async fn put_artifact(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
    Query(q): Query<ArtifactQuery>,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let refuse =
        |status, error: &str| (status, Json(serde_json::json!({ "error": error }))).into_response();
    let (Some(lease), Some(name)) = (q.lease_id, q.name) else {
        return refuse(StatusCode::BAD_REQUEST, "lease_id and name are required");
    };
    if s.invalid.lock().unwrap().contains(&job_id) {
        return refuse(StatusCode::CONFLICT, "lease no longer valid");
    }
    let url = format!("{}/api/v1/3d/{job_id}/asset", s.url.lock().unwrap());
    s.artifacts
        .lock()
        .unwrap()
        .insert((job_id, name), (lease, body.to_vec()));
    Json(serde_json::json!({ "url": url })).into_response()
}

fn store(s: &EdgeState, job_id: &str, batch: &EventBatch) -> (u32, u32) {
    s.batches
        .lock()
        .unwrap()
        .push((job_id.to_string(), batch.clone()));
    let mut all = s.events.lock().unwrap();
    let log = all.entry(job_id.to_string()).or_default();
    let (mut stored, mut dups) = (0, 0);
    for ev in &batch.events {
        match log.get(&ev.index) {
            Some(existing) => {
                assert_eq!(
                    existing, &ev.event,
                    "index {} was reused for a different event",
                    ev.index
                );
                dups += 1;
            }
            None => {
                log.insert(ev.index, ev.event.clone());
                stored += 1;
            }
        }
    }
    s.duplicates.fetch_add(dups, Ordering::SeqCst);
    (stored, dups)
}

impl FakeEdge {
    pub async fn start() -> FakeEdge {
        let state = Arc::new(EdgeState::default());
        let app = Router::new()
            .route("/runner/v1/register", post(register))
            .route("/runner/v1/connect", get(connect))
            .route("/runner/v1/jobs/{job_id}/events", post(events))
            .route(
                "/runner/v1/jobs/{job_id}/snapshot",
                get(get_snapshot).put(put_snapshot),
            )
            .route(
                "/runner/v1/jobs/{job_id}/bundle",
                get(get_bundle).put(put_bundle),
            )
            .route(
                "/runner/v1/jobs/{job_id}/preview",
                axum::routing::put(put_preview),
            )
            .route(
                "/runner/v1/jobs/{job_id}/artifact",
                axum::routing::put(put_artifact),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        *state.url.lock().unwrap() = url.clone();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeEdge { url, state }
    }

    /// Sends a message on the current session (waits for one).
    pub async fn send(&self, msg: EdgeMessage) {
        wait_until("a runner session", Duration::from_secs(10), || {
            self.state.outbox.lock().unwrap().is_some()
        })
        .await;
        let outbox = self.state.outbox.lock().unwrap();
        assert!(
            outbox
                .as_ref()
                .unwrap()
                .send(Command::Send(Box::new(msg)))
                .is_ok(),
            "the session is alive"
        );
    }

    pub async fn assign(&self, assignment: Assignment) {
        if let Some(l) = &assignment.landing {
            self.state
                .pages
                .lock()
                .unwrap()
                .insert(assignment.job_id.clone(), l.landing_page_id.clone());
        }
        self.send(EdgeMessage::Assign { assignment }).await;
    }

    /// Closes the current session (the runner must reconnect).
    pub fn disconnect(&self) {
        if let Some(tx) = self.state.outbox.lock().unwrap().take() {
            let _ = tx.send(Command::Close);
        }
    }

    /// Goes silent on the current session without closing it: nothing is read (pings go
    /// unanswered) and nothing is sent. Event posts are still answered.
    pub fn go_silent(&self) {
        if let Some(tx) = self.state.outbox.lock().unwrap().take() {
            let _ = tx.send(Command::Silence);
        }
    }

    /// The `lease_secs` the next sessions are welcomed with.
    pub fn set_lease_secs(&self, secs: u32) {
        self.state.lease_secs.store(secs, Ordering::SeqCst);
    }

    /// The job's last workspace snapshot.
    pub fn snapshot(&self, job_id: &str) -> Option<WorkspaceSnapshot> {
        self.state.snapshots.lock().unwrap().get(job_id).cloned()
    }

    /// Sets the snapshot an earlier run of the job left.
    pub fn set_snapshot(&self, job_id: &str, snap: WorkspaceSnapshot) {
        self.state
            .snapshots
            .lock()
            .unwrap()
            .insert(job_id.to_string(), snap);
    }

    /// Every snapshot PUT of the job: (lease, files).
    pub fn snapshot_puts(&self, job_id: &str) -> Vec<(String, usize)> {
        self.state
            .snapshot_puts
            .lock()
            .unwrap()
            .iter()
            .filter(|(j, _, _)| j == job_id)
            .map(|(_, l, n)| (l.clone(), *n))
            .collect()
    }

    /// A job's artifact and the lease it was put under.
    pub fn artifact(&self, job_id: &str, name: &str) -> Option<(String, Vec<u8>)> {
        self.state
            .artifacts
            .lock()
            .unwrap()
            .get(&(job_id.to_string(), name.to_string()))
            .cloned()
    }

    /// A landing session's bundle, by landing page.
    pub fn bundle(&self, page: &str) -> Option<Vec<u8>> {
        self.state.bundles.lock().unwrap().get(page).cloned()
    }

    /// Every bundle PUT of the job: its lease.
    pub fn bundle_puts(&self, job_id: &str) -> Vec<String> {
        let puts = self.state.bundle_puts.lock().unwrap();
        puts.iter()
            .filter(|(j, _)| j == job_id)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// A landing page's preview as last published.
    pub fn preview(&self, page: &str) -> Option<PreviewBundle> {
        self.state.previews.lock().unwrap().get(page).cloned()
    }

    /// Every preview PUT of the job: its lease.
    pub fn preview_puts(&self, job_id: &str) -> Vec<String> {
        let puts = self.state.preview_puts.lock().unwrap();
        puts.iter()
            .filter(|(j, _)| j == job_id)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Makes every event post wait this long before it is answered.
    pub fn set_post_delay(&self, delay: Duration) {
        self.state
            .post_delay_ms
            .store(delay.as_millis() as u32, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<RunnerMessage> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn hellos(&self) -> Vec<RunnerMessage> {
        self.received()
            .into_iter()
            .filter(|m| matches!(m, RunnerMessage::Hello { .. }))
            .collect()
    }

    pub fn registered_names(&self) -> Vec<String> {
        self.state.names.lock().unwrap().clone()
    }

    /// The runner tokens issued, in order.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state.tokens.lock().unwrap().clone()
    }

    /// The token of every session accepted, in order.
    pub fn connected_tokens(&self) -> Vec<String> {
        self.state.connected.lock().unwrap().clone()
    }

    /// Sessions refused for their token (401).
    pub fn refused_connects(&self) -> u32 {
        self.state.refused_connects.load(Ordering::SeqCst)
    }

    /// Forgets every runner token issued (an edge that lost its runners): they answer 401 now.
    pub fn revoke_tokens(&self) {
        self.state.tokens.lock().unwrap().clear();
    }

    pub async fn wait_hellos(&self, n: usize) -> Vec<RunnerMessage> {
        wait_until(&format!("{n} hello(s)"), Duration::from_secs(15), || {
            self.hellos().len() >= n
        })
        .await;
        self.hellos()
    }

    /// The job's stored events in index order.
    pub fn events(&self, job_id: &str) -> Vec<RunnerEvent> {
        self.state
            .events
            .lock()
            .unwrap()
            .get(job_id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every batch posted for the job, failed ones included.
    pub fn batches(&self, job_id: &str) -> Vec<EventBatch> {
        self.state
            .batches
            .lock()
            .unwrap()
            .iter()
            .filter(|(j, _)| j == job_id)
            .map(|(_, b)| b.clone())
            .collect()
    }

    pub async fn wait_event(
        &self,
        job_id: &str,
        what: &str,
        secs: u64,
        pred: impl Fn(&RunnerEvent) -> bool,
    ) -> Vec<RunnerEvent> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let evs = self.events(job_id);
            if evs.iter().any(&pred) {
                return evs;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out after {secs} s waiting for {what} of job {job_id}; events so far:\n{evs:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_finished(&self, job_id: &str, secs: u64) -> Vec<RunnerEvent> {
        self.wait_event(job_id, "finished", secs, |e| {
            matches!(e, RunnerEvent::Finished { .. })
        })
        .await
    }

    pub async fn wait_reply(&self, request_id: &str) -> serde_json::Value {
        let find = || {
            self.received().into_iter().find_map(|m| match m {
                RunnerMessage::Reply {
                    request_id: r,
                    result,
                } if r == request_id => Some(result),
                _ => None,
            })
        };
        wait_until(
            &format!("reply {request_id}"),
            Duration::from_secs(30),
            || find().is_some(),
        )
        .await;
        find().unwrap()
    }

    pub fn invalidate_lease(&self, job_id: &str) {
        self.state
            .invalid
            .lock()
            .unwrap()
            .insert(job_id.to_string());
    }

    pub fn fail_next_posts(&self, n: u32) {
        self.state.fail_posts.store(n, Ordering::SeqCst);
    }

    pub fn failed_posts(&self) -> u32 {
        self.state.failed_posts.load(Ordering::SeqCst)
    }

    pub fn duplicates(&self) -> u32 {
        self.state.duplicates.load(Ordering::SeqCst)
    }
}

/// Polls `cond` every 20 ms; panics with `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
