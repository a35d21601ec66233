//! The Worker's routes: one flat table, each face in its own module. Authentication happens here,
//! once, before any handler runs; so do, for every face, CORS (`CORS_ORIGINS`, preflights
//! included) and the error envelope (`{"error"}`, plus `detail` under `/api/` (DRF) and `/v1/`
//! (FastAPI)).

mod app_builder;
mod auth;
mod clients;
mod dashboard;
mod grants;
mod jobs;
mod landing;
mod runner;
pub(crate) mod subscriptions;
mod webhooks;
mod ws;

use worker::{Env, Method, Request, Response};

use crate::auth::{bearer, jwt, tokens, Principal};
use crate::cors::{self, CorsOrigins};
use crate::env::{now_ms, Config};
use crate::http::{ApiError, ApiResult};
use crate::time::from_ms;

/// Everything a handler needs.
pub struct Ctx {
    pub env: Env,
    pub config: std::rc::Rc<Config>,
}

pub async fn handle(req: Request, env: Env, wctx: Option<&worker::Context>) -> worker::Result<Response> {
    let started_ms = now_ms();
    let ctx = Ctx { config: Config::of_isolate(&env), env };
    warn_once_about(&ctx.config.cors);
    let origin = req.headers().get("origin").ok().flatten();
    if req.method() == Method::Options {
        // A CORS preflight (or a plain OPTIONS): no route runs, no credential is needed.
        let mut resp = Response::empty()?.with_status(204);
        resp.headers_mut().set("Allow", cors::ALLOW_METHODS)?;
        apply_cors(&mut resp, &ctx.config.cors, origin.as_deref(), true);
        return Ok(resp);
    }
    let path = req.path();
    let method = req.method();
    // The `/api/` face is seed 000's Django REST framework API and `/v1/` seed 001's FastAPI one:
    // their errors also carry `detail`.
    let with_detail = ["/api", "/v1"].iter().any(|p| path == *p || path.starts_with(&format!("{p}/")));
    let mut resp = route(req, &ctx).await.unwrap_or_else(|e| e.respond(with_detail));
    // A submission took a room opened ahead (or found none): the next is opened after the answer.
    if let (Some(w), Method::Post) = (wctx, &method) {
        if crate::room_pool::wanted() {
            w.wait_until(crate::room_pool::refill(ctx.env.clone()));
        }
    }
    // A socket's upgrade answer is not read by CORS (and its headers are the runtime's).
    if resp.status_code() != 101 {
        apply_cors(&mut resp, &ctx.config.cors, origin.as_deref(), false);
        // Monitoring: recorded in the isolate; a due flush runs after the answer (waitUntil).
        if let Some(batch) = crate::monitoring::record(&method, &path, resp.status_code(), started_ms) {
            match wctx {
                Some(w) => w.wait_until(crate::monitoring::flush(ctx.env.clone(), batch)),
                None => crate::monitoring::flush(ctx.env.clone(), batch).await,
            }
        }
    }
    Ok(resp)
}

fn apply_cors(resp: &mut Response, origins: &CorsOrigins, origin: Option<&str>, preflight: bool) {
    for (name, value) in origins.headers(origin, preflight) {
        if let Err(e) = resp.headers_mut().set(name, &value) {
            worker::console_error!("setting {name} on an answer: {e}");
        }
    }
}

/// Entries of `CORS_ORIGINS` that are not origins are logged once per isolate.
fn warn_once_about(origins: &CorsOrigins) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !origins.invalid.is_empty() && !WARNED.swap(true, Ordering::Relaxed) {
        worker::console_warn!("CORS_ORIGINS: ignoring entries that are not origins: {:?}", origins.invalid);
    }
}

