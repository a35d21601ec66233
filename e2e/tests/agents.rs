//! The stand-in agents behave as the end-to-end tests rely on, run by busybox sh as in a container.

use std::io::Write;
use std::process::{Command, Stdio};

use kiln_e2e::agents;

/// Runs an agent with `sh` in `cwd` with `stdin` as input; answers (exit code, stdout, stderr).
fn run(agent: &str, cwd: &std::path::Path, env: &[(&str, &str)], stdin: &str) -> (i32, String, String) {
    let shell = if std::path::Path::new("/bin/busybox").exists() { vec!["/bin/busybox", "sh"] } else { vec!["sh"] };
    let mut child = Command::new(shell[0])
        .args(&shell[1..])
        .arg(agents::dir().join(agent))
        .current_dir(cwd)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the agent");
    // An agent may exit without reading its input.
    let _ = child.stdin.take().expect("stdin").write_all(stdin.as_bytes());
    let out = child.wait_with_output().expect("waiting for the agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn editor_edits_files_and_promises_on_its_third_iteration() {
    let ws = tempfile::tempdir().unwrap();
    for n in 1..=3 {
        let (code, out, _) = run(agents::EDITOR, ws.path(), &[("ITERATION", &n.to_string()), ("JOB_ID", "j1")], "add a button\n");
        assert_eq!(code, 0);
        assert_eq!(out.contains("RALPH_COMPLETE"), n == 3, "iteration {n}: {out}");
        let written = std::fs::read_to_string(ws.path().join(format!("kiln-agent/iteration-{n}.txt"))).unwrap();
        assert!(written.contains("prompt: add a button"), "{written}");
    }
    let progress = std::fs::read_to_string(ws.path().join("kiln-agent/progress.txt")).unwrap();
    assert_eq!(progress, "iteration 1\niteration 2\niteration 3\n");
    let (_, out, _) = run(agents::EDITOR, ws.path(), &[("ITERATION", "3"), ("COMPLETION_PROMISE", "DONE")], "x");
    assert!(out.contains("DONE") && !out.contains("RALPH_COMPLETE"), "{out}");
}

#[test]
fn failing_agent_writes_stderr_and_exits_1() {
    let ws = tempfile::tempdir().unwrap();
    let (code, out, err) = run(agents::FAILING, ws.path(), &[], "x");
    assert_eq!(code, 1);
    assert!(out.contains("starting"));
    assert!(err.contains("simulated crash"));
}

#[test]
fn noop_agent_prints_one_line() {
    let ws = tempfile::tempdir().unwrap();
    let (code, out, _) = run(agents::NOOP, ws.path(), &[], "");
    assert_eq!((code, out.lines().count()), (0, 1), "{out}");
}

#[test]
fn echo_agent_answers_each_line_until_input_closes() {
    let ws = tempfile::tempdir().unwrap();
    let (code, out, _) = run(agents::ECHO, ws.path(), &[], "spec a feature\nanalytics, please\n");
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["echo agent: ready", "echo: spec a feature", "echo: analytics, please", "echo agent: input closed, bye"]
    );
}

#[test]
fn hanging_agent_is_still_running_after_two_seconds() {
    let mut child = Command::new("sh")
        .arg(agents::dir().join(agents::HANGING))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "the hanging agent exited");
    child.kill().unwrap();
    child.wait().unwrap();
}
