//! The Queue Durable Object, one per queue name: pending jobs, leases and connected runners
//! (their WebSockets, hibernation API). Decisions come from [`crate::queue_core`]; this shell
//! persists them in the object's SQLite, pushes assignments the moment a job meets a free slot,
//! and from its alarm: expires the leases of lost runners, tells rooms the leases they missed,
//! drops runner sockets silent for longer than a lease, and reconciles itself with the rooms and
//! D1 (a job is always queued, leased or ended). An alarm that fails is set again.
//!
//! Internal API: `POST /enqueue`, `POST /release`, `POST /relay`, `POST /request` (any runner: the
//! one with the fewest requests in flight), `POST /gather` (a room's gather turn: answered at once,
//! the reply sent to the room's `/gather-reply`), `POST /request-job` (the runner that holds a job's
//! lease), `GET /stats`, `GET /snapshot`, `GET /connect` (a runner's socket, already authenticated
//! by the Worker).

use std::cell::RefCell;
use std::rc::Rc;
use std::collections::HashMap;
use std::time::Duration;

use futures::channel::oneshot;
use futures::future::{select, Either};
use kiln_schemas::jobs::{NamedRunnerTools, QueueEntry, QueueView};
use kiln_schemas::runner::{AppBuildParams, Assignment, EdgeMessage, LandingParams, RunnerLoad, RunnerMessage, RunnerRequest, RunnerTools};
use kiln_schemas::status::{JobStatus, JobType};
use serde::{Deserialize, Serialize};
use worker::{
    durable_object, wasm_bindgen, DurableObject, Env, Method, Request, Response, SqlStorage, SqlStorageValue, State,
    WebSocket, WebSocketIncomingMessage, WebSocketPair,
};

use crate::env::{self, new_id, now_ms, Config};
use crate::http::{self, body_as, json, ApiError, ApiResult};
use crate::job_room::{InitRequest, RoomMeta, TransitionRequest, TransitionResult};
use crate::queue_core::{Expired, Lease, Limits, Pending, QueueState};
use crate::store::{self, JobPatch, JobRow};
use crate::time::rfc3339;

/// How soon a room call that failed is tried again.
const RETRY_MS: i64 = 1_000;
/// A job row younger than this is left to its submit call by reconciliation.
const RECONCILE_GRACE_MS: i64 = 10_000;
/// How long a request to any runner (a gather turn, a sync) waits for its reply.
const REQUEST_TIMEOUT_SECS: u64 = 120;
/// How long a request about a held job's workspace (files) waits for its reply.
const JOB_REQUEST_TIMEOUT_SECS: u64 = 10;

/// `POST /gather`: a room's gather turn, answered later at the room's `/gather-reply` with
/// `{context, result}` or `{context, error}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct GatherCall {
    pub job_id: String,
    pub request: kiln_schemas::runner::GatherRequest,
    /// Given back with the reply (the room's turn).
    #[serde(default)]
    pub context: serde_json::Value,
}

/// `POST /request-job`: a request for the runner that holds `job_id`'s lease.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobRequest {
    pub job_id: String,
    pub request: RunnerRequest,
}

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
    /// Each connected runner and its last reported load (monitoring).
    #[serde(default)]
    pub runners: Vec<RunnerLoadView>,
}

/// A connected runner in monitoring: its name and the load its last `load` message reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerLoadView {
    pub name: String,
    pub load: Option<RunnerLoad>,
    /// When it reported it (RFC 3339).
    pub last_seen: String,
}

/// A new job's room as its row describes it (an app build still collecting starts there).
pub fn room_meta(row: &JobRow) -> RoomMeta {
    let app = row.job_type() == JobType::AppBuild;
    RoomMeta {
        job_id: row.id.clone(),
        owner: row.owner.clone(),
        job_type: row.job_type(),
        queue: row.queue.clone(),
        status: if row.status() == JobStatus::Collecting { JobStatus::Collecting } else { JobStatus::Queued },
        lease_id: None,
        attempt: 0,
        runner_id: None,
        usage: Default::default(),
        // A room opened from its row starts its run over (queued), so from no phase.
        phase: None,
        is_paused: row.is_paused != 0,
        initial_prompt: app.then(|| row.initial_prompt.clone().unwrap_or_else(|| row.prompt.clone())),
        requirements_summary: row.requirements_summary.clone(),
        continuation: app.then(|| row.continuation()).flatten(),
        gather: Default::default(),
        last_lease: None,
        landing_page_id: row.landing_page_id.clone().filter(|_| row.job_type().is_landing()),
    }
}

