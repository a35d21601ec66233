//! `/runner/v1/*`: registration (operator's token), the runner's socket to its queue, event
//! batches, an app build's workspace snapshot, a landing session's bundle and its page's preview
//! (R2), a 3D pipeline's model (R2). Runner tokens open these endpoints only;
//! user and service tokens never do.

use kiln_schemas::app::WorkspaceSnapshot;
use kiln_schemas::landing::{content_type, PreviewBundle, Published, MAX_BUNDLE_BYTES};
use kiln_schemas::runner::{
    BatchAck, EventBatch, RegisterRunnerRequest, RegisterRunnerResponse, MAX_ARTIFACT_BYTES, MAX_SNAPSHOT_BYTES,
};
use worker::{Headers, HttpMetadata, Method, Request, RequestInit, Response};

use super::Ctx;
use crate::auth::{bearer, tokens};
use crate::cache::{self, TtlCache};
use crate::env::{self, new_id, now_ms, random};
use crate::http::{self, body_as, json, json_status, ApiError, ApiResult};
use crate::preview;
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
        (Method::Put, ["jobs", job_id, "snapshot"]) => {
            let runner = authenticate(&req, ctx).await?;
            put_snapshot(&mut req, ctx, &runner, job_id).await
        }
        (Method::Get, ["jobs", job_id, "snapshot"]) => {
            let runner = authenticate(&req, ctx).await?;
            get_snapshot(&req, ctx, &runner, job_id).await
        }
        (Method::Put, ["jobs", job_id, "bundle"]) => {
            let runner = authenticate(&req, ctx).await?;
            put_bundle(&mut req, ctx, &runner, job_id).await
        }
        (Method::Get, ["jobs", job_id, "bundle"]) => {
            let runner = authenticate(&req, ctx).await?;
            get_bundle(&req, ctx, &runner, job_id).await
        }
        (Method::Put, ["jobs", job_id, "preview"]) => {
            let runner = authenticate(&req, ctx).await?;
            put_preview(&mut req, ctx, &runner, job_id).await
        }
        (Method::Put, ["jobs", job_id, "artifact"]) => {
            let runner = authenticate(&req, ctx).await?;
            put_artifact(&mut req, ctx, &runner, job_id).await
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
    let hash = tokens::digest(token);
    cache::read_through(&KNOWN_RUNNERS, &hash, now_ms, async {
        store::runner_by_token_hash(&env::db(&ctx.env)?, &hash)
            .await?
            .ok_or_else(|| ApiError::Unauthorized("invalid runner token".into()))
    })
    .await
}

/// How long an isolate trusts a runner token D1 confirmed.
const RUNNER_TOKEN_TTL_MS: i64 = 60_000;

thread_local! {
    /// Runner tokens this isolate has checked recently, by token hash: a runner posts a batch of
    /// events per step, and a D1 read per batch was most of an LLM step's overhead on the edge.
    /// Only tokens D1 confirmed are kept (a wrong token is read every time). Runners are never
    /// revoked today; a revocation must wait out the TTL.
    static KNOWN_RUNNERS: std::cell::RefCell<TtlCache<RunnerRow>> =
        std::cell::RefCell::new(TtlCache::new(RUNNER_TOKEN_TTL_MS, 1024));
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
    // No D1 read here: the job's room answers 404 when it holds no job, and a batch is stored only
    // under the job's current lease, which only the room knows.
    if !kiln_schemas::validate::is_uuid(job_id) {
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

/// The R2 key of a job's workspace snapshot (bucket binding `ARTIFACTS`).
pub fn snapshot_key(job_id: &str) -> String {
    format!("snapshots/{job_id}.json")
}

/// Checks that `runner` holds the job's lease named by `?lease_id=`, as its room sees it (as for
/// event batches: only the lease's runner; after the run ended, its last one). Errors: 400 without
/// a lease id, 404 for no such job, 409 otherwise. Answers the job's row.
async fn check_lease(req: &Request, ctx: &Ctx, runner: &RunnerRow, job_id: &str) -> ApiResult<store::JobRow> {
    let url = req.url()?;
    let lease_id = url
        .query_pairs()
        .find(|(k, _)| k == "lease_id")
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::BadRequest("lease_id is required".into()))?;
    let Some(row) = store::get_job_any(&env::db(&ctx.env)?, job_id).await? else {
        return Err(ApiError::NotFound("job not found".into()));
    };
    let room = env::job_room(&ctx.env, job_id)?;
    let _: serde_json::Value = http::call(
        &room,
        Method::Post,
        "/check-lease",
        Some(&serde_json::json!({ "lease_id": lease_id, "runner_id": runner.id })),
    )
    .await?;
    Ok(row)
}

/// Reads a body of at most `limit` bytes: refused on its `Content-Length` before the lease check
/// and again once read (413).
async fn body_bytes(req: &mut Request, limit: usize, what: &str) -> ApiResult<Vec<u8>> {
    let body = req.bytes().await.map_err(|_| ApiError::BadRequest("could not read request body".into()))?;
    if body.len() > limit {
        return Err(ApiError::TooLarge(format!("{what} over {limit} bytes")));
    }
    Ok(body)
}

fn declared_over(req: &Request, limit: usize, what: &str) -> ApiResult<()> {
    let declared = req.headers().get("content-length")?.and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(format!("{what} over {limit} bytes")));
    }
    Ok(())
}

