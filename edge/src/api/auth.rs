//! Seed 000 §1 auth, in the shapes of Django REST framework + simplejwt: register, login, refresh
//! (rotating, single-use refresh tokens in families), me, logout.
//!
//! - Login costs the same and answers the same whether or not the email exists: an unknown email
//!   is verified against [`password::dummy_hash`], and every refusal is the same 401.
//! - Failed logins and registrations are limited per email and per client address
//!   ([`rate_limit`]): an attempt reserves its failure before any password is hashed and gets it
//!   back when it succeeds.
//! - A hash made with older parameters is replaced on the next successful login.
//! - Refresh tokens rotate: each is spent by its refresh, and a spent one presented again revokes
//!   every token of its login (its family). Logout revokes the family of the token it is given.
//!   Expired tokens and old failures are purged beside the writes of logins and refreshes.

use kiln_schemas::auth::{
    check_password_strength, normalize_email, optional_name, Detail, LoginResponse, RegisteredUser, TokenPair, UserView,
    MAX_PASSWORD_LEN,
};
use serde::Deserialize;
use worker::{D1Database, D1PreparedStatement, Request};

use super::Ctx;
use crate::auth::{jwt, password, tokens, Principal};
use crate::env::{self, new_id, now_ms, random};
use crate::http::{body_json, json, json_status, ApiError, ApiResult};
use crate::rate_limit;
use crate::store::{n, opt, s};
use crate::time::{from_ms, rfc3339};

/// The one answer to every refused login.
const BAD_LOGIN: &str = "invalid email or password";

fn field<'a>(body: &'a serde_json::Value, name: &str) -> ApiResult<&'a str> {
    match body.get(name) {
        None | Some(serde_json::Value::Null) => Err(ApiError::BadRequest(format!("{name} is required"))),
        Some(v) => v.as_str().ok_or_else(|| ApiError::BadRequest(format!("{name} must be a string"))),
    }
}

fn object(body: &serde_json::Value) -> ApiResult<()> {
    if body.is_object() {
        Ok(())
    } else {
        Err(ApiError::BadRequest("request body must be a JSON object".into()))
    }
}

/// The client's address as the rate limits key it.
fn client_address(req: &Request) -> String {
    let header = |name: &str| req.headers().get(name).ok().flatten();
    rate_limit::client_address(header("cf-connecting-ip").as_deref(), header("x-forwarded-for").as_deref())
}

fn check_secret(ctx: &Ctx) -> ApiResult<()> {
    if ctx.config.jwt_secret.is_empty() {
        return Err(ApiError::Internal("JWT_SECRET is not set".into()));
    }
    Ok(())
}

fn access_token(ctx: &Ctx, user_id: &str, email: &str, now: i64) -> String {
    jwt::issue(ctx.config.jwt_secret.as_bytes(), user_id, email, from_ms(now), ctx.config.access_ttl_secs)
}

/// The statement that forgets refresh tokens past their expiry (run beside the writes of logins
/// and refreshes, so the table never keeps dead tokens for long).
fn purge_expired_tokens(db: &D1Database, now: i64) -> worker::Result<D1PreparedStatement> {
    db.prepare("DELETE FROM refresh_tokens WHERE expires_at_ms <= ?1").bind(&[n(now)])
}

/// A new login's token pair: a refresh token opening a new family. Purges expired tokens and old
/// failures in the same batch.
async fn issue_pair(ctx: &Ctx, db: &D1Database, user_id: &str, email: &str) -> ApiResult<TokenPair> {
    let now = now_ms();
    let refresh = tokens::generate("krt", random::<32>());
    let insert = db
        .prepare(
            "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at_ms, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&[
            s(&tokens::digest(&refresh)),
            s(user_id),
            s(&new_id()),
            n(now + ctx.config.refresh_ttl_secs * 1000),
            s(&rfc3339(now)),
        ])?;
    db.batch(vec![insert, purge_expired_tokens(db, now)?, rate_limit::purge(db, &ctx.config.auth_limits, now)?]).await?;
    Ok(TokenPair { access: access_token(ctx, user_id, email, now), refresh })
}

fn user_view(id: String, email: String, name: Option<String>, username: Option<String>) -> UserView {
    UserView { id, email, name: name.or(username).unwrap_or_default() }
}

