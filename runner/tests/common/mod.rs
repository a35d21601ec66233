//! Shared pieces of the runner's integration tests: git remotes in temporary directories, the
//! stand-in agent, a fake edge and a fake GitHub, and a whole runner wired to them.
#![allow(dead_code)] // each test binary uses a different part

pub mod edge;
pub mod github;
pub mod landing;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_runner::app::StartError;
use kiln_runner::config::{
    AgentEnv, AgentFormat, AgentProfile, Config, ContainerLimits, ContainerUser, EdgeCredential,
    ExecutorKind, JobLimits, Mount, Resources,
};
use kiln_runner::jobs::Supervisor;
use kiln_runner::Application;
use kiln_schemas::grants::{ProtectedBranches, RepoPattern};
use kiln_schemas::jobs::RalphParams;
use kiln_schemas::runner::{Assignment, EdgeMessage, Outcome, RunnerEvent};
use kiln_schemas::status::{CompletionReason, JobType};
use tempfile::TempDir;
use tokio::sync::oneshot;

pub use edge::{wait_until, FakeEdge};
pub use github::FakeGithub;

pub const ORG: &str = "acme";
pub const REPO: &str = "site";

/// The nearest-index percentile `p` (0..=1) of sorted samples, for the overhead benchmarks.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Which build a benchmark ran in, for its printed table.
pub const BUILD: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};

/// `tests/agents`, holding `agent.sh` (see its header for the words a prompt can use).
pub fn agents_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/agents")
}

/// Where job containers see `tests/agents`.
pub const CONTAINER_AGENTS: &str = "/kiln-test/agents";

pub fn agent_cmd(executor: ExecutorKind) -> String {
    match executor {
        ExecutorKind::Process => format!("sh {}/agent.sh", agents_dir().display()),
        ExecutorKind::Docker => format!("sh {CONTAINER_AGENTS}/agent.sh"),
    }
}

/// Makes a directory searchable by every user (0755, whatever the umask made it), as a root
/// runner's WORKTREES_DIR must be for its commands' user.
pub fn searchable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs git synchronously (test set-up and checks); panics on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bare repositories standing in for GitHub, at `<dir>/<org>/<repo>.git`.
pub struct Remotes {
    pub dir: TempDir,
}

impl Remotes {
    pub fn new() -> Remotes {
        Remotes {
            dir: tempfile::Builder::new()
                .prefix("kiln-remotes-")
                .tempdir()
                .unwrap(),
        }
    }

    /// `file://` base URL (RUNNER_GIT_BASE_URL).
    pub fn base_url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    pub fn path(&self, org: &str, repo: &str) -> PathBuf {
        self.dir.path().join(org).join(format!("{repo}.git"))
    }

    /// A repository whose default branch `main` holds README.md, plus a branch `develop`
    /// holding DEVELOP.md as well.
    pub fn create(&self, org: &str, repo: &str) -> PathBuf {
        let bare = self.path(org, repo);
        std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
        git(
            self.dir.path(),
            &[
                "init",
                "--quiet",
                "--bare",
                "--initial-branch=main",
                bare.to_str().unwrap(),
            ],
        );
        let work = tempfile::tempdir().unwrap();
        let w = work.path();
        git(w, &["init", "--quiet", "--initial-branch=main"]);
        std::fs::write(w.join("README.md"), format!("# {repo}\n")).unwrap();
        git(w, &["add", "README.md"]);
        git(w, &["commit", "--quiet", "-m", "initial"]);
        git(w, &["push", "--quiet", bare.to_str().unwrap(), "main"]);
        git(w, &["checkout", "--quiet", "-b", "develop"]);
        std::fs::write(w.join("DEVELOP.md"), "develop\n").unwrap();
        git(w, &["add", "DEVELOP.md"]);
        git(w, &["commit", "--quiet", "-m", "develop work"]);
        git(w, &["push", "--quiet", bare.to_str().unwrap(), "develop"]);
        bare
    }