async fn route(req: Request, ctx: &Ctx) -> ApiResult {
    let path = req.path();
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method();
    match (method.clone(), segments.as_slice()) {
        // Unauthenticated.
        // `GET /health`: queue counts (seed 003).
        (Method::Get, ["health"]) => jobs::health(ctx).await,
        // `POST /api/auth/register/`
        (Method::Post, ["api", "auth", "register"]) => auth::register(req, ctx).await,
        // `POST /api/auth/login/`
        (Method::Post, ["api", "auth", "login"]) => auth::login(req, ctx).await,
        // `POST /api/auth/refresh/` · `POST /api/auth/token/refresh/` (simplejwt's path)
        (Method::Post, ["api", "auth", "refresh"] | ["api", "auth", "token", "refresh"]) => auth::refresh(req, ctx).await,
        // `POST /api/auth/logout/` (the refresh token is the credential)
        (Method::Post, ["api", "auth", "logout"]) => auth::logout(req, ctx).await,
        // Inbound webhooks: the signature is the credential.
        // `POST /webhooks/github/<id>` · `POST /webhooks/generic/<id>`
        (Method::Post, ["webhooks", "github", id]) => webhooks::github(req, ctx, id).await,
        (Method::Post, ["webhooks", "generic", id]) => webhooks::generic(req, ctx, id).await,
        // Runner protocol: its own credentials.
        (_, ["runner", "v1", rest @ ..]) => runner::route(req, ctx, method, rest).await,
        // The live channel: header or (dev) query token.
        // `GET /ws/jobs/<id>/` (WebSocket)
        (Method::Get, ["ws", "jobs", job_id]) => {
            let (who, expires_at_ms) = authenticate_socket(&req, ctx).await?;
            ws::connect(req, ctx, &who, expires_at_ms, job_id).await
        }
        // Seed 002's dashboard channels (WebSocket): credentials as the job channel's; none, while
        // `ALLOW_ANONYMOUS_DASHBOARD=true`: the service principal's dashboard, read-only.
        // `GET /api/ws/{agents,round_table,tasks,3d_pipeline,metrics}`
        (Method::Get, ["api", "ws", channel]) => dashboard_socket(req, ctx, channel).await,
        // The faults build only (tests): a channel message published as a job room publishes it.
        #[cfg(feature = "faults")]
        (Method::Post, ["__faults", "dashboard", "publish"]) => dashboard_publish(req, ctx).await,
        // `GET /v1/jobs/<id>/stream` (Server-Sent Events): credentials as for sockets (an
        // EventSource sends no header), and it ends when they expire.
        (Method::Get, ["v1", "jobs", job_id, "stream"]) => {
            let (who, expires_at_ms) = authenticate_socket(&req, ctx).await?;
            landing::jobs::stream(req, ctx, &who, expires_at_ms, job_id).await
        }
        // Landing pages' previews: public, the page id is unguessable.
        // `GET|HEAD /preview/<landing_page_id>/<path…>`
        (Method::Get | Method::Head, ["preview", ..]) => crate::preview::serve(&req, ctx).await,
        _ => {
            let who = authenticate(&req, ctx).await?;
            limited(req, ctx, &who, method, &segments).await
        }
    }
}

/// Per-principal rate limits on REST (`RATE_LIMIT_PER_MINUTE`; the service credential is not
/// limited). A read runs beside its count (it changes nothing, so a refused one is only not
/// answered); anything else waits for the count first.
async fn limited(req: Request, ctx: &Ctx, who: &Principal, method: Method, segments: &[&str]) -> ApiResult {
    let limit = ctx.config.rate_limit_per_minute;
    if limit == 0 || matches!(who, Principal::Service) {
        return route_authenticated(req, ctx, who, method, segments).await;
    }
    let count = crate::rate_limit::check(&ctx.env, who.owner(), limit);
    if matches!(method, Method::Get | Method::Head) {
        let (counted, answer) = futures::join!(count, route_authenticated(req, ctx, who, method, segments));
        counted?;
        return answer;
    }
    count.await?;
    route_authenticated(req, ctx, who, method, segments).await
}

