//! The runner's settings: command-line flags and environment variables (clap), an optional TOML
//! file whose keys are the lowercase variable names, and defaults. Precedence: flag or environment
//! variable, then the file, then the default.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use kiln_schemas::grants::{ProtectedBranches, RepoPattern};
use serde::Deserialize;

pub const DEFAULT_EDGE_URL: &str = "http://127.0.0.1:8787";
pub const DEFAULT_IMAGE: &str = "kiln-busybox:latest";
pub const DEFAULT_MAX_CONCURRENT_JOBS: u32 = 2;
pub const DEFAULT_REPOS_DIR: &str = "~/repos";
pub const DEFAULT_WORKTREES_DIR: &str = "~/worktrees";
pub const DEFAULT_STATE_DIR: &str = "~/.kiln-runner";
pub const DEFAULT_GIT_BASE_URL: &str = "https://github.com";
pub const DEFAULT_GITHUB_API_URL: &str = "https://api.github.com";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8788";
pub const DEFAULT_MEMORY_MB: u64 = 2048;
pub const DEFAULT_CPUS: f64 = 1.0;
pub const DEFAULT_PIDS: i64 = 512;
pub const DEFAULT_NETWORK: &str = "none";
pub const DEFAULT_TMP_MB: u64 = 512;
pub const DEFAULT_WORKSPACE_MAX_MB: u64 = 2048;
/// `RUNNER_JOB_TIMEOUT`'s default: 2 h.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// `RUNNER_TASK_IDLE_TIMEOUT`'s default: 30 min.
pub const DEFAULT_TASK_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_FETCH_PARALLELISM: usize = 2;
/// Default of `RUNNER_CHAT_CONCURRENCY`.
pub const DEFAULT_CHAT_CONCURRENCY: usize = crate::gather::DEFAULT_CONCURRENCY;
pub const DEFAULT_MIRROR_MAX_AGE_DAYS: u64 = 14;
pub const DEFAULT_EVENT_BUFFER_MB: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read the config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {path} is not valid: {source}")]
    ParseFile {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error(transparent)]
    Llm(#[from] crate::llm::LlmConfigError),
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Which executor runs the jobs' commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorKind {
    Docker,
    Process,
}

impl ExecutorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Docker => "docker",
            ExecutorKind::Process => "process",
        }
    }
}

impl FromStr for ExecutorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "docker" => Ok(ExecutorKind::Docker),
            "process" => Ok(ExecutorKind::Process),
            other => Err(format!("must be docker or process (got {other:?})")),
        }
    }
}

/// The agent profile's kind: which CLI, how its stdout reads and how a follow-up reaches it
/// (see `crate::agent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentFormat {
    /// Any command; every line is a log line; follow-ups are lines on its stdin.
    Text,
    /// Claude Code: stream-json events; follow-ups resume its session.
    ClaudeStreamJson,
    /// OpenAI's Codex CLI: `exec --json` events; follow-ups resume its thread.
    CodexJson,
}

impl AgentFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentFormat::Text => "text",
            AgentFormat::ClaudeStreamJson => "claude-stream-json",
            AgentFormat::CodexJson => "codex-json",
        }
    }
}

impl FromStr for AgentFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "text" => Ok(AgentFormat::Text),
            "claude" | "claude-stream-json" => Ok(AgentFormat::ClaudeStreamJson),
            "codex" | "codex-json" => Ok(AgentFormat::CodexJson),
            other => Err(format!("must be claude, codex or text (got {other:?})")),
        }
    }
}

/// An extra bind mount for job containers: `host:container[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    pub container: String,
    pub read_only: bool,
}

impl Mount {
    /// The mount in Docker's `Binds` syntax.
    pub fn to_bind(&self) -> String {
        let mode = if self.read_only { ":ro" } else { "" };
        format!("{}:{}{}", self.host.display(), self.container, mode)
    }
}

/// Parses `RUNNER_MOUNTS`: comma-separated `host:container[:ro|:rw]`, both paths absolute.
pub fn parse_mounts(spec: &str) -> Result<Vec<Mount>, String> {
    let mut mounts = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parts: Vec<&str> = item.split(':').collect();
        let (host, container, read_only) = match parts.as_slice() {
            [h, c] => (*h, *c, false),
            [h, c, "ro"] => (*h, *c, true),
            [h, c, "rw"] => (*h, *c, false),
            [_, _, mode] => return Err(format!("{item:?}: mode must be ro or rw (got {mode:?})")),
            _ => return Err(format!("{item:?} is not host:container[:ro]")),
        };
        if !host.starts_with('/') || !container.starts_with('/') {
            return Err(format!("{item:?}: both paths must be absolute"));
        }
        if container == "/" || container == "/app" || container.starts_with("/app/") {
            return Err(format!(
                "{item:?}: {container} is reserved for the job's workspace"
            ));
        }
        mounts.push(Mount {
            host: PathBuf::from(host),
            container: container.to_string(),
            read_only,
        });
    }
    Ok(mounts)
}

/// The numeric user and group of job containers (numeric, so the runner can give the worktree to
/// them without reading the image's passwd file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerUser {
    pub uid: u32,
    pub gid: u32,
}

impl Default for ContainerUser {
    /// The agent image's `agent` user.
    fn default() -> Self {
        ContainerUser {
            uid: 1000,
            gid: 1000,
        }
    }
}

impl std::fmt::Display for ContainerUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

impl FromStr for ContainerUser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("must be numeric uid:gid, e.g. 1000:1000 (got {s:?})");
        let (uid, gid) = s.trim().split_once(':').ok_or_else(bad)?;
        Ok(ContainerUser {
            uid: uid.parse().map_err(|_| bad())?,
            gid: gid.parse().map_err(|_| bad())?,
        })
    }
}

/// Resource limits, network and privileges of a job container.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerLimits {
    pub memory_mb: u64,
    pub cpus: f64,
    pub pids: i64,
    pub network: String,
    /// Capabilities added back after dropping them all (`RUNNER_CAP_ADD`); none by default.
    pub cap_add: Vec<String>,
    /// Size of the container's `/tmp` (a tmpfs: the root filesystem is read-only).
    pub tmp_mb: u64,
}

impl Default for ContainerLimits {
    fn default() -> Self {
        ContainerLimits {
            memory_mb: DEFAULT_MEMORY_MB,
            cpus: DEFAULT_CPUS,
            pids: DEFAULT_PIDS,
            network: DEFAULT_NETWORK.into(),
            cap_add: Vec::new(),
            tmp_mb: DEFAULT_TMP_MB,
        }
    }
}

/// Parses `RUNNER_CAP_ADD`: comma-separated Linux capability names, with or without `CAP_`
/// (`NET_BIND_SERVICE`, `cap_chown`), stored upper-case without the prefix. `ALL` is refused: it
/// would undo dropping them.
pub fn parse_cap_add(spec: &str) -> Result<Vec<String>, String> {
    let mut caps: Vec<String> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let upper = item.to_ascii_uppercase();
        let name = upper.strip_prefix("CAP_").unwrap_or(&upper);
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            return Err(format!("{item:?} is not a capability name"));
        }
        if name == "ALL" {
            return Err("ALL is refused: name the capabilities the agent needs".into());
        }
        if !caps.iter().any(|c| c == name) {
            caps.push(name.to_string());
        }
    }
    Ok(caps)
}

