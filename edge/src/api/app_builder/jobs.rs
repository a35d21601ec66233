//! `/api/jobs/`: an app build's life as seed 000 sees it. Create opens the job's room in
//! `collecting` (the room schedules the requirements gatherer's first reply) and writes its row;
//! pause, resume and continue are the room's; delete and purge remove the room, the R2 snapshot
//! and the rows.

use kiln_schemas::app::{parse_continue, parse_patch, NewAppJob, PauseAnswer, PurgeAnswer};
use kiln_schemas::status::{JobStatus, JobType};
use serde::Deserialize;
use serde_json::json;
use worker::{Method, Request, Response};

use super::{messages, owned_job, scope, Ctx};
use crate::app_store::{self, AppJobRow, RoomSteps, Scope};
use crate::auth::Principal;
use crate::env::{self, new_id, now_ms};
use crate::http::{self, body_json, json, json_status, ApiError, ApiResult};
use crate::job_room::{InitRequest, RoomMeta};
use crate::store::{self, JobRow};
use crate::time::rfc3339;

const DEFAULT_QUEUE: &str = "default";

/// `POST /api/jobs/ {"prompt"}`: a new app build in `collecting`, answered 201 with the job.
pub async fn create(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let body = body_json(&mut req).await?;
    let idea = NewAppJob::parse(&body).map_err(ApiError::BadRequest)?.prompt;
    let id = new_id();
    let now = now_ms();
    let created_at = rfc3339(now);
    let row = JobRow {
        id: id.clone(),
        owner: who.owner().to_string(),
        job_type: JobType::AppBuild.as_str().to_string(),
        status: JobStatus::Collecting.as_str().to_string(),
        queue: DEFAULT_QUEUE.to_string(),
        prompt: idea.clone(),
        initial_prompt: Some(idea.clone()),
        params: "{}".into(),
        created_at: created_at.clone(),
        updated_at: created_at,
        created_ms: now,
        ..Default::default()
    };
    // The room first, then the row (as `POST /jobs`): a room without a row is invisible.
    let meta = RoomMeta::app_build(&id, who.owner(), DEFAULT_QUEUE, &idea);
    let init = InitRequest { meta, message: "collecting requirements".into(), row: None };
    let room = env::job_room(&ctx.env, &id)?;
    http::call::<RoomMeta>(&room, Method::Post, "/init", Some(&init)).await?;
    if let Err(e) = store::insert_job(&env::db(&ctx.env)?, &row).await {
        // Without its row the job is invisible: its room (and its gatherer turns) go too.
        if let Err(e2) = http::call::<serde_json::Value>(&room, Method::Delete, "/", None::<&()>).await {
            worker::console_error!("job {id}: its row was not written ({e:?}) and its room not removed ({e2:?})");
        }
        return Err(e);
    }
    let view = app_store::get_app_job(&env::db(&ctx.env)?, &id, Scope::Any)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("job {id} vanished after insert")))?
        .view();
    Ok(json_status(&view, 201))
}

/// `GET /api/jobs/`: a plain array, newest first.
pub async fn list(ctx: &Ctx, who: &Principal) -> ApiResult {
    let rows = app_store::list_app_jobs(&env::db(&ctx.env)?, scope(who)).await?;
    json(&rows.iter().map(AppJobRow::view).collect::<Vec<_>>())
}

/// `GET /api/jobs/<id>/`: the job with its steps (executive dialogue) and messages.
pub async fn get(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = owned_job(ctx, who, id).await?;
    let room = env::job_room(&ctx.env, &row.id)?;
    let steps: RoomSteps = http::call(&room, Method::Get, "/steps", None::<&()>).await?;
    let mut view = row.view();
    view.steps = Some(steps.steps.iter().map(|s| s.view(&row.id)).collect());
    view.messages = Some(messages::transcript(ctx, &row.id).await?);
    json(&view)
}

