//! The process executor on this host: `sh -c` in the workspace, stdin, exit codes, a scrubbed
//! environment, another user when the tests run as root, and the whole process group killed on
//! destroy.

use std::time::{Duration, Instant};

use kiln_runner::config::ContainerUser;
use kiln_runner::executor::process::ProcessExecutor;
use kiln_runner::executor::{ExecError, ExecSpec, Execution, Executor, Sandbox};
use kiln_runner::isolation::JobUser;
use kiln_schemas::events::LogStream;
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

/// Whether the process is gone (or a zombie) within a second: SIGKILL takes effect asynchronously.
async fn gone(pid: i32) -> bool {
    for _ in 0..50 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// A sandbox over `dir` (made searchable, as a root runner's WORKTREES_DIR must be), its
/// scratch home in the returned directory. As root, its commands run as 1000:1000.
async fn sandbox(dir: &std::path::Path) -> (Box<dyn Sandbox>, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let homes = tempfile::tempdir().unwrap();
    std::fs::set_permissions(homes.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let executor = ProcessExecutor::new(
        JobUser::current(ContainerUser::default()),
        homes.path().join("homes"),
    );
    let job = uuid::Uuid::new_v4().to_string();
    (executor.create_sandbox(&job, dir).await.unwrap(), homes)
}

#[tokio::test]
async fn commands_run_in_the_workspace_with_stdin_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let (sb, _homes) = sandbox(dir.path()).await;
    let mut exec = sb.exec(ExecSpec::new("cat; echo \"job=$JOB_ID it=$ITERATION pwd=$(pwd)\"; echo oops >&2; touch made-here", "job-p", 4).with_stdin()).await.unwrap();
    let mut stdin = exec.stdin.take().unwrap();
    stdin.write_all(b"the prompt\n").await.unwrap();
    stdin.shutdown().await.unwrap();
    drop(stdin);
    let (out, err, code) = collect(exec).await;
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!(
            "the prompt\njob=job-p it=4 pwd={}\n",
            dir.path().canonicalize().unwrap().display()
        )
    );
    assert_eq!(err, "oops\n");
    assert!(dir.path().join("made-here").exists());
}

#[tokio::test]
async fn exit_codes_and_signals_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (sb, _homes) = sandbox(dir.path()).await;
    assert_eq!(
        collect(sb.exec(ExecSpec::new("exit 7", "j", 1)).await.unwrap())
            .await
            .2,
        7
    );
    assert_eq!(
        collect(sb.exec(ExecSpec::new("kill -9 $$", "j", 1)).await.unwrap())
            .await
            .2,
        137
    );
    // No stdin attached: reading it gives end-of-file at once.
    let (out, _, code) = collect(
        sb.exec(ExecSpec::new("cat; echo eof", "j", 1))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((out.as_str(), code), ("eof\n", 0));
}

