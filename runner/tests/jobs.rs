//! The whole runner (process executor) against a fake edge and a fake GitHub, with real git
//! remotes: registration, the session, every job kind, cancel, lost leases, retries, reconnects
//! and capacity.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_runner::config::{AgentFormat, JobLimits};
use kiln_schemas::events::LogStream;
use kiln_schemas::jobs::RalphParams;
use kiln_schemas::runner::{
    EdgeMessage, HeldJob, Outcome, RepoSpec, RunnerEvent, RunnerMessage, RunnerRequest,
};
use kiln_schemas::status::{CompletionReason, JobType};
use serde_json::json;

fn iterations(events: &[RunnerEvent]) -> Vec<kiln_schemas::jobs::Iteration> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Iteration { iteration } => Some(iteration.clone()),
            _ => None,
        })
        .collect()
}

fn system_lines(events: &[RunnerEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Log {
                stream: LogStream::System,
                content,
            } => Some(content.clone()),
            _ => None,
        })
        .collect()
}

fn has_stdout(events: &[RunnerEvent], needle: &str) -> bool {
    stdout_lines(events).iter().any(|l| l.contains(needle))
}

/// Every batch of the job used its lease, and the indices are dense from 0.
fn assert_dense_indices(runner: &TestRunner, job_id: &str, lease_id: &str) {
    let batches = runner.edge.batches(job_id);
    assert!(!batches.is_empty());
    let mut seen: Vec<u64> = batches
        .iter()
        .flat_map(|b| {
            assert_eq!(b.lease_id, lease_id);
            b.events.iter().map(|e| e.index)
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        (0..seen.len() as u64).collect::<Vec<_>>(),
        "indices are dense from 0"
    );
}

async fn wait_pid_file(path: &str) -> i32 {
    wait_until(path, Duration::from_secs(10), || {
        std::fs::read_to_string(path)
            .map(|s| !s.trim().is_empty())
            .unwrap_or(false)
    })
    .await;
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn gone(pid: i32) -> bool {
    for _ in 0..100 {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false);
        if !alive {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// What jobs left in `WORKTREES_DIR`: worktrees, progress files, and the process executor's
/// scratch homes (`.kiln-homes/<job>`; the directory holding them is the runner's).
fn worktrees_left(runner: &TestRunner) -> Vec<String> {
    let names = |dir: std::path::PathBuf| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let homes = kiln_runner::executor::process::HOMES_DIR;
    let mut left: Vec<String> = names(runner.worktrees_dir())
        .into_iter()
        .filter(|n| n != homes)
        .collect();
    left.extend(
        names(runner.worktrees_dir().join(homes))
            .into_iter()
            .map(|n| format!("{homes}/{n}")),
    );
    left
}

#[tokio::test]
async fn the_runner_registers_says_hello_beats_and_reports_health() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    assert_eq!(runner.edge.registered_names(), vec!["test-runner"]);
    match &runner.edge.hellos()[0] {
        RunnerMessage::Hello {
            name,
            capacity,
            running,
            version,
            tools,
        } => {
            assert_eq!(
                (name.as_str(), *capacity, running.len()),
                ("test-runner", 2, 0)
            );
            assert_eq!(version, env!("CARGO_PKG_VERSION"));
            let tools = tools.as_ref().expect("the runner reports its tools");
            assert_eq!(tools.profile, "text");
            assert_eq!(tools.agent_version, None, "a text agent has no CLI to ask");
            assert!(tools.git_version.is_some(), "{tools:?}");
            assert!(
                tools.forge_token && !tools.demo_model && !tools.agent_authenticated,
                "{tools:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    wait_until("a heartbeat", Duration::from_secs(5), || {
        runner
            .edge
            .received()
            .iter()
            .any(|m| matches!(m, RunnerMessage::Heartbeat { running } if running.is_empty()))
    })
    .await;

    // Messages about jobs the runner does not hold change nothing.
    runner
        .edge
        .send(EdgeMessage::Cancel {
            job_id: "nope".into(),
        })
        .await;
    runner
        .edge
        .send(EdgeMessage::Deliver {
            job_id: "nope".into(),
            message: "hi".into(),
        })
        .await;

    let h = runner.health().await;
    assert_eq!(h["status"], "ok");
    assert_eq!(
        h["queue"],
        json!({"running": 0, "queued": 0, "maxConcurrent": 2})
    );
    assert_eq!(h["executor"], "process");
    assert_eq!(h["edge"]["connected"], true);
    assert_eq!(h["edge"]["url"], format!("{}/", runner.edge.url));
    assert_eq!(h["git"]["available"], true);
    assert!(h["git"]["version"].as_str().unwrap().starts_with('2'));
    assert_eq!(h["agent"]["format"], "text");
    assert!(h["agent"]["command"]
        .as_str()
        .unwrap()
        .ends_with("agent.sh"));
    assert!(h["docker"]["available"].is_boolean());
    runner.stop().await;
}

#[tokio::test]
async fn a_code_job_commits_pushes_and_opens_a_pull_request() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let mut a = assignment(JobType::Code, "write Add a logout button to the header");
    a.title = Some("Add logout button".into());
    let (job, lease, branch) = (a.job_id.clone(), a.lease_id.clone(), a.branch_name.clone());
    let events = runner.run(a, 60).await;

    assert_started_and_finished(&events);
    let (outcome, message, pr_url, reason, total, error) = finished(&events);
    assert_eq!(outcome, Outcome::Completed, "{events:#?}");
    assert_eq!(
        pr_url.as_deref(),
        Some("https://github.test/acme/site/pull/1")
    );
    assert!(message.contains("pull/1"), "{message}");
    assert_eq!((reason, total, error), (None, None, None));
    assert!(
        has_stdout(
            &events,
            &format!("agent: job {job} iteration 1 prompt: write Add a logout button")
        ),
        "{events:#?}"
    );
    assert!(system_lines(&events)
        .iter()
        .any(|l| l.starts_with("Pushed branch")));

    let written = runner
        .remotes
        .show(ORG, REPO, &format!("{branch}:kiln/iteration-1.txt"))
        .expect("the agent's file was pushed");
    assert_eq!(written, "write Add a logout button to the header\n");
    let log = git(
        &runner.remotes.path(ORG, REPO),
        &["log", "-1", "--format=%an <%ae>|%s", &branch],
    );
    assert_eq!(log.trim(), "Kiln <kiln@localhost>|Add logout button");

    let calls = runner.github.calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!((c.org.as_str(), c.repo.as_str()), (ORG, REPO));
    assert_eq!(c.authorization.as_deref(), Some("Bearer gh-test-token"));
    assert_eq!(c.accept.as_deref(), Some("application/vnd.github+json"));
    assert_eq!(c.user_agent.as_deref(), Some("kiln-runner"));
    assert_eq!(c.body["title"], "Add logout button");
    assert_eq!(c.body["head"], branch.as_str());
    assert_eq!(c.body["base"], "main");
    assert!(c.body["body"]
        .as_str()
        .unwrap()
        .contains("Add a logout button"));

    assert_dense_indices(&runner, &job, &lease);
    runner.wait_released(&job).await;
    assert_eq!(worktrees_left(&runner), Vec::<String>::new());
    runner.stop().await;
}

#[tokio::test]
async fn a_runner_refuses_repositories_outside_runner_repositories_before_fetching() {
    let runner = TestRunner::start(RunnerOptions {
        repositories: vec![kiln_schemas::grants::RepoPattern::parse("other/*").unwrap()],
        ..Default::default()
    })
    .await;
    let events = runner.run(assignment(JobType::Code, "write"), 60).await;
    assert_started_and_finished(&events);
    let (outcome, _, _, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(
        error.as_deref(),
        Some(
            format!(
                "This runner does not work on {ORG}/{REPO}: its RUNNER_REPOSITORIES are other/*"
            )
            .as_str()
        )
    );
    assert!(
        !runner.dirs.path().join("repos").join(ORG).exists(),
        "nothing was fetched"
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_runner_never_pushes_to_a_protected_branch() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let before = runner.remotes.branches(ORG, REPO);
    for branch in ["main", "develop", "release/2.0"] {
        let mut a = assignment(JobType::Code, "write");
        a.branch_name = branch.into();
        let events = runner.run(a, 60).await;
        let (outcome, _, _, _, _, error) = finished(&events);
        assert_eq!(outcome, Outcome::Failed, "{branch}");
        let error = error.unwrap();
        assert!(
            error.starts_with(&format!("Refused: branchName {branch} is protected")),
            "{error}"
        );
    }
    // A branch that is the job's own base branch is the one its pull request would target.
    let mut a = assignment(JobType::Code, "write");
    a.branch_name = "feature/base".into();
    a.base_branch = Some("feature/base".into());
    let (outcome, _, _, _, _, error) = finished(&runner.run(a, 60).await);
    assert_eq!(outcome, Outcome::Failed);
    assert!(error
        .unwrap()
        .contains("feature/base (the repository's default branch)"));
    assert_eq!(
        runner.remotes.branches(ORG, REPO),
        before,
        "nothing was pushed"
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_failing_agent_fails_the_code_job_and_nothing_is_pushed() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let a = assignment(JobType::Code, "write fail");
    let branch = a.branch_name.clone();
    let events = runner.run(a, 60).await;
    assert_started_and_finished(&events);
    let (outcome, _, pr_url, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(pr_url, None);
    assert_eq!(error.as_deref(), Some("The agent exited with code 1"));
    assert!(stderr_lines(&events).contains(&"agent: simulated crash".to_string()));
    assert!(!runner.remotes.branches(ORG, REPO).contains(&branch));
    assert!(runner.github.calls().is_empty());
    runner.stop().await;
}

#[tokio::test]
async fn a_code_job_without_changes_completes_without_a_pull_request() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let events = runner
        .run(assignment(JobType::Code, "look around"), 60)
        .await;
    let (outcome, message, pr_url, ..) = finished(&events);
    assert_eq!((outcome, pr_url), (Outcome::Completed, None));
    assert!(message.contains("without changes"), "{message}");
    assert!(runner.github.calls().is_empty());
    runner.stop().await;
}

#[tokio::test]
async fn the_agent_gets_runner_agent_env_but_never_the_runners_secrets() {
    let runner = TestRunner::start(RunnerOptions {
        agent_env: agent_env_with_secrets(),
        ..Default::default()
    })
    .await;
    let a = assignment(JobType::Ralph, "env promise@1");
    let job = a.job_id.clone();
    let mut a = a;
    a.ralph.as_mut().unwrap().feedback_commands =
        vec!["echo \"feedback sees [$KILN_TEST_AGENT_KEY]\"".into()];
    let events = runner.run(a, 60).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    assert_agent_env_passed_without_secrets(&events);
    let env = agent_env(&events);
    assert!(env.iter().any(|(k, v)| k == "JOB_ID" && v == &job));
    assert!(
        has_stdout(&events, "feedback sees []"),
        "feedback commands are not given the agent's variables: {:?}",
        stdout_lines(&events)
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_code_job_starts_from_its_base_branch_and_targets_it() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let mut a = assignment(JobType::Code, "write on develop");
    a.base_branch = Some("develop".into());
    let branch = a.branch_name.clone();
    let events = runner.run(a, 60).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    assert_eq!(runner.github.calls()[0].body["base"], "develop");
    let files = runner.remotes.files(ORG, REPO, &branch);
    assert!(files.contains(&"DEVELOP.md".to_string()), "{files:?}");

    let mut bad = assignment(JobType::Code, "write");
    bad.base_branch = Some("no-such-branch".into());
    let events = runner.run(bad, 60).await;
    assert_started_and_finished(&events);
    let (outcome, _, _, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert!(error.unwrap().contains("does not exist"));
    runner.stop().await;
}

#[tokio::test]
async fn a_task_job_relays_messages_until_completed() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let a = assignment(JobType::Task, "echo Can you spec me a feature?");
    let (job, branch) = (a.job_id.clone(), a.branch_name.clone());
    runner.edge.assign(a).await;
    runner.edge.wait_event(&job, "the agent's greeting", 30, |e| matches!(e, RunnerEvent::Log { content, .. } if content.contains("prompt: echo Can you spec me a feature?"))).await;

    runner
        .edge
        .send(EdgeMessage::Deliver {
            job_id: job.clone(),
            message: "An analytics dashboard".into(),
        })
        .await;
    runner.edge.wait_event(&job, "the first answer", 10, |e| matches!(e, RunnerEvent::Log { content, .. } if content == "echo: An analytics dashboard")).await;
    runner
        .edge
        .send(EdgeMessage::Deliver {
            job_id: job.clone(),
            message: "With charts".into(),
        })
        .await;
    runner
        .edge
        .wait_event(
            &job,
            "the second answer",
            10,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content == "echo: With charts"),
        )
        .await;
    assert!(!runner.has_finished(&job), "still running");

    let events = runner.complete(&job, 10).await;
    assert_started_and_finished(&events);
    let (outcome, message, pr_url, ..) = finished(&events);
    assert_eq!((outcome, pr_url), (Outcome::Completed, None));
    assert!(message.starts_with("Session completed"), "{message}");
    assert!(has_stdout(&events, "agent: input closed"));
    let answers: Vec<String> = stdout_lines(&events)
        .into_iter()
        .filter(|l| l.starts_with("echo: "))
        .collect();
    assert_eq!(
        answers,
        vec!["echo: An analytics dashboard", "echo: With charts"]
    );
    assert!(
        !runner.remotes.branches(ORG, REPO).contains(&branch),
        "tasks push nothing"
    );
    runner.stop().await;
}

/// The text of `result` events, in order.
fn results(events: &[RunnerEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Agent { event } if event["type"] == "result" => {
                event["result"].as_str().map(str::to_string)
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_claude_task_answers_each_message_in_a_resumed_turn_while_running() {
    let runner = TestRunner::start(RunnerOptions {
        format: AgentFormat::ClaudeStreamJson,
        ..Default::default()
    })
    .await;
    let a = assignment(JobType::Task, "turns");
    let job = a.job_id.clone();
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(
            &job,
            "the first turn's result",
            30,
            |e| matches!(e, RunnerEvent::Agent { event } if event["result"] == "first turn done"),
        )
        .await;
    for message in ["hello", "and again"] {
        runner
            .edge
            .send(EdgeMessage::Deliver {
                job_id: job.clone(),
                message: message.into(),
            })
            .await;
        let want = format!("resumed sess-{job}: {message}");
        runner
            .edge
            .wait_event(
                &job,
                "the answer in the resumed session",
                30,
                |e| matches!(e, RunnerEvent::Agent { event } if event["result"] == want.as_str()),
            )
            .await;
        assert!(
            !runner.has_finished(&job),
            "the answer streams back while the job runs"
        );
    }
    let events = runner.complete(&job, 10).await;
    assert_started_and_finished(&events);
    let (outcome, message, ..) = finished(&events);
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(message, "Session completed after 3 turn(s)");
    assert_eq!(
        results(&events),
        vec![
            "first turn done".to_string(),
            format!("resumed sess-{job}: hello"),
            format!("resumed sess-{job}: and again"),
        ]
    );
    let usage: Vec<String> = system_lines(&events)
        .into_iter()
        .filter(|l| l.starts_with("Agent usage: "))
        .collect();
    assert_eq!(
        usage,
        vec![
            "Agent usage: 10 tokens in, 5 out, 0 cached, $0.2500",
            "Agent usage: 3 tokens in, 2 out, 0 cached, $0.5000",
            "Agent usage: 3 tokens in, 2 out, 0 cached, $0.5000",
        ]
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_claude_task_whose_agent_announces_no_session_fails_clearly() {
    let runner = TestRunner::start(RunnerOptions {
        format: AgentFormat::ClaudeStreamJson,
        ..Default::default()
    })
    .await;
    let events = runner
        .run(assignment(JobType::Task, "just answer"), 30)
        .await;
    let (outcome, _, _, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(
        error.as_deref(),
        Some("The claude agent announced no session, so follow-up messages cannot reach it")
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_task_agent_that_exits_by_itself_decides_the_outcome() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let events = runner.run(assignment(JobType::Task, "fail"), 30).await;
    let (outcome, _, _, _, _, error) = finished(&events);
    assert_eq!(
        (outcome, error.as_deref()),
        (Outcome::Failed, Some("The agent exited with code 1"))
    );
    let events = runner
        .run(assignment(JobType::Task, "just answer"), 30)
        .await;
    assert_eq!(finished(&events).0, Outcome::Completed);
    runner.stop().await;
}

#[tokio::test]
async fn a_ralph_job_iterates_with_feedback_until_the_promise() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let mut a = assignment(JobType::Ralph, "write promise@2 build the auth system");
    a.ralph = Some(RalphParams {
        max_iterations: 5,
        completion_promise: "ALL_DONE".into(),
        feedback_commands: vec![
            "test -f kiln/iteration-1.txt".into(),
            "echo lint says no; false".into(),
        ],
    });
    let (job, branch) = (a.job_id.clone(), a.branch_name.clone());
    let events = runner.run(a, 60).await;
    assert_started_and_finished(&events);

    let its = iterations(&events);
    assert_eq!(
        its.iter().map(|i| i.iteration_number).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(
        its.iter().map(|i| i.promise_detected).collect::<Vec<_>>(),
        vec![false, true]
    );
    for it in &its {
        assert_eq!(it.exit_code, Some(0));
        assert_eq!(it.error, None);
        assert!(uuid::Uuid::parse_str(&it.id).is_ok());
        let started = chrono::DateTime::parse_from_rfc3339(&it.started_at).unwrap();
        let completed =
            chrono::DateTime::parse_from_rfc3339(it.completed_at.as_deref().unwrap()).unwrap();
        assert!(started <= completed && it.started_at.ends_with('Z'));
        assert!(
            it.output_summary
                .contains(&format!("wrote kiln/iteration-{}.txt", it.iteration_number)),
            "{}",
            it.output_summary
        );
        let fb: Vec<(String, i32, bool)> = it
            .feedback_results
            .iter()
            .map(|f| (f.command.clone(), f.exit_code, f.passed))
            .collect();
        assert_eq!(
            fb,
            vec![
                ("test -f kiln/iteration-1.txt".into(), 0, true),
                ("echo lint says no; false".into(), 1, false)
            ]
        );
    }
    assert!(
        has_stdout(&events, "lint says no"),
        "feedback output is streamed"
    );
    assert!(
        has_stdout(&events, "agent: done ALL_DONE"),
        "the promise comes from $COMPLETION_PROMISE"
    );

    let (outcome, _, pr_url, reason, total, error) = finished(&events);
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(
        (reason, total, error),
        (Some(CompletionReason::PromiseDetected), Some(2), None)
    );
    assert_eq!(
        pr_url.as_deref(),
        Some("https://github.test/acme/site/pull/1")
    );

    // The second iteration's prompt carried the first one's progress; the progress file itself is
    // kept outside the worktree and never committed.
    let second = runner
        .remotes
        .show(ORG, REPO, &format!("{branch}:kiln/iteration-2.txt"))
        .unwrap();
    assert!(
        second.starts_with("write promise@2 build the auth system\n"),
        "{second}"
    );
    assert!(
        second.contains("## Progress so far (this is iteration 2 of at most 5)"),
        "{second}"
    );
    assert!(second.contains("### Iteration 1"), "{second}");
    assert!(
        second.contains("`echo lint says no; false` FAILED (exit 1)"),
        "{second}"
    );
    assert!(
        second.contains("lint says no"),
        "the failing command's output: {second}"
    );
    let first = runner
        .remotes
        .show(ORG, REPO, &format!("{branch}:kiln/iteration-1.txt"))
        .unwrap();
    assert!(!first.contains("Progress so far"));
    let files = runner.remotes.files(ORG, REPO, &branch);
    assert_eq!(
        files,
        vec!["README.md", "kiln/iteration-1.txt", "kiln/iteration-2.txt"]
    );
    assert_eq!(
        git(
            &runner.remotes.path(ORG, REPO),
            &["rev-list", "--count", &format!("main..{branch}")]
        )
        .trim(),
        "1",
        "one commit"
    );

    runner.wait_released(&job).await;
    assert_eq!(
        worktrees_left(&runner),
        Vec::<String>::new(),
        "worktree and progress file removed"
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_ralph_job_stops_at_its_iteration_cap() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let mut a = assignment(JobType::Ralph, "write");
    a.ralph.as_mut().unwrap().max_iterations = 2;
    let events = runner.run(a, 60).await;
    let (outcome, _, pr_url, reason, total, _) = finished(&events);
    assert_eq!(
        (outcome, reason, total),
        (
            Outcome::Completed,
            Some(CompletionReason::MaxIterations),
            Some(2)
        )
    );
    assert!(pr_url.is_some());
    assert_eq!(iterations(&events).len(), 2);
    runner.stop().await;
}

#[tokio::test]
async fn a_stopped_ralph_job_finishes_its_iteration_and_opens_a_pull_request() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let a = assignment(JobType::Ralph, "write slow");
    let (job, branch) = (a.job_id.clone(), a.branch_name.clone());
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(
            &job,
            "the first iteration's output",
            30,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("agent: job")),
        )
        .await;
    runner
        .edge
        .send(EdgeMessage::Stop {
            job_id: job.clone(),
        })
        .await;
    let events = runner.edge.wait_finished(&job, 30).await;
    let (outcome, _, pr_url, reason, total, _) = finished(&events);
    assert_eq!(
        (outcome, reason, total),
        (
            Outcome::Completed,
            Some(CompletionReason::ManualStop),
            Some(1)
        )
    );
    assert_eq!(
        iterations(&events).len(),
        1,
        "the current iteration completes, no further one starts"
    );
    assert!(pr_url.is_some(), "partial work gets a pull request");
    assert!(runner
        .remotes
        .show(ORG, REPO, &format!("{branch}:kiln/iteration-1.txt"))
        .is_some());
    runner.stop().await;
}

#[tokio::test]
async fn a_ralph_iteration_that_fails_twice_ends_the_job() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let events = runner.run(assignment(JobType::Ralph, "fail"), 60).await;
    let its = iterations(&events);
    assert_eq!(
        its.iter()
            .map(|i| (i.iteration_number, i.exit_code))
            .collect::<Vec<_>>(),
        vec![(1, Some(1)), (1, Some(1))]
    );
    assert!(its.iter().all(
        |i| i.error.as_deref() == Some("the agent exited with code 1")
            && i.feedback_results.is_empty()
    ));
    let (outcome, _, pr_url, reason, total, error) = finished(&events);
    assert_eq!(
        (outcome, reason, total),
        (
            Outcome::Failed,
            Some(CompletionReason::IterationError),
            Some(1)
        )
    );
    assert_eq!(pr_url, None, "nothing was changed");
    assert!(error.unwrap().contains("failed twice"));
    runner.stop().await;
}

#[tokio::test]
async fn a_ralph_iteration_that_fails_once_is_retried() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let a = assignment(JobType::Ralph, "write flaky promise@2");
    let job = a.job_id.clone();
    let events = runner.run(a, 60).await;
    for i in 1..=2 {
        let _ = std::fs::remove_file(format!("/tmp/kiln-flaky-{job}-{i}"));
    }
    let its = iterations(&events);
    let seen: Vec<(u32, Option<i32>, bool)> = its
        .iter()
        .map(|i| (i.iteration_number, i.exit_code, i.promise_detected))
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, Some(1), false),
            (1, Some(0), false),
            (2, Some(1), false),
            (2, Some(0), true)
        ]
    );
    let (outcome, _, _, reason, total, _) = finished(&events);
    assert_eq!(
        (outcome, reason, total),
        (
            Outcome::Completed,
            Some(CompletionReason::PromiseDetected),
            Some(2)
        )
    );
    runner.stop().await;
}

#[tokio::test]
async fn a_cancelled_job_is_killed_and_cleaned_up_without_a_finished_event() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let a = assignment(JobType::Code, "hang");
    let job = a.job_id.clone();
    runner.edge.assign(a).await;
    let agent = wait_pid_file(&format!("/tmp/kiln-hang-{job}.pid")).await;
    let child = wait_pid_file(&format!("/tmp/kiln-hang-{job}.child")).await;
    runner
        .edge
        .wait_event(
            &job,
            "agent output",
            10,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("agent: job")),
        )
        .await;

    let t = Instant::now();
    runner
        .edge
        .send(EdgeMessage::Cancel {
            job_id: job.clone(),
        })
        .await;
    runner.wait_released(&job).await;
    let took = t.elapsed();
    eprintln!(
        "process executor: cancel to job released in {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        gone(agent).await && gone(child).await,
        "the agent's process group is killed"
    );
    assert_eq!(worktrees_left(&runner), Vec::<String>::new());
    // The worktree's entry and branch go with the runner's tidy-up (every second).
    let mirror = runner.repos_dir().join("acme/site.git");
    let entries = || {
        git(&mirror, &["worktree", "list", "--porcelain"])
            .matches("worktree ")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while entries() > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(entries(), 1, "only the mirror itself");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = runner.edge.events(&job);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, RunnerEvent::Finished { .. })),
        "no finished event after a cancel"
    );
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.pid"));
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.child"));
    runner.stop().await;
}

#[tokio::test]
async fn a_lost_lease_stops_the_job_without_further_events() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let a = assignment(JobType::Code, "hang");
    let job = a.job_id.clone();
    runner.edge.assign(a).await;
    let agent = wait_pid_file(&format!("/tmp/kiln-hang-{job}.pid")).await;
    runner
        .edge
        .wait_event(
            &job,
            "agent output",
            10,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("agent: job")),
        )
        .await;
    runner.edge.invalidate_lease(&job);
    runner.wait_released(&job).await;
    assert!(gone(agent).await);
    assert_eq!(worktrees_left(&runner), Vec::<String>::new());
    let stored = runner.edge.events(&job).len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        runner.edge.events(&job).len(),
        stored,
        "nothing more is sent"
    );
    assert!(!runner
        .edge
        .events(&job)
        .iter()
        .any(|e| matches!(e, RunnerEvent::Finished { .. })));
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.pid"));
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.child"));
    runner.stop().await;
}