async fn route_authenticated(req: Request, ctx: &Ctx, who: &Principal, method: Method, segments: &[&str]) -> ApiResult {
    match (method, segments) {
        // `GET /api/auth/me/`
        (Method::Get, ["api", "auth", "me"]) => auth::me(ctx, who).await,
        // Seed 000's app builder (`app_builder`): trailing slashes as the frontend sends them.
        // `GET /api/jobs/` · `POST /api/jobs/` · `DELETE /api/jobs/purge/`
        (Method::Get, ["api", "jobs"]) => app_builder::jobs::list(ctx, who).await,
        (Method::Post, ["api", "jobs"]) => app_builder::jobs::create(req, ctx, who).await,
        (Method::Delete, ["api", "jobs", "purge"]) => app_builder::jobs::purge(ctx, who).await,
        // `GET|PATCH|DELETE /api/jobs/<id>/`
        (Method::Get, ["api", "jobs", id]) => app_builder::jobs::get(ctx, who, id).await,
        (Method::Patch, ["api", "jobs", id]) => app_builder::jobs::patch(req, ctx, who, id).await,
        (Method::Delete, ["api", "jobs", id]) => app_builder::jobs::delete(ctx, who, id).await,
        // `POST /api/jobs/<id>/pause/` · `resume/` · `continue/`
        (Method::Post, ["api", "jobs", id, "pause"]) => app_builder::jobs::pause(ctx, who, id, true).await,
        (Method::Post, ["api", "jobs", id, "resume"]) => app_builder::jobs::pause(ctx, who, id, false).await,
        (Method::Post, ["api", "jobs", id, "continue"]) => app_builder::jobs::continue_job(req, ctx, who, id).await,
        // `GET /api/jobs/<id>/files/structure/?path=&limit=` · `files/content/?path=`
        (Method::Get, ["api", "jobs", id, "files", "structure"]) => app_builder::files::structure(req, ctx, who, id).await,
        (Method::Get, ["api", "jobs", id, "files", "content"]) => app_builder::files::content(req, ctx, who, id).await,
        // `GET /api/job-messages/?job_id=` · `POST /api/job-messages/`
        (Method::Get, ["api", "job-messages"]) => app_builder::messages::list(req, ctx, who).await,
        (Method::Post, ["api", "job-messages"]) => app_builder::messages::create(req, ctx, who).await,
        // `GET|DELETE /api/job-messages/<id>/`
        (Method::Get, ["api", "job-messages", id]) => app_builder::messages::get(ctx, who, id).await,
        (Method::Delete, ["api", "job-messages", id]) => app_builder::messages::delete(ctx, who, id).await,
        // `GET /api/apps/` · `GET /api/apps/<id>/` · `GET /api/apps/by-job/<job_id>/`
        (Method::Get, ["api", "apps"]) => app_builder::artifacts::list_apps(ctx, who).await,
        (Method::Get, ["api", "apps", "by-job", job_id]) => app_builder::artifacts::app_of_job(ctx, who, job_id).await,
        (Method::Get, ["api", "apps", id]) => app_builder::artifacts::get_app(ctx, who, id).await,
        // `GET /api/tickets/?job_id=` · `GET /api/tickets/<id>/`
        (Method::Get, ["api", "tickets"]) => app_builder::artifacts::list_tickets(req, ctx, who).await,
        (Method::Get, ["api", "tickets", id]) => app_builder::artifacts::get_ticket(ctx, who, id).await,
        // Seed 002's agent dashboard (`dashboard`).
        // `GET /api/v1/agents` · `GET /api/v1/agents/<type>`
        (Method::Get, ["api", "v1", "agents"]) => dashboard::agents::list(ctx, who).await,
        (Method::Get, ["api", "v1", "agents", kind]) => dashboard::agents::get(ctx, who, kind).await,
        // `POST /api/v1/agents/<type>/execute` · `start` · `stop` · `learn`
        (Method::Post, ["api", "v1", "agents", kind, "execute"]) => dashboard::agents::execute(req, ctx, who, kind).await,
        (Method::Post, ["api", "v1", "agents", kind, "start"]) => dashboard::agents::set_stopped(ctx, who, kind, false).await,
        (Method::Post, ["api", "v1", "agents", kind, "stop"]) => dashboard::agents::set_stopped(ctx, who, kind, true).await,
        (Method::Post, ["api", "v1", "agents", kind, "learn"]) => dashboard::agents::learn(ctx, who, kind).await,
        // `GET|POST /api/v1/tasks` · `GET /api/v1/tasks/<id>` · `POST /api/v1/tasks/<id>/cancel`
        (Method::Get, ["api", "v1", "tasks"]) => dashboard::tasks::list(req, ctx, who).await,
        (Method::Post, ["api", "v1", "tasks"]) => dashboard::tasks::submit(req, ctx, who).await,
        (Method::Get, ["api", "v1", "tasks", id]) => dashboard::tasks::get(ctx, who, id).await,
        (Method::Post, ["api", "v1", "tasks", id, "cancel"]) => dashboard::tasks::cancel(ctx, who, id).await,
        // `GET /api/v1/round-table` · `POST .../compete` · `GET .../stats` · `.../providers` · `.../<id>`
        (Method::Get, ["api", "v1", "round-table"]) => dashboard::round_table::list(req, ctx, who).await,
        (Method::Post, ["api", "v1", "round-table", "compete"]) => dashboard::round_table::compete(req, ctx, who).await,
        (Method::Get, ["api", "v1", "round-table", "stats"]) => dashboard::round_table::stats(ctx, who).await,
        (Method::Get, ["api", "v1", "round-table", "providers"]) => dashboard::round_table::providers(ctx).await,
        (Method::Get, ["api", "v1", "round-table", id]) => dashboard::round_table::get(ctx, who, id).await,
        // `GET|POST /api/v1/3d` · `GET /api/v1/3d/<id>` · `POST .../<id>/cancel` · `GET .../<id>/asset`
        (Method::Get, ["api", "v1", "3d"]) => dashboard::three_d::list(req, ctx, who).await,
        (Method::Post, ["api", "v1", "3d"]) => dashboard::three_d::create(req, ctx, who).await,
        (Method::Get, ["api", "v1", "3d", id]) => dashboard::three_d::get(ctx, who, id).await,
        (Method::Post, ["api", "v1", "3d", id, "cancel"]) => dashboard::three_d::cancel(ctx, who, id).await,
        (Method::Get, ["api", "v1", "3d", id, "asset"]) => dashboard::three_d::asset(ctx, who, id).await,
        // `GET /api/v1/monitoring/metrics?metrics=&time_range=` (seed 002's monitoring)
        (Method::Get, ["api", "v1", "monitoring", "metrics"]) => crate::monitoring::metrics(req, ctx, who).await,
        // Seed 001's landing pages (`landing`).
        // `POST /v1/agent/init` · `POST /v1/agent/chat`
        (Method::Post, ["v1", "agent", "init"]) => landing::agent::init(req, ctx, who).await,
        (Method::Post, ["v1", "agent", "chat"]) => landing::agent::chat(req, ctx, who).await,
        // `GET /v1/jobs` · `GET /v1/jobs/<id>` · `POST /v1/jobs/<id>/cancel`
        (Method::Get, ["v1", "jobs"]) => landing::jobs::list(req, ctx, who).await,
        (Method::Get, ["v1", "jobs", id]) => landing::jobs::get(req, ctx, who, id).await,
        (Method::Post, ["v1", "jobs", id, "cancel"]) => landing::jobs::cancel(ctx, who, id).await,
        // `GET /v1/landing-pages` · `GET /v1/landing-pages/by-session/<session_id>`
        (Method::Get, ["v1", "landing-pages"]) => landing::pages::list(req, ctx, who).await,
        (Method::Get, ["v1", "landing-pages", "by-session", session_id]) => landing::pages::by_session(ctx, who, session_id).await,
        // `GET|PATCH|DELETE /v1/landing-pages/<id>`
        (Method::Get, ["v1", "landing-pages", id]) => landing::pages::get(ctx, who, id).await,
        (Method::Patch, ["v1", "landing-pages", id]) => landing::pages::patch(req, ctx, who, id).await,
        (Method::Delete, ["v1", "landing-pages", id]) => landing::pages::delete(ctx, who, id).await,
        // `GET /jobs` · `POST /jobs`
        (Method::Get, ["jobs"]) => jobs::list(req, ctx, who).await,
        (Method::Post, ["jobs"]) => jobs::create(req, ctx, who).await,
        // `GET /jobs/:id`
        (Method::Get, ["jobs", id]) => jobs::get(req, ctx, who, id).await,
        // `POST /jobs/:id/cancel` · `retry` · `message` · `complete` · `stop`
        (Method::Post, ["jobs", id, "cancel"]) => jobs::cancel(ctx, who, id).await,
        (Method::Post, ["jobs", id, "retry"]) => jobs::retry(ctx, who, id).await,
        (Method::Post, ["jobs", id, "message"]) => jobs::message(req, ctx, who, id).await,
        (Method::Post, ["jobs", id, "complete"]) => jobs::complete(ctx, who, id).await,
        (Method::Post, ["jobs", id, "stop"]) => jobs::stop(ctx, who, id).await,
        // `GET /jobs/:id/iterations`
        (Method::Get, ["jobs", id, "iterations"]) => jobs::iterations(ctx, who, id).await,
        // `GET /queue`
        (Method::Get, ["queue"]) => jobs::queue(ctx, who).await,
        // `GET /clients` · `POST /clients` (Kiln's way to create one)
        (Method::Get, ["clients"]) => clients::list(ctx, who).await,
        (Method::Post, ["clients"]) => clients::create(req, ctx, who).await,
        // `GET /clients/:id` · `POST /clients/:id/repository`
        (Method::Get, ["clients", id]) => clients::get(ctx, who, id).await,
        (Method::Post, ["clients", id, "repository"]) => clients::add_repository(req, ctx, who, id).await,
        // `POST /sync` · `POST /repos/clone` · `POST /repos/:id/clone`
        (Method::Post, ["sync"]) => clients::sync(ctx, who).await,
        (Method::Post, ["repos", "clone"]) => clients::clone_all(ctx, who).await,
        (Method::Post, ["repos", id, "clone"]) => clients::clone_one(ctx, who, id).await,
        // `GET /grants` · `POST /grants` · `DELETE /grants/:id` (repositories users may name)
        (Method::Get, ["grants"]) => grants::list(req, ctx, who).await,
        (Method::Post, ["grants"]) => grants::create(req, ctx, who).await,
        (Method::Delete, ["grants", id]) => grants::delete(ctx, who, id).await,
        // Inbound webhooks: `GET|POST /webhooks` · `GET|DELETE /webhooks/:id` · `POST /webhooks/:id/rotate-secret`
        (Method::Get, ["webhooks"]) => webhooks::list(ctx, who).await,
        (Method::Post, ["webhooks"]) => webhooks::create(req, ctx, who).await,
        (Method::Get, ["webhooks", id]) => webhooks::get(ctx, who, id).await,
        (Method::Delete, ["webhooks", id]) => webhooks::delete(ctx, who, id).await,
        (Method::Post, ["webhooks", id, "rotate-secret"]) => webhooks::rotate(ctx, who, id).await,
        // Outbound webhooks: `GET|POST /webhook-subscriptions` · `GET|PATCH|DELETE /webhook-subscriptions/:id`
        (Method::Get, ["webhook-subscriptions"]) => subscriptions::list(ctx, who).await,
        (Method::Post, ["webhook-subscriptions"]) => subscriptions::create(req, ctx, who).await,
        (Method::Get, ["webhook-subscriptions", id]) => subscriptions::get(ctx, who, id).await,
        (Method::Patch, ["webhook-subscriptions", id]) => subscriptions::update(req, ctx, who, id).await,
        (Method::Delete, ["webhook-subscriptions", id]) => subscriptions::delete(ctx, who, id).await,
        // `GET /webhook-subscriptions/:id/deliveries` · `POST .../deliveries/:delivery_id/redeliver`
        (Method::Get, ["webhook-subscriptions", id, "deliveries"]) => subscriptions::deliveries(req, ctx, who, id).await,
        (Method::Post, ["webhook-subscriptions", id, "deliveries", delivery, "redeliver"]) => {
            subscriptions::redeliver(ctx, who, id, delivery).await
        }
        _ => Err(ApiError::NotFound("no such endpoint".into())),
    }
}

