//! Inbound webhooks (issue 12 §1): `/webhooks` management (owner-scoped; the secret is shown
//! once, at create and rotate, and stored sealed: `crate::sealed`) and the two unauthenticated
//! receivers, where the signature is the credential:
//! - `POST /webhooks/github/<id>`: `X-Hub-Signature-256`, events mapped by the hook's rules
//!   (`kiln_schemas::webhooks::map_github`), `X-GitHub-Delivery` for idempotency, `ping` 200;
//! - `POST /webhooks/generic/<id>`: `Kiln-Signature` (5 minutes either way), the JSON body
//!   mapped by the hook's template, `Kiln-Delivery`/`Idempotency-Key` (else the signature) for
//!   idempotency.
//!
//! A mapped job goes through `jobs::submit` as the hook's owner: grants, protected branches,
//! room, row, queue, exactly like `POST /jobs`. Answers: 201 `{accepted: true, job_id}` (the
//! same again for a redelivery), 202 `{accepted: false, reason}` with nothing stored when the
//! delivery maps to no job or the job is refused, 401 bad signature, 404 unknown hook.

use kiln_schemas::jobs::NewJob;
use kiln_schemas::validate::is_uuid;
use kiln_schemas::webhooks::{
    self as wh, HookKind, HookList, HookView, HookWithSecret, InboundAnswer, IssueRef, NewHook, Rule,
};
use serde::Deserialize;
use serde_json::Value;
use worker::{D1Database, Request, Response};

use super::{jobs, Ctx};
use crate::auth::Principal;
use crate::env::{self, new_id, now_ms, random};
use crate::http::{body_json, json, json_status, ApiError, ApiResult, MAX_BODY_BYTES};
use crate::sealed::{new_secret, SealKey, MIN_KEY_LEN};
use crate::store::{n, opt, s};
use crate::time::rfc3339;

/// A claimed delivery whose job was never recorded (its request died) is taken over after this.
const CLAIM_TIMEOUT_MS: i64 = 120_000;
/// Delivery ids are kept this long (GitHub redelivers deliveries of the last 3 days).
const DELIVERY_RETENTION_MS: i64 = 30 * 24 * 3600 * 1000;

#[derive(Debug, Deserialize)]
struct HookRow {
    id: String,
    owner: String,
    kind: String,
    name: String,
    rules: String,
    template: Option<String>,
    secret: String,
    created_at: String,
    secret_rotated_at: Option<String>,
}

impl HookRow {
    fn kind(&self) -> HookKind {
        HookKind::parse(&self.kind).unwrap_or(HookKind::Generic)
    }

    fn rules(&self) -> Vec<Rule> {
        serde_json::from_str(&self.rules).unwrap_or_default()
    }

    fn template(&self) -> Option<Value> {
        self.template.as_deref().and_then(|t| serde_json::from_str(t).ok())
    }

    fn view(&self) -> HookView {
        HookView {
            id: self.id.clone(),
            kind: self.kind(),
            name: self.name.clone(),
            rules: self.rules(),
            template: self.template(),
            path: format!("/webhooks/{}/{}", self.kind, self.id),
            created_at: self.created_at.clone(),
            secret_rotated_at: self.secret_rotated_at.clone(),
        }
    }
}

/// The sealing key from `WEBHOOK_SECRET_KEY`; webhooks are off (503) without one.
fn seal_key(ctx: &Ctx) -> ApiResult<SealKey> {
    let secret = ctx
        .env
        .secret("WEBHOOK_SECRET_KEY")
        .map(|s| s.to_string())
        .or_else(|_| ctx.env.var("WEBHOOK_SECRET_KEY").map(|v| v.to_string()))
        .unwrap_or_default();
    SealKey::from_secret(&secret).ok_or_else(|| {
        worker::console_error!("webhooks are off: WEBHOOK_SECRET_KEY is unset or shorter than {MIN_KEY_LEN} characters");
        ApiError::Unavailable("webhooks are not configured on this server".into())
    })
}

fn seal(key: &SealKey, secret: &str, hook_id: &str) -> String {
    key.seal(secret, hook_id, random::<12>())
}

