//! `/runner/v1/*`: registration (operator's token), the runner's socket to its queue, and event
//! batches. Runner tokens open these endpoints only; user and service tokens never do.

use kiln_schemas::runner::{BatchAck, EventBatch, RegisterRunnerRequest, RegisterRunnerResponse};
use worker::{Headers, Method, Request, RequestInit};

use super::Ctx;
use crate::auth::{bearer, tokens};
use crate::env::{self, new_id, now_ms, random};
use crate::http::{self, body_as, json, json_status, ApiError, ApiResult};
use crate::store::{self, RunnerRow};
use crate::time::rfc3339;

pub async fn route(mut req: Request, ctx: &Ctx, method: Method, rest: &[&str]) -> ApiResult {
    match (method, rest) {
        (Method::Post, ["register"]) => register(&mut req, ctx).await,
        (Method::Get, ["connect"]) => {
            let runner = authenticate(&req, ctx).await?;
            connect(&req, ctx, &runner).await
        }
        (Method::Post, ["jobs", job_id, "events"]) => {
            let runner = authenticate(&req, ctx).await?;
            events(&mut req, ctx, &runner, job_id).await
        }
        _ => Err(ApiError::NotFound("no such runner endpoint".into())),
    }
}

async fn register(req: &mut Request, ctx: &Ctx) -> ApiResult {
    let header = req.headers().get("authorization")?;
    let token = bearer(header.as_deref()).ok_or_else(|| ApiError::Unauthorized("registration token required".into()))?;
    let expected = &ctx.config.runner_registration_token;
    if expected.is_empty() || !tokens::constant_time_eq(token.as_bytes(), expected.as_bytes()) {
        return Err(ApiError::Unauthorized("invalid registration token".into()));
    }
    let body: RegisterRunnerRequest = body_as(req).await?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(ApiError::BadRequest("name must be 1 to 100 bytes".into()));
    }
    let token = tokens::generate("krn", random::<32>());
    let row = RunnerRow {
        id: new_id(),
        name: name.to_string(),
        token_hash: tokens::digest(&token),
        created_at: rfc3339(now_ms()),
    };
    store::insert_runner(&env::db(&ctx.env)?, &row).await?;
    Ok(json_status(&RegisterRunnerResponse { runner_id: row.id, token }, 201))
}

async fn authenticate(req: &Request, ctx: &Ctx) -> ApiResult<RunnerRow> {
    let header = req.headers().get("authorization")?;
    let token = bearer(header.as_deref()).ok_or_else(|| ApiError::Unauthorized("runner token required".into()))?;
    store::runner_by_token_hash(&env::db(&ctx.env)?, &tokens::digest(token))
        .await?
        .ok_or_else(|| ApiError::Unauthorized("invalid runner token".into()))
}

async fn connect(req: &Request, ctx: &Ctx, runner: &RunnerRow) -> ApiResult {
    let upgrade = req.headers().get("upgrade")?.unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(ApiError::BadRequest("this endpoint expects a WebSocket upgrade".into()));
    }
    let mut target = worker::Url::parse("https://queue/connect").expect("static url");
    target.query_pairs_mut().append_pair("runner_id", &runner.id).append_pair("name", &runner.name);
    let headers = Headers::new();
    headers.set("upgrade", "websocket")?;
    let mut init = RequestInit::new();
    init.with_headers(headers);
    let forwarded = Request::new_with_init(target.as_str(), &init)?;
    Ok(env::queue(&ctx.env, "default")?.fetch_with_request(forwarded).await?)
}

/// A batch of a job's events, accepted only from the runner that holds the job's current lease:
/// a stale lease answers `lease_valid: false`; another runner naming the current lease answers 409
/// (also `lease_valid: false`) and stores nothing.
async fn events(req: &mut Request, ctx: &Ctx, runner: &RunnerRow, job_id: &str) -> ApiResult {
    let batch: EventBatch = body_as(req).await?;
    if batch.events.len() > 1000 {
        return Err(ApiError::BadRequest("at most 1000 events per batch".into()));
    }
    if store::get_job_any(&env::db(&ctx.env)?, job_id).await?.is_none() {
        return Err(ApiError::NotFound("job not found".into()));
    }
    let room = env::job_room(&ctx.env, job_id)?;
    let mut path = worker::Url::parse("https://do/runner-batch").expect("static url");
    path.query_pairs_mut().append_pair("runner_id", &runner.id);
    let path = format!("{}?{}", path.path(), path.query().unwrap_or_default());
    match http::call::<BatchAck>(&room, Method::Post, &path, Some(&batch)).await {
        Ok(ack) => json(&ack),
        Err(ApiError::Conflict(error)) => Ok(json_status(
            &serde_json::json!({ "error": error, "stored": 0, "duplicates": 0, "lease_valid": false }),
            409,
        )),
        Err(e) => Err(e),
    }
}