/// `GET /api/ws/<channel>`: a WebSocket upgrade; credentials as the job channel's, or none when
/// anonymous dashboards are allowed.
async fn dashboard_socket(req: Request, ctx: &Ctx, channel: &str) -> ApiResult {
    let upgrade = req.headers().get("upgrade")?.unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(ApiError::BadRequest("this endpoint expects a WebSocket upgrade".into()));
    }
    if crate::channels::channel(channel).is_none() {
        return crate::channels::connect(req, ctx, None, channel).await;
    }
    let has_token = req.url()?.query_pairs().any(|(k, _)| k == "token");
    if req.headers().get("authorization")?.is_some() || has_token {
        let (who, expires_at_ms) = authenticate_socket(&req, ctx).await?;
        return crate::channels::connect(req, ctx, Some((&who, expires_at_ms)), channel).await;
    }
    if !ctx.config.allow_anonymous_dashboard {
        return Err(ApiError::Unauthorized(
            "authentication required: send Authorization: Bearer <token> (anonymous dashboards are off)".into(),
        ));
    }
    crate::channels::connect(req, ctx, None, channel).await
}

/// `POST /__faults/dashboard/publish` `{owner, channel, message}` with the service credential:
/// compiled into the faults build only, so tests can publish before job rooms do.
#[cfg(feature = "faults")]
async fn dashboard_publish(mut req: Request, ctx: &Ctx) -> ApiResult {
    if !matches!(authenticate(&req, ctx).await?, Principal::Service) {
        return Err(ApiError::Forbidden("the service credential only".into()));
    }
    let body = crate::http::body_json(&mut req).await?;
    let (Some(owner), Some(channel)) = (body["owner"].as_str(), body["channel"].as_str()) else {
        return Err(ApiError::BadRequest("owner and channel are strings".into()));
    };
    let seq = crate::channels::publish(&ctx.env, owner, channel, &body["message"]).await?;
    crate::http::json(&serde_json::json!({ "seq": seq }))
}