async fn hook_by_id(db: &D1Database, id: &str) -> ApiResult<Option<HookRow>> {
    if !is_uuid(id) {
        return Ok(None);
    }
    Ok(db.prepare("SELECT * FROM webhooks WHERE id = ?1").bind(&[s(&id.to_ascii_lowercase())])?.first::<HookRow>(None).await?)
}

async fn owned_hook(db: &D1Database, id: &str, who: &Principal) -> ApiResult<HookRow> {
    hook_by_id(db, id)
        .await?
        .filter(|h| h.owner == who.owner())
        .ok_or_else(|| ApiError::NotFound("webhook not found".into()))
}

/// `POST /webhooks {kind, name, rules?, template?}` → 201 with the hook and its secret (once).
pub async fn create(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let key = seal_key(ctx)?;
    let body = body_json(&mut req).await?;
    let hook = NewHook::parse(&body).map_err(ApiError::BadRequest)?;
    let id = new_id();
    let secret = new_secret(random::<32>());
    let now = now_ms();
    let row = HookRow {
        id: id.clone(),
        owner: who.owner().to_string(),
        kind: hook.kind.as_str().to_string(),
        name: hook.name,
        rules: serde_json::to_string(&hook.rules)?,
        template: hook.template.as_ref().map(Value::to_string),
        secret: seal(&key, &secret, &id),
        created_at: rfc3339(now),
        secret_rotated_at: None,
    };
    env::db(&ctx.env)?
        .prepare(
            "INSERT INTO webhooks (id, owner, kind, name, rules, template, secret, created_at, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .bind(&[
            s(&row.id),
            s(&row.owner),
            s(&row.kind),
            s(&row.name),
            s(&row.rules),
            opt(row.template.as_deref()),
            s(&row.secret),
            s(&row.created_at),
            n(now),
        ])?
        .run()
        .await?;
    Ok(json_status(&HookWithSecret { hook: row.view(), secret }, 201))
}

/// `GET /webhooks`: the caller's hooks, oldest first, without secrets.
pub async fn list(ctx: &Ctx, who: &Principal) -> ApiResult {
    let rows: Vec<HookRow> = env::db(&ctx.env)?
        .prepare("SELECT * FROM webhooks WHERE owner = ?1 ORDER BY created_ms, id")
        .bind(&[s(who.owner())])?
        .all()
        .await?
        .results()?;
    json(&HookList { webhooks: rows.iter().map(HookRow::view).collect() })
}

/// `GET /webhooks/<id>`.
pub async fn get(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    json(&owned_hook(&env::db(&ctx.env)?, id, who).await?.view())
}

/// `POST /webhooks/<id>/rotate-secret` → the hook with its new secret (once); the old one stops
/// verifying at once.
pub async fn rotate(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let key = seal_key(ctx)?;
    let db = env::db(&ctx.env)?;
    let mut row = owned_hook(&db, id, who).await?;
    let secret = new_secret(random::<32>());
    row.secret = seal(&key, &secret, &row.id);
    row.secret_rotated_at = Some(rfc3339(now_ms()));
    db.prepare("UPDATE webhooks SET secret = ?1, secret_rotated_at = ?2 WHERE id = ?3 AND owner = ?4")
        .bind(&[s(&row.secret), opt(row.secret_rotated_at.as_deref()), s(&row.id), s(who.owner())])?
        .run()
        .await?;
    json(&HookWithSecret { hook: row.view(), secret })
}

/// `DELETE /webhooks/<id>` → 204; its delivery ids go with it (jobs it started stay).
pub async fn delete(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let db = env::db(&ctx.env)?;
    let row = owned_hook(&db, id, who).await?;
    db.batch(vec![
        db.prepare("DELETE FROM inbound_deliveries WHERE hook_id = ?1").bind(&[s(&row.id)])?,
        db.prepare("DELETE FROM webhooks WHERE id = ?1 AND owner = ?2").bind(&[s(&row.id), s(who.owner())])?,
    ])
    .await?;
    Ok(Response::empty()?.with_status(204))
}

// ----- Receivers -------------------------------------------------------------------------------

fn answer(status: u16, a: InboundAnswer) -> ApiResult {
    Ok(json_status(&a, status))
}

fn not_accepted(reason: impl Into<String>) -> ApiResult {
    answer(202, InboundAnswer { accepted: false, job_id: None, reason: Some(reason.into()) })
}