#[tokio::test]
async fn failed_event_posts_are_retried_and_stored_once() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    runner.edge.fail_next_posts(3);
    let a = assignment(JobType::Code, "write retry");
    let (job, lease) = (a.job_id.clone(), a.lease_id.clone());
    let events = runner.run(a, 60).await;
    assert_started_and_finished(&events);
    assert_eq!(finished(&events).0, Outcome::Completed);
    assert_eq!(runner.edge.failed_posts(), 3);
    assert!(
        runner.edge.duplicates() > 0,
        "the retried batch was deduplicated by index"
    );
    assert_dense_indices(&runner, &job, &lease);
    runner.stop().await;
}

#[tokio::test]
async fn jobs_keep_running_across_a_reconnect_and_are_announced_again() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let a = assignment(JobType::Code, "hang");
    let (job, lease) = (a.job_id.clone(), a.lease_id.clone());
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(
            &job,
            "agent output",
            10,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("agent: job")),
        )
        .await;

    let t = Instant::now();
    runner.edge.disconnect();
    let hellos = runner.edge.wait_hellos(2).await;
    eprintln!(
        "reconnect after the edge closed the socket: {} ms",
        t.elapsed().as_millis()
    );
    match &hellos[1] {
        RunnerMessage::Hello { running, .. } => {
            assert_eq!(
                running,
                &vec![HeldJob {
                    job_id: job.clone(),
                    lease_id: lease.clone()
                }]
            )
        }
        other => panic!("{other:?}"),
    }
    let before = runner.edge.events(&job).len();
    wait_until("output after the reconnect", Duration::from_secs(5), || {
        runner.edge.events(&job).len() > before
    })
    .await;
    wait_until("a heartbeat listing the job", Duration::from_secs(5), || {
        runner.edge.received().iter().skip(2).any(|m| matches!(m, RunnerMessage::Heartbeat { running } if running.iter().any(|h| h.job_id == job)))
    })
    .await;

    runner
        .edge
        .send(EdgeMessage::Cancel {
            job_id: job.clone(),
        })
        .await;
    runner.wait_released(&job).await;
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.pid"));
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.child"));
    runner.stop().await;
}

