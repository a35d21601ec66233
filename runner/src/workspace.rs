//! Git workspaces: a bare mirror per repository at `REPOS_DIR/<org>/<repo>.git`, and a worktree per
//! job at `WORKTREES_DIR/<job_id>` on the job's branch (an app build's is a new repository of its
//! own there, its git directory beside it at `<job_id>.git`). What the worktrees of a mirror share
//! and git does not lock for us (fetch, worktree add and prune, deleting branches) holds that
//! mirror's lock; what one worktree does on its own (checkout, status, add, commit, push) runs
//! without it: git keeps each worktree's index and HEAD apart and updates each ref under a lock
//! file. No git command collects garbage on its own (`gc.auto=0`, `maintenance.auto=false`): that
//! runs under the lock when no worktree of the mirror is in use. A finished job's directory is
//! deleted at once; its worktree entry and branch are dropped with others in a batch under the
//! lock (every [`DROP_BATCH`] clean-ups, at the runner's tidy-up, or before a worktree that needs
//! them gone is added). User-supplied names are validated
//! and never reach git as options. Commands inside a worktree name its git directory explicitly,
//! so a `.git` file the agent rewrote cannot point git at configuration (and hooks) of the
//! agent's making.
//!
//! Bounded: at most `RUNNER_FETCH_PARALLELISM` fetches run at once; at start the runner sweeps
//! what a crash left (worktrees no job holds, their branches in the mirrors); mirrors no job or
//! request used for `RUNNER_MIRROR_MAX_AGE_DAYS` are removed (at start and daily).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use kiln_schemas::validate::{is_branch_name, is_repo_component};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard, Semaphore};

pub const AUTHOR_NAME: &str = "Kiln";
pub const AUTHOR_EMAIL: &str = "kiln@localhost";
/// A file in each mirror whose modification time says when a job or request last used it.
pub const LAST_USED_FILE: &str = "kiln-last-used";
/// Suffix of a ralph job's progress notes beside its worktree.
const PROGRESS_SUFFIX: &str = ".progress.md";
/// Suffix of an app build's git directory beside its workspace (out of the agent's reach).
const APP_GIT_SUFFIX: &str = ".git";
/// The owner an app build's workspace is locked under (its repository is the job's own).
const APP_OWNER: &str = "kiln-app";
/// Suffix of a landing session's bundle file while it is read or written beside its workspace.
const SESSION_BUNDLE_SUFFIX: &str = ".bundle";

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("{0}")]
    Invalid(String),
    #[error("could not run git: {0}")]
    Spawn(std::io::Error),
    #[error("`git {command}` failed (exit code {code}): {stderr}")]
    Failed {
        command: String,
        code: i32,
        stderr: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GitError {
    let context = context.into();
    move |source| GitError::Io { context, source }
}

/// A repository on the git host, by owner and name (both validated).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoRef {
    pub org: String,
    pub repo: String,
}

impl RepoRef {
    pub fn new(org: &str, repo: &str) -> Result<RepoRef, GitError> {
        if !is_repo_component(org) {
            return Err(GitError::Invalid(format!(
                "{org:?} is not a valid GitHub owner name"
            )));
        }
        if !is_repo_component(repo) {
            return Err(GitError::Invalid(format!(
                "{repo:?} is not a valid GitHub repository name"
            )));
        }
        Ok(RepoRef {
            org: org.to_string(),
            repo: repo.to_string(),
        })
    }

    /// `org/repo`.
    pub fn slug(&self) -> String {
        format!("{}/{}", self.org, self.repo)
    }
}

/// A job id as it may appear in a path: letters, digits, `-` and `_` only.
pub fn is_job_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// Runs git with a fixed environment: no prompts, C locale, Kiln as author and committer, and
/// the GitHub token (if any) as an HTTP header scoped to the git host, passed through the
/// environment so it never shows on a command line.
#[derive(Debug, Clone)]
pub struct Git {
    env: Vec<(String, String)>,
}

impl Git {
    pub fn new(base_url: &str, token: Option<&str>) -> Git {
        let mut env: Vec<(String, String)> = [
            ("GIT_TERMINAL_PROMPT", "0"),
            ("LC_ALL", "C"),
            ("GIT_AUTHOR_NAME", AUTHOR_NAME),
            ("GIT_AUTHOR_EMAIL", AUTHOR_EMAIL),
            ("GIT_COMMITTER_NAME", AUTHOR_NAME),
            ("GIT_COMMITTER_EMAIL", AUTHOR_EMAIL),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        if let Some(token) =
            token.filter(|_| base_url.starts_with("https://") || base_url.starts_with("http://"))
        {
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
            env.push(("GIT_CONFIG_COUNT".into(), "1".into()));
            env.push((
                "GIT_CONFIG_KEY_0".into(),
                format!("http.{}/.extraHeader", base_url.trim_end_matches('/')),
            ));
            env.push((
                "GIT_CONFIG_VALUE_0".into(),
                format!("Authorization: Basic {basic}"),
            ));
        }
        Git { env }
    }

    /// `git <args>` in `cwd`; stdout on success.
    pub async fn run(&self, cwd: &Path, args: &[&str]) -> Result<String, GitError> {
        let mut cmd = tokio::process::Command::new("git");
        cmd.args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for var in [
            "GIT_DIR",
            "GIT_WORK_TREE",
            "GIT_INDEX_FILE",
            "GIT_CONFIG_PARAMETERS",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().await.map_err(GitError::Spawn)?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.len() > 2000 {
            stderr = format!("...{}", crate::output::tail_chars(&stderr, 2000));
        }
        Err(GitError::Failed {
            command: args.join(" "),
            code: out.status.code().unwrap_or(-1),
            stderr,
        })
    }

    /// `git --version`, e.g. `2.47.3`.
    pub async fn version(&self) -> Option<String> {
        let out = self.run(Path::new("/"), &["--version"]).await.ok()?;
        out.trim().strip_prefix("git version ").map(str::to_string)
    }
}

/// Files changed in a worktree since its index was last written ([`Workspaces::changes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub deleted: Vec<String>,
}

impl Changes {
    /// From `git status --porcelain=v1 -z`: the worktree's column against the index (`??`
    /// untracked: created; `M`/`T`: updated; `D`: deleted).
    pub fn from_porcelain(out: &str) -> Changes {
        let mut c = Changes::default();
        for entry in out.split('\0').filter(|e| e.len() > 3) {
            let (code, path) = entry.split_at(3);
            let path = path.to_string();
            let mut chars = code.chars();
            let (x, y) = (chars.next().unwrap_or(' '), chars.next().unwrap_or(' '));
            match (x, y) {
                ('?', '?') => c.created.push(path),
                (_, 'M') | (_, 'T') => c.updated.push(path),
                (_, 'D') => c.deleted.push(path),
                _ => {}
            }
        }
        c.created.sort();
        c.updated.sort();
        c.deleted.sort();
        c
    }

    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty()
    }
}

