//! Seed 003's jobs API over the core: the job index in D1, the job's room, its queue.

use kiln_schemas::events::{EventBody, ServerEvent};
use kiln_schemas::jobs::{
    generated_branch, CancelResponse, CreateJobResponse, Health, IterationList, JobList, JobTarget, ListQuery, NewJob,
    QueueCounts, QueueView, RetryResponse,
};
use kiln_schemas::status::{JobStatus, JobType};
use kiln_schemas::webhooks::IssueRef;
use worker::{Method, Request};

use super::{grants, Ctx};
use crate::auth::Principal;
use crate::env::{self, new_id, now_ms};
use crate::http::{self, body_json, json, json_status, ApiError, ApiResult};
use crate::job_room::{InitRequest, RoomMeta, TransitionRequest, TransitionResult};
use crate::queue_object::{enqueue_request, room_meta, Position, Stats};
use crate::store::{self, JobPatch, JobRow};
use crate::time::rfc3339;

const DEFAULT_QUEUE: &str = "default";

async fn stats(ctx: &Ctx) -> ApiResult<Stats> {
    http::call(&env::queue(&ctx.env, DEFAULT_QUEUE)?, Method::Get, "/stats", None::<&()>).await
}

pub async fn health(ctx: &Ctx) -> ApiResult {
    let st = stats(ctx).await?;
    // Seed 002's `services` (edge, database, queue, runners): monitoring's D1 round trip and counts.
    let services = crate::monitoring::services(&ctx.env, Some(&st)).await;
    let mut health = serde_json::to_value(Health::from_runners(
        QueueCounts { running: st.running, queued: st.queued, max_concurrent: st.max_concurrent },
        st.runners_connected,
        st.free_slots,
        st.tools,
    ))
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    health["services"] = services;
    json(&health)
}

pub async fn queue(ctx: &Ctx, who: &Principal) -> ApiResult {
    let q = env::queue(&ctx.env, DEFAULT_QUEUE)?;
    let mut path = worker::Url::parse("https://do/snapshot").expect("static url");
    path.query_pairs_mut().append_pair("owner", who.owner());
    let path = format!("{}?{}", path.path(), path.query().unwrap_or_default());
    json(&http::call::<QueueView>(&q, Method::Get, &path, None::<&()>).await?)
}

pub async fn list(req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let url = req.url()?;
    let pairs: Vec<(String, String)> = url.query_pairs().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let q = ListQuery::parse(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map_err(ApiError::BadRequest)?;
    let (rows, total) = store::list_jobs(&env::db(&ctx.env)?, who.owner(), &q).await?;
    json(&JobList { jobs: rows.iter().map(JobRow::view).collect(), total })
}

/// `includeMessages` answers at most this many messages unless `messagesLimit` says otherwise.
pub const DEFAULT_MESSAGES_LIMIT: usize = 1000;
/// The most `messagesLimit` may ask for.
pub const MAX_MESSAGES_LIMIT: usize = crate::job_room::MAX_EVENTS_READ - 1;

/// One page of the job's log: at most `limit` events after `after` (of one kind, if given).
async fn room_events(ctx: &Ctx, job_id: &str, kind: Option<&str>, after: u64, limit: usize) -> ApiResult<Vec<ServerEvent>> {
    let room = env::job_room(&ctx.env, job_id)?;
    let mut path = format!("/events?after={after}&limit={limit}");
    if let Some(k) = kind {
        path.push_str(&format!("&kind={k}"));
    }
    http::call(&room, Method::Get, &path, None::<&()>).await
}

/// `messagesLimit` and `messagesAfter` of `GET /jobs/:id?includeMessages=true`.
fn messages_page(url: &worker::Url) -> ApiResult<(usize, u64)> {
    let param = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.to_string());
    let limit = match param("messagesLimit") {
        None => DEFAULT_MESSAGES_LIMIT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_MESSAGES_LIMIT).contains(n))
            .ok_or_else(|| ApiError::BadRequest(format!("messagesLimit must be a number from 1 to {MAX_MESSAGES_LIMIT}")))?,
    };
    let after = match param("messagesAfter") {
        None => 0,
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| ApiError::BadRequest("messagesAfter must be a seq: a whole number from 0".into()))?,
    };
    Ok((limit, after))
}