/// What the queue needs of a job, from its row (at submit, and when reconciliation queues a row
/// the queue lost).
pub fn enqueue_request(row: &JobRow) -> EnqueueRequest {
    let pending = Pending {
        job_id: row.id.clone(),
        priority: row.priority as i32,
        order: 0,
        attempts: 0,
        owner: row.owner.clone(),
        title: row.title.clone(),
        created_at: row.created_at.clone(),
        serial: row.landing_page_id.as_deref().filter(|_| row.job_type().is_landing()).map(crate::landing_room::serial_key),
        submitted_ms: row.created_ms,
    };
    let assignment = Assignment {
        job_id: row.id.clone(),
        lease_id: String::new(),
        attempt: 0,
        job_type: row.job_type(),
        prompt: row.prompt.clone(),
        title: row.title.clone(),
        branch_name: row.branch_name.clone(),
        github_org: row.github_org.clone(),
        github_repo: row.github_repo.clone(),
        base_branch: row.base_branch.clone(),
        ralph: row.ralph(),
        timeout_seconds: row.timeout_seconds(),
        // An app build's inputs from its row; at dispatch its room's (a continuation's
        // requirements, a pause since) replace them.
        app: (row.job_type() == JobType::AppBuild).then(|| AppBuildParams {
            initial_prompt: row.initial_prompt.clone().unwrap_or_else(|| row.prompt.clone()),
            requirements_summary: row.requirements_summary.clone().unwrap_or_default(),
            continuation: row.continuation(),
            paused: row.is_paused != 0,
        }),
        // A landing job's page and request; its payload (the page's business_data) is read from
        // D1 at dispatch, so an edit since the enqueue is what runs.
        landing: landing_params(row),
        // A webhook-started job's issue (`sourceIssue` in its params).
        source_issue: kiln_schemas::webhooks::IssueRef::from_params(&row.params),
        queued_ms: None,
        // A dashboard job's inputs (seed 002), kept in its row's params at submit: the agent's
        // definition as it was then, technique, parameters, providers, 3D limits.
        dashboard: if row.job_type().is_dashboard() { crate::dashboard_store::params_of(&row.params) } else { None },
    };
    EnqueueRequest { pending, assignment }
}

/// A landing job's parameters from its row (`payload` is filled at dispatch).
pub fn landing_params(row: &JobRow) -> Option<LandingParams> {
    let kind = row.job_type();
    if !kind.is_landing() {
        return None;
    }
    Some(LandingParams {
        session_id: row.session_id.clone().unwrap_or_default(),
        landing_page_id: row.landing_page_id.clone().unwrap_or_default(),
        payload: serde_json::Value::Null,
        message: (kind == JobType::LandingChat).then(|| row.prompt.clone()),
    })
}

/// The faults `KILN_FAULTS` injects (test builds only).
#[cfg(feature = "faults")]
pub(crate) fn read_faults(env: &Env) -> crate::queue_core::Faults {
    crate::queue_core::Faults::parse(&env.var("KILN_FAULTS").map(|v| v.to_string()).unwrap_or_default())
}

/// Whether the injected fault `name` fires now (using one up); logged when it does.
#[cfg(feature = "faults")]
pub(crate) fn fire_fault(faults: &RefCell<crate::queue_core::Faults>, name: &str) -> bool {
    let fired = faults.borrow_mut().fire(name);
    if fired {
        worker::console_warn!("injected fault: {name}");
    }
    fired
}

/// Attached to a runner's socket; `capacity` and `tools` are set by its `hello`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunnerSocket {
    runner_id: String,
    name: String,
    capacity: Option<u32>,
    #[serde(default)]
    tools: Option<RunnerTools>,
    /// This socket's own id: a runner's slot is forgotten only when the socket it came from closes.
    #[serde(default)]
    socket_id: String,
    #[serde(default)]
    connected_ms: i64,
    /// When the runner last sent anything on this socket.
    #[serde(default)]
    last_seen_ms: i64,
    /// The host load its last `load` message reported (monitoring).
    #[serde(default)]
    load: Option<RunnerLoad>,
}

#[durable_object]
pub struct Queue {
    inner: Rc<QueueInner>,
}

/// The queue's state and logic, shared with the work it leaves running after an answer (a
/// dispatch after an enqueue or a release).
pub struct QueueInner {
    state: State,
    env: Env,
    limits: Limits,
    heartbeat_secs: u32,
    /// Period of the reconciliation with the rooms and D1 (`RECONCILE_SECS`, default 30).
    reconcile_ms: i64,
    core: RefCell<Option<QueueState>>,
    waiting: Rc<RefCell<HashMap<String, oneshot::Sender<serde_json::Value>>>>,
    /// Requests in flight per runner (the least busy runner gets the next one).
    in_flight: Rc<RefCell<HashMap<String, u32>>>,
    /// Jobs whose gather turn found no runner: their rooms are told when one says hello, so the
    /// turn need not wait out its backoff.
    gather_waiting: RefCell<std::collections::BTreeSet<String>>,
    /// Leases whose announcement is in flight: the alarm does not announce them a second time
    /// (the room would accept the same lease again, and the runner get `assign` twice).
    announcing: RefCell<std::collections::BTreeSet<String>>,
    /// When reconciliation last ran (0: not since the object started, so soon).
    reconciled_ms: RefCell<i64>,
    /// Test-only faults (`KILN_FAULTS`, builds with the `faults` feature).
    #[cfg(feature = "faults")]
    faults: RefCell<crate::queue_core::Faults>,
}

