//! Kiln's self-hosted runner: it connects out to the edge, takes jobs (code, task, ralph), runs
//! their agents in a hardened container per job (or, when the operator sets
//! `RUNNER_EXECUTOR=process`, a process group as another user) over a git worktree, streams what
//! happens back as indexed event batches, and opens the pull requests.
//!
//! Start at [`app::Application`]; `ARCHITECTURE.md` at the repository root has the map.

pub mod agent;
pub mod app;
pub mod backoff;
pub mod config;
pub mod docker;
pub mod edge;
pub mod executor;
pub mod files;
pub mod gather;
pub mod github;
pub mod health;
pub mod isolation;
pub mod jobs;
pub mod llm;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod reporter;
pub mod state;
pub mod three_d;
pub mod tools;
pub mod workspace;

pub use app::Application;
pub use config::Config;
