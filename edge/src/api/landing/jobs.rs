//! `/v1/jobs`: a landing job with its node events (`?after=<index>` answers only the events from
//! that index on, with `next_after`), the caller's landing jobs (newest first; `?session_id=`,
//! `?status=`, `?limit=`; without events), cancel, and `/stream`: the same events as Server-Sent
//! Events, relayed from the room's own socket (replay, then follow: nothing missed or repeated),
//! resumed after `Last-Event-ID`, ended after `__end__`.

use futures::channel::mpsc::{unbounded, UnboundedSender};
use futures::future::{select, Either};
use futures::StreamExt;
use kiln_schemas::events::ServerEvent;
use kiln_schemas::landing::{LandingJobEnvelope, END_NODE};
use kiln_schemas::status::JobStatus;
use serde_json::json;
use worker::{Delay, Headers, Method, Request, RequestInit, Response, WebSocket, WebsocketEvent};

use super::super::Ctx;
use super::{node_at, node_page, owned_job, param, scope};
use crate::auth::Principal;
use crate::env;
use crate::http::{self, json, ApiError, ApiResult};
use crate::job_room::{TransitionRequest, TransitionResult};
use crate::landing_store::{self, node_view, parse_index, parse_job_filter, sse_frame, stream_start, LandingJobRow};
use crate::store::JobPatch;

/// The job as seed 001 shows it; events from index `from` on when given. The row is read before
/// the log, so a terminal status always comes with its `__end__` event.
async fn envelope(ctx: &Ctx, row: &LandingJobRow, from: Option<u64>) -> ApiResult<LandingJobEnvelope> {
    Ok(LandingJobEnvelope { job: row.view(node_page(ctx, &row.id, from).await?, from) })
}

/// `GET /v1/jobs/<id>[?after=N]` → `{"job"}`.
pub async fn get(req: Request, ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let url = req.url()?;
    let from = param(&url, "after").map(|a| parse_index("after", &a)).transpose().map_err(ApiError::BadRequest)?;
    let row = owned_job(ctx, who, id).await?;
    json(&envelope(ctx, &row, from).await?)
}

