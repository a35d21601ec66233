//! `/grants`: which repositories users may name. The service principal (`AGENT_API_SECRET`)
//! manages them; a user reads the grants that apply to them. [`require`] is the check every
//! handler that lets a runner touch a repository on a user's behalf makes first.

use kiln_schemas::grants::{is_granted, not_granted_message, GrantList, GrantOwner, NewGrant};
use kiln_schemas::validate::is_uuid;
use worker::Request;

use super::Ctx;
use crate::auth::Principal;
use crate::cache::{self, TtlCache};
use crate::env::{self, new_id, now_ms};
use crate::http::{body_json, json, json_status, ApiError, ApiResult};
use crate::store::{self, GrantRow};
use crate::time::rfc3339;

fn operator_only() -> ApiError {
    ApiError::Forbidden("only the operator's service credential (AGENT_API_SECRET) manages grants".into())
}

/// `Ok` when `who` may name every `(org, repo)` in `repos`: the service principal always may; a
/// user only for repositories granted to them or to everyone. Otherwise the 403 names the first
/// repository that is not granted.
pub async fn require(ctx: &Ctx, who: &Principal, repos: &[(&str, &str)]) -> ApiResult<()> {
    let Principal::User { id, email } = who else {
        return Ok(());
    };
    if repos.is_empty() {
        return Ok(());
    }
    let patterns = cache::read_through(&USER_GRANTS, id, now_ms, async {
        let rows = store::grants_of_user(&env::db(&ctx.env)?, id, email).await?;
        Ok::<_, ApiError>(rows.into_iter().map(|g| g.repository).collect::<Vec<String>>())
    })
    .await?;
    for (org, repo) in repos {
        if !is_granted(patterns.iter().map(String::as_str), org, repo) {
            return Err(ApiError::Forbidden(not_granted_message(org, repo)));
        }
    }
    Ok(())
}

/// How long an isolate trusts the grants it read for a user. A grant made or deleted here takes
/// effect at once in this isolate; other isolates may answer from their copy for up to this long.
const GRANTS_TTL_MS: i64 = 5_000;

thread_local! {
    /// The repository patterns granted to each user (to them, their email or everyone), by user
    /// id: every job a user submits checks them, and a D1 read per job was a fifth of `POST
    /// /jobs`.
    static USER_GRANTS: std::cell::RefCell<TtlCache<Vec<String>>> =
        std::cell::RefCell::new(TtlCache::new(GRANTS_TTL_MS, 4096));
}

/// Forgets every user's grants in this isolate (one grant may apply to any user).
fn forget_grants() {
    USER_GRANTS.with(|c| c.borrow_mut().clear());
}

/// `POST /grants {"owner", "repository"}` → 201 with the grant (200 with the existing one when
/// the same grant exists already).
pub async fn create(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    if *who != Principal::Service {
        return Err(operator_only());
    }
    let body = body_json(&mut req).await?;
    let grant = NewGrant::parse(&body).map_err(ApiError::BadRequest)?;
    let row = GrantRow {
        id: new_id(),
        owner: grant.owner.as_str().to_string(),
        repository: grant.repository.to_string(),
        created_at: rfc3339(now_ms()),
    };
    let (stored, inserted) = store::insert_grant(&env::db(&ctx.env)?, &row).await?;
    forget_grants();
    Ok(json_status(&stored.view(), if inserted { 201 } else { 200 }))
}

/// `GET /grants`: the service sees every grant (`?owner=` narrows to one stored owner); a user
/// sees the grants that apply to them.
pub async fn list(req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let db = env::db(&ctx.env)?;
    let rows = match who {
        Principal::User { id, email } => store::grants_of_user(&db, id, email).await?,
        Principal::Service => {
            let url = req.url()?;
            let owner = url.query_pairs().find(|(k, _)| k == "owner").map(|(_, v)| v.to_string());
            let owner = match owner {
                Some(o) => Some(GrantOwner::parse(&o).map_err(ApiError::BadRequest)?),
                None => None,
            };
            store::list_grants(&db, owner.as_ref().map(GrantOwner::as_str)).await?
        }
    };
    json(&GrantList { grants: rows.iter().map(GrantRow::view).collect() })
}

/// `DELETE /grants/:id` → 204.
pub async fn delete(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    if *who != Principal::Service {
        return Err(operator_only());
    }
    if !is_uuid(id) || !store::delete_grant(&env::db(&ctx.env)?, &id.to_ascii_lowercase()).await? {
        return Err(ApiError::NotFound("grant not found".into()));
    }
    forget_grants();
    Ok(worker::Response::empty()?.with_status(204))
}
