//! `/webhook-subscriptions` (issue 12 §2): an owner's subscriptions to their jobs' events, the
//! delivery log and the redeliver action. Delivering is `crate::deliveries`.

use kiln_schemas::status::JobType;
use kiln_schemas::subscriptions::{
    check_secret, check_target, parse_events, parse_job_types, AttemptView, CreateSubscriptionRequest, DeliveryList,
    DeliveryStatus, DeliveryView, EventKind, SubscriptionList, SubscriptionView, UpdateSubscriptionRequest,
    MAX_SUBSCRIPTIONS_PER_OWNER,
};
use kiln_schemas::validate::is_uuid;
use serde::Deserialize;
use worker::{Env, Request, Response};

use super::Ctx;
use crate::auth::Principal;
use crate::deliveries::{self, Settings};
use crate::env::{self, new_id, now_ms, random};
use crate::sealed::{new_secret, SealKey, MIN_KEY_LEN};
use crate::http::{body_as, json, json_status, ApiError, ApiResult};
use crate::store::{n, opt, s};
use crate::time::rfc3339;

/// Deliveries one page of the log answers by default, and at most.
const DELIVERIES_PAGE: usize = 50;
const MAX_DELIVERIES_PAGE: usize = 200;

fn not_found() -> ApiError {
    ApiError::NotFound("webhook subscription not found".into())
}

/// The key subscription secrets are sealed with (`WEBHOOK_SECRET_KEY`, as inbound hooks').
fn seal_key(env: &Env) -> ApiResult<SealKey> {
    let secret = env.secret("WEBHOOK_SECRET_KEY").ok().map(|s| s.to_string()).or_else(|| env.var("WEBHOOK_SECRET_KEY").ok().map(|v| v.to_string()));
    SealKey::from_secret(&secret.unwrap_or_default()).ok_or_else(|| {
        worker::console_error!("WEBHOOK_SECRET_KEY is unset or shorter than {MIN_KEY_LEN} characters");
        ApiError::Unavailable("webhooks are not configured on this server".into())
    })
}

/// The signing secret of subscription `id` as stored: AES-GCM sealed for that row.
fn seal_secret(env: &Env, id: &str, secret: &str) -> ApiResult<String> {
    Ok(seal_key(env)?.seal(secret, id, random::<12>()))
}

/// A subscription's stored secret opened for signing.
pub fn open_secret(env: &Env, id: &str, sealed: &str) -> ApiResult<String> {
    seal_key(env)?.open(sealed, id).ok_or_else(|| ApiError::Internal(format!("the secret of subscription {id} does not open")))
}

#[derive(Debug, Deserialize)]
struct SubscriptionRow {
    id: String,
    url: String,
    events: String,
    job_types: Option<String>,
    enabled: i64,
    created_at: String,
    updated_at: String,
}

impl SubscriptionRow {
    fn view(&self) -> SubscriptionView {
        SubscriptionView {
            id: self.id.clone(),
            url: self.url.clone(),
            events: serde_json::from_str(&self.events).unwrap_or_default(),
            job_types: self.job_types.as_deref().and_then(|t| serde_json::from_str(t).ok()),
            enabled: self.enabled != 0,
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
            secret: None,
        }
    }
}

const SUB_COLUMNS: &str = "id, url, events, job_types, enabled, created_at, updated_at";