fn started(job_id: String) -> ApiResult {
    answer(201, InboundAnswer { accepted: true, job_id: Some(job_id), reason: None })
}

/// The raw body, bounded like every other body.
async fn raw_body(req: &mut Request) -> ApiResult<Vec<u8>> {
    let too_large = || ApiError::TooLarge(format!("request body over {MAX_BODY_BYTES} bytes"));
    let declared = req.headers().get("content-length")?.and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let bytes = req.bytes().await.map_err(|_| ApiError::BadRequest("could not read request body".into()))?;
    if bytes.len() > MAX_BODY_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

fn header(req: &Request, name: &str) -> ApiResult<Option<String>> {
    Ok(req.headers().get(name)?.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()))
}

/// The receiving hook of `kind`, or 404 (an unknown id, or a hook of the other kind).
async fn receiving_hook(ctx: &Ctx, id: &str, kind: HookKind) -> ApiResult<HookRow> {
    hook_by_id(&env::db(&ctx.env)?, id)
        .await?
        .filter(|h| h.kind() == kind)
        .ok_or_else(|| ApiError::NotFound("webhook not found".into()))
}

fn hook_secret(ctx: &Ctx, hook: &HookRow) -> ApiResult<String> {
    let key = seal_key(ctx)?;
    key.open(&hook.secret, &hook.id).ok_or_else(|| {
        ApiError::Internal(format!("webhook {}: its secret does not open with WEBHOOK_SECRET_KEY (was the key changed?)", hook.id))
    })
}

/// The principal a hook's jobs run as: its owner (a user, as its grants name them by id or email).
async fn owner_principal(db: &D1Database, owner: &str) -> ApiResult<Option<Principal>> {
    if owner == Principal::Service.owner() {
        return Ok(Some(Principal::Service));
    }
    #[derive(Deserialize)]
    struct User {
        email: String,
    }
    let user = db.prepare("SELECT email FROM users WHERE id = ?1").bind(&[s(owner)])?.first::<User>(None).await?;
    Ok(user.map(|u| Principal::User { id: owner.to_string(), email: u.email }))
}

#[derive(Deserialize)]
struct DeliveryRow {
    job_id: Option<String>,
    created_ms: i64,
}

enum Claim {
    /// This request starts the job.
    Ours,
    /// An earlier request of the same delivery started it.
    Done(String),
    /// An earlier request of the same delivery is starting it now.
    Busy,
}

/// Claims `(hook, delivery)`: only one request of a delivery ever submits its job.
async fn claim(db: &D1Database, hook_id: &str, delivery: &str, event: &str) -> ApiResult<Claim> {
    let now = now_ms();
    let inserted = db
        .prepare(
            "INSERT INTO inbound_deliveries (hook_id, delivery_id, event, job_id, created_ms) VALUES (?1, ?2, ?3, NULL, ?4)
             ON CONFLICT (hook_id, delivery_id) DO NOTHING",
        )
        .bind(&[s(hook_id), s(delivery), s(event), n(now)])?
        .run()
        .await?;
    if inserted.meta()?.and_then(|m| m.changes).unwrap_or(0) > 0 {
        // Old delivery ids go beside the new ones (indexed by time).
        if let Err(e) = db
            .prepare("DELETE FROM inbound_deliveries WHERE created_ms < ?1 AND job_id IS NOT NULL")
            .bind(&[n(now - DELIVERY_RETENTION_MS)])?
            .run()
            .await
        {
            worker::console_warn!("pruning old inbound deliveries: {e}");
        }
        return Ok(Claim::Ours);
    }
    let row = db
        .prepare("SELECT job_id, created_ms FROM inbound_deliveries WHERE hook_id = ?1 AND delivery_id = ?2")
        .bind(&[s(hook_id), s(delivery)])?
        .first::<DeliveryRow>(None)
        .await?;
    match row {
        Some(DeliveryRow { job_id: Some(job), .. }) => Ok(Claim::Done(job)),
        Some(DeliveryRow { job_id: None, created_ms }) if now - created_ms < CLAIM_TIMEOUT_MS => Ok(Claim::Busy),
        // A claim whose request died (or a row removed meanwhile): take it over, once.
        _ => {
            let taken = db
                .prepare(
                    "INSERT INTO inbound_deliveries (hook_id, delivery_id, event, job_id, created_ms) VALUES (?1, ?2, ?3, NULL, ?4)
                     ON CONFLICT (hook_id, delivery_id) DO UPDATE SET created_ms = excluded.created_ms
                     WHERE inbound_deliveries.job_id IS NULL AND inbound_deliveries.created_ms < ?5",
                )
                .bind(&[s(hook_id), s(delivery), s(event), n(now), n(now - CLAIM_TIMEOUT_MS)])?
                .run()
                .await?;
            if taken.meta()?.and_then(|m| m.changes).unwrap_or(0) > 0 {
                Ok(Claim::Ours)
            } else {
                Ok(Claim::Busy)
            }
        }
    }
}

