//! The process executor, for hosts without Docker: every command is `sh -c CMD` in the job's
//! worktree, in a process group of its own, so a cancel kills the whole tree (`killpg`).

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use kiln_schemas::events::LogStream;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};

use super::{ExecError, ExecSpec, Execution, Executor, OutputChunk, Sandbox, OUTPUT_CHANNEL};
use crate::config::{ExecutorKind, RUNNER_SECRETS};

/// Runs the command (`$1`) as the group leader, beside a watcher in the same process group that
/// kills the whole group once the runner is gone: a runner that dies without cleaning up (SIGKILL,
/// a crash) must not leave agents running. The watcher's output goes nowhere, so it never holds
/// the command's pipes open.
const WATCHED: &str = r#"(while kill -0 "$KILN_RUNNER_PID" 2>/dev/null; do sleep 1; done; kill -KILL 0) </dev/null >/dev/null 2>&1 &
exec sh -c "$1""#;

#[derive(Debug, Default, Clone)]
pub struct ProcessExecutor;

impl Executor for ProcessExecutor {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Process
    }

    fn create_sandbox<'a>(
        &'a self,
        _job_id: &'a str,
        worktree: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn Sandbox>, ExecError>> {
        let sandbox = ProcessSandbox {
            workdir: worktree.to_path_buf(),
            groups: Arc::new(Mutex::new(HashSet::new())),
            destroyed: AtomicBool::new(false),
        };
        async move { Ok(Box::new(sandbox) as Box<dyn Sandbox>) }.boxed()
    }
}

/// The process groups of one job's live commands.
pub struct ProcessSandbox {
    workdir: PathBuf,
    groups: Arc<Mutex<HashSet<i32>>>,
    destroyed: AtomicBool,
}

fn kill_group(pgid: i32) {
    // ESRCH (the group is already gone) is the expected case once a command has finished.
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
}

async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: LogStream,
    tx: mpsc::Sender<OutputChunk>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx
                    .send(OutputChunk {
                        stream,
                        data: buf[..n].to_vec(),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

impl ProcessSandbox {
    fn spawn(&self, spec: ExecSpec) -> Result<Execution, ExecError> {
        if self.destroyed.load(Ordering::SeqCst) {
            return Err(ExecError::SandboxGone);
        }
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", WATCHED, "kiln-job"])
            .arg(&spec.command)
            .env("KILN_RUNNER_PID", std::process::id().to_string())
            .current_dir(&self.workdir)
            .process_group(0)
            .kill_on_drop(true)
            .stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The runner's own secrets never reach a command, whatever the spec says.
        for var in RUNNER_SECRETS {
            cmd.env_remove(var);
        }
        for (k, v) in spec
            .env
            .iter()
            .filter(|(k, _)| !RUNNER_SECRETS.contains(&k.as_str()))
        {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let pgid = child.id().ok_or(ExecError::SandboxGone)? as i32;
        self.groups.lock().unwrap().insert(pgid);
        // A destroy that ran between the check above and the insert must still kill this one.
        if self.destroyed.load(Ordering::SeqCst) {
            kill_group(pgid);
        }

        let stdin = child
            .stdin
            .take()
            .map(|s| Box::pin(s) as super::StdinWriter);
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel(OUTPUT_CHANNEL);
        let (exit_tx, exit_rx) = oneshot::channel();
        let groups = self.groups.clone();
        tokio::spawn(async move {
            let out = tokio::spawn(pump(stdout, LogStream::Stdout, tx.clone()));
            let err = tokio::spawn(pump(stderr, LogStream::Stderr, tx));
            let status = child.wait().await;
            // Background children left behind would hold the pipes open: the command is over, so
            // its whole group goes with it.
            kill_group(pgid);
            let _ = out.await;
            let _ = err.await;
            groups.lock().unwrap().remove(&pgid);
            let code = status
                .map(|s| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)))
                .map_err(ExecError::from);
            let _ = exit_tx.send(code);
        });
        Ok(Execution {
            stdin,
            output: rx,
            exit: exit_rx,
        })
    }
}

impl Sandbox for ProcessSandbox {
    fn exec(&self, spec: ExecSpec) -> BoxFuture<'_, Result<Execution, ExecError>> {
        let result = self.spawn(spec);
        async move { result }.boxed()
    }

    fn destroy(&self) -> BoxFuture<'_, Result<(), ExecError>> {
        async move {
            self.destroyed.store(true, Ordering::SeqCst);
            let groups: Vec<i32> = self.groups.lock().unwrap().iter().copied().collect();
            for pgid in groups {
                kill_group(pgid);
            }
            // Wait (bounded) until every command has been reaped.
            for _ in 0..100 {
                if self.groups.lock().unwrap().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        }
        .boxed()
    }
}