/// `PATCH /api/jobs/<id>/ {"initial_prompt"}`: only while collecting.
pub async fn patch(mut req: Request, ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = owned_job(ctx, who, id).await?;
    let body = body_json(&mut req).await?;
    let idea = parse_patch(&body).map_err(ApiError::BadRequest)?;
    let not_collecting = |status: &str| ApiError::Conflict(format!("job is {status}; initial_prompt can change only while collecting"));
    if row.status() != JobStatus::Collecting {
        return Err(not_collecting(row.face_status()));
    }
    let db = env::db(&ctx.env)?;
    if !app_store::set_idea(&db, &row.id, &idea, &rfc3339(now_ms())).await? {
        // Collecting ended between the read and the write.
        let now = app_store::get_app_job(&db, &row.id, Scope::Any).await?;
        return Err(not_collecting(now.as_ref().map_or("gone", |r| r.face_status())));
    }
    let row = app_store::get_app_job(&db, &row.id, Scope::Any).await?.ok_or_else(|| ApiError::NotFound("job not found".into()))?;
    json(&row.view())
}

/// Removes a job wherever it is: its room (which stops it on its runner or in its queue and
/// closes its sockets), its workspace snapshot, then its rows (so a failure before them leaves a
/// job the user can delete again).
async fn remove(ctx: &Ctx, job_id: &str) -> ApiResult<()> {
    let room = env::job_room(&ctx.env, job_id)?;
    match http::call::<serde_json::Value>(&room, Method::Delete, "/", None::<&()>).await {
        Ok(_) | Err(ApiError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    env::artifacts(&ctx.env)?.delete(app_store::snapshot_key(job_id)).await?;
    app_store::delete_app_job_rows(&env::db(&ctx.env)?, job_id).await
}

/// `DELETE /api/jobs/<id>/` → 204.
pub async fn delete(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = owned_job(ctx, who, id).await?;
    remove(ctx, &row.id).await?;
    Ok(Response::empty()?.with_status(204))
}

/// `DELETE /api/jobs/purge/` → `{"deleted": n}`: every app build of the caller's own (the
/// service principal's own too, never everyone's), only while `ALLOW_JOB_PURGE=true`.
pub async fn purge(ctx: &Ctx, who: &Principal) -> ApiResult {
    if !ctx.config.allow_job_purge {
        return Err(ApiError::Forbidden("purging jobs is disabled: it needs ALLOW_JOB_PURGE=true (development only)".into()));
    }
    let db = env::db(&ctx.env)?;
    let mut deleted = 0;
    // A list answers at most `MAX_LIST` jobs; a few rounds cover any account.
    for _ in 0..10 {
        let rows = app_store::list_app_jobs(&db, Scope::Owner(who.owner())).await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            remove(ctx, &row.id).await?;
            deleted += 1;
        }
    }
    json(&PurgeAnswer { deleted })
}

/// The room's answer to `pause` and `resume`.
#[derive(Deserialize)]
struct Paused {
    is_paused: bool,
    status: String,
}

/// `POST /api/jobs/<id>/pause/` · `resume/` → `{detail, is_paused, status}`. A paused job stops
/// between steps (the step running finishes).
pub async fn pause(ctx: &Ctx, who: &Principal, id: &str, pause: bool) -> ApiResult {
    let row = owned_job(ctx, who, id).await?;
    let room = env::job_room(&ctx.env, &row.id)?;
    let path = if pause { "/pause" } else { "/resume" };
    let answer: Paused = http::call(&room, Method::Post, path, None::<&()>).await?;
    let detail = match (pause, answer.is_paused) {
        (true, true) => "job paused: it stops before its next step",
        (false, false) => "job resumed",
        (true, false) => "job is not paused",
        (false, true) => "job is still paused",
    };
    json(&PauseAnswer { detail: detail.into(), is_paused: answer.is_paused, status: answer.status })
}

/// `POST /api/jobs/<id>/continue/ {"requirements"}`: a continuation run of a finished job with
/// more requirements; answers the job.
pub async fn continue_job(mut req: Request, ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = owned_job(ctx, who, id).await?;
    let body = body_json(&mut req).await?;
    let requirements = parse_continue(&body).map_err(ApiError::BadRequest)?;
    let room = env::job_room(&ctx.env, &row.id)?;
    #[derive(Deserialize)]
    struct Continued {
        status: String,
    }
    let answer: Continued = http::call(&room, Method::Post, "/continue", Some(&json!({ "requirements": requirements }))).await?;
    let mut view = app_store::get_app_job(&env::db(&ctx.env)?, &row.id, Scope::Any)
        .await?
        .ok_or_else(|| ApiError::NotFound("job not found".into()))?
        .view();
    // The room's word on the status (its D1 copy may trail it).
    view.status = answer.status;
    json(&view)
}
