//! `/api/jobs/<id>/files/structure/` and `files/content/`: the job's workspace, sandboxed to
//! `/app`. While the job runs, the runner that holds it answers (through the job's queue, which
//! knows the runner's socket); otherwise the workspace snapshot its last run left in R2 does; with
//! neither, an empty tree and why. The frontend polls every 5 s, so a job with no workspace costs
//! one D1 read (and one R2 read once it was queued).

use kiln_schemas::app::{parse_files_limit, workspace_path, FileContent, FileStructure, WorkspaceSnapshot};
use kiln_schemas::runner::RunnerRequest;
use kiln_schemas::status::JobStatus;
use serde_json::{json, Value};
use worker::{Method, Request};

use super::{owned_job, param, Ctx};
use crate::app_store::{self, no_workspace, runner_error_status, runner_lacks_workspace, AppJobRow, SnapshotMiss};
use crate::auth::Principal;
use crate::env;
use crate::http::{self, drf_error, ApiError, ApiResult};

/// What the runner holding a job answered: its reply, or `None` when no runner holds the job
/// (or it did not answer): the snapshot answers then.
async fn ask_runner(ctx: &Ctx, row: &AppJobRow, request: RunnerRequest) -> ApiResult<Option<Value>> {
    let queue = env::queue(&ctx.env, &row.queue)?;
    let body = json!({ "job_id": row.id, "request": request });
    match http::call::<Value>(&queue, Method::Post, "/request-job", Some(&body)).await {
        Ok(reply) if reply.get("error").and_then(Value::as_str).is_some_and(runner_lacks_workspace) => Ok(None),
        Ok(reply) => Ok(Some(reply)),
        Err(ApiError::NotFound(_) | ApiError::Unavailable(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A runner's `{"error"}` as the face's answer: 404, 413, 415 in the face's words, anything
/// else 400 with the runner's reason (bounded).
fn runner_refusal(error: &str, path: &str) -> ApiResult {
    let status = runner_error_status(error);
    let message = match status {
        404 => format!("{path} is not in the job's workspace"),
        413 => format!("{path} is over {} bytes; only smaller files are shown", kiln_schemas::app::MAX_FILE_BYTES),
        415 => format!("{path} is a binary file; only text files are shown"),
        _ => format!("{path}: {}", error.chars().take(300).collect::<String>()),
    };
    Ok(drf_error(status, &message))
}

async fn snapshot(ctx: &Ctx, job_id: &str) -> ApiResult<Option<WorkspaceSnapshot>> {
    let Some(object) = env::artifacts(&ctx.env)?.get(app_store::snapshot_key(job_id)).execute().await? else {
        return Ok(None);
    };
    let Some(body) = object.body() else { return Ok(None) };
    let text = body.text().await?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ApiError::Internal(format!("job {job_id}: unreadable workspace snapshot: {e}")))
}

/// Why a job shows no workspace.
fn why_none(row: &AppJobRow) -> &'static str {
    match row.status() {
        JobStatus::Collecting => "requirements are still being collected",
        JobStatus::Queued => "the job is waiting for a runner",
        JobStatus::Running => "the job's runner did not answer and no snapshot was kept yet",
        _ => "the job ended without a workspace snapshot",
    }
}

fn miss(m: SnapshotMiss, path: &str) -> ApiResult {
    match m {
        SnapshotMiss::Missing => Err(ApiError::NotFound(format!("{path} is not in the job's workspace"))),
        SnapshotMiss::WrongKind(what) => Err(ApiError::BadRequest(format!("{path} {what}"))),
        SnapshotMiss::Omitted => Ok(drf_error(
            415,
            &format!("{path} was left out of the workspace snapshot: it is binary, over 512 KiB, or past the snapshot's size limit"),
        )),
    }
}

/// `GET /api/jobs/<id>/files/structure/?path=/app&limit=200`.
pub async fn structure(req: Request, ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let url = req.url()?;
    let path = param(&url, "path").unwrap_or_else(|| kiln_schemas::app::WORKSPACE_ROOT.to_string());
    let rel = workspace_path(&path).map_err(ApiError::BadRequest)?;
    let limit = parse_files_limit(param(&url, "limit").as_deref()).map_err(ApiError::BadRequest)?;
    let row = owned_job(ctx, who, id).await?;
    if row.status() == JobStatus::Collecting {
        return http::json(&no_workspace(why_none(&row)));
    }
    if row.status() == JobStatus::Running {
        let request = RunnerRequest::ListFiles { job_id: row.id.clone(), path: rel.clone(), limit };
        if let Some(mut reply) = ask_runner(ctx, &row, request).await? {
            if let Some(error) = reply.get("error").and_then(Value::as_str) {
                return runner_refusal(error, &path);
            }
            if let Some(obj) = reply.as_object_mut() {
                obj.entry("source").or_insert_with(|| json!("runner"));
            }
            let listing: FileStructure = serde_json::from_value(reply)
                .map_err(|e| ApiError::Internal(format!("job {}: the runner's listing does not parse: {e}", row.id)))?;
            return http::json(&listing);
        }
    }
    match snapshot(ctx, &row.id).await? {
        None => http::json(&no_workspace(why_none(&row))),
        Some(snap) => match app_store::snapshot_structure(&snap, &rel, limit) {
            Ok(listing) => http::json(&listing),
            Err(m) => miss(m, &path),
        },
    }
}

/// `GET /api/jobs/<id>/files/content/?path=/app/src/App.tsx`.
pub async fn content(req: Request, ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let url = req.url()?;
    let path = param(&url, "path").ok_or_else(|| ApiError::BadRequest("path is required: ?path=/app/<file>".into()))?;
    let rel = workspace_path(&path).map_err(ApiError::BadRequest)?;
    if rel.is_empty() {
        return Err(ApiError::BadRequest(format!("{path} is a directory, not a file")));
    }
    let row = owned_job(ctx, who, id).await?;
    if row.status() == JobStatus::Collecting {
        return Err(ApiError::NotFound(format!("{path}: no workspace yet: {}", why_none(&row))));
    }
    if row.status() == JobStatus::Running {
        let request = RunnerRequest::ReadFile { job_id: row.id.clone(), path: rel.clone() };
        if let Some(reply) = ask_runner(ctx, &row, request).await? {
            if let Some(error) = reply.get("error").and_then(Value::as_str) {
                return runner_refusal(error, &path);
            }
            let file: FileContent = serde_json::from_value(reply)
                .map_err(|e| ApiError::Internal(format!("job {}: the runner's file does not parse: {e}", row.id)))?;
            return http::json(&file);
        }
    }
    match snapshot(ctx, &row.id).await? {
        None => Err(ApiError::NotFound(format!("{path}: no workspace yet: {}", why_none(&row)))),
        Some(snap) => match app_store::snapshot_content(&snap, &rel) {
            Ok(file) => http::json(&file),
            Err(m) => miss(m, &path),
        },
    }
}