async fn find(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult<SubscriptionRow> {
    if !is_uuid(id) {
        return Err(not_found());
    }
    env::db(&ctx.env)?
        .prepare(format!("SELECT {SUB_COLUMNS} FROM webhook_subscriptions WHERE id = ?1 AND owner = ?2"))
        .bind(&[s(&id.to_ascii_lowercase()), s(who.owner())])?
        .first::<SubscriptionRow>(None)
        .await?
        .ok_or_else(not_found)
}

fn checked_url(url: &str, settings: &Settings) -> ApiResult<String> {
    let url = url.trim();
    check_target(url, settings.policy).map_err(ApiError::BadRequest)?;
    Ok(url.to_string())
}

fn types_json(types: &Option<Vec<JobType>>) -> ApiResult<Option<String>> {
    Ok(match types {
        Some(t) => Some(serde_json::to_string(t)?),
        None => None,
    })
}

/// `POST /webhook-subscriptions {url, events, job_types?, secret?, enabled?}` → 201 with the
/// subscription and its secret (shown this once).
pub async fn create(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let body: CreateSubscriptionRequest = body_as(&mut req).await?;
    let settings = Settings::from_env(&ctx.env);
    let url = checked_url(&body.url, &settings)?;
    let events = parse_events(&body.events).map_err(ApiError::BadRequest)?;
    let job_types = parse_job_types(body.job_types.as_deref()).map_err(ApiError::BadRequest)?;
    let secret = match body.secret {
        Some(secret) => {
            check_secret(&secret).map_err(ApiError::BadRequest)?;
            secret
        }
        None => new_secret(random::<32>()),
    };
    let db = env::db(&ctx.env)?;
    #[derive(Deserialize)]
    struct Count {
        total: i64,
    }
    let count = db
        .prepare("SELECT COUNT(*) AS total FROM webhook_subscriptions WHERE owner = ?1")
        .bind(&[s(who.owner())])?
        .first::<Count>(None)
        .await?
        .map(|c| c.total)
        .unwrap_or(0);
    if count >= MAX_SUBSCRIPTIONS_PER_OWNER as i64 {
        return Err(ApiError::Conflict(format!("an account holds at most {MAX_SUBSCRIPTIONS_PER_OWNER} webhook subscriptions")));
    }
    let now = rfc3339(now_ms());
    let row = SubscriptionRow {
        id: new_id(),
        url,
        events: serde_json::to_string(&events)?,
        job_types: types_json(&job_types)?,
        enabled: i64::from(body.enabled.unwrap_or(true)),
        created_at: now.clone(),
        updated_at: now,
    };
    db.prepare(
        "INSERT INTO webhook_subscriptions (id, owner, url, events, job_types, secret, enabled, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
    )
    .bind(&[
        s(&row.id),
        s(who.owner()),
        s(&row.url),
        s(&row.events),
        opt(row.job_types.as_deref()),
        s(&seal_secret(&ctx.env, &row.id, &secret)?),
        n(row.enabled),
        s(&row.created_at),
    ])?
    .run()
    .await?;
    crate::deliveries::forget_subscriptions(who.owner());
    let mut view = row.view();
    view.secret = Some(secret);
    Ok(json_status(&view, 201))
}

/// `GET /webhook-subscriptions`: the caller's, oldest first.
pub async fn list(ctx: &Ctx, who: &Principal) -> ApiResult {
    let rows = env::db(&ctx.env)?
        .prepare(format!("SELECT {SUB_COLUMNS} FROM webhook_subscriptions WHERE owner = ?1 ORDER BY created_at, id"))
        .bind(&[s(who.owner())])?
        .all()
        .await?
        .results::<SubscriptionRow>()?;
    json(&SubscriptionList { subscriptions: rows.iter().map(SubscriptionRow::view).collect() })
}

/// `GET /webhook-subscriptions/<id>`
pub async fn get(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    json(&find(ctx, who, id).await?.view())
}

/// `PATCH /webhook-subscriptions/<id> {url?, events?, job_types?, enabled?}`
pub async fn update(mut req: Request, ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let body: UpdateSubscriptionRequest = body_as(&mut req).await?;
    let mut row = find(ctx, who, id).await?;
    let settings = Settings::from_env(&ctx.env);
    if let Some(url) = &body.url {
        row.url = checked_url(url, &settings)?;
    }
    if let Some(events) = &body.events {
        row.events = serde_json::to_string(&parse_events(events).map_err(ApiError::BadRequest)?)?;
    }
    if let Some(types) = &body.job_types {
        row.job_types = types_json(&parse_job_types(Some(types)).map_err(ApiError::BadRequest)?)?;
    }
    if let Some(enabled) = body.enabled {
        row.enabled = i64::from(enabled);
    }
    row.updated_at = rfc3339(now_ms());
    env::db(&ctx.env)?
        .prepare(
            "UPDATE webhook_subscriptions SET url = ?3, events = ?4, job_types = ?5, enabled = ?6, updated_at = ?7 \
             WHERE id = ?1 AND owner = ?2",
        )
        .bind(&[
            s(&row.id),
            s(who.owner()),
            s(&row.url),
            s(&row.events),
            opt(row.job_types.as_deref()),
            n(row.enabled),
            s(&row.updated_at),
        ])?
        .run()
        .await?;
    crate::deliveries::forget_subscriptions(who.owner());
    json(&row.view())
}

/// `DELETE /webhook-subscriptions/<id>` → 204, with its deliveries and their attempts (a queued
/// message of a deleted delivery finds nothing and sends nothing).
pub async fn delete(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let row = find(ctx, who, id).await?;
    let db = env::db(&ctx.env)?;
    db.batch(vec![
        db.prepare(
            "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries WHERE subscription_id = ?1)",
        )
        .bind(&[s(&row.id)])?,
        db.prepare("DELETE FROM webhook_deliveries WHERE subscription_id = ?1").bind(&[s(&row.id)])?,
        db.prepare("DELETE FROM webhook_subscriptions WHERE id = ?1 AND owner = ?2").bind(&[s(&row.id), s(who.owner())])?,
    ])
    .await?;
    crate::deliveries::forget_subscriptions(who.owner());
    Ok(Response::empty()?.with_status(204))
}

#[derive(Debug, Deserialize)]
struct DeliveryRow {
    id: String,
    subscription_id: String,
    event: String,
    job_id: String,
    status: String,
    attempts: u32,
    created_at: String,
    delivered_at: Option<String>,
    next_attempt_at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AttemptRow {
    delivery_id: String,
    n: u32,
    at: String,
    response_code: Option<u16>,
    latency_ms: u64,
    error: Option<String>,
}

const DELIVERY_COLUMNS: &str = "id, subscription_id, event, job_id, status, attempts, created_at, delivered_at, next_attempt_at";

async fn views(env: &Env, rows: Vec<DeliveryRow>) -> ApiResult<Vec<DeliveryView>> {
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let db = env::db(env)?;
    let marks = (1..=rows.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
    let ids: Vec<_> = rows.iter().map(|r| s(&r.id)).collect();
    let attempts = db
        .prepare(format!(
            "SELECT delivery_id, n, at, response_code, latency_ms, error FROM webhook_attempts WHERE delivery_id IN ({marks}) ORDER BY delivery_id, n"
        ))
        .bind(&ids)?
        .all()
        .await?
        .results::<AttemptRow>()?;
    Ok(rows
        .into_iter()
        .map(|r| DeliveryView {
            attempts: attempts
                .iter()
                .filter(|a| a.delivery_id == r.id)
                .map(|a| AttemptView {
                    n: a.n,
                    at: a.at.clone(),
                    response_code: a.response_code,
                    latency_ms: a.latency_ms,
                    error: a.error.clone(),
                })
                .collect(),
            event: EventKind::parse(&r.event).unwrap_or(EventKind::JobStatus),
            status: DeliveryStatus::parse(&r.status).unwrap_or(DeliveryStatus::Pending),
            next_attempt_at: if r.status == "pending" { r.next_attempt_at } else { None },
            id: r.id,
            subscription_id: r.subscription_id,
            job_id: r.job_id,
            created_at: r.created_at,
            delivered_at: r.delivered_at,
        })
        .collect())
}

/// `GET /webhook-subscriptions/<id>/deliveries?status=&job_id=&limit=`: newest first, each with its
/// attempts.
pub async fn deliveries(req: Request, ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let sub = find(ctx, who, id).await?;
    let url = req.url()?;
    let mut filter = String::new();
    let mut args = vec![s(&sub.id)];
    let mut limit = DELIVERIES_PAGE;
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "status" => {
                let status = DeliveryStatus::parse(&v)
                    .ok_or_else(|| ApiError::BadRequest("status: pending, delivered or failed".into()))?;
                args.push(s(status.as_str()));
                filter.push_str(&format!(" AND status = ?{}", args.len()));
            }
            "job_id" => {
                args.push(s(&v.to_ascii_lowercase()));
                filter.push_str(&format!(" AND job_id = ?{}", args.len()));
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=MAX_DELIVERIES_PAGE).contains(l))
                    .ok_or_else(|| ApiError::BadRequest(format!("limit: 1 to {MAX_DELIVERIES_PAGE}")))?;
            }
            _ => {}
        }
    }
    let rows = env::db(&ctx.env)?
        .prepare(format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE subscription_id = ?1{filter} ORDER BY created_ms DESC, id LIMIT {limit}"
        ))
        .bind(&args)?
        .all()
        .await?
        .results::<DeliveryRow>()?;
    json(&DeliveryList { deliveries: views(&ctx.env, rows).await? })
}