pub async fn get(req: Request, ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = match room_row(ctx, id, who.owner()).await? {
        Some(row) => row,
        None => store::owned_job(&env::db(&ctx.env)?, id, who.owner()).await?,
    };
    let mut view = row.view();
    let url = req.url()?;
    let include = url.query_pairs().any(|(k, v)| k == "includeMessages" && (v == "true" || v == "1"));
    if include {
        // A page of the log, never all of it: the first `messagesLimit` after `messagesAfter`,
        // and where the next page starts when there is more.
        let (limit, after) = messages_page(&url)?;
        let mut events = room_events(ctx, id, None, after, limit + 1).await?;
        if events.len() > limit {
            events.truncate(limit);
            view.messages_next_after = events.last().map(|e| e.seq);
        }
        view.messages = Some(events.iter().filter_map(|e| e.body.as_job_message()).collect());
    }
    json(&view)
}

/// The job's row as its room keeps it (a job `POST /jobs` made), with no D1 read; `None` when the
/// room keeps none (other faces' jobs, which D1 answers). Another owner's job is a 404.
async fn room_row(ctx: &Ctx, id: &str, owner: &str) -> ApiResult<Option<store::JobRow>> {
    if !kiln_schemas::validate::is_uuid(id) {
        return Err(ApiError::NotFound("job not found".into()));
    }
    let mut path = worker::Url::parse("https://room/row").expect("static url");
    path.query_pairs_mut().append_pair("owner", owner);
    let path = format!("{}?{}", path.path(), path.query().unwrap_or_default());
    http::call(&env::job_room(&ctx.env, id)?, Method::Get, &path, None::<&()>).await
}

/// Where a new job's code lives.
struct Target {
    github_org: String,
    github_repo: String,
    client_id: Option<String>,
    repository_id: Option<String>,
    base_branch: Option<String>,
    /// The repository's known default branch (protected like `main`).
    default_branch: Option<String>,
    client_name: Option<String>,
}

/// Resolves where a new job's code lives; a client or repository must be the caller's own.
async fn resolve_target(ctx: &Ctx, who: &Principal, job: &NewJob) -> ApiResult<Target> {
    let db = env::db(&ctx.env)?;
    match &job.target {
        JobTarget::Repo { github_org, github_repo } => {
            // A named repository of the caller's gives its default branch.
            let default_branch = match &job.repository_id {
                Some(rid) => store::get_repo(&db, rid, who.owner())
                    .await?
                    .filter(|r| r.owner_name.eq_ignore_ascii_case(github_org) && r.repo_name.eq_ignore_ascii_case(github_repo))
                    .map(|r| r.default_branch),
                None => None,
            };
            Ok(Target {
                github_org: github_org.clone(),
                github_repo: github_repo.clone(),
                client_id: None,
                repository_id: job.repository_id.clone(),
                base_branch: None,
                default_branch,
                client_name: None,
            })
        }
        JobTarget::Client { client_id } => {
            let client = store::get_client(&db, client_id, who.owner())
                .await?
                .ok_or_else(|| ApiError::NotFound("client not found".into()))?;
            let repos = store::repos_of_owner(&db, who.owner()).await?;
            let repo = match &job.repository_id {
                Some(rid) => repos.iter().find(|r| &r.id == rid && r.client_id == client.id),
                None => repos.iter().find(|r| r.client_id == client.id),
            }
            .ok_or_else(|| ApiError::BadRequest("the client has no such repository; add one with POST /clients/:id/repository".into()))?;
            Ok(Target {
                github_org: repo.owner_name.clone(),
                github_repo: repo.repo_name.clone(),
                client_id: Some(client.id.clone()),
                repository_id: Some(repo.id.clone()),
                base_branch: Some(repo.default_branch.clone()),
                default_branch: Some(repo.default_branch.clone()),
                client_name: Some(client.name.clone()),
            })
        }
    }
}