/// A job's worktree.
#[derive(Debug, Clone)]
pub struct Worktree {
    pub repo: RepoRef,
    pub path: PathBuf,
    /// The worktree's own git directory inside the mirror (`<mirror>/worktrees/<name>`).
    pub git_dir: PathBuf,
    pub branch: String,
    /// The branch the work started from and the pull request targets.
    pub base_branch: String,
    /// A repository of its own (an app build's), not a worktree of a mirror: nothing is
    /// fetched or pushed, and removing it removes its git directory.
    pub standalone: bool,
}

impl Worktree {
    fn git_args<'a>(
        &'a self,
        git_dir: &'a str,
        work_tree: &'a str,
        args: &[&'a str],
    ) -> Vec<&'a str> {
        // Nested repositories the agent made are never entered: git would read their
        // configuration (an fsmonitor command, say) to look for changes inside them.
        let mut all = vec![
            "--git-dir",
            git_dir,
            "--work-tree",
            work_tree,
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
            "-c",
            "diff.ignoreSubmodules=all",
            "-c",
            "submodule.recurse=false",
            "-c",
            "push.recurseSubmodules=no",
        ];
        all.extend_from_slice(&NO_AUTO_GC);
        all.extend_from_slice(args);
        all
    }
}

/// Mirrors and worktrees on this runner.
pub struct Workspaces {
    repos_dir: PathBuf,
    worktrees_dir: PathBuf,
    base_url: String,
    git: Git,
    locks: Mutex<HashMap<RepoRef, Arc<AsyncMutex<()>>>>,
    /// Turns to fetch (`RUNNER_FETCH_PARALLELISM`).
    fetches: Arc<Semaphore>,
    /// When the last fetch of each mirror that succeeded started: a job that asked before then
    /// needs no fetch of its own (one fetch serves a burst of jobs).
    fetched: Mutex<HashMap<RepoRef, std::time::Instant>>,
    /// Each mirror's default branch as its last fetch left `refs/remotes/origin/HEAD`.
    default_branch: Mutex<HashMap<RepoRef, String>>,
    /// Fetches run, for tests and benches.
    fetch_count: std::sync::atomic::AtomicU64,
    /// Per mirror: worktrees in use, and finished ones whose entry and branch are still to drop.
    state: Mutex<HashMap<RepoRef, MirrorState>>,
    /// Mirrors whose `origin` this run has pointed at the git host.
    url_set: Mutex<std::collections::HashSet<RepoRef>>,
}

/// Options every command on a mirror or its worktrees carries: no automatic garbage collection
/// (it would pack refs and objects under worktrees working without the lock).
const NO_AUTO_GC: [&str; 4] = ["-c", "gc.auto=0", "-c", "maintenance.auto=false"];

/// Finished worktrees wait to be dropped until this many have gathered (or until the next
/// [`Workspaces::tidy`]): one `worktree prune` and one `branch -D` then serve them all, off the
/// jobs' way.
const DROP_BATCH: usize = 16;

/// At most this many finished worktrees wait to be dropped; the next clean-up then waits for the
/// lock.
const MAX_PENDING: usize = 32;

/// How long a mirror's default branch, as its remote's HEAD names it, is trusted before a fetch
/// asks again (`remote set-head --auto` is one more connection to the git host).
const HEAD_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// `git gc --auto` runs at most this often per mirror (when no worktree of it is in use).
const GC_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Default)]
struct MirrorState {
    /// Worktrees of jobs that hold them (added, not yet removed).
    in_use: usize,
    /// Finished worktrees (directory already deleted): their path and branch.
    pending: Vec<(PathBuf, String)>,
    /// When the remote's HEAD was last asked.
    head_asked: Option<std::time::Instant>,
    /// When `git gc --auto` last ran.
    maintained: Option<std::time::Instant>,
}

/// What a sweep at start removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Worktree directories (and progress notes, scratch homes) of jobs no longer held.
    pub worktrees: Vec<String>,
    /// Local branches in the mirrors that no worktree had checked out, as `org/repo:branch`.
    pub branches: Vec<String>,
}

impl Workspaces {
    pub fn new(
        repos_dir: PathBuf,
        worktrees_dir: PathBuf,
        base_url: &str,
        token: Option<&str>,
    ) -> Workspaces {
        let base_url = base_url.trim_end_matches('/').to_string();
        Workspaces {
            git: Git::new(&base_url, token),
            repos_dir,
            worktrees_dir,
            base_url,
            locks: Mutex::default(),
            fetches: Arc::new(Semaphore::new(crate::config::DEFAULT_FETCH_PARALLELISM)),
            fetched: Mutex::default(),
            default_branch: Mutex::default(),
            fetch_count: Default::default(),
            state: Mutex::default(),
            url_set: Mutex::default(),
        }
    }

    /// At most `n` fetches at once (`RUNNER_FETCH_PARALLELISM`, at least 1).
    pub fn with_fetch_parallelism(mut self, n: usize) -> Workspaces {
        self.fetches = Arc::new(Semaphore::new(n.max(1)));
        self
    }

    pub fn git(&self) -> &Git {
        &self.git
    }

