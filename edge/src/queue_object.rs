//! The Queue Durable Object, one per queue name: pending jobs, leases and connected runners
//! (their WebSockets, hibernation API). Decisions come from [`crate::queue_core`]; this shell
//! persists them in the object's SQLite, pushes assignments the moment a job meets a free slot,
//! and expires the leases of lost runners from an alarm.
//!
//! Internal API: `POST /enqueue`, `POST /release`, `POST /relay`, `POST /request`, `GET /stats`,
//! `GET /snapshot`, `GET /connect` (a runner's socket, already authenticated by the Worker).

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use futures::channel::oneshot;
use futures::future::{select, Either};
use kiln_schemas::jobs::{NamedRunnerTools, QueueEntry, QueueView};
use kiln_schemas::runner::{Assignment, EdgeMessage, RunnerMessage, RunnerRequest, RunnerTools};
use kiln_schemas::status::JobStatus;
use serde::{Deserialize, Serialize};
use worker::{
    durable_object, wasm_bindgen, DurableObject, Env, Method, Request, Response, SqlStorage, SqlStorageValue, State,
    WebSocket, WebSocketIncomingMessage, WebSocketPair,
};

use crate::env::{self, new_id, now_ms, Config};
use crate::http::{self, body_as, json, ApiError, ApiResult};
use crate::job_room::{TransitionRequest, TransitionResult};
use crate::queue_core::{Expired, Lease, Limits, Pending, QueueState};
use crate::store::JobPatch;
use crate::time::rfc3339;

#[derive(Debug, Serialize, Deserialize)]
pub struct EnqueueRequest {
    pub pending: Pending,
    pub assignment: Assignment,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Position {
    pub position: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub job_id: String,
    #[serde(default)]
    pub cancel: bool,
}

/// Edge-to-runner relays for a running job.
#[derive(Debug, Serialize, Deserialize)]
pub struct RelayRequest {
    pub job_id: String,
    /// `deliver`, `complete` or `stop`.
    pub kind: String,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    pub running: u32,
    pub queued: u32,
    pub max_concurrent: u32,
    pub runners_connected: u32,
    pub free_slots: u32,
    /// What each connected runner reported of its tools in its `hello`.
    #[serde(default)]
    pub tools: Vec<NamedRunnerTools>,
}

/// Attached to a runner's socket; `capacity` and `tools` are set by its `hello`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunnerSocket {
    runner_id: String,
    name: String,
    capacity: Option<u32>,
    #[serde(default)]
    tools: Option<RunnerTools>,
}

#[durable_object]
pub struct Queue {
    state: State,
    env: Env,
    limits: Limits,
    heartbeat_secs: u32,
    core: RefCell<Option<QueueState>>,
    waiting: RefCell<HashMap<String, oneshot::Sender<serde_json::Value>>>,
}

#[derive(Deserialize)]
struct DataRow {
    data: String,
}

impl Queue {
    fn sql(&self) -> SqlStorage {
        self.state.storage().sql()
    }

    fn ensure_schema(&self) -> worker::Result<()> {
        let sql = self.sql();
        sql.exec("CREATE TABLE IF NOT EXISTS pending (job_id TEXT PRIMARY KEY, data TEXT NOT NULL)", None)?;
        sql.exec("CREATE TABLE IF NOT EXISTS leases (job_id TEXT PRIMARY KEY, data TEXT NOT NULL)", None)?;
        sql.exec("CREATE TABLE IF NOT EXISTS assignments (job_id TEXT PRIMARY KEY, data TEXT NOT NULL)", None)?;
        sql.exec("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v INTEGER NOT NULL)", None)?;
        Ok(())
    }

