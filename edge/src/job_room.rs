//! The JobRoom Durable Object, one per job: the job's event log (dense `seq`), its WebSockets
//! (hibernation API) and its status as single writer (it updates the job's D1 row).
//!
//! Internal API (called by the Worker and the Queue object, never exposed):
//! `POST /init`, `POST /transition`, `POST /append`, `POST /runner-batch`, `GET /events` (one page:
//! `after`, `limit`, `kind`), `GET /ws` (replays the log after `after` a page at a time, then
//! follows).

use std::cell::RefCell;
use std::rc::Rc;

use kiln_schemas::events::{parse_cursor, ClientMessage, EventBody, LogStream, ServerEvent, SocketError};
use kiln_schemas::runner::{BatchAck, EventBatch, Outcome, RunnerEvent, UsageTotals};
use kiln_schemas::status::{JobStatus, JobType};
use serde::{Deserialize, Serialize};
use worker::{
    durable_object, wasm_bindgen, DurableObject, Env, Method, Request, Response, SqlStorage, SqlStorageValue, State,
    WebSocket, WebSocketIncomingMessage, WebSocketPair,
};

use crate::env::{self, now_ms};
use crate::http::{self, body_as, json, ApiError, ApiResult};
use crate::store::{self, JobPatch};
use crate::time::rfc3339;

