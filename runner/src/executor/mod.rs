//! Executors: where a job's commands run. One sandbox per job over its worktree (a container for
//! Docker, a set of process groups on the host for the process executor); each agent run or
//! feedback command is one [`Execution`] in it, with the same contract everywhere: `sh -c CMD` in
//! the workspace, env `JOB_ID` and `ITERATION`, stdin optional, stdout and stderr streamed back.

pub mod process;

use std::path::Path;
use std::pin::Pin;

use futures::future::BoxFuture;
use kiln_schemas::events::LogStream;
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, oneshot};

use crate::config::ExecutorKind;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("docker: {0}")]
    Docker(String),
    #[error("the command's sandbox is gone (job cancelled or container removed)")]
    SandboxGone,
}

/// One command to run in a job's sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// Run as `sh -c <command>`.
    pub command: String,
    pub env: Vec<(String, String)>,
    /// Attach stdin (else the command reads end-of-file).
    pub stdin: bool,
}

impl ExecSpec {
    pub fn new(command: impl Into<String>, job_id: &str, iteration: u32) -> Self {
        ExecSpec {
            command: command.into(),
            env: vec![
                ("JOB_ID".into(), job_id.into()),
                ("ITERATION".into(), iteration.to_string()),
            ],
            stdin: false,
        }
    }

    pub fn with_stdin(mut self) -> Self {
        self.stdin = true;
        self
    }
}

/// A piece of a command's output, as it arrives (not split into lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: LogStream,
    pub data: Vec<u8>,
}

pub type StdinWriter = Pin<Box<dyn AsyncWrite + Send>>;

/// A started command. Read `output` until it ends, then await `exit`.
pub struct Execution {
    pub stdin: Option<StdinWriter>,
    pub output: mpsc::Receiver<OutputChunk>,
    /// The exit code once output has ended (128 + signal for a killed process).
    pub exit: oneshot::Receiver<Result<i32, ExecError>>,
}

impl Execution {
    /// Waits for the exit code after `output` is drained.
    pub async fn exit_code(self) -> Result<i32, ExecError> {
        self.exit.await.unwrap_or(Err(ExecError::SandboxGone))
    }
}

/// Creates one sandbox per job.
pub trait Executor: Send + Sync {
    fn kind(&self) -> ExecutorKind;

    /// Creates the job's sandbox over its worktree.
    fn create_sandbox<'a>(
        &'a self,
        job_id: &'a str,
        worktree: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn Sandbox>, ExecError>>;
}

/// A job's place to run commands.
pub trait Sandbox: Send + Sync {
    /// Starts a command.
    fn exec(&self, spec: ExecSpec) -> BoxFuture<'_, Result<Execution, ExecError>>;

    /// Kills everything still running in the sandbox and removes it. Idempotent.
    fn destroy(&self) -> BoxFuture<'_, Result<(), ExecError>>;
}

/// Capacity of an execution's output channel: a slow consumer pauses the command's output pipes
/// rather than growing memory without bound.
pub(crate) const OUTPUT_CHANNEL: usize = 256;
