//! The Docker executor (bollard): one container per job named `project_engine_<job_id>_container`,
//! the worktree bind-mounted at `/app`, resource limits, `init` on, kept alive by a sleep loop (that
//! ends when the runner is gone); each command is a `docker exec`. Containers are hardened: every
//! capability dropped (`RUNNER_CAP_ADD` gives some back), `no-new-privileges`, a read-only root
//! filesystem with a size-limited tmpfs `/tmp` (HOME), a user that is never root. Architecture
//! invariant: this is the only module that talks to Docker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use bollard::Docker;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use kiln_schemas::events::LogStream;
use tokio::sync::{mpsc, oneshot};

use crate::config::{ContainerLimits, ContainerUser, ExecutorKind, Mount, RUNNER_SECRETS};
use crate::executor::{
    ExecError, ExecSpec, Execution, Executor, OutputChunk, Sandbox, StdinWriter, OUTPUT_CHANNEL,
};
use crate::isolation::{give_tree, JobUser};

/// Where a job's worktree appears inside its container.
pub const WORKDIR: &str = "/app";
/// Where containers see the runner's liveness file (read-only).
pub const ALIVE_IN_CONTAINER: &str = "/run/kiln-runner-alive";
/// How often the runner refreshes its liveness file.
pub const ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A container whose runner has not refreshed the file for this long stops (and is removed).
pub const ALIVE_STALE_SECS: u64 = 30;

/// The container's main process: sleeps while the runner lives. When the liveness file grows
/// stale (the runner was killed without removing its containers), it exits, `init` ends every
/// exec'd agent, and auto-remove deletes the container. Any doubt (no `stat`, no file) keeps it
/// running.
fn keep_alive_script() -> String {
    format!(
        "while :; do sleep 5; if m=$(stat -c %Y {f} 2>/dev/null) && [ -n \"$m\" ] && [ $(( $(date +%s) - m )) -gt {s} ]; then exit 0; fi; done",
        f = ALIVE_IN_CONTAINER,
        s = ALIVE_STALE_SECS
    )
}

/// Sets the file's modification time to now, creating it if needed.
fn touch(path: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    f.set_modified(std::time::SystemTime::now())
}

/// The container name of a job.
pub fn container_name(job_id: &str) -> String {
    format!("project_engine_{job_id}_container")
}

fn docker_err(e: BollardError) -> ExecError {
    ExecError::Docker(e.to_string())
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// A connection to a Docker daemon that answered a ping.
#[derive(Clone)]
pub struct DockerClient {
    docker: Docker,
}

impl DockerClient {
    /// Connects to `host` (`unix://`, `tcp://`, `http://`), or to `DOCKER_HOST` / the default socket,
    /// negotiates the API version (dockerd 20.10 speaks 1.41) and pings.
    pub async fn connect(host: Option<&str>) -> Result<DockerClient, ExecError> {
        let docker = match host {
            Some(h) => Docker::connect_with_host(h),
            None => Docker::connect_with_local_defaults(),
        }
        .map_err(docker_err)?;
        let docker = tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
            .await
            .map_err(|_| ExecError::Docker("no answer within 5 s".into()))?
            .map_err(docker_err)?;
        docker.ping().await.map_err(docker_err)?;
        Ok(DockerClient { docker })
    }

    /// The daemon's version, if it answers within two seconds.
    pub async fn version(&self) -> Option<String> {
        let v = tokio::time::timeout(Duration::from_secs(2), self.docker.version())
            .await
            .ok()?
            .ok()?;
        v.version
    }

    pub async fn has_image(&self, image: &str) -> Result<bool, ExecError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(docker_err(e)),
        }
    }

    /// Whether a container of this name exists (tests use it to see a cancel's effect).
    pub async fn container_exists(&self, name: &str) -> Result<bool, ExecError> {
        match self.docker.inspect_container(name, None).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(docker_err(e)),
        }
    }

    /// The container's host config as Docker reports it (limits, binds, network, init).
    pub async fn container_host_config(&self, name: &str) -> Result<Option<HostConfig>, ExecError> {
        let c = self
            .docker
            .inspect_container(name, None)
            .await
            .map_err(docker_err)?;
        Ok(c.host_config)
    }

    /// The user a container runs as (`Config.User`), as Docker reports it.
    pub async fn container_user(&self, name: &str) -> Result<Option<String>, ExecError> {
        let c = self
            .docker
            .inspect_container(name, None)
            .await
            .map_err(docker_err)?;
        Ok(c.config.and_then(|c| c.user))
    }

    /// Force-removes a container (kills what runs in it); a missing one is fine.
    pub async fn remove_container(&self, name: &str) -> Result<(), ExecError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // "removal already in progress": a concurrent remove of the same container.
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(docker_err(e)),
        }
    }
}

