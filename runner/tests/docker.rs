//! The Docker executor against a real daemon (`DOCKER_HOST`, else the repository's private
//! `.kiln/docker/docker.sock` from `scripts/dockerd`) with the image `kiln-busybox:latest`. These
//! tests fail, with directions, when no daemon answers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_runner::config::{ContainerLimits, ContainerUser, ExecutorKind, JobLimits, Mount};
use kiln_runner::docker::{container_name, DockerClient, DockerExecutor};
use kiln_runner::executor::{ExecSpec, Execution, Executor};
use kiln_schemas::events::LogStream;
use kiln_schemas::runner::{EdgeMessage, Outcome, RunnerEvent};
use kiln_schemas::status::{CompletionReason, JobType};
use tokio::io::AsyncWriteExt;

async fn collect(mut exec: Execution) -> (String, String, i32) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(chunk) = exec.output.recv().await {
        match chunk.stream {
            LogStream::Stderr => err.extend(chunk.data),
            _ => out.extend(chunk.data),
        }
    }
    let code = exec.exit_code().await.unwrap();
    (
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
        code,
    )
}

/// An executor whose liveness file lives in `dir`.
async fn executor_in(
    limits: ContainerLimits,
    dir: &std::path::Path,
) -> (DockerClient, DockerExecutor) {
    let host = docker_host().await;
    let client = DockerClient::connect(Some(&host)).await.unwrap();
    let mounts = vec![Mount {
        host: agents_dir(),
        container: CONTAINER_AGENTS.into(),
        read_only: true,
    }];
    let alive = dir.join("alive");
    (
        client.clone(),
        DockerExecutor::new(
            client,
            "kiln-busybox:latest".into(),
            limits,
            mounts,
            alive,
            ContainerUser::default(),
        ),
    )
}

/// An executor with its liveness file in a temporary directory (kept as long as the executor).
async fn executor(limits: ContainerLimits) -> (DockerClient, DockerExecutor, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (client, exec) = executor_in(limits, dir.path()).await;
    (client, exec, dir)
}

