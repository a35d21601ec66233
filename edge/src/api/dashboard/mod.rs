//! Seed 002's agent dashboard REST face (`/api/v1/*`): `agents` (the owner's agents, execute,
//! start/stop, learn), `tasks` (agent_task jobs), `round_table` (round_table jobs, provider stats
//! and Elo, the runners' providers) and `three_d` (pipeline_3d jobs and their assets). Views of
//! the one core: every task, learning cycle, competition and 3D pipeline is a job (its id is the
//! job's), run by a runner as the queue dispatches it; the rows listed and aggregated here are
//! written by the jobs' rooms (`dashboard_store::room`). Everything is owner-scoped (another
//! user's id answers 404 like a missing one); errors carry FastAPI's `detail` beside `error`.

pub mod agents;
pub mod round_table;
pub mod tasks;
pub mod three_d;

use kiln_schemas::runner::DashboardParams;
use kiln_schemas::status::{JobStatus, JobType};
use kiln_schemas::validate::is_uuid;
use worker::{Method, Url};

use super::Ctx;
use crate::auth::Principal;
use crate::dashboard_store;
use crate::env::{self, new_id, now_ms};
use crate::http::{self, ApiError, ApiResult};
use crate::job_room::{InitWithNote, RoomMeta, TransitionRequest, TransitionResult};
use crate::queue_object::{enqueue_request, room_meta, Position};
use crate::store::{self, JobPatch, JobRow};
use crate::time::rfc3339;

const DEFAULT_QUEUE: &str = "default";

/// The query's pairs, owned.
pub fn query(url: &Url) -> Vec<(String, String)> {
    url.query_pairs().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A job id from a path: a UUID (lower-cased), else 404 with `what`.
pub fn job_id(id: &str, what: &str) -> ApiResult<String> {
    if !is_uuid(id) {
        return Err(ApiError::NotFound(format!("{what} not found")));
    }
    Ok(id.to_ascii_lowercase())
}

/// Opens a new dashboard job's room (queued) and writes its row with its agent; the caller writes
/// its kind's row, then [`enqueue`]s it.
pub async fn create_job(
    ctx: &Ctx,
    who: &Principal,
    kind: JobType,
    prompt: &str,
    title: String,
    params: &DashboardParams,
    agent_type: Option<&str>,
) -> ApiResult<JobRow> {
    let db = env::db(&ctx.env)?;
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
        title: Some(title),
        params: dashboard_store::job_params(params),
        created_at: created_at.clone(),
        updated_at: created_at,
        created_ms: now,
        ..Default::default()
    };
    let room = env::job_room(&ctx.env, &id)?;
    let init = InitWithNote { meta: room_meta(&row), message: "job queued".into(), node: None, row: None };
    http::call::<RoomMeta>(&room, Method::Post, "/init", Some(&init)).await?;
    store::insert_job(&db, &row).await?;
    if let Some(t) = agent_type {
        dashboard_store::set_agent_type(&db, &id, t).await?;
    }
    Ok(row)
}

/// Enqueues a created job, as `POST /jobs` does: a failed enqueue fails the job in its room and
/// answers the error.
pub async fn enqueue(ctx: &Ctx, row: &JobRow) -> ApiResult<()> {
    let q = env::queue(&ctx.env, &row.queue)?;
    if let Err(e) = http::call::<Position>(&q, Method::Post, "/enqueue", Some(&enqueue_request(row))).await {
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
        let room = env::job_room(&ctx.env, &row.id)?;
        if let Err(e2) = http::call::<TransitionResult>(&room, Method::Post, "/transition", Some(&failed)).await {
            worker::console_error!("job {}: enqueue failed ({e:?}) and so did failing it ({e2:?}); reconciliation queues it", row.id);
        }
        return Err(e);
    }
    Ok(())
}

/// Cancels a pending or running job through its room (409 once it ended).
pub async fn cancel_job(ctx: &Ctx, id: &str, what: &str) -> ApiResult<()> {
    let room = env::job_room(&ctx.env, id)?;
    let req = TransitionRequest {
        to: JobStatus::Cancelled,
        message: format!("{what} cancelled by user"),
        patch: JobPatch::default(),
        lease: None,
        runner_id: None,
        if_lease: None,
        from_queue: false,
    };
    http::call::<TransitionResult>(&room, Method::Post, "/transition", Some(&req)).await.map_err(|e| match e {
        ApiError::Conflict(_) => ApiError::Conflict(format!("the {what} already ended; only pending or running ones can be cancelled")),
        other => other,
    })?;
    Ok(())
}

/// Publishes a channel message, logging a failure (a REST answer never waits on it failing).
pub async fn publish(ctx: &Ctx, owner: &str, channel: &str, msg: &serde_json::Value) {
    if let Err(e) = crate::channels::publish(&ctx.env, owner, channel, msg).await {
        worker::console_error!("publishing on {channel}: {e:?}");
    }
}
