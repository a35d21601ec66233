//! The JobRoom Durable Object, one per job: the job's event log (dense `seq`), its WebSockets
//! (hibernation API) and its status as single writer (it updates the job's D1 row).
//!
//! Internal API (called by the Worker and the Queue object, never exposed):
//! `POST /init`, `POST /transition`, `POST /append`, `POST /runner-batch`, `GET /events` (one page:
//! `after`, `limit`, `kind`), `GET /indexed-events` (one kind's events by their index among that
//! kind: `kind`, `offset`, `limit`; with how many there are and the last), `GET /ws` (replays the log after `after` a page at a time, then
//! follows), `POST /check-lease` (a runner's snapshot call), `POST /gather-now` (the queue: a
//! runner connected). An app build's (seed 000's face):
//! `POST /messages`, `GET /messages`, `DELETE /messages/<seq>`, `GET /steps`, `POST /pause`,
//! `POST /resume`, `POST /continue`, `DELETE /`. Its requirements gatherer runs from the alarm.

use std::cell::RefCell;
use std::rc::Rc;

use kiln_schemas::app::{Ticket, TicketStatus, MESSAGE_ROLES};
use kiln_schemas::events::{parse_cursor, ClientMessage, EventBody, LogStream, ServerEvent, SocketError};
use kiln_schemas::runner::{AppBuildParams, BatchAck, EventBatch, Outcome, RunnerEvent, UsageTotals};
use kiln_schemas::status::{app_status, AppPhase, JobStatus, JobType};
use serde::{Deserialize, Serialize};
use worker::{
    durable_object, wasm_bindgen, DurableObject, Env, Method, Request, Response, SqlStorage, SqlStorageValue, State,
    WebSocket, WebSocketIncomingMessage, WebSocketPair,
};

use crate::app_room::{self, GatherOutcome, GatherState, GatherStep, SYSTEM_SENDER};
use crate::dashboard_store::room;
use crate::env::{self, now_ms};
use crate::http::{self, body_as, json, ApiError, ApiResult};
use crate::store::{self, AppColumns, JobPatch};
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
    /// An app build's pipeline phase while it runs (forward only; cleared by a requeue).
    #[serde(default)]
    pub phase: Option<AppPhase>,
    /// An app build paused between steps.
    #[serde(default)]
    pub is_paused: bool,
    /// An app build's idea (the D1 row's, which `PATCH` changes while collecting, is read at
    /// each gather turn).
    #[serde(default)]
    pub initial_prompt: Option<String>,
    #[serde(default)]
    pub requirements_summary: Option<String>,
    /// The requirements of the latest continuation run (`/continue`).
    #[serde(default)]
    pub continuation: Option<String>,
    /// The requirements gatherer's turns (while collecting).
    #[serde(default)]
    pub gather: GatherState,
    /// The lease and runner of the run that ended last: its final workspace snapshot is taken
    /// from that runner even after its `finished`.
    #[serde(default)]
    pub last_lease: Option<(String, String)>,
    /// A landing job's page: its status follows the job's (`landing_pages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landing_page_id: Option<String>,
}

impl RoomMeta {
    /// A new app build's room: it starts collecting its requirements (for the app-builder face).
    #[allow(dead_code)]
    pub fn app_build(job_id: &str, owner: &str, queue: &str, initial_prompt: &str) -> RoomMeta {
        RoomMeta {
            job_id: job_id.to_string(),
            owner: owner.to_string(),
            job_type: JobType::AppBuild,
            queue: queue.to_string(),
            status: JobStatus::Collecting,
            lease_id: None,
            attempt: 0,
            runner_id: None,
            usage: UsageTotals::default(),
            phase: None,
            is_paused: false,
            initial_prompt: Some(initial_prompt.to_string()),
            requirements_summary: None,
            continuation: None,
            gather: GatherState::default(),
            last_lease: None,
            landing_page_id: None,
        }
    }

