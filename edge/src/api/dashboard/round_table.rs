//! `/api/v1/round-table`: LLM competitions (round_table jobs). `POST /compete` answers at once
//! with the competition as it stands (`stage: "pending"`, its `id`); the runner's providers
//! answer, a judge scores, the top two are compared, and `GET /{id}` (or the round_table
//! channel) has the full result when `stage` is `completed`. `GET /stats`: per provider,
//! participations, wins, scores, latency, cost and the Elo rating over every pairwise result in
//! time order. `GET /providers`: what the connected runners' round tables use.

use std::collections::BTreeMap;

use kiln_schemas::dashboard::{check_task, CompeteRequest, CompetitionView, ProviderView};
use kiln_schemas::runner::DashboardParams;
use kiln_schemas::status::JobType;
use serde_json::{json, Map};
use worker::{Method, Request};

use super::super::Ctx;
use super::{create_job, enqueue, job_id, publish, query};
use crate::auth::Principal;
use crate::dashboard_store::{self as ds, check_providers, parse_page, CompetitionRow};
use crate::env::{self, now_ms};
use crate::http::{self, body_as, json, ApiError, ApiResult};
use crate::queue_object::Stats;
use crate::time::rfc3339;

async fn owned(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult<CompetitionRow> {
    let id = job_id(id, "competition")?;
    ds::competition(&env::db(&ctx.env)?, who.owner(), &id).await?.ok_or_else(|| ApiError::NotFound("competition not found".into()))
}

/// `POST /api/v1/round-table/compete` `CompeteRequest` → the competition (`stage: "pending"`).
pub async fn compete(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let body: CompeteRequest = body_as(&mut req).await?;
    check_task(&body.prompt, &Map::new()).map_err(ApiError::BadRequest)?;
    check_providers(&body.providers).map_err(ApiError::BadRequest)?;
    let db = env::db(&ctx.env)?;
    let task_id = match &body.task_id {
        Some(t) => {
            let id = job_id(t, "task")?;
            ds::task(&db, who.owner(), &id).await?.ok_or_else(|| ApiError::NotFound("task not found".into()))?;
            Some(id)
        }
        None => None,
    };
    let params = DashboardParams::RoundTable { providers: body.providers.clone() };
    let row = create_job(ctx, who, JobType::RoundTable, &body.prompt, "Round table".into(), &params, None).await?;
    let comp = CompetitionRow {
        id: row.id.clone(),
        owner: row.owner.clone(),
        task_id,
        prompt: body.prompt.clone(),
        stage: "pending".into(),
        result: None,
        created_at: row.created_at.clone(),
        completed_at: None,
        created_ms: row.created_ms,
    };
    ds::insert_competition(&db, &comp).await?;
    enqueue(ctx, &row).await?;
    let now = rfc3339(now_ms());
    publish(ctx, who.owner(), "round_table", &ds::competition_update(&row.id, "pending", json!({"progress": 0}), &now)).await;
    json(&comp.view())
}

/// `GET /api/v1/round-table?limit=&offset=`: a JSON array, newest first.
pub async fn list(req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let pairs = query(&req.url()?);
    let (limit, offset) = parse_page(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map_err(ApiError::BadRequest)?;
    let rows = ds::competitions(&env::db(&ctx.env)?, who.owner(), limit, offset).await?;
    json(&rows.iter().map(CompetitionRow::view).collect::<Vec<_>>())
}

/// `GET /api/v1/round-table/{id}`
pub async fn get(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    json(&owned(ctx, who, id).await?.view())
}

/// `GET /api/v1/round-table/stats`: a JSON array of `ProviderStats`, best rating first.
pub async fn stats(ctx: &Ctx, who: &Principal) -> ApiResult {
    let db = env::db(&ctx.env)?;
    let comps: Vec<CompetitionView> = ds::completed_competitions(&db, who.owner()).await?.iter().map(CompetitionRow::view).collect();
    let pairs = ds::pairs(&db, who.owner()).await?;
    json(&ds::provider_stats(&comps, &pairs))
}

/// `GET /api/v1/round-table/providers`: the connected runners' round-table providers, one per
/// name (enabled if any runner has it enabled).
pub async fn providers(ctx: &Ctx) -> ApiResult {
    let st: Stats = http::call(&env::queue(&ctx.env, "default")?, Method::Get, "/stats", None::<&()>).await?;
    let mut by: BTreeMap<String, ProviderView> = BTreeMap::new();
    for p in st.tools.into_iter().flat_map(|t| t.tools.round_table) {
        by.entry(p.name.clone()).and_modify(|e| e.enabled |= p.enabled).or_insert(p);
    }
    json(&by.into_values().collect::<Vec<_>>())
}