fn job_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn a_job_container_has_the_documented_shape() {
    let (client, exec, _state) = executor(ContainerLimits {
        memory_mb: 256,
        cpus: 0.5,
        pids: 64,
        network: "none".into(),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/lib.rs"), "// the repository's file\n").unwrap();
    let job = job_id();

    let t = Instant::now();
    let sb = exec.create_sandbox(&job, dir.path()).await.unwrap();
    eprintln!(
        "docker: container create + start in {} ms",
        t.elapsed().as_millis()
    );

    let name = container_name(&job);
    assert_eq!(name, format!("project_engine_{job}_container"));
    assert!(client.container_exists(&name).await.unwrap());
    let hc = client.container_host_config(&name).await.unwrap().unwrap();
    assert_eq!(hc.memory, Some(256 * 1024 * 1024));
    assert_eq!(hc.nano_cpus, Some(500_000_000));
    assert_eq!(hc.pids_limit, Some(64));
    assert_eq!(hc.network_mode.as_deref(), Some("none"));
    assert_eq!(hc.init, Some(true));
    assert_eq!(hc.auto_remove, Some(true));
    // Hardened: no capability, no privilege gain, a read-only root with a size-limited /tmp.
    assert_eq!(hc.cap_drop, Some(vec!["ALL".to_string()]));
    assert!(
        hc.cap_add.as_ref().is_none_or(|c| c.is_empty()),
        "no capability is added by default: {:?}",
        hc.cap_add
    );
    assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_string()]));
    assert_eq!(hc.readonly_rootfs, Some(true));
    assert_eq!(
        hc.tmpfs
            .as_ref()
            .and_then(|t| t.get("/tmp"))
            .map(String::as_str),
        Some("rw,exec,nosuid,nodev,size=512m,mode=1777"),
        "{:?}",
        hc.tmpfs
    );
    assert_eq!(
        hc.memory_swap,
        Some(256 * 1024 * 1024),
        "no swap beyond the memory limit"
    );
    let own = nix::unistd::getuid();
    let user = if own.is_root() {
        "1000:1000".to_string()
    } else {
        format!("{own}:{}", nix::unistd::getgid())
    };
    assert_eq!(
        client.container_user(&name).await.unwrap().as_deref(),
        Some(user.as_str())
    );
    let binds = hc.binds.unwrap();
    assert!(
        binds.contains(&format!("{}:/app", dir.path().display())),
        "{binds:?}"
    );
    assert!(
        binds.contains(&format!("{}:{CONTAINER_AGENTS}:ro", agents_dir().display())),
        "{binds:?}"
    );

    let t = Instant::now();
    let mut e = sb
        .exec(ExecSpec::new("cat; echo \"$JOB_ID $ITERATION $(pwd)\"; ls /sys/class/net; echo to-stderr >&2; echo made > here.txt", &job, 3).with_stdin())
        .await
        .unwrap();
    let mut stdin = e.stdin.take().unwrap();
    stdin.write_all(b"the prompt\n").await.unwrap();
    stdin.shutdown().await.unwrap();
    let (out, err, code) = collect(e).await;
    eprintln!(
        "docker: exec with stdin, round trip in {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!("the prompt\n{job} 3 /app\nlo\n"),
        "stdin reached the command, env and cwd are set, only loopback"
    );
    assert_eq!(err, "to-stderr\n");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("here.txt")).unwrap(),
        "made\n",
        "/app is the worktree"
    );

    // Never root inside: a root runner gives the worktree to the agent image's user.
    let (out, _, code) = collect(
        sb.exec(ExecSpec::new(
            "id -u; id -g; echo $HOME; echo edit >> src/lib.rs && mkdir -p src/new && echo ok",
            &job,
            1,
        ))
        .await
        .unwrap(),
    )
    .await;
    let own = nix::unistd::getuid();
    let want = if own.is_root() {
        "1000\n1000\n".to_string()
    } else {
        format!("{own}\n{}\n", nix::unistd::getgid())
    };
    assert_eq!(
        out,
        format!("{want}/tmp\nok\n"),
        "uid, gid, HOME, and the worktree is writable"
    );
    assert_eq!(code, 0);

    // Inside, as the kernel sees it: no effective or bounding capability, no new privileges, the
    // root filesystem refuses writes, /tmp takes them (and runs what is written there).
    let (out, err, code) = collect(
        sb.exec(ExecSpec::new(
            "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; \
             touch /etc/kiln-test 2>/dev/null && echo root-writable || echo root-read-only; \
             printf '#!/bin/sh\\necho tmp-exec\\n' > /tmp/x.sh && chmod +x /tmp/x.sh && /tmp/x.sh; \
             df -k /tmp | tail -1 | awk '{print \"tmp-kb=\" $2}'",
            &job,
            1,
        ))
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "CapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nNoNewPrivs:\t1\nroot-read-only\ntmp-exec\ntmp-kb=524288\n"
    );

    assert_eq!(
        collect(sb.exec(ExecSpec::new("exit 5", &job, 1)).await.unwrap())
            .await
            .2,
        5
    );
    let (out, _, _) = collect(
        sb.exec(ExecSpec::new(
            format!("sh {CONTAINER_AGENTS}/agent.sh"),
            &job,
            1,
        ))
        .await
        .unwrap(),
    )
    .await;
    assert!(
        out.starts_with(&format!("agent: job {job} iteration 1 prompt: ")),
        "the mounted agent runs: {out}"
    );

    let t = Instant::now();
    sb.destroy().await.unwrap();
    eprintln!(
        "docker: idle container force-removed in {} ms",
        t.elapsed().as_millis()
    );
    assert!(!client.container_exists(&name).await.unwrap());
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn the_pids_limit_is_enforced() {
    let (_, exec, _state) = executor(ContainerLimits {
        memory_mb: 128,
        cpus: 1.0,
        pids: 16,
        network: "none".into(),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_id();
    let sb = exec.create_sandbox(&job, dir.path()).await.unwrap();
    let (_, err, _) = collect(
        sb.exec(ExecSpec::new(
            "i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done; echo spawned",
            &job,
            1,
        ))
        .await
        .unwrap(),
    )
    .await;
    sb.destroy().await.unwrap();
    assert!(
        err.contains("fork"),
        "forks beyond the pids limit fail: {err:?}"
    );
}

#[tokio::test]
async fn the_memory_limit_is_enforced() {
    let (_, exec, _state) = executor(ContainerLimits {
        memory_mb: 32,
        cpus: 1.0,
        pids: 64,
        network: "none".into(),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_id();
    let sb = exec.create_sandbox(&job, dir.path()).await.unwrap();
    // `tail -c` keeps what it reads in memory: 64 MiB does not fit in 32.
    let (_, _, code) = collect(
        sb.exec(ExecSpec::new(
            "head -c 67108864 /dev/zero | tail -c 67108864 > /dev/null",
            &job,
            1,
        ))
        .await
        .unwrap(),
    )
    .await;
    sb.destroy().await.unwrap();
    assert_eq!(code, 137, "the OOM killer ends the command");
}

#[tokio::test]
async fn destroying_a_busy_container_ends_its_commands_quickly() {
    let (client, exec, _state) = executor(ContainerLimits::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_id();
    let sb = exec.create_sandbox(&job, dir.path()).await.unwrap();
    let mut e = sb
        .exec(ExecSpec::new(
            "echo working; while :; do sleep 1; done",
            &job,
            1,
        ))
        .await
        .unwrap();
    let first = e.output.recv().await.unwrap();
    assert_eq!(first.data, b"working\n");

    let t = Instant::now();
    sb.destroy().await.unwrap();
    let removed = t.elapsed();
    while e.output.recv().await.is_some() {}
    let ended = t.elapsed();
    eprintln!(
        "docker: busy container force-removed in {} ms, its exec stream ended after {} ms",
        removed.as_millis(),
        ended.as_millis()
    );
    assert!(!client
        .container_exists(&container_name(&job))
        .await
        .unwrap());
    assert!(ended < Duration::from_secs(5), "{ended:?}");
    // The exit code of a killed exec may be unknown, but asking must not hang.
    let _ = tokio::time::timeout(Duration::from_secs(5), e.exit_code())
        .await
        .expect("the exit code answer does not hang");
}

/// A runner killed outright cannot remove its containers: they notice its liveness file going
/// stale, stop, and are removed, taking the agents exec'd in them along.
#[tokio::test]
async fn a_container_goes_away_once_its_runner_is_gone() {
    let state = tempfile::tempdir().unwrap();
    let (client, exec) = executor_in(ContainerLimits::default(), state.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_id();
    let sb = exec.create_sandbox(&job, dir.path()).await.unwrap();
    let mut agent = sb
        .exec(ExecSpec::new(
            "echo working; while :; do sleep 1; done",
            &job,
            1,
        ))
        .await
        .unwrap();
    assert_eq!(agent.output.recv().await.unwrap().data, b"working\n");
    let name = container_name(&job);

    // Still there after a few checks while the runner lives.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(client.container_exists(&name).await.unwrap());

    // The runner "dies": nothing refreshes the file any more, and it is old.
    drop(exec);
    let stale = std::time::SystemTime::now()
        - Duration::from_secs(kiln_runner::docker::ALIVE_STALE_SECS + 60);
    std::fs::File::options()
        .write(true)
        .open(state.path().join("alive"))
        .unwrap()
        .set_modified(stale)
        .unwrap();
    let t = Instant::now();
    while client.container_exists(&name).await.unwrap() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the orphaned container is still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "docker: orphaned container gone {} ms after its liveness file went stale",
        t.elapsed().as_millis()
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while agent.output.recv().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the exec'd agent ended with its container");
    drop(sb);
}

async fn docker_runner() -> TestRunner {
    let host = docker_host().await;
    TestRunner::start(RunnerOptions {
        executor: ExecutorKind::Docker,
        docker_host: Some(host),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn a_code_job_runs_in_its_container_and_opens_a_pull_request() {
    let runner = docker_runner().await;
    let h = runner.health().await;
    assert_eq!(h["executor"], "docker");
    assert_eq!(h["docker"]["available"], true);
    assert!(
        h["docker"]["version"]
            .as_str()
            .unwrap()
            .starts_with("20.10"),
        "{h}"
    );

    let a = assignment(JobType::Code, "write in a container");
    let (job, branch) = (a.job_id.clone(), a.branch_name.clone());
    let events = runner.run(a, 60).await;
    assert_started_and_finished(&events);
    let (outcome, _, pr_url, ..) = finished(&events);
    assert_eq!(outcome, Outcome::Completed, "{events:#?}");
    assert!(pr_url.is_some());
    assert!(stdout_lines(&events)
        .iter()
        .any(|l| l == &format!("agent: job {job} iteration 1 prompt: write in a container")));
    assert_eq!(
        runner
            .remotes
            .show(ORG, REPO, &format!("{branch}:kiln/iteration-1.txt"))
            .as_deref(),
        Some("write in a container\n")
    );
    runner.wait_released(&job).await;
    let client = DockerClient::connect(Some(&docker_host().await))
        .await
        .unwrap();
    assert!(
        !client
            .container_exists(&container_name(&job))
            .await
            .unwrap(),
        "the container is removed after the job"
    );
    runner.stop().await;
}

#[tokio::test]
async fn the_agent_in_its_container_gets_runner_agent_env_but_never_the_runners_secrets() {
    let host = docker_host().await;
    let runner = TestRunner::start(RunnerOptions {
        executor: ExecutorKind::Docker,
        docker_host: Some(host),
        agent_env: agent_env_with_secrets(),
        ..Default::default()
    })
    .await;
    let mut a = assignment(JobType::Ralph, "env promise@1");
    a.ralph.as_mut().unwrap().feedback_commands =
        vec!["echo \"feedback sees [$KILN_TEST_AGENT_KEY]\"".into()];
    let events = runner.run(a, 60).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    assert_agent_env_passed_without_secrets(&events);
    assert!(
        stdout_lines(&events).contains(&"feedback sees []".to_string()),
        "feedback commands are not given the agent's variables: {:?}",
        stdout_lines(&events)
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_task_job_talks_to_its_agent_through_docker_exec() {
    let runner = docker_runner().await;
    let a = assignment(JobType::Task, "echo hello");
    let job = a.job_id.clone();
    runner.edge.assign(a).await;
    runner.edge.wait_event(&job, "the greeting", 30, |e| matches!(e, RunnerEvent::Log { content, .. } if content.ends_with("prompt: echo hello"))).await;
    runner
        .edge
        .send(EdgeMessage::Deliver {
            job_id: job.clone(),
            message: "ping".into(),
        })
        .await;
    runner
        .edge
        .wait_event(
            &job,
            "the answer",
            10,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content == "echo: ping"),
        )
        .await;
    let events = runner.complete(&job, 15).await;
    assert_eq!(finished(&events).0, Outcome::Completed);
    assert!(
        stdout_lines(&events).contains(&"agent: input closed".to_string()),
        "closing stdin reaches the exec'd agent"
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_ralph_job_runs_agent_and_feedback_in_one_container() {
    let runner = docker_runner().await;
    let mut a = assignment(JobType::Ralph, "write promise@2");
    a.ralph.as_mut().unwrap().feedback_commands =
        vec!["test -f kiln/iteration-1.txt && ls /sys/class/net".into()];
    let events = runner.run(a, 60).await;
    let (outcome, _, pr_url, reason, total, _) = finished(&events);
    assert_eq!(
        (outcome, reason, total),
        (
            Outcome::Completed,
            Some(CompletionReason::PromiseDetected),
            Some(2)
        ),
        "{events:#?}"
    );
    assert!(pr_url.is_some());
    let passed: Vec<bool> = events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Iteration { iteration } => Some(iteration.feedback_results[0].passed),
            _ => None,
        })
        .collect();
    assert_eq!(passed, vec![true, true]);
    runner.stop().await;
}

#[tokio::test]
async fn a_cancel_removes_the_container_within_seconds() {
    let runner = docker_runner().await;
    let client = DockerClient::connect(Some(&docker_host().await))
        .await
        .unwrap();
    let a = assignment(JobType::Code, "hang");
    let job = a.job_id.clone();
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(
            &job,
            "agent output",
            30,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("agent: job")),
        )
        .await;
    let name = container_name(&job);
    assert!(client.container_exists(&name).await.unwrap());

    let t = Instant::now();
    runner
        .edge
        .send(EdgeMessage::Cancel {
            job_id: job.clone(),
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.container_exists(&name).await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "the container is still there 10 s after the cancel"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gone = t.elapsed();
    runner.wait_released(&job).await;
    let released = t.elapsed();
    eprintln!(
        "docker: Cancel to container gone in {} ms, to job released in {} ms",
        gone.as_millis(),
        released.as_millis()
    );
    assert!(!runner.worktrees_dir().join(&job).exists());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!runner
        .edge
        .events(&job)
        .iter()
        .any(|e| matches!(e, RunnerEvent::Finished { .. })));
    runner.stop().await;
}

/// The worktree is bind-mounted from the host, so its size is checked there after every agent run
/// and command: a job whose agent writes more than RUNNER_WORKSPACE_MAX_MB fails, nothing of it
/// is pushed, and its container and worktree are removed.
#[tokio::test]
async fn a_job_whose_agent_outgrows_the_workspace_limit_fails() {
    let host = docker_host().await;
    let runner = TestRunner::start(RunnerOptions {
        executor: ExecutorKind::Docker,
        docker_host: Some(host.clone()),
        limits: JobLimits {
            workspace_max_bytes: 1024 * 1024,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let a = assignment(JobType::Code, "big");
    let (job, branch) = (a.job_id.clone(), a.branch_name.clone());
    let events = runner.run(a, 60).await;
    assert_started_and_finished(&events);
    let (outcome, _, pr_url, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed, "{events:#?}");
    assert_eq!(
        error.as_deref(),
        Some("The workspace holds 4 MiB, over its limit of 1 MiB (RUNNER_WORKSPACE_MAX_MB)")
    );
    assert!(pr_url.is_none());
    assert!(
        stdout_lines(&events).contains(&"agent: wrote 3 MiB".to_string()),
        "the agent ran: {events:#?}"
    );
    assert!(!runner.remotes.branches(ORG, REPO).contains(&branch));
    runner.wait_released(&job).await;
    assert!(!runner.worktrees_dir().join(&job).exists());
    let client = DockerClient::connect(Some(&host)).await.unwrap();
    assert!(!client
        .container_exists(&container_name(&job))
        .await
        .unwrap());

    // Under the limit, the same runner completes a job.
    let events = runner.run(assignment(JobType::Code, "write"), 60).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    runner.stop().await;
}
