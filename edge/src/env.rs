//! Typed access to the Worker's bindings, vars and secrets.

use worker::{Env, ObjectNamespace, Stub, D1Database};

use kiln_schemas::grants::ProtectedBranches;

use crate::cors::CorsOrigins;
use crate::queue_core::Limits;
use crate::rate_limit;

pub struct Config {
    pub jwt_secret: String,
    pub agent_api_secret: String,
    pub runner_registration_token: String,
    pub access_ttl_secs: i64,
    pub refresh_ttl_secs: i64,
    pub allow_ws_token_query: bool,
    pub limits: Limits,
    pub heartbeat_secs: u32,
    /// Branches no job may name (`PROTECTED_BRANCHES`, default `main,master,develop,release/*`).
    pub protected_branches: ProtectedBranches,
    /// Browser origins allowed to call every face (`CORS_ORIGINS`; empty: no CORS headers).
    pub cors: CorsOrigins,
    /// Failed logins and registrations allowed per email and per client address in a window.
    pub auth_limits: rate_limit::Limits,
    /// PBKDF2 iterations of new password hashes (`PASSWORD_ITERATIONS`).
    pub password_iterations: u32,
    /// `DELETE /api/jobs/purge/` is allowed (`ALLOW_JOB_PURGE=true`; development only).
    pub allow_job_purge: bool,
    /// Seconds between keepalive comments of an idle `/v1/jobs/<id>/stream` (`SSE_KEEPALIVE_SECS`,
    /// default 15).
    pub sse_keepalive_secs: u64,
    /// Dashboard sockets without credentials (the service principal's resources, read-only):
    /// `ALLOW_ANONYMOUS_DASHBOARD=true` (development only).
    pub allow_anonymous_dashboard: bool,
    /// Seconds of silence before a dashboard socket is sent `keepalive` (`DASHBOARD_KEEPALIVE_SECS`,
    /// default seed 002's `KEEPALIVE_SECS`).
    pub dashboard_keepalive_secs: u64,
    /// Seconds between `metrics_update`s (`DASHBOARD_METRICS_SECS`, default `METRICS_INTERVAL_SECS`).
    pub dashboard_metrics_secs: u64,
    /// REST requests one principal may make a minute (`RATE_LIMIT_PER_MINUTE`, default 600; 0: off).
    pub rate_limit_per_minute: u32,
}

fn var(env: &Env, name: &str) -> Option<String> {
    env.secret(name).ok().map(|s| s.to_string()).or_else(|| env.var(name).ok().map(|v| v.to_string()))
}

