//! Kiln's wire contracts: every type that crosses a process boundary (REST bodies, WebSocket
//! messages, the runner protocol), the job status transition table and input validation.
//!
//! This crate builds for `wasm32-unknown-unknown` (the edge) and natively (the runner, tests); it
//! depends on neither the Workers runtime nor tokio. JSON Schemas generated from these types are
//! checked in under `schemas/json/` (see `json_schemas`).

pub mod app;
pub mod auth;
pub mod dashboard;
pub mod events;
pub mod grants;
pub mod jobs;
pub mod landing;
pub mod json_schemas;
pub mod runner;
pub mod status;
pub mod subscriptions;
pub mod validate;
pub mod webhooks;

/// The error envelope every REST error uses: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ErrorBody {
    pub error: String,
}