async fn find_delivery(ctx: &Ctx, sub_id: &str, delivery_id: &str) -> ApiResult<DeliveryRow> {
    let missing = || ApiError::NotFound("delivery not found".into());
    if !is_uuid(delivery_id) {
        return Err(missing());
    }
    env::db(&ctx.env)?
        .prepare(format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = ?1 AND subscription_id = ?2"))
        .bind(&[s(&delivery_id.to_ascii_lowercase()), s(sub_id)])?
        .first::<DeliveryRow>(None)
        .await?
        .ok_or_else(missing)
}

/// `POST /webhook-subscriptions/<id>/deliveries/<delivery_id>/redeliver` → 202 with the delivery
/// (pending): sent again with the same id and payload, whatever came of it before.
pub async fn redeliver(ctx: &Ctx, who: &Principal, id: &str, delivery_id: &str) -> ApiResult {
    let sub = find(ctx, who, id).await?;
    if sub.enabled == 0 {
        return Err(ApiError::Conflict("the subscription is disabled; enable it to redeliver".into()));
    }
    let row = find_delivery(ctx, &sub.id, delivery_id).await?;
    deliveries::redeliver(&ctx.env, &row.id, row.attempts).await?;
    let row = find_delivery(ctx, &sub.id, &row.id).await?;
    let view = views(&ctx.env, vec![row]).await?.pop().ok_or_else(|| ApiError::Internal("delivery vanished".into()))?;
    Ok(json_status(&view, 202))
}
