//! Seed 000's app-builder face (`/api/jobs/`, `/api/job-messages/`, `/api/apps/`,
//! `/api/tickets/`, `/api/jobs/<id>/files/`) in the shapes its React frontend reads: views of the
//! one core (the job's D1 row, its room's event log, the rows its room writes, its workspace on
//! the runner or its snapshot in R2). Every read is owner-scoped: another user's id answers 404
//! like a missing one; the service principal sees every user's.

pub mod artifacts;
pub mod files;
pub mod jobs;
pub mod messages;

use kiln_schemas::validate::is_uuid;
use worker::Url;

use super::Ctx;
use crate::app_store::{self, AppJobRow, Scope};
use crate::auth::Principal;
use crate::env;
use crate::http::{ApiError, ApiResult};

/// What `who` may see.
pub fn scope(who: &Principal) -> Scope<'_> {
    match who {
        Principal::Service => Scope::Any,
        Principal::User { id, .. } => Scope::Owner(id),
    }
}

/// An app build `who` may see, or 404.
pub async fn owned_job(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult<AppJobRow> {
    let not_found = || ApiError::NotFound("job not found".into());
    if !is_uuid(id) {
        return Err(not_found());
    }
    app_store::get_app_job(&env::db(&ctx.env)?, id, scope(who)).await?.ok_or_else(not_found)
}

/// A query parameter, if given.
pub fn param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.to_string())
}

/// The `job_id` query parameter lists filter by: required, and a job's id.
pub fn job_id_param(url: &Url) -> ApiResult<String> {
    match param(url, "job_id") {
        None => Err(ApiError::BadRequest("job_id is required: ?job_id=<job id>".into())),
        Some(id) if is_uuid(&id) => Ok(id.to_ascii_lowercase()),
        Some(_) => Err(ApiError::BadRequest("job_id must be a job's id".into())),
    }
}