    /// Runs `f` on the queue state, loading it from storage after a wake-up.
    fn with_core<T>(&self, f: impl FnOnce(&mut QueueState) -> T) -> ApiResult<T> {
        if self.core.borrow().is_none() {
            let mut core = QueueState::default();
            let pending: Vec<DataRow> = self.sql().exec("SELECT data FROM pending", None)?.to_array()?;
            for row in pending {
                core.pending.push(serde_json::from_str(&row.data)?);
            }
            core.pending.sort_by_key(|p: &Pending| (-(p.priority as i64), p.order));
            let leases: Vec<DataRow> = self.sql().exec("SELECT data FROM leases", None)?.to_array()?;
            for row in leases {
                let lease: Lease = serde_json::from_str(&row.data)?;
                core.leases.insert(lease.job_id.clone(), lease);
            }
            #[derive(Deserialize)]
            struct Kv {
                v: i64,
            }
            let next: Vec<Kv> = self.sql().exec("SELECT v FROM kv WHERE k = 'next_order'", None)?.to_array()?;
            core.next_order = next.first().map_or(0, |r| r.v as u64);
            for ws in self.state.get_websockets() {
                if let Ok(Some(info)) = ws.deserialize_attachment::<RunnerSocket>() {
                    if let Some(capacity) = info.capacity {
                        core.runners.retain(|r| r.runner_id != info.runner_id);
                        core.runners.push(crate::queue_core::RunnerSlot { runner_id: info.runner_id, capacity });
                    }
                }
            }
            *self.core.borrow_mut() = Some(core);
        }
        let mut guard = self.core.borrow_mut();
        Ok(f(guard.as_mut().expect("loaded above")))
    }

    /// Writes a job's current place (pending, leased or gone) to storage.
    fn persist(&self, job_id: &str) -> ApiResult<()> {
        let (pending, lease, next_order) = self.with_core(|c| {
            (c.pending.iter().find(|p| p.job_id == job_id).cloned(), c.leases.get(job_id).cloned(), c.next_order)
        })?;
        let sql = self.sql();
        let id = || SqlStorageValue::from(job_id.to_string());
        match (pending, lease) {
            (Some(p), _) => {
                sql.exec("DELETE FROM leases WHERE job_id = ?", vec![id()])?;
                sql.exec(
                    "INSERT OR REPLACE INTO pending (job_id, data) VALUES (?, ?)",
                    vec![id(), SqlStorageValue::from(serde_json::to_string(&p)?)],
                )?;
            }
            (None, Some(l)) => {
                sql.exec("DELETE FROM pending WHERE job_id = ?", vec![id()])?;
                sql.exec(
                    "INSERT OR REPLACE INTO leases (job_id, data) VALUES (?, ?)",
                    vec![id(), SqlStorageValue::from(serde_json::to_string(&l)?)],
                )?;
            }
            (None, None) => {
                sql.exec("DELETE FROM pending WHERE job_id = ?", vec![id()])?;
                sql.exec("DELETE FROM leases WHERE job_id = ?", vec![id()])?;
                sql.exec("DELETE FROM assignments WHERE job_id = ?", vec![id()])?;
            }
        }
        sql.exec(
            "INSERT OR REPLACE INTO kv (k, v) VALUES ('next_order', ?)",
            vec![SqlStorageValue::from(next_order as i64)],
        )?;
        Ok(())
    }

    fn runner_socket(&self, runner_id: &str) -> Option<WebSocket> {
        self.state.get_websockets_with_tag(runner_id).into_iter().next()
    }

    fn send_to_runner(&self, runner_id: &str, msg: &EdgeMessage) -> bool {
        match self.runner_socket(runner_id) {
            Some(ws) => ws.send(msg).is_ok(),
            None => false,
        }
    }

    async fn schedule_alarm(&self) -> ApiResult<()> {
        if let Some(at) = self.with_core(|c| c.next_expiry())? {
            let delay = (at - now_ms()).max(50);
            self.state.storage().set_alarm(Duration::from_millis(delay as u64)).await?;
        }
        Ok(())
    }

    /// Pairs pending jobs with free runner slots until nothing more fits. Each lease is
    /// announced to the job's room (which moves it to `running`) before the runner gets it.
    async fn dispatch(&self) -> ApiResult<()> {
        loop {
            let leases = self.with_core(|c| c.dispatch(now_ms(), &rfc3339(now_ms()), self.limits, new_id))?;
            if leases.is_empty() {
                break;
            }
            for lease in &leases {
                self.persist(&lease.job_id)?;
            }
            for lease in leases {
                self.start_lease(lease).await?;
            }
        }
        self.schedule_alarm().await
    }