/// Job containers on one daemon.
pub struct DockerExecutor {
    client: DockerClient,
    image: String,
    limits: ContainerLimits,
    mounts: Vec<Mount>,
    /// Who the containers run as: never root. A runner that is not root uses its own uid:gid, so
    /// files in the worktree stay its own to commit and remove; a root runner uses the configured
    /// user and gives each worktree to it ([`JobUser`]).
    user: JobUser,
    /// Refreshed every [`ALIVE_INTERVAL`] while this executor exists; see [`keep_alive_script`].
    alive_file: PathBuf,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for DockerExecutor {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl DockerExecutor {
    /// Must be called inside a tokio runtime: it starts refreshing `alive_file`.
    pub fn new(
        client: DockerClient,
        image: String,
        limits: ContainerLimits,
        mounts: Vec<Mount>,
        alive_file: PathBuf,
        root_user: ContainerUser,
    ) -> Self {
        let user = JobUser::current(root_user);
        let path = alive_file.clone();
        let refresher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ALIVE_INTERVAL);
            loop {
                tick.tick().await;
                let p = path.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || touch(&p)).await {
                    tracing::warn!(path = %path.display(), error = %e, "could not refresh the liveness file");
                }
            }
        });
        DockerExecutor {
            client,
            image,
            limits,
            mounts,
            user,
            alive_file,
            refresher,
        }
    }

    pub fn client(&self) -> &DockerClient {
        &self.client
    }

    /// Who the containers run as.
    pub fn job_user(&self) -> JobUser {
        self.user
    }

    fn container_body(&self, job_id: &str, worktree: &Path) -> ContainerCreateBody {
        let mut binds = vec![
            format!("{}:{}", worktree.display(), WORKDIR),
            format!("{}:{}:ro", self.alive_file.display(), ALIVE_IN_CONTAINER),
        ];
        binds.extend(self.mounts.iter().map(Mount::to_bind));
        let memory = (self.limits.memory_mb * 1024 * 1024) as i64;
        // The user may have no entry in the image's passwd file, hence no home: /tmp is writable
        // by everyone in every image Kiln runs.
        let env = vec![format!("JOB_ID={job_id}"), "HOME=/tmp".into()];
        ContainerCreateBody {
            image: Some(self.image.clone()),
            // Exec sessions need a running container; `init` reaps them and makes the stop quick.
            cmd: Some(vec!["sh".into(), "-c".into(), keep_alive_script()]),
            working_dir: Some(WORKDIR.into()),
            env: Some(env),
            user: Some(self.user.user.to_string()),
            labels: Some(HashMap::from([(
                "kiln.job_id".to_string(),
                job_id.to_string(),
            )])),
            host_config: Some(HostConfig {
                binds: Some(binds),
                memory: Some(memory),
                memory_swap: Some(memory),
                nano_cpus: Some((self.limits.cpus * 1e9) as i64),
                pids_limit: Some(self.limits.pids),
                network_mode: Some(self.limits.network.clone()),
                init: Some(true),
                auto_remove: Some(true),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: (!self.limits.cap_add.is_empty()).then(|| self.limits.cap_add.clone()),
                security_opt: Some(vec!["no-new-privileges".into()]),
                readonly_rootfs: Some(true),
                // The agent CLIs write their settings and sessions under HOME (/tmp); `exec`
                // because the tools an agent runs (test runners, compilers) execute what they
                // write there. The size counts against the memory limit.
                tmpfs: Some(HashMap::from([(
                    "/tmp".to_string(),
                    format!(
                        "rw,exec,nosuid,nodev,size={}m,mode=1777",
                        self.limits.tmp_mb
                    ),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl Executor for DockerExecutor {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Docker
    }

    fn create_sandbox<'a>(
        &'a self,
        job_id: &'a str,
        worktree: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn Sandbox>, ExecError>> {
        async move {
            let name = container_name(job_id);
            // A container left by a crashed runner or an earlier attempt of this job.
            self.client.remove_container(&name).await?;
            // The bind below needs the file to exist (else Docker makes a directory there).
            touch(&self.alive_file)?;
            if self.user.give_worktree {
                let (path, user) = (worktree.to_path_buf(), self.user.user);
                tokio::task::spawn_blocking(move || give_tree(&path, user))
                    .await
                    .map_err(|e| ExecError::Io(std::io::Error::other(e)))??;
            }
            let opts = CreateContainerOptionsBuilder::default().name(&name).build();
            let docker = &self.client.docker;
            docker
                .create_container(Some(opts), self.container_body(job_id, worktree))
                .await
                .map_err(docker_err)?;
            let sandbox = DockerSandbox {
                client: self.client.clone(),
                name,
            };
            if let Err(e) = docker.start_container(&sandbox.name, None).await {
                let _ = sandbox.client.remove_container(&sandbox.name).await;
                return Err(docker_err(e));
            }
            Ok(Box::new(sandbox) as Box<dyn Sandbox>)
        }
        .boxed()
    }
}

/// One job's container.
pub struct DockerSandbox {
    client: DockerClient,
    name: String,
}

impl DockerSandbox {
    async fn start(&self, spec: ExecSpec) -> Result<Execution, ExecError> {
        let docker = self.client.docker.clone();
        // The runner's own secrets never reach a command, whatever the spec says.
        let env: Vec<String> = spec
            .env
            .iter()
            .filter(|(k, _)| !RUNNER_SECRETS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let created = docker
            .create_exec(
                &self.name,
                CreateExecOptions {
                    attach_stdin: Some(spec.stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(false),
                    env: Some(env),
                    cmd: Some(vec![
                        "sh".to_string(),
                        "-c".to_string(),
                        spec.command.clone(),
                    ]),
                    working_dir: Some(WORKDIR.to_string()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                if is_not_found(&e) {
                    ExecError::SandboxGone
                } else {
                    docker_err(e)
                }
            })?;
        let started = docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: Some(64 * 1024),
                }),
            )
            .await
            .map_err(docker_err)?;
        let StartExecResults::Attached { mut output, input } = started else {
            return Err(ExecError::Docker("exec started detached".into()));
        };
        let stdin = spec.stdin.then_some(input as StdinWriter);

        let (tx, rx) = mpsc::channel(OUTPUT_CHANNEL);
        let (exit_tx, exit_rx) = oneshot::channel();
        let exec_id = created.id;
        tokio::spawn(async move {
            use bollard::container::LogOutput;
            while let Some(item) = output.next().await {
                let chunk = match item {
                    Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                        OutputChunk {
                            stream: LogStream::Stdout,
                            data: message.to_vec(),
                        }
                    }
                    Ok(LogOutput::StdErr { message }) => OutputChunk {
                        stream: LogStream::Stderr,
                        data: message.to_vec(),
                    },
                    Ok(LogOutput::StdIn { .. }) => continue,
                    Err(_) => break,
                };
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            drop(tx);
            let _ = exit_tx.send(exit_code(&docker, &exec_id).await);
        });
        Ok(Execution {
            stdin,
            output: rx,
            exit: exit_rx,
        })
    }
}

/// The exit code of a finished exec. Docker may report it a moment after the output closes.
async fn exit_code(docker: &Docker, exec_id: &str) -> Result<i32, ExecError> {
    for _ in 0..100 {
        let info = docker.inspect_exec(exec_id).await.map_err(|e| {
            if is_not_found(&e) {
                ExecError::SandboxGone
            } else {
                docker_err(e)
            }
        })?;
        match (info.running, info.exit_code) {
            (Some(false), Some(code)) => return Ok(code as i32),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    Err(ExecError::Docker(format!(
        "exec {exec_id} did not report an exit code"
    )))
}

impl Sandbox for DockerSandbox {
    fn exec(&self, spec: ExecSpec) -> BoxFuture<'_, Result<Execution, ExecError>> {
        self.start(spec).boxed()
    }

    fn destroy(&self) -> BoxFuture<'_, Result<(), ExecError>> {
        async move { self.client.remove_container(&self.name).await }.boxed()
    }
}