    /// Fetches run so far.
    pub fn fetches_run(&self) -> u64 {
        self.fetch_count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn worktrees_dir(&self) -> &Path {
        &self.worktrees_dir
    }

    pub fn mirror_path(&self, repo: &RepoRef) -> PathBuf {
        self.repos_dir
            .join(&repo.org)
            .join(format!("{}.git", repo.repo))
    }

    pub fn remote_url(&self, repo: &RepoRef) -> String {
        format!("{}/{}/{}.git", self.base_url, repo.org, repo.repo)
    }

    pub fn worktree_path(&self, job_id: &str) -> PathBuf {
        self.worktrees_dir.join(job_id)
    }

    fn mutex(&self, repo: &RepoRef) -> Arc<AsyncMutex<()>> {
        self.locks
            .lock()
            .unwrap()
            .entry(repo.clone())
            .or_default()
            .clone()
    }

    async fn lock(&self, repo: &RepoRef) -> OwnedMutexGuard<()> {
        self.mutex(repo).lock_owned().await
    }

    /// Creates the mirror if needed and fetches every branch of the remote. Returns its path.
    pub async fn sync(&self, repo: &RepoRef) -> Result<PathBuf, GitError> {
        let _guard = self.lock(repo).await;
        self.sync_locked(repo).await
    }

    /// The mirror as fetched after `asked`: a fetch that started since (a burst's jobs waited
    /// for it on the lock) serves as this one's, else it fetches.
    async fn sync_since_locked(
        &self,
        repo: &RepoRef,
        asked: std::time::Instant,
    ) -> Result<PathBuf, GitError> {
        let mirror = self.mirror_path(repo);
        let fresh = self
            .fetched
            .lock()
            .unwrap()
            .get(repo)
            .is_some_and(|started| *started >= asked);
        if fresh && mirror.join("HEAD").is_file() {
            return Ok(mirror);
        }
        self.sync_locked(repo).await
    }

    async fn sync_locked(&self, repo: &RepoRef) -> Result<PathBuf, GitError> {
        let mirror = self.mirror_path(repo);
        let url = self.remote_url(repo);
        let parent = mirror.parent().expect("mirrors live under REPOS_DIR/<org>");
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io_err(format!("creating {}", parent.display())))?;
        if !mirror.join("HEAD").is_file() {
            if mirror.exists() {
                tokio::fs::remove_dir_all(&mirror)
                    .await
                    .map_err(io_err(format!(
                        "removing a broken mirror {}",
                        mirror.display()
                    )))?;
            }
            let m = mirror.to_string_lossy();
            self.git
                .run(parent, &["init", "--bare", "--quiet", "--", &m])
                .await?;
            // The default refspec of `remote add` keeps the remote's branches under
            // refs/remotes/origin/, apart from the jobs' own branches under refs/heads/.
            self.git
                .run(&mirror, &["remote", "add", "--", "origin", &url])
                .await?;
        } else if !self.url_set.lock().unwrap().contains(repo) {
            // Once per mirror and run: the git host's URL is fixed while the runner runs.
            self.git
                .run(&mirror, &["remote", "set-url", "--", "origin", &url])
                .await?;
        }
        self.url_set.lock().unwrap().insert(repo.clone());
        {
            let _turn = self
                .fetches
                .acquire()
                .await
                .expect("the fetch semaphore is never closed");
            let started = std::time::Instant::now();
            self.fetch_count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.git
                .run(
                    &mirror,
                    &[&NO_AUTO_GC[..], &["fetch", "--prune", "--quiet", "origin"]].concat(),
                )
                .await?;
            self.fetched.lock().unwrap().insert(repo.clone(), started);
            // The remote's HEAD is asked again only every HEAD_TTL (or while it is unknown): a
            // repository's default branch rarely changes, and asking is another connection.
            let head_due = !self.default_branch.lock().unwrap().contains_key(repo)
                || self.mirror_state(repo, |s| {
                    s.head_asked.is_none_or(|t| t.elapsed() >= HEAD_TTL)
                });
            if head_due {
                // An empty remote has no HEAD to follow; that is only an error for a job
                // without a base.
                if let Err(e) = self
                    .git
                    .run(&mirror, &["remote", "set-head", "origin", "--auto"])
                    .await
                {
                    tracing::debug!(repo = %repo.slug(), error = %e, "remote HEAD unknown");
                }
                let head = self.symbolic_head(&mirror).await;
                let mut known = self.default_branch.lock().unwrap();
                match head {
                    Some(b) => known.insert(repo.clone(), b),
                    None => known.remove(repo),
                };
                self.mirror_state(repo, |s| s.head_asked = Some(std::time::Instant::now()));
            }
        }
        // The mirror's last use, for the garbage collection of mirrors nobody uses.
        if let Err(e) = tokio::fs::write(mirror.join(LAST_USED_FILE), b"").await {
            tracing::warn!(repo = %repo.slug(), error = %e, "could not mark the mirror as used");
        }
        Ok(mirror)
    }

    /// The remote's default branch as `refs/remotes/origin/HEAD` names it.
    async fn symbolic_head(&self, mirror: &Path) -> Option<String> {
        let head = self
            .git
            .run(
                mirror,
                &["symbolic-ref", "--quiet", "refs/remotes/origin/HEAD"],
            )
            .await
            .ok()?;
        Some(
            head.trim()
                .trim_start_matches("refs/remotes/origin/")
                .to_string(),
        )
    }

    /// Fetches the repository and adds the job's worktree on `branch`, started from `base` (the
    /// remote's default branch when `None`). A leftover worktree of the same job is replaced.
    pub async fn create_worktree(
        &self,
        repo: &RepoRef,
        job_id: &str,
        branch: &str,
        base: Option<&str>,
    ) -> Result<Worktree, GitError> {
        self.create_worktree_since(repo, job_id, branch, base, std::time::Instant::now())
            .await
    }

