//! `/v1/landing-pages`: a session's page (`session_id`, `status`, `preview_url`, `business_data`,
//! `sections`) as its jobs' rooms write it. List (newest first, `?limit=`), get, by session,
//! patch (`business_data` and/or `sections`), delete (its row, its workspace bundle and its
//! preview in R2; refused while a job of it is pending or running).

use serde_json::json;
use worker::{Request, Response};

use super::super::Ctx;
use super::{owned_page, param, scope};
use crate::auth::Principal;
use crate::env::{self, now_ms};
use crate::http::{body_json, json, ApiError, ApiResult};
use crate::landing_store::{self, parse_limit, parse_page_patch, preview_prefix, PageRow};
use crate::time::rfc3339;

/// `GET /v1/landing-pages[?limit=]` → `{"landing_pages": [...]}`.
pub async fn list(req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let limit = parse_limit(param(&req.url()?, "limit").as_deref()).map_err(ApiError::BadRequest)?;
    let rows = landing_store::list_pages(&env::db(&ctx.env)?, scope(who), limit).await?;
    json(&json!({ "landing_pages": rows.iter().map(PageRow::view).collect::<Vec<_>>() }))
}

/// `GET /v1/landing-pages/<id>`.
pub async fn get(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    json(&owned_page(ctx, who, id).await?.view())
}

/// `GET /v1/landing-pages/by-session/<session_id>`.
pub async fn by_session(ctx: &Ctx, who: &Principal, session_id: &str) -> ApiResult {
    let row = landing_store::page_of_session(&env::db(&ctx.env)?, session_id, scope(who))
        .await?
        .ok_or_else(|| ApiError::NotFound("landing page not found".into()))?;
    json(&row.view())
}

/// `PATCH /v1/landing-pages/<id> {"business_data"?, "sections"?}` → the page.
pub async fn patch(mut req: Request, ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = owned_page(ctx, who, id).await?;
    let body = body_json(&mut req).await?;
    let p = parse_page_patch(&body).map_err(ApiError::BadRequest)?;
    let business_data = p.business_data.map(|b| serde_json::to_string(&b)).transpose()?;
    let sections = p.sections.map(|s| serde_json::to_string(&s)).transpose()?;
    let db = env::db(&ctx.env)?;
    landing_store::update_page(&db, &row.id, business_data.as_deref(), sections.as_deref(), &rfc3339(now_ms())).await?;
    json(&owned_page(ctx, who, &row.id).await?.view())
}

/// `DELETE /v1/landing-pages/<id>` → 204. R2 first, then the row: a failure leaves a page the
/// user can delete again. Its jobs stay (their `landing_page_id` then names no page).
pub async fn delete(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = owned_page(ctx, who, id).await?;
    let db = env::db(&ctx.env)?;
    if landing_store::page_busy(&db, &row.id).await? {
        return Err(ApiError::Conflict("a job of this landing page is pending or running: cancel it or wait for it to end".into()));
    }
    let bucket = env::artifacts(&ctx.env)?;
    bucket.delete(crate::preview::bundle_key(&row.id)).await?;
    let prefix = preview_prefix(&row.id);
    // A preview holds at most a few hundred files; each listing answers up to 1000.
    for _ in 0..100 {
        let listed = bucket.list().prefix(prefix.clone()).execute().await?;
        let keys: Vec<String> = listed.objects().iter().map(|o| o.key()).collect();
        if keys.is_empty() {
            break;
        }
        for key in keys {
            bucket.delete(key).await?;
        }
    }
    bucket.delete(crate::preview::manifest_key(&row.id)).await?;
    landing_store::delete_page(&db, &row.id).await?;
    Ok(Response::empty()?.with_status(204))
}