#[tokio::test]
async fn assignments_beyond_capacity_wait_for_a_free_slot() {
    let runner = TestRunner::start(RunnerOptions {
        capacity: 1,
        ..Default::default()
    })
    .await;
    let a = assignment(JobType::Code, "hang");
    let b = assignment(JobType::Code, "hang");
    let (ja, jb) = (a.job_id.clone(), b.job_id.clone());
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(
            &ja,
            "A's output",
            10,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("agent: job")),
        )
        .await;
    runner.edge.assign(b).await;
    wait_until("B to be held", Duration::from_secs(5), || {
        runner.supervisor.held().len() == 2
    })
    .await;
    let h = runner.health().await;
    assert_eq!(
        h["queue"],
        json!({"running": 1, "queued": 1, "maxConcurrent": 1})
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(runner.edge.events(&jb).is_empty(), "B has not started");

    runner
        .edge
        .send(EdgeMessage::Cancel { job_id: ja.clone() })
        .await;
    let events = runner
        .edge
        .wait_event(
            &jb,
            "B's output",
            15,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content.starts_with("agent: job")),
        )
        .await;
    assert!(matches!(events[0], RunnerEvent::Started { .. }));
    runner
        .edge
        .send(EdgeMessage::Cancel { job_id: jb.clone() })
        .await;
    runner.wait_released(&jb).await;
    for j in [&ja, &jb] {
        let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{j}.pid"));
        let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{j}.child"));
    }
    runner.stop().await;
}

