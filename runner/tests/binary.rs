//! The `runner` binary itself: its help, settings from environment and file, and what happens to
//! its agents when it is killed outright.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use kiln_runner::config::ExecutorKind;
use kiln_schemas::runner::RunnerEvent;
use kiln_schemas::status::JobType;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary with a clean environment (only PATH and HOME inherited) plus `vars`.
fn runner(vars: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
    cmd.env_clear();
    for keep in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// [`runner`] with RUNNER_STATE_DIR, REPOS_DIR and WORKTREES_DIR in `dir` (`state`, `repos`,
/// `worktrees`).
fn runner_in(dir: &std::path::Path, vars: &[(&str, String)]) -> Command {
    let mut cmd = runner(vars);
    for (var, sub) in [
        ("RUNNER_STATE_DIR", "state"),
        ("REPOS_DIR", "repos"),
        ("WORKTREES_DIR", "worktrees"),
    ] {
        cmd.env(var, dir.join(sub));
    }
    cmd
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn health(port: u16) -> serde_json::Value {
    let url = format!("http://127.0.0.1:{port}/health");
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(&url).await {
            return r.json().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not answer");
}

#[test]
fn help_lists_every_setting() {
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for var in [
        "RUNNER_EDGE_URL",
        "RUNNER_TOKEN",
        "RUNNER_REGISTRATION_TOKEN",
        "RUNNER_STATE_DIR",
        "RUNNER_NAME",
        "RUNNER_EXECUTOR",
        "RUNNER_IMAGE",
        "RUNNER_AGENT_CMD",
        "RUNNER_AGENT_FORMAT",
        "RUNNER_AGENT_ENV",
        "MAX_CONCURRENT_JOBS",
        "REPOS_DIR",
        "WORKTREES_DIR",
        "RUNNER_GIT_BASE_URL",
        "GITHUB_TOKEN",
        "GITHUB_API_URL",
        "RUNNER_LISTEN",
        "RUNNER_MEMORY_MB",
        "RUNNER_CPUS",
        "RUNNER_PIDS",
        "RUNNER_NETWORK",
        "RUNNER_MOUNTS",
        "RUNNER_CONFIG",
        "RUNNER_CONTAINER_USER",
        "RUNNER_CAP_ADD",
        "RUNNER_TMP_MB",
        "RUNNER_WORKSPACE_MAX_MB",
        "RUNNER_JOB_TIMEOUT",
        "RUNNER_TASK_IDLE_TIMEOUT",
    ] {
        assert!(
            help.contains(&format!("[env: {var}")),
            "--help misses {var}:\n{help}"
        );
    }
}

/// Waits (at most 20 s) for the binary to exit by itself; a runner still up then is killed and
/// reported as started.
fn exit_output(child: Child) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("the runner started (it was still running after 20 s)");
        }
    }
}

/// No silent fallback to running jobs on the host: without a Docker daemon, the process executor
/// must be chosen by name.
#[test]
fn without_docker_the_runner_refuses_to_start_unless_runner_executor_is_process() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let nowhere = format!("unix://{}", dir.path().join("no-docker.sock").display());
    let out = exit_output(
        runner_in(
            dir.path(),
            &[
                ("DOCKER_HOST", nowhere),
                ("RUNNER_TOKEN", "some-runner-token".into()),
                (
                    "RUNNER_EDGE_URL",
                    format!("http://127.0.0.1:{}", free_port()),
                ),
                ("RUNNER_LISTEN", format!("127.0.0.1:{port}")),
            ],
        )
        .spawn()
        .unwrap(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no Docker daemon answers") && err.contains("RUNNER_EXECUTOR=process"),
        "{err}"
    );
}

