//! Seed 003's clients and repositories, and the repository work runners carry out
//! (`/sync`, `/repos/clone`, `/repos/:id/clone`).

use kiln_schemas::runner::{RepoResult, RepoSpec, RunnerRequest};
use kiln_schemas::validate::{is_branch_name, is_repo_component, is_uuid};
use worker::{Method, Request};

use super::{grants, Ctx};
use crate::auth::Principal;
use crate::env::{self, new_id, now_ms};
use crate::http::{self, body_json, json, json_status, ApiError, ApiResult};
use crate::store::{self, ClientRow, RepoRow};
use crate::time::rfc3339;

/// `MAX_REPOSITORIES_PER_OWNER`'s default: the most repositories one account's clients hold.
pub const DEFAULT_MAX_REPOSITORIES_PER_OWNER: usize = 100;

/// `MAX_REPOSITORIES_PER_OWNER` (a `[vars]` setting).
fn max_repositories(ctx: &Ctx) -> usize {
    ctx.env
        .var("MAX_REPOSITORIES_PER_OWNER")
        .ok()
        .and_then(|v| v.to_string().trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_REPOSITORIES_PER_OWNER)
}

fn repo_json(r: &RepoRow) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "owner_name": r.owner_name,
        "repo_name": r.repo_name,
        "default_branch": r.default_branch,
    })
}

