//! `POST /v1/agent/init` and `POST /v1/agent/chat`: a session's jobs. Both answer at once; the
//! job runs on a runner as the queue dispatches it, one job of a session at a time.
//!
//! Init creates the session's landing page when the caller has none for that session
//! (`landing_page_id` in the answer) and otherwise answers `landing_page_id: null` and replaces
//! the page's `business_data` with the new payload (an init regenerates the page from what it is
//! sent; the runner reads the page's data when the job is dispatched).

use kiln_schemas::landing::{parse_message, parse_payload, session_id, ChatAnswer, InitAnswer};
use kiln_schemas::status::{JobStatus, JobType};
use serde_json::Value;
use worker::{Method, Request};

use super::super::Ctx;
use crate::auth::Principal;
use crate::env::{self, new_id, now_ms};
use crate::http::{self, body_json, json, ApiError, ApiResult};
use crate::job_room::{InitWithNote, NodeNote, RoomMeta, TransitionRequest, TransitionResult};
use crate::landing_store::{self, title, Scope};
use crate::queue_object::{enqueue_request, room_meta, Position};
use crate::store::{self, JobPatch, JobRow};
use crate::time::rfc3339;

const DEFAULT_QUEUE: &str = "default";

/// The body and the session it names (body `session_id` wins over `X-Session-Id`).
async fn body_and_session(req: &mut Request) -> ApiResult<(Value, String)> {
    let header = req.headers().get("x-session-id")?;
    let body = body_json(req).await?;
    let session = session_id(Some(&body), header.as_deref()).map_err(ApiError::BadRequest)?;
    Ok((body, session))
}

/// `POST /v1/agent/init {"session_id"?, "payload"}` → `{job_id, session_id, landing_page_id}`.
pub async fn init(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let (body, session) = body_and_session(&mut req).await?;
    let payload = parse_payload(&body).map_err(ApiError::BadRequest)?;
    let payload_text = serde_json::to_string(&payload)?;
    let db = env::db(&ctx.env)?;
    let now = rfc3339(now_ms());
    let new_page = new_id();
    let created = landing_store::insert_page_if_absent(&db, &new_page, who.owner(), &session, &payload_text, &now).await?;
    let page_id = if created {
        new_page.clone()
    } else {
        let page = landing_store::page_of_session(&db, &session, Scope::Owner(who.owner()))
            .await?
            .ok_or_else(|| ApiError::Internal(format!("session {session}'s page vanished")))?;
        landing_store::update_page(&db, &page.id, Some(&payload_text), None, &now).await?;
        page.id
    };
    let job_id = submit(ctx, who, JobType::LandingInit, title(JobType::LandingInit), &session, &page_id).await?;
    json(&InitAnswer { job_id, session_id: session, landing_page_id: created.then_some(new_page) })
}

/// `POST /v1/agent/chat {"message"}` → `{reply, job_id}`. The session must have its page (404:
/// init first).
pub async fn chat(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let (body, session) = body_and_session(&mut req).await?;
    let message = parse_message(&body).map_err(ApiError::BadRequest)?;
    let db = env::db(&ctx.env)?;
    let page = landing_store::page_of_session(&db, &session, Scope::Owner(who.owner())).await?.ok_or_else(|| {
        ApiError::NotFound(format!("session {session} has no landing page: POST /v1/agent/init first"))
    })?;
    let job_id = submit(ctx, who, JobType::LandingChat, &message, &session, &page.id).await?;
    json(&ChatAnswer::new(&job_id))
}

/// Opens the job's room (status queued; a note when another job of the session is pending or
/// running), writes its row and enqueues it, as `POST /jobs` does: a failed enqueue fails the job
/// in its room and answers the error.
async fn submit(ctx: &Ctx, who: &Principal, kind: JobType, prompt: &str, session: &str, page_id: &str) -> ApiResult<String> {
    let db = env::db(&ctx.env)?;
    let ahead = landing_store::unfinished_job_of_session(&db, who.owner(), session).await?;
    let id = new_id();
    let now = now_ms();
    let created_at = rfc3339(now);
    let row = JobRow {
        id: id.clone(),
        owner: who.owner().to_string(),
        job_type: kind.as_str().to_string(),
        status: JobStatus::Queued.as_str().to_string(),
        queue: DEFAULT_QUEUE.to_string(),
        prompt: prompt.to_string(),
        title: Some(title(kind).to_string()),
        params: "{}".into(),
        created_at: created_at.clone(),
        updated_at: created_at,
        created_ms: now,
        session_id: Some(session.to_string()),
        landing_page_id: Some(page_id.to_string()),
        ..Default::default()
    };
    let room = env::job_room(&ctx.env, &id)?;
    let node = ahead.map(|other| NodeNote {
        node: "queue".into(),
        event_type: "waiting".into(),
        message: format!("Waiting for job {other} of this session to finish"),
        data: serde_json::json!({ "waiting_for": other }),
    });
    let init = InitWithNote { meta: room_meta(&row), message: "job queued".into(), node, row: None };
    http::call::<RoomMeta>(&room, Method::Post, "/init", Some(&init)).await?;
    store::insert_job(&db, &row).await?;
    let q = env::queue(&ctx.env, &row.queue)?;
    if let Err(e) = http::call::<Position>(&q, Method::Post, "/enqueue", Some(&enqueue_request(&row))).await {
        let why = "the job could not be queued; send it again";
        let failed = TransitionRequest {
            to: JobStatus::Failed,
            message: why.to_string(),
            patch: JobPatch { error_message: Some(why.to_string()), ..Default::default() },
            lease: None,
            runner_id: None,
            if_lease: None,
            from_queue: false,
        };
        if let Err(e2) = http::call::<TransitionResult>(&room, Method::Post, "/transition", Some(&failed)).await {
            worker::console_error!("job {id}: enqueue failed ({e:?}) and so did failing it ({e2:?}); reconciliation queues it");
        }
        return Err(e);
    }
    Ok(id)
}