/// Stores a validated job, opens its room and queues it (`POST /jobs`, retries, and jobs that
/// webhooks start, which carry the GitHub issue they came from).
pub(crate) async fn submit(
    ctx: &Ctx,
    who: &Principal,
    job: NewJob,
    original_job_id: Option<String>,
    branch_override: Option<String>,
    source_issue: Option<&IssueRef>,
) -> ApiResult<(JobRow, u32)> {
    let Target { github_org, github_repo, client_id, repository_id, base_branch, default_branch, client_name } =
        resolve_target(ctx, who, &job).await?;
    // Checked before anything is stored: the repository must be granted to the caller, and the
    // branch must not be protected (neither may a retry's derived branch).
    grants::require(ctx, who, &[(&github_org, &github_repo)]).await?;
    let id = crate::room_pool::take().unwrap_or_else(new_id);
    let now = now_ms();
    let created_at = rfc3339(now);
    let branch_name = branch_override
        .or(job.branch_name.clone())
        .unwrap_or_else(|| generated_branch(job.job_type, &id));
    ctx.config.protected_branches.check(&branch_name, default_branch.as_deref()).map_err(ApiError::BadRequest)?;
    let mut params = match job.timeout_seconds {
        Some(t) => serde_json::json!({ "ralph": job.ralph, "timeoutSeconds": t }),
        None => serde_json::json!({ "ralph": job.ralph }),
    };
    if let Some(issue) = source_issue {
        params["sourceIssue"] = serde_json::to_value(issue)?;
    }
    let row = JobRow {
        id: id.clone(),
        owner: who.owner().to_string(),
        job_type: job.job_type.as_str().to_string(),
        status: JobStatus::Queued.as_str().to_string(),
        queue: DEFAULT_QUEUE.to_string(),
        prompt: job.prompt.clone(),
        title: job.title.clone(),
        branch_name: branch_name.clone(),
        client_id,
        feature_id: job.feature_id.clone(),
        repository_id,
        github_org: github_org.clone(),
        github_repo: github_repo.clone(),
        base_branch: base_branch.clone(),
        created_by_team_member_id: job.created_by_team_member_id.clone(),
        params: params.to_string(),
        priority: job.priority as i64,
        attempts: 0,
        pr_url: None,
        completion_reason: None,
        total_iterations: None,
        error_message: None,
        original_job_id: original_job_id.clone(),
        created_at: created_at.clone(),
        updated_at: created_at.clone(),
        started_at: None,
        completed_at: None,
        created_ms: now,
        status_seq: 0,
        client_name,
        usage: None,
        ..Default::default()
    };
    let db = env::db(&ctx.env)?;
    let room = env::job_room(&ctx.env, &id)?;
    let message = match &original_job_id {
        Some(orig) => format!("job queued (retry of {orig})"),
        None => "job queued".to_string(),
    };
    // The room and the row together, then the queue: a failure at any step leaves no job a user
    // can see that will never run. A room whose row was not stored is never queued and never
    // listed, and its id is handed to nobody; a row whose room was not opened is deleted again
    // (were that to fail too, the queue's reconciliation would enqueue it and its dispatch, which
    // finds no room, drop it); a row whose enqueue failed is failed by its room; the
    // reconciliation enqueues any row left `queued` without a queue. The room keeps the row
    // current from here on (only it changes this kind's row) and answers `GET /jobs/:id`.
    let init = InitRequest { meta: room_meta(&row), message, row: Some(row.clone()) };
    let (opened, stored) =
        futures::join!(http::call::<RoomMeta>(&room, Method::Post, "/init", Some(&init)), store::insert_job(&db, &row));
    match (opened, stored) {
        (Ok(_), Ok(())) => {}
        (Ok(_), Err(e)) => return Err(e),
        (Err(e), stored) => {
            if stored.is_ok() {
                if let Err(e2) = store::delete_job_row(&db, &id).await {
                    worker::console_error!("job {id}: its room did not open ({e:?}) and deleting its row failed ({e2:?})");
                }
            }
            return Err(e);
        }
    }
    let q = env::queue(&ctx.env, &row.queue)?;
    let pos = match http::call::<Position>(&q, Method::Post, "/enqueue", Some(&enqueue_request(&row))).await {
        Ok(pos) => pos,
        Err(e) => {
            let why = "the job could not be queued; submit it again";
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
    };
    Ok((row, pos.position))
}

pub async fn create(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let body = body_json(&mut req).await?;
    let job = NewJob::parse(&body).map_err(ApiError::BadRequest)?;
    let (row, position) = submit(ctx, who, job.clone(), None, None, None).await?;
    let ralph = job.ralph;
    Ok(json_status(
        &CreateJobResponse {
            id: row.id,
            status: JobStatus::Queued,
            position,
            branch_name: row.branch_name,
            created_at: row.created_at,
            job_type: Some(job.job_type),
            max_iterations: ralph.as_ref().map(|r| r.max_iterations),
            completion_promise: ralph.as_ref().map(|r| r.completion_promise.clone()),
            feedback_commands: ralph.as_ref().map(|r| r.feedback_commands.clone()),
        },
        201,
    ))
}

async fn transition(ctx: &Ctx, job_id: &str, to: JobStatus, message: &str) -> ApiResult<TransitionResult> {
    let room = env::job_room(&ctx.env, job_id)?;
    let req = TransitionRequest {
        to,
        message: message.to_string(),
        patch: JobPatch::default(),
        lease: None,
        runner_id: None,
        if_lease: None,
        from_queue: false,
    };
    http::call(&room, Method::Post, "/transition", Some(&req)).await
}

pub async fn cancel(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = store::owned_job(&env::db(&ctx.env)?, id, who.owner()).await?;
    let moved = transition(ctx, id, JobStatus::Cancelled, "job cancelled by user").await.map_err(|e| match e {
        ApiError::Conflict(_) => ApiError::BadRequest(format!("job is {}; only queued or running jobs can be cancelled", row.status)),
        other => other,
    })?;
    json(&CancelResponse { id: id.to_string(), status: JobStatus::Cancelled, was_running: moved.from == JobStatus::Running })
}

pub async fn retry(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = store::owned_job(&env::db(&ctx.env)?, id, who.owner()).await?;
    if !matches!(row.status(), JobStatus::Failed | JobStatus::Cancelled) {
        return Err(ApiError::BadRequest(format!("job is {}; only failed or cancelled jobs can be retried", row.status)));
    }
    let target = match (&row.client_id, &row.repository_id) {
        (Some(client_id), _) => JobTarget::Client { client_id: client_id.clone() },
        _ => JobTarget::Repo { github_org: row.github_org.clone(), github_repo: row.github_repo.clone() },
    };
    let job = NewJob {
        prompt: row.prompt.clone(),
        target,
        branch_name: Some(row.branch_name.clone()),
        job_type: row.job_type(),
        feature_id: row.feature_id.clone(),
        repository_id: row.repository_id.clone(),
        title: row.title.clone(),
        created_by_team_member_id: row.created_by_team_member_id.clone(),
        ralph: row.ralph(),
        priority: row.priority as i32,
        timeout_seconds: row.timeout_seconds(),
    };
    let branch = format!("{}-retry-{}", row.branch_name, now_ms());
    // A retry of a webhook's job still answers its issue.
    let issue = IssueRef::from_params(&row.params);
    let (new_row, position) = submit(ctx, who, job, Some(row.id.clone()), Some(branch), issue.as_ref()).await?;
    // The original's channel says where its work went (its status itself does not change).
    let room = env::job_room(&ctx.env, id)?;
    let note = EventBody::JobStatus {
        job_id: row.id.clone(),
        status: row.status.clone(),
        message: format!("retried as job {}", new_row.id),
        timestamp: rfc3339(now_ms()),
        pr_url: None,
        completion_reason: None,
        total_iterations: None,
        error_message: None,
    };
    let _: serde_json::Value = http::call(&room, Method::Post, "/append", Some(&serde_json::json!({ "events": [note] }))).await?;
    Ok(json_status(
        &RetryResponse {
            id: new_row.id,
            original_job_id: row.id,
            status: JobStatus::Queued,
            branch_name: new_row.branch_name,
            position,
            created_at: new_row.created_at,
        },
        201,
    ))
}

/// Relays to the runner that holds a running job.
async fn relay(ctx: &Ctx, row: &JobRow, kind: &str, message: Option<&str>) -> ApiResult<()> {
    let q = env::queue(&ctx.env, &row.queue)?;
    let body = serde_json::json!({ "job_id": row.id, "kind": kind, "message": message });
    let _: serde_json::Value = http::call(&q, Method::Post, "/relay", Some(&body)).await?;
    Ok(())
}

pub async fn message(mut req: Request, ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = store::owned_job(&env::db(&ctx.env)?, id, who.owner()).await?;
    let body = body_json(&mut req).await?;
    let text = match body.get("message") {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(serde_json::Value::String(_)) | None | Some(serde_json::Value::Null) => {
            return Err(ApiError::BadRequest("message is required".into()))
        }
        Some(_) => return Err(ApiError::BadRequest("message must be a string".into())),
    };
    if text.len() > kiln_schemas::events::MAX_CHAT_BYTES {
        return Err(ApiError::BadRequest("message is over 64 KiB".into()));
    }
    if row.job_type() != JobType::Task {
        return Err(ApiError::BadRequest("not a task job: only task jobs accept messages".into()));
    }
    if row.status() != JobStatus::Running {
        return Err(ApiError::BadRequest(format!("job is {}; messages go to running task jobs only", row.status)));
    }
    relay(ctx, &row, "deliver", Some(&text)).await?;
    let room = env::job_room(&ctx.env, id)?;
    let _: serde_json::Value = http::call(
        &room,
        Method::Post,
        "/user-message",
        Some(&serde_json::json!({ "sender": who.display_name(), "content": text })),
    )
    .await?;
    json(&serde_json::json!({ "id": id, "messageSent": true }))
}

pub async fn complete(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = store::owned_job(&env::db(&ctx.env)?, id, who.owner()).await?;
    if row.job_type() != JobType::Task {
        return Err(ApiError::BadRequest("not a task job".into()));
    }
    match row.status() {
        JobStatus::Running => {
            relay(ctx, &row, "complete", None).await?;
            json(&serde_json::json!({ "id": id, "status": "completing" }))
        }
        JobStatus::Queued => {
            // Nothing ran yet: there is no session to finish.
            Err(ApiError::BadRequest("job is queued; cancel it instead".into()))
        }
        other => Err(ApiError::BadRequest(format!("job is {}; only running task jobs can be completed", other.as_str()))),
    }
}

pub async fn stop(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = store::owned_job(&env::db(&ctx.env)?, id, who.owner()).await?;
    if row.job_type() != JobType::Ralph {
        return Err(ApiError::BadRequest("not a ralph job".into()));
    }
    if row.status() != JobStatus::Running {
        return Err(ApiError::BadRequest(format!("job is {}; only running ralph jobs can be stopped", row.status)));
    }
    relay(ctx, &row, "stop", None).await?;
    json(&serde_json::json!({
        "id": id,
        "message": "Stop requested - job will complete after current iteration and create PR with partial work"
    }))
}

pub async fn iterations(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = store::owned_job(&env::db(&ctx.env)?, id, who.owner()).await?;
    if row.job_type() != JobType::Ralph {
        return Err(ApiError::BadRequest("not a ralph job".into()));
    }
    // At most MAX_MAX_ITERATIONS iterations, each sent at most twice (a retried attempt).
    let events = room_events(ctx, id, Some("iteration"), 0, crate::job_room::MAX_EVENTS_READ).await?;
    let iterations: Vec<_> = events
        .into_iter()
        .filter_map(|e| match e.body {
            EventBody::Iteration { iteration, .. } => Some(iteration),
            _ => None,
        })
        .collect();
    let view = row.view();
    json(&IterationList {
        job_id: row.id.clone(),
        current_iteration: iterations.iter().map(|i| i.iteration_number).max().unwrap_or(0),
        max_iterations: view.max_iterations.unwrap_or(kiln_schemas::jobs::DEFAULT_MAX_ITERATIONS),
        completion_reason: view.completion_reason,
        iterations,
    })
}