/// Parses a duration setting: seconds (`7200`), or a number with `s`, `m` or `h` (`90s`, `30m`,
/// `2h`), or several of those (`1h30m`). Zero is refused.
pub fn parse_duration(spec: &str) -> Result<Duration, String> {
    let s = spec.trim();
    let bad = || format!("must be seconds or a duration such as 90s, 30m, 2h or 1h30m (got {s:?})");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in s.chars() {
        match c {
            '0'..='9' => number.push(c),
            's' | 'm' | 'h' if !number.is_empty() => {
                let n: u64 = number.parse().map_err(|_| bad())?;
                let unit = match c {
                    's' => 1,
                    'm' => 60,
                    _ => 3600,
                };
                total = n
                    .checked_mul(unit)
                    .and_then(|v| total.checked_add(v))
                    .ok_or_else(bad)?;
                number.clear();
            }
            _ => return Err(bad()),
        }
    }
    if !number.is_empty() {
        // A bare number: seconds (only on its own, not after a unit).
        if total != 0 {
            return Err(bad());
        }
        total = number.parse().map_err(|_| bad())?;
    }
    if total == 0 {
        return Err("must be longer than zero".into());
    }
    Ok(Duration::from_secs(total))
}

/// A duration as people write it: `5 s`, `30 min`, `2 h`, `90 s`.
pub fn describe_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s % 3600 == 0 {
        format!("{} h", s / 3600)
    } else if s >= 60 && s % 60 == 0 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

/// How long jobs may run and grow on this runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// `RUNNER_JOB_TIMEOUT`: the wall-clock limit of every job, from the moment it gets a slot.
    pub job_timeout: Duration,
    /// `RUNNER_TASK_IDLE_TIMEOUT`: how long a task job waits for a message after its agent's
    /// last turn.
    pub task_idle_timeout: Duration,
    /// `RUNNER_WORKSPACE_MAX_MB`, in bytes: the most a job's worktree may hold.
    pub workspace_max_bytes: u64,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits {
            job_timeout: DEFAULT_JOB_TIMEOUT,
            task_idle_timeout: DEFAULT_TASK_IDLE_TIMEOUT,
            workspace_max_bytes: DEFAULT_WORKSPACE_MAX_MB * 1024 * 1024,
        }
    }
}

/// What the runner keeps bounded besides its jobs: git fetches at once, mirrors kept, and each
/// job's buffer of events not yet posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// `RUNNER_FETCH_PARALLELISM`: mirrors fetched at once.
    pub fetch_parallelism: usize,
    /// `RUNNER_MIRROR_MAX_AGE_DAYS`: a mirror no job or request used for this long is removed.
    pub mirror_max_age: Duration,
    /// `RUNNER_EVENT_BUFFER_MB`, in bytes: a job's events waiting for the edge; output beyond
    /// it is dropped (and counted).
    pub event_buffer_bytes: usize,
    /// `RUNNER_CHAT_CONCURRENCY`: app builders' gatherer turns answered at once (besides the
    /// job slots).
    pub chat_concurrency: usize,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            fetch_parallelism: DEFAULT_FETCH_PARALLELISM,
            mirror_max_age: Duration::from_secs(DEFAULT_MIRROR_MAX_AGE_DAYS * 86_400),
            event_buffer_bytes: (DEFAULT_EVENT_BUFFER_MB * 1024 * 1024) as usize,
            chat_concurrency: DEFAULT_CHAT_CONCURRENCY,
        }
    }
}

impl JobLimits {
    /// A job's wall-clock limit and the setting it comes from: the job's own `timeoutSeconds`
    /// when it is within `RUNNER_JOB_TIMEOUT`, else `RUNNER_JOB_TIMEOUT` (which caps it).
    pub fn job_limit(&self, timeout_seconds: Option<u32>) -> (Duration, &'static str) {
        match timeout_seconds.map(|s| Duration::from_secs(s.into())) {
            Some(own) if own <= self.job_timeout => (own, "timeoutSeconds"),
            _ => (self.job_timeout, "RUNNER_JOB_TIMEOUT"),
        }
    }
}

/// The agent profile: a command line run with `sh -c`, the format of its output, and the
/// variables it gets from the runner's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentProfile {
    pub command: String,
    pub format: AgentFormat,
    pub env: AgentEnv,
    /// The agents talk to Kiln's scripted demo model, not a vendor's (`RUNNER_DEMO_MODEL`):
    /// every agent job says so in its events, and `/health` too.
    pub demo_model: bool,
}

/// The runner's own secrets: never passed to an agent, whatever `RUNNER_AGENT_ENV` says.
pub const RUNNER_SECRETS: [&str; 3] = ["GITHUB_TOKEN", "RUNNER_TOKEN", "RUNNER_REGISTRATION_TOKEN"];

/// Variables the runner sets itself for every command it runs in a sandbox.
pub const RUNNER_SET_VARS: [&str; 4] = ["JOB_ID", "ITERATION", "COMPLETION_PROMISE", "HOME"];

/// Variables copied from the runner's environment into every agent run (`RUNNER_AGENT_ENV`), so
/// an agent CLI gets its vendor key. Its `Debug` shows names only: the values are secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AgentEnv {
    /// Listed and set in the runner's environment, in list order: (name, value).
    pub vars: Vec<(String, String)>,
    /// Listed but not set in the runner's environment (the runner warns at start).
    pub missing: Vec<String>,
}

impl std::fmt::Debug for AgentEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentEnv")
            .field("vars", &self.names())
            .field("missing", &self.missing)
            .finish()
    }
}

impl AgentEnv {
    /// Names of the variables passed (values left out).
    pub fn names(&self) -> Vec<&str> {
        self.vars.iter().map(|(k, _)| k.as_str()).collect()
    }
}

fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `RUNNER_AGENT_ENV` (comma-separated variable names) and reads their values with
/// `lookup`. The runner's secrets are refused (in any letter case), and so are the variables the
/// runner sets itself; a name listed twice counts once.
pub fn parse_agent_env(
    spec: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<AgentEnv, String> {
    let mut env = AgentEnv::default();
    let mut seen = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !is_var_name(name) {
            return Err(format!("{name:?} is not a variable name"));
        }
        if let Some(secret) = RUNNER_SECRETS.iter().find(|s| s.eq_ignore_ascii_case(name)) {
            return Err(format!(
                "{name} is refused: {secret} is one of the runner's own secrets and never reaches an agent"
            ));
        }
        if RUNNER_SET_VARS.contains(&name) {
            return Err(format!(
                "{name} is refused: the runner sets it for every command"
            ));
        }
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        match lookup(name) {
            Some(value) => env.vars.push((name.to_string(), value)),
            None => env.missing.push(name.to_string()),
        }
    }
    Ok(env)
}

/// How the runner proves who it is to the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeCredential {
    /// A runner token from an earlier registration.
    Token(String),
    /// An operator's registration token: the runner registers at start and uses the token it gets.
    Registration(String),
}