/// A delivery already answered: the same answer again.
async fn earlier_answer(db: &D1Database, hook_id: &str, delivery: &str) -> ApiResult<Option<String>> {
    let row = db
        .prepare("SELECT job_id, created_ms FROM inbound_deliveries WHERE hook_id = ?1 AND delivery_id = ?2")
        .bind(&[s(hook_id), s(delivery)])?
        .first::<DeliveryRow>(None)
        .await?;
    Ok(row.and_then(|r| r.job_id))
}

/// Whether a job of `owner` already uses `branch` on `org/repo`.
async fn branch_taken(db: &D1Database, owner: &str, org: &str, repo: &str, branch: &str) -> ApiResult<bool> {
    #[derive(Deserialize)]
    struct Hit {
        #[allow(dead_code)]
        id: String,
    }
    let hit = db
        .prepare(
            "SELECT id FROM jobs WHERE owner = ?1 AND lower(github_org) = lower(?2) AND lower(github_repo) = lower(?3)
             AND branch_name = ?4 LIMIT 1",
        )
        .bind(&[s(owner), s(org), s(repo), s(branch)])?
        .first::<Hit>(None)
        .await?;
    Ok(hit.is_some())
}

/// Gives a claim back when its job was not started (nothing stays stored).
async fn release(db: &D1Database, hook_id: &str, delivery: &str) {
    let stmt = db
        .prepare("DELETE FROM inbound_deliveries WHERE hook_id = ?1 AND delivery_id = ?2 AND job_id IS NULL")
        .bind(&[s(hook_id), s(delivery)]);
    let result = match stmt {
        Ok(st) => st.run().await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        worker::console_error!("releasing delivery {delivery} of hook {hook_id}: {e}");
    }
}

/// Starts the mapped job as the hook's owner, once per delivery.
async fn start(ctx: &Ctx, hook: &HookRow, delivery: &str, event: &str, mut job_body: Value, issue: Option<IssueRef>) -> ApiResult {
    let db = env::db(&ctx.env)?;
    let Some(who) = owner_principal(&db, &hook.owner).await? else {
        return not_accepted("the hook's owner no longer exists");
    };
    // A later delivery for the same issue gets a branch of its own.
    if let (Some(branch), Some(org), Some(repo)) =
        (job_body["branchName"].as_str(), job_body["githubOrg"].as_str(), job_body["githubRepo"].as_str())
    {
        let taken = branch_taken(&db, &hook.owner, org, repo, branch).await?;
        job_body["branchName"] = Value::String(wh::unique_branch(branch, taken, delivery));
    }
    let job = match NewJob::parse(&job_body) {
        Ok(j) => j,
        Err(e) => return not_accepted(format!("the mapped job is not valid: {e}")),
    };
    // Checked before anything is stored (submit checks again).
    if let kiln_schemas::jobs::JobTarget::Repo { github_org, github_repo } = &job.target {
        match super::grants::require(ctx, &who, &[(github_org, github_repo)]).await {
            Ok(()) => {}
            Err(ApiError::Forbidden(m)) => return not_accepted(m),
            Err(e) => return Err(e),
        }
    }
    match claim(&db, &hook.id, delivery, event).await? {
        Claim::Ours => {}
        Claim::Done(job) => return started(job),
        Claim::Busy => return Err(ApiError::Conflict("this delivery is being processed; send it again shortly".into())),
    }
    match jobs::submit(ctx, &who, job, None, None, issue.as_ref()).await {
        Ok((row, _)) => {
            db.prepare("UPDATE inbound_deliveries SET job_id = ?1 WHERE hook_id = ?2 AND delivery_id = ?3")
                .bind(&[s(&row.id), s(&hook.id), s(delivery)])?
                .run()
                .await?;
            started(row.id)
        }
        Err(ApiError::Forbidden(m) | ApiError::BadRequest(m) | ApiError::NotFound(m)) => {
            release(&db, &hook.id, delivery).await;
            not_accepted(m)
        }
        Err(e) => {
            release(&db, &hook.id, delivery).await;
            Err(e)
        }
    }
}