#[derive(Deserialize)]
struct DataRow {
    data: String,
}

impl QueueInner {
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
            // A runner's current socket is its newest one that said hello.
            let mut newest: HashMap<String, RunnerSocket> = HashMap::new();
            for ws in self.state.get_websockets() {
                if let Ok(Some(info)) = ws.deserialize_attachment::<RunnerSocket>() {
                    if info.capacity.is_some() && newest.get(&info.runner_id).is_none_or(|o| o.connected_ms <= info.connected_ms) {
                        newest.insert(info.runner_id.clone(), info);
                    }
                }
            }
            for info in newest.into_values() {
                core.runners.push(crate::queue_core::RunnerSlot {
                    runner_id: info.runner_id,
                    capacity: info.capacity.unwrap_or(0),
                    socket_id: info.socket_id,
                });
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

    /// The socket `runner_id` is connected on (its slot's socket).
    fn runner_socket(&self, runner_id: &str) -> Option<WebSocket> {
        let current = self.with_core(|c| c.socket_of(runner_id).map(str::to_string)).ok().flatten()?;
        self.state.get_websockets_with_tag(runner_id).into_iter().find(|ws| {
            ws.deserialize_attachment::<RunnerSocket>().ok().flatten().is_some_and(|i| i.socket_id == current)
        })
    }

    /// Whether an injected fault named `name` fires (using one up); never in production builds.
    fn fault(&self, name: &str) -> bool {
        #[cfg(feature = "faults")]
        return fire_fault(&self.faults, name);
        #[cfg(not(feature = "faults"))]
        {
            let _ = name;
            false
        }
    }

    /// A call to a job's room.
    async fn room_call<T: serde::de::DeserializeOwned>(
        &self,
        job_id: &str,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> ApiResult<T> {
        if self.fault("queue_room_calls") {
            return Err(ApiError::Unavailable(format!("injected fault: room call {path} failed")));
        }
        let room = env::job_room(&self.env, job_id)?;
        http::call(&room, method, path, body).await
    }

    fn send_to_runner(&self, runner_id: &str, msg: &EdgeMessage) -> bool {
        match self.runner_socket(runner_id) {
            Some(ws) => ws.send(msg).is_ok(),
            None => false,
        }
    }

    /// Sets the alarm for the next thing due: a lease expiry, a lease to announce again, a runner
    /// socket to check for silence, or the next reconciliation (while anything is in the queue or
    /// connected).
    async fn schedule_alarm(&self) -> ApiResult<()> {
        let now = now_ms();
        let (expiry, unannounced, busy) =
            self.with_core(|c| (c.next_expiry(), !c.unannounced().is_empty(), !c.pending.is_empty() || !c.leases.is_empty()))?;
        let sockets = self.state.get_websockets();
        let mut due: Vec<i64> = expiry.into_iter().collect();
        if unannounced {
            due.push(now + RETRY_MS);
        }
        for ws in &sockets {
            if let Ok(Some(info)) = ws.deserialize_attachment::<RunnerSocket>() {
                due.push(info.last_seen_ms.max(info.connected_ms) + self.limits.lease_ms + 1);
            }
        }
        if busy || !sockets.is_empty() {
            let last = *self.reconciled_ms.borrow();
            due.push(if last == 0 { now + RETRY_MS } else { last + self.reconcile_ms });
        }
        if let Some(at) = due.into_iter().min() {
            let delay = (at - now).max(50);
            self.state.storage().set_alarm(Duration::from_millis(delay as u64)).await?;
        }
        Ok(())
    }

    /// Pairs pending jobs with free runner slots until nothing more fits. Each lease is persisted,
    /// then announced to the job's room (which moves it to `running`), and only then sent to the
    /// runner. A lease whose room did not answer stays unannounced and is announced again from the
    /// alarm under the same id.
    async fn dispatch(&self) -> ApiResult<()> {
        loop {
            let leases = self.with_core(|c| c.dispatch(now_ms(), &rfc3339(now_ms()), self.limits, new_id))?;
            if leases.is_empty() {
                break;
            }
            for lease in &leases {
                self.persist(&lease.job_id)?;
            }
            if self.fault("queue_restart_after_lease") {
                // As if the object restarted here: what is not persisted is gone.
                *self.core.borrow_mut() = None;
                *self.reconciled_ms.borrow_mut() = 0;
                self.schedule_alarm().await?;
                return Err(ApiError::Unavailable("injected fault: queue restarted after persisting leases".into()));
            }
            let mut progress = false;
            for lease in leases {
                progress |= self.announce(lease).await?;
            }
            if !progress {
                break;
            }
        }
        self.schedule_alarm().await
    }

    /// Dispatches for a caller whose own change is already persisted (an enqueue, a release, a
    /// hello): a dispatch that fails does not fail the caller; the alarm tries again soon.
    async fn dispatch_or_retry(&self) {
        if let Err(e) = self.dispatch().await {
            worker::console_error!("dispatch: {e:?}; trying again from the alarm");
            if let Err(e) = self.state.storage().set_alarm(Duration::from_millis(RETRY_MS as u64)).await {
                worker::console_error!("setting the alarm: {e:?}");
            }
        }
    }

    /// Dispatches once the caller has its answer: an enqueue or a release is persisted before it
    /// answers, and the caller (`POST /jobs`, a job's room at its end) need not wait for the room
    /// calls and socket sends a dispatch makes.
    fn dispatch_after_answer(self: &Rc<Self>) {
        let this = self.clone();
        self.state.wait_until(async move {
            // One timer turn first: on the edge's one thread the caller's answer is then written
            // before the dispatch's room transition and socket send run.
            worker::Delay::from(Duration::ZERO).await;
            this.dispatch_or_retry().await
        });
    }

    /// Tells the room a lease (again), then the runner. Answers whether the lease was settled
    /// (accepted, or dropped because the job ended); a room that did not answer leaves it
    /// unannounced, to be tried again.
    async fn announce(&self, lease: Lease) -> ApiResult<bool> {
        if !self.announcing.borrow_mut().insert(lease.lease_id.clone()) {
            return Ok(false);
        }
        let announced = self.announce_once(lease.clone()).await;
        self.announcing.borrow_mut().remove(&lease.lease_id);
        announced
    }

    async fn announce_once(&self, lease: Lease) -> ApiResult<bool> {
        let moved = self
            .room_call::<TransitionResult>(
                &lease.job_id,
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
        let room_app = match moved {
            Ok(result) => result.app,
            Err(ApiError::Conflict(_)) | Err(ApiError::NotFound(_)) => {
                // Cancelled (or gone) while it waited: forget it.
                self.with_core(|c| c.release(&lease.job_id))?;
                self.persist(&lease.job_id)?;
                return Ok(true);
            }
            Err(e) => {
                worker::console_error!("announcing lease of {}: {e:?}; trying again", lease.job_id);
                return Ok(false);
            }
        };
        if !self.with_core(|c| c.mark_announced(&lease.job_id, &lease.lease_id))? {
            return Ok(true);
        }
        self.persist(&lease.job_id)?;
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
        assignment.queued_ms = (lease.pending.submitted_ms > 0).then(|| (now_ms() - lease.pending.submitted_ms).max(0) as u64);
        if room_app.is_some() {
            assignment.app = room_app;
        }
        if let Some(landing) = assignment.landing.as_mut() {
            // The page's business data as it is now; a page gone meanwhile runs with none.
            match env::db(&self.env) {
                Ok(db) => match store::page_business_data(&db, &landing.landing_page_id).await {
                    Ok(data) => landing.payload = data.unwrap_or_else(|| serde_json::json!({})),
                    Err(e) => worker::console_error!("reading the page of {}: {e:?}", lease.job_id),
                },
                Err(e) => worker::console_error!("no D1 binding: {e}"),
            }
            if landing.payload.is_null() {
                landing.payload = serde_json::json!({});
            }
        }
        // A runner that vanished in between is handled by lease expiry.
        self.send_to_runner(&lease.runner_id, &EdgeMessage::Assign { assignment });
        Ok(true)
    }

    async fn enqueue(self: &Rc<Self>, req: EnqueueRequest) -> ApiResult<Position> {
        let job_id = req.pending.job_id.clone();
        if self.fault("queue_drop_enqueue") {
            // As if the object restarted before persisting: answered, but forgotten.
            return Ok(Position { position: 1 });
        }
        self.sql().exec(
            "INSERT OR REPLACE INTO assignments (job_id, data) VALUES (?, ?)",
            vec![SqlStorageValue::from(job_id.clone()), SqlStorageValue::from(serde_json::to_string(&req.assignment)?)],
        )?;
        let position = self.with_core(|c| c.enqueue(req.pending))?;
        self.persist(&job_id)?;
        self.dispatch_after_answer();
        Ok(Position { position })
    }

    async fn release(self: &Rc<Self>, req: ReleaseRequest) -> ApiResult<serde_json::Value> {
        let lease = self.with_core(|c| c.release(&req.job_id))?;
        self.persist(&req.job_id)?;
        if let (Some(lease), true) = (&lease, req.cancel) {
            self.send_to_runner(&lease.runner_id, &EdgeMessage::Cancel { job_id: req.job_id.clone() });
        }
        self.dispatch_after_answer();
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
            "pause" => EdgeMessage::Pause { job_id: req.job_id },
            "resume" => EdgeMessage::Resume { job_id: req.job_id },
            other => return Err(ApiError::BadRequest(format!("unknown relay {other:?}"))),
        };
        if !self.send_to_runner(&lease.runner_id, &msg) {
            return Err(ApiError::Unavailable("the job's runner is not connected right now".into()));
        }
        Ok(serde_json::json!({ "sent": true }))
    }

    /// The connected runner with the fewest requests in flight (a gather request that finds none
    /// is remembered: its room is told when a runner says hello).
    fn pick_runner(&self, request: &RunnerRequest) -> ApiResult<String> {
        let runners = self.with_core(|c| c.runners.iter().map(|r| r.runner_id.clone()).collect::<Vec<_>>())?;
        let runner = {
            let busy = self.in_flight.borrow();
            crate::queue_core::least_busy(&runners, |r| busy.get(r).copied().unwrap_or(0)).map(str::to_string)
        };
        runner.ok_or_else(|| {
            if let RunnerRequest::Gather(g) = request {
                self.gather_waiting.borrow_mut().insert(g.job_id.clone());
            }
            ApiError::Unavailable("no runner is connected".into())
        })
    }

    /// Sends a request to the connected runner with the fewest requests in flight (it holds no
    /// slot) and waits for its reply.
    async fn request(&self, request: RunnerRequest) -> ApiResult<serde_json::Value> {
        let runner_id = self.pick_runner(&request)?;
        self.ask_runner(&runner_id, request, REQUEST_TIMEOUT_SECS).await
    }

    /// `POST /gather`: sends a room's gather turn to the least busy runner and answers at once;
    /// the reply (or the timeout, [`REQUEST_TIMEOUT_SECS`]) goes to the room's `/gather-reply`
    /// with the turn's context, so no room waits on a model.
    fn gather(&self, req: GatherCall) -> ApiResult<serde_json::Value> {
        let request = RunnerRequest::Gather(req.request);
        let runner_id = self.pick_runner(&request)?;
        let (request_id, rx) = self.send_request(&runner_id, request)?;
        let (env, waiting, in_flight) = (self.env.clone(), self.waiting.clone(), self.in_flight.clone());
        let (job_id, context) = (req.job_id, req.context);
        self.state.wait_until(async move {
            let timeout = worker::Delay::from(Duration::from_secs(REQUEST_TIMEOUT_SECS));
            let answer = match select(rx, timeout).await {
                Either::Left((Ok(value), _)) => serde_json::json!({ "context": context, "result": value }),
                _ => {
                    waiting.borrow_mut().remove(&request_id);
                    serde_json::json!({ "context": context, "error": "the runner did not answer in time" })
                }
            };
            if let Some(n) = in_flight.borrow_mut().get_mut(&runner_id) {
                *n = n.saturating_sub(1);
            }
            // A room that cannot be told finds its turn stale later and runs it again.
            let told = match env::job_room(&env, &job_id) {
                Ok(room) => http::call::<serde_json::Value>(&room, Method::Post, "/gather-reply", Some(&answer)).await.map(|_| ()),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = told {
                worker::console_warn!("telling the room of {job_id} its gather reply: {e:?}");
            }
        });
        Ok(serde_json::json!({ "sent": true }))
    }

    /// Sends one request to a runner; answers its id and the channel its reply comes on. The
    /// runner counts one more request in flight until the caller takes it off.
    fn send_request(&self, runner_id: &str, request: RunnerRequest) -> ApiResult<(String, oneshot::Receiver<serde_json::Value>)> {
        let request_id = new_id();
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(request_id.clone(), tx);
        if !self.send_to_runner(runner_id, &EdgeMessage::Request { request_id: request_id.clone(), request }) {
            self.waiting.borrow_mut().remove(&request_id);
            return Err(ApiError::Unavailable("no runner is connected".into()));
        }
        *self.in_flight.borrow_mut().entry(runner_id.to_string()).or_insert(0) += 1;
        Ok((request_id, rx))
    }

    /// `POST /request-job`: a request for the runner that holds the job's lease.
    async fn request_job(&self, req: JobRequest) -> ApiResult<serde_json::Value> {
        let runner = self.with_core(|c| c.leases.get(&req.job_id).map(|l| l.runner_id.clone()))?;
        let Some(runner_id) = runner.filter(|r| self.runner_socket(r).is_some()) else {
            return Err(ApiError::NotFound("no runner holds this job".into()));
        };
        self.ask_runner(&runner_id, req.request, JOB_REQUEST_TIMEOUT_SECS).await
    }

    /// Sends one request to a runner and waits up to `timeout_secs` for its reply.
    async fn ask_runner(&self, runner_id: &str, request: RunnerRequest, timeout_secs: u64) -> ApiResult<serde_json::Value> {
        let (request_id, rx) = self.send_request(runner_id, request)?;
        let timeout = worker::Delay::from(Duration::from_secs(timeout_secs));
        let answer = match select(rx, timeout).await {
            Either::Left((Ok(value), _)) => Ok(value),
            _ => {
                self.waiting.borrow_mut().remove(&request_id);
                Err(ApiError::Unavailable("the runner did not answer in time".into()))
            }
        };
        if let Some(n) = self.in_flight.borrow_mut().get_mut(runner_id) {
            *n = n.saturating_sub(1);
        }
        answer
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
        let runners = self
            .state
            .get_websockets()
            .iter()
            .filter_map(|ws| ws.deserialize_attachment::<RunnerSocket>().ok().flatten())
            .filter(|info| info.capacity.is_some())
            .map(|info| RunnerLoadView { name: info.name, load: info.load, last_seen: crate::time::rfc3339(info.last_seen_ms) })
            .collect();
        self.with_core(|c| Stats {
            runners,
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
            if let Ok(Some(info)) = old.deserialize_attachment::<RunnerSocket>() {
                self.with_core(|c| c.disconnect(&runner_id, &info.socket_id))?;
            }
            let _ = old.close(Some(4000), Some("replaced by a new connection"));
        }
        let pair = WebSocketPair::new()?;
        self.state.accept_websocket_with_tags(&pair.server, &[runner_id.as_str()]);
        let now = now_ms();
        pair.server.serialize_attachment(RunnerSocket {
            runner_id,
            name,
            capacity: None,
            tools: None,
            socket_id: new_id(),
            connected_ms: now,
            last_seen_ms: now,
            load: None,
        })?;
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
        info.last_seen_ms = now;
        match msg {
            RunnerMessage::Hello { capacity, running, tools, .. } => {
                info.capacity = Some(capacity);
                info.tools = tools;
                ws.serialize_attachment(&info)?;
                let held: Vec<(String, String)> = running.into_iter().map(|h| (h.job_id, h.lease_id)).collect();
                let stale = self.with_core(|c| c.connect(&info.runner_id, &info.socket_id, capacity, &held, now, self.limits))?;
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
                self.dispatch_or_retry().await;
                let waiting = std::mem::take(&mut *self.gather_waiting.borrow_mut());
                for job_id in waiting {
                    if let Err(e) = self.room_call::<serde_json::Value>(&job_id, Method::Post, "/gather-now", None::<&()>).await {
                        worker::console_warn!("telling the room of {job_id} a runner is back: {e:?}");
                    }
                }
            }
            RunnerMessage::Heartbeat { running } => {
                if info.capacity.is_none() {
                    ws.send(&EdgeMessage::Error { message: "send hello first".into() })?;
                    return Ok(());
                }
                ws.serialize_attachment(&info)?;
                let held: Vec<(String, String)> = running.into_iter().map(|h| (h.job_id, h.lease_id)).collect();
                let stale = self.with_core(|c| c.heartbeat(&info.runner_id, &held, now, self.limits))?;
                for (job_id, _) in &held {
                    self.persist(job_id)?;
                }
                for job_id in stale {
                    ws.send(&EdgeMessage::Cancel { job_id })?;
                }
                // The edge's answer to every heartbeat (its pong): the session's settings again.
                ws.send(&EdgeMessage::Welcome {
                    runner_id: info.runner_id.clone(),
                    heartbeat_secs: self.heartbeat_secs,
                    lease_secs: (self.limits.lease_ms / 1000) as u32,
                })?;
                self.schedule_alarm().await?;
            }
            RunnerMessage::Load(load) => {
                info.load = Some(load);
                ws.serialize_attachment(&info)?;
            }
            RunnerMessage::Reply { request_id, result } => {
                ws.serialize_attachment(&info)?;
                if let Some(tx) = self.waiting.borrow_mut().remove(&request_id) {
                    let _ = tx.send(result);
                }
            }
        }
        Ok(())
    }

    /// Expires leases not renewed in time and tells their rooms. A room that cannot be told keeps
    /// the job where the queue can find it again: a requeued job stays pending (its next lease
    /// replaces the old one in the room), a failed one gets its lease back to try again.
    async fn expire_leases(&self) -> ApiResult<()> {
        let now = now_ms();
        let before = self.with_core(|c| c.leases.clone())?;
        let expired = self.with_core(|c| c.expire(now, self.limits))?;
        let max = self.limits.max_attempts;
        for e in expired {
            let (job_id, lease_id, to, message, patch) = match e {
                Expired::Returned { job_id } => {
                    self.persist(&job_id)?;
                    continue;
                }
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
            let moved = self
                .room_call::<TransitionResult>(
                    &job_id,
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
            match moved {
                Ok(_) => {}
                Err(ApiError::Conflict(_)) | Err(ApiError::NotFound(_)) => {
                    // The room no longer holds the job under that lease: if it ended meanwhile
                    // (finished or cancelled) it must not run again; otherwise it stays queued.
                    if self.room_ended(&job_id).await? {
                        self.with_core(|c| c.release(&job_id))?;
                        self.persist(&job_id)?;
                    }
                }
                Err(e) => {
                    worker::console_error!("expiry of {job_id}: {e:?}; trying again");
                    if to == JobStatus::Failed {
                        if let Some(lease) = before.get(&job_id).cloned() {
                            self.with_core(|c| c.reinstate(lease, now + RETRY_MS))?;
                            self.persist(&job_id)?;
                        }
                    }
                }
            }
        }
        self.dispatch().await
    }

    /// Whether a job's room says it ended (or has no such job). A room that does not answer: no.
    async fn room_ended(&self, job_id: &str) -> ApiResult<bool> {
        match self.room_call::<RoomMeta>(job_id, Method::Get, "/meta", None::<&()>).await {
            Ok(meta) => Ok(meta.status.is_terminal()),
            Err(ApiError::NotFound(_)) => Ok(true),
            Err(e) => {
                worker::console_error!("asking the room of {job_id}: {e:?}");
                Ok(false)
            }
        }
    }

    /// Announces again every lease its room has not accepted.
    async fn announce_pending(&self) -> ApiResult<()> {
        for lease in self.with_core(|c| c.unannounced())? {
            self.announce(lease).await?;
        }
        Ok(())
    }

    /// Closes runner sockets silent for longer than a lease (a half-open connection): the runner
    /// stops counting as capacity, and its leases run out unless it reconnects.
    fn drop_silent_sockets(&self) -> ApiResult<()> {
        let now = now_ms();
        for ws in self.state.get_websockets() {
            let Ok(Some(info)) = ws.deserialize_attachment::<RunnerSocket>() else { continue };
            if info.last_seen_ms.max(info.connected_ms) + self.limits.lease_ms < now {
                worker::console_warn!("runner {} silent for longer than a lease; dropping its socket", info.runner_id);
                self.with_core(|c| c.disconnect(&info.runner_id, &info.socket_id))?;
                let _ = ws.close(Some(4002), Some("silent for longer than the lease"));
            }
        }
        Ok(())
    }

    /// Compares the queue with the rooms and D1 and repairs both directions: a lease whose room
    /// ended is released; a D1 row `queued`/`running` the queue does not hold is enqueued again
    /// (its room opened first if it has none) or, if its room ended, copied again from the room.
    async fn reconcile(&self) -> ApiResult<()> {
        *self.reconciled_ms.borrow_mut() = now_ms();
        let leases: Vec<Lease> = self.with_core(|c| c.leases.values().cloned().collect())?;
        for lease in leases {
            if self.room_ended(&lease.job_id).await? {
                let released = self.with_core(|c| c.release(&lease.job_id))?;
                self.persist(&lease.job_id)?;
                if released.is_some() {
                    worker::console_warn!("reconcile: released the lease of ended job {}", lease.job_id);
                    self.send_to_runner(&lease.runner_id, &EdgeMessage::Cancel { job_id: lease.job_id.clone() });
                }
            }
        }
        let name = self.state.id().name().unwrap_or_else(|| "default".into());
        let db = env::db(&self.env)?;
        let rows = store::jobs_in_flight(&db, &name, now_ms() - RECONCILE_GRACE_MS).await?;
        for row in rows {
            if self.with_core(|c| c.holds(&row.id))? {
                continue;
            }
            let meta = match self.room_call::<RoomMeta>(&row.id, Method::Get, "/meta", None::<&()>).await {
                Ok(meta) => meta,
                Err(ApiError::NotFound(_)) => {
                    let init = InitRequest { meta: room_meta(&row), message: "job queued".into(), row: None };
                    match self.room_call::<RoomMeta>(&row.id, Method::Post, "/init", Some(&init)).await {
                        Ok(meta) => meta,
                        Err(e) => {
                            worker::console_error!("reconcile: opening the room of {}: {e:?}", row.id);
                            continue;
                        }
                    }
                }
                Err(e) => {
                    worker::console_error!("reconcile: asking the room of {}: {e:?}", row.id);
                    continue;
                }
            };
            if meta.status.is_terminal() {
                worker::console_warn!("reconcile: D1 says {} is {}, its room {}; copying again", row.id, row.status, meta.status.as_str());
                if let Err(e) = self.room_call::<serde_json::Value>(&row.id, Method::Post, "/repair", None::<&()>).await {
                    worker::console_error!("reconcile: repairing the D1 row of {}: {e:?}", row.id);
                }
                continue;
            }
            worker::console_warn!("reconcile: job {} ({}) was in no queue; enqueued again", row.id, meta.status.as_str());
            let req = enqueue_request(&row);
            let job_id = req.pending.job_id.clone();
            self.sql().exec(
                "INSERT OR REPLACE INTO assignments (job_id, data) VALUES (?, ?)",
                vec![SqlStorageValue::from(job_id.clone()), SqlStorageValue::from(serde_json::to_string(&req.assignment)?)],
            )?;
            self.with_core(|c| c.enqueue(req.pending))?;
            self.persist(&job_id)?;
        }
        self.dispatch().await
    }

    /// Everything the alarm does; an error sets the alarm again soon.
    async fn on_alarm(&self) -> ApiResult<()> {
        self.drop_silent_sockets()?;
        self.expire_leases().await?;
        self.announce_pending().await?;
        let last = *self.reconciled_ms.borrow();
        if last == 0 || now_ms() >= last + self.reconcile_ms {
            self.reconcile().await?;
        }
        self.schedule_alarm().await
    }

    async fn route(self: &Rc<Self>, mut req: Request) -> ApiResult {
        let path = req.path();
        let url = req.url()?;
        let query = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.to_string());
        match (req.method(), path.as_str()) {
            (Method::Post, "/enqueue") => json(&self.enqueue(body_as(&mut req).await?).await?),
            (Method::Post, "/release") => json(&self.release(body_as(&mut req).await?).await?),
            (Method::Post, "/relay") => json(&self.relay(body_as(&mut req).await?)?),
            (Method::Post, "/request") => json(&self.request(body_as(&mut req).await?).await?),
            (Method::Post, "/gather") => json(&self.gather(body_as(&mut req).await?)?),
            (Method::Post, "/request-job") => json(&self.request_job(body_as(&mut req).await?).await?),
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
        Queue { inner: Rc::new(QueueInner::new(state, env)) }
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        Ok(self.inner.route(req).await.unwrap_or_else(ApiError::into_response))
    }

    async fn alarm(&self) -> worker::Result<Response> {
        if let Err(e) = self.inner.on_alarm().await {
            worker::console_error!("queue alarm: {e:?}; trying again");
            self.inner.state.storage().set_alarm(Duration::from_millis(RETRY_MS as u64)).await?;
        }
        Response::ok("ok")
    }

    async fn websocket_message(&self, ws: WebSocket, message: WebSocketIncomingMessage) -> worker::Result<()> {
        if let WebSocketIncomingMessage::String(text) = message {
            if let Err(e) = self.inner.on_runner_message(&ws, &text).await {
                worker::console_error!("runner message: {e:?}");
            }
        }
        Ok(())
    }

    async fn websocket_close(&self, ws: WebSocket, _code: usize, _reason: String, _was_clean: bool) -> worker::Result<()> {
        self.inner.forget_socket(&ws);
        Ok(())
    }

    async fn websocket_error(&self, ws: WebSocket, _error: worker::Error) -> worker::Result<()> {
        self.inner.forget_socket(&ws);
        Ok(())
    }
}

impl QueueInner {
    fn new(state: State, env: Env) -> Self {
        let config = Config::from_env(&env);
        let reconcile_secs = env.var("RECONCILE_SECS").ok().and_then(|v| v.to_string().trim().parse::<i64>().ok()).unwrap_or(30);
        let queue = Self {
            #[cfg(feature = "faults")]
            faults: RefCell::new(read_faults(&env)),
            state,
            env,
            limits: config.limits,
            heartbeat_secs: config.heartbeat_secs,
            reconcile_ms: reconcile_secs.max(1) * 1000,
            core: RefCell::new(None),
            waiting: Rc::new(RefCell::new(HashMap::new())),
            in_flight: Rc::new(RefCell::new(HashMap::new())),
            gather_waiting: RefCell::new(Default::default()),
            announcing: RefCell::new(Default::default()),
            reconciled_ms: RefCell::new(0),
        };
        if let Err(e) = queue.ensure_schema() {
            worker::console_error!("queue schema: {e}");
        }
        queue
    }

    /// A runner's socket closed: the runner stops counting as capacity; its leases run out unless
    /// it reconnects and re-announces them.
    fn forget_socket(&self, ws: &WebSocket) {
        if let Ok(Some(info)) = ws.deserialize_attachment::<RunnerSocket>() {
            // Only this socket's slot: a runner that reconnected meanwhile stays on its new one.
            let _ = self.with_core(|c| c.disconnect(&info.runner_id, &info.socket_id));
        }
        let _ = ws.close(Some(1000), Some("closing"));
    }
}