    /// [`Workspaces::create_worktree`] for a job submitted at `submitted`: a fetch of the mirror
    /// that started since then serves it (a job that waited in the queue while others of its
    /// repository ran needs no fetch of its own).
    pub async fn create_worktree_since(
        &self,
        repo: &RepoRef,
        job_id: &str,
        branch: &str,
        base: Option<&str>,
        submitted: std::time::Instant,
    ) -> Result<Worktree, GitError> {
        if !is_job_id(job_id) {
            return Err(GitError::Invalid(format!(
                "{job_id:?} is not a valid job id"
            )));
        }
        if !is_branch_name(branch) {
            return Err(GitError::Invalid(format!(
                "{branch:?} is not a valid branch name"
            )));
        }
        if let Some(b) = base.filter(|b| !is_branch_name(b)) {
            return Err(GitError::Invalid(format!(
                "{b:?} is not a valid base branch name"
            )));
        }
        let _guard = self.lock(repo).await;
        let mirror = self.sync_since_locked(repo, submitted).await?;

        let base_branch = match base {
            Some(b) => {
                let r = format!("refs/remotes/origin/{b}");
                if self
                    .git
                    .run(
                        &mirror,
                        &[
                            "rev-parse",
                            "--verify",
                            "--quiet",
                            &format!("{r}^{{commit}}"),
                        ],
                    )
                    .await
                    .is_err()
                {
                    return Err(GitError::Invalid(format!(
                        "base branch {b:?} does not exist in {}",
                        repo.slug()
                    )));
                }
                b.to_string()
            }
            None => {
                let known = self.default_branch.lock().unwrap().get(repo).cloned();
                match known {
                    Some(b) => b,
                    None => self.symbolic_head(&mirror).await.ok_or_else(|| {
                        GitError::Invalid(format!(
                            "{} has no default branch (is it empty?)",
                            repo.slug()
                        ))
                    })?,
                }
            }
        };

        tokio::fs::create_dir_all(&self.worktrees_dir)
            .await
            .map_err(io_err(format!("creating {}", self.worktrees_dir.display())))?;
        let path = self.worktree_path(job_id);
        // A finished worktree of this path or branch (a retry's) is dropped first: git would
        // refuse a path still registered, or a branch still checked out.
        let needed = self.mirror_state(repo, |s| {
            s.pending.iter().any(|(p, b)| *p == path || b == branch)
        });
        if needed {
            self.drop_pending_locked(repo, &mirror).await;
        }
        if path.exists() {
            self.remove_locked(&mirror, &path, None).await;
        }
        let p = path.to_string_lossy();
        let start = format!("refs/remotes/origin/{base_branch}");
        self.git
            .run(
                &mirror,
                &[
                    "worktree",
                    "add",
                    "--quiet",
                    "--no-checkout",
                    "--no-track",
                    "-B",
                    branch,
                    "--",
                    &p,
                    &start,
                ],
            )
            .await?;
        self.mirror_state(repo, |s| s.in_use += 1);
        let git_dir = async {
            let dotgit = tokio::fs::read_to_string(path.join(".git"))
                .await
                .map_err(io_err("reading the new worktree's .git"))?;
            dotgit
                .trim()
                .strip_prefix("gitdir: ")
                .map(PathBuf::from)
                .ok_or_else(|| {
                    GitError::Invalid(format!("unexpected .git file in {}", path.display()))
                })
        }
        .await;
        let git_dir = match git_dir {
            Ok(d) => d,
            Err(e) => {
                self.remove_locked(&mirror, &path, Some(branch)).await;
                self.release(repo);
                return Err(e);
            }
        };
        drop(_guard);
        let wt = Worktree {
            repo: repo.clone(),
            path,
            git_dir,
            branch: branch.to_string(),
            base_branch,
            standalone: false,
        };
        // The checkout writes only the worktree's own index and files: without the lock.
        if let Err(e) = self
            .in_worktree(&wt, &["reset", "--quiet", "--hard", "HEAD"])
            .await
        {
            self.remove_worktree(&wt).await;
            return Err(e);
        }
        Ok(wt)
    }

    /// An app build's workspace: a new git repository at `WORKTREES_DIR/<job_id>` (no remote),
    /// its git directory beside it at `<job_id>.git` so the agent in the sandbox can neither
    /// see nor rewrite it. A leftover of the same job is replaced.
    pub async fn create_app_workspace(&self, job_id: &str) -> Result<Worktree, GitError> {
        if !is_job_id(job_id) {
            return Err(GitError::Invalid(format!(
                "{job_id:?} is not a valid job id"
            )));
        }
        let repo = RepoRef::new(APP_OWNER, job_id)?;
        let _guard = self.lock(&repo).await;
        tokio::fs::create_dir_all(&self.worktrees_dir)
            .await
            .map_err(io_err(format!("creating {}", self.worktrees_dir.display())))?;
        let path = self.worktree_path(job_id);
        let git_dir = self.worktrees_dir.join(format!("{job_id}{APP_GIT_SUFFIX}"));
        for old in [&path, &git_dir] {
            if old.exists() {
                tokio::fs::remove_dir_all(old)
                    .await
                    .map_err(io_err(format!("removing {}", old.display())))?;
            }
        }
        tokio::fs::create_dir_all(&path)
            .await
            .map_err(io_err(format!("creating {}", path.display())))?;
        let gd = git_dir.to_string_lossy();
        self.git
            .run(
                &self.worktrees_dir,
                &[
                    "init",
                    "--quiet",
                    "--bare",
                    "--initial-branch=main",
                    "--",
                    &gd,
                ],
            )
            .await?;
        Ok(Worktree {
            repo,
            path,
            git_dir,
            branch: "main".into(),
            base_branch: "main".into(),
            standalone: true,
        })
    }

    /// Commits the worktree as it is, even when nothing changed (an app build's ticket is one
    /// commit whatever its agent did).
    pub async fn commit_allow_empty(
        &self,
        wt: &Worktree,
        message: &str,
    ) -> Result<String, GitError> {
        if let Some(sha) = self.commit_all(wt, message).await? {
            return Ok(sha);
        }
        self.in_worktree(
            wt,
            &[
                "commit",
                "--quiet",
                "--no-verify",
                "--allow-empty",
                "-m",
                message,
            ],
        )
        .await?;
        let sha = self.in_worktree(wt, &["rev-parse", "HEAD"]).await?;
        Ok(sha.trim().to_string())
    }

