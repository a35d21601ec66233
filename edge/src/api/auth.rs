//! Seed 000 §1 auth: register, login, refresh (rotating, single-use refresh tokens).

use kiln_schemas::auth::{check_password_strength, normalize_email, RegisteredUser, TokenPair};
use serde::Deserialize;
use worker::Request;

use super::Ctx;
use crate::auth::{jwt, password, tokens};
use crate::env::{self, new_id, now_ms, random};
use crate::http::{body_json, json_status, ApiError, ApiResult};
use crate::store::{n, opt, s};
use crate::time::{from_ms, rfc3339};

fn field<'a>(body: &'a serde_json::Value, name: &str) -> ApiResult<&'a str> {
    match body.get(name) {
        None | Some(serde_json::Value::Null) => Err(ApiError::BadRequest(format!("{name} is required"))),
        Some(v) => v.as_str().ok_or_else(|| ApiError::BadRequest(format!("{name} must be a string"))),
    }
}

pub async fn register(mut req: Request, ctx: &Ctx) -> ApiResult {
    let body = body_json(&mut req).await?;
    if !body.is_object() {
        return Err(ApiError::BadRequest("request body must be a JSON object".into()));
    }
    let email = normalize_email(field(&body, "email")?).map_err(|e| ApiError::BadRequest(e.into()))?;
    let password_text = field(&body, "password")?;
    check_password_strength(password_text).map_err(ApiError::BadRequest)?;
    let username = match body.get("username") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(u)) if !u.trim().is_empty() && u.len() <= 150 => Some(u.trim().to_string()),
        Some(_) => return Err(ApiError::BadRequest("username must be a non-empty string of at most 150 bytes".into())),
    };
    let db = env::db(&ctx.env)?;
    #[derive(Deserialize)]
    struct Exists {
        #[allow(dead_code)]
        id: String,
    }
    if db.prepare("SELECT id FROM users WHERE email = ?1").bind(&[s(&email)])?.first::<Exists>(None).await?.is_some() {
        return Err(ApiError::Conflict("a user with this email already exists".into()));
    }
    let id = new_id();
    let hash = password::hash(password_text, random::<16>());
    let inserted = db
        .prepare("INSERT INTO users (id, email, username, password_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)")
        .bind(&[s(&id), s(&email), opt(username.as_deref()), s(&hash), s(&rfc3339(now_ms()))])?
        .run()
        .await;
    if inserted.is_err() {
        // Lost a race with a concurrent registration of the same email.
        return Err(ApiError::Conflict("a user with this email already exists".into()));
    }
    Ok(json_status(&RegisteredUser { id, email, username }, 201))
}

async fn issue_pair(ctx: &Ctx, user_id: &str, email: &str) -> ApiResult<TokenPair> {
    let now = now_ms();
    let access = jwt::issue(ctx.config.jwt_secret.as_bytes(), user_id, email, from_ms(now), ctx.config.access_ttl_secs);
    let refresh = tokens::generate("krt", random::<32>());
    env::db(&ctx.env)?
        .prepare("INSERT INTO refresh_tokens (token_hash, user_id, expires_at_ms, created_at) VALUES (?1, ?2, ?3, ?4)")
        .bind(&[s(&tokens::digest(&refresh)), s(user_id), n(now + ctx.config.refresh_ttl_secs * 1000), s(&rfc3339(now))])?
        .run()
        .await?;
    Ok(TokenPair { access, refresh })
}

pub async fn login(mut req: Request, ctx: &Ctx) -> ApiResult {
    if ctx.config.jwt_secret.is_empty() {
        return Err(ApiError::Internal("JWT_SECRET is not set".into()));
    }
    let body = body_json(&mut req).await?;
    let email = field(&body, "email")?.trim().to_ascii_lowercase();
    let password_text = field(&body, "password")?;
    #[derive(Deserialize)]
    struct UserRow {
        id: String,
        email: String,
        password_hash: String,
    }
    let user = env::db(&ctx.env)?
        .prepare("SELECT id, email, password_hash FROM users WHERE email = ?1")
        .bind(&[s(&email)])?
        .first::<UserRow>(None)
        .await?;
    let bad = || ApiError::Unauthorized("invalid email or password".into());
    let user = user.ok_or_else(bad)?;
    if password_text.len() > kiln_schemas::auth::MAX_PASSWORD_LEN || !password::verify(password_text, &user.password_hash) {
        return Err(bad());
    }
    Ok(json_status(&issue_pair(ctx, &user.id, &user.email).await?, 200))
}

pub async fn refresh(mut req: Request, ctx: &Ctx) -> ApiResult {
    let body = body_json(&mut req).await?;
    let token = field(&body, "refresh")?;
    #[derive(Deserialize)]
    struct Taken {
        user_id: String,
        expires_at_ms: i64,
        email: String,
    }
    // Deleting is what makes a refresh token single use: a second try finds nothing.
    let db = env::db(&ctx.env)?;
    let taken = db
        .prepare(
            "DELETE FROM refresh_tokens WHERE token_hash = ?1
             RETURNING user_id, expires_at_ms, (SELECT email FROM users WHERE users.id = refresh_tokens.user_id) AS email",
        )
        .bind(&[s(&tokens::digest(token))])?
        .first::<Taken>(None)
        .await?;
    let Some(taken) = taken else {
        return Err(ApiError::Unauthorized("invalid or already used refresh token".into()));
    };
    if taken.expires_at_ms <= now_ms() {
        return Err(ApiError::Unauthorized("refresh token expired".into()));
    }
    Ok(json_status(&issue_pair(ctx, &taken.user_id, &taken.email).await?, 200))
}