/// `POST /webhooks/github/<id>`.
pub async fn github(mut req: Request, ctx: &Ctx, id: &str) -> ApiResult {
    let hook = receiving_hook(ctx, id, HookKind::Github).await?;
    let body = raw_body(&mut req).await?;
    let secret = hook_secret(ctx, &hook)?;
    wh::verify_github(secret.as_bytes(), header(&req, wh::GITHUB_SIGNATURE_HEADER)?.as_deref(), &body)
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    let event = header(&req, wh::GITHUB_EVENT_HEADER)?.ok_or_else(|| ApiError::BadRequest("X-GitHub-Event is required".into()))?;
    if event == "ping" {
        return answer(200, InboundAnswer { accepted: true, job_id: None, reason: Some("pong: the signature verified".into()) });
    }
    let delivery = header(&req, wh::GITHUB_DELIVERY_HEADER)?
        .filter(|d| wh::valid_delivery_id(d))
        .ok_or_else(|| ApiError::BadRequest("X-GitHub-Delivery is required (printable, at most 200 characters)".into()))?;
    // A redelivery is answered what the first delivery was, whatever the rules say now.
    if let Some(job) = earlier_answer(&env::db(&ctx.env)?, &hook.id, &delivery).await? {
        return started(job);
    }
    let payload: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::BadRequest("the body is not JSON: set the hook's content type to application/json".into()))?;
    let mapped = match wh::map_github(&hook.rules(), &event, &payload) {
        Ok(m) => m,
        Err(reason) => return not_accepted(reason),
    };
    start(ctx, &hook, &delivery, &event, mapped.job, mapped.issue).await
}

/// `POST /webhooks/generic/<id>`.
pub async fn generic(mut req: Request, ctx: &Ctx, id: &str) -> ApiResult {
    let hook = receiving_hook(ctx, id, HookKind::Generic).await?;
    let body = raw_body(&mut req).await?;
    let secret = hook_secret(ctx, &hook)?;
    let signature = header(&req, wh::SIGNATURE_HEADER)?.unwrap_or_default();
    wh::verify_signature_header(secret.as_bytes(), &signature, &body, now_ms().div_euclid(1000))
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    let delivery = match header(&req, wh::DELIVERY_HEADER)?.or(header(&req, "Idempotency-Key")?) {
        Some(d) if wh::valid_delivery_id(&d) => d,
        Some(_) => return Err(ApiError::BadRequest("Kiln-Delivery must be printable, at most 200 characters".into())),
        // Without an id, a replay of the same signed request (within its 5 minutes) is the same
        // delivery.
        None => format!("sig:{}", signature.split(',').find_map(|p| p.trim().strip_prefix("v1=")).unwrap_or_default()),
    };
    if let Some(job) = earlier_answer(&env::db(&ctx.env)?, &hook.id, &delivery).await? {
        return started(job);
    }
    let payload: Value = serde_json::from_slice(&body).map_err(|_| ApiError::BadRequest("request body is not valid JSON".into()))?;
    let Some(template) = hook.template() else {
        return not_accepted("the hook has no template");
    };
    let mut job = match wh::render_template(&template, &payload) {
        Ok(j) => j,
        Err(reason) => return not_accepted(format!("template: {reason}")),
    };
    // A code job needs a branch: one per delivery unless the template names one.
    let is_code = job.get("jobType").and_then(Value::as_str).is_none_or(|t| t == "code");
    if is_code && job.get("branchName").is_none_or(Value::is_null) {
        let short: String = delivery.chars().filter(char::is_ascii_alphanumeric).take(12).collect::<String>().to_ascii_lowercase();
        if let Some(obj) = job.as_object_mut() {
            obj.insert("branchName".into(), Value::String(format!("kiln/hook-{short}")));
        }
    }
    start(ctx, &hook, &delivery, "generic", job, None).await
}