    pub fn branches(&self, org: &str, repo: &str) -> Vec<String> {
        git(
            &self.path(org, repo),
            &["for-each-ref", "--format=%(refname:short)", "refs/heads/"],
        )
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// A file at a revision, if present.
    pub fn show(&self, org: &str, repo: &str, rev_path: &str) -> Option<String> {
        let out = Command::new("git")
            .args(["show", rev_path])
            .current_dir(self.path(org, repo))
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Files of a revision.
    pub fn files(&self, org: &str, repo: &str, rev: &str) -> Vec<String> {
        git(
            &self.path(org, repo),
            &["ls-tree", "-r", "--name-only", rev],
        )
        .lines()
        .map(str::to_string)
        .collect()
    }
}

pub fn assignment(job_type: JobType, prompt: &str) -> Assignment {
    let job_id = uuid::Uuid::new_v4().to_string();
    Assignment {
        branch_name: format!("kiln/{}-{}", job_type.as_str(), &job_id[..8]),
        lease_id: format!("lease-{}", &job_id[..8]),
        job_id,
        attempt: 1,
        job_type,
        prompt: prompt.to_string(),
        title: None,
        github_org: ORG.into(),
        github_repo: REPO.into(),
        base_branch: None,
        ralph: (job_type == JobType::Ralph).then(|| RalphParams {
            max_iterations: 5,
            completion_promise: "RALPH_COMPLETE".into(),
            feedback_commands: vec![],
        }),
        timeout_seconds: None,
        app: None,
        landing: None,
        dashboard: None,
        source_issue: None,
        queued_ms: None,
    }
}

pub struct RunnerOptions {
    pub executor: ExecutorKind,
    pub capacity: u32,
    pub format: AgentFormat,
    pub docker_host: Option<String>,
    /// What `RUNNER_AGENT_ENV` would have resolved to (built directly, so tests can also try
    /// what the setting refuses).
    pub agent_env: AgentEnv,
    /// An edge to use instead of a new one (a restarted runner).
    pub edge: Option<FakeEdge>,
    /// `RUNNER_STATE_DIR` [default: a directory of the runner's own].
    pub state_dir: Option<PathBuf>,
    /// [default: the fake edge's registration token]
    pub credential: Option<EdgeCredential>,
    pub name: String,
    /// `RUNNER_REPOSITORIES` [default: every repository].
    pub repositories: Vec<RepoPattern>,
    /// `RUNNER_JOB_TIMEOUT`, `RUNNER_TASK_IDLE_TIMEOUT`, `RUNNER_WORKSPACE_MAX_MB`.
    pub limits: JobLimits,
    /// `RUNNER_FETCH_PARALLELISM`, `RUNNER_MIRROR_MAX_AGE_DAYS`, `RUNNER_EVENT_BUFFER_MB`.
    pub resources: Resources,
    /// Directories to use instead of new ones (a runner started again over what an earlier one
    /// left).
    pub dirs: Option<TempDir>,
    /// `[llm]`: providers, roles, prices, retries, the per-job budget [default: none].
    pub llm: kiln_runner::llm::LlmConfig,
    /// `RUNNER_AGENT_CMD` [default: `tests/agents/agent.sh`].
    pub agent_command: Option<String>,
    /// `[three_d]` [default: none set].
    pub three_d: kiln_runner::three_d::ThreeDConfig,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        RunnerOptions {
            executor: ExecutorKind::Process,
            capacity: 2,
            format: AgentFormat::Text,
            docker_host: None,
            agent_env: AgentEnv::default(),
            edge: None,
            state_dir: None,
            credential: Some(EdgeCredential::Registration(
                edge::REGISTRATION_TOKEN.into(),
            )),
            name: "test-runner".into(),
            repositories: Vec::new(),
            limits: JobLimits::default(),
            resources: Resources::default(),
            dirs: None,
            llm: Default::default(),
            agent_command: None,
            three_d: Default::default(),
        }
    }
}

/// A runner (in this process) wired to a fake edge, a fake GitHub and local git remotes.
pub struct TestRunner {
    pub edge: FakeEdge,
    pub github: FakeGithub,
    pub remotes: Remotes,
    pub dirs: TempDir,
    pub port: u16,
    pub supervisor: Supervisor,
    stop: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl TestRunner {
    pub async fn start(opts: RunnerOptions) -> TestRunner {
        TestRunner::try_start(opts)
            .await
            .expect("the runner starts")
    }

    /// Starts a runner and waits for its `hello`, or says why it could not start.
    pub async fn try_start(opts: RunnerOptions) -> Result<TestRunner, StartError> {
        let edge = match opts.edge {
            Some(edge) => edge,
            None => FakeEdge::start().await,
        };
        let hellos = edge.hellos().len();
        let github = FakeGithub::start().await;
        let remotes = Remotes::new();
        remotes.create(ORG, REPO);
        let dirs = match opts.dirs {
            Some(dirs) => dirs,
            None => tempfile::Builder::new()
                .prefix("kiln-runner-test-")
                .tempdir()
                .unwrap(),
        };
        // A root runner's commands run as another user (RUNNER_CONTAINER_USER), which must be
        // able to enter WORKTREES_DIR; the state directory inside is the runner's (0700).
        searchable(dirs.path());
        let config = Config {
            edge_url: edge.url.parse().unwrap(),
            credential: opts.credential,
            state_dir: opts.state_dir.unwrap_or_else(|| dirs.path().join("state")),
            name: opts.name,
            executor: Some(opts.executor),
            image: "kiln-busybox:latest".into(),
            agent: AgentProfile {
                command: opts
                    .agent_command
                    .unwrap_or_else(|| agent_cmd(opts.executor)),
                format: opts.format,
                env: opts.agent_env,
                demo_model: false,
            },
            max_concurrent_jobs: opts.capacity,
            repos_dir: dirs.path().join("repos"),
            worktrees_dir: dirs.path().join("worktrees"),
            git_base_url: remotes.base_url(),
            repositories: opts.repositories,
            protected_branches: ProtectedBranches::default(),
            github_token: Some("gh-test-token".into()),
            github_api_url: github.url.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            limits: ContainerLimits {
                memory_mb: 256,
                cpus: 1.0,
                pids: 128,
                network: "none".into(),
                ..Default::default()
            },
            mounts: vec![Mount {
                host: agents_dir(),
                container: CONTAINER_AGENTS.into(),
                read_only: true,
            }],
            docker_host: opts.docker_host,
            container_user: ContainerUser::default(),
            job_limits: opts.limits,
            resources: opts.resources,
            llm: opts.llm,
            three_d: opts.three_d,
        };
        let app = Application::build(config).await?;
        let port = app.port();
        let supervisor = app.supervisor();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until_stopped(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        edge.wait_hellos(hellos + 1).await;
        Ok(TestRunner {
            edge,
            github,
            remotes,
            dirs,
            port,
            supervisor,
            stop: std::sync::Mutex::new(Some(stop)),
            task: std::sync::Mutex::new(Some(task)),
        })
    }

    pub fn worktrees_dir(&self) -> PathBuf {
        self.dirs.path().join("worktrees")
    }

    pub fn repos_dir(&self) -> PathBuf {
        self.dirs.path().join("repos")
    }

    pub async fn health(&self) -> serde_json::Value {
        reqwest::get(format!("http://127.0.0.1:{}/health", self.port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Assigns the job and waits for its `finished` event.
    pub async fn run(&self, a: Assignment, secs: u64) -> Vec<RunnerEvent> {
        let id = a.job_id.clone();
        self.edge.assign(a).await;
        self.edge.wait_finished(&id, secs).await
    }

    /// Whether the runner has sent the job's `finished` event yet.
    pub fn has_finished(&self, job_id: &str) -> bool {
        self.edge
            .events(job_id)
            .iter()
            .any(|e| matches!(e, RunnerEvent::Finished { .. }))
    }

    /// Ends a task job's session (`complete`) and waits for its `finished` event.
    pub async fn complete(&self, job_id: &str, secs: u64) -> Vec<RunnerEvent> {
        self.edge
            .send(EdgeMessage::Complete {
                job_id: job_id.to_string(),
            })
            .await;
        self.edge.wait_finished(job_id, secs).await
    }

    /// Waits until the job is no longer held (its clean-up is done).
    pub async fn wait_released(&self, job_id: &str) {
        let sup = self.supervisor.clone();
        wait_until("the job to be released", Duration::from_secs(20), || {
            !sup.holds(job_id)
        })
        .await;
    }

    /// Stops the runner gracefully (jobs cancelled, workspaces removed).
    pub async fn stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap().take() {
            let _ = stop.send(());
        }
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the runner stops")
                .unwrap();
        }
    }
}

/// The job's `finished` event, as a tuple of its fields.
pub fn finished(
    events: &[RunnerEvent],
) -> (
    Outcome,
    String,
    Option<String>,
    Option<CompletionReason>,
    Option<u32>,
    Option<String>,
) {
    match events.last() {
        Some(RunnerEvent::Finished {
            outcome,
            message,
            pr_url,
            completion_reason,
            total_iterations,
            error_message,
            ..
        }) => (
            *outcome,
            message.clone(),
            pr_url.clone(),
            *completion_reason,
            *total_iterations,
            error_message.clone(),
        ),
        other => panic!("the last event is not finished: {other:?}\nall: {events:#?}"),
    }
}

/// Checks the envelope every job's log must have: `started` first, `finished` last and only once.
pub fn assert_started_and_finished(events: &[RunnerEvent]) {
    assert!(
        matches!(events.first(), Some(RunnerEvent::Started { .. })),
        "first event: {:?}",
        events.first()
    );
    assert!(
        matches!(events.last(), Some(RunnerEvent::Finished { .. })),
        "last event: {:?}",
        events.last()
    );
    let n = events
        .iter()
        .filter(|e| matches!(e, RunnerEvent::Finished { .. }))
        .count();
    assert_eq!(n, 1, "exactly one finished event");
}

/// Stdout lines among the events.
pub fn stdout_lines(events: &[RunnerEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Log {
                stream: kiln_schemas::events::LogStream::Stdout,
                content,
            } => Some(content.clone()),
            _ => None,
        })
        .collect()
}

pub fn stderr_lines(events: &[RunnerEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Log {
                stream: kiln_schemas::events::LogStream::Stderr,
                content,
            } => Some(content.clone()),
            _ => None,
        })
        .collect()
}

/// The Docker daemon the tests use: `DOCKER_HOST`, else the repository's private one
/// (`.kiln/docker/docker.sock`, started by `scripts/dockerd`). Panics with directions when neither
/// answers: the Docker tests fail rather than skip.
pub async fn docker_host() -> String {
    let host = std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| {
            let sock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.kiln/docker/docker.sock");
            format!("unix://{}", sock.canonicalize().unwrap_or(sock).display())
        });
    match kiln_runner::docker::DockerClient::connect(Some(&host)).await {
        Ok(client) => {
            assert!(
                client.has_image("kiln-busybox:latest").await.unwrap(),
                "the Docker daemon at {host} has no image kiln-busybox:latest: run scripts/dockerd to build it"
            );
            host
        }
        Err(e) => panic!(
            "the Docker tests need a running daemon: none answers at {host} ({e}). Start one with scripts/dockerd \
             (or point DOCKER_HOST at one that has the image kiln-busybox:latest)."
        ),
    }
}

/// The environment the stand-in agent printed for the prompt word `env`: (name, value) pairs.
pub fn agent_env(events: &[RunnerEvent]) -> Vec<(String, String)> {
    stdout_lines(events)
        .iter()
        .filter_map(|l| l.strip_prefix("env: ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What `RUNNER_AGENT_ENV=KILN_TEST_AGENT_KEY` would resolve to, plus the runner's secrets
/// slipped in as if the setting had not refused them: the executors must still drop those.
pub fn agent_env_with_secrets() -> kiln_runner::config::AgentEnv {
    kiln_runner::config::AgentEnv {
        vars: vec![
            ("KILN_TEST_AGENT_KEY".into(), "sk-kiln-test-value".into()),
            ("GITHUB_TOKEN".into(), "leaked-github-token".into()),
            ("RUNNER_TOKEN".into(), "leaked-runner-token".into()),
            (
                "RUNNER_REGISTRATION_TOKEN".into(),
                "leaked-registration".into(),
            ),
        ],
        missing: vec![],
    }
}

/// Checks what an agent run with [`agent_env_with_secrets`] saw: the listed key, none of the
/// runner's secrets (by name or by value).
pub fn assert_agent_env_passed_without_secrets(events: &[RunnerEvent]) {
    let env = agent_env(events);
    assert!(
        !env.is_empty(),
        "the agent printed its environment: {events:#?}"
    );
    assert!(
        env.contains(&("KILN_TEST_AGENT_KEY".into(), "sk-kiln-test-value".into())),
        "the agent sees RUNNER_AGENT_ENV's variable; it sees only {:?}",
        env.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    for (k, v) in &env {
        assert!(
            !["GITHUB_TOKEN", "RUNNER_TOKEN", "RUNNER_REGISTRATION_TOKEN"].contains(&k.as_str()),
            "the agent sees {k}"
        );
        for secret in ["leaked-", "gh-test-token", edge::REGISTRATION_TOKEN] {
            assert!(!v.contains(secret), "the agent sees a secret in {k}={v}");
        }
    }
}

/// Whether a process is alive (present and not a zombie).
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// The value of one series (`name` or `name{labels}`) in Prometheus text; panics when missing.
pub fn metric_value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// Assigns a code job whose agent hangs (`hang`) and waits for its output: (job id, branch,
/// the agent's pid).
pub async fn start_hanging_job(runner: &TestRunner) -> (String, String, i32) {
    let a = assignment(JobType::Code, "hang");
    let (id, branch) = (a.job_id.clone(), a.branch_name.clone());
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(
            &id,
            "the agent's output",
            20,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content.contains("still working")),
        )
        .await;
    let pid = std::fs::read_to_string(format!("/tmp/kiln-hang-{id}.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (id, branch, pid)
}
