//! `/api/apps/` and `/api/tickets/`: the App (PRD and spec) and the ticket backlog the job's room
//! wrote to D1, read back owner-scoped.

use kiln_schemas::validate::is_uuid;
use worker::{Request, Response};

use super::{job_id_param, owned_job, scope, Ctx};
use crate::app_store::{self, AppRow, TicketRow};
use crate::auth::Principal;
use crate::env;
use crate::http::{json, ApiError, ApiResult};

/// `GET /api/apps/`: a plain array, newest first.
pub async fn list_apps(ctx: &Ctx, who: &Principal) -> ApiResult {
    let rows = app_store::list_apps(&env::db(&ctx.env)?, scope(who)).await?;
    json(&rows.iter().map(AppRow::view).collect::<Vec<_>>())
}

/// `GET /api/apps/<id>/`.
pub async fn get_app(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let not_found = || ApiError::NotFound("app not found".into());
    if !is_uuid(id) {
        return Err(not_found());
    }
    let row = app_store::get_app(&env::db(&ctx.env)?, &id.to_ascii_lowercase(), scope(who)).await?.ok_or_else(not_found)?;
    json(&row.view())
}

/// `GET /api/apps/by-job/<job_id>/`: the job's App, 204 while it has none.
pub async fn app_of_job(ctx: &Ctx, who: &Principal, job_id: &str) -> ApiResult {
    let job = owned_job(ctx, who, job_id).await?;
    match app_store::app_of_job(&env::db(&ctx.env)?, &job.id).await? {
        Some(app) => json(&app.view()),
        None => Ok(Response::empty()?.with_status(204)),
    }
}

/// `GET /api/tickets/?job_id=`: a plain array in the backlog's order.
pub async fn list_tickets(req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let job = owned_job(ctx, who, &job_id_param(&req.url()?)?).await?;
    let rows = app_store::tickets_of_job(&env::db(&ctx.env)?, &job.id).await?;
    json(&rows.iter().map(TicketRow::view).collect::<Vec<_>>())
}

/// `GET /api/tickets/<id>/`.
pub async fn get_ticket(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    // Ticket ids are the runner's (UUIDs by the contract); any id is looked up, bound.
    let row = app_store::get_ticket(&env::db(&ctx.env)?, id, scope(who))
        .await?
        .ok_or_else(|| ApiError::NotFound("ticket not found".into()))?;
    json(&row.view())
}