#[tokio::test]
async fn claude_stream_json_lines_become_agent_events() {
    let runner = TestRunner::start(RunnerOptions {
        format: AgentFormat::ClaudeStreamJson,
        ..Default::default()
    })
    .await;
    let events = runner.run(assignment(JobType::Code, "json"), 60).await;
    let agent: Vec<&serde_json::Value> = events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Agent { event } => Some(event),
            _ => None,
        })
        .collect();
    assert_eq!(agent.len(), 3, "{events:#?}");
    assert_eq!(agent[0]["type"], "system");
    assert_eq!(
        agent[2],
        &json!({"type": "result", "subtype": "success", "result": "all good"})
    );
    assert!(stdout_lines(&events).contains(&"not json at all".to_string()));
    runner.stop().await;
}

#[tokio::test]
async fn repository_requests_are_answered_over_the_socket() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let repos = vec![
        RepoSpec {
            github_org: ORG.into(),
            github_repo: REPO.into(),
        },
        RepoSpec {
            github_org: ORG.into(),
            github_repo: "absent".into(),
        },
    ];
    runner
        .edge
        .send(EdgeMessage::Request {
            request_id: "r-clone".into(),
            request: RunnerRequest::Clone {
                repos: repos.clone(),
            },
        })
        .await;
    let reply = runner.edge.wait_reply("r-clone").await;
    assert_eq!(reply[0]["repo"], "acme/site");
    assert_eq!(reply[0]["success"], true);
    assert_eq!(
        reply[0]["path"],
        runner
            .repos_dir()
            .join("acme/site.git")
            .display()
            .to_string()
    );
    assert_eq!(reply[1]["success"], false);
    assert!(reply[1]["error"].as_str().unwrap().contains("fetch"));

    runner
        .edge
        .send(EdgeMessage::Request {
            request_id: "r-sync".into(),
            request: RunnerRequest::Sync {
                repos: repos[..1].to_vec(),
            },
        })
        .await;
    assert_eq!(
        runner.edge.wait_reply("r-sync").await,
        json!([{"repo": "acme/site", "success": true}])
    );
    runner.stop().await;
}