/// Settings from flags and environment variables. Every field is optional so the file and the
/// defaults can fill the gaps; `runner --help` lists them all.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "runner",
    version,
    about = "Kiln's self-hosted runner: takes jobs from the edge and runs them in a container (or process group) per job over a git worktree."
)]
pub struct Args {
    /// TOML file with settings; its keys are the lowercase variable names (e.g. runner_edge_url = "...").
    #[arg(long = "config", env = "RUNNER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Base URL of the Kiln edge (the WebSocket URL is derived: http→ws, https→wss) [default: http://127.0.0.1:8787]
    #[arg(long, env = "RUNNER_EDGE_URL")]
    pub edge_url: Option<String>,
    /// Runner token from an earlier registration.
    #[arg(long, env = "RUNNER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Operator's registration token: used to register when no RUNNER_TOKEN is set and no saved registration fits (and again when the edge refuses the saved token).
    #[arg(long, env = "RUNNER_REGISTRATION_TOKEN", hide_env_values = true)]
    pub registration_token: Option<String>,
    /// Where the runner keeps the token and id the edge issued at registration (runner.json, mode 0600), reused on later starts without RUNNER_TOKEN [default: ~/.kiln-runner]
    #[arg(long, env = "RUNNER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Name this runner registers and connects under [default: the host name]
    #[arg(long, env = "RUNNER_NAME")]
    pub name: Option<String>,
    /// docker or process. docker: a hardened container per job; without a Docker daemon the runner refuses to start. process: each job's commands run on this host, with a scrubbed environment, as RUNNER_CONTAINER_USER when the runner is root (else as the runner's own user, with no isolation: /health says so) [default: docker]
    #[arg(long, env = "RUNNER_EXECUTOR")]
    pub executor: Option<String>,
    /// Image of job containers [default: kiln-busybox:latest]
    #[arg(long, env = "RUNNER_IMAGE")]
    pub image: Option<String>,
    /// Agent profile: claude (Claude Code, stream-json, follow-ups by --resume), codex (Codex CLI, exec --json, follow-ups by resume) or text (any command, follow-ups on stdin) [default: claude]
    #[arg(long, env = "RUNNER_AGENT")]
    pub agent: Option<String>,
    /// Agent command line, run with `sh -c` in the job's workspace; prompt on stdin, env JOB_ID and ITERATION (and COMPLETION_PROMISE for ralph jobs) [default: the profile's: claude --print --verbose --output-format stream-json --dangerously-skip-permissions; codex exec --json --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox; cat]
    #[arg(long, env = "RUNNER_AGENT_CMD")]
    pub agent_cmd: Option<String>,
    /// The model the agent CLI asks for when RUNNER_AGENT_CMD is not set (claude --model, codex -c model=) [default: the CLI's own]
    #[arg(long, env = "RUNNER_AGENT_MODEL")]
    pub agent_model: Option<String>,
    /// The agent profile under its older name: text, claude-stream-json or codex-json (RUNNER_AGENT wins)
    #[arg(long, env = "RUNNER_AGENT_FORMAT")]
    pub agent_format: Option<String>,
    /// The agents' model endpoint is Kiln's scripted demo model (scripts/dev sets this when no vendor key is set): every job says so in its events and /health reports it [default: false]
    #[arg(long, env = "RUNNER_DEMO_MODEL")]
    pub demo_model: Option<bool>,
    /// Variables passed from the runner's environment to every agent run, comma-separated names (e.g. ANTHROPIC_API_KEY,OPENAI_API_KEY); values are read at start. GITHUB_TOKEN, RUNNER_TOKEN and RUNNER_REGISTRATION_TOKEN are refused.
    #[arg(long, env = "RUNNER_AGENT_ENV")]
    pub agent_env: Option<String>,
    /// Jobs run at once: the runner's capacity [default: 2]
    #[arg(long, env = "MAX_CONCURRENT_JOBS")]
    pub max_concurrent_jobs: Option<u32>,
    /// Bare mirrors, one per repository: <dir>/<org>/<repo>.git [default: ~/repos]
    #[arg(long, env = "REPOS_DIR")]
    pub repos_dir: Option<PathBuf>,
    /// Job worktrees: <dir>/<job_id> [default: ~/worktrees]
    #[arg(long, env = "WORKTREES_DIR")]
    pub worktrees_dir: Option<PathBuf>,
    /// Repositories are fetched and pushed at <base>/<org>/<repo>.git [default: https://github.com]
    #[arg(long, env = "RUNNER_GIT_BASE_URL")]
    pub git_base_url: Option<String>,
    /// Repositories this runner accepts jobs for, comma-separated org/repo or org/* (e.g. acme/*); an assignment outside them fails with a clear error before anything is fetched [default: every repository the edge assigns]
    #[arg(long, env = "RUNNER_REPOSITORIES")]
    pub repositories: Option<String>,
    /// Branches this runner never pushes to, comma-separated names or prefixes ending in * (the repository's default branch is always protected) [default: main,master,develop,release/*]
    #[arg(long, env = "RUNNER_PROTECTED_BRANCHES")]
    pub protected_branches: Option<String>,
    /// GitHub token for git over https and for opening pull requests.
    #[arg(long, env = "GITHUB_TOKEN", hide_env_values = true)]
    pub github_token: Option<String>,
    /// GitHub REST API base URL [default: https://api.github.com]
    #[arg(long, env = "GITHUB_API_URL")]
    pub github_api_url: Option<String>,
    /// Address of the local health API [default: 127.0.0.1:8788]
    #[arg(long, env = "RUNNER_LISTEN")]
    pub listen: Option<String>,
    /// Memory limit of a job container in MiB [default: 2048]
    #[arg(long, env = "RUNNER_MEMORY_MB")]
    pub memory_mb: Option<u64>,
    /// CPU limit of a job container [default: 1.0]
    #[arg(long, env = "RUNNER_CPUS")]
    pub cpus: Option<f64>,
    /// Process limit of a job container [default: 512]
    #[arg(long, env = "RUNNER_PIDS")]
    pub pids: Option<i64>,
    /// Docker network mode of job containers [default: none]
    #[arg(long, env = "RUNNER_NETWORK")]
    pub network: Option<String>,
    /// Extra bind mounts for job containers: host:container[:ro], comma-separated.
    #[arg(long, env = "RUNNER_MOUNTS")]
    pub mounts: Option<String>,
    /// Capabilities given back to job containers after dropping them all, comma-separated (e.g. CHOWN,NET_BIND_SERVICE) [default: none]
    #[arg(long, env = "RUNNER_CAP_ADD")]
    pub cap_add: Option<String>,
    /// Size in MiB of a job container's /tmp, a tmpfs (the root filesystem is read-only; HOME is /tmp) [default: 512]
    #[arg(long, env = "RUNNER_TMP_MB")]
    pub tmp_mb: Option<u64>,
    /// Most a job's worktree may hold in MiB, checked after every agent run and command (and every 15 s): a job over it fails [default: 2048]
    #[arg(long, env = "RUNNER_WORKSPACE_MAX_MB")]
    pub workspace_max_mb: Option<u64>,
    /// Wall-clock limit of every job from the moment it gets a slot, in seconds or as 90s/30m/2h; a job's own timeoutSeconds may only be shorter [default: 2h]
    #[arg(long, env = "RUNNER_JOB_TIMEOUT")]
    pub job_timeout: Option<String>,
    /// How long a task job waits for a message after its agent's last turn (for a text agent: after its last output) before it fails, in seconds or as 90s/30m/2h [default: 30m]
    #[arg(long, env = "RUNNER_TASK_IDLE_TIMEOUT")]
    pub task_idle_timeout: Option<String>,
    /// Repository mirrors fetched at once (job workspaces and the edge's sync/clone requests wait for a turn) [default: 2]
    #[arg(long, env = "RUNNER_FETCH_PARALLELISM")]
    pub fetch_parallelism: Option<usize>,
    /// Days after which a mirror no job or request used is removed (checked at start and daily) [default: 14]
    #[arg(long, env = "RUNNER_MIRROR_MAX_AGE_DAYS")]
    pub mirror_max_age_days: Option<u64>,
    /// MiB of a job's events waiting for the edge; while it is full, output lines are dropped and counted (a system line says where) [default: 16]
    #[arg(long, env = "RUNNER_EVENT_BUFFER_MB")]
    pub event_buffer_mb: Option<u64>,
    /// App builders' requirements-gatherer turns (LLM calls that hold no job slot) answered at once; more wait for a turn [default: 4]
    #[arg(long, env = "RUNNER_CHAT_CONCURRENCY")]
    pub chat_concurrency: Option<usize>,
    /// Docker daemon address [default: unix:///var/run/docker.sock]
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// uid:gid that job containers (and process-executor commands) run as when the runner runs as root; the runner gives each job's worktree to it. A runner that is not root always uses its own uid:gid [default: 1000:1000, the agent image's user]
    #[arg(long, env = "RUNNER_CONTAINER_USER")]
    pub container_user: Option<String>,
    /// Model of LLM steps whose role has none of its own, as provider/model (e.g. anthropic/claude-sonnet-4-5). ANTHROPIC_API_KEY (+ ANTHROPIC_BASE_URL) defines the provider anthropic, OPENAI_API_KEY (+ OPENAI_BASE_URL) openai; more providers, roles, prices and budgets go in the config file's [llm] table [default: the file's [llm.roles] default]
    #[arg(long, env = "RUNNER_LLM_MODEL")]
    pub llm_model: Option<String>,
}

