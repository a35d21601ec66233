//! The runner assembled: credentials, executor choice, workspaces, the job table, the edge
//! session and the health API. `Application::build` binds the health port (0 picks a free one, for
//! tests) and `run_until_stopped` runs until the given shutdown future resolves.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{Config, EdgeCredential, ExecutorKind};
use crate::docker::{DockerClient, DockerExecutor};
use crate::edge::connection::{EdgeStatus, Session};
use crate::edge::{self, EdgeClient, EdgeError, Registrar};
use crate::executor::process::{ProcessExecutor, HOMES_DIR};
use crate::executor::{ExecError, Executor};
use crate::github::GithubClient;
use crate::health::{self, HealthState};
use crate::isolation::JobUser;
use crate::jobs::{CancelToken, JobServices, Supervisor};
use crate::metrics::Metrics;
use crate::state::{self, Opened, StartCredential, StateDir, StateError};
use crate::workspace::Workspaces;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "no credential for the edge: set RUNNER_TOKEN, or RUNNER_REGISTRATION_TOKEN to register (a token saved in RUNNER_STATE_DIR is reused only with the edge and runner name it was issued for)"
    )]
    NoCredential,
    #[error("the state directory: {0}")]
    State(#[source] StateError),
    #[error("the state directory {dir} is in use by another runner{}; give this one its own RUNNER_STATE_DIR, or set RUNNER_REGISTRATION_TOKEN to register it without saving", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    StateInUse { dir: String, pid: Option<u32> },
    #[error("registering with the edge failed: {0}")]
    Register(#[source] EdgeError),
    #[error(
        "RUNNER_EXECUTOR=docker but no Docker daemon answers ({0}); start one or set DOCKER_HOST"
    )]
    NoDocker(#[source] ExecError),
    #[error(
        "no Docker daemon answers ({0}): jobs run in Docker containers unless the operator chooses otherwise. Start one (or set DOCKER_HOST), or set RUNNER_EXECUTOR=process to run job commands as host processes (as RUNNER_CONTAINER_USER when the runner is root; see runner/README.md)"
    )]
    NoDockerNoChoice(#[source] ExecError),
    #[error("RUNNER_EXECUTOR=process: the commands' user (RUNNER_CONTAINER_USER) {0}")]
    Unreachable(String),
    #[error("the image {0} is not present in the Docker daemon (no registry is assumed): build or load it first")]
    NoImage(String),
    #[error("checking the image failed: {0}")]
    ImageCheck(#[source] ExecError),
    #[error("creating {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("binding the health API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the health API failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("the LLM client: {0}")]
    Llm(#[source] crate::llm::LlmError),
}

pub struct Application {
    listener: tokio::net::TcpListener,
    port: u16,
    runner_name: String,
    supervisor: Supervisor,
    health: Arc<HealthState>,
    session: Session,
    workspaces: Arc<Workspaces>,
    /// `RUNNER_MIRROR_MAX_AGE_DAYS`.
    mirror_max_age: std::time::Duration,
    /// Held while the runner runs: the lock on the state directory.
    _state: Option<Arc<StateDir>>,
}

impl Application {
    pub async fn build(config: Config) -> Result<Application, StartError> {
        let http = edge::http_client();
        let (token, registrar, state) = credentials(&config, &http).await?;

        for dir in [&config.repos_dir, &config.worktrees_dir] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|source| StartError::Dir {
                    path: dir.display().to_string(),
                    source,
                })?;
        }

        // Docker unless the operator chose the process executor: never a silent fallback.
        let job_user = JobUser::current(config.container_user);
        let (executor, docker): (Arc<dyn Executor>, Option<DockerClient>) = match config.executor {
            None | Some(ExecutorKind::Docker) => {
                let client = DockerClient::connect(config.docker_host.as_deref())
                    .await
                    .map_err(|e| match config.executor {
                        None => StartError::NoDockerNoChoice(e),
                        Some(_) => StartError::NoDocker(e),
                    })?;
                (
                    docker_executor(&config, client.clone()).await?,
                    Some(client),
                )
            }
            Some(ExecutorKind::Process) => {
                let process = ProcessExecutor::new(job_user, config.worktrees_dir.join(HOMES_DIR));
                process
                    .check_reachable(&config.worktrees_dir)
                    .await
                    .map_err(StartError::Unreachable)?;
                (
                    Arc::new(process),
                    DockerClient::connect(config.docker_host.as_deref())
                        .await
                        .ok(),
                )
            }
        };
        let isolation = job_user.isolation(executor.kind());
        if let Some(warning) = job_user.warning(executor.kind()) {
            tracing::warn!("{warning}");
            eprintln!("WARNING: {warning}");
        }
        if !config.agent.env.missing.is_empty() {
            tracing::warn!(
                missing = ?config.agent.env.missing,
                "RUNNER_AGENT_ENV lists variables that are not set in the runner's environment; agents run without them"
            );
        }
        if executor.kind() == ExecutorKind::Process && !config.mounts.is_empty() {
            tracing::warn!("RUNNER_MOUNTS only applies to the docker executor; ignored");
        }

        let workspaces = Arc::new(
            Workspaces::new(
                config.repos_dir.clone(),
                config.worktrees_dir.clone(),
                &config.git_base_url,
                config.github_token.as_deref(),
            )
            .with_fetch_parallelism(config.resources.fetch_parallelism),
        );
        // No job is held yet: whatever a job left in WORKTREES_DIR is a crash's leftover.
        let swept = workspaces.sweep(&[]).await;
        if swept != Default::default() {
            tracing::warn!(worktrees = ?swept.worktrees, branches = ?swept.branches, "removed what an earlier run left behind");
        }
        workspaces
            .collect_garbage(config.resources.mirror_max_age)
            .await;
        let git_version = workspaces.git().version().await;
        if git_version.is_none() {
            tracing::warn!("git is not available: jobs will fail to prepare their workspaces");
        }

        let client = EdgeClient::new(http.clone(), config.edge_url.clone(), token);
        let metrics = Arc::new(Metrics::default());
        // One LLM client for the jobs' steps and the gatherer's turns: one pool, one set of settings.
        let llm = crate::llm::LlmClient::new(config.llm.clone()).map_err(StartError::Llm)?;
        let services = Arc::new(JobServices {
            executor: executor.clone(),
            workspaces: workspaces.clone(),
            github: GithubClient::new(http, &config.github_api_url, config.github_token.clone()),
            edge: client.clone(),
            agent: config.agent.clone(),
            repositories: config.repositories.clone(),
            protected_branches: config.protected_branches.clone(),
            runner_name: config.name.clone(),
            metrics: metrics.clone(),
            limits: config.job_limits,
            event_buffer_bytes: config.resources.event_buffer_bytes,
            llm: llm.clone(),
            three_d: config.three_d.clone(),
        });
        let supervisor = Supervisor::new(services, config.max_concurrent_jobs);

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?
            .port();

        let status = Arc::new(EdgeStatus::default());
        let health = Arc::new(HealthState {
            name: config.name.clone(),
            supervisor: supervisor.clone(),
            docker,
            git_version,
            agent: config.agent.clone(),
            edge_url: config.edge_url.to_string(),
            edge: status.clone(),
            executor: executor.kind(),
            isolation: isolation.clone(),
            metrics: metrics.clone(),
            repos_dir: config.repos_dir.clone(),
            worktrees_dir: config.worktrees_dir.clone(),
            llm: health::llm_summary(&config.llm),
        });
        let mut tools = crate::tools::report(
            &config.agent,
            crate::tools::agent_version(executor.as_ref(), &config.agent, &config.worktrees_dir)
                .await,
            health.git_version.clone(),
            config.github_token.is_some(),
        );
        tools.round_table = crate::tools::round_table(&config.llm);
        let session = Session {
            client,
            name: config.name.clone(),
            supervisor: supervisor.clone(),
            workspaces: workspaces.clone(),
            status,
            registrar,
            metrics,
            tools,
            gatherer: crate::gather::Gatherer::new(llm, config.resources.chat_concurrency),
        };
        tracing::info!(
            name = %config.name,
            executor = executor.kind().as_str(),
            isolation = %isolation,
            capacity = config.max_concurrent_jobs,
            agent_env = ?config.agent.env.names(),
            port,
            edge = %config.edge_url,
            "runner ready"
        );
        Ok(Application {
            listener,
            port,
            runner_name: config.name,
            supervisor,
            health,
            session,
            workspaces,
            mirror_max_age: config.resources.mirror_max_age,
            _state: state,
        })
    }

    /// The bound port of the health API.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn name(&self) -> &str {
        &self.runner_name
    }

    /// The job table (tests look at it).
    pub fn supervisor(&self) -> Supervisor {
        self.supervisor.clone()
    }

    /// Serves until `shutdown` resolves; then cancels the jobs (their workspaces are cleaned up)
    /// and closes the edge session.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let stop = CancelToken::default();
        let session = tokio::spawn(self.session.run(stop.clone()));
        let server_stop = stop.clone();
        let server = tokio::spawn(async move {
            axum::serve(self.listener, health::router(self.health))
                .with_graceful_shutdown(async move { server_stop.cancelled().await })
                .await
        });
        // Mirrors nobody used for RUNNER_MIRROR_MAX_AGE_DAYS go, checked daily (and at start).
        let (workspaces, max_age) = (self.workspaces.clone(), self.mirror_max_age);
        let gc = tokio::spawn(async move {
            let day = std::time::Duration::from_secs(86_400);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + day, day);
            loop {
                tick.tick().await;
                workspaces.collect_garbage(max_age).await;
            }
        });
        // Finished worktrees' entries and branches are dropped in batches; what a quiet moment
        // leaves is dropped within a second.
        let workspaces = self.workspaces.clone();
        let tidy = tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                workspaces.tidy().await;
            }
        });
        shutdown.await;
        gc.abort();
        tidy.abort();
        tracing::info!("stopping: cancelling the jobs held here");
        self.supervisor.shutdown().await;
        self.workspaces.drop_finished().await;
        stop.cancel();
        let _ = session.await;
        match server.await {
            Ok(r) => r.map_err(StartError::Serve),
            Err(_) => Ok(()),
        }
    }
}

