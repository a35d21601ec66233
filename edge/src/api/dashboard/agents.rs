//! `/api/v1/agents`: the owner's agents (seeded with defaults on first use) with their live
//! status and stats from their real tasks; `execute` (an agent_task job), `start`/`stop` (a
//! stopped agent refuses work with 409) and `learn` (an agent_learn job over the agent's recent
//! failed and slow tasks; its new instructions are stored when it completes).

use kiln_schemas::dashboard::{check_task, ExecuteAnswer, ExecuteRequest};
use kiln_schemas::runner::DashboardParams;
use kiln_schemas::status::{JobStatus, JobType};
use serde_json::{json, Map, Value};
use worker::Request;

use super::super::Ctx;
use super::{create_job, enqueue, publish};
use crate::auth::Principal;
use crate::dashboard_store::{self as ds, AgentRow};
use crate::env::{self, now_ms};
use crate::http::{body_as, json, ApiError, ApiResult};
use crate::time::rfc3339;

/// The agent `kind` of `who`, or 404.
pub async fn owned_agent(ctx: &Ctx, who: &Principal, kind: &str) -> ApiResult<AgentRow> {
    let not_found = || ApiError::NotFound(format!("agent {kind} not found"));
    if !ds::valid_agent_type(kind) {
        return Err(not_found());
    }
    ds::agent(&env::db(&ctx.env)?, who.owner(), kind, &rfc3339(now_ms())).await?.ok_or_else(not_found)
}

/// 409 when the agent is stopped.
pub fn check_running(a: &AgentRow) -> ApiResult<()> {
    if a.stopped != 0 {
        return Err(ApiError::Conflict(format!("agent {} is stopped: POST /api/v1/agents/{}/start first", a.kind, a.kind)));
    }
    Ok(())
}

async fn view(ctx: &Ctx, who: &Principal, a: &AgentRow) -> ApiResult<Value> {
    let act = ds::activity(&env::db(&ctx.env)?, who.owner(), Some(&a.kind)).await?;
    Ok(serde_json::to_value(a.view(act.first()))?)
}

/// `GET /api/v1/agents`: a JSON array.
pub async fn list(ctx: &Ctx, who: &Principal) -> ApiResult {
    let db = env::db(&ctx.env)?;
    let rows = ds::agents(&db, who.owner(), &rfc3339(now_ms())).await?;
    let act = ds::activity(&db, who.owner(), None).await?;
    let views: Vec<_> = rows.iter().map(|a| a.view(act.iter().find(|x| x.agent_type == a.kind))).collect();
    json(&views)
}

/// `GET /api/v1/agents/{agent_type}`
pub async fn get(ctx: &Ctx, who: &Principal, kind: &str) -> ApiResult {
    let a = owned_agent(ctx, who, kind).await?;
    json(&view(ctx, who, &a).await?)
}

/// Creates an agent_task job for the agent (its definition as it is now) and says so on the
/// tasks channel. Answers the job's row.
pub async fn submit_task(
    ctx: &Ctx,
    who: &Principal,
    a: &AgentRow,
    prompt: &str,
    parameters: &Map<String, Value>,
    use_round_table: bool,
) -> ApiResult<crate::store::JobRow> {
    check_task(prompt, parameters).map_err(ApiError::BadRequest)?;
    check_running(a)?;
    let params = a.task_params(parameters, use_round_table);
    let title = format!("{} task", a.name);
    let row = create_job(ctx, who, JobType::AgentTask, prompt, title, &params, Some(&a.kind)).await?;
    enqueue(ctx, &row).await?;
    let now = rfc3339(now_ms());
    publish(ctx, who.owner(), "tasks", &ds::task_update(&row.id, &a.kind, JobStatus::Queued, 0.0, json!({}), &now)).await;
    Ok(row)
}

/// `POST /api/v1/agents/{agent_type}/execute` `ExecuteRequest` → `ExecuteAnswer` (status
/// `started`; the task's result comes with `GET /api/v1/tasks/{task_id}` and the tasks channel).
pub async fn execute(mut req: Request, ctx: &Ctx, who: &Principal, kind: &str) -> ApiResult {
    // Workers' clock advances with I/O, which is what accepting a task waits on.
    let t0 = now_ms();
    let a = owned_agent(ctx, who, kind).await?;
    let body: ExecuteRequest = body_as(&mut req).await?;
    let row = submit_task(ctx, who, &a, &body.task, &body.parameters, body.use_round_table).await?;
    json(&ExecuteAnswer {
        task_id: row.id,
        agent_type: a.kind.clone(),
        status: "started".into(),
        result: None,
        latency_ms: (now_ms() - t0).max(0) as f64,
        technique_used: a.technique.clone(),
    })
}

/// `POST /api/v1/agents/{agent_type}/start` · `stop`: answers the agent.
pub async fn set_stopped(ctx: &Ctx, who: &Principal, kind: &str, stopped: bool) -> ApiResult {
    let a = owned_agent(ctx, who, kind).await?;
    let now = rfc3339(now_ms());
    ds::set_stopped(&env::db(&ctx.env)?, who.owner(), &a.kind, stopped, &now).await?;
    let a = owned_agent(ctx, who, kind).await?;
    let v = view(ctx, who, &a).await?;
    if stopped {
        publish(ctx, who.owner(), "agents", &ds::agent_status_update(&a.kind, "stopped", json!({}), &now)).await;
    } else {
        let status = v["status"].as_str().unwrap_or("idle").to_string();
        publish(ctx, who.owner(), "agents", &ds::agent_status_update(&a.kind, &status, json!({}), &now)).await;
    }
    json(&v)
}

/// `POST /api/v1/agents/{agent_type}/learn`: an agent_learn job over the agent's recent failed
/// and slow tasks → `{task_id, agent_type, status: "learning", reviewed}`. 409 when stopped or
/// already learning.
pub async fn learn(ctx: &Ctx, who: &Principal, kind: &str) -> ApiResult {
    let a = owned_agent(ctx, who, kind).await?;
    check_running(&a)?;
    let db = env::db(&ctx.env)?;
    if ds::learning(&db, who.owner(), &a.kind).await? {
        return Err(ApiError::Conflict(format!("agent {} is already learning", a.kind)));
    }
    let recent = ds::learn_recent(&ds::ended_tasks(&db, who.owner(), &a.kind).await?);
    let reviewed = recent.len();
    let params = DashboardParams::AgentLearn { agent_type: a.kind.clone(), instructions: a.instructions.clone(), recent };
    let prompt = format!("Learning cycle of the {} agent over {reviewed} recent failed or slow tasks", a.kind);
    let row = create_job(ctx, who, JobType::AgentLearn, &prompt, format!("{} learning cycle", a.name), &params, Some(&a.kind)).await?;
    enqueue(ctx, &row).await?;
    let now = rfc3339(now_ms());
    publish(ctx, who.owner(), "agents", &ds::agent_status_update(&a.kind, "learning", json!({"task_id": row.id}), &now)).await;
    json(&json!({"task_id": row.id, "agent_type": a.kind, "status": "learning", "reviewed": reviewed}))
}