/// The same settings read from `--config`, keyed by their lowercase variable names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub runner_edge_url: Option<String>,
    pub runner_token: Option<String>,
    pub runner_registration_token: Option<String>,
    pub runner_state_dir: Option<PathBuf>,
    pub runner_name: Option<String>,
    pub runner_executor: Option<String>,
    pub runner_image: Option<String>,
    pub runner_agent: Option<String>,
    pub runner_agent_cmd: Option<String>,
    pub runner_agent_model: Option<String>,
    pub runner_agent_format: Option<String>,
    pub runner_agent_env: Option<String>,
    pub runner_demo_model: Option<bool>,
    pub max_concurrent_jobs: Option<u32>,
    pub repos_dir: Option<PathBuf>,
    pub worktrees_dir: Option<PathBuf>,
    pub runner_git_base_url: Option<String>,
    pub runner_repositories: Option<String>,
    pub runner_protected_branches: Option<String>,
    pub github_token: Option<String>,
    pub github_api_url: Option<String>,
    pub runner_listen: Option<String>,
    pub runner_memory_mb: Option<u64>,
    pub runner_cpus: Option<f64>,
    pub runner_pids: Option<i64>,
    pub runner_network: Option<String>,
    pub runner_mounts: Option<String>,
    pub runner_cap_add: Option<String>,
    pub runner_tmp_mb: Option<u64>,
    pub runner_workspace_max_mb: Option<u64>,
    pub runner_job_timeout: Option<String>,
    pub runner_task_idle_timeout: Option<String>,
    pub runner_fetch_parallelism: Option<usize>,
    pub runner_mirror_max_age_days: Option<u64>,
    pub runner_event_buffer_mb: Option<u64>,
    pub runner_chat_concurrency: Option<usize>,
    pub docker_host: Option<String>,
    pub runner_container_user: Option<String>,
    pub runner_llm_model: Option<String>,
    /// LLM providers, roles, prices and budgets (see `crate::llm::config`).
    pub llm: Option<crate::llm::LlmFile>,
    /// The 3D pipeline's vendor and WordPress site (see `crate::three_d`).
    pub three_d: Option<crate::three_d::ThreeDFile>,
}

impl FileSettings {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }
}

/// The resolved settings the runner works with.
#[derive(Debug, Clone)]
pub struct Config {
    pub edge_url: url::Url,
    pub credential: Option<EdgeCredential>,
    /// Holds `runner.json`, the saved registration.
    pub state_dir: PathBuf,
    pub name: String,
    /// `None`: not set, which means docker (the runner refuses to start without a daemon).
    pub executor: Option<ExecutorKind>,
    pub image: String,
    pub agent: AgentProfile,
    pub max_concurrent_jobs: u32,
    pub repos_dir: PathBuf,
    pub worktrees_dir: PathBuf,
    pub git_base_url: String,
    /// `RUNNER_REPOSITORIES`; empty: every repository.
    pub repositories: Vec<RepoPattern>,
    pub protected_branches: ProtectedBranches,
    pub github_token: Option<String>,
    pub github_api_url: String,
    pub listen: SocketAddr,
    pub limits: ContainerLimits,
    pub mounts: Vec<Mount>,
    pub docker_host: Option<String>,
    /// Who job containers (and process-executor commands) run as when the runner is root.
    pub container_user: ContainerUser,
    pub job_limits: JobLimits,
    /// `RUNNER_FETCH_PARALLELISM`, `RUNNER_MIRROR_MAX_AGE_DAYS`, `RUNNER_EVENT_BUFFER_MB`.
    pub resources: Resources,
    /// LLM providers, role assignments, prices, retries and the per-job budget.
    pub llm: crate::llm::LlmConfig,
    /// The 3D pipeline's vendor and WordPress site; keys from the runner's environment.
    pub three_d: crate::three_d::ThreeDConfig,
}

/// What resolution needs from the machine, passed in so resolution stays a pure function.
#[derive(Clone, Default)]
pub struct Host {
    pub home: Option<PathBuf>,
    pub hostname: String,
    /// The runner's environment (where `RUNNER_AGENT_ENV` values come from).
    pub vars: HashMap<String, String>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("Host")
            .field("home", &self.home)
            .field("hostname", &self.hostname)
            .field("vars", &names)
            .finish()
    }
}

impl Host {
    pub fn current() -> Host {
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "kiln-runner".to_string());
        Host {
            home: std::env::var_os("HOME").map(PathBuf::from),
            hostname,
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }
}