#[tokio::test]
async fn stopping_the_runner_cancels_its_jobs_and_cleans_up() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    let a = assignment(JobType::Code, "hang");
    let job = a.job_id.clone();
    runner.edge.assign(a).await;
    let agent = wait_pid_file(&format!("/tmp/kiln-hang-{job}.pid")).await;
    let worktrees = runner.worktrees_dir();
    assert!(worktrees.join(&job).exists());
    runner.stop().await;
    assert!(gone(agent).await);
    assert!(!worktrees.join(&job).exists());
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.pid"));
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.child"));
}

#[tokio::test]
async fn a_finished_job_stays_held_until_the_edge_has_its_events_yet_never_blocks_a_stop() {
    let runner = TestRunner::start(RunnerOptions::default()).await;
    runner.edge.fail_next_posts(u32::MAX);
    // `slow`: the worktree lives a second, long enough to be seen before it is removed.
    let a = assignment(JobType::Code, "slow look around");
    let job = a.job_id.clone();
    runner.edge.assign(a).await;
    // The first batch is retried forever, so nothing after it arrives; the job's work is done
    // once its worktree is cleaned up.
    runner
        .edge
        .wait_event(&job, "the first batch", 10, |e| {
            matches!(e, RunnerEvent::Started { .. })
        })
        .await;
    let worktree = runner.worktrees_dir().join(&job);
    wait_until("the worktree", Duration::from_secs(30), || {
        worktree.exists()
    })
    .await;
    wait_until("the worktree's removal", Duration::from_secs(30), || {
        !worktree.exists()
    })
    .await;
    assert!(
        runner.supervisor.held().iter().any(|h| h.job_id == job),
        "the lease is kept while events are undelivered"
    );
    let t = Instant::now();
    runner.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stopping took {:?}",
        t.elapsed()
    );
    let posts = runner.edge.failed_posts();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        runner.edge.failed_posts(),
        posts,
        "the stopped runner's reporter keeps posting"
    );
}

