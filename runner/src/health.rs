//! The runner's local HTTP API:
//!
//! - `GET /health`: queue counts, Docker, agent profile, git, the edge session, the executor
//!   (seed 003's health shape, with the runner's own parts added), and disk use (`disk`: the
//!   worktrees and the mirrors, their count and apparent bytes), and the LLM settings (`llm`:
//!   whether a provider is configured, provider names, each role's model).
//! - `GET /metrics`: the same and more as Prometheus text (`metrics.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::config::AgentProfile;
use crate::config::ExecutorKind;
use crate::docker::DockerClient;
use crate::edge::connection::EdgeStatus;
use crate::jobs::Supervisor;
use crate::metrics::{self, Metrics, Snapshot};

pub struct HealthState {
    pub name: String,
    pub supervisor: Supervisor,
    pub docker: Option<DockerClient>,
    pub git_version: Option<String>,
    pub agent: AgentProfile,
    pub edge_url: String,
    pub edge: Arc<EdgeStatus>,
    pub executor: ExecutorKind,
    /// How far job commands are kept from the runner (`JobUser::isolation`).
    pub isolation: String,
    pub metrics: Arc<Metrics>,
    pub repos_dir: PathBuf,
    pub worktrees_dir: PathBuf,
    /// What `/health` says of the LLM settings ([`llm_summary`]).
    pub llm: Value,
}

/// The LLM settings as `/health` shows them: whether a provider is configured, the providers'
/// names and each role's `provider/model` (never a key or a URL).
pub fn llm_summary(config: &crate::llm::LlmConfig) -> Value {
    let roles: serde_json::Map<String, Value> = config
        .roles
        .iter()
        .map(|(role, m)| (role.clone(), Value::String(m.to_string())))
        .collect();
    json!({
        "configured": !config.providers.is_empty(),
        "providers": config.providers.keys().collect::<Vec<_>>(),
        "roles": roles,
    })
}

pub fn router(state: Arc<HealthState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .with_state(state)
}

/// `GET /metrics`. Disk use is measured on each scrape (a walk of the worktrees and mirrors, off
/// the async threads).
async fn prometheus(State(s): State<Arc<HealthState>>) -> impl IntoResponse {
    let (running, waiting) = s.supervisor.counts();
    let (worktrees, mirrors) = disk_use(&s).await;
    let snapshot = Snapshot {
        name: s.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        executor: s.executor.as_str().to_string(),
        capacity: s.supervisor.capacity(),
        jobs_running: running,
        jobs_waiting: waiting,
        edge_connected: s.edge.is_connected(),
        worktrees,
        mirrors,
        ..Snapshot::counters(&s.metrics)
    };
    (
        [(CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(&snapshot),
    )
}

/// Disk use of the worktrees and the mirrors (a walk, off the async threads).
async fn disk_use(s: &HealthState) -> (metrics::DiskUse, metrics::DiskUse) {
    let (repos, worktrees) = (s.repos_dir.clone(), s.worktrees_dir.clone());
    tokio::task::spawn_blocking(move || {
        (
            metrics::worktrees_use(&worktrees),
            metrics::mirrors_use(&repos),
        )
    })
    .await
    .unwrap_or_default()
}

/// `GET /health`
async fn health(State(s): State<Arc<HealthState>>) -> Json<Value> {
    let (running, queued) = s.supervisor.counts();
    let (worktrees, mirrors) = disk_use(&s).await;
    let docker_version = match &s.docker {
        Some(d) => d.version().await,
        None => None,
    };
    Json(json!({
        "status": "ok",
        "name": s.name,
        "queue": {"running": running, "queued": queued, "maxConcurrent": s.supervisor.capacity()},
        "docker": {"available": docker_version.is_some(), "version": docker_version},
        "agent": {"profile": s.agent.format.profile_name(), "command": s.agent.command, "format": s.agent.format.as_str(), "demoModel": s.agent.demo_model},
        "git": {"available": s.git_version.is_some(), "version": s.git_version},
        "edge": {"connected": s.edge.is_connected(), "url": s.edge_url},
        "executor": s.executor.as_str(),
        "isolation": s.isolation,
        "llm": s.llm,
        "disk": {
            "worktrees": {"count": worktrees.count, "bytes": worktrees.bytes, "path": s.worktrees_dir},
            "mirrors": {"count": mirrors.count, "bytes": mirrors.bytes, "path": s.repos_dir},
        },
    }))
}
