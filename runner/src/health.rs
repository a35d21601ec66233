//! The runner's local HTTP API. One route:
//!
//! - `GET /health`: queue counts, Docker, agent profile, git, the edge session, the executor
//!   (seed 003's health shape, with the runner's own parts added).

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::config::AgentProfile;
use crate::config::ExecutorKind;
use crate::docker::DockerClient;
use crate::edge::connection::EdgeStatus;
use crate::jobs::Supervisor;

pub struct HealthState {
    pub name: String,
    pub supervisor: Supervisor,
    pub docker: Option<DockerClient>,
    pub git_version: Option<String>,
    pub agent: AgentProfile,
    pub edge_url: String,
    pub edge: Arc<EdgeStatus>,
    pub executor: ExecutorKind,
}

pub fn router(state: Arc<HealthState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .with_state(state)
}

/// `GET /health`
async fn health(State(s): State<Arc<HealthState>>) -> Json<Value> {
    let (running, queued) = s.supervisor.counts();
    let docker_version = match &s.docker {
        Some(d) => d.version().await,
        None => None,
    };
    Json(json!({
        "status": "ok",
        "name": s.name,
        "queue": {"running": running, "queued": queued, "maxConcurrent": s.supervisor.capacity()},
        "docker": {"available": docker_version.is_some(), "version": docker_version},
        "agent": {"command": s.agent.command, "format": s.agent.format.as_str()},
        "git": {"available": s.git_version.is_some(), "version": s.git_version},
        "edge": {"connected": s.edge.is_connected(), "url": s.edge_url},
        "executor": s.executor.as_str(),
    }))
}