/// The runner token to start with, how to renew it, and the state directory held: `RUNNER_TOKEN`
/// as given (the state directory is not used); else the registration saved for this edge and
/// name; else a new registration, saved.
async fn credentials(
    config: &Config,
    http: &reqwest::Client,
) -> Result<(String, Option<Arc<Registrar>>, Option<Arc<StateDir>>), StartError> {
    if let Some(EdgeCredential::Token(t)) = &config.credential {
        return Ok((t.clone(), None, None));
    }
    let registration_token = match &config.credential {
        Some(EdgeCredential::Registration(r)) => Some(r.clone()),
        _ => None,
    };
    let dir = &config.state_dir;
    let state = match StateDir::open(dir).map_err(StartError::State)? {
        Opened::Locked(s) => Some(Arc::new(s)),
        Opened::InUse { pid } if registration_token.is_some() => {
            tracing::warn!(dir = %dir.display(), ?pid, "the state directory is in use by another runner: this one registers without saving (give it its own RUNNER_STATE_DIR)");
            None
        }
        Opened::InUse { pid } => {
            return Err(StartError::StateInUse {
                dir: dir.display().to_string(),
                pid,
            })
        }
    };
    let saved = match &state {
        Some(s) => s.load().map_err(StartError::State)?,
        None => None,
    };
    let registrar = registration_token.map(|registration_token| {
        Arc::new(Registrar {
            http: http.clone(),
            base: config.edge_url.clone(),
            registration_token,
            name: config.name.clone(),
            state: state.clone(),
        })
    });
    let edge_url = config.edge_url.to_string();
    let token = match state::choose(
        config.credential.as_ref(),
        saved.as_ref(),
        &edge_url,
        &config.name,
    ) {
        StartCredential::Configured(t) => t,
        StartCredential::Saved(s) => {
            tracing::info!(runner_id = %s.runner_id, registered_at = %s.registered_at, path = %dir.join(state::STATE_FILE).display(), "using the saved runner token");
            s.token
        }
        StartCredential::Register => {
            if let Some(s) = &saved {
                tracing::info!(saved_edge = %s.edge_url, saved_name = %s.name, "the saved registration is for another edge or name; registering");
            }
            let registrar = registrar.as_ref().expect("a registration token is set");
            registrar
                .register()
                .await
                .map_err(StartError::Register)?
                .token
        }
        StartCredential::Missing => return Err(StartError::NoCredential),
    };
    Ok((token, registrar, state))
}

async fn docker_executor(
    config: &Config,
    client: DockerClient,
) -> Result<Arc<dyn Executor>, StartError> {
    if !client
        .has_image(&config.image)
        .await
        .map_err(StartError::ImageCheck)?
    {
        return Err(StartError::NoImage(config.image.clone()));
    }
    let alive = config.worktrees_dir.join(".kiln-runner-alive");
    Ok(Arc::new(DockerExecutor::new(
        client,
        config.image.clone(),
        config.limits.clone(),
        config.mounts.clone(),
        alive,
        config.container_user,
    )))
}
