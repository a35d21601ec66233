//! `/api/v1/3d`: text-to-3D pipelines (pipeline_3d jobs): create, get, list, cancel, and the
//! model itself (`GET /{id}/asset`, from R2 `artifacts/<id>/`, owner-scoped).

use kiln_schemas::dashboard::{check_task, Create3d};
use kiln_schemas::runner::DashboardParams;
use kiln_schemas::status::JobType;
use serde_json::{json, Map};
use worker::{Headers, Request, Response};

use super::super::Ctx;
use super::{cancel_job, create_job, enqueue, job_id, publish, query};
use crate::auth::Principal;
use crate::dashboard_store::{self as ds, parse_page, PipelineRow, MAX_FACES_LIMIT, MAX_TEXTURE_LIMIT};
use crate::env::{self, now_ms};
use crate::http::{body_as, json, ApiError, ApiResult};
use crate::time::rfc3339;

async fn owned(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult<PipelineRow> {
    let id = job_id(id, "3D pipeline")?;
    ds::pipeline(&env::db(&ctx.env)?, who.owner(), &id).await?.ok_or_else(|| ApiError::NotFound("3D pipeline not found".into()))
}

/// Checks a request's format and limits.
fn check(c: &Create3d) -> Result<(), String> {
    check_task(&c.prompt, &Map::new())?;
    if c.format != "glb" {
        return Err(format!("format {:?} is not supported: only glb", c.format));
    }
    if !(1..=MAX_FACES_LIMIT).contains(&c.max_faces) {
        return Err(format!("max_faces must be from 1 to {MAX_FACES_LIMIT}"));
    }
    if !(1..=MAX_TEXTURE_LIMIT).contains(&c.max_texture_size) || !c.max_texture_size.is_power_of_two() {
        return Err(format!("max_texture_size must be a power of two from 1 to {MAX_TEXTURE_LIMIT}"));
    }
    Ok(())
}

/// `POST /api/v1/3d` `Create3d` → the pipeline (`stage: "pending"`).
pub async fn create(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let body: Create3d = body_as(&mut req).await?;
    check(&body).map_err(ApiError::BadRequest)?;
    let params = DashboardParams::Pipeline3d {
        format: body.format.clone(),
        max_faces: body.max_faces,
        max_texture_size: body.max_texture_size,
    };
    let title = format!("3D: {}", ds::preview(&body.prompt));
    let row = create_job(ctx, who, JobType::Pipeline3d, &body.prompt, title, &params, None).await?;
    let p = PipelineRow {
        id: row.id.clone(),
        owner: row.owner.clone(),
        prompt: body.prompt.clone(),
        format: body.format.clone(),
        max_faces: body.max_faces as i64,
        max_texture_size: body.max_texture_size as i64,
        stage: "pending".into(),
        created_at: row.created_at.clone(),
        updated_at: row.created_at.clone(),
        created_ms: row.created_ms,
        ..Default::default()
    };
    ds::insert_pipeline(&env::db(&ctx.env)?, &p).await?;
    enqueue(ctx, &row).await?;
    let now = rfc3339(now_ms());
    let data = json!({"prompt": ds::preview(&p.prompt), "format": p.format});
    publish(ctx, who.owner(), "3d_pipeline", &ds::pipeline_update(&p.id, "pending", 0.0, data, &now)).await;
    json(&p.view())
}

/// `GET /api/v1/3d?limit=&offset=`: a JSON array, newest first.
pub async fn list(req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let pairs = query(&req.url()?);
    let (limit, offset) = parse_page(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map_err(ApiError::BadRequest)?;
    let rows = ds::pipelines(&env::db(&ctx.env)?, who.owner(), limit, offset).await?;
    json(&rows.iter().map(PipelineRow::view).collect::<Vec<_>>())
}

/// `GET /api/v1/3d/{id}`
pub async fn get(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    json(&owned(ctx, who, id).await?.view())
}

/// `POST /api/v1/3d/{id}/cancel` (409 once it ended).
pub async fn cancel(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let p = owned(ctx, who, id).await?;
    cancel_job(ctx, &p.id, "3D pipeline").await?;
    json(&owned(ctx, who, &p.id).await?.view())
}

/// `GET /api/v1/3d/{id}/asset`: the model (`model/gltf-binary` for a GLB); 404 until stored.
pub async fn asset(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let p = owned(ctx, who, id).await?;
    let none = || ApiError::NotFound("this pipeline has no asset (yet)".into());
    let key = p.asset_key.clone().ok_or_else(none)?;
    if !key.starts_with(&ds::artifact_prefix(&p.id)) {
        return Err(none());
    }
    let object = env::artifacts(&ctx.env)?.get(&key).execute().await?.ok_or_else(none)?;
    let bytes = match object.body() {
        Some(b) => b.bytes().await?,
        None => vec![],
    };
    let headers = Headers::new();
    let ct = if key.ends_with(".glb") { "model/gltf-binary" } else { "application/octet-stream" };
    headers.set("content-type", ct)?;
    headers.set("content-length", &bytes.len().to_string())?;
    headers.set("x-content-type-options", "nosniff")?;
    let name = key.rsplit('/').next().unwrap_or("model.glb").replace(['"', '\\', '\r', '\n'], "_");
    headers.set("content-disposition", &format!("attachment; filename=\"{name}\""))?;
    Ok(Response::from_bytes(bytes)?.with_headers(headers))
}