/// A job's own `timeoutSeconds` ends it: `failed`, naming the limit, its agent killed, its
/// worktree removed and its slot free for the next job.
#[tokio::test]
async fn a_job_over_its_own_time_limit_fails_and_frees_its_slot() {
    let runner = TestRunner::start(RunnerOptions {
        capacity: 1,
        ..Default::default()
    })
    .await;
    let mut a = assignment(JobType::Code, "hang");
    // Long enough for the worktree and the agent's start on a busy machine.
    a.timeout_seconds = Some(4);
    let (job, branch) = (a.job_id.clone(), a.branch_name.clone());
    let t = Instant::now();
    runner.edge.assign(a).await;
    let agent = wait_pid_file(&format!("/tmp/kiln-hang-{job}.pid")).await;
    let child = wait_pid_file(&format!("/tmp/kiln-hang-{job}.child")).await;
    let events = runner.edge.wait_finished(&job, 20).await;
    let took = t.elapsed();
    assert_started_and_finished(&events);
    let (outcome, message, _, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(
        error.as_deref(),
        Some("The job exceeded its time limit of 4 s (timeoutSeconds)")
    );
    assert_eq!(message, error.clone().unwrap());
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(15),
        "{took:?}"
    );
    runner.wait_released(&job).await;
    assert!(
        gone(agent).await && gone(child).await,
        "the agent is killed"
    );
    assert_eq!(worktrees_left(&runner), Vec::<String>::new());
    assert!(!runner.remotes.branches(ORG, REPO).contains(&branch));
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.pid"));
    let _ = std::fs::remove_file(format!("/tmp/kiln-hang-{job}.child"));

    // The only slot is free again.
    let events = runner.run(assignment(JobType::Code, "write"), 30).await;
    assert_eq!(finished(&events).0, Outcome::Completed, "{events:#?}");
    runner.stop().await;
}