    async fn start_lease(&self, lease: Lease) -> ApiResult<()> {
        let room = env::job_room(&self.env, &lease.job_id)?;
        let moved = http::call::<TransitionResult>(
            &room,
            Method::Post,
            "/transition",
            Some(&TransitionRequest {
                to: JobStatus::Running,
                message: format!("assigned to a runner (attempt {})", lease.attempt),
                patch: JobPatch::default(),
                lease: Some((lease.lease_id.clone(), lease.attempt)),
                runner_id: Some(lease.runner_id.clone()),
                if_lease: None,
                from_queue: false,
            }),
        )
        .await;
        match moved {
            Ok(_) => {}
            Err(ApiError::Conflict(_)) | Err(ApiError::NotFound(_)) => {
                // Cancelled (or gone) while it waited: forget it.
                self.with_core(|c| c.release(&lease.job_id))?;
                return self.persist(&lease.job_id);
            }
            Err(e) => return Err(e),
        }
        let rows: Vec<DataRow> = self
            .sql()
            .exec("SELECT data FROM assignments WHERE job_id = ?", vec![SqlStorageValue::from(lease.job_id.clone())])?
            .to_array()?;
        let Some(row) = rows.first() else {
            return Err(ApiError::Internal(format!("no assignment stored for job {}", lease.job_id)));
        };
        let mut assignment: Assignment = serde_json::from_str(&row.data)?;
        assignment.lease_id = lease.lease_id.clone();
        assignment.attempt = lease.attempt;
        // A runner that vanished in between is handled by lease expiry.
        self.send_to_runner(&lease.runner_id, &EdgeMessage::Assign { assignment });
        Ok(())
    }

    async fn enqueue(&self, req: EnqueueRequest) -> ApiResult<Position> {
        let job_id = req.pending.job_id.clone();
        self.sql().exec(
            "INSERT OR REPLACE INTO assignments (job_id, data) VALUES (?, ?)",
            vec![SqlStorageValue::from(job_id.clone()), SqlStorageValue::from(serde_json::to_string(&req.assignment)?)],
        )?;
        let position = self.with_core(|c| c.enqueue(req.pending))?;
        self.persist(&job_id)?;
        self.dispatch().await?;
        Ok(Position { position })
    }

    async fn release(&self, req: ReleaseRequest) -> ApiResult<serde_json::Value> {
        let lease = self.with_core(|c| c.release(&req.job_id))?;
        self.persist(&req.job_id)?;
        if let (Some(lease), true) = (&lease, req.cancel) {
            self.send_to_runner(&lease.runner_id, &EdgeMessage::Cancel { job_id: req.job_id.clone() });
        }
        self.dispatch().await?;
        Ok(serde_json::json!({ "was_running": lease.is_some() }))
    }

    fn relay(&self, req: RelayRequest) -> ApiResult<serde_json::Value> {
        let lease = self
            .with_core(|c| c.leases.get(&req.job_id).cloned())?
            .ok_or_else(|| ApiError::BadRequest("job is not running on a runner".into()))?;
        let msg = match req.kind.as_str() {
            "deliver" => EdgeMessage::Deliver { job_id: req.job_id, message: req.message.unwrap_or_default() },
            "complete" => EdgeMessage::Complete { job_id: req.job_id },
            "stop" => EdgeMessage::Stop { job_id: req.job_id },
            other => return Err(ApiError::BadRequest(format!("unknown relay {other:?}"))),
        };
        if !self.send_to_runner(&lease.runner_id, &msg) {
            return Err(ApiError::Unavailable("the job's runner is not connected right now".into()));
        }
        Ok(serde_json::json!({ "sent": true }))
    }

    /// Sends a request to one connected runner and waits for its reply.
    async fn request(&self, request: RunnerRequest) -> ApiResult<serde_json::Value> {
        let runner = self.with_core(|c| c.runners.first().map(|r| r.runner_id.clone()))?;
        let Some(runner_id) = runner else {
            return Err(ApiError::Unavailable("no runner is connected".into()));
        };
        let request_id = new_id();
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(request_id.clone(), tx);
        if !self.send_to_runner(&runner_id, &EdgeMessage::Request { request_id: request_id.clone(), request }) {
            self.waiting.borrow_mut().remove(&request_id);
            return Err(ApiError::Unavailable("no runner is connected".into()));
        }
        let timeout = worker::Delay::from(Duration::from_secs(120));
        match select(rx, timeout).await {
            Either::Left((Ok(value), _)) => Ok(value),
            _ => {
                self.waiting.borrow_mut().remove(&request_id);
                Err(ApiError::Unavailable("the runner did not answer in time".into()))
            }
        }
    }

    fn stats(&self) -> ApiResult<Stats> {
        let max_concurrent = self.limits.max_concurrent;
        let tools = self
            .state
            .get_websockets()
            .iter()
            .filter_map(|ws| ws.deserialize_attachment::<RunnerSocket>().ok().flatten())
            .filter_map(|info| Some(NamedRunnerTools { name: info.name, tools: info.tools? }))
            .collect();
        self.with_core(|c| Stats {
            running: c.running(),
            queued: c.pending.len() as u32,
            max_concurrent,
            runners_connected: c.runners.len() as u32,
            free_slots: c.free_slots(),
            tools,
        })
    }