fn num<T: std::str::FromStr>(env: &Env, name: &str, default: T) -> T {
    var(env, name).and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

thread_local! {
    static CONFIG: std::cell::OnceCell<std::rc::Rc<Config>> = const { std::cell::OnceCell::new() };
}

impl Config {
    /// The isolate's configuration, read from `env` once: vars and secrets do not change during
    /// an isolate's life, and reading ~25 of them through JavaScript on every request was a
    /// measurable share of a short request's CPU.
    pub fn of_isolate(env: &Env) -> std::rc::Rc<Config> {
        CONFIG.with(|c| c.get_or_init(|| std::rc::Rc::new(Config::from_env(env))).clone())
    }

    pub fn from_env(env: &Env) -> Config {
        Config {
            jwt_secret: var(env, "JWT_SECRET").unwrap_or_default(),
            agent_api_secret: var(env, "AGENT_API_SECRET").unwrap_or_default(),
            runner_registration_token: var(env, "RUNNER_REGISTRATION_TOKEN").unwrap_or_default(),
            access_ttl_secs: num(env, "ACCESS_TOKEN_TTL_SECS", 900),
            refresh_ttl_secs: num(env, "REFRESH_TOKEN_TTL_SECS", 30 * 24 * 3600),
            allow_ws_token_query: var(env, "ALLOW_WS_TOKEN_QUERY").is_some_and(|v| v == "true"),
            allow_job_purge: var(env, "ALLOW_JOB_PURGE").is_some_and(|v| v.trim() == "true"),
            sse_keepalive_secs: num(env, "SSE_KEEPALIVE_SECS", 15),
            allow_anonymous_dashboard: var(env, "ALLOW_ANONYMOUS_DASHBOARD").is_some_and(|v| v.trim() == "true"),
            dashboard_keepalive_secs: num(env, "DASHBOARD_KEEPALIVE_SECS", kiln_schemas::dashboard::KEEPALIVE_SECS),
            dashboard_metrics_secs: num(env, "DASHBOARD_METRICS_SECS", kiln_schemas::dashboard::METRICS_INTERVAL_SECS),
            rate_limit_per_minute: num(env, "RATE_LIMIT_PER_MINUTE", rate_limit::DEFAULT_PER_MINUTE),
            limits: Limits {
                max_concurrent: num(env, "MAX_CONCURRENT_JOBS", 2),
                max_per_owner: num(env, "MAX_CONCURRENT_JOBS_PER_OWNER", 0),
                lease_ms: num::<i64>(env, "LEASE_SECS", 30) * 1000,
                max_attempts: num(env, "MAX_ATTEMPTS", 3),
            },
            heartbeat_secs: num(env, "HEARTBEAT_SECS", 5),
            protected_branches: var(env, "PROTECTED_BRANCHES")
                .map(|v| ProtectedBranches::parse(&v))
                .unwrap_or_default(),
            password_iterations: crate::auth::password::iterations(
                var(env, "PASSWORD_ITERATIONS").and_then(|v| v.trim().parse().ok()),
            ),
            cors: CorsOrigins::parse(&var(env, "CORS_ORIGINS").unwrap_or_default()),
            auth_limits: {
                let d = rate_limit::Limits::default();
                rate_limit::Limits {
                    per_email: num(env, "AUTH_FAILURES_PER_EMAIL", d.per_email),
                    per_address: num(env, "AUTH_FAILURES_PER_ADDRESS", d.per_address),
                    window_ms: num::<i64>(env, "AUTH_FAILURE_WINDOW_SECS", d.window_ms / 1000).max(1) * 1000,
                }
            },
        }
    }
}

pub fn db(env: &Env) -> worker::Result<D1Database> {
    env.d1("DB")
}

fn namespace(env: &Env, binding: &str) -> worker::Result<ObjectNamespace> {
    env.durable_object(binding)
}

/// The JobRoom object of a job.
pub fn job_room(env: &Env, job_id: &str) -> worker::Result<Stub> {
    namespace(env, "JOB_ROOM")?.id_from_name(job_id)?.get_stub()
}

/// The Dashboard object of an owner (seed 002's channels; `service` serves anonymous sockets).
pub fn dashboard(env: &Env, owner: &str) -> worker::Result<Stub> {
    namespace(env, "DASHBOARD")?.id_from_name(owner)?.get_stub()
}

/// The R2 bucket of artifacts (binding `ARTIFACTS`): app builds' workspace snapshots, landing
/// sessions' workspace bundles and previews.
pub fn artifacts(env: &Env) -> worker::Result<worker::Bucket> {
    env.bucket("ARTIFACTS")
}

/// The Queue object of a queue.
pub fn queue(env: &Env, name: &str) -> worker::Result<Stub> {
    namespace(env, "QUEUE")?.id_from_name(name)?.get_stub()
}

pub fn now_ms() -> i64 {
    worker::Date::now().as_millis() as i64
}

/// 16 or 32 random bytes from the runtime's CSPRNG.
pub fn random<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::getrandom(&mut buf).expect("the Workers runtime has crypto.getRandomValues");
    buf
}

pub fn new_id() -> String {
    uuid::Builder::from_random_bytes(random::<16>()).into_uuid().to_string()
}
