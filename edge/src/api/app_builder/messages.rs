//! `/api/job-messages/`: a job's chat transcript (its room's `stageUpdate` events) as seed 000's
//! JobMessage rows, with ids `<job_id>:<seq>`. Not a second copy: posting appends to the log and
//! deleting removes the event from REST and socket replay alike.

use kiln_schemas::app::{parse_event_id, MessageView, NewMessage};
use serde::Deserialize;
use serde_json::json;
use worker::{Method, Request, Response};

use super::{job_id_param, owned_job, Ctx};
use crate::app_store::{default_sender, RoomMessage, RoomMessages};
use crate::auth::Principal;
use crate::env;
use crate::http::{self, body_json, json, json_status, ApiError, ApiResult};

/// Messages read from the room per call.
const PAGE: usize = 1000;
/// Pages one transcript read goes through at most (the room bounds what one job holds long
/// before this).
const MAX_PAGES: usize = 100;

async fn page(ctx: &Ctx, job_id: &str, after: u64, limit: usize) -> ApiResult<RoomMessages> {
    let room = env::job_room(&ctx.env, job_id)?;
    http::call(&room, Method::Get, &format!("/messages?after={after}&limit={limit}"), None::<&()>).await
}

/// The whole transcript, oldest first (the frontend replaces its chat with it on every socket
/// open), read from the room a page at a time.
pub async fn transcript(ctx: &Ctx, job_id: &str) -> ApiResult<Vec<MessageView>> {
    let mut out = vec![];
    let mut after = 0;
    for _ in 0..MAX_PAGES {
        let p = page(ctx, job_id, after, PAGE).await?;
        out.extend(p.messages.iter().map(|m| m.view(job_id)));
        match p.next_after {
            Some(next) if next > after => after = next,
            _ => break,
        }
    }
    Ok(out)
}

/// `GET /api/job-messages/?job_id=`: a plain array, oldest first.
pub async fn list(req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let job_id = job_id_param(&req.url()?)?;
    let row = owned_job(ctx, who, &job_id).await?;
    json(&transcript(ctx, &row.id).await?)
}

/// A message id's job (which `who` must be able to see) and seq; 404 otherwise.
async fn locate(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult<(String, u64)> {
    let (job_id, seq) = parse_event_id(id).ok_or_else(|| ApiError::NotFound("message not found".into()))?;
    let row = owned_job(ctx, who, job_id).await.map_err(|e| match e {
        ApiError::NotFound(_) => ApiError::NotFound("message not found".into()),
        other => other,
    })?;
    Ok((row.id, seq))
}

/// `GET /api/job-messages/<id>/`.
pub async fn get(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let (job_id, seq) = locate(ctx, who, id).await?;
    let p = page(ctx, &job_id, seq.saturating_sub(1), 1).await?;
    match p.messages.first() {
        Some(m) if m.seq == seq => json(&m.view(&job_id)),
        _ => Err(ApiError::NotFound("message not found".into())),
    }
}

/// `POST /api/job-messages/ {job_id, role, sender?, content, metadata?}` → 201 with the
/// message. A user's message while the job collects is answered by the gatherer, as one sent
/// over the socket is.
pub async fn create(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let body = body_json(&mut req).await?;
    let m = NewMessage::parse(&body).map_err(ApiError::BadRequest)?;
    let row = owned_job(ctx, who, &m.job_id.to_ascii_lowercase()).await?;
    let sender = m.sender.filter(|s| !s.trim().is_empty()).unwrap_or_else(|| default_sender(&m.role, who.display_name()));
    let room = env::job_room(&ctx.env, &row.id)?;
    #[derive(Deserialize)]
    struct Posted {
        seq: u64,
        created_at: String,
    }
    let posted: Posted = http::call(
        &room,
        Method::Post,
        "/messages",
        Some(&json!({ "role": m.role, "sender": sender, "content": m.content, "metadata": m.metadata })),
    )
    .await?;
    let stored = RoomMessage {
        seq: posted.seq,
        role: m.role,
        sender: Some(sender),
        content: m.content,
        metadata: m.metadata,
        timestamp: posted.created_at,
    };
    Ok(json_status(&stored.view(&row.id), 201))
}

/// `DELETE /api/job-messages/<id>/` → 204.
pub async fn delete(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let (job_id, seq) = locate(ctx, who, id).await?;
    let room = env::job_room(&ctx.env, &job_id)?;
    http::call::<serde_json::Value>(&room, Method::Delete, &format!("/messages/{seq}"), None::<&()>)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::NotFound("message not found".into()),
            other => other,
        })?;
    Ok(Response::empty()?.with_status(204))
}