    fn snapshot(&self, owner: &str) -> ApiResult<QueueView> {
        let max_concurrent = self.limits.max_concurrent;
        self.with_core(|c| QueueView {
            running: c
                .leases
                .values()
                .filter(|l| l.pending.owner == owner)
                .map(|l| QueueEntry {
                    id: l.job_id.clone(),
                    title: l.pending.title.clone(),
                    started_at: Some(l.started_at.clone()),
                    created_at: None,
                })
                .collect(),
            queued: c
                .pending
                .iter()
                .filter(|p| p.owner == owner)
                .map(|p| QueueEntry {
                    id: p.job_id.clone(),
                    title: p.title.clone(),
                    started_at: None,
                    created_at: Some(p.created_at.clone()),
                })
                .collect(),
            max_concurrent,
        })
    }

    fn accept_runner(&self, req: &Request) -> ApiResult {
        let url = req.url()?;
        let get = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.to_string());
        let runner_id = get("runner_id").ok_or_else(|| ApiError::BadRequest("runner_id is required".into()))?;
        let name = get("name").unwrap_or_default();
        // One socket per runner: a reconnect replaces the old one.
        for old in self.state.get_websockets_with_tag(&runner_id) {
            let _ = old.close(Some(4000), Some("replaced by a new connection"));
        }
        self.with_core(|c| c.disconnect(&runner_id))?;
        let pair = WebSocketPair::new()?;
        self.state.accept_websocket_with_tags(&pair.server, &[runner_id.as_str()]);
        pair.server.serialize_attachment(RunnerSocket { runner_id, name, capacity: None, tools: None })?;
        Ok(Response::from_websocket(pair.client)?)
    }

    async fn on_runner_message(&self, ws: &WebSocket, text: &str) -> ApiResult<()> {
        let Some(mut info) = ws.deserialize_attachment::<RunnerSocket>()? else {
            return Ok(());
        };
        let msg: RunnerMessage = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                ws.send(&EdgeMessage::Error { message: format!("unreadable message: {e}") })?;
                return Ok(());
            }
        };
        let now = now_ms();
        match msg {
            RunnerMessage::Hello { capacity, running, tools, .. } => {
                info.capacity = Some(capacity);
                info.tools = tools;
                ws.serialize_attachment(&info)?;
                let held: Vec<(String, String)> = running.into_iter().map(|h| (h.job_id, h.lease_id)).collect();
                let stale = self.with_core(|c| c.connect(&info.runner_id, capacity, &held, now, self.limits))?;
                for (job_id, _) in &held {
                    self.persist(job_id)?;
                }
                ws.send(&EdgeMessage::Welcome {
                    runner_id: info.runner_id.clone(),
                    heartbeat_secs: self.heartbeat_secs,
                    lease_secs: (self.limits.lease_ms / 1000) as u32,
                })?;
                for job_id in stale {
                    ws.send(&EdgeMessage::Cancel { job_id })?;
                }
                self.dispatch().await?;
            }
            RunnerMessage::Heartbeat { running } => {
                if info.capacity.is_none() {
                    ws.send(&EdgeMessage::Error { message: "send hello first".into() })?;
                    return Ok(());
                }
                let held: Vec<(String, String)> = running.into_iter().map(|h| (h.job_id, h.lease_id)).collect();
                let stale = self.with_core(|c| c.heartbeat(&info.runner_id, &held, now, self.limits))?;
                for (job_id, _) in &held {
                    self.persist(job_id)?;
                }
                for job_id in stale {
                    ws.send(&EdgeMessage::Cancel { job_id })?;
                }
                self.schedule_alarm().await?;
            }
            RunnerMessage::Reply { request_id, result } => {
                if let Some(tx) = self.waiting.borrow_mut().remove(&request_id) {
                    let _ = tx.send(result);
                }
            }
        }
        Ok(())
    }

    async fn expire_leases(&self) -> ApiResult<()> {
        let expired = self.with_core(|c| c.expire(now_ms(), self.limits))?;
        let max = self.limits.max_attempts;
        for e in expired {
            let (job_id, lease_id, to, message, patch) = match e {
                Expired::Requeued { job_id, lease_id, attempts, .. } => (
                    job_id,
                    lease_id,
                    JobStatus::Queued,
                    format!("runner lost (no heartbeat); job requeued after attempt {attempts} of {max}"),
                    JobPatch::default(),
                ),
                Expired::Failed { job_id, lease_id, attempts, .. } => {
                    let why = format!("runner lost (no heartbeat) on all {attempts} attempts; giving up");
                    (job_id, lease_id, JobStatus::Failed, why.clone(), JobPatch { error_message: Some(why), ..Default::default() })
                }
            };
            self.persist(&job_id)?;
            let room = env::job_room(&self.env, &job_id)?;
            let moved = http::call::<TransitionResult>(
                &room,
                Method::Post,
                "/transition",
                Some(&TransitionRequest {
                    to,
                    message,
                    patch,
                    lease: None,
                    runner_id: None,
                    if_lease: Some(lease_id),
                    from_queue: true,
                }),
            )
            .await;
            if let Err(e) = moved {
                // The job ended meanwhile (finished or cancelled): it must not run again.
                if !matches!(e, ApiError::Conflict(_)) {
                    worker::console_error!("requeue of {job_id}: {e:?}");
                }
                self.with_core(|c| c.release(&job_id))?;
                self.persist(&job_id)?;
            }
        }
        self.dispatch().await
    }

    async fn route(&self, mut req: Request) -> ApiResult {
        let path = req.path();
        let url = req.url()?;
        let query = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.to_string());
        match (req.method(), path.as_str()) {
            (Method::Post, "/enqueue") => json(&self.enqueue(body_as(&mut req).await?).await?),
            (Method::Post, "/release") => json(&self.release(body_as(&mut req).await?).await?),
            (Method::Post, "/relay") => json(&self.relay(body_as(&mut req).await?)?),
            (Method::Post, "/request") => json(&self.request(body_as(&mut req).await?).await?),
            (Method::Get, "/stats") => json(&self.stats()?),
            (Method::Get, "/snapshot") => json(&self.snapshot(&query("owner").unwrap_or_default())?),
            (Method::Get, "/position") => {
                let id = query("job_id").unwrap_or_default();
                json(&Position { position: self.with_core(|c| c.position(&id))?.unwrap_or(0) })
            }
            (Method::Get, "/connect") => self.accept_runner(&req),
            _ => Err(ApiError::NotFound("no such queue route".into())),
        }
    }
}