pub async fn list(ctx: &Ctx, who: &Principal) -> ApiResult {
    let db = env::db(&ctx.env)?;
    let clients = store::list_clients(&db, who.owner()).await?;
    let repos = store::repos_of_owner(&db, who.owner()).await?;
    let clients: Vec<_> = clients
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.id,
                "name": c.name,
                "repositories": repos.iter().filter(|r| r.client_id == c.id).map(repo_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    json(&serde_json::json!({ "clients": clients }))
}

async fn owned_client(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult<ClientRow> {
    if !is_uuid(id) {
        return Err(ApiError::NotFound("client not found".into()));
    }
    store::get_client(&env::db(&ctx.env)?, id, who.owner())
        .await?
        .ok_or_else(|| ApiError::NotFound("client not found".into()))
}

pub async fn get(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let client = owned_client(ctx, who, id).await?;
    let repos = store::repos_of_owner(&env::db(&ctx.env)?, who.owner()).await?;
    let repository = repos.iter().find(|r| r.client_id == client.id).map(repo_json);
    json(&serde_json::json!({ "id": client.id, "name": client.name, "repository": repository }))
}

pub async fn create(mut req: Request, ctx: &Ctx, who: &Principal) -> ApiResult {
    let body = body_json(&mut req).await?;
    let name = match body.get("name") {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() && s.len() <= 200 => s.trim().to_string(),
        _ => return Err(ApiError::BadRequest("name is required: a string of 1 to 200 bytes".into())),
    };
    let client = ClientRow { id: new_id(), owner: who.owner().to_string(), name, created_at: rfc3339(now_ms()) };
    store::insert_client(&env::db(&ctx.env)?, &client).await?;
    Ok(json_status(&serde_json::json!({ "id": client.id, "name": client.name, "repositories": [] }), 201))
}

pub async fn add_repository(mut req: Request, ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    let client = owned_client(ctx, who, id).await?;
    let body = body_json(&mut req).await?;
    let get = |k: &str| body.get(k).and_then(|v| v.as_str()).map(str::trim).filter(|s| !s.is_empty());
    let org = get("githubOrg").ok_or_else(|| ApiError::BadRequest("githubOrg is required".into()))?;
    let repo = get("githubRepo").ok_or_else(|| ApiError::BadRequest("githubRepo is required".into()))?;
    let branch = get("defaultBranch").unwrap_or("main");
    if !is_repo_component(org) {
        return Err(ApiError::BadRequest("githubOrg is not a valid GitHub owner name".into()));
    }
    if !is_repo_component(repo) {
        return Err(ApiError::BadRequest("githubRepo is not a valid GitHub repository name".into()));
    }
    if !is_branch_name(branch) {
        return Err(ApiError::BadRequest("defaultBranch is not a valid git branch name".into()));
    }
    grants::require(ctx, who, &[(org, repo)]).await?;
    // Bounded: an account holds at most MAX_REPOSITORIES_PER_OWNER repositories (across its
    // clients); adding one a client already has only updates it.
    let db = env::db(&ctx.env)?;
    let held = store::repos_of_owner(&db, who.owner()).await?;
    let known = held.iter().any(|r| {
        r.client_id == client.id && r.owner_name.eq_ignore_ascii_case(org) && r.repo_name.eq_ignore_ascii_case(repo)
    });
    let max = max_repositories(ctx);
    if !known && held.len() >= max {
        return Err(ApiError::Conflict(format!(
            "this account already has {} repositories, the most allowed (MAX_REPOSITORIES_PER_OWNER = {max})",
            held.len()
        )));
    }
    let row = RepoRow {
        id: new_id(),
        client_id: client.id.clone(),
        owner: who.owner().to_string(),
        owner_name: org.to_string(),
        repo_name: repo.to_string(),
        default_branch: branch.to_string(),
        created_at: rfc3339(now_ms()),
    };
    let stored = store::upsert_repo(&db, &row).await?;
    Ok(json_status(&serde_json::json!({ "id": client.id, "name": client.name, "repository": repo_json(&stored) }), 201))
}

async fn ask_runner(ctx: &Ctx, request: RunnerRequest) -> ApiResult<Vec<RepoResult>> {
    let q = env::queue(&ctx.env, "default")?;
    let value: serde_json::Value = http::call(&q, Method::Post, "/request", Some(&request)).await?;
    serde_json::from_value(value).map_err(|_| ApiError::Internal("runner answered with an unreadable result".into()))
}

/// The distinct repositories of `repos`, each granted to `who` (else the 403 of the first that is
/// not: nothing is sent to a runner).
async fn granted_specs(ctx: &Ctx, who: &Principal, repos: &[RepoRow]) -> ApiResult<Vec<RepoSpec>> {
    let specs = specs(repos);
    let pairs: Vec<(&str, &str)> = specs.iter().map(|s| (s.github_org.as_str(), s.github_repo.as_str())).collect();
    grants::require(ctx, who, &pairs).await?;
    Ok(specs)
}

fn specs(repos: &[RepoRow]) -> Vec<RepoSpec> {
    let mut out: Vec<RepoSpec> = vec![];
    for r in repos {
        let spec = RepoSpec { github_org: r.owner_name.clone(), github_repo: r.repo_name.clone() };
        if !out.contains(&spec) {
            out.push(spec);
        }
    }
    out
}

pub async fn sync(ctx: &Ctx, who: &Principal) -> ApiResult {
    let repos = store::repos_of_owner(&env::db(&ctx.env)?, who.owner()).await?;
    let synced = ask_runner(ctx, RunnerRequest::Sync { repos: granted_specs(ctx, who, &repos).await? }).await?;
    let synced: Vec<_> = synced
        .into_iter()
        .map(|r| serde_json::json!({ "repo": r.repo, "success": r.success, "error": r.error }))
        .collect();
    json(&serde_json::json!({ "synced": synced }))
}

pub async fn clone_all(ctx: &Ctx, who: &Principal) -> ApiResult {
    let repos = store::repos_of_owner(&env::db(&ctx.env)?, who.owner()).await?;
    let cloned = ask_runner(ctx, RunnerRequest::Clone { repos: granted_specs(ctx, who, &repos).await? }).await?;
    json(&serde_json::json!({ "cloned": cloned }))
}

pub async fn clone_one(ctx: &Ctx, who: &Principal, id: &str) -> ApiResult {
    if !is_uuid(id) {
        return Err(ApiError::NotFound("repository not found".into()));
    }
    let repo = store::get_repo(&env::db(&ctx.env)?, id, who.owner())
        .await?
        .ok_or_else(|| ApiError::NotFound("repository not found".into()))?;
    let mut results = ask_runner(ctx, RunnerRequest::Clone { repos: granted_specs(ctx, who, &[repo]).await? }).await?;
    let r = results.pop().ok_or_else(|| ApiError::Internal("runner answered with no result".into()))?;
    let status = if r.success { 200 } else { 502 };
    Ok(json_status(&r, status))
}