    /// The status as the job's face names it: seed 000's for an app build.
    pub fn face_status(&self) -> &'static str {
        match self.job_type {
            JobType::AppBuild => app_status(self.status, self.phase),
            _ => self.status.as_str(),
        }
    }

    /// The app-build columns a status copy writes to D1.
    fn app_columns(&self) -> Option<AppColumns> {
        (self.job_type == JobType::AppBuild).then(|| AppColumns {
            phase: self.phase.map(|p| p.as_str().to_string()),
            is_paused: self.is_paused,
            requirements_summary: self.requirements_summary.clone(),
        })
    }

    /// What an app build's run starts from (with its assignment).
    pub fn app_params(&self) -> Option<AppBuildParams> {
        (self.job_type == JobType::AppBuild).then(|| AppBuildParams {
            initial_prompt: self.initial_prompt.clone().unwrap_or_default(),
            requirements_summary: self.requirements_summary.clone().unwrap_or_default(),
            continuation: self.continuation.clone(),
            paused: self.is_paused,
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InitRequest {
    pub meta: RoomMeta,
    pub message: String,
    /// The job's D1 row as inserted, for the jobs whose row only the room changes afterwards
    /// (seed 003's code, task and ralph jobs): the room keeps it current and answers
    /// `GET /jobs/:id` from it (`GET /row`), with no D1 read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<store::JobRow>,
}

/// `POST /init` with a first node event after the status event (a landing job created while
/// another of its session waits or runs: `{node: "queue", event_type: "waiting", ...}`). The
/// room's `/init` reads both shapes.
#[derive(Debug, Serialize, Deserialize)]
pub struct InitWithNote {
    pub meta: RoomMeta,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeNote>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<store::JobRow>,
}

/// A node event the edge itself writes (`EventBody::Node` without its timestamp).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeNote {
    pub node: String,
    pub event_type: String,
    pub message: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl NodeNote {
    fn body(self, timestamp: String) -> EventBody {
        let data = if self.data.is_null() { serde_json::json!({}) } else { self.data };
        EventBody::Node { node: self.node, event_type: self.event_type, message: self.message, data, timestamp }
    }
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
    /// An app build dispatched (`to = running`): what its run starts from, as the room holds it
    /// now (a pause or continuation after enqueue included); the queue puts it in the assignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppBuildParams>,
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

/// `GET /indexed-events`' answer: `events` from the index asked for, `total` of that kind, and
/// the `last` of them (whatever the page holds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexedEvents {
    pub total: u64,
    pub events: Vec<ServerEvent>,
    pub last: Option<ServerEvent>,
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
    /// A landing job's page status to write (with the D1 copy).
    page: Option<crate::landing_room::PageStatus>,
    /// What a finished job produced (a dashboard job's rows are written from it).
    result: Option<serde_json::Value>,
    /// When it changed: the room's row and the D1 copy carry the same `updated_at`.
    now: String,
}

/// The room's copy of its job's D1 row (`InitRequest::row`), under this key of `meta`.
const ROW_KEY: &str = "row";
/// Retry delay of a D1 status copy that failed.
const D1_RETRY_MS: i64 = 2_000;
/// The tombstone `kind` of a deleted message's row: its seq stays taken, nothing reads it.
const DELETED_KIND: &str = "deleted";
/// Messages a `GET /messages` page answers by default.
pub const MESSAGES_PAGE: usize = 1000;
/// What the user is told when a gather turn fails (once per streak of failures).
const GATHER_CALL_NOTE: &str = "The requirements gatherer is unavailable right now. Your messages are kept; it will answer them as soon as it can (retrying).";

/// A D1 write that follows a runner batch's commit (the events are stored first; a failed write is
/// logged and repaired from the room's alarm).
enum Followup {
    /// A phase change's status copy (the seq of its `jobStatus`).
    PhaseCopy(u64),
    /// The App row or the tickets changed.
    AppRows,
    /// One ticket's status.
    TicketStatus { ticket_id: String, status: TicketStatus, assigned_to: String },
}

/// The App of the job as the room keeps it (for the D1 row and its repair).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredApp {
    id: String,
    spec: serde_json::Value,
    prd_markdown: String,
    generated_at: String,
}

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

    fn kv_get<T: serde::de::DeserializeOwned>(&self, k: &str) -> ApiResult<Option<T>> {
        #[derive(Deserialize)]
        struct Row {
            v: String,
        }
        let rows: Vec<Row> = self.sql().exec("SELECT v FROM meta WHERE k = ?", vec![SqlStorageValue::from(k.to_string())])?.to_array()?;
        Ok(match rows.first() {
            Some(r) => Some(serde_json::from_str(&r.v)?),
            None => None,
        })
    }

    fn kv_put<T: Serialize>(&self, k: &str, v: &T) -> ApiResult<()> {
        self.sql().exec(
            "INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)",
            vec![SqlStorageValue::from(k.to_string()), SqlStorageValue::from(serde_json::to_string(v)?)],
        )?;
        Ok(())
    }

    /// The job's backlog as the room keeps it, in its order.
    fn tickets(&self) -> ApiResult<Vec<Ticket>> {
        Ok(self.kv_get::<Vec<Ticket>>("tickets")?.unwrap_or_default())
    }

    /// The one place a job's status changes: checks it, saves the new meta and appends its status
    /// event (inside [`JobRoom::atomically`]). `None`: the queue announced a lease the job already
    /// runs under (a retried dispatch), nothing changes.
    fn apply_transition(&self, req: &TransitionRequest) -> ApiResult<Option<Applied>> {
        self.apply_ending(req, None)
    }

    /// [`RoomStore::apply_transition`] with what a finished job produced (the runner's
    /// `Finished.result`): a landing job's `__end__` data and its page's preview and sections.
    fn apply_ending(&self, req: &TransitionRequest, result: Option<&serde_json::Value>) -> ApiResult<Option<Applied>> {
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
            _ if !meta.job_type.allows(from, req.to) => {
                return Err(ApiError::Conflict(format!("job is {}; it cannot become {}", from.as_str(), req.to.as_str())));
            }
            _ => {}
        }
        meta.status = req.to;
        if matches!(req.to, JobStatus::Queued | JobStatus::Running) {
            // A requeue, a continuation or a new run: the pipeline starts again from planning.
            meta.phase = None;
        }
        match (&req.lease, req.to) {
            (Some((lease_id, attempt)), JobStatus::Running) => {
                meta.lease_id = Some(lease_id.clone());
                meta.attempt = *attempt;
                meta.runner_id = req.runner_id.clone();
            }
            _ => {
                if let (Some(l), Some(r)) = (meta.lease_id.take(), meta.runner_id.take()) {
                    meta.last_lease = Some((l, r));
                }
            }
        }
        self.save_meta(&meta)?;
        let mut patch = req.patch.clone();
        if req.lease.is_some() {
            patch.attempts = Some(meta.attempt as i64);
        }
        patch.usage = (!meta.usage.is_empty()).then_some(meta.usage);
        patch.app = meta.app_columns();
        let mut bodies = vec![JobRoom::status_event(&meta, &req.message, &patch)];
        let mut page = None;
        if meta.job_type.is_landing() {
            // Every end of a landing job, whatever caused it, writes its `__end__` node.
            let ended = crate::landing_room::end_node(meta.status, &req.message, patch.error_message.as_deref(), result);
            if let Some((node, event_type, message, data)) = ended {
                bodies.push(EventBody::Node { node, event_type, message, data, timestamp: rfc3339(now_ms()) });
            }
            page = crate::landing_room::PageStatus::of(meta.status, result);
            if let Some(p) = &page {
                self.kv_put("page_status", p)?;
            }
        }
        let (texts, seq) = self.insert_events(bodies)?;
        // The status event's seq (the D1 copy's guard), not the `__end__` node's.
        let seq = seq + 1 - texts.len() as u64;
        let now = rfc3339(now_ms());
        if let Some(mut row) = self.kv_get::<store::JobRow>(ROW_KEY)? {
            row.apply_status(meta.status, seq, &now, &patch);
            self.kv_put(ROW_KEY, &row)?;
        }
        Ok(Some(Applied { from, meta, seq, patch, texts, page, result: result.cloned(), now }))
    }

    /// The storage part of a runner batch (inside [`JobRoom::atomically`]).
    #[allow(clippy::type_complexity)]
    fn store_batch(&self, batch: EventBatch) -> ApiResult<(u32, u32, Vec<String>, Option<Applied>, Vec<Followup>)> {
        let (mut stored, mut duplicates) = (0, 0);
        let mut bodies = vec![];
        let mut finished = None;
        // Followups whose seq is an index into `bodies` (PhaseCopy), fixed once they are stored.
        let mut followups: Vec<Followup> = vec![];
        let job_id = batch_job_id(self)?;
        let system = |content: String, ts: &str| EventBody::Log { stream: LogStream::System, content, timestamp: ts.to_string() };
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
                RunnerEvent::Progress { percent, stage, data } => {
                    let data = if data.is_null() { serde_json::json!({}) } else { data };
                    let percent = if percent.is_finite() { percent.clamp(0.0, 100.0) } else { 0.0 };
                    bodies.push(EventBody::Progress { percent, stage, data, timestamp: ts })
                }
                RunnerEvent::Node { node, event_type, message, data } => {
                    let data = if data.is_null() { serde_json::json!({}) } else { data };
                    bodies.push(EventBody::Node { node, event_type, message, data, timestamp: ts })
                }
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
                RunnerEvent::Phase { phase, message } => {
                    let mut meta = self.meta()?;
                    match meta.phase {
                        _ if meta.job_type != JobType::AppBuild => {
                            bodies.push(system(format!("phase {} ignored: not an app build", phase.as_str()), &ts))
                        }
                        Some(current) if !current.can_become(phase) => bodies.push(system(
                            format!("phase {} refused: the job is at {} (phases only move forward)", phase.as_str(), current.as_str()),
                            &ts,
                        )),
                        _ => {
                            meta.phase = Some(phase);
                            self.save_meta(&meta)?;
                            followups.push(Followup::PhaseCopy(bodies.len() as u64));
                            bodies.push(JobRoom::status_event(&meta, &message, &JobPatch::default()));
                        }
                    }
                }
                RunnerEvent::Stage { role, sender, content, metadata } => {
                    bodies.push(EventBody::StageUpdate { role, sender, content, metadata, timestamp: ts })
                }
                RunnerEvent::Dialogue { agent, message, order } => {
                    bodies.push(EventBody::AgentDialogue { job_id: job_id.clone(), agent, message, order, timestamp: ts })
                }
                RunnerEvent::Prd { spec, prd_markdown } => {
                    let id = self.kv_get::<StoredApp>("app")?.map(|a| a.id).unwrap_or_else(env::new_id);
                    self.kv_put("app", &StoredApp { id, spec: spec.clone(), prd_markdown: prd_markdown.clone(), generated_at: ts.clone() })?;
                    followups.push(Followup::AppRows);
                    bodies.push(EventBody::PrdReady { job_id: job_id.clone(), spec, prd_markdown, timestamp: ts });
                }
                RunnerEvent::Backlog { tickets } => match app_room::backlog_events(&job_id, &tickets, &ts) {
                    Ok(events) => {
                        self.kv_put("tickets", &tickets)?;
                        followups.push(Followup::AppRows);
                        bodies.extend(events);
                    }
                    Err(why) => bodies.push(system(format!("backlog refused: {why}"), &ts)),
                },
                RunnerEvent::Ticket { ticket_id, status, message, metadata } => {
                    let mut tickets = self.tickets()?;
                    match tickets.iter_mut().find(|t| t.id == ticket_id) {
                        None => bodies.push(system(format!("ticket update refused: no ticket {ticket_id} in the backlog"), &ts)),
                        Some(t) => {
                            t.status = status;
                            let (title, assigned_to) = (t.title.clone(), t.assigned_to.clone());
                            self.kv_put("tickets", &tickets)?;
                            followups.push(Followup::TicketStatus {
                                ticket_id: ticket_id.clone(),
                                status,
                                assigned_to: assigned_to.clone(),
                            });
                            bodies.push(EventBody::TicketUpdate {
                                job_id: job_id.clone(),
                                ticket_id,
                                status: status.as_str().to_string(),
                                title,
                                assigned_to,
                                message,
                                metadata: if metadata.is_null() { serde_json::json!({}) } else { metadata },
                                timestamp: ts,
                            });
                        }
                    }
                }
                RunnerEvent::Finished { outcome, message, pr_url, completion_reason, total_iterations, error_message, result } => {
                    finished = Some((
                        result,
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
        let count = bodies.len() as u64;
        let (texts, last) = self.insert_events(bodies)?;
        let first = last + 1 - count;
        for f in followups.iter_mut() {
            if let Followup::PhaseCopy(i) = f {
                *i += first;
            }
        }
        let applied = match finished {
            Some((result, outcome, message, patch)) => {
                let to = match outcome {
                    Outcome::Completed => JobStatus::Completed,
                    Outcome::Failed => JobStatus::Failed,
                };
                let req = TransitionRequest { to, message, patch, lease: None, runner_id: None, if_lease: None, from_queue: false };
                self.apply_ending(&req, result.as_ref())?
            }
            None => None,
        };
        Ok((stored, duplicates, texts, applied, followups))
    }
}

/// The job a batch is stored for (the room's own).
fn batch_job_id(st: &RoomStore) -> ApiResult<String> {
    Ok(st.meta()?.job_id)
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
        sql.exec("CREATE INDEX IF NOT EXISTS events_kind ON events (kind, seq)", None)?;
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
                .exec(
                    "SELECT seq, body FROM events WHERE seq > ? AND kind != ? ORDER BY seq LIMIT ?",
                    vec![after, SqlStorageValue::from(DELETED_KIND.to_string()), limit],
                )?
                .to_array()?,
        };
        Ok(rows.into_iter().map(|r| (r.seq as u64, r.body)).collect())
    }

    /// `GET /indexed-events`: the events of `kind` from the `offset`th on (counting that kind
    /// only), at most `limit`, with their count and the last of them, as [`IndexedEvents`]' JSON.
    /// The stored texts are answered as they are, never parsed.
    fn indexed_events(&self, kind: &str, offset: u64, limit: usize) -> ApiResult<String> {
        #[derive(Deserialize)]
        struct Count {
            n: i64,
        }
        #[derive(Deserialize)]
        struct Row {
            body: String,
        }
        let sql = self.sql();
        let k = || SqlStorageValue::from(kind.to_string());
        let total = sql.exec("SELECT COUNT(*) AS n FROM events WHERE kind = ?", vec![k()])?.to_array::<Count>()?.first().map_or(0, |c| c.n) as u64;
        let page: Vec<Row> = sql
            .exec(
                "SELECT body FROM events WHERE kind = ? ORDER BY seq LIMIT ? OFFSET ?",
                vec![k(), SqlStorageValue::from(limit as i64), SqlStorageValue::from(offset as i64)],
            )?
            .to_array()?;
        let last = if page.is_empty() || offset + (page.len() as u64) < total {
            sql.exec("SELECT body FROM events WHERE kind = ? ORDER BY seq DESC LIMIT 1", vec![k()])?.to_array::<Row>()?.pop().map(|r| r.body)
        } else {
            page.last().map(|r| r.body.clone())
        };
        let events: Vec<&str> = page.iter().map(|r| r.body.as_str()).collect();
        Ok(format!(r#"{{"total":{total},"events":[{}],"last":{}}}"#, events.join(","), last.as_deref().unwrap_or("null")))
    }

    fn status_event(meta: &RoomMeta, message: &str, patch: &JobPatch) -> EventBody {
        EventBody::JobStatus {
            job_id: meta.job_id.clone(),
            status: meta.face_status().to_string(),
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

    async fn init(&self, req: InitWithNote) -> ApiResult {
        if let Some(meta) = self.load_meta()? {
            return json(&meta);
        }
        let mut meta = req.meta;
        let collecting = meta.job_type == JobType::AppBuild && meta.status == JobStatus::Collecting;
        if collecting {
            // The gatherer's first reply answers the idea.
            meta.gather = GatherState { pending: true, ..Default::default() };
        }
        let mut events = vec![Self::status_event(&meta, &req.message, &JobPatch::default())];
        if let Some(note) = req.node {
            events.push(note.body(rfc3339(now_ms())));
        }
        let saved = meta.clone();
        let row = req.row;
        let (texts, _) = self.atomically(move |st| {
            st.save_meta(&saved)?;
            if let Some(row) = &row {
                st.kv_put(ROW_KEY, row)?;
            }
            st.insert_events(events)
        })?;
        self.broadcast(&texts);
        crate::deliveries::job_created(&self.state, &self.env, &meta);
        if collecting {
            self.alarm_by(now_ms()).await?;
        }
        json(&meta)
    }

    /// A status change and what follows it: the D1 copy and, for an end, the queue's release.
    /// Neither failing undoes the change or hides it from the caller: a failed D1 copy is retried
    /// from the room's alarm (and the queue's reconciliation asks for it again), a failed release
    /// is repaired by the queue's reconciliation.
    async fn transition(&self, req: TransitionRequest) -> ApiResult<TransitionResult> {
        let from_queue = req.from_queue;
        let Some(applied) = self.atomically(move |st| st.apply_transition(&req))? else {
            return Ok(TransitionResult { from: JobStatus::Running, to: JobStatus::Running, app: self.meta()?.app_params() });
        };
        self.broadcast(&applied.texts);
        self.follow_transition(&applied, from_queue).await;
        let app = if applied.meta.status == JobStatus::Running { applied.meta.app_params() } else { None };
        Ok(TransitionResult { from: applied.from, to: applied.meta.status, app })
    }

    async fn follow_transition(&self, applied: &Applied, from_queue: bool) {
        let meta = &applied.meta;
        crate::deliveries::job_changed(&self.state, &self.env, applied.from, meta, applied.seq, &applied.patch);
        if meta.job_type.is_dashboard() {
            // Seed 002's rows and channel messages: an end's result is written before its status
            // copy (a failed write is repaired from the alarm); a start, which writes no rows, in
            // the background (the runner is waiting).
            let (env, meta, error, result) = (self.env.clone(), meta.clone(), applied.patch.error_message.clone(), applied.result.clone());
            if applied.meta.status == JobStatus::Running {
                self.state.wait_until(async move {
                    let out = room::Out::new(&env, &meta, true, &|| false);
                    room::on_status(&out, &meta, error.as_deref(), result.as_ref()).await
                });
            } else {
                if meta.status.is_terminal() {
                    let end = room::End { error: error.clone(), result: result.clone() };
                    if let Err(e) = self.store().kv_put("dashboard_end", &end) {
                        worker::console_error!("job {}: keeping the dashboard end: {e:?}", meta.job_id);
                    }
                }
                let fail = || self.fault("dashboard_rows");
                let out = room::Out::new(&env, &meta, true, &fail);
                room::on_status(&out, &meta, error.as_deref(), result.as_ref()).await;
                if !out.ok() {
                    self.mark_dashboard_stale().await;
                }
            }
        }
        let fail = self.fault("room_d1_copies");
        let db = match env::db(&self.env) {
            Ok(db) => db,
            Err(e) => {
                worker::console_error!("job {}: no D1 binding: {e}", meta.job_id);
                return;
            }
        };
        let (job_id, seq, patch, now) = (meta.job_id.clone(), applied.seq, applied.patch.clone(), applied.now.clone());
        let page = applied.page.clone().zip(meta.landing_page_id.clone());
        if meta.status == JobStatus::Running {
            // On the dispatch path the runner is waiting: the D1 copy follows in the background
            // (`status_seq` keeps a late write from overwriting a newer status).
            let storage = self.state.storage();
            self.state.wait_until(async move {
                let copied = match copy_status(&db, &job_id, JobStatus::Running, seq, &now, &patch, fail).await {
                    Ok(()) => copy_page(&db, page.as_ref(), &now).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = copied {
                    worker::console_error!("job {job_id}: D1 status copy failed, retrying from the alarm: {e:?}");
                    let _ = mark_d1_stale(&storage).await;
                }
            });
        } else {
            let copied = match copy_status(&db, &job_id, meta.status, seq, &now, &patch, fail).await {
                Ok(()) => copy_page(&db, page.as_ref(), &now).await,
                Err(e) => Err(e),
            };
            if let Err(e) = copied {
                worker::console_error!("job {job_id}: D1 status copy failed, retrying from the alarm: {e:?}");
                if let Err(e) = mark_d1_stale(&self.state.storage()).await {
                    worker::console_error!("job {job_id}: scheduling the D1 retry: {e:?}");
                }
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
            app: meta.app_columns(),
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
        let db = env::db(&self.env)?;
        let now = rfc3339(now_ms());
        copy_status(&db, &meta.job_id, meta.status, event.seq, &now, &patch, fail).await?;
        if let Some(page_id) = &meta.landing_page_id {
            let page = self.store().kv_get::<crate::landing_room::PageStatus>("page_status")?;
            copy_page(&db, page.map(|p| (p, page_id.clone())).as_ref(), &now).await?;
        }
        self.sql().exec("DELETE FROM meta WHERE k = 'd1_stale'", None)?;
        Ok(meta.status)
    }

    /// Records that the dashboard rows (seed 002's task, competition or pipeline row) lag behind
    /// the room, for the alarm to write them again. Each mark is numbered: a repair clears only
    /// the mark it started from, so a write failing while it runs is repaired again.
    async fn mark_dashboard_stale(&self) {
        let mark = self.store().kv_get::<u64>("dashboard_stale").ok().flatten().unwrap_or(0) + 1;
        if let Err(e) = self.store().kv_put("dashboard_stale", &mark) {
            worker::console_error!("marking the dashboard rows stale: {e:?}");
        }
        if let Err(e) = self.alarm_by(now_ms() + D1_RETRY_MS).await {
            worker::console_error!("scheduling the dashboard rows' repair: {e:?}");
        }
    }

    /// Writes the dashboard rows again from the room's last progress event and the job's end.
    async fn repair_dashboard(&self) -> ApiResult<()> {
        let mark = self.store().kv_get::<u64>("dashboard_stale")?.unwrap_or(0);
        let meta = self.meta()?;
        #[derive(Deserialize)]
        struct Row {
            body: String,
        }
        let rows: Vec<Row> =
            self.sql().exec("SELECT body FROM events WHERE kind = 'progress' ORDER BY seq DESC LIMIT 1", None)?.to_array()?;
        let texts: Vec<String> = rows.into_iter().map(|r| r.body).collect();
        let last = room::progress_of(&texts).pop().map(|(percent, stage, _)| (percent, stage));
        let end = self.store().kv_get::<room::End>("dashboard_end")?;
        let fail = || self.fault("dashboard_rows");
        if !room::repair(&self.env, &meta, last, end.as_ref(), &fail).await {
            return Err(ApiError::Unavailable("a dashboard row write failed".into()));
        }
        self.sql().exec("DELETE FROM meta WHERE k = 'dashboard_stale' AND v = ?", vec![SqlStorageValue::from(mark.to_string())])?;
        Ok(())
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
        let (stored, duplicates, texts, applied, followups) = self.atomically(move |st| st.store_batch(batch))?;
        self.broadcast(&texts);
        self.follow_batch(followups).await;
        if meta.job_type.is_dashboard() {
            let fail = || self.fault("dashboard_rows");
            let out = room::Out::new(&self.env, &meta, true, &fail);
            room::on_events(&out, &meta, &texts).await;
            if !out.ok() {
                self.mark_dashboard_stale().await;
            }
        }
        if let Some(applied) = &applied {
            self.broadcast(&applied.texts);
            self.follow_transition(applied, false).await;
        }
        Ok(BatchAck { stored, duplicates, lease_valid: true })
    }

    async fn accept_socket(&self, req: &Request) -> ApiResult {
        let meta = self.meta()?;
        let url = req.url()?;
        let mut after = None;
        let mut sender = String::from("user");
        let mut expires_at_ms = None;
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "after" => after = Some(v.to_string()),
                "sender" => sender = v.to_string(),
                "expires_at_ms" => expires_at_ms = v.parse::<i64>().ok(),
                // The Worker names the socket's principal: another owner's job is a 404.
                "owner" if v != meta.owner => return Err(ApiError::NotFound("job not found".into())),
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
        let meta = self.meta()?;
        if meta.job_type == JobType::AppBuild && meta.status != JobStatus::Collecting {
            ws.send(&SocketError {
                message: format!("chat is closed: the requirements were collected (the job is {})", meta.face_status()),
            })?;
            return Ok(());
        }
        let sender = ws.deserialize_attachment::<SocketInfo>()?.map(|s| s.sender).unwrap_or_else(|| "user".into());
        self.record_user_message(&sender, &content, "chat").await
    }

    /// Records a user's message as a `stageUpdate` (role user) and, for a running task job,
    /// relays it to the agent.
    async fn record_user_message(&self, sender: &str, content: &str, source: &str) -> ApiResult<()> {
        let meta = self.meta()?;
        self.post_message("user", sender, content, serde_json::json!({ "source": source })).await?;
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


    /// Appends a `stageUpdate`; a user's message to an app build that is collecting owes the
    /// gatherer a turn (run from the alarm, so the caller never waits on a model). Answers the
    /// message's seq and timestamp.
    async fn post_message(&self, role: &str, sender: &str, content: &str, metadata: serde_json::Value) -> ApiResult<(u64, String)> {
        let timestamp = rfc3339(now_ms());
        let body = EventBody::StageUpdate {
            role: role.to_string(),
            sender: sender.to_string(),
            content: content.to_string(),
            metadata,
            timestamp: timestamp.clone(),
        };
        let user = role == "user";
        let (texts, seq, owed) = self.atomically(move |st| {
            let mut meta = st.meta()?;
            let owed = user && meta.job_type == JobType::AppBuild && meta.status == JobStatus::Collecting;
            if owed {
                meta.gather.pending = true;
                st.save_meta(&meta)?;
            }
            let (texts, seq) = st.insert_events(vec![body])?;
            Ok((texts, seq, owed))
        })?;
        self.broadcast(&texts);
        if owed {
            self.alarm_by(now_ms()).await?;
        }
        Ok((seq, timestamp))
    }

    /// The D1 writes a runner batch brings, after its events are stored. A failure is logged and
    /// repaired from the alarm (the status copy as every status copy; the App and tickets rows
    /// rewritten whole from the room's copy).
    async fn follow_batch(&self, followups: Vec<Followup>) {
        if followups.is_empty() {
            return;
        }
        let Ok(meta) = self.meta() else { return };
        let db = match env::db(&self.env) {
            Ok(db) => db,
            Err(e) => {
                worker::console_error!("job {}: no D1 binding: {e}", meta.job_id);
                return;
            }
        };
        let now = rfc3339(now_ms());
        let mut rows_stale = false;
        let mut synced = false;
        for f in followups {
            match f {
                Followup::PhaseCopy(seq) => {
                    let patch = JobPatch {
                        attempts: (meta.attempt > 0).then_some(meta.attempt as i64),
                        usage: (!meta.usage.is_empty()).then_some(meta.usage),
                        app: meta.app_columns(),
                        ..Default::default()
                    };
                    let fail = self.fault("room_d1_copies");
                    if let Err(e) = copy_status(&db, &meta.job_id, meta.status, seq, &now, &patch, fail).await {
                        worker::console_error!("job {}: D1 phase copy failed, retrying from the alarm: {e:?}", meta.job_id);
                        let _ = mark_d1_stale(&self.state.storage()).await;
                    }
                }
                Followup::AppRows if !synced => {
                    synced = true;
                    if let Err(e) = self.sync_app_rows(&db, &meta).await {
                        worker::console_error!("job {}: D1 app/tickets write failed, retrying from the alarm: {e:?}", meta.job_id);
                        rows_stale = true;
                    }
                }
                Followup::AppRows => {}
                Followup::TicketStatus { ticket_id, status, assigned_to } => {
                    if let Err(e) = store::set_ticket_status(&db, &meta.job_id, &ticket_id, status, &assigned_to, &now).await {
                        worker::console_error!("job {}: D1 ticket write failed, retrying from the alarm: {e:?}", meta.job_id);
                        rows_stale = true;
                    }
                }
            }
        }
        if rows_stale {
            let _ = self.sql().exec("INSERT OR REPLACE INTO meta (k, v) VALUES ('d1_rows_stale', '1')", None);
            let _ = self.alarm_by(now_ms() + D1_RETRY_MS).await;
        }
    }

    /// Writes the job's App and tickets rows whole from the room's copies.
    async fn sync_app_rows(&self, db: &worker::D1Database, meta: &RoomMeta) -> ApiResult<()> {
        let st = self.store();
        let now = rfc3339(now_ms());
        if let Some(app) = st.kv_get::<StoredApp>("app")? {
            store::upsert_app(db, &app.id, &meta.job_id, &meta.owner, &app.spec, &app.prd_markdown, &app.generated_at).await?;
        }
        let tickets = st.tickets()?;
        if !tickets.is_empty() {
            store::replace_tickets(db, &meta.job_id, &meta.owner, &tickets, &now).await?;
        }
        self.sql().exec("DELETE FROM meta WHERE k = 'd1_rows_stale'", None)?;
        Ok(())
    }

    fn flag(&self, k: &str) -> bool {
        self.store().kv_get::<serde_json::Value>(k).ok().flatten().is_some()
    }

    /// One step of the requirements gatherer, from the alarm: a turn when one is owed and none
    /// runs, else the alarm for when to look again.
    async fn gather_step(&self) -> ApiResult<()> {
        let Some(meta) = self.load_meta()? else { return Ok(()) };
        let collecting = meta.job_type == JobType::AppBuild && meta.status == JobStatus::Collecting;
        match meta.gather.decide(collecting, now_ms()) {
            GatherStep::Idle => Ok(()),
            GatherStep::Later(at) => self.alarm_by(at).await,
            GatherStep::Run => self.gather_turn().await,
        }
    }

    async fn gather_turn(&self) -> ApiResult<()> {
        let now = now_ms();
        let mut meta = self.meta()?;
        meta.gather.begin(now);
        self.save_meta(&meta)?;
        // If this turn is lost with the object, the alarm finds it stale and runs it again.
        self.alarm_by(now + app_room::GATHER_STALE_MS).await?;
        let row = match env::db(&self.env) {
            Ok(db) => store::get_job_any(&db, &meta.job_id).await.unwrap_or_else(|e| {
                worker::console_warn!("job {}: reading the idea from D1: {e:?}", meta.job_id);
                None
            }),
            Err(_) => None,
        };
        let idea = row
            .as_ref()
            .and_then(|r| r.initial_prompt.clone())
            .or_else(|| meta.initial_prompt.clone())
            .or_else(|| row.as_ref().map(|r| r.prompt.clone()))
            .unwrap_or_default();
        let transcript: Vec<(String, String)> = self
            .messages_after(0, crate::job_room::MAX_EVENTS_READ)?
            .into_iter()
            .filter_map(|(_, e)| match e {
                EventBody::StageUpdate { role, content, .. } => Some((role, content)),
                _ => None,
            })
            .collect();
        // The queue sends the turn and answers at once; the reply comes to `/gather-reply`, so the
        // alarm's other work never waits on a model.
        let call = crate::queue_object::GatherCall {
            job_id: meta.job_id.clone(),
            request: app_room::gather_request(&meta.job_id, &idea, &transcript),
            context: serde_json::json!({ "turn": now, "idea": idea }),
        };
        let sent = match env::queue(&self.env, &meta.queue) {
            Ok(queue) => http::call::<serde_json::Value>(&queue, Method::Post, "/gather", Some(&call)).await,
            Err(e) => Err(e.into()),
        };
        match sent {
            Ok(_) => Ok(()),
            Err(e) => self.gather_failed(format!("{e:?}")).await,
        }
    }

    /// `POST /gather-reply` (the queue): a gather turn's answer, `{context: {turn, idea}, result}`
    /// or `{context, error}`. A reply to a turn that is no longer the one in flight (taken for lost
    /// and run again) is dropped.
    async fn gather_reply(&self, reply: serde_json::Value) -> ApiResult<serde_json::Value> {
        let meta = self.meta()?;
        let turn = reply["context"]["turn"].as_i64();
        if !meta.gather.is_current(turn) {
            return Ok(serde_json::json!({ "taken": false }));
        }
        let idea = reply["context"]["idea"].as_str().unwrap_or_default().to_string();
        let outcome = match (reply.get("result"), reply.get("error")) {
            (Some(v), _) => app_room::gather_outcome(v),
            (None, Some(e)) => Err(e.as_str().map(str::to_string).unwrap_or_else(|| e.to_string())),
            (None, None) => Err("the queue sent an empty gather reply".into()),
        };
        match outcome {
            Ok(o) => self.gather_succeeded(o, idea, None).await?,
            Err(why) => self.gather_failed(why).await?,
        }
        Ok(serde_json::json!({ "taken": true }))
    }

    async fn gather_succeeded(&self, o: GatherOutcome, idea: String, row: Option<store::JobRow>) -> ApiResult<()> {
        let now = now_ms();
        let ts = rfc3339(now);
        let summary = o.summary.clone();
        let (texts, applied, again) = self.atomically(move |st| {
            let mut meta = st.meta()?;
            if meta.status != JobStatus::Collecting {
                // Cancelled or deleted meanwhile: the answer goes nowhere.
                meta.gather = GatherState::default();
                st.save_meta(&meta)?;
                return Ok((vec![], None, false));
            }
            let again = meta.gather.succeeded();
            let mut bodies: Vec<EventBody> = o
                .messages
                .into_iter()
                .map(|(content, metadata)| EventBody::StageUpdate {
                    role: "agent".into(),
                    sender: o.sender.clone(),
                    content,
                    metadata,
                    timestamp: ts.clone(),
                })
                .collect();
            if let Some(usage) = o.reply.usage {
                meta.usage.add(&usage);
                bodies.push(EventBody::Usage { usage, totals: meta.usage, timestamp: ts.clone() });
            }
            if let Some(s) = &summary {
                meta.requirements_summary = Some(s.clone());
                meta.initial_prompt = Some(idea);
                meta.gather = GatherState::default();
            }
            st.save_meta(&meta)?;
            let (texts, _) = st.insert_events(bodies)?;
            let applied = match summary {
                Some(_) => st.apply_transition(&TransitionRequest {
                    to: JobStatus::Queued,
                    message: "requirements collected; job queued".into(),
                    patch: JobPatch::default(),
                    lease: None,
                    runner_id: None,
                    if_lease: None,
                    from_queue: false,
                })?,
                None => None,
            };
            Ok((texts, applied, again))
        })?;
        self.broadcast(&texts);
        if let Some(applied) = applied {
            self.broadcast(&applied.texts);
            self.follow_transition(&applied, false).await;
            self.enqueue_app(&applied.meta, row).await;
        } else if again {
            self.alarm_by(now_ms()).await?;
        }
        Ok(())
    }

    async fn gather_failed(&self, why: String) -> ApiResult<()> {
        let now = now_ms();
        let ts = rfc3339(now);
        let job = self.meta()?.job_id;
        worker::console_warn!("job {job}: gather turn failed: {why}");
        let (texts, retry_at) = self.atomically(move |st| {
            let mut meta = st.meta()?;
            if meta.status != JobStatus::Collecting {
                meta.gather = GatherState::default();
                st.save_meta(&meta)?;
                return Ok((vec![], None));
            }
            let first = meta.gather.failed(now);
            let at = meta.gather.not_before_ms;
            st.save_meta(&meta)?;
            let texts = if first {
                st.insert_events(vec![EventBody::StageUpdate {
                    role: "system".into(),
                    sender: SYSTEM_SENDER.into(),
                    content: GATHER_CALL_NOTE.into(),
                    metadata: serde_json::json!({ "type": "gatherer_unavailable" }),
                    timestamp: ts,
                }])?
                .0
            } else {
                vec![]
            };
            Ok((texts, Some(at)))
        })?;
        self.broadcast(&texts);
        if let Some(at) = retry_at {
            self.alarm_by(at).await?;
        }
        Ok(())
    }

    /// Puts an app build in its queue (after collecting, or a continuation), as submit does: the
    /// row's enqueue request, with the room's app parameters. A failure is logged: the row is
    /// `queued` in D1, and the queue's reconciliation enqueues it.
    async fn enqueue_app(&self, meta: &RoomMeta, row: Option<store::JobRow>) {
        let row = match row {
            Some(r) => Some(r),
            None => match env::db(&self.env) {
                Ok(db) => store::get_job_any(&db, &meta.job_id).await.ok().flatten(),
                Err(_) => None,
            },
        };
        let Some(row) = row else {
            worker::console_error!("job {}: no D1 row to enqueue from; reconciliation will find none either", meta.job_id);
            return;
        };
        let mut req = crate::queue_object::enqueue_request(&row);
        req.assignment.app = meta.app_params();
        let queued = match env::queue(&self.env, &meta.queue) {
            Ok(q) => http::call::<serde_json::Value>(&q, Method::Post, "/enqueue", Some(&req)).await.map(|_| ()),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = queued {
            worker::console_error!("job {}: enqueue failed (reconciliation enqueues it): {e:?}", meta.job_id);
        }
    }

    /// `stageUpdate` events after `after`, oldest first (deleted ones are gone), at most `limit`.
    fn messages_after(&self, after: u64, limit: usize) -> ApiResult<Vec<(u64, EventBody)>> {
        let mut out = vec![];
        for (seq, text) in self.events_after(after, Some("stageUpdate"), limit)? {
            out.push((seq, serde_json::from_str::<ServerEvent>(&text)?.body));
        }
        Ok(out)
    }

    /// `POST /pause` and `/resume`: the flag is the room's; a running job's runner is told through
    /// its queue, a queued one gets it with its assignment.
    async fn set_paused(&self, paused: bool) -> ApiResult<serde_json::Value> {
        let mut meta = self.meta()?;
        if meta.job_type != JobType::AppBuild {
            return Err(ApiError::Conflict("only app builds pause".into()));
        }
        if meta.status.is_terminal() {
            return Err(ApiError::Conflict(format!("job has ended ({}); nothing to {}", meta.face_status(), if paused { "pause" } else { "resume" })));
        }
        if meta.is_paused != paused {
            meta.is_paused = paused;
            self.save_meta(&meta)?;
            if meta.status == JobStatus::Running {
                let relayed = match env::queue(&self.env, &meta.queue) {
                    Ok(q) => http::call::<serde_json::Value>(
                        &q,
                        Method::Post,
                        "/relay",
                        Some(&serde_json::json!({"job_id": meta.job_id, "kind": if paused { "pause" } else { "resume" }})),
                    )
                    .await
                    .map(|_| ()),
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = relayed {
                    worker::console_warn!("job {}: telling the runner to {}: {e:?}", meta.job_id, if paused { "pause" } else { "resume" });
                }
            }
            match env::db(&self.env) {
                Ok(db) => {
                    if let Err(e) = store::set_job_paused(&db, &meta.job_id, paused, &rfc3339(now_ms())).await {
                        worker::console_error!("job {}: D1 is_paused copy failed: {e:?}", meta.job_id);
                    }
                }
                Err(e) => worker::console_error!("job {}: no D1 binding: {e}", meta.job_id),
            }
        }
        Ok(serde_json::json!({ "is_paused": meta.is_paused, "status": meta.face_status() }))
    }

    /// `POST /continue`: a finished app build runs again with more requirements.
    async fn continue_run(&self, requirements: String) -> ApiResult<serde_json::Value> {
        let meta = self.meta()?;
        // From an ended run only (`running → queued` is the queue's requeue, not a continuation).
        let ended = matches!(meta.status, JobStatus::Completed | JobStatus::Failed);
        if !ended || !meta.job_type.allows(meta.status, JobStatus::Queued) {
            return Err(ApiError::Conflict(format!(
                "job is {}; only a finished app build (build_done or failed) can continue",
                meta.face_status()
            )));
        }
        let applied = self.atomically(move |st| {
            let mut meta = st.meta()?;
            meta.continuation = Some(requirements);
            meta.attempt = 0;
            st.save_meta(&meta)?;
            st.apply_transition(&TransitionRequest {
                to: JobStatus::Queued,
                message: "continuation queued with new requirements".into(),
                patch: JobPatch { attempts: Some(0), ..Default::default() },
                lease: None,
                runner_id: None,
                if_lease: None,
                from_queue: false,
            })
        })?;
        let Some(applied) = applied else { return Err(ApiError::Internal("continuation changed nothing".into())) };
        self.broadcast(&applied.texts);
        // The row keeps the continuation too, so a room or queue rebuilt from it runs the same.
        let kept = match (env::db(&self.env), applied.meta.continuation.as_deref()) {
            (Ok(db), Some(text)) => store::set_job_continuation(&db, &applied.meta.job_id, text).await,
            (Err(e), _) => Err(e.into()),
            (_, None) => Ok(()),
        };
        if let Err(e) = kept {
            worker::console_error!("job {}: D1 continuation copy failed (the room keeps it): {e:?}", applied.meta.job_id);
        }
        self.follow_transition(&applied, false).await;
        self.enqueue_app(&applied.meta, None).await;
        Ok(serde_json::json!({ "status": applied.meta.face_status() }))
    }

    /// `DELETE /`: stops the job wherever it is, closes its sockets and forgets everything.
    async fn delete_room(&self) -> ApiResult<()> {
        let meta = self.meta()?;
        if !meta.status.is_terminal() && meta.status != JobStatus::Collecting {
            let released = match env::queue(&self.env, &meta.queue) {
                Ok(q) => http::call::<serde_json::Value>(
                    &q,
                    Method::Post,
                    "/release",
                    Some(&serde_json::json!({"job_id": meta.job_id, "cancel": true})),
                )
                .await
                .map(|_| ()),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = released {
                worker::console_error!("job {}: queue release at delete failed (reconciliation releases it): {e:?}", meta.job_id);
            }
        }
        for ws in self.state.get_websockets() {
            let _ = ws.close(Some(1000), Some("job deleted"));
        }
        let storage = self.state.storage();
        storage.delete_alarm().await?;
        storage.delete_all().await?;
        *self.meta.borrow_mut() = None;
        *self.next_seq.borrow_mut() = None;
        self.ensure_schema()?;
        Ok(())
    }

    /// `DELETE /messages/<seq>`: the row stays as a tombstone (its seq is never reused).
    fn delete_message(&self, seq: u64) -> ApiResult<()> {
        self.meta()?;
        let found = self.atomically(move |st| {
            #[derive(Deserialize)]
            struct Row {
                #[allow(dead_code)]
                seq: i64,
            }
            let rows: Vec<Row> = st
                .sql()
                .exec("SELECT seq FROM events WHERE seq = ? AND kind = 'stageUpdate'", vec![SqlStorageValue::from(seq as i64)])?
                .to_array()?;
            if rows.is_empty() {
                return Ok(false);
            }
            st.sql().exec(
                "UPDATE events SET kind = ?, body = '' WHERE seq = ?",
                vec![SqlStorageValue::from(DELETED_KIND.to_string()), SqlStorageValue::from(seq as i64)],
            )?;
            Ok(true)
        })?;
        if found {
            Ok(())
        } else {
            Err(ApiError::NotFound("message not found".into()))
        }
    }

    /// Whether a runner's snapshot call comes from the runner of the job's lease: the current one
    /// while it runs, or the last one after its run ended.
    fn check_lease(&self, lease_id: &str, runner_id: &str) -> ApiResult<()> {
        let meta = self.meta()?;
        let current = meta.status == JobStatus::Running && meta.lease_id.as_deref() == Some(lease_id);
        if current {
            if meta.runner_id.as_deref() != Some(runner_id) {
                return Err(ApiError::Conflict(format!("job {} is leased to another runner", meta.job_id)));
            }
            return Ok(());
        }
        match &meta.last_lease {
            Some((l, r)) if l == lease_id && r == runner_id && meta.status != JobStatus::Running => Ok(()),
            _ => Err(ApiError::Conflict("that lease is not the job's current one".into())),
        }
    }

    async fn route(&self, mut req: Request) -> ApiResult {
        let path = req.path();
        match (req.method(), path.as_str()) {
            (Method::Post, "/init") => self.init(body_as(&mut req).await?).await,
            // Opened ahead of its job (`room_pool::refill`): the constructor made the schema,
            // whose commit is out before this answer is.
            (Method::Post, "/warm") => Ok(Response::empty()?.with_status(204)),
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
            (Method::Get, "/indexed-events") => {
                self.meta()?;
                let url = req.url()?;
                let param = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.to_string());
                let kind = param("kind").ok_or_else(|| ApiError::BadRequest("kind is required".into()))?;
                let offset = param("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
                let limit = param("limit").and_then(|v| v.parse().ok()).unwrap_or(EVENTS_PAGE).clamp(1, MAX_EVENTS_READ);
                let headers = worker::Headers::new();
                headers.set("content-type", "application/json")?;
                Ok(Response::ok(self.indexed_events(&kind, offset, limit)?)?.with_headers(headers))
            }
            (Method::Get, "/meta") => json(&self.meta()?),
            // `?owner=`: the job's row as the room keeps it (`null` when it keeps none); 404 for
            // another owner, as for a missing job.
            (Method::Get, "/row") => {
                let url = req.url()?;
                let owner = url.query_pairs().find(|(k, _)| k == "owner").map(|(_, v)| v.to_string());
                if owner.as_deref() != Some(self.meta()?.owner.as_str()) {
                    return Err(ApiError::NotFound("job not found".into()));
                }
                json(&self.store().kv_get::<store::JobRow>(ROW_KEY)?)
            }
            (Method::Post, "/messages") => {
                #[derive(Deserialize)]
                struct Msg {
                    role: String,
                    #[serde(default)]
                    sender: Option<String>,
                    content: String,
                    #[serde(default)]
                    metadata: serde_json::Value,
                }
                let m: Msg = body_as(&mut req).await?;
                if !MESSAGE_ROLES.contains(&m.role.as_str()) {
                    return Err(ApiError::BadRequest(format!("role must be user, agent or system, not {:?}", m.role)));
                }
                if m.content.trim().is_empty() {
                    return Err(ApiError::BadRequest("content may not be blank".into()));
                }
                let metadata = if m.metadata.is_null() { serde_json::json!({}) } else { m.metadata };
                let sender = m.sender.unwrap_or_else(|| m.role.clone());
                let (seq, created_at) = self.post_message(&m.role, &sender, &m.content, metadata).await?;
                json(&serde_json::json!({ "seq": seq, "created_at": created_at }))
            }
            (Method::Get, "/messages") => {
                self.meta()?;
                let url = req.url()?;
                let param = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.to_string());
                let after = parse_cursor(param("after").as_deref()).map_err(ApiError::BadRequest)?;
                let limit = match param("limit") {
                    None => MESSAGES_PAGE,
                    Some(v) => v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_EVENTS_READ).contains(n))
                        .ok_or_else(|| ApiError::BadRequest(format!("limit must be 1 to {MAX_EVENTS_READ}")))?,
                };
                let page = self.messages_after(after, limit)?;
                let next_after = (page.len() == limit).then(|| page.last().map(|(s, _)| *s)).flatten();
                let messages: Vec<serde_json::Value> = page
                    .into_iter()
                    .filter_map(|(seq, e)| match e {
                        EventBody::StageUpdate { role, sender, content, metadata, timestamp } => Some(serde_json::json!({
                            "seq": seq, "role": role, "sender": sender, "content": content, "metadata": metadata, "timestamp": timestamp,
                        })),
                        _ => None,
                    })
                    .collect();
                json(&serde_json::json!({ "messages": messages, "next_after": next_after }))
            }
            (Method::Get, "/steps") => {
                self.meta()?;
                let mut steps = vec![];
                let mut after = 0;
                loop {
                    let page = self.events_after(after, Some("agentDialogue"), EVENTS_PAGE)?;
                    for (seq, text) in &page {
                        if let EventBody::AgentDialogue { agent, message, order, timestamp, .. } = serde_json::from_str::<ServerEvent>(text)?.body {
                            steps.push(serde_json::json!({
                                "seq": seq, "agent": agent, "message": message, "order": order, "timestamp": timestamp,
                            }));
                        }
                    }
                    match page.last() {
                        Some((seq, _)) if page.len() == EVENTS_PAGE => after = *seq,
                        _ => break,
                    }
                }
                json(&serde_json::json!({ "steps": steps }))
            }
            (Method::Delete, p) if p.starts_with("/messages/") => {
                let seq = p["/messages/".len()..].parse::<u64>().map_err(|_| ApiError::NotFound("message not found".into()))?;
                self.delete_message(seq)?;
                Ok(Response::empty()?.with_status(204))
            }
            (Method::Post, "/pause") => json(&self.set_paused(true).await?),
            (Method::Post, "/resume") => json(&self.set_paused(false).await?),
            (Method::Post, "/continue") => {
                #[derive(Deserialize)]
                struct Continue {
                    requirements: String,
                }
                let c: Continue = body_as(&mut req).await?;
                if c.requirements.trim().is_empty() {
                    return Err(ApiError::BadRequest("requirements may not be blank".into()));
                }
                json(&self.continue_run(c.requirements).await?)
            }
            (Method::Delete, "/") => {
                self.delete_room().await?;
                Ok(Response::empty()?.with_status(204))
            }
            (Method::Post, "/gather-reply") => {
                let reply: serde_json::Value = body_as(&mut req).await?;
                json(&self.gather_reply(reply).await?)
            }
            (Method::Post, "/gather-now") => {
                // A runner connected: an owed gather turn need not wait out its backoff.
                let mut meta = self.meta()?;
                if meta.gather.pending && meta.gather.running_since_ms.is_none() && meta.status == JobStatus::Collecting {
                    meta.gather.not_before_ms = 0;
                    self.save_meta(&meta)?;
                    self.alarm_by(now_ms()).await?;
                }
                json(&serde_json::json!({ "ok": true }))
            }
            (Method::Post, "/check-lease") => {
                #[derive(Deserialize)]
                struct Check {
                    lease_id: String,
                    runner_id: String,
                }
                let c: Check = body_as(&mut req).await?;
                self.check_lease(&c.lease_id, &c.runner_id)?;
                json(&serde_json::json!({ "lease_valid": true }))
            }
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
        if self.flag("dashboard_stale") {
            if let Err(e) = self.repair_dashboard().await {
                worker::console_error!("dashboard rows write failed again: {e:?}");
                let _ = self.alarm_by(now_ms() + D1_RETRY_MS).await;
            }
        }
        if self.flag("d1_rows_stale") {
            let synced = match (self.meta(), env::db(&self.env)) {
                (Ok(meta), Ok(db)) => self.sync_app_rows(&db, &meta).await,
                (Err(e), _) => Err(e),
                (_, Err(e)) => Err(e.into()),
            };
            if let Err(e) = synced {
                worker::console_error!("D1 app/tickets write failed again: {e:?}");
                let _ = self.alarm_by(now_ms() + D1_RETRY_MS).await;
            }
        }
        if let Err(e) = self.gather_step().await {
            worker::console_error!("gather turn: {e:?}");
            let _ = self.alarm_by(now_ms() + D1_RETRY_MS).await;
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

/// A landing job's page status copy (none for other jobs).
async fn copy_page(db: &worker::D1Database, page: Option<&(crate::landing_room::PageStatus, String)>, now: &str) -> ApiResult<()> {
    match page {
        Some((page, page_id)) => store::set_page_status(db, page_id, page, now).await,
        None => Ok(()),
    }
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