impl DurableObject for Queue {
    fn new(state: State, env: Env) -> Self {
        let config = Config::from_env(&env);
        let queue = Self {
            state,
            env,
            limits: config.limits,
            heartbeat_secs: config.heartbeat_secs,
            core: RefCell::new(None),
            waiting: RefCell::new(HashMap::new()),
        };
        if let Err(e) = queue.ensure_schema() {
            worker::console_error!("queue schema: {e}");
        }
        queue
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        Ok(self.route(req).await.unwrap_or_else(ApiError::into_response))
    }

    async fn alarm(&self) -> worker::Result<Response> {
        if let Err(e) = self.expire_leases().await {
            worker::console_error!("lease expiry: {e:?}");
        }
        Response::ok("ok")
    }

    async fn websocket_message(&self, ws: WebSocket, message: WebSocketIncomingMessage) -> worker::Result<()> {
        if let WebSocketIncomingMessage::String(text) = message {
            if let Err(e) = self.on_runner_message(&ws, &text).await {
                worker::console_error!("runner message: {e:?}");
            }
        }
        Ok(())
    }

    async fn websocket_close(&self, ws: WebSocket, _code: usize, _reason: String, _was_clean: bool) -> worker::Result<()> {
        self.forget_socket(&ws);
        Ok(())
    }

    async fn websocket_error(&self, ws: WebSocket, _error: worker::Error) -> worker::Result<()> {
        self.forget_socket(&ws);
        Ok(())
    }
}

impl Queue {
    /// A runner's socket closed: the runner stops counting as capacity; its leases run out unless
    /// it reconnects and re-announces them.
    fn forget_socket(&self, ws: &WebSocket) {
        if let Ok(Some(info)) = ws.deserialize_attachment::<RunnerSocket>() {
            // Only forget the runner if this was its current socket (not one replaced by a reconnect).
            let current = self.state.get_websockets_with_tag(&info.runner_id);
            if current.len() <= 1 {
                let _ = self.with_core(|c| c.disconnect(&info.runner_id));
            }
        }
        let _ = ws.close(Some(1000), Some("closing"));
    }
}