fn expand_home(path: PathBuf, host: &Host) -> Result<PathBuf, String> {
    let s = path.to_string_lossy();
    if s == "~" || s.starts_with("~/") {
        let home = host.home.as_ref().ok_or("uses ~ but HOME is not set")?;
        return Ok(home.join(s.trim_start_matches('~').trim_start_matches('/')));
    }
    Ok(path)
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

impl Config {
    /// Reads flags and environment, then the config file they name, and resolves.
    pub fn load() -> Result<Config, ConfigError> {
        let args = Args::parse();
        let file = match &args.config {
            Some(path) => FileSettings::read(path)?,
            None => FileSettings::default(),
        };
        Config::resolve(args, file, &Host::current())
    }

    /// Flags and environment beat the file, which beats the defaults.
    pub fn resolve(args: Args, file: FileSettings, host: &Host) -> Result<Config, ConfigError> {
        let edge = non_empty(args.edge_url.or(file.runner_edge_url))
            .unwrap_or_else(|| DEFAULT_EDGE_URL.into());
        let edge_url = url::Url::parse(&edge)
            .map_err(|e| invalid("RUNNER_EDGE_URL", format!("{edge:?}: {e}")))?;
        if !matches!(edge_url.scheme(), "http" | "https") {
            return Err(invalid(
                "RUNNER_EDGE_URL",
                "must be an http:// or https:// URL",
            ));
        }

        let credential = match (
            non_empty(args.token.or(file.runner_token)),
            non_empty(args.registration_token.or(file.runner_registration_token)),
        ) {
            (Some(t), _) => Some(EdgeCredential::Token(t)),
            (None, Some(r)) => Some(EdgeCredential::Registration(r)),
            (None, None) => None,
        };

        let name =
            non_empty(args.name.or(file.runner_name)).unwrap_or_else(|| host.hostname.clone());
        let executor = non_empty(args.executor.or(file.runner_executor))
            .map(|s| {
                s.parse::<ExecutorKind>()
                    .map_err(|e| invalid("RUNNER_EXECUTOR", e))
            })
            .transpose()?;
        let image =
            non_empty(args.image.or(file.runner_image)).unwrap_or_else(|| DEFAULT_IMAGE.into());
        let format = match (
            non_empty(args.agent.or(file.runner_agent)),
            non_empty(args.agent_format.or(file.runner_agent_format)),
        ) {
            (Some(p), _) => p.parse().map_err(|e| invalid("RUNNER_AGENT", e))?,
            (None, Some(f)) => f.parse().map_err(|e| invalid("RUNNER_AGENT_FORMAT", e))?,
            (None, None) => AgentFormat::ClaudeStreamJson,
        };
        let agent_env = match non_empty(args.agent_env.or(file.runner_agent_env)) {
            Some(spec) => parse_agent_env(&spec, |name| host.vars.get(name).cloned())
                .map_err(|e| invalid("RUNNER_AGENT_ENV", e))?,
            None => AgentEnv::default(),
        };
        let agent = AgentProfile {
            command: match non_empty(args.agent_cmd.or(file.runner_agent_cmd)) {
                Some(command) => command,
                None => format
                    .default_command_for(
                        non_empty(args.agent_model.or(file.runner_agent_model)).as_deref(),
                        &agent_env.vars,
                    )
                    .map_err(|e| invalid("RUNNER_AGENT_MODEL", e))?,
            },
            format,
            demo_model: args.demo_model.or(file.runner_demo_model).unwrap_or(false),
            env: agent_env,
        };

        let max_concurrent_jobs = args
            .max_concurrent_jobs
            .or(file.max_concurrent_jobs)
            .unwrap_or(DEFAULT_MAX_CONCURRENT_JOBS);
        if max_concurrent_jobs == 0 {
            return Err(invalid("MAX_CONCURRENT_JOBS", "must be at least 1"));
        }

        let repos_dir = expand_home(
            args.repos_dir
                .or(file.repos_dir)
                .unwrap_or_else(|| DEFAULT_REPOS_DIR.into()),
            host,
        )
        .map_err(|e| invalid("REPOS_DIR", e))?;
        let state_dir = expand_home(
            args.state_dir
                .or(file.runner_state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            host,
        )
        .map_err(|e| invalid("RUNNER_STATE_DIR", e))?;
        let worktrees_dir = expand_home(
            args.worktrees_dir
                .or(file.worktrees_dir)
                .unwrap_or_else(|| DEFAULT_WORKTREES_DIR.into()),
            host,
        )
        .map_err(|e| invalid("WORKTREES_DIR", e))?;

        let git_base_url = non_empty(args.git_base_url.or(file.runner_git_base_url))
            .unwrap_or_else(|| DEFAULT_GIT_BASE_URL.into())
            .trim_end_matches('/')
            .to_string();
        url::Url::parse(&git_base_url)
            .map_err(|e| invalid("RUNNER_GIT_BASE_URL", format!("{git_base_url:?}: {e}")))?;

        let repositories = match non_empty(args.repositories.or(file.runner_repositories)) {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(RepoPattern::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("RUNNER_REPOSITORIES", e))?,
            None => Vec::new(),
        };
        let protected_branches =
            match non_empty(args.protected_branches.or(file.runner_protected_branches)) {
                Some(list) => ProtectedBranches::parse(&list),
                None => ProtectedBranches::default(),
            };

        let github_api_url = non_empty(args.github_api_url.or(file.github_api_url))
            .unwrap_or_else(|| DEFAULT_GITHUB_API_URL.into())
            .trim_end_matches('/')
            .to_string();
        url::Url::parse(&github_api_url)
            .map_err(|e| invalid("GITHUB_API_URL", format!("{github_api_url:?}: {e}")))?;

        let listen_s =
            non_empty(args.listen.or(file.runner_listen)).unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = listen_s
            .parse::<SocketAddr>()
            .map_err(|e| invalid("RUNNER_LISTEN", format!("{listen_s:?}: {e}")))?;

        let limits = ContainerLimits {
            memory_mb: args
                .memory_mb
                .or(file.runner_memory_mb)
                .unwrap_or(DEFAULT_MEMORY_MB),
            cpus: args.cpus.or(file.runner_cpus).unwrap_or(DEFAULT_CPUS),
            pids: args.pids.or(file.runner_pids).unwrap_or(DEFAULT_PIDS),
            network: non_empty(args.network.or(file.runner_network))
                .unwrap_or_else(|| DEFAULT_NETWORK.into()),
            cap_add: match non_empty(args.cap_add.or(file.runner_cap_add)) {
                Some(spec) => parse_cap_add(&spec).map_err(|e| invalid("RUNNER_CAP_ADD", e))?,
                None => Vec::new(),
            },
            tmp_mb: args.tmp_mb.or(file.runner_tmp_mb).unwrap_or(DEFAULT_TMP_MB),
        };
        if limits.tmp_mb < 1 {
            return Err(invalid("RUNNER_TMP_MB", "must be at least 1"));
        }
        let workspace_max_mb = args
            .workspace_max_mb
            .or(file.runner_workspace_max_mb)
            .unwrap_or(DEFAULT_WORKSPACE_MAX_MB);
        if workspace_max_mb < 1 {
            return Err(invalid("RUNNER_WORKSPACE_MAX_MB", "must be at least 1"));
        }
        let job_limits = JobLimits {
            job_timeout: match non_empty(args.job_timeout.or(file.runner_job_timeout)) {
                Some(spec) => {
                    parse_duration(&spec).map_err(|e| invalid("RUNNER_JOB_TIMEOUT", e))?
                }
                None => DEFAULT_JOB_TIMEOUT,
            },
            task_idle_timeout: match non_empty(
                args.task_idle_timeout.or(file.runner_task_idle_timeout),
            ) {
                Some(spec) => {
                    parse_duration(&spec).map_err(|e| invalid("RUNNER_TASK_IDLE_TIMEOUT", e))?
                }
                None => DEFAULT_TASK_IDLE_TIMEOUT,
            },
            workspace_max_bytes: workspace_max_mb * 1024 * 1024,
        };
        if limits.memory_mb < 6 {
            return Err(invalid(
                "RUNNER_MEMORY_MB",
                "must be at least 6 (Docker's minimum)",
            ));
        }
        if !(limits.cpus > 0.0 && limits.cpus.is_finite()) {
            return Err(invalid("RUNNER_CPUS", "must be a positive number"));
        }
        if limits.pids < 1 {
            return Err(invalid("RUNNER_PIDS", "must be at least 1"));
        }

        let fetch_parallelism = args
            .fetch_parallelism
            .or(file.runner_fetch_parallelism)
            .unwrap_or(DEFAULT_FETCH_PARALLELISM);
        if fetch_parallelism < 1 {
            return Err(invalid("RUNNER_FETCH_PARALLELISM", "must be at least 1"));
        }
        let mirror_max_age_days = args
            .mirror_max_age_days
            .or(file.runner_mirror_max_age_days)
            .unwrap_or(DEFAULT_MIRROR_MAX_AGE_DAYS);
        if mirror_max_age_days < 1 {
            return Err(invalid("RUNNER_MIRROR_MAX_AGE_DAYS", "must be at least 1"));
        }
        let event_buffer_mb = args
            .event_buffer_mb
            .or(file.runner_event_buffer_mb)
            .unwrap_or(DEFAULT_EVENT_BUFFER_MB);
        if event_buffer_mb < 1 {
            return Err(invalid("RUNNER_EVENT_BUFFER_MB", "must be at least 1"));
        }
        let chat_concurrency = args
            .chat_concurrency
            .or(file.runner_chat_concurrency)
            .unwrap_or(DEFAULT_CHAT_CONCURRENCY);
        if chat_concurrency < 1 {
            return Err(invalid("RUNNER_CHAT_CONCURRENCY", "must be at least 1"));
        }
        let resources = Resources {
            fetch_parallelism,
            mirror_max_age: Duration::from_secs(mirror_max_age_days * 86_400),
            event_buffer_bytes: (event_buffer_mb * 1024 * 1024) as usize,
            chat_concurrency,
        };

        let mounts = match non_empty(args.mounts.or(file.runner_mounts)) {
            Some(spec) => parse_mounts(&spec).map_err(|e| invalid("RUNNER_MOUNTS", e))?,
            None => Vec::new(),
        };

        Ok(Config {
            edge_url,
            credential,
            state_dir,
            name,
            executor,
            image,
            agent,
            max_concurrent_jobs,
            repos_dir,
            worktrees_dir,
            git_base_url,
            repositories,
            protected_branches,
            github_token: non_empty(args.github_token.or(file.github_token)),
            github_api_url,
            listen,
            limits,
            mounts,
            docker_host: non_empty(args.docker_host.or(file.docker_host)),
            container_user: match non_empty(args.container_user.or(file.runner_container_user)) {
                Some(spec) => spec
                    .parse()
                    .map_err(|e| invalid("RUNNER_CONTAINER_USER", e))?,
                None => ContainerUser::default(),
            },
            job_limits,
            resources,
            llm: crate::llm::LlmConfig::resolve(
                file.llm,
                non_empty(args.llm_model.or(file.runner_llm_model)).as_deref(),
                &host.vars,
            )?,
            three_d: crate::three_d::ThreeDConfig::resolve(file.three_d, &host.vars)
                .map_err(|e| invalid("[three_d]", e))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            home: Some("/home/kiln".into()),
            hostname: "box-1".into(),
            vars: HashMap::from([
                ("ANTHROPIC_API_KEY".to_string(), "sk-ant-secret".to_string()),
                ("OPENAI_API_KEY".to_string(), "sk-openai-secret".to_string()),
                ("GITHUB_TOKEN".to_string(), "ghp-secret".to_string()),
            ]),
        }
    }

    #[test]
    fn defaults_fill_everything() {
        let c = Config::resolve(Args::default(), FileSettings::default(), &host()).unwrap();
        assert_eq!(c.edge_url.as_str(), "http://127.0.0.1:8787/");
        assert_eq!(c.credential, None);
        assert_eq!(c.name, "box-1");
        assert_eq!(c.executor, None);
        assert_eq!(c.image, "kiln-busybox:latest");
        assert_eq!(c.agent.format, AgentFormat::ClaudeStreamJson);
        assert_eq!(c.max_concurrent_jobs, 2);
        assert_eq!(c.repos_dir, PathBuf::from("/home/kiln/repos"));
        assert_eq!(c.worktrees_dir, PathBuf::from("/home/kiln/worktrees"));
        assert_eq!(c.state_dir, PathBuf::from("/home/kiln/.kiln-runner"));
        assert_eq!(c.git_base_url, "https://github.com");
        assert_eq!(c.github_api_url, "https://api.github.com");
        assert_eq!(c.listen, "127.0.0.1:8788".parse().unwrap());
        assert_eq!(c.limits, ContainerLimits::default());
        assert!(
            c.limits.cap_add.is_empty(),
            "no capability is added by default"
        );
        assert_eq!(c.limits.tmp_mb, 512);
        assert!(c.mounts.is_empty());
        assert_eq!(c.job_limits.job_timeout, Duration::from_secs(7200));
        assert_eq!(c.job_limits.task_idle_timeout, Duration::from_secs(1800));
        assert_eq!(c.job_limits.workspace_max_bytes, 2048 * 1024 * 1024);
        assert_eq!(c.resources, Resources::default());
        assert_eq!(c.resources.fetch_parallelism, 2);
        assert_eq!(c.resources.mirror_max_age, Duration::from_secs(14 * 86_400));
        assert_eq!(c.resources.event_buffer_bytes, 16 * 1024 * 1024);
    }

    #[test]
    fn durations_parse_in_seconds_or_units() {
        for (spec, secs) in [
            ("7200", 7200),
            ("2h", 7200),
            ("30m", 1800),
            ("90s", 90),
            (" 1h30m ", 5400),
            ("1h0m5s", 3605),
        ] {
            assert_eq!(
                parse_duration(spec),
                Ok(Duration::from_secs(secs)),
                "{spec}"
            );
        }
        for bad in ["", "0", "0s", "2d", "h", "1.5h", "-5", "5m3", "1 h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(describe_duration(Duration::from_secs(5)), "5 s");
        assert_eq!(describe_duration(Duration::from_secs(90)), "90 s");
        assert_eq!(describe_duration(Duration::from_secs(1800)), "30 min");
        assert_eq!(describe_duration(Duration::from_secs(7200)), "2 h");
        let c = Config::resolve(
            Args {
                job_timeout: Some("30m".into()),
                task_idle_timeout: Some("45".into()),
                workspace_max_mb: Some(10),
                ..Default::default()
            },
            FileSettings::default(),
            &host(),
        )
        .unwrap();
        assert_eq!(
            c.job_limits,
            JobLimits {
                job_timeout: Duration::from_secs(1800),
                task_idle_timeout: Duration::from_secs(45),
                workspace_max_bytes: 10 * 1024 * 1024,
            }
        );
    }

    #[test]
    fn a_jobs_own_timeout_is_capped_by_the_runners() {
        let limits = JobLimits {
            job_timeout: Duration::from_secs(600),
            ..Default::default()
        };
        assert_eq!(
            limits.job_limit(Some(5)),
            (Duration::from_secs(5), "timeoutSeconds")
        );
        assert_eq!(
            limits.job_limit(Some(600)),
            (Duration::from_secs(600), "timeoutSeconds")
        );
        assert_eq!(
            limits.job_limit(Some(601)),
            (Duration::from_secs(600), "RUNNER_JOB_TIMEOUT")
        );
        assert_eq!(
            limits.job_limit(None),
            (Duration::from_secs(600), "RUNNER_JOB_TIMEOUT")
        );
    }

    #[test]
    fn added_capabilities_are_names() {
        assert_eq!(
            parse_cap_add(" chown, CAP_NET_BIND_SERVICE ,CHOWN").unwrap(),
            vec!["CHOWN".to_string(), "NET_BIND_SERVICE".to_string()]
        );
        assert_eq!(parse_cap_add("").unwrap(), Vec::<String>::new());
        for bad in ["ALL", "cap_all", "NET-ADMIN", "CAP_", "SYS ADMIN"] {
            assert!(parse_cap_add(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_beat_file_beats_defaults() {
        let file = FileSettings::parse(
            r#"
            runner_edge_url = "http://file:1"
            runner_name = "from-file"
            max_concurrent_jobs = 7
            runner_image = "file-image"
            runner_registration_token = "reg"
            "#,
        )
        .unwrap();
        let flags = Args {
            edge_url: Some("https://flag:2".into()),
            max_concurrent_jobs: Some(3),
            ..Default::default()
        };
        let c = Config::resolve(flags, file, &host()).unwrap();
        assert_eq!(c.edge_url.as_str(), "https://flag:2/");
        assert_eq!(c.max_concurrent_jobs, 3);
        assert_eq!(c.name, "from-file");
        assert_eq!(c.image, "file-image");
        assert_eq!(
            c.credential,
            Some(EdgeCredential::Registration("reg".into()))
        );
    }

    #[test]
    fn a_runner_token_beats_a_registration_token() {
        let file = FileSettings {
            runner_registration_token: Some("reg".into()),
            ..Default::default()
        };
        let c = Config::resolve(
            Args {
                token: Some("tok".into()),
                ..Default::default()
            },
            file,
            &host(),
        )
        .unwrap();
        assert_eq!(c.credential, Some(EdgeCredential::Token("tok".into())));
    }

    #[test]
    fn flags_parse_from_the_command_line() {
        let a = Args::try_parse_from([
            "runner",
            "--edge-url",
            "http://e:1",
            "--max-concurrent-jobs",
            "4",
            "--cpus",
            "0.5",
        ])
        .unwrap();
        assert_eq!(
            (a.edge_url.as_deref(), a.max_concurrent_jobs, a.cpus),
            (Some("http://e:1"), Some(4), Some(0.5))
        );
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(FileSettings::parse("runner_edge_ulr = \"x\"").is_err());
        assert!(FileSettings::parse("max_concurrent_jobs = \"two\"").is_err());
    }

    #[test]
    fn bad_values_name_their_setting() {
        let cases: Vec<(Args, &str)> = vec![
            (
                Args {
                    executor: Some("vm".into()),
                    ..Default::default()
                },
                "RUNNER_EXECUTOR",
            ),
            (
                Args {
                    agent_format: Some("xml".into()),
                    ..Default::default()
                },
                "RUNNER_AGENT_FORMAT",
            ),
            (
                Args {
                    agent: Some("gemini".into()),
                    ..Default::default()
                },
                "RUNNER_AGENT",
            ),
            (
                Args {
                    edge_url: Some("ftp://x".into()),
                    ..Default::default()
                },
                "RUNNER_EDGE_URL",
            ),
            (
                Args {
                    max_concurrent_jobs: Some(0),
                    ..Default::default()
                },
                "MAX_CONCURRENT_JOBS",
            ),
            (
                Args {
                    listen: Some("nowhere".into()),
                    ..Default::default()
                },
                "RUNNER_LISTEN",
            ),
            (
                Args {
                    mounts: Some("relative:/x".into()),
                    ..Default::default()
                },
                "RUNNER_MOUNTS",
            ),
            (
                Args {
                    cpus: Some(0.0),
                    ..Default::default()
                },
                "RUNNER_CPUS",
            ),
            (
                Args {
                    cap_add: Some("ALL".into()),
                    ..Default::default()
                },
                "RUNNER_CAP_ADD",
            ),
            (
                Args {
                    tmp_mb: Some(0),
                    ..Default::default()
                },
                "RUNNER_TMP_MB",
            ),
            (
                Args {
                    workspace_max_mb: Some(0),
                    ..Default::default()
                },
                "RUNNER_WORKSPACE_MAX_MB",
            ),
            (
                Args {
                    job_timeout: Some("forever".into()),
                    ..Default::default()
                },
                "RUNNER_JOB_TIMEOUT",
            ),
            (
                Args {
                    task_idle_timeout: Some("0".into()),
                    ..Default::default()
                },
                "RUNNER_TASK_IDLE_TIMEOUT",
            ),
        ];
        for (flags, key) in cases {
            let err = Config::resolve(flags, FileSettings::default(), &host()).unwrap_err();
            assert!(err.to_string().starts_with(key), "{key}: {err}");
        }
    }

    #[test]
    fn home_is_expanded_only_at_the_start() {
        let file = FileSettings {
            repos_dir: Some("~/r".into()),
            worktrees_dir: Some("/srv/~/w".into()),
            runner_state_dir: Some("~/state".into()),
            ..Default::default()
        };
        let c = Config::resolve(Args::default(), file, &host()).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/home/kiln/state"));
        assert_eq!(c.repos_dir, PathBuf::from("/home/kiln/r"));
        assert_eq!(c.worktrees_dir, PathBuf::from("/srv/~/w"));
        let no_home = Host {
            home: None,
            hostname: "h".into(),
            ..Default::default()
        };
        assert!(Config::resolve(Args::default(), FileSettings::default(), &no_home).is_err());
    }

    #[test]
    fn a_profile_brings_its_command_unless_one_is_named() {
        let resolve = |args: Args| {
            Config::resolve(args, FileSettings::default(), &host())
                .unwrap()
                .agent
        };
        let a = resolve(Args::default());
        assert_eq!(a.format, AgentFormat::ClaudeStreamJson);
        assert!(a.command.starts_with("claude --print"), "{}", a.command);
        let a = resolve(Args {
            agent: Some("codex".into()),
            agent_format: Some("text".into()),
            ..Default::default()
        });
        assert_eq!(
            a.format,
            AgentFormat::CodexJson,
            "RUNNER_AGENT beats RUNNER_AGENT_FORMAT"
        );
        assert!(a.command.starts_with("codex exec --json"), "{}", a.command);
        let a = resolve(Args {
            agent_format: Some("text".into()),
            agent_cmd: Some("./my-agent".into()),
            ..Default::default()
        });
        assert_eq!(
            (a.format, a.command.as_str()),
            (AgentFormat::Text, "./my-agent")
        );
    }

    #[test]
    fn repositories_and_protected_branches_parse() {
        let c = Config::resolve(
            Args {
                repositories: Some(" acme/* , Other/Site ".into()),
                protected_branches: Some("main,prod/*".into()),
                ..Default::default()
            },
            FileSettings::default(),
            &host(),
        )
        .unwrap();
        assert_eq!(c.repositories.len(), 2);
        assert!(c.repositories[0].matches("ACME", "shop"));
        assert!(c.repositories[1].matches("other", "site"));
        assert!(c.protected_branches.protects("prod/eu", None));
        assert!(!c.protected_branches.protects("master", None));
        let d = Config::resolve(Args::default(), FileSettings::default(), &host()).unwrap();
        assert!(d.repositories.is_empty());
        assert!(d.protected_branches.protects("release/1.2", None));
        let bad = Config::resolve(
            Args {
                repositories: Some("acme".into()),
                ..Default::default()
            },
            FileSettings::default(),
            &host(),
        )
        .unwrap_err();
        assert!(bad.to_string().starts_with("RUNNER_REPOSITORIES"), "{bad}");
    }

    #[test]
    fn container_users_are_numeric_pairs() {
        assert_eq!(
            "0:0".parse::<ContainerUser>().unwrap(),
            ContainerUser { uid: 0, gid: 0 }
        );
        assert_eq!(ContainerUser::default().to_string(), "1000:1000");
        for bad in ["agent", "1000", "1000:", ":1000", "a:b", "-1:0"] {
            assert!(bad.parse::<ContainerUser>().is_err(), "{bad}");
        }
        let c = Config::resolve(
            Args {
                container_user: Some("2000:3000".into()),
                ..Default::default()
            },
            FileSettings::default(),
            &host(),
        )
        .unwrap();
        assert_eq!(
            c.container_user,
            ContainerUser {
                uid: 2000,
                gid: 3000
            }
        );
    }

    #[test]
    fn mounts_parse() {
        assert_eq!(
            parse_mounts(" /opt/agents:/agents:ro, /data:/data ,/x:/y:rw").unwrap(),
            vec![
                Mount {
                    host: "/opt/agents".into(),
                    container: "/agents".into(),
                    read_only: true
                },
                Mount {
                    host: "/data".into(),
                    container: "/data".into(),
                    read_only: false
                },
                Mount {
                    host: "/x".into(),
                    container: "/y".into(),
                    read_only: false
                },
            ]
        );
        assert_eq!(parse_mounts("").unwrap(), vec![]);
        assert_eq!(parse_mounts("/a:/b:ro").unwrap()[0].to_bind(), "/a:/b:ro");
        for bad in [
            "/a",
            "/a:b",
            "a:/b",
            "/a:/b:rx",
            "/a:/b:ro:x",
            "/a:/app",
            "/a:/app/x",
            "/a:/",
        ] {
            assert!(parse_mounts(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn agent_env_values_come_from_the_runners_environment() {
        let file = FileSettings::parse(r#"runner_agent_env = "OPENAI_API_KEY""#).unwrap();
        let c = Config::resolve(Args::default(), file, &host()).unwrap();
        assert_eq!(
            c.agent.env.vars,
            vec![("OPENAI_API_KEY".into(), "sk-openai-secret".into())]
        );
        let c = Config::resolve(
            Args {
                agent_env: Some(" ANTHROPIC_API_KEY, NOT_SET ,ANTHROPIC_API_KEY,".into()),
                ..Default::default()
            },
            FileSettings::default(),
            &host(),
        )
        .unwrap();
        assert_eq!(
            c.agent.env.vars,
            vec![("ANTHROPIC_API_KEY".into(), "sk-ant-secret".into())]
        );
        assert_eq!(c.agent.env.missing, vec!["NOT_SET".to_string()]);
        let shown = format!("{c:?}");
        assert!(shown.contains("ANTHROPIC_API_KEY"), "{shown}");
        assert!(
            !shown.contains("sk-ant-secret"),
            "values never show: {shown}"
        );
        let c = Config::resolve(Args::default(), FileSettings::default(), &host()).unwrap();
        assert_eq!(c.agent.env, AgentEnv::default());
        assert!(!format!("{:?}", host()).contains("ghp-secret"));
    }

    #[test]
    fn agent_env_refuses_the_runners_secrets_and_its_own_variables() {
        for spec in [
            "GITHUB_TOKEN",
            "ANTHROPIC_API_KEY,RUNNER_TOKEN",
            "RUNNER_REGISTRATION_TOKEN",
            "github_token",
            "JOB_ID",
            "ITERATION",
            "COMPLETION_PROMISE",
            "HOME",
            "A-B",
            "1ABC",
            "A=B",
        ] {
            let err = Config::resolve(
                Args {
                    agent_env: Some(spec.into()),
                    ..Default::default()
                },
                FileSettings::default(),
                &host(),
            )
            .unwrap_err()
            .to_string();
            assert!(err.starts_with("RUNNER_AGENT_ENV: "), "{spec}: {err}");
            assert!(!err.contains("ghp-secret"), "no value in the error: {err}");
        }
        let err = parse_agent_env("OPENAI_API_KEY,GITHUB_TOKEN", |_| None).unwrap_err();
        assert!(
            err.contains("GITHUB_TOKEN") && err.contains("never reaches an agent"),
            "{err}"
        );
    }

    #[test]
    fn llm_settings_come_from_the_file_the_model_variable_and_the_vendor_keys() {
        let file = FileSettings::parse(
            r#"
            runner_name = "box"
            [llm]
            budget_tokens = 5000
            [llm.providers.local]
            api = "openai"
            base_url = "http://127.0.0.1:11434/v1"
            [llm.roles]
            default = "local/qwen3:8b"
            gatherer = "anthropic/claude-haiku-4-5"
            "#,
        )
        .unwrap();
        let c = Config::resolve(Args::default(), file.clone(), &host()).unwrap();
        assert_eq!(c.llm.route("ceo").unwrap().1.to_string(), "local/qwen3:8b");
        let (p, m) = c.llm.route("gatherer").unwrap();
        assert_eq!(
            (p.name.as_str(), m.model.as_str()),
            ("anthropic", "claude-haiku-4-5")
        );
        assert_eq!(c.llm.budget.max_tokens, Some(5000));
        assert!(
            !format!("{c:?}").contains("sk-ant-secret"),
            "the key never shows"
        );
        let c = Config::resolve(
            Args {
                llm_model: Some("openai/gpt-4o-mini".into()),
                ..Default::default()
            },
            file,
            &host(),
        )
        .unwrap();
        assert_eq!(
            c.llm.route("ceo").unwrap().1.to_string(),
            "openai/gpt-4o-mini"
        );

        let d = Config::resolve(Args::default(), FileSettings::default(), &host()).unwrap();
        assert_eq!(
            d.llm.providers.keys().collect::<Vec<_>>(),
            vec!["anthropic", "openai"],
            "the vendor keys define their providers"
        );
        assert!(d.llm.route("default").is_none(), "no model is guessed");

        let err = Config::resolve(
            Args {
                llm_model: Some("groq/llama".into()),
                ..Default::default()
            },
            FileSettings::default(),
            &host(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("RUNNER_LLM_MODEL: no provider named \"groq\""),
            "{err}"
        );
        let file = FileSettings::parse(
            "[llm.providers.groq]\napi = \"openai\"\napi_key_env = \"GROQ_API_KEY\"",
        )
        .unwrap();
        let err = Config::resolve(Args::default(), file, &host())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "[llm.providers.groq] api_key_env: GROQ_API_KEY is not set in the runner's environment"
        );
        assert!(FileSettings::parse("[llm]\nbudget = 1").is_err());
    }

    #[test]
    fn help_lists_every_setting() {
        use clap::CommandFactory;
        let help = Args::command().render_long_help().to_string();
        for var in [
            "RUNNER_CONFIG",
            "RUNNER_EDGE_URL",
            "RUNNER_TOKEN",
            "RUNNER_REGISTRATION_TOKEN",
            "RUNNER_STATE_DIR",
            "RUNNER_NAME",
            "RUNNER_EXECUTOR",
            "RUNNER_IMAGE",
            "RUNNER_AGENT",
            "RUNNER_AGENT_CMD",
            "RUNNER_AGENT_MODEL",
            "RUNNER_AGENT_FORMAT",
            "RUNNER_CONTAINER_USER",
            "RUNNER_AGENT_ENV",
            "RUNNER_DEMO_MODEL",
            "MAX_CONCURRENT_JOBS",
            "REPOS_DIR",
            "WORKTREES_DIR",
            "RUNNER_GIT_BASE_URL",
            "RUNNER_REPOSITORIES",
            "RUNNER_PROTECTED_BRANCHES",
            "GITHUB_TOKEN",
            "GITHUB_API_URL",
            "RUNNER_LISTEN",
            "RUNNER_MEMORY_MB",
            "RUNNER_CPUS",
            "RUNNER_PIDS",
            "RUNNER_NETWORK",
            "RUNNER_MOUNTS",
            "RUNNER_CAP_ADD",
            "RUNNER_TMP_MB",
            "RUNNER_WORKSPACE_MAX_MB",
            "RUNNER_JOB_TIMEOUT",
            "RUNNER_TASK_IDLE_TIMEOUT",
            "RUNNER_FETCH_PARALLELISM",
            "RUNNER_MIRROR_MAX_AGE_DAYS",
            "RUNNER_EVENT_BUFFER_MB",
            "RUNNER_CHAT_CONCURRENCY",
            "RUNNER_LLM_MODEL",
            "DOCKER_HOST",
        ] {
            assert!(
                help.contains(&format!("[env: {var}")),
                "--help misses {var}"
            );
        }
    }
}