/// A root runner's commands run as RUNNER_CONTAINER_USER, so that user must be able to enter
/// WORKTREES_DIR: the runner says so at start instead of failing every job.
#[test]
fn a_root_runner_refuses_a_worktrees_dir_its_commands_cannot_enter() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("not root: commands run as the runner's own user, who can enter its directories");
        return;
    }
    // A directory closed to uid 1000, as a root runner's default ~/worktrees under /root is.
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let out = exit_output(
        runner_in(
            dir.path(),
            &[
                ("RUNNER_EXECUTOR", "process".into()),
                ("RUNNER_TOKEN", "some-runner-token".into()),
                ("RUNNER_LISTEN", format!("127.0.0.1:{}", free_port())),
            ],
        )
        .spawn()
        .unwrap(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("RUNNER_CONTAINER_USER")
            && err.contains("1000:1000 cannot enter")
            && err.contains("WORKTREES_DIR"),
        "{err}"
    );
}

/// The process executor as root: the agent runs as another user with a scrubbed environment, so
/// neither the runner's environment (`/proc/<runner>/environ`: GITHUB_TOKEN, the registration
/// token) nor its state (`runner.json`: the runner token) is within its reach.
#[tokio::test]
async fn a_process_job_cannot_read_the_runners_environment_state_or_secrets() {
    assert!(
        nix::unistd::getuid().is_root(),
        "this test runs the runner as root, whose commands run as RUNNER_CONTAINER_USER"
    );
    let edge = FakeEdge::start().await;
    let remotes = Remotes::new();
    remotes.create(ORG, REPO);
    let dir = tempfile::tempdir().unwrap();
    searchable(dir.path());
    let state = dir.path().join("state");
    let port = free_port();
    let agent = format!(
        "echo \"ppid=$PPID\"; cat /proc/$PPID/environ; echo; cat {state}/runner.json; echo; env; echo \"uid=$(id -u)\"",
        state = state.display()
    );
    let mut child = Killed(
        runner_in(
            dir.path(),
            &[
                ("RUNNER_EDGE_URL", edge.url.clone()),
                ("RUNNER_REGISTRATION_TOKEN", edge::REGISTRATION_TOKEN.into()),
                ("GITHUB_TOKEN", "gh-test-token".into()),
                ("RUNNER_LISTEN", format!("127.0.0.1:{port}")),
                ("RUNNER_EXECUTOR", "process".into()),
                ("RUNNER_AGENT_CMD", agent),
                ("RUNNER_AGENT_FORMAT", "text".into()),
                ("RUNNER_GIT_BASE_URL", remotes.base_url()),
            ],
        )
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    health(port).await;
    edge.wait_hellos(1).await;
    let a = assignment(JobType::Code, "look around");
    let job = a.job_id.clone();
    edge.assign(a).await;
    let events = edge.wait_finished(&job, 30).await;
    let out = stdout_lines(&events);
    let err = stderr_lines(&events);

    // The test means something: the agent's parent is the runner, and its state file holds the
    // runner token.
    assert!(
        out.contains(&format!("ppid={}", child.0.id())),
        "the agent's parent is the runner: {out:?}"
    );
    let saved = std::fs::read_to_string(state.join("runner.json")).unwrap();
    let token = edge.issued_tokens().pop().unwrap();
    assert!(saved.contains(&token));

    assert!(out.contains(&"uid=1000".to_string()), "{out:?}");
    for line in out.iter().chain(&err) {
        for secret in [
            "gh-test-token",
            edge::REGISTRATION_TOKEN,
            token.as_str(),
            "runner_id",
            "RUNNER_",
            "GITHUB_",
        ] {
            assert!(!line.contains(secret), "the agent sees {secret}: {line}");
        }
    }
    let denied = err
        .iter()
        .filter(|l| l.contains("Permission denied"))
        .count();
    assert_eq!(denied, 2, "environ and runner.json are refused: {err:?}");
    child.0.kill().unwrap();
}

#[test]
fn without_a_credential_the_runner_says_what_to_set() {
    let state = tempfile::tempdir().unwrap();
    let out = runner(&[
        ("RUNNER_EXECUTOR", "process".into()),
        ("RUNNER_STATE_DIR", state.path().display().to_string()),
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RUNNER_REGISTRATION_TOKEN"), "{err}");
}

#[test]
fn a_runner_secret_in_runner_agent_env_is_refused_at_start() {
    for listed in [
        "ANTHROPIC_API_KEY,GITHUB_TOKEN",
        "RUNNER_TOKEN",
        "RUNNER_REGISTRATION_TOKEN",
    ] {
        let state = tempfile::tempdir().unwrap();
        let out = runner(&[
            ("RUNNER_EXECUTOR", "process".into()),
            ("RUNNER_STATE_DIR", state.path().display().to_string()),
            ("RUNNER_REGISTRATION_TOKEN", "reg".into()),
            ("GITHUB_TOKEN", "ghp-value".into()),
            ("RUNNER_AGENT_ENV", listed.into()),
        ])
        .output()
        .unwrap();
        assert!(!out.status.success(), "{listed} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        let refused = listed.rsplit(',').next().unwrap();
        assert!(
            err.contains("RUNNER_AGENT_ENV") && err.contains(&format!("{refused} is refused")),
            "{err}"
        );
        assert!(!err.contains("ghp-value"), "{err}");
    }
}

/// `RUNNER_AGENT_ENV` read from the binary's own environment, with the secrets the runner holds
/// (a GitHub token, a registration token) kept from the agent.
#[tokio::test]
async fn the_agent_of_the_binary_gets_runner_agent_env_and_none_of_its_secrets() {
    let edge = FakeEdge::start().await;
    let remotes = Remotes::new();
    remotes.create(ORG, REPO);
    let dir = tempfile::tempdir().unwrap();
    searchable(dir.path());
    let port = free_port();
    let _child = Killed(
        runner_in(
            dir.path(),
            &[
                ("RUNNER_EDGE_URL", edge.url.clone()),
                ("RUNNER_REGISTRATION_TOKEN", edge::REGISTRATION_TOKEN.into()),
                ("GITHUB_TOKEN", "gh-test-token".into()),
                ("KILN_TEST_AGENT_KEY", "sk-kiln-test-value".into()),
                (
                    "RUNNER_AGENT_ENV",
                    "KILN_TEST_AGENT_KEY,KILN_TEST_UNSET".into(),
                ),
                ("RUNNER_LISTEN", format!("127.0.0.1:{port}")),
                ("RUNNER_EXECUTOR", "process".into()),
                ("RUNNER_AGENT_CMD", agent_cmd(ExecutorKind::Process)),
                ("RUNNER_AGENT_FORMAT", "text".into()),
                ("RUNNER_GIT_BASE_URL", remotes.base_url()),
            ],
        )
        .spawn()
        .unwrap(),
    );
    health(port).await;
    edge.wait_hellos(1).await;
    let a = assignment(JobType::Code, "env");
    let job = a.job_id.clone();
    edge.assign(a).await;
    let events = edge.wait_finished(&job, 30).await;
    assert_agent_env_passed_without_secrets(&events);
}

#[tokio::test]
async fn settings_come_from_the_environment_then_the_file() {
    let edge = FakeEdge::start().await;
    let dir = tempfile::tempdir().unwrap();
    searchable(dir.path());
    let port = free_port();
    let file = dir.path().join("runner.toml");
    std::fs::write(
        &file,
        format!(
            "runner_name = \"from-file\"\nmax_concurrent_jobs = 5\nrunner_agent_cmd = \"file-agent\"\nrunner_agent_format = \"text\"\nrunner_executor = \"process\"\nrepos_dir = \"{}\"\nworktrees_dir = \"{}\"\n",
            dir.path().join("repos").display(),
            dir.path().join("worktrees").display()
        ),
    )
    .unwrap();
    let _child = Killed(
        runner(&[
            ("RUNNER_CONFIG", file.display().to_string()),
            (
                "RUNNER_STATE_DIR",
                dir.path().join("state").display().to_string(),
            ),
            ("RUNNER_EDGE_URL", edge.url.clone()),
            ("RUNNER_REGISTRATION_TOKEN", edge::REGISTRATION_TOKEN.into()),
            ("RUNNER_LISTEN", format!("127.0.0.1:{port}")),
            ("RUNNER_AGENT_CMD", "env-agent".into()),
        ])
        .spawn()
        .unwrap(),
    );
    let h = health(port).await;
    assert_eq!(h["name"], "from-file");
    assert_eq!(h["queue"]["maxConcurrent"], 5);
    assert_eq!(
        h["agent"]["command"], "env-agent",
        "the environment beats the file"
    );
    assert_eq!(h["agent"]["format"], "text");
    assert_eq!(h["executor"], "process");
    let isolation = h["isolation"].as_str().unwrap();
    if nix::unistd::getuid().is_root() {
        assert_eq!(
            isolation,
            "user: commands run on the host as 1000:1000, apart from the runner's user"
        );
    } else {
        assert_eq!(isolation, "none: commands run as the runner's own user");
    }
    assert_eq!(edge.registered_names(), vec!["from-file"]);
    assert!(dir.path().join("worktrees").is_dir());
}

/// `/metrics` of the binary while no edge answers: up, serving, and saying it is not connected.
#[tokio::test]
async fn the_binary_serves_metrics_and_reports_an_unreachable_edge() {
    let dir = tempfile::tempdir().unwrap();
    searchable(dir.path());
    let port = free_port();
    let nowhere = free_port();
    let _child = Killed(
        runner_in(
            dir.path(),
            &[
                ("RUNNER_EDGE_URL", format!("http://127.0.0.1:{nowhere}")),
                ("RUNNER_TOKEN", "some-runner-token".into()),
                ("RUNNER_LISTEN", format!("127.0.0.1:{port}")),
                ("RUNNER_EXECUTOR", "process".into()),
                ("MAX_CONCURRENT_JOBS", "3".into()),
            ],
        )
        .spawn()
        .unwrap(),
    );
    health(port).await;
    // Let a few connection attempts fail.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "kiln_runner_capacity 3",
        "kiln_runner_edge_connected 0",
        "kiln_runner_edge_reconnects_total 0",
        "kiln_runner_jobs_running 0",
        "kiln_runner_worktrees 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
    assert!(
        !dir.path().join("state").exists(),
        "RUNNER_TOKEN is not saved"
    );
}

/// SIGKILL leaves the runner no chance to clean up; its agents must still not outlive it.
#[tokio::test]
async fn a_killed_runner_takes_its_agents_with_it() {
    let edge = FakeEdge::start().await;
    let remotes = Remotes::new();
    remotes.create(ORG, REPO);
    let dir = tempfile::tempdir().unwrap();
    searchable(dir.path());
    let port = free_port();
    let mut child = Killed(
        runner_in(
            dir.path(),
            &[
                ("RUNNER_EDGE_URL", edge.url.clone()),
                ("RUNNER_REGISTRATION_TOKEN", edge::REGISTRATION_TOKEN.into()),
                ("RUNNER_LISTEN", format!("127.0.0.1:{port}")),
                ("RUNNER_EXECUTOR", "process".into()),
                ("RUNNER_AGENT_CMD", agent_cmd(ExecutorKind::Process)),
                ("RUNNER_AGENT_FORMAT", "text".into()),
                ("RUNNER_GIT_BASE_URL", remotes.base_url()),
            ],
        )
        .spawn()
        .unwrap(),
    );
    health(port).await;
    edge.wait_hellos(1).await;
    let a = assignment(JobType::Code, "hang");
    let job = a.job_id.clone();
    edge.assign(a).await;
    edge.wait_event(
        &job,
        "agent output",
        30,
        |e| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("agent: job")),
    )
    .await;
    let pid = |f: &str| {
        std::fs::read_to_string(format!("/tmp/kiln-hang-{job}.{f}"))
            .unwrap()
            .trim()
            .parse::<i32>()
            .unwrap()
    };
    let (agent, sleeper) = (pid("pid"), pid("child"));

    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let alive = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    };
    let t = std::time::Instant::now();
    while alive(agent) || alive(sleeper) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the agent outlived its runner by 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "process executor: agent group gone {} ms after the runner's SIGKILL",
        t.elapsed().as_millis()
    );
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.pid"));
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.child"));
}