/// The landing page of a landing job's row (400 for any other job).
fn landing_page_of(row: &store::JobRow) -> ApiResult<String> {
    row.landing_page_id
        .clone()
        .filter(|p| row.job_type().is_landing() && !p.is_empty())
        .ok_or_else(|| ApiError::BadRequest("this job is not a landing job".into()))
}

/// `PUT /runner/v1/jobs/<id>/bundle?lease_id=`: the session's workspace (a git bundle, raw
/// bytes, at most `MAX_BUNDLE_BYTES`), kept in R2 per landing page between jobs.
async fn put_bundle(req: &mut Request, ctx: &Ctx, runner: &RunnerRow, job_id: &str) -> ApiResult {
    declared_over(req, MAX_BUNDLE_BYTES, "bundle")?;
    let row = check_lease(req, ctx, runner, job_id).await?;
    let page = landing_page_of(&row)?;
    let body = body_bytes(req, MAX_BUNDLE_BYTES, "bundle").await?;
    if body.is_empty() {
        return Err(ApiError::BadRequest("the bundle is empty".into()));
    }
    let bytes = body.len();
    env::artifacts(&ctx.env)?.put(preview::bundle_key(&page), body).execute().await?;
    json(&serde_json::json!({ "stored": true, "bytes": bytes }))
}

/// An artifact's file name: 1–100 of `[A-Za-z0-9._-]`, not starting with a dot.
fn artifact_name(req: &Request) -> ApiResult<String> {
    let url = req.url()?;
    let name = url.query_pairs().find(|(k, _)| k == "name").map(|(_, v)| v.to_string()).unwrap_or_default();
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        return Err(ApiError::BadRequest(
            "name is required: 1 to 100 letters, digits, '.', '_' or '-', not starting with '.'".into(),
        ));
    }
    Ok(name)
}

/// `PUT /runner/v1/jobs/<id>/artifact?lease_id=&name=`: a file a 3D pipeline produced (raw
/// bytes, at most `MAX_ARTIFACT_BYTES`), kept in R2 at `artifacts/<id>/<name>`; answers the path
/// where its owner gets it (`GET /api/v1/3d/<id>/asset`).
async fn put_artifact(req: &mut Request, ctx: &Ctx, runner: &RunnerRow, job_id: &str) -> ApiResult {
    declared_over(req, MAX_ARTIFACT_BYTES, "artifact")?;
    let name = artifact_name(req)?;
    let row = check_lease(req, ctx, runner, job_id).await?;
    if row.job_type() != kiln_schemas::status::JobType::Pipeline3d {
        return Err(ApiError::BadRequest("this job keeps no artifacts".into()));
    }
    let body = body_bytes(req, MAX_ARTIFACT_BYTES, "artifact").await?;
    if body.is_empty() {
        return Err(ApiError::BadRequest("the artifact is empty".into()));
    }
    let bytes = body.len();
    let content_type = if name.ends_with(".glb") { "model/gltf-binary" } else { "application/octet-stream" };
    let meta = HttpMetadata { content_type: Some(content_type.into()), ..Default::default() };
    env::artifacts(&ctx.env)?
        .put(format!("artifacts/{job_id}/{name}"), body)
        .http_metadata(meta)
        .execute()
        .await?;
    json(&serde_json::json!({ "url": format!("/api/v1/3d/{job_id}/asset"), "bytes": bytes }))
}

/// `GET /runner/v1/jobs/<id>/bundle?lease_id=`: the session's last bundle, or 404.
async fn get_bundle(req: &Request, ctx: &Ctx, runner: &RunnerRow, job_id: &str) -> ApiResult {
    let row = check_lease(req, ctx, runner, job_id).await?;
    let page = landing_page_of(&row)?;
    let none = || ApiError::NotFound("no bundle of this session yet".into());
    let object = env::artifacts(&ctx.env)?.get(preview::bundle_key(&page)).execute().await?.ok_or_else(none)?;
    let bytes = object.body().ok_or_else(none)?.bytes().await?;
    let headers = Headers::new();
    headers.set("content-type", "application/octet-stream")?;
    Ok(Response::from_bytes(bytes)?.with_headers(headers))
}

