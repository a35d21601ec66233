//! Kiln's self-hosted runner: it connects out to the edge, takes jobs (code, task, ralph), runs
//! their agents in a container per job (or a process group on hosts without Docker) over a git
//! worktree, streams what happens back as indexed event batches, and opens the pull requests.
//!
//! Start at [`app::Application`]; `ARCHITECTURE.md` at the repository root has the map.

pub mod agent;
pub mod app;
pub mod backoff;
pub mod config;
pub mod docker;
pub mod edge;
pub mod executor;
pub mod github;
pub mod health;
pub mod jobs;
pub mod llm;
pub mod metrics;
pub mod output;
pub mod reporter;
pub mod state;
pub mod workspace;

pub use app::Application;
pub use config::Config;