    /// `git log` of the worktree's branch: (sha, subject), newest first.
    pub async fn log(&self, wt: &Worktree) -> Result<Vec<(String, String)>, GitError> {
        let out = self
            .in_worktree(wt, &["log", "--format=%H %s", "HEAD"])
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(h, s)| (h.to_string(), s.to_string()))
            .collect())
    }

    /// A landing session's workspace (seed 001): an app-build-like repository at
    /// `WORKTREES_DIR/<job_id>` (its git directory beside it), holding the session's history
    /// from `bundle` (a git bundle of its `main`, as [`Workspaces::bundle`] made it) when there
    /// is one, else new and empty. Answers the workspace and how many commits it holds.
    pub async fn create_session_workspace(
        &self,
        job_id: &str,
        bundle: Option<&[u8]>,
    ) -> Result<(Worktree, usize), GitError> {
        let wt = self.create_app_workspace(job_id).await?;
        let Some(bytes) = bundle else {
            return Ok((wt, 0));
        };
        let file = self
            .worktrees_dir
            .join(format!("{job_id}{SESSION_BUNDLE_SUFFIX}"));
        tokio::fs::write(&file, bytes)
            .await
            .map_err(io_err(format!("writing {}", file.display())))?;
        let fetched = async {
            let _guard = self.lock(&wt.repo).await;
            let gd = wt.git_dir.to_string_lossy();
            let f = file.to_string_lossy();
            // A bundle is verified as it is fetched (its objects and its prerequisites).
            self.git
                .run(
                    &self.worktrees_dir,
                    &[
                        "--git-dir",
                        &gd,
                        "fetch",
                        "--quiet",
                        "--no-tags",
                        "--",
                        &f,
                        "+refs/heads/main:refs/heads/main",
                    ],
                )
                .await?;
            self.in_worktree(&wt, &["reset", "--quiet", "--hard", "main"])
                .await?;
            self.in_worktree(&wt, &["rev-list", "--count", "HEAD"])
                .await
        }
        .await;
        let _ = tokio::fs::remove_file(&file).await;
        let count = fetched?.trim().parse().unwrap_or(0);
        Ok((wt, count))
    }

    /// The workspace's `main` as a git bundle (its whole history); `None` before its first
    /// commit.
    pub async fn bundle(&self, wt: &Worktree) -> Result<Option<Vec<u8>>, GitError> {
        if self
            .in_worktree(wt, &["rev-parse", "--verify", "--quiet", "refs/heads/main"])
            .await
            .is_err()
        {
            return Ok(None);
        }
        let name = wt
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = self
            .worktrees_dir
            .join(format!("{name}{SESSION_BUNDLE_SUFFIX}"));
        let f = file.to_string_lossy();
        let made = self
            .in_worktree(wt, &["bundle", "create", "--quiet", &f, "refs/heads/main"])
            .await;
        let bytes = match made {
            Ok(_) => tokio::fs::read(&file)
                .await
                .map_err(io_err(format!("reading {}", file.display()))),
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&file).await;
        bytes.map(Some)
    }

    /// Stages everything in the worktree (without committing): the baseline the next
    /// [`Workspaces::changes`] compares with.
    pub async fn stage_all(&self, wt: &Worktree) -> Result<(), GitError> {
        match self
            .in_worktree(wt, &["add", "--all", "--ignore-errors"])
            .await
        {
            Ok(_) | Err(GitError::Failed { code: 1, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// What changed in the worktree since it was last staged (or committed): files created,
    /// updated and deleted, by path, sorted.
    pub async fn changes(&self, wt: &Worktree) -> Result<Changes, GitError> {
        let out = self
            .in_worktree(
                wt,
                &[
                    "status",
                    "--porcelain=v1",
                    "-z",
                    "--untracked-files=all",
                    "--no-renames",
                ],
            )
            .await?;
        Ok(Changes::from_porcelain(&out))
    }

    async fn in_worktree(&self, wt: &Worktree, args: &[&str]) -> Result<String, GitError> {
        let gd = wt.git_dir.to_string_lossy();
        let tree = wt.path.to_string_lossy();
        self.git.run(&wt.path, &wt.git_args(&gd, &tree, args)).await
    }

    /// Stages everything and commits it; `None` when there is nothing to commit.
    pub async fn commit_all(
        &self,
        wt: &Worktree,
        message: &str,
    ) -> Result<Option<String>, GitError> {
        // A path git cannot add (a nested repository without commits, an unreadable file) must
        // not cost the rest of the work: add what can be added and say what could not.
        match self
            .in_worktree(wt, &["add", "--all", "--ignore-errors"])
            .await
        {
            Ok(_) => {}
            Err(GitError::Failed {
                code: 1, stderr, ..
            }) => {
                tracing::warn!(path = %wt.path.display(), %stderr, "some paths could not be added")
            }
            Err(e) => return Err(e),
        }
        match self.in_worktree(wt, &["diff", "--cached", "--quiet"]).await {
            Ok(_) => return Ok(None),
            Err(GitError::Failed { code: 1, .. }) => {}
            Err(e) => return Err(e),
        }
        self.in_worktree(wt, &["commit", "--quiet", "--no-verify", "-m", message])
            .await?;
        let sha = self.in_worktree(wt, &["rev-parse", "HEAD"]).await?;
        Ok(Some(sha.trim().to_string()))
    }

    /// Pushes the job's branch to the remote. To its URL, not `origin`: a push to a remote
    /// would also update `refs/remotes/origin/`, which only a fetch under the lock writes.
    pub async fn push(&self, wt: &Worktree) -> Result<(), GitError> {
        let refspec = format!("HEAD:refs/heads/{}", wt.branch);
        let url = self.remote_url(&wt.repo);
        self.in_worktree(
            wt,
            &["push", "--quiet", "--no-verify", &url, "--", &refspec],
        )
        .await?;
        Ok(())
    }

    /// Removes the worktree and its local branch (the remote keeps what was pushed); an app
    /// build's workspace goes with its git directory. The directory goes at once, without the
    /// mirror's lock; the worktree's entry and branch are dropped with any other finished ones
    /// when the lock is free (else by a later clean-up, or before a worktree that needs them
    /// gone is added).
    pub async fn remove_worktree(&self, wt: &Worktree) {
        if wt.standalone {
            let _guard = self.lock(&wt.repo).await;
            for dir in [&wt.path, &wt.git_dir] {
                if let Err(e) = tokio::fs::remove_dir_all(dir).await {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %dir.display(), error = %e, "could not delete an app workspace");
                    }
                }
            }
            drop(_guard);
            self.locks.lock().unwrap().remove(&wt.repo);
            return;
        }
        if let Err(e) = tokio::fs::remove_dir_all(&wt.path).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %wt.path.display(), error = %e, "could not delete a worktree directory");
            }
        }
        let waiting = self.mirror_state(&wt.repo, |s| {
            s.pending.push((wt.path.clone(), wt.branch.clone()));
            s.pending.len()
        });
        self.release(&wt.repo);
        if waiting < DROP_BATCH {
            // Dropped with a batch, or by the next tidy-up.
            return;
        }
        let _guard = match self.mutex(&wt.repo).try_lock_owned() {
            Ok(g) => g,
            Err(_) if waiting >= MAX_PENDING => self.lock(&wt.repo).await,
            // Whoever holds the lock now is on a job's way; a later clean-up drops these.
            Err(_) => return,
        };
        let mirror = self.mirror_path(&wt.repo);
        self.drop_pending_locked(&wt.repo, &mirror).await;
        self.maintain_if_quiet_locked(&wt.repo, &mirror).await;
    }

    /// The runner's tidy-up (every second): drops the finished worktrees of each mirror whose
    /// lock is free, and collects its garbage when none of its worktrees is in use. Never waits
    /// for a lock: a mirror busy now is tidied next time.
    pub async fn tidy(&self) {
        for repo in self.with_pending() {
            let Ok(_guard) = self.mutex(&repo).try_lock_owned() else {
                continue;
            };
            let mirror = self.mirror_path(&repo);
            self.drop_pending_locked(&repo, &mirror).await;
            self.maintain_if_quiet_locked(&repo, &mirror).await;
        }
    }

    /// The mirrors with finished worktrees still to drop.
    fn with_pending(&self) -> Vec<RepoRef> {
        self.state
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| !s.pending.is_empty())
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Runs `f` on the mirror's state (made on first use).
    fn mirror_state<T>(&self, repo: &RepoRef, f: impl FnOnce(&mut MirrorState) -> T) -> T {
        f(self.state.lock().unwrap().entry(repo.clone()).or_default())
    }

    /// Drops every finished worktree's entry and branch still pending (at a graceful stop).
    pub async fn drop_finished(&self) {
        for repo in self.with_pending() {
            let _guard = self.lock(&repo).await;
            self.drop_pending_locked(&repo, &self.mirror_path(&repo))
                .await;
        }
    }

    /// One worktree of the mirror no longer in use.
    fn release(&self, repo: &RepoRef) {
        if let Some(s) = self.state.lock().unwrap().get_mut(repo) {
            s.in_use = s.in_use.saturating_sub(1);
        }
    }

    /// Drops the entries and branches of the finished worktrees (their directories are gone):
    /// one `worktree prune` and one `branch -D` for all of them.
    async fn drop_pending_locked(&self, repo: &RepoRef, mirror: &Path) {
        let pending = match self.state.lock().unwrap().get_mut(repo) {
            Some(s) => std::mem::take(&mut s.pending),
            None => return,
        };
        if pending.is_empty() {
            return;
        }
        for (path, _) in &pending {
            // Deleted without the lock; a failure there left it.
            if path.exists() {
                self.remove_locked(mirror, path, None).await;
            }
        }
        if let Err(e) = self.git.run(mirror, &["worktree", "prune"]).await {
            tracing::warn!(repo = %repo.slug(), error = %e, "git worktree prune failed");
        }
        let mut args = vec!["branch", "--quiet", "-D", "--"];
        args.extend(pending.iter().map(|(_, b)| b.as_str()));
        if let Err(e) = self.git.run(mirror, &args).await {
            // One branch that is gone (or checked out again) fails the command; the rest were
            // deleted. What is left over is swept at the next start.
            tracing::debug!(repo = %repo.slug(), error = %e, "git branch -D failed");
        }
        tracing::debug!(repo = %repo.slug(), worktrees = pending.len(), "dropped finished worktrees");
    }

    /// Garbage collection (`git gc --auto`, in the foreground) when no worktree of the mirror
    /// is in use, at most every [`GC_EVERY`]: automatic collection is off for every other
    /// command.
    async fn maintain_if_quiet_locked(&self, repo: &RepoRef, mirror: &Path) {
        let due = self.mirror_state(repo, |s| {
            let due = s.in_use == 0 && s.maintained.is_none_or(|t| t.elapsed() >= GC_EVERY);
            if due {
                s.maintained = Some(std::time::Instant::now());
            }
            due
        });
        if !due {
            return;
        }
        if let Err(e) = self
            .git
            .run(
                mirror,
                &["-c", "gc.autoDetach=false", "gc", "--auto", "--quiet"],
            )
            .await
        {
            tracing::warn!(repo = %repo.slug(), error = %e, "git gc --auto failed");
        }
    }

    /// The mirrors on disk (`REPOS_DIR/<org>/<repo>.git`) whose names are valid.
    pub fn mirrors(&self) -> Vec<RepoRef> {
        let mut found = Vec::new();
        let Ok(orgs) = std::fs::read_dir(&self.repos_dir) else {
            return found;
        };
        for org in orgs.filter_map(Result::ok) {
            let Ok(repos) = std::fs::read_dir(org.path()) else {
                continue;
            };
            for repo in repos.filter_map(Result::ok) {
                let name = repo.file_name().to_string_lossy().into_owned();
                if let Some(r) = name
                    .strip_suffix(".git")
                    .and_then(|r| RepoRef::new(&org.file_name().to_string_lossy(), r).ok())
                {
                    found.push(r);
                }
            }
        }
        found.sort_by_key(RepoRef::slug);
        found
    }

    /// Removes what a runner that stopped without cleaning up (a crash, a SIGKILL) left: job
    /// worktrees under `WORKTREES_DIR` (with their progress notes and scratch homes) of jobs
    /// not in `held`, then in every mirror the worktrees git still lists without a directory
    /// (`git worktree prune`) and the local branches no worktree has checked out (only job
    /// branches live there; the remote's are under `refs/remotes/origin/`).
    pub async fn sweep(&self, held: &[String]) -> Swept {
        let mut swept = Swept::default();
        let homes = self.worktrees_dir.join(crate::executor::process::HOMES_DIR);
        for dir in [self.worktrees_dir.clone(), homes] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.filter_map(Result::ok) {
                let name = e.file_name().to_string_lossy().into_owned();
                let job = name
                    .strip_suffix(PROGRESS_SUFFIX)
                    .or_else(|| name.strip_suffix(APP_GIT_SUFFIX))
                    .or_else(|| name.strip_suffix(SESSION_BUNDLE_SUFFIX))
                    .unwrap_or(&name);
                if name.starts_with('.') || !is_job_id(job) || held.iter().any(|h| h == job) {
                    continue;
                }
                let path = e.path();
                let removed = if e.file_type().is_ok_and(|t| t.is_dir()) {
                    tokio::fs::remove_dir_all(&path).await
                } else {
                    tokio::fs::remove_file(&path).await
                };
                match removed {
                    Ok(()) => swept.worktrees.push(name),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "could not remove what a job left")
                    }
                }
            }
        }
        for repo in self.mirrors() {
            let _guard = self.lock(&repo).await;
            let mirror = self.mirror_path(&repo);
            if let Err(e) = self.git.run(&mirror, &["worktree", "prune"]).await {
                tracing::warn!(repo = %repo.slug(), error = %e, "git worktree prune failed");
                continue;
            }
            let checked_out: Vec<String> = self
                .git
                .run(&mirror, &["worktree", "list", "--porcelain"])
                .await
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.strip_prefix("branch "))
                .map(str::to_string)
                .collect();
            let branches = self
                .git
                .run(
                    &mirror,
                    &["for-each-ref", "--format=%(refname)", "refs/heads/"],
                )
                .await
                .unwrap_or_default();
            for r in branches
                .lines()
                .filter(|r| !checked_out.iter().any(|c| c == r))
            {
                match self.git.run(&mirror, &["update-ref", "-d", r]).await {
                    Ok(_) => swept.branches.push(format!(
                        "{}:{}",
                        repo.slug(),
                        r.trim_start_matches("refs/heads/")
                    )),
                    Err(e) => {
                        tracing::warn!(repo = %repo.slug(), error = %e, "could not delete a leftover branch")
                    }
                }
            }
        }
        swept
    }

    /// When a mirror was last used: its [`LAST_USED_FILE`], else its last fetch, else the
    /// directory itself.
    fn last_used(&self, repo: &RepoRef) -> Option<SystemTime> {
        let mirror = self.mirror_path(repo);
        [LAST_USED_FILE, "FETCH_HEAD", "."]
            .iter()
            .find_map(|f| std::fs::metadata(mirror.join(f)).ok()?.modified().ok())
    }

    /// Removes the mirrors no job or request used for `max_age` and that no worktree uses now.
    /// Answers the ones removed.
    pub async fn collect_garbage(&self, max_age: Duration) -> Vec<RepoRef> {
        let mut removed = Vec::new();
        let now = SystemTime::now();
        for repo in self.mirrors() {
            let old = |ws: &Workspaces| {
                ws.last_used(&repo)
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age > max_age)
            };
            if !old(self) {
                continue;
            }
            let _guard = self.lock(&repo).await;
            let mirror = self.mirror_path(&repo);
            // Checked again under the lock: a job may have just fetched it.
            let _ = self.git.run(&mirror, &["worktree", "prune"]).await;
            let in_use = std::fs::read_dir(mirror.join("worktrees"))
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            if in_use || !old(self) {
                continue;
            }
            self.fetched.lock().unwrap().remove(&repo);
            self.default_branch.lock().unwrap().remove(&repo);
            self.state.lock().unwrap().remove(&repo);
            match tokio::fs::remove_dir_all(&mirror).await {
                Ok(()) => {
                    tracing::info!(repo = %repo.slug(), max_age_days = max_age.as_secs() / 86_400, "removed a mirror unused for longer than RUNNER_MIRROR_MAX_AGE_DAYS");
                    removed.push(repo);
                }
                Err(e) => {
                    tracing::warn!(repo = %repo.slug(), error = %e, "could not remove an unused mirror")
                }
            }
        }
        removed
    }

    async fn remove_locked(&self, mirror: &Path, path: &Path, branch: Option<&str>) {
        let p = path.to_string_lossy();
        if let Err(e) = self
            .git
            .run(
                mirror,
                &["worktree", "remove", "--force", "--force", "--", &p],
            )
            .await
        {
            tracing::debug!(path = %p, error = %e, "git worktree remove failed; deleting the directory");
        }
        if path.exists() {
            if let Err(e) = tokio::fs::remove_dir_all(path).await {
                tracing::warn!(path = %p, error = %e, "could not delete a worktree directory");
            }
        }
        let _ = self.git.run(mirror, &["worktree", "prune"]).await;
        if let Some(branch) = branch {
            let _ = self
                .git
                .run(mirror, &["branch", "--quiet", "-D", "--", branch])
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_refs_and_job_ids_are_validated() {
        assert!(RepoRef::new("org", "repo").is_ok());
        for (o, r) in [
            ("-o", "r"),
            ("o", ".."),
            ("o/x", "r"),
            ("o", "r.git"),
            ("", "r"),
        ] {
            assert!(RepoRef::new(o, r).is_err(), "{o}/{r}");
        }
        assert!(is_job_id("14cddf8f-ce78-4b49-9eb4-9d17a7d1f568"));
        for bad in ["", "-x", "a/b", "..", "a b", "a.b"] {
            assert!(!is_job_id(bad), "{bad}");
        }
    }

    #[test]
    fn porcelain_status_becomes_changes() {
        let out = "?? index.html\0 M styles.css\0AM design/spec.md\0 D old.js\0M  staged.txt\0?? a b.txt\0";
        let c = Changes::from_porcelain(out);
        assert_eq!(c.created, ["a b.txt", "index.html"]);
        assert_eq!(c.updated, ["design/spec.md", "styles.css"]);
        assert_eq!(c.deleted, ["old.js"]);
        assert!(Changes::from_porcelain("").is_empty());
    }

    #[tokio::test]
    async fn a_session_workspace_travels_as_a_bundle_with_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspaces::new(
            dir.path().join("r"),
            dir.path().join("w"),
            "file:///x",
            None,
        );
        let (first, commits) = ws.create_session_workspace("job-a", None).await.unwrap();
        assert_eq!(commits, 0);
        assert_eq!(
            ws.bundle(&first).await.unwrap(),
            None,
            "nothing to bundle before a commit"
        );
        std::fs::write(first.path.join("index.html"), "<html>one</html>").unwrap();
        ws.stage_all(&first).await.unwrap();
        std::fs::write(first.path.join("index.html"), "<html>two</html>").unwrap();
        std::fs::write(first.path.join("styles.css"), "body{}").unwrap();
        let c = ws.changes(&first).await.unwrap();
        assert_eq!(
            (c.created.as_slice(), c.updated.as_slice()),
            (
                &["styles.css".to_string()][..],
                &["index.html".to_string()][..]
            )
        );
        ws.commit_all(&first, "landing_init: a page")
            .await
            .unwrap()
            .unwrap();
        let bytes = ws.bundle(&first).await.unwrap().unwrap();
        ws.remove_worktree(&first).await;

        let (second, commits) = ws
            .create_session_workspace("job-b", Some(&bytes))
            .await
            .unwrap();
        assert_eq!(commits, 1);
        assert_eq!(
            std::fs::read_to_string(second.path.join("index.html")).unwrap(),
            "<html>two</html>"
        );
        assert!(
            ws.changes(&second).await.unwrap().is_empty(),
            "restored clean"
        );
        std::fs::write(second.path.join("index.html"), "<html>three</html>").unwrap();
        ws.commit_all(&second, "landing_chat: more")
            .await
            .unwrap()
            .unwrap();
        let log: Vec<String> = ws
            .log(&second)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        assert_eq!(log, ["landing_chat: more", "landing_init: a page"]);
        assert!(
            !dir.path().join("w/job-b.bundle").exists(),
            "the bundle file is gone"
        );

        let err = ws
            .create_session_workspace("job-c", Some(b"not a bundle"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("fetch"), "{err}");
        assert!(!dir.path().join("w/job-c.bundle").exists());
    }

    #[test]
    fn paths_and_urls() {
        let ws = Workspaces::new("/r".into(), "/w".into(), "file:///tmp/remotes/", None);
        let repo = RepoRef::new("acme", "site").unwrap();
        assert_eq!(ws.mirror_path(&repo), PathBuf::from("/r/acme/site.git"));
        assert_eq!(ws.remote_url(&repo), "file:///tmp/remotes/acme/site.git");
        assert_eq!(ws.worktree_path("j1"), PathBuf::from("/w/j1"));
    }

    #[test]
    fn the_token_is_a_header_scoped_to_the_git_host() {
        let git = Git::new("https://github.com", Some("t0k"));
        let get = |k: &str| {
            git.env
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            get("GIT_CONFIG_KEY_0").as_deref(),
            Some("http.https://github.com/.extraHeader")
        );
        let value = get("GIT_CONFIG_VALUE_0").unwrap();
        let b64 = value.strip_prefix("Authorization: Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(decoded, b"x-access-token:t0k");
        assert!(Git::new("file:///tmp/x", Some("t0k"))
            .env
            .iter()
            .all(|(k, _)| k != "GIT_CONFIG_COUNT"));
        assert!(Git::new("https://github.com", None)
            .env
            .iter()
            .all(|(k, _)| k != "GIT_CONFIG_COUNT"));
    }
}

#[cfg(test)]
mod burst_tests {
    use super::*;
    use std::time::Instant;

    fn git(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `git commit --quiet <args>` as a test author.
    fn commit(dir: &Path, args: &[&str]) {
        let id = [
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "--quiet",
        ];
        git(dir, &[&id[..], args].concat());
    }

    /// A bare remote `acme/shop` with one commit on `main`, and a clone to push more from.
    fn remote(dir: &Path) -> (String, PathBuf) {
        let bare = dir.join("remote/acme/shop.git");
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "--bare", "--quiet", "-b", "main"]);
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        git(&src, &["init", "--quiet", "-b", "main"]);
        std::fs::write(src.join("README.md"), "one\n").unwrap();
        git(&src, &["add", "."]);
        commit(&src, &["-m", "one"]);
        git(&src, &["remote", "add", "origin", bare.to_str().unwrap()]);
        git(&src, &["push", "--quiet", "origin", "main"]);
        (format!("file://{}", dir.join("remote").display()), src)
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    /// A finished worktree whose entry and branch wait for the lock (a job held it at the
    /// clean-up) does not stand in the way of a retry: the same job id and branch get a fresh
    /// worktree from the base, and the earlier attempt's commit is gone from the branch.
    #[tokio::test]
    async fn a_retry_reuses_a_branch_still_pending_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let (base, _src) = remote(dir.path());
        let ws = Workspaces::new(dir.path().join("r"), dir.path().join("w"), &base, None);
        let repo = RepoRef::new("acme", "shop").unwrap();
        let first = ws
            .create_worktree(&repo, "job-r", "kiln/retry", None)
            .await
            .unwrap();
        std::fs::write(first.path.join("attempt.txt"), "one").unwrap();
        ws.commit_all(&first, "attempt one").await.unwrap().unwrap();
        let held = ws.lock(&repo).await;
        ws.remove_worktree(&first).await;
        assert!(!first.path.exists(), "the directory goes at once");
        let mirror = ws.mirror_path(&repo);
        let branches = |m: &Path| {
            let out = std::process::Command::new("git")
                .current_dir(m)
                .args(["for-each-ref", "--format=%(refname:short)", "refs/heads/"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(
            branches(&mirror),
            "kiln/retry",
            "pending while the lock is held"
        );
        drop(held);

        let again = ws
            .create_worktree(&repo, "job-r", "kiln/retry", None)
            .await
            .unwrap();
        assert_eq!(again.path, first.path);
        assert!(
            !again.path.join("attempt.txt").exists(),
            "started from the base again"
        );
        assert_eq!(
            std::fs::read_to_string(again.path.join("README.md")).unwrap(),
            "one\n"
        );
        ws.remove_worktree(&again).await;
        ws.tidy().await;
        assert_eq!(branches(&mirror), "", "dropped once the lock was free");
        assert_eq!(ws.sweep(&[]).await, Swept::default(), "nothing left behind");
    }

    /// Eight jobs of one repository assigned at once: each gets its own worktree on its branch,
    /// from a fetch that started after it asked, and the burst fetches at most twice. Prints the
    /// per-job times (worktree ready, worktree removed), p50 and max.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_jobs_on_one_repository_fetches_once_and_stays_isolated() {
        let dir = tempfile::tempdir().unwrap();
        let (base, src) = remote(dir.path());
        let ws = Arc::new(Workspaces::new(
            dir.path().join("r"),
            dir.path().join("w"),
            &base,
            None,
        ));
        let repo = RepoRef::new("acme", "shop").unwrap();
        // The mirror exists (a runner's first job on a repository clones it).
        ws.sync(&repo).await.unwrap();
        let fetched_before = ws.fetches_run();

        let start = |n: usize| {
            let (ws, repo) = (ws.clone(), repo.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let wt = ws
                    .create_worktree(&repo, &format!("job-{n}"), &format!("kiln/b{n}"), None)
                    .await
                    .unwrap();
                (t.elapsed(), wt)
            })
        };
        let mut made = vec![];
        for h in (0..8).map(start).collect::<Vec<_>>() {
            made.push(h.await.unwrap());
        }
        let fetches = ws.fetches_run() - fetched_before;
        let mut ready: Vec<Duration> = made.iter().map(|(d, _)| *d).collect();
        for (n, (_, wt)) in made.iter().enumerate() {
            assert_eq!(wt.path, ws.worktree_path(&format!("job-{n}")));
            assert_eq!(wt.branch, format!("kiln/b{n}"));
            assert_eq!(
                std::fs::read_to_string(wt.path.join("README.md")).unwrap(),
                "one\n"
            );
        }
        std::fs::write(made[0].1.path.join("mine.txt"), "job 0's").unwrap();
        assert!(
            !made[1].1.path.join("mine.txt").exists(),
            "a job never sees another's worktree"
        );

        // A commit pushed now is seen by the next job: a fetch is never older than its job.
        std::fs::write(src.join("README.md"), "two\n").unwrap();
        commit(&src, &["-am", "two"]);
        git(&src, &["push", "--quiet", "origin", "main"]);
        let (_, late) = start(8).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(late.path.join("README.md")).unwrap(),
            "two\n"
        );

        let mut removed = vec![];
        let hs: Vec<_> = made
            .into_iter()
            .map(|(_, wt)| {
                let ws = ws.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    ws.remove_worktree(&wt).await;
                    assert!(!wt.path.exists());
                    t.elapsed()
                })
            })
            .collect();
        for h in hs {
            removed.push(h.await.unwrap());
        }
        ready.sort();
        removed.sort();
        println!(
            "burst of 8: {fetches} fetches; worktree ready p50 {:.1} ms max {:.1} ms; removed p50 {:.1} ms max {:.1} ms",
            ms(ready[3]),
            ms(ready[7]),
            ms(removed[3]),
            ms(removed[7])
        );
        assert!(fetches <= 2, "{fetches} fetches for one burst");
        ws.remove_worktree(&late).await;
        ws.tidy().await;
        assert_eq!(ws.sweep(&[]).await, Swept::default(), "nothing left behind");
    }
}