/// `PUT /runner/v1/jobs/<id>/preview?lease_id=`: a [`PreviewBundle`] that replaces the page's
/// preview: its files written (with their content types), the previous preview's files it lacks
/// deleted, its manifest kept; answered by [`Published`].
async fn put_preview(req: &mut Request, ctx: &Ctx, runner: &RunnerRow, job_id: &str) -> ApiResult {
    declared_over(req, preview::MAX_PREVIEW_BODY_BYTES, "preview")?;
    let row = check_lease(req, ctx, runner, job_id).await?;
    let page = landing_page_of(&row)?;
    let origin = req.url()?.origin().ascii_serialization();
    let body = body_bytes(req, preview::MAX_PREVIEW_BODY_BYTES, "preview").await?;
    let bundle: PreviewBundle = serde_json::from_slice(&body)
        .map_err(|_| ApiError::BadRequest("body must be a preview: {\"files\": [{\"path\", \"content\", \"base64\"}]}".into()))?;
    drop(body);
    let files = preview::decode_bundle(bundle).map_err(|(status, m)| match status {
        413 => ApiError::TooLarge(m),
        _ => ApiError::BadRequest(m),
    })?;
    let bucket = env::artifacts(&ctx.env)?;
    let old: Vec<String> = match bucket.get(preview::manifest_key(&page)).execute().await? {
        Some(o) => match o.body() {
            Some(b) => serde_json::from_slice(&b.bytes().await?).unwrap_or_default(),
            None => vec![],
        },
        None => vec![],
    };
    let paths: Vec<String> = files.iter().map(|(p, _)| p.clone()).collect();
    let mut bytes = 0u64;
    for (path, content) in files {
        bytes += content.len() as u64;
        let meta = HttpMetadata { content_type: Some(content_type(&path).to_string()), ..Default::default() };
        bucket.put(preview::object_key(&page, &path), content).http_metadata(meta).execute().await?;
    }
    // The manifest names the new files before the old ones go: a failure half-way leaves files
    // no manifest names only until the next publish of a preview that lacks them.
    let mut known = paths.clone();
    known.extend(old.iter().filter(|p| !paths.contains(p)).cloned());
    bucket.put(preview::manifest_key(&page), serde_json::to_vec(&known)?).execute().await?;
    for path in preview::stale(&old, &paths) {
        bucket.delete(preview::object_key(&page, path)).await?;
    }
    bucket.put(preview::manifest_key(&page), serde_json::to_vec(&paths)?).execute().await?;
    let base = ctx.env.var("PUBLIC_URL").map(|v| v.to_string()).ok().filter(|v| !v.trim().is_empty()).unwrap_or(origin);
    json(&Published { preview_url: preview::preview_url(&base, &page), files: paths.len() as u32, bytes })
}

/// `PUT /runner/v1/jobs/<id>/snapshot?lease_id=`: the workspace's text files, a
/// [`WorkspaceSnapshot`] of at most [`MAX_SNAPSHOT_BYTES`], kept in R2 for the files API and the
/// job's continuation runs.
async fn put_snapshot(req: &mut Request, ctx: &Ctx, runner: &RunnerRow, job_id: &str) -> ApiResult {
    let too_large = || ApiError::TooLarge(format!("snapshot over {MAX_SNAPSHOT_BYTES} bytes"));
    let declared = req.headers().get("content-length")?.and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_SNAPSHOT_BYTES as u64) {
        return Err(too_large());
    }
    check_lease(req, ctx, runner, job_id).await?;
    let body = req.bytes().await.map_err(|_| ApiError::BadRequest("could not read request body".into()))?;
    if body.len() > MAX_SNAPSHOT_BYTES {
        return Err(too_large());
    }
    let snapshot: WorkspaceSnapshot = serde_json::from_slice(&body)
        .map_err(|_| ApiError::BadRequest("body must be a workspace snapshot: {\"files\": [{\"path\", \"content\", \"size\"}], \"omitted\": [...]}".into()))?;
    let (files, bytes) = (snapshot.files.len(), body.len());
    let bucket = ctx.env.bucket("ARTIFACTS")?;
    bucket.put(snapshot_key(job_id), body).execute().await?;
    Ok(json_status(&serde_json::json!({ "stored": true, "files": files, "bytes": bytes }), 200))
}

/// `GET /runner/v1/jobs/<id>/snapshot?lease_id=`: the job's last snapshot, or 404.
async fn get_snapshot(req: &Request, ctx: &Ctx, runner: &RunnerRow, job_id: &str) -> ApiResult {
    check_lease(req, ctx, runner, job_id).await?;
    let bucket = ctx.env.bucket("ARTIFACTS")?;
    let Some(object) = bucket.get(snapshot_key(job_id)).execute().await? else {
        return Err(ApiError::NotFound("no snapshot of this job".into()));
    };
    let Some(body) = object.body() else {
        return Err(ApiError::NotFound("no snapshot of this job".into()));
    };
    let bytes = body.bytes().await?;
    let headers = Headers::new();
    headers.set("content-type", "application/json")?;
    Ok(Response::from_bytes(bytes)?.with_headers(headers))
}