#[tokio::test]
async fn commands_get_a_scrubbed_environment_and_a_scratch_home() {
    // Only this test binary's environment changes.
    std::env::set_var("GITHUB_TOKEN", "secret-gh");
    std::env::set_var("RUNNER_TOKEN", "secret-runner");
    std::env::set_var("KILN_TEST_RUNNER_ONLY", "runner-only");
    let dir = tempfile::tempdir().unwrap();
    let (sb, homes) = sandbox(dir.path()).await;
    let mut spec = ExecSpec::new(
        "env; echo \"home-writable=$(touch \"$HOME/x\" && echo yes)\"; echo \"ppid-env=$(tr '\\0' '\\n' < /proc/$PPID/environ 2>/dev/null | grep -c TOKEN)\"",
        "j",
        2,
    );
    spec.env
        .push(("KILN_TEST_AGENT_KEY".into(), "agent-key".into()));
    spec.env.push(("GITHUB_TOKEN".into(), "slipped-in".into()));
    let (out, _, code) = collect(sb.exec(spec).await.unwrap()).await;
    assert_eq!(code, 0, "{out}");
    let vars: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once('=')).collect();
    let names: Vec<&str> = vars.iter().map(|(k, _)| *k).collect();
    let given = [
        "PATH",
        "LANG",
        "HOME",
        "JOB_ID",
        "ITERATION",
        "KILN_TEST_AGENT_KEY",
    ];
    for name in given {
        assert!(names.contains(&name), "{name} is missing: {out}");
    }
    // The shell adds PWD (and may add SHLVL and OLDPWD) itself; the last two are the probes'.
    let shells = ["PWD", "OLDPWD", "SHLVL", "home-writable", "ppid-env"];
    for name in &names {
        assert!(
            given.contains(name) || shells.contains(name),
            "the command sees {name}: {out}"
        );
    }
    assert!(
        !out.contains("secret-") && !out.contains("slipped-in"),
        "{out}"
    );
    assert!(!out.contains("runner-only"), "{out}");
    let home = vars.iter().find(|(k, _)| *k == "HOME").unwrap().1;
    assert!(
        std::path::Path::new(home).starts_with(homes.path()),
        "HOME is the job's scratch directory: {home}"
    );
    assert!(out.contains("home-writable=yes"), "{out}");
    if nix::unistd::getuid().is_root() {
        // Another user cannot read the runner's /proc/<pid>/environ.
        assert!(out.contains("ppid-env=0"), "{out}");
    }
    sb.destroy().await.unwrap();
    assert!(
        !std::path::Path::new(home).exists(),
        "destroy removes the scratch home"
    );
}

#[tokio::test]
async fn a_root_runners_commands_run_as_another_user_that_owns_the_worktree() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tracked.txt"), "x\n").unwrap();
    let (sb, _homes) = sandbox(dir.path()).await;
    let (out, _, code) = collect(
        sb.exec(ExecSpec::new(
            "id -u; id -g; echo more >> tracked.txt && echo edited",
            "j",
            1,
        ))
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let own = nix::unistd::getuid();
    let want = if own.is_root() {
        "1000\n1000\nedited\n".to_string()
    } else {
        format!("{own}\n{}\nedited\n", nix::unistd::getgid())
    };
    assert_eq!(out, want);
}

#[tokio::test]
async fn destroy_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let (sb, _homes) = sandbox(dir.path()).await;
    let exec = sb
        .exec(ExecSpec::new("sleep 1000 & echo $! > child.pid; echo $$ > leader.pid; echo started; while :; do sleep 1; done", "j", 1))
        .await
        .unwrap();
    let started = Instant::now();
    while !(dir.path().join("child.pid").exists() && dir.path().join("leader.pid").exists()) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the command did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let read = |f: &str| {
        std::fs::read_to_string(dir.path().join(f))
            .unwrap()
            .trim()
            .parse::<i32>()
            .unwrap()
    };
    let (leader, child) = (read("leader.pid"), read("child.pid"));
    assert!(alive(leader) && alive(child));

    let t = Instant::now();
    sb.destroy().await.unwrap();
    let took = t.elapsed();
    let (_, _, code) = collect(exec).await;
    assert_eq!(code, 137, "killed by SIGKILL");
    assert!(gone(leader).await, "the command survived");
    assert!(gone(child).await, "its background child survived");
    assert!(took < Duration::from_secs(2), "destroy took {took:?}");
    eprintln!(
        "process executor: destroy to group gone in {} ms",
        took.as_millis()
    );

    assert!(matches!(
        sb.exec(ExecSpec::new("true", "j", 1)).await,
        Err(ExecError::SandboxGone)
    ));
}

#[tokio::test]
async fn a_background_child_does_not_hold_a_finished_command_open() {
    let dir = tempfile::tempdir().unwrap();
    let (sb, _homes) = sandbox(dir.path()).await;
    let t = Instant::now();
    let (out, _, code) = collect(
        sb.exec(ExecSpec::new(
            "sleep 1000 & echo $! > bg.pid; echo done",
            "j",
            1,
        ))
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((out.as_str(), code), ("done\n", 0));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let bg: i32 = std::fs::read_to_string(dir.path().join("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        gone(bg).await,
        "the finished command's background child is killed with its group"
    );
}