/// What the room knows of its job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomMeta {
    pub job_id: String,
    pub owner: String,
    pub job_type: JobType,
    pub queue: String,
    pub status: JobStatus,
    #[serde(default)]
    pub lease_id: Option<String>,
    #[serde(default)]
    pub attempt: u32,
    /// The runner that holds `lease_id`: only it may post the job's events.
    #[serde(default)]
    pub runner_id: Option<String>,
    /// Tokens and cost the runners reported so far; copied to D1 with each status change.
    #[serde(default)]
    pub usage: UsageTotals,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InitRequest {
    pub meta: RoomMeta,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TransitionRequest {
    pub to: JobStatus,
    pub message: String,
    #[serde(default)]
    pub patch: JobPatch,
    /// Set by the queue when it dispatches (`to = running`).
    #[serde(default)]
    pub lease: Option<(String, u32)>,
    /// The runner the lease goes to (with `lease`).
    #[serde(default)]
    pub runner_id: Option<String>,
    /// Only move if the job is currently held under this lease (lease expiry).
    #[serde(default)]
    pub if_lease: Option<String>,
    /// The queue already forgot the job; don't tell it again.
    #[serde(default)]
    pub from_queue: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TransitionResult {
    pub from: JobStatus,
    pub to: JobStatus,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AppendRequest {
    pub events: Vec<EventBody>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Appended {
    pub last_seq: u64,
}

/// Attached to each socket, so it survives hibernation.
#[derive(Debug, Serialize, Deserialize)]
struct SocketInfo {
    sender: String,
    /// When the credential the socket was opened with expires (epoch ms): the socket is closed
    /// then (the room's alarm), and takes no message after it.
    #[serde(default)]
    expires_at_ms: Option<i64>,
}

/// Events the replay of a new socket reads from SQLite at a time.
pub const EVENTS_PAGE: usize = 500;
/// The most events one `GET /events` answers (`limit`; default [`EVENTS_PAGE`]).
pub const MAX_EVENTS_READ: usize = 5000;

/// The close code of a socket whose access token expired (4000-4999: the application's own).
const TOKEN_EXPIRED_CLOSE: u16 = 4001;

/// A status change applied in the room's storage, with what must follow it.
struct Applied {
    from: JobStatus,
    meta: RoomMeta,
    /// The seq of its status event.
    seq: u64,
    patch: JobPatch,
    /// The new events' texts, to broadcast once committed.
    texts: Vec<String>,
}

/// Retry delay of a D1 status copy that failed.
const D1_RETRY_MS: i64 = 2_000;

/// What a transaction in the room touches: its SQLite and the caches of its meta and `next_seq`
/// (shared with the room, so a rolled-back transaction can drop them).
#[derive(Clone)]
struct RoomStore {
    sql: SqlStorage,
    meta: Rc<RefCell<Option<RoomMeta>>>,
    next_seq: Rc<RefCell<Option<u64>>>,
    #[cfg(feature = "faults")]
    faults: Rc<RefCell<crate::queue_core::Faults>>,
}

impl RoomStore {
    fn sql(&self) -> SqlStorage {
        self.sql.clone()
    }

    fn load_meta(&self) -> ApiResult<Option<RoomMeta>> {
        if let Some(m) = self.meta.borrow().as_ref() {
            return Ok(Some(m.clone()));
        }
        #[derive(Deserialize)]
        struct Row {
            v: String,
        }
        let rows: Vec<Row> = self.sql().exec("SELECT v FROM meta WHERE k = 'meta'", None)?.to_array()?;
        let meta = match rows.first() {
            Some(r) => Some(serde_json::from_str::<RoomMeta>(&r.v)?),
            None => None,
        };
        *self.meta.borrow_mut() = meta.clone();
        Ok(meta)
    }

    fn meta(&self) -> ApiResult<RoomMeta> {
        self.load_meta()?.ok_or_else(|| ApiError::NotFound("job not found".into()))
    }

    fn save_meta(&self, meta: &RoomMeta) -> ApiResult<()> {
        self.sql().exec(
            "INSERT INTO meta (k, v) VALUES ('meta', ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            vec![SqlStorageValue::from(serde_json::to_string(meta)?)],
        )?;
        *self.meta.borrow_mut() = Some(meta.clone());
        Ok(())
    }

    fn next_seq(&self) -> ApiResult<u64> {
        if let Some(n) = *self.next_seq.borrow() {
            return Ok(n);
        }
        #[derive(Deserialize)]
        struct Row {
            m: Option<i64>,
        }
        let rows: Vec<Row> = self.sql().exec("SELECT MAX(seq) AS m FROM events", None)?.to_array()?;
        let n = rows.first().and_then(|r| r.m).unwrap_or(0) as u64 + 1;
        *self.next_seq.borrow_mut() = Some(n);
        Ok(n)
    }

    /// Whether an injected fault named `name` fires (using one up); never in production builds.
    fn fault(&self, name: &str) -> bool {
        #[cfg(feature = "faults")]
        return crate::queue_object::fire_fault(&self.faults, name);
        #[cfg(not(feature = "faults"))]
        {
            let _ = name;
            false
        }
    }

    /// Stores events under the next seqs (call inside [`JobRoom::atomically`]); answers their texts
    /// and the last seq.
    fn insert_events(&self, bodies: Vec<EventBody>) -> ApiResult<(Vec<String>, u64)> {
        let mut seq = self.next_seq()?;
        let mut texts = vec![];
        for body in bodies {
            let kind = body.kind();
            let text = serde_json::to_string(&ServerEvent { seq, body })?;
            self.sql().exec(
                "INSERT INTO events (seq, kind, body) VALUES (?, ?, ?)",
                vec![SqlStorageValue::from(seq as i64), SqlStorageValue::from(kind.to_string()), SqlStorageValue::from(text.clone())],
            )?;
            texts.push(text);
            seq += 1;
            *self.next_seq.borrow_mut() = Some(seq);
        }
        Ok((texts, seq - 1))
    }

    /// The one place a job's status changes: checks it, saves the new meta and appends its status
    /// event (inside [`JobRoom::atomically`]). `None`: the queue announced a lease the job already
    /// runs under (a retried dispatch), nothing changes.
    fn apply_transition(&self, req: &TransitionRequest) -> ApiResult<Option<Applied>> {
        let mut meta = self.meta()?;
        let from = meta.status;
        if let Some(lease) = &req.if_lease {
            if meta.lease_id.as_deref() != Some(lease.as_str()) || from != JobStatus::Running {
                return Err(ApiError::Conflict("job is no longer held under that lease".into()));
            }
        }
        match (&req.lease, req.to) {
            (Some((lease_id, _)), JobStatus::Running) if from == JobStatus::Running && meta.lease_id.as_deref() == Some(lease_id.as_str()) => {
                return Ok(None);
            }
            (Some(_), JobStatus::Running) if from == JobStatus::Running => {
                // The queue leased the job again (it is the authority on leases): the old lease
                // is void, so batches under it are refused from now on.
            }
            _ if !from.can_become(req.to) => {
                return Err(ApiError::Conflict(format!("job is {}; it cannot become {}", from.as_str(), req.to.as_str())));
            }
            _ => {}
        }
        meta.status = req.to;
        match (&req.lease, req.to) {
            (Some((lease_id, attempt)), JobStatus::Running) => {
                meta.lease_id = Some(lease_id.clone());
                meta.attempt = *attempt;
                meta.runner_id = req.runner_id.clone();
            }
            _ => {
                meta.lease_id = None;
                meta.runner_id = None;
            }
        }
        self.save_meta(&meta)?;
        let mut patch = req.patch.clone();
        if req.lease.is_some() {
            patch.attempts = Some(meta.attempt as i64);
        }
        patch.usage = (!meta.usage.is_empty()).then_some(meta.usage);
        let (texts, seq) = self.insert_events(vec![JobRoom::status_event(&meta, &req.message, &patch)])?;
        Ok(Some(Applied { from, meta, seq, patch, texts }))
    }

    /// The storage part of a runner batch (inside [`JobRoom::atomically`]).
    #[allow(clippy::type_complexity)]
    fn store_batch(&self, batch: EventBatch) -> ApiResult<(u32, u32, Vec<String>, Option<Applied>)> {
        let (mut stored, mut duplicates) = (0, 0);
        let mut bodies = vec![];
        let mut finished = None;
        for ev in batch.events {
            #[derive(Deserialize)]
            struct Row {
                #[allow(dead_code)]
                idx: i64,
            }
            let seen: Vec<Row> = self
                .sql()
                .exec(
                    "SELECT idx FROM runner_idx WHERE lease_id = ? AND idx = ?",
                    vec![SqlStorageValue::from(batch.lease_id.clone()), SqlStorageValue::from(ev.index as i64)],
                )?
                .to_array()?;
            if !seen.is_empty() {
                duplicates += 1;
                continue;
            }
            self.sql().exec(
                "INSERT INTO runner_idx (lease_id, idx) VALUES (?, ?)",
                vec![SqlStorageValue::from(batch.lease_id.clone()), SqlStorageValue::from(ev.index as i64)],
            )?;
            stored += 1;
            let ts = rfc3339(now_ms());
            match ev.event {
                RunnerEvent::Log { stream, content } => bodies.push(EventBody::Log { stream, content, timestamp: ts }),
                RunnerEvent::Agent { event } => bodies.push(EventBody::AgentEvent { event, timestamp: ts }),
                RunnerEvent::Usage { usage } => {
                    let mut meta = self.meta()?;
                    meta.usage.add(&usage);
                    self.save_meta(&meta)?;
                    bodies.push(EventBody::Usage { usage, totals: meta.usage, timestamp: ts });
                }
                RunnerEvent::Started { message } => {
                    bodies.push(EventBody::Log { stream: LogStream::System, content: message, timestamp: ts })
                }
                RunnerEvent::Iteration { iteration } => bodies.push(EventBody::Iteration { iteration, timestamp: ts }),
                // App-build pipeline events: rendered by the app builder's room logic (next commit).
                RunnerEvent::Phase { .. }
                | RunnerEvent::Stage { .. }
                | RunnerEvent::Dialogue { .. }
                | RunnerEvent::Prd { .. }
                | RunnerEvent::Backlog { .. }
                | RunnerEvent::Ticket { .. } => {}
                RunnerEvent::Finished { outcome, message, pr_url, completion_reason, total_iterations, error_message } => {
                    finished = Some((
                        outcome,
                        message,
                        JobPatch {
                            pr_url,
                            completion_reason: completion_reason
                                .and_then(|c| serde_json::to_value(c).ok())
                                .and_then(|v| v.as_str().map(str::to_string)),
                            total_iterations: total_iterations.map(|n| n as i64),
                            error_message,
                            attempts: None,
                            usage: None,
                            app: None,
                        },
                    ));
                }
            }
        }
        if bodies.len() > 1 && self.fault("room_batch_partial") {
            // Half the batch stored, then a failure: the transaction must leave none of it.
            let half = bodies.len() / 2;
            self.insert_events(bodies.drain(..half).collect())?;
            return Err(ApiError::Internal("injected fault: runner batch failed half-way".into()));
        }
        let (texts, _) = self.insert_events(bodies)?;
        let applied = match finished {
            Some((outcome, message, patch)) => {
                let to = match outcome {
                    Outcome::Completed => JobStatus::Completed,
                    Outcome::Failed => JobStatus::Failed,
                };
                let req = TransitionRequest { to, message, patch, lease: None, runner_id: None, if_lease: None, from_queue: false };
                self.apply_transition(&req)?
            }
            None => None,
        };
        Ok((stored, duplicates, texts, applied))
    }
}

#[durable_object]
pub struct JobRoom {
    state: State,
    env: Env,
    meta: Rc<RefCell<Option<RoomMeta>>>,
    next_seq: Rc<RefCell<Option<u64>>>,
    /// Test-only faults (`KILN_FAULTS`, builds with the `faults` feature).
    #[cfg(feature = "faults")]
    faults: Rc<RefCell<crate::queue_core::Faults>>,
}

impl JobRoom {
    fn sql(&self) -> SqlStorage {
        self.state.storage().sql()
    }

    fn store(&self) -> RoomStore {
        RoomStore {
            sql: self.sql(),
            meta: self.meta.clone(),
            next_seq: self.next_seq.clone(),
            #[cfg(feature = "faults")]
            faults: self.faults.clone(),
        }
    }

    fn load_meta(&self) -> ApiResult<Option<RoomMeta>> {
        self.store().load_meta()
    }

    fn meta(&self) -> ApiResult<RoomMeta> {
        self.store().meta()
    }

    fn save_meta(&self, meta: &RoomMeta) -> ApiResult<()> {
        self.store().save_meta(meta)
    }

    fn fault(&self, name: &str) -> bool {
        self.store().fault(name)
    }

    fn ensure_schema(&self) -> worker::Result<()> {
        let sql = self.sql();
        sql.exec("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)", None)?;
        sql.exec("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL)", None)?;
        sql.exec("CREATE TABLE IF NOT EXISTS runner_idx (lease_id TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (lease_id, idx))", None)?;
        Ok(())
    }

    /// Runs `f` in one SQLite transaction (`storage.transactionSync`): its writes commit together,
    /// or not at all when it fails; then the cached meta and `next_seq` are read again from storage.
    /// `f` is synchronous, so nothing else runs in the room meanwhile.
    fn atomically<T: 'static>(&self, f: impl FnOnce(&RoomStore) -> ApiResult<T> + 'static) -> ApiResult<T> {
        use worker::js_sys::{Function, Reflect};
        use worker::wasm_bindgen::{closure::Closure, JsCast, JsValue};

        let out: Rc<RefCell<Option<ApiResult<T>>>> = Rc::new(RefCell::new(None));
        let (result_slot, store) = (out.clone(), self.store());
        let mut f = Some(f);
        let callback = Closure::<dyn FnMut() -> Result<JsValue, JsValue>>::new(move || {
            let f = f.take().ok_or_else(|| JsValue::from_str("transaction callback called twice"))?;
            let result = f(&store);
            let failed = result.is_err();
            *result_slot.borrow_mut() = Some(result);
            if failed {
                Err(JsValue::from_str("rolled back"))
            } else {
                Ok(JsValue::UNDEFINED)
            }
        });
        let storage = self.state.storage();
        let raw: &JsValue = storage.as_raw().as_ref();
        let called = Reflect::get(raw, &JsValue::from_str("transactionSync"))
            .and_then(|t| t.dyn_into::<Function>())
            .and_then(|t| t.call1(raw, callback.as_ref().unchecked_ref()));
        drop(callback);
        let result = match (out.borrow_mut().take(), called) {
            (Some(result), _) => result,
            (None, Err(e)) => Err(ApiError::Internal(format!("transaction: {e:?}"))),
            (None, Ok(_)) => Err(ApiError::Internal("transaction callback did not run".into())),
        };
        if result.is_err() {
            *self.meta.borrow_mut() = None;
            *self.next_seq.borrow_mut() = None;
        }
        result
    }

    /// Sends committed events to every socket.
    fn broadcast(&self, texts: &[String]) {
        let sockets = self.state.get_websockets();
        for text in texts {
            for ws in &sockets {
                let _ = ws.send_with_str(text);
            }
        }
    }

    /// Appends events with the next seqs, all or none, and sends them to every socket. Synchronous:
    /// nothing can interleave between the write and the broadcast, which is what makes
    /// replay-then-follow exact.
    fn append(&self, bodies: Vec<EventBody>) -> ApiResult<u64> {
        let (texts, last) = self.atomically(move |st| st.insert_events(bodies))?;
        self.broadcast(&texts);
        Ok(last)
    }

    /// At most `limit` events after `after` (of one kind, if given), in `seq` order, as their
    /// JSON text with their seq: one page of the log, never the whole of it.
    fn events_after(&self, after: u64, kind: Option<&str>, limit: usize) -> ApiResult<Vec<(u64, String)>> {
        #[derive(Deserialize)]
        struct Row {
            seq: i64,
            body: String,
        }
        let (after, limit) = (SqlStorageValue::from(after as i64), SqlStorageValue::from(limit as i64));
        let rows: Vec<Row> = match kind {
            Some(k) => self
                .sql()
                .exec(
                    "SELECT seq, body FROM events WHERE seq > ? AND kind = ? ORDER BY seq LIMIT ?",
                    vec![after, SqlStorageValue::from(k.to_string()), limit],
                )?
                .to_array()?,
            None => self
                .sql()
                .exec("SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", vec![after, limit])?
                .to_array()?,
        };
        Ok(rows.into_iter().map(|r| (r.seq as u64, r.body)).collect())
    }

    fn status_event(meta: &RoomMeta, message: &str, patch: &JobPatch) -> EventBody {
        EventBody::JobStatus {
            job_id: meta.job_id.clone(),
            status: meta.status.as_str().to_string(),
            message: message.to_string(),
            timestamp: rfc3339(now_ms()),
            pr_url: patch.pr_url.clone(),
            completion_reason: patch
                .completion_reason
                .as_deref()
                .and_then(|c| serde_json::from_value(serde_json::Value::String(c.into())).ok()),
            total_iterations: patch.total_iterations.map(|n| n as u32),
            error_message: patch.error_message.clone(),
        }
    }

    async fn init(&self, req: InitRequest) -> ApiResult {
        if let Some(meta) = self.load_meta()? {
            return json(&meta);
        }
        self.save_meta(&req.meta)?;
        self.append(vec![Self::status_event(&req.meta, &req.message, &JobPatch::default())])?;
        json(&req.meta)
    }

    /// A status change and what follows it: the D1 copy and, for an end, the queue's release.
    /// Neither failing undoes the change or hides it from the caller: a failed D1 copy is retried
    /// from the room's alarm (and the queue's reconciliation asks for it again), a failed release
    /// is repaired by the queue's reconciliation.
    async fn transition(&self, req: TransitionRequest) -> ApiResult<TransitionResult> {
        let from_queue = req.from_queue;
        let Some(applied) = self.atomically(move |st| st.apply_transition(&req))? else {
            return Ok(TransitionResult { from: JobStatus::Running, to: JobStatus::Running });
        };
        self.broadcast(&applied.texts);
        self.follow_transition(&applied, from_queue).await;
        Ok(TransitionResult { from: applied.from, to: applied.meta.status })
    }

    async fn follow_transition(&self, applied: &Applied, from_queue: bool) {
        let meta = &applied.meta;
        let fail = self.fault("room_d1_copies");
        let db = match env::db(&self.env) {
            Ok(db) => db,
            Err(e) => {
                worker::console_error!("job {}: no D1 binding: {e}", meta.job_id);
                return;
            }
        };
        let (job_id, seq, patch, now) = (meta.job_id.clone(), applied.seq, applied.patch.clone(), rfc3339(now_ms()));
        if meta.status == JobStatus::Running {
            // On the dispatch path the runner is waiting: the D1 copy follows in the background
            // (`status_seq` keeps a late write from overwriting a newer status).
            let storage = self.state.storage();
            self.state.wait_until(async move {
                if let Err(e) = copy_status(&db, &job_id, JobStatus::Running, seq, &now, &patch, fail).await {
                    worker::console_error!("job {job_id}: D1 status copy failed, retrying from the alarm: {e:?}");
                    let _ = mark_d1_stale(&storage).await;
                }
            });
        } else if let Err(e) = copy_status(&db, &job_id, meta.status, seq, &now, &patch, fail).await {
            worker::console_error!("job {job_id}: D1 status copy failed, retrying from the alarm: {e:?}");
            if let Err(e) = mark_d1_stale(&self.state.storage()).await {
                worker::console_error!("job {job_id}: scheduling the D1 retry: {e:?}");
            }
        }
        if meta.status.is_terminal() && !from_queue {
            let released = match env::queue(&self.env, &meta.queue) {
                Ok(queue) => http::call::<serde_json::Value>(
                    &queue,
                    Method::Post,
                    "/release",
                    Some(&serde_json::json!({"job_id": meta.job_id, "cancel": meta.status == JobStatus::Cancelled})),
                )
                .await
                .map(|_| ()),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = released {
                worker::console_error!("job {}: queue release failed (reconciliation releases it): {e:?}", meta.job_id);
            }
        }
    }

    /// Writes the status the room holds to the job's D1 row again, from its last status event
    /// (guarded by `status_seq` like every copy).
    async fn repair_d1(&self) -> ApiResult<JobStatus> {
        let meta = self.meta()?;
        #[derive(Deserialize)]
        struct Row {
            body: String,
        }
        let rows: Vec<Row> = self
            .sql()
            .exec("SELECT body FROM events WHERE kind = 'jobStatus' ORDER BY seq DESC LIMIT 1", None)?
            .to_array()?;
        let Some(row) = rows.first() else { return Ok(meta.status) };
        let event: ServerEvent = serde_json::from_str(&row.body)?;
        let mut patch = JobPatch {
            attempts: (meta.attempt > 0).then_some(meta.attempt as i64),
            usage: (!meta.usage.is_empty()).then_some(meta.usage),
            ..Default::default()
        };
        if let EventBody::JobStatus { pr_url, completion_reason, total_iterations, error_message, .. } = event.body {
            patch.pr_url = pr_url;
            patch.completion_reason =
                completion_reason.and_then(|c| serde_json::to_value(c).ok()).and_then(|v| v.as_str().map(str::to_string));
            patch.total_iterations = total_iterations.map(i64::from);
            patch.error_message = error_message;
        }
        let fail = self.fault("room_d1_copies");
        copy_status(&env::db(&self.env)?, &meta.job_id, meta.status, event.seq, &rfc3339(now_ms()), &patch, fail).await?;
        self.sql().exec("DELETE FROM meta WHERE k = 'd1_stale'", None)?;
        Ok(meta.status)
    }

    fn d1_stale(&self) -> ApiResult<bool> {
        #[derive(Deserialize)]
        struct Row {
            #[allow(dead_code)]
            v: String,
        }
        let rows: Vec<Row> = self.sql().exec("SELECT v FROM meta WHERE k = 'd1_stale'", None)?.to_array()?;
        Ok(!rows.is_empty())
    }

    /// A batch from runner `runner_id`. Stored only under the job's current lease, and only from the
    /// runner that lease was given to (another runner naming the lease id is a conflict).
    async fn runner_batch(&self, batch: EventBatch, runner_id: &str) -> ApiResult<BatchAck> {
        let meta = self.meta()?;
        if meta.status != JobStatus::Running || meta.lease_id.as_deref() != Some(batch.lease_id.as_str()) {
            return Ok(BatchAck { stored: 0, duplicates: 0, lease_valid: false });
        }
        if meta.runner_id.as_deref() != Some(runner_id) {
            return Err(ApiError::Conflict(format!("job {} is leased to another runner", meta.job_id)));
        }
        // The seen indices, the events and the status change a `finished` brings are stored in one
        // transaction: a batch is marked seen only with its events.
        let (stored, duplicates, texts, applied) = self.atomically(move |st| st.store_batch(batch))?;
        self.broadcast(&texts);
        if let Some(applied) = &applied {
            self.broadcast(&applied.texts);
            self.follow_transition(applied, false).await;
        }
        Ok(BatchAck { stored, duplicates, lease_valid: true })
    }

    async fn accept_socket(&self, req: &Request) -> ApiResult {
        self.meta()?;
        let url = req.url()?;
        let mut after = None;
        let mut sender = String::from("user");
        let mut expires_at_ms = None;
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "after" => after = Some(v.to_string()),
                "sender" => sender = v.to_string(),
                "expires_at_ms" => expires_at_ms = v.parse::<i64>().ok(),
                _ => {}
            }
        }
        let after = parse_cursor(after.as_deref()).map_err(ApiError::BadRequest)?;
        let pair = WebSocketPair::new()?;
        self.state.accept_web_socket(&pair.server);
        pair.server.serialize_attachment(SocketInfo { sender, expires_at_ms })?;
        // The replay reads the log a page at a time, never all of it at once; it stays
        // synchronous (no await from the first page to the registration), so no event can slip
        // between the replay and the follow.
        let mut cursor = after;
        loop {
            let page = self.events_after(cursor, None, EVENTS_PAGE)?;
            for (_, text) in &page {
                pair.server.send_with_str(text)?;
            }
            match page.last() {
                Some((seq, _)) if page.len() == EVENTS_PAGE => cursor = *seq,
                _ => break,
            }
        }
        if let Some(at) = expires_at_ms {
            self.alarm_by(at).await?;
        }
        Ok(Response::from_websocket(pair.client)?)
    }

    /// Makes sure the alarm fires by `at` (epoch ms).
    async fn alarm_by(&self, at: i64) -> ApiResult<()> {
        let storage = self.state.storage();
        if storage.get_alarm().await?.is_some_and(|current| current <= at) {
            return Ok(());
        }
        storage.set_alarm((at - now_ms()).max(1)).await?;
        Ok(())
    }

    fn expires_at(ws: &WebSocket) -> Option<i64> {
        ws.deserialize_attachment::<SocketInfo>().ok().flatten().and_then(|i| i.expires_at_ms)
    }

    /// Ends a socket whose access token expired: an `error` message, then close code 4001.
    fn end_expired(ws: &WebSocket) {
        let _ = ws.send(&SocketError { message: "access token expired; reconnect with a fresh token".into() });
        let _ = ws.close(Some(TOKEN_EXPIRED_CLOSE), Some("access token expired"));
    }

    /// Closes the sockets whose token expired and sets the alarm for the next expiry.
    async fn close_expired_sockets(&self) -> ApiResult<()> {
        let now = now_ms();
        let mut next: Option<i64> = None;
        for ws in self.state.get_websockets() {
            match Self::expires_at(&ws) {
                Some(at) if at <= now => Self::end_expired(&ws),
                Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
                None => {}
            }
        }
        if let Some(at) = next {
            self.alarm_by(at).await?;
        }
        Ok(())
    }

    async fn on_chat(&self, ws: &WebSocket, text: &str) -> ApiResult<()> {
        let content = match ClientMessage::parse(text) {
            Ok(ClientMessage::Chat { content }) => content,
            Err(message) => {
                ws.send(&SocketError { message })?;
                return Ok(());
            }
        };
        let sender = ws.deserialize_attachment::<SocketInfo>()?.map(|s| s.sender).unwrap_or_else(|| "user".into());
        self.record_user_message(&sender, &content, "chat").await
    }

    /// Records a user's message as a `stageUpdate` (role user) and, for a running task job,
    /// relays it to the agent.
    async fn record_user_message(&self, sender: &str, content: &str, source: &str) -> ApiResult<()> {
        let meta = self.meta()?;
        self.append(vec![EventBody::StageUpdate {
            role: "user".into(),
            sender: sender.to_string(),
            content: content.to_string(),
            metadata: serde_json::json!({ "source": source }),
            timestamp: rfc3339(now_ms()),
        }])?;
        if meta.job_type == JobType::Task && meta.status == JobStatus::Running && source == "chat" {
            let queue = env::queue(&self.env, &meta.queue)?;
            let _ = http::call::<serde_json::Value>(
                &queue,
                Method::Post,
                "/relay",
                Some(&serde_json::json!({"job_id": meta.job_id, "kind": "deliver", "message": content})),
            )
            .await;
        }
        Ok(())
    }

    async fn route(&self, mut req: Request) -> ApiResult {
        let path = req.path();
        match (req.method(), path.as_str()) {
            (Method::Post, "/init") => self.init(body_as(&mut req).await?).await,
            (Method::Post, "/transition") => json(&self.transition(body_as(&mut req).await?).await?),
            (Method::Post, "/append") => {
                self.meta()?;
                let r: AppendRequest = body_as(&mut req).await?;
                json(&Appended { last_seq: self.append(r.events)? })
            }
            (Method::Post, "/user-message") => {
                #[derive(Deserialize)]
                struct Msg {
                    sender: String,
                    content: String,
                }
                let m: Msg = body_as(&mut req).await?;
                self.record_user_message(&m.sender, &m.content, "api").await?;
                json(&serde_json::json!({"ok": true}))
            }
            (Method::Post, "/runner-batch") => {
                let url = req.url()?;
                let runner_id = url.query_pairs().find(|(k, _)| k == "runner_id").map(|(_, v)| v.to_string()).unwrap_or_default();
                json(&self.runner_batch(body_as(&mut req).await?, &runner_id).await?)
            }
            (Method::Get, "/events") => {
                self.meta()?;
                let url = req.url()?;
                let param = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.to_string());
                let kind = param("kind");
                let after = param("after").and_then(|v| v.parse().ok()).unwrap_or(0);
                let limit = param("limit").and_then(|v| v.parse().ok()).unwrap_or(EVENTS_PAGE).clamp(1, MAX_EVENTS_READ);
                let bodies = self.events_after(after, kind.as_deref(), limit)?;
                let events: Vec<serde_json::Value> =
                    bodies.iter().filter_map(|(_, b)| serde_json::from_str(b).ok()).collect();
                json(&events)
            }
            (Method::Get, "/meta") => json(&self.meta()?),
            (Method::Post, "/repair") => json(&serde_json::json!({ "status": self.repair_d1().await? })),
            (Method::Get, "/ws") => self.accept_socket(&req).await,
            _ => Err(ApiError::NotFound("no such room route".into())),
        }
    }
}

impl DurableObject for JobRoom {
    fn new(state: State, env: Env) -> Self {
        let room = Self {
            #[cfg(feature = "faults")]
            faults: Rc::new(RefCell::new(crate::queue_object::read_faults(&env))),
            state,
            env,
            meta: Rc::new(RefCell::new(None)),
            next_seq: Rc::new(RefCell::new(None)),
        };
        if let Err(e) = room.ensure_schema() {
            worker::console_error!("job room schema: {e}");
        }
        room
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        Ok(self.route(req).await.unwrap_or_else(ApiError::into_response))
    }

    async fn alarm(&self) -> worker::Result<Response> {
        if let Err(e) = self.close_expired_sockets().await {
            worker::console_error!("closing expired sockets: {e:?}");
        }
        if self.d1_stale().unwrap_or(false) {
            if let Err(e) = self.repair_d1().await {
                worker::console_error!("D1 status copy failed again: {e:?}");
                let _ = self.alarm_by(now_ms() + D1_RETRY_MS).await;
            }
        }
        Response::ok("ok")
    }

    async fn websocket_message(&self, ws: WebSocket, message: WebSocketIncomingMessage) -> worker::Result<()> {
        if Self::expires_at(&ws).is_some_and(|at| at <= now_ms()) {
            Self::end_expired(&ws);
            return Ok(());
        }
        let text = match message {
            WebSocketIncomingMessage::String(s) => s,
            WebSocketIncomingMessage::Binary(_) => {
                ws.send(&SocketError { message: "binary frames are not supported; send JSON text".into() })?;
                return Ok(());
            }
        };
        if let Err(e) = self.on_chat(&ws, &text).await {
            let message = match e {
                ApiError::Internal(m) => {
                    worker::console_error!("chat: {m}");
                    "internal error".to_string()
                }
                ApiError::BadRequest(m) | ApiError::Conflict(m) | ApiError::NotFound(m) | ApiError::Unauthorized(m)
                | ApiError::Forbidden(m) | ApiError::Unavailable(m) | ApiError::TooLarge(m) => m,
                ApiError::TooManyRequests { message, .. } => message,
            };
            ws.send(&SocketError { message })?;
        }
        Ok(())
    }

    async fn websocket_close(&self, ws: WebSocket, code: usize, _reason: String, _was_clean: bool) -> worker::Result<()> {
        let code = if code == 1005 || code == 1006 || !(1000..5000).contains(&code) { 1000 } else { code as u16 };
        let _ = ws.close(Some(code), Some("closing"));
        Ok(())
    }

    async fn websocket_error(&self, _ws: WebSocket, _error: worker::Error) -> worker::Result<()> {
        Ok(())
    }
}

/// One D1 status copy (`fail`: an injected fault in test builds).
async fn copy_status(
    db: &worker::D1Database,
    job_id: &str,
    status: JobStatus,
    seq: u64,
    now: &str,
    patch: &JobPatch,
    fail: bool,
) -> ApiResult<()> {
    if fail {
        return Err(ApiError::Unavailable("injected fault: D1 status copy failed".into()));
    }
    store::update_job_status(db, job_id, status, seq, now, patch).await
}

/// Records that the D1 row lags behind the room and sets the alarm that copies it again.
async fn mark_d1_stale(storage: &worker::Storage) -> ApiResult<()> {
    storage.sql().exec("INSERT OR REPLACE INTO meta (k, v) VALUES ('d1_stale', '1')", None)?;
    let due = now_ms() + D1_RETRY_MS;
    match storage.get_alarm().await? {
        Some(at) if at <= due => {}
        _ => storage.set_alarm(D1_RETRY_MS).await?,
    }
    Ok(())
}