/// `RUNNER_JOB_TIMEOUT` caps every job, including one that asks for longer.
#[tokio::test]
async fn runner_job_timeout_caps_a_jobs_longer_limit() {
    let runner = TestRunner::start(RunnerOptions {
        limits: JobLimits {
            job_timeout: Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let mut a = assignment(JobType::Ralph, "slow");
    a.timeout_seconds = Some(3600);
    let job = a.job_id.clone();
    let events = runner.run(a, 20).await;
    assert_started_and_finished(&events);
    let (outcome, _, _, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(
        error.as_deref(),
        Some("The job exceeded its time limit of 1 s (RUNNER_JOB_TIMEOUT)")
    );
    runner.wait_released(&job).await;
    assert_eq!(worktrees_left(&runner), Vec::<String>::new());
    runner.stop().await;
}

/// A task whose agent is waiting for a message that never comes fails after
/// `RUNNER_TASK_IDLE_TIMEOUT`; a message in time keeps it going.
#[tokio::test]
async fn a_task_left_waiting_for_a_message_fails_after_the_idle_limit() {
    let runner = TestRunner::start(RunnerOptions {
        limits: JobLimits {
            task_idle_timeout: Duration::from_secs(3),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    // A text agent: idle once it has said nothing for the limit and no message came.
    let a = assignment(JobType::Task, "echo");
    let job = a.job_id.clone();
    let t = Instant::now();
    runner.edge.assign(a).await;
    runner
        .edge
        .wait_event(
            &job,
            "the greeting",
            10,
            |e| matches!(e, RunnerEvent::Log { content, .. } if content.ends_with("prompt: echo")),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    runner
        .edge
        .send(EdgeMessage::Deliver {
            job_id: job.clone(),
            message: "still there?".into(),
        })
        .await;
    let events = runner.edge.wait_finished(&job, 20).await;
    let took = t.elapsed();
    assert!(has_stdout(&events, "echo: still there?"), "{events:#?}");
    let (outcome, _, _, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(
        error.as_deref(),
        Some("The task waited 3 s for a message (RUNNER_TASK_IDLE_TIMEOUT)")
    );
    assert!(
        took >= Duration::from_secs(4),
        "the message reset the wait: {took:?}"
    );
    runner.wait_released(&job).await;
    assert_eq!(worktrees_left(&runner), Vec::<String>::new());
    runner.stop().await;
}

/// The same for an agent that answers in turns (Claude Code): the wait starts after its turn.
#[tokio::test]
async fn a_claude_task_left_waiting_after_its_turn_fails_after_the_idle_limit() {
    let runner = TestRunner::start(RunnerOptions {
        format: AgentFormat::ClaudeStreamJson,
        limits: JobLimits {
            task_idle_timeout: Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let a = assignment(JobType::Task, "turns");
    let job = a.job_id.clone();
    let events = runner.run(a, 20).await;
    assert_started_and_finished(&events);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RunnerEvent::Agent { event } if event["type"] == "result")),
        "the first turn ran: {events:#?}"
    );
    let (outcome, _, _, _, _, error) = finished(&events);
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(
        error.as_deref(),
        Some("The task waited 1 s for a message (RUNNER_TASK_IDLE_TIMEOUT)")
    );
    runner.wait_released(&job).await;
    runner.stop().await;
}