/// Checks a bearer token: the service credential or a user's access JWT.
fn principal_from_token(token: &str, config: &Config) -> ApiResult<Principal> {
    if is_service_secret(token, config) {
        return Ok(Principal::Service);
    }
    if config.jwt_secret.is_empty() {
        return Err(ApiError::Internal("JWT_SECRET is not set".into()));
    }
    jwt::verify(config.jwt_secret.as_bytes(), token, from_ms(now_ms())).map_err(|e| ApiError::Unauthorized(e.to_string()))
}

fn is_service_secret(token: &str, config: &Config) -> bool {
    !config.agent_api_secret.is_empty() && tokens::constant_time_eq(token.as_bytes(), config.agent_api_secret.as_bytes())
}

async fn authenticate(req: &Request, ctx: &Ctx) -> ApiResult<Principal> {
    let header = req.headers().get("authorization")?;
    let Some(header) = header else {
        return Err(ApiError::Unauthorized("authentication required: send Authorization: Bearer <token>".into()));
    };
    let token = bearer(Some(&header)).ok_or_else(|| ApiError::Unauthorized("malformed Authorization header".into()))?;
    principal_from_token(token, &ctx.config)
}

/// A user's access JWT and when it expires (epoch ms).
fn user_from_jwt(token: &str, config: &Config) -> ApiResult<(Principal, i64)> {
    if config.jwt_secret.is_empty() {
        return Err(ApiError::Internal("JWT_SECRET is not set".into()));
    }
    jwt::verify_with_expiry(config.jwt_secret.as_bytes(), token, from_ms(now_ms()))
        .map(|(who, expires)| (who, expires.timestamp_millis()))
        .map_err(|e| ApiError::Unauthorized(e.to_string()))
}

/// Sockets: the header as for requests, or `?token=` while `ALLOW_WS_TOKEN_QUERY=true` — a user's
/// JWT only, never the service credential (URLs end up in logs). Answers when the credential
/// expires: the socket is closed then.
async fn authenticate_socket(req: &Request, ctx: &Ctx) -> ApiResult<(Principal, Option<i64>)> {
    if let Some(header) = req.headers().get("authorization")? {
        let token = bearer(Some(&header)).ok_or_else(|| ApiError::Unauthorized("malformed Authorization header".into()))?;
        if is_service_secret(token, &ctx.config) {
            return Ok((Principal::Service, None));
        }
        return user_from_jwt(token, &ctx.config).map(|(who, exp)| (who, Some(exp)));
    }
    let url = req.url()?;
    match url.query_pairs().find(|(k, _)| k == "token") {
        Some(_) if !ctx.config.allow_ws_token_query => {
            Err(ApiError::Unauthorized("?token= is disabled; send Authorization: Bearer <token>".into()))
        }
        Some((_, token)) => user_from_jwt(&token, &ctx.config).map(|(who, exp)| (who, Some(exp))),
        None => Err(ApiError::Unauthorized("authentication required".into())),
    }
}
