//! `/api/v1/tasks`: agent tasks (agent_task jobs) — submit, list (`limit` 1–100, `agent_type`,
//! `status`), get, cancel.

use kiln_schemas::dashboard::SubmitTask;
use worker::Request;

use super::super::Ctx;
use super::agents::{owned_agent, submit_task};
use super::{cancel_job, job_id, query};
use crate::auth::Principal;
use crate::dashboard_store::{self as ds, parse_task_filter, TaskRow};
use crate::env;
use crate::http::{body_as, json, ApiError, ApiResult};

async fn owned_task(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult<TaskRow> {
    let id = job_id(id, "task")?;
    ds::task(&env::db(&ctx.env)?, who.owner(), &id).await?.ok_or_else(|| ApiError::NotFound("task not found".into()))
}

/// `POST /api/v1/tasks` `SubmitTask` → `TaskView` (pending).
pub async fn submit(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let body: SubmitTask = body_as(&mut req).await?;
    let a = owned_agent(ctx, who, &body.agent_type).await?;
    let row = submit_task(ctx, who, &a, &body.prompt, &body.parameters, body.use_round_table).await?;
    // The task as submitted (a free runner may already hold it).
    let task = TaskRow {
        id: row.id,
        owner: row.owner,
        status: row.status,
        prompt: row.prompt,
        agent_type: Some(a.kind),
        params: row.params,
        created_at: row.created_at,
        created_ms: row.created_ms,
        ..Default::default()
    };
    json(&task.view())
}

/// `GET /api/v1/tasks?limit=&agent_type=&status=`: a JSON array, newest first.
pub async fn list(req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let pairs = query(&req.url()?);
    let f = parse_task_filter(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map_err(ApiError::BadRequest)?;
    let rows = ds::tasks(&env::db(&ctx.env)?, who.owner(), &f).await?;
    json(&rows.iter().map(TaskRow::view).collect::<Vec<_>>())
}

/// `GET /api/v1/tasks/{task_id}`
pub async fn get(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    json(&owned_task(ctx, who, id).await?.view())
}

/// `POST /api/v1/tasks/{task_id}/cancel`: the task, cancelled (409 once it ended).
pub async fn cancel(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let t = owned_task(ctx, who, id).await?;
    cancel_job(ctx, &t.id, "task").await?;
    json(&owned_task(ctx, who, &t.id).await?.view())
}