/// `POST /api/auth/register/` `{email, password, name?, username?}` → 201 with the user and a
/// token pair (the new user is logged in).
pub async fn register(mut req: Request, ctx: &Ctx) -> ApiResult {
    check_secret(ctx)?;
    let body = body_json(&mut req).await?;
    object(&body)?;
    let email = normalize_email(field(&body, "email")?).map_err(|e| ApiError::BadRequest(e.into()))?;
    let password_text = field(&body, "password")?;
    check_password_strength(password_text).map_err(ApiError::BadRequest)?;
    let username = optional_name("username", body.get("username")).map_err(ApiError::BadRequest)?;
    let name = optional_name("name", body.get("name")).map_err(ApiError::BadRequest)?;
    let db = env::db(&ctx.env)?;
    // A registration of a taken email is a failure (it is how addresses are probed).
    let reservation = rate_limit::reserve(&db, &ctx.config.auth_limits, &email, &client_address(&req), now_ms()).await?;
    #[derive(Deserialize)]
    struct Exists {
        #[allow(dead_code)]
        id: String,
    }
    let taken = || ApiError::Conflict("a user with this email already exists".into());
    if db.prepare("SELECT id FROM users WHERE email = ?1").bind(&[s(&email)])?.first::<Exists>(None).await?.is_some() {
        return Err(taken());
    }
    let id = new_id();
    let hash = password::hash(password_text, random::<16>(), ctx.config.password_iterations);
    let inserted = db
        .prepare(
            "INSERT INTO users (id, email, username, name, password_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&[s(&id), s(&email), opt(username.as_deref()), opt(name.as_deref()), s(&hash), s(&rfc3339(now_ms()))])?
        .run()
        .await;
    if inserted.is_err() {
        // Lost a race with a concurrent registration of the same email.
        return Err(taken());
    }
    rate_limit::refund(&db, reservation).await?;
    let pair = issue_pair(ctx, &db, &id, &email).await?;
    let user = user_view(id.clone(), email.clone(), name, username.clone());
    let name = user.name.clone();
    Ok(json_status(
        &RegisteredUser { id, email, username, name, access: pair.access, refresh: pair.refresh, user },
        201,
    ))
}

/// `POST /api/auth/login/` `{email, password}` → `{access, refresh, user}`.
pub async fn login(mut req: Request, ctx: &Ctx) -> ApiResult {
    check_secret(ctx)?;
    let body = body_json(&mut req).await?;
    object(&body)?;
    let email = field(&body, "email")?.trim().to_ascii_lowercase();
    let password_text = field(&body, "password")?;
    let db = env::db(&ctx.env)?;
    let reservation = rate_limit::reserve(&db, &ctx.config.auth_limits, &email, &client_address(&req), now_ms()).await?;
    #[derive(Deserialize)]
    struct UserRow {
        id: String,
        email: String,
        password_hash: String,
        name: Option<String>,
        username: Option<String>,
    }
    let user = db
        .prepare("SELECT id, email, password_hash, name, username FROM users WHERE email = ?1")
        .bind(&[s(&email)])?
        .first::<UserRow>(None)
        .await?;
    // The same work whether or not the user exists: a real hash or the dummy at today's cost.
    let dummy;
    let stored = match &user {
        Some(u) => u.password_hash.as_str(),
        None => {
            dummy = password::dummy_hash(ctx.config.password_iterations);
            dummy.as_str()
        }
    };
    let verified = password_text.len() <= MAX_PASSWORD_LEN && password::verify(password_text, stored);
    let Some(user) = user.filter(|_| verified) else {
        return Err(ApiError::Unauthorized(BAD_LOGIN.into()));
    };
    rate_limit::refund(&db, reservation).await?;
    if password::needs_rehash(&user.password_hash, ctx.config.password_iterations) {
        // Parameters changed since this hash was made: store one at today's. Guarded by the old
        // value, so a concurrent password change is never overwritten.
        let fresh = password::hash(password_text, random::<16>(), ctx.config.password_iterations);
        db.prepare("UPDATE users SET password_hash = ?1 WHERE id = ?2 AND password_hash = ?3")
            .bind(&[s(&fresh), s(&user.id), s(&user.password_hash)])?
            .run()
            .await?;
    }
    let pair = issue_pair(ctx, &db, &user.id, &user.email).await?;
    let user = user_view(user.id, user.email, user.name, user.username);
    Ok(json_status(&LoginResponse { access: pair.access, refresh: pair.refresh, user }, 200))
}

/// `POST /api/auth/refresh/` and `/api/auth/token/refresh/` `{refresh}` → `{access, refresh}`.
/// The token sent is spent; its successor joins its family.
pub async fn refresh(mut req: Request, ctx: &Ctx) -> ApiResult {
    check_secret(ctx)?;
    let body = body_json(&mut req).await?;
    object(&body)?;
    let token = field(&body, "refresh")?;
    let old = tokens::digest(token);
    let db = env::db(&ctx.env)?;
    let now = now_ms();
    let next = tokens::generate("krt", random::<32>());
    let next_hash = tokens::digest(&next);
    // One transaction: mark the old token spent (only if it is live and unspent), insert its
    // successor only if this very statement spent it (`replaced_by` names the successor, so two
    // racing refreshes of one token never both succeed), then purge expired tokens.
    let spend = db
        .prepare(
            "UPDATE refresh_tokens SET replaced_by = ?2
             WHERE token_hash = ?1 AND replaced_by IS NULL AND expires_at_ms > ?3
             RETURNING user_id, (SELECT email FROM users WHERE users.id = refresh_tokens.user_id) AS email",
        )
        .bind(&[s(&old), s(&next_hash), n(now)])?;
    let successor = db
        .prepare(
            "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at_ms, created_at)
             SELECT ?2, user_id, family_id, ?3, ?4 FROM refresh_tokens WHERE token_hash = ?1 AND replaced_by = ?2",
        )
        .bind(&[s(&old), s(&next_hash), n(now + ctx.config.refresh_ttl_secs * 1000), s(&rfc3339(now))])?;
    let results = db.batch(vec![spend, successor, purge_expired_tokens(&db, now)?]).await?;
    #[derive(Deserialize)]
    struct Spent {
        user_id: String,
        email: Option<String>,
    }
    let spent = results.first().map(|r| r.results::<Spent>()).transpose()?.and_then(|rows| rows.into_iter().next());
    match spent {
        Some(Spent { user_id, email: Some(email) }) => {
            Ok(json_status(&TokenPair { access: access_token(ctx, &user_id, &email, now), refresh: next }, 200))
        }
        Some(Spent { email: None, .. }) => Err(ApiError::Unauthorized("this user no longer exists".into())),
        None => Err(refused_refresh(&db, &old).await?),
    }
}

/// Why a refresh token was not spent: unknown, expired, or already spent — reuse, which revokes
/// its whole family (a stolen token and the legitimate client's successor alike).
async fn refused_refresh(db: &D1Database, hash: &str) -> ApiResult<ApiError> {
    #[derive(Deserialize)]
    struct Row {
        replaced_by: Option<String>,
    }
    let row = db
        .prepare("SELECT replaced_by FROM refresh_tokens WHERE token_hash = ?1")
        .bind(&[s(hash)])?
        .first::<Row>(None)
        .await?;
    Ok(match row {
        None => ApiError::Unauthorized("invalid or revoked refresh token".into()),
        Some(Row { replaced_by: None }) => ApiError::Unauthorized("refresh token expired".into()),
        Some(Row { replaced_by: Some(_) }) => {
            revoke_family(db, hash).await?;
            worker::console_warn!("a spent refresh token was presented again: its family is revoked");
            ApiError::Unauthorized(
                "refresh token already used: every session of that login is revoked; log in again".into(),
            )
        }
    })
}

/// Deletes every token of the family `hash` belongs to; answers how many.
async fn revoke_family(db: &D1Database, hash: &str) -> ApiResult<usize> {
    #[derive(Deserialize)]
    struct Gone {
        #[allow(dead_code)]
        token_hash: String,
    }
    let gone = db
        .prepare(
            "DELETE FROM refresh_tokens
             WHERE family_id = (SELECT family_id FROM refresh_tokens WHERE token_hash = ?1)
             RETURNING token_hash",
        )
        .bind(&[s(hash)])?
        .all()
        .await?
        .results::<Gone>()?;
    Ok(gone.len())
}

/// `POST /api/auth/logout/` `{refresh}` → `{"detail": "Logged out."}`: revokes that token and
/// every other token of its login. An unknown token is a 401, as simplejwt answers.
pub async fn logout(mut req: Request, ctx: &Ctx) -> ApiResult {
    let body = body_json(&mut req).await?;
    object(&body)?;
    let token = field(&body, "refresh")?;
    let db = env::db(&ctx.env)?;
    if revoke_family(&db, &tokens::digest(token)).await? == 0 {
        return Err(ApiError::Unauthorized("invalid or revoked refresh token".into()));
    }
    json(&Detail { detail: "Logged out.".into() })
}

/// `GET /api/auth/me/` → `{id, email, name}`.
pub async fn me(ctx: &Ctx, who: &Principal) -> ApiResult {
    let Principal::User { id, .. } = who else {
        return json(&UserView { id: who.owner().into(), email: String::new(), name: who.display_name().into() });
    };
    #[derive(Deserialize)]
    struct Row {
        id: String,
        email: String,
        name: Option<String>,
        username: Option<String>,
    }
    let row = env::db(&ctx.env)?
        .prepare("SELECT id, email, name, username FROM users WHERE id = ?1")
        .bind(&[s(id)])?
        .first::<Row>(None)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("this user no longer exists".into()))?;
    json(&user_view(row.id, row.email, row.name, row.username))
}