/// `GET /v1/jobs[?session_id=&status=&limit=]` → `{"jobs": [...]}` (no events; poll a job for them).
pub async fn list(req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let url = req.url()?;
    let pairs: Vec<(String, String)> = url.query_pairs().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let filter = parse_job_filter(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map_err(ApiError::BadRequest)?;
    let rows = landing_store::list_jobs(&env::db(&ctx.env)?, scope(who), &filter).await?;
    json(&json!({ "jobs": rows.iter().map(LandingJobRow::list_view).collect::<Vec<_>>() }))
}

/// `POST /v1/jobs/<id>/cancel` → `{"job"}` (ending with its `__end__` `job_cancelled`); 409 for a
/// job that already ended.
pub async fn cancel(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = owned_job(ctx, who, id).await?;
    let room = env::job_room(&ctx.env, &row.id)?;
    let req = TransitionRequest {
        to: JobStatus::Cancelled,
        message: "job cancelled by user".into(),
        patch: JobPatch::default(),
        lease: None,
        runner_id: None,
        if_lease: None,
        from_queue: false,
    };
    http::call::<TransitionResult>(&room, Method::Post, "/transition", Some(&req)).await.map_err(|e| match e {
        ApiError::Conflict(_) => ApiError::Conflict("job already ended; only pending or running jobs can be cancelled".into()),
        other => other,
    })?;
    let row = owned_job(ctx, who, id).await?;
    json(&envelope(ctx, &row, None).await?)
}

/// Seconds between keepalive comments on an idle stream.
fn keepalive_ms(ctx: &Ctx) -> u64 {
    ctx.config.sse_keepalive_secs.max(1) * 1000
}

/// `GET /v1/jobs/<id>/stream` (Server-Sent Events): `id: <index>`, `event: <event_type>`,
/// `data: <the event as GET shows it>`; from `Last-Event-ID` + 1, else `?after=`, else 0; ends
/// after `__end__` (at once when the client saw it already), or with `event: error` when the
/// credential expires (the room closes its socket then).
pub async fn stream(req: Request, ctx: &Ctx, who: &Principal, expires_at_ms: Option<i64>, id: &str) -> ApiResult {
    let url = req.url()?;
    let last = req.headers().get("last-event-id")?;
    let start = stream_start(last.as_deref(), param(&url, "after").as_deref()).map_err(ApiError::BadRequest)?;
    let row = owned_job(ctx, who, id).await?;
    // Where the room's replay starts: after the node event just before `start` (seqs are the
    // log's; indices count node events only).
    let mut cursor = 0;
    let mut index = 0;
    let mut ended = false;
    if start > 0 {
        let (total, before) = node_at(ctx, &row.id, start - 1).await?;
        if let Some((seq, ev)) = before {
            cursor = seq;
            index = total.min(start);
            ended = ev.node == END_NODE;
        }
    }
    let (tx, rx) = unbounded::<Result<Vec<u8>, worker::Error>>();
    let _ = tx.unbounded_send(Ok(b"retry: 2000\n\n".to_vec()));
    if !ended {
        let ws = open_room_socket(ctx, &row.id, cursor, expires_at_ms).await?;
        let relay = Relay { job_id: row.id.clone(), tx, index, start, keepalive_ms: keepalive_ms(ctx) };
        worker::wasm_bindgen_futures::spawn_local(relay.run(ws));
    }
    let headers = Headers::new();
    headers.set("content-type", "text/event-stream; charset=utf-8")?;
    headers.set("cache-control", "no-cache, no-transform")?;
    headers.set("x-accel-buffering", "no")?;
    Ok(Response::from_stream(rx)?.with_headers(headers))
}

/// The room's socket, replaying the log after `cursor`.
async fn open_room_socket(ctx: &Ctx, job_id: &str, cursor: u64, expires_at_ms: Option<i64>) -> ApiResult<WebSocket> {
    let mut target = worker::Url::parse("https://room/ws").expect("static url");
    {
        let mut q = target.query_pairs_mut();
        q.append_pair("after", &cursor.to_string());
        q.append_pair("sender", "stream");
        if let Some(exp) = expires_at_ms {
            q.append_pair("expires_at_ms", &exp.to_string());
        }
    }
    let headers = Headers::new();
    headers.set("upgrade", "websocket")?;
    let mut init = RequestInit::new();
    init.with_headers(headers);
    let resp = env::job_room(&ctx.env, job_id)?.fetch_with_request(Request::new_with_init(target.as_str(), &init)?).await?;
    let ws = resp.websocket().ok_or_else(|| ApiError::Internal(format!("job {job_id}: the room answered no socket")))?;
    ws.accept()?;
    Ok(ws)
}

/// Relays a room socket's node events to a stream's body.
struct Relay {
    job_id: String,
    tx: UnboundedSender<Result<Vec<u8>, worker::Error>>,
    /// The index of the next node event the socket brings.
    index: u64,
    /// The first index sent.
    start: u64,
    keepalive_ms: u64,
}

impl Relay {
    /// Sends a chunk; `false` when the client is gone.
    fn send(&self, chunk: String) -> bool {
        self.tx.unbounded_send(Ok(chunk.into_bytes())).is_ok()
    }

    fn error(&self, message: &str) {
        self.send(format!("event: error\ndata: {}\n\n", json!({ "error": message })));
    }

    async fn run(mut self, ws: WebSocket) {
        let Ok(mut events) = ws.events() else {
            self.error("could not follow the job");
            return;
        };
        // Whether the client was told why the stream ends.
        let mut told = false;
        loop {
            let delay = Delay::from(std::time::Duration::from_millis(self.keepalive_ms));
            match select(events.next(), delay).await {
                Either::Left((Some(Ok(WebsocketEvent::Message(m))), _)) => {
                    let Some(text) = m.text() else { continue };
                    if let Ok(ev) = serde_json::from_str::<ServerEvent>(&text) {
                        let Some(view) = node_view(&self.job_id, &ev) else { continue };
                        let i = self.index;
                        self.index += 1;
                        if i >= self.start && !self.send(sse_frame(i, &view)) {
                            break;
                        }
                        if view.node == END_NODE {
                            break;
                        }
                    } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                        // The room's own word (a `kind: error`, as when the credential expires:
                        // its socket closes next).
                        if v.get("kind").and_then(|k| k.as_str()) == Some("error") {
                            self.error(v.get("message").and_then(|m| m.as_str()).unwrap_or("error"));
                            told = true;
                        }
                    }
                }
                Either::Left((Some(Ok(WebsocketEvent::Close(c))), _)) => {
                    if c.code() != 1000 && !told {
                        self.error(&format!("the job's channel closed ({}); reconnect with Last-Event-ID", c.code()));
                    }
                    break;
                }
                Either::Left((Some(Err(_)) | None, _)) => {
                    self.error("the job's channel failed; reconnect with Last-Event-ID");
                    break;
                }
                Either::Right(_) => {
                    if !self.send(": keepalive\n\n".into()) {
                        break;
                    }
                }
            }
        }
        drop(events);
        let _ = ws.close(Some(1000), Some("stream ended"));
        // Dropping the sender ends the body.
    }
}
