//! The process executor, an operator's explicit choice (`RUNNER_EXECUTOR=process`) for hosts
//! without Docker: every command is `sh -c CMD` in the job's worktree, in a process group of its
//! own, so a cancel kills the whole tree (`killpg`). Commands get a scrubbed environment (PATH,
//! LANG, HOME in a scratch directory of the job's, and what the spec names: `JOB_ID`,
//! `ITERATION`, `COMPLETION_PROMISE`, `RUNNER_AGENT_ENV`), nothing else of the runner's; a root
//! runner runs them as another user ([`JobUser`]), which owns the worktree and the scratch home.

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
use crate::config::{ContainerUser, ExecutorKind, RUNNER_SECRETS};
use crate::isolation::{give_tree, JobUser};

/// Runs the command (`$2`) as the group leader, beside a watcher in the same process group that
/// kills the whole group once the runner (pid `$1`, an argument: never in the environment) is
/// gone: a runner that dies without cleaning up (SIGKILL, a crash) must not leave agents running.
/// The watcher looks at `/proc`, which works whichever user the command runs as (`kill -0` does
/// not: another user's process answers EPERM). Its output goes nowhere, so it never holds the
/// command's pipes open.
const WATCHED: &str = r#"(while [ -d "/proc/$1" ]; do sleep 1; done; kill -KILL 0) </dev/null >/dev/null 2>&1 &
exec sh -c "$2""#;

/// `PATH` for commands when the runner has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the scratch homes of jobs live, under `WORKTREES_DIR` (a dot name: not a worktree).
pub const HOMES_DIR: &str = ".kiln-homes";

#[derive(Debug, Clone)]
pub struct ProcessExecutor {
    user: JobUser,
    /// Holds one scratch home per job (`<homes>/<job_id>`), removed with its sandbox.
    homes: PathBuf,
    path: String,
    lang: String,
}

impl ProcessExecutor {
    /// `homes`: where the jobs' scratch homes go (`WORKTREES_DIR/.kiln-homes`). `PATH` and `LANG`
    /// are the runner's own (else a standard `PATH` and `C.UTF-8`).
    pub fn new(user: JobUser, homes: PathBuf) -> ProcessExecutor {
        ProcessExecutor {
            user,
            homes,
            path: std::env::var("PATH")
                .ok()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| DEFAULT_PATH.into()),
            lang: std::env::var("LANG")
                .ok()
                .filter(|l| !l.is_empty())
                .unwrap_or_else(|| "C.UTF-8".into()),
        }
    }

    pub fn job_user(&self) -> JobUser {
        self.user
    }

    /// Checks that the commands' user can enter `dir` (`WORKTREES_DIR`): a root runner's default
    /// directories under a 0700 home are out of its reach. Answers what is wrong.
    pub async fn check_reachable(&self, dir: &Path) -> Result<(), String> {
        if !self.user.separate {
            return Ok(());
        }
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", r#"cd -- "$1""#, "kiln-check"])
            .arg(dir)
            .env_clear()
            .env("PATH", &self.path)
            .uid(self.user.user.uid)
            .gid(self.user.user.gid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = cmd
            .output()
            .await
            .map_err(|e| format!("could not run a check as {}: {e}", self.user.user))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{} cannot enter {} ({}): every directory above it must be searchable by that user (e.g. mode 0755), or choose another WORKTREES_DIR",
            self.user.user,
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates the job's scratch home, owned by its commands' user, readable by nobody else.
fn make_home(homes: &Path, job_id: &str, user: Option<ContainerUser>) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(homes)?;
    let home = homes.join(job_id);
    // Left by a crashed runner or an earlier attempt of this job.
    if home.exists() {
        std::fs::remove_dir_all(&home)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(&home)?;
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))?;
    if let Some(user) = user {
        std::os::unix::fs::lchown(&home, Some(user.uid), Some(user.gid))?;
    }
    Ok(home)
}

impl Executor for ProcessExecutor {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Process
    }

    fn create_sandbox<'a>(
        &'a self,
        job_id: &'a str,
        worktree: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn Sandbox>, ExecError>> {
        async move {
            if !crate::workspace::is_job_id(job_id) {
                return Err(ExecError::Io(std::io::Error::other(format!(
                    "{job_id:?} is not a job id"
                ))));
            }
            let give = self.user.give_worktree.then_some(self.user.user);
            let (homes, id, path) = (
                self.homes.clone(),
                job_id.to_string(),
                worktree.to_path_buf(),
            );
            let home = tokio::task::spawn_blocking(move || {
                if let Some(user) = give {
                    give_tree(&path, user)?;
                }
                make_home(&homes, &id, give)
            })
            .await
            .map_err(|e| ExecError::Io(std::io::Error::other(e)))??;
            let sandbox = ProcessSandbox {
                workdir: worktree.to_path_buf(),
                home,
                user: self.user.separate.then_some(self.user.user),
                path: self.path.clone(),
                lang: self.lang.clone(),
                groups: Arc::new(Mutex::new(HashSet::new())),
                destroyed: AtomicBool::new(false),
            };
            Ok(Box::new(sandbox) as Box<dyn Sandbox>)
        }
        .boxed()
    }
}

/// The process groups of one job's live commands.
pub struct ProcessSandbox {
    workdir: PathBuf,
    /// The job's scratch home (HOME of its commands).
    home: PathBuf,
    /// Who the commands run as, when not the runner's own user.
    user: Option<ContainerUser>,
    path: String,
    lang: String,
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
            .arg(std::process::id().to_string())
            .arg(&spec.command)
            // Nothing of the runner's environment, only what a command needs.
            .env_clear()
            .env("PATH", &self.path)
            .env("LANG", &self.lang)
            .env("HOME", &self.home)
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
        if let Some(user) = self.user {
            cmd.uid(user.uid).gid(user.gid);
        }
        // The runner's own secrets never reach a command, whatever the spec says.
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
            match tokio::fs::remove_dir_all(&self.home).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ExecError::Io(e)),
                _ => Ok(()),
            }
        }
        .boxed()
    }
}
